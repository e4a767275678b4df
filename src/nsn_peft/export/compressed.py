"""Export a rank-fixed compressed model whose size on disk and in memory is the factored size.

Folder layout (safetensors + JSON only)::

    config.json                  the base model's transformers config
    model.safetensors            every weight except the replaced layers' dense matrices
    nsn_factors.safetensors      "<layer>.A" (r×d) and "<layer>.B" (m×r) per replaced layer
    nsn_compression.json         format version, architecture, per-layer ranks and shapes
    tokenizer files              when a tokenizer is given

``load_compressed`` rebuilds the architecture without allocating the dense matrices and puts a
:class:`FactoredLinear` in place of each replaced layer.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..devices import resolve_dtype
from ..io import (
    atomic_directory,
    check_folder_destination,
    check_safetensors,
    finish_interrupted_save,
    write_json,
    write_safetensors,
)
from ..naming import canonical_module_name
from ..tuner.ranks import _adapter, nsn_layers

logger = logging.getLogger(__name__)

FORMAT = "nsn-peft-compressed"
VERSION = 1
META_FILE = "nsn_compression.json"
FACTORS_FILE = "nsn_factors.safetensors"
WEIGHTS_FILE = "model.safetensors"

__all__ = ["FactoredLinear", "compressed_size", "load_compressed", "save_compressed"]


class FactoredLinear(nn.Module):
    """A fixed-rank factored linear layer ``y = (x Aᵀ) Bᵀ + bias`` (inference form of an NSN layer)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


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


