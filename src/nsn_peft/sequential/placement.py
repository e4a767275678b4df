"""Where a model's tensors live between visits, and how one block at a time comes onto the compute device.

A model compressed sequentially is cut into *groups*: each transformer block, and the *shell* (everything
outside the blocks: embeddings, final norm, head). :class:`BlockPlacement` brings one group onto the compute
device, and sends it back when the work on it is done:

* a tensor that lives on a device (the CPU, another GPU) is copied to the compute device, and on the way back
  its original is put back (the dense model is never written, so nothing is copied back);
* a tensor on the ``meta`` device is read from its *source*: the weights map of accelerate's offloading hooks
  (a model loaded with ``device_map=...`` and ``offload_folder``, whose hooks are detached while the
  placement is active), or a ``materialize`` callable (e.g. random weights for a benchmark); on the way back
  it returns to ``meta``, so nothing of it stays in memory;
* a tensor created on the device during the visit (the NSN factors) goes to the *factor home*: the CPU, or
  with ``offload_folder`` one safetensors file per block on disk, read back lazily like any other source.

Before a block comes on, its memory need is checked against what the device has free (or ``max_memory``), and
a block that does not fit is refused with an error naming it and what it needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..io import read_safetensors, write_safetensors

logger = logging.getLogger(__name__)

__all__ = ["BlockDoesNotFitError", "BlockPlacement", "Materialize", "format_bytes", "parse_bytes", "tensor_bytes"]

#: ``materialize(qualified_name, meta_tensor, device) -> tensor``: the value of a tensor held on ``meta``.
Materialize = Callable[[str, torch.Tensor, torch.device], torch.Tensor]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


class BlockDoesNotFitError(MemoryError):
    """A block (with what its processing needs) is larger than the memory its device has left."""


def parse_bytes(value: Union[int, str]) -> int:
    """``"20GiB"``, ``"500MB"``, ``"1e9"`` or an int → bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?I?B?)\s*", str(value).upper())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"Cannot read a memory size from {value!r}; write e.g. '20GiB', '500MB' or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()  # also right for meta tensors


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:  # Linux: what the kernel says it can give without swapping
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 2**62


_RESIDENT = torch.empty(0, device="meta")  # marks tensors that were on the compute device before a visit


def _direct_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    for name, param in module._parameters.items():
        if param is not None:
            yield name, param, True
    for name, buffer in module._buffers.items():
        if buffer is not None:
            yield name, buffer, False


def _set(module: nn.Module, name: str, value: torch.Tensor, is_param: bool, requires_grad: bool) -> None:
    if is_param:
        module._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)
    else:
        module._buffers[name] = value


