"""Run a few nested-kernel launches between cudaProfilerStart/Stop, for Nsight Compute:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section MemoryWorkloadAnalysis --section WarpStateStats python benchmarks/profile_kernels.py
"""

from __future__ import annotations

import math

import torch

from nsn_peft.tuner.kernels import choose_config, nested_linear_triton
from nsn_peft.tuner.kernels.triton_nested import KernelConfig

CASES = [  # (m, d, rank, tokens, fused)
    (4096, 14336, 3136, 1, True),
    (4096, 14336, 3136, 1, False),
    (4096, 14336, 3136, 16, True),
    (4096, 4096, 512, 1, True),
    (14336, 4096, 768, 64, True),
]


def main() -> None:
    runs = []
    for m, d, rank, n, fused in CASES:
        a = torch.randn(min(m, d), d, device="cuda", dtype=torch.bfloat16) / math.sqrt(d)
        b = torch.randn(m, min(m, d), device="cuda", dtype=torch.bfloat16) / math.sqrt(rank)
        x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        cfg: KernelConfig = choose_config(n, d, m, rank, torch.bfloat16)
        nested_linear_triton(x, a, b, rank, fused=fused)  # compile outside the profiled range
        runs.append((x, a, b, rank, fused))
        print(m, d, rank, n, "fused" if fused else "two launches", cfg, flush=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for x, a, b, rank, fused in runs:
        nested_linear_triton(x, a, b, rank, fused=fused)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
