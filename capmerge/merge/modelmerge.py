"""Model-centric merges (``capmerge merge``, mergekit configurations): N models, optionally a base, tensor by tensor.

A :class:`MergeSpec` says which models are merged with which method and parameters — either whole models
(``models``) or stacks of layer ranges (``slices``, mergekit's layer stacking). :func:`run_merge` opens the inputs
(local files and directories, sharded or not, Hub references, ``MODEL+LORA`` = a LoRA adapter applied to MODEL
first), plans one output tensor at a time with its parameters resolved (:mod:`capmerge.merge.model_params`), and
streams the result through the one engine and the atomic writer. A method with a block form
(:mod:`capmerge.merge.methods.blockform`) becomes one engine job per tensor: its statistics pass as the job's prepare
pass, then the native kernel block by block (memory: the engine's buffers, whatever the tensor's size; vocabulary
tensors aligned to a chosen tokenizer too, their rows made a block at a time: :func:`vocabulary.streams`). Otherwise the
same tensor of each model is read whole, the method's ``fn`` runs in float32, and the result is rounded once to the
output dtype and written (memory: one tensor per model). Non-floating tensors are copied from the base (else the first
model).
Nothing is written when a model lacks a tensor, shapes differ or a parameter is missing: the plan is complete before
the first byte is read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from capmerge.errors import CapmergeError, MismatchError, NonFiniteError, UsageError
from capmerge.io.checkpoint import DTYPES, Checkpoint, TensorInfo, parse_dtype
from capmerge.io.names import OUTPUT_EMBEDDINGS, ends_with, tied_embedding
from capmerge.io.writer import Output, finish_files, parse_size
from capmerge.merge import model_side
from capmerge.merge.engine import Job, Sink, run
from capmerge.merge.masks import BLOCK_CONTAINERS, count_layers, layer_index
from capmerge.merge.model_params import kind_of, layer_t, resolve
from capmerge.merge.summary import Summary, start_progress

if TYPE_CHECKING:
    from capmerge.merge.methods.models import ModelMethod

Settings = Mapping[str, Any]
T = TypeVar("T")


@dataclass
class SourceSpec:
    """One input of a merge: ``model`` (a reference; ``MODEL+LORA`` applies the adapter LORA first), its own
    parameter settings, and in a slice the ``layer_range`` [start, end) it gives. ``where`` locates it in a
    configuration file, for error messages."""

    model: str
    parameters: Settings | None = None
    layer_range: tuple[int, int] | None = None
    where: str | None = None


@dataclass
class SliceSpec:
    """An output slice: sources of equal layer count merged layer by layer, and the slice's own parameters."""

    sources: list[SourceSpec]
    parameters: Settings | None = None


@dataclass
class MergeSpec:
    """Everything a model merge takes (see :func:`run_merge`); ``models`` and ``slices`` are exclusive."""

    method: str
    models: list[SourceSpec] = field(default_factory=list)
    slices: list[SliceSpec] = field(default_factory=list)
    base: str | None = None
    parameters: Settings = field(default_factory=dict)
    out_dtype: str | None = None
    seed: int = 0
    tokenizer_source: str | None = None
    tokenizer_tokens: dict[str, Any] | None = None  # mergekit's tokenizer.tokens: token -> vocabulary.TokenSource
    pad_to_multiple_of: int | None = None  # mergekit's tokenizer.pad_to_multiple_of
    copy_tokenizer: bool = True  # without tokenizer_source: copy the base's (else the first model's) tokenizer
    model_card: bool = True  # write README.md
    chat_template: str | None = None
    config_text: str | None = None  # the configuration as written (model card, mergekit_config.yml)
    command: str | None = None  # the command line of ``capmerge merge`` (model card)
    where: Mapping[str, str] = field(default_factory=dict)  # key -> "file:line" of a configuration


@dataclass
class Entry:
    """One model's tensor feeding an output tensor, with the settings that apply to it (most specific first)."""

    input: int
    name: str
    scopes: tuple[Settings | None, ...]
    source: SourceSpec
    match: str | None = None  # the name its parameters' filters see, where it is read under another (a tied head)


@dataclass
class TensorPlan:
    """One output tensor: its entries (the base's apart), ``t`` for gradients, and the shared settings."""

    name: str
    entries: list[Entry]
    base: Entry | None
    t: float
    shared: tuple[Settings | None, ...]
    model_params: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


