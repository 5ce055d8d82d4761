"""Property-based fuzzing of every input format through the CLI (hypothesis, derandomized: the same cases every run).

Five families of generated inputs — safetensors headers, sharded indexes, compressed vectors (sparse and low-rank
``capmerge.tensors`` tables), LoRA ``adapter_config.json`` and recipes — plus a corpus of byte-level corruptions of a
valid file. Each case must end in one of two ways (:func:`outcome`):

- exit 0 and a valid output: it loads with the reference ``safetensors`` loader, and where the case allows an
  independent expectation (base + dense τ from numpy, s·B·A for LoRA) the values are that;
- exit 2 and exactly one ``error:`` line that is not an exception class name, no traceback, no stdout, nothing
  written (no output, no temporary file, no directory).

Either way the input files keep their bytes and mtimes. Where the generated input breaks a rule the docs state
(docs/reliability.md), the case must be exit 2: the oracle knows those rules independently of capmerge's code
(a header the reference loader refuses, a sparse index out of order, a non-finite ``lora_alpha``…).

The CLI runs in-process (typer's CliRunner) to stay well under a minute on 2 cores. ``COUNTS`` collects how many
cases each family ran and how each ended; ``tests/test_fuzz.py::test_report`` prints them (``-s``).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import load_any, save_single, tree_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from capmerge.cli import app

runner = CliRunner()
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
COUNTS: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
BARE = re.compile(r"^error: (error:|[A-Z][A-Za-z]*(Error|Exception)\b)")


@contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="capmerge-fuzz-") as d:
        yield Path(d)


def outcome(
    family: str, root: Path, args: list[Any], out: Path | None, *, must_refuse: bool = False, recipe: Path | None = None
) -> int:
    """Run ``capmerge ARGS`` and check the contract; returns the exit code (0 or 2). A recipe's check reports every
    problem it finds (docs/recipes.md), one ``error:`` line each, all at ``RECIPE:LINE``."""
    inputs = tree_digest(root)
    out_parent = out.parent if out is not None else None
    before = set(os.listdir(out_parent)) if out_parent is not None and out_parent.exists() else set()
    r = runner.invoke(app, [str(a) for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]  # progress lines may come before
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.exit_code in (0, 2), (r.exit_code, r.stderr)
    if r.exit_code == 0:
        assert not must_refuse, f"accepted an input the rules refuse: {args}\n{r.stderr}"
        assert out is None or out.exists()
        if out is not None:
            load_any(out)  # the reference loader reads every file of it
            assert not [n for n in os.listdir(out_parent) if ".capmerge-tmp-" in n]
        assert tree_digest(root) == inputs, "an input changed or a file appeared next to the inputs"
    else:
        if recipe is not None:
            assert all(ln.startswith("error: ") and f"({recipe}:" in ln for ln in lines), r.stderr
        assert lines and (len(lines) == 1 or recipe is not None) and lines[0].startswith("error: "), r.stderr
        assert not any(BARE.match(ln) for ln in lines), r.stderr
        assert r.stdout == ""
        if out_parent is not None:
            after = set(os.listdir(out_parent)) if out_parent.exists() else set()
            assert after == before, f"left behind: {after - before}"
        assert tree_digest(root) == inputs, "a file changed or appeared"
    COUNTS[family][f"exit {r.exit_code}"] += 1
    return r.exit_code


def reference_refuses(path: Path) -> bool:
    try:
        load_file(str(path))
    except (SafetensorError, Exception):  # noqa: BLE001 - any refusal of the reference loader counts
        return True
    return False


# -- 1. safetensors headers --------------------------------------------------------------------------------------
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
dims = st.one_of(st.integers(0, 5), st.sampled_from([-1, 2**64, 2**63, True, 1.0, "2"]))
tensor_spec = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(list(DTYPE_SIZES)), st.sampled_from(["F33", "f32", "", 1, None])),
        "shape": st.one_of(st.lists(dims, max_size=3), st.sampled_from([4, "4", None])),
        "shift": st.sampled_from([0, 0, 0, 0, -1, 1, 4]),  # data_offsets moved (0: consistent)
        "drop": st.sampled_from([None, None, None, None, "dtype", "shape", "data_offsets"]),
    }
)
metadata = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    st.sampled_from([{"k": 1}, [], "x", {"k": {"a": "b"}}, {"k": None}]),
)


@st.composite
def header_files(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    names = draw(st.lists(st.sampled_from(["a", "b", "c.weight", "d", "é", ""]), max_size=4, unique=True))
    header: dict[str, Any] = {}
    meta = draw(metadata)
    if meta is not None or draw(st.booleans()):
        header["__metadata__"] = meta
    pos = 0
    for name in names:
        spec = draw(tensor_spec)
        n, ok = 1, isinstance(spec["shape"], list)
        for d in spec["shape"] if ok else []:
            ok = ok and type(d) is int and 0 <= d < 2**32
            n = n * d if ok else n
        size = n * DTYPE_SIZES.get(spec["dtype"], 4) if ok else 4
        begin, end = pos + spec["shift"], pos + size + spec["shift"]
        entry = {"dtype": spec["dtype"], "shape": spec["shape"], "data_offsets": [begin, end]}
        if spec["drop"]:
            del entry[spec["drop"]]
        header[name] = entry
        pos += size
    raw = json.dumps(header).encode()
    raw = draw(st.sampled_from([raw, raw, raw, raw, raw + b"   ", raw.replace(b"{", b" {", 1), raw[:-1], b"[]"]))
    data_len = pos + draw(st.sampled_from([0, 0, 0, -1, 1, 8]))
    length = len(raw) + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 2**40]))
    return struct.pack("<Q", max(length, 0)) + raw + bytes(max(data_len, 0)), header


@FUZZ
@given(case=header_files())
def test_fuzz_headers(case: tuple[bytes, dict[str, Any]]) -> None:
    """A generated header with zero data: ``inspect`` reads it, ``diff`` uses it as BASE against a valid AUX built
    by the reference library from what the reference loader read (+1 on float tensors). A file the reference loader
    refuses must be refused; a file capmerge accepts must be one the reference loads."""
    blob, _ = case
    with workdir() as root:
        src = root / "in"
        src.mkdir()
        f = src / "fuzz.safetensors"
        f.write_bytes(blob)
        refused_by_reference = reference_refuses(f)
        if refused_by_reference:
            aux_t = {"a": torch.ones(1)}
        else:
            got = load_file(str(f))
            aux_t = {k: (v + 1 if v.is_floating_point() else v) for k, v in got.items()} or {"a": torch.ones(1)}
        aux = save_single(src / "aux.safetensors", aux_t)
        code = outcome("headers", src, ["inspect", "--headers-only", f], None, must_refuse=refused_by_reference)
        out = root / "out" / "v.safetensors"
        code2 = outcome("headers", src, ["diff", f, aux, "-o", out], out, must_refuse=refused_by_reference)
        if code == 0 and code2 == 0:
            got = load_file(str(out))
            for k, v in got.items():  # τ = AUX − BASE = 1 on every float tensor kept
                assert torch.all(v.float() == 1), k


# -- 2. sharded indexes --------------------------------------------------------------------------------------------
SHARD_NAMES = ["s-1.safetensors", "s-2.safetensors"]
BAD_SHARDS = ["../outside.safetensors", "", ".", "..", "sub/s-1.safetensors", "nope.safetensors", "s-1.safetensors\\x",
              "/abs.safetensors", "s-1.safetensors ", 3, None, ["s-1.safetensors"]]  # fmt: skip


@st.composite
def indexes(draw: st.DrawFn) -> tuple[Any, bool]:
    """(the index JSON value, whether it is valid). Valid: a dict with a ``weight_map`` mapping exactly x and y to
    the shard holding each."""
    wmap: dict[str, Any] = {"x": SHARD_NAMES[0], "y": SHARD_NAMES[1]}
    valid = True
    if draw(st.booleans()):
        key = draw(st.sampled_from(["x", "y", "z"]))
        wmap[key] = draw(st.sampled_from(BAD_SHARDS + SHARD_NAMES))
        valid = (key, wmap[key]) in (("x", SHARD_NAMES[0]), ("y", SHARD_NAMES[1]))
    if draw(st.integers(0, 4)) == 0:
        del wmap[draw(st.sampled_from(["x", "y"]))]
        valid = False
    index: Any = {"metadata": draw(st.sampled_from([{"total_size": 24}, {}, None, {"total_size": "x"}, 5])),
                  "weight_map": wmap}  # fmt: skip
    form = draw(st.integers(0, 6))
    if form == 0:
        index = draw(st.sampled_from([[], "x", None, {"weight_map": []}, {"weight_map": None}, {}]))
        valid = False
    return index, valid


@FUZZ
@given(case=indexes())
def test_fuzz_sharded_index(case: tuple[Any, bool]) -> None:
    """``apply DIR VEC``: DIR holds two valid shards and a generated index; a valid safetensors file lies next to DIR
    (``../outside.safetensors``) with values far from the model's, so reading it would show in the output. An index
    that is not the valid one (a shard name with a path, a missing tensor, a wrong type) must be refused; a valid one
    gives base + τ."""
    index, valid = case
    with workdir() as root:
        src = root / "in"
        d = src / "P"
        d.mkdir(parents=True)
        save_file({"x": torch.full((4,), 1.0)}, str(d / SHARD_NAMES[0]))
        save_file({"y": torch.full((2,), 2.0)}, str(d / SHARD_NAMES[1]))
        save_file({"x": torch.full((4,), 1000.0), "z": torch.full((4,), 1000.0)}, str(src / "outside.safetensors"))
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        vec = save_single(src / "v.safetensors", {"x": torch.full((4,), 0.5), "y": torch.full((2,), -0.5)})
        out = root / "out" / "m"
        code = outcome("index", src, ["apply", d, vec, "-o", out], out, must_refuse=not valid)
        if code == 0:
            got = load_any(out)
            assert torch.equal(got["x"], torch.full((4,), 1.5)) and torch.equal(got["y"], torch.full((2,), 1.5))
            assert set(got) == {"x", "y"}


# -- 3. compressed vectors -----------------------------------------------------------------------------------------
TABLE = "capmerge.tensors"


@st.composite
def sparse_vectors(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, str], np.ndarray | None]:
    """(parts, metadata, the dense τ of w [3, 4] that numpy builds — None where the rules refuse the file)."""
    idx = draw(st.lists(st.integers(-3, 14), max_size=6))
    idx_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int32, torch.float32, torch.int16]))
    n_values = len(idx) + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    values = [
        float(v) for v in draw(st.lists(st.integers(-8, 8), min_size=max(n_values, 0), max_size=max(n_values, 0)))
    ]
    shape = draw(st.sampled_from([[3, 4], [3, 4], [3, 4], [12], [4, 3], [3, -4], [True, 4], "34", [2**40, 2**40]]))
    dtype = draw(st.sampled_from(["F32", "F32", "F32", "I32", "F16", 7]))
    parts = {"w.indices": torch.tensor(idx, dtype=idx_dtype), "w.values": torch.tensor(values, dtype=torch.float32)}
    meta = {"capmerge.vector_format": "sparse", TABLE: json.dumps({"w": {"dtype": dtype, "shape": shape,
                                                                          "storage": "sparse"}})}  # fmt: skip
    ok = (
        idx_dtype in (torch.int64, torch.int32)
        and n_values == len(idx)
        and shape == [3, 4]
        and dtype == "F32"
        and all(0 <= i < 12 for i in idx)
        and all(a < b for a, b in zip(idx, idx[1:], strict=False))
    )
    dense = None
    if ok:
        dense = np.zeros(12, np.float32)
        dense[idx] = values
    return parts, meta, dense


@st.composite
def lowrank_vectors(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, str], np.ndarray | None]:
    r = draw(st.integers(0, 3))
    m = draw(st.sampled_from([3, 3, 3, 4]))
    n = draw(st.sampled_from([4, 4, 4, 3, 5]))
    ra = draw(st.sampled_from([r, r, r, r + 1]))
    b_np = np.array(draw(st.lists(st.integers(-3, 3), min_size=m * r, max_size=m * r)), np.float32).reshape(m, r)
    a_np = np.array(draw(st.lists(st.integers(-3, 3), min_size=ra * n, max_size=ra * n)), np.float32).reshape(ra, n)
    fdtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.int8]))
    shape = draw(st.sampled_from([[3, 4], [3, 4], [3, 4], [12], [65536, 65536], [4, 3]]))
    parts = {"w.lora_B": torch.from_numpy(b_np).to(fdtype), "w.lora_A": torch.from_numpy(a_np).to(fdtype)}
    meta = {"capmerge.vector_format": "lowrank",
            TABLE: json.dumps({"w": {"dtype": "F32", "shape": shape, "storage": "lowrank"}})}  # fmt: skip
    ok = r == ra and (m, n) == (3, 4) and shape == [3, 4] and fdtype == torch.float32 and r > 0
    return parts, meta, (b_np @ a_np).reshape(-1) if ok else None


@FUZZ
@given(case=st.one_of(sparse_vectors(), lowrank_vectors()))
def test_fuzz_compressed_vectors(case: tuple[dict[str, torch.Tensor], dict[str, str], np.ndarray | None]) -> None:
    """``apply BASE VEC`` and ``inspect VEC`` on a generated sparse or low-rank vector for w [3, 4]: indices that are
    negative, out of range, unsorted or repeated, mismatched counts, wrong dtypes or shapes must be refused; a valid
    one gives base + dense(τ), dense(τ) built by numpy (indices scattered, B @ A)."""
    parts, meta, dense = case
    with workdir() as root:
        src = root / "in"
        vec = save_single(src / "v.safetensors", parts, meta)
        base_w = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 100
        base = save_single(src / "base.safetensors", {"w": base_w})
        rank0 = "w.lora_A" in parts and parts["w.lora_A"].shape[0] == 0 and parts["w.lora_B"].shape[1] == 0
        must = dense is None and not rank0  # rank 0 factors: docs refuse them for LoRA; for a vector a zero τ is ok
        code = outcome("compressed", src, ["inspect", vec], None, must_refuse=must)
        out = root / "out" / "m.safetensors"
        code2 = outcome("compressed", src, ["apply", base, vec, "-o", out], out, must_refuse=must)
        if code2 == 0 and dense is not None:
            got = load_file(str(out))["w"].numpy().reshape(-1)
            want = base_w.numpy().reshape(-1) + dense
            assert np.array_equal(got, want), (got.tolist(), want.tolist())
        del code


# -- 4. LoRA adapter_config.json -----------------------------------------------------------------------------------
ALPHAS = st.one_of(
    st.integers(-4, 64),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from(["8", "nan", [8], True, None, 1e39, 3.4e38, {"a": 1}]),
)
RANKS = st.one_of(st.integers(-1, 4), st.sampled_from([2.0, "2", True, None, 2.5]))
FLAGS = st.sampled_from([True, False, False, "false", 0, None])
PATTERNS = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["q", "(", "q|", "[", "(.*)", "k"]),
        st.one_of(st.integers(0, 4), st.sampled_from(["x", 2.5, None])),
        max_size=2,
    ),
    st.sampled_from([["q"], "q", 3]),
)


def _finite_number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x) and abs(x) <= 3.4e38


@st.composite
def lora_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config (α, r, rsLoRA drawn) with at most one or two fields replaced by a hostile value."""
    stored_r = draw(st.integers(1, 3))
    case: dict[str, Any] = {"alpha": draw(st.integers(1, 64)), "r": stored_r, "stored_r": stored_r,
                            "rslora": draw(st.sampled_from([None, True, False])), "alpha_pattern": None,
                            "rank_pattern": None, "peft_type": "LORA"}  # fmt: skip
    hostile = {"alpha": ALPHAS, "r": RANKS, "stored_r": st.integers(0, 3), "rslora": FLAGS, "alpha_pattern": PATTERNS,
               "rank_pattern": PATTERNS, "peft_type": st.sampled_from(["IA3", 5, "lora"])}  # fmt: skip
    for key in draw(st.lists(st.sampled_from([None, None, None, *hostile]), min_size=1, max_size=2)):
        if key is not None:
            case[key] = draw(hostile[key])
    return case


