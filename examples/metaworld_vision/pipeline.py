"""The stages of the vision experiment, every weight operation through capmerge's public API.

1. pretrain θ_pre per seed (behaviour cloning from pixels on the pretraining tasks)              → ``pre.safetensors``
2. calibrate the auxiliary weight (quick mode; the full run reads the frozen value from the config)
3. on the small set, from θ_pre: SFT → ``sft``, SFT + object-position aux → ``aux`` (head dropped), and a second
   plain SFT (another batch order) → ``sft-b``, the baseline of the cosine; ``capmerge.diff`` → τ = aux − sft and
   τ_task = sft − pre; ``capmerge.inspect`` → per-tensor cos(τ, τ_task); ``capmerge.apply`` → θ_pre + α·τ and
   θ_pre + α·(random vector with τ's per-tensor norms) for every α of the grid, one pass each
4. validation: θ_pre → SFT, θ_pre → SFT + aux, θ_meta(α) → SFT + ``capmerge.OrthogonalityLoss`` for every α
5. the gate (SFT + aux − SFT ≥ ``gate_points`` on validation, mean over seeds); if it fails, stop here
6. α := the best on validation; test: the six variants of :data:`VARIANTS`

Every job writes its result as JSON under ``CACHE/runs-MODE/seedS``; a rerun skips what is already there.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from examples.metaworld_capvector.config import INSTRUCTIONS
from examples.metaworld_capvector.pipeline import log, random_like, read_json, run_jobs, write_json

from .config import VisionConfig
from .sim import cached_demos, cached_episode, evaluate, release

VARIANTS = ("pre", "pre+aux", "meta", "meta+ortho", "rand", "aux")
VAL_BASE = ("pre", "pre+aux")  # the gate's two runs; θ_meta + ortho at every α is added for the choice of α


def run_dir(cfg: VisionConfig, cache: Path, seed: int) -> Path:
    return cache / f"runs-{cfg.name}" / f"seed{seed}"


# ---------------------------------------------------------------- data


def demos(cfg: VisionConfig, cache: Path, task: str, n: int) -> dict[str, Any]:
    return cached_demos(cache, task, n, horizon=cfg.horizon, obs_noise=cfg.obs_noise, act_noise=cfg.act_noise)


def embeddings(cache: Path, tasks: list[str]) -> dict[str, np.ndarray]:
    from examples.metaworld_capvector.policy import embed_instructions

    return embed_instructions({t: INSTRUCTIONS[t] for t in tasks}, cache)


def _render_job(cfg: VisionConfig, cache: Path, task: str, episodes: list[int]) -> tuple[str, int, int]:
    steps = successes = 0
    for e in episodes:
        d = cached_episode(cache, task, e, horizon=cfg.horizon, obs_noise=cfg.obs_noise, act_noise=cfg.act_noise)
        steps, successes = steps + len(d["act"]), successes + int(d["success"])
    release(task)
    return task, steps, successes


def prepare_data(cfg: VisionConfig, cache: Path, workers: int) -> dict[str, Any]:
    """Render (or find in the cache) every demonstration; embed the instructions."""
    pre, small, val, test = cfg.tasks
    counts = {**{t: cfg.demos_pre for t in pre}, **{t: cfg.demos_small for t in small},
              **{t: cfg.demos_held for t in val + test}}  # fmt: skip
    jobs = [(cfg, cache, t, list(range(i, min(i + 5, n)))) for t, n in counts.items() for i in range(0, n, 5)]
    t0 = time.perf_counter()
    stats: dict[str, list[int]] = {}
    for task, steps, succ in run_jobs(_render_job, jobs, workers):
        s = stats.setdefault(task, [0, 0])
        s[0], s[1] = s[0] + steps, s[1] + succ
    embeddings(cache, list(counts))
    log(f"data: {sum(s[0] for s in stats.values())} frames of {len(stats)} tasks in {time.perf_counter() - t0:.0f} s")
    return {t: {"frames": s[0], "expert_success": s[1] / counts[t]} for t, s in stats.items()}


def dataset(cfg: VisionConfig, cache: Path, tasks: list[str], n: int) -> Any:
    from .policy import VisionDataset

    return VisionDataset({t: demos(cfg, cache, t, n) for t in tasks}, embeddings(cache, tasks), cfg.chunk)


def evaluate_tasks(cache: Path, model: Any, tasks: list[str], *, episodes: int, horizon: int) -> dict[str, int]:
    """Successes per task, as the environment reports them (fixed reset seeds, the same for every run)."""
    from .policy import act_fn

    emb = embeddings(cache, tasks)
    return {t: evaluate(act_fn(model, emb[t]), t, episodes=episodes, horizon=horizon)["successes"] for t in tasks}


def load(cfg: VisionConfig, path: Path, *, aux: bool = False, seed: int = 0) -> Any:
    from examples.metaworld_capvector.policy import load as load_policy

    from .policy import VisionPolicy

    return load_policy(path, hidden=cfg.hidden, chunk=cfg.chunk, aux=aux, seed=seed, cls=VisionPolicy)


def train(cfg: VisionConfig, model: Any, data: Any, *, steps: int, seed: int, **kw: Any) -> dict[str, Any]:
    from examples.metaworld_capvector.policy import train as train_policy

    from .policy import losses

    return train_policy(model, data, steps=steps, seed=seed, batch=cfg.batch, lr=cfg.lr, loss_fn=losses, **kw)


def _summary(lg: dict[str, Any], tail: int = 50) -> dict[str, float]:
    from examples.metaworld_capvector.policy import median_step

    return {
        "bc_first": lg["bc"][0] if lg["bc"] else math.nan,
        "bc_last": float(np.mean(lg["bc"][-tail:])) if lg["bc"] else math.nan,
        "aux_last": float(np.mean(lg["aux"][-tail:])) if lg["aux"] else math.nan,
        "step_s": median_step(lg) if lg["step_s"] else math.nan,
        "seconds": sum(lg["step_s"]),
    }


# ---------------------------------------------------------------- stages 1-3 (per seed)


def pretrain(cfg: VisionConfig, cache: Path, seed: int) -> dict[str, Any]:
    """Stage 1: θ_pre, behaviour cloning on the pretraining tasks."""
    import torch

    from examples.metaworld_capvector.policy import save

    from .policy import VisionPolicy

    run = run_dir(cfg, cache, seed)
    done = read_json(run / "pretrain.json")
    if done is not None:
        return done
    data = dataset(cfg, cache, cfg.tasks[0], cfg.demos_pre)
    torch.manual_seed(seed)
    model = VisionPolicy(hidden=cfg.hidden, chunk=cfg.chunk)
    model.set_normalization(data.prop.numpy())
    lg = train(cfg, model, data, steps=cfg.pre_steps, seed=seed)
    save(model, run / "pre.safetensors")
    out = {"seed": seed, "params": sum(p.numel() for p in model.parameters()), **_summary(lg)}
    log(f"seed {seed}: θ_pre ({out['params']} parameters), BC {out['bc_first']:.3f} → {out['bc_last']:.4f}, "
        f"{out['seconds']:.0f} s of steps")  # fmt: skip
    write_json(run / "pretrain.json", out)
    return out


def calibrate(cfg: VisionConfig, cache: Path) -> dict[str, Any]:
    """Stage 2: the auxiliary weight w with ‖∇(w·aux)‖ ≈ ``aux_grad_ratio``·‖∇ BC‖ at θ_pre (first seed) on the
    small set, rounded to two significant digits; or the frozen value of the config."""
    from .policy import gradient_norms

    if cfg.aux_weight is not None:
        return {"aux_weight": cfg.aux_weight, "source": "config (frozen from the quick run)"}
    path = cache / f"runs-{cfg.name}" / "calibration.json"
    done = read_json(path)
    if done is not None:
        return done
    seed = cfg.seeds[0]
    model = load(cfg, run_dir(cfg, cache, seed) / "pre.safetensors", aux=True, seed=seed)
    g = gradient_norms(model, dataset(cfg, cache, cfg.tasks[1], cfg.demos_small), batches=cfg.calib_batches,
                       batch=cfg.batch, seed=seed)  # fmt: skip
    raw = cfg.aux_grad_ratio * g["ratio_median"]
    weight = float(f"{raw:.2g}")
    out = {"aux_weight": weight, "raw": raw, "source": f"calibrated at θ_pre (seed {seed}) on the small set", **g}
    log(f"calibration: median ‖∇BC‖/‖∇aux‖ = {g['ratio_median']:.3f} → aux weight {weight:g}")
    write_json(path, out)
    return out


def upstream(cfg: VisionConfig, cache: Path, seed: int, aux_weight: float) -> dict[str, Any]:
    """Stage 3 for one seed: θ_sft, θ_aux (and θ_sft' for the baseline), τ, τ_task, cosines, θ_meta and controls."""
    from safetensors.torch import save_file

    import capmerge
    from capmerge.analysis.report import plot
    from examples.metaworld_capvector.policy import save

    from .policy import gradient_norms

    run = run_dir(cfg, cache, seed)
    done = read_json(run / "upstream.json")
    if done is not None:
        return done
    small_tasks = cfg.tasks[1]
    small = dataset(cfg, cache, small_tasks, cfg.demos_small)
    out: dict[str, Any] = {"seed": seed, "aux_weight": aux_weight}
    kinds = [("sft", False, seed + 1), ("aux", True, seed + 1)] + ([("sft-b", False, 1000 + seed)] * cfg.null_baseline)
    for kind, aux, data_seed in kinds:
        m = load(cfg, run / "pre.safetensors", aux=aux, seed=seed)
        lg = train(cfg, m, small, steps=cfg.small_steps, seed=data_seed, aux_weight=aux_weight if aux else 0.0)
        out[kind] = _summary(lg)
        if aux:  # how the two gradients compare at the end of the auxiliary run
            g = gradient_norms(m, small, batches=max(2, cfg.calib_batches // 2), batch=cfg.batch, seed=seed)
            out[kind]["grad_ratio_end"] = aux_weight / g["ratio_median"]  # ‖∇(w·aux)‖ / ‖∇BC‖
        save(m, run / f"{kind}.safetensors")
    log(f"seed {seed}: θ_sft, θ_aux trained (BC {out['sft']['bc_last']:.4f}, {out['aux']['bc_last']:.4f}; "
        f"aux {out['aux']['aux_last']:.4f})")  # fmt: skip

    s = capmerge.diff(run / "sft.safetensors", run / "aux.safetensors", run / "capvector.safetensors", force=True)
    capmerge.diff(run / "pre.safetensors", run / "sft.safetensors", run / "taskvector.safetensors", force=True)
    tau = capmerge.load_vector(run / "capvector.safetensors")
    out["capvector"] = {"tensors": len(tau), "tensors_changed": s.tensors_changed,
                        "norm": float(sum(float((t.double() ** 2).sum()) for t in tau.values()) ** 0.5)}  # fmt: skip
    res = capmerge.inspect(task=[run / "pre.safetensors", run / "sft.safetensors"],
                           capability=[run / "sft.safetensors", run / "aux.safetensors"])  # fmt: skip
    write_json(run / "inspect.json", res)
    plot(res, run / "inspect.png")
    comp = res["comparisons"][0]
    out["cos_total"] = comp["total"]["cos"]
    out["norm_ratio_total"] = comp["total"].get("ratio")
    out["cos_tensors"] = {t["name"]: t["cos"] for t in comp["tensors"]}
    out["cos_layers"] = {x["name"]: x["cos"] for x in comp["layers"]}
    out["cos_modules"] = {x["name"]: x["cos"] for x in comp.get("modules", [])}
    if cfg.null_baseline:
        res_b = capmerge.inspect(task=[run / "pre.safetensors", run / "sft.safetensors"],
                                 capability=[run / "sft.safetensors", run / "sft-b.safetensors"])  # fmt: skip
        cb = res_b["comparisons"][0]
        out["null"] = {"seed": seed, "cos_total": cb["total"]["cos"], "norm_ratio_total": cb["total"].get("ratio"),
                       "cos_tensors": {t["name"]: t["cos"] for t in cb["tensors"]}}  # fmt: skip

    alphas = list(cfg.alphas)
    save_file(random_like(tau, seed), str(run / "randvector.safetensors"), metadata={"format": "pt"})
    for kind, vector in (("meta", "capvector"), ("rand", "randvector")):  # one pass each, one output per α
        template = run / f"{kind}-{{alpha}}.safetensors"
        s = capmerge.apply(run / "pre.safetensors", [run / f"{vector}.safetensors"], template, alpha=alphas, force=True)
        out[f"{kind}_files"] = {f"{a:g}": Path(o).name for a, o in zip(alphas, s.outputs, strict=True)}
    log(f"seed {seed}: τ ({len(tau)} tensors, ‖τ‖ {out['capvector']['norm']:.3f}), cos(τ, τ_task) "
        f"{out['cos_total']:+.3f}; θ_meta and θ_pre + random written for α ∈ {alphas}")  # fmt: skip
    write_json(run / "upstream.json", out)
    return out


# ---------------------------------------------------------------- stages 4 and 6 (per seed, split and variant)


def start_checkpoint(run: Path, variant: str, alpha: float) -> Path:
    """The checkpoint a variant starts from: θ_pre, θ_aux, or θ_pre + α·(τ or the random vector)."""
    base = variant.split("+")[0]
    if base in ("meta", "rand"):
        return run / read_json(run / "upstream.json")[f"{base}_files"][f"{alpha:g}"]
    return run / f"{base}.safetensors"


def downstream(cfg: VisionConfig, cache: Path, seed: int, split: str, variant: str, alpha: float,
               aux_weight: float) -> dict[str, Any]:  # fmt: skip
    """Finetune one variant on the validation or test tasks (few demos), then evaluate it there."""
    import capmerge

    run = run_dir(cfg, cache, seed)
    tag = f"{variant}@{alpha:g}" if variant.split("+")[0] in ("meta", "rand") else variant
    path = run / f"{split}-{tag}.json"
    done = read_json(path)
    if done is not None:
        return done
    tasks = cfg.tasks[2] if split == "val" else cfg.tasks[3]
    episodes = cfg.val_episodes if split == "val" else cfg.test_episodes
    data = dataset(cfg, cache, tasks, cfg.demos_held)
    aux = variant == "pre+aux"
    model = load(cfg, start_checkpoint(run, variant, alpha), aux=aux, seed=seed)
    monitor = None
    if variant.startswith("meta"):  # the penalty for meta+ortho; for plain meta only its report (where Δ stands)
        monitor = capmerge.OrthogonalityLoss(model, run / "capvector.safetensors", weight=cfg.ortho_weight,
                                             mode=cfg.ortho_mode, eps=cfg.ortho_eps)  # fmt: skip
    t0 = time.perf_counter()
    lg = train(cfg, model, data, steps=cfg.down_steps, seed=100 + seed, aux_weight=aux_weight if aux else 0.0,
               regularizer=monitor if variant == "meta+ortho" else None)  # fmt: skip
    t1 = time.perf_counter()
    successes = evaluate_tasks(cache, model, tasks, episodes=episodes, horizon=cfg.horizon)
    rate = 100 * sum(successes.values()) / (len(tasks) * episodes)
    out = {"seed": seed, "split": split, "variant": variant, "alpha": alpha, "successes": successes,
           "episodes": episodes, "success_pct": rate, **_summary(lg, tail=20),
           "train_s": t1 - t0, "eval_s": time.perf_counter() - t1}  # fmt: skip
    if monitor is not None:
        rep = monitor.report(per_tensor=False)
        tau_norm = read_json(run / "upstream.json")["capvector"]["norm"]
        out["delta_cos_tau"] = float(rep["cos"])  # cos(Δ, τ), Δ = θ − θ_meta
        out["delta_along_tau"] = float(rep["proj"]) / tau_norm  # ⟨Δ, τ⟩/‖τ‖²: the share of τ undone (if < 0)
    log(f"seed {seed} {split:>4} {tag:>14}: {rate:5.1f} % success ({out['train_s']:.0f} s train, "
        f"{out['eval_s']:.0f} s eval)")  # fmt: skip
    write_json(path, out)
    return out


# ---------------------------------------------------------------- the whole protocol


def gate_decision(cfg: VisionConfig, val: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage 5: the per-seed validation difference SFT + aux − SFT and whether its mean reaches the threshold."""
    from .stats import t_interval

    rate = {(d["seed"], d["variant"]): d["success_pct"] for d in val}
    diffs = [rate[(s, "pre+aux")] - rate[(s, "pre")] for s in cfg.seeds]
    ci = t_interval(diffs)
    mean = float(np.mean(diffs))
    return {
        "aux_minus_sft_validation_points": mean,
        "threshold": cfg.gate_points,
        "passed": bool(mean >= cfg.gate_points),
        "per_seed": diffs,
        "ci95_low": ci["ci95_low"],
        "ci95_high": ci["ci95_high"],
        "sft_validation_pct": float(np.mean([rate[(s, "pre")] for s in cfg.seeds])),
        "aux_validation_pct": float(np.mean([rate[(s, "pre+aux")] for s in cfg.seeds])),
    }


def choose_alpha(cfg: VisionConfig, val: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage 6a: the α whose θ_meta + ortho has the best mean validation success (ties: the smaller α)."""
    by_alpha = {
        f"{a:g}": float(np.mean([d["success_pct"] for d in val if d["variant"] == "meta+ortho" and d["alpha"] == a]))
        for a in cfg.alphas
    }
    best = max(cfg.alphas, key=lambda a: (by_alpha[f"{a:g}"], -a))
    return {"alpha": best, "validation_pct": by_alpha, "variant": "meta+ortho"}


def run_pipeline(cfg: VisionConfig, cache: Path, workers: int) -> dict[str, Any]:
    """All stages for every seed; returns the raw results (``results.json``, before statistics)."""
    t0 = time.perf_counter()
    data = prepare_data(cfg, cache, workers)
    pre = run_jobs(pretrain, [(cfg, cache, s) for s in cfg.seeds], workers)
    calib = calibrate(cfg, cache)
    w = calib["aux_weight"]
    ups = run_jobs(upstream, [(cfg, cache, s, w) for s in cfg.seeds], workers)
    val_jobs = [(cfg, cache, s, "val", v, 1.0, w) for s in cfg.seeds for v in VAL_BASE]
    val_jobs += [(cfg, cache, s, "val", "meta+ortho", a, w) for s in cfg.seeds for a in cfg.alphas]
    val = run_jobs(downstream, val_jobs, workers)
    gate = gate_decision(cfg, val)
    res: dict[str, Any] = {
        "config": {**cfg.to_dict(), "aux_weight": w},
        "data": data,
        "pretrain": pre,
        "calibration": calib,
        "upstream": ups,
        "null": [u["null"] for u in ups if "null" in u],
        "validation": val,
        "gate": gate,
        "seeds": list(cfg.seeds),
    }
    log(f"gate: SFT + aux − SFT on validation = {gate['aux_minus_sft_validation_points']:+.1f} points "
        f"(threshold {cfg.gate_points:g}): {'passed' if gate['passed'] else 'FAILED'}")  # fmt: skip
    if gate["passed"]:
        choice = choose_alpha(cfg, val)
        a = choice["alpha"]
        log(f"α = {a:g} (validation success of θ_meta + ortho per α: {choice['validation_pct']})")
        res["alpha_choice"] = choice
        res["test"] = run_jobs(downstream, [(cfg, cache, s, "test", v, a, w) for s in cfg.seeds for v in VARIANTS],
                               workers)  # fmt: skip
    cpu = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    res["seconds"] = {"total": time.perf_counter() - t0, "workers": workers,
                      "cpu": sum(r.ru_utime + r.ru_stime for r in cpu)}  # fmt: skip
    res["date"] = time.strftime("%Y-%m-%d")
    return res
