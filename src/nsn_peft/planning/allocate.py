"""Mixed (per-layer) ranks for a parameter or FLOPs budget: spectra, greedy allocation, uniform baseline."""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..calibrate.stats import ActivationStats
from ..linalg import decompose
from ..linalg.flops import break_even_rank, factoring_saves
from ..linalg.spectra import loss_weighted_spectrum, uniform_rank, whitened_spectrum
from .plan import RankPlan
from .targets import dense_weight, layer_shapes

logger = logging.getLogger(__name__)

__all__ = ["allocate_ranks_for_budget", "projected_plan_for_budget", "uniform_plan", "whitened_spectra"]


def whitened_spectra(
    model: nn.Module,
    stats: ActivationStats,
    *,
    target_modules: Union[None, str, Sequence[str]] = None,
    gradient_stats: Optional[ActivationStats] = None,
    damp: float = 1e-6,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-component truncation errors of every targeted layer of a dense model, ``{name: errors (CPU)}``.

    Without ``gradient_stats``: :func:`whitened_spectrum` (output error, descending). With it:
    :func:`loss_weighted_spectrum` (approximate loss increase). Compute them once and pass them as
    ``spectra=`` to several :func:`allocate_ranks_for_budget` calls to skip the decompositions.
    """
    layers = layer_shapes(model, target_modules)
    stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    if gradient_stats is not None:
        gradient_stats.check_compatible(
            {n: m for n, (_, m, _) in layers.items()}, source="gradient_stats", kind="output_gradient"
        )
    spectra = {}
    desc = "Loss-weighted spectra" if gradient_stats is not None else "Whitened spectra"
    for name, (module, _, _) in tqdm(layers.items(), desc=desc, unit="layer", disable=not show_progress):
        weight = dense_weight(module).detach()
        if device is not None:
            weight = weight.to(device)
        if gradient_stats is None:
            spectra[name] = whitened_spectrum(weight, stats.gram(name), damp).cpu()
        else:
            spectra[name] = loss_weighted_spectrum(weight, stats.gram(name), gradient_stats.gram(name), damp).cpu()
    return spectra


@torch.no_grad()
def _rescale_by_measured_loss(
    model: nn.Module,
    layers: Mapping[str, tuple[nn.Module, int, int]],
    spectra: dict[str, torch.Tensor],
    stats: ActivationStats,
    target_fraction: float,
    loss_fn: Callable[[nn.Module], float],
    damp: float,
    device: Optional[Union[str, torch.device]],
    show_progress: bool,
) -> None:
    """Scale each layer's error spectrum so its error at the uniform-budget rank equals the measured loss increase."""
    reference = float(loss_fn(model))
    increases: dict[str, float] = {}
    for name, (module, m, d) in tqdm(layers.items(), desc="Layer sensitivity", unit="layer", disable=not show_progress):
        original = module.weight.detach().clone()
        weight = dense_weight(module).detach()
        weight = weight.to(device) if device is not None else weight
        r = uniform_rank(m, d, target_fraction)
        b, a = decompose.whitened_factors(weight, stats.gram(name), r, damp=damp)
        product = b @ a
        try:
            module.weight.copy_((product.T if isinstance(module, Conv1D) else product).to(module.weight))
            increases[name] = float(loss_fn(model)) - reference
        finally:
            module.weight.copy_(original)
    top = max([v for v in increases.values() if math.isfinite(v)], default=0.0)
    floor = 1e-3 * top if top > 0 else 1e-12
    for name, increase in increases.items():
        _, m, d = layers[name]
        r = uniform_rank(m, d, target_fraction)
        tail = float(spectra[name][r:].sum())
        increase = increase if math.isfinite(increase) else top
        if tail > 0:
            spectra[name] = spectra[name] * (max(increase, floor) / tail)


def allocate_ranks_for_budget(
    model: nn.Module,
    stats: Optional[ActivationStats],
    target_fraction: float,
    *,
    target_modules: Union[None, str, Sequence[str]] = None,
    granularity: int = 1,
    measure: str = "params",
    gradient_stats: Optional[ActivationStats] = None,
    normalize: Optional[str] = None,
    min_rank_fraction: float = 0.0,
    loss_fn: Optional[Callable[[nn.Module], float]] = None,
    spectra: Optional[Mapping[str, torch.Tensor]] = None,
    damp: float = 1e-6,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = True,
) -> RankPlan:
    """Per-layer ranks for ``init="whitened"`` that fit a budget, placed where they cost least quality.

    The budget is ``target_fraction`` of the targeted layers' dense size. Each layer's whitened spectrum
    (:func:`whitened_spectrum`) gives the exact output error of every rank, and with ``gradient_stats`` its
    second-order loss increase (:func:`loss_weighted_spectrum`); starting from the dense model,
    the step that loses the least error per parameter saved is taken repeatedly (``granularity``
    components at a time, or, for a layer still dense, the jump to the rank with the best ratio below its
    break-even rank ``r(m+d) < md``) until the budget is met. Layers that never pay off stay dense.

    Args:
        model: the dense model (not yet adapted; only its layer shapes are read when ``spectra`` are given).
        stats: activation statistics covering the targeted layers (``None`` when ``spectra`` are given and
            ``loss_fn`` is not).
        target_fraction: kept share of the targeted layers' parameters, in (0, 1].
        target_modules: names (suffix match) or a regex; default all linear layers but the head.
        granularity: ranks are multiples of this (1 = any rank; the finest allocation, and the default for
            compression budgets; use 64 or so when the ranks must also run fast on GPUs).
        measure: ``"params"`` or ``"flops"``. A rank-r factorisation costs ``r(m+d)`` parameters and
            ``2r(m+d)`` FLOPs per token against ``md`` and ``2md`` dense, so both budgets give the same
            plan; the choice is recorded in ``plan.target``.
        gradient_stats: output-gradient statistics (:func:`nsn_peft.collect_gradient_stats`). With them each
            component's error is its second-order *loss* increase (:func:`loss_weighted_spectrum`), which
            makes layers directly comparable; this is the recommended mode (the whitened output error alone
            says how much a layer's *outputs* change, not how much the model's loss cares).
        normalize: how errors of different layers are compared; default ``"none"`` with ``gradient_stats``
            (errors are already loss units), else ``"uniform"``. ``"uniform"``: the error relative to the
            layer's own error at the uniform allocation (every layer counts the same at the uniform plan,
            and ranks move to where spectra decay differently); ``"energy"``: the *fraction* of the layer's
            output energy lost; ``"none"``: the errors as they are (absolute output error per token without
            ``gradient_stats``).
        min_rank_fraction: no layer goes below this fraction of the rank a uniform allocation would
            give it (a guard against starving a layer whose spectrum looks cheap to cut).
        loss_fn: optional ``model -> loss`` (lower is better, e.g. the mean NLL on a slice of calibration
            text) to measure how much each layer matters: each layer alone is cut to its uniform-budget rank,
            the loss increase is measured (1 + number-of-layers calls), and the layer's error curve is
            rescaled so that its error at that rank equals the measured increase. The greedy then trades
            measured loss per parameter instead of output error. Weights are restored afterwards.
        spectra: precomputed :func:`whitened_spectra` of these layers (skips the eigendecompositions).
        damp: relative damping of the Gram before its Cholesky factor (as ``NSNConfig.whitening_damp``).
        device: where to compute the spectra (e.g. ``"cuda"`` for a model on the CPU).

    Returns:
        A :class:`RankPlan` with ``init="whitened"``; ``plan.target["achieved"]`` is the fraction reached.
    """
    if normalize is None:
        normalize = "none" if gradient_stats is not None else "uniform"
    if normalize not in ("energy", "uniform", "none"):
        raise ValueError(f"normalize must be 'energy', 'uniform' or 'none', got {normalize!r}")
    if measure not in ("params", "flops"):
        raise ValueError(f"measure must be 'params' or 'flops', got {measure!r}")
    if not 0 <= min_rank_fraction <= 1:
        raise ValueError(f"min_rank_fraction must be in [0, 1], got {min_rank_fraction!r}")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction!r}")
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity must be a positive int, got {granularity!r}")
    layers = layer_shapes(model, target_modules)
    if stats is None and (spectra is None or loss_fn is not None):
        raise ValueError(
            "allocate_ranks_for_budget needs activation statistics (stats=) unless spectra= are given "
            "and loss_fn= is not"
        )
    if stats is not None:
        stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    weighting = (
        "output_gradient" if gradient_stats is not None else ("given" if spectra is not None else "output_error")
    )
    if spectra is None:
        spectra = whitened_spectra(
            model,
            stats,
            target_modules=target_modules,
            gradient_stats=gradient_stats,
            damp=damp,
            device=device,
            show_progress=show_progress,
        )
    missing = [n for n in layers if n not in spectra]
    if missing:
        raise ValueError(f"spectra= lacks the targeted layers {missing[:5]}; compute them with whitened_spectra(...)")
    raw, spectra = spectra, {}
    for name in layers:
        spectrum = raw[name].detach().double().cpu()
        total = spectrum.sum()
        if normalize == "uniform":
            _, m, d = layers[name]
            anchor = float(spectrum[uniform_rank(m, d, target_fraction) :].sum())
            scale = anchor if anchor > 0 else float(total)
            spectra[name] = spectrum / scale if scale > 0 else spectrum
        else:
            spectra[name] = spectrum / total if (normalize == "energy" and total > 0) else spectrum
    if loss_fn is not None:
        _rescale_by_measured_loss(model, layers, spectra, stats, target_fraction, loss_fn, damp, device, show_progress)
    dense_total = sum(m * d for _, m, d in layers.values())
    budget = target_fraction * dense_total
    rank: dict[str, Optional[int]] = dict.fromkeys(layers)  # None = dense
    cost = {n: m * d for n, (_, m, d) in layers.items()}
    total_cost = dense_total
    floors = {n: max(1, int(min_rank_fraction * target_fraction * m * d / (m + d))) for n, (_, m, d) in layers.items()}

    def next_step(name: str) -> Optional[tuple[float, int, int]]:
        """(error lost per parameter saved, new rank, parameters saved) of the layer's next cut."""
        _, m, d = layers[name]
        spectrum = spectra[name]
        current, floor = rank[name], floors[name]
        if current is None:
            # Leaving dense saves little at first (break-even rank), so look ahead: jump to the rank with the
            # best error-per-parameter over the whole path from dense, keeping the greedy well behaved.
            top = min(break_even_rank(m, d), spectrum.numel())
            candidates = torch.arange(floor, top + 1)
            if granularity > 1:
                candidates = candidates[(candidates % granularity == 0) | (candidates == 1)]
            if candidates.numel() == 0:
                return None
            tails = torch.flip(torch.cumsum(torch.flip(spectrum, [0]), 0), [0])  # tails[r] = Σ_{i>=r} σ_i²
            tails = torch.cat([tails, tails.new_zeros(1)])
            lost_all = tails[candidates].double()
            saved_all = (m * d - candidates * (m + d)).double()
            best = int(torch.argmin(lost_all / saved_all))
            return float(lost_all[best] / saved_all[best]), int(candidates[best]), int(saved_all[best])
        if current <= floor:
            return None
        new = max(floor, (current - 1) // granularity * granularity) if granularity > 1 else current - 1
        saved = (current - new) * (m + d)
        if saved <= 0:
            return None
        return float(spectrum[new:current].sum()) / saved, new, saved

    heap: list[tuple[float, str, int, int]] = []
    for name in layers:
        step = next_step(name)
        if step is not None:
            heapq.heappush(heap, (step[0], name, step[1], step[2]))
    while total_cost > budget and heap:
        _, name, new, saved = heapq.heappop(heap)
        rank[name] = new
        cost[name] -= saved
        total_cost -= saved
        step = next_step(name)
        if step is not None:
            heapq.heappush(heap, (step[0], name, step[1], step[2]))
    achieved = total_cost / dense_total
    if total_cost > budget:
        logger.warning("Budget %.3f is not reachable with the rank floors; allocated %.3f", target_fraction, achieved)
    ranks = {n: int(r) for n, r in rank.items() if r is not None}
    dense = sorted(n for n, r in rank.items() if r is None)
    logger.info(
        "Allocated ranks for %.3f of the %s (achieved %.4f); %d layer(s) dense",
        target_fraction,
        measure,
        achieved,
        len(dense),
    )
    return RankPlan(
        ranks,
        dense,
        "whitened",
        target={
            "mode": "budget",
            "fraction": target_fraction,
            "achieved": achieved,
            "measure": measure,
            "granularity": granularity,
            "normalize": normalize,
            "min_rank_fraction": min_rank_fraction,
            "measured_sensitivity": loss_fn is not None,
            "weighting": weighting,
        },
        shapes={n: [m, d] for n, (_, m, d) in layers.items()},
    )


def uniform_plan(
    model: nn.Module,
    target_fraction: float,
    *,
    target_modules: Union[None, str, Sequence[str]] = None,
    init: str = "whitened",
    granularity: int = 1,
) -> RankPlan:
    """The baseline allocation: every layer keeps the same fraction of its own parameters.

    Layer rank ``r = ⌊f·md/(m+d)⌋`` (rounded down to ``granularity``, at least 1). Useful to compare
    :func:`allocate_ranks_for_budget` against at the same budget.
    """
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction!r}")
    layers = layer_shapes(model, target_modules)
    ranks, dense = {}, []
    for name, (_, m, d) in layers.items():
        r = int(target_fraction * m * d / (m + d))
        r = max(1, r // granularity * granularity) if granularity > 1 else max(1, r)
        r = min(r, min(m, d))
        if factoring_saves(m, d, r):
            ranks[name] = r
        else:
            dense.append(name)
    plan = RankPlan(
        ranks,
        sorted(dense),
        init,
        target={"mode": "uniform", "fraction": target_fraction, "granularity": granularity},
        shapes={n: [m, d] for n, (_, m, d) in layers.items()},
    )
    plan.target["achieved"] = plan.parameter_fraction()
    return plan


def projected_plan_for_budget(
    model: nn.Module,
    stats: ActivationStats,
    target_fraction: float,
    *,
    target_modules: Union[None, str, Sequence[str]] = None,
    steps: int = 30,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = True,
) -> RankPlan:
    """``init="projected"`` plan with one shared energy ``e = e_S = e_T``, bisected to fit a parameter budget.

    The input spectrum (of ``C``) and output spectrum (of ``W C Wᵀ``) of every layer are computed once;
    the bisection uses ``min(k_S(e), k_T(e))``, the utilized rank of a generic layer, and the plan records
    the exact utilized rank ``rank(P_T W P_S)`` at the chosen energy (never larger, so the budget holds).
    Layers whose factorisation would not save stay dense. The largest energy within budget wins.
    """
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction!r}")
    layers = layer_shapes(model, target_modules)
    stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    shapes = {n: [m, d] for n, (_, m, d) in layers.items()}
    spectra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    weights: dict[str, torch.Tensor] = {}
    for name, (module, m, d) in tqdm(
        layers.items(), desc="Projection spectra", unit="layer", disable=not show_progress
    ):
        weight = dense_weight(module).detach()
        weight = weight.to(device) if device is not None else weight
        values, vectors = decompose.robust_eigh(decompose.symmetrized(stats.gram(name), torch.float64, weight.device))
        values = values.flip(0).clamp_min(0)
        wr = weight.double() @ (vectors.flip(1) * values.sqrt())  # W C^½: its Gram is the output Gram W C Wᵀ
        out_values = decompose.robust_eigh(wr @ wr.T if m <= d else wr.T @ wr, values_only=True)[0].flip(0).clamp_min(0)
        spectra[name] = (values.cpu(), out_values.cpu())
        weights[name] = weight

    def generic_fraction(energy: float) -> float:
        ranks = {}
        for name, (in_values, out_values) in spectra.items():
            m, d = shapes[name]
            k = max(1, min(decompose.energy_rank(in_values, energy), decompose.energy_rank(out_values, energy)))
            if factoring_saves(m, d, k):
                ranks[name] = k
        return RankPlan(ranks, shapes=shapes).parameter_fraction()

    lo, hi = 0.0, 1.0  # energy → 0 keeps rank 1 everywhere (fits any budget), 1 may not fit
    for _ in range(steps):
        mid = (lo + hi) / 2
        if generic_fraction(mid) <= target_fraction:
            lo = mid
        else:
            hi = mid
    energy = lo if lo > 0 else hi / 2
    ranks, dense, energies = {}, [], {}
    for name, (_, m, d) in layers.items():
        r = decompose.projected_factors(weights[name], stats.gram(name), energy, energy).utilized_rank
        if factoring_saves(m, d, r):
            ranks[name], energies[name] = r, [energy, energy]
        else:
            dense.append(name)
    plan = RankPlan(ranks, sorted(dense), "projected", energies, shapes=shapes)
    plan.target = {
        "mode": "budget",
        "fraction": target_fraction,
        "achieved": plan.parameter_fraction(),
        "energy": energy,
        "measure": "params",
    }
    logger.info(
        "Projected plan: energy %.6f keeps %.4f of the parameters (target %.3f)",
        energy,
        plan.target["achieved"],
        target_fraction,
    )
    return plan