class ModelInput:
    """An opened model: its checkpoint and, for ``MODEL+LORA``, the adapter whose ΔW is added when read."""

    def __init__(self, ref: str, opts: Mapping[str, Any]) -> None:
        from capmerge.io.open import open_checkpoint

        self.ref = ref
        model, plus, lora = ref.partition("+")
        self.ck: Checkpoint = open_checkpoint(model, **opts)
        self.lora: Checkpoint | None = None
        if plus:
            from capmerge.io.names import normalise

            adapter = open_checkpoint(lora, **opts)
            if getattr(adapter, "source", None) != "peft-lora":
                raise UsageError(f"{lora} is not a LoRA adapter (MODEL+LORA applies an adapter to MODEL)", ref)
            _, (adapter,), _, _ = normalise(self.ck, [adapter], labels=[model, lora])
            if getattr(adapter, "full", None):
                adapter = adapter.with_base(self.ck)  # type: ignore[attr-defined]
            extra = [n for n in adapter.tensors if n not in self.ck.tensors]
            if extra:
                raise MismatchError(f"the adapter changes tensors the model lacks ({', '.join(extra[:5])})", ref)
            self.lora = adapter

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return [self.ck] if self.lora is None else [self.ck, self.lora]

    def read(self, name: str) -> Any:
        """Tensor ``name`` (float32 for floating tensors, with the adapter's ΔW added)."""
        t = self.ck.read_tensor(name)
        if not self.ck.tensors[name].is_float:
            return t
        t = t.float()
        if self.lora is not None and name in self.lora.tensors:
            t = t + self.lora.read_tensor(name).float()
        return t

    def close(self) -> None:
        for ck in self.checkpoints:
            ck.close()


def rename_layer(name: str, index: int) -> str:
    """``name`` with its block index (the component after ``layers``/``h``/``blocks``...) replaced by ``index``."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in BLOCK_CONTAINERS and parts[i + 1].isdigit():
            parts[i + 1] = str(index)
            return ".".join(parts)
    return name


def is_pre_layer(name: str) -> bool:
    """Tensors outside the layers that come before them (embeddings); the others (final norm, head) come after."""
    leaf = name.lower()
    return any(k in leaf for k in ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings"))


@dataclass
class Planned:
    """A planned merge: the method, the opened inputs, one :class:`TensorPlan` per output tensor, the layer count."""

    spec: MergeSpec
    method: ModelMethod
    inputs: list[ModelInput]
    tensors: list[TensorPlan]
    n_layers: int
    index: dict[str, int] = field(default_factory=dict)  # reference -> position in ``inputs``
    warnings: list[str] = field(default_factory=list)
    vocab_tokens: int | None = None  # the chosen tokenizer's tokens: vocabulary tensors with more rows are cut to it
    untied: bool = False  # a head the reference model ties is written: the output's config unties it
    vocab: Any = None  # the models' vocabularies aligned to the chosen tokenizer's (vocabulary.Vocabulary)
    ties: dict[int, str | None] = field(default_factory=dict)  # input -> the embedding it ties its head to

    def tied_embedding(self, i: int) -> str | None:
        """The input embedding that input ``i`` ties its head to (:func:`capmerge.io.names.tied_embedding`: its
        config read once), or None."""
        if i not in self.ties:
            ck = self.inputs[i].ck
            self.ties[i] = tied_embedding(ck, model_side.read_config(Path(ck.root) if ck.root else None))
        return self.ties[i]

    def close(self) -> None:
        for m in self.inputs:
            m.close()

    def aligned(self, entries: list[Entry]) -> bool:
        """Whether some entry's tensor is read with its rows aligned to the chosen tokenizer (``vocab``)."""
        return self.vocab is not None and any(self.vocab.aligned(e.input, e.name) for e in entries)

    def info(self, e: Entry) -> TensorInfo:
        info = self.inputs[e.input].ck.tensors[e.name]
        if self.vocab is not None and self.vocab.aligned(e.input, e.name):
            from capmerge.merge import vocabulary

            return vocabulary.shape_of(self.vocab, info)
        return info


def _where(src: SourceSpec) -> str:
    return f"{src.model}; {src.where}" if src.where else src.model


