"""``NSNTrainer``: ``transformers.Trainer`` that trains a nested (NSN) model at several ranks per step.

Each optimizer step draws ranks from a :class:`~nsn_peft.training.RankSampler`, runs forward and backward at each
rank and combines the per-rank losses with :class:`~nsn_peft.training.UncertaintyWeightedLoss`. Everything else
is the ordinary Trainer: ``TrainingArguments`` (bf16/fp16, gradient accumulation, activation checkpointing,
save/eval strategies, ``resume_from_checkpoint``), DDP, FSDP2 and DeepSpeed ZeRO-3 under ``torchrun``/``accelerate
launch``.

:class:`NSNTrainerMixin` holds all of it and goes in front of any ``Trainer`` subclass
(``class NSNSFTTrainer(NSNTrainerMixin, trl.SFTTrainer)``); ``NSNTrainer`` is the mixin on ``Trainer`` itself.
The mixin is assembled from one part per responsibility:

* :mod:`.points` — the operating points (uniform ranks, or FLOPs budgets as levels);
* :mod:`.step` — the multi-rank training step, the per-rank loss and distillation, training logs;
* :mod:`.evaluate` — evaluation at several ranks;
* :mod:`.optimizer` — the log-variances' place in the optimisation;
* :mod:`.checkpoint` — the multi-rank state in checkpoints and resumed runs;
* :mod:`.distributed` — what sharded runs (FSDP2, DeepSpeed ZeRO-3) do differently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

from torch import nn
from transformers import Trainer

from ..gguf_models import clear_dequantized_gguf_marker
from ..tuner.dense import check_dense_weights
from ..tuner.ranks import nsn_layers
from .checkpoint import MULTIRANK_STATE_JSON, MULTIRANK_STATE_TENSORS, MultiRankCheckpointMixin
from .distributed import contiguous_factors, prepare_sharded_training
from .evaluate import MultiRankEvaluationMixin
from .loss import WEIGHTINGS, RankBuckets, UncertaintyWeightedLoss, Weighting
from .meter import RankLossMeter
from .optimizer import LogVarGradients, LogVarOptimizationMixin
from .points import TrainingPoints
from .samplers import FixedRankSampler, RankSampler, RankSamplerLike, as_rank_sampler
from .step import MultiRankStepMixin

__all__ = [
    "MULTIRANK_STATE_JSON",
    "MULTIRANK_STATE_TENSORS",
    "NSNTrainer",
    "NSNTrainerMixin",
    "activation_checkpointing_kwargs",
    "clear_dequantized_gguf_marker",
    "default_eval_ranks",
]

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
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": bool(enabled)
    }


class NSNTrainerMixin(MultiRankStepMixin, MultiRankEvaluationMixin, MultiRankCheckpointMixin, LogVarOptimizationMixin):
    """Multi-rank training of a model holding NSN adapters, in front of any ``transformers.Trainer`` subclass.

    ``class NSNSFTTrainer(NSNTrainerMixin, trl.SFTTrainer): pass`` trains TRL's supervised finetuning at several
    ranks per step: every rank's loss is the base trainer's ``compute_loss`` and every rank's pass its
    ``training_step``. Takes every argument of the base trainer plus the keyword-only options below. After the
    base trainer is built, its ``model`` must hold NSN layers with one active adapter (pass an NSN ``PeftModel``,
    or let the base trainer wrap one: ``SFTTrainer(..., peft_config=NSNConfig(...))``).

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
            (α = 1: pure distillation); 0 = off. Needs a base ``compute_loss`` that returns the logits it computed
            the loss from (``Trainer``'s does; TRL's fused-head trainers do not).
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
        backward_per_rank: Run the base ``training_step`` (forward + backward) once per rank (default). Needed
            with activation checkpointing (recomputation must see the same rank) and keeps one graph in memory
            instead of one per rank. ``False`` builds one graph for all ranks in :meth:`compute_loss` (without
            checkpointing).

    Logged during training: ``loss`` (the combined objective), ``loss@r=<rank>`` (mean task loss of each
    rank trained since the last log), ``distill@r=<rank>`` (with distillation) and ``logvar@r=<bucket>``.
    Checkpoints hold ``nsn_multirank_state.safetensors`` (log-variances) and ``nsn_multirank_state.json``
    (buckets, sampler state, per-rank step counts); ``resume_from_checkpoint`` restores both.
    """

    def __init__(
        self,
        model: Any = None,
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
        budgets: Optional[Sequence[float]] = None,
        **trainer_kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("NSNTrainer needs `model` (a model with NSN adapters); model_init is not supported.")
        _check_options(weighting, distill_alpha, distill_temperature, logvar_learning_rate, distill_teacher)
        if isinstance(model, nn.Module):
            if not nsn_layers(model) and trainer_kwargs.get("peft_config") is None:
                raise _no_nsn_layers()
            clear_dequantized_gguf_marker(model)
        if args is not None and getattr(args, "ddp_find_unused_parameters", None) is None:
            # Every NSN factor takes part in every forward (ranks below max slice views, whose gradient is
            # zero outside the slice), so DDP need not search the graph for unused parameters. Trainer would
            # otherwise turn the search on for any PeftModel.
            args.ddp_find_unused_parameters = False
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # The model as the base trainer keeps it (a base trainer may have wrapped it in the NSN adapter).
        model = self.model
        if not nsn_layers(model):
            raise _no_nsn_layers()
        if distill_teacher == "dense":
            check_dense_weights(model)
        self._nsn_model = model
        self.points = TrainingPoints(model, budgets)
        if budgets is not None:
            if eval_ranks is not None:
                raise ValueError("NSNTrainer(budgets=...) evaluates at every budget; eval_ranks does not apply")
            if rank_sampler is None:
                rank_sampler = FixedRankSampler(list(self.points.grid))
        self.distill_teacher = distill_teacher
        # With budgets the "ranks" are budget levels 1..K, so samplers, buckets and state work unchanged.
        self.rank_grid: list[int] = list(self.points.grid)
        sampler = as_rank_sampler(rank_sampler, seed=self.args.seed)
        if sampler.is_bound and sampler.grid != self.rank_grid:
            raise ValueError(
                f"rank_sampler is bound to ranks {sampler.grid}, but the model's selectable ranks are {self.rank_grid}"
            )
        self.rank_sampler: RankSampler = sampler.bind(self.rank_grid)
        self.rank_buckets = RankBuckets(self.rank_grid, num_rank_buckets)
        self.rank_loss = UncertaintyWeightedLoss(len(self.rank_buckets), weighting, fixed_weights, init_logvar).to(
            self.args.device
        )
        self.logvar_learning_rate = float(logvar_learning_rate)
        self.distill_alpha = float(distill_alpha)
        self.distill_temperature = float(distill_temperature)
        self.backward_per_rank = bool(backward_per_rank)
        self.eval_ranks = self._resolve_eval_ranks(eval_ranks)
        contiguous_factors(model)  # a model compiled or loaded for serving trains (and shards) contiguous factors
        # FSDP/DeepSpeed: checks, precise mixed precision, and an optimizer of their own for the log-variances.
        self._logvar_optimizer = prepare_sharded_training(self, model)
        if self.backward_per_rank and "lomo" in str(self.args.optim).lower():
            raise ValueError(f"NSNTrainer(backward_per_rank=True) does not support the {self.args.optim} optimizer")
        self.rank_counts: dict[int, int] = {r: 0 for r in self.rank_grid}
        self.rank_meter = RankLossMeter(self.rank_grid, self.args.device)
        self._ranks_cache = None
        self.add_callback(LogVarGradients(self))

    def _resolve_eval_ranks(self, eval_ranks: Optional[Sequence[int]]) -> list[int]:
        if self.budgets:
            return list(self.rank_grid)
        if eval_ranks is None:
            return default_eval_ranks(self.rank_grid)
        ranks = sorted({int(r) for r in eval_ranks})
        if not ranks or any(not 1 <= r <= self.top_rank for r in ranks):
            raise ValueError(
                f"eval_ranks {list(eval_ranks)} must be non-empty ranks in [1, {self.top_rank}] (the top rank)"
            )
        return ranks

    # -- the operating points ----------------------------------------------------------------------------
    @property
    def budgets(self) -> Optional[list[float]]:
        """The FLOPs budgets trained (ascending), or ``None`` when training uniform ranks."""
        return self.points.budgets

    @property
    def top_rank(self) -> int:
        return self.rank_grid[-1]

    def at_point(self, rank: int):
        """Context running the model at grid rank ``rank`` (with ``budgets``: at budget level ``rank``)."""
        return self.points.at(rank)

    def point_label(self, rank: int) -> str:
        """``"r=256"``, or ``"flops=0.5"`` with budgets: the suffix of per-rank logs and metrics."""
        return self.points.label(rank)

    def bucket_labels(self) -> list[str]:
        """Names of the loss buckets (``"8"``, ``"8-16"``; ``"flops=0.5"`` with budgets), in bucket order."""
        return self.points.bucket_labels(self.rank_buckets)

    def rank_weights(self) -> dict[str, float]:
        """Current effective weight of each rank bucket, ``{bucket label: weight}``."""
        return dict(zip(self.bucket_labels(), self.rank_loss.weights().tolist()))


class NSNTrainer(NSNTrainerMixin, Trainer):
    """``transformers.Trainer`` for multi-rank training of a model holding NSN adapters (see
    :class:`NSNTrainerMixin` for the options; the model must be a ``PeftModel`` or module with NSN layers)."""


def _check_options(
    weighting: str, distill_alpha: float, distill_temperature: float, logvar_learning_rate: float, distill_teacher: str
) -> None:
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


def _no_nsn_layers() -> ValueError:
    return ValueError(
        "NSNTrainer: the model has no NSN layers; wrap it first with "
        "peft.get_peft_model(model, nsn_peft.NSNConfig(target_modules=[...]))."
    )
