"""Several merges in one configuration (documents separated by ``---``), run as mergekit-multi runs them: a merge
with ``name: N`` is written to ``-I DIR``/N and is the model ``N`` of the later merges; the merge without a name goes
to the output. Compared with ``.venv-mergekit/bin/mergekit-multi`` on tiny float32 Llama checkpoints."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import load_any
from test_mergekit_configs import FP32_RTOL, MERGEKIT_YAML, OFFLINE_ENV, compare, save_model

from capmerge.cli import main

MERGEKIT_MULTI = MERGEKIT_YAML.parent / "mergekit-multi"


def multi_config(m: dict[str, Path]) -> str:
    # the final merge first: the order comes from the references, not from the file
    return f"""# final: the blend of A and B, with C, relative to P
merge_method: ties
base_model: {m["P"]}
models:
  - model: blend
    parameters: {{weight: 0.7, density: 0.6}}
  - model: {m["C"]}
    parameters: {{weight: 0.3, density: 0.6}}
dtype: float32
---
name: blend
merge_method: slerp
base_model: {m["A"]}
models:
  - model: {m["A"]}
  - model: {m["B"]}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - value: 0.3
dtype: float32
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("multi")
    gen = torch.Generator().manual_seed(11)
    m = {k: save_model(tmp / k, gen) for k in ("P", "A", "B", "C")}
    (tmp / "multi.yml").write_text(multi_config(m))
    return {**m, "tmp": tmp}


def test_stages_match_mergekit_multi(models, tmp_path: Path, capsys) -> None:
    if not MERGEKIT_MULTI.exists():
        pytest.skip(f"mergekit not installed ({MERGEKIT_MULTI} missing): run `make mergekit-venv`")
    cfg = models["tmp"] / "multi.yml"
    r = subprocess.run([str(MERGEKIT_MULTI), str(cfg), "-I", str(tmp_path / "mk-inter"), "--out-path",
                        str(tmp_path / "mk-out"), "--no-copy-tokenizer"], env={**os.environ, **OFFLINE_ENV},
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["run", str(cfg), "--out-path", str(tmp_path / "out"), "-I", str(tmp_path / "inter"), "-q"]) == 0, (
        capsys.readouterr().err
    )
    compare(load_any(tmp_path / "inter" / "blend"), load_any(tmp_path / "mk-inter" / "blend"), FP32_RTOL)
    compare(load_any(tmp_path / "out"), load_any(tmp_path / "mk-out"), FP32_RTOL)
    # each output's card and mergekit_config.yml hold its own document
    assert "name: blend" in (tmp_path / "inter" / "blend" / "mergekit_config.yml").read_text()
    assert "merge_method: ties" in (tmp_path / "out" / "mergekit_config.yml").read_text()


def test_lazy_keeps_a_stage_no_lazy_merges_it_again(models, tmp_path: Path, capsys) -> None:
    cfg, inter = models["tmp"] / "multi.yml", tmp_path / "inter"
    assert main(["run", str(cfg), str(tmp_path / "out"), "-I", str(inter), "-q"]) == 0, capsys.readouterr().err
    weights = inter / "blend" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(cfg), str(tmp_path / "out2"), "--intermediate-dir", str(inter)]) == 0
    assert f"merge: kept {inter / 'blend'} (it holds a model; --no-lazy merges it again)" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == first
    got, want = load_any(tmp_path / "out2"), load_any(tmp_path / "out")
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert main(["run", str(cfg), str(tmp_path / "out3"), "-I", str(inter), "--no-lazy", "-q"]) == 0
    assert weights.stat().st_mtime_ns != first
    got = load_any(tmp_path / "out3")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_run_mergekit_stages_from_python(models, tmp_path: Path) -> None:
    import capmerge

    ran = capmerge.run_mergekit((models["tmp"] / "multi.yml").read_text(), tmp_path / "out",
                                intermediate_dir=tmp_path / "inter")  # fmt: skip
    assert [s.outputs for s in ran] == [[str(tmp_path / "inter" / "blend")], [str(tmp_path / "out")]]
    assert capmerge.run_mergekit(models["tmp"] / "multi.yml", tmp_path / "out", intermediate_dir=tmp_path / "inter",
                                 force=True)[0] is None  # fmt: skip


def _cfg(tmp: Path, text: str) -> Path:
    p = tmp / "c.yml"
    p.write_text(text)
    return p


A_STAGE = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"


