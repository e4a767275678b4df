"""How the rank log-variances are optimised beside the model.

They live outside the (DDP-wrapped) model, in :class:`~nsn_peft.training.UncertaintyWeightedLoss`, so neither
DDP's gradient averaging nor the Trainer's ``model.zero_grad()`` reaches them. In an unsharded run they join the
Trainer's optimizer as one more parameter group (no weight decay, their own learning rate, the same schedule); a
sharded run gives them an optimizer of their own (:class:`~nsn_peft.training.distributed.LogVarOptimizer`).
Either way their gradients are averaged over processes before each optimizer step and cleared after it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from .distributed import schedule_factor

__all__ = ["LogVarGradients", "LogVarOptimizationMixin"]


class LogVarGradients(TrainerCallback):
    """Average the log-variance gradients over processes before each optimizer step; clear them after.

    Each process computed ``1 - e^{-s} L_local``; their average equals the single-process gradient on the global
    batch, as DDP's averaging does for the model.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._sync_logvar_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._step_logvar_optimizer()
        self.trainer.rank_loss.log_vars.grad = None


class LogVarOptimizationMixin:
    """Optimizer parts of :class:`~nsn_peft.training.NSNTrainerMixin` (a ``Trainer`` mixin)."""

    _logvar_optimizer: Optional[Any] = None

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The base optimizer plus one parameter group for the log-variances (no weight decay; sharded runs
        give them an optimizer of their own instead)."""
        optimizer = super().create_optimizer(model)  # type: ignore[misc]
        if self.rank_loss.learnable and optimizer is not None and self._logvar_optimizer is None:
            present = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if id(self.rank_loss.log_vars) not in present:
                optimizer.add_param_group(
                    {"params": [self.rank_loss.log_vars], "lr": self.logvar_learning_rate, "weight_decay": 0.0}
                )
        return optimizer

    def _sync_logvar_gradients(self) -> None:
        grad = self.rank_loss.log_vars.grad
        if grad is None or not dist.is_available() or not dist.is_initialized():
            return
        world = dist.get_world_size()
        if world > 1:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad.div_(world)

    def _step_logvar_optimizer(self) -> None:
        if self._logvar_optimizer is not None:
            self._logvar_optimizer.step(schedule_factor(self.optimizer, self.lr_scheduler, self.args.learning_rate))
