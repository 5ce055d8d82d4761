"""Compressed vectors read block by block: bad sparse indices and tables refused, block reads equal to numpy's dense
tensor, ``inspect`` of a huge declared shape in bounded memory, ``apply`` equal to base + α·dense(τ)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_any, save_single, tree_digest

import capmerge
from capmerge.cli import main
from capmerge.io import lazy
from capmerge.merge import engine

TABLE = "capmerge.tensors"


def write_vector(path: Path, kind: str, parts: dict[str, torch.Tensor], table: dict[str, dict]) -> Path:
    """A compressed vector written by hand with the safetensors library (format: capmerge/io/compression.py)."""
    return save_single(path, parts, {"capmerge.vector_format": kind, TABLE: json.dumps(table)})


def sparse(path: Path, indices: list[int], values: list[float], shape: list[int], idx_dtype=torch.int64) -> Path:
    parts = {"w.indices": torch.tensor(indices, dtype=idx_dtype), "w.values": torch.tensor(values)}
    return write_vector(path, "sparse", parts, {"w": {"dtype": "F32", "shape": shape, "storage": "sparse"}})


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


# -- sparse indices ------------------------------------------------------------------------------------------------
BAD_INDICES = [
    ([-1, 3], "a negative index (-1 at position 0)"),
    ([2, 12], "an index past its 12 elements (12 at position 1)"),
    ([1, 99, 5], "an index past its 12 elements (99 at position 1)"),
    ([5, 2, 7], "indices that are not strictly increasing (2 after 5 at position 1)"),
    ([1, 4, 4], "indices that are not strictly increasing (4 repeated at position 2)"),
]


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(("indices", "what"), BAD_INDICES)
def test_bad_sparse_indices_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], indices: list[int],
                                        what: str, idx_dtype: torch.dtype) -> None:  # fmt: skip
    vec = sparse(tmp_path / "v.safetensors", indices, [1.0] * len(indices), [3, 4], idx_dtype)
    base = save_single(tmp_path / "base.safetensors", {"w": torch.ones(3, 4)})
    before = tree_digest(tmp_path)
    expected = f"error: sparse tensor w has {what} ({vec})\n"
    code, err = run_cli(["apply", str(base), str(vec), "-o", str(tmp_path / "out.safetensors")], capsys)
    assert (code, err) == (2, expected)
    code, err = run_cli(["inspect", str(vec)], capsys)
    assert (code, err) == (2, expected)
    code, err = run_cli(["compress", str(vec), "-o", str(tmp_path / "c.safetensors"), "--rank", "1"], capsys)
    assert (code, err) == (2, expected)
    assert tree_digest(tmp_path) == before  # nothing written, inputs untouched


def test_valid_sparse_edges_are_accepted(tmp_path: Path) -> None:
    """First and last element, and no entry at all: the dense view is built by hand."""
    ck = capmerge.open_checkpoint(sparse(tmp_path / "v.safetensors", [0, 11], [2.5, -1.0], [3, 4]))
    want = np.zeros(12, np.float32)
    want[[0, 11]] = [2.5, -1.0]
    assert np.array_equal(ck.read_tensor("w").numpy().ravel(), want)
    ck = capmerge.open_checkpoint(sparse(tmp_path / "e.safetensors", [], [], [3, 4]))
    assert not ck.read_tensor("w").any()


BAD_TABLES = [
    ({"w": {"dtype": "F32", "shape": "34", "storage": "lowrank"}}, "invalid shape '34' in the capmerge.tensors "
     "entry of tensor w"),
    ({"w": {"dtype": "F32", "shape": [True, 4], "storage": "lowrank"}}, "invalid shape [True, 4] in the "
     "capmerge.tensors entry of tensor w"),
    ({"w": {"dtype": "F32", "shape": [3, -4], "storage": "lowrank"}}, "invalid shape [3, -4] in the "
     "capmerge.tensors entry of tensor w"),
    ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "storage": "lowrank"}}, "shape [1099511627776, "
     "1099511627776] in the capmerge.tensors entry of tensor w is too large"),
    ({"w": {"dtype": "I32", "shape": [3, 4], "storage": "lowrank"}}, "lowrank tensor w has the non-float dtype I32"),
    ({"w": ["F32", [3, 4]]}, "invalid capmerge.tensors entry of tensor w (not an object)"),
    ({"w": {"dtype": "F32", "shape": [4, 3], "storage": "lowrank"}}, "factors of lowrank tensor w (lora_B F32 "
     "[3, 2], lora_A F32 [2, 4]) do not match its shape [4, 3] and dtype F32"),
    ({"w": {"dtype": "F32", "shape": [65536, 65536], "storage": "lowrank"}}, "factors of lowrank tensor w "
     "(lora_B F32 [3, 2], lora_A F32 [2, 4]) do not match its shape [65536, 65536] and dtype F32"),
]  # fmt: skip


@pytest.mark.parametrize(("table", "what"), BAD_TABLES)
def test_bad_tables_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], table: dict, what: str) -> None:
    parts = {"w.lora_B": torch.ones(3, 2), "w.lora_A": torch.ones(2, 4)}
    vec = write_vector(tmp_path / "v.safetensors", "lowrank", parts, table)
    before = tree_digest(tmp_path)
    code, err = run_cli(["inspect", "--headers-only", str(vec)], capsys)
    assert (code, err) == (2, f"error: {what} ({vec})\n")
    assert tree_digest(tmp_path) == before


def test_integer_factors_are_refused(tmp_path: Path) -> None:
    parts = {"w.lora_B": torch.ones(3, 2, dtype=torch.int8), "w.lora_A": torch.ones(2, 4)}
    vec = write_vector(tmp_path / "v.safetensors", "lowrank", parts,
                       {"w": {"dtype": "F32", "shape": [3, 4], "storage": "lowrank"}})  # fmt: skip
    with pytest.raises(capmerge.CapmergeError, match=r"factors of lowrank tensor w \(lora_B I8 \[3, 2\]"):
        capmerge.open_checkpoint(vec)


# -- block reads -----------------------------------------------------------------------------------------------------
def ranges(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Element ranges covering tiles, tile boundaries, single elements and the whole tensor."""
    out = [(0, n), (0, 1), (n - 1, n), (0, min(n, 7)), (max(0, n - 23), n)]
    for _ in range(30):
        a = int(rng.integers(0, n))
        out.append((a, int(rng.integers(a + 1, n + 1))))
    return out