@pytest.mark.parametrize(("text", "args", "needle"), [
    ("name: x\n" + A_STAGE + "---\nname: x\n" + A_STAGE, ["-I", "I"], "two merges named 'x'|c.yml:7: name)"),
    (A_STAGE + "---\n" + A_STAGE, ["-o", "O", "-I", "I"], "more than one merge without a name"),
    ("name: x\n" + A_STAGE.replace("{a}", "y") + "---\nname: y\n" + A_STAGE.replace("{a}", "x"), ["-I", "I"],
     "a cycle): x, y"),
    ("name: x\n" + A_STAGE.replace("{a}", "x"), ["-I", "I"], "the merge 'x' takes itself as a model"),
    ("name: x\n" + A_STAGE + "---\n" + A_STAGE.replace("{a}", "x"), ["-o", "O"], "need -I/--intermediate-dir DIR"),
    ("name: x\n" + A_STAGE + "---\n" + A_STAGE.replace("{a}", "x"), ["-I", "I"], "missing option -o/--output"),
    ("name: x\n" + A_STAGE + "---\nname: z\n" + A_STAGE, ["-o", "O", "-I", "I"], "every merge of the configuration"),
    ("name: x\n" + A_STAGE + "---\n# the final one\n\nmerge_method: linear\nmodels:\n  - model: x\n    parameters: "
     "{{wieght: 1}}\n", ["-o", "O", "-I", "I"], "has no parameter 'wieght'|c.yml:12: models[0].parameters.wieght)"),
    ("name: [1]\n" + A_STAGE, ["-o", "O", "-I", "I"], "expected a merge name|c.yml:1: name)"),
    ("name: x\n" + A_STAGE + "---\nmerge_method: linear\nmodels:\n  - model: x\n    parameters: {{weight: 1}}\n"
     "  - model: /nonexistent/m\n    parameters: {{weight: 1}}\n", ["-o", "O", "-I", "I"],
     "no such file or directory (/nonexistent/m; |c.yml:11: models[1].model)"),
    ("name: x\n" + A_STAGE.replace("{a}", "/nonexistent/m") + "---\n" + A_STAGE.replace("{a}", "x"),
     ["-o", "O", "-I", "I"], "no such file or directory (/nonexistent/m; |c.yml:4: models[0].model)"),
    ("base_model: {a}\ngate_mode: hidden\nexperts:\n  - source_model: {a}\n", ["-o", "O"], "mergekit-moe"),
    ("genome:\n  models: [{a}]\n  merge_method: ties\ntasks: []\n", ["-o", "O"], "mergekit-evolve"),
])  # fmt: skip
def test_bad_stages(models, tmp_path: Path, capsys, text: str, args: list[str], needle: str) -> None:
    """Each problem is one error line, found before any merge runs: nothing is written."""
    cfg = _cfg(tmp_path, text.format(a=models["A"]))
    args = [str(tmp_path / a) if a in ("O", "I") else a for a in args]
    assert main(["run", str(cfg), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(n in err[0] for n in needle.split("|")), err
    assert not (tmp_path / "O").exists() and not (tmp_path / "I").exists()


def test_json_lists_the_merges(models, tmp_path: Path, capsys) -> None:
    import json

    cfg, inter = models["tmp"] / "multi.yml", tmp_path / "inter"
    for run in range(2):
        assert main(["run", str(cfg), str(tmp_path / f"out{run}"), "-I", str(inter), "--json", "-q"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert [d.get("outputs", d) for d in got] == [
            [str(inter / "blend")] if run == 0 else {"output": str(inter / "blend"), "kept": True},
            [str(tmp_path / f"out{run}")],
        ]


def tokenizer_from_blend(tmp: Path, merged: list[Path], blended: Path) -> Path:
    """tmp/tok.yml: ``merged`` averaged, the tokenizer from ``blend``, another merge of the file (``blended`` alone)."""
    cfg = tmp / "tok.yml"
    models = "".join(f"  - model: {x}\n    parameters: {{weight: {1 / len(merged)}}}\n" for x in merged)
    cfg.write_text(f"merge_method: linear\nmodels:\n{models}tokenizer_source: blend\ndtype: float32\n---\n"
                   f"name: blend\nmerge_method: linear\nmodels:\n  - model: {blended}\n    parameters: "
                   "{weight: 1.0}\ndtype: float32\n")  # fmt: skip
    return cfg


def test_tokenizer_from_another_merge(models, tmp_path: Path, capsys) -> None:
    """A merge whose models are all outside the file but whose tokenizer comes from another merge's output: planned
    before that output exists (its tokenizer is looked at once it does), then given its files."""
    m = models
    cfg = tokenizer_from_blend(tmp_path, [m["A"], m["C"]], m["B"])
    out = tmp_path / "out"
    assert main(["run", str(cfg), str(out), "-I", str(tmp_path / "inter"), "-q"]) == 0, capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "inter" / "blend" / "tokenizer.json").read_bytes()


def test_tokenizer_of_another_vocabulary_from_another_merge(models, tmp_path: Path, capsys) -> None:
    """A tokenizer of another vocabulary taken from another merge's output: the merge is planned again once that
    output exists, and the embeddings aligned to its tokens — A's row of w31, a token the tokenizer lacks, left out;
    w31x, a token no model of the merge has, zeros (mergekit's rule); every other token A's own row."""
    import json
    import shutil

    m = models
    other = tmp_path / "B2"
    shutil.copytree(m["B"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["w31x"] = tok["model"]["vocab"].pop("w31")  # one token renamed
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cfg = tokenizer_from_blend(tmp_path, [m["A"]], other)
    out = tmp_path / "out"
    assert main(["run", str(cfg), str(out), "-I", str(tmp_path / "inter")]) == 0
    assert "warning: 1 token(s) of the chosen tokenizer are in no model ('w31x'): their" in capsys.readouterr().err
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] == tok["model"]["vocab"]
    got, a = load_any(out), load_any(m["A"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        want = a[name].clone()
        want[31] = 0.0
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)
