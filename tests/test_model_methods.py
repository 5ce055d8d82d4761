"""The model-centric methods (mergekit's merge methods, capmerge/merge/methods/) against mergekit 0.1.5 itself.

Every configuration below runs through mergekit-yaml (all of them in one mergekit process, started first) on tiny
float32 Llama checkpoints, and through capmerge's per-tensor ``fn`` on the same tensors with the same parameters —
capmerge's defaults filled in by ``ModelMethod.resolve``, mergekit's by mergekit, so leaving a parameter out compares
the defaults too. Outputs agree within float32 rounding (the tolerance is per method, relative to the tensor's
largest magnitude).

Data: P on a 2⁻¹² grid, A_i = P + τ_i with τ_i tie-free on a 2⁻¹⁶ grid (|τ| ≤ ¼: the angles between the models are
tens of degrees, and A_i − P is exact), B_i = A_i + σ (a shared direction, so the task vectors correlate), C = 3·P
(colinear with P: slerp's linear fallback). The random methods (DARE, DELLA) cannot share mergekit's torch.bernoulli
draws: they are compared at density 1 here (the combination step, with mergekit's defaults) and statistically in
tests/test_model_methods_random.py.

The same configuration files then run through ``capmerge run`` (the configuration runner in process, one through the
real command line in a subprocess) and must give mergekit's output too, beside configurations only the runner takes
(filters, gradients, slices, a base listed among the models or joining them, out_dtype); every registered method runs
through ``capmerge merge`` with its parameters as options. mergekit runs once, in the fixture.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import load_any
from mergekit_ref import (
    karcher_mean,
    llama_tensors,
    mergekit_config,
    require_mergekit,
    save_hf,
    start_mergekit,
    tie_free,
    wait_mergekit,
)

from capmerge.merge.methods.models import TensorInputs
from capmerge.merge.methods.registry import MODEL_METHODS, get_model_method

W = [0.6, 0.3, 0.9]
D = [0.3, 0.5, 0.9]  # d·n not integral: capmerge counts int(d·n) as mergekit does


def _w(models: list[str], weights: list[float] = W, **extra: object) -> list[tuple[str, dict[str, object]]]:
    return [(m, {"weight": w, **extra}) for m, w in zip(models, weights, strict=True)]


def _wd(models: list[str], weights: list[float] = W, **extra: object) -> list[tuple[str, dict[str, object]]]:
    return [(m, {"weight": w, "density": d, **extra}) for m, w, d in zip(models, weights, D, strict=True)]


A, B = ["A1", "A2", "A3"], ["B1", "B2", "B3"]
KARCHER_TOL = 5e-4
NEG = [0.6, -0.3, 0.9]
# name → (method, [(model, per-model parameters)], base or None, global parameters, tolerance relative to max |ref|)
CASES: dict[str, tuple[str, list[tuple[str, dict[str, object] | None]], str | None, dict[str, object], float]] = {
    "linear": ("linear", _w(A), None, {}, 5e-7),  # mergekit accumulates with addcmul (fused)
    "linear_raw": ("linear", _w(A, NEG), None, {"normalize": False}, 5e-7),
    "task_arithmetic": ("task_arithmetic", _w(A), "P", {"lambda": 0.7}, 2e-7),
    "task_arithmetic_norm": ("task_arithmetic", _w(A, NEG), "P", {"normalize": True}, 2e-7),
    "ties": ("ties", _wd(A), "P", {}, 2e-7),
    # rescale: capmerge sums the L1 norms in float64, mergekit in float32: the ratio may differ by an ulp or two
    "ties_neg_rescale": ("ties", _wd(A, NEG), "P", {"rescale": True, "lambda": 0.8, "int8_mask": True}, 5e-7),
    "breadcrumbs": ("breadcrumbs", _wd(A), "P", {}, 2e-7),
    "breadcrumbs_ties": ("breadcrumbs_ties", _wd(A, gamma=0.15), "P", {"normalize": True}, 2e-7),
    "dare_linear_d1": ("dare_linear", _w(A), "P", {}, 2e-7),
    "dare_ties_d1": ("dare_ties", _w(A, NEG), "P", {}, 2e-7),
    "della_d1": ("della", _w(A), "P", {}, 2e-7),
    "della_linear_d1": ("della_linear", _w(A), "P", {"lambda": 1.5}, 2e-7),
    "slerp": ("slerp", [("A1", None)], "P", {"t": 0.3}, 1e-6),
    "slerp_colinear": ("slerp", [("C", None)], "P", {"t": 0.3}, 1e-6),
    "nuslerp": ("nuslerp", _w(A[:2], [0.4, 0.6]), "P", {}, 1e-6),
    "nuslerp_rows": ("nuslerp", _w(A[:2], [0.4, 0.6]), None, {"nuslerp_flatten": False}, 1e-6),
    "nuslerp_cols": (
        "nuslerp",
        _w(["A1", "C"], [1.0, 2.0]),
        None,
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        1e-6,
    ),  # fmt: skip
    "multislerp": ("multislerp", _w(B), "P", {}, 1e-6),
    "multislerp_nobase": ("multislerp", _w(A), None, {"normalize_weights": False}, 1e-6),
    # karcher: capmerge's angles are float64 (the Gram matrix); mergekit's float32 arccos resolves angles near 0 only
    # to ~3e-4 rad, which moves its near-colinear tensors (the norm weights here) by ~2e-4; the float64 reference
    # below holds capmerge to 1e-6
    "karcher": ("karcher", [(m, None) for m in B], None, {}, KARCHER_TOL),
    "karcher_short": ("karcher", [(m, None) for m in A], None, {"max_iter": 2, "tol": 1e-7}, KARCHER_TOL),
    "model_stock": ("model_stock", [(m, None) for m in B], "P", {}, 1e-6),
    "model_stock_filter": ("model_stock", [(m, None) for m in B], "P", {"filter_wise": True}, 1e-6),
    "sce": ("sce", [(m, None) for m in B], "P", {"select_topk": 0.3}, 1e-6),
    "sce_all": ("sce", [(m, None) for m in A], "P", {}, 1e-6),
    "nearswap": ("nearswap", [("A1", None)], "P", {"t": 0.05}, 2e-7),
    "arcee_fusion": ("arcee_fusion", [("B1", None)], "P", {}, 2e-7),
    "passthrough": ("passthrough", [("A1", {"scale": 0.5})], None, {}, 0.0),
}


# Configurations that only the streaming runner can take (filters, gradients, slices, a base listed among the models, an
# unlisted base joining a method without one, out_dtype): run by mergekit and by `capmerge run`, compared. "@X" is model
# X's directory; the tolerance is relative to the tensor's largest magnitude (bfloat16 output: one rounding step).
T_FILTERS = [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
             {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]  # fmt: skip
RUNNER_CASES: dict[str, tuple[dict[str, object], float]] = {
    # mergekit's README slerp example: the base listed among the models, t by filter and gradient
    "slerp_filters": ({"merge_method": "slerp", "base_model": "@P", "models": [{"model": "@P"}, {"model": "@A1"}],
                       "parameters": {"t": T_FILTERS}, "dtype": "float32"}, 1e-6),
    "ties_gradients": ({"merge_method": "ties", "base_model": "@P", "models": [
        {"model": "@A1", "parameters": {"weight": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.6}],
                                        "density": [0.3, 0.8]}},
        {"model": "@A2", "parameters": {"weight": 0.4}}], "parameters": {"density": 0.5, "lambda": [1.0, 0.5]},
        "dtype": "float32"}, 2e-7),
    "linear_base_listed": ({"merge_method": "linear", "base_model": "@P", "models": [
        {"model": "@P", "parameters": {"weight": 0.2}}, {"model": "@A1", "parameters": {"weight": 0.5}},
        {"model": "@A2", "parameters": {"weight": 0.3}}], "dtype": "float32"}, 5e-7),
    "linear_base_joins": ({"merge_method": "linear", "base_model": "@P", "models": [
        {"model": "@A1", "parameters": {"weight": 0.5}}, {"model": "@A2"}], "parameters": {"weight": 0.3},
        "dtype": "float32"}, 5e-7),
    "karcher_base_listed": ({"merge_method": "karcher", "base_model": "@P", "models": [
        {"model": "@P"}, {"model": "@B1"}, {"model": "@B2"}], "dtype": "float32"}, KARCHER_TOL),
    "karcher_base_joins": ({"merge_method": "karcher", "base_model": "@P", "models": [
        {"model": "@B1"}, {"model": "@B2"}], "dtype": "float32"}, KARCHER_TOL),
    "model_stock_slices": ({"merge_method": "model_stock", "base_model": "@P", "slices": [
        {"sources": [{"model": m, "layer_range": [0, 1]} for m in ("@B1", "@B2", "@P")]},
        {"sources": [{"model": m, "layer_range": [1, 2]} for m in ("@P", "@B1", "@B2")],
         "parameters": {"filter_wise": True}}], "dtype": "float32"}, 1e-6),
    "passthrough_slices": ({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "@A1", "layer_range": [0, 2]}]},
        {"sources": [{"model": "@B1", "layer_range": [1, 2], "parameters": {"scale": [
            {"filter": "o_proj", "value": 0.0}, {"value": 1.5}]}}]}], "dtype": "float32"}, 0.0),
    "sce_bf16": ({"merge_method": "sce", "base_model": "@P", "models": [{"model": f"@{m}"} for m in B],
                  "parameters": {"select_topk": [0.2, 0.6]}, "dtype": "float32", "out_dtype": "bfloat16"}, 2.0**-8),
    "nearswap_gradient": ({"merge_method": "nearswap", "base_model": "@P", "models": [{"model": "@A1"}],
                           "parameters": {"t": [0.01, 0.1]}, "dtype": "float32"}, 2e-7),
    "dare_ties_d1_gradient": ({"merge_method": "dare_ties", "base_model": "@P", "models": [
        {"model": f"@{m}", "parameters": {"weight": [1.0, w]}} for m, w in zip(A, NEG, strict=True)],
        "dtype": "float32"}, 2e-7),
}  # fmt: skip


def runner_config(cfg: object, dirs: dict[str, object]) -> object:
    """``cfg`` with every "@X" replaced by model X's directory."""
    if isinstance(cfg, dict):
        return {k: runner_config(v, dirs) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [runner_config(v, dirs) for v in cfg]
    return str(dirs[cfg[1:]]) if isinstance(cfg, str) and cfg.startswith("@") else cfg


def test_every_model_method_has_a_mergekit_case() -> None:
    covered = {c[0] for c in CASES.values()}
    assert covered == set(MODEL_METHODS), set(MODEL_METHODS) ^ covered


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    require_mergekit()
    tmp = tmp_path_factory.mktemp("mk-methods")
    gen = torch.Generator().manual_seed(2024)
    shapes = llama_tensors()
    p = {n: torch.randint(-2048, 2049, s, generator=gen).float() / 4096 + (1.0 if len(s) == 1 else 0.0)
         for n, s in shapes.items()}  # fmt: skip
    shared = {n: tie_free(s, gen) * 8 for n, s in shapes.items()}
    models: dict[str, dict[str, torch.Tensor]] = {"P": p, "C": {n: 3 * t for n, t in p.items()}}
    for i in range(3):
        tau = {n: tie_free(s, gen) * 16 for n, s in shapes.items()}
        models[f"A{i + 1}"] = {n: p[n] + tau[n] for n in shapes}
        models[f"B{i + 1}"] = {n: p[n] + tau[n] + shared[n] for n in shapes}
    dirs = {k: save_hf(tmp / k, v) for k, v in models.items()}
    configs = {name: mergekit_config(method, [(dirs[m], mp) for m, mp in ms], base=dirs[b] if b else None,
                                     parameters=params or None)
               for name, (method, ms, b, params, _) in CASES.items()}  # fmt: skip
    configs.update({name: json.dumps(runner_config(cfg, dirs), indent=1) for name, (cfg, _) in RUNNER_CASES.items()})
    proc = start_mergekit(configs, tmp)
    try:
        ours = {name: capmerge_merge(models, *case[:4]) for name, case in CASES.items()}
    finally:
        wait_mergekit(proc)
    return {"tmp": tmp, "models": models, "ours": ours, "dirs": dirs}


def capmerge_merge(models: dict[str, dict[str, torch.Tensor]], method: str, ms: list, base: str | None,
                   params: dict[str, object]) -> dict[str, torch.Tensor]:  # fmt: skip
    """The method's fn applied tensor by tensor (defaults filled in by ModelMethod.resolve)."""
    m = get_model_method(method)
    gparams, mparams = m.resolve(params, [mp for _, mp in ms])
    out = {}
    for n in models["P"]:
        x = TensorInputs(n, [models[k][n] for k, _ in ms], mparams, gparams, models[base][n] if base else None, 0)
        out[n] = m.fn(x)
    return out


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float, what: str) -> float:
    """The largest |got − ref| / max |ref| over the tensors; fails (saying where) above ``tol``."""
    assert sorted(got) == sorted(ref), f"{what}: names differ"
    worst = 0.0
    for n, r in ref.items():
        g = got[n]
        assert g.shape == r.shape and r.dtype == torch.float32, f"{what} {n}: {g.shape} vs {r.shape}/{r.dtype}"
        scale = max(float(r.abs().max()), 1e-30)
        d = (g.double() - r.double()).abs().reshape(-1)
        rel = float(d.max()) / scale
        worst = max(worst, rel)
        if not rel <= tol:
            i = int(d.argmax())
            raise AssertionError(
                f"{what} {n}: {int((d > tol * scale).sum())} of {d.numel()} elements off by more than {tol:g}·max|ref| "
                f"({scale:.4g}); worst at flat index {i}: capmerge {g.reshape(-1)[i].item()!r}, mergekit "
                f"{r.reshape(-1)[i].item()!r}"
            )
    return worst


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(runs, case: str) -> None:
    tol = CASES[case][4]
    mk = load_any(runs["tmp"] / f"mk-{case}")
    worst = compare(runs["ours"][case], mk, tol, case)
    print(f"{case}: max |capmerge − mergekit| / max |mergekit| = {worst:.3g}")
    # the merge did something: the output is not simply one of the inputs (passthrough's is half of one)
    models = runs["models"]
    for k in models:
        assert not all(torch.equal(mk[n], t) for n, t in models[k].items()), f"{case}: the output is {k}"


