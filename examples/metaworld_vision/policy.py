"""The vision policy: a small CNN on a 64×64 frame + proprioception + the frozen MiniLM instruction embedding.

It is :class:`examples.metaworld_capvector.policy.Policy` (proprioception encoder, instruction projection, residual
fusion MLP, action-chunk head) with a visual stream concatenated before the fusion:

* ``conv1``–``conv4``: 3×3 convolutions, 32-32-64-64 channels, stride 2 (64 → 4 pixels), ReLU; ``visual``: the
  flattened 4×4×64 map → ``visual_dim`` features (LayerNorm, ReLU);
* ``aux_head`` (only with the auxiliary objective): an MLP on the visual features regressing the simulator's true
  object positions (spatial perception), masked where a task has no second object. It is dropped before saving, as
  in the state-based experiment, so τ = θ_aux − θ_sft holds only shared weights.

The module names carry no digits (``conv1``, not ``conv.0``) so that ``capmerge.inspect`` groups only the fusion
``blocks.i`` as layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from examples.metaworld_capvector import policy as base
from examples.metaworld_capvector.sim import ACT_DIM

from .sim import N_POS, POS_CENTER, POS_SCALE, PROPRIO_DIM, proprio

FRAME = 64


class VisionPolicy(base.Policy):
    """CNN + proprioception + instruction → action chunk (≈ 260 K shared parameters with ``hidden=96``)."""

    def __init__(
        self, *, hidden: int = 96, chunk: int = 4, n_blocks: int = 3, aux: bool = False, visual_dim: int = 96
    ) -> None:
        super().__init__(hidden=hidden, chunk=chunk, n_blocks=n_blocks, obs_dim=PROPRIO_DIM, extra_dim=visual_dim)
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.visual = nn.Linear(64 * (FRAME // 16) ** 2, visual_dim)
        self.visual_norm = nn.LayerNorm(visual_dim)
        self.aux_head = (
            nn.Sequential(nn.Linear(visual_dim, hidden), nn.ReLU(), nn.Linear(hidden, N_POS)) if aux else None
        )

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Visual features of uint8 frames (B, 3, 64, 64)."""
        x = frames.float() / 255.0 - 0.5
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        return F.relu(self.visual_norm(self.visual(x.flatten(1))))

    def forward(self, frames: torch.Tensor, prop: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Action chunk, shape (B, chunk, 4)."""
        h = self.features(prop, lang, self.encode(frames))
        return self.action_head(h).view(-1, self.chunk, ACT_DIM)


class VisionDataset:
    """Demonstrations as training tensors: frame, proprioception, task, action chunk, object positions and mask."""

    def __init__(self, demos: dict[str, dict[str, np.ndarray]], embeddings: dict[str, np.ndarray], chunk: int):
        frames, prop, task_idx, chunks, pos, mask = [], [], [], [], [], []
        self.tasks = list(demos)
        for i, task in enumerate(self.tasks):
            d = demos[task]
            for ep in np.unique(d["episode"]):
                sel = d["episode"] == ep
                a, T = d["act"][sel], int(sel.sum())
                idx = np.minimum(np.arange(T)[:, None] + np.arange(chunk)[None, :], T - 1)  # pad with the last action
                frames.append(d["frames"][sel])
                prop.append(proprio(d["obs"][sel]))
                chunks.append(a[idx])
                pos.append(d["pos"][sel])
                mask.append(np.broadcast_to(d["pos_mask"], (T, N_POS)))
                task_idx.append(np.full(T, i))
        self.frames = torch.as_tensor(np.concatenate(frames)).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, H, W)
        self.prop = torch.as_tensor(np.concatenate(prop))
        self.chunks = torch.as_tensor(np.concatenate(chunks))
        self.pos = torch.as_tensor((np.concatenate(pos) - np.tile(POS_CENTER, 2)) / POS_SCALE, dtype=torch.float32)
        self.mask = torch.as_tensor(np.concatenate(mask), dtype=torch.float32)
        self.task = torch.as_tensor(np.concatenate(task_idx))
        self.lang = torch.as_tensor(np.stack([embeddings[t] for t in self.tasks]))

    def __len__(self) -> int:
        return len(self.prop)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the entries where ``mask`` is 1 (0 if there are none)."""
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def losses(model: VisionPolicy, data: VisionDataset, idx: torch.Tensor, aux_weight: float = 0.0) -> tuple[Any, ...]:
    """(total, behaviour-cloning MSE, masked object-position MSE) on the samples ``idx``."""
    v = model.encode(data.frames[idx])
    h = model.features(data.prop[idx], data.lang[data.task[idx]], v)
    bc = F.mse_loss(model.action_head(h).view(-1, model.chunk, ACT_DIM), data.chunks[idx])
    if model.aux_head is None or aux_weight == 0.0:
        return bc, bc, torch.zeros(())
    aux = masked_mse(model.aux_head(v), data.pos[idx], data.mask[idx])
    return bc + aux_weight * aux, bc, aux


def gradient_norms(model: VisionPolicy, data: VisionDataset, *, batches: int, batch: int, seed: int) -> dict[str, Any]:
    """‖∇ BC‖ and ‖∇ aux‖ (aux unweighted) over the shared weights (all but the aux head), per batch.

    The auxiliary weight that makes the aux gradient half of BC's is ``0.5 · median(‖∇ BC‖ / ‖∇ aux‖)``.
    """
    shared = [p for n, p in model.named_parameters() if not n.startswith(base.AUX_PREFIX)]
    gen = torch.Generator().manual_seed(seed)
    bc_norms, aux_norms = [], []
    for _ in range(batches):
        idx = torch.randint(len(data), (batch,), generator=gen)
        _, bc, aux = losses(model, data, idx, aux_weight=1.0)
        for loss, out in ((bc, bc_norms), (aux, aux_norms)):
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            out.append(float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None))))
    ratios = [b / max(a, 1e-12) for b, a in zip(bc_norms, aux_norms, strict=True)]
    return {"bc": bc_norms, "aux": aux_norms, "ratio_median": float(np.median(ratios))}


def act_fn(model: VisionPolicy, embedding: np.ndarray) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """``{"frame", "state"} -> action``: the first action of the predicted chunk, for the simulator's evaluation."""
    lang = torch.as_tensor(embedding, dtype=torch.float32)[None]
    model.eval()

    def act(o: dict[str, np.ndarray]) -> np.ndarray:
        frame = torch.as_tensor(o["frame"]).permute(2, 0, 1)[None]
        prop = torch.as_tensor(proprio(o["state"][None].astype(np.float32)))
        with torch.inference_mode():
            return model(frame, prop, lang)[0, 0].numpy()

    return act
