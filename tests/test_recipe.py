"""YAML recipes: the shipped recipes run on tiny checkpoints, caching, overrides, and every validation error."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_any, model_tensors, perturb, save_sharded, save_single, tree_digest
from typer.testing import CliRunner

import capmerge
from capmerge.cli import app
from capmerge.recipes.recipe import load, shipped
from capmerge.recipes.schema import RecipeError

runner = CliRunner()
SHIPPED = ["capvector", "capvector-llm-only", "dare-sweep", "ties-multi"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


@pytest.fixture
def ck(tmp_path: Path) -> dict:
    """float32 P (sharded), S, A, A2 — with 1 MiB of extra data so that reading it shows in /proc/self/io."""
    p = model_tensors(0, torch.float32)
    p["layers.2.big.weight"] = torch.randn(512, 512, generator=torch.Generator().manual_seed(9))
    s, a, a2 = perturb(p, 1), None, None
    a, a2 = perturb(s, 2), perturb(s, 3)
    return {
        "P": save_sharded(tmp_path / "P", p, 2),
        "S": save_single(tmp_path / "S" / "model.safetensors", s).parent,
        "A": save_single(tmp_path / "A.safetensors", a),
        "A2": save_single(tmp_path / "A2.safetensors", a2),
        "t": {"P": p, "S": s, "A": a, "A2": a2},
        "tmp": tmp_path,
    }


def _vars(ck: dict, out: Path, **extra: object) -> dict[str, object]:
    return {"pretrained": str(ck["P"]), "sft": str(ck["S"]), "aux": str(ck["A"]), "out": str(out), **extra}


def test_shipped_recipes_are_packaged_and_valid() -> None:
    assert sorted(shipped()) == SHIPPED
    for name in SHIPPED:
        r = load(name, require_values=False)
        assert r.steps and r.description
        text = shipped()[name].read_text()
        assert text.startswith(f"# capmerge run {name}.yaml "), name  # the run command in the header
        res = runner.invoke(app, ["recipes", "validate", name])
        assert res.exit_code == 0 and res.stdout.startswith("ok: "), res.stderr


def test_capvector_recipe(ck: dict) -> None:
    out = ck["tmp"] / "run"
    res = capmerge.run_recipe("capvector", **_vars(ck, out, alpha=0.7))
    assert [(s["step"], s["status"]) for s in res["steps"]] == [("capvector", "ran"), ("report", "ran"),
                                                                ("merged", "ran")]  # fmt: skip
    t = ck["t"]
    merged = load_any(out / "merged")
    for name, p in t["P"].items():
        if not p.is_floating_point():
            assert torch.equal(merged[name], p)
            continue
        tau = _np(t["A"][name]) - _np(t["S"][name])
        np.testing.assert_allclose(_np(merged[name]), _np(p) + np.float32(0.7) * tau, rtol=1e-6, atol=1e-6)
    report = json.loads((out / "inspect.json").read_text())
    names = [n for n, v in t["P"].items() if v.is_floating_point()]
    x = np.concatenate([(_np(t["A"][n]) - _np(t["S"][n])).ravel() for n in names]).astype(np.float64)
    y = np.concatenate([(_np(t["S"][n]) - _np(t["P"][n])).ravel() for n in names]).astype(np.float64)
    want = x @ y / np.linalg.norm(x) / np.linalg.norm(y)
    assert report["comparisons"][0]["total"]["cos"] == pytest.approx(want, abs=1e-6)


def _rchar() -> int:
    return int(next(ln.split()[1] for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("rchar")))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_cache_reuses_unchanged_steps_and_reruns_dependents(ck: dict) -> None:
    out = ck["tmp"] / "run"
    first = capmerge.run_recipe("capvector", **_vars(ck, out))
    merged_digest = tree_digest(out / "merged")
    input_bytes = sum(f.stat().st_size for d in (ck["P"], ck["S"]) for f in Path(d).glob("*.safetensors"))
    before = _rchar()
    second = capmerge.run_recipe("capvector", **_vars(ck, out))
    read = _rchar() - before
    assert [s["status"] for s in second["steps"]] == ["cached"] * 3
    assert read < input_bytes / 10, (read, input_bytes)  # headers of nothing, tensors of nothing: only stamps
    assert tree_digest(out / "merged") == merged_digest
    assert second["steps"][2]["result"] == first["steps"][2]["result"]
    # Only the last step's option changed: only it runs again.
    third = capmerge.run_recipe("capvector", **_vars(ck, out, alpha=0.25))
    assert [s["status"] for s in third["steps"]] == ["cached", "cached", "ran"]
    np.testing.assert_allclose(
        _np(load_any(out / "merged")["embed.weight"]),
        _np(ck["t"]["P"]["embed.weight"]) + np.float32(0.25) * (_np(ck["t"]["A"]["embed.weight"]) -
                                                                 _np(ck["t"]["S"]["embed.weight"])),
        rtol=1e-6, atol=1e-6,
    )  # fmt: skip
    # A new AUX checkpoint: the diff, the report and the merge that depends on the diff all run again.
    a = perturb(ck["t"]["S"], 7)
    save_single(Path(ck["A"]), a)
    fourth = capmerge.run_recipe("capvector", **_vars(ck, out, alpha=0.25))
    assert [s["status"] for s in fourth["steps"]] == ["ran", "ran", "ran"]
    tau = _np(a["embed.weight"]) - _np(ck["t"]["S"]["embed.weight"])
    np.testing.assert_allclose(
        _np(load_any(out / "merged")["embed.weight"]),
        _np(ck["t"]["P"]["embed.weight"]) + np.float32(0.25) * tau,
        rtol=1e-6,
        atol=1e-6,
    )
    # An output deleted behind the runner's back is rebuilt; --rerun runs everything.
    os.unlink(out / "inspect.json")
    fifth = capmerge.run_recipe("capvector", **_vars(ck, out, alpha=0.25))
    assert [s["status"] for s in fifth["steps"]] == ["cached", "ran", "cached"]
    sixth = capmerge.run_recipe("capvector", rerun=True, **_vars(ck, out, alpha=0.25))
    assert [s["status"] for s in sixth["steps"]] == ["ran"] * 3


def _vla(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = [
        "language_model.model.layers.0.self_attn.q_proj.weight",  # OpenVLA (Prismatic)
        "language_model.lm_head.weight",
        "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
        "projector.fc1.weight",
        "model.paligemma_with_expert.paligemma.language_model.model.layers.0.mlp.up_proj.weight",  # π0
        "model.paligemma_with_expert.paligemma.vision_tower.vision_model.encoder.layers.0.fc1.weight",
        "model.paligemma_with_expert.gemma_expert.model.layers.0.mlp.up_proj.weight",
        "model.action_in_proj.weight",
    ]
    if base is None:
        return {n: torch.randn(6, 4, generator=g) for n in names}
    return {n: v + 0.1 * torch.randn(6, 4, generator=g) for n, v in base.items()}


def test_llm_only_recipe_touches_only_the_language_backbone(tmp_path: Path) -> None:
    p = _vla(0)
    s, a = _vla(1, p), _vla(2, p)
    paths = {k: save_single(tmp_path / f"{k}.safetensors", v) for k, v in (("P", p), ("S", s), ("A", a))}
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", "capvector-llm-only", f"pretrained={paths['P']}", f"sft={paths['S']}",
                            f"aux={paths['A']}", f"out={out}", "alpha=0.5", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    merged = load_any(out / "merged")
    llm = {"language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight",
           "model.paligemma_with_expert.paligemma.language_model.model.layers.0.mlp.up_proj.weight"}  # fmt: skip
    for n, v in p.items():
        if n in llm:
            np.testing.assert_allclose(_np(merged[n]), _np(v) + np.float32(0.5) * (_np(a[n]) - _np(s[n])), rtol=1e-6,
                                       atol=1e-6)  # fmt: skip
        else:
            assert torch.equal(merged[n], v), n


def test_ties_and_dare_sweep_recipes_match_direct_calls(ck: dict) -> None:
    out = ck["tmp"] / "ties"
    capmerge.run_recipe("ties-multi", pretrained=str(ck["P"]), sft=str(ck["S"]), aux1=str(ck["A"]),
                        aux2=str(ck["A2"]), out=str(out), weights=[0.6, 0.4], density=0.4)  # fmt: skip
    capmerge.diff(ck["S"], ck["A"], ck["tmp"] / "v1.safetensors")
    capmerge.diff(ck["S"], ck["A2"], ck["tmp"] / "v2.safetensors")
    capmerge.apply(ck["P"], [ck["tmp"] / "v1.safetensors", ck["tmp"] / "v2.safetensors"], ck["tmp"] / "ref",
                   method="ties", density=0.4, weights=[0.6, 0.4])  # fmt: skip
    got, want = load_any(out / "merged"), load_any(ck["tmp"] / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not all(torch.equal(got[k], ck["t"]["P"][k]) for k in got)
    out = ck["tmp"] / "dare"
    r = runner.invoke(app, ["run", "dare-sweep", *[f"{k}={v}" for k, v in _vars(ck, out).items()],
                            "alphas=[0.5, 1.0]", "densities=[0.3,0.6]", "seed=3", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    sweep = json.loads(r.stdout)["steps"][1]
    assert sorted(sweep["outputs"]) == sorted(f"{out}/a{a}_d{d}" for a in ("0.5", "1.0") for d in ("0.3", "0.6"))
    for alpha in (0.5, 1.0):
        for density in (0.3, 0.6):
            ref = ck["tmp"] / f"ref-{alpha}-{density}"
            capmerge.apply(ck["P"], ck["tmp"] / "v1.safetensors", ref, method="dare_linear", alpha=alpha,
                           density=density, seed=3)  # fmt: skip
            got, want = load_any(out / f"a{alpha}_d{density}"), load_any(ref)
            assert all(torch.equal(got[k], want[k]) for k in want), (alpha, density)


def test_plan_prints_resolved_steps_and_writes_nothing(ck: dict) -> None:
    out = ck["tmp"] / "run"
    args = ["run", "capvector", *[f"{k}={v}" for k, v in _vars(ck, out).items()], "alpha=0.6", "--plan"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert "merged           apply    will run" in r.stdout and "alpha: 0.6" in r.stdout
    assert f'vectors: ["{out}/work/capvector.safetensors"]' in r.stdout
    assert not out.exists()
    r = runner.invoke(app, [*args, "--json"])
    plan = json.loads(r.stdout)
    assert [s["status"] for s in plan["steps"]] == ["will run"] * 3 and plan["variables"]["alpha"] == 0.6


def test_recipes_list_show_copy(tmp_path: Path) -> None:
    r = runner.invoke(app, ["recipes", "list"])
    assert r.exit_code == 0 and all(name in r.stdout for name in SHIPPED)
    r = runner.invoke(app, ["recipes", "show", "ties-multi"])
    assert r.exit_code == 0 and "method: ties" in r.stdout
    r = runner.invoke(app, ["recipes", "copy", "capvector", str(tmp_path)])
    assert r.exit_code == 0 and (tmp_path / "capvector.yaml").read_text() == shipped()["capvector"].read_text()
    r = runner.invoke(app, ["recipes", "copy", "capvector", str(tmp_path)])
    assert r.exit_code == 2 and "destination exists (use --force to replace it)" in r.stderr
    r = runner.invoke(app, ["recipes", "show", "nope"])
    assert r.exit_code == 2 and r.stderr.startswith("error: no shipped recipe named 'nope'")


BASE = """\
vars:
  src: {src}
  alpha: 0.5
