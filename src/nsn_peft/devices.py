"""Device and dtype names as users write them (``"auto"``, ``"bf16"``…) turned into what torch expects, and
accelerate's placements of a model (``device_map``) turned into loading keywords or a dispatch."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

__all__ = [
    "DeviceMap",
    "dispatch",
    "offloaded_to_disk",
    "placement_kwargs",
    "refuse_disk",
    "resolve_device",
    "resolve_dtype",
]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "auto": None,
}


def resolve_dtype(dtype: Optional[Union[str, torch.dtype]]) -> Optional[torch.dtype]:
    """``"bf16"``/``"bfloat16"``/… → ``torch.bfloat16``; ``None``/``"auto"`` → ``None`` (keep the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> str:
    """``None``/``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as given."""
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


#: accelerate's placement of a model: ``"auto"`` (the GPUs, then the CPU, then an offload folder on disk, within
#: ``max_memory`` per device, e.g. ``{0: "70GiB", "cpu": "200GiB"}``), ``"balanced"``, ``"sequential"``, a device
#: (``"cpu"``, ``"cuda:1"``) or ``{module name: device}``.
DeviceMap = Union[str, dict[str, Union[int, str, torch.device]]]

_NAMED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def placement_kwargs(
    device_map: Optional[DeviceMap],
    max_memory: Optional[dict] = None,
    offload_folder: Optional[Union[str, os.PathLike]] = None,
) -> dict[str, Any]:
    """``from_pretrained`` keywords of a placement (none without a ``device_map``)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder apply to a device_map (e.g. device_map='auto')")
        return {}
    kwargs: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def offloaded_to_disk(model: Any) -> bool:
    """Whether accelerate placed part of ``model`` on disk (``device_map`` with ``"disk"`` entries)."""
    return "disk" in set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))


def refuse_disk(model: Any, name: str) -> None:
    """``ValueError`` when accelerate placed part of ``model`` on disk: NSN factors need a device to live on."""
    if offloaded_to_disk(model):
        raise ValueError(
            f"device_map placed part of {name} on disk ({model.hf_device_map}); NSN adapters load onto "
            "GPUs and the CPU only: raise max_memory['cpu'] or use a device with more memory"
        )


def dispatch(model: Any, device_map: DeviceMap, max_memory: Optional[dict] = None) -> Any:
    """``model`` (in CPU memory) placed by accelerate on GPUs and the CPU: a named map (``"auto"``…) as accelerate
    infers it within ``max_memory``, else the given one. A placement with parts on disk is refused: it is for
    models whose tensors have no file to be read back from (e.g. NSN factors)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    no_split = list(getattr(inner, "_no_split_modules", None) or [])
    if device_map in _NAMED_MAPS:
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    elif not isinstance(device_map, dict):
        device_map = {"": device_map}
    if "disk" in set(map(str, device_map.values())):
        raise ValueError(
            f"device_map {device_map} places part of the model on disk; NSN adapters load onto GPUs and "
            "the CPU only: raise max_memory['cpu'] or use a device with more memory"
        )
    return dispatch_model(model, device_map=device_map)
