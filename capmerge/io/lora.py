"""PEFT LoRA adapters: open one as a low-rank vector, and diff two of them exactly, in low-rank form.

An adapter (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``) *is* a capability vector relative to its
base: per target module, ΔW = s·B·A with s = α/r (α/√r with ``use_rslora``; α and r per module from
``alpha_pattern``/``rank_pattern``), transposed for ``fan_in_fan_out`` layers and embeddings. :func:`open_adapter`
returns it as a lazy view of the dense ΔW under the base model's weight names (``<module>.weight``), so
``capmerge apply BASE ADAPTER/`` merges it. Weights the adapter stores in full (``modules_to_save``, trained biases)
are deltas only against a base: :meth:`AdapterCheckpoint.with_base` binds one (``apply`` does it with its BASE).

:func:`diff_adapters` writes τ = s_a·B_a·A_a − s_s·B_s·A_s per module exactly as the rank r_a + r_s product
[s_a·B_a, −s_s·B_s]·[A_a; A_s] (a low-rank vector, :mod:`capmerge.io.compression` format), or dense with ``dense=True``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capmerge.errors import CheckpointError, CheckpointNotFoundError, MismatchError, NonFiniteError, UsageError
from capmerge.io.checkpoint import DTYPES, Checkpoint, TensorInfo, read_header, read_json_file
from capmerge.io.lazy import LazyCheckpoint, digest_of

PEFT_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMB_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_UNSUPPORTED = ("lora_magnitude_vector", "lora_B.bias", "lora_A.bias")
FLOAT32_MAX = 3.4028234663852886e38  # the scale multiplies float32 factors


@dataclass
class AdapterConfig:
    """The parts of ``adapter_config.json`` that define ΔW, checked (see :func:`read_config`)."""

    alpha: float
    r: int | None
    alpha_pattern: dict[str, float]
    rank_pattern: dict[str, int]
    rslora: bool
    fan_in_fan_out: bool


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CheckpointError(f"{key} must be a number, got {_shown(value)}", where)
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"{key} must be a finite number, got {value}", where)
    try:
        x = float(value)
    except OverflowError:  # an integer beyond float64
        x = math.inf
    if abs(x) > FLOAT32_MAX:
        raise CheckpointError(f"{key} {_shown(value)} is too large (the scale multiplies float32 factors)", where)
    return x


def _rank(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{key} must be a positive integer, got {_shown(value)}", where)
    return value


def _flag(config: dict[str, Any], key: str, where: str) -> bool:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise CheckpointError(f"{key} must be true or false, got {_shown(value)}", where)
    return bool(value)


def _patterns(config: dict[str, Any], key: str, where: str, check: Callable[[Any, str, str], Any]) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{key} must map module-name patterns to values, got {_shown(value)}", where)
    out = {}
    for k, v in value.items():
        try:
            re.compile(rf"(.*\.)?({k})$")  # how PEFT matches it (pattern_value)
        except (re.error, RecursionError, OverflowError):
            try:
                re.compile(k)
                why = "not a valid regular expression"
            except (re.error, RecursionError, OverflowError) as e:  # the reason, at a position in the key itself
                why = f"not a valid regular expression: {e}"
            raise CheckpointError(f"{key} key {json.dumps(k)} is {why}", where) from None
        out[k] = check(v, f"{key}[{json.dumps(k)}]", where)
    return out


def read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a JSON object (one ``error:`` line naming the file when it is not one)."""
    config = read_json_file(path, "adapter_config.json")
    if not isinstance(config, dict):
        raise CheckpointError("adapter_config.json is not a valid JSON object", str(path))
    return config


