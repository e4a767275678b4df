"""A compressed (low-rank) transformers causal LM: the base architecture with some linear layers factored.

This file is saved beside the weights of every model that ``nsn_peft.save_compressed`` writes and is named in
its ``config.json`` (``auto_map``), so the model opens with plain transformers and no nsn-peft installed::

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

It depends on torch and transformers only, and is the same file for every architecture: ``auto_map`` names the
class ``NSNCompressed<base class>`` (e.g. ``NSNCompressedLlamaForCausalLM``), which this module builds on first use
(:func:`compressed_model_class`). It is the base architecture's own class in which every layer named in
``config.nsn_ranks`` is a :class:`FactoredLinear`:
two ``nn.Linear`` (``down``: d→R, ``up``: R→m, the bias on ``up``), so quantizers (torchao, bitsandbytes),
``device_map`` and everything else that acts on ``nn.Linear`` reach the factors. A *nested* export stores the
largest rank each layer runs at and every FLOPs-budget plan (``config.nsn_budget_plans``); ``set_budget`` switches
between them at no cost (each layer runs on prefix slices of its factors).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
import transformers
from torch import nn

CLASS_PREFIX = "NSNCompressed"


class FactoredLinear(nn.Module):
    """``y = up(down(x))``: a dense ``m×d`` layer stored as rank-``R`` factors, run at any rank ``r ≤ R``.

    At ``r = R`` it calls the two ``nn.Linear`` themselves (what quantized or offloaded weights need); below, it
    runs on the first ``r`` rows of ``down`` and columns of ``up`` (views, nothing is copied).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_rank: int,
        bias: bool = True,
        rank: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.max_rank = in_features, out_features, max_rank
        self.rank = max_rank if rank is None else rank
        self.down = nn.Linear(in_features, max_rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(max_rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        if r == self.max_rank:
            return self.up(self.down(x))
        return F.linear(F.linear(x, self.down.weight[:r]), self.up.weight[:, :r], self.up.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}/{self.max_rank}"


def _layer_shape(module: nn.Module, name: str) -> tuple[int, int, bool]:
    """``(in_features, out_features, has_bias)`` of an ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored d×m)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D":
        d, m = module.weight.shape
        return d, m, module.bias is not None
    raise ValueError(
        f"config.nsn_ranks names '{name}', a {type(module).__name__}; only Linear/Conv1D layers are factored"
    )


class NSNCompressedMixin:
    """Factored layers and budget switching on top of a transformers model class."""

    def _nsn_factor_layers(self) -> None:
        ranks = dict(getattr(self.config, "nsn_ranks", None) or {})
        max_ranks = dict(getattr(self.config, "nsn_max_ranks", None) or ranks)
        for name, rank in ranks.items():
            old = self.get_submodule(name)
            d, m, bias = _layer_shape(old, name)
            weight = old.weight
            new = FactoredLinear(
                d, m, int(max_ranks.get(name, rank)), bias, rank=int(rank), device=weight.device, dtype=weight.dtype
            )
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, child, new)

    def factored_layers(self) -> dict[str, FactoredLinear]:
        """``{module name: layer}`` of every factored layer."""
        return {n: m for n, m in self.named_modules() if isinstance(m, FactoredLinear)}

    def get_ranks(self) -> dict[str, int]:
        """The rank every factored layer runs at."""
        return {n: m.rank for n, m in self.factored_layers().items()}

    def budgets(self) -> list[float]:
        """The FLOPs budgets with a stored plan (fractions of the factored layers' dense FLOPs), ascending."""
        return sorted(float(b) for b in (getattr(self.config, "nsn_budget_plans", None) or {}))

    def set_ranks(self, ranks: Union[int, str, dict[str, int]]) -> None:
        """Run at ``ranks``: one int for every layer (clamped to each layer's stored rank), ``"full"`` (the
        stored ranks), or ``{module name: rank}`` (layers not named keep theirs). Checked before any change."""
        layers = self.factored_layers()
        if ranks == "full":
            wanted = {n: m.max_rank for n, m in layers.items()}
        elif isinstance(ranks, int) and not isinstance(ranks, bool):
            if ranks < 1:
                raise ValueError(f"rank must be >= 1, got {ranks}")
            wanted = {n: min(ranks, m.max_rank) for n, m in layers.items()}
        elif isinstance(ranks, dict):
            unknown = sorted(set(ranks) - set(layers))
            if unknown:
                raise ValueError(f"no factored layer named {unknown[:3]}; factored layers: {sorted(layers)[:3]} ...")
            wanted = dict(ranks)
        else:
            raise ValueError(f"ranks must be an int, 'full' or a dict of module name -> rank, got {ranks!r}")
        for name, rank in wanted.items():
            limit = layers[name].max_rank
            if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
                raise ValueError(
                    f"rank {rank!r} is invalid for '{name}': it stores rank {limit}, so 1 <= rank <= {limit}"
                )
        for name, rank in wanted.items():
            layers[name].rank = rank
        # The config follows, so save_pretrained writes the ranks the model runs at.
        self.config.nsn_ranks = self.get_ranks()
        self.config.nsn_active_budget = None

    def set_budget(self, budget: float) -> None:
        """Run at the stored per-layer plan of FLOPs budget ``budget`` (see :meth:`budgets`)."""
        plans = getattr(self.config, "nsn_budget_plans", None) or {}
        key = next((k for k in plans if abs(float(k) - float(budget)) < 1e-6), None)
        if key is None:
            raise ValueError(f"no stored plan for budget {budget!r}; this model has plans for {self.budgets()}")
        self.set_ranks({name: int(r) for name, r in plans[key].items()})
        self.config.nsn_active_budget = float(key)


_CLASSES: dict[str, type] = {}


def compressed_model_class(base_architecture: str) -> type:
    """The class of a compressed ``base_architecture`` model (e.g. ``"LlamaForCausalLM"``), built once."""
    if base_architecture in _CLASSES:
        return _CLASSES[base_architecture]
    base = getattr(transformers, base_architecture, None)
    if base is None or not isinstance(base, type):
        raise ValueError(f"transformers {transformers.__version__} has no model class {base_architecture!r}")

    def __init__(self, config, *args, **kwargs) -> None:
        base.__init__(self, config, *args, **kwargs)
        self._nsn_factor_layers()

    name = CLASS_PREFIX + base_architecture
    # Named and placed as a class of this module, so transformers' save_pretrained copies this file and writes an
    # auto_map entry that finds the class again.
    cls = type(name, (NSNCompressedMixin, base), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    _CLASSES[base_architecture] = cls
    return cls


def __getattr__(name: str) -> type:
    """``NSNCompressed<base class>``: what ``auto_map`` names, built on first access (PEP 562)."""
    if name.startswith(CLASS_PREFIX) and name != CLASS_PREFIX:
        try:
            return compressed_model_class(name[len(CLASS_PREFIX) :])
        except ValueError as err:
            raise AttributeError(str(err)) from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
