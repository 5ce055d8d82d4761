"""``capmerge merge`` and the checks of mergekit configurations (``capmerge run CONFIG.yml``): hand-computed values,
parameters checked against the registry, and every bad input as one ``error:`` line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_any, save_sharded, save_single

from capmerge.cli import main
from capmerge.merge.methods import registry
from capmerge.merge.methods.models import ModelMethod
from capmerge.merge.model_params import Cond, check_setting, evaluate, layer_t

SHAPES = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,), "lm_head.weight": (8, 4)}
for _i in range(3):
    SHAPES.update(
        {f"model.layers.{_i}.mlp.up_proj.weight": (6, 4), f"model.layers.{_i}.self_attn.q_proj.weight": (4, 4)}
    )


def make(d: Path, seed: int, *, sharded: bool = False, extra: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    t = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    t["model.pos_ids"] = torch.arange(4)
    t.update(extra or {})
    if sharded:
        save_sharded(d, t)
    else:
        save_single(d / "model.safetensors", t)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    return d


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {"A": make(tmp_path / "A", 1), "B": make(tmp_path / "B", 2, sharded=True), "P": make(tmp_path / "P", 3)}


def _lerp(x):  # a test method with a base and a global parameter: base + t·(mean of the models − base)
    t = float(x.params["t"])
    return x.base + t * (sum(x.models) / len(x.models) - x.base)


@pytest.fixture
def lerp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.MODEL_METHODS, "test_lerp",
                        ModelMethod("test_lerp", _lerp, base="required", params={"t": None}))  # fmt: skip


def tree(p: Path) -> list[tuple[str, int]]:
    return sorted((str(f.relative_to(p)), f.stat().st_size) for f in p.rglob("*"))


def fails(args: list[str], tmp: Path, capsys: pytest.CaptureFixture[str], *expect: str) -> str:
    """One error line holding every ``expect``, exit 2, nothing written."""
    before = tree(tmp)
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for e in expect:
        assert e in lines[0], lines[0]
    assert tree(tmp) == before
    return lines[0]


def test_linear_weights_and_override(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["merge", str(models["A"]), str(models["B"]), "--weights", "0.75,0.25", "--override",
                 "mlp:weight=0.5/0.5", "--override", "mlp|q_proj:weight=0/1", "-o", str(out), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    got, a, b = load_any(out), load_any(models["A"]), load_any(models["B"])
    for n in SHAPES:
        wa, wb = (0.5, 0.5) if "mlp" in n else (0.0, 1.0) if "q_proj" in n else (0.75, 0.25)
        assert torch.allclose(got[n], wa * a[n] + wb * b[n], atol=1e-6), n
    assert torch.equal(got["model.pos_ids"], a["model.pos_ids"])  # not floating: copied from the first model
    assert {"config.json", "README.md", "capmerge.json"} <= {p.name for p in out.iterdir()}
    assert "capmerge merge" in (out / "README.md").read_text()


def test_base_method_gradient_param_dtype_and_shards(models, lerp, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["--method", "test_lerp", "--param", "t=0,1", "--dtype", "bfloat16", "--shard-size", "200B"]
    code = main(["merge", str(models["A"]), str(models["B"]), "--base", str(models["P"]), *args, "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    got, a, b, p = (load_any(x) for x in (out, models["A"], models["B"], models["P"]))
    for n in SHAPES:
        layer = int(n.split(".")[2]) if ".layers." in n else None
        t = 0.0 if layer is None else layer / 2  # 3 layers: t = 0, 0.5, 1; outside the layers: the first value
        want = (p[n] + t * ((a[n] + b[n]) / 2 - p[n])).to(torch.bfloat16)
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want), n


def test_single_file_output(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(models["A"]), str(models["B"]), "--weights", "1", "-o", str(out), "--quiet"]) == 0
    got, a, b = load_any(out), load_any(models["A"]), load_any(models["B"])
    assert torch.allclose(got["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2)


def test_side_files_follow_the_copy_rules_of_apply(models, tmp_path: Path, capsys) -> None:
    """Tokenizer and generation config come from the first model, as apply copies side files: a regular file or a
    symlink inside the checkpoint is copied byte for byte; a symlink leading outside it is not (warning line,
    files_skipped in --json)."""
    a = models["A"]
    secret = tmp_path / "secret.txt"
    secret.write_text("not the checkpoint's")
    (a / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    (a / "vocab.txt").symlink_to(secret)  # leads outside A/
    (a / "real_tokenizer.json").write_text('{"version": "1.0"}')
    (a / "tokenizer.json").symlink_to("real_tokenizer.json")  # stays inside A/
    out = tmp_path / "out"
    assert main(["merge", str(a), str(models["B"]), "--weights", "1", "-o", str(out), "--json"]) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 8}'
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}' and not (out / "tokenizer.json").is_symlink()
    assert not (out / "vocab.txt").exists()
    assert "vocab.txt" in summary["files_skipped"] and str(secret.resolve()) in summary["files_skipped"]["vocab.txt"]
    assert any(ln.startswith("warning:") and "vocab.txt" in ln for ln in cap.err.splitlines()), cap.err


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--t", "0.3"], ["linear has no parameter 't'", "--t"]),
        (["--weights", "1,2,3"], ["weight has 3 values for 2 models"]),
        ([], ["linear needs weight for every model (one value, or one per model): pass --weights W"]),
        (["--method", "slerp"], ["slerp needs t (one value, or a gradient): pass --t T"]),
        (["--weights", "1", "--method", "nope"], ["unknown merge method 'nope'"]),
        (["--weights", "1", "--override", "(:weight=1"], ["invalid regex"]),
        (["--weights", "1", "--override", "mlp:density=1"], ["linear has no parameter 'density'"]),
        (["--weights", "x"], ["weight: invalid number 'x'"]),
        # nan and inf: refused as a configuration's values are, before anything is read (they ran, or failed late)
        (["--weights", "0.5,nan"], ["weight: invalid number 'nan' (expected a finite number)"]),
        (["--weights", "1", "--method", "ties", "--density", "inf"], ["density: invalid number 'inf'"]),
        (["--weights", "1", "--override", "mlp:weight=-inf"], ["weight: invalid number '-inf'"]),
        (["--weights", "1", "--normalize", "--param", "normalize=maybe"], ["expected true or false"]),
        # a method parameter spelled as an option: how to pass it
        (["--method", "karcher", "--max-iter", "3"], ["No such option: --max-iter", "--param max_iter=VALUE"]),
    ],
)
def test_merge_bad_options(models, tmp_path: Path, capsys, extra: list[str], expect: list[str]) -> None:
    fails(["merge", models["A"], models["B"], *extra, "-o", tmp_path / "out"], tmp_path, capsys, *expect)


def test_merge_bad_inputs(models, lerp, tmp_path: Path, capsys) -> None:
    a, b = models["A"], models["B"]
    fails(["merge", a, tmp_path / "nope", "--weights", "1", "-o", tmp_path / "o"], tmp_path, capsys, "nope")
    fails(["merge", a, b, "--method", "test_lerp", "--t", "1", "-o", tmp_path / "o"], tmp_path, capsys,
          "needs a base model")  # fmt: skip
    short = make(tmp_path / "S", 4)
    (short / "model.safetensors").unlink()
    make(short, 4, extra={"model.norm.weight": torch.ones(5)})
    fails(["merge", a, short, "--weights", "1", "-o", tmp_path / "o"], tmp_path, capsys, "shape mismatch",
          "model.norm.weight")  # fmt: skip
    (tmp_path / "o").mkdir()
    fails(["merge", a, b, "--weights", "1", "-o", tmp_path / "o"], tmp_path, capsys, "output exists")
    # the base among MODELS with one weight per other model: say that the base is not one of the merged models
    fails(["merge", a, a, b, "--base", a, "--method", "ties", "--weights", "0.6,0.3", "--density", "0.5", "-o",
           tmp_path / "o2"], tmp_path, capsys, "weight has 2 values for 3 models",
          f"({a} is the base: the base model is not merged as one of MODELS, leave it out of them)")  # fmt: skip


def write(tmp: Path, text: str) -> Path:
    p = tmp / "cfg.yml"
    p.write_text(text)
    return p


def base_config(models: dict[str, Path]) -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {models['A']}\n    parameters:\n      weight: 0.5\n"
            f"  - model: {models['B']}\n    parameters:\n      weight: 0.5\ndtype: float32\n")  # fmt: skip


@pytest.mark.parametrize(
    "edit,expect",
    [
        (lambda t: t + "foo: 1\n", ["unknown key 'foo'", "cfg.yml:10: foo"]),
        (
            lambda t: t.replace("weight: 0.5\n  -", "weight: 0.5\n      wieght: 1\n  -"),
            ["linear has no parameter 'wieght'", "cfg.yml:6: models[0].parameters.wieght"],
        ),
        (lambda t: t.replace("weight: 0.5\n  -", "weight: abc\n  -"), ["weight: expected a number", "cfg.yml:5"]),
        (
            lambda t: t + "tokenizer:\n  source: base\n",
            ["tokenizer.source: base needs a base_model", "cfg.yml:11: tokenizer.source"],
        ),
        (
            lambda t: t + "tokenizer:\n  source: union\n  pad_to_multiple_of: 8.5\n",
            ["pad_to_multiple_of must be a positive integer, got 8.5", "cfg.yml:12: tokenizer.pad_to_multiple_of"],
        ),
        (
            lambda t: t + "tokenizer:\n  tokens: [x]\n",
            ["expected a mapping of tokens", "cfg.yml:11: tokenizer.tokens"],
        ),
        (lambda t: t + "tokenizer:\n  sourc: base\n", ["unknown key 'sourc'", "cfg.yml:11: tokenizer.sourc"]),
        (
            lambda t: t + "tokenizer_source: base\ntokenizer:\n  source: base\n",
            ["give tokenizer_source or tokenizer:, not both", "cfg.yml:11: tokenizer"],
        ),
        (
            lambda t: t + "tokenizer:\n  source: union\n",
            ["union:", "has no readable tokenizer.json to read its tokens", "cfg.yml:11: tokenizer.source"],
        ),
        (
            lambda t: t + "tokenizer_source: union\n",
            ["union:", "has no readable tokenizer.json to read its tokens", "cfg.yml:10: tokenizer_source"],
        ),
        (
            lambda t: t.replace("merge_method: linear", "merge_method: lienar"),
            ["unknown merge_method 'lienar'", "cfg.yml:1"],
        ),
        (lambda t: t + "modules: {}\n", ["modules:) are not supported", "cfg.yml:10"]),
        (lambda t: t.replace("dtype: float32", "dtype: float8"), ["unsupported dtype 'float8'", "cfg.yml:9"]),
        (
            lambda t: t + "chat_template: chatmll\n",
            ["chat_template 'chatmll'", "alpaca, chatml, exaone, llama3, mistral", "cfg.yml:10"],
        ),
        (lambda t: t + "parameters: {x: 1}\n", ["linear has no parameter 'x'", "cfg.yml:10: parameters.x"]),
        (
            lambda t: t.replace("parameters:\n      weight: 0.5\ndtype", "parameters: {}\ndtype"),
            ["missing parameter weight for model", "cfg.yml:6: models[1].model"],
        ),
        (lambda t: t.replace("/B\n", "/nope\n"), ["no such file or directory", "cfg.yml:6: models[1].model"]),
        (lambda t: t + "slices: []\n", ["give exactly one of models or slices"]),
        (lambda t: t + "bad: [\n", ["invalid YAML", "cfg.yml:"]),
    ],
)
def test_config_errors(models, tmp_path: Path, capsys, edit, expect: list[str]) -> None:
    cfg = write(tmp_path, edit(base_config(models)))
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys, *expect)


def test_config_slice_and_tensor_errors(models, tmp_path: Path, capsys) -> None:
    a, b = models["A"], models["B"]
    src = "        parameters: {weight: 1}\n"
    head = f"merge_method: linear\nslices:\n  - sources:\n      - model: {a}\n"
    cfg = write(
        tmp_path, f"{head}        layer_range: [0, 2]\n{src}      - model: {b}\n        layer_range: [0, 3]\n{src}"
    )
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys, "same number of layers")
    cfg = write(
        tmp_path, f"merge_method: linear\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [2, 1]\n"
    )
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys, "layer_range must be", "cfg.yml:5")
    cfg = write(tmp_path, f"{head}        layer_range: [2, 5]\n{src}")
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys, "has no layer 3")
    lacking = make(tmp_path / "L", 5)
    (lacking / "model.safetensors").unlink()
    g = torch.Generator().manual_seed(0)
    save_single(lacking / "model.safetensors", {n: torch.randn(s, generator=g) for n, s in SHAPES.items()
                                                if n != "model.norm.weight"})  # fmt: skip
    cfg = write(tmp_path, base_config({"A": a, "B": lacking}))
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys, "model.norm.weight is missing in model",
          str(lacking), "cfg.yml:6")  # fmt: skip
    fails(["run", write(tmp_path, base_config(models))], tmp_path, capsys, "missing option -o/--output")


def test_run_mergekit_config_positional_output(models, tmp_path: Path, capsys) -> None:
    cfg = write(tmp_path, base_config(models))
    assert main(["run", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0, capsys.readouterr().err
    got, a, b = load_any(tmp_path / "out"), load_any(models["A"]), load_any(models["B"])
    assert torch.allclose(got["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2)
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == cfg.read_text()


def test_setting_resolution_rules() -> None:
    s = check_setting([{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "*", "value": 2}], float, "w")
    assert s == [Cond([0.0, 1.0], "mlp"), Cond(2, "*")]
    assert evaluate(s, "layers.1.mlp.up", 0.5) == 0.5 and evaluate(s, "layers.1.attn", 0.5) == 2
    assert evaluate(check_setting([{"filter": "mlp", "value": 1}], float, "w"), "attn", 0.0) is None
    assert evaluate([1.0, 0.5, 0.0], "x", 0.75) == 0.25
    assert layer_t(None, 4) == 0.0 and layer_t(3, 4) == 1.0 and layer_t(0, 1) == 1.0
    with pytest.raises(ValueError, match="gradient"):
        check_setting([True, False], bool, "normalize")


def test_unused_base_joins_as_mergekit_merges_it_or_is_left_out(models, tmp_path: Path, capsys) -> None:
    """A base the method does not use and the models do not list: mergekit appends it as one more input. karcher
    merges it; linear without a global weight for it, and passthrough (one input), are refused by mergekit: capmerge
    leaves the base out and warns."""
    from capmerge.merge.methods.models import TensorInputs
    from capmerge.merge.methods.registry import get_model_method

    a, b, p = (str(models[k]) for k in "ABP")
    assert main(["merge", a, b, "--base", p, "--method", "karcher", "-o", str(tmp_path / "k"), "-q"]) == 0
    assert "does not use a base" not in capsys.readouterr().err
    m = get_model_method("karcher")
    got, ins = load_any(tmp_path / "k"), [load_any(models[k]) for k in "ABP"]
    gp, mp = m.resolve({}, [{}] * 3)
    for n in SHAPES:
        assert torch.equal(got[n], m.fn(TensorInputs(n, [t[n] for t in ins], mp, gp))), n
    for method, extra in (("linear", ["--weights", "1"]), ("passthrough", [])):
        out = tmp_path / method
        assert main(["merge", a, *([b] if extra else []), "--base", p, "--method", method, *extra, "-o", str(out)]) == 0
        assert f"{method} does not use a base model: {p} is not merged" in capsys.readouterr().err
        assert torch.equal(load_any(out)["lm_head.weight"], (ins[0]["lm_head.weight"] + ins[1]["lm_head.weight"]) / 2
                           if extra else ins[0]["lm_head.weight"])  # fmt: skip


def test_yaml_exponent_without_dot_is_a_number() -> None:
    from capmerge.recipes import yaml_lines

    assert yaml_lines.load("tol: 1e-7\nx: -2E+3\ny: 1e\n") == {"tol": 1e-7, "x": -2000.0, "y": "1e"}


def test_tensors_only_other_models_have_are_left_out_with_a_warning(models, tmp_path: Path, capsys) -> None:
    """The output has the first model's (the base's) tensors: another model's extra ones (a head one finetune added)
    are left out, as mergekit leaves them, with a warning naming them; the other way round the first model's tensor
    is missing in the other (refused, test_config_slice_and_tensor_errors)."""
    extra = make(tmp_path / "X", 4, extra={"score.weight": torch.ones(2, 8), "score.bias": torch.zeros(2)})
    out = tmp_path / "out"
    assert main(["merge", str(models["A"]), str(extra), "--weights", "0.5", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("warning: 2 tensor(s)"))
    assert f"of {extra} that {models['A']} lacks are not merged (" in line and "score.weight" in line, line
    assert "score.bias" in line, line
    got, a, x = load_any(out), load_any(models["A"]), load_any(extra)
    assert sorted(got) == sorted(a)
    for n in SHAPES:
        torch.testing.assert_close(got[n], 0.5 * a[n] + 0.5 * x[n], rtol=0, atol=1e-6)


def test_an_integer_buffer_some_models_lack_is_copied_from_the_reference(models, tmp_path: Path, capsys) -> None:
    """A tensor that is not floating (``position_ids``, which older transformers save and newer ones do not: a
    finetune of all-MiniLM-L6-v2 lacks the pretrained model's) is copied from the base, else the first model, with a
    warning, where other models lack it; a floating tensor one of them lacks is still refused."""
    a = load_any(models["A"])
    lacking = make(tmp_path / "N", 5)
    (lacking / "model.safetensors").unlink()
    save_single(lacking / "model.safetensors", {n: torch.full(s, 0.25) for n, s in SHAPES.items()})
    cfg = write(tmp_path, f"merge_method: ties\nbase_model: {models['A']}\nmodels:\n  - model: {lacking}\n"
                          "    parameters: {weight: 1.0, density: 1.0}\ndtype: float32\n")  # fmt: skip
    for args, out in ((["run", cfg], "r"), (["merge", models["A"], lacking, "--weights", "0.5,0.5"], "m")):
        assert main([*map(str, args), "-o", str(tmp_path / out)]) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        assert (
            f"warning: model.pos_ids (not floating) is copied from {models['A']}: {lacking} do(es) not have it" in err
        )
        got = load_any(tmp_path / out)
        assert torch.equal(got["model.pos_ids"], a["model.pos_ids"])
        for n in SHAPES:  # ties at density 1 of one model: that model; linear 0.5/0.5: the mean
            want = torch.full(SHAPES[n], 0.25) if out == "r" else 0.5 * a[n] + 0.125
            torch.testing.assert_close(got[n], want, rtol=0, atol=1e-6)
    save_single(lacking / "model.safetensors", {n: torch.full(s, 0.25) for n, s in SHAPES.items() if "norm" not in n})
    fails(["merge", models["A"], lacking, "--weights", "0.5,0.5", "-o", tmp_path / "o"], tmp_path, capsys,
          f"tensor model.norm.weight is missing in model {lacking}")  # fmt: skip


def test_int8_mask_is_accepted_with_a_note_and_changes_nothing(models, tmp_path: Path, capsys) -> None:
    """mergekit's example configurations set int8_mask: true (a memory saving of its sign masks): accepted, a note
    with its line says it has no effect, and the output is bit for bit the one without it."""
    text = (f"merge_method: ties\nbase_model: {models['P']}\nmodels:\n  - model: {models['A']}\n"
            f"    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {models['B']}\n"
            "    parameters: {weight: 0.4, density: 0.7}\ndtype: float32\n")  # fmt: skip
    outs = {}
    for flag in ("", "parameters:\n  normalize: true\n  int8_mask: true\n", "parameters:\n  int8_mask: false\n"):
        cfg = tmp_path / f"c{len(outs)}.yml"
        cfg.write_text(text + flag)
        assert main(["run", str(cfg), "-o", str(tmp_path / f"o{len(outs)}")]) == 0
        err = capsys.readouterr().err
        notes = [ln for ln in err.splitlines() if ln.startswith("note: int8_mask has no effect")]
        assert len(notes) == (1 if "true" in flag else 0), err
        if notes:
            assert f"({cfg}:11: parameters.int8_mask)" in notes[0], notes[0]
        outs[flag] = load_any(tmp_path / f"o{len(outs)}")
    plain, *others = outs.values()
    for other in others:
        for n in plain:
            assert torch.equal(plain[n], other[n]), n
