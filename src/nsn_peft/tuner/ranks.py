"""Rank control and FLOPs accounting for models holding NSN layers.

Every function accepts a ``PeftModel``, the ``NSNModel`` tuner, or any ``nn.Module`` containing
``NSNLinear`` layers. Module names in dicts are those of the plain base model (``model.layers.0.mlp.up_proj``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Optional, Union

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..linalg import flops as F
from ..naming import canonical_module_name, lookup_pattern
from .config import budget_key
from .layer import NSNLayer

RankSpec = Union[int, Mapping[str, int]]

__all__ = [
    "FlopsReport",
    "at_rank",
    "budget_plan",
    "budget_plans",
    "estimate_flops",
    "get_rank",
    "nsn_layers",
    "select_rank_for_target_flops",
    "selectable_ranks",
    "set_rank",
]


def _tuner(model: nn.Module):
    """The ``NSNModel`` tuner of ``model`` (itself, or a ``PeftModel``'s ``base_model``), else ``None``.

    Recognised by the layer index it keeps, so this module need not import the tuner that imports it.
    """
    for candidate in (model, getattr(model, "base_model", None)):
        if hasattr(candidate, "_nsn_layer_index") and hasattr(candidate, "peft_config"):
            return candidate
    return None


def nsn_layers(model: nn.Module) -> dict[str, NSNLayer]:
    """``{base-model module name: layer}`` of every NSN layer (cached on the tuner; no module walk)."""
    tuner = _tuner(model)
    if tuner is not None:
        return tuner._nsn_layer_index()
    return {canonical_module_name(n): m for n, m in model.named_modules() if isinstance(m, NSNLayer)}


def _adapter(model: nn.Module, layers: Mapping[str, NSNLayer], adapter_name: Optional[str]) -> str:
    if adapter_name is not None:
        return adapter_name
    tuner = _tuner(model)
    if tuner is not None:
        active = tuner.active_adapters
        if len(active) != 1:
            raise ValueError(f"Exactly one NSN adapter must be active, got {active}")
        return active[0]
    first = next(iter(layers.values()), None)
    if first is None:
        raise ValueError("The model has no NSN layers; wrap it with get_peft_model(model, NSNConfig(...)) first.")
    return first.active_adapters[0]


def _granularity(model: nn.Module, adapter: str) -> int:
    tuner = _tuner(model)
    return tuner.peft_config[adapter].rank_granularity if tuner is not None else 64


def budget_plans(model: nn.Module, adapter_name: Optional[str] = None) -> dict[float, dict[str, int]]:
    """The adapter's nested per-layer plans, ``{FLOPs budget: {module name: rank}}`` (``NSNConfig.budget_plans``)."""
    tuner = _tuner(model)
    if tuner is None:
        return {}
    adapter = _adapter(model, nsn_layers(model), adapter_name)
    return {float(key): dict(plan) for key, plan in tuner.peft_config[adapter].budget_plans.items()}


def budget_plan(model: nn.Module, flops: float, adapter_name: Optional[str] = None) -> dict[str, int]:
    """The stored per-layer ranks of FLOPs budget ``flops`` (a fraction of the targeted layers' dense FLOPs).

    Raises ``ValueError`` naming the budgets that have a plan when ``flops`` has none.
    """
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops <= 1:
        raise ValueError(f"flops must be a FLOPs fraction in (0, 1], got {flops!r}")
    plans = budget_plans(model, adapter_name)
    by_key = {budget_key(b): plan for b, plan in plans.items()}
    plan = by_key.get(budget_key(flops))
    if plan is None:
        if not plans:
            raise ValueError(
                f"No budget plan for flops={flops:g}: this adapter stores none (NSNConfig.budget_plans is empty). "
                "Create plans with nsn_peft.plan_budget_schedule(...), or pick uniform ranks with "
                "select_rank_for_target_flops(model, fraction)."
            )
        available = ", ".join(budget_key(b) for b in sorted(plans))
        raise ValueError(f"No budget plan for flops={flops:g}; this adapter has plans for the FLOPs budgets {available}")
    return plan


def _set_budget(model: nn.Module, layers: Mapping[str, NSNLayer], adapter: str, flops: float) -> None:
    plan = budget_plan(model, flops, adapter)
    missing = [n for n in layers if n not in plan]
    extra = [n for n in plan if n not in layers]
    if missing or extra:
        raise ValueError(
            f"Budget plan {budget_key(flops)} does not match the model's NSN layers: "
            + (f"no rank for {missing[:3]}" if missing else f"ranks for unknown layers {extra[:3]}")
        )
    for name, layer in layers.items():
        limit = layer.nsn_max_rank[adapter]
        if not 1 <= plan[name] <= limit:
            raise ValueError(f"Budget plan {budget_key(flops)} gives '{name}' rank {plan[name]}, outside [1, {limit}] (its max rank)")
    for name, layer in layers.items():
        layer.nsn_rank[adapter] = plan[name]
    _record(model, adapter, dict(plan))




def set_rank(
    model: nn.Module,
    rank: Optional[RankSpec] = None,
    *,
    fraction: Optional[float] = None,
    flops: Optional[float] = None,
    adapter_name: Optional[str] = None,
) -> None:
    """Switch the active rank of NSN layers (no tensor is copied: forward slices views).

    Args:
        rank: an int for every layer (clamped to each layer's max rank, so ``set_rank(m, 10**9)`` means
            "full"); or a dict ``{module name or pattern: rank}`` — strict: a rank above a layer's max or a
            key that matches no layer raises ``ValueError``; layers not named keep their rank.
        fraction: instead of ``rank``, a fraction of each layer's max rank, rounded down to the grid (a layer
            whose max rank is not above ``rank_granularity`` is rounded down to an integer rank instead).
        flops: instead of ``rank``, a FLOPs budget with a stored plan (``NSNConfig.budget_plans``): every layer
            takes its planned rank. A budget without a plan raises ``ValueError`` naming those available.

    On a merged model (``merge_adapter()``) the merged weights are recomputed at the new ranks, so the
    model always computes the ranks that :func:`get_rank` reports and that ``save_pretrained`` records.
    """
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    if sum(x is not None for x in (rank, fraction, flops)) != 1:
        raise ValueError("Pass exactly one of `rank`, `fraction=` or `flops=`.")
    if flops is not None:
        _set_budget(model, layers, adapter, flops)
        return
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        g = _granularity(model, adapter)
        _assign(layers, adapter, {n: F.fraction_rank(fraction, layer.nsn_max_rank[adapter], g) for n, layer in layers.items()})
        _record(model, adapter, {n: layer.nsn_rank[adapter] for n, layer in layers.items()})
        return
    if isinstance(rank, Mapping):
        assignments: dict[str, int] = {}
        for key in rank:
            if key in layers:  # exact module names (the common, per-layer case) need no pattern scan
                continue
            hits = [n for n in layers if lookup_pattern({key: 0}, n)]
            if not hits:
                raise ValueError(f"set_rank: '{key}' matches no NSN layer; layers are e.g. {list(layers)[:4]}")
        for name, layer in layers.items():
            key = lookup_pattern(rank, name)
            if key is not None:
                layer_rank = rank[key]
                limit = layer.nsn_max_rank[adapter]
                if not isinstance(layer_rank, int) or isinstance(layer_rank, bool) or not 1 <= layer_rank <= limit:
                    raise ValueError(f"Rank {layer_rank!r} for '{name}' is outside [1, {limit}] (its max rank)")
                assignments[name] = layer_rank
        _assign(layers, adapter, assignments)
        _record(model, adapter, {n: layer.nsn_rank[adapter] for n, layer in layers.items()})
        return
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int (or a dict of them), got {rank!r}")
    _assign(layers, adapter, {n: min(rank, layer.nsn_max_rank[adapter]) for n, layer in layers.items()})
    _record(model, adapter, rank)


def _assign(layers: Mapping[str, NSNLayer], adapter: str, ranks: Mapping[str, int]) -> None:
    """Set the ranks; a merged layer whose rank changed is re-merged at its new rank (it computes what
    ``get_rank`` reports)."""
    for name, rank in ranks.items():
        layer = layers[name]
        if layer.nsn_rank[adapter] != rank:
            layer.nsn_rank[adapter] = rank
            if adapter in layer.merged_adapters:
                layer.refresh_merged_weight()


def _record(model: nn.Module, adapter: str, spec: RankSpec) -> None:
    """Keep ``config.active_rank`` in sync so ``save_pretrained`` reproduces the current rank."""
    tuner = _tuner(model)
    if tuner is None:
        return
    if isinstance(spec, Mapping):
        values = set(spec.values())
        maxima = {n: layer.nsn_max_rank[adapter] for n, layer in nsn_layers(model).items()}
        if all(spec[n] == maxima[n] for n in spec):
            spec = None
        elif len(values) == 1:
            only = values.pop()
            # A single int reproduces this only if no layer was clamped below it.
            spec = only if all(min(only, maxima[n]) == spec[n] for n in spec) else dict(spec)
        else:
            spec = dict(spec)
    tuner.peft_config[adapter].active_rank = spec


def get_rank(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, int]:
    """Current rank of every NSN layer, ``{module name: rank}``."""
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    return {name: layer.nsn_rank[adapter] for name, layer in layers.items()}


def get_max_rank(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, int]:
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    return {name: layer.nsn_max_rank[adapter] for name, layer in layers.items()}


@contextlib.contextmanager
def at_rank(
    model: nn.Module,
    rank: Optional[RankSpec] = None,
    *,
    fraction: Optional[float] = None,
    flops: Optional[float] = None,
    adapter_name: Optional[str] = None,
) -> Iterator[nn.Module]:
    """Run temporarily at ``rank`` (same arguments as :func:`set_rank`); the previous ranks come back after."""
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    previous = {name: layer.nsn_rank[adapter] for name, layer in layers.items()}
    tuner = _tuner(model)
    previous_spec = tuner.peft_config[adapter].active_rank if tuner is not None else None
    set_rank(model, rank, fraction=fraction, flops=flops, adapter_name=adapter)
    try:
        yield model
    finally:
        _assign(layers, adapter, previous)
        if tuner is not None:
            tuner.peft_config[adapter].active_rank = previous_spec


def selectable_ranks(model: nn.Module, adapter_name: Optional[str] = None) -> list[int]:
    """Uniform ranks on the granularity grid up to the largest layer max rank."""
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    top = max(layer.nsn_max_rank[adapter] for layer in layers.values())
    return F.rank_grid(top, _granularity(model, adapter))


@dataclass
class FlopsReport:
    """Matmul FLOPs of a forward pass over ``tokens`` tokens (attention score products excluded)."""

    tokens: int
    targeted_dense: int
    targeted: int
    other: int
    per_layer: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def model_dense(self) -> int:
        return self.targeted_dense + self.other

    @property
    def model(self) -> int:
        return self.targeted + self.other

    @property
    def targeted_fraction(self) -> float:
        return self.targeted / self.targeted_dense if self.targeted_dense else 1.0

    @property
    def model_fraction(self) -> float:
        return self.model / self.model_dense if self.model_dense else 1.0


def _other_dense_flops(model: nn.Module, tokens: int) -> int:
    total = 0
    inside = set()
    for _name, module in model.named_modules():
        if isinstance(module, NSNLayer):
            inside.update(id(m) for m in module.modules())
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.Linear):
            total += F.dense_flops(module.out_features, module.in_features, tokens)
        elif isinstance(module, Conv1D):
            total += F.dense_flops(module.weight.shape[1], module.weight.shape[0], tokens)
    return total


