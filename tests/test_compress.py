"""Compressed vectors: low-rank (SVD, --rank/--energy) and sparse (--density [--bits 8]); reading them back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_single, tree_digest
from safetensors import safe_open
from safetensors.torch import load_file

import capmerge
from capmerge.cli import main
from capmerge.errors import UsageError
from capmerge.io import compress as compress_mod


def vector(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(48, 4, generator=g) @ torch.randn(4, 40, generator=g),  # exactly rank 4
        "b.weight": torch.randn(30, 20, generator=g),
        "b.bias": torch.randn(30, generator=g),
        "c.weight": torch.randn(16, 24, generator=g).bfloat16(),
        "conv.weight": torch.randn(8, 3, 2, 2, generator=g),
    }


def np_report(t: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    x, y = t.double().numpy().ravel(), approx.double().numpy().ravel()
    return float(np.linalg.norm(x - y) / np.linalg.norm(x)), float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_rank_k_is_reconstructed_and_errors_match_numpy(tmp_path: Path) -> None:
    v = vector()
    save_single(tmp_path / "v.safetensors", v)
    s = capmerge.compress(tmp_path / "v.safetensors", tmp_path / "c.safetensors", rank=4)
    ck = capmerge.open_checkpoint(tmp_path / "c.safetensors")
    assert ck.kind == "lowrank" and set(ck.tensors) == set(v)
    a = ck.read_tensor("a.weight")
    assert float((a - v["a.weight"]).norm() / v["a.weight"].norm()) < 1e-5
    rows = {r["name"]: r for r in s.tensors}
    totals = np.zeros(4)
    for name, t in v.items():
        got = ck.read_tensor(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        err, cos = np_report(t, got)
        assert rows[name]["rel_error"] == pytest.approx(err, rel=1e-9, abs=1e-12), name
        assert rows[name]["cosine"] == pytest.approx(cos, rel=1e-9), name
        x, y = t.double().numpy().ravel(), got.double().numpy().ravel()
        totals += [x @ x, (x - y) @ (x - y), x @ y, y @ y]
        # sizes: what the file stores for the tensor, against the dense bytes
        with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
            keys = [k for k in f.keys() if k == name or k.startswith(name + ".")]  # noqa: SIM118
            stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        assert rows[name]["bytes_after"] == stored and rows[name]["bytes_before"] == t.numel() * t.element_size()
    assert s.rel_error == pytest.approx(np.sqrt(totals[1] / totals[0]), rel=1e-9)
    assert s.cosine == pytest.approx(totals[2] / np.sqrt(totals[0] * totals[3]), rel=1e-9)
    assert rows["b.bias"]["storage"] == "dense" and rows["a.weight"]["rank"] == 4
    assert rows["conv.weight"]["rank"] == 4  # (8, 3, 2, 2) factored as 8 x 12
    assert ck.read_tensor("conv.weight").shape == (8, 3, 2, 2)
    stored = load_file(str(tmp_path / "c.safetensors"))
    assert stored["a.weight.lora_B"].shape == (48, 4) and stored["a.weight.lora_A"].shape == (4, 40)
    # the best rank-4 approximation of a full-rank matrix: the Eckart–Young error
    sv = np.linalg.svd(v["b.weight"].double().numpy(), compute_uv=False)
    assert rows["b.weight"]["rel_error"] == pytest.approx(np.sqrt((sv[4:] ** 2).sum() / (sv**2).sum()), rel=1e-5)


def test_energy_picks_the_smallest_rank_and_randomized_svd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    s_vals = torch.tensor([10.0, 5.0, 2.0, 1.0] + [0.01] * 16)
    u, _ = torch.linalg.qr(torch.randn(200, 20, generator=g))
    w, _ = torch.linalg.qr(torch.randn(150, 20, generator=g))
    m = (u * s_vals) @ w.T
    save_single(tmp_path / "v.safetensors", {"m": m})
    energy = float((s_vals[:2] ** 2).sum() / (s_vals**2).sum()) - 1e-4  # reached at k = 2
    s = capmerge.compress(tmp_path / "v.safetensors", tmp_path / "e.safetensors", energy=energy)
    assert s.tensors[0]["rank"] == 2 and s.tensors[0]["method"] == "svd"
    monkeypatch.setattr(compress_mod, "FULL_SVD_MAX", 8)  # force the randomized path
    s = capmerge.compress(tmp_path / "v.safetensors", tmp_path / "r.safetensors", energy=0.999)
    row = s.tensors[0]
    assert row["method"] == "randomized-svd" and row["rank"] == 4
    expected = float(torch.sqrt((s_vals[4:] ** 2).sum() / (s_vals**2).sum()))
    assert row["rel_error"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("bits", [None, 8])
def test_sparse_round_trip(tmp_path: Path, bits: int | None) -> None:
    v = vector(2)
    save_single(tmp_path / "v.safetensors", v)
    s = capmerge.compress(tmp_path / "v.safetensors", tmp_path / "s.safetensors", density=0.1, bits=bits)
    ck = capmerge.open_checkpoint(tmp_path / "s.safetensors")
    assert ck.kind == "sparse"
    for name, t in v.items():
        got = ck.read_tensor(name)
        flat, gflat = t.reshape(-1).float(), got.reshape(-1).float()
        k = max(1, int(0.1 * t.numel() + 0.5))
        top = torch.topk(flat.abs(), k).values
        kept = gflat != 0
        assert int(kept.sum()) == k and bool((flat[kept].abs() >= top[-1]).all()), name
        if bits is None:
            assert torch.equal(got.reshape(-1)[kept], t.reshape(-1)[kept]), name  # kept entries exact
        else:
            scale = float(flat[kept].abs().max()) / 127
            assert float((gflat[kept] - flat[kept]).abs().max()) <= scale / 2 * 1.001 + 1e-2 * float(
                t.dtype == torch.bfloat16
            )
        assert ck.storage(name)["nnz"] == k and ck.storage(name).get("bits") == bits
    stored = load_file(str(tmp_path / "s.safetensors"))
    assert stored["b.weight.indices"].dtype == torch.int32
    assert stored["b.weight.values"].dtype == (torch.int8 if bits else torch.float32)
    assert s.bytes_after < s.bytes_before


def test_apply_reads_compressed_vectors(tmp_path: Path) -> None:
    v = vector(3)
    g = torch.Generator().manual_seed(9)
    base = {k: torch.randn(t.shape, generator=g).to(t.dtype) for k, t in v.items()}
    save_single(tmp_path / "base.safetensors", base)
    save_single(tmp_path / "v.safetensors", v)
    capmerge.compress(tmp_path / "v.safetensors", tmp_path / "c.safetensors", rank=3)
    ck = capmerge.open_checkpoint(tmp_path / "c.safetensors")
    dense = {n: ck.read_tensor(n) for n in ck.tensors}
    save_single(tmp_path / "d.safetensors", dense)
    capmerge.apply(tmp_path / "base.safetensors", [tmp_path / "c.safetensors"], tmp_path / "m1.safetensors", alpha=0.5,
                   method="ties", density=0.5)  # fmt: skip
    capmerge.apply(tmp_path / "base.safetensors", [tmp_path / "d.safetensors"], tmp_path / "m2.safetensors", alpha=0.5,
                   method="ties", density=0.5)  # fmt: skip
    a, b = load_file(str(tmp_path / "m1.safetensors")), load_file(str(tmp_path / "m2.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    # compressing a compressed vector reads its dense view
    s = capmerge.compress(tmp_path / "c.safetensors", tmp_path / "cc.safetensors", density=0.5)
    assert s.kind == "sparse"
    meta = capmerge.open_checkpoint(tmp_path / "cc.safetensors").metadata
    assert json.loads(meta["capmerge.compression"]) == {"kind": "sparse", "density": 0.5}


def test_the_function_is_not_shadowed_by_its_module(tmp_path: Path) -> None:
    import subprocess
    import sys

    save_single(tmp_path / "v.safetensors", vector())
    code = (f"import capmerge; capmerge.open_checkpoint({str(tmp_path / 'v.safetensors')!r}); "
            f"print(capmerge.compress({str(tmp_path / 'v.safetensors')!r}, {str(tmp_path / 'o.safetensors')!r}, "
            "rank=1).kind)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lowrank"


def test_lazy_view_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    save_single(tmp_path / "v.safetensors", vector())
    capmerge.compress(tmp_path / "v.safetensors", tmp_path / "c.safetensors", rank=2)
    ck = capmerge.open_checkpoint(tmp_path / "c.safetensors")
    info = ck.tensors["a.weight"]
    buf = bytearray(16)
    ck.read_into(info, 0, memoryview(buf))
    assert ck._local.name == "a.weight"  # type: ignore[attr-defined]
    ck.read_into(ck.tensors["b.weight"], 0, memoryview(buf))
    assert ck._local.name == "b.weight"  # the previous reconstruction was released


def test_compress_cli_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_single(tmp_path / "v.safetensors", vector())
    code = main(["compress", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "c.safetensors"), "--rank", "4",
                 "--json", "--per-tensor"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0 and json.loads(out.out)["kind"] == "lowrank" and "a.weight: lowrank (rank 4)" in out.err
    before = tree_digest(tmp_path)
    cases = [
        ([], "give exactly one of --rank, --energy, --density"),
        (
            ["--rank", "2", "--density", "0.1"],
            "give exactly one of --rank, --energy, --density (got --rank, --density)",
        ),
        (["--rank", "0"], "--rank must be a positive integer, got 0"),
        (["--energy", "1.5"], "--energy must be in (0, 1], got 1.5"),
        (["--density", "0"], "--density must be in (0, 1], got 0.0"),
        (["--rank", "2", "--bits", "8"], "--bits needs --density"),
        (["--density", "0.1", "--bits", "4"], "--bits 8 is the only choice, and only with --density"),
    ]
    for args, message in cases:
        code = main(["compress", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "x.safetensors"), *args])
        err = capsys.readouterr().err
        assert code == 2 and err == f"error: {message}\n", (args, err)
    code = main(["compress", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "c.safetensors"), "--rank", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: output exists; pass --force"), err
    code = main(["compress", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "v.safetensors"), "--rank", "2",
                 "-f"])  # fmt: skip
    assert code == 2 and "output is one of the inputs" in capsys.readouterr().err
    code = main(["compress", str(tmp_path / "v.safetensors"), "--rank", "2"])
    assert code == 2 and "missing option -o/--output" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before
    with pytest.raises(UsageError):
        capmerge.compress(tmp_path / "v.safetensors", tmp_path / "y.safetensors", rank=True)  # type: ignore[arg-type]


def test_corrupt_compressed_headers_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a.weight.lora_B": torch.ones(4, 2)}, str(tmp_path / "bad.safetensors"), metadata={
        "capmerge.vector_format": "lowrank",
        "capmerge.tensors": json.dumps({"a.weight": {"dtype": "F32", "shape": [4, 3], "storage": "lowrank"}}),
    })  # fmt: skip
    with pytest.raises(capmerge.CapmergeError, match=r"lowrank tensor a.weight lacks a.weight.lora_A"):
        capmerge.open_checkpoint(tmp_path / "bad.safetensors")
    save_file({"x": torch.ones(1)}, str(tmp_path / "bad2.safetensors"), metadata={"capmerge.vector_format": "zip"})
    with pytest.raises(capmerge.CapmergeError, match="unknown capmerge.vector_format 'zip'"):
        capmerge.open_checkpoint(tmp_path / "bad2.safetensors")
