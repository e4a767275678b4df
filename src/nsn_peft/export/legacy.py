"""Folders of the first export format (``nsn_compression.json`` + ``nsn_factors.safetensors``), read as the
current model class: ``A`` becomes ``down.weight``, ``B`` ``up.weight``, the bias moves to ``up``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..devices import resolve_dtype
from ..io import check_safetensors
from .folder import FORMAT_VERSION, LEGACY_FACTORS_FILE, LEGACY_META_FILE, WEIGHTS_FILE
from .modeling_nsn import compressed_model_class

logger = logging.getLogger(__name__)

__all__ = ["load_legacy"]


def load_legacy(folder: Path, *, device=None, dtype=None) -> nn.Module:
    """A folder of the first format, built as the current model class (``A``→``down``, ``B``→``up``)."""
    import transformers
    from safetensors import safe_open

    meta_path = folder / LEGACY_META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != "nsn-peft-compressed" or meta.get("version") != 1:
        raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    for file in (WEIGHTS_FILE, LEGACY_FACTORS_FILE):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file} is missing: the compressed model folder is incomplete")
        check_safetensors(folder / file)
    config = transformers.AutoConfig.from_pretrained(folder)
    ranks = {name: int(info["rank"]) for name, info in meta["layers"].items()}
    config.nsn_ranks, config.nsn_max_ranks = ranks, dict(ranks)
    config.nsn_budget_plans, config.nsn_active_budget, config.nsn_dense_layers = None, None, []
    config.nsn_base_architecture, config.nsn_format_version = meta["architecture"], FORMAT_VERSION
    torch_dtype = resolve_dtype(dtype) or getattr(torch, meta["dtype"])
    from accelerate import init_empty_weights

    cls = compressed_model_class(meta["architecture"])
    with init_empty_weights(include_buffers=False):  # parameters on the meta device; buffers (rotary tables) real
        model = cls._from_config(config, dtype=torch_dtype)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            state[key] = handle.get_tensor(key)
    with safe_open(str(folder / LEGACY_FACTORS_FILE), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            layer, _, factor = key.rpartition(".")
            state[f"{layer}.down.weight" if factor == "A" else f"{layer}.up.weight"] = handle.get_tensor(key)
    for name in ranks:
        if f"{name}.bias" in state:
            state[f"{name}.up.bias"] = state.pop(f"{name}.bias")
    result = model.load_state_dict(
        {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False, assign=True
    )
    missing = [k for k in result.missing_keys if k not in meta.get("tied", [])]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder}: weights do not match the architecture (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    if meta.get("tied"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"{folder}: no weights for {still_meta[:5]}")
    logger.info(
        "%s is a compressed model of the first format; save_compressed(model, folder) rewrites it as a "
        "transformers model folder (CLI: nsn-peft compress --convert %s --output DIR)",
        folder,
        folder,
    )
    if device is not None:
        model.to(device)
    return model.eval()
