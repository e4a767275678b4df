"""A ladder of budgets in one adapter: its nested plans, and :func:`compress_ladder` (``compress_and_refine(budgets=)``).

A ladder is one adapter serving several FLOPs budgets (``model.set_rank(flops=b)``): every budget's plan is a
truncation of the same factors, so a layer's rank never shrinks as the budget grows. Two candidate schedules
are made, as for one budget: ``"uniform"`` (every layer at the budget's share of its FLOPs) and ``"mixed"``
(the loss-weighted greedy cut of :func:`~nsn_peft.planning.nested_budget_ranks`, each layer capped at its
break-even rank so no layer stores factors larger than its dense weight).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Optional, Union

import torch
from torch import nn

from ..calibrate.stats import ActivationStats
from ..linalg.flops import break_even_rank
from ..planning.allocate import whitened_spectra
from ..planning.schedule import BudgetSchedule, nested_budget_ranks, plan_budget_schedule
from ..planning.targets import layer_shapes
from ..tuner.config import NSNConfig
from ..tuner.rank_spec import RankSpec, budget_key
from ..tuner.ranks import set_rank
from ._common import check_tokens, mean_nll, model_device
from .blocks import nsn_factors
from .config import RefineConfig, RefineReport
from .stages import (
    _blockwise,
    _load,
    _resume,
    _run_stages,
    _split,
    calibration_statistics,
    ladder_nll,
    truncate_to_active_ranks,
)
from .state import RefineState, data_fingerprint, load_state, save_state

logger = logging.getLogger(__name__)

__all__ = ["compress_ladder", "ladder_nll", "plan_ladder"]


def plan_ladder(
    model: nn.Module,
    budgets: Sequence[float],
    allocations: Sequence[str],
    *,
    stats: Optional[ActivationStats] = None,
    gradient_stats: Optional[ActivationStats] = None,
    target_modules: Union[None, str, Sequence[str]] = None,
    granularity: int = 1,
    device: Optional[torch.device] = None,
    show_progress: bool = True,
) -> dict[str, BudgetSchedule]:
    """``{allocation: schedule}`` of the dense ``model``'s targeted layers for ``budgets`` (ascending).

    ``"mixed"`` needs ``stats`` (and should get ``gradient_stats``); ``"uniform"`` only reads the shapes.
    """
    schedules: dict[str, BudgetSchedule] = {}
    if "uniform" in allocations:
        schedules["uniform"] = plan_budget_schedule(
            model,
            None,
            budgets,
            target_modules=target_modules,
            allocation="uniform",
            granularity=granularity,
            show_progress=False,
        )
    if "mixed" in allocations:
        if stats is None:
            raise ValueError("The mixed ladder needs activation statistics (stats=)")
        shapes = {n: (m, d) for n, (_, m, d) in layer_shapes(model, target_modules).items()}
        spectra = whitened_spectra(
            model,
            stats,
            target_modules=target_modules,
            gradient_stats=gradient_stats,
            device=device,
            show_progress=show_progress,
        )
        caps = {n: max(1, break_even_rank(m, d)) for n, (m, d) in shapes.items()}
        plans = nested_budget_ranks(spectra, shapes, budgets, max_ranks=caps, granularity=granularity)
        schedule = BudgetSchedule(
            plans, dict(plans[max(plans)]), {n: list(s) for n, s in shapes.items()}, "mixed", granularity=granularity
        )
        schedule.achieved = {b: schedule.flops_fraction(b) for b in plans}
        schedules["mixed"] = schedule
    return schedules


def compress_ladder(
    model,
    calibration,
    budgets: list[float],
    *,
    target_modules,
    allocation,
    validation,
    stats,
    gradient_stats,
    config: RefineConfig,
    granularity,
    state_dir,
    show_progress,
) -> tuple[nn.Module, RefineReport]:
    """:func:`compress_and_refine` over a ladder of budgets: nested plans, one adapter, every budget trained."""
    from peft import get_peft_model

    calibration = check_tokens(calibration)
    train, validation = _split(calibration, validation, config.validation_fraction)
    bs = config.batch_size
    started = time.perf_counter()
    report = RefineReport(
        fraction=None,
        allocation=allocation,
        budgets=list(budgets),
        calibration_tokens=int(train.numel()),
        validation_tokens=int(validation.numel()),
    )
    fingerprint = {
        "calibration": data_fingerprint(train),
        "validation": data_fingerprint(validation),
        "budgets": list(budgets),
        "target_modules": sorted(target_modules) if isinstance(target_modules, (list, tuple, set)) else target_modules,
        "allocation": allocation,
        "granularity": granularity,
        "settings": config.fingerprint(len(budgets)),
    }
    saved = load_state(state_dir) if state_dir is not None else None
    if saved is not None:
        return _resume(model, train, validation, config, state_dir, saved, fingerprint, report, started, show_progress)

    report.validation_nll["dense"] = mean_nll(model, validation, bs, config.precision)
    t = time.perf_counter()
    allocations = ("uniform", "mixed") if allocation == "auto" else (allocation,)
    stats, gradient_stats = calibration_statistics(
        model,
        train,
        config,
        stats=stats,
        gradient_stats=gradient_stats,
        need_gradients="mixed" in allocations,
        target_modules=target_modules,
        show_progress=show_progress,
    )
    schedules = plan_ladder(
        model,
        budgets,
        allocations,
        stats=stats,
        gradient_stats=gradient_stats,
        target_modules=target_modules,
        granularity=granularity,
        device=model_device(model),
        show_progress=show_progress,
    )
    # One model holds every candidate: each layer's factors up to the largest rank any candidate gives it.
    names = sorted(next(iter(schedules.values())).max_ranks)
    maxima = {n: max(s.max_ranks[n] for s in schedules.values()) for n in names}
    first = next(iter(schedules.values()))
    nsn_config = NSNConfig(
        target_modules=names,
        init="whitened",
        stats=stats,
        rank_pattern={re.escape(n): r for n, r in maxima.items()},
        budget_plans=first.config_budget_plans(),
    )
    peft_model = get_peft_model(model, nsn_config)
    peft_model.eval()
    plans_config = peft_model.peft_config[peft_model.active_adapter]
    report.seconds["statistics_and_init"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    for name, schedule in schedules.items():
        plans_config.budget_plans = schedule.config_budget_plans()
        per_budget = ladder_nll(peft_model, validation, budgets, bs, config.precision)
        report.candidates[name] = {
            "achieved": {budget_key(b): round(a, 6) for b, a in schedule.achieved.items()},
            "validation_nll_init": mean_over_budgets(per_budget),
            "validation_nll_init_per_budget": per_budget,
        }
    blockwise_done = False
    trained: dict[str, dict[str, torch.Tensor]] = {}
    points = [RankSpec.flops(b) for b in budgets]
    if len(schedules) > 1 and config.decide_after == "blockwise" and config.blockwise_epochs > 0:
        factors = nsn_factors(peft_model)
        initial = {k: p.detach().to("cpu", copy=True) for k, p in factors.items()}
        for name, schedule in schedules.items():
            _load(factors, initial)
            plans_config.budget_plans = schedule.config_budget_plans()
            result = _blockwise(
                peft_model,
                train,
                config,
                (),
                show_progress,
                points=points,
                sampling=config.budget_sampling,
                weighting=config.budget_weighting,
            )
            per_budget = ladder_nll(peft_model, validation, budgets, bs, config.precision)
            report.candidates[name].update(
                validation_nll_blockwise=mean_over_budgets(per_budget),
                validation_nll_blockwise_per_budget=per_budget,
                blockwise_seconds=round(result.seconds, 2),
                blockwise=asdict(result),
            )
            trained[name] = {k: p.detach().to("cpu", copy=True) for k, p in factors.items()}
        key = "validation_nll_blockwise"
        blockwise_done = True
    else:
        key = "validation_nll_init"
    scores = {name: info[key] for name, info in report.candidates.items()}
    # Mixed is shipped only when it is strictly better on the mean over the budgets: never worse than uniform.
    chosen = min(scores, key=lambda n: (scores[n], n != "uniform")) if "uniform" in scores else next(iter(scores))
    if "uniform" in scores and not scores[chosen] < scores["uniform"]:
        chosen = "uniform"
    report.allocation = chosen
    plans_config.budget_plans = schedules[chosen].config_budget_plans()
    for stage in ("init", "blockwise"):
        per_budget = report.candidates[chosen].get(f"validation_nll_{stage}_per_budget")
        if per_budget is not None and (stage == "init" or blockwise_done):
            report.validation_nll_per_budget[stage] = per_budget
            report.validation_nll[stage] = report.candidates[chosen][f"validation_nll_{stage}"]
    if blockwise_done:
        _load(nsn_factors(peft_model), trained[chosen])
        report.blockwise = report.candidates[chosen].pop("blockwise")
        report.seconds["blockwise"] = report.candidates[chosen]["blockwise_seconds"]
        for info in report.candidates.values():
            info.pop("blockwise", None)
    del trained
    logger.info("Ladder allocation: %s (mean validation NLL %s)", chosen, {n: round(v, 4) for n, v in scores.items()})
    # Store the factors up to the largest budget's plan only, and run there.
    set_rank(peft_model, RankSpec.flops(budgets[-1]))
    report.ranks = truncate_to_active_ranks(peft_model)
    report.budget_plans = dict(plans_config.budget_plans)
    report.seconds["decision"] = round(time.perf_counter() - t, 2)
    state = RefineState(
        stage="end_to_end" if blockwise_done else "blockwise",
        fingerprint=fingerprint,
        settings=config.fingerprint(len(budgets)),
        extra={"report": report.to_dict()},
    )
    if state_dir is not None:
        save_state(state_dir, state, nsn_factors(peft_model))
    return _run_stages(peft_model, train, validation, config, state_dir, state, report, started, show_progress)


def mean_over_budgets(scores: Mapping[str, float]) -> float:
    return sum(scores.values()) / len(scores)