@pytest.mark.parametrize("code", ["F32", "BF16", "F64"])
@pytest.mark.parametrize(("rows", "cols", "block"), [(37, 5, 12), (6, 29, 8), (9, 41, 41), (1, 100, 7)])
def test_lowrank_blocks_equal_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, rows: int,
                                    cols: int, block: int) -> None:  # fmt: skip
    """Tiles of whole rows (cols <= block) and pieces of rows (cols > block); any range, even one that cuts elements
    in two, reads what numpy's B @ A gives. Integer factors: every product and sum is exact, so the reference is."""
    monkeypatch.setattr(lazy, "BLOCK_ELEMS", block)
    dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F64": torch.float64}[code]
    rng = np.random.default_rng(rows * cols)
    b, a = rng.integers(-3, 4, (rows, 3)), rng.integers(-3, 4, (3, cols))
    parts = {"w.lora_B": torch.tensor(b).to(dt), "w.lora_A": torch.tensor(a).to(dt)}
    vec = write_vector(tmp_path / "v.safetensors", "lowrank", parts,
                       {"w": {"dtype": code, "shape": [rows, cols], "storage": "lowrank"}})  # fmt: skip
    want = torch.tensor((b @ a).astype(np.float64)).to(dt).reshape(-1)  # |values| <= 27: exact in every dtype
    ck = capmerge.open_checkpoint(vec)
    info = ck.tensors["w"]
    isz = info.itemsize
    for s, e in ranges(rows * cols, rng):
        buf = bytearray((e - s) * isz)
        ck.read_into(info, s * isz, memoryview(buf))
        assert bytes(buf) == want[s:e].contiguous().view(torch.uint8).numpy().tobytes(), (s, e)
        if (e - s) * isz > 2:  # a byte range that cuts elements
            buf = bytearray((e - s) * isz - 2)
            ck.read_into(info, s * isz + 1, memoryview(buf))
            assert bytes(buf) == want.view(torch.uint8).numpy().tobytes()[s * isz + 1 : e * isz - 1], (s, e)
    assert torch.equal(ck.read_tensor("w").reshape(-1), want)


