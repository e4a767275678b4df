"""Data-parallel calibration: N processes each run a shard of the calibration sequences, and the statistics are
reduced once at the end.

The collectors (:func:`~nsn_peft.collect_activation_stats`, :func:`~nsn_peft.collect_gradient_stats`) already
all-reduce their sums and token counts when a ``torch.distributed`` process group is up, so a data-parallel
run is: every process cuts the same token blocks, keeps its shard (:func:`shard_blocks`), and collects. Any
launcher that sets up the process group will do (``accelerate launch``, ``torchrun``); :func:`run_data_parallel`
starts the processes itself (gloo on CPUs, NCCL with one GPU per process)::

    def work(rank, world_size):
        blocks = shard_blocks(token_blocks(texts, tokenizer, 512, 131072))
        return collect_activation_stats(model, blocks, max_tokens=None)


    stats = run_data_parallel(work, num_processes=4)  # rank 0's result

The sums equal the single-process ones up to the order of floating-point additions (float64 accumulators).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["data_parallel_group", "process_rank", "run_data_parallel", "shard_blocks"]


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in the default process group, or ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_blocks(blocks: torch.Tensor, rank: Optional[int] = None, world_size: Optional[int] = None) -> torch.Tensor:
    """This process's share of ``(n, seq_len)`` token blocks: every ``world_size``-th block from ``rank`` (the
    shards differ by at most one block; together they are every block exactly once).

    ``rank``/``world_size`` default to the process group's. Raises ``ValueError`` when there are fewer blocks
    than processes (a process without data could not take part in the reduction meaningfully).
    """
    default_rank, default_world = process_rank()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if blocks.dim() != 2:
        raise ValueError(f"shard_blocks expects (n, seq_len) token blocks, got shape {tuple(blocks.shape)}")
    if blocks.shape[0] < world_size:
        raise ValueError(
            f"{blocks.shape[0]} calibration block(s) cannot be shared by {world_size} processes: "
            "use more tokens (--max-tokens) or fewer processes"
        )
    return blocks[rank::world_size]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def data_parallel_group(device: Optional[str] = None) -> Iterator[tuple[int, int]]:
    """Within the block: the process group a launcher described in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT``, as ``accelerate launch`` and ``torchrun`` set them) is up, and destroyed on
    exit if this block started it. Yields ``(rank, world_size)``; without a launcher, ``(0, 1)`` and nothing
    is started.

    The backend is NCCL when ``device`` is a GPU (each process then uses ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield process_rank()
        return
    on_gpu = device is not None and str(device).startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    try:
        yield process_rank()
    finally:
        torch.distributed.destroy_process_group()


def _worker(
    local_rank: int,
    function: Callable[..., Any],
    args: tuple,
    world_size: int,
    port: int,
    device: Optional[str],
    result_file: str,
) -> None:
    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    import sys

    with data_parallel_group(device):
        result = function(*args)
    if local_rank == 0:
        torch.save(result, result_file)
    # Leave without interpreter finalization: gloo's worker threads can abort a process that finalizes after
    # its group was destroyed, which would report a finished, successful run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_data_parallel(
    function: Callable[..., Any], num_processes: int, args: tuple = (), *, device: Optional[str] = None
) -> Any:
    """Run ``function(*args)`` in ``num_processes`` fresh processes joined in one process group; return rank 0's
    result.

    Each process finds its rank with :func:`process_rank` (e.g. to take its :func:`shard_blocks`); the group is
    gloo on CPUs, NCCL on GPUs (process ``i`` on ``cuda:i``). ``function`` and ``args`` must be picklable (a
    module-level function). Rank 0's result comes back through a file read with ``torch.load(weights_only=True)``,
    so it must be made of tensors, numbers, strings, lists and dicts. A process that fails makes the whole run
    fail with its error.
    """
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
    if device is not None and str(device).startswith("cuda") and torch.cuda.device_count() < num_processes:
        raise ValueError(
            f"{num_processes} processes need {num_processes} GPUs (one each), {torch.cuda.device_count()} visible"
        )
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="nsn-data-parallel-") as tmp:
        result_file = str(Path(tmp) / "rank0.pt")
        mp.start_processes(
            _worker,
            args=(function, args, num_processes, _free_port(), device, result_file),
            nprocs=num_processes,
            join=True,
            start_method="spawn",
        )
        return torch.load(result_file, weights_only=True)