steps:
  vec:
    op: diff
    base: ${{src}}
    aux: ${{src}}
  merged:
    op: apply
    base: ${{src}}
    vectors: ["${{steps.vec}}"]
    alpha: ${{alpha}}
"""


@pytest.mark.parametrize(
    "edit, line, key, message",
    [
        (("  alpha: 0.5\n", "  alpha: 0.5\nbogus: 1\n"), 4, "bogus", "unknown key 'bogus'"),
        (("    alpha: ${alpha}\n", "    alpah: 0.5\n"), 13, "steps.merged.alpah", "unknown key 'alpah' for op apply"),
        (("  alpha: 0.5\n", "  alpha: high\n"), 13, "steps.merged.alpha", "alpha: expected a number or a list"),
        (("    aux: ${src}\n", "    aux: missing/file.safetensors\n"), 8, "steps.vec.aux", "input does not exist"),
        (("    alpha: ${alpha}\n", "    method: tie\n"), 13, "steps.merged.method", "unknown method 'tie'"),
        (("    aux: ${src}\n", '    aux: "${steps.merged}"\n'), 5, "steps.vec", "cycle (vec -> merged -> vec)"),
        (("    alpha: ${alpha}\n", "    alpha: ${beta}\n"), 13, "steps.merged.alpha", "undefined variable ${beta}"),
        (("    op: diff\n", "    op: dif\n"), 6, "steps.vec.op", "unknown op 'dif'"),
        (("    aux: ${src}\n", ""), 5, "steps.vec.aux", "missing key 'aux' for op diff"),
        (("steps.vec}", "steps.veq}"), 12, "steps.merged.vectors", "${steps.veq} names no step"),
        (("  alpha: 0.5\n", "  alpha: 0.5\n  alpha: 1\n"), 4, "", "duplicate key 'alpha' (first at line 3)"),
        (("    op: diff\n", "    op: [diff\n"), 7, "", "invalid YAML"),
        (("  alpha: 0.5\n", "  alpha: null\n"), 3, "vars.alpha", "variable 'alpha' has no value"),
        (('["${steps.vec}"]', '["x${steps.vec}"]'), 12, "steps.merged.vectors[0]", "must be the whole value"),
        (("    alpha: ${alpha}\n", "    include: '(('\n"), 13, "steps.merged.include", "invalid regex '(('"),
        (("    alpha: ${alpha}\n", "    normalize: yes please\n"), 13, "steps.merged.normalize", "true or false"),
        (("    alpha: ${alpha}\n", "    layers: 7-3\n"), 13, "steps.merged.layers", "runs backwards"),
    ],
)
def test_validation_errors_name_file_line_and_key(tmp_path: Path, edit, line, key, message) -> None:
    src = save_single(tmp_path / "m.safetensors", {"w": torch.ones(3)})
    text = BASE.format(src=src)
    assert edit[0] in text, edit
    path = tmp_path / "r.yaml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["recipes", "validate", str(path)], ["run", str(path), "--workdir", str(tmp_path / "w")]):
        if args[0] == "recipes" and "has no value" in message:
            continue  # validate accepts unset variables (it reports what needs a value)
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        first = r.stderr.splitlines()[0]
        assert first.startswith("error: ") and message in first, first
        assert first.endswith(f"({path}:{line}: {key})" if key else f"({path}:{line})"), first
        assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_overrides_and_library_errors(tmp_path: Path, ck: dict) -> None:
    with pytest.raises(RecipeError) as e:
        capmerge.run_recipe("capvector", **_vars(ck, tmp_path / "o"), alpah=0.3)
    assert "unknown variable 'alpah' given on the command line" in str(e.value)
    vars_line = shipped()["capvector"].read_text().splitlines().index("vars:") + 1
    assert e.value.where.endswith(f"capvector.yaml:{vars_line}: vars")
    with pytest.raises(RecipeError) as e:
        capmerge.run_recipe("capvector", out=str(tmp_path / "o"))
    assert len(e.value.errors) == 3 and all("has no value" in w for w, _ in e.value.errors)
    r = runner.invoke(app, ["run", "capvector", "alpha"])
    assert r.exit_code == 2 and r.stderr == "error: invalid override 'alpha' (expected name=value)\n"
    assert not (tmp_path / "o").exists()


def test_compress_and_push_steps_validate_their_schema(tmp_path: Path) -> None:
    src = save_single(tmp_path / "m.safetensors", {"w": torch.ones(3)})
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""\
        steps:
          small:
            op: compress
            vector: {src}
            rank: 4
            energy: high
          up:
            op: push
            path: "${{steps.small}}"
            private: true
        """))  # fmt: skip
    r = runner.invoke(app, ["recipes", "validate", str(path)])
    assert r.exit_code == 2
    lines = r.stderr.splitlines()
    assert lines[0] == f"error: energy: expected a number, got 'high' ({path}:6: steps.small.energy)"
    assert lines[1] == f"error: missing key 'repo_id' for op push ({path}:7: steps.up.repo_id)"
    path.write_text(path.read_text().replace("high", "0.9").replace("private: true", "repo_id: me/vec"))
    r = runner.invoke(app, ["recipes", "validate", str(path)])
    assert r.exit_code == 0 and "2 steps (small, up)" in r.stdout