def estimate_flops(
    model: nn.Module, rank: Optional[RankSpec] = None, tokens: int = 1, adapter_name: Optional[str] = None
) -> FlopsReport:
    """FLOPs of the targeted layers (at ``rank``, default: current ranks) and of all matmuls in the model."""
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    per_layer, dense = {}, 0
    for name, layer in layers.items():
        m, d = layer.out_features, layer.in_features
        if rank is None:
            r = layer.nsn_rank[adapter]
        elif isinstance(rank, Mapping):
            key = lookup_pattern(rank, name)
            r = layer.nsn_rank[adapter] if key is None else rank[key]
        else:
            r = min(rank, layer.nsn_max_rank[adapter])
        per_layer[name] = F.factored_flops(m, d, r, tokens)
        dense += F.dense_flops(m, d, tokens)
    return FlopsReport(tokens, dense, sum(per_layer.values()), _other_dense_flops(model, tokens), per_layer)


def select_rank_for_target_flops(
    model: nn.Module, target_fraction: float, *, per_layer: bool = False, scope: str = "targeted", adapter_name: Optional[str] = None
) -> Union[int, dict[str, int]]:
    """Rank(s) on the granularity grid whose FLOPs stay within ``target_fraction`` of the dense cost.

    ``per_layer=False`` returns one int: the largest uniform grid rank meeting the budget over all
    targeted layers (``scope="targeted"``) or the whole model (``scope="model"``). ``per_layer=True``
    returns ``{module: rank}`` with each layer at the largest grid rank within its own budget. If even
    the smallest grid rank exceeds the budget, the smallest is returned (and a warning logged).
    """
    import logging

    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction!r}")
    if scope not in ("targeted", "model"):
        raise ValueError(f"scope must be 'targeted' or 'model', got {scope!r}")
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    g = _granularity(model, adapter)
    if per_layer:
        if scope != "targeted":
            raise ValueError("per_layer=True budgets each layer itself; use scope='targeted'")
        return {
            name: F.rank_for_flops_fraction(layer.out_features, layer.in_features, target_fraction, layer.nsn_max_rank[adapter], g)
            for name, layer in layers.items()
        }
    grid = selectable_ranks(model, adapter)
    chosen = None
    for r in grid:
        report = estimate_flops(model, r, adapter_name=adapter)
        fraction = report.targeted_fraction if scope == "targeted" else report.model_fraction
        if fraction <= target_fraction + 1e-12:
            chosen = r
    if chosen is None:
        logging.getLogger(__name__).warning(
            "No rank on the grid meets %.3f of dense FLOPs (%s); returning the smallest, %d", target_fraction, scope, grid[0]
        )
        chosen = grid[0]
    return chosen
