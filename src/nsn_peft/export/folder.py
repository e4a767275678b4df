"""Reading a compressed model folder without loading it: its files, its format, what it holds.

Layout of the current format (a transformers model folder; safetensors + JSON only)::

    config.json             the base model's config, plus ``nsn_ranks`` (rank of every factored layer),
                            ``nsn_max_ranks`` (the rank its factors store), ``nsn_budget_plans`` and
                            ``nsn_active_budget`` (nested exports), ``nsn_dense_layers``, ``nsn_base_architecture``,
                            ``nsn_format_version`` and ``auto_map``
    modeling_nsn.py         the model class (:mod:`nsn_peft.export.modeling_nsn`, torch + transformers only)
    model.safetensors       every weight; a factored layer ``L`` as ``L.down.weight`` (R×d), ``L.up.weight``
                            (m×R) and ``L.up.bias``
    README.md               the model card
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from ..io import check_safetensors, finish_interrupted_save

FORMAT_VERSION = 2
MODELING_FILE = "modeling_nsn.py"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
# The first format (version 1): still read (see legacy.py).
LEGACY_META_FILE = "nsn_compression.json"
LEGACY_FACTORS_FILE = "nsn_factors.safetensors"

__all__ = ["check_weight_files", "describe_export", "is_export_folder", "read_export_config"]


def read_export_config(folder: Union[str, os.PathLike]) -> dict[str, Any]:
    """``config.json`` of an export folder, checked: it must describe a compressed model of the current format.

    Raises ``FileNotFoundError``/``ValueError`` naming the file when it is missing, not JSON, or not an export.
    """
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a compressed NSN model (no config.json); write one with save_compressed()"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("nsn_ranks"), dict):
        raise FileNotFoundError(
            f"{folder} is not a compressed NSN model ({path} has no nsn_ranks); write one with save_compressed()"
        )
    version = config.get("nsn_format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported compressed-model format version {version!r} (this nsn-peft reads {FORMAT_VERSION})"
        )
    if not isinstance(config.get("nsn_base_architecture"), str):
        raise ValueError(f"{path}: nsn_base_architecture is missing")
    return config


def check_weight_files(folder: Path) -> None:
    """Headers of every weights file (cheap: nothing is read): a truncated or corrupt file is named here."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"corrupt {index}: {err}") from None
    else:
        files = [WEIGHTS_FILE]
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: the compressed model folder is incomplete")
        check_safetensors(folder / name)


def describe_export(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """What a compressed model folder holds, read from its config and the weights' header (nothing is loaded):
    ``{"architecture", "dtype", "layers": {name: {"out", "in", "max_rank", "rank"}}, "budget_plans",
    "active_budget", "dense_layers", "format_version"}``."""
    folder = Path(path)
    finish_interrupted_save(folder)
    if not (folder / "config.json").is_file() and (folder / LEGACY_META_FILE).is_file():
        meta = json.loads((folder / LEGACY_META_FILE).read_text(encoding="utf-8"))
        layers = {
            n: {
                "out": int(v["out_features"]),
                "in": int(v["in_features"]),
                "max_rank": int(v["rank"]),
                "rank": int(v["rank"]),
            }
            for n, v in meta.get("layers", {}).items()
        }
        return {
            "architecture": meta.get("architecture"),
            "dtype": meta.get("dtype"),
            "layers": layers,
            "budget_plans": None,
            "active_budget": None,
            "dense_layers": [],
            "format_version": 1,
        }
    config = read_export_config(folder)
    check_weight_files(folder)
    header = check_safetensors(folder / WEIGHTS_FILE) if (folder / WEIGHTS_FILE).is_file() else {}
    max_ranks = config.get("nsn_max_ranks") or config["nsn_ranks"]
    layers = {}
    for name, rank in config["nsn_ranks"].items():
        up, down = header.get(f"{name}.up.weight", {}), header.get(f"{name}.down.weight", {})
        m, d = (up.get("shape") or [0])[0], (down.get("shape") or [0, 0])[1]
        layers[name] = {"out": int(m), "in": int(d), "max_rank": int(max_ranks.get(name, rank)), "rank": int(rank)}
    dtypes = {v.get("dtype") for k, v in header.items() if isinstance(v, dict) and k.endswith(".down.weight")}
    return {
        "architecture": config["nsn_base_architecture"],
        "dtype": next(iter(dtypes), None),
        "layers": layers,
        "budget_plans": config.get("nsn_budget_plans"),
        "active_budget": config.get("nsn_active_budget"),
        "dense_layers": config.get("nsn_dense_layers") or [],
        "format_version": config["nsn_format_version"],
    }


def is_export_folder(ref: Optional[Union[str, os.PathLike]]) -> bool:
    """Whether ``ref`` is a local folder written by :func:`save_compressed` (either format)."""
    if ref is None:
        return False
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        return False
    if (folder / LEGACY_META_FILE).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "nsn_ranks" in config
