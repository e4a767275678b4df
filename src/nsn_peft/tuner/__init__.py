"""The NSN PEFT method, laid out like PEFT's own tuners.

``config.py`` (what is configurable), ``build.py`` (adapting a dense model with name checks; what it holds), ``layer.py`` (what an adapted layer does), ``model.py`` (how a model is
rewritten), ``targeting.py`` (which modules are adapted), ``rank_spec.py`` (which operating point: ``RankSpec``
and its resolution to per-layer ranks), ``ranks.py`` (rank control and FLOPs accounting), ``runtime.py``
(per-model runtime options: kernels, storage layout), ``model_card.py``, ``loading.py`` (reading a saved
adapter: what PEFT's config hook lets NSN do, and NSN's own ``from_pretrained``), and ``registration.py`` (how
PEFT learns about the method: its registration API, and the one place that patches PEFT, NSN-scoped).
"""

from __future__ import annotations

from .build import adapt_model, adapter_summary, check_module_names
from .compile import RankCompilation, compile_for_ranks
from .config import NSNConfig
from .dense import dense_model
from .layer import NSNLayer, NSNLinear, RuntimeOptions
from .loading import from_pretrained
from .model import NSNModel
from .rank_spec import RankSpec, resolve_ranks
from .ranks import (
    FlopsReport,
    at_rank,
    budget_plan,
    budget_plans,
    estimate_flops,
    get_max_rank,
    get_rank,
    nsn_layers,
    ranks_at,
    select_rank_for_target_flops,
    selectable_ranks,
    set_rank,
)
from .registration import register
from .runtime import get_runtime_options, set_runtime_options

__all__ = [
    "FlopsReport",
    "RankCompilation",
    "compile_for_ranks",
    "NSNConfig",
    "NSNLayer",
    "NSNLinear",
    "NSNModel",
    "RankSpec",
    "RuntimeOptions",
    "adapt_model",
    "adapter_summary",
    "at_rank",
    "budget_plan",
    "budget_plans",
    "check_module_names",
    "dense_model",
    "estimate_flops",
    "from_pretrained",
    "get_max_rank",
    "get_rank",
    "get_runtime_options",
    "nsn_layers",
    "ranks_at",
    "register",
    "resolve_ranks",
    "select_rank_for_target_flops",
    "selectable_ranks",
    "set_rank",
    "set_runtime_options",
]
