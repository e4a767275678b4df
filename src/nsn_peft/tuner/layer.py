"""``NSNLinear``: a dense layer replaced by a nested factorisation that runs at any rank r ≤ R."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["NSNLayer", "NSNLinear", "check_supported_module"]


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__module__.split(".")[0] in {"bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "torchao"}
        or hasattr(module, "qweight")
        or (weight is not None and not torch.is_floating_point(weight))
        or (weight is not None and type(weight).__name__ in {"Params4bit", "Int8Params"})
    )


def check_supported_module(module: nn.Module, name: str) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``module`` is a dense linear layer NSN can factor."""
    if isinstance(module, NSNLayer):
        return
    kind = type(module).__name__
    if _is_quantized(module):
        raise TypeError(
            f"NSN cannot adapt '{name}' ({kind}): quantized layers are not supported; "
            "load the model in fp32/bf16/fp16 (dequantized) before adapting it."
        )
    if isinstance(module, (nn.Linear, Conv1D)):
        return
    if isinstance(module, nn.Embedding):
        reason = "embeddings are lookups, not matrix products, and are not factored"
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        reason = f"convolutions (kernel size {tuple(module.kernel_size)}) are not supported; only nn.Linear and Conv1D are"
    else:
        reason = "only nn.Linear and transformers' Conv1D layers are supported"
    raise TypeError(f"NSN cannot adapt '{name}' ({kind}): {reason}.")


