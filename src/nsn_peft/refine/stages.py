"""The stages of :func:`~nsn_peft.refine.compress_and_refine` after the plan is fixed, shared by one budget and a
ladder: block-wise then end-to-end refinement, checkpoints in ``state_dir``, and resuming from them."""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Optional

import torch
from torch import nn

from ..calibrate.collect import collect_activation_stats, collect_gradient_stats
from ..calibrate.stats import ActivationStats
from ..tuner.config import NSNConfig
from ..tuner.rank_spec import RankSpec, budget_key
from ..tuner.ranks import at_rank, get_rank, nsn_layers, set_rank
from ._common import check_tokens, mean_nll
from .blocks import nsn_factors
from .blockwise import refine_blockwise
from .config import RefineConfig, RefineReport
from .distill import refine_end_to_end
from .state import RefineState, load_state, restore_factors, restore_optimizer, save_state

logger = logging.getLogger(__name__)

__all__ = ["ladder_nll", "truncate_to_active_ranks"]


@torch.no_grad()
def truncate_to_active_ranks(model: nn.Module) -> dict[str, int]:
    """Shrink every NSN layer's factors to its active rank (the max rank becomes the active rank) and record
    the ranks in the adapter config (``rank_pattern``), so the adapter saves and loads at these shapes."""
    ranks = get_rank(model)
    layers = nsn_layers(model)
    tuner = model.base_model if hasattr(model, "base_model") and hasattr(model.base_model, "peft_config") else None
    for name, layer in layers.items():
        adapter = next(a for a in layer.active_adapters if a in layer.nsn_A)
        r = ranks[name]
        if r < layer.nsn_max_rank[adapter]:
            layer.set_factors(adapter, layer.nsn_B[adapter][:, :r].clone(), layer.nsn_A[adapter][:r].clone())
        if tuner is not None:
            tuner.peft_config[adapter].rank_pattern[re.escape(name)] = r
    return ranks


