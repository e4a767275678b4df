"""Speed of one NSN layer at selectable ranks against the dense layer, measured side by side.

For each shape, token count and FLOPs fraction the rank is the largest multiple of the granularity
within the budget; the time ratio (NSN / dense, medians of interleaved CUDA-graph replays) is compared
with that rank's FLOPs fraction, which for a factored layer equals its weight-bytes fraction
``r(m+d)/(md)``. Targets: ratio <= 1.15x the fraction at >= 512 tokens, <= 1.25x at 1 and 16 tokens.

    python benchmarks/bench_layer_speed.py --out results/layer_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import nsn_peft
from nsn_peft.linalg.flops import factored_params, rank_for_flops_fraction
from nsn_peft.tuner.layer import NSNLinear

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features, out_features)


def graph_time(fn, replays: int, inner: int) -> list[float]:
    """Per-call milliseconds of ``fn`` captured ``inner`` times in a CUDA graph, ``replays`` samples."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return samples


def _first(layout: str, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x·aᵀ`` as ``F.linear`` (``"linear"``) or as the transposed product ``(a·xᵀ)ᵀ`` (``"swap"``)."""
    return torch.nn.functional.linear(x, a) if layout == "linear" else torch.mm(a, x.T).T


def _second(layout: str, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(h, b) if layout == "linear" else torch.mm(b, h.T).T


LAYOUTS = [(f, s) for f in ("linear", "swap") for s in ("linear", "swap")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,16,512,4096")
    parser.add_argument("--fractions", default="0.125,0.25,0.5,0.75")
    parser.add_argument("--granularity", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--layouts",
        action="store_true",
        help="also time each cuBLAS operand layout of the two products (ablation, ~4x longer)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    dtype, device = torch.bfloat16, "cuda"
    rows = []
    for d, m in SHAPES:
        base = torch.nn.Linear(d, m, bias=False, device=device, dtype=dtype)
        layer = NSNLinear(base, "default", max_rank=min(m, d), module_name=f"{d}->{m}")
        # Random factors: speed does not depend on values, and skipping the SVD keeps the benchmark short.
        torch.nn.init.normal_(layer.nsn_A["default"], std=0.02)
        torch.nn.init.normal_(layer.nsn_B["default"], std=0.02)
        for tokens in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(tokens, d, device=device, dtype=dtype)
            inner = 200 if tokens <= 16 else (50 if tokens <= 512 else 20)
            dense_fn = lambda x=x, base=base: torch.nn.functional.linear(x, base.weight)  # noqa: E731
            for fraction in [float(f) for f in args.fractions.split(",")]:
                rank = rank_for_flops_fraction(m, d, fraction, min(m, d), args.granularity)
                layer.set_rank(rank)
                actual = factored_params(m, d, rank) / (m * d)
                a, b = layer.nsn_A["default"][:rank], layer.nsn_B["default"][:, :rank]
                variants = (
                    {f"{f}/{s}": (lambda f=f, s=s, x=x, a=a, b=b: _second(s, _first(f, x, a), b)) for f, s in LAYOUTS}
                    if args.layouts
                    else {}
                )
                with torch.no_grad():
                    dense_samples, nsn_samples = [], []
                    variant_samples = {name: [] for name in variants}
                    for _ in range(args.rounds):  # interleave so clocks/thermals hit both alike
                        dense_samples += graph_time(dense_fn, 5, inner)
                        nsn_samples += graph_time(lambda x=x, layer=layer: layer(x), 5, inner)
                        for name, fn in variants.items():
                            variant_samples[name] += graph_time(fn, 5, inner)
                dense_ms, nsn_ms = statistics.median(dense_samples), statistics.median(nsn_samples)
                ratio = nsn_ms / dense_ms
                limit = 1.15 if tokens >= 512 else 1.25
                rows.append(
                    {
                        "in": d,
                        "out": m,
                        "tokens": tokens,
                        "target_fraction": fraction,
                        "rank": rank,
                        "flops_fraction": actual,
                        "dense_ms": dense_ms,
                        "nsn_ms": nsn_ms,
                        "time_ratio": ratio,
                        "ratio_over_fraction": ratio / actual,
                        "limit": limit,
                        "ok": ratio <= limit * actual,
                        "layouts": {name: statistics.median(v) / dense_ms for name, v in variant_samples.items()},
                    }
                )
                print(
                    f"{d:>5}->{m:<5} tok={tokens:<5} f={fraction:<5} r={rank:<5} flops={actual:.3f} "
                    f"dense={dense_ms:.4f}ms nsn={nsn_ms:.4f}ms ratio={ratio:.3f} "
                    f"({ratio / actual:.2f}x of fraction, limit {limit}) {'ok' if rows[-1]['ok'] else 'MISS'}"
                    + "".join(f" {k}={v:.3f}" for k, v in rows[-1]["layouts"].items()),
                    flush=True,
                )
    result = {
        "device": torch.cuda.get_device_name(),
        "dtype": "bf16",
        "torch": torch.__version__,
        "rows": rows,
        "all_ok": all(r["ok"] for r in rows),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        nsn_peft.io.write_json(args.out, result)


if __name__ == "__main__":
    main()
