"""Calibration statistics of a model run block by block: input Grams on the way up, output-gradient Grams on the
way down, each block on the compute device only while it is worked on.

The forward pass pushes the calibration sequences through one block at a time (the dense trajectory) and
accumulates the input Gram of every targeted layer of that block, exactly the sums
:func:`nsn_peft.collect_activation_stats` forms over whole-model forwards. The backward pass needs the hidden
states entering every block (kept on the CPU for the sequences it uses): the loss is taken after the last
block, and its gradient is carried down one block at a time (recomputing each block's forward), which gives
the sums :func:`nsn_peft.collect_gradient_stats` forms with one backward through the whole model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.hooks import InputGramCollector, OutputGradientCollector, layer_features
from ..calibrate.stats import ActivationStats
from ..io import read_safetensors, write_safetensors
from ..refine.blocks import BlockCall
from .placement import BlockPlacement
from .trajectory import BlockLayout, Trajectory, model_tail

__all__ = ["HiddenStore", "StatsStore", "backward_statistics", "decomposition_bytes", "forward_statistics"]


class StatsStore:
    """Per-block statistics kept between passes: in CPU memory, or one statistics folder per block on disk.

    On disk each block's :class:`ActivationStats` is saved in ``dtype`` (float32 halves the files; float64
    keeps the sums bit for bit) and read back when its block is worked on, so memory holds one block's.
    """

    def __init__(self, folder: Optional[Union[str, os.PathLike]] = None, dtype: torch.dtype = torch.float64) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.dtype = dtype
        self.blocks: dict[int, ActivationStats] = {}
        self.indices: list[int] = []

    def put(self, index: int, stats: ActivationStats) -> None:
        """Keep one block's statistics (on any device; they are cast to ``dtype`` there, then moved)."""
        self.indices.append(index)
        stats = _cast(stats, self.dtype).to("cpu")
        if self.folder is None:
            self.blocks[index] = stats
        else:
            stats.save(self.folder / f"block-{index:05d}", dtype=self.dtype)

    def get(self, index: int) -> ActivationStats:
        if self.folder is None:
            return self.blocks[index]
        return ActivationStats.load(self.folder / f"block-{index:05d}")

    def merged(self, model_id: Optional[str] = None, extra: Optional[dict] = None) -> ActivationStats:
        """All blocks' statistics as one :class:`ActivationStats` (in memory)."""
        grams: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for index in self.indices:
            stats = self.get(index)
            grams.update(stats.grams)
            counts.update(stats.token_counts)
        return ActivationStats(grams, counts, model_id, dict(extra or {}))