def test_slerp_colinear_case_is_linear(runs) -> None:
    # the data really exercise the fallback: C = 3·P is colinear with P, and slerp then gives (1 − t)·P + t·3P
    got = runs["ours"]["slerp_colinear"]
    for n, p in runs["models"]["P"].items():
        torch.testing.assert_close(got[n], p * 1.6, rtol=2e-7, atol=0)


def test_nonintegral_density_counts_as_mergekit_does(runs) -> None:
    # ties at d = 0.3 on a 64-entry norm: mergekit keeps int(0.3·64) = 19 entries (capmerge apply would keep 19 too,
    # ⌊19.2 + ½⌋); at d = 0.9 on 64 entries: int(57.6) = 57 (capmerge apply: 58) — the model method follows mergekit
    m = get_model_method("ties")
    tau = runs["models"]["A3"]["model.norm.weight"] - runs["models"]["P"]["model.norm.weight"]
    gp, mp = m.resolve({}, [{"weight": 1.0, "density": 0.9}])
    out = m.fn(TensorInputs("model.norm.weight", [runs["models"]["A3"]["model.norm.weight"]], mp, gp,
                            runs["models"]["P"]["model.norm.weight"]))  # fmt: skip
    assert int((out != runs["models"]["P"]["model.norm.weight"]).sum()) == math.floor(0.9 * 64) == 57
    assert int((tau != 0).sum()) == 64


