"""`capmerge inspect` on compressed vectors (low-rank, sparse, int8, LoRA-derived): the compression record written by
`compress`, `compression_info`, statistics of the dense view, comparisons — all checked against numpy."""

from __future__ import annotations

import gc
import json
import struct
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rchar, save_single
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import capmerge
from capmerge.analysis import stats as analysis
from capmerge.cli import app, main

runner = CliRunner()
CASES = {
    "rank": {"rank": 3},
    "energy": {"energy": 0.8},
    "sparse": {"density": 0.2},
    "int8": {"density": 0.2, "bits": 8},
}


def vector(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.up.weight": torch.randn(40, 3, generator=g) @ torch.randn(3, 36, generator=g),  # rank 3
        "model.layers.0.mlp.up.bias": torch.randn(40, generator=g),
        "model.layers.1.attn.q.weight": torch.randn(30, 24, generator=g),
        "model.layers.1.attn.k.weight": torch.randn(32, 20, generator=g).bfloat16(),
        "model.layers.2.conv.weight": torch.randn(8, 3, 2, 2, generator=g),
    }


def stored(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, int]]:
    """The file's stored tensors (float64 numpy, int8 kept as int), metadata and byte sizes — via safetensors."""
    arrays, sizes = {}, {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        for k in f.keys():  # noqa: SIM118
            t = f.get_tensor(k)
            sizes[k] = t.numel() * t.element_size()
            arrays[k] = t.float().double().numpy() if t.is_floating_point() else t.numpy()
    return arrays, meta, sizes


def dense_of(arrays: dict[str, np.ndarray], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    """τ̂ rebuilt with numpy from the stored parts (B·A in float32, or scattered sparse values), rounded to dtype."""
    if name + ".lora_B" in arrays:
        x = arrays[name + ".lora_B"].astype(np.float32) @ arrays[name + ".lora_A"].astype(np.float32)
    elif name + ".indices" in arrays:
        vals = arrays[name + ".values"].astype(np.float32)
        if name + ".scale" in arrays:
            vals = vals * np.float32(arrays[name + ".scale"])
        x = np.zeros(int(np.prod(shape)), np.float32)
        x[arrays[name + ".indices"].astype(np.int64)] = vals
    else:
        x = arrays[name].astype(np.float32)
    return torch.from_numpy(x.reshape(shape)).to(dtype).double().numpy().ravel()


def err_cos(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return float(np.linalg.norm(x - y) / np.linalg.norm(x)), float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size minus the 8-byte length field and the header."""
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


@pytest.mark.parametrize("case", list(CASES))
def test_compress_records_what_numpy_recomputes(tmp_path: Path, case: str) -> None:
    v = vector()
    src = save_single(tmp_path / "v.safetensors", v)
    out = tmp_path / "c.safetensors"
    capmerge.compress(src, out, **CASES[case])
    arrays, meta, sizes = stored(out)
    report = json.loads(meta["capmerge.compression_report"])
    assert len(meta["capmerge.compression_report"]) < 200 * len(v)  # compact
    info = capmerge.compression_info(out)
    assert info is not None and info["recorded"] is True and info["exact"] is False
    assert info["kind"] == ("lowrank" if case in ("rank", "energy") else "sparse")
    assert info["options"] == json.loads(meta["capmerge.compression"])
    sums = np.zeros(4)
    ranks = []
    for name, t in v.items():
        x = t.float().double().numpy().ravel()
        y = dense_of(arrays, name, tuple(t.shape), t.dtype)
        err, cos = err_cos(x, y)
        sums += [x @ x, (x - y) @ (x - y), x @ y, y @ y]
        row = info["tensors"][name]
        parts = [k for k in arrays if k == name or k.startswith(name + ".")]
        assert row["bytes_after"] == sum(sizes[k] for k in parts), name
        assert row["bytes_before"] == t.numel() * t.element_size(), name
        tol = 1e-3 if t.dtype == torch.bfloat16 else 1e-6  # numpy's float32 product vs torch's, then rounding
        assert row["rel_error"] == pytest.approx(err, abs=tol), (name, row, err)
        assert row["cosine"] == pytest.approx(cos, abs=tol), (name, row, cos)
        if name + ".lora_B" in arrays:
            assert row["storage"] == "lowrank" and report["tensors"][name]["storage"] == "lowrank"
            assert row["rank"] == report["tensors"][name]["rank"] == arrays[name + ".lora_B"].shape[1]
            ranks.append(row["rank"])
        elif name + ".indices" in arrays:
            assert row["storage"] == "sparse" and row["nnz"] == report["tensors"][name]["nnz"]
            assert row["nnz"] == arrays[name + ".indices"].size == np.count_nonzero(y) or row.get("bits")
            assert row.get("bits") == CASES[case].get("bits") == report["tensors"][name].get("bits")
        else:
            assert row["storage"] == "dense" and (row["rel_error"], row["cosine"]) == (0.0, 1.0)
            assert name not in report["tensors"]  # dense-stored tensors are left out of the record
    if case == "rank":
        assert info["tensors"]["model.layers.0.mlp.up.weight"]["rel_error"] < 1e-6  # exactly rank 3
        assert info["tensors"]["model.layers.0.mlp.up.bias"]["storage"] == "dense"  # 1-D
    if ranks:
        ranks.sort()
        assert info["ranks"] == {"min": ranks[0], "median": ranks[len(ranks) // 2], "max": ranks[-1]}
    before = sum(t.numel() * t.element_size() for t in v.values())
    after = sum(sizes.values())
    assert info["bytes_before"] == report["bytes_before"] == before == data_bytes(src)
    assert info["bytes_after"] == report["bytes_after"] == after == data_bytes(out)
    assert info["ratio"] == pytest.approx(after / before, rel=1e-12) and report["ratio"] == pytest.approx(
        after / before
    )
    assert info["ratio"] < 1
    assert info["rel_error"] == pytest.approx(np.sqrt(sums[1] / sums[0]), abs=1e-5)
    assert info["cosine"] == pytest.approx(sums[2] / np.sqrt(sums[0] * sums[3]), abs=1e-5)
    assert capmerge.compression_info(src) is None  # dense


def test_inspect_json_and_dense_view_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analysis, "CHUNK", 100)  # several blocks per tensor
    v = vector(1)
    capmerge.compress(save_single(tmp_path / "v.safetensors", v), tmp_path / "c.safetensors", rank=2)
    arrays, _, _ = stored(tmp_path / "c.safetensors")
    ck = capmerge.open_checkpoint(tmp_path / "c.safetensors")
    # every tensor's block source is opened once, and the previous one is released before the next is opened
    live: weakref.WeakSet[object] = weakref.WeakSet()
    calls: list[tuple[str, int]] = []

    def watch(name: str, load):  # type: ignore[no-untyped-def]
        def wrapped():  # type: ignore[no-untyped-def]
            gc.collect()
            calls.append((name, len(live)))
            t = load()
            live.add(t)
            return t

        return wrapped

    ck.blocks = {n: watch(n, f) for n, f in ck.blocks.items()}  # type: ignore[attr-defined]
    r = capmerge.inspect(ck, by="tensor")
    assert sorted(n for n, _ in calls) == sorted(v) and all(alive == 0 for _, alive in calls), calls
    inp = r["inputs"][0]
    assert inp["compression"] == json.loads(json.dumps(capmerge.compression_info(tmp_path / "c.safetensors")))
    (vec,) = r["vectors"]
    assert vec["dense_view_of"] == "lowrank"
    rows = {d["name"]: d for d in vec["tensors"]}
    sq = 0.0
    for name, t in v.items():
        y = dense_of(arrays, name, tuple(t.shape), t.dtype)
        sq += float(y @ y)
        assert rows[name]["l2"] == pytest.approx(np.linalg.norm(y), rel=1e-5), name
        assert rows[name]["max_abs"] == pytest.approx(np.abs(y).max(), rel=1e-5), name
        c = rows[name]["compression"]
        assert c["storage"] == inp["compression"]["tensors"][name]["storage"]
        if c["storage"] == "lowrank":
            assert c["rank"] == 2 and c["rel_error"] == inp["compression"]["tensors"][name]["rel_error"]
    assert vec["total"]["l2"] == pytest.approx(np.sqrt(sq), rel=1e-5)
    plain = capmerge.inspect(tmp_path / "v.safetensors")
    assert plain["inputs"][0]["compression"] is None and plain["vectors"][0]["dense_view_of"] is None
    assert "compression" not in plain["vectors"][0]["tensors"][0]


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_headers_only_reads_no_tensor_data(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    v = {f"model.layers.{i}.w": torch.randn(256, 32, generator=g) @ torch.randn(32, 256, generator=g) for i in range(3)}
    capmerge.compress(save_single(tmp_path / "v.safetensors", v), tmp_path / "c.safetensors", rank=32)
    size = (tmp_path / "c.safetensors").stat().st_size
    assert size > 190_000
    before = rchar()
    r = capmerge.inspect(tmp_path / "c.safetensors", headers_only=True)
    read = rchar() - before
    assert read < 32 * 1024, read
    c = r["inputs"][0]["compression"]
    assert c["ranks"] == {"min": 32, "median": 32, "max": 32} and c["ratio"] == pytest.approx(0.25)
    assert "vectors" not in r


def test_cli_compression_line_tensor_columns_and_json(tmp_path: Path) -> None:
    v = vector(2)
    save_single(tmp_path / "v.safetensors", v)
    assert main(["compress", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "c.safetensors"), "--rank", "3",
                 "-q"]) == 0  # fmt: skip
    info = capmerge.compression_info(tmp_path / "c.safetensors")
    assert info is not None
    r = runner.invoke(app, ["inspect", str(tmp_path / "c.safetensors"), "--by", "tensor", "--top", "0"])
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    line = next(x for x in out.splitlines() if x.strip().startswith("compression:"))
    arrays, _, _ = stored(tmp_path / "c.safetensors")
    n_low = sum(k.endswith(".lora_B") for k in arrays)
    assert n_low == 4  # all but the bias
    assert line.strip().startswith(f"compression: lowrank, rank 3, {n_low} of 5 tensors compressed") and (
        f"(ratio {info['ratio']:.3g})" in line and f"rel error {info['rel_error']:.4g}" in line
    ), line
    assert f"cosine {info['cosine']:.6f}" in line
    assert "statistics of the dense view τ̂ (lowrank)" in out
    assert "rank/nnz" in out and "rel error" in out
    q = next(x for x in out.splitlines() if "model.layers.1.attn.q.weight" in x)
    assert "lowrank" in q and f"{info['tensors']['model.layers.1.attn.q.weight']['rel_error']:.3g}" in q
    # long JSON header values are summarised, not dumped
    assert "capmerge.compression_report: <JSON object, 6 entries" in out and '"tensors":' not in out
    assert "capmerge.tensors: <JSON object, 5 entries" in out
    r = runner.invoke(app, ["inspect", "--json", str(tmp_path / "c.safetensors"), "--headers-only"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["inputs"][0]["compression"] == json.loads(json.dumps(info))
    assert main(["compress", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "s.safetensors"), "--density",
                 "0.1", "--bits", "8", "-q"]) == 0  # fmt: skip
    r = runner.invoke(app, ["inspect", str(tmp_path / "s.safetensors"), "--headers-only"])
    assert r.exit_code == 0 and "compression: sparse int8," in r.stdout and "entries kept" in r.stdout, r.stdout


def test_unreadable_record_is_reported_as_not_recorded(tmp_path: Path) -> None:
    v = vector(3)
    capmerge.compress(save_single(tmp_path / "v.safetensors", v), tmp_path / "c.safetensors", rank=2)
    arrays, meta, _ = stored(tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(raw, str(tmp_path / "bad.safetensors"), {**meta, "capmerge.compression_report": "{not json",
                                                        "capmerge.compression": "[1]"})  # fmt: skip
    info = capmerge.compression_info(tmp_path / "bad.safetensors")
    assert info is not None and info["recorded"] is False and info["options"] is None
    assert info["rel_error"] is None and info["cosine"] is None
    low = [n for n in v if n + ".lora_B" in arrays]
    assert low and all(info["tensors"][n]["rel_error"] is None for n in low)
    assert info["ranks"] == {"min": 2, "median": 2, "max": 2}  # the stored tensors' headers still say it
    r = runner.invoke(app, ["inspect", str(tmp_path / "bad.safetensors"), "--headers-only"])
    assert r.exit_code == 0 and "error not recorded" in r.stdout, r.stdout


# -- LoRA-derived low-rank vectors ---------------------------------------------------------------------------------
SHAPES = {"model.layers.0.q": (12, 8), "model.layers.0.v": (8, 12), "model.layers.1.q": (12, 8)}


def write_adapter(path: Path, modules: list[str], r: int, alpha: float, seed: int) -> dict[str, np.ndarray]:
    """A PEFT-format adapter written by hand; returns its ΔW = α/r·B·A per base weight name (float64 numpy)."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir()
    tensors, delta = {}, {}
    for m in modules:
        out_f, in_f = SHAPES[m]
        a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
        tensors[f"base_model.model.{m}.lora_A.weight"] = a
        tensors[f"base_model.model.{m}.lora_B.weight"] = b
        delta[m + ".weight"] = alpha / r * (b.double().numpy() @ a.double().numpy())
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                          "target_modules": ["q", "v"]}))  # fmt: skip
    return delta


