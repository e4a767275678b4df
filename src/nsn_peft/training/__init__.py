"""Multi-rank training of nested (NSN) models with ``transformers.Trainer``.

* :class:`NSNTrainer` — a ``Trainer`` that trains at several ranks per step; :class:`NSNTrainerMixin` — the same
  in front of any ``Trainer`` subclass (``class NSNSFTTrainer(NSNTrainerMixin, trl.SFTTrainer)``).
* :class:`UncertaintyWeightedLoss`, :class:`RankBuckets` — how per-rank losses are combined.
* :func:`dense_teacher_logits`, :func:`teacher_distillation_loss` — the dense teacher and the per-point loss that
  ``NSNTrainer(distill_teacher="dense")`` and the refinement recipe's end-to-end stage share (``dense_distill.py``).
* :func:`save_trained_adapter` — the trained adapter in the PEFT layout, from one process or a sharded run
  (FSDP2, DeepSpeed ZeRO-3; ``distributed.py`` holds what sharded runs do differently).
* :class:`TokenBlocks`, :func:`read_texts` — causal-LM examples from token blocks, documents from text folders
  with some subfolders held out (``lm_data.py``).
* Rank samplers — :class:`UniformRankSampler`, :class:`SandwichRankSampler`, :class:`FixedRankSampler`,
  :class:`ScheduledRankSampler`, :class:`StagedRankSampler`.
"""

from __future__ import annotations

from .dense_distill import dense_teacher_logits, teacher_distillation_loss
from .distributed import save_trained_adapter
from .lm_data import TokenBlocks, read_texts
from .loss import RankBuckets, UncertaintyWeightedLoss, distillation_loss
from .samplers import (
    FixedRankSampler,
    RankSampler,
    SandwichRankSampler,
    ScheduledRankSampler,
    StagedRankSampler,
    UniformRankSampler,
    as_rank_sampler,
    make_rank_sampler,
)
from .trainer import (
    MULTIRANK_STATE_JSON,
    MULTIRANK_STATE_TENSORS,
    NSNTrainer,
    NSNTrainerMixin,
    activation_checkpointing_kwargs,
    clear_dequantized_gguf_marker,
    default_eval_ranks,
)

__all__ = [
    "MULTIRANK_STATE_JSON",
    "MULTIRANK_STATE_TENSORS",
    "FixedRankSampler",
    "NSNTrainer",
    "NSNTrainerMixin",
    "RankBuckets",
    "RankSampler",
    "SandwichRankSampler",
    "ScheduledRankSampler",
    "StagedRankSampler",
    "TokenBlocks",
    "UncertaintyWeightedLoss",
    "UniformRankSampler",
    "activation_checkpointing_kwargs",
    "as_rank_sampler",
    "clear_dequantized_gguf_marker",
    "default_eval_ranks",
    "dense_teacher_logits",
    "distillation_loss",
    "make_rank_sampler",
    "read_texts",
    "save_trained_adapter",
    "teacher_distillation_loss",
]