@pytest.mark.parametrize("case", ["ties_neg_rescale", "slerp", "model_stock"])
def test_merge_state_dicts_is_the_per_tensor_fn_and_matches_mergekit(runs, case: str) -> None:
    import capmerge

    method, ms, base, params, tol = CASES[case]
    models = runs["models"]
    got = capmerge.merge_state_dicts([models[k] for k, _ in ms], base=models[base] if base else None, method=method,
                                     parameters=params, model_parameters=[mp for _, mp in ms])  # fmt: skip
    for n, t in runs["ours"][case].items():
        assert torch.equal(got[n], t), f"{case} {n}: merge_state_dicts differs from the per-tensor fn"
    compare(got, load_any(runs["tmp"] / f"mk-{case}"), tol, f"{case} (merge_state_dicts)")


# ------------------------------------------------------------------ the same configuration files through `capmerge run`


def run_config_file(tmp, case: str):
    """``capmerge run tmp/CASE.yml -o tmp/cm-CASE`` in process (the function behind the command), once per case."""
    from capmerge.recipes.mergekit import run_configs

    out = tmp / f"cm-{case}"
    if not out.exists():
        run_configs(tmp / f"{case}.yml", out)
    return out


def compare_outputs(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float, what: str) -> float:
    """:func:`compare` for outputs of any dtype (both the same): the largest difference relative to max |ref|."""
    assert {n: t.dtype for n, t in got.items()} == {n: t.dtype for n, t in ref.items()}, f"{what}: names or dtypes"
    return compare({n: t.float() for n, t in got.items()}, {n: t.float() for n, t in ref.items()}, tol, what)


