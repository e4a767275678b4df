"""Evaluation at several ranks: one ``evaluate`` call runs the base trainer's evaluation loop at each rank.

Overriding ``evaluation_loop`` rather than ``evaluate`` keeps whatever the base trainer's ``evaluate`` does around
it (TRL preparing a dataset passed to ``evaluate``, named evaluation sets, speed and memory metrics, one ``log``
and one ``on_evaluate`` per call). ``predict`` is left alone: it runs at the model's current rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from transformers.trainer_utils import EvalLoopOutput

__all__ = ["MultiRankEvaluationMixin"]

# Metrics that describe the run, not the model: left to the base trainer's speed metrics over all ranks.
_SPEED_METRICS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "jit_compilation_time")


class MultiRankEvaluationMixin:
    """``evaluate`` of :class:`~nsn_peft.training.NSNTrainerMixin` (a ``Trainer`` mixin)."""

    _eval_points: Optional[list[int]] = None

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: Optional[list[str]] = None,
        metric_key_prefix: str = "eval",
        eval_ranks: Optional[Sequence[int]] = None,
    ) -> dict[str, float]:
        """Evaluate at each of ``eval_ranks`` (default: the trainer's); metrics come back as
        ``{prefix}_loss@r=<rank>`` (and likewise for ``compute_metrics`` outputs), ``{prefix}_loss`` is the
        mean over ranks, speed metrics cover all ranks. One ``log`` and one ``on_evaluate`` per call."""
        if eval_ranks is not None and self.budgets:
            raise ValueError("NSNTrainer(budgets=...) evaluates at every budget; eval_ranks does not apply")
        outer = self._eval_points
        if eval_ranks is not None:
            self._eval_points = sorted({int(r) for r in eval_ranks})
        elif outer is None:
            self._eval_points = list(self.eval_ranks)
        try:
            return super().evaluate(  # type: ignore[misc]
                eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )
        finally:
            self._eval_points = outer

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: Optional[bool] = None,
        ignore_keys: Optional[list[str]] = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """Inside :meth:`evaluate`: the base loop at each rank, metrics suffixed ``@r=<rank>`` (no predictions
        returned); otherwise (``predict``) the base loop at the model's current rank."""
        points = self._eval_points
        if points is None:
            return super().evaluation_loop(  # type: ignore[misc]
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        prefix = f"{metric_key_prefix}_"
        metrics: dict[str, float] = {}
        losses = []
        num_samples = 0
        for point in points:
            label = self.point_label(point)
            with self.at_point(point):
                output = super().evaluation_loop(  # type: ignore[misc]
                    dataloader, f"{description} at {label}", prediction_loss_only, ignore_keys, metric_key_prefix
                )
            num_samples += output.num_samples
            for key, value in output.metrics.items():
                name = key[len(prefix) :] if key.startswith(prefix) else key
                if name not in _SPEED_METRICS:
                    metrics[f"{prefix}{name}@{label}"] = value
            if f"{prefix}loss" in output.metrics:
                losses.append(output.metrics[f"{prefix}loss"])
        if losses:
            metrics[f"{prefix}loss"] = float(sum(losses) / len(losses))
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=num_samples)
