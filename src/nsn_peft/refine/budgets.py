"""A ladder of FLOPs budgets trained together: which budgets a step trains, and how their losses combine.

Both refinement stages train one set of nested factors at several operating points (the budgets' plans,
``RankSpec.flops(b)``). A step draws its budgets with :func:`budgets_at_step` — a pure function of
``(seed, step)``, so a resumed run draws the same budgets — and adds their losses through
:func:`make_budget_loss` (plain sum, or learned per-budget log-variances).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..training.loss import UncertaintyWeightedLoss
from .config import BUDGET_SAMPLINGS, BUDGET_WEIGHTINGS

__all__ = ["LOGVAR_LR", "budgets_at_step", "check_budgets", "make_budget_loss"]

# Absolute learning rate of the per-budget log-variances: their optimum log(loss) is a few units from 0, so
# they need a larger rate than the factors (the same default as NSNTrainer's logvar_learning_rate).
LOGVAR_LR = 1e-2


def check_budgets(budgets: Any) -> list[float]:
    """``budgets`` as a list of floats: non-empty, each a FLOPs fraction in (0, 1], strictly ascending.

    Raises ``ValueError`` naming the offending value (out of range, duplicated or out of order).
    """
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence) or not budgets:
        raise ValueError(f"budgets must be a non-empty list of FLOPs fractions in (0, 1], got {budgets!r}")
    values = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b) or not 0 < b <= 1:
            raise ValueError(f"Each budget must be a FLOPs fraction in (0, 1], got {b!r} in {list(budgets)}")
        values.append(float(b))
    for lower, upper in zip(values, values[1:]):
        if upper == lower:
            raise ValueError(f"budgets {values} name {lower:g} twice; list each budget once")
        if upper < lower:
            raise ValueError(f"budgets {values} are not sorted: {upper:g} follows {lower:g}; list them ascending")
    return values


def budgets_at_step(step: int, count: int, sampling: str, seed: int = 0) -> list[int]:
    """Indices (into the ascending budgets) trained at ``step``, smallest first.

    ``"all"``: every budget. ``"cycle"``: budget ``step mod count``. ``"sandwich"``: the smallest and the
    largest, plus one budget between them drawn from a generator seeded with ``(seed, step)``.
    """
    if sampling not in BUDGET_SAMPLINGS:
        raise ValueError(f"budget sampling must be one of {BUDGET_SAMPLINGS}, got {sampling!r}")
    if count == 1 or sampling == "all":
        return list(range(count))
    if sampling == "cycle":
        return [step % count]
    if count == 2:
        return [0, 1]
    generator = torch.Generator().manual_seed(seed * 1000003 + step)
    middle = 1 + int(torch.randint(count - 2, (1,), generator=generator))
    return [0, middle, count - 1]


def make_budget_loss(
    count: int, weighting: str, optimizer: torch.optim.Optimizer, log_vars: Sequence[float] = ()
) -> UncertaintyWeightedLoss:
    """The combination of ``count`` budgets' losses; learned log-variances join ``optimizer`` as their own group.

    ``log_vars`` restores the log-variances of a resumed run.
    """
    if weighting not in BUDGET_WEIGHTINGS:
        raise ValueError(f"budget weighting must be one of {BUDGET_WEIGHTINGS}, got {weighting!r}")
    device = optimizer.param_groups[0]["params"][0].device
    combine = UncertaintyWeightedLoss(count, weighting).to(device)
    if log_vars:
        with torch.no_grad():
            combine.log_vars.copy_(torch.tensor(list(log_vars), dtype=torch.float32))
    if combine.learnable:
        optimizer.add_param_group({"params": [combine.log_vars], "lr": LOGVAR_LR, "peak_lr": LOGVAR_LR})
    return combine