def same_as_fn(got: torch.Tensor, want: torch.Tensor, case: str) -> bool:
    """Bit for bit: the runner and the per-tensor fn run the same statistics over the same blocks, then one kernel."""
    return torch.equal(got, want)


@pytest.mark.parametrize("case", ["karcher", "karcher_short"])
def test_karcher_is_the_float64_karcher_mean(runs, case: str) -> None:
    """capmerge's karcher (coefficients from the Gram matrix) against the iteration itself run on float64 tensors."""
    _, ms, _, params, _ = CASES[case]
    models = runs["models"]
    kw = {"max_iter": params.get("max_iter", 10), "tol": params.get("tol", 1e-5)}
    ref = {n: karcher_mean([models[m][n] for m, _ in ms], [1 / len(ms)] * len(ms), dtype=torch.float64, **kw).float()
           for n in models["P"]}  # fmt: skip
    worst = compare(runs["ours"][case], ref, 1e-6, f"{case} vs float64")
    print(f"{case}: max |capmerge − float64 reference| / max |reference| = {worst:.3g}")


@pytest.mark.parametrize("case", [*CASES, *RUNNER_CASES])
def test_capmerge_run_matches_mergekit(runs, case: str) -> None:
    """The configuration file mergekit ran, through capmerge's configuration runner: mergekit's output."""
    tmp = runs["tmp"]
    tol = CASES[case][4] if case in CASES else RUNNER_CASES[case][1]
    got, mk = load_any(run_config_file(tmp, case)), load_any(tmp / f"mk-{case}")
    worst = compare_outputs(got, mk, tol, f"{case} (capmerge run)")
    print(f"{case}: capmerge run vs mergekit, max diff / max |mergekit| = {worst:.3g}")
    if case in CASES:  # the runner calls the same fn: bit for bit what the per-tensor comparison above computed
        for n, t in runs["ours"][case].items():
            assert same_as_fn(got[n], t, case), f"{case} {n}: the runner differs from the per-tensor fn"
    cfg, mk_cfg = (json.loads((d / "config.json").read_text()) for d in (tmp / f"cm-{case}", tmp / f"mk-{case}"))
    assert cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]


