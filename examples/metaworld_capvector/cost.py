"""Compute cost per training step of the auxiliary objective and of the orthogonality loss, measured fairly.

On a shared machine the step time of one run drifts with the load, so the stages' own timings (SFT, then aux,
minutes apart) are not comparable. Here the three kinds of step — plain SFT, SFT + future-state aux, SFT +
``capmerge.OrthogonalityLoss`` — are interleaved in rotating order on the same batches, and the ratios are
medians of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

import capmerge

from . import policy as P
from .config import Config


def measure(cfg: Config, cache: Path, seed: int, *, rounds: int = 150, warmup: int = 5) -> dict[str, Any]:
    """Median seconds per step of each kind, their ratios to the plain step (``*_ratio``) and the medians of the
    per-round ratios (``*_paired``). One thread, as the pipeline's workers train."""
    from .pipeline import dataset, read_json, start_checkpoint, write_json

    torch.set_num_threads(1)
    run = cache / "runs" / f"seed{seed}"
    done = read_json(run / "cost.json")
    if done is not None:
        return done
    data = dataset(cfg, cache, cfg.tasks[2], cfg.demos_held)
    kinds: dict[str, tuple[P.Policy, Any, float]] = {}
    for kind, variant in (("plain", "pre"), ("aux", "pre+aux"), ("ortho", "meta+ortho")):
        m = P.load(start_checkpoint(cfg, run, variant), hidden=cfg.hidden, chunk=cfg.chunk, aux=kind == "aux")
        reg = None
        if kind == "ortho":
            reg = capmerge.OrthogonalityLoss(
                m,
                run / "capvector.safetensors",
                weight=cfg.ortho_weight,
                mode=cfg.ortho_mode,
                eps=cfg.ortho_eps,
                reduction="sum",
            )
        kinds[kind] = (m.train(), reg, cfg.aux_weight if kind == "aux" else 0.0)
    opts = {k: torch.optim.AdamW(v[0].parameters(), lr=cfg.lr, weight_decay=1e-4) for k, v in kinds.items()}
    gen = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    for r in range(warmup + rounds):
        idx = torch.randint(len(data), (cfg.batch,), generator=gen)
        for k in names[r % 3 :] + names[: r % 3]:
            model, reg, aux_weight = kinds[k]
            t0 = time.perf_counter()
            P.train_step(model, opts[k], data, idx, aux_weight, reg)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    out = {f"{k}_step_s": statistics.median(v) for k, v in times.items()}
    for k in ("aux", "ortho"):
        out[f"{k}_ratio"] = out[f"{k}_step_s"] / out["plain_step_s"]
        out[f"{k}_paired"] = statistics.median(a / b for a, b in zip(times[k], times["plain"], strict=True))
    out["rounds"] = rounds
    write_json(run / "cost.json", out)
    return out
