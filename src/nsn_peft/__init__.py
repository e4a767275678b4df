"""nsn-peft: Nested Subspace Networks and utilized-rank compression as a Hugging Face PEFT method.

``import nsn_peft`` registers the ``"nsn"`` method with PEFT, so ``get_peft_model(model, NSNConfig(...))``,
``PeftModel.from_pretrained`` and the ``AutoPeftModel*`` classes work as for any built-in method; other PEFT
methods behave as without it (docs/architecture.md, "The PEFT boundary"). :func:`from_pretrained` adds NSN's
loading options (``keep_base_weights=False``: serve from the factors only).
"""

from __future__ import annotations

from .calibrate import ActivationStats, collect_activation_stats, collect_gradient_stats
from .evaluation import evaluate_perplexity, fit_temperature, perplexity, with_temperature
from .export import load_compressed, save_compressed
from .planning import BudgetSchedule, RankPlan, allocate_ranks_for_budget, plan_budget_schedule, search_ranks
from .refine import RefineConfig, RefineReport, compress_and_refine, refine_blockwise, refine_end_to_end
from .training import (
    FixedRankSampler,
    NSNTrainer,
    NSNTrainerMixin,
    RankBuckets,
    RankSampler,
    SandwichRankSampler,
    ScheduledRankSampler,
    StagedRankSampler,
    UncertaintyWeightedLoss,
    UniformRankSampler,
)
from .tuner import (
    FlopsReport,
    NSNConfig,
    NSNLayer,
    NSNLinear,
    NSNModel,
    RankCompilation,
    RankSpec,
    RuntimeOptions,
    adapt_model,
    adapter_summary,
    at_rank,
    budget_plan,
    budget_plans,
    compile_for_ranks,
    dense_model,
    estimate_flops,
    from_pretrained,
    get_max_rank,
    get_rank,
    get_runtime_options,
    ranks_at,
    resolve_ranks,
    select_rank_for_target_flops,
    selectable_ranks,
    set_rank,
    set_runtime_options,
)
from .tuner import register as _register

_register()

__version__ = "0.1.0"

__all__ = [
    "ActivationStats",
    "collect_activation_stats",
    "collect_gradient_stats",
    "BudgetSchedule",
    "RankPlan",
    "RefineConfig",
    "RefineReport",
    "allocate_ranks_for_budget",
    "compress_and_refine",
    "plan_budget_schedule",
    "refine_blockwise",
    "refine_end_to_end",
    "evaluate_perplexity",
    "fit_temperature",
    "load_compressed",
    "perplexity",
    "save_compressed",
    "search_ranks",
    "FixedRankSampler",
    "NSNTrainer",
    "NSNTrainerMixin",
    "RankBuckets",
    "RankSampler",
    "SandwichRankSampler",
    "ScheduledRankSampler",
    "StagedRankSampler",
    "UncertaintyWeightedLoss",
    "UniformRankSampler",
    "FlopsReport",
    "NSNConfig",
    "NSNLayer",
    "NSNLinear",
    "NSNModel",
    "RankCompilation",
    "RankSpec",
    "RuntimeOptions",
    "adapt_model",
    "adapter_summary",
    "at_rank",
    "budget_plan",
    "budget_plans",
    "compile_for_ranks",
    "dense_model",
    "estimate_flops",
    "from_pretrained",
    "get_max_rank",
    "get_rank",
    "get_runtime_options",
    "ranks_at",
    "resolve_ranks",
    "select_rank_for_target_flops",
    "selectable_ranks",
    "set_rank",
    "set_runtime_options",
    "with_temperature",
]