def test_compress_step_writes_an_exact_low_rank_vector(tmp_path: Path) -> None:
    """diff → compress (rank 2) on a τ of rank exactly 2: the compressed vector reads back as τ (numpy)."""
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(24, 2, generator=g), torch.randn(2, 16, generator=g)
    s_w = torch.randn(24, 16, generator=g)
    s = save_single(tmp_path / "s.safetensors", {"w": s_w, "b": torch.zeros(16)})
    a = save_single(tmp_path / "a.safetensors", {"w": s_w + u @ v, "b": torch.ones(16)})
    path = tmp_path / "r.yaml"
    path.write_text(f"steps:\n  vec:\n    op: diff\n    base: {s}\n    aux: {a}\n    dtype: float32\n"
                    '  small:\n    op: compress\n    vector: "${steps.vec}"\n    rank: 2\n')  # fmt: skip
    res = capmerge.run_recipe(path, workdir=tmp_path / "w")
    out = [st for st in res["steps"] if st["step"] == "small"][0]["outputs"][0]
    view = capmerge.open_checkpoint(out)
    assert view.kind == "lowrank"
    want = _np(s_w + u @ v) - _np(s_w)
    got = view.read_tensor("w").numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    np.testing.assert_array_equal(view.read_tensor("b").numpy(), np.ones(16, np.float32))


