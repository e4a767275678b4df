"""The NSN PEFT method, laid out like PEFT's own tuners.

``config.py`` (what is configurable), ``layer.py`` (what an adapted layer does), ``model.py`` (how a model is
rewritten), ``targeting.py`` (which modules are adapted), ``ranks.py`` (rank control and FLOPs accounting), ``model_card.py``, and ``registration.py`` (how
PEFT learns about the method).
"""

from __future__ import annotations

from .compile import RankCompilation, compile_for_ranks
from .config import NSNConfig
from .dense import dense_model
from .layer import NSNLayer, NSNLinear
from .model import NSNModel
from .ranks import (
    FlopsReport,
    at_rank,
    budget_plan,
    budget_plans,
    estimate_flops,
    get_max_rank,
    get_rank,
    nsn_layers,
    select_rank_for_target_flops,
    selectable_ranks,
    set_rank,
)
from .registration import register

__all__ = [
    "FlopsReport",
    "RankCompilation",
    "compile_for_ranks",
    "NSNConfig",
    "NSNLayer",
    "NSNLinear",
    "NSNModel",
    "at_rank",
    "budget_plan",
    "budget_plans",
    "dense_model",
    "estimate_flops",
    "get_max_rank",
    "get_rank",
    "nsn_layers",
    "register",
    "select_rank_for_target_flops",
    "selectable_ranks",
    "set_rank",
]
