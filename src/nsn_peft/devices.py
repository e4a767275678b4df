"""Device and dtype names as users write them (``"auto"``, ``"bf16"``…) turned into what torch expects."""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["resolve_device", "resolve_dtype"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "auto": None}


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