@pytest.fixture
def lora(tmp_path: Path) -> dict[str, object]:
    d_sft = write_adapter(tmp_path / "sft", list(SHAPES), 2, 4.0, 1)
    d_aux = write_adapter(tmp_path / "aux", ["model.layers.0.q", "model.layers.0.v"], 3, 6.0, 2)  # not layers.1.q
    tau = {n: d_aux.get(n, 0.0) - d_sft[n] for n in d_sft}
    assert main(["diff", str(tmp_path / "sft"), str(tmp_path / "aux"), "-o", str(tmp_path / "tau.safetensors"),
                 "-q"]) == 0  # fmt: skip
    g = torch.Generator().manual_seed(3)
    other = {n + ".weight": torch.randn(s, generator=g) for n, s in SHAPES.items()}
    other["model.embed.weight"] = torch.randn(5, 4, generator=g)
    save_single(tmp_path / "other.safetensors", other, {"format": "pt", "capmerge.kind": "capability-vector"})
    return {"tau": tau, "other": {k: t.double().numpy() for k, t in other.items()}, "dir": tmp_path}


def cos(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.ravel(x), np.ravel(y)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_lora_tau_is_exact_low_rank_and_compares_against_dense(lora: dict) -> None:
    d, tau, other = lora["dir"], lora["tau"], lora["other"]
    info = capmerge.compression_info(d / "tau.safetensors")
    assert info is not None and info["exact"] is True and info["recorded"] is False and info["rel_error"] is None
    assert {n: t["rank"] for n, t in info["tensors"].items()} == {
        "model.layers.0.q.weight": 5, "model.layers.0.v.weight": 5, "model.layers.1.q.weight": 2}  # fmt: skip
    r = runner.invoke(app, ["inspect", str(d / "tau.safetensors"), "--headers-only"])
    assert r.exit_code == 0 and "compression: lowrank, ranks 2–5 (median 5)" in r.stdout, r.stdout
    assert "exact (LoRA factors)" in r.stdout
    for a_path, b_path, a_np, b_np in ((d / "tau.safetensors", d / "other.safetensors", tau, other),
                                        (d / "other.safetensors", d / "tau.safetensors", other, tau)):  # fmt: skip
        res = capmerge.inspect([a_path], against=b_path)
        (comp,) = res["comparisons"]
        rows = {t["name"]: t for t in comp["tensors"]}
        for n in tau:
            assert rows[n]["cos"] == pytest.approx(cos(a_np[n], b_np[n]), abs=1e-6), n
            assert rows[n]["ratio"] == pytest.approx(np.linalg.norm(a_np[n]) / np.linalg.norm(b_np[n]), rel=1e-6)
        names = list(other)
        fa = np.concatenate([np.ravel(a_np.get(n, np.zeros_like(other[n]))) for n in names])
        fb = np.concatenate([np.ravel(b_np.get(n, np.zeros_like(other[n]))) for n in names])
        assert comp["total"]["cos"] == pytest.approx(cos(fa, fb), abs=1e-6)
        lone = comp["only_in_b"] if b_np is other else comp["only_in_a"]
        assert lone == ["model.embed.weight"]
    # an adapter directory itself is a low-rank vector too
    ad = capmerge.compression_info(d / "sft")
    assert ad is not None and ad["exact"] and ad["ranks"] == {"min": 2, "median": 2, "max": 2}


def test_task_and_capability_from_lora_adapters(lora: dict) -> None:
    d, tau = lora["dir"], lora["tau"]
    g = torch.Generator().manual_seed(4)
    p = {n + ".weight": torch.randn(s, generator=g) for n, s in SHAPES.items()}
    p["model.norm.weight"] = torch.randn(8, generator=g)
    s = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in p.items()}
    save_single(d / "P.safetensors", p)
    save_single(d / "S.safetensors", s)
    r = runner.invoke(app, ["inspect", "--task", str(d / "P.safetensors"), str(d / "S.safetensors"),
                            "--capability", str(d / "sft"), str(d / "aux"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    cap_v, task_v = res["vectors"]
    assert cap_v["dense_view_of"] == "lowrank − lowrank" and task_v["dense_view_of"] is None
    task = {n: (s[n] - p[n]).double().numpy() for n in p}
    caps = {t["name"]: t for t in cap_v["tensors"]}
    assert set(caps) == set(tau)  # layers.1.q only in the sft adapter: ΔW_aux = 0 there, not skipped
    (comp,) = res["comparisons"]
    rows = {t["name"]: t for t in comp["tensors"]}
    for n, x in tau.items():
        assert caps[n]["l2"] == pytest.approx(np.linalg.norm(x), rel=1e-6), n
        assert rows[n]["cos"] == pytest.approx(cos(x, task[n]), abs=1e-6), n
    assert comp["only_in_b"] == ["model.norm.weight"]
    fa = np.concatenate([np.ravel(tau.get(n, np.zeros_like(task[n]))) for n in task])
    fb = np.concatenate([np.ravel(task[n]) for n in task])
    assert comp["total"]["cos"] == pytest.approx(cos(fa, fb), abs=1e-6)
    # the same capability vector, written by `capmerge diff` and compared with the dense task vector
    res2 = capmerge.inspect([d / "tau.safetensors"], against=d / "S.safetensors")
    assert res2["comparisons"][0]["tensors"][0]["name"] in tau