@FUZZ
@given(case=lora_cases())
def test_fuzz_lora_configs(case: dict[str, Any]) -> None:
    """``apply BASE ADAPTER`` with a hand-written adapter (factors of q: A [stored_r, 4], B [3, stored_r]) and a
    generated adapter_config.json. Invalid values (a lora_alpha that is not a finite number ≤ 3.4e38, an r that is
    not a positive integer equal to the stored rank, a flag that is not a boolean, rank 0, a peft_type other than
    LoRA) must be refused; a plain valid config gives base + (α/r)·B·A (α/√r with rsLoRA), numpy's product."""
    alpha, r, stored_r, rslora = case["alpha"], case["r"], case["stored_r"], case["rslora"]
    alpha_pattern, rank_pattern, peft_type = case["alpha_pattern"], case["rank_pattern"], case["peft_type"]
    cfg: dict[str, Any] = {"peft_type": peft_type, "lora_alpha": alpha, "r": r, "target_modules": ["q"]}
    if rslora is not None:
        cfg["use_rslora"] = rslora
    for key, val in (("alpha_pattern", alpha_pattern), ("rank_pattern", rank_pattern)):
        if val is not None:
            cfg[key] = val
    g = np.random.default_rng(stored_r)
    a_np = g.integers(-2, 3, (stored_r, 4)).astype(np.float32)
    b_np = g.integers(-2, 3, (3, stored_r)).astype(np.float32)
    with workdir() as root:
        src = root / "in"
        ad = src / "adapter"
        ad.mkdir(parents=True)
        factors = {"base_model.model.q.lora_A.weight": a_np, "base_model.model.q.lora_B.weight": b_np}
        save_file({k: torch.from_numpy(v) for k, v in factors.items()}, str(ad / "adapter_model.safetensors"))
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
        base_w = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 50
        base = save_single(src / "base.safetensors", {"q.weight": base_w, "q.bias": torch.zeros(3)})
        plain = alpha_pattern is None and rank_pattern is None
        valid_plain = (
            plain
            and peft_type == "LORA"
            and _finite_number(alpha)
            and type(alpha) is not bool
            and type(r) is int
            and r == stored_r > 0
            and rslora in (True, False, None)
        )
        must = (
            peft_type != "LORA"
            or not _finite_number(alpha)
            or type(alpha) is bool
            or stored_r == 0
            or rslora not in (True, False, None)
            or (type(r) is int and r != stored_r and rank_pattern is None)
            or type(r) is not int
        )
        out = root / "out" / "m.safetensors"
        code = outcome("lora", src, ["apply", base, ad, "-o", out], out, must_refuse=must)
        if code == 0 and valid_plain:
            scale = np.float32(alpha) / (np.float32(math.sqrt(r)) if rslora is True else np.float32(r))
            want = base_w.numpy() + scale * (b_np @ a_np)
            got = load_file(str(out))["q.weight"].numpy()
            assert np.allclose(got, want, rtol=1e-6, atol=1e-5) or not np.isfinite(want).all(), (got, want)