class BlockPlacement:
    """Moves the groups of a model (its blocks and its shell) onto ``device`` one at a time.

    Args:
        model: the model (dense, or already adapted); its tensors may be on any device or on ``meta``.
        blocks: its transformer blocks, in order.
        device: the compute device.
        materialize: the value of ``meta`` tensors that no accelerate hook provides (``(qualified name, meta
            tensor, device) -> tensor``; names as in ``model.named_parameters()`` at construction).
        offload_folder: where factors made during a visit are kept between visits (one file per group); default:
            in CPU memory.
        max_memory: the most this placement may hold on ``device`` at once (bytes or ``"20GiB"``); default: what
            the device has free.

    Use :meth:`visit` (a context manager); :meth:`close` restores accelerate's hooks (at the end of the work).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[nn.Module],
        device: Union[str, torch.device],
        *,
        materialize: Optional[Materialize] = None,
        offload_folder: Optional[Union[str, os.PathLike]] = None,
        max_memory: Optional[Union[int, str]] = None,
    ) -> None:
        self.model, self.blocks, self.device = model, list(blocks), torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.materialize = materialize
        self.folder = Path(offload_folder) if offload_folder is not None else None
        self.max_memory = parse_bytes(max_memory) if max_memory is not None else None
        self.names: dict[tuple[int, str], str] = {}
        self.sources: dict[tuple[int, str], Callable[[], torch.Tensor]] = {}
        # While a group is on the device: {key: (its off-device original or None, the device copy, its version)}.
        self.visiting: dict[tuple[int, str], tuple[Optional[torch.Tensor], torch.Tensor, int]] = {}
        self.stored: set[tuple[int, str]] = set()  # tensors this placement keeps in the offload folder
        self.locations: dict[tuple[int, str], tuple[Path, str]] = {}  # … and where: (file, key)
        self._hooks: list[tuple[nn.Module, object]] = []
        self.last_need: dict[str, int] = {}  # the parts of the estimate of the last group checked
        self._files: dict[Path, dict[str, torch.Tensor]] = {}
        for qualified, module in model.named_modules():
            for name, _, _ in _direct_tensors(module):
                self.names.setdefault((id(module), name), f"{qualified}.{name}" if qualified else name)
        self._detach_accelerate_hooks()
        in_blocks = {id(m) for block in self.blocks for m in block.modules()}
        self.shell = [m for m in model.modules() if id(m) not in in_blocks]

    # -- accelerate's offloading ----------------------------------------------------------------------
    def _detach_accelerate_hooks(self) -> None:
        """Take the weights maps of accelerate's hooks as sources and detach the hooks meanwhile."""
        from accelerate.hooks import remove_hook_from_module

        for module in self.model.modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is None:
                continue
            self._hooks.append((module, hook))
            weights_map = getattr(hook, "weights_map", None)
            if weights_map is not None:
                for name, tensor, _ in _direct_tensors(module):
                    if tensor.is_meta and name in weights_map:
                        self.sources[(id(module), name)] = lambda w=weights_map, n=name: w[n]
        for module, _ in self._hooks:
            remove_hook_from_module(module)

    def close(self) -> None:
        """Put accelerate's hooks back (the work is done)."""
        from accelerate.hooks import add_hook_to_module

        for module, hook in self._hooks:
            add_hook_to_module(module, hook)
        self._hooks.clear()

    # -- moving groups ------------------------------------------------------------------------------
    def group(self, index: Optional[int]) -> list[nn.Module]:
        """The modules of block ``index``, or of the shell for ``None``."""
        return list(self.blocks[index].modules()) if index is not None else self.shell

    def group_name(self, index: Optional[int]) -> str:
        if index is None:
            return "the model outside its blocks (embeddings, final norm, head)"
        for name, module in self.model.named_modules():
            if module is self.blocks[index]:
                return name
        return f"block {index}"

    def resident_bytes(self, index: Optional[int]) -> int:
        """What group ``index`` holds once on the device (meta tensors without a source count nothing)."""
        total = 0
        for module in self.group(index):
            for name, tensor, _ in _direct_tensors(module):
                key = (id(module), name)
                if tensor.device != self.device and (not tensor.is_meta or self._has_source(key)):
                    total += tensor_bytes(tensor)
        return total

    def _has_source(self, key: tuple[int, str]) -> bool:
        return key in self.sources or (self.materialize is not None and key in self.names)

    def check_fits(self, index: Optional[int], extra_bytes: int = 0, parts: Optional[Mapping[str, int]] = None) -> None:
        """Raise :class:`BlockDoesNotFitError` unless group ``index`` plus ``extra_bytes`` fit on the device."""
        weights = self.resident_bytes(index)
        need = weights + extra_bytes
        self.last_need = {"weights": weights, **(parts or {})}  # what the report shows beside the measured peak
        if self.max_memory is not None:
            held = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
            free, limit = self.max_memory - held, f"max_memory={format_bytes(self.max_memory)}"
        else:
            free, limit = _available_bytes(self.device), "free on the device"
        if need > free:
            detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in {"weights": weights, **(parts or {})}.items() if v)
            raise BlockDoesNotFitError(
                f"{self.group_name(index)} needs about {format_bytes(need)} on {self.device} ({detail}) but only "
                f"{format_bytes(max(free, 0))} is available ({limit}). Use a device with more memory, fewer "
                "calibration tokens or a smaller batch_size."
            )

    @torch.no_grad()
    def onload(self, index: Optional[int]) -> None:
        moved: dict[int, torch.Tensor] = {}  # tied tensors stay tied
        for module in self.group(index):
            for name, tensor, is_param in _direct_tensors(module):
                key = (id(module), name)
                if tensor.device == self.device:
                    self.visiting[key] = (_RESIDENT, tensor, tensor._version)  # lives here: stays here
                    continue
                if id(tensor) in moved:
                    value = moved[id(tensor)]
                elif tensor.is_meta:
                    if key in self.sources:
                        value = self.sources[key]()
                    elif self.materialize is not None and key in self.names:
                        value = self.materialize(self.names[key], tensor, self.device)
                    else:
                        continue  # a placeholder (factors not made yet)
                    value = value.to(device=self.device, dtype=tensor.dtype)
                else:
                    value = tensor.to(self.device)
                _set(
                    module,
                    name,
                    value.data if isinstance(value, nn.Parameter) else value,
                    is_param,
                    tensor.requires_grad,
                )
                placed = module._parameters[name] if is_param else module._buffers[name]
                moved[id(tensor)] = placed
                self.visiting[key] = (None if tensor.is_meta else tensor, placed, placed._version)
        self._files.clear()

    @torch.no_grad()
    def offload(self, index: Optional[int]) -> None:
        new: dict[str, tuple[nn.Module, str, torch.Tensor, bool]] = {}
        for module in self.group(index):
            for name, tensor, is_param in _direct_tensors(module):
                key = (id(module), name)
                original, placed, version = self.visiting.pop(key, (None, None, None))
                if original is _RESIDENT:
                    continue
                unchanged = tensor is placed and tensor._version == version
                if original is not None and (
                    unchanged or (tensor.shape == original.shape and tensor.dtype == original.dtype)
                ):
                    if not unchanged:  # trained during the visit: the values go home, into the same storage
                        original.copy_(tensor)
                    _set(module, name, original.data if is_param else original, is_param, tensor.requires_grad)
                elif tensor.device != self.device:
                    continue
                elif unchanged and self._has_source(key):
                    _set(module, name, torch.empty_like(tensor, device="meta"), is_param, tensor.requires_grad)
                else:
                    new[self._qualified(module, name)] = (module, name, tensor, is_param)
        if new:
            self._store_new(index, new)

    def _qualified(self, module: nn.Module, name: str) -> str:
        key = (id(module), name)
        if key not in self.names:
            for qualified, m in self.model.named_modules():
                if m is module:
                    self.names[key] = f"{qualified}.{name}" if qualified else name
                    break
        return self.names[key]

    def _store_new(self, index: Optional[int], new: Mapping[str, tuple[nn.Module, str, torch.Tensor, bool]]) -> None:
        """Tensors made during the visit (factors): to the CPU, or to this group's file in the offload folder."""
        if self.folder is None:
            for module, name, tensor, is_param in new.values():
                _set(module, name, tensor.to("cpu"), is_param, tensor.requires_grad)
            return
        path = self.folder / f"{'shell' if index is None else f'block-{index:05d}'}.safetensors"
        write_safetensors(path, {k: v[2].detach().contiguous().cpu() for k, v in new.items()})
        for key, (module, name, tensor, is_param) in new.items():
            self.sources[(id(module), name)] = lambda p=path, k=key: self._read(p)[k]
            self.stored.add((id(module), name))
            self.locations[(id(module), name)] = (path, key)
            _set(module, name, torch.empty_like(tensor, device="meta"), is_param, tensor.requires_grad)

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        """A group's file, read once per onload (plain reads: no mapped pages stay resident)."""
        if path not in self._files:
            self._files[path] = read_safetensors(path)
        return self._files[path]

    @contextlib.contextmanager
    def visit(
        self, index: Optional[int], extra_bytes: int = 0, parts: Optional[Mapping[str, int]] = None
    ) -> Iterator[nn.Module]:
        """Group ``index`` (a block, or the shell for ``None``) on the device for the duration of the block."""
        self.check_fits(index, extra_bytes, parts)
        self.onload(index)
        try:
            yield self.blocks[index] if index is not None else self.model
        except torch.OutOfMemoryError as err:
            raise BlockDoesNotFitError(
                f"{self.group_name(index)} ran out of memory on {self.device} (its weights take "
                f"{format_bytes(self.resident_bytes(index) or 0)}; estimated extra need {format_bytes(extra_bytes)}): {err}"
            ) from err
        finally:
            self.offload(index)

    def stored_locations(self) -> dict[int, tuple[Path, str]]:
        """``{id(tensor): (file, key)}`` of the tensors this placement keeps in its offload folder."""
        locations = {}
        for module in self.model.modules():
            for name, tensor, _ in _direct_tensors(module):
                key = (id(module), name)
                if tensor.is_meta and key in self.stored:
                    locations[id(tensor)] = self.locations[key]
        return locations

    def load_stored(self) -> None:
        """Bring the tensors this placement keeps in the offload folder (the factors) into CPU memory."""
        for module in self.model.modules():
            for name, tensor, is_param in _direct_tensors(module):
                key = (id(module), name)
                if tensor.is_meta and key in self.stored:
                    _set(module, name, self.sources[key]().to(dtype=tensor.dtype), is_param, tensor.requires_grad)
                    self.stored.discard(key)
                    del self.sources[key]
        self._files.clear()
