"""Saving the adapter of a model compressed block by block whose factors wait on disk, one block's at a time."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Union

from torch import nn

from ..io import atomic_directory, merge_safetensors, write_safetensors
from .placement import BlockPlacement

__all__ = ["save_offloaded_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_offloaded_adapter(
    peft_model: nn.Module, placement: BlockPlacement, directory: Union[str, os.PathLike]
) -> Path:
    """Write the active adapter as ``PeftModel.save_pretrained`` would (``adapter_config.json`` and
    ``adapter_model.safetensors``), copying the factors kept in ``placement``'s offload folder file by file.

    Memory holds one chunk of one file at a time, whatever the model's size; factors in memory are written as
    they are. The folder is written as one transaction; it loads with ``PeftModel.from_pretrained``.
    """
    from peft.utils import get_peft_model_state_dict

    adapter = peft_model.active_adapter
    state = peft_model.state_dict(keep_vars=True)
    selected = get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=adapter)
    stored = placement.stored_locations()
    parts: dict[Path, dict[str, str]] = {}
    in_memory = {}
    for key, tensor in selected.items():
        location = stored.get(id(tensor))
        if location is None:
            in_memory[key] = tensor.detach()
        else:
            parts.setdefault(location[0], {})[location[1]] = key
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        if in_memory:
            write_safetensors(staging / "in-memory.safetensors", in_memory)
            parts[staging / "in-memory.safetensors"] = {k: k for k in in_memory}
        merge_safetensors(staging / ADAPTER_WEIGHTS, list(parts.items()), metadata={"format": "pt"})
        (staging / "in-memory.safetensors").unlink(missing_ok=True)
        config = copy.deepcopy(peft_model.peft_config[adapter])
        config.inference_mode = True
        config.save_pretrained(str(staging))
    return directory