MERGE_RECIPE = """\
vars:
  sft: null
  aux: null
  aux2: null
  w: 0.75
steps:
  vec:
    op: diff
    base: ${sft}
    aux: ${aux}
  blend:
    op: merge
    models: ["${aux}", "${aux2}"]
    method: linear
    parameters: {weights: ["${w}", 0.25]}
    dtype: float32
  final:
    op: apply
    base: ${steps.blend}
    vectors: ["${steps.vec}"]
    alpha: 0.5
"""


def test_merge_step_merges_models_and_feeds_later_steps(ck: dict) -> None:
    """A merge step runs a model-centric method (capmerge.merge_models) on models, its output a model directory that
    later steps take; its parameters are part of its key (a new weight re-runs it and what depends on it)."""
    recipe = ck["tmp"] / "m.yaml"
    recipe.write_text(MERGE_RECIPE)
    out = ck["tmp"] / "work"
    names = {"sft": str(ck["S"]), "aux": str(ck["A"]), "aux2": str(ck["A2"])}
    first = capmerge.run_recipe(str(recipe), workdir=str(out), **names)
    assert [s["status"] for s in first["steps"]] == ["ran"] * 3
    t = ck["t"]
    for w in (0.75, 0.5):
        if w != 0.75:
            again = capmerge.run_recipe(str(recipe), workdir=str(out), w=w, **names)
            assert [s["status"] for s in again["steps"]] == ["cached", "ran", "ran"]
        blend, final = load_any(out / "blend"), load_any(out / "final")
        for n in ("embed.weight", "layers.2.big.weight"):
            want = (np.float32(w) * _np(t["A"][n]) + np.float32(0.25) * _np(t["A2"][n])) / np.float32(w + 0.25)
            np.testing.assert_allclose(_np(blend[n]), want, rtol=1e-6, atol=1e-6)
            tau = _np(t["A"][n]) - _np(t["S"][n])
            np.testing.assert_allclose(_np(final[n]), _np(blend[n]) + np.float32(0.5) * tau, rtol=1e-6, atol=1e-6)
    assert [s["status"] for s in capmerge.run_recipe(str(recipe), workdir=str(out), w=0.5, **names)["steps"]] == [
        "cached"
    ] * 3