def _open_inputs(spec: MergeSpec, opts: Mapping[str, Any]) -> tuple[list[ModelInput], dict[str, int]]:
    refs: list[tuple[str, str | None]] = []
    if spec.base is not None:
        refs.append((spec.base, spec.where.get("base_model")))
    for s in spec.models or [src for sl in spec.slices for src in sl.sources]:
        refs.append((s.model, s.where))
    inputs: list[ModelInput] = []
    index: dict[str, int] = {}
    try:
        for ref, where in refs:
            if ref in index:
                continue
            try:
                inputs.append(ModelInput(ref, opts))
            except CapmergeError as e:
                if where:
                    e.where = f"{e.where}; {where}" if e.where else where
                raise
            index[ref] = len(inputs) - 1
    except BaseException:
        for m in inputs:
            m.close()
        raise
    return inputs, index


def _slices(spec: MergeSpec, method: ModelMethod, warnings: list[str]) -> list[SliceSpec]:
    """The slices form of any spec: the models form is one slice of whole models, with the base added."""
    if spec.models and spec.slices:
        raise UsageError("give either models or slices, not both")
    if not spec.models and not spec.slices:
        raise UsageError("no models to merge")
    if spec.slices:
        return spec.slices
    sources = list(spec.models)
    if spec.base is not None and all(s.model != spec.base for s in sources):
        # mergekit appends an unlisted base to the inputs; a method without a base then merges it as one more model
        # (karcher, linear with a global weight), or refuses it (no weight for it, too many inputs): capmerge leaves
        # it out with a warning in those cases instead
        hi = method.n_models[1]
        joins = method.base != "unused" or (
            (hi is None or len(sources) < hi)
            and all(k in spec.parameters for k, d in method.model_params.items() if d is None)
        )
        if joins:
            sources.append(SourceSpec(spec.base, where=spec.where.get("base_model")))
        else:
            warnings.append(f"{method.name} does not use a base model: {spec.base} is not merged")
    return [SliceSpec(sources)]


def _split_base(spec: MergeSpec, method: ModelMethod, items: Sequence[T], model: Callable[[T], str],
                ) -> tuple[list[T], T | None]:  # fmt: skip
    """The models and the base among ``items`` (sources or entries; ``model``: an item's model reference): the first
    that is the spec's base, unless the method leaves the base unused."""
    if method.base == "unused" or spec.base is None:
        return list(items), None
    base = next((x for x in items if model(x) == spec.base), None)
    return [x for x in items if x is not base], base


def plan(spec: MergeSpec, *, open_opts: Mapping[str, Any] | None = None) -> Planned:
    """Open the inputs and plan every output tensor (names, entries, parameters); reads headers only."""
    from capmerge.merge.methods.registry import get_model_method

    method = get_model_method(spec.method)
    warnings: list[str] = []
    slices = _slices(spec, method, warnings)
    if method.base == "required" and spec.base is None:
        raise UsageError(f"{method.name} needs a base model, the one the others are merged relative to (base_model "
                         "in a configuration, --base MODEL for capmerge merge)")  # fmt: skip
    for i, sl in enumerate(slices):  # the number of models, before anything is opened
        n = len(_split_base(spec, method, sl.sources, lambda s: s.model)[0])
        where = spec.where.get("slices" if spec.slices else "models")
        method.check_count(n, where, f"slices[{i}]: " if spec.slices else "")
    inputs, index = _open_inputs(spec, open_opts or {})
    p = Planned(spec, method, inputs, [], 0, index, warnings)
    try:
        model_side.fit_vocabulary(p)  # before the shapes are compared: the models' padded rows may differ
        ref = inputs[index[spec.base]] if spec.base is not None and not spec.slices else inputs[
            index[slices[0].sources[0].model]]  # fmt: skip
        glob = spec.parameters

        def entries(sl: SliceSpec, name_of: Callable[[SourceSpec], str]) -> list[Entry]:
            return [Entry(index[s.model], name_of(s), (s.parameters, sl.parameters, glob), s) for s in sl.sources]

        def add(out: str, sl: SliceSpec, es: list[Entry], t: float) -> None:
            models, base = _split_base(spec, method, es, lambda e: e.source.model)
            p.tensors.append(TensorPlan(out, models, base, t, (sl.parameters, glob)))

        if not spec.slices:
            p.n_layers = count_layers(ref.ck.tensors)
            for name in ref.ck.tensors:
                add(name, slices[0], entries(slices[0], lambda s, n=name: n), layer_t(layer_index(name), p.n_layers))
        else:
            _plan_slices(p, slices, ref, entries, add)
        _tie_heads(p, ref, slices[-1], entries, add)
        if not spec.slices:
            _report_extra(p, ref)
        _check(p)
        _resolve_params(p)
    except BaseException:
        p.close()
        raise
    return p


