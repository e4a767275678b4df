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
from ..naming import canonical_module_name, strip_wrapper_names
from .layer import NSNLayer
from .rank_spec import RankLike, RankSpec, active_rank_field, plan_for_budget, resolve_ranks

__all__ = [
    "FlopsReport",
    "RankLike",
    "RankSpec",
    "at_rank",
    "budget_plan",
    "budget_plans",
    "estimate_flops",
    "get_rank",
    "nsn_layers",
    "ranks_at",
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


def _stored_plans(model: nn.Module, adapter: str) -> Mapping[str, Mapping[str, int]]:
    tuner = _tuner(model)
    return tuner.peft_config[adapter].budget_plans if tuner is not None else {}


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
    budget = RankSpec.flops(flops).value
    adapter = _adapter(model, nsn_layers(model), adapter_name)
    return plan_for_budget(_stored_plans(model, adapter), budget)


def _resolve(model: nn.Module, layers: Mapping[str, NSNLayer], adapter: str, spec: RankLike) -> dict[str, int]:
    """``spec`` as the rank of every layer of ``layers`` (:func:`~nsn_peft.tuner.rank_spec.resolve_ranks`)."""
    spec = RankSpec.coerce(spec)
    maxima = {name: layer.nsn_max_rank[adapter] for name, layer in layers.items()}
    current = {name: layer.nsn_rank[adapter] for name, layer in layers.items()} if spec.kind == "layers" else None
    plans = _stored_plans(model, adapter) if spec.kind == "flops" else None
    return resolve_ranks(spec, maxima, current=current, granularity=_granularity(model, adapter), budget_plans=plans)


def _apply(layers: Mapping[str, NSNLayer], adapter: str, ranks: Mapping[str, int]) -> None:
    """Give each layer its rank through :meth:`NSNLayer.set_rank` (which re-merges a merged layer)."""
    for name, rank in ranks.items():
        layers[name].set_rank(rank, adapter)


def set_rank(
    model: nn.Module,
    rank: Optional[RankLike] = None,
    *,
    fraction: Optional[float] = None,
    flops: Optional[float] = None,
    adapter_name: Optional[str] = None,
) -> None:
    """Switch the active rank of NSN layers (no tensor is copied: forward slices views).

    Args:
        rank: a :class:`RankSpec`; or an int for every layer (clamped to each layer's max rank, so
            ``set_rank(m, 10**9)`` means "full"); or a dict ``{module name or pattern: rank}`` — strict: a
            rank above a layer's max or a key that matches no layer raises ``ValueError``; layers not named
            keep their rank; or ``"full"``.
        fraction: instead of ``rank``, a fraction of each layer's max rank, rounded down to the grid (a layer
            whose max rank is not above ``rank_granularity`` is rounded down to an integer rank instead);
            the same as ``RankSpec.fraction(fraction)``.
        flops: instead of ``rank``, a FLOPs budget with a stored plan (``NSNConfig.budget_plans``): every layer
            takes its planned rank (``RankSpec.flops(flops)``). A budget without a plan raises ``ValueError``
            naming those available.

    Every layer is checked before any changes. On a merged model (``merge_adapter()``) the merged weights are
    recomputed at the new ranks, so the model always computes the ranks that :func:`get_rank` reports and
    that ``save_pretrained`` records.
    """
    spec = RankSpec.from_arguments(rank, fraction=fraction, flops=flops)
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    _apply(layers, adapter, _resolve(model, layers, adapter, spec))


def get_rank(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, int]:
    """Current rank of every NSN layer, ``{module name: rank}``."""
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    return {name: layer.nsn_rank[adapter] for name, layer in layers.items()}


def ranks_at(model: nn.Module, rank: RankLike, adapter_name: Optional[str] = None) -> dict[str, int]:
    """The rank every NSN layer would run at for ``rank`` (any :class:`RankSpec`), without switching to it."""
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    return _resolve(model, layers, adapter, rank)


def get_max_rank(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, int]:
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    return {name: layer.nsn_max_rank[adapter] for name, layer in layers.items()}


@contextlib.contextmanager
def at_rank(
    model: nn.Module,
    rank: Optional[RankLike] = None,
    *,
    fraction: Optional[float] = None,
    flops: Optional[float] = None,
    adapter_name: Optional[str] = None,
) -> Iterator[nn.Module]:
    """Run temporarily at ``rank`` (same arguments as :func:`set_rank`); the previous ranks come back after."""
    spec = RankSpec.from_arguments(rank, fraction=fraction, flops=flops)
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    previous = {name: layer.nsn_rank[adapter] for name, layer in layers.items()}
    _apply(layers, adapter, _resolve(model, layers, adapter, spec))
    try:
        yield model
    finally:
        _apply(layers, adapter, previous)


def active_rank_for_save(model: nn.Module, adapter_name: str) -> Union[None, int, dict[str, int]]:
    """``NSNConfig.active_rank`` as ``save_pretrained`` writes it: derived from the layers' current ranks of
    ``adapter_name`` (``None`` when the model holds no layer of it)."""
    layers = {
        strip_wrapper_names(canonical_module_name(n)): m
        for n, m in model.named_modules()
        if isinstance(m, NSNLayer) and adapter_name in m.nsn_rank
    }
    if not layers:
        return None
    ranks = {name: layer.nsn_rank[adapter_name] for name, layer in layers.items()}
    return active_rank_field(ranks, {name: layer.nsn_max_rank[adapter_name] for name, layer in layers.items()})


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
    model: nn.Module, rank: Optional[RankLike] = None, tokens: int = 1, adapter_name: Optional[str] = None
) -> FlopsReport:
    """FLOPs of the targeted layers (at ``rank``, any :class:`RankSpec`; default: current ranks) and of all
    matmuls in the model."""
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    if rank is None:
        ranks = {name: layer.nsn_rank[adapter] for name, layer in layers.items()}
    else:
        ranks = _resolve(model, layers, adapter, rank)
    per_layer, dense = {}, 0
    for name, layer in layers.items():
        m, d = layer.out_features, layer.in_features
        per_layer[name] = F.factored_flops(m, d, ranks[name], tokens)
        dense += F.dense_flops(m, d, tokens)
    return FlopsReport(tokens, dense, sum(per_layer.values()), _other_dense_flops(model, tokens), per_layer)


def select_rank_for_target_flops(
    model: nn.Module,
    target_fraction: float,
    *,
    per_layer: bool = False,
    scope: str = "targeted",
    adapter_name: Optional[str] = None,
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
            name: F.rank_for_flops_fraction(
                layer.out_features, layer.in_features, target_fraction, layer.nsn_max_rank[adapter], g
            )
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
            "No rank on the grid meets %.3f of dense FLOPs (%s); returning the smallest, %d",
            target_fraction,
            scope,
            grid[0],
        )
        chosen = grid[0]
    return chosen
