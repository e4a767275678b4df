"""Evaluation: perplexity over text (:mod:`.perplexity`) and task accuracy through lm-eval-harness (:mod:`.tasks`).

Perplexity needs nothing beyond the package's own dependencies. Task accuracy needs the ``eval`` extra
(``pip install "nsn-peft[eval]"``: lm-eval-harness); its names are imported on first use, so
``import nsn_peft`` stays fast and works without it.
"""

from __future__ import annotations

from typing import Any

from .flops import compressed_flops
from .perplexity import PERPLEXITY_PROTOCOLS, evaluate_perplexity, perplexity, sliding_windows
from .temperature import fit_temperature, with_temperature

_TASK_NAMES = {
    "evaluate_tasks": "tasks",
    "TaskEvaluation": "tasks",
    "PointScores": "tasks",
    "TaskScore": "tasks",
    "accuracy_metric": "tasks",
    "resolve_tasks": "tasks",
    "TaskSource": "tasks",
    "MissingExtraError": "extra",
    "NSNLM": "lm_eval_model",
    "register_with_lm_eval": "lm_eval_model",
    "lm_eval_model_from_args": "lm_eval_model",
    "plot_accuracy": "report",
    "lm_eval_task_names": "tasks",
}

__all__ = [
    "PERPLEXITY_PROTOCOLS",
    "compressed_flops",
    "evaluate_perplexity",
    "fit_temperature",
    "perplexity",
    "sliding_windows",
    "with_temperature",
    *_TASK_NAMES,
]


def __getattr__(name: str) -> Any:
    module = _TASK_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'nsn_peft.evaluation' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
