"""The transformer blocks of a model and their inputs, for training one block at a time.

Block-wise refinement needs each block as a function ``hidden -> hidden``: the hidden states that enter the
first block, and the other arguments the model passes every block (position embeddings, masks…). They are
recorded with a forward pre-hook on the first block during one forward of the full model, which then stops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..tuner.layer import NSNLayer

__all__ = ["BlockCall", "find_blocks", "nsn_factors"]


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the first block's input is needed."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, blocks)``: the ``nn.ModuleList`` of transformer blocks that holds most of the NSN layers.

    Raises ``ValueError`` when no module list holds NSN layers (e.g. a model whose layers are not in a list).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        count = sum(isinstance(m, NSNLayer) for child in module for m in child.modules())
        if count and (best is None or count > best[0]):
            best = (count, name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of blocks holding NSN layers, so it cannot be refined block by "
            "block; use end-to-end refinement only (blockwise_epochs=0)."
        )
    return best[1], best[2]


def nsn_factors(module: nn.Module) -> dict[str, nn.Parameter]:
    """``{"<layer>.nsn_A.<adapter>": factor, …}`` of the active adapter's NSN factors inside ``module``.

    Layers are named as in the plain base model (``model.layers.0.mlp.up_proj``), whatever ``module`` is.
    """
    factors: dict[str, nn.Parameter] = {}
    for layer in module.modules():
        if not isinstance(layer, NSNLayer):
            continue
        for adapter in layer.active_adapters:
            if adapter in layer.nsn_A:
                factors[f"{layer.module_name}.nsn_A.{adapter}"] = layer.nsn_A[adapter]
                factors[f"{layer.module_name}.nsn_B.{adapter}"] = layer.nsn_B[adapter]
    return factors


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


@dataclass
class BlockCall:
    """How the model calls its blocks: the extra positional and keyword arguments beside the hidden states.

    Recorded once for batches of ``batch_size`` sequences of ``seq_len`` tokens; every batch passed to
    :meth:`__call__` must have that shape (calibration blocks are unpadded and of equal length, so the
    masks and position embeddings are the same for every batch).
    """

    args: tuple
    kwargs: dict
    batch_size: int
    seq_len: int

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] != self.batch_size or hidden.shape[1] != self.seq_len:
            raise ValueError(
                f"Block inputs must be ({self.batch_size}, {self.seq_len}, hidden); got {tuple(hidden.shape)}"
            )
        out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: Sequence[torch.Tensor], out: torch.Tensor
) -> BlockCall:
    """Run the model on each batch of token ids up to its first block; write the block inputs into ``out``.

    ``out`` is ``(n, seq_len, hidden)`` with ``n = sum of batch sizes``; the arguments of the block call are
    returned and checked to be identical for every batch.
    """
    call: dict[str, Any] = {}
    hidden_holder: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if "args" not in call:
            call["args"], call["kwargs"] = rest, kwargs
        elif not (_same(call["args"], rest) and _same(call["kwargs"], kwargs)):
            raise ValueError(
                "The first block received different arguments (masks / positions) for two calibration batches; "
                "block-wise refinement needs unpadded calibration blocks of equal length."
            )
        hidden_holder.append(hidden)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = out.device
    row = 0
    try:
        with torch.no_grad():
            for ids in batches:
                hidden_holder.clear()
                try:
                    model(input_ids=ids.to(_input_device(model)), use_cache=False)
                except _StopForward:
                    pass
                if not hidden_holder:
                    raise ValueError("The model's forward never reached its first block")
                hidden = hidden_holder[0]
                out[row : row + hidden.shape[0]] = hidden.to(device=device, dtype=out.dtype)
                row += hidden.shape[0]
    finally:
        handle.remove()
    first = batches[0]
    return BlockCall(call["args"], call["kwargs"], int(first.shape[0]), int(first.shape[1]))


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def iterate_batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches of exactly ``batch_size`` over ``n`` rows (``n`` a multiple of it), shuffled with ``generator``."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]
