"""Calibration statistics of a model larger than the device, one block at a time on it.

The same sums as :func:`nsn_peft.collect_activation_stats` and :func:`nsn_peft.collect_gradient_stats`, for a
model on the CPU, offloaded to disk by accelerate, or on ``meta`` with a ``materialize`` callable.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from ..calibrate.stats import ActivationStats
from ..devices import resolve_device
from ..refine._common import check_tokens
from .placement import BlockPlacement, Materialize
from .statistics import HiddenStore, StatsStore, backward_statistics, forward_statistics
from .trajectory import Trajectory, block_layout

__all__ = ["collect_activation_stats_sequential", "collect_gradient_stats_sequential"]


def _model_id(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None)
    return str(name) if name else None


def _setup(model, calibration, target_modules, device, materialize, max_memory):
    tokens = check_tokens(calibration)
    layout = block_layout(model, target_modules)
    placement = BlockPlacement(
        model, layout.blocks, resolve_device(device), materialize=materialize, max_memory=max_memory
    )
    return tokens, layout, placement


@torch.no_grad()
def collect_activation_stats_sequential(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    target_modules: Union[None, str, list[str]] = None,
    batch_size: int = 8,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float64,
    share_inputs: bool = True,
    materialize: Optional[Materialize] = None,
    max_memory: Optional[Union[int, str]] = None,
    offload_folder: Optional[Union[str, os.PathLike]] = None,
    show_progress: bool = True,
) -> ActivationStats:
    """Input Grams ``Σ xxᵀ`` of every targeted layer inside the transformer blocks, computed block by block.

    Args:
        model: the model (its blocks on the CPU, on disk through accelerate's offloading, or on ``meta`` with
            ``materialize``); only one block at a time is on ``device``.
        calibration: ``(sequences, seq_len)`` token ids (unpadded).
        target_modules / share_inputs / dtype: as in :func:`nsn_peft.collect_activation_stats`.
        batch_size: sequences per block forward.
        offload_folder: each block's statistics are also written there (``block-00000/`` …, statistics folders).
        max_memory: the most the run may hold on ``device``.

    Returns the statistics of all blocks (in CPU memory), equal to :func:`nsn_peft.collect_activation_stats` on
    the same sequences and batch size.
    """
    tokens, layout, placement = _setup(model, calibration, target_modules, device, materialize, max_memory)
    store = StatsStore(offload_folder, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        trajectory = Trajectory(placement, layout, tokens, batch_size, model.get_input_embeddings().weight.dtype)
        forward_statistics(
            placement,
            layout,
            trajectory,
            store=store,
            dtype=dtype,
            share_inputs=share_inputs,
            show_progress=show_progress,
        )
    finally:
        placement.close()
        model.train(was_training)
    extra = {
        "seq_len": tokens.shape[1],
        "tokens": int(tokens.numel()),
        "accumulate_dtype": str(dtype).removeprefix("torch."),
    }
    return store.merged(_model_id(model), extra)


def collect_gradient_stats_sequential(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    target_modules: Union[None, str, list[str]] = None,
    batch_size: int = 4,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float64,
    materialize: Optional[Materialize] = None,
    max_memory: Optional[Union[int, str]] = None,
    offload_folder: Optional[Union[str, os.PathLike]] = None,
    show_progress: bool = True,
) -> ActivationStats:
    """Output-gradient Grams ``Σ ggᵀ`` of the summed next-token loss, per targeted layer, block by block.

    A forward pass keeps the hidden states entering every block (CPU memory, or ``offload_folder``); the loss
    gradient is then carried down one block at a time. Equal to :func:`nsn_peft.collect_gradient_stats` on the
    same sequences; other arguments as in :func:`collect_activation_stats_sequential`.
    """
    tokens, layout, placement = _setup(model, calibration, target_modules, device, materialize, max_memory)
    inputs = HiddenStore(os.path.join(offload_folder, "hidden") if offload_folder else None)
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def keep(index: int, block: nn.Module, stats: ActivationStats) -> None:
        grams.update({n: g.to("cpu") for n, g in stats.grams.items()})
        counts.update(stats.token_counts)

    was_training = model.training
    model.eval()
    try:
        trajectory = Trajectory(placement, layout, tokens, batch_size, model.get_input_embeddings().weight.dtype)
        forward_statistics(
            placement,
            layout,
            trajectory,
            store=None,
            keep_inputs=tokens.shape[0],
            kept=inputs,
            show_progress=show_progress,
        )
        calls = trajectory.calls
        del trajectory
        backward_statistics(
            placement,
            layout,
            tokens,
            inputs,
            calls,
            batch_size=batch_size,
            dtype=dtype,
            on_block=keep,
            show_progress=show_progress,
        )
    finally:
        inputs.clear()
        placement.close()
        model.train(was_training)
    ordered = [n for block in layout.targets for n in block]
    extra = {
        "kind": "output_gradient",
        "seq_len": tokens.shape[1],
        "tokens": int(tokens.numel()),
        "accumulate_dtype": str(dtype).removeprefix("torch."),
    }
    return ActivationStats({n: grams[n] for n in ordered}, {n: counts[n] for n in ordered}, _model_id(model), extra)
