"""Pixels from Meta-World: a fixed camera rendered offscreen, vision demonstrations cached once, vision evaluation.

The environments, seeds, scripted experts, demonstration noise and the success check are those of
:mod:`examples.metaworld_capvector.sim`; this module adds what the policy sees:

* a 64×64 RGB frame from one fixed free camera (looking at the table from the front, above), rendered by MuJoCo's
  ``mujoco.Renderer`` through EGL with shadows, reflections and skybox off and no multisampling (~6–25 ms a frame
  on a CPU here, against 140–230 ms with the defaults);
* 7-d proprioception: hand xyz, gripper opening, goal xyz (from the observation, with the demos' noise);
* the aux target, not an input: the simulator's true object positions (obs[4:7], obs[11:14]) and a mask that is 0
  for the second slot when the task has one object (Meta-World pads it with zeros).

Demonstrations are rendered once and cached per episode (``CACHE/demos/TASK/EPISODE.npz``, uint8 frames,
compressed), so a quick run's demos are the first episodes of the full run's.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from examples.metaworld_capvector import sim as base

PROPRIO_IDX = np.array([0, 1, 2, 3, 36, 37, 38])  # hand xyz, gripper opening, goal xyz in the 39-d observation
PROPRIO_DIM = len(PROPRIO_IDX)
POS_IDX = np.array([4, 5, 6, 11, 12, 13])  # first and second object's xyz (the second is zero-padded if absent)
N_POS = len(POS_IDX)
POS_CENTER = np.array([0.0, 0.7, 0.1], dtype=np.float32)  # the aux target is (pos − centre) / scale per object
POS_SCALE = 0.2
CAMERA = {"lookat": (0.0, 0.7, 0.1), "azimuth": -90.0, "elevation": -45.0, "distance": 1.0}
SIZE = 64

_RENDERERS: dict[str, Any] = {}


def proprio(obs: np.ndarray) -> np.ndarray:
    """The 7-d proprioceptive input of (…, 39) observations."""
    return np.ascontiguousarray(obs[..., PROPRIO_IDX], dtype=np.float32)


def pos_mask(env: Any) -> np.ndarray:
    """1 for the position entries of objects the task has, 0 for the padded second slot."""
    n_objects = len(env._get_pos_objects()) // 3
    return np.repeat(np.arange(2) < n_objects, 3).astype(np.float32)


def _close_renderers() -> None:
    # Closed in order before interpreter shutdown: EGL contexts freed by __del__ at exit raise noisy errors.
    while _RENDERERS:
        _RENDERERS.popitem()[1].close()


def _load_triton_first() -> None:
    # Mesa's software EGL (llvmpipe) and Triton each load an LLVM. Triton loaded after Mesa crashes the process
    # (segfault while libtriton initialises; torch imports it lazily, e.g. transformers → torch._dynamo); loaded
    # before, both work. So load it before the first EGL context.
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")


def render(env: Any, task: str) -> np.ndarray:
    """The (64, 64, 3) uint8 frame of ``env``'s current state from the fixed camera."""
    r = _RENDERERS.get(task)
    if r is None:
        if not _RENDERERS:
            _load_triton_first()
        import mujoco

        env.model.vis.quality.offsamples = 0  # no multisampling
        r = mujoco.Renderer(env.model, SIZE, SIZE)
        cam = mujoco.MjvCamera()
        cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        cam.lookat[:] = CAMERA["lookat"]
        cam.azimuth, cam.elevation, cam.distance = CAMERA["azimuth"], CAMERA["elevation"], CAMERA["distance"]
        r._capmerge_camera = cam
        r._capmerge_flags = [mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                             mujoco.mjtRndFlag.mjRND_SKYBOX]  # fmt: skip
        if not _RENDERERS:
            atexit.register(_close_renderers)
        _RENDERERS[task] = r
    r.update_scene(env.data, camera=r._capmerge_camera)
    for flag in r._capmerge_flags:
        r.scene.flags[flag] = 0
    return r.render()


def release(task: str) -> None:
    """Close ``task``'s renderer and environment: ~170 MB together, so a worker keeps only the task it is on."""
    r = _RENDERERS.pop(task, None)
    if r is not None:
        r.close()
    base.close_env(task)


def observer(task: str) -> Any:
    """``observe(env, obs)`` for :func:`base.rollout_expert` / :func:`base.evaluate`: the frame, the clean state
    (``state``: what evaluation reads the proprioception from) and the true object positions (``pos``)."""

    def observe(env: Any, obs: np.ndarray) -> dict[str, np.ndarray]:
        return {"frame": render(env, task), "state": obs, "pos": obs[POS_IDX].astype(np.float32)}

    return observe


def episode_path(cache: Path, task: str, episode: int, *, horizon: int, obs_noise: float, act_noise: float) -> Path:
    return cache / "demos" / f"{task}-h{horizon}-o{obs_noise:g}-a{act_noise:g}" / f"{episode:03d}.npz"


def cached_episode(cache: Path, task: str, episode: int, *, horizon: int, obs_noise: float, act_noise: float) -> dict:
    """One rendered demonstration (``frames`` uint8 (T, 64, 64, 3), ``obs`` (T, 39) with noise, ``act``, ``pos``
    (T, 6) true object positions, ``pos_mask`` (6,), ``success``), rendered once and then read from the cache."""
    path = episode_path(cache, task, episode, horizon=horizon, obs_noise=obs_noise, act_noise=act_noise)
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    r = base.rollout_expert(task, episode, horizon=horizon, obs_noise=obs_noise, act_noise=act_noise,
                            observe=observer(task))  # fmt: skip
    d = {
        "frames": r["frame"],
        "obs": r["obs"],
        "act": r["act"],
        "pos": r["pos"],
        "pos_mask": pos_mask(base.make_env(task)),
        "success": np.array(r["success"]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **d)
    tmp.replace(path)
    return d


def cached_demos(cache: Path, task: str, n: int, *, horizon: int, obs_noise: float, act_noise: float) -> dict:
    """Episodes ``0..n-1`` of ``task`` concatenated, with an ``episode`` index per step and ``success`` per episode."""
    eps = [cached_episode(cache, task, e, horizon=horizon, obs_noise=obs_noise, act_noise=act_noise) for e in range(n)]
    out = {k: np.concatenate([e[k] for e in eps]) for k in ("frames", "obs", "act", "pos")}
    out["episode"] = np.concatenate([np.full(len(e["act"]), i, dtype=np.int32) for i, e in enumerate(eps)])
    out["pos_mask"] = eps[0]["pos_mask"]
    out["success"] = np.array([bool(e["success"]) for e in eps])
    return out


def evaluate(act_fn: Any, task: str, *, episodes: int, horizon: int) -> dict[str, Any]:
    """:func:`base.evaluate` with the policy seeing the rendered frame and the clean state; releases the task's
    renderer and environment afterwards."""
    try:
        return base.evaluate(act_fn, task, episodes=episodes, horizon=horizon, observe=observer(task))
    finally:
        release(task)
