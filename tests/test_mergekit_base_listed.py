"""A configuration that lists the base model among ``models:`` (as mergekit's own examples do, "no parameters
necessary for base model") gives mergekit's output: the base is the base, not one more model, and needs none of
the per-model parameters. Compared with ``.venv-mergekit/bin/mergekit-yaml`` on tiny float32 Llama checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_any
from test_mergekit_configs import FP32_RTOL, compare, mergekit_outputs, require_mergekit, save_model

from capmerge.cli import main

WD = "{weight: %s, density: 0.5}"
CASES = {  # method -> (global parameters, per-model parameters of A and B (None: only A), base parameters)
    "ties": ("", [WD % 0.6, WD % 0.3], None),
    "ties_base_weight": ("", [WD % 0.6, WD % 0.3], WD % 0.5),  # given, and unused, as in mergekit
    "task_arithmetic": ("", ["{weight: 0.6}", "{weight: 0.3}"], None),
    "breadcrumbs": ("", ["{weight: 0.6, density: 0.5, gamma: 0.01}", "{weight: 0.3, density: 0.5, gamma: 0.01}"], None),
    "della_linear": (
        "",
        ["{weight: 0.6, density: 1.0, epsilon: 0.0}", "{weight: 0.3, density: 1.0, epsilon: 0.0}"],
        None,
    ),  # fmt: skip
    "sce": ("{select_topk: 0.5}", ["", ""], None),
    "model_stock": ("", ["", ""], None),
    "multislerp": ("", ["{weight: 0.5}", "{weight: 0.5}"], None),
    "nuslerp": ("", ["{weight: 0.5}", "{weight: 0.5}"], None),
    "slerp": ("{t: 0.3}", [""], None),
    "nearswap": ("{t: 0.5}", [""], None),
    "arcee_fusion": ("", [""], None),
}


def config(name: str, m: dict[str, Path]) -> str:
    glob, per_model, base_params = CASES[name]
    method = name.removesuffix("_base_weight")
    lines = [f"merge_method: {method}", f"base_model: {m['P']}", "models:", f"  - model: {m['P']}"]
    lines += [f"    parameters: {base_params}"] if base_params else []
    for k, params in zip("AB", per_model, strict=False):
        lines += [f"  - model: {m[k]}"] + ([f"    parameters: {params}"] if params else [])
    lines += [f"parameters: {glob}"] if glob else []
    return "\n".join([*lines, "dtype: float32", ""])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    require_mergekit()
    tmp = tmp_path_factory.mktemp("baselisted")
    gen = torch.Generator().manual_seed(4)
    m = {k: save_model(tmp / k, gen) for k in "PAB"}
    mergekit_outputs(tmp, {name: config(name, m) for name in CASES}, lambda name: ["--no-copy-tokenizer"])
    return tmp


@pytest.mark.parametrize("name", list(CASES))
def test_base_listed_among_models(runs: Path, name: str, capsys) -> None:
    out = runs / f"cm-{name}"
    assert main(["run", str(runs / f"{name}.yml"), str(out), "-q"]) == 0, capsys.readouterr().err
    # float32: the same sums, or (slerp family, model_stock, sce) a few ulps of reassociated norms and means
    compare(load_any(out), load_any(runs / f"mk-{name}"), 2 * FP32_RTOL)