@torch.no_grad()
def save_compressed(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    tokenizer: Any = None,
    adapter_name: Optional[str] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
) -> Path:
    """Write ``model`` (a ``PeftModel`` with NSN layers) at its *current* ranks as a compressed model folder.

    Only ``B[:, :r]`` and ``A[:r]`` of every NSN layer are written (``r`` = its active rank, see
    :func:`nsn_peft.set_rank`), so the replaced layers take ``r(m+d)`` values on disk; all other weights of
    the base model are written as they are (tied weights once). The folder is built next to ``path`` and
    moved into place when complete. Load it with :func:`load_compressed`.

    Args:
        model: the adapted model (its adapter layers are read, the model is not modified).
        path: output folder; its files are replaced in one transaction, other files already there are kept.
        tokenizer: saved alongside when given, so the folder is self-contained.
        adapter_name: the NSN adapter to export (default: the active one).
        dtype: cast floating-point weights (e.g. ``"bf16"``) before writing; default: as they are.

    Raises:
        ValueError: the model has no NSN layers.
        NotADirectoryError: a file exists at ``path``.
    """
    check_folder_destination(path, "compressed model folder")
    layers = nsn_layers(model)
    if not layers:
        raise ValueError("save_compressed needs a model with NSN layers (get_peft_model(model, NSNConfig(...)))")
    adapter = _adapter(model, layers, adapter_name)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    factors, meta_layers = {}, {}
    for name, layer in layers.items():
        r = layer.nsn_rank[adapter]
        factors[f"{name}.A"] = layer.nsn_A[adapter][:r].detach().clone()
        factors[f"{name}.B"] = layer.nsn_B[adapter][:, :r].detach().clone()
        meta_layers[name] = {"rank": r, "in_features": layer.in_features, "out_features": layer.out_features,
                             "bias": layer.get_base_layer().bias is not None}
    replaced_prefixes = tuple(f"{n}." for n in layers)
    state = {}
    for key, tensor in base.state_dict().items():
        canonical = canonical_module_name(key)
        if ".nsn_A." in key or ".nsn_B." in key:
            continue
        if canonical.startswith(replaced_prefixes) and canonical.endswith(".weight") and canonical[: -len(".weight")] in layers:
            continue  # the dense matrix of a replaced layer: exactly what compression removes
        state[canonical] = tensor
    state, tied = _unique_tensors(state)
    cast = resolve_dtype(dtype)
    if cast is not None:
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
        factors = {k: v.to(cast) for k, v in factors.items()}
    config = base.config
    dense = sum(m["in_features"] * m["out_features"] for m in meta_layers.values())
    kept = sum(m["rank"] * (m["in_features"] + m["out_features"]) for m in meta_layers.values())
    meta = {
        "format": FORMAT, "version": VERSION, "architecture": type(base).__name__,
        "dtype": str(next(iter(factors.values())).dtype).removeprefix("torch."), "layers": meta_layers, "tied": tied,
        "source_model": getattr(config, "_name_or_path", None) or None,
        "parameters": {"replaced_dense": dense, "replaced_factored": kept, "other": sum(t.numel() for t in state.values())},
    }
    target = Path(path)
    architectures = config.architectures
    try:
        with atomic_directory(target) as tmp:
            config.architectures = [type(base).__name__]
            config.save_pretrained(tmp)
            generation = getattr(base, "generation_config", None)
            if generation is not None and getattr(base, "can_generate", lambda: False)():
                generation.save_pretrained(tmp)
            write_safetensors(tmp / WEIGHTS_FILE, state, metadata={"format": "pt"})
            write_safetensors(tmp / FACTORS_FILE, factors, metadata={"format": FORMAT})
            write_json(tmp / META_FILE, meta)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        config.architectures = architectures  # the caller's model config is left untouched
    logger.info("Saved compressed model to %s: replaced layers hold %.1f%% of their dense parameters", target, 100 * kept / dense)
    return target


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def load_compressed(
    path: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
) -> nn.Module:
    """Load a folder written by :func:`save_compressed` as a plain transformers model with factored layers.

    The architecture is built with its parameters on the meta device (nothing dense is allocated), each
    replaced layer becomes a :class:`FactoredLinear` of the saved rank, and the weights are assigned from
    the safetensors files, so memory is the factored size. Outputs equal those of the NSN model at the
    exported ranks. The tokenizer, if saved, loads with ``AutoTokenizer.from_pretrained(path)``.

    Args:
        path: the folder.
        device: where to put the model (default: CPU).
        dtype: cast floating-point weights (default: the saved dtype).

    Raises:
        FileNotFoundError: ``path`` is not a compressed model folder.
        ValueError: unsupported format version, unknown architecture, or weights that do not match it.
    """
    import transformers
    from accelerate import init_empty_weights

    folder = Path(path)
    finish_interrupted_save(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a compressed NSN model (no {META_FILE}); write one with save_compressed()")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON: {err}") from None
    for file in (WEIGHTS_FILE, FACTORS_FILE):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file} is missing: the compressed model folder is incomplete")
        check_safetensors(folder / file)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    config = transformers.AutoConfig.from_pretrained(folder)
    architecture = getattr(transformers, meta["architecture"], None)
    if architecture is None:
        raise ValueError(f"{meta_path}: unknown architecture {meta['architecture']!r} for this transformers version")
    torch_dtype = resolve_dtype(dtype) or getattr(torch, meta["dtype"])
    # Parameters on the meta device (no dense allocation); buffers such as rotary tables stay real.
    with init_empty_weights(include_buffers=False):
        model = architecture._from_config(config, dtype=torch_dtype)
    for name, info in meta["layers"].items():
        _set_module(model, name, FactoredLinear(info["in_features"], info["out_features"], info["rank"], info["bias"], device="meta", dtype=torch_dtype))
    state: dict[str, torch.Tensor] = {}
    for file in (WEIGHTS_FILE, FACTORS_FILE):
        with safe_open(str(folder / file), framework="pt") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    result = model.load_state_dict({k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in meta.get("tied", [])]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: weights do not match the architecture (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    if meta.get("tied"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"{folder}: no weights for {still_meta[:5]}")
    if device is not None:
        model.to(device)
    return model.eval()


def compressed_size(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a loaded compressed model: factored layers vs the rest."""
    factored = sum(p.numel() for m in model.modules() if isinstance(m, FactoredLinear) for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    return {"factored_layer_params": factored, "total_params": total}
