"""Losses of multi-rank training: per-rank-bucket uncertainty weights and self-distillation.

At every step the nested model is run at a few ranks ``r`` and gives one loss ``L_r`` per rank. How to add
them up matters: small ranks have much larger losses than the full rank, so a plain sum lets them dominate
the gradient of the shared factors. :class:`UncertaintyWeightedLoss` learns one weight per *rank bucket*
(a group of neighbouring ranks) instead, as homoscedastic task uncertainty (Kendall, Gal & Cipolla, 2018).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RankBuckets", "UncertaintyWeightedLoss", "distillation_loss"]

Weighting = Literal["uncertainty", "sum"]
WEIGHTINGS = ("uncertainty", "sum")


class RankBuckets:
    """Groups the selectable ranks into contiguous buckets, each with its own loss weight.

    Args:
        grid: The selectable ranks (ascending, distinct), e.g. ``nsn_peft.selectable_ranks(model)``.
        num_buckets: How many buckets; ``None`` gives one bucket per rank. The ranks are split into
            ``num_buckets`` contiguous runs whose sizes differ by at most one (larger runs first).

    Example: ``RankBuckets([64, 128, 192, 256], 2)`` puts 64 and 128 in bucket 0, 192 and 256 in bucket 1.
    """

    def __init__(self, grid: Sequence[int], num_buckets: Optional[int] = None) -> None:
        grid = [int(r) for r in grid]
        if not grid:
            raise ValueError("RankBuckets needs at least one rank in the grid")
        if any(r < 1 for r in grid) or sorted(set(grid)) != grid:
            raise ValueError(f"RankBuckets grid must hold distinct positive ranks in ascending order, got {grid}")
        if num_buckets is None:
            num_buckets = len(grid)
        if not isinstance(num_buckets, int) or isinstance(num_buckets, bool) or not 1 <= num_buckets <= len(grid):
            raise ValueError(
                f"num_buckets must be an int in [1, {len(grid)}] (the number of ranks), got {num_buckets!r}"
            )
        self.grid = grid
        self.num_buckets = num_buckets
        base, extra = divmod(len(grid), num_buckets)
        self.members: list[list[int]] = []
        start = 0
        for b in range(num_buckets):
            size = base + (1 if b < extra else 0)
            self.members.append(grid[start : start + size])
            start += size
        self._index = {r: b for b, ranks in enumerate(self.members) for r in ranks}

    def __len__(self) -> int:
        return self.num_buckets

    def __call__(self, rank: int) -> int:
        return self.bucket(rank)

    def bucket(self, rank: int) -> int:
        """Index of the bucket holding ``rank`` (which must be on the grid)."""
        try:
            return self._index[rank]
        except KeyError:
            raise ValueError(f"Rank {rank!r} is not one of the selectable ranks {self.grid}") from None

    @property
    def labels(self) -> list[str]:
        """Readable names of the buckets: ``"64"`` for a single rank, ``"64-192"`` for a range."""
        return [str(m[0]) if len(m) == 1 else f"{m[0]}-{m[-1]}" for m in self.members]

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "num_buckets": self.num_buckets, "members": [list(m) for m in self.members]}

    def __repr__(self) -> str:
        return f"RankBuckets({self.labels})"


class UncertaintyWeightedLoss(nn.Module):
    r"""Combines per-rank losses with learned per-bucket log-variances, or as a fixed weighted sum.

    With ``weighting="uncertainty"`` (default) each rank bucket ``b`` has a trainable log-variance ``s_b`` and

    .. math::  L = \sum_r e^{-s_{b(r)}} L_r + s_{b(r)}

    **Why this form.** Reading each ``L_r`` as the negative log-likelihood of a model whose outputs are
    noisier at low rank, ``s = log σ²`` is that noise level, and the term above is (twice) the Gaussian
    negative log-likelihood ``½ e^{-s} L + ½ s`` of Kendall et al. For a fixed ``L_r`` it is minimised at
    ``s* = log L_r``, where the weight is ``e^{-s*} = 1 / L_r``: the gradient reaching the shared factors
    becomes ``Σ_r ∇L_r / L_r = Σ_r ∇ log L_r``, so every rank contributes its *relative* improvement and
    the large losses of small ranks no longer drown the full rank. The ``+ s`` term keeps the weights from
    collapsing to zero.

    **The ½ variant.** ``½ e^{-s} L + ½ s`` (regression form) has the same minimiser and the same
    equilibrium weights up to a global factor ½; Kendall's classification form ``e^{-s} L + ½ s`` moves
    the equilibrium to ``s* = log 2L``, again only a global factor ½ on the weights. The global factor only
    rescales the effective learning rate, so we keep the form without ½: at initialisation (``s = 0``) it
    *is* the plain sum of the rank losses, so a learning rate tuned for ordinary finetuning carries over.

    With ``weighting="sum"``, ``L = Σ_r w_{b(r)} L_r`` with fixed ``weights`` (default all 1); the
    log-variances then exist (for a uniform checkpoint format) but are frozen and unused.

    The log-variances are float32 whatever the model's dtype. Because ``s*`` = ``log L`` is a few units
    away from 0, they need a larger learning rate than the adapter (``NSNTrainer(logvar_learning_rate=…)``).

    Args:
        num_buckets: Number of rank buckets (see :class:`RankBuckets`).
        weighting: ``"uncertainty"`` or ``"sum"``.
        weights: Fixed per-bucket weights of ``"sum"`` (length ``num_buckets``); ``None`` = all 1.
        init_logvar: Initial value of every ``s_b``.
    """

    def __init__(
        self,
        num_buckets: int,
        weighting: Weighting = "uncertainty",
        weights: Optional[Sequence[float]] = None,
        init_logvar: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(num_buckets, int) or isinstance(num_buckets, bool) or num_buckets < 1:
            raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if weights is not None:
            if weighting != "sum":
                raise ValueError("weights= only applies to weighting='sum'; uncertainty weights are learned")
            weights = [float(w) for w in weights]
            if len(weights) != num_buckets:
                raise ValueError(f"weights has {len(weights)} entries but there are {num_buckets} rank buckets")
            if any(not math.isfinite(w) or w < 0 for w in weights):
                raise ValueError(f"weights must be finite and >= 0, got {weights}")
        if not math.isfinite(init_logvar):
            raise ValueError(f"init_logvar must be finite, got {init_logvar!r}")
        self.num_buckets = num_buckets
        self.weighting: Weighting = weighting
        self.log_vars = nn.Parameter(
            torch.full((num_buckets,), float(init_logvar), dtype=torch.float32),
            requires_grad=weighting == "uncertainty",
        )
        fixed = torch.tensor(weights if weights is not None else [1.0] * num_buckets, dtype=torch.float32)
        self.register_buffer("fixed_weights", fixed)

    @property
    def learnable(self) -> bool:
        return self.weighting == "uncertainty"

    def _check_bucket(self, bucket: int) -> None:
        if not isinstance(bucket, int) or not 0 <= bucket < self.num_buckets:
            raise ValueError(f"bucket must be an int in [0, {self.num_buckets}), got {bucket!r}")

    def term(self, bucket: int, loss: torch.Tensor, regularizer_scale: float = 1.0) -> torch.Tensor:
        """The contribution of one rank: ``e^{-s_b}·loss + regularizer_scale·s_b`` (or ``w_b·loss``).

        ``regularizer_scale`` lets a caller that splits one step into micro-batches add the ``+ s_b`` term
        in matching shares (the shares must sum to 1 over the step).
        """
        self._check_bucket(bucket)
        loss = loss.float()
        if self.weighting == "sum":
            return self.fixed_weights[bucket].to(loss.device) * loss
        s = self.log_vars[bucket].to(loss.device)
        return torch.exp(-s) * loss + regularizer_scale * s

    def forward(self, losses: Union[Mapping[int, torch.Tensor], Iterable[tuple[int, torch.Tensor]]]) -> torch.Tensor:
        """Total loss of ``{bucket: loss}`` or of ``(bucket, loss)`` pairs (two ranks may share a bucket)."""
        items = list(losses.items()) if isinstance(losses, Mapping) else list(losses)
        if not items:
            raise ValueError("UncertaintyWeightedLoss needs at least one (bucket, loss) pair")
        total = self.term(*items[0])
        for bucket, loss in items[1:]:
            total = total + self.term(bucket, loss)
        return total

    @torch.no_grad()
    def weights(self) -> torch.Tensor:
        """Current effective weight of each bucket (``e^{-s_b}`` or the fixed weights), detached."""
        if self.weighting == "sum":
            return self.fixed_weights.clone()
        return torch.exp(-self.log_vars.detach())

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, weighting={self.weighting!r}"


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    normalizer: Optional[Union[torch.Tensor, float]] = None,
) -> torch.Tensor:
    r"""``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` summed over positions and divided by ``normalizer``.

    Args:
        student_logits / teacher_logits: ``(..., vocab)``; the teacher is detached here in any case.
        mask: Boolean ``(...)`` of the positions that count (e.g. labels ``!= -100``); ``None`` = all.
        temperature: Softening temperature ``T``; the ``T²`` factor keeps gradient scales comparable across T.
        normalizer: Divisor of the summed KL; ``None`` = the number of counted positions (a mean).

    Computed in float32 whatever the logits' dtype.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    if mask is not None:
        flat = mask.reshape(-1)
        if flat.shape[0] != student.shape[0]:
            raise ValueError(f"mask has {flat.shape[0]} positions, logits have {student.shape[0]}")
        student, teacher = student[flat], teacher[flat]
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") * temperature**2
    if normalizer is None:
        normalizer = max(student.shape[0], 1)
    return kl / normalizer
