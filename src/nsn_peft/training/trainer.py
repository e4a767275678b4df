"""``NSNTrainer``: ``transformers.Trainer`` that trains a nested (NSN) model at several ranks per step.

Each optimizer step draws ranks from a :class:`~nsn_peft.training.RankSampler` (same ranks in every process:
sampling is a pure function of seed and step), runs forward and backward at each rank and combines the
per-rank losses with :class:`~nsn_peft.training.UncertaintyWeightedLoss`. Everything else is the ordinary
Trainer: ``TrainingArguments`` (bf16/fp16, gradient accumulation, activation checkpointing, save/eval
strategies, ``resume_from_checkpoint``), DDP, FSDP2 and DeepSpeed ZeRO-3 under ``torchrun``/``accelerate launch``
(what sharded runs need besides lives in :mod:`nsn_peft.training.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import speed_metrics

from ..gguf_models import clear_dequantized_gguf_marker
from ..io import atomic_directory, finish_interrupted_save, write_json, write_safetensors
from ..tuner.dense import check_dense_weights, dense_model
from ..tuner.rank_spec import RankSpec
from ..tuner.ranks import at_rank, nsn_layers
from .distributed import (
    LogVarOptimizer,
    accumulate_without_sync,
    contiguous_factors,
    deepspeed_resume_directory,
    prepare_sharded_training,
    save_fsdp2_adapter,
    schedule_factor,
    sharding_name,
)
from .loss import WEIGHTINGS, RankBuckets, UncertaintyWeightedLoss, Weighting, distillation_loss
from .rank_ladder import RankLadder
from .samplers import FixedRankSampler, RankSampler, RankSamplerLike, as_rank_sampler

logger = logging.getLogger(__name__)

__all__ = [
    "MULTIRANK_STATE_JSON",
    "activation_checkpointing_kwargs",
    "MULTIRANK_STATE_TENSORS",
    "NSNTrainer",
    "clear_dequantized_gguf_marker",
    "default_eval_ranks",
]

MULTIRANK_STATE_TENSORS = "nsn_multirank_state.safetensors"
MULTIRANK_STATE_JSON = "nsn_multirank_state.json"
STATE_FORMAT_VERSION = 1
# Evaluation metrics that describe the run, not the model: summed over ranks instead of suffixed with @r=.
_SPEED_METRICS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "jit_compilation_time")
DEFAULT_EVAL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
DISTILL_TEACHERS = ("top", "dense")


def default_eval_ranks(grid: Sequence[int], fractions: Sequence[float] = DEFAULT_EVAL_FRACTIONS) -> list[int]:
    """The largest grid rank at or below each fraction of the top rank (at least the smallest), ascending."""
    top = grid[-1]
    chosen = set()
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"eval fractions must be in (0, 1], got {fraction!r}")
        below = [r for r in grid if r <= fraction * top + 1e-9]
        chosen.add(below[-1] if below else grid[0])
    return sorted(chosen)


def activation_checkpointing_kwargs(enabled: bool) -> dict[str, bool]:
    """``TrainingArguments`` keyword for activation checkpointing under the name this transformers uses.

    transformers renamed ``gradient_checkpointing`` to ``activation_checkpointing``; use
    ``TrainingArguments(..., **activation_checkpointing_kwargs(True))`` to run on either.
    """
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": bool(enabled)}


class _LogVarGradients(TrainerCallback):
    """Average the log-variance gradients over processes before each optimizer step; clear them after.

    The log-variances live outside the (DDP-wrapped) model, so neither DDP's gradient averaging nor the
    Trainer's ``model.zero_grad()`` reaches them. Each process computed ``1 - e^{-s} L_local``; their
    average equals the single-process gradient on the global batch, as DDP's averaging does for the model.
    """

    def __init__(self, trainer: NSNTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._sync_logvar_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._step_logvar_optimizer()
        self.trainer.rank_loss.log_vars.grad = None


class NSNTrainer(Trainer):
    """``transformers.Trainer`` for multi-rank training of a model holding NSN adapters.

    Takes every ``Trainer`` argument plus the keyword-only options below. The model must be a
    ``PeftModel`` (or module) with NSN layers and one active adapter.

    Args:
        rank_sampler: Which ranks to train at each step: a :class:`RankSampler`, a list of ranks (fixed),
            a callable ``step -> ranks`` (schedule hook) or ``None`` (sandwich: max + min + 2 random).
            It is bound to ``nsn_peft.selectable_ranks(model)`` (the granularity grid) and seeded with
            ``args.seed`` unless it was given its own seed.
        weighting: ``"uncertainty"`` (learned per-bucket log-variances) or ``"sum"`` (fixed weights).
        num_rank_buckets: Number of rank buckets sharing one log-variance; ``None`` = one per grid rank.
        fixed_weights: Per-bucket weights of ``weighting="sum"`` (default all 1).
        init_logvar: Initial log-variance of every bucket.
        logvar_learning_rate: Learning rate of the log-variances (they are added to the optimizer as their
            own parameter group without weight decay; the LR schedule applies to them too).
        distill_alpha: Distillation weight α: the loss of a rank becomes ``(1-α)·CE + α·T²·KL(teacher ‖ student)``
            (α = 1: pure distillation); 0 = off.
        distill_teacher: ``"top"`` (self-distillation: ranks below the top rank learn from the top rank's
            detached logits) or ``"dense"`` (every rank, the top one included, learns from the frozen dense
            model: the base layers' original weights with the NSN layers bypassed, one extra forward without
            gradients per micro-batch).
        distill_temperature: Distillation temperature ``T``.
        budgets: Train FLOPs budgets instead of uniform ranks: each is a key of ``NSNConfig.budget_plans``
            (nested per-layer ranks, :func:`nsn_peft.plan_budget_schedule`) and every step runs the model at
            the budgets' plans. The rank sampler then draws budget *levels* ``1..len(budgets)`` (1 = the
            smallest budget); by default every budget at every step. Logs and metrics read
            ``loss@flops=0.5``; evaluation runs at every budget.
        eval_ranks: Ranks :meth:`evaluate` reports, as ``eval_loss@r=<rank>``; ``None`` = the grid ranks
            at 25/50/75/100 % of the top rank. ``eval_loss`` is their mean.
        backward_per_rank: Run backward right after each rank's forward (default). Needed with activation
            checkpointing (recomputation must see the same rank) and keeps one graph in memory instead of
            one per rank. ``False`` builds one graph for all ranks in :meth:`compute_loss` (without
            checkpointing).

    Logged during training: ``loss`` (the combined objective), ``loss@r=<rank>`` (mean task loss of each
    rank trained since the last log), ``distill@r=<rank>`` (with distillation) and ``logvar@r=<bucket>``. Checkpoints hold
    ``nsn_multirank_state.safetensors`` (log-variances) and ``nsn_multirank_state.json`` (buckets, sampler
    state, per-rank step counts); ``resume_from_checkpoint`` restores both.
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Any = None,
        *trainer_args: Any,
        rank_sampler: Optional[RankSamplerLike] = None,
        weighting: Weighting = "uncertainty",
        num_rank_buckets: Optional[int] = None,
        fixed_weights: Optional[Sequence[float]] = None,
        init_logvar: float = 0.0,
        logvar_learning_rate: float = 1e-2,
        distill_alpha: float = 0.0,
        distill_temperature: float = 1.0,
        eval_ranks: Optional[Sequence[int]] = None,
        backward_per_rank: bool = True,
        distill_teacher: str = "top",
        budgets: Optional[Sequence[Union[float, RankSpec]]] = None,
        **trainer_kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("NSNTrainer needs `model` (a model with NSN adapters); model_init is not supported.")
        layers = nsn_layers(model)
        if not layers:
            raise ValueError(
                "NSNTrainer: the model has no NSN layers; wrap it first with "
                "peft.get_peft_model(model, nsn_peft.NSNConfig(target_modules=[...]))."
            )
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not 0 <= distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha!r}")
        if not distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature!r}")
        if not logvar_learning_rate >= 0:
            raise ValueError(f"logvar_learning_rate must be >= 0, got {logvar_learning_rate!r}")
        if distill_teacher not in DISTILL_TEACHERS:
            raise ValueError(f"distill_teacher must be one of {DISTILL_TEACHERS}, got {distill_teacher!r}")
        if distill_teacher == "dense":
            check_dense_weights(model)
        # With budgets the sampler draws budget levels 1..K, so samplers, buckets and state work unchanged.
        self.rank_ladder = RankLadder.for_model(model, budgets)  # raises, naming the budgets that have a plan
        self.budgets: Optional[list[float]] = self.rank_ladder.budgets
        if self.budgets is not None:
            if eval_ranks is not None:
                raise ValueError("NSNTrainer(budgets=...) evaluates at every budget; eval_ranks does not apply")
            if rank_sampler is None:
                rank_sampler = FixedRankSampler(self.rank_ladder.grid)
        clear_dequantized_gguf_marker(model)
        if args is not None and getattr(args, "ddp_find_unused_parameters", None) is None:
            # Every NSN factor takes part in every forward (ranks below max slice views, whose gradient is
            # zero outside the slice), so DDP need not search the graph for unused parameters. Trainer would
            # otherwise turn the search on for any PeftModel.
            args.ddp_find_unused_parameters = False
        super().__init__(model, args, *trainer_args, **trainer_kwargs)

        self._nsn_model = model
        self.distill_teacher = distill_teacher
        self.rank_grid: list[int] = self.rank_ladder.grid
        sampler = as_rank_sampler(rank_sampler, seed=self.args.seed)
        if sampler.is_bound and sampler.grid != self.rank_grid:
            raise ValueError(f"rank_sampler is bound to ranks {sampler.grid}, but the model's selectable ranks are {self.rank_grid}")
        self.rank_sampler: RankSampler = sampler.bind(self.rank_grid)
        self.rank_buckets = RankBuckets(self.rank_grid, num_rank_buckets)
        self.rank_loss = UncertaintyWeightedLoss(len(self.rank_buckets), weighting, fixed_weights, init_logvar).to(self.args.device)
        self.logvar_learning_rate = float(logvar_learning_rate)
        self.distill_alpha = float(distill_alpha)
        self.distill_temperature = float(distill_temperature)
        self.backward_per_rank = bool(backward_per_rank)
        if self.budgets:
            self.eval_ranks = list(self.rank_grid)
        elif eval_ranks is None:
            self.eval_ranks = default_eval_ranks(self.rank_grid)
        else:
            self.eval_ranks = sorted({int(r) for r in eval_ranks})
            bad = [r for r in self.eval_ranks if not 1 <= r <= self.rank_grid[-1]]
            if bad or not self.eval_ranks:
                raise ValueError(f"eval_ranks {list(eval_ranks)} must be non-empty ranks in [1, {self.rank_grid[-1]}] (the top rank)")
        contiguous_factors(model)  # a model compiled or loaded for serving trains (and shards) contiguous factors
        # FSDP/DeepSpeed: checks, precise mixed precision, and an optimizer of their own for the log-variances.
        self._logvar_optimizer: Optional[LogVarOptimizer] = prepare_sharded_training(self, model)
        if self.backward_per_rank and "lomo" in str(self.args.optim).lower():
            raise ValueError(f"NSNTrainer(backward_per_rank=True) does not support the {self.args.optim} optimizer")

        self.rank_counts: dict[int, int] = {r: 0 for r in self.rank_grid}
        self._rank_index = {r: i for i, r in enumerate(self.rank_grid)}
        self._rank_loss_sums = torch.zeros(len(self.rank_grid), dtype=torch.float64, device=self.args.device)
        self._distill_sums = torch.zeros_like(self._rank_loss_sums)
        self._rank_log_counts = [0] * len(self.rank_grid)
        self._ranks_cache: Optional[tuple[int, list[int]]] = None
        self.add_callback(_LogVarGradients(self))

    # -- ranks -------------------------------------------------------------------------------------
    @property
    def top_rank(self) -> int:
        return self.rank_grid[-1]

    def at_point(self, rank: int):
        """Context running the model at grid rank ``rank`` (with ``budgets``: at budget level ``rank``)."""
        return at_rank(self._nsn_model, self.rank_ladder.spec(rank))

    def point_label(self, rank: int) -> str:
        """``"r=256"``, or ``"flops=0.5"`` with budgets: the suffix of per-rank logs and metrics."""
        return self.rank_ladder.label(rank)

    def _bucket_labels(self) -> list[str]:
        return self.rank_ladder.bucket_labels(self.rank_buckets.members)

    def current_ranks(self) -> list[int]:
        """Ranks of the current optimizer step (``rank_sampler.sample(state.global_step)``), largest first."""
        step = self.state.global_step
        if self._ranks_cache is None or self._ranks_cache[0] != step:
            ranks = self.rank_sampler.sample(step)
            self._ranks_cache = (step, ranks)
            for r in ranks:
                self.rank_counts[r] += 1
                self._rank_log_counts[self._rank_index[r]] += 1
        return self._ranks_cache[1]

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train`` (same arguments); the ranks are drawn afresh from the (restored) global step."""
        self._ranks_cache = None
        resumed = deepspeed_resume_directory(self, args[0] if args else kwargs.get("resume_from_checkpoint"))
        if resumed is not None:  # Trainer resumes DeepSpeed without calling _load_from_checkpoint
            self._load_multirank_state_or_warn(resumed)
        return super().train(*args, **kwargs)

    def rank_weights(self) -> dict[str, float]:
        """Current effective weight of each rank bucket, ``{bucket label: weight}``."""
        return dict(zip(self._bucket_labels(), self.rank_loss.weights().tolist()))

    # -- optimizer -----------------------------------------------------------------------------------
    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer plus one parameter group for the log-variances (no weight decay; sharded runs
        give them an optimizer of their own instead)."""
        optimizer = super().create_optimizer(model)
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

    # -- losses --------------------------------------------------------------------------------------
    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of ``Trainer.training_step``: is the model's loss already normalised over the whole step?"""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def compute_rank_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Any]:
        """One forward at the current rank: ``(task_loss, distillation_loss or None, outputs)``.

        The task loss is what ``Trainer.compute_loss`` computes (label smoothing, ``compute_loss_func`` and
        token-count normalisation included); the distillation term is computed against ``teacher_logits``
        when given. Override to customise the per-rank loss; the trainer blends them as
        ``(1-α)·task + α·distill``.
        """
        loss, outputs = Trainer.compute_loss(
            self, model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        kd = None
        if teacher_logits is not None:
            kd = self._distillation(_logits(outputs), teacher_logits, inputs, num_items_in_batch)
        return loss, kd, outputs

    def _distillation(self, logits: torch.Tensor, teacher: torch.Tensor, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        mask = None
        student_logits, teacher_logits = logits, teacher
        if logits.dim() == 3:
            if inputs.get("shift_labels") is not None:
                mask = inputs["shift_labels"] != -100
            elif inputs.get("labels") is not None:
                # Causal LM: the logits at position i predict label i+1, as in the model's own loss.
                mask = inputs["labels"][..., 1:] != -100
                student_logits, teacher_logits = logits[..., :-1, :], teacher[..., :-1, :]
        normalizer = None
        token_normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if token_normalised:
            normalizer = num_items_in_batch.to(logits.device).float() if torch.is_tensor(num_items_in_batch) else float(num_items_in_batch)
        kd = distillation_loss(student_logits, teacher_logits, mask, self.distill_temperature, normalizer)
        if token_normalised and self.args.average_tokens_across_devices:
            # Same scaling Trainer.compute_loss applies to the cross-entropy in this case.
            kd = kd * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
        return kd

    @torch.no_grad()
    def _teacher_logits(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The distillation teacher's logits: the frozen dense model (``distill_teacher="dense"``) or the top rank."""
        batch = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        context = dense_model(self._nsn_model) if self.distill_teacher == "dense" else self.at_point(self.top_rank)
        with context, self.compute_loss_context_manager():
            outputs = model(**batch)
        return _logits(outputs).detach()

    def _multirank_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any, backward: bool) -> tuple[torch.Tensor, Any]:
        """Forward (and, with ``backward``, backward) at every rank of this step; returns (objective, last outputs)."""
        ranks = self.current_ranks()
        scaled = self._loss_scaled_for_ga(num_items_in_batch)
        ga = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        divisor = 1.0 if scaled else float(ga)
        if backward:
            # We call backward ourselves, so the GA division Trainer.training_step would apply happens here.
            loss_div, regularizer = divisor, 1.0 / ga
        else:
            # Trainer.training_step divides the returned loss by `divisor`: the regulariser must end up at 1/ga.
            loss_div, regularizer = 1.0, (1.0 / ga if scaled else 1.0)
        dense_teacher = self.distill_teacher == "dense"
        distill = self.distill_alpha > 0 and (len(self.rank_grid) > 1 or dense_teacher)
        teacher = None
        if distill and (dense_teacher or (ranks[0] != self.top_rank and any(r < self.top_rank for r in ranks))):
            teacher = self._teacher_logits(model, inputs)
        total: Optional[torch.Tensor] = None
        outputs = None
        for i, rank in enumerate(ranks):
            last = i == len(ranks) - 1
            sync = contextlib.nullcontext() if (last or not backward) else accumulate_without_sync(self.accelerator, model)
            with self.at_point(rank), sync:
                with self.compute_loss_context_manager():
                    task, kd, outputs = self.compute_rank_loss(
                        model, inputs, num_items_in_batch,
                        teacher if (distill and (dense_teacher or rank < self.top_rank)) else None,
                    )
                if self.args.n_gpu > 1:
                    task = task.mean()
                    kd = kd.mean() if kd is not None else None
                loss = task if kd is None else (1.0 - self.distill_alpha) * task + self.distill_alpha * kd
                objective = self.rank_loss.term(self.rank_buckets(rank), loss / loss_div, regularizer_scale=regularizer)
                if backward:
                    self.accelerator.backward(objective)
                    objective = objective.detach()
            if distill and not dense_teacher and rank == self.top_rank:
                teacher = _logits(outputs).detach()
            index = self._rank_index[rank]
            self._rank_loss_sums[index] += (task.detach() / divisor).to(self._rank_loss_sums)
            if kd is not None:
                self._distill_sums[index] += (kd.detach() / divisor).to(self._distill_sums)
            total = objective if total is None else total + objective
            if backward and not last:
                outputs = None
        return total, outputs

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """In training mode: the multi-rank objective in one graph (all ranks of this step); otherwise (e.g.
        evaluation) the plain loss at the model's current rank."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self._check_single_graph_allowed()
        loss, outputs = self._multirank_loss(model, inputs, num_items_in_batch, backward=False)
        return (loss, outputs) if return_outputs else loss

    def _check_single_graph_allowed(self) -> None:
        base = self._nsn_model
        checkpointing = bool(
            getattr(self.args, "activation_checkpointing", False)
            or getattr(self.args, "gradient_checkpointing", False)
            or getattr(base, "is_activation_checkpointing", False)
        )
        if checkpointing:
            raise ValueError(
                "NSNTrainer(backward_per_rank=False) cannot be combined with activation checkpointing: the "
                "recomputation in backward would run at the last rank set, not at each forward's rank. "
                "Use backward_per_rank=True (the default)."
            )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """One micro-batch: forward + backward at each rank of the step (see ``backward_per_rank``)."""
        if not self.backward_per_rank:
            return super().training_step(model, inputs, num_items_in_batch)
        prepare_cp = getattr(self, "_prepare_context_parallel_inputs", None)
        cp_context, inputs = prepare_cp(model, inputs) if prepare_cp is not None else (contextlib.nullcontext, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            total, _ = self._multirank_loss(model, inputs, num_items_in_batch, backward=True)
            del inputs
            steps = self.args.torch_empty_cache_steps
            if steps is not None and self.state.global_step % steps == 0 and torch.cuda.is_available():
                torch.cuda.empty_cache()
        return total.detach()

    # -- logging -------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Adds ``loss@r=…`` and ``logvar@r=…`` to training logs (a collective call under DDP, like Trainer's)."""
        if "loss" in logs and not any(k.startswith("eval_") for k in logs) and hasattr(self, "_rank_loss_sums"):
            counts = torch.tensor(self._rank_log_counts, dtype=torch.float64, device=self._rank_loss_sums.device)
            packed = torch.cat([self._rank_loss_sums, self._distill_sums, counts])
            world = 1
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                world = dist.get_world_size()
                packed = packed.clone()
                dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            n = len(self.rank_grid)
            sums, distill, all_counts = packed[:n].tolist(), packed[n : 2 * n].tolist(), packed[2 * n :].tolist()
            if any(abs(c - world * local) > 0.5 for c, local in zip(all_counts, self._rank_log_counts)):
                raise RuntimeError(
                    "Processes trained different ranks (per-rank step counts differ across processes): the rank "
                    "sampler must be deterministic in (seed, step) and use the same seed in every process."
                )
            for i, rank in enumerate(self.rank_grid):
                if self._rank_log_counts[i]:
                    label = self.point_label(rank)
                    logs[f"loss@{label}"] = sums[i] / (world * self._rank_log_counts[i])
                    if self.distill_alpha > 0 and (self.distill_teacher == "dense" or rank < self.top_rank):
                        logs[f"distill@{label}"] = distill[i] / (world * self._rank_log_counts[i])
            if self.rank_loss.learnable:
                for label, value in zip(self._bucket_labels(), self.rank_loss.log_vars.detach().tolist()):
                    logs[f"logvar@{label}" if self.budgets else f"logvar@r={label}"] = value
            self._rank_loss_sums.zero_()
            self._distill_sums.zero_()
            self._rank_log_counts = [0] * n
        super().log(logs, start_time)

    # -- evaluation ----------------------------------------------------------------------------------
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
        override = eval_dataset is not None
        dataset = eval_dataset if override else self.eval_dataset
        if isinstance(dataset, dict):
            metrics: dict[str, float] = {}
            for name, subset in dataset.items():
                metrics.update(
                    self.evaluate(
                        eval_dataset=subset if override else name, ignore_keys=ignore_keys,
                        metric_key_prefix=f"{metric_key_prefix}_{name}", eval_ranks=eval_ranks,
                    )
                )
            return metrics
        if eval_ranks is not None and self.budgets:
            raise ValueError("NSNTrainer(budgets=...) evaluates at every budget; eval_ranks does not apply")
        ranks = self.eval_ranks if eval_ranks is None else sorted({int(r) for r in eval_ranks})
        self._memory_tracker.start()
        dataloader = self.get_eval_dataloader(dataset)
        start_time = time.time()
        prefix = f"{metric_key_prefix}_"
        metrics = {}
        losses = []
        num_samples = 0
        for rank in ranks:
            with self.at_point(rank):
                output = self.evaluation_loop(
                    dataloader,
                    description=f"Evaluation at {self.point_label(rank)}",
                    prediction_loss_only=True if self.compute_metrics is None else None,
                    ignore_keys=ignore_keys,
                    metric_key_prefix=metric_key_prefix,
                )
            num_samples += output.num_samples
            for key, value in output.metrics.items():
                name = key[len(prefix):] if key.startswith(prefix) else key
                if name in _SPEED_METRICS:
                    continue
                metrics[f"{prefix}{name}@{self.point_label(rank)}"] = value
            if f"{prefix}loss" in output.metrics:
                losses.append(output.metrics[f"{prefix}loss"])
        if losses:
            metrics[f"{prefix}loss"] = float(sum(losses) / len(losses))
        total_batch_size = self.args.eval_batch_size * self.args.world_size
        metrics.update(
            speed_metrics(
                metric_key_prefix, start_time, num_samples=num_samples, num_steps=math.ceil(num_samples / total_batch_size)
            )
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------------
    def multirank_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, json)`` of the multi-rank state: log-variances; weighting, buckets, sampler, counts."""
        tensors = {
            "log_vars": self.rank_loss.log_vars.detach().float().cpu(),
            "fixed_weights": self.rank_loss.fixed_weights.detach().float().cpu(),
        }
        if self._logvar_optimizer is not None:
            tensors.update(self._logvar_optimizer.state_tensors())
        meta = {
            "format_version": STATE_FORMAT_VERSION,
            "weighting": self.rank_loss.weighting,
            "grid": list(self.rank_grid),
            "buckets": self.rank_buckets.to_dict(),
            "bucket_labels": self._bucket_labels(),
            "budgets": self.budgets,
            "distill_teacher": self.distill_teacher,
            "log_vars": self.rank_loss.log_vars.detach().tolist(),
            "sampler": self.rank_sampler.state_dict(),
            "rank_counts": {str(r): n for r, n in self.rank_counts.items()},
            "global_step": int(self.state.global_step),
            "distill_alpha": self.distill_alpha,
            "distill_temperature": self.distill_temperature,
        }
        return tensors, meta

    def save_multirank_state(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``nsn_multirank_state.safetensors`` + ``.json`` into ``directory`` (one transaction, no pickle)."""
        tensors, meta = self.multirank_state()
        with atomic_directory(directory) as staging:
            write_safetensors(staging / MULTIRANK_STATE_TENSORS, tensors, metadata={"format": "nsn-peft-multirank-state"})
            write_json(staging / MULTIRANK_STATE_JSON, meta)

    def load_multirank_state(self, directory: Union[str, os.PathLike]) -> None:
        """Restore the state written by :meth:`save_multirank_state` (log-variances, sampler, counts)."""
        directory = Path(directory)
        finish_interrupted_save(directory)
        tensor_path, json_path = directory / MULTIRANK_STATE_TENSORS, directory / MULTIRANK_STATE_JSON
        if not tensor_path.is_file() or not json_path.is_file():
            raise FileNotFoundError(f"'{directory}' holds no multi-rank state ({MULTIRANK_STATE_TENSORS} and {MULTIRANK_STATE_JSON})")
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"Corrupt {json_path}: {err}") from err
        if meta.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"{json_path} has format_version {meta.get('format_version')!r}; this version reads {STATE_FORMAT_VERSION}")
        if meta.get("budgets") != self.budgets:
            raise ValueError(f"{json_path} was saved for FLOPs budgets {meta.get('budgets')}, this trainer trains {self.budgets}")
        if meta.get("grid") != self.rank_grid:
            raise ValueError(f"{json_path} was saved for selectable ranks {meta.get('grid')}, this model has {self.rank_grid}")
        if meta.get("buckets", {}).get("members") != self.rank_buckets.members:
            raise ValueError(
                f"{json_path} has rank buckets {meta.get('bucket_labels')}, this trainer {self._bucket_labels()}: "
                "pass the same num_rank_buckets as the run that saved it"
            )
        if meta.get("weighting") != self.rank_loss.weighting:
            raise ValueError(f"{json_path} was saved with weighting={meta.get('weighting')!r}, this trainer uses {self.rank_loss.weighting!r}")
        tensors = load_file(str(tensor_path))
        log_vars = tensors.get("log_vars")
        if log_vars is None or tuple(log_vars.shape) != tuple(self.rank_loss.log_vars.shape):
            raise ValueError(f"{tensor_path}: log_vars missing or of the wrong shape (expected {tuple(self.rank_loss.log_vars.shape)})")
        with torch.no_grad():
            self.rank_loss.log_vars.copy_(log_vars.to(self.rank_loss.log_vars))
        if self._logvar_optimizer is not None and not self._logvar_optimizer.load_state_tensors(tensors):
            logger.warning("%s holds no log-variance optimizer state (saved by an unsharded run): it starts afresh", tensor_path)
        self.rank_sampler.load_state_dict(meta["sampler"])
        self.rank_counts = {r: int(meta.get("rank_counts", {}).get(str(r), 0)) for r in self.rank_grid}
        self._ranks_cache = None
        logger.info("Restored multi-rank state from %s (log-variances %s)", directory, [round(v, 4) for v in log_vars.tolist()])

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` plus the multi-rank state (so every checkpoint folder carries it).

        Under FSDP2 the adapter is gathered from the shards (a collective call) and written in the ordinary
        single-file PEFT layout, loadable in one process on any device."""
        if sharding_name(self) == "fsdp2":
            save_fsdp2_adapter(self, output_dir if output_dir is not None else self.args.output_dir)
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.save_multirank_state(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_multirank_state_or_warn(resume_from_checkpoint)

    def _load_multirank_state_or_warn(self, resume_from_checkpoint: str) -> None:
        if (Path(resume_from_checkpoint) / MULTIRANK_STATE_JSON).is_file():
            self.load_multirank_state(resume_from_checkpoint)
        else:
            logger.warning(
                "Checkpoint %s has no %s: the rank log-variances and sampler start afresh", resume_from_checkpoint, MULTIRANK_STATE_JSON
            )


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        if "logits" in outputs:
            return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        return outputs[1]
    raise ValueError("Self-distillation needs the model outputs to hold `logits`")