def _plan_slices(p: Planned, slices: list[SliceSpec], ref: ModelInput, entries: Any, add: Any) -> None:
    """Layer stacking: pre-layer tensors from the first slice, each slice's layers renamed to their output index,
    post-layer tensors from the last slice (as mergekit plans them)."""
    outside = [n for n in ref.ck.tensors if layer_index(n) is None]
    for n in (n for n in outside if is_pre_layer(n)):
        add(n, slices[0], entries(slices[0], lambda s, n=n: n), 0.0)
    out_layer = 0
    for si, sl in enumerate(slices):
        lengths = set()
        for s in sl.sources:
            if s.layer_range is None or len(s.layer_range) != 2 or s.layer_range[1] <= s.layer_range[0]:
                raise UsageError(f"slices[{si}]: each source needs a layer_range [start, end) with end > start",
                                 s.where or s.model)  # fmt: skip
            lengths.add(s.layer_range[1] - s.layer_range[0])
        if len(lengths) != 1:
            raise UsageError(f"slices[{si}]: every source of a slice must span the same number of layers")
        n = lengths.pop()
        first = p.inputs[p.index[sl.sources[0].model]]
        for off in range(n):
            src = sl.sources[0].layer_range[0] + off  # type: ignore[index]
            names = [x for x in first.ck.tensors if layer_index(x) == src]
            if not names:
                raise MismatchError(f"slices[{si}]: the model has no layer {src}", _where(sl.sources[0]))
            t = off / (n - 1) if n > 1 else 1.0
            for x in names:
                es = entries(sl, lambda s, x=x, off=off: rename_layer(x, s.layer_range[0] + off))
                add(rename_layer(x, out_layer), sl, es, t)
            out_layer += 1
    for n in (n for n in outside if not is_pre_layer(n)):
        add(n, slices[-1], entries(slices[-1], lambda s, n=n: n), 0.0)
    p.n_layers = out_layer


def _tie_heads(p: Planned, ref: ModelInput, last: SliceSpec, entries: Any, add: Any) -> None:
    """Heads of models with tied embeddings, as transformers and mergekit read them: a model without its head
    (``lm_head.weight``) gives its input embedding in its place; a head that the reference model (the base, else
    the first) ties but another model has on its own is merged and written, with ``tie_word_embeddings`` set false
    in the output's config (:func:`model_side.write`)."""
    planned = {tp.name for tp in p.tensors}
    heads = dict.fromkeys(n for s in last.sources for n in p.inputs[p.index[s.model]].ck.tensors
                          if ends_with(n, OUTPUT_EMBEDDINGS) and layer_index(n) is None)  # fmt: skip
    for name in heads:
        if name not in planned and p.tied_embedding(p.inputs.index(ref)) is not None:
            add(name, last, entries(last, lambda s, n=name: n), 0.0)
            p.untied = True
            p.warnings.append(f"{name}: the reference model ties it to its embeddings, another model has its own: "
                              "merged and written, tie_word_embeddings set false (as mergekit writes it)")  # fmt: skip
    for tp in p.tensors:
        if not ends_with(tp.name, OUTPUT_EMBEDDINGS):
            continue
        for e in tp.entries + ([tp.base] if tp.base else []):
            alias = p.tied_embedding(e.input) if e.name not in p.inputs[e.input].ck.tensors else None
            if alias is not None:
                p.warnings.append(f"{e.source.model} ties {e.name} to its embeddings: {alias} is read in its place")
                e.match, e.name = e.name, alias


def _report_extra(p: Planned, ref: ModelInput) -> None:
    """A warning for each model holding tensors that the output, made of the reference model's tensors, leaves out (a
    classification head one finetune added, say): mergekit leaves them out too, silently."""
    used = {(e.input, e.name) for tp in p.tensors for e in tp.entries + ([tp.base] if tp.base else [])}
    for i, m in enumerate(p.inputs):
        extra = [n for n in m.ck.tensors if (i, n) not in used and n not in ref.ck.tensors] if m is not ref else []
        if extra:
            shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
            p.warnings.append(f"{len(extra)} tensor(s) of {m.ref} that {ref.ref} lacks are not merged ({shown}): the "
                              f"output has the tensors of {ref.ref}")  # fmt: skip


