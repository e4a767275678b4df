"""Calibration-trained compression in one call: data-aware init at a budget, allocation chosen on validation
text, block-wise then end-to-end refinement against the dense model, resumable.

    model, report = compress_and_refine(base, calibration_blocks, 0.6)
    model.save_pretrained("nsn-60")            # an NSN adapter at the refined ranks
    save_compressed(model, "compressed-60")    # or a standalone compressed model
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..calibrate.stats import ActivationStats
from ..planning.allocate import allocate_ranks_for_budget, uniform_plan
from ..planning.plan import RankPlan
from ..tuner.config import NSNConfig
from ..tuner.layer import NSNLayer
from ..tuner.ranks import at_rank, set_rank
from ._common import check_tokens, mean_nll, model_device
from .blocks import nsn_factors
from .budgets import check_budgets
from .config import ALLOCATIONS, RefineConfig, RefineReport
from .ladder import compress_ladder
from .stages import _blockwise, _load, _resume, _run_stages, _split, calibration_statistics, truncate_to_active_ranks
from .state import RefineState, data_fingerprint, load_state, save_state

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOCATIONS",
    "RefineConfig",
    "RefineReport",
    "choose_on_validation",
    "compress_and_refine",
    "truncate_to_active_ranks",
]


def choose_on_validation(
    model: nn.Module,
    candidates: Mapping[str, Union[int, Mapping[str, int]]],
    validation: torch.Tensor,
    *,
    baseline: str = "uniform",
    batch_size: int = 8,
    precision: str = "auto",
) -> tuple[str, dict[str, float]]:
    """The candidate rank setting with the lowest validation NLL; ``baseline`` wins unless another is strictly lower.

    ``candidates`` maps names to what :func:`~nsn_peft.set_rank` takes. Returns ``(winner, {name: nll})``.
    """
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not among the candidates {sorted(candidates)}")
    scores = {}
    for name, ranks in candidates.items():
        with at_rank(model, ranks):
            scores[name] = mean_nll(model, validation, batch_size, precision)
    best = min(scores, key=lambda n: (scores[n], n != baseline))
    return (best if scores[best] < scores[baseline] else baseline), scores


def _plan_ranks(plan: RankPlan, maxima: Mapping[str, int]) -> dict[str, int]:
    return {n: plan.ranks.get(n, maxima[n]) for n in maxima}


def _layer_full_ranks(model: nn.Module, plans: Sequence[RankPlan]) -> dict[str, int]:
    shapes: dict[str, list[int]] = {}
    for plan in plans:
        shapes.update(plan.shapes)
    return {n: min(s) for n, s in shapes.items()}


def compress_and_refine(
    model: nn.Module,
    calibration: torch.Tensor,
    fraction: Optional[float] = None,
    *,
    budgets: Optional[Sequence[float]] = None,
    target_modules: Union[None, str, Sequence[str]] = None,
    allocation: str = "auto",
    validation: Optional[torch.Tensor] = None,
    stats: Optional[ActivationStats] = None,
    gradient_stats: Optional[ActivationStats] = None,
    config: Optional[RefineConfig] = None,
    granularity: int = 1,
    state_dir: Optional[Union[str, Path]] = None,
    show_progress: bool = True,
) -> tuple[nn.Module, RefineReport]:
    """Compress the targeted layers of a dense model to ``fraction`` of their parameters (or to a ladder of
    FLOPs ``budgets`` served by one adapter) and train the factors on calibration text against the dense model.

    1. Activation statistics (and, for the mixed allocation, output-gradient statistics) of ``calibration``.
    2. Whitened factors at a uniform allocation and at the loss-weighted mixed allocation
       (:func:`~nsn_peft.allocate_ranks_for_budget`); both are compared on validation text
       (``config.decide_after``) and mixed is kept only when it is strictly better — a model where it does
       not help gets the uniform plan, never a worse one.
    3. Block-wise refinement (:func:`~nsn_peft.refine.refine_blockwise`), then end-to-end distillation of the
       dense model's logits (:func:`~nsn_peft.refine.refine_end_to_end`).

    Args:
        model: the dense model (on the device to train on); it becomes the returned ``PeftModel``'s base
            and its weights stay untouched (they are the teacher).
        calibration: ``(sequences, seq_len)`` token ids (shuffled; the last ``validation_fraction`` of them are
            held out for validation when ``validation`` is not given).
        fraction: kept share of the targeted layers' parameters, in (0, 1) (= their share of matmul FLOPs).
        budgets: instead of ``fraction``, FLOPs fractions in (0, 1], ascending, e.g. ``[0.5, 0.6, 0.8]``: one
            adapter with nested per-layer plans (a layer's rank never shrinks as the budget grows; mixed vs
            uniform decided on the mean validation NLL over the budgets), factors stored up to the largest
            plan, the plans saved as ``NSNConfig.budget_plans`` so ``model.set_rank(flops=b)`` serves each
            budget, also after loading. Both stages train every budget of the ladder together
            (``config.budget_sampling`` / ``config.budget_weighting``). The model is returned at the largest budget.
        target_modules: layers to factor (names, regex or ``None``/``"all-linear"``).
        allocation: ``"auto"`` (mixed if better on validation, else uniform), ``"mixed"`` or ``"uniform"``.
        validation: ``(sequences, seq_len)`` token ids to decide the allocation on.
        stats / gradient_stats: precomputed statistics (else collected from ``calibration``).
        granularity: ranks are multiples of this (1: finest; 64 for fast GPU kernels).
        state_dir: folder for resumable checkpoints; a run pointed at a folder holding a state of the same data
            and settings continues where that one stopped (a finished one just rebuilds the result).

    Returns:
        ``(peft_model, report)``: the model at the refined ranks (factors truncated to them, layers kept dense
        unwrapped) and a :class:`RefineReport`.
    """
    from peft import get_peft_model

    config = config or RefineConfig()
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if (fraction is None) == (budgets is None):
        raise ValueError(
            "compress_and_refine takes either fraction= (one budget) or budgets= (a ladder served by one "
            f"adapter), got fraction={fraction!r}, budgets={budgets!r}"
        )
    if any(isinstance(m, NSNLayer) for m in model.modules()):
        raise ValueError(
            "compress_and_refine takes the dense model; this one already has NSN layers (use "
            "refine_blockwise / refine_end_to_end on an adapted model instead)"
        )
    if budgets is not None:
        return compress_ladder(
            model,
            calibration,
            check_budgets(budgets),
            target_modules=target_modules,
            allocation=allocation,
            validation=validation,
            stats=stats,
            gradient_stats=gradient_stats,
            config=config,
            granularity=granularity,
            state_dir=state_dir,
            show_progress=show_progress,
        )
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    calibration = check_tokens(calibration)
    train, validation = _split(calibration, validation, config.validation_fraction)
    bs = config.batch_size
    started = time.perf_counter()
    report = RefineReport(
        fraction=fraction,
        allocation=allocation,
        calibration_tokens=int(train.numel()),
        validation_tokens=int(validation.numel()),
    )
    fingerprint = {
        "calibration": data_fingerprint(train),
        "validation": data_fingerprint(validation),
        "fraction": fraction,
        "target_modules": sorted(target_modules) if isinstance(target_modules, (list, tuple, set)) else target_modules,
        "allocation": allocation,
        "granularity": granularity,
        "settings": config.fingerprint(),
    }
    saved = load_state(state_dir) if state_dir is not None else None
    if saved is not None:
        return _resume(model, train, validation, config, state_dir, saved, fingerprint, report, started, show_progress)

    report.validation_nll["dense"] = mean_nll(model, validation, bs, config.precision)
    t = time.perf_counter()
    stats, gradient_stats = calibration_statistics(
        model,
        train,
        config,
        stats=stats,
        gradient_stats=gradient_stats,
        need_gradients=allocation in ("mixed", "auto"),
        target_modules=target_modules,
        show_progress=show_progress,
    )
    plans: dict[str, RankPlan] = {}
    if allocation in ("uniform", "auto"):
        plans["uniform"] = uniform_plan(model, fraction, target_modules=target_modules, granularity=granularity)
    if allocation in ("mixed", "auto"):
        plans["mixed"] = allocate_ranks_for_budget(
            model,
            stats,
            fraction,
            target_modules=target_modules,
            granularity=granularity,
            gradient_stats=gradient_stats,
            device=model_device(model),
            show_progress=show_progress,
        )
    full = _layer_full_ranks(model, list(plans.values()))
    maxima = {n: max(_plan_ranks(p, full)[n] for p in plans.values()) for n in full}
    nsn_config = NSNConfig(
        target_modules=sorted(full),
        init="whitened",
        stats=stats,
        rank_pattern={re.escape(n): r for n, r in maxima.items()},
    )
    peft_model = get_peft_model(model, nsn_config)
    peft_model.eval()
    report.seconds["statistics_and_init"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    candidates = {name: _plan_ranks(plan, maxima) for name, plan in plans.items()}
    for name, plan in plans.items():
        with at_rank(peft_model, candidates[name]):
            report.candidates[name] = {
                "achieved": plan.target.get("achieved", plan.parameter_fraction()),
                "kept_dense": len(plan.kept_dense),
                "validation_nll_init": mean_nll(peft_model, validation, bs, config.precision),
            }
    blockwise_done = False
    trained: dict[str, dict[str, torch.Tensor]] = {}
    if len(plans) > 1 and config.decide_after == "blockwise" and config.blockwise_epochs > 0:
        factors = nsn_factors(peft_model)
        initial = {k: p.detach().to("cpu", copy=True) for k, p in factors.items()}
        for name, plan in plans.items():
            _load(factors, initial)
            set_rank(peft_model, candidates[name])
            result = _blockwise(peft_model, train, config, plan.kept_dense, show_progress)
            report.candidates[name]["validation_nll_blockwise"] = mean_nll(peft_model, validation, bs, config.precision)
            report.candidates[name]["blockwise_seconds"] = round(result.seconds, 2)
            trained[name] = {k: p.detach().to("cpu", copy=True) for k, p in factors.items()}
            report.candidates[name]["blockwise"] = asdict(result)
        key = "validation_nll_blockwise"
        blockwise_done = True
    else:
        key = "validation_nll_init"
    scores = {name: info[key] for name, info in report.candidates.items()}
    if "uniform" in scores:
        best = min(scores, key=lambda n: (scores[n], n != "uniform"))
        chosen = best if scores[best] < scores["uniform"] else "uniform"
    else:
        chosen = next(iter(scores))
    report.allocation = chosen
    if blockwise_done:
        _load(nsn_factors(peft_model), trained[chosen])
        report.blockwise = report.candidates[chosen].pop("blockwise")
        for info in report.candidates.values():
            info.pop("blockwise", None)
        report.validation_nll["blockwise"] = report.candidates[chosen]["validation_nll_blockwise"]
    del trained
    report.validation_nll["init"] = report.candidates[chosen]["validation_nll_init"]
    logger.info("Allocation: %s (validation NLL %s)", chosen, {n: round(v, 4) for n, v in scores.items()})
    set_rank(peft_model, candidates[chosen])
    plan = plans[chosen]
    _finalize_structure(peft_model, plan)
    report.ranks, report.kept_dense = dict(plan.ranks), list(plan.kept_dense)
    report.seconds["decision"] = round(time.perf_counter() - t, 2)
    state = RefineState(
        stage="end_to_end" if blockwise_done else "blockwise",
        fingerprint=fingerprint,
        settings=config.fingerprint(),
        extra={"report": report.to_dict()},
    )
    if state_dir is not None:
        save_state(state_dir, state, nsn_factors(peft_model))
    return _run_stages(peft_model, train, validation, config, state_dir, state, report, started, show_progress)


def _finalize_structure(model: nn.Module, plan: RankPlan) -> None:
    """Truncate the factors to the plan's ranks and give the layers it keeps dense back their dense module."""
    truncate_to_active_ranks(model)
    if plan.kept_dense:
        tuner = model.base_model
        adapter = model.active_adapter
        tuner._keep_dense(tuner.peft_config[adapter], adapter, list(plan.kept_dense))
        tuner._layer_index = None
