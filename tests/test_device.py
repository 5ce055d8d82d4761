"""``--device`` / ``device=``: the dispatch rule, its errors, and the GPU paths of the engine and of the in-memory apply
giving exactly the CPU results.

Without a GPU, ``device="cuda"`` runs the Triton kernels in Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``), through the same engine code as on a GPU (chunking, streams, flags) minus pinned memory and
real CUDA streams; with a GPU these tests run it for real.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dependency on Linux x86-64 only")

from conftest import listing, load_any, model_tensors, perturb, save_single, tree_digest  # noqa: E402

import capmerge  # noqa: E402
from capmerge.cli import main  # noqa: E402
from capmerge.errors import UsageError  # noqa: E402
from capmerge.kernels.device import resolve_device  # noqa: E402

GPU = "cuda"  # the kernels: on the GPU, or interpreted on the CPU


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_any(a), load_any(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_resolve_device_rules() -> None:
    assert resolve_device("cpu") == "cpu"
    expect = "cpu" if not torch.cuda.is_available() else f"cuda:{torch.cuda.current_device()}"
    assert resolve_device("auto") == expect and resolve_device(None) == expect
    with pytest.raises(UsageError, match="invalid --device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(UsageError, match="invalid --device"):
        resolve_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_device_cuda_without_gpu_is_one_error_line_and_writes_nothing(
    ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")  # a plain machine without a GPU
    out = ckpts["tmp"] / "out"
    before = tree_digest(ckpts["P"])
    for args in (["apply", str(ckpts["P"]), str(ckpts["A"]), "-o", str(out)], ["diff", str(ckpts["S"]), str(ckpts["A"]),
                                                                                  "-o", str(out)]):  # fmt: skip
        assert main([*args, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert (
            err == "error: --device cuda asked for, but no CUDA GPU is available (torch.cuda.is_available() is False)\n"
        )
        assert not out.exists()
    assert tree_digest(ckpts["P"]) == before
    assert "out" not in listing(ckpts["tmp"])


def test_cpu_apply_does_not_import_triton(ckpts: dict[str, Path]) -> None:
    """The default (auto) on a machine without a GPU imports neither triton nor torch for a CPU apply."""
    if torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    code = (
        "import sys; from capmerge.cli import main;"
        f"rc = main(['apply', {str(ckpts['P'])!r}, '--add', {str(ckpts['A'])!r}, '--sub', {str(ckpts['S'])!r}, '-o', "
        f"{str(ckpts['tmp'] / 'o')!r}, '-q']);"
        "print(rc, 'triton' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["0", "False"], r.stdout + r.stderr


@pytest.fixture
def vecs(ckpts: dict[str, Path]) -> dict[str, Path]:
    """Two bf16 vectors and a float32 one over the base P (names and shapes of P)."""
    p = load_any(ckpts["P"])
    out = dict(ckpts)
    for i, dt in enumerate((torch.bfloat16, torch.bfloat16, torch.float32)):
        v = {k: (t.float() - p[k].float()).to(dt) if t.is_floating_point() else t
             for k, t in perturb(p, 10 + i, scale=0.2).items() if k != "position_ids"}  # fmt: skip
        out[f"V{i}"] = save_single(ckpts["tmp"] / f"v{i}.safetensors", v)
    return out


@pytest.mark.parametrize(
    "opts",
    [
        {"method": "ties", "density": 0.3, "weights": [1.0, 0.5, 0.7]},
        {"method": "dare_ties", "density": [0.5, 0.3, 0.8], "seed": 5},
        {"method": "breadcrumbs", "density": 0.6, "gamma": 0.05, "alpha": [0.5, 1.5]},
        {"method": "task_arithmetic", "sign": "frequency", "normalize": True, "dtype": "float16"},
    ],
)
def test_engine_on_the_kernels_writes_the_cpu_bytes(vecs: dict[str, Path], opts: dict) -> None:
    outs = {}
    for dev in ("cpu", GPU):
        tmpl = "{alpha}" if isinstance(opts.get("alpha"), list) else ""
        out = vecs["tmp"] / f"m-{dev}{tmpl}"
        s = capmerge.apply(vecs["P"], [vecs["V0"], vecs["V1"], vecs["V2"]], out, device=dev, **opts)
        outs[dev] = [Path(o) for o in s.outputs]
    for a, b in zip(outs["cpu"], outs[GPU], strict=True):
        assert_same_tensors(a, b)


def test_engine_diff_and_add_sub_on_the_kernels(ckpts: dict[str, Path]) -> None:
    t = ckpts["tmp"]
    for dev in ("cpu", GPU):
        capmerge.diff(ckpts["S"], ckpts["A"], t / f"v-{dev}.safetensors", device=dev, dtype="float32")
        capmerge.apply(ckpts["P"], [], t / f"m-{dev}", add=[ckpts["A"]], sub=[ckpts["S"]], alpha=0.5, device=dev,
                       method="dare_linear", density=0.5)  # fmt: skip
    assert_same_tensors(t / "v-cpu.safetensors", t / f"v-{GPU}.safetensors")
    assert_same_tensors(t / "m-cpu", t / f"m-{GPU}")


def test_cli_device_option(ckpts: dict[str, Path]) -> None:
    t = ckpts["tmp"]
    for dev in ("cpu", GPU):
        assert main(["apply", str(ckpts["P"]), "--add", str(ckpts["A"]), "-o", str(t / f"c-{dev}"), "--device", dev,
                     "--method", "ties", "--density", "0.5", "-q"]) == 0  # fmt: skip
    assert_same_tensors(t / "c-cpu", t / f"c-{GPU}")
    assert main(["apply", str(ckpts["P"]), "--add", str(ckpts["A"]), "-o", str(t / "bad"), "--device", "tpu"]) == 2
    assert not (t / "bad").exists()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_apply_to_state_dict_on_the_kernels(tmp_path: Path, method: str) -> None:
    base = model_tensors(0, torch.bfloat16)
    base = {k: v for k, v in base.items() if v.is_floating_point()}
    base["layers.0.attn.weight"] = base["layers.0.attn.weight"].float()  # mixed dtypes
    v1 = {k: (t.float() - base[k].float()).to(torch.bfloat16) for k, t in perturb(base, 3, 0.3).items()}
    v2 = {k: (t.float() - base[k].float()) for k, t in perturb(base, 4, 0.3).items()}
    results = {}
    for dev in ("cpu", GPU):
        sd = {k: v.clone() for k, v in base.items()}
        capmerge.apply_to_state_dict(sd, [v1, v2], alpha=0.7, method=method, density=0.4, weights=[1.0, 0.6],
                                     seed=9, device=dev)  # fmt: skip
        results[dev] = sd
    for k in base:
        assert results["cpu"][k].dtype == base[k].dtype
        assert torch.equal(results["cpu"][k], results[GPU][k]), k