# -- 5. recipes ------------------------------------------------------------------------------------------------------
SCALARS = ["0.5", "1", "-2", "1e5000", ".nan", ".inf", "nan", "'0.5'", "[0.5, 1]", "{a: b}", "~", "true", "0x10",
           "9" * 90, "!!int abc", "2020-13-45", "&a 0.5", "*nope", "${alpha}", "${missing}", "${steps.nope}",
           "\"\\0\"", "'\x01'", "? [a, b]", "[", "}", "0.5 # c", "!!python/object:os.system x"]  # fmt: skip
RECIPE = """description: {desc}
vars:
  alpha: {alpha}
  density: {density}
workdir: {work}
steps:
  merged:
    op: {op}
    base: {base}
    vectors: [{vec}]
    method: {method}
    density: ${{density}}
    alpha: ${{alpha}}
    output: {out}
"""


@st.composite
def recipes(draw: st.DrawFn) -> dict[str, str]:
    return {
        "desc": draw(st.one_of(st.sampled_from(["x", '"a recipe"']), st.text(max_size=12))),
        "alpha": draw(st.sampled_from(SCALARS)),
        "density": draw(st.sampled_from(["1", "0.5", "0", "2", "-1", "x", "[0.5]"])),
        "op": draw(st.sampled_from(["apply", "apply", "apply", "diff", "nope", "[apply]"])),
        "method": draw(st.sampled_from(["linear", "ties", "dare", "magnitude", "nope", "1"])),
        "bomb": draw(st.sampled_from(["", "", "", "bomb"])),
    }


