"""Mixed (per-layer) ranks: search under a quality budget ε, or allocate for a parameter/FLOPs budget.

Both produce a :class:`RankPlan` (JSON, validated on load) that :class:`~nsn_peft.NSNConfig` consumes::

    plan = allocate_ranks_for_budget(model, stats, 0.5)
    model = get_peft_model(model, NSNConfig(stats=stats, **plan.to_config_kwargs()))
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from . import decompose
from .calibration import calibration_targets
from .flops import break_even_rank, factoring_saves
from .io import write_json
from .stats import ActivationStats

logger = logging.getLogger(__name__)

PLAN_FORMAT = "nsn-peft-rank-plan"
PLAN_VERSION = 1
DEFAULT_GROUPS: dict[str, list[str]] = {
    "attention": [r".*(attn|attention).*"],
    "mlp": [r".*(mlp|ffn|feed_forward|intermediate|output\.dense|fc\d?).*"],
}

__all__ = [
    "DEFAULT_GROUPS",
    "RankPlan",
    "allocate_ranks_for_budget",
    "projected_plan_for_budget",
    "loss_weighted_spectrum",
    "search_ranks",
    "uniform_plan",
    "whitened_spectra",
    "whitened_spectrum",
]


@dataclass
class RankPlan:
    """Per-layer ranks, layers left dense, and how they were chosen; consumed by :class:`~nsn_peft.NSNConfig`.

    Attributes:
        ranks: ``{layer name: rank}`` of the factored layers (plain base-model names).
        kept_dense: layers of the plan left dense (factoring them would not save, or the search kept them).
        init: the initialisation the ranks were chosen for (``"whitened"``, ``"projected"`` or ``"svd"``).
        energies: ``{layer: [energy_input, energy_output]}`` for ``init="projected"`` plans.
        target: how the plan was made (mode, ε or budget, baseline and final metric, achieved fraction...).
        history: every metric evaluation of a search, in order.
        shapes: ``{layer: [out_features, in_features]}`` of every planned layer (used for validation and
            parameter accounting; optional).
    """

    ranks: dict[str, int]
    kept_dense: list[str] = field(default_factory=list)
    init: str = "whitened"
    energies: dict[str, list[float]] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.init not in ("svd", "whitened", "projected"):
            raise ValueError(f"RankPlan.init must be 'svd', 'whitened' or 'projected', got {self.init!r}")
        if not isinstance(self.ranks, dict):
            raise ValueError(f"RankPlan.ranks must be a mapping {{layer: rank}}, got {type(self.ranks).__name__}")
        for name, rank in self.ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"RankPlan.ranks[{name!r}] must be a positive int, got {rank!r}")
        if not isinstance(self.kept_dense, list) or not all(isinstance(n, str) for n in self.kept_dense):
            raise ValueError(f"RankPlan.kept_dense must be a list of layer names, got {self.kept_dense!r}")
        if not isinstance(self.energies, dict):
            raise ValueError(f"RankPlan.energies must be a mapping {{layer: [e_in, e_out]}}, got {type(self.energies).__name__}")
        for name, pair in self.energies.items():
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e <= 1 for e in pair)):
                raise ValueError(f"RankPlan.energies[{name!r}] must be [e_in, e_out] in (0, 1], got {pair!r}")
        if self.energies and self.init != "projected":
            raise ValueError(f"RankPlan.energies is only meaningful with init='projected', not {self.init!r}")
        if not isinstance(self.target, dict):
            raise ValueError(f"RankPlan.target must be an object, got {type(self.target).__name__}")
        if not isinstance(self.history, list):
            raise ValueError(f"RankPlan.history must be a list, got {type(self.history).__name__}")
        if not isinstance(self.shapes, dict):
            raise ValueError(f"RankPlan.shapes must be a mapping {{layer: [out, in]}}, got {type(self.shapes).__name__}")
        for name, shape in self.shapes.items():
            if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
                raise ValueError(f"RankPlan.shapes[{name!r}] must be [out_features, in_features], got {shape!r}")
            if name in self.ranks and self.ranks[name] > min(shape):
                raise ValueError(f"RankPlan.ranks[{name!r}] = {self.ranks[name]} exceeds min{tuple(shape)} of the layer")
        overlap = set(self.ranks) & set(self.kept_dense)
        if overlap:
            raise ValueError(f"RankPlan lists layers both factored and dense: {sorted(overlap)[:5]}")

    def to_config_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for :class:`~nsn_peft.NSNConfig` reproducing this plan.

        Returns ``init``, ``target_modules`` (the factored layers, by full name), ``rank_pattern`` and, when
        relevant, ``energy_pattern`` (projected plans) and ``exclude_modules`` (layers kept dense).
        ``overrides`` are merged in last, so ``NSNConfig(**plan.to_config_kwargs(stats=stats))`` works
        (passing ``init=`` both directly and through the plan would be a duplicate keyword).
        """
        if not self.ranks:
            raise ValueError("RankPlan factors no layer (every layer is kept dense); nothing to adapt")
        kwargs: dict[str, Any] = {
            "init": self.init,
            "target_modules": sorted(self.ranks),
            "rank_pattern": {re.escape(n): r for n, r in self.ranks.items()},
        }
        if self.energies:
            kwargs["energy_pattern"] = {re.escape(n): list(e) for n, e in self.energies.items()}
        if self.kept_dense:
            kwargs["exclude_modules"] = sorted(self.kept_dense)
        kwargs.update(overrides)
        return kwargs

    def parameter_fraction(self, shapes: Optional[Mapping[str, tuple[int, int]]] = None) -> float:
        """Parameters of the planned layers (factored or dense) over their dense parameters.

        ``shapes`` (``{layer: (out_features, in_features)}``) defaults to the plan's own ``shapes``.
        """
        shapes = shapes if shapes is not None else {n: tuple(s) for n, s in self.shapes.items()}
        if not shapes:
            raise ValueError("RankPlan.parameter_fraction needs layer shapes (this plan records none)")
        dense = sum(m * d for m, d in shapes.values())
        planned = sum(min(self.ranks[n] * (m + d), m * d) if n in self.ranks else m * d for n, (m, d) in shapes.items())
        return planned / dense

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the plan as JSON (atomically: a crash never leaves a half-written file)."""
        data = {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}
        write_json(path, data)
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> RankPlan:
        """Read and validate a plan written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: invalid JSON, another format/version, unknown fields, or a bad value (the message
                names the file and the field, e.g. ``ranks['model.layers.0.mlp.up_proj']``).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Rank plan not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"{path} is not an nsn-peft rank plan (missing \"format\": \"{PLAN_FORMAT}\")")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"{path}: rank plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"format", "version"}
        if unknown:
            raise ValueError(f"{path}: unknown rank-plan fields {sorted(unknown)}")
        if not isinstance(data.get("ranks"), dict):
            raise ValueError(f"{path}: field 'ranks' must be an object {{layer: rank}}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None


def _layer_shapes(model: nn.Module, target_modules) -> dict[str, tuple[nn.Module, int, int]]:
    """``{name: (module, out_features m, in_features d)}`` of the plannable layers of a dense model."""
    from .layer import NSNLayer

    layers = {}
    for name, module in calibration_targets(model, target_modules).items():
        if isinstance(module, NSNLayer):
            raise TypeError(
                f"Rank planning needs the dense model, but '{name}' is already an NSN layer; pass the base model "
                "(e.g. before get_peft_model, or peft_model.unload())."
            )
        weight = module.weight
        m, d = (weight.shape[1], weight.shape[0]) if isinstance(module, Conv1D) else tuple(weight.shape)
        layers[name] = (module, m, d)
    return layers


def _dense_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


@torch.no_grad()
def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Squared singular values of ``W L`` (``C = LLᵀ``), descending: dropping component i of the whitened
    factorisation adds exactly ``σ_i²`` to the output error ``‖(W − W_r)Xᵀ‖²`` (per calibration token)."""
    w = weight.double()
    c = gram.to(device=w.device, dtype=torch.float64)
    chol = decompose._damped_cholesky((c + c.T) / 2, damp)
    wl = w @ chol
    small = wl @ wl.T if w.shape[0] <= w.shape[1] else wl.T @ wl
    return torch.linalg.eigvalsh(small).flip(0).clamp_min(0)


def _uniform_rank(m: int, d: int, fraction: float) -> int:
    """The rank of an m×d layer keeping ``fraction`` of its parameters (at least 1)."""
    return max(1, min(int(fraction * m * d / (m + d)), min(m, d)))


@torch.no_grad()
def loss_weighted_spectrum(weight: torch.Tensor, gram: torch.Tensor, grad_gram: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Second-order loss increase of dropping each component of the whitened factorisation (in nesting order).

    With the whitened factors ``W = Σ_i b_i a_i`` (:func:`nsn_peft.decompose.whitened_factors`), input Gram
    ``C`` and output-gradient Gram ``G`` (:func:`nsn_peft.collect_gradient_stats`), both per token, the
    components are orthogonal in the ``C`` metric, so dropping a set of them raises the loss by about
    ``½ Σ_i (b_iᵀ G b_i)(a_i C a_iᵀ)``: the returned ``e_i = (b_iᵀ G b_i)(a_i C a_iᵀ)`` are additive. Unlike
    :func:`whitened_spectrum` they weigh each output direction by how much the loss reacts to it, which
    makes errors of different layers comparable.
    """
    m = weight.shape[0]
    if grad_gram.shape != (m, m):
        raise ValueError(f"Output-gradient Gram shape {tuple(grad_gram.shape)} does not match out_features {m}")
    b, a = decompose.whitened_factors(weight, gram, None, damp=damp)
    c = gram.to(device=a.device, dtype=a.dtype)
    g = grad_gram.to(device=b.device, dtype=b.dtype)
    return (((b.T @ g) * b.T).sum(1) * ((a @ c) * a).sum(1)).clamp_min(0)


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
    layers = _layer_shapes(model, target_modules)
    stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    if gradient_stats is not None:
        gradient_stats.check_compatible({n: m for n, (_, m, _) in layers.items()}, source="gradient_stats",
                                        kind="output_gradient")
    spectra = {}
    desc = "Loss-weighted spectra" if gradient_stats is not None else "Whitened spectra"
    for name, (module, _, _) in tqdm(layers.items(), desc=desc, unit="layer", disable=not show_progress):
        weight = _dense_weight(module).detach()
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
        weight = _dense_weight(module).detach()
        weight = weight.to(device) if device is not None else weight
        r = _uniform_rank(m, d, target_fraction)
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
        r = _uniform_rank(m, d, target_fraction)
        tail = float(spectra[name][r:].sum())
        increase = increase if math.isfinite(increase) else top
        if tail > 0:
            spectra[name] = spectra[name] * (max(increase, floor) / tail)


def allocate_ranks_for_budget(
    model: nn.Module,
    stats: ActivationStats,
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
        model: the dense model (not yet adapted).
        stats: activation statistics covering the targeted layers.
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
    layers = _layer_shapes(model, target_modules)
    stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    weighting = "output_gradient" if gradient_stats is not None else ("given" if spectra is not None else "output_error")
    if spectra is None:
        spectra = whitened_spectra(model, stats, target_modules=target_modules, gradient_stats=gradient_stats, damp=damp,
                                   device=device, show_progress=show_progress)
    missing = [n for n in layers if n not in spectra]
    if missing:
        raise ValueError(f"spectra= lacks the targeted layers {missing[:5]}; compute them with whitened_spectra(...)")
    raw, spectra = spectra, {}
    for name in layers:
        spectrum = raw[name].detach().double().cpu()
        total = spectrum.sum()
        if normalize == "uniform":
            _, m, d = layers[name]
            anchor = float(spectrum[_uniform_rank(m, d, target_fraction):].sum())
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
    logger.info("Allocated ranks for %.3f of the %s (achieved %.4f); %d layer(s) dense", target_fraction, measure, achieved, len(dense))
    return RankPlan(
        ranks, dense, "whitened",
        target={"mode": "budget", "fraction": target_fraction, "achieved": achieved, "measure": measure,
                "granularity": granularity, "normalize": normalize, "min_rank_fraction": min_rank_fraction,
                "measured_sensitivity": loss_fn is not None,
                "weighting": weighting},
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
    layers = _layer_shapes(model, target_modules)
    ranks, dense = {}, []
    for name, (_, m, d) in layers.items():
        r = int(target_fraction * m * d / (m + d))
        r = max(1, r // granularity * granularity) if granularity > 1 else max(1, r)
        r = min(r, min(m, d))
        if factoring_saves(m, d, r):
            ranks[name] = r
        else:
            dense.append(name)
    plan = RankPlan(ranks, sorted(dense), init, target={"mode": "uniform", "fraction": target_fraction, "granularity": granularity},
                    shapes={n: [m, d] for n, (_, m, d) in layers.items()})
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
    layers = _layer_shapes(model, target_modules)
    stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    shapes = {n: [m, d] for n, (_, m, d) in layers.items()}
    spectra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    weights: dict[str, torch.Tensor] = {}
    for name, (module, m, d) in tqdm(layers.items(), desc="Projection spectra", unit="layer", disable=not show_progress):
        weight = _dense_weight(module).detach()
        weight = weight.to(device) if device is not None else weight
        c = stats.gram(name).to(device=weight.device, dtype=torch.float64)
        values, vectors = torch.linalg.eigh((c + c.T) / 2)
        values = values.flip(0).clamp_min(0)
        wr = weight.double() @ (vectors.flip(1) * values.sqrt())  # W C^½: its Gram is the output Gram W C Wᵀ
        out_values = torch.linalg.eigvalsh(wr @ wr.T if m <= d else wr.T @ wr).flip(0).clamp_min(0)
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
    plan.target = {"mode": "budget", "fraction": target_fraction, "achieved": plan.parameter_fraction(), "energy": energy,
                   "measure": "params"}
    logger.info("Projected plan: energy %.6f keeps %.4f of the parameters (target %.3f)", energy, plan.target["achieved"], target_fraction)
    return plan


def _assign_groups(names: Sequence[str], groups: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    assigned: dict[str, list[str]] = {g: [] for g in groups}
    for name in names:
        for group, patterns in groups.items():
            if isinstance(patterns, str):
                raise TypeError(f"groups[{group!r}] must be a list of regexes, got the string {patterns!r}")
            if any(re.fullmatch(p, name) for p in patterns):
                assigned[group].append(name)
                break
        else:
            assigned.setdefault("other", []).append(name)
    return {g: n for g, n in assigned.items() if n}


def search_ranks(
    model: nn.Module,
    stats: ActivationStats,
    eval_fn: Callable[[nn.Module], float],
    epsilon: float,
    *,
    groups: Optional[Mapping[str, Sequence[str]]] = None,
    target_modules: Union[None, str, Sequence[str]] = None,
    init: str = "projected",
    baseline: Optional[float] = None,
    higher_is_better: bool = False,
    relative: bool = True,
    split: str = "progressive",
    max_steps: int = 8,
    min_energy: float = 0.5,
    max_energy: float = 0.99999,
    damp: float = 1e-6,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = True,
) -> RankPlan:
    """Lowest energy thresholds per layer group whose factorisation keeps the metric within ε of the dense model.

    For each group in turn (default :data:`DEFAULT_GROUPS`: attention q/k/v/o, then MLP up/gate/down;
    ``groups`` maps a group name to regexes of full layer names, unmatched layers form ``"other"``), one
    energy ``e`` is binary-searched on a log scale of ``1 − e`` between ``min_energy`` and ``max_energy``,
    with the groups already searched held at their chosen energies:

    * ``init="projected"``: every layer of the group becomes ``W' = P_T W P_S`` with ``e_S = e_T = e``
      (its utilized rank is the layer's rank);
    * ``init="whitened"``: every layer keeps the smallest rank holding ``e`` of its whitened output energy
      (:func:`whitened_spectrum`), with the whitened (truncation-aware) factors.

    A layer whose factorisation would not save (``r(m+d) ≥ md``) keeps its dense weight, as
    :class:`~nsn_peft.NSNModel` does. Candidates are evaluated by writing the low-rank product into the
    model's weights (same outputs as the factored layers) and calling ``eval_fn(model)``; the original
    weights are always restored (they are kept on the CPU meanwhile).

    Args:
        model: the dense model (not yet adapted).
        eval_fn: ``model -> float``, e.g. perplexity on validation text or exact-match accuracy.
        epsilon: allowed drop: ``(metric − baseline)/|baseline|`` (reversed when ``higher_is_better``;
            absolute difference when ``relative=False``).
        baseline: the dense metric, if already known (otherwise measured first).
        split: ``"progressive"`` lets the cumulative drop after the i-th of G groups reach ``ε·i/G`` (so the
            first group cannot spend the whole budget); ``"greedy"`` allows ε for every group.
        max_steps: bisection steps per group (each is one ``eval_fn`` call).
        min_energy / max_energy: search interval; the group stays dense when even ``max_energy`` fails.

    Returns:
        A :class:`RankPlan` (``init`` as given) whose ``target`` holds ε, the baseline, the metric of the
        chosen configuration (measured once more at the end) and the energy of each group; ``history``
        lists every evaluation. ``target["metric"]`` respects ε whenever ``eval_fn`` is deterministic.
    """
    if init not in ("projected", "whitened"):
        raise ValueError(f"search_ranks init must be 'projected' or 'whitened', got {init!r}")
    if split not in ("progressive", "greedy"):
        raise ValueError(f"split must be 'progressive' or 'greedy', got {split!r}")
    if not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    if not 0 < min_energy < max_energy < 1:
        raise ValueError(f"need 0 < min_energy < max_energy < 1, got {min_energy!r} and {max_energy!r}")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    layers = _layer_shapes(model, target_modules)
    stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    grouped = _assign_groups(list(layers), groups or DEFAULT_GROUPS)
    originals = {n: _dense_weight(mod).detach().to("cpu", copy=True) for n, (mod, _, _) in layers.items()}
    spectra: dict[str, torch.Tensor] = {}
    ranks_at: dict[tuple[str, float], int] = {}

    def weight_of(name: str) -> torch.Tensor:
        module = layers[name][0]
        return originals[name].to(device if device is not None else module.weight.device)

    def low_rank(name: str, energy: float) -> tuple[int, Optional[torch.Tensor]]:
        """(rank, W' or None when the layer stays dense) of one layer at ``energy``."""
        _, m, d = layers[name]
        weight = weight_of(name)
        if init == "projected":
            result = decompose.projected_factors(weight, stats.gram(name), energy, energy)
            r, product = result.utilized_rank, None
            if factoring_saves(m, d, r):
                product = result.b @ result.a
        else:
            if name not in spectra:
                spectra[name] = whitened_spectrum(weight, stats.gram(name), damp).cpu()
            r = max(1, decompose.energy_rank(spectra[name], energy))
            product = None
            if factoring_saves(m, d, r):
                b, a = decompose.whitened_factors(weight, stats.gram(name), r, damp=damp)
                product = b @ a
        ranks_at[(name, energy)] = r
        return r, product

    @torch.no_grad()
    def write(name: str, new: torch.Tensor) -> None:
        module = layers[name][0]
        module.weight.copy_((new.T if isinstance(module, Conv1D) else new).to(module.weight))

    def apply_group(names: Sequence[str], energy: Optional[float]) -> None:
        for name in names:
            product = None if energy is None else low_rank(name, energy)[1]
            write(name, originals[name] if product is None else product)

    def drop(metric: float) -> float:
        delta = (reference - metric) if higher_is_better else (metric - reference)
        if not relative:
            return delta
        return delta / (abs(reference) if reference != 0 else 1.0)

    history: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    lo_nines, hi_nines = -math.log10(1 - min_energy), -math.log10(1 - max_energy)
    progress = tqdm(total=len(grouped) * max_steps, desc="Rank search", unit="eval", disable=not show_progress)
    try:
        reference = float(eval_fn(model)) if baseline is None else float(baseline)
        if not math.isfinite(reference):
            raise ValueError(f"The baseline metric is {reference}; eval_fn must return a finite number")
        history.append({"group": None, "energy": 1.0, "metric": reference})
        for index, (group, names) in enumerate(grouped.items(), 1):
            allowed = epsilon * index / len(grouped) if split == "progressive" else epsilon
            lo, hi = lo_nines, hi_nines  # invariant: hi is acceptable (near-lossless), lo may not be
            best = None
            for _ in range(max_steps):
                mid = (lo + hi) / 2
                energy = 1 - 10 ** (-mid)
                apply_group(names, energy)
                metric = float(eval_fn(model))
                ok = math.isfinite(metric) and drop(metric) <= allowed
                history.append({"group": group, "energy": energy, "metric": metric, "accepted": ok, "allowed_drop": allowed})
                logger.info("search %s: energy %.6f -> metric %.6g (%s)", group, energy, metric, "ok" if ok else "too lossy")
                progress.update(1)
                if ok:
                    best, hi = energy, mid
                else:
                    lo = mid
            apply_group(names, best)
            if best is not None:
                chosen.update(dict.fromkeys(names, best))
        final_metric = float(eval_fn(model))
        history.append({"group": "final", "metric": final_metric})
    finally:
        progress.close()
        for name in layers:
            write(name, originals[name])
    ranks, dense, energies = {}, [], {}
    for name, (_, m, d) in layers.items():
        energy = chosen.get(name)
        r = ranks_at.get((name, energy)) if energy is not None else None
        if r is None or not factoring_saves(m, d, r):
            dense.append(name)
            continue
        ranks[name] = r
        if init == "projected":
            energies[name] = [energy, energy]
    group_energies = {g: chosen.get(n[0], 1.0) for g, n in grouped.items()}
    logger.info("Rank search: metric %.6g vs baseline %.6g (ε=%g); energies %s", final_metric, reference, epsilon, group_energies)
    return RankPlan(ranks, sorted(dense), init, energies, target={
        "mode": "epsilon", "epsilon": epsilon, "relative": relative, "baseline": reference, "metric": final_metric,
        "higher_is_better": higher_is_better, "split": split, "group_energies": group_energies,
        "groups": {g: len(n) for g, n in grouped.items()},
    }, history=history, shapes={n: [m, d] for n, (_, m, d) in layers.items()})