class NSNLayer(BaseTunerLayer):
    """Per-adapter nested factors ``nsn_A`` (R×d) and ``nsn_B`` (m×R) and the active rank of each adapter."""

    adapter_layer_names = ("nsn_A", "nsn_B")
    other_param_names = ("nsn_rank", "nsn_max_rank")

    def __init__(self, base_layer: nn.Module, module_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.nsn_A = nn.ParameterDict()
        self.nsn_B = nn.ParameterDict()
        self.nsn_rank: dict[str, int] = {}
        self.nsn_max_rank: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._original_weight: Optional[torch.Tensor] = None
        base = self.get_base_layer()
        self.is_conv1d = isinstance(base, Conv1D)
        if self.is_conv1d:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    # -- weights -----------------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The base layer's weight as (out_features, in_features), whatever its storage layout."""
        weight = self.get_base_layer().weight
        return weight.T if self.is_conv1d else weight

    def update_layer(self, adapter_name: str, max_rank: int) -> None:
        """Create (uninitialised, zero) factors of rank ``max_rank`` for ``adapter_name``."""
        limit = min(self.in_features, self.out_features)
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1 for '{self.module_name}', got {max_rank}")
        max_rank = min(max_rank, limit)
        weight = self.get_base_layer().weight
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        self.nsn_A[adapter_name] = nn.Parameter(torch.zeros(max_rank, self.in_features, **kwargs))
        self.nsn_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, max_rank, **kwargs))
        self.nsn_max_rank[adapter_name] = max_rank
        self.nsn_rank[adapter_name] = max_rank
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def set_factors(self, adapter_name: str, b: torch.Tensor, a: torch.Tensor) -> None:
        """Install factors (shapes may be smaller than the current max rank, which then shrinks)."""
        rank = a.shape[0]
        if b.shape != (self.out_features, rank) or a.shape != (rank, self.in_features):
            raise ValueError(
                f"Factors for '{self.module_name}' have shapes B{tuple(b.shape)}, A{tuple(a.shape)}; expected "
                f"B({self.out_features}, r), A(r, {self.in_features})"
            )
        old = self.nsn_A[adapter_name]
        kwargs = {"device": old.device, "dtype": old.dtype}
        if rank == old.shape[0]:
            self.nsn_A[adapter_name].copy_(a)
            self.nsn_B[adapter_name].copy_(b)
        else:
            requires_grad = old.requires_grad
            self.nsn_A[adapter_name] = nn.Parameter(a.to(**kwargs).contiguous(), requires_grad=requires_grad)
            self.nsn_B[adapter_name] = nn.Parameter(b.to(**kwargs).contiguous(), requires_grad=requires_grad)
            self.nsn_max_rank[adapter_name] = rank
        self.nsn_rank[adapter_name] = min(self.nsn_rank.get(adapter_name, rank), rank)

    # -- rank control ------------------------------------------------------------------------------
    def set_rank(self, rank: int, adapter_name: Optional[str] = None) -> None:
        names = [adapter_name] if adapter_name is not None else list(self.nsn_A.keys())
        for name in names:
            limit = self.nsn_max_rank[name]
            if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
                raise ValueError(f"Rank {rank!r} is invalid for '{self.module_name}' (adapter '{name}'): must be in [1, {limit}]")
            self.nsn_rank[name] = rank
        self.refresh_merged_weight()

    @torch.no_grad()
    def refresh_merged_weight(self) -> None:
        """After a rank change, make a merged layer compute its adapter's *current* rank again.

        ``merge()`` writes ``B[:, :r] @ A[:r]`` into the base weight; without this a later ``set_rank`` would change
        ``get_rank()`` and the saved config while the model kept computing the old rank.
        """
        if not self.merged or self._original_weight is None:
            return
        name = self.merged_adapters[0]
        base = self.get_base_layer()
        merged = self.effective_weight(name).to(base.weight.dtype)
        base.weight.data.copy_(merged.T if self.is_conv1d else merged)

    def _single_active_adapter(self) -> Optional[str]:
        active = [name for name in self.active_adapters if name in self.nsn_A]
        if len(active) > 1:
            raise ValueError(
                f"'{self.module_name}' has several active NSN adapters {active}: NSN factors replace the dense "
                "weight, so only one adapter can be active at a time (use set_adapter)."
            )
        return active[0] if active else None

    def effective_weight(self, adapter_name: str, rank: Optional[int] = None) -> torch.Tensor:
        """``B[:, :r] @ A[:r]`` as (out_features, in_features)."""
        r = self.nsn_rank[adapter_name] if rank is None else rank
        return self.nsn_B[adapter_name][:, :r] @ self.nsn_A[adapter_name][:r]

    # -- merging -----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if self.merged:
            check_adapters_to_merge(self, adapter_names)  # PEFT's warning: already merged, nothing to do
            return
        names = adapter_names if adapter_names is not None else self.active_adapters
        names = [n for n in names if n in self.nsn_A]
        if not names:
            return
        if len(names) > 1:
            raise ValueError(f"Only one NSN adapter can be merged into '{self.module_name}', got {names}")
        base = self.get_base_layer()
        merged = self.effective_weight(names[0]).to(base.weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {names[0]} seems to be broken "
                f"(NaN/Inf in the merged weight of '{self.module_name}')"
            )
        self._original_weight = base.weight.data.clone()
        base.weight.data.copy_(merged.T if self.is_conv1d else merged)
        self.merged_adapters.append(names[0])

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn(f"'{self.module_name}' is not merged; nothing to unmerge.", stacklevel=2)
            return
        self.get_base_layer().weight.data.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters.clear()


class NSNLinear(nn.Module, NSNLayer):
    """Replaces ``nn.Linear``/``Conv1D``: ``y = (x @ A[:r]ᵀ) @ B[:, :r]ᵀ + bias``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, max_rank: int, module_name: str = "") -> None:
        super().__init__()
        NSNLayer.__init__(self, base_layer, module_name=module_name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, max_rank)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        name = self._single_active_adapter()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        r = self.nsn_rank[name]
        a = self.nsn_A[name][:r]  # views: switching rank copies nothing
        b = self.nsn_B[name][:, :r]
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != a.dtype:
            x = x.to(a.dtype)
        return F.linear(F.linear(x, a), b, self.get_base_layer().bias)

    def __repr__(self) -> str:
        ranks = ", ".join(f"{n}: r={self.nsn_rank[n]}/{self.nsn_max_rank[n]}" for n in self.nsn_A)
        kind = type(self.get_base_layer()).__name__
        return f"NSNLinear({kind}, in_features={self.in_features}, out_features={self.out_features}, {ranks})"
