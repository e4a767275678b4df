"""Export an NSN model as a transformers model whose factored layers hold only their factors.

Folder layout (a transformers model folder; safetensors + JSON only)::

    config.json             the base model's config, plus ``nsn_ranks`` (rank of every factored layer),
                            ``nsn_max_ranks`` (the rank its factors store), ``nsn_budget_plans`` and
                            ``nsn_active_budget`` (nested exports), ``nsn_base_architecture``, and ``auto_map``
    modeling_nsn.py         the model class (:mod:`nsn_peft.export.modeling_nsn`, torch + transformers only)
    model.safetensors       every weight; a factored layer ``L`` as ``L.down.weight`` (R×d), ``L.up.weight``
                            (m×R) and ``L.up.bias``
    README.md               the model card: how it was made, its size and FLOPs, what was measured
    generation_config.json, tokenizer files

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` opens it without nsn-peft;
:func:`load_compressed` opens it with the class of the installed nsn-peft (no code from the folder is run), and
still reads folders of the first format (``nsn_compression.json`` + ``nsn_factors.safetensors``).

A layer is written dense (the plain layer, weight ``B[:, :r] A[:r]``) when its factors would not be smaller
(``r(m+d) ≥ md``) and it runs at one rank only: there, factoring costs time and saves nothing.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..devices import resolve_dtype
from ..io import (
    atomic_directory,
    check_folder_destination,
    finish_interrupted_save,
    local_or_hub_folder,
    write_safetensors,
    write_text,
)
from ..linalg.flops import factoring_saves
from ..naming import canonical_module_name
from ..tuner.rank_spec import RankSpec
from ..tuner.ranks import _adapter, budget_plans, get_rank, nsn_layers, ranks_at
from .card import export_model_card, layer_sizes
from .folder import (
    CARD_FILE,
    FORMAT_VERSION,
    LEGACY_FACTORS_FILE,
    LEGACY_META_FILE,
    MODELING_FILE,
    WEIGHTS_FILE,
    check_weight_files,
    describe_export,
    is_export_folder,
    read_export_config,
)
from .legacy import load_legacy
from .modeling_nsn import FactoredLinear, NSNCompressedMixin, compressed_model_class

logger = logging.getLogger(__name__)

META_FILE = LEGACY_META_FILE  # kept for callers of the first format's name
HUB_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    MODELING_FILE,
    CARD_FILE,
    LEGACY_META_FILE,
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template*",
)

__all__ = [
    "FactoredLinear",
    "compressed_size",
    "describe_export",
    "is_export_folder",
    "is_compressed_model",
    "is_factored_linear",
    "load_compressed",
    "read_export_config",
    "save_compressed",
]


def is_factored_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a factored layer of an export, whichever copy of ``modeling_nsn.py`` defined it
    (nsn-peft's, or the one transformers loads from the folder with ``trust_remote_code``)."""
    return type(module).__name__ == "FactoredLinear" and isinstance(getattr(module, "up", None), nn.Module)


