"""Resumable refinement: the factors, the optimizer and the progress, saved transactionally (safetensors + JSON).

A state folder holds ``refine_state.json`` (stage, progress, settings, a fingerprint of the data and the
model), ``factors.safetensors`` (every NSN factor being refined) and, mid-stage, ``optimizer.safetensors``
(AdamW moments). The whole folder is rewritten through a temporary sibling and swapped in at once, so a
crash leaves either the previous state or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file
from torch import nn

from ..io import atomic_directory, finish_interrupted_save, write_json, write_safetensors

__all__ = ["STATE_FORMAT", "RefineState", "data_fingerprint", "load_state", "save_state"]

STATE_FORMAT = "nsn-peft-refine-state"
STATE_VERSION = 1
STATE_JSON = "refine_state.json"
FACTORS_FILE = "factors.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class RefineState:
    """Where a refinement run stands.

    Attributes:
        stage: ``"blockwise"``, ``"end_to_end"`` or ``"done"``.
        block: blocks finished by the block-wise stage.
        step: optimizer steps finished by the end-to-end stage.
        fingerprint: data and model identity (a resumed run must match it).
        settings: the run's settings (a resumed run must use the same ones).
        history: per-block / per-interval records (losses, seconds).
        extra: anything else the caller keeps (e.g. the allocation chosen).
    """

    stage: str = "blockwise"
    block: int = 0
    step: int = 0
    fingerprint: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def data_fingerprint(tokens: torch.Tensor) -> dict[str, Any]:
    """Shape and SHA-256 of a token tensor, to check a resumed run sees the same calibration data."""
    data = tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return {"shape": list(tokens.shape), "sha256": hashlib.sha256(data).hexdigest()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_state(
    directory: Union[str, os.PathLike],
    state: RefineState,
    factors: dict[str, nn.Parameter],
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> None:
    """Write ``state``, the factors and (optionally) the optimizer into ``directory``, atomically."""
    with atomic_directory(directory) as tmp:
        write_safetensors(
            tmp / FACTORS_FILE, {name: p.detach() for name, p in factors.items()}, metadata={"format": STATE_FORMAT}
        )
        meta = {"format": STATE_FORMAT, "version": STATE_VERSION, **asdict(state)}
        if optimizer is not None:
            tensors, rest = _optimizer_tensors(optimizer)
            write_safetensors(tmp / OPTIMIZER_FILE, tensors, metadata={"format": STATE_FORMAT})
            meta["optimizer"] = rest
        write_json(tmp / STATE_JSON, meta)


def load_state(directory: Union[str, os.PathLike]) -> Optional[tuple[RefineState, dict[str, Any]]]:
    """``(state, raw json)`` of a state folder, or ``None`` when ``directory`` holds none yet."""
    directory = Path(directory)
    if directory.is_dir():
        finish_interrupted_save(directory)  # a save killed after its commit point: its files, not a mix
    path = directory / STATE_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"Corrupt refinement state {path}: {err}") from None
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise ValueError(f"{path} is not a version-{STATE_VERSION} nsn-peft refinement state")
    known = set(RefineState.__dataclass_fields__)
    return RefineState(**{k: v for k, v in meta.items() if k in known}), meta


def restore_factors(directory: Union[str, os.PathLike], factors: dict[str, nn.Parameter]) -> None:
    """Copy the saved factors into ``factors`` (same names and shapes, or ``ValueError`` naming the first mismatch)."""
    saved = load_file(str(Path(directory) / FACTORS_FILE))
    if set(saved) != set(factors):
        missing = sorted(set(factors) ^ set(saved))
        raise ValueError(f"Refinement state in {directory} holds other factors than this model (e.g. {missing[:2]})")
    with torch.no_grad():
        for name, param in factors.items():
            if tuple(saved[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"Refinement state in {directory}: '{name}' has shape {tuple(saved[name].shape)}, "
                    f"the model {tuple(param.shape)}"
                )
            param.copy_(saved[name].to(param))


def restore_optimizer(
    directory: Union[str, os.PathLike], meta: dict[str, Any], optimizer: torch.optim.Optimizer
) -> None:
    """Load the optimizer moments saved by :func:`save_state` into ``optimizer`` (built over the same parameters)."""
    info = meta.get("optimizer")
    path = Path(directory) / OPTIMIZER_FILE
    if info is None or not path.is_file():
        raise ValueError(f"Refinement state in {directory} holds no optimizer state")
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in info.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