def _check(p: Planned) -> None:
    """Every entry's tensor exists, and the shapes of each output tensor's entries agree. A tensor that is not
    floating (an integer buffer such as ``position_ids``, which older transformers save and newer ones do not) is
    copied from the reference entry (the base, else the first): models lacking it are left out of it, with a warning.
    """
    for tp in p.tensors:
        if not tp.entries and tp.base is None:
            raise UsageError("no models to merge", tp.name)
        ref = tp.base or tp.entries[0]
        if ref.name in p.inputs[ref.input].ck.tensors and not p.info(ref).is_float:
            lacking = [e for e in tp.entries if e.name not in p.inputs[e.input].ck.tensors]
            if lacking:
                tp.entries = [e for e in tp.entries if e.name in p.inputs[e.input].ck.tensors]  # ref's copied
                p.warnings.append(f"{tp.name} (not floating) is copied from {ref.source.model}: "
                                  f"{', '.join(e.source.model for e in lacking)} do(es) not have it")  # fmt: skip
        es = tp.entries + ([tp.base] if tp.base else [])
        shapes = {}
        for e in es:
            ck = p.inputs[e.input].ck
            if e.name not in ck.tensors:
                raise MismatchError(f"tensor {e.name} is missing in model {e.source.model}", _where(e.source))
            shapes[e.source.model] = p.info(e).shape
        if len(set(shapes.values())) > 1:
            shown = ", ".join(f"{list(s)} in {m}" for m, s in shapes.items())
            raise MismatchError(f"shape mismatch: {shown}", tp.name)
        if p.method.base == "required" and tp.base is None:
            raise UsageError(f"{p.method.name} needs the base model among the sources of every slice", tp.name)


def _resolve_params(p: Planned) -> None:
    """Each tensor's per-model and global parameters (filters, gradients, defaults; required ones checked)."""
    m = p.method
    known = set(m.model_params) | set(m.params)
    scopes = [p.spec.parameters] + [s.parameters for sl in p.spec.slices for s in sl.sources]
    scopes += [sl.parameters for sl in p.spec.slices] + [s.parameters for s in p.spec.models]
    for sc in scopes:
        for k in sc or {}:
            if k not in known:
                raise UsageError(f"{m.name} has no parameter {k!r} (it takes: {', '.join(sorted(known)) or 'none'})")
    # the check's refusals: input (-1: the models as a set) -> (first tensor, why, how many, the input's source)
    bad: dict[int, tuple[str, str, int, SourceSpec | None]] = {}
    for tp in p.tensors:
        tp.params = {k: resolve(k, tp.shared, tp.name, tp.t, d, kind_of(d)) for k, d in m.params.items()}
        for k, v in tp.params.items():
            if v is None:
                raise UsageError(f"missing parameter {k} of {m.name} (required)", tp.name)
        tp.model_params = []
        for e in tp.entries:
            mp = {k: resolve(k, e.scopes, e.match or e.name, tp.t, d, kind_of(d)) for k, d in m.model_params.items()}
            for k, v in mp.items():
                if v is None:
                    raise UsageError(f"missing parameter {k} of {m.name} for model {e.source.model}", tp.name)
            tp.model_params.append(mp)
        found = m.check(tp.params, tp.model_params) if m.check is not None and tp.entries else None
        if found is not None:
            e = None if found[0] is None else tp.entries[found[0]]
            key = -1 if e is None else e.input
            name, why, count, source = bad.get(key, (tp.name, found[1], 0, None if e is None else e.source))
            bad[key] = (name, why, count + 1, source)
    if bad:  # the first refusal ("every tensor" where a setting of the whole merge is the cause)
        name, why, count, source = bad[min(bad)]
        more = f" and {count - 1} more" if count > 1 else ""
        at = "every tensor" if count == len(p.tensors) else f"tensor {name}{more}"
        if source is None:
            raise UsageError(f"{m.name}: {why}, at {at}", p.spec.where.get("slices" if p.spec.slices else "models"))
        raise UsageError(f"{m.name}: {why} for model {source.model}, at {at}", _where(source))


# -------------------------------------------------------------------------------------------------------- running