def check_config(config: dict[str, Any], where: str) -> AdapterConfig:
    """The keys of a LoRA ``adapter_config.json`` that define ΔW, with PEFT's defaults, each checked: ``lora_alpha``
    (finite, within float32), ``r`` and ``rank_pattern`` values (positive integers), ``alpha_pattern`` /
    ``rank_pattern`` (mappings whose keys are regular expressions), ``use_rslora`` / ``fan_in_fan_out`` (booleans).
    Raises CheckpointError naming the key and ``where``."""
    r = config.get("r")
    return AdapterConfig(
        alpha=_number(config.get("lora_alpha", 8), "lora_alpha", where),
        r=None if r is None else _rank(r, "r", where),
        alpha_pattern=_patterns(config, "alpha_pattern", where, _number),
        rank_pattern=_patterns(config, "rank_pattern", where, _rank),
        rslora=_flag(config, "use_rslora", where),
        fan_in_fan_out=_flag(config, "fan_in_fan_out", where),
    )


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``alpha_pattern`` lookup: the first key K with ``re.match(rf"(.*\\.)?({K})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class AdapterCheckpoint(LazyCheckpoint):
    """A LoRA adapter as a lazy low-rank vector. ``factors``: base weight name → () -> (B', A') with ΔW = B'·A'
    exactly (scale and transposes folded in, float32); ``full``: base weight name → the adapter's full tensor name."""

    factors: dict[str, Callable[[], tuple[Any, Any]]] = field(default_factory=dict, repr=False)
    full: dict[str, str] = field(default_factory=dict)
    raw: Checkpoint | None = field(default=None, repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def with_base(self, base: Checkpoint) -> AdapterCheckpoint:
        """The same adapter whose full weights (``modules_to_save``) read as deltas against ``base``."""
        import dataclasses

        full = {n: info for n, info in self.tensors.items() if info.name in self.full}  # current names
        missing = [n for n in full if n not in base.tensors]
        if missing:
            raise MismatchError(f"the adapter's full weights are not in BASE ({', '.join(missing[:5])})", self.ref)
        loaders = dict(self.loaders)
        for name, info in full.items():
            if base.tensors[name].shape != info.shape:
                raise MismatchError(f"shape mismatch: {list(base.tensors[name].shape)} in BASE vs "
                                    f"{list(info.shape)} in the adapter", name)  # fmt: skip
            loaders[info.name] = _full_delta(self.raw, self.full[info.name], base, name, info.dtype)
        return dataclasses.replace(
            self, loaders=loaders, full={}, notes=[*self.notes, f"full weights against {base.ref}"]
        )


def _full_delta(raw: Any, raw_name: str, base: Checkpoint, name: str, code: str) -> Callable[[], Any]:
    def load() -> Any:

        from capmerge._torch import torch_dtype

        return (raw.read_tensor(raw_name).float() - base.read_tensor(name).float()).to(torch_dtype(code))

    return load


def _needs_base(name: str, ref: str) -> Callable[[], Any]:
    def load() -> Any:
        raise CheckpointError(
            f"tensor {name} is stored in full by the adapter (modules_to_save): its delta needs the base model "
            "(apply binds it; for diff pass --base)",
            ref,
        )

    return load


def open_adapter(ref: str, path: Path) -> AdapterCheckpoint:
    """Open a PEFT LoRA adapter directory as a lazy vector of ΔW under the base model's names."""
    cfg_path = path / "adapter_config.json"
    config = read_config(cfg_path)
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise CheckpointError(f"unsupported PEFT adapter type {peft_type} (only LoRA)", str(cfg_path))
    if _flag(config, "use_dora", str(cfg_path)):
        raise CheckpointError("DoRA adapters are not a low-rank difference (use_dora: true)", str(cfg_path))
    cfg = check_config(config, str(cfg_path))
    raw = _weights(ref, path)
    pairs, embedding, full = _sort_tensors(raw)
    infos: dict[str, TensorInfo] = {}
    loaders: dict[str, Callable[[], Any]] = {}
    blocks: dict[str, Callable[[], Any]] = {}
    factors: dict[str, Callable[[], tuple[Any, Any]]] = {}
    storages: dict[str, dict[str, Any]] = {}
    for module, parts in pairs.items():
        name, info, storage, factors_of = _module(raw, module, parts, module in embedding, cfg, str(cfg_path))
        factors[name] = factors_of
        blocks[name] = _blocks(factors[name], info.dtype)
        infos[name], storages[name] = info, storage
    for name, raw_name in full.items():
        if name in infos:
            raise CheckpointError(f"tensor {name} is both a LoRA target and stored in full", raw.ref)
        info = raw.tensors[raw_name]
        infos[name] = TensorInfo(name, info.dtype, info.shape, info.shard, 0, info.nbytes)
        loaders[name] = _needs_base(name, ref)
        storages[name] = {"storage": "full", "nbytes": info.nbytes, "dtype": info.dtype}
    return AdapterCheckpoint(
        ref,
        raw.files,
        infos,
        {"format": "pt", "capmerge.kind": "lora-adapter"},
        root=str(path),
        loaders=loaders,
        blocks=blocks,
        vector_kind="lowrank",
        storages=storages,
        source="peft-lora",
        digest=digest_of(raw.fingerprint(), sorted(config.items(), key=lambda kv: kv[0]).__repr__()),
        factors=factors,
        full=full,
        raw=raw,
        config=config,
    )


def name_of(module: str) -> str:
    """The base weight a LoRA module changes."""
    return f"{module}.weight"


def _weights(ref: str, path: Path) -> Checkpoint:
    """The adapter's tensors: adapter_model.safetensors, or the pickled adapter_model.bin."""
    if (path / "adapter_model.safetensors").exists():  # a FIFO or device there is refused by read_header
        hdr = read_header(path / "adapter_model.safetensors")
        raw: Checkpoint = Checkpoint(str(path / "adapter_model.safetensors"), [hdr.path], hdr.tensors, hdr.metadata,
                                     headers=[hdr])  # fmt: skip
    elif (path / "adapter_model.bin").exists():
        from capmerge.io.pickles import open_pickle

        raw = open_pickle(str(path / "adapter_model.bin"), path / "adapter_model.bin")
    else:
        raise CheckpointNotFoundError("adapter directory has no adapter_model.safetensors or adapter_model.bin", ref)
    return raw


def _sort_tensors(raw: Checkpoint) -> tuple[dict[str, dict[str, TensorInfo]], set[str], dict[str, str]]:
    """LoRA factor pairs by module, which modules are embeddings, and the weights stored in full (modules_to_save)."""
    pairs: dict[str, dict[str, TensorInfo]] = {}
    embedding: set[str] = set()
    full: dict[str, str] = {}
    for raw_name, info in raw.tensors.items():
        name = raw_name[len(PEFT_PREFIX) :] if raw_name.startswith(PEFT_PREFIX) else raw_name
        if any(name.endswith(u) for u in _UNSUPPORTED):
            raise CheckpointError(f"unsupported adapter tensor {raw_name} (DoRA or LoRA biases)", raw.ref)
        m = _LORA_RE.match(name) or _EMB_RE.match(name)
        if m is None:
            full[name.replace(".modules_to_save.default.", ".")] = raw_name
            continue
        part = "A" if m["part"].endswith("A") else "B"
        pairs.setdefault(m["module"], {})[part] = info
        if m["part"].startswith("lora_embedding"):
            embedding.add(m["module"])
    return pairs, embedding, full


def _module(
    raw: Checkpoint, module: str, parts: dict[str, TensorInfo], emb: bool, cfg: AdapterConfig, cfg_path: str
) -> tuple[str, TensorInfo, dict[str, Any], Callable[[], tuple[Any, Any]]]:
    """One LoRA module checked against the config: the ΔW it stands for (name, info, storage record, factors)."""
    if set(parts) != {"A", "B"}:
        raise CheckpointError(f"LoRA module {module} lacks its lora_{'B' if 'A' in parts else 'A'} tensor", raw.ref)
    a, b = parts["A"], parts["B"]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise CheckpointError(f"unsupported LoRA layer {module} (convolution factors {list(a.shape)})", raw.ref)
    r = a.shape[0]
    if b.shape[1] != r:
        raise CheckpointError(f"LoRA factors of {module} do not chain: A {list(a.shape)}, B {list(b.shape)}", raw.ref)
    a_label = f"{'lora_embedding_A' if emb else 'lora_A'} {list(a.shape)}"
    if r == 0:
        raise CheckpointError(f"LoRA module {module} has rank 0 ({a_label})", raw.ref)
    configured = pattern_value(cfg.rank_pattern, module, cfg.r)
    if configured is not None and configured != r:
        key = "rank_pattern" if module_matches(cfg.rank_pattern, module) else "r"
        raise CheckpointError(f"LoRA module {module} has rank {r} ({a_label}) but {key} gives {configured}",
                              str(cfg_path))  # fmt: skip
    alpha = pattern_value(cfg.alpha_pattern, module, cfg.alpha)
    scale = alpha / math.sqrt(r) if cfg.rslora else alpha / r
    transposed = emb or cfg.fan_in_fan_out
    shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
    name = name_of(module)
    code = b.dtype if b.is_float else "F32"
    info = TensorInfo(name, code, shape, b.shard, 0, math.prod(shape) * DTYPES[code][0])
    storage = {"storage": "lowrank", "rank": r, "scale": scale, "nbytes": a.nbytes + b.nbytes, "dtype": code}
    return name, info, storage, _factors(raw, a.name, b.name, scale, transposed, module)


def module_matches(patterns: dict[str, Any], module: str) -> bool:
    return any(re.match(rf"(.*\.)?({key})$", module) for key in patterns)


def _factors(raw: Checkpoint, a_name: str, b_name: str, scale: float, transposed: bool,
             module: str) -> Callable[[], tuple]:  # fmt: skip
    def load() -> tuple[Any, Any]:
        import torch

        a, b = raw.read_tensor(a_name).float(), raw.read_tensor(b_name).float()
        finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
        if transposed:  # ΔW = s·(B·A)ᵀ = (s·Aᵀ)·Bᵀ
            bs, as_ = (a.T * scale).contiguous(), b.T.contiguous()
        else:
            bs, as_ = (b * scale).contiguous(), a.contiguous()
        if finite and not bool(torch.isfinite(bs).all()):
            raise NonFiniteError(f"the LoRA factors times the scale {scale:g} (lora_alpha / r) overflow float32",
                                 f"{module} in {raw.ref}")  # fmt: skip
        return bs, as_

    return load


def _zero_product(bs: list[Any], as_: list[Any]) -> bool:
    """Whether Σ B_i·A_i (the terms of τ) is exactly zero without forming it: every term has a zero factor, or the
    two terms are one adapter's factors against the other's, bit for bit (the same module in two adapters, e.g. the
    same adapter saved twice). Forming the product instead would not always cancel to 0 in floating point."""
    import torch

    live = [(b, a) for b, a in zip(bs, as_, strict=True) if b.any() and a.any()]
    if not live:
        return True
    if len(live) == 2:
        (b1, a1), (b2, a2) = live
        return torch.equal(b1, -b2) and torch.equal(a1, a2)
    return False


def _blocks(factors: Callable[[], tuple[Any, Any]], code: str) -> Callable[[], Any]:
    def open_blocks() -> Any:
        from capmerge.io.compression import LowRankBlocks

        b, a = factors()
        return LowRankBlocks(b, a, code)

    return open_blocks


def diff_adapters(
    sft: AdapterCheckpoint,
    aux: AdapterCheckpoint,
    output: str | os.PathLike[str],
    *,
    dense: bool = False,
    base: Checkpoint | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """τ = ΔW_aux − ΔW_sft for every module either adapter touches, exactly (see the module docstring).

    Returns a dict for the summary: tensors written, their storage, ranks, files, bytes.
    """
    from capmerge._version import __version__
    from capmerge.io.compression import vector_metadata, write_vector

    t0 = time.perf_counter()
    needing = sorted({n for n in sft.full} ^ {n for n in aux.full})
    if needing and base is None:
        raise UsageError(
            f"modules_to_save weights in only one adapter need the base model ({', '.join(needing[:10])}); "
            "pass --base BASE"
        )
    if base is not None:
        sft, aux = (
            sft.with_base(base) if sft.full and needing else sft,
            aux.with_base(base) if aux.full and needing else aux,
        )
    names = list(dict.fromkeys([*aux.tensors, *sft.tensors]))
    for n in names:
        if n in aux.tensors and n in sft.tensors and aux.tensors[n].shape != sft.tensors[n].shape:
            raise MismatchError(f"shape mismatch: {list(sft.tensors[n].shape)} in SFT vs "
                                f"{list(aux.tensors[n].shape)} in AUX", n)  # fmt: skip
    table, planned = _layout(sft, aux, names, dense)
    ranks: dict[str, int] = {}
    zero: list[str] = []  # τ is exactly zero: left out, as diff leaves out unchanged tensors

    def metadata() -> dict[str, str]:
        for n in zero:  # every tensor is written before this is called
            del table[n]
        return vector_metadata("dense" if dense else "lowrank", table, {
            "capmerge.base": sft.ref,
            "capmerge.aux": aux.ref,
            "capmerge.base_fingerprint": sft.fingerprint(),
            "capmerge.aux_fingerprint": aux.fingerprint(),
            "capmerge.version": __version__,
            "capmerge.source": "lora-adapters",
        })  # fmt: skip

    files, written = write_vector(output, [sft, aux, *([base] if base else [])], planned,
                                  _produce(sft, aux, names, table, zero, ranks), metadata, force=force)  # fmt: skip
    return {
        "tensors_written": len(names) - len(zero),
        "zero_tensors": zero,
        "lowrank": sum(1 for e in table.values() if e["storage"] == "lowrank"),
        "dense": sum(1 for e in table.values() if e["storage"] == "dense"),
        "ranks": ranks,
        "files": files,
        "bytes_written": written,
        # every stored tensor of both adapters is read once, and the base's weights that one-sided full weights need
        "bytes_read": sum(i.nbytes for s in (sft, aux) for i in s.raw.tensors.values())  # type: ignore[union-attr]
        + (sum(base.tensors[n].nbytes for n in needing if n in base.tensors) if base is not None else 0),
        "seconds": time.perf_counter() - t0,
    }


def _layout(
    sft: AdapterCheckpoint, aux: AdapterCheckpoint, names: list[str], dense: bool
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str, tuple[int, ...]]]]:
    """How each τ tensor is stored (low rank when both sides hold factors or none, else dense) and the planned file
    entries: ``{name}.lora_B`` / ``.lora_A`` of rank r_aux + r_sft, or the dense tensor."""
    table: dict[str, dict[str, Any]] = {}
    planned: list[tuple[str, str, tuple[int, ...]]] = []
    for n in names:
        info = aux.tensors.get(n) or sft.tensors[n]
        code = info.dtype
        low = (
            not dense
            and n in (aux.factors.keys() | sft.factors.keys())
            and n not in (aux.full.keys() | sft.full.keys())
        )
        low = low and (n not in aux.tensors or n in aux.factors) and (n not in sft.tensors or n in sft.factors)
        table[n] = {"dtype": code, "shape": list(info.shape), "storage": "lowrank" if low else "dense"}
        if low:
            r = sum(s.storages[n]["rank"] for s in (aux, sft) if n in s.factors)
            planned += [(f"{n}.lora_B", "F32", (info.shape[0], r)), (f"{n}.lora_A", "F32", (r, info.shape[1]))]
        else:
            planned.append((n, code, info.shape))
    return table, planned


def _produce(sft: AdapterCheckpoint, aux: AdapterCheckpoint, names: list[str], table: dict[str, dict[str, Any]],
             zero: list[str], ranks: dict[str, int]) -> Iterator[tuple[str, Any]]:  # fmt: skip
    """The tensors of τ in file order; exact zeros are recorded in ``zero`` and left out."""
    import torch

    for n in names:
        if table[n]["storage"] == "lowrank":
            bs, as_ = [], []
            for side, sign in ((aux, 1.0), (sft, -1.0)):
                if n in side.factors:
                    b, a = side.factors[n]()
                    bs.append(b if sign > 0 else -b)
                    as_.append(a)
            if _zero_product(bs, as_):
                zero.append(n)
                continue
            ranks[n] = sum(a.shape[0] for a in as_)
            yield f"{n}.lora_B", torch.cat(bs, dim=1)
            yield f"{n}.lora_A", torch.cat(as_, dim=0)
            continue
        t = _dense_tau(sft, aux, n, table[n]["dtype"], tuple(table[n]["shape"]))
        if t is None or not t.any():
            zero.append(n)
            continue
        yield n, t


def _dense_tau(sft: AdapterCheckpoint, aux: AdapterCheckpoint, n: str, code: str, shape: tuple[int, ...]) -> Any:
    """τ of one tensor stored dense: one exact product when both sides hold factors (None when it is exactly 0),
    else the full weights' difference (a one-sided full weight against the base)."""
    import torch

    from capmerge._torch import torch_dtype
    from capmerge.io.compression import lowrank_dense

    if n in aux.factors and n in sft.factors:  # dense, but still one exact product
        ba, aa = aux.factors[n]()
        bs_, as_s = sft.factors[n]()
        if _zero_product([ba, -bs_], [aa, as_s]):  # the product in floating point might not cancel
            return None
        return lowrank_dense(torch.cat([ba, -bs_], 1), torch.cat([aa, as_s], 0), code, shape)
    acc = torch.zeros(shape, dtype=torch.float32)
    both_full = n in aux.full and n in sft.full  # τ = full_aux − full_sft, no base needed
    for side, sign in ((aux, 1.0), (sft, -1.0)):
        if n in side.tensors:
            value = side.raw.read_tensor(side.full[n]) if both_full else side.read_tensor(n)
            acc += sign * value.float()
    return acc.to(torch_dtype(code))
