"""capmerge.inspect / `capmerge inspect`: statistics against numpy, cosines of hand-built vectors, plots, errors."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import listing, model_tensors, perturb, rchar, save_sharded, save_single
from typer.testing import CliRunner

import capmerge
from capmerge.analysis import stats as analysis
from capmerge.cli import app

runner = CliRunner()
TOL = {torch.float32: 1e-10, torch.bfloat16: 1e-10, torch.float16: 1e-10}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy().astype(np.float64).ravel()


def _stats(x: np.ndarray, total_sq: float) -> dict[str, float]:
    finite = x[np.isfinite(x)]
    return {
        "l2": math.sqrt(float(np.sum(finite**2))),
        "share": float(np.sum(finite**2)) / total_sq,
        "mean_abs": float(np.sum(np.abs(finite))) / x.size if x.size else 0.0,
        "zero_frac": float(np.sum(x == 0)) / x.size if x.size else 0.0,
        "max_abs": float(np.max(np.abs(finite))) if finite.size else 0.0,
        "nonfinite": int(x.size - finite.size),
    }


def _close(got: dict, want: dict, where: str) -> None:
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (where, k, got[k], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sharded", [False, True])
def test_statistics_match_numpy(tmp_path: Path, dtype: torch.dtype, sharded: bool, monkeypatch) -> None:
    monkeypatch.setattr(analysis, "CHUNK", 1000)  # several blocks per tensor, a partial last block
    t = model_tensors(3, dtype)
    t["layers.0.attn.weight"][::3] = 0  # known zeros
    t["layers.1.seven"][2] = float("inf")
    t["layers.1.seven"][4] = float("nan")
    path = save_sharded(tmp_path / "m", t, 3) if sharded else save_single(tmp_path / "m.safetensors", t)
    r = capmerge.inspect(path)
    (vec,) = r["vectors"]
    floats = {k: _np(v) for k, v in t.items() if v.is_floating_point()}
    total_sq = sum(float(np.sum(x[np.isfinite(x)] ** 2)) for x in floats.values())
    by_name = {d["name"]: d for d in vec["tensors"]}
    assert set(by_name) == set(floats) and vec["skipped"] == {"position_ids": "non-floating (I64)"}
    for name, x in floats.items():
        _close(by_name[name], _stats(x, total_sq), name)
        assert by_name[name]["shape"] == list(t[name].shape) and by_name[name]["numel"] == x.size
    assert by_name["layers.0.attn.weight"]["zero_frac"] >= 6 * 16 / 256
    layers = {d["name"]: d for d in vec["layers"]}
    assert list(layers) == ["0", "1", "other"]
    groups = {"0": ["layers.0."], "1": ["layers.1."], "other": ["embed.", "vision."]}
    for g, prefixes in groups.items():
        x = np.concatenate([floats[n] for n in floats if n.startswith(tuple(prefixes))])
        _close(layers[g], _stats(x, total_sq), g)
    modules = {d["name"]: d for d in vec["modules"]}
    assert set(modules) == {"embed", "layers.*.attn", "layers.*.mlp", "layers.*", "vision.frozen"}
    x = np.concatenate([floats["layers.0.attn.weight"], floats["layers.0.attn.bias"], floats["layers.1.attn.weight"]])
    _close(modules["layers.*.attn"], _stats(x, total_sq), "layers.*.attn")
    all_x = np.concatenate(list(floats.values()))
    _close(vec["total"], _stats(all_x, total_sq), "total")
    assert vec["total"]["nonfinite"] == 2 and vec["total"]["share"] == pytest.approx(1.0)
    info = r["inputs"][0]
    assert info["tensors"] == 11 and info["params"] == sum(v.numel() for v in t.values())
    assert info["size_on_disk"] == sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) or not sharded


def _with_angle(u: torch.Tensor, theta: float, norm: float, g: torch.Generator) -> torch.Tensor:
    """A tensor at angle theta to u (Gram-Schmidt on a random direction), with the given norm."""
    uf, w = u.flatten().double(), torch.randn(u.numel(), generator=g, dtype=torch.float64)
    uh = uf / uf.norm()
    w = w - (w @ uh) * uh
    v = math.cos(theta) * uh + math.sin(theta) * w / w.norm()
    return (norm * v).reshape(u.shape).float()


def test_cosines_of_vectors_with_known_angles(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    angles = {0: 0.0, 1: math.pi / 3, 2: math.pi / 2, 3: 3 * math.pi / 4, 4: math.pi}
    a, b = {}, {}
    for layer, theta in angles.items():
        for part, shape in (("q", (8, 8)), ("bias", (8,))):
            name = f"model.layers.{layer}.attn.{part}"
            u = torch.randn(shape, generator=g)
            a[name] = u * (2.0 + layer)  # norm ratio a/b = (2 + layer)·‖u‖ / (‖u‖) per tensor
            b[name] = _with_angle(u, theta, float(u.norm()), g)
    b["model.embed"] = torch.randn(5, generator=g)  # only in b: counts as zero in a
    pa = save_single(tmp_path / "a.safetensors", a)
    pb = save_single(tmp_path / "b.safetensors", b)
    r = capmerge.inspect([pa], against=pb)
    (c,) = r["comparisons"]
    assert c["a"] == str(pa) and c["b"] == str(pb) and c["only_in_b"] == ["model.embed"] and c["only_in_a"] == []
    per_tensor = {d["name"]: d for d in c["tensors"]}
    layers = {d["name"]: d for d in c["layers"]}
    for layer, theta in angles.items():
        for part in ("q", "bias"):
            d = per_tensor[f"model.layers.{layer}.attn.{part}"]
            assert d["cos"] == pytest.approx(math.cos(theta), abs=2e-6)
            assert d["ratio"] == pytest.approx(2.0 + layer, rel=1e-6)
        assert layers[str(layer)]["cos"] == pytest.approx(math.cos(theta), abs=2e-6)
    assert per_tensor["model.embed"]["cos"] is None and per_tensor["model.embed"]["norm_a"] == 0
    fa = np.concatenate([_np(a.get(n, torch.zeros_like(b[n]))) for n in b])
    fb = np.concatenate([_np(b[n]) for n in b])
    want = float(fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb))
    assert c["total"]["cos"] == pytest.approx(want, rel=1e-9)
    assert c["total"]["ratio"] == pytest.approx(np.linalg.norm(fa) / np.linalg.norm(fb), rel=1e-9)


def _three(tmp_path: Path) -> dict[str, Path]:
    p = model_tensors(0, torch.float32)
    s = perturb(p, 1)
    a = perturb(s, 2)
    return {
        "P": save_sharded(tmp_path / "P", p, 2),
        "S": save_single(tmp_path / "S" / "model.safetensors", s).parent,
        "A": save_single(tmp_path / "A.safetensors", a),
        "t": {"P": p, "S": s, "A": a},  # type: ignore[dict-item]
    }


def test_task_and_capability_built_on_the_fly(tmp_path: Path) -> None:
    c = _three(tmp_path)
    before = listing(tmp_path)
    r = capmerge.inspect(task=(c["P"], c["S"]), capability=(c["S"], c["A"]))
    assert listing(tmp_path) == before  # nothing written
    t = c["t"]
    names = [n for n, v in t["P"].items() if v.is_floating_point()]
    cap = {n: _np(t["A"][n]) - _np(t["S"][n]) for n in names}
    task = {n: _np(t["S"][n]) - _np(t["P"][n]) for n in names}
    cap_v, task_v = r["vectors"]
    assert cap_v["label"].startswith("capability") and task_v["label"].startswith("task")
    assert cap_v["formula"] == {"plus": str(c["A"]), "minus": str(c["S"])}
    assert [i["ref"] for i in r["inputs"]] == [str(c["P"]), str(c["S"]), str(c["A"])]
    (comp,) = r["comparisons"]
    for d in comp["tensors"]:
        x, y = cap[d["name"]], task[d["name"]]
        if np.linalg.norm(x) == 0 or np.linalg.norm(y) == 0:
            assert d["cos"] is None
            continue
        assert d["cos"] == pytest.approx(float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)), abs=1e-6)
    x, y = np.concatenate(list(cap.values())), np.concatenate(list(task.values()))
    assert comp["total"]["cos"] == pytest.approx(float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)), abs=1e-6)
    assert comp["total"]["ratio"] == pytest.approx(np.linalg.norm(x) / np.linalg.norm(y), rel=1e-6)
    assert cap_v["total"]["l2"] == pytest.approx(np.linalg.norm(x), rel=1e-6)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_headers_only_reads_no_tensor_data(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    path = save_single(tmp_path / "big.safetensors", {f"layers.{i}.w": torch.randn(512, 512, generator=g)
                                                      for i in range(4)})  # fmt: skip
    size = path.stat().st_size
    before = rchar()
    r = capmerge.inspect(path, headers_only=True)
    headers_read = rchar() - before
    assert "vectors" not in r and r["inputs"][0]["tensors"] == 4 and r["inputs"][0]["params"] == 4 * 512 * 512
    assert headers_read < 64 * 1024, headers_read
    before = rchar()
    capmerge.inspect(path)
    assert rchar() - before >= size - 1024  # the full pass reads every tensor once
    assert rchar() - before < 1.2 * size


def test_spectrum_against_numpy_svd(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sv = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.5])
    u, _ = torch.linalg.qr(torch.randn(300, 5, generator=g))
    v, _ = torch.linalg.qr(torch.randn(270, 5, generator=g))
    low = (u * sv) @ v.T  # exactly rank 5, larger than the exact-SVD limit: randomized SVD
    small = torch.randn(20, 12, generator=g)
    path = save_single(tmp_path / "m.safetensors", {"low": low, "small": small, "bias": torch.randn(7, generator=g)})
    r = capmerge.inspect(path, spectrum=True, spectrum_k=8)
    t = {d["name"]: d for d in r["vectors"][0]["tensors"]}
    assert "spectrum" not in t["bias"]
    sp = t["low"]["spectrum"]
    assert sp["exact"] is False and sp["k"] == 8
    np.testing.assert_allclose(sp["sigma"][:5], sv.numpy(), rtol=1e-4)
    assert max(sp["sigma"][5:]) < 1e-4
    energy = (sv**2).cumsum(0) / (sv**2).sum()
    assert sp["rank90"] == int((energy >= 0.9).nonzero()[0]) + 1 == 2
    assert sp["energy_top_k"] == pytest.approx(1.0, abs=1e-5)
    assert sp["stable_rank"] == pytest.approx(float((sv**2).sum() / 100.0), rel=1e-4)
    ref = np.linalg.svd(small.double().numpy(), compute_uv=False)
    sp = t["small"]["spectrum"]
    assert sp["exact"] is True and sp["k"] == 8
    np.testing.assert_allclose(sp["sigma"], ref[:8], rtol=1e-9)
    assert sp["energy_top_k"] == pytest.approx(float((ref[:8] ** 2).sum() / (ref**2).sum()), rel=1e-9)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_json_file_plot_and_table(tmp_path: Path) -> None:
    c = _three(tmp_path)
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    args = ["inspect", "--task", str(c["P"]), str(c["S"]), "--capability", str(c["S"]), str(c["A"]),
            "--json", str(out_json), "--plot", str(out_png)]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    d = json.loads(out_json.read_text())
    want = capmerge.inspect(task=(c["P"], c["S"]), capability=(c["S"], c["A"]))
    assert d == json.loads(json.dumps(want))
    assert "cos(a, b)" in r.stdout and "capability" in r.stdout and "total" in r.stdout
    w, h = _png_size(out_png)
    assert 600 <= w <= 2500 and 500 <= h <= 2000, (w, h)
    import matplotlib.image

    img = matplotlib.image.imread(str(out_png))
    assert img.shape[:2] == (h, w) and img[..., :3].std() > 0.05  # not blank


def test_cli_json_stdout_and_optional_value(tmp_path: Path) -> None:
    c = _three(tmp_path)
    r = runner.invoke(app, ["inspect", "--json", str(c["A"]), "--by", "module"])  # --json does not eat the PATH
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["by"] == "module" and d["inputs"][0]["ref"] == str(c["A"])
    idx = next(Path(c["P"]).glob("*.index.json"))
    r = runner.invoke(app, ["inspect", "--json", str(idx), "--headers-only"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["inputs"][0]["sharded"] is True
    r = runner.invoke(app, ["inspect", str(c["A"]), "--by", "tensor", "--top", "3", "--spectrum"])
    assert r.exit_code == 0 and "top 3 of 10 tensors by norm" in r.stdout and "stable rank" in r.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "P", "S"], "--task P S and --capability S A go together"),
        ([], "nothing to inspect"),
        (["A", "--by", "row"], "invalid by 'row'"),
        (["missing.safetensors"], "no such file or directory (missing.safetensors)"),
        (["A", "--plot", "x.png", "--headers-only"], "--plot needs tensor data"),
        (["A", "--json", "nodir/x.json"], "the output's directory does not exist (nodir/x.json)"),
        (["A", "--against", "bad.safetensors"], "shape mismatch"),
        (["A", "--plot", "A"], "the output would overwrite an input (A)"),
        (["A", "--top", "-1"], "--top must be 0 or more"),
        (["A", "--json", "x.json", "y.json"], "--json takes one output file, got x.json, y.json"),
        (["A", "--layer-pattern", "layers"], "has no capture group"),
        (["--task", "P", "S", "--capability", "S", "A", "A"], "give no other PATH"),
    ],
)
def test_cli_errors(tmp_path: Path, monkeypatch, extra: list[str], message: str) -> None:
    c = _three(tmp_path)
    monkeypatch.chdir(tmp_path)
    Path("A").symlink_to(c["A"])
    save_single(tmp_path / "bad.safetensors", {"embed.weight": torch.zeros(3)})
    before = listing(tmp_path)
    r = runner.invoke(app, ["inspect", *extra])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert listing(tmp_path) == before


def test_plot_without_matplotlib_is_a_clear_error(tmp_path: Path) -> None:
    c = _three(tmp_path)
    code = ("import sys; sys.modules['matplotlib'] = None; from capmerge.cli import main;"
            f"sys.exit(main(['inspect', {str(c['A'])!r}, '--plot', 'x.png', '--json', 'x.json']))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "error: --plot needs matplotlib, which is not installed (pip install 'capmerge[plot]')\n"
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.json").exists()