def is_compressed_model(model: nn.Module) -> bool:
    """Whether ``model`` is a loaded export (it has factored layers and no NSN adapter)."""
    return getattr(getattr(model, "config", None), "nsn_ranks", None) is not None and any(
        is_factored_linear(m) for m in model.modules()
    )


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop tensors sharing storage with an earlier key (tied embeddings); safetensors refuses aliases."""
    seen: dict[tuple, str] = {}
    unique, dropped = {}, []
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            dropped.append(key)
            continue
        seen[ident] = key
        unique[key] = tensor
    return unique, dropped


def _budget_key(budget: float) -> str:
    return f"{float(budget):g}"


def _from_nsn_model(model: nn.Module, adapter_name: Optional[str], nested: Optional[bool]):
    """``(base model, state dict, layout)`` of an NSN model: factors cut to the ranks the export runs at."""
    layers = nsn_layers(model)
    adapter = _adapter(model, layers, adapter_name)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = get_rank(model, adapter)
    plans = {}
    stored_plans = budget_plans(model, adapter)
    if nested is None:
        nested = bool(stored_plans)
    if nested and not stored_plans:
        raise ValueError("nested=True needs an adapter with budget plans (NSNConfig.budget_plans); it has none")
    if nested:
        plans = {_budget_key(b): ranks_at(model, RankSpec.flops(b), adapter) for b in sorted(stored_plans)}
    state = {}
    for key, tensor in base.state_dict().items():
        if ".nsn_A." in key or ".nsn_B." in key:
            continue
        state[canonical_module_name(key)] = tensor
    ranks, max_ranks, dense = {}, {}, []
    for name, layer in layers.items():
        used = {current[name], *(plan[name] for plan in plans.values() if name in plan)}
        top = max(used)
        m, d = layer.out_features, layer.in_features
        a, b = layer.nsn_A[adapter], layer.nsn_B[adapter]
        bias = state.pop(f"{name}.bias", None)
        state.pop(f"{name}.weight", None)  # the dense matrix: exactly what compression removes
        if len(used) == 1 and not factoring_saves(m, d, top):
            # Factoring would not be smaller (nor faster): the plain layer, with the weight the factors give.
            weight = (b[:, :top] @ a[:top]).detach()
            state[f"{name}.weight"] = weight.T.contiguous() if layer.is_conv1d else weight
            if bias is not None:
                state[f"{name}.bias"] = bias
            dense.append(name)
            continue
        state[f"{name}.down.weight"] = a[:top].detach().contiguous()
        state[f"{name}.up.weight"] = b[:, :top].detach().contiguous()
        if bias is not None:
            state[f"{name}.up.bias"] = bias
        ranks[name], max_ranks[name] = current[name], top
    for plan in plans.values():
        for name in dense:
            plan.pop(name, None)
    active = next((float(k) for k, plan in plans.items() if plan == {n: current[n] for n in plan}), None)
    layout = {
        "nsn_ranks": ranks,
        "nsn_max_ranks": max_ranks,
        "nsn_budget_plans": plans or None,
        "nsn_active_budget": active,
        "nsn_dense_layers": dense,
    }
    return base, state, layout


def _from_compressed_model(model: nn.Module):
    """``(model, state dict, layout)`` of a loaded export, saved again as it runs (e.g. after a conversion)."""
    config = model.config
    layout = {
        "nsn_ranks": dict(config.nsn_ranks),
        "nsn_max_ranks": dict(getattr(config, "nsn_max_ranks", None) or config.nsn_ranks),
        "nsn_budget_plans": getattr(config, "nsn_budget_plans", None),
        "nsn_active_budget": getattr(config, "nsn_active_budget", None),
        "nsn_dense_layers": list(getattr(config, "nsn_dense_layers", None) or []),
    }
    return model, dict(model.state_dict()), layout


def _base_architecture(model: nn.Module) -> str:
    """The transformers class a (possibly already compressed) model is built on."""
    for cls in type(model).__mro__:
        if (
            cls.__module__.startswith("transformers.")
            and cls.__name__ != "PreTrainedModel"
            and hasattr(cls, "config_class")
        ):
            return cls.__name__
    raise ValueError(
        f"{type(model).__name__} is not a transformers model class; save_compressed exports transformers models"
    )


def _auto_class(architecture: str) -> str:
    if architecture.endswith("ForSequenceClassification"):
        return "AutoModelForSequenceClassification"
    return "AutoModelForCausalLM"


def _modeling_source() -> str:
    """``modeling_nsn.py`` as it is saved beside the weights (the same file for every architecture)."""
    return Path(__file__).with_name(MODELING_FILE).read_text(encoding="utf-8")


@torch.no_grad()
def save_compressed(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    tokenizer: Any = None,
    adapter_name: Optional[str] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    nested: Optional[bool] = None,
    metrics: Optional[dict[str, Any]] = None,
) -> Path:
    """Write ``model`` as a transformers model folder with its NSN layers factored at their ranks.

    ``model`` is a ``PeftModel`` with NSN layers (or a model loaded with :func:`load_compressed`, saved as it
    runs). Each NSN layer becomes a :class:`FactoredLinear` holding ``A[:r]`` and ``B[:, :r]`` (``r`` its
    active rank, see :func:`nsn_peft.set_rank`), so the folder holds ``r(m+d)`` values per layer; a layer whose
    factors would not be smaller is written dense. A **nested** export (default when the adapter stores budget
    plans) keeps each layer's largest planned rank and every plan, and the loaded model switches between them
    with ``model.set_budget(b)``. The folder is built beside ``path`` and moved into place when complete.

    Args:
        model: the adapted model (read, not modified).
        path: output folder; its files are replaced in one transaction, other files already there are kept
            (files of the first export format are removed once the new version is in place).
        tokenizer: saved alongside when given, so the folder is self-contained.
        adapter_name: the NSN adapter to export (default: the active one).
        dtype: cast floating-point weights (e.g. ``"bf16"``) before writing; default: as they are.
        nested: keep every budget plan (default: when the adapter has some); ``False`` writes the active ranks only.
        metrics: what was measured (e.g. ``{"perplexity": 21.3}``), written into the model card.

    Raises:
        ValueError: the model has no NSN layers, or ``nested=True`` without budget plans.
        NotADirectoryError: a file exists at ``path``.
    """
    check_folder_destination(path, "compressed model folder")
    if is_compressed_model(model):
        base, state, layout = _from_compressed_model(model)
    else:
        if not nsn_layers(model):
            raise ValueError("save_compressed needs a model with NSN layers (get_peft_model(model, NSNConfig(...)))")
        base, state, layout = _from_nsn_model(model, adapter_name, nested)
    state, _tied = _unique_tensors(state)
    cast = resolve_dtype(dtype)
    if cast is not None:
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
    architecture = _base_architecture(base)
    config = copy.deepcopy(base.config)
    for key, value in layout.items():
        setattr(config, key, value)
    config.nsn_base_architecture = architecture
    config.nsn_format_version = FORMAT_VERSION
    class_name = compressed_model_class(architecture).__name__
    config.architectures = [class_name]
    config.auto_map = {_auto_class(architecture): f"modeling_nsn.{class_name}"}
    if cast is not None:
        config.dtype = cast
    source = getattr(base.config, "_name_or_path", None) or None
    weights_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    card = export_model_card(config, layout, state, architecture, metrics, source, weights_dtype)
    target = Path(path)
    with atomic_directory(target) as tmp:
        config.save_pretrained(tmp)
        generation = getattr(base, "generation_config", None)
        if generation is not None and getattr(base, "can_generate", lambda: False)():
            generation.save_pretrained(tmp)
        write_safetensors(tmp / WEIGHTS_FILE, state, metadata={"format": "pt"})
        write_text(tmp / MODELING_FILE, _modeling_source())
        write_text(tmp / CARD_FILE, card)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    for stale in (LEGACY_META_FILE, LEGACY_FACTORS_FILE):
        # The new version is complete: a first-format description beside it would only mislead readers.
        (target / stale).unlink(missing_ok=True)
    sizes = layer_sizes(state, layout)
    kept = sum(r * (m + d) for (m, d), r in zip(sizes.values(), layout["nsn_ranks"].values()))
    dense = sum(m * d for m, d in sizes.values())
    logger.info(
        "Saved compressed model to %s: %d factored layers hold %.1f%% of their dense parameters at the active ranks%s",
        target,
        len(sizes),
        100 * kept / max(dense, 1),
        f"; {len(layout['nsn_dense_layers'])} written dense" if layout["nsn_dense_layers"] else "",
    )
    return target


def _resolve_folder(ref: Union[str, os.PathLike]) -> Path:
    """A local folder, or a Hub id downloaded (only the files a compressed model needs)."""
    return local_or_hub_folder(ref, list(HUB_FILES), what="compressed model")


@torch.no_grad()
def load_compressed(
    path: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a compressed model written by :func:`save_compressed` (a local folder or a Hub id).

    Uses the model class of the installed nsn-peft (the folder's ``modeling_nsn.py`` is not run) through
    transformers' ``from_pretrained``, so ``device_map``, ``quantization_config`` and the other keyword arguments
    of ``from_pretrained`` apply. Outputs equal those of the NSN model at the exported ranks. Folders of the first
    format (``nsn_compression.json``) load too. Every weights file is checked before anything is loaded.

    Args:
        path: the folder, or a Hub id (only the files a compressed model needs are downloaded).
        device: where to put the model (default: CPU, or ``device_map``'s placement).
        dtype: cast floating-point weights (default: the saved dtype).

    Raises:
        FileNotFoundError: ``path`` is not a compressed model folder, or a file of it is missing.
        ValueError: unsupported format version, unknown architecture, or a truncated/corrupt file (named).
    """
    folder = _resolve_folder(path)
    finish_interrupted_save(folder)
    if not (folder / "config.json").is_file() and (folder / LEGACY_META_FILE).is_file():
        return load_legacy(folder, device=device, dtype=dtype)
    try:
        config = read_export_config(folder)
    except FileNotFoundError:
        if (folder / LEGACY_META_FILE).is_file():
            return load_legacy(folder, device=device, dtype=dtype)
        raise
    check_weight_files(folder)
    cls = compressed_model_class(config["nsn_base_architecture"])
    kwargs = dict(from_pretrained_kwargs)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    # save_pretrained / push_to_hub then copy modeling_nsn.py beside the weights, as the folder had it.
    model.register_for_auto_class(_auto_class(config["nsn_base_architecture"]))
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{folder / WEIGHTS_FILE} lacks {len(missing)} weight(s) of the model, e.g. {missing[:4]}")
    if device is not None:
        model.to(device)
    return model.eval()


def compressed_size(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a loaded compressed model: factored layers vs the rest."""
    factored = sum(p.numel() for m in model.modules() if is_factored_linear(m) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"factored_layer_params": factored, "total_params": total}


__all__ += ["NSNCompressedMixin"]
