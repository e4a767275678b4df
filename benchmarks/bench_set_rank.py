"""Rank switching cost on an 8B-shaped model: ``set_rank`` per call, every way of saying a rank.

Builds a Llama with Llama-3-8B's layout (32 blocks × 7 linear layers = 224 NSN layers) but tiny factors
(hidden 64; what a switch costs does not depend on the layer sizes: it writes ranks, it copies no tensor), with
three nested FLOPs-budget plans, and times in one process: ``set_rank(int)``, ``set_rank(fraction=)``,
``set_rank(flops=)``, ``set_rank({layer: rank})`` alternating between two points (each call changes every
layer), the same rank again, an ``at_rank`` enter + exit, ranks the layers never ran at, and ``set_rank`` on a
merged model (which also rebuilds the merged weights, so it scales with the layer sizes: tiny here).

``--compare SRC`` runs the same measurements with the package from another checkout (e.g. ``../nsn-peft-old/src``)
in a child process, alternating rounds, and reports the ratios. Writes JSON::

    python benchmarks/bench_set_rank.py --compare ../main/src --out benchmarks/results/set_rank_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("int", "fraction", "flops", "mapping", "same rank", "at_rank enter+exit", "new rank", "merged int")


def measure(calls: int) -> dict[str, float]:
    """Milliseconds per call of each case (the median of 5 repetitions of ``calls`` calls)."""
    import torch
    import transformers
    from peft import get_peft_model

    import nsn_peft

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=224,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=128,
    )
    base = transformers.LlamaForCausalLM(config).eval()
    model = get_peft_model(base, nsn_peft.NSNConfig(rank_granularity=8))
    names = list(nsn_peft.get_rank(model))
    assert len(names) == 224, len(names)
    maxima = nsn_peft.get_max_rank(model)
    plans = {b: {n: max(1, int(m * b)) for n, m in maxima.items()} for b in (0.25, 0.5, 1.0)}
    model.peft_config["default"].budget_plans = {str(b): p for b, p in plans.items()}
    low = {n: min(maxima[n], 8 + 8 * (i % 3)) for i, n in enumerate(names)}  # per-layer ranks must fit (k/v: 16)
    high = {n: m for n, m in maxima.items()}

    cases = {
        "int": lambda i: model.set_rank(16 if i % 2 else 8),
        "fraction": lambda i: model.set_rank(fraction=0.5 if i % 2 else 0.25),
        "flops": lambda i: model.set_rank(flops=0.5 if i % 2 else 0.25),
        "mapping": lambda i: model.set_rank(low if i % 2 else high),
        "same rank": lambda i: model.set_rank(8),
        "merged int": lambda i: model.set_rank(16 if i % 2 else 8),
    }
    results = {}
    for name in CASES:
        model.set_rank(8)
        if name == "merged int":
            model.merge_adapter()
        if name == "new rank":
            times = []
            for _ in range(5):
                fresh_model = get_peft_model(
                    transformers.LlamaForCausalLM(config).eval(), nsn_peft.NSNConfig(rank_granularity=8)
                )
                ranks = list(range(60, 0, -1))  # each new to the layers (k/v, max rank 16, clamp the larger ones)
                start = time.perf_counter()
                for r in ranks:
                    fresh_model.set_rank(r)
                times.append((time.perf_counter() - start) / len(ranks) * 1e3)
            results[name] = statistics.median(times)
            continue
        if name == "at_rank enter+exit":

            def call(i: int) -> None:
                with model.at_rank(16 if i % 2 else 24):
                    pass
        else:
            call = cases[name]
        call(0)
        call(1)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for i in range(calls):
                call(i)
            times.append((time.perf_counter() - start) / calls * 1e3)
        results[name] = statistics.median(times)
        if name == "merged int":
            model.unmerge_adapter()
    return results


def _child(src: str, calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--calls", str(calls)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds with --compare.")
    parser.add_argument("--compare", default=None, help="src/ folder of another checkout to measure beside this one.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/set_rank_cpu.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.calls)))
        return
    here = str(Path(__file__).resolve().parents[1] / "src")
    runs: dict[str, list[dict[str, float]]] = {"this": [], "compare": []}
    for _ in range(args.rounds if args.compare else 1):
        runs["this"].append(_child(here, args.calls))
        if args.compare:
            runs["compare"].append(_child(args.compare, args.calls))
    rows = []
    for case in CASES:
        this = statistics.median(r[case] for r in runs["this"])
        row = {"case": case, "ms_per_call": this}
        if runs["compare"]:
            other = statistics.median(r[case] for r in runs["compare"])
            row.update({"compare_ms_per_call": other, "speedup": other / this})
        rows.append(row)
    print(f"{'case':<22}{'ms/call':>10}" + (f"{'before':>10}{'speed-up':>10}" if args.compare else ""))
    for row in rows:
        line = f"{row['case']:<22}{row['ms_per_call']:>10.3f}"
        if "speedup" in row:
            line += f"{row['compare_ms_per_call']:>10.3f}{row['speedup']:>9.2f}x"
        print(line)
    from nsn_peft.io import write_json

    write_json(
        args.out,
        {
            "model": "Llama-3-8B layout (32 blocks x 7 linears = 224 NSN layers), hidden 64, rank granularity 8",
            "device": "cpu",
            "calls_per_repetition": args.calls,
            "rounds": len(runs["this"]),
            "compare_src": args.compare,
            "rows": rows,
            "raw": runs,
            "command": "python benchmarks/bench_set_rank.py" + (f" --compare {args.compare}" if args.compare else ""),
        },
    )


if __name__ == "__main__":
    main()
