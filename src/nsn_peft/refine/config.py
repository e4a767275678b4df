"""Settings and report of :func:`~nsn_peft.refine.compress_and_refine`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ._common import check_precision

__all__ = ["ALLOCATIONS", "BUDGET_SAMPLINGS", "BUDGET_WEIGHTINGS", "DECIDE_AFTER", "RefineConfig", "RefineReport"]

ALLOCATIONS = ("auto", "mixed", "uniform")
DECIDE_AFTER = ("init", "blockwise")
BUDGET_SAMPLINGS = ("all", "cycle", "sandwich")
BUDGET_WEIGHTINGS = ("sum", "uncertainty")


@dataclass
class RefineConfig:
    """Settings of :func:`compress_and_refine`. The defaults were chosen by measurement on SmolLM2-135M (see
    docs/benchmarks.md) and are meant to work on a new model without tuning.

    Attributes:
        batch_size: sequences per step (both stages).
        blockwise_epochs: passes over the calibration sequences per block; 0 skips the block-wise stage.
        blockwise_lr: peak learning rate of the block-wise stage, relative to the RMS of each block's factors (an
            AdamW step moves a weight by about ``lr × RMS``, so the value carries over between models).
        blockwise_tokens: calibration tokens used by the block-wise stage (``None``: all); each block is a small
            function, so it is fitted with fewer tokens than the whole model needs.
        e2e_tokens: token budget of the end-to-end stage (default: one pass over the calibration tokens); 0 skips it.
        e2e_lr: peak learning rate of the end-to-end stage, relative to the RMS of all factors.
        temperature: distillation temperature.
        precision: ``"auto"`` (bf16 autocast on GPUs, fp32 on CPUs), ``"bf16"`` or ``"fp32"``.
        seed: data order.
        validation_fraction: share of the calibration sequences held out for the allocation decision when
            no ``validation`` text is given.
        gradient_tokens: calibration tokens for the output-gradient statistics of the mixed allocation.
        decide_after: when mixed and uniform allocations are compared on validation text: ``"blockwise"``
            (both are refined block by block first; the end-to-end stage runs on the winner only) or
            ``"init"`` (training-free, cheaper).
        save_interval_s: seconds between checkpoints of the end-to-end stage (with ``state_dir``; checked every
            ``log_every`` steps); block-wise checkpoints are written after every block.
        log_every: end-to-end steps between log lines (mean KL).
        budget_sampling: with several budgets (``compress_and_refine(budgets=...)``), which budgets each step of
            both stages trains: ``"all"`` (every budget every step; about K times the cost of a single-budget
            step, the best measured quality), ``"sandwich"`` (the smallest and the largest every step plus one
            other at random) or ``"cycle"`` (one per step, in turn: the cost of one single-budget run, every
            budget the same share of the steps). On SmolLM2-135M with budgets 0.4/0.5/0.6/0.8 and ~1M tokens
            (docs/benchmarks.md) ``"all"`` came within 2.4-6.4% of the single-budget specialists' perplexity,
            ``"sandwich"`` within 4.1-5.2% at 0.81x its time, ``"cycle"`` within 6.6-13.4% at 0.49x.
        budget_weighting: how the budgets' losses are combined in a step: ``"sum"`` (plain sum) or
            ``"uncertainty"`` (learned per-budget log-variances: each budget contributes its relative
            improvement, :class:`~nsn_peft.training.UncertaintyWeightedLoss`).
    """

    batch_size: int = 8
    blockwise_epochs: int = 1
    blockwise_lr: float = 1e-2
    blockwise_tokens: Optional[int] = 262144
    e2e_tokens: Optional[int] = None
    e2e_lr: float = 3e-3
    temperature: float = 1.0
    precision: str = "auto"
    seed: int = 0
    validation_fraction: float = 1 / 16
    gradient_tokens: Optional[int] = 131072
    decide_after: str = "blockwise"
    save_interval_s: float = 300.0
    log_every: int = 20
    budget_sampling: str = "all"
    budget_weighting: str = "sum"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.budget_sampling not in BUDGET_SAMPLINGS:
            raise ValueError(
                f"RefineConfig.budget_sampling must be one of {BUDGET_SAMPLINGS}, got {self.budget_sampling!r}"
            )
        if self.budget_weighting not in BUDGET_WEIGHTINGS:
            raise ValueError(
                f"RefineConfig.budget_weighting must be one of {BUDGET_WEIGHTINGS}, got {self.budget_weighting!r}"
            )
        if self.decide_after not in DECIDE_AFTER:
            raise ValueError(f"RefineConfig.decide_after must be one of {DECIDE_AFTER}, got {self.decide_after!r}")
        for name in ("batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RefineConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.blockwise_epochs, int) or self.blockwise_epochs < 0:
            raise ValueError(f"RefineConfig.blockwise_epochs must be an int >= 0, got {self.blockwise_epochs!r}")
        for name in ("blockwise_lr", "e2e_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RefineConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("blockwise_tokens", "e2e_tokens", "gradient_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"RefineConfig.{name} must be an int >= 0 or None, got {value!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"RefineConfig.validation_fraction must be in (0, 1), got {self.validation_fraction!r}")

    def fingerprint(self, budgets: int = 1) -> dict[str, Any]:
        """The settings a resumed run must share (everything but the checkpoint interval; the budget settings
        only matter to a run over several budgets)."""
        data = asdict(self)
        data.pop("save_interval_s")
        data.pop("log_every")
        if budgets == 1:
            data.pop("budget_sampling")
            data.pop("budget_weighting")
        return data


@dataclass
class RefineReport:
    """What :func:`compress_and_refine` did, with tokens and seconds per stage.

    Attributes:
        fraction: kept share of the targeted layers' parameters (= of their matmul FLOPs); ``None`` for a ladder.
        budgets: the FLOPs budgets of a ladder (``compress_and_refine(budgets=...)``), ascending; else ``None``.
        budget_plans: per budget, ``{layer: rank}`` (what ``NSNConfig.budget_plans`` stores).
        validation_nll_per_budget: per stage (``"init"``, ``"blockwise"``, ``"end_to_end"``), the validation NLL
            at each budget (keys as ``NSNConfig.budget_plans`` writes them).
        allocation: the allocation shipped (``"mixed"`` or ``"uniform"``).
        candidates: per allocation tried: achieved fraction, layers kept dense, validation NLL at init and
            (with ``decide_after="blockwise"``) after the block-wise stage.
        ranks: ``{layer: rank}`` of the factored layers (a ladder: at its largest budget, the ranks its factors
            store); ``kept_dense``: targeted layers left dense.
        validation_nll: mean NLL (nats/token) on the validation sequences after each stage, and of the dense model
            (a ladder: the mean over its budgets).
        calibration_tokens: distinct calibration tokens trained on; ``validation_tokens``: held out.
        blockwise / end_to_end: the stages' results (steps, tokens, errors, KL history).
        seconds: per phase and in total.
        resumed: the run continued a saved state.
    """

    fraction: Optional[float]
    allocation: str
    budgets: Optional[list[float]] = None
    budget_plans: dict[str, dict[str, int]] = field(default_factory=dict)
    validation_nll_per_budget: dict[str, dict[str, float]] = field(default_factory=dict)
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    kept_dense: list[str] = field(default_factory=list)
    validation_nll: dict[str, float] = field(default_factory=dict)
    calibration_tokens: int = 0
    validation_tokens: int = 0
    blockwise: Optional[dict[str, Any]] = None
    end_to_end: Optional[dict[str, Any]] = None
    seconds: dict[str, float] = field(default_factory=dict)
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
