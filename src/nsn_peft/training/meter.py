"""Per-rank losses of a multi-rank run, averaged over the optimizer steps since the last log and over processes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["RankLossMeter"]


class RankLossMeter:
    """Sums of each rank's task (and distillation) loss and how many steps trained it, since the last log.

    ``count_step`` is called once per optimizer step with its ranks, ``add`` once per micro-batch and rank (with
    the loss already divided as the step divides it), ``collect`` at log time: a collective call under a process
    group, like ``Trainer.log``. Sums stay on the device so a step does not synchronise with the host.
    """

    def __init__(self, grid: Sequence[int], device: torch.device | str) -> None:
        self.grid = list(grid)
        self._index = {r: i for i, r in enumerate(self.grid)}
        self.task = torch.zeros(len(self.grid), dtype=torch.float64, device=device)
        self.distill = torch.zeros_like(self.task)
        self.counts = [0] * len(self.grid)

    def count_step(self, ranks: Sequence[int]) -> None:
        for r in ranks:
            self.counts[self._index[r]] += 1

    def add(self, rank: int, task: torch.Tensor, distill: Optional[torch.Tensor] = None) -> None:
        index = self._index[rank]
        self.task[index] += task.detach().to(self.task)
        if distill is not None:
            self.distill[index] += distill.detach().to(self.distill)

    def collect(self) -> dict[int, tuple[float, float]]:
        """``{rank: (mean task loss, mean distillation loss)}`` of the ranks trained since the last call; resets.

        Raises ``RuntimeError`` when processes trained different ranks (their per-rank step counts differ).
        """
        counts = torch.tensor(self.counts, dtype=torch.float64, device=self.task.device)
        packed = torch.cat([self.task, self.distill, counts])
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            packed = packed.clone()
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        n = len(self.grid)
        sums, distill, all_counts = packed[:n].tolist(), packed[n : 2 * n].tolist(), packed[2 * n :].tolist()
        if any(abs(c - world * local) > 0.5 for c, local in zip(all_counts, self.counts)):
            raise RuntimeError(
                "Processes trained different ranks (per-rank step counts differ across processes): the rank "
                "sampler must be deterministic in (seed, step) and use the same seed in every process."
            )
        means = {
            rank: (sums[i] / (world * self.counts[i]), distill[i] / (world * self.counts[i]))
            for i, rank in enumerate(self.grid)
            if self.counts[i]
        }
        self.task.zero_()
        self.distill.zero_()
        self.counts = [0] * n
        return means
