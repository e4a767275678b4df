"""The multi-rank step: every micro-batch runs at each rank the optimizer step drew, and the losses are combined.

Each optimizer step draws its ranks from the rank sampler (the same ranks in every process: sampling is a pure
function of seed and step). With ``backward_per_rank`` (the default) a micro-batch goes through the base trainer's
own ``training_step`` once per rank, so its forward, backward, gradient-accumulation scaling and whatever a derived
trainer wraps around them (TRL's activation offloading, context parallelism) apply to every rank; gradients of all
but the last rank only accumulate (no DDP/FSDP reduction, no DeepSpeed step). Otherwise one graph holds every rank
and the base ``training_step`` runs once. Either way each rank's term is
:meth:`~nsn_peft.training.UncertaintyWeightedLoss.term` of its task loss (the base trainer's ``compute_loss``),
blended with distillation from the top rank or the dense model when asked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from .dense_distill import dense_teacher_logits, teacher_distillation_loss
from .dense_distill import output_logits as _logits
from .distributed import accumulate_without_sync

__all__ = ["MultiRankStepMixin"]


@dataclass
class _RankPass:
    """The ranks of one micro-batch and what passes from one rank to the next (the distillation teacher)."""

    ranks: list[int]
    index: int = 0
    teacher: Optional[torch.Tensor] = None


class MultiRankStepMixin:
    """Training step, loss and training logs of :class:`~nsn_peft.training.NSNTrainerMixin` (a ``Trainer`` mixin)."""

    _rank_pass: Optional[_RankPass] = None
    _ranks_cache: Optional[tuple[int, list[int]]] = None

    def current_ranks(self) -> list[int]:
        """Ranks of the current optimizer step (``rank_sampler.sample(state.global_step)``), largest first."""
        step = self.state.global_step
        if self._ranks_cache is None or self._ranks_cache[0] != step:
            ranks = self.rank_sampler.sample(step)
            self._ranks_cache = (step, ranks)
            for r in ranks:
                self.rank_counts[r] += 1
            self.rank_meter.count_step(ranks)
        return self._ranks_cache[1]

    # -- the per-rank loss -------------------------------------------------------------------------------
    def compute_rank_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
        teacher_logits: Optional[torch.Tensor] = None,
        return_outputs: bool = True,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Any]:
        """One forward at the current rank: ``(task_loss, distillation_loss or None, outputs or None)``.

        The task loss is what the base trainer's ``compute_loss`` computes (label smoothing, ``compute_loss_func``,
        token-count normalisation, TRL's completion-only loss included); the distillation term is computed against
        ``teacher_logits`` when given. Override to customise the per-rank loss; the trainer blends them as
        ``(1-α)·task + α·distill``.
        """
        want_outputs = return_outputs or teacher_logits is not None
        result = super().compute_loss(  # type: ignore[misc]
            model, dict(inputs), return_outputs=want_outputs, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if want_outputs else (result, None)
        kd = None
        if teacher_logits is not None:
            student = _logits(outputs)
            if torch.is_grad_enabled() and loss.requires_grad and not student.requires_grad:
                raise ValueError(
                    f"Distillation (distill_alpha > 0) needs the logits the loss was computed from, but "
                    f"{_base_compute_loss_owner(self)}.compute_loss returns logits without gradients (TRL trainers "
                    "compute their loss through a fused LM head). Train with distill_alpha=0, or override "
                    "compute_rank_loss."
                )
            kd = self._distillation(student, teacher_logits, inputs, num_items_in_batch)
        return loss, kd, outputs

    def _distillation(
        self, logits: torch.Tensor, teacher: torch.Tensor, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> torch.Tensor:
        normalizer = None
        token_normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if token_normalised:
            normalizer = (
                num_items_in_batch.to(logits.device).float()
                if torch.is_tensor(num_items_in_batch)
                else float(num_items_in_batch)
            )
        kd = teacher_distillation_loss(
            logits,
            teacher,
            temperature=self.distill_temperature,
            labels=inputs.get("labels"),
            shift_labels=inputs.get("shift_labels"),
            normalizer=normalizer,
        )
        if token_normalised and self.args.average_tokens_across_devices:
            # Same scaling Trainer.compute_loss applies to the cross-entropy in this case.
            kd = kd * (
                self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
            )
        return kd

    @torch.no_grad()
    def _teacher_logits(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The distillation teacher's logits: the frozen dense model (``distill_teacher="dense"``) or the top rank."""
        if self.distill_teacher == "dense":
            # The same teacher as the refinement recipe's end-to-end stage.
            return dense_teacher_logits(
                model, inputs, nsn_model=self._nsn_model, context=self.compute_loss_context_manager()
            )
        batch = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        with self.at_point(self.top_rank), self.compute_loss_context_manager():
            outputs = model(**batch)
        return _logits(outputs).detach()

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of ``Trainer.training_step``: is the model's loss already normalised over the whole step?"""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def _rank_objective(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any,
        rank_pass: _RankPass,
        want_outputs: bool,
    ) -> tuple[torch.Tensor, Any]:
        """The weighted term of rank ``rank_pass.ranks[rank_pass.index]`` (the model already runs at that rank).

        Returned unscaled for gradient accumulation except for the regulariser: ``Trainer.training_step``
        divides the returned loss by the accumulation steps unless the task loss is already normalised over the
        whole step, and the log-variance regulariser must end up divided by them either way.
        """
        rank, top = rank_pass.ranks[rank_pass.index], self.top_rank
        ga = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        scaled = self._loss_scaled_for_ga(num_items_in_batch)
        divisor, regularizer = (1.0, 1.0 / ga) if scaled else (float(ga), 1.0)
        dense_teacher = self.distill_teacher == "dense"
        distill = self.distill_alpha > 0 and (len(self.rank_grid) > 1 or dense_teacher)
        if (
            rank_pass.index == 0
            and distill
            and (dense_teacher or (rank != top and any(r < top for r in rank_pass.ranks)))
        ):
            rank_pass.teacher = self._teacher_logits(model, inputs)
        student = distill and (dense_teacher or rank < top)
        makes_teacher = distill and not dense_teacher and rank == top
        task, kd, outputs = self.compute_rank_loss(
            model,
            inputs,
            num_items_in_batch,
            rank_pass.teacher if student else None,
            return_outputs=want_outputs or makes_teacher,
        )
        if self.args.n_gpu > 1:
            task = task.mean()
            kd = kd.mean() if kd is not None else None
        loss = task if kd is None else (1.0 - self.distill_alpha) * task + self.distill_alpha * kd
        objective = self.rank_loss.term(self.rank_buckets(rank), loss, regularizer_scale=regularizer)
        if makes_teacher:
            rank_pass.teacher = _logits(outputs).detach()
        self.rank_meter.add(rank, task / divisor, kd / divisor if kd is not None else None)
        return objective, outputs

    # -- Trainer hooks -----------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """In training: this rank's term (inside a per-rank step) or every rank of the step in one graph;
        otherwise (e.g. evaluation) the base trainer's loss at the model's current rank."""
        if not model.training:
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if self._rank_pass is not None:
            loss, outputs = self._rank_objective(model, inputs, num_items_in_batch, self._rank_pass, return_outputs)
        else:
            self._check_single_graph_allowed()
            rank_pass, loss, outputs = _RankPass(self.current_ranks()), None, None
            for index, rank in enumerate(rank_pass.ranks):
                rank_pass.index = index
                with self.at_point(rank):
                    objective, outputs = self._rank_objective(
                        model, inputs, num_items_in_batch, rank_pass, return_outputs
                    )
                loss = objective if loss is None else loss + objective
        return (loss, outputs) if return_outputs else loss

    def _check_single_graph_allowed(self) -> None:
        checkpointing = bool(
            getattr(self.args, "activation_checkpointing", False)
            or getattr(self.args, "gradient_checkpointing", False)
            or getattr(self._nsn_model, "is_activation_checkpointing", False)
        )
        if checkpointing:
            raise ValueError(
                "NSNTrainer(backward_per_rank=False) cannot be combined with activation checkpointing: the "
                "recomputation in backward would run at the last rank set, not at each forward's rank. "
                "Use backward_per_rank=True (the default)."
            )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """One micro-batch: the base ``training_step`` (forward + backward) at each rank of the step, or once for
        all ranks in one graph (``backward_per_rank=False``). Returns the summed objective, detached."""
        if not self.backward_per_rank:
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        rank_pass = _RankPass(self.current_ranks())
        total: Optional[torch.Tensor] = None
        self._rank_pass = rank_pass
        try:
            for index, rank in enumerate(rank_pass.ranks):
                rank_pass.index = index
                last = index == len(rank_pass.ranks) - 1
                sync = contextlib.nullcontext() if last else accumulate_without_sync(self.accelerator, model)
                with self.at_point(rank), sync:
                    loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
                total = loss if total is None else total + loss
        finally:
            self._rank_pass = None
        return total

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Adds ``loss@r=…``, ``distill@r=…`` and ``logvar@r=…`` to training logs (a collective call under DDP,
        like Trainer's)."""
        if (
            "loss" in logs
            and not any(k.startswith("eval_") for k in logs)
            and getattr(self, "rank_meter", None) is not None
        ):
            for rank, (task, kd) in self.rank_meter.collect().items():
                label = self.point_label(rank)
                logs[f"loss@{label}"] = task
                if self.distill_alpha > 0 and (self.distill_teacher == "dense" or rank < self.top_rank):
                    logs[f"distill@{label}"] = kd
            if self.rank_loss.learnable:
                for label, value in zip(self.bucket_labels(), self.rank_loss.log_vars.detach().tolist()):
                    logs[self.points.logvar_key(label)] = value
        super().log(logs, start_time)  # type: ignore[misc]


def _base_compute_loss_owner(trainer: Any) -> str:
    """Name of the class whose ``compute_loss`` the per-rank loss calls (the first after this mixin)."""
    mro = type(trainer).__mro__
    after = mro[mro.index(MultiRankStepMixin) + 1 :]
    return next((c.__name__ for c in after if "compute_loss" in vars(c)), "Trainer")