def _split(
    calibration: torch.Tensor, validation: Optional[torch.Tensor], fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if validation is not None:
        return calibration, check_tokens(validation, "validation")
    n = calibration.shape[0]
    held = max(1, round(n * fraction))
    if n - held < 1:
        raise ValueError(f"{n} calibration sequences are too few to hold out validation sequences; pass validation=")
    return calibration[: n - held], calibration[n - held :]


def _load(factors: Mapping[str, nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in factors.items():
            param.copy_(values[name].to(param))


def _blockwise(model, train, config: RefineConfig, frozen, show_progress, start_block=0, on_block_done=None, **ladder):
    tokens = (
        train
        if config.blockwise_tokens is None
        else train[: max(config.batch_size, config.blockwise_tokens // train.shape[1])]
    )
    return refine_blockwise(
        model,
        tokens,
        epochs=config.blockwise_epochs,
        lr=config.blockwise_lr,
        batch_size=config.batch_size,
        precision=config.precision,
        seed=config.seed,
        frozen=frozen,
        start_block=start_block,
        on_block_done=on_block_done,
        show_progress=show_progress,
        **ladder,
    )


def _run_stages(
    model,
    train,
    validation,
    config: RefineConfig,
    state_dir,
    state: RefineState,
    report: RefineReport,
    started: float,
    show_progress: bool,
) -> tuple[nn.Module, RefineReport]:
    bs = config.batch_size
    factors = nsn_factors(model)
    # A ladder trains its budgets' plans together; a single budget trains the active ranks.
    points = [RankSpec.flops(b) for b in report.budgets] if report.budgets else None
    ladder = (
        {"points": points, "sampling": config.budget_sampling, "weighting": config.budget_weighting} if points else {}
    )

    def validate(stage: str) -> None:
        if points is None:
            report.validation_nll[stage] = mean_nll(model, validation, bs, config.precision)
        else:
            per_budget = ladder_nll(model, validation, report.budgets, bs, config.precision)
            report.validation_nll_per_budget[stage] = per_budget
            report.validation_nll[stage] = sum(per_budget.values()) / len(per_budget)

    def checkpoint(optimizer=None) -> None:
        if state_dir is not None:
            state.extra["report"] = report.to_dict()
            save_state(state_dir, state, factors, optimizer)

    if state.stage == "blockwise":
        t = time.perf_counter()
        if config.blockwise_epochs > 0:

            def block_done(index: int, record: dict) -> None:
                state.block = index + 1
                state.history.append({"stage": "blockwise", **record})
                checkpoint()

            result = _blockwise(
                model, train, config, (), show_progress, start_block=state.block, on_block_done=block_done, **ladder
            )
            report.blockwise = asdict(result)
            validate("blockwise")
        report.seconds["blockwise"] = round(time.perf_counter() - t + report.seconds.get("blockwise", 0.0), 2)
        state.stage, state.step = "end_to_end", 0
        checkpoint()
    if state.stage == "end_to_end":
        t = time.perf_counter()
        if config.e2e_tokens != 0:
            last_save = [time.perf_counter()]

            def interval(steps: int, optimizer, record: dict) -> None:
                state.history.append({"stage": "end_to_end", **record})
                if time.perf_counter() - last_save[0] >= config.save_interval_s:
                    state.step = steps
                    checkpoint(optimizer)
                    last_save[0] = time.perf_counter()

            loader = None
            if state.step > 0 and state_dir is not None:
                meta = load_state(state_dir)[1]

                def loader(optimizer, meta=meta):
                    restore_optimizer(state_dir, meta, optimizer)

            if points is not None:
                ladder["log_vars"] = _saved_log_vars(state)
            result = refine_end_to_end(
                model,
                train,
                tokens=config.e2e_tokens,
                lr=config.e2e_lr,
                batch_size=bs,
                temperature=config.temperature,
                precision=config.precision,
                seed=config.seed,
                start_step=state.step,
                optimizer_state=loader,
                on_interval=interval,
                log_every=config.log_every,
                show_progress=show_progress,
                **ladder,
            )
            report.end_to_end = asdict(result)
            validate("end_to_end")
        report.seconds["end_to_end"] = round(time.perf_counter() - t + report.seconds.get("end_to_end", 0.0), 2)
        state.stage = "done"
        checkpoint()
    report.seconds["total"] = round(time.perf_counter() - started + report.seconds.get("total_before_resume", 0.0), 2)
    return model, report


def _saved_log_vars(state: RefineState) -> list[float]:
    """The budgets' log-variances at the saved end-to-end step (empty: none saved, start from 0)."""
    for record in reversed(state.history):
        if record.get("stage") == "end_to_end" and record.get("step") == state.step and "log_vars" in record:
            return list(record["log_vars"])
    return []


def _resume(model, train, validation, config, state_dir, saved, fingerprint, report, started, show_progress):
    from peft import get_peft_model

    state, _ = saved
    if state.fingerprint != fingerprint:
        differs = sorted(
            k for k in set(state.fingerprint) | set(fingerprint) if state.fingerprint.get(k) != fingerprint.get(k)
        )
        raise ValueError(
            f"The refinement state in {state_dir} was made with other inputs ({', '.join(differs)} differ); "
            "pass another state_dir or delete that folder to start afresh"
        )
    previous = state.extra.get("report", {})
    known = set(RefineReport.__dataclass_fields__)
    report = RefineReport(**{k: copy.deepcopy(v) for k, v in previous.items() if k in known})
    report.resumed = True
    report.seconds["total_before_resume"] = previous.get("seconds", {}).get("total", 0.0)
    # The factors come from the state, so the init that would be overwritten is the cheapest one (plain SVD).
    ranks = report.ranks
    nsn_config = NSNConfig(
        target_modules=sorted(ranks),
        init="svd",
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
        budget_plans=report.budget_plans,
    )
    peft_model = get_peft_model(model, nsn_config)
    peft_model.eval()
    restore_factors(state_dir, nsn_factors(peft_model))
    if report.budgets:
        set_rank(peft_model, RankSpec.flops(report.budgets[-1]))
    logger.info(
        "Resuming refinement from %s at stage %s (block %d, step %d)", state_dir, state.stage, state.block, state.step
    )
    return _run_stages(peft_model, train, validation, config, state_dir, state, report, started, show_progress)


def ladder_nll(
    model: nn.Module, validation: torch.Tensor, budgets: Sequence[float], batch_size: int = 8, precision: str = "auto"
) -> dict[str, float]:
    """Mean validation NLL at each budget of the adapter's stored plans, ``{budget key: nll}``."""
    scores = {}
    for budget in budgets:
        with at_rank(model, RankSpec.flops(budget)):
            scores[budget_key(budget)] = mean_nll(model, validation, batch_size, precision)
    return scores


def calibration_statistics(
    model: nn.Module,
    train: torch.Tensor,
    config: RefineConfig,
    *,
    stats: Optional[ActivationStats],
    gradient_stats: Optional[ActivationStats],
    need_gradients: bool,
    target_modules,
    show_progress: bool,
) -> tuple[ActivationStats, Optional[ActivationStats]]:
    """The recipe's statistics (single budget and ladder alike): the activation Grams, and the output-gradient
    Grams over the first ``config.gradient_tokens`` tokens when a loss-weighted (mixed) plan needs them. Statistics
    the caller passes are used as they are."""
    seq_len, batch_size = train.shape[1], config.batch_size
    if stats is None:
        stats = collect_activation_stats(
            model,
            train,
            max_tokens=None,
            seq_len=seq_len,
            batch_size=batch_size,
            target_modules=target_modules,
            show_progress=show_progress,
        )
    if need_gradients and gradient_stats is None:
        tokens = train if config.gradient_tokens is None else train[: max(1, config.gradient_tokens // seq_len)]
        gradient_stats = collect_gradient_stats(
            model,
            tokens,
            max_tokens=None,
            seq_len=seq_len,
            batch_size=max(1, batch_size // 2),
            target_modules=target_modules,
            show_progress=show_progress,
        )
    return stats, gradient_stats
