"""Stages 1–6 of the experiment, each one through capmerge's public API.

1. pretrain θ_pre (behaviour cloning on the pretraining tasks)             → ``pre.safetensors``
2. finetune θ_pre on the small set twice: SFT → ``sft.safetensors``, SFT + future-state aux → ``aux.safetensors``
   (the aux head is dropped before saving); both are also evaluated on the small set (the referee's question)
3. ``capmerge.diff(sft, aux)`` → τ = ``capvector.safetensors``; ``capmerge.diff(pre, sft)`` → τ_task;
   ``capmerge.inspect(task=(pre, sft), capability=(sft, aux))`` → per-layer cos(τ_cap, τ_task), JSON + PNG
4. ``capmerge.apply(pre, τ, "meta-{alpha}.safetensors", alpha=[...])`` — one pass, one output per α
5. few-demo finetuning on held-out tasks from θ_pre (SFT, SFT + aux), θ_meta (SFT, SFT + OrthogonalityLoss),
   evaluated in simulation at several steps
6. controls: θ_pre + α·(random vector with τ's per-tensor norms), θ_pre + α·τ_task (both via ``capmerge.apply``)

Every job writes its result as JSON under ``CACHE/runs``; a rerun skips what is already there.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import INSTRUCTIONS, Config
from .sim import cached_demos, evaluate

VARIANTS = ("pre", "pre+aux", "meta", "meta+ortho", "rand", "task")
# Variants that start from the same weights as another one: their step-0 evaluation is that one's.
SAME_START = {"pre+aux": "pre", "meta+ortho": "meta"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _setup_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(fn: Callable[..., Any], jobs: list[tuple], workers: int) -> list[Any]:
    """``fn(*job)`` for every job, in ``workers`` spawned processes (inline for one worker)."""
    if workers <= 1 or len(jobs) <= 1:
        _setup_worker()
        return [fn(*job) for job in jobs]
    with mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_setup_worker) as pool:
        return pool.starmap(fn, jobs, chunksize=1)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------- data


def demos(cfg: Config, cache: Path, task: str, n: int) -> dict[str, Any]:
    """``n`` cached demonstrations of ``task`` with the config's horizon and noise."""
    return cached_demos(cache, task, n, horizon=cfg.demo_horizon, obs_noise=cfg.obs_noise, act_noise=cfg.act_noise)


def embeddings(cache: Path, tasks: list[str]) -> dict[str, np.ndarray]:
    """The cached MiniLM embeddings of the tasks' instructions."""
    from .policy import embed_instructions

    return embed_instructions({t: INSTRUCTIONS[t] for t in tasks}, cache)


def _demo_job(cache: Path, task: str, n: int, cfg: Config) -> tuple[str, int, float]:
    d = demos(cfg, cache, task, n)
    return task, len(d["obs"]), float(d["success"].mean())


def prepare_data(cfg: Config, cache: Path, workers: int) -> dict[str, Any]:
    """Generate (or load) every demonstration and the instruction embeddings."""
    pre, small, held = cfg.tasks
    jobs = (
        [(cache, t, cfg.demos_pre, cfg) for t in pre]
        + [(cache, t, cfg.demos_small, cfg) for t in small]
        + [(cache, t, cfg.demos_held, cfg) for t in held]
    )
    t0 = time.perf_counter()
    stats = run_jobs(_demo_job, jobs, workers)
    embeddings(cache, pre + small + held)
    log(f"data: {sum(s[1] for s in stats)} transitions over {len(stats)} tasks in {time.perf_counter() - t0:.0f} s")
    return {t: {"transitions": n, "expert_success": s} for t, n, s in stats}


def dataset(cfg: Config, cache: Path, tasks: list[str], n: int) -> Any:
    from .policy import Dataset

    return Dataset({t: demos(cfg, cache, t, n) for t in tasks}, embeddings(cache, tasks), cfg.chunk)


