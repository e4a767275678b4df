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
from dataclasses import asdict, dataclass, field
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

__all__ = ["DEFAULT_GROUPS", "RankPlan", "allocate_ranks_for_budget", "search_ranks"]


@dataclass
class RankPlan:
    """Per-layer max ranks (``ranks``), layers left dense, and how they were chosen.

    ``energies`` holds ``[energy_input, energy_output]`` per layer for ``init="projected"`` plans.
    """

    ranks: dict[str, int]
    kept_dense: list[str] = field(default_factory=list)
    init: str = "whitened"
    energies: dict[str, list[float]] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.init not in ("svd", "whitened", "projected"):
            raise ValueError(f"RankPlan.init must be 'svd', 'whitened' or 'projected', got {self.init!r}")
        for name, rank in self.ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"RankPlan.ranks[{name!r}] must be a positive int, got {rank!r}")
        for name, pair in self.energies.items():
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(0 < float(e) <= 1 for e in pair)):
                raise ValueError(f"RankPlan.energies[{name!r}] must be [e_in, e_out] in (0, 1], got {pair!r}")
        overlap = set(self.ranks) & set(self.kept_dense)
        if overlap:
            raise ValueError(f"RankPlan lists layers both factored and dense: {sorted(overlap)[:5]}")

    def to_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`NSNConfig` reproducing this plan (dense layers are not targeted)."""
        if not self.ranks:
            raise ValueError("RankPlan factors no layer (every layer is kept dense); nothing to adapt")
        kwargs: dict[str, Any] = {
            "init": self.init,
            "target_modules": sorted(self.ranks),
            "rank_pattern": {re.escape(n): r for n, r in self.ranks.items()},
        }
        if self.energies:
            kwargs["energy_pattern"] = {re.escape(n): list(e) for n, e in self.energies.items()}
        return kwargs

    def parameter_fraction(self, shapes: Mapping[str, tuple[int, int]]) -> float:
        """Parameters of the planned layers (factored or dense) over their dense parameters."""
        dense = sum(m * d for m, d in shapes.values())
        planned = sum(min(self.ranks[n] * (m + d), m * d) if n in self.ranks else m * d for n, (m, d) in shapes.items())
        return planned / dense

    def save(self, path: Union[str, os.PathLike]) -> Path:
        data = {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}
        write_json(path, data)
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> RankPlan:
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
        known = {"ranks", "kept_dense", "init", "energies", "target", "history"}
        unknown = set(data) - known - {"format", "version"}
        if unknown:
            raise ValueError(f"{path}: unknown rank-plan fields {sorted(unknown)}")
        if not isinstance(data.get("ranks"), dict):
            raise ValueError(f"{path}: field 'ranks' must be an object {{layer: rank}}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def _layer_shapes(model: nn.Module, target_modules) -> dict[str, tuple[nn.Module, int, int]]:
    layers = {}
    for name, module in calibration_targets(model, target_modules).items():
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


def allocate_ranks_for_budget(
    model: nn.Module,
    stats: ActivationStats,
    target_fraction: float,
    *,
    target_modules: Union[None, str, Sequence[str]] = None,
    granularity: int = 1,
    normalize: str = "energy",
    min_rank_fraction: float = 0.0,
    damp: float = 1e-6,
    device: Optional[Union[str, torch.device]] = None,
) -> RankPlan:
    """Per-layer ranks whose parameters (equivalently FLOPs: both are ``r(m+d)`` per layer) total
    ``target_fraction`` of the targeted layers' dense size, placed where they cost least quality.

    Each layer's whitened spectrum gives the exact output error of every rank, normalised by the layer's
    output energy so layers are comparable. Starting from full quality, the step that loses the least
    normalised error per parameter saved is taken repeatedly (``granularity`` components at a time, or a
    dense layer going to its break-even rank) until the budget is met. Layers where factoring would not
    save stay dense.

    Args:
        normalize: ``"energy"`` compares layers by the *fraction* of their output energy lost; ``"none"``
            by the absolute output error per calibration token.
        min_rank_fraction: no layer goes below this fraction of the rank a uniform allocation would
            give it (a guard against starving a layer whose spectrum looks cheap to cut).
    """
    if normalize not in ("energy", "none"):
        raise ValueError(f"normalize must be 'energy' or 'none', got {normalize!r}")
    if not 0 <= min_rank_fraction <= 1:
        raise ValueError(f"min_rank_fraction must be in [0, 1], got {min_rank_fraction!r}")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction!r}")
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    layers = _layer_shapes(model, target_modules)
    stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    spectra: dict[str, torch.Tensor] = {}
    for name, (module, _, _) in tqdm(layers.items(), desc="Whitened spectra", unit="layer"):
        weight = _dense_weight(module).detach()
        if device is not None:
            weight = weight.to(device)
        spectrum = whitened_spectrum(weight, stats.gram(name), damp).cpu()
        total = spectrum.sum()
        spectra[name] = spectrum / total if (normalize == "energy" and total > 0) else spectrum
    budget = target_fraction * sum(m * d for _, m, d in layers.values())
    rank: dict[str, Optional[int]] = dict.fromkeys(layers)  # None = dense
    cost = {n: m * d for n, (_, m, d) in layers.items()}
    total_cost = sum(cost.values())

    floors = {n: max(1, int(min_rank_fraction * target_fraction * m * d / (m + d))) for n, (_, m, d) in layers.items()}

    def next_step(name: str) -> Optional[tuple[float, int, float]]:
        _, m, d = layers[name]
        spectrum = spectra[name]
        current = rank[name]
        floor = floors[name]
        if current is None:
            # Leaving dense saves little at first (break-even rank), so look ahead: jump to the rank with the
            # best error-per-parameter over the whole path from dense, keeping the greedy well behaved.
            top = break_even_rank(m, d)
            candidates = torch.arange(floor, top + 1)
            if granularity > 1:
                candidates = candidates[(candidates % granularity == 0) | (candidates == 1)]
            if candidates.numel() == 0:
                return None
            tails = torch.flip(torch.cumsum(torch.flip(spectrum, [0]), 0), [0])  # tails[r] = Σ_{i>=r} σ_i²
            lost_all = tails[candidates].double()
            saved_all = (m * d - candidates * (m + d)).double()
            best = int(torch.argmin(lost_all / saved_all))
            new, saved = int(candidates[best]), int(saved_all[best])
            return float(lost_all[best]) / saved, new, saved
        else:
            if current <= floor:
                return None
            new = max(floor, (current - 1) // granularity * granularity) if granularity > 1 else current - 1
            saved = (current - new) * (m + d)
        lost = float(spectrum[new : current if current is not None else spectrum.numel()].sum())
        if saved <= 0:
            return None
        return lost / saved, new, saved

    heap = []
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
    if total_cost > budget:
        logger.warning("Budget %.3f not reachable even at rank 1 everywhere; got %.3f", target_fraction, total_cost / sum(m * d for _, m, d in layers.values()))
    ranks = {n: int(r) for n, r in rank.items() if r is not None}
    dense = sorted(n for n, r in rank.items() if r is None)
    achieved = total_cost / sum(m * d for _, m, d in layers.values())
    logger.info("Allocated ranks for %.3f of parameters (achieved %.4f); %d layer(s) dense", target_fraction, achieved, len(dense))
    return RankPlan(ranks, dense, "whitened", target={"mode": "budget", "fraction": target_fraction, "achieved": achieved,
                                                     "granularity": granularity, "normalize": normalize,
                                                     "min_rank_fraction": min_rank_fraction})


def _assign_groups(names: Sequence[str], groups: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    assigned: dict[str, list[str]] = {g: [] for g in groups}
    for name in names:
        for group, patterns in groups.items():
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
    baseline: Optional[float] = None,
    higher_is_better: bool = False,
    max_steps: int = 8,
    min_energy: float = 0.5,
    device: Optional[Union[str, torch.device]] = None,
) -> RankPlan:
    """Smallest energy thresholds per layer group whose utilized-rank projection keeps the metric within ε.

    For each group in turn (default: attention projections, then MLP; ``groups`` maps a group name to
    regexes of full layer names), binary-search one energy ``e`` (used for both ``e_S`` and ``e_T``) on a
    log scale of ``1 − e`` between ``min_energy`` and 0.99999, with the groups already searched fixed.
    A candidate is evaluated by writing ``W' = P_T W P_S`` into the model's weights (outputs identical to
    the factored layers) and calling ``eval_fn(model)``; weights are restored afterwards. Accept when the
    relative drop ``(metric − baseline)/baseline`` (reversed when ``higher_is_better``) is ≤ ``epsilon``.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if not 0 < min_energy < 1:
        raise ValueError(f"min_energy must be in (0, 1), got {min_energy!r}")
    layers = _layer_shapes(model, target_modules)
    stats.check_compatible({n: d for n, (_, _, d) in layers.items()})
    grouped = _assign_groups(list(layers), groups or DEFAULT_GROUPS)
    originals = {n: _dense_weight(mod).detach().clone() for n, (mod, _, _) in layers.items()}
    cache: dict[tuple[str, float], decompose.ProjectedFactors] = {}

    def factors(name: str, energy: float) -> decompose.ProjectedFactors:
        key = (name, energy)
        if key not in cache:
            weight = originals[name] if device is None else originals[name].to(device)
            cache[key] = decompose.projected_factors(weight, stats.gram(name), energy, energy)
        return cache[key]

    @torch.no_grad()
    def apply(energies: Mapping[str, float]) -> None:
        for name, (module, m, d) in layers.items():
            energy = energies.get(name, 1.0)
            if energy >= 1.0:
                new = originals[name]
            else:
                result = factors(name, energy)
                new = (result.b @ result.a) if factoring_saves(m, d, result.utilized_rank) else originals[name]
            target = module.weight
            target.copy_((new.T if isinstance(module, Conv1D) else new).to(target))

    def drop(metric: float) -> float:
        scale = abs(reference) if reference != 0 else 1.0
        return (reference - metric) / scale if higher_is_better else (metric - reference) / scale

    history: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    try:
        reference = float(eval_fn(model)) if baseline is None else float(baseline)
        history.append({"group": None, "energy": 1.0, "metric": reference})
        lo_nines, hi_nines = -math.log10(1 - min_energy), 5.0
        for group, names in grouped.items():
            lo, hi = lo_nines, hi_nines  # invariant: hi is acceptable (near-lossless), lo may not be
            best = 1.0
            for _ in range(max_steps):
                mid = (lo + hi) / 2
                energy = 1 - 10 ** (-mid)
                trial = {**chosen, **dict.fromkeys(names, energy)}
                apply(trial)
                metric = float(eval_fn(model))
                ok = drop(metric) <= epsilon
                history.append({"group": group, "energy": energy, "metric": metric, "accepted": ok})
                logger.info("search %s: energy %.5f -> metric %.4f (%s)", group, energy, metric, "ok" if ok else "too lossy")
                if ok:
                    best, hi = energy, mid
                else:
                    lo = mid
            chosen.update(dict.fromkeys(names, best))
        apply(chosen)
        final_metric = float(eval_fn(model))
    finally:
        apply({})
    ranks, dense, energies = {}, [], {}
    for name, (_, m, d) in layers.items():
        energy = chosen.get(name, 1.0)
        if energy >= 1.0:
            dense.append(name)
            continue
        result = factors(name, energy)
        if factoring_saves(m, d, result.utilized_rank):
            ranks[name] = result.utilized_rank
            energies[name] = [energy, energy]
        else:
            dense.append(name)
    return RankPlan(ranks, sorted(dense), "projected", energies, target={
        "mode": "epsilon", "epsilon": epsilon, "baseline": reference, "metric": final_metric,
        "higher_is_better": higher_is_better, "group_energies": {g: chosen[n[0]] for g, n in grouped.items()},
    }, history=history)
