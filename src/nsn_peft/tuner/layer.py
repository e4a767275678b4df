"""``NSNLinear``: a dense layer replaced by a nested factorisation that runs at any rank r ≤ R."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .active_ranks import ActiveRanks
from .kernels import nested_linear

__all__ = ["NSNLayer", "NSNLinear", "RuntimeOptions", "rank_major"]


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model's NSN layers run, set per model (:func:`nsn_peft.set_runtime_options`), never process-wide.

    Attributes:
        kernels: Route the forward through :func:`nsn_peft.tuner.kernels.nested_linear`, which sends 1-token
            CUDA inference calls to a Triton split-K kernel (2–27 % faster than two cuBLAS calls per layer on
            an H100 under CUDA graphs) and everything else to the same two ``F.linear`` calls. Off by default
            until it is measured end to end on a whole model.
        rank_major: Store ``nsn_B`` column-major (:func:`rank_major`): for serving from factors and compiled
            rank switching. Off: contiguous factors, which training needs (FSDP2/ZeRO-3 shard only those, DDP's
            gradient buckets follow the layout). Outputs do not depend on it.
    """

    kernels: bool = False
    rank_major: bool = False

    def __post_init__(self) -> None:
        for option in dataclasses.fields(self):
            if not isinstance(getattr(self, option.name), bool):
                raise ValueError(f"RuntimeOptions.{option.name} must be a bool, got {getattr(self, option.name)!r}")


def rank_major(b: torch.Tensor) -> torch.Tensor:
    """``b`` (m×R) stored column-major (the contiguous rows of ``bᵀ``): ``b[:, :r]`` is then one contiguous block
    whose strides do not depend on r, so a compiled graph need not specialise on the rank (with row-major
    storage, "is ``b[:, :r]`` contiguous" is a question about r, which torch.compile guards on)."""
    return b if b.dim() != 2 or b.t().is_contiguous() else b.t().contiguous().t()


