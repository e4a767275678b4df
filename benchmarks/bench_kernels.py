"""Nested factored forward at decode token counts: dense ``F.linear`` vs the two-``F.linear`` reference vs Triton.

Llama-3-8B layer shapes (m×d = out×in), ranks at 25/50/75/100% of each layer's break-even rank ``md/(m+d)``
(floored to a multiple of 64), 1/4/16/64 tokens, bf16. Two clocks:

* eager: ``triton.testing.do_bench`` median of single calls (it flushes L2 before each call; the inputs also
  rotate over enough weight copies that L2 never holds them, as in a real 8B model);
* graph: the per-call time of a CUDA graph holding many calls over rotating copies, which is what a compiled
  decode step sees (no launch overhead from Python, but each kernel's own launch latency and tail).

Ratios are against dense ``F.linear`` on the same clock; GB/s counts the weight bytes a call must read once
(``r·(d+m)`` elements, ``m·d`` for dense) plus its activations.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from nsn_peft.tuner.kernels import (
    KernelConfig,
    choose_config,
    nested_linear_reference,
    nested_linear_triton,
)

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (m, d) = (out_features, in_features)
FRACTIONS = [0.25, 0.5, 0.75, 1.0]
TOKENS = [1, 4, 16, 64]
DEVICE = "cuda"
REP_MS = [10, 40]  # do_bench warm-up and measuring milliseconds per timing (--rep-ms)

# Alternatives timed with --sweep (graph clock) against the default of each token bucket.
SWEEP = {
    1: {
        "waves1": KernelConfig(1, 16, 256, 16, 256, waves=1.0),
        "waves4": KernelConfig(1, 16, 256, 16, 256, waves=4.0),
    },
    16: {
        "waves4": KernelConfig(16, 32, 128, 16, 256, waves=4.0),
        "block_r64": KernelConfig(16, 64, 128, 16, 256),
    },
    64: {
        "r32_k128_w8": KernelConfig(64, 32, 128, 32, 128, num_warps=8, num_stages=3, stages2=3),
        "waves1": KernelConfig(64, 64, 64, 32, 64, num_stages=3, stages2=3, waves=1.0),
    },
}


def break_even_ranks(m: int, d: int) -> list[int]:
    """Ranks at each fraction of ``md/(m+d)`` (where the factored layer reads as many bytes as the dense one)."""
    be = m * d / (m + d)
    return [max(64, int(f * be) // 64 * 64) for f in FRACTIONS]


def time_eager(call, copies: int) -> float:
    """Median microseconds of one call (L2 flushed by do_bench before each), rotating over the copies."""
    state = [0]

    def step() -> None:
        call(state[0] % copies)
        state[0] += 1

    return do_bench(step, warmup=REP_MS[0], rep=REP_MS[1], return_mode="median") * 1e3


def time_graph(call, copies: int) -> float:
    """Per-call microseconds inside one CUDA graph of back-to-back calls over rotating copies."""
    calls = max(32, min(copies, 128))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on the capture stream (compiles; per-stream buffers)
        for i in range(3):
            call(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            call(i % copies)
    ms = do_bench(graph.replay, warmup=REP_MS[0], rep=REP_MS[1], return_mode="median")
    del graph
    return ms * 1e3 / calls


def host_overhead() -> dict:
    """Host microseconds per call (enqueue only, 4096x4096 at rank 512, one token): what eager decode pays."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, fn in (
        ("dense", lambda: F.linear(x, a)),
        ("reference", lambda: nested_linear_reference(x, a, b, 512)),
        ("triton", lambda: nested_linear_triton(x, a, b, 512)),
    ):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        out[name] = (time.perf_counter() - start) / 200 * 1e6
        torch.cuda.synchronize()
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (bytes read + written): the ceiling the GB/s column is read against."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def _caller(fn, xs: list, a: list, b: list, n: int, rank: int, **kw):
    """``call(i)`` running ``fn`` on the i-th copy of the operands (a factory, so loop variables bind now)."""
    return lambda i: fn(xs[i][:n], a[i], b[i], rank, **kw)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def bench_shape(m: int, d: int, token_counts: list[int], rotate: int, sweep: bool, result: dict) -> None:
    """Time every rank and token count of one layer shape; append rows (and sweep entries) to ``result``."""
    dtype, dev = torch.bfloat16, DEVICE
    max_rank = min(m, d)
    ranks = break_even_ranks(m, d)
    copies = max(2, math.ceil(rotate / (min(ranks) * (m + d) * 2)))
    dense_copies = max(2, math.ceil(rotate / (m * d * 2)))
    a = [torch.randn(max_rank, d, device=dev, dtype=dtype) / math.sqrt(d) for _ in range(copies)]
    b = [torch.randn(m, max_rank, device=dev, dtype=dtype) / math.sqrt(max_rank) for _ in range(copies)]
    w = [torch.randn(m, d, device=dev, dtype=dtype) / math.sqrt(d) for _ in range(dense_copies)]
    xs = [torch.randn(max(token_counts), d, device=dev, dtype=dtype) for _ in range(max(copies, dense_copies))]

    def dense(x: torch.Tensor, wi: torch.Tensor, *_: object) -> torch.Tensor:
        return F.linear(x, wi)

    for n in token_counts:
        act_bytes = n * (d + m) * 2
        dense_eager = time_eager(_caller(dense, xs, w, w, n, 0), dense_copies)
        dense_graph = time_graph(_caller(dense, xs, w, w, n, 0), dense_copies)
        for frac, rank in zip(FRACTIONS, ranks):
            x0 = xs[0][:n]
            ref64 = nested_linear_reference(x0.double(), a[0].double(), b[0].double(), rank)
            row = {
                "m": m,
                "d": d,
                "tokens": n,
                "rank": rank,
                "fraction_of_break_even": frac,
                "bytes_fraction": rank * (m + d) / (m * d),
                "dense_us": dense_eager,
                "dense_graph_us": dense_graph,
                "rel_err_triton": _rel_err(nested_linear_triton(x0, a[0], b[0], rank), ref64),
                "rel_err_reference": _rel_err(nested_linear_reference(x0, a[0], b[0], rank), ref64),
                "config": vars(choose_config(n, d, m, rank, dtype)),
                "copies": copies,
            }
            calls = {
                "reference": _caller(nested_linear_reference, xs, a, b, n, rank),
                "triton": _caller(nested_linear_triton, xs, a, b, n, rank),
                "triton_fused": _caller(nested_linear_triton, xs, a, b, n, rank, fused=True),
            }
            for name, call in calls.items():
                if name != "triton_fused":  # the one-launch variant: graph clock only (it is not the default)
                    row[f"{name}_us"] = time_eager(call, copies)
                row[f"{name}_graph_us"] = time_graph(call, copies)
            row["triton_graph_GBps"] = (rank * (m + d) * 2 + act_bytes) / (row["triton_graph_us"] * 1e-6) / 1e9
            row["dense_graph_GBps"] = (m * d * 2 + act_bytes) / (dense_graph * 1e-6) / 1e9
            result["rows"].append(row)
            print(
                f"{m:>5}x{d:<5} r={rank:<4} n={n:<2} | dense {dense_eager:6.1f} / {dense_graph:6.1f} us | "
                f"ref {row['reference_us'] / dense_eager:5.2f} / {row['reference_graph_us'] / dense_graph:5.2f} | "
                f"triton {row['triton_us'] / dense_eager:5.2f} / {row['triton_graph_us'] / dense_graph:5.2f} | "
                f"fused {row['triton_fused_graph_us'] / dense_graph:5.2f} | bytes {row['bytes_fraction']:.2f} | "
                f"{row['triton_graph_GBps']:5.0f} GB/s | err {row['rel_err_triton']:.1e}",
                flush=True,
            )
            if not sweep:
                continue
            for cname, cfg in SWEEP[1 if n == 1 else (16 if n <= 16 else 64)].items():
                if cfg.block_n != 1 and n > cfg.block_n:
                    continue
                cerr = _rel_err(nested_linear_triton(x0, a[0], b[0], rank, config=cfg), ref64)
                t = time_graph(_caller(nested_linear_triton, xs, a, b, n, rank, config=cfg), copies)
                result["sweep"].append(
                    {
                        "m": m,
                        "d": d,
                        "tokens": n,
                        "rank": rank,
                        "config": cname,
                        "graph_us": t,
                        "ratio": t / dense_graph,
                        "rel_err": cerr,
                    }
                )
                print(f"    sweep {cname:<24} {t:7.2f} us  {t / dense_graph:5.2f}x  err {cerr:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels_h100.json"))
    parser.add_argument("--sweep", action="store_true", help="also time the candidate tile configs (graph clock)")
    parser.add_argument("--shapes", default=None, help="subset, e.g. 4096x4096,1024x4096 (m x d)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--rep-ms", type=int, default=40, help="do_bench milliseconds per timing (warm-up: a quarter)")
    parser.add_argument("--rotate-mb", type=float, default=None, help="bytes each rotation must span (4x L2)")
    args = parser.parse_args()
    REP_MS[:] = [max(2, args.rep_ms // 4), args.rep_ms]
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    rotate = int(args.rotate_mb * 2**20) if args.rotate_mb else 4 * props.L2_cache_size
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    result = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "copy_GBps": copy_bandwidth(),
        "host_us_per_call": host_overhead(),
        "rotate_bytes": rotate,
        "rows": [],
        "sweep": [],
    }
    print(
        f"{props.name}: copy {result['copy_GBps']:.0f} GB/s, L2 {props.L2_cache_size >> 20} MiB, host us/call "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["host_us_per_call"].items()),
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for m, d in shapes:
        bench_shape(m, d, token_counts, rotate, args.sweep, result)
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(result, indent=1))
    result["wall_s"] = time.time() - started
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(result: dict) -> None:
    """Ratios vs dense (eager / CUDA graph) for the reference and the Triton path, one line per case."""
    print("\nratio vs dense F.linear (eager | CUDA graph); bytes = r(m+d)/(md), the floor of the ratio")
    print(
        f"{'m x d':>11} {'rank':>5} {'n':>3} {'bytes':>5} | {'dense us':>8} {'ref':>5} {'triton':>6} | "
        f"{'dense us':>8} {'ref':>5} {'triton':>6} {'fused':>5} {'GB/s':>5}"
    )
    for r in result["rows"]:
        print(
            f"{r['m']:>5}x{r['d']:<5} {r['rank']:>5} {r['tokens']:>3} {r['bytes_fraction']:5.2f} | "
            f"{r['dense_us']:8.1f} {r['reference_us'] / r['dense_us']:5.2f} {r['triton_us'] / r['dense_us']:6.2f} | "
            f"{r['dense_graph_us']:8.1f} {r['reference_graph_us'] / r['dense_graph_us']:5.2f} "
            f"{r['triton_graph_us'] / r['dense_graph_us']:6.2f} "
            f"{r['triton_fused_graph_us'] / r['dense_graph_us']:5.2f} {r['triton_graph_GBps']:5.0f}"
        )


if __name__ == "__main__":
    main()
