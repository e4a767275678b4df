"""Compression of models larger than one device: every pass runs one transformer block at a time on the device.

* :func:`compress_sequential` — statistics, allocation, whitened initialisation and block-wise refinement, block
  by block (the rest of the model on the CPU, on disk through accelerate's offloading, or on ``meta``).
* :func:`collect_activation_stats_sequential` / :func:`collect_gradient_stats_sequential` — the calibration
  statistics alone, block by block.
* :class:`BlockPlacement` — where each block's tensors live between visits; :class:`BlockDoesNotFitError` when
  a block does not fit.
"""

from __future__ import annotations

from .calibrate import collect_activation_stats_sequential, collect_gradient_stats_sequential
from .pipeline import SequentialReport, compress_sequential
from .placement import BlockDoesNotFitError, BlockPlacement

__all__ = [
    "BlockDoesNotFitError",
    "BlockPlacement",
    "SequentialReport",
    "collect_activation_stats_sequential",
    "collect_gradient_stats_sequential",
    "compress_sequential",
]