def out_code(p: Planned, tp: TensorPlan, code: str | None) -> str:
    """The output dtype of a floating tensor: ``code`` (``out_dtype``, else ``dtype``), else the dtype its inputs
    promote to, as mergekit aligns a tensor's inputs before merging them (torch's promotion: float32 over the 16-bit
    types, and bfloat16 with float16 gives float32)."""
    first = p.info(tp.base or tp.entries[0])
    if code and first.is_float:
        return code
    return promote([p.info(e).dtype for e in ([tp.base] if tp.base else []) + tp.entries])


def promote(codes: Sequence[str]) -> str:
    """torch.promote_types over floating safetensors dtypes: the one dtype where they agree, else the widest (F64,
    else F32; two 16-bit types of different kinds: F32)."""
    kinds = set(codes)
    if len(kinds) == 1:
        return codes[0]
    return "F64" if "F64" in kinds else "F32"


def _merge_loader(p: Planned, tp: TensorPlan, code: str, allow_nonfinite: bool) -> Callable[[], Any]:
    def load() -> Any:
        import torch

        from capmerge._torch import torch_dtype
        from capmerge.merge.methods.models import TensorInputs

        es = ([tp.base] if tp.base else []) + tp.entries
        if p.aligned(es):
            from capmerge.merge import vocabulary

            rows = vocabulary.read(p, es)  # one row per output token, each model's
            models = [rows[e.input] for e in tp.entries]
            base = rows[tp.base.input] if tp.base else None
        else:
            models = [p.inputs[e.input].read(e.name) for e in tp.entries]
            base = p.inputs[tp.base.input].read(tp.base.name) if tp.base else None
        x = TensorInputs(tp.name, models, tp.model_params, tp.params, base, p.spec.seed)
        try:
            out = p.method.fn(x)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"{p.method.name}: {e}", tp.name) from None
        shape = tuple((base if base is not None else models[0]).shape)
        if tuple(out.shape) != shape:
            raise CapmergeError(f"{p.method.name} returned shape {list(out.shape)}, expected {list(shape)}", tp.name)
        out = out.to(torch_dtype(code)).contiguous()
        if not allow_nonfinite and not bool(torch.isfinite(out).all()):
            ins = [*models, *([base] if base is not None else [])]
            if all(bool(torch.isfinite(t).all()) for t in ins):
                raise NonFiniteError("result has NaN/Inf where the inputs were finite (overflow in the output "
                                     "dtype?); use --allow-nonfinite to keep it", tp.name)  # fmt: skip
        return out

    return load


def _block_job(p: Planned, tp: TensorPlan, c: str) -> Job | None:
    """The tensor as a block-kernel job (the method's form, :mod:`capmerge.merge.methods.blockform`): its statistics
    pass as the job's prepare, then the engine's blocks. None where the form does not apply (no form, parameters it
    does not take, LoRA inputs or dtypes other than float32/float16/bfloat16): then the method's ``fn`` runs."""
    from capmerge.merge.methods import blockform as B

    m = p.method
    es = ([tp.base] if tp.base else []) + tp.entries
    if m.form is None or any(p.inputs[e.input].lora is not None for e in es):
        return None
    ins = [(p.inputs[e.input].ck, p.info(e)) for e in es]
    if p.aligned(es):
        from capmerge.merge import vocabulary

        aligned = vocabulary.streams(p, es)  # each model's rows of the output tokens, a block at a time
        if aligned is None:
            return None  # padding rows, a LoRA token source: the fn path (vocabulary.read)
        ins = [aligned.get(e.input, x) for e, x in zip(es, ins, strict=True)]
    infos = [i for _, i in ins]
    if any(i.dtype not in B.compute.NATIVE_CODES for i in infos) or c not in B.compute.NATIVE_CODES:
        return None
    info = infos[0]
    finish = m.form(B.Spec(tp.name, info.shape, tp.params, tp.model_params, tp.base is not None, p.spec.seed))
    if finish is None:
        return None
    if isinstance(finish, B.Copy):
        src = ins[(1 if tp.base else 0) + finish.model]
        if src[1].dtype == c:
            return Job(tp.name, "copy", c, info.shape, [src])
        finish = finish.as_finish()

    def checked(st: B.Stats) -> B.Combo:
        try:
            return finish(st)
        except ValueError as e:
            raise UsageError(f"{m.name}: {e}", tp.name) from None

    kernel = B.ModelKernel(tp.name, checked, [i.dtype for i in infos], tp.base is not None, info.numel, c)
    return Job(tp.name, "compute", c, info.shape, ins, kernel=kernel, prepare=kernel.prepare)


