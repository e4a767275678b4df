"""``NSNConfig``: the PEFT configuration of Nested Subspace Network adapters."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .loading import adapter_folder, check_config_fields, finish_interrupted_adapter_save, read_config_json
from .peft_type import extend_peft_type
from .rank_spec import budget_key

extend_peft_type()

InitMethod = Literal["svd", "projected", "whitened"]
BREAK_EVEN = "break-even"
INIT_METHODS = ("svd", "projected", "whitened")


@dataclass
class NSNConfig(PeftConfig):
    """Configuration of NSN adapters: each targeted dense layer ``W`` becomes a nested factorisation ``B @ A``.

    Args:
        max_rank: Largest rank R kept per layer (clamped to ``min(out, in)``); ``None`` keeps the full rank,
            so the adapted model reproduces the dense one exactly. ``"break-even"``: each layer keeps the
            largest rank on the ``rank_granularity`` grid whose factors are no bigger than its dense weight,
            ``R = md/(m+d)`` rounded down (a served model then holds no more parameters than the dense one).
        max_params_fraction: Instead of ``max_rank``, a parameter budget: each layer keeps the largest grid
            rank whose factors hold at most this fraction of its dense parameters (``"break-even"`` is 1.0).
            Per-layer ranks are recomputed from the layer shapes on load, so they come back identical.
        keep_base_weights: Keep the dense weight of every adapted layer beside its factors (default; needed to
            train several adapters, or to run / unload the dense model exactly at any max rank). ``False``
            serves from the factors only: each dense weight is freed as soon as its factors exist (layer by
            layer, so peak memory stays within one dense layer of the final size) and is never allocated when
            loading a saved adapter. ``merge_and_unload`` then builds the dense weights at the current rank;
            ``unload``/``disable_adapter`` rebuild them from the factors at the max rank, which is exact only
            for full-rank, untrained factors, and refuse (naming the layer) when the max rank is below full.
        target_modules: Module names or a regex, as in LoRA. ``None`` or ``"all-linear"`` targets every
            linear / ``Conv1D`` layer except the output head.
        exclude_modules: Names or a regex of modules never adapted.
        layers_to_transform / layers_pattern: Restrict to some transformer blocks, as in LoRA.
        rank_pattern: Per-module max ranks, ``{"name or regex": rank}``; mixed-rank plans land here.
        rank_granularity: Ranks offered by selection helpers (FLOPs budgets, samplers, search) are
            multiples of this (plus each layer's max rank): unaligned ranks run far slower on GPUs.
        init: ``"svd"`` (weights only), ``"whitened"`` (activation-aware SVD, needs stats) or ``"projected"``
            (utilized-rank projection ``P_T W P_S``, needs stats). Default: ``"whitened"`` when statistics are
            given (``stats`` or ``stats_path``), else ``"svd"``.
        stats_path: Folder written by :meth:`ActivationStats.save` (needed by the data-aware inits).
        stats: An in-memory :class:`~nsn_peft.ActivationStats` instead of ``stats_path`` (not serialised).
        energy_input / energy_output: Energy kept by the input / output subspaces of ``init="projected"``.
        energy_pattern: Per-module ``{"name or regex": [energy_input, energy_output]}`` overrides.
        keep_dense_if_no_savings: With ``init="projected"``, leave a layer dense when its utilized-rank
            factorisation would not be smaller than the dense matrix (``r(m+d) >= md``).
        whitening_damp: Relative diagonal damping of the activation Gram before its Cholesky factor.
        active_rank: Rank(s) the adapter runs at after creation or loading (``None`` = max; an int, clamped to
            each layer's max; or ``{module name or pattern: rank}``). ``save_pretrained`` writes the layers'
            ranks at save time here, so a saved adapter comes back at the rank it was saved at; in memory it
            is the rank the adapter started at (read the current ranks with ``get_rank``).
        budget_plans: Per-layer ranks for FLOPs budgets, ``{"0.5": {layer name: rank}}``: keys are fractions of
            the targeted layers' dense matmul FLOPs (written as strings, e.g. ``"0.25"``), values give every
            NSN layer (plain base-model names) its rank at that budget. The plans must be nested (a layer's
            rank never decreases as the budget grows), so one set of factors serves every budget;
            ``model.set_rank(flops=0.5)`` switches to one. Made by :func:`nsn_peft.plan_budget_schedule`.
        init_device: Device to decompose on (e.g. ``"cuda"`` for a model still on CPU); default: the weight's.
        modules_to_save: Extra modules to train and save in full (e.g. a classifier head).
        bias: ``"none"``, ``"all"`` or ``"nsn_only"``: which biases are trained.
    """

    max_rank: Optional[Union[int, str]] = field(
        default=None, metadata={"help": "Max rank per layer; None = full rank; 'break-even' = no bigger than dense."}
    )
    max_params_fraction: Optional[float] = field(
        default=None,
        metadata={
            "help": "Per-layer max rank from a parameter budget: factors hold at most this fraction of the dense weight."
        },
    )
    keep_base_weights: bool = field(
        default=True,
        metadata={"help": "Keep the dense weights beside the factors; False serves from the factors only."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to adapt; None = all linear layers."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    rank_pattern: dict = field(default_factory=dict)
    rank_granularity: int = field(default=64)
    init: Optional[str] = field(
        default=None,
        metadata={
            "help": "One of 'svd', 'projected', 'whitened'; default: 'whitened' with stats/stats_path, else 'svd'."
        },
    )
    stats_path: Optional[str] = field(default=None)
    stats: Optional[Any] = field(default=None, repr=False)
    energy_input: float = field(default=1.0)
    energy_output: float = field(default=1.0)
    energy_pattern: dict = field(default_factory=dict)
    keep_dense_if_no_savings: bool = field(default=True)
    whitening_damp: float = field(default=1e-6)
    active_rank: Optional[Union[int, dict]] = field(default=None)
    budget_plans: dict = field(
        default_factory=dict, metadata={"help": "Nested per-layer ranks per FLOPs budget: {'0.5': {layer: rank}}."}
    )
    init_device: Optional[str] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    bias: str = field(default="none")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.NSN
        if (
            self.max_rank is not None
            and self.max_rank != BREAK_EVEN
            and (not isinstance(self.max_rank, int) or isinstance(self.max_rank, bool) or self.max_rank < 1)
        ):
            raise ValueError(
                f"NSNConfig.max_rank must be a positive int, {BREAK_EVEN!r} or None, got {self.max_rank!r}"
            )
        if self.max_params_fraction is not None:
            if (
                isinstance(self.max_params_fraction, bool)
                or not isinstance(self.max_params_fraction, (int, float))
                or not (0 < self.max_params_fraction <= 1)
            ):
                raise ValueError(f"NSNConfig.max_params_fraction must be in (0, 1], got {self.max_params_fraction!r}")
            if self.max_rank is not None:
                raise ValueError(
                    f"NSNConfig: pass either max_rank ({self.max_rank!r}) or max_params_fraction "
                    f"({self.max_params_fraction!r}), not both."
                )
        if not isinstance(self.keep_base_weights, bool):
            raise ValueError(f"NSNConfig.keep_base_weights must be a bool, got {self.keep_base_weights!r}")
        if not isinstance(self.rank_granularity, int) or self.rank_granularity < 1:
            raise ValueError(f"NSNConfig.rank_granularity must be a positive int, got {self.rank_granularity!r}")
        if self.init is None:  # data-aware factors whenever the statistics they need are at hand
            self.init = "whitened" if self.stats is not None or self.stats_path is not None else "svd"
        if self.init not in INIT_METHODS:
            raise ValueError(f"NSNConfig.init must be one of {INIT_METHODS}, got {self.init!r}")
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"NSNConfig.rank_pattern[{pattern!r}] must be a positive int, got {rank!r}")
        for name, value in (("energy_input", self.energy_input), ("energy_output", self.energy_output)):
            if not 0 < value <= 1:
                raise ValueError(f"NSNConfig.{name} must be in (0, 1], got {value!r}")
        for pattern, pair in self.energy_pattern.items():
            if len(pair) != 2 or not all(0 < e <= 1 for e in pair):
                raise ValueError(f"NSNConfig.energy_pattern[{pattern!r}] must be [e_in, e_out] in (0, 1], got {pair!r}")
        if self.bias not in ("none", "all", "nsn_only"):
            raise ValueError(f"NSNConfig.bias must be 'none', 'all' or 'nsn_only', got {self.bias!r}")
        if self.whitening_damp < 0:
            raise ValueError(f"NSNConfig.whitening_damp must be >= 0, got {self.whitening_damp!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.budget_plans = normalize_budget_plans(self.budget_plans)
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("NSNConfig.layers_pattern requires layers_to_transform to be set as well.")
        if (
            isinstance(self.target_modules, str)
            and self.target_modules.lower() != "all-linear"
            and self.layers_to_transform is not None
        ):
            warnings.warn(
                f"NSNConfig.layers_to_transform={self.layers_to_transform!r} does not narrow a regex target_modules "
                f"({self.target_modules!r}), as in PEFT: put the block numbers into the regex, or list module names.",
                stacklevel=3,
            )

    @property
    def params_fraction(self) -> Optional[float]:
        """The per-layer parameter budget that sets max ranks (1.0 for ``"break-even"``), else ``None``."""
        if self.max_rank == BREAK_EVEN:
            return 1.0
        return None if self.max_params_fraction is None else float(self.max_params_fraction)

    @property
    def needs_stats(self) -> bool:
        return self.init in ("projected", "whitened")

    def budgets(self) -> list[float]:
        """The FLOPs budgets that have a plan in :attr:`budget_plans`, ascending."""
        return sorted(float(key) for key in self.budget_plans)

    # -- loading: PEFT reads a saved adapter's config through these (PeftModel.from_pretrained/load_adapter,
    # AutoPeftModel*), so NSN's loading behaviour hangs off them rather than off PEFT's entry points.
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any
    ) -> NSNConfig:
        """The config of a saved NSN adapter, marked as coming from a checkpoint (injection then skips the
        factor initialisation its weights overwrite). A save of the folder that a kill interrupted after its
        commit point is completed first. ``keep_base_weights=`` (``PeftModel.from_pretrained`` passes its extra
        keywords here) overrides the saved value."""
        keep_base_weights = kwargs.pop("keep_base_weights", None)
        if keep_base_weights is not None and not isinstance(keep_base_weights, bool):
            raise ValueError(f"keep_base_weights must be a bool, got {keep_base_weights!r}")
        finish_interrupted_adapter_save(pretrained_model_name_or_path, subfolder)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if keep_base_weights is not None:
            config.keep_base_weights = keep_base_weights
        folder = adapter_folder(pretrained_model_name_or_path, subfolder)
        # Not dataclass fields: never saved. The model consumes the mark when it injects this config.
        config._from_checkpoint = True
        config._checkpoint_folder = folder
        weights = folder / "adapter_model.safetensors" if folder is not None else None
        # What load errors name: the weights file, else the folder or Hub id.
        config._checkpoint_source = str(
            weights if weights is not None and weights.is_file() else folder or pretrained_model_name_or_path
        )
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        """The fields of an NSN ``adapter_config.json``; errors name the file (invalid JSON, missing fields)."""
        loaded = read_config_json(path_json_file)
        loaded.pop("runtime_config", None)  # as PEFT does: runtime options are never read from a file
        if loaded.get("peft_type") == "NSN":
            check_config_fields(loaded, path_json_file)
        return loaded

    def to_dict(self) -> dict:
        # In-memory statistics are large tensors and never part of the serialised config.
        stats, self.stats = self.stats, None
        try:
            data = asdict(self)
        finally:
            self.stats = stats
        data.pop("stats", None)
        return data


def normalize_budget_plans(plans: Any) -> dict[str, dict[str, int]]:
    """Validate budget plans and key them by :func:`budget_key`; raise ``ValueError`` naming the bad entry.

    Checks: budgets in (0, 1], ranks positive ints, every plan covering the same layers, and nesting (a
    layer's rank never decreases as the budget grows).
    """
    if plans is None:
        return {}
    if not isinstance(plans, dict):
        raise ValueError(
            f"NSNConfig.budget_plans must be a mapping {{budget: {{layer: rank}}}}, got {type(plans).__name__}"
        )
    normalized: dict[str, dict[str, int]] = {}
    for key, plan in plans.items():
        try:
            budget = float(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"NSNConfig.budget_plans key {key!r} is not a number (a FLOPs fraction in (0, 1])"
            ) from None
        if not 0 < budget <= 1:
            raise ValueError(f"NSNConfig.budget_plans key {key!r} must be a FLOPs fraction in (0, 1]")
        if not isinstance(plan, dict) or not plan:
            raise ValueError(f"NSNConfig.budget_plans[{key!r}] must be a non-empty mapping {{layer: rank}}")
        for name, rank in plan.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"NSNConfig.budget_plans[{key!r}][{name!r}] must be a positive int, got {rank!r}")
        if budget_key(budget) in normalized:
            raise ValueError(f"NSNConfig.budget_plans has two keys for the budget {budget_key(budget)}")
        normalized[budget_key(budget)] = {str(n): int(r) for n, r in plan.items()}
    ordered = sorted(normalized, key=float)
    for lower, upper in zip(ordered, ordered[1:]):
        small, large = normalized[lower], normalized[upper]
        if set(small) != set(large):
            diff = sorted(set(small) ^ set(large))
            raise ValueError(f"NSNConfig.budget_plans {lower} and {upper} cover different layers (e.g. {diff[:3]})")
        for name, rank in small.items():
            if rank > large[name]:
                raise ValueError(
                    f"NSNConfig.budget_plans are not nested: '{name}' has rank {rank} at budget {lower} but "
                    f"{large[name]} at the larger budget {upper} (ranks must not decrease as the budget grows)"
                )
    return {key: normalized[key] for key in ordered}