def test_merge_step_parameters_are_checked_before_anything_runs(tmp_path: Path, ck: dict) -> None:
    """Names, per-model counts and the method are checked against the method, each with its file:line."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"steps:\n  a:\n    op: merge\n    models: [{ck['A']}, {ck['A2']}]\n    method: ties\n"
                      f"    base: {ck['S']}\n    parameters:\n      weights: [0.5, 0.3, 0.2]\n      densty: 0.5\n"
                      f"  b:\n    op: merge\n    models: [{ck['A']}]\n    method: slerpp\n"
                      "  c:\n    op: merge\n    models: ['${steps.a}']\n"
                      "    parameters: {weight: [1, 2], t: 1}\n")  # fmt: skip
    with pytest.raises(RecipeError) as e:
        load(str(recipe))
    got = [(what, where) for what, where in e.value.errors]
    assert got == [
        ("weight has 3 values for 2 models", f"{recipe}:8: steps.a.parameters.weights"),
        ("ties has no parameter 'densty' (it takes: normalize, rescale, lambda, int8_mask, weight, density)",
         f"{recipe}:9: steps.a.parameters.densty"),
        (next(w for w, _ in got if w.startswith("unknown merge method 'slerpp'")), f"{recipe}:13: steps.b.method"),
        # models from another step: their count is known when it runs, the names now
        ("linear has no parameter 't' (it takes: normalize, weight)", f"{recipe}:17: steps.c.parameters.t"),
    ]  # fmt: skip
    assert not (tmp_path / "capmerge-work").exists()