def _jobs(p: Planned, code: str | None, allow_nonfinite: bool) -> tuple[list[Job], Checkpoint]:
    """One job per output tensor: a copy (non-floating tensors), a block-kernel job (methods with a form), or the
    merged tensor from the method's ``fn``, built when written."""
    from capmerge.io.lazy import LazyCheckpoint

    merged = LazyCheckpoint("merge", [], {}, {})
    jobs: list[Job] = []
    for tp in p.tensors:
        first = tp.base or tp.entries[0]
        info = p.info(first)
        if not info.is_float or any(not p.info(e).is_float for e in tp.entries):
            jobs.append(Job(tp.name, "copy", info.dtype, info.shape, [(p.inputs[first.input].ck, info)]))
            continue
        c = out_code(p, tp, code)
        job = _block_job(p, tp, c)
        if job is not None:
            jobs.append(job)
            continue
        nbytes = DTYPES[c][0] * info.numel
        merged.tensors[tp.name] = TensorInfo(tp.name, c, info.shape, "", 0, nbytes)
        merged.loaders[tp.name] = _merge_loader(p, tp, c, allow_nonfinite)
        es = tp.entries + ([tp.base] if tp.base else [])
        merged.storages[tp.name] = {"storage": "dense", "dtype": c, "nbytes": sum(p.info(e).nbytes for e in es)}
        jobs.append(Job(tp.name, "copy", c, info.shape, [(merged, merged.tensors[tp.name])]))
    return jobs, merged


def _shard(jobs: list[Job], max_bytes: int) -> int:
    """Assign jobs to shards of at most ``max_bytes`` (a tensor larger than that gets its own); returns the count."""
    shard, size = 0, 0
    for j in jobs:
        if size and size + j.out_nbytes > max_bytes:
            shard, size = shard + 1, 0
        j.sink = shard
        size += j.out_nbytes
    return shard + 1


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def run_merge(
    spec: MergeSpec,
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    allow_nonfinite: bool = False,
    shard_size: int | str = "5GB",
    open_opts: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Merge the models of ``spec`` into ``output``: a ``.safetensors`` file, or a directory holding the weights
    (sharded above ``shard_size``) and the side files of :mod:`capmerge.merge.model_side` (the base's config, the
    tokenizer, a model card). Atomic: on any error nothing is written.

    Raises:
        UsageError, MismatchError, CheckpointError...: before anything is written (the plan is made first).
    """
    t0 = time.perf_counter()
    code = parse_dtype(spec.out_dtype, allow_auto=False) if spec.out_dtype else None
    max_bytes = parse_size(shard_size)
    out_s = os.fspath(output)
    p = plan(spec, open_opts=open_opts)
    try:
        model_side.check(p)
        summary = Summary("merge", out_s, warnings=list(p.warnings))
        jobs, _ = _jobs(p, code, allow_nonfinite)
        out = Output(out_s, [ck for m in p.inputs for ck in m.checkpoints], force=force)
        try:
            n = 1 if out.single_file else _shard(jobs, max_bytes)
            names = [os.path.basename(out.out)] if out.single_file else shard_names(n)
            files = [
                out.open_file(
                    "" if out.single_file else nm, [(j.name, j.out_dtype, j.shape) for j in jobs if j.sink == i]
                )
                for i, nm in enumerate(names)
            ]
            start_progress(progress, jobs)
            stats = run(jobs, Sink(files), allow_nonfinite=allow_nonfinite, progress=progress)
            meta = {"format": "pt", "capmerge.kind": "merged", "capmerge.method": p.method.name}
            index = "model.safetensors.index.json" if n > 1 else None
            summary.files, summary.bytes_written = finish_files(out, list(zip(names, files, strict=True)), meta, index)
            if not out.single_file:
                summary.files += model_side.write(p, out, summary.files_skipped)
            out.commit()
        except BaseException:
            out.abort()
            raise
    finally:
        p.close()
    summary.outputs = [out_s]
    summary.tensors_written = stats.tensors_written
    summary.tensors_changed = sum(1 for j in jobs if j.op == "compute" or j.inputs[0][0].ref == "merge")
    summary.tensors_unchanged = stats.tensors_written - summary.tensors_changed
    summary.bytes_read = stats.bytes_read
    summary.seconds = time.perf_counter() - t0
    return summary