def test_capmerge_run_cli_subprocess(runs) -> None:
    """The real command line, in its own process, on one configuration: the in-process runner's output, bit for bit."""
    tmp, case = runs["tmp"], "ties_gradients"
    out = tmp / "cli-ties_gradients"
    proc = subprocess.run([sys.executable, "-m", "capmerge", "run", str(tmp / f"{case}.yml"), "-o", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got, ref = load_any(out), load_any(run_config_file(tmp, case))
    assert all(torch.equal(got[n], t) for n, t in ref.items()) and sorted(got) == sorted(ref)
    compare_outputs(got, load_any(tmp / f"mk-{case}"), RUNNER_CASES[case][1], f"{case} (CLI)")


def cli_args(case: str, dirs: dict[str, object]) -> list[str]:
    """``capmerge merge`` arguments for a case: the models, --base, per-model parameters as one value per model
    (--weights for weight, --param k=a,b,... otherwise) and global ones as --param k=v."""
    method, ms, base, params, _ = CASES[case]

    def text(v: object) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    args = ["merge", *(str(dirs[m]) for m, _ in ms), "--method", method]
    if base:
        args += ["--base", str(dirs[base])]
    keys = dict.fromkeys(k for _, mp in ms for k in mp or {})
    for k in keys:
        values = ",".join(text((mp or {})[k]) for _, mp in ms)
        args += ["--weights", values] if k == "weight" else ["--param", f"{k}={values}"]
    for k, v in params.items():
        args += ["--param", f"{k}={text(v)}"]
    return args


FIRST_CASE = {
    m: next(c for c, spec in CASES.items() if spec[0] == m) for m in dict.fromkeys(c[0] for c in CASES.values())
}


@pytest.mark.parametrize("method", list(FIRST_CASE))
def test_capmerge_merge_cli_every_method(runs, method: str, capsys) -> None:
    """``capmerge merge`` (in process) for every registered method, its parameters given as options: mergekit's
    output for the same merge, and ``--list-params`` names every parameter."""
    from capmerge.cli import main

    m = get_model_method(method)
    assert main(["merge", "--method", method, "--list-params"]) == 0
    listed = capsys.readouterr().out
    assert f"base model: {m.base}" in listed and all(k in listed for k in [*m.params, *m.model_params]), listed
    case = FIRST_CASE[method]
    out = runs["tmp"] / f"cli-merge-{case}"
    code = main([*cli_args(case, runs["dirs"]), "--dtype", "float32", "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    got = load_any(out)
    for n, t in runs["ours"][case].items():
        assert same_as_fn(got[n], t, case), f"{case} {n}: capmerge merge differs from the per-tensor fn"
    compare(got, load_any(runs["tmp"] / f"mk-{case}"), CASES[case][4], f"{case} (capmerge merge)")


def test_sce_on_tensors_past_the_bracket_matches_mergekit(tmp_path) -> None:
    """SCE on tensors of 1 Mi entries and more (a 16384 × 64 vocabulary), where the keep bits and energies come from
    the selection's own pass (the sampled bracket): ``capmerge run`` gives mergekit's output, and the early path
    was taken for them."""
    require_mergekit()
    from capmerge.merge import plan
    from capmerge.merge.methods import blockform as B
    from capmerge.recipes.mergekit import run_configs

    gen = torch.Generator().manual_seed(99)
    shapes = llama_tensors(vocab=16384)
    p = {n: torch.randint(-2048, 2049, s, generator=gen).float() / 4096 for n, s in shapes.items()}
    dirs = {"P": save_hf(tmp_path / "P", p)}
    for i in range(3):  # spreads that differ by model and entry, as finetunes do
        scale = torch.rand(1, generator=gen).item() + 0.5
        dirs[f"M{i}"] = save_hf(
            tmp_path / f"M{i}", {n: p[n] + tie_free(s, gen) * 16 * scale for n, s in shapes.items()}
        )
    for d in dirs.values():  # the vocabulary the tensors have
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 16384}))
    config = mergekit_config("sce", [(dirs[f"M{i}"], None) for i in range(3)], base=dirs["P"],
                             parameters={"select_topk": 0.3})  # fmt: skip
    proc = start_mergekit({"sce_long": config}, tmp_path)
    early = []
    finish = B._SceEarly.finish

    def counted(self, thr):
        early.append(self.n)
        return finish(self, thr)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(B._SceEarly, "finish", counted)
            mp.setattr(plan, "BRACKET", True)  # the sampled bracket on any CPU (by default where it is fast)
            run_configs(tmp_path / "sce_long.yml", tmp_path / "cm")
    finally:
        wait_mergekit(proc)
    assert sorted(early) == [16384 * 64, 16384 * 64]  # embed_tokens and lm_head
    worst = compare_outputs(load_any(tmp_path / "cm"), load_any(tmp_path / "mk-sce_long"), 1e-6, "sce_long")
    print(f"sce on long tensors: max |capmerge − mergekit| / max |mergekit| = {worst:.3g}")
