"""Meta-World: environments, scripted-expert demonstrations and success-rate evaluation.

Success is what the environment reports: ``info["success"]`` of ``env.step`` (Meta-World's own success check);
an episode counts as a success if that flag is true at any step within the horizon.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OBS_DIM = 39
ACT_DIM = 4
DEMO_SEED_BASE = 0  # demonstration episode e of a task resets with seed DEMO_SEED_BASE + e
EVAL_SEED_BASE = 100_000  # evaluation episode e resets with seed EVAL_SEED_BASE + e: disjoint from the demos

_ENVS: dict[str, Any] = {}  # one environment per task and process, reused across evaluations


def make_env(task: str) -> Any:
    """A goal-observable Meta-World v3 environment whose object and goal positions are resampled at every reset."""
    env = _ENVS.get(task)
    if env is None:
        warnings.filterwarnings("ignore", module=r"(gymnasium|metaworld)\..*")
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

        env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"]()
        # New object/goal positions at each reset, drawn from env.np_random. Without seeded_rand_vec Meta-World draws
        # them from numpy's global generator, and its reset(seed=...) ignores the seed.
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        _ENVS[task] = env
    return env


def close_env(task: str) -> None:
    """Close and forget ``task``'s environment (each holds tens of MB; a process that visits many tasks frees them)."""
    env = _ENVS.pop(task, None)
    if env is not None:
        env.close()


def reset(env: Any, seed: int) -> np.ndarray:
    """Reset ``env`` to the initial state drawn from ``seed`` (the same seed gives the same positions)."""
    env.seed(seed)
    obs, _ = env.reset()
    return obs


def expert(task: str) -> Any:
    """Meta-World's scripted expert policy for ``task``."""
    warnings.filterwarnings("ignore", module=r"metaworld\..*")
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task]()


def _task_key(task: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(task))


def rollout_expert(
    task: str,
    episode: int,
    *,
    horizon: int,
    obs_noise: float,
    act_noise: float,
    observe: Callable[[Any, np.ndarray], dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """One demonstration: observations with Gaussian noise (what the policy learns from), the expert's clean actions.

    The expert acts on the true state; the executed action gets noise ``act_noise`` (so demos visit states off the
    expert's own path) while the recorded label is the expert's action. Everything is drawn from
    ``(task, episode)``: the same call gives the same arrays. ``observe(env, clean_obs)``, when given, is called
    before every recorded step; its arrays are stacked per key into the result (e.g. rendered frames).
    """
    env, pol = make_env(task), expert(task)
    rng = np.random.default_rng([_task_key(task), episode])
    obs = reset(env, DEMO_SEED_BASE + episode)
    observations, actions, extra, success = [], [], [], False
    for _ in range(horizon):
        a = np.clip(pol.get_action(obs), -1.0, 1.0).astype(np.float32)
        if observe is not None:
            extra.append(observe(env, obs))
        observations.append(obs + rng.normal(0.0, obs_noise, size=obs.shape))
        actions.append(a)
        executed = np.clip(a + rng.normal(0.0, act_noise, size=a.shape), -1.0, 1.0)
        obs, _, _, truncated, info = env.step(executed)
        if info["success"]:
            success = True
            break
        if truncated:
            break
    out = {
        "obs": np.asarray(observations, dtype=np.float32),
        "act": np.asarray(actions, dtype=np.float32),
        "success": success,
    }
    for key in extra[0] if extra else ():
        if key in out:
            raise ValueError(f"observe() returned {key!r}, a key of the demonstration itself")
        out[key] = np.stack([x[key] for x in extra])
    return out


def demos_for_task(task: str, n: int, *, horizon: int, obs_noise: float, act_noise: float) -> dict[str, Any]:
    """``n`` demonstrations of ``task`` concatenated: ``obs`` (T, 39), ``act`` (T, 4), ``episode`` (T,), ``success``."""
    eps = [rollout_expert(task, e, horizon=horizon, obs_noise=obs_noise, act_noise=act_noise) for e in range(n)]
    return {
        "obs": np.concatenate([e["obs"] for e in eps]),
        "act": np.concatenate([e["act"] for e in eps]),
        "episode": np.concatenate([np.full(len(e["obs"]), i, dtype=np.int32) for i, e in enumerate(eps)]),
        "success": np.array([e["success"] for e in eps]),
    }


def cached_demos(cache: Path, task: str, n: int, *, horizon: int, obs_noise: float, act_noise: float) -> dict:
    """:func:`demos_for_task`, stored as ``.npz`` under ``cache`` (keyed by every setting that changes it)."""
    path = cache / "demos" / f"{task}-n{n}-h{horizon}-o{obs_noise:g}-a{act_noise:g}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    d = demos_for_task(task, n, horizon=horizon, obs_noise=obs_noise, act_noise=act_noise)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **d)
    tmp.replace(path)
    return d


def evaluate(
    act_fn: Callable[[Any], np.ndarray],
    task: str,
    *,
    episodes: int,
    horizon: int,
    observe: Callable[[Any, np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` episodes (reset seeds ``EVAL_SEED_BASE + e``) with ``act_fn(obs) -> action``.

    With ``observe``, the policy gets ``observe(env, obs)`` instead of the state (e.g. a rendered frame).
    Returns ``successes`` (episodes in which the env reported ``info["success"]``), ``episodes``, ``rate`` and
    ``lengths`` (steps until the first success, or the horizon).
    """
    env = make_env(task)
    successes, lengths = 0, []
    for e in range(episodes):
        obs = reset(env, EVAL_SEED_BASE + e)
        steps = horizon
        for t in range(horizon):
            a = act_fn(obs if observe is None else observe(env, obs))
            obs, _, _, truncated, info = env.step(np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0))
            if info["success"]:
                successes += 1
                steps = t + 1
                break
            if truncated:
                break
        lengths.append(steps)
    return {"successes": successes, "episodes": episodes, "rate": successes / episodes, "lengths": lengths}
