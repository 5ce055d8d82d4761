"""mergekit-yaml's command-line options on ``capmerge run CONFIG.yml OUT``: a mergekit command runs as typed.

Each option either does what mergekit does with it (the shard layout is compared with mergekit's own output), is
accepted with one ``note:`` line where it changes nothing in capmerge, or is refused with one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import load_any
from test_mergekit_configs import MERGEKIT_YAML, OFFLINE_ENV, save_model

from capmerge.cli import main
from capmerge.errors import UsageError
from capmerge.recipes.mergekit_cli import parse_shard_size, split_options


def test_split_options_reads_each_option() -> None:
    rest, o = split_options(["out", "--cuda", "--random-seed", "7", "--out-shard-size=500M", "-j", "3", "-vv",
                             "--no-copy-tokenizer", "--no-write-model-card", "--lazy-unpickle", "--no-cuda",
                             "--transformers-cache", "/x", "--quiet", "--cuda", "--safe-serialization"])  # fmt: skip
    assert rest == ["out"]
    assert (o.seed, o.shard_bytes, o.threads, o.hub_cache) == (7, 500_000_000, 3, "/x")
    assert (o.copy_tokenizer, o.model_card, o.quiet) == (False, False, True)
    assert [n.split(" ", 1)[0] for n in o.notes] == ["--cuda", "--lazy-unpickle"]  # once each, defaults silent
    rest, o = split_options(["--copy-tokenizer", "--write-model-card", "--no-quiet", "--device", "cuda:1", "o"])
    assert rest == ["o"] and (o.copy_tokenizer, o.model_card, o.quiet, o.seed) == (True, True, False, None)
    assert o.shard_bytes == 5 * 10**9 and [n.split(" ", 1)[0] for n in o.notes] == ["--device"]


@pytest.mark.parametrize(("text", "want"), [("5B", 5 * 10**9), ("500m", 5 * 10**8), ("5K", 5000), ("123", 123),
                                            ("0", 2**62)])  # fmt: skip
def test_shard_size_as_mergekit_reads_it(text: str, want: int) -> None:
    assert parse_shard_size(text) == want


@pytest.mark.parametrize("text", ["1.5B", "5GB", "-1", "", "B", "99999999999B"])
def test_bad_shard_size(text: str) -> None:
    with pytest.raises(UsageError, match="--out-shard-size"):
        parse_shard_size(text)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("mkopts")
    gen = torch.Generator().manual_seed(3)
    m = {k: save_model(tmp / k, gen) for k in ("P", "A", "B")}
    (tmp / "linear.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {m['A']}\n"
                                    f"    parameters: {{weight: 0.6}}\n  - model: {m['B']}\n"
                                    "    parameters: {weight: 0.4}\ndtype: float32\n")  # fmt: skip
    (tmp / "dare.yml").write_text(f"merge_method: dare_ties\nbase_model: {m['P']}\nmodels:\n"
                                  f"  - model: {m['A']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                                  f"  - model: {m['B']}\n    parameters: {{weight: 0.4, density: 0.5}}\n")  # fmt: skip
    return {**m, "tmp": tmp}


def test_options_take_effect(models, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CAPMERGE_THREADS", "2")  # restored after the test: -j sets it for the command
    cfg = models["tmp"] / "dare.yml"
    out = tmp_path / "seeded"
    code = main(["run", str(cfg), str(out), "--random-seed", "7", "--no-copy-tokenizer", "--no-write-model-card",
                 "--cuda", "--lazy-unpickle", "-j", "1", "--allow-crimes"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert [n.split()[1] for n in notes] == ["--cuda", "--lazy-unpickle", "--allow-crimes"], err
    assert os.environ["CAPMERGE_THREADS"] == "1"
    names = {p.name for p in out.iterdir()}
    assert "README.md" not in names and not names & {"tokenizer.json", "tokenizer_config.json"}, names
    assert {"config.json", "mergekit_config.yml", "model.safetensors"} <= names
    # the same merge through the other front end (capmerge merge --seed 7), and a different seed
    for seed, name in ((7, "same"), (0, "other")):
        assert main(["merge", str(models["A"]), str(models["B"]), "--base", str(models["P"]), "--method", "dare_ties",
                     "--weights", "0.6,0.4", "--density", "0.5", "--seed", str(seed), "-o", str(tmp_path / name),
                     "-q"]) == 0  # fmt: skip
    got, same, other = (load_any(d) for d in (out, tmp_path / "same", tmp_path / "other"))
    assert sorted(got) == sorted(same)
    assert all(torch.equal(got[n], same[n]) for n in got)
    assert any(not torch.equal(got[n], other[n]) for n in got if n.endswith("proj.weight"))
    # the defaults: tokenizer and model card written, no note
    assert main(["run", str(cfg), str(tmp_path / "plain"), "--copy-tokenizer", "--no-cuda", "-q"]) == 0
    names = {p.name for p in (tmp_path / "plain").iterdir()}
    assert {"README.md", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize(("args", "needle"), [
    (["--no-safe-serialization"], "capmerge writes safetensors only"),
    (["--unsafe-truncate-embeddings"], "--unsafe-truncate-embeddings is not supported"),
    (["--bogus"], "no such option: --bogus (a mergekit configuration also takes mergekit-yaml's: --allow-crimes"),
    (["--random-seed"], "--random-seed needs a value"),
    (["--random-seed", "x"], "--random-seed: expected an integer of at least 0, got 'x'"),
    (["-j", "0"], "--num-threads: expected an integer of at least 1"),
    (["--out-shard-size", "2GB"], "--out-shard-size: invalid size '2GB'"),
    (["--cuda", "--lazy-unpickle", "--bogus"], "no such option: --bogus"),
    (["--cuda", "--transformers-cache"], "--transformers-cache needs a value"),
])  # fmt: skip
def test_refused_options(models, tmp_path: Path, capsys, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    code = main(["run", str(models["tmp"] / "linear.yml"), str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(("text", "needle"), [
    ("merge_method: slerp\nbase_model: {P}\nmodels:\n  - model: {A}\n  - model: {B}\nparameters: {{t: 0.5}}\n",
     "error: merge method slerp takes exactly 1 model besides the base, got 2 (cfg.yml:3: models)"),
    ("merge_method: model_stock\nbase_model: {P}\nmodels:\n  - model: {A}\n",
     "error: merge method model_stock takes at least 2 models besides the base, got 1 (cfg.yml:3: models)"),
    ("merge_method: passthrough\nmodels:\n  - model: {A}\n  - model: {B}\n",
     "error: merge method passthrough takes exactly 1 model, got 2 (cfg.yml:2: models)"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {A}\n        layer_range: [0, 1]\n"
     "      - model: {B}\n        layer_range: [0, 1]\n",
     "error: slices[0]: merge method passthrough takes exactly 1 model, got 2 (cfg.yml:2: slices)"),
    ("merge_method: slerp\nbase_model: {A}\nmodels:\n  - model: {A}\n  - model: {B}\nparameters: {{t: 0.5}}\n",
     None),  # the base listed among the models (mergekit's usual slerp file): one model besides it
])  # fmt: skip
def test_the_number_of_models_is_checked_first(models, tmp_path: Path, capsys, text: str, needle: str | None) -> None:
    """A method given more or fewer models than it takes: one line naming the method, the count and the file's
    key, before any tensor is read (it was the first tensor's error: "tensor embeddings...: slerp takes ...")."""
    cfg, out = tmp_path / "cfg.yml", tmp_path / "out"
    cfg.write_text(text.format(**{k: models[k] for k in "PAB"}))
    code = main(["run", str(cfg), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    if needle is None:
        assert code == 0 and out.is_dir(), err
        return
    assert code == 2 and err == [needle.replace("(cfg.yml", f"({cfg}")] and not out.exists(), err


DELLA_ENTRIES = (
    "  - model: {A}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {B}\n    parameters: {B_params}\n"
)


@pytest.mark.parametrize(("method", "b_params", "glob", "needle"), [
    # a global epsilon: every tensor of model A (the first) is refused, and no tensor is named
    ("della", "{weight: 0.5, density: 0.5}", "parameters: {epsilon: 0.6}\n",
     r"della: epsilon must be chosen such that density ± epsilon is in \(0, 1\), got 0.5 ± 0.6 for model {A}, at "
     r"every tensor \({A}; cfg.yml:4: models\[0\].model\)"),
    # a filter: one tensor of model B
    ("della_linear", "{weight: 0.5, density: [{filter: layers.1.self_attn.q_proj, value: 0.9}, {value: 0.5}]}", "",
     r"della_linear: epsilon must be chosen such that density ± epsilon is in \(0, 1\), got 0.9 ± 0.15 for model "
     r"{B}, at tensor model.layers.1.self_attn.q_proj.weight \({B}; cfg.yml:6: models\[1\].model\)"),
    # a gradient over the 4 layers (t = i/3): density 0.9 at layer 3 only, its 9 tensors
    ("della", "{weight: 0.5, density: [0.5, 0.9], epsilon: 0.15}", "",
     r"della: epsilon must be chosen such that density ± epsilon is in \(0, 1\), got 0.9 ± 0.15 for model {B}, "
     r"at tensor model.layers.3.\S+ and 8 more \({B}; cfg.yml:6: models\[1\].model\)"),
])  # fmt: skip
def test_della_bounds_are_checked_before_anything_is_read(models, tmp_path: Path, capsys, method: str, b_params: str,
                                                          glob: str, needle: str) -> None:  # fmt: skip
    """DELLA's density ± epsilon outside (0, 1): one line naming the model, the values and which tensors (every one,
    or the first and how many more), before any tensor is read (it was the first tensor's error, which named an
    innocent tensor when the setting was the whole merge's)."""
    import re

    cfg, out = tmp_path / "cfg.yml", tmp_path / "out"
    entries = DELLA_ENTRIES.format(A=models["A"], B=models["B"], B_params=b_params)
    cfg.write_text(f"merge_method: {method}\nbase_model: {models['P']}\nmodels:\n{entries}{glob}dtype: float32\n")
    code = main(["run", str(cfg), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    pattern = needle.replace("{A}", re.escape(str(models["A"]))).replace("{B}", re.escape(str(models["B"])))
    pattern = pattern.replace("cfg.yml", re.escape(str(cfg)))
    assert code == 2 and len(err) == 1 and re.fullmatch("error: " + pattern, err[0]) and not out.exists(), err


@pytest.mark.parametrize(("method", "key"), [("linear", "normalize"), ("multislerp", "normalize_weights")])
def test_weights_summing_to_zero_are_refused_before_anything_is_read(models, tmp_path: Path, capsys, method: str,
                                                                     key: str) -> None:  # fmt: skip
    """Weights summing to 0 where the method divides by their sum: one line naming the setting, before any tensor is
    read (linear named the first tensor; multislerp ended in "unexpected failure ... ZeroDivisionError"); with the
    setting off the merge runs."""
    cfg, out = tmp_path / "cfg.yml", tmp_path / "out"
    text = (f"merge_method: {method}\nmodels:\n  - model: {models['A']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {models['B']}\n    parameters: {{weight: -1}}\ndtype: float32\n")  # fmt: skip
    cfg.write_text(text)
    code = main(["run", str(cfg), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    want = (f"error: {method}: the weights sum to 0, and {key} divides by their sum (set {key} to false, or give "
            f"other weights), at every tensor ({cfg}:2: models)")  # fmt: skip
    assert code == 2 and err == [want] and not out.exists(), err
    cfg.write_text(text + f"parameters: {{{key}: false}}\n")
    assert main(["run", str(cfg), "-o", str(out), "--quiet"]) == 0, capsys.readouterr().err


def test_recipes_still_refuse_unknown_options(capsys) -> None:
    assert main(["run", "capvector", "--cuda"]) == 2
    assert capsys.readouterr().err.strip() == "error: no such option: --cuda"


@pytest.mark.parametrize("args", [["-o", "OUT"], ["--force"], ["-o", "OUT", "--force"]])
def test_a_missing_configuration_is_reported_missing(tmp_path: Path, capsys, args: list[str]) -> None:
    """A mistyped configuration path with mergekit's options: the file is missing (not "-o is for mergekit
    configurations"); nothing is written."""
    missing, out = tmp_path / "mergekit-config.yml", tmp_path / "out"
    code = main(["run", str(missing), *[str(out) if a == "OUT" else a for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: no such file, nor a shipped recipe (capvector"), (
        err
    )
    assert str(missing) in err[0] and not out.exists()


def test_a_shipped_recipe_refuses_the_output_option(capsys) -> None:
    assert main(["run", "capvector", "-o", "somewhere"]) == 2
    assert "-o/--output is for mergekit configurations" in capsys.readouterr().err


def test_shards_like_mergekit(models, tmp_path: Path, capsys) -> None:
    """--out-shard-size: the same files holding the same tensors as mergekit's (its writer counts bytes)."""
    if not MERGEKIT_YAML.exists():
        pytest.skip(f"mergekit not installed ({MERGEKIT_YAML} missing): run `make mergekit-venv`")
    cfg = models["tmp"] / "linear.yml"
    for size in ("5K", "20000"):
        mk, cm = tmp_path / f"mk{size}", tmp_path / f"cm{size}"
        r = subprocess.run([str(MERGEKIT_YAML), str(cfg), str(mk), "--out-shard-size", size, "--quiet"],
                           env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert main(["run", str(cfg), str(cm), "--out-shard-size", size, "-q"]) == 0, capsys.readouterr().err
        maps = [json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] for d in (mk, cm)]
        assert maps[0] == maps[1]
        assert len(set(maps[1].values())) > 2
        limit = parse_shard_size(size)
        for f in set(maps[1].values()):
            tensors = [n for n, v in maps[1].items() if v == f]
            assert len(tensors) == 1 or sum(load_any(cm / f)[n].numel() * 4 for n in tensors) <= limit
        got, ref = load_any(cm), load_any(mk)
        assert all(torch.allclose(got[n], ref[n], rtol=0, atol=4 * 2.0**-23 * float(ref[n].abs().max())) for n in ref)


def test_run_mergekit_from_python(models, tmp_path: Path, capsys) -> None:
    """``capmerge.run_mergekit``: a mapping (Path values too) or YAML text gives what ``capmerge run FILE`` gives,
    and linear's output is 0.6·A + 0.4·B computed here."""
    import capmerge

    assert main(["run", str(models["tmp"] / "linear.yml"), str(tmp_path / "cli"), "-q"]) == 0, capsys.readouterr()
    doc = {"merge_method": "linear", "models": [{"model": models["A"], "parameters": {"weight": 0.6}},
                                                {"model": models["B"], "parameters": {"weight": 0.4}}],
           "dtype": "float32"}  # fmt: skip
    s = capmerge.run_mergekit(doc, tmp_path / "dict")
    assert s.tensors_changed == len(load_any(models["A"]))
    capmerge.run_mergekit((models["tmp"] / "linear.yml").read_text(), tmp_path / "text", model_card=False)
    cli, a, b = load_any(tmp_path / "cli"), load_any(models["A"]), load_any(models["B"])
    for d in ("dict", "text"):
        got = load_any(tmp_path / d)
        assert sorted(got) == sorted(cli) and all(torch.equal(got[n], cli[n]) for n in cli)
    for n, t in cli.items():
        want = 0.6 * a[n].double() + 0.4 * b[n].double()
        assert torch.allclose(t.double(), want, rtol=0, atol=2.0**-22 * float(want.abs().max())), n
    assert (tmp_path / "dict" / "README.md").is_file() and not (tmp_path / "text" / "README.md").exists()
    # seed and shard size as the command line's --random-seed and --out-shard-size
    assert main(["run", str(models["tmp"] / "dare.yml"), str(tmp_path / "cli7"), "--random-seed", "7", "-q"]) == 0
    capmerge.run_mergekit(models["tmp"] / "dare.yml", tmp_path / "py7", seed=7, shard_size="20KB")
    files = json.loads((tmp_path / "py7" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(files.values())) > 2
    for f in set(files.values()):
        part = load_any(tmp_path / "py7" / f)
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= 20_000
    got, want = load_any(tmp_path / "py7"), load_any(tmp_path / "cli7")
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_merge_models_from_python(models, tmp_path: Path, capsys) -> None:
    """``capmerge.merge_models`` = ``capmerge merge`` (per-model lists, a global gradient, the base)."""
    import capmerge

    a, b, p = (str(models[k]) for k in ("A", "B", "P"))
    capmerge.merge_models([a, b], tmp_path / "py", method="ties", base=p, weights=(0.6, 0.4), density=0.5)
    assert main(["merge", a, b, "--base", p, "--method", "ties", "--weights", "0.6,0.4", "--density", "0.5", "-o",
                 str(tmp_path / "cli"), "-q"]) == 0, capsys.readouterr().err  # fmt: skip
    capmerge.merge_models([b], tmp_path / "py-slerp", method="slerp", base=a, t=[0, 0.5, 1], dtype="bfloat16")
    assert main(["merge", b, "--base", a, "--method", "slerp", "--t", "0,0.5,1", "--dtype", "bfloat16", "-o",
                 str(tmp_path / "cli-slerp"), "-q"]) == 0, capsys.readouterr().err  # fmt: skip
    for d in ("", "-slerp"):
        got, want = load_any(tmp_path / f"py{d}"), load_any(tmp_path / f"cli{d}")
        assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want), d
    assert "merge_method: ties" in (tmp_path / "py" / "mergekit_config.yml").read_text()


@pytest.mark.parametrize(("call", "needle"), [
    (lambda c, m, o: c.merge_models([m["A"], m["B"]], o, method="ties", base=m["P"], weights=[1, 2, 3]),
     "weight has 3 values for 2 models"),
    (lambda c, m, o: c.merge_models([m["A"]], o, method="linear", wieght=1), "linear has no parameter 'wieght'"),
    (lambda c, m, o: c.run_mergekit({"merge_method": "linear", "models": [{"model": m["A"], "parameters":
                                    {"weight": "x"}}]}, o), "got 'x' (models[0].parameters.weight)"),
    (lambda c, m, o: c.run_mergekit("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: x}\n", o),
     "got 'x' (<configuration>:4: models[0].parameters.weight)"),
    (lambda c, m, o: c.merge_models([m["A"], m["tmp"] / "missing"], o, method="linear", weights=[1, 1]),
     "missing; models[1].model)"),
    (lambda c, m, o: c.run_mergekit(m["tmp"] / "dare.yml", o, seed=-1), "seed must be a non-negative integer"),
    (lambda c, m, o: c.run_mergekit(m["tmp"] / "nope.yml", o), "cannot read configuration"),
])  # fmt: skip
def test_python_api_errors(models, tmp_path: Path, call, needle: str) -> None:
    """One error naming what is wrong and where: ``file:line: key`` in YAML text, the key alone in a mapping and in
    merge_models' arguments (their lines would be those of a text the caller never wrote)."""
    import capmerge

    out = tmp_path / "out"
    with pytest.raises(capmerge.CapmergeError) as e:
        call(capmerge, models, out)
    assert needle in str(e.value)
    assert "<configuration>" not in str(e.value) or "<configuration>:4" in needle
    assert not out.exists()


def test_a_failed_merge_says_its_error_alone(models, tmp_path: Path, capsys) -> None:
    """The notes of options that change nothing come after a merge: a failed one prints its error line only."""
    cfg = tmp_path / "bad.yml"
    cfg.write_text((models["tmp"] / "linear.yml").read_text().replace(str(models["B"]), str(tmp_path / "missing")))
    assert main(["run", str(cfg), str(tmp_path / "out"), "--cuda", "--lazy-unpickle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no such file or directory"), err
    assert not (tmp_path / "out").exists()