def _alias_bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1},"
              f" *a{i - 1}, *a{i - 1}]" for i in range(1, levels)]  # fmt: skip
    return "\n".join(lines) + "\n"


@FUZZ
@given(parts=recipes())
def test_fuzz_recipes(parts: dict[str, str]) -> None:
    """``capmerge run RECIPE`` on a generated one-step recipe: hostile scalars for α (YAML tags, aliases, huge
    integers, control characters, unknown variables, flow syntax), bad densities, ops and methods, random text in
    the description, alias bombs (10⁹ values from 9 levels). It ends in a valid output, or one error line — and no
    directory the run created is left."""
    with workdir() as root:
        src = root / "in"
        src.mkdir()
        base = save_single(src / "b.safetensors", {"w": torch.arange(8, dtype=torch.float32) + 10})
        vec = save_single(src / "v.safetensors", {"w": torch.full((8,), 0.25)})
        out = root / "out" / "m.safetensors"
        desc = parts["desc"] if parts["desc"] in ("x", '"a recipe"') else json.dumps(parts["desc"])
        fields = {k: v for k, v in parts.items() if k not in ("desc", "bomb")}
        text = RECIPE.format(work=root / "out" / "work", base=base, vec=vec, out=out, desc=desc, **fields)
        if parts["bomb"]:
            text = _alias_bomb(9) + text
        recipe = src / "r.yaml"
        recipe.write_bytes(text.encode("utf-8", "surrogatepass"))
        (root / "out").mkdir()
        code = outcome("recipes", src, ["run", recipe], out, recipe=recipe)
        if code == 0:
            got = load_file(str(out))["w"]
            assert got.shape == (8,) and torch.isfinite(got).all()


