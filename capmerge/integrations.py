"""Optional integrations with training frameworks. Nothing here imports transformers until it is used.

transformers ``Trainer``::

    from transformers import Trainer
    from capmerge.integrations import OrthogonalityTrainerMixin

    class MyTrainer(OrthogonalityTrainerMixin, Trainer):  # or: from capmerge.integrations import OrthogonalityTrainer
        pass

    trainer = MyTrainer(model=model, args=args, train_dataset=ds,
                        ortho_vector="capvector.safetensors", ortho_options={"weight": 0.1, "mode": "cosine2"})

``compute_loss`` adds λ·penalty during training (not evaluation), scaled like the task loss under gradient
accumulation, and every training log gets ``ortho/loss`` (mean since the last log) and ``ortho/cos``, ``ortho/proj``,
``ortho/delta_norm`` (whole model, from :meth:`~capmerge.ortho.OrthogonalityLoss.report`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["OrthogonalityTrainer", "OrthogonalityTrainerMixin"]


class OrthogonalityTrainerMixin:
    """Adds :class:`capmerge.ortho.OrthogonalityLoss` to a ``transformers.Trainer``'s loss, and logs it.

    Keyword arguments (besides the Trainer's):
        ortho_vector: The capability vector(s) (path, mapping or list). The loss is built at the first training
            step, after the Trainer/accelerate wrapped the model (DDP, FSDP2, compile): θ_ref = the weights then.
        ortho_options: Keyword options of ``OrthogonalityLoss`` (``weight``, ``mode``, ``include`` ...).
        ortho_loss: A ready ``OrthogonalityLoss`` instead of the two above.
        ortho_log_layers: Also log per-block values (``ortho/layer3/cos`` ...).
    """

    def __init__(
        self,
        *args: Any,
        ortho_vector: Any = None,
        ortho_options: dict[str, Any] | None = None,
        ortho_loss: Any = None,
        ortho_log_layers: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.ortho_loss = ortho_loss
        self._ortho_vector = ortho_vector
        self._ortho_options = dict(ortho_options or {})
        self._ortho_log_layers = ortho_log_layers
        self._ortho_sum: Any = None
        self._ortho_count = 0

    def _ortho_enabled(self) -> bool:
        return self.ortho_loss is not None or self._ortho_vector is not None

    def _ortho_build(self, model: Any) -> Any:
        if self.ortho_loss is None:
            from capmerge.ortho import OrthogonalityLoss

            self.ortho_loss = OrthogonalityLoss(model, self._ortho_vector, **self._ortho_options)
        return self.ortho_loss

    def _ortho_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer will *not* divide the returned loss by the accumulation steps (mirrors
        ``Trainer.training_step``): then the penalty must be divided here so that it counts once per step."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool((accepts and num_items_in_batch is not None) or getattr(self, "compute_loss_func", None))

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None,
                     **kwargs: Any) -> Any:  # fmt: skip
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                   num_items_in_batch=num_items_in_batch, **kwargs)  # fmt: skip
        if not (model.training and self._ortho_enabled()):
            return out
        loss, outputs = out if return_outputs else (out, None)
        reg = self._ortho_build(model)()
        self._ortho_sum = reg.detach() if self._ortho_sum is None else self._ortho_sum + reg.detach()
        self._ortho_count += 1
        if self._ortho_scaled_for_ga(num_items_in_batch):
            steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            reg = reg / steps
        loss = loss + reg.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.ortho_loss is not None:
            if self._ortho_count:
                logs["ortho/loss"] = float(self._ortho_sum) / self._ortho_count
                self._ortho_sum, self._ortho_count = None, 0
            report = self.ortho_loss.report(flat=True, per_tensor=False)  # every rank: one collective under FSDP2
            for key, value in report.items():
                parts = key.split("/")  # ortho/cos, ortho/cos/v1, ortho/layer3/cos, ortho/other/cos
                whole = parts[1] in ("cos", "proj", "delta_norm")
                if whole or (self._ortho_log_layers and parts[-1] in ("cos", "proj", "delta_norm")):
                    logs[key] = value
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


if TYPE_CHECKING:
    from transformers import Trainer

    class OrthogonalityTrainer(OrthogonalityTrainerMixin, Trainer):
        """transformers.Trainer with OrthogonalityTrainerMixin."""


def __getattr__(name: str) -> Any:
    if name == "OrthogonalityTrainer":  # imports transformers only when asked for
        from transformers import Trainer

        cls = type("OrthogonalityTrainer", (OrthogonalityTrainerMixin, Trainer), {
            "__doc__": "transformers.Trainer with OrthogonalityTrainerMixin (see there).",
            "__module__": __name__,
        })  # fmt: skip
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