def evaluate_tasks(cfg: Config, cache: Path, model: Any, tasks: list[str]) -> dict[str, int]:
    """Successes per task (out of ``cfg.eval_episodes``), as the environment reports them."""
    from .policy import act_fn

    emb = embeddings(cache, tasks)
    return {
        t: evaluate(act_fn(model, emb[t]), t, episodes=cfg.eval_episodes, horizon=cfg.eval_horizon)["successes"]
        for t in tasks
    }


# ---------------------------------------------------------------- stages 1-4 and 6 (per seed)


def random_like(vector: dict[str, Any], seed: int) -> dict[str, Any]:
    """A Gaussian random vector with the per-tensor L2 norms of ``vector``."""
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for name in sorted(vector):
        t = vector[name].float()
        r = torch.randn(t.shape, generator=gen)
        out[name] = (r * (t.norm() / r.norm().clamp(min=1e-30))).to(vector[name].dtype).contiguous()
    return out


def upstream(cfg: Config, cache: Path, seed: int) -> dict[str, Any]:
    """Stages 1–4 and the control vectors of stage 6 for one seed; returns what the report needs."""
    import torch
    from safetensors.torch import save_file

    import capmerge
    from capmerge.analysis.report import plot

    from . import policy as P

    run = cache / "runs" / f"seed{seed}"
    done = read_json(run / "upstream.json")
    if done is not None:
        return done
    pre_tasks, small_tasks, _ = cfg.tasks
    out: dict[str, Any] = {"seed": seed}

    # 1. pretrain
    t0 = time.perf_counter()
    pre_data = dataset(cfg, cache, pre_tasks, cfg.demos_pre)
    torch.manual_seed(seed)
    model = P.Policy(hidden=cfg.hidden, chunk=cfg.chunk)
    model.set_normalization(pre_data.obs.numpy())
    lg = P.train(model, pre_data, steps=cfg.pre_steps, seed=seed, batch=cfg.batch, lr=cfg.lr)
    P.save(model, run / "pre.safetensors")
    out["params"] = sum(p.numel() for p in model.parameters())
    out["pretrain"] = {"bc_first": lg["bc"][0], "bc_last": float(np.mean(lg["bc"][-50:])), "seconds": sum(lg["step_s"])}
    log(f"seed {seed}: pretrained θ_pre ({out['params']} parameters) in {time.perf_counter() - t0:.0f} s")

    # 2. SFT and SFT + aux on the small set, from θ_pre
    small = dataset(cfg, cache, small_tasks, cfg.demos_small)
    for kind, aux in (("sft", False), ("aux", True)):
        m = P.load(run / "pre.safetensors", hidden=cfg.hidden, chunk=cfg.chunk, aux=aux, seed=seed)
        lg = P.train(
            m, small, steps=cfg.small_steps, seed=seed + 1, batch=cfg.batch, lr=cfg.lr,
            aux_weight=cfg.aux_weight if aux else 0.0,
        )  # fmt: skip
        P.save(m, run / f"{kind}.safetensors")
        out[kind] = {
            "bc_last": float(np.mean(lg["bc"][-50:])),
            "aux_last": float(np.mean(lg["aux"][-50:])),
            "step_s": P.median_step(lg),
            "seconds": sum(lg["step_s"]),
        }
        if cfg.eval_small:
            out[kind]["small_successes"] = evaluate_tasks(cfg, cache, m, small_tasks)
    # (a drifting load makes these two stages' step times incomparable: cost.py measures the ratio side by side)
    log(f"seed {seed}: θ_sft, θ_aux trained ({out['sft']['seconds']:.0f} s, {out['aux']['seconds']:.0f} s of steps)")

    # 3. τ = θ_aux − θ_sft, τ_task = θ_sft − θ_pre; per-layer cosines
    s = capmerge.diff(run / "sft.safetensors", run / "aux.safetensors", run / "capvector.safetensors", force=True)
    capmerge.diff(run / "pre.safetensors", run / "sft.safetensors", run / "taskvector.safetensors", force=True)
    tau = capmerge.load_vector(run / "capvector.safetensors")
    out["capvector"] = {"tensors": sorted(tau), "tensors_changed": s.tensors_changed, "zero_tensors": s.zero_tensors}
    res = capmerge.inspect(task=[run / "pre.safetensors", run / "sft.safetensors"],
                           capability=[run / "sft.safetensors", run / "aux.safetensors"])  # fmt: skip
    write_json(run / "inspect.json", res)
    plot(res, run / "inspect.png")
    comp = res["comparisons"][0]
    out["cos_total"] = comp["total"]["cos"]
    out["cos_tensors"] = {t["name"]: t["cos"] for t in comp["tensors"]}
    out["cos_layers"] = {x["name"]: x["cos"] for x in comp["layers"]}
    out["norm_ratio_total"] = comp["total"].get("ratio")

    # 4. θ_meta = θ_pre + α·τ for every α of the sweep, one pass
    s = capmerge.apply(run / "pre.safetensors", [run / "capvector.safetensors"], run / "meta-{alpha}.safetensors",
                       alpha=list(cfg.alphas), force=True)  # fmt: skip
    out["meta_files"] = {f"{a:g}": Path(o).name for a, o in zip(cfg.alphas, s.outputs, strict=True)}
    sweep = {}
    idx = torch.arange(0, len(small), max(1, len(small) // 2048))
    for a in cfg.alphas:
        m = P.load(run / out["meta_files"][f"{a:g}"], hidden=cfg.hidden, chunk=cfg.chunk)
        with torch.no_grad():
            sweep[f"{a:g}"] = {"bc_small": float(P.losses(m, small, idx)[1])}
    out["alpha_sweep"] = sweep

    # 6. controls: random vector with τ's per-tensor norms, and the plain task vector
    save_file(random_like(tau, seed), str(run / "randvector.safetensors"), metadata={"format": "pt"})
    a = cfg.alpha
    capmerge.apply(run / "pre.safetensors", [run / "randvector.safetensors"], run / "rand.safetensors", alpha=a,
                   force=True)  # fmt: skip
    capmerge.apply(run / "pre.safetensors", [run / "taskvector.safetensors"], run / "task.safetensors", alpha=a,
                   force=True)  # fmt: skip
    log(f"seed {seed}: τ ({len(tau)} tensors), cos(τ_cap, τ_task) = {out['cos_total']:+.3f}, θ_meta, controls written")
    write_json(run / "upstream.json", out)
    return out


def null_vector(cfg: Config, cache: Path, seed: int) -> dict[str, Any]:
    """The cosine a vector between two *plain* SFT runs has with τ_task: the baseline for cos(τ_cap, τ_task).

    θ_sft' is plain SFT from θ_pre again, with another batch order; τ_null = θ_sft' − θ_sft. If even this vector is
    anti-aligned with τ_task, a negative cos(τ_cap, τ_task) says nothing about a capability.
    """
    import capmerge

    from . import policy as P

    run = cache / "runs" / f"seed{seed}"
    done = read_json(run / "null.json")
    if done is not None:
        return done
    small = dataset(cfg, cache, cfg.tasks[1], cfg.demos_small)
    m = P.load(run / "pre.safetensors", hidden=cfg.hidden, chunk=cfg.chunk, seed=seed)
    lg = P.train(m, small, steps=cfg.small_steps, seed=1000 + seed, batch=cfg.batch, lr=cfg.lr)
    P.save(m, run / "sft-b.safetensors")
    res = capmerge.inspect(task=[run / "pre.safetensors", run / "sft.safetensors"],
                           capability=[run / "sft.safetensors", run / "sft-b.safetensors"])  # fmt: skip
    comp = res["comparisons"][0]
    out = {
        "seed": seed,
        "cos_total": comp["total"]["cos"],
        "norm_ratio_total": comp["total"].get("ratio"),
        "cos_tensors": {t["name"]: t["cos"] for t in comp["tensors"]},
        "bc_last": float(np.mean(lg["bc"][-50:])),
    }
    log(f"seed {seed}: null vector θ_sft' − θ_sft: cos with τ_task = {out['cos_total']:+.3f}")
    write_json(run / "null.json", out)
    return out


# ---------------------------------------------------------------- stage 5 (per seed and variant)


def start_checkpoint(cfg: Config, run: Path, variant: str) -> Path:
    """The checkpoint a variant starts from: θ_pre, θ_meta (at ``cfg.alpha``) or one of the controls."""
    base = variant.split("+")[0]
    if base == "meta":
        return run / read_json(run / "upstream.json")["meta_files"][f"{cfg.alpha:g}"]
    return run / f"{base}.safetensors"


def downstream(cfg: Config, cache: Path, seed: int, variant: str) -> dict[str, Any]:
    """Finetune one variant on the held-out tasks (few demos) and evaluate it at ``cfg.eval_steps``."""
    import capmerge

    from . import policy as P

    run = cache / "runs" / f"seed{seed}"
    path = run / f"heldout-{variant}.json"
    done = read_json(path)
    if done is not None:
        return done
    _, _, held = cfg.tasks
    data = dataset(cfg, cache, held, cfg.demos_held)
    aux = variant == "pre+aux"
    model = P.load(start_checkpoint(cfg, run, variant), hidden=cfg.hidden, chunk=cfg.chunk, aux=aux, seed=seed)
    reg = None
    if variant == "meta+ortho":
        reg = capmerge.OrthogonalityLoss(
            model,
            run / "capvector.safetensors",
            weight=cfg.ortho_weight,
            mode=cfg.ortho_mode,
            eps=cfg.ortho_eps,
            reduction="sum",
        )
    results: dict[str, dict[str, int]] = {}
    eval_at = [s for s in cfg.eval_steps if not (s == 0 and variant in SAME_START)]

    def on_eval(step: int, m: Any) -> None:
        t0 = time.perf_counter()
        results[str(step)] = evaluate_tasks(cfg, cache, m, held)
        rate = 100 * sum(results[str(step)].values()) / (len(held) * cfg.eval_episodes)
        log(f"seed {seed} {variant:>10}: step {step:>4}: {rate:5.1f} % success ({time.perf_counter() - t0:.0f} s)")

    lg = P.train(
        model, data, steps=max(cfg.eval_steps), seed=100 + seed, batch=cfg.batch, lr=cfg.lr,
        aux_weight=cfg.aux_weight if aux else 0.0, regularizer=reg, eval_at=eval_at, on_eval=on_eval,
    )  # fmt: skip
    out = {
        "seed": seed,
        "variant": variant,
        "successes": results,
        "step_s": P.median_step(lg),
        "bc_last": float(np.mean(lg["bc"][-20:])),
    }
    if reg is not None:
        out["ortho_cos_end"] = float(reg.report(per_tensor=False)["cos"])
    write_json(path, out)
    return out


def run_pipeline(cfg: Config, cache: Path, workers: int) -> dict[str, Any]:
    """All stages for every seed; returns the raw results (``results.json``)."""
    t0 = time.perf_counter()
    data = prepare_data(cfg, cache, workers)
    ups = run_jobs(upstream, [(cfg, cache, s) for s in cfg.seeds], workers)
    t1 = time.perf_counter()
    downs = run_jobs(downstream, [(cfg, cache, s, v) for s in cfg.seeds for v in VARIANTS], workers)
    for d in downs:  # variants sharing a start share its step-0 evaluation
        if d["variant"] in SAME_START:
            twin = next(x for x in downs if x["seed"] == d["seed"] and x["variant"] == SAME_START[d["variant"]])
            if "0" in twin["successes"]:
                d["successes"] = {"0": twin["successes"]["0"], **d["successes"]}
    from .cost import measure

    null = run_jobs(null_vector, [(cfg, cache, s) for s in cfg.seeds], workers)
    cost = [measure(cfg, cache, s) for s in cfg.seeds]  # in this process, alone: steps timed side by side
    return {
        "config": cfg.to_dict(),
        "data": data,
        "upstream": ups,
        "downstream": downs,
        "cost": cost,
        "null": null,
        "seconds": {"upstream": t1 - t0, "total": time.perf_counter() - t0, "workers": workers},
        "date": time.strftime("%Y-%m-%d"),
    }
