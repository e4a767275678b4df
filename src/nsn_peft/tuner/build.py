"""Building an NSN model from a dense one, and what it holds: the calls a script and the CLI share.

:func:`adapt_model` is ``get_peft_model`` with the checks a user wants before minutes of decomposition (every
listed module name matches a layer) and the base-model reference recorded for sharing; :func:`adapter_summary`
counts layers, ranks, parameters and FLOPs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Optional

from torch import nn

from ..errors import UnknownModulesError
from ..layer_selection import is_linear, unmatched_targets
from ..linalg.flops import factored_params
from .config import NSNConfig
from .ranks import estimate_flops, get_max_rank, get_rank, nsn_layers

__all__ = ["adapt_model", "adapter_summary", "check_module_names"]


def check_module_names(model: nn.Module, names: Optional[Iterable[str]], what: str = "target_modules") -> None:
    """Raise :class:`~nsn_peft.errors.UnknownModulesError` when a listed module name (not a regex) matches no
    linear layer of ``model``; the message lists the layer names there are."""
    if names is None or isinstance(names, str):
        return
    unknown = unmatched_targets(model, names)
    if unknown:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise UnknownModulesError(
            f"{what}: {', '.join(unknown)} match(es) no linear layer of the model (layer names: {', '.join(suffixes)})"
        )


def adapt_model(
    base: nn.Module, config: NSNConfig, *, base_model_name_or_path: Optional[str] = None, adapter_name: str = "default"
):
    """``get_peft_model(base, config)`` in eval mode, after checking that every listed ``target_modules`` and
    ``exclude_modules`` name matches a layer; ``base_model_name_or_path`` is recorded in the adapter's config
    (what ``save_pretrained`` writes and loaders find the base model by)."""
    from peft import get_peft_model

    check_module_names(base, config.target_modules, "target_modules")
    check_module_names(base, config.exclude_modules, "exclude_modules")
    model = get_peft_model(base, config, adapter_name=adapter_name)
    if base_model_name_or_path is not None:
        model.peft_config[adapter_name].base_model_name_or_path = base_model_name_or_path
    model.eval()
    return model


def adapter_summary(model: Any) -> dict[str, Any]:
    """Counts, ranks and parameter/FLOPs totals of an NSN model at its current ranks::

    {"layers", "max_rank_counts", "active_rank_counts" ({rank: layers}), "targeted_dense_params",
     "factor_params", "targeted_flops_fraction", "model_flops_fraction"}
    """
    layers = nsn_layers(model)
    maxima = get_max_rank(model)
    current = get_rank(model)
    dense_params = sum(layer.out_features * layer.in_features for layer in layers.values())
    factored = sum(factored_params(layer.out_features, layer.in_features, maxima[n]) for n, layer in layers.items())
    report = estimate_flops(model)
    return {
        "layers": len(layers),
        "max_rank_counts": {str(k): v for k, v in sorted(Counter(maxima.values()).items())},
        "active_rank_counts": {str(k): v for k, v in sorted(Counter(current.values()).items())},
        "targeted_dense_params": dense_params,
        "factor_params": factored,
        "targeted_flops_fraction": report.targeted_fraction,
        "model_flops_fraction": report.model_fraction,
    }
