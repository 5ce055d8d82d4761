r"""Orthogonality constraints for finetuning after a capability vector was merged (θ_meta = θ_pre + α·τ).

Downstream training keeps its update Δ = θ − θ_ref orthogonal to τ, per tensor l, so that the capability is not
overwritten. τ̂ = τ/‖τ‖.

Soft (:class:`OrthogonalityLoss`, an ``nn.Module``; ``loss = task_loss + reg()``), λ·(1/L)·Σ_l over the L tracked
tensors (``reduction="mean"``, the default; ``"sum"`` drops the 1/L) of:

* ``"cosine2"``     ⟨Δ_l, τ̂_l⟩² / (‖Δ_l‖² + ε_l²), ε_l = eps·‖θ_ref,l‖: cos² once Δ outgrows ε_l; keeps a θ_ref copy
* ``"projection2"`` ⟨Δ_l, τ̂_l⟩² = (⟨θ_l, τ̂_l⟩ − c_l)², c_l = ⟨θ_ref,l, τ̂_l⟩   no θ_ref copy
* ``"abs"``         |⟨Δ_l, τ̂_l⟩|

Hard (:func:`project_gradients`: g ← g − ⟨g, τ̂⟩τ̂ in gradient hooks, exact for SGD; :func:`project_updates`:
θ ← θ − (⟨θ, τ̂⟩ − c)τ̂ after each optimizer step, exact for any optimizer).

Works on plain, DDP, FSDP2 (DTensor), torch.compile and PEFT (LoRA: Δ = s·B·A, never materialised) models. A vector
diffed from a bare encoder (``encoder.layer.0…``) attaches to a task model (``bert.encoder.layer.0…``) as is: names
pair like the checkpoint readers pair them (:mod:`capmerge.io.names`), plus the model's ``base_model_prefix``;
``rename=`` covers the rest.

>>> from capmerge.ortho import OrthogonalityLoss                                  # doctest: +SKIP
>>> reg = OrthogonalityLoss(model, "capvector.safetensors", weight=0.1)            # doctest: +SKIP
>>> loss = task_loss + reg()                                                       # doctest: +SKIP
>>> reg.report()["cos"]                                                            # doctest: +SKIP
"""

from __future__ import annotations

from capmerge.ortho._targets import canonical_name
from capmerge.ortho.functional import orthogonality_penalty
from capmerge.ortho.loss import MODES, OrthogonalityLoss
from capmerge.ortho.project import GradientProjection, project_gradients, project_updates

__all__ = [
    "MODES",
    "GradientProjection",
    "OrthogonalityLoss",
    "canonical_name",
    "orthogonality_penalty",
    "project_gradients",
    "project_updates",
]
