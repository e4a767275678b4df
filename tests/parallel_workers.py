"""Module-level work for the data-parallel tests: spawned processes import it by name (``tests`` is on the path)."""

from __future__ import annotations

import torch
from tiny_models import tiny_llama


def calibration_blocks(n: int = 7, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(0))


def collect_shard() -> dict:
    """This process's shard of the calibration blocks through the tiny model, both kinds of statistics (the
    collectors reduce the sums over the processes)."""
    from nsn_peft import collect_activation_stats, collect_gradient_stats
    from nsn_peft.calibrate.parallel import process_rank, shard_blocks

    _, world_size = process_rank()
    shard = shard_blocks(calibration_blocks())
    result = {"world_size": world_size, "shard": shard.shape[0]}
    for kind, collect in (("activation", collect_activation_stats), ("output_gradient", collect_gradient_stats)):
        stats = collect(tiny_llama(), shard, max_tokens=None, batch_size=1, show_progress=False)
        result[kind] = {"grams": stats.grams, "counts": stats.token_counts}
    return result


def fail() -> None:
    raise ValueError("this process fails")