class HiddenStore:
    """Hidden states at the block boundaries (for the backward pass): CPU memory, or one file each on disk."""

    def __init__(self, folder: Optional[Union[str, os.PathLike]] = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.tensors: dict[int, torch.Tensor] = {}

    def put(self, index: int, hidden: torch.Tensor) -> None:
        if self.folder is None:
            self.tensors[index] = hidden.to("cpu", copy=True)
        else:
            write_safetensors(self.folder / f"hidden-{index:05d}.safetensors", {"hidden": hidden.contiguous().cpu()})

    def get(self, index: int) -> torch.Tensor:
        if self.folder is None:
            return self.tensors[index]
        return read_safetensors(self.folder / f"hidden-{index:05d}.safetensors")["hidden"]

    def clear(self) -> None:
        self.tensors.clear()
        if self.folder is not None:
            for path in self.folder.glob("hidden-*.safetensors"):
                path.unlink()


def _cast(stats: ActivationStats, dtype: torch.dtype) -> ActivationStats:
    moved: dict[int, torch.Tensor] = {}
    grams = {k: moved.setdefault(id(v), v.to(dtype)) for k, v in stats.grams.items()}
    return ActivationStats(grams, dict(stats.token_counts), stats.model_id, dict(stats.extra))


def _gram_bytes(targets: dict[str, nn.Module], kind: str, dtype: torch.dtype = torch.float64) -> int:
    """Accumulators (``dtype``) plus one batch product (float32) per layer: an upper bound (shared inputs share)."""
    element = torch.empty(0, dtype=dtype).element_size() + 4
    side = 0 if kind == "input" else 1
    return sum(element * (layer_features(m)[1 - side] if side else layer_features(m)[1]) ** 2 for m in targets.values())


def decomposition_bytes(shapes: Iterable[Sequence[int]]) -> int:
    """Device memory of the largest layer's whitened decomposition (``(out, in)`` shapes), in float64: the
    symmetrised Gram and its Cholesky factor (``2·d²``), the Gram's transfer (``d²`` float32) and about three
    ``m×d`` matrices (the weight, ``W L``, the factors) plus the small-side eigenproblem (``min(m, d)²``)."""
    return max((8 * (2 * d * d + 3 * m * d + min(m, d) ** 2) + 4 * d * d for m, d in shapes), default=0)


def activation_bytes(targets: dict[str, nn.Module], rows: int, element: int, backward: bool = False) -> int:
    """About what one block's forward (and backward) holds for ``rows`` tokens: every layer's input and output."""
    width = sum(layer_features(m)[0] + layer_features(m)[1] for m in targets.values())
    return rows * width * element * (3 if backward else 1)


@torch.no_grad()
def forward_statistics(
    placement: BlockPlacement,
    layout: BlockLayout,
    trajectory: Trajectory,
    *,
    store: Optional[StatsStore],
    dtype: torch.dtype = torch.float64,
    share_inputs: bool = True,
    keep_inputs: int = 0,
    kept: Optional[HiddenStore] = None,
    on_block: Optional[Callable[[int, nn.Module], None]] = None,
    show_progress: bool = True,
) -> None:
    """Push ``trajectory`` through every block; put each block's input Grams in ``store`` (if given).

    With ``keep_inputs``, the hidden states entering block ``i`` for the first ``keep_inputs`` sequences go to
    ``kept`` under index ``i`` (and those leaving the last block under ``len(blocks)``). ``on_block(index,
    block)`` runs while a block is on the device, after its statistics.
    """
    rows = trajectory.batch_size * trajectory.hidden.shape[1]
    element = trajectory.hidden.element_size()
    for index in tqdm(
        range(len(layout.blocks)), desc="Calibrating block by block", unit="block", disable=not show_progress
    ):
        targets = layout.targets[index]
        extra = {
            "statistics": _gram_bytes(targets, "input", dtype) if store is not None else 0,
            "activations": activation_bytes(targets, rows, element),
        }
        with placement.visit(index, sum(extra.values()), extra) as block:
            if keep_inputs:
                kept.put(index, trajectory.hidden[:keep_inputs])
            if store is not None and targets:
                collector = InputGramCollector(targets, dtype, placement.device, share_inputs)
                with collector.attached():
                    for rows_, call in trajectory.batches():
                        collector.start_batch(None, (rows_.stop - rows_.start) * trajectory.hidden.shape[1])
                        trajectory.hidden[rows_] = call(block, trajectory.hidden[rows_]).to(trajectory.hidden.dtype)
                        collector.end_batch()
                grams, counts = collector.result(all_reduce=False)
                store.put(index, ActivationStats(grams, counts))
            else:
                trajectory.advance(block)
            if on_block is not None:
                on_block(index, block)
    if keep_inputs:
        kept.put(len(layout.blocks), trajectory.hidden[:keep_inputs])


def _summed_loss_gradient(
    placement: BlockPlacement, layout: BlockLayout, tokens: torch.Tensor, last: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """``∂L/∂h`` of the summed next-token loss at the hidden states leaving the last block (CPU tensor)."""
    grads = torch.empty_like(last)
    with placement.visit(None) as model, model_tail(model, layout) as holder:
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size].to(placement.device)
            hidden = last[start : start + batch_size].to(placement.device).requires_grad_(True)
            holder[0] = hidden
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum")
                (grad,) = torch.autograd.grad(loss, hidden)
            grads[start : start + batch_size] = grad.to("cpu", grads.dtype)
        holder[0] = None
    return grads


def backward_statistics(
    placement: BlockPlacement,
    layout: BlockLayout,
    tokens: torch.Tensor,
    inputs: HiddenStore,
    calls: Mapping[int, BlockCall],
    *,
    batch_size: int,
    dtype: torch.dtype = torch.float64,
    on_block: Callable[[int, nn.Module, ActivationStats], None],
    show_progress: bool = True,
) -> int:
    """Output-gradient Grams of every targeted layer, block by block from the top, handed to ``on_block``.

    ``inputs``: the hidden states entering each block and leaving the last (:func:`forward_statistics`'s
    ``keep_inputs``) for the token sequences ``tokens``; ``calls``: the block arguments per batch size (a
    :class:`Trajectory`'s ``calls`` for these tokens and ``batch_size``). ``on_block(index,
    block, gradient_stats)`` runs while the block is still on the device (e.g. to compute its spectra).
    Parameters get no gradients. Returns the number of tokens.
    """
    n = tokens.shape[0]
    frozen = [(p, p.requires_grad) for p in placement.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        grads = _summed_loss_gradient(placement, layout, tokens, inputs.get(len(layout.blocks)), batch_size)
        seq_len = tokens.shape[1]
        rows = batch_size * seq_len
        for index in tqdm(
            reversed(range(len(layout.blocks))),
            total=len(layout.blocks),
            desc="Output gradients block by block",
            unit="block",
            disable=not show_progress,
        ):
            targets = layout.targets[index]
            extra = {
                "statistics": _gram_bytes(targets, "output", dtype),
                "activations": activation_bytes(targets, rows, 4, backward=True),
                "decomposition": decomposition_bytes(layer_features(m) for m in targets.values()),
            }
            with placement.visit(index, sum(extra.values()), extra) as block:
                collector = OutputGradientCollector(targets, dtype, placement.device)
                below = torch.empty_like(grads)
                hidden = inputs.get(index)
                with collector.attached(), torch.enable_grad():
                    for start in range(0, n, batch_size):
                        x = hidden[start : start + batch_size].to(placement.device).requires_grad_(True)
                        collector.start_batch(None, x.shape[0] * seq_len)
                        y = calls[x.shape[0]](block, x)
                        y.backward(grads[start : start + batch_size].to(placement.device, y.dtype))
                        below[start : start + batch_size] = x.grad.to("cpu", below.dtype)
                        collector.end_batch()
                gradient_stats = ActivationStats(*collector.result(all_reduce=False), extra={"kind": "output_gradient"})
                del collector, hidden  # on_block may free the Grams one by one: no other reference to them
                on_block(index, block, gradient_stats)
                del gradient_stats
                grads = below
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return tokens.numel()
