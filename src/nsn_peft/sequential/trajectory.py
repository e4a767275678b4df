"""A model run block by block: its blocks and their targeted layers, the hidden states that enter each block, and
the part of the model after the blocks (final norm, head) run on given hidden states.

The hidden states of the calibration sequences (``(n, seq_len, hidden)``) stay on the compute device and are
pushed through one block at a time; the arguments the model passes every block (position embeddings, masks)
are recorded once from the model's own forward (:func:`nsn_peft.refine.blocks.capture_block_inputs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from ..calibrate.collect import calibration_targets
from ..refine.blocks import BlockCall, capture_block_inputs
from .placement import BlockPlacement

__all__ = ["BlockLayout", "Trajectory", "block_layout", "model_tail"]


@dataclass
class BlockLayout:
    """The transformer blocks of a model (``name``: their ``nn.ModuleList``) and each block's targeted layers."""

    name: str
    blocks: nn.ModuleList
    targets: list[dict[str, nn.Module]]  # per block: {canonical layer name: module}

    def layer_names(self, index: int) -> list[str]:
        return list(self.targets[index])


def block_layout(model: nn.Module, target_modules: Union[None, str, Sequence[str]] = None) -> BlockLayout:
    """The ``nn.ModuleList`` holding most targeted layers, with the targets of each of its blocks.

    Raises ``ValueError`` naming targeted layers outside the blocks (sequential processing covers the blocks).
    """
    targets = calibration_targets(model, target_modules)
    owner = {id(m): name for name, m in targets.items()}
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            count = sum(id(m) in owner for child in module for m in child.modules())
            if count and (best is None or count > best[0]):
                best = (count, name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of blocks holding the targeted layers; "
            "it cannot be processed block by block"
        )
    _, name, blocks = best
    per_block = [{owner[id(m)]: m for m in block.modules() if id(m) in owner} for block in blocks]
    inside = {n for block in per_block for n in block}
    outside = [n for n in targets if n not in inside]
    if outside:
        raise ValueError(
            f"Targeted layers {outside[:5]} lie outside the transformer blocks ({name}); sequential "
            "compression factors layers inside the blocks only: leave them out of target_modules"
        )
    return BlockLayout(name, blocks, per_block)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class Trajectory:
    """Hidden states of token sequences entering the current block, on the compute device.

    ``hidden`` is ``(n, seq_len, hidden)``; :meth:`batches` gives ``(rows, call)`` per batch of ``batch_size``
    sequences (the last batch may be smaller, with its own recorded block arguments).
    """

    def __init__(
        self, placement: BlockPlacement, layout: BlockLayout, tokens: torch.Tensor, batch_size: int, dtype: torch.dtype
    ) -> None:
        self.batch_size, self.tokens = batch_size, tokens
        n, seq_len = tokens.shape
        batches = [tokens[i : i + batch_size] for i in range(0, n, batch_size)]
        hidden_size = placement.model.get_input_embeddings().weight.shape[1]
        self.hidden = torch.empty(n, seq_len, hidden_size, dtype=dtype, device=placement.device)
        self.calls: dict[int, BlockCall] = {}
        with placement.visit(None) as model:
            full = [b for b in batches if b.shape[0] == batches[0].shape[0]]
            rest = [b for b in batches if b.shape[0] != batches[0].shape[0]]
            for group, start in ((full, 0), (rest, len(full) * batch_size)):
                if group:
                    call = capture_block_inputs(model, layout.blocks, group, self.hidden[start:])
                    self.calls[call.batch_size] = BlockCall(
                        _to_device(call.args, placement.device),
                        _to_device(call.kwargs, placement.device),
                        call.batch_size,
                        call.seq_len,
                    )

    def batches(self) -> Iterator[tuple[slice, BlockCall]]:
        n = self.hidden.shape[0]
        for start in range(0, n, self.batch_size):
            rows = slice(start, min(start + self.batch_size, n))
            yield rows, self.calls[rows.stop - rows.start]

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        """Replace the hidden states by ``block``'s outputs."""
        for rows, call in self.batches():
            self.hidden[rows] = call(block, self.hidden[rows]).to(self.hidden.dtype)


class _StandIn(nn.Module):
    """Takes a block's place in :func:`model_tail`: the first returns the given hidden states, the others pass
    theirs on."""

    def __init__(self, holder: list, first: bool) -> None:
        super().__init__()
        self.holder, self.first = holder, first

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.holder[0] if self.first else hidden_states


@contextlib.contextmanager
def model_tail(model: nn.Module, layout: BlockLayout) -> Iterator[list]:
    """Within the block, ``model(input_ids=ids)`` computes the layers after the blocks on ``holder[0]``.

    Yields ``holder``: put the hidden states leaving the last block in ``holder[0]`` (the ``input_ids`` only
    fix the shapes the model builds its masks and positions from). The blocks are swapped for stand-ins meanwhile.
    """
    holder: list = [None]
    parent_name, _, attribute = layout.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, attribute)
    setattr(parent, attribute, nn.ModuleList(_StandIn(holder, i == 0) for i in range(len(original))))
    try:
        yield holder
    finally:
        setattr(parent, attribute, original)