class NSNLayer(BaseTunerLayer):
    """Per-adapter nested factors ``nsn_A`` (R×d) and ``nsn_B`` (m×R) and the active rank of each adapter."""

    adapter_layer_names = ("nsn_A", "nsn_B")
    other_param_names = ("nsn_rank", "nsn_max_rank")

    def __init__(self, base_layer: nn.Module, module_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.nsn_A = nn.ParameterDict()
        self.nsn_B = nn.ParameterDict()
        self._nsn_rank_carrier: dict[str, torch.Tensor] = {}
        self.nsn_rank: dict[str, int] = ActiveRanks(self._nsn_rank_carrier)
        self.nsn_max_rank: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._original_weight: Optional[torch.Tensor] = None
        self.base_weight_dropped = False
        self.runtime_options = RuntimeOptions()
        base = self.get_base_layer()
        self.is_conv1d = isinstance(base, Conv1D)
        if self.is_conv1d:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    # -- weights -----------------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The base layer's weight as (out_features, in_features), whatever its storage layout."""
        if self.base_weight_dropped:
            raise RuntimeError(
                f"'{self.module_name}' holds no dense weight: it was dropped because the adapter runs from its "
                "factors only (NSNConfig(keep_base_weights=False)). Load the model with keep_base_weights=True to "
                "keep it, or use effective_weight() for the weight the factors give."
            )
        weight = self.get_base_layer().weight
        return weight.T if self.is_conv1d else weight

    @property
    def full_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def update_layer(self, adapter_name: str, max_rank: int, device: Optional[torch.device | str] = None) -> None:
        """Create (uninitialised, zero) factors of rank ``max_rank`` for ``adapter_name``.

        ``device="meta"`` allocates nothing: the factors are then expected from a checkpoint (see
        :meth:`_materialise_meta_factors`).
        """
        limit = self.full_rank
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1 for '{self.module_name}', got {max_rank}")
        max_rank = min(max_rank, limit)
        weight = self.get_base_layer().weight
        kwargs = {"device": weight.device if device is None else device, "dtype": weight.dtype}
        self.nsn_A[adapter_name] = nn.Parameter(torch.zeros(max_rank, self.in_features, **kwargs))
        b = torch.zeros(self.out_features, max_rank, **kwargs)
        self.nsn_B[adapter_name] = nn.Parameter(rank_major(b) if self.runtime_options.rank_major else b)
        self.nsn_max_rank[adapter_name] = max_rank
        self.set_rank(max_rank, adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def drop_base_weight(self) -> None:
        """Free the dense weight (the factors replace it); the bias stays.

        The weight becomes a zero-element tensor of the same dtype and device, so ``model.to(...)``, dtype and
        device queries keep working and parameter counts show what is really held.
        """
        if self.base_weight_dropped:
            return
        base = self.get_base_layer()
        weight = base.weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        # Straight into _parameters: a meta-device context (accelerate's init_empty_weights, used by PEFT's
        # low_cpu_mem_usage loading) would otherwise move the placeholder to meta, and PEFT moves the factors
        # to the device of the base weight.
        base._parameters["weight"] = nn.Parameter(
            torch.empty(0, dtype=weight.dtype, device=device), requires_grad=False
        )
        self.base_weight_dropped = True

    @torch.no_grad()
    def rebuild_base_weight(self, adapter_name: str, rank: Optional[int] = None) -> None:
        """Give the base layer a dense weight again: ``B[:, :r] @ A[:r]`` (default r: the max rank)."""
        merged = self.effective_weight(adapter_name, self.nsn_max_rank[adapter_name] if rank is None else rank)
        base = self.get_base_layer()
        dtype = base.weight.dtype
        weight = (merged.T if self.is_conv1d else merged).to(dtype).contiguous()
        base._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
        self.base_weight_dropped = False

    def check_base_weight_recoverable(self, adapter_name: Optional[str]) -> None:
        """Raise unless the dense weight is held, or the factors of ``adapter_name`` are full-rank (exact)."""
        if not self.base_weight_dropped:
            return
        if adapter_name is None or adapter_name not in self.nsn_A:
            raise RuntimeError(
                f"'{self.module_name}' has no dense weight (dropped: keep_base_weights=False) and no active NSN "
                "adapter to rebuild it from."
            )
        limit = self.nsn_max_rank[adapter_name]
        if limit < self.full_rank:
            raise RuntimeError(
                f"The dense weight of '{self.module_name}' cannot be rebuilt: it was dropped "
                f"(keep_base_weights=False) and adapter '{adapter_name}' keeps rank {limit} < {self.full_rank}, "
                "its full rank. Load the model with keep_base_weights=True to run or unload the dense layers, or "
                "use merge_and_unload() for the dense model at the current rank."
            )

    @torch.no_grad()
    def _materialise_meta_factors(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Load-state-dict pre-hook: factors created on the meta device take the checkpoint's tensors as they are.

        Factors-only loading thus allocates each factor once; ``nsn_B`` is installed rank-major (as NSN's reader delivers it)."""
        for factor in ("nsn_A", "nsn_B"):
            params = getattr(self, factor)
            for adapter, param in list(params.items()):
                key = f"{prefix}{factor}.{adapter}"
                if key not in state_dict:
                    continue
                if not self.runtime_options.rank_major:  # nsn_B may arrive rank-major; training (FSDP) needs contiguous
                    state_dict[key] = state_dict[key].contiguous()
                elif factor == "nsn_B" and param.is_meta:  # serving: rank-major as it is installed, never copied twice
                    state_dict[key] = rank_major(state_dict[key])
                if not param.is_meta:
                    continue
                value = state_dict[key].to(device=self.get_base_layer().weight.device, dtype=param.dtype)
                params[adapter] = nn.Parameter(value, requires_grad=param.requires_grad)

    @property
    def rank_major_storage(self) -> bool:
        """Whether ``nsn_B`` is stored rank-major (``runtime_options.rank_major``; set it with
        :meth:`set_runtime_options`)."""
        return self.runtime_options.rank_major

    def set_runtime_options(self, options: RuntimeOptions) -> bool:
        """Run with ``options`` (re-laying ``nsn_B`` out if the storage layout changes); True if a factor moved."""
        if not isinstance(options, RuntimeOptions):
            raise ValueError(f"'{self.module_name}': expected RuntimeOptions, got {options!r}")
        moved = self.make_rank_major(options.rank_major)
        self.runtime_options = options
        return moved

    def bypass_adapters(self, bypass: bool = True) -> bool:
        """Forward through the base layer's own weight (``True``) or the active adapter; returns the previous
        setting. Unlike PEFT's ``enable_adapters`` it leaves ``requires_grad`` alone (a dense teacher inside a
        training step)."""
        previous = self._disable_adapters
        self._disable_adapters = bool(bypass)
        return previous

    @torch.no_grad()
    def make_rank_major(self, enabled: bool = True) -> bool:
        """Store every ``nsn_B`` column-major (:func:`rank_major`; for compiled rank switching and serving), or with
        ``enabled=False`` contiguous (FSDP2/ZeRO-3 shard only those); True if a factor was re-laid out."""
        self.runtime_options = dataclasses.replace(self.runtime_options, rank_major=bool(enabled))
        changed = False
        for adapter, param in list(self.nsn_B.items()):
            if param.is_meta or param.dim() != 2 or (param.t().is_contiguous() if enabled else param.is_contiguous()):
                continue
            laid_out = rank_major(param.data) if enabled else param.data.contiguous()
            self.nsn_B[adapter] = nn.Parameter(laid_out, requires_grad=param.requires_grad)
            changed = True
        return changed

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
        device = old.device if not old.is_meta else self.get_base_layer().weight.device
        kwargs = {"device": device, "dtype": old.dtype}
        if rank == old.shape[0] and not old.is_meta:
            self.nsn_A[adapter_name].copy_(a)
            self.nsn_B[adapter_name].copy_(b)  # copy_ keeps the storage layout
        else:
            requires_grad = old.requires_grad
            self.nsn_A[adapter_name] = nn.Parameter(a.to(**kwargs).contiguous(), requires_grad=requires_grad)
            b = b.to(**kwargs)
            b = rank_major(b) if self.runtime_options.rank_major else b.contiguous()
            self.nsn_B[adapter_name] = nn.Parameter(b, requires_grad=requires_grad)
            self.nsn_max_rank[adapter_name] = rank
        self.set_rank(min(self.nsn_rank.get(adapter_name, rank), rank), adapter_name)
        if adapter_name in self.merged_adapters:
            self.refresh_merged_weight()  # new factors, same rank: the merged weight is stale all the same

    # -- rank control ------------------------------------------------------------------------------
    def set_rank(self, rank: int, adapter_name: Optional[str] = None) -> None:
        """Run ``adapter_name`` (default: every adapter of the layer) at ``rank``, in ``[1, max rank]``.

        The only writer of ``nsn_rank``: rank helpers (:func:`nsn_peft.set_rank`, ``at_rank``, budgets) resolve
        their operating point to per-layer ranks and call this. A merged layer whose adapter changed rank is
        re-merged here, so it always computes the rank it reports.
        """
        if adapter_name is None:
            names = list(self.nsn_A.keys())
            for name in names:  # all checked before any changes
                self._check_rank(rank, name)
            for name in names:
                self.set_rank(rank, name)
            return
        # The per-adapter path is what a rank switch runs once per layer: kept to a few dict operations.
        if type(rank) is not int or not 1 <= rank <= self.nsn_max_rank[adapter_name]:
            self._check_rank(rank, adapter_name)
        if self.nsn_rank.get(adapter_name) == rank:
            return
        self.nsn_rank[adapter_name] = rank
        if adapter_name in self.merged_adapters:
            self.refresh_merged_weight()

    def _check_rank(self, rank: Any, adapter_name: str) -> None:
        limit = self.nsn_max_rank[adapter_name]
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
            raise ValueError(
                f"Rank {rank!r} is invalid for '{self.module_name}' (adapter '{adapter_name}'): must be in [1, {limit}]"
            )

    @torch.no_grad()
    def refresh_merged_weight(self) -> None:
        """Make a merged layer compute its adapter's *current* rank and factors again (:meth:`set_rank` calls it).

        ``merge()`` writes ``B[:, :r] @ A[:r]`` into the base weight; without this a later rank change would change
        ``get_rank()`` and the saved config while the model kept computing the old rank.
        """
        if not self.merged or (self._original_weight is None and not getattr(self, "_merged_from_factors", False)):
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
    def adapter_to_merge(self, adapter_names: Optional[list[str]] = None) -> list[str]:
        """The NSN adapter ``merge(adapter_names=...)`` merges here (none, or one; default: the active one).

        Raises ``ValueError`` for several adapters, or for one while another is merged: factors replace the
        weight rather than add to it, so a layer holds one merged adapter (unmerge first).
        """
        names = adapter_names if adapter_names is not None else self.active_adapters
        names = [n for n in names if n in self.nsn_A]
        if len(names) > 1:
            raise ValueError(f"Only one NSN adapter can be merged into '{self.module_name}', got {names}")
        if names and self.merged and names[0] not in self.merged_adapters:
            raise ValueError(
                f"Cannot merge adapter '{names[0]}' into '{self.module_name}': it holds adapter "
                f"'{self.merged_adapters[0]}' merged already, and NSN factors replace the weight instead of adding to "
                "it, so a layer holds one merged adapter. Call unmerge_adapter() first."
            )
        return names

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = self.adapter_to_merge(adapter_names)
        if self.merged:
            check_adapters_to_merge(self, adapter_names)  # PEFT's warning: already merged, nothing to do
            return
        if not names:
            return
        base = self.get_base_layer()
        merged = self.effective_weight(names[0]).to(base.weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {names[0]} seems to be broken "
                f"(NaN/Inf in the merged weight of '{self.module_name}')"
            )
        if self.base_weight_dropped:
            # Factors only: the merged weight is new memory; unmerge frees it again (nothing to restore).
            self.rebuild_base_weight(names[0], self.nsn_rank[names[0]])
            self._merged_from_factors = True
        else:
            self._original_weight = base.weight.data.clone()
            base.weight.data.copy_(merged.T if self.is_conv1d else merged)
        self.merged_adapters.append(names[0])

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn(f"'{self.module_name}' is not merged; nothing to unmerge.", stacklevel=2)
            return
        if getattr(self, "_merged_from_factors", False):
            self.drop_base_weight()
            self._merged_from_factors = False
        else:
            self.get_base_layer().weight.data.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters.clear()


class NSNLinear(nn.Module, NSNLayer):
    """Replaces ``nn.Linear``/``Conv1D``: ``y = (x @ A[:r]ᵀ) @ B[:, :r]ᵀ + bias``."""

    #: Deprecated: ``NSNLinear.use_kernels = True`` turns the kernels on for every model of the process. Use
    #: ``set_runtime_options(model, kernels=True)`` (:class:`RuntimeOptions`), which is per model.
    use_kernels: bool = False

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        max_rank: int,
        module_name: str = "",
        device: Optional[torch.device | str] = None,
        rank_major: bool = False,
        runtime_options: Optional[RuntimeOptions] = None,
    ) -> None:
        super().__init__()
        NSNLayer.__init__(self, base_layer, module_name=module_name)
        options = runtime_options or RuntimeOptions()
        self.runtime_options = dataclasses.replace(options, rank_major=options.rank_major or rank_major)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, max_rank, device=device)
        self.register_load_state_dict_pre_hook(NSNLayer._materialise_meta_factors)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        name = self._single_active_adapter()
        if name is None:
            return self._base_forward(x, *args, **kwargs)
        # The rank is a tensor size, not an int, so that torch.compile keeps it symbolic (see _rank_carrier).
        r = self._nsn_rank_carrier[name].shape[-1]
        return self._factored(x, name, r)

    def _factored(self, x: torch.Tensor, name: str, r: int) -> torch.Tensor:
        a, b = self.nsn_A[name], self.nsn_B[name]
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != a.dtype:
            x = x.to(a.dtype)
        if self.runtime_options.kernels or NSNLinear.use_kernels:
            if NSNLinear.use_kernels:
                _warn_process_wide_kernels()
            return nested_linear(x, a, b, r, self.get_base_layer().bias)
        # Views: switching rank copies nothing; b[:, :r] is one contiguous block (column-major storage).
        return F.linear(F.linear(x, a[:r]), b[:, :r], self.get_base_layer().bias)

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The dense layer; without its weight (factors only) the full-rank factors stand in for it, exactly."""
        if not self.base_weight_dropped:
            return self.base_layer(x, *args, **kwargs)
        name = next((n for n in self.active_adapters if n in self.nsn_A), None)
        self.check_base_weight_recoverable(name)
        return self._factored(x, name, self.nsn_max_rank[name])

    def __repr__(self) -> str:
        ranks = ", ".join(f"{n}: r={self.nsn_rank[n]}/{self.nsn_max_rank[n]}" for n in self.nsn_A)
        kind = type(self.get_base_layer()).__name__
        return f"NSNLinear({kind}, in_features={self.in_features}, out_features={self.out_features}, {ranks})"


def _warn_process_wide_kernels() -> None:
    warnings.warn(
        "NSNLinear.use_kernels (one switch for every model in the process) is deprecated; use "
        "nsn_peft.set_runtime_options(model, kernels=True), which applies to that model only.",
        FutureWarning,
        stacklevel=4,
    )