# -- 6. a corpus of byte-level corruptions of one valid file --------------------------------------------------------
def _corpus(valid: bytes) -> list[tuple[str, bytes]]:
    """Every truncation at a structural boundary and ±1 of it, the length field off by one and zero, and one byte of
    the header replaced by each of a few characters at every 7th position."""
    (hlen,) = struct.unpack("<Q", valid[:8])
    cases = [
        (f"cut-{n}", valid[:n]) for n in sorted({0, 1, 7, 8, 9, 8 + hlen - 1, 8 + hlen, 8 + hlen + 1, len(valid) - 1})
    ]
    for delta in (-1, 1, -hlen):
        cases.append((f"length{delta:+d}", struct.pack("<Q", hlen + delta) + valid[8:]))
    for pos in range(8, 8 + hlen, 7):
        for ch in b'"}:,0\xff':
            if valid[pos] != ch:
                cases.append((f"byte{pos}={ch:#x}", valid[:pos] + bytes([ch]) + valid[pos + 1 :]))
    return cases


def test_corpus_of_corrupted_files(tmp_path: Path) -> None:
    """``inspect`` on each corrupted copy (written into ``corpus/``, kept for a failing run): the reference loader's
    refusal implies capmerge's; an accepted file is one the reference loads."""
    g = torch.Generator().manual_seed(0)
    valid = tmp_path / "valid.safetensors"
    save_file({"a.weight": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16)},
              str(valid), metadata={"format": "pt"})  # fmt: skip
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, blob in _corpus(valid.read_bytes()):
        f = corpus / f"{name}.safetensors"
        f.write_bytes(blob)
        outcome("corpus", corpus, ["inspect", f], None, must_refuse=reference_refuses(f))


def test_report() -> None:
    """The counts of the runs above (in this process): printed with ``pytest -s``; every case held or the test
    that generated it failed."""
    for family, c in sorted(COUNTS.items()):
        print(f"fuzz {family}: {sum(c.values())} CLI runs, {dict(c)}")