def test_lowrank_values_do_not_depend_on_the_range_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random factors: each element is computed in the same tile whatever range is read, so every read agrees with
    the whole tensor bit for bit (and with numpy's float64 product to float32 rounding)."""
    monkeypatch.setattr(lazy, "BLOCK_ELEMS", 64)
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(50, 8, generator=g), torch.randn(8, 30, generator=g)
    vec = write_vector(tmp_path / "v.safetensors", "lowrank", {"w.lora_B": b, "w.lora_A": a},
                       {"w": {"dtype": "F32", "shape": [50, 30], "storage": "lowrank"}})  # fmt: skip
    ck = capmerge.open_checkpoint(vec)
    whole = ck.read_tensor("w").reshape(-1)
    ref = b.double().numpy() @ a.double().numpy()
    np.testing.assert_allclose(whole.numpy(), ref.ravel(), rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(1)
    for s, e in ranges(1500, rng):
        buf = bytearray((e - s) * 4)
        ck.read_into(ck.tensors["w"], s * 4, memoryview(buf))
        assert torch.equal(torch.frombuffer(buf, dtype=torch.float32), whole[s:e]), (s, e)


@pytest.mark.parametrize("bits", [None, 8])
def test_sparse_blocks_equal_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bits: int | None) -> None:
    monkeypatch.setattr(lazy, "BLOCK_ELEMS", 10)
    rng = np.random.default_rng(3)
    n = 300
    idx = np.sort(rng.choice(n, 40, replace=False))
    if bits:
        q, scale = rng.integers(-127, 128, 40).astype(np.int8), np.float32(0.013)
        parts = {"w.indices": torch.tensor(idx, dtype=torch.int32), "w.values": torch.tensor(q),
                 "w.scale": torch.tensor(scale)}  # fmt: skip
        vals = q.astype(np.float32) * scale  # value = q·scale in float32
    else:
        vals = rng.standard_normal(40).astype(np.float32)
        parts = {"w.indices": torch.tensor(idx, dtype=torch.int32), "w.values": torch.tensor(vals)}
    vec = write_vector(tmp_path / "v.safetensors", "sparse", parts,
                       {"w": {"dtype": "F32", "shape": [20, 15], "storage": "sparse"}})  # fmt: skip
    want = np.zeros(n, np.float32)
    want[idx] = vals
    ck = capmerge.open_checkpoint(vec)
    assert np.array_equal(ck.read_tensor("w").numpy().ravel(), want)
    for s, e in ranges(n, rng):
        buf = bytearray((e - s) * 4)
        ck.read_into(ck.tensors["w"], s * 4, memoryview(buf))
        assert np.array_equal(np.frombuffer(buf, np.float32), want[s:e]), (s, e)


# -- apply and non-finite results ------------------------------------------------------------------------------------
def test_apply_with_lowrank_and_sparse_equals_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """base + α·dense(τ) in float32, computed by numpy: the product α·τ and the sum are each rounded to float32,
    as the merge kernel does. Small blocks, so that tensors span several engine blocks and several tiles."""
    monkeypatch.setattr(engine, "BLOCK_ELEMS", 256)
    monkeypatch.setattr(lazy, "BLOCK_ELEMS", 100)
    rng = np.random.default_rng(5)
    base = {"w": rng.standard_normal((40, 30)).astype(np.float32), "u": rng.standard_normal(500).astype(np.float32)}
    save_single(tmp_path / "base.safetensors", {k: torch.tensor(v) for k, v in base.items()})
    b, a = rng.integers(-4, 5, (40, 3)), rng.integers(-4, 5, (3, 30))  # integer factors: B·A exact in float32
    write_vector(tmp_path / "low.safetensors", "lowrank",
                 {"w.lora_B": torch.tensor(b, dtype=torch.float32), "w.lora_A": torch.tensor(a, dtype=torch.float32),
                  "u": torch.tensor(rng.standard_normal(500).astype(np.float32))},
                 {"w": {"dtype": "F32", "shape": [40, 30], "storage": "lowrank"},
                  "u": {"dtype": "F32", "shape": [500], "storage": "dense"}})  # fmt: skip
    low_u = load_any(tmp_path / "low.safetensors")["u"].numpy()
    idx = np.sort(rng.choice(1200, 90, replace=False))
    vals = rng.standard_normal(90).astype(np.float32)
    write_vector(tmp_path / "sp.safetensors", "sparse",
                 {"w.indices": torch.tensor(idx, dtype=torch.int32), "w.values": torch.tensor(vals)},
                 {"w": {"dtype": "F32", "shape": [40, 30], "storage": "sparse"}})  # fmt: skip
    alpha = np.float32(0.37)
    for vec, tau in (("low.safetensors", {"w": (b @ a).astype(np.float32), "u": low_u}),
                     ("sp.safetensors", {"w": np.zeros(1200, np.float32)})):  # fmt: skip
        if vec == "sp.safetensors":
            tau["w"][idx] = vals
            tau["w"] = tau["w"].reshape(40, 30)
        out = tmp_path / f"out-{vec}"
        code, err = run_cli(["apply", str(tmp_path / "base.safetensors"), str(tmp_path / vec), "-o", str(out),
                             "--alpha", str(float(alpha)), "-q"], capsys)  # fmt: skip
        assert code == 0, err
        got = load_any(out)
        for name, t in tau.items():
            want = base[name] + alpha * t
            assert np.array_equal(got[name].numpy(), want), (vec, name, np.abs(got[name].numpy() - want).max())


def test_overflow_from_finite_factors_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """F16 factors of 300 each: 300·300 = 90000 overflows float16 (max 65504). Finite inputs, non-finite result: the
    same error as a dense merge that overflows, and --allow-nonfinite keeps it."""
    vec = write_vector(tmp_path / "v.safetensors", "lowrank",
                       {"w.lora_B": torch.full((4, 1), 300.0, dtype=torch.float16),
                        "w.lora_A": torch.full((1, 5), 300.0, dtype=torch.float16)},
                       {"w": {"dtype": "F16", "shape": [4, 5], "storage": "lowrank"}})  # fmt: skip
    base = save_single(tmp_path / "base.safetensors", {"w": torch.zeros(4, 5, dtype=torch.float16)})
    before = tree_digest(tmp_path)
    out = tmp_path / "out.safetensors"
    code, err = run_cli(["apply", str(base), str(vec), "-o", str(out)], capsys)
    assert (code, err) == (2, "error: result has NaN/Inf where the inputs were finite (overflow in the output "
                              "dtype?); use --allow-nonfinite to keep it (w)\n")  # fmt: skip
    assert tree_digest(tmp_path) == before
    code, err = run_cli(["apply", str(base), str(vec), "-o", str(out), "--allow-nonfinite", "-q"], capsys)
    assert code == 0, err
    assert torch.isinf(load_any(out)["w"]).all()


# -- memory ----------------------------------------------------------------------------------------------------------
MEMORY_PROBE = r"""
import json, sys
import numpy as np
import capmerge

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

small, big = sys.argv[1], sys.argv[2:]
stats = capmerge.inspect(small)["vectors"][0]["tensors"][0]  # also warms up every code path the big run takes
growth = []
for path in big:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    rss = status("VmRSS:")
    total = capmerge.inspect(path)["vectors"][0]["total"]
    growth.append({"growth": status("VmHWM:") - rss, "l2": total["l2"], "numel": total["numel"]})
print(json.dumps({"small": stats, "big": growth}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS reset)")
def test_inspect_of_a_huge_declared_shape_stays_in_a_few_blocks(tmp_path: Path) -> None:
    """A rank-1 file of 128 KiB declaring an 8192 × 8192 float64 tensor (512 MiB dense), and a sparse file of 16 KiB
    declaring 4096 × 8192 (256 MiB): ``inspect`` streams the dense views, and the peak RSS grows by far less than the
    dense size (measured: 68 and 5 MiB). The statistics of a small equivalent equal numpy's on the dense matrix; the
    big ones' norms are ‖b‖·‖a‖ and ‖values‖."""
    rng = np.random.default_rng(11)
    sb, sa = rng.standard_normal((64, 1)), rng.standard_normal((1, 96))
    sb[3] = 0.0  # a zero row: zero_frac is 1/64
    small = write_vector(tmp_path / "small.safetensors", "lowrank",
                         {"w.lora_B": torch.tensor(sb), "w.lora_A": torch.tensor(sa)},
                         {"w": {"dtype": "F64", "shape": [64, 96], "storage": "lowrank"}})  # fmt: skip
    n = 8192
    bb, ba = rng.standard_normal((n, 1)), rng.standard_normal((1, n))
    big = write_vector(tmp_path / "big.safetensors", "lowrank",
                       {"w.lora_B": torch.tensor(bb), "w.lora_A": torch.tensor(ba)},
                       {"w": {"dtype": "F64", "shape": [n, n], "storage": "lowrank"}})  # fmt: skip
    idx = np.sort(rng.choice(n * n // 2, 1000, replace=False))
    vals = rng.standard_normal(1000)
    big_sparse = write_vector(tmp_path / "big-sparse.safetensors", "sparse",
                              {"w.indices": torch.tensor(idx), "w.values": torch.tensor(vals)},
                              {"w": {"dtype": "F64", "shape": [n // 2, n], "storage": "sparse"}})  # fmt: skip
    assert big.stat().st_size < 200_000 and big_sparse.stat().st_size < 20_000
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(small), str(big), str(big_sparse)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    # each element one product (exact in float64 in any order); inspect takes its float64 sums over float32 values
    dense = (sb @ sa).astype(np.float32).astype(np.float64)
    s = got["small"]
    assert s["numel"] == dense.size and s["zero_frac"] == pytest.approx(np.mean(dense == 0), abs=0)
    assert s["l2"] == pytest.approx(np.linalg.norm(dense), rel=1e-12)
    assert s["mean_abs"] == pytest.approx(np.abs(dense).mean(), rel=1e-12)
    assert s["max_abs"] == np.abs(dense).max()
    cases = [(n * n, np.linalg.norm(bb) * np.linalg.norm(ba)), (n * n // 2, np.linalg.norm(vals))]
    for g, (numel, l2) in zip(got["big"], cases, strict=True):
        assert g["numel"] == numel and g["l2"] == pytest.approx(l2, rel=1e-6)
        assert g["growth"] < numel * 8 / 4, f"peak RSS grew by {g['growth'] / 2**20:.0f} MiB of {numel * 8 >> 20} MiB"


def test_spectrum_of_large_lowrank_and_sparse_tensors_from_their_stored_parts(tmp_path: Path) -> None:
    """Above a block (600 × 1000 > 512 Ki elements), ``inspect --spectrum`` takes singular values from the factors
    (exactly: an r × r problem) or from the sparse entries, not from a matrix built whole. References: numpy's SVD
    of the dense matrices; the sparse one has its 5 entries in distinct rows and columns, so its singular values are
    their magnitudes."""
    rng = np.random.default_rng(2)
    b, a = rng.standard_normal((600, 3)).astype(np.float32), rng.standard_normal((3, 1000)).astype(np.float32)
    parts = {"w.lora_B": torch.tensor(b), "w.lora_A": torch.tensor(a)}
    low = write_vector(tmp_path / "low.safetensors", "lowrank", parts,
                       {"w": {"dtype": "F32", "shape": [600, 1000], "storage": "lowrank"}})  # fmt: skip
    sp = capmerge.inspect(low, spectrum=True, spectrum_k=4)["vectors"][0]["tensors"][0]["spectrum"]
    ref = np.linalg.svd(b.astype(np.float64) @ a.astype(np.float64), compute_uv=False)
    assert sp["exact"] and sp["k"] == 4 and sp["sigma"][3] == 0.0  # rank 3: the fourth is zero
    np.testing.assert_allclose(sp["sigma"][:3], ref[:3], rtol=1e-10)
    assert sp["energy_top_k"] == pytest.approx(1.0, rel=1e-9) and sp["rank90"] == int(
        np.searchsorted(np.cumsum(ref**2) / (ref**2).sum(), 0.9) + 1)  # fmt: skip
    rows, cols = [3, 100, 250, 420, 799], [9, 650, 2, 333, 120]
    vals = np.array([4.0, -3.0, 2.5, 1.0, -0.5], np.float32)
    order = np.argsort(np.array(rows) * 700 + np.array(cols))
    idx = (np.array(rows) * 700 + np.array(cols))[order]
    parts = {"w.indices": torch.tensor(idx, dtype=torch.int32), "w.values": torch.tensor(vals[order])}
    sparse_vec = write_vector(tmp_path / "sp.safetensors", "sparse", parts,
                              {"w": {"dtype": "F32", "shape": [800, 700], "storage": "sparse"}})  # fmt: skip
    sp = capmerge.inspect(sparse_vec, spectrum=True, spectrum_k=3)["vectors"][0]["tensors"][0]["spectrum"]
    np.testing.assert_allclose(sp["sigma"], [4.0, 3.0, 2.5], rtol=1e-9)
    assert sp["stable_rank"] == pytest.approx(float((vals**2).sum()) / 16.0, rel=1e-12)
