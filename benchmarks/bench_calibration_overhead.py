"""Calibration overhead: ``collect_activation_stats`` against a plain forward pass over the same tokens.

Calibration runs the model with forward pre-hooks on every linear layer (all but the head): one float32
Gram product per *distinct* layer input per batch (q/k/v and gate/up share theirs), added into float64
sums. This script times, on the same token batches:

* ``forward``: ``model(input_ids)`` — the plain forward (full logits);
* ``trunk``: ``model(input_ids, logits_to_keep=1)`` — the forward without the vocabulary projection,
  which calibration also skips (the head is not calibrated);
* ``calibration``: ``collect_activation_stats(...)`` with statistics kept on the device (the one-off
  device-to-host copy of the matrices is reported separately);
* ``calibration_tensor_core``: the same with 16-bit activations multiplied on tensor cores with a float32
  result (``torch.mm(..., out_dtype=torch.float32)``) instead of upcast to a float32 GEMM, and the largest
  relative difference between the two sets of statistics: the alternative that :func:`batch_gram` rejects.

The target is calibration ≤ 1.2× the plain forward. Run on an H100::

    python benchmarks/bench_calibration_overhead.py --device cuda --out benchmarks/results/calibration_overhead.json

A quick CPU check: ``--device cpu --tokens 2048 --seq-len 256 --repeats 1 --dtypes fp32``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import nsn_peft.calibrate.collect as calibration
from nsn_peft import collect_activation_stats
from nsn_peft.data import load_texts, python_docs_dir, token_blocks
from nsn_peft.hub import load_model_and_tokenizer, resolve_dtype
from nsn_peft.io import write_json


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibration_blocks(tokenizer, tokens: int, seq_len: int, source: str) -> torch.Tensor:
    """``tokens // seq_len`` blocks of real text (tiled if the text is short) or random ids."""
    n = max(1, tokens // seq_len)
    if source == "random":
        return torch.randint(0, tokenizer.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))
    folder = python_docs_dir("tutorial") if source == "tutorial" else Path(source)
    blocks = token_blocks(load_texts(folder), tokenizer, seq_len)
    reps = -(-n // blocks.shape[0])
    return blocks.repeat(reps, 1)[:n]


def timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model, blocks: torch.Tensor, device: torch.device, batch_size: int, repeats: int) -> dict[str, float]:
    batches = [blocks[i : i + batch_size].to(device) for i in range(0, blocks.shape[0], batch_size)]

    def forward() -> None:
        for batch in batches:
            model(input_ids=batch, use_cache=False)

    def trunk() -> None:
        for batch in batches:
            model(input_ids=batch, use_cache=False, logits_to_keep=1)

    def calibrate() -> None:
        collect_activation_stats(
            model, blocks, max_tokens=None, batch_size=batch_size, device=device, stats_device=None, show_progress=False
        )

    # Warm-up (kernel selection, allocator) on one batch each.
    model(input_ids=batches[0], use_cache=False)
    collect_activation_stats(
        model,
        blocks[:batch_size],
        max_tokens=None,
        batch_size=batch_size,
        device=device,
        stats_device=None,
        show_progress=False,
    )
    result = {
        "forward_s": timed(forward, device, repeats),
        "trunk_s": timed(trunk, device, repeats),
        "calibration_s": timed(calibrate, device, repeats),
    }
    if device.type == "cuda" and next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
        reference = collect_activation_stats(
            model, blocks, max_tokens=None, batch_size=batch_size, device=device, stats_device=None, show_progress=False
        )
        original = calibration.batch_gram
        calibration.batch_gram = lambda x: torch.mm(x.T, x, out_dtype=torch.float32)
        try:
            result["calibration_tensor_core_s"] = timed(calibrate, device, repeats)
            other = collect_activation_stats(
                model,
                blocks,
                max_tokens=None,
                batch_size=batch_size,
                device=device,
                stats_device=None,
                show_progress=False,
            )
        finally:
            calibration.batch_gram = original
        result["tensor_core_max_relative_difference"] = max(
            ((other.grams[n] - g).abs().max() / g.abs().max()).item() for n, g in reference.grams.items()
        )
    stats = collect_activation_stats(
        model,
        blocks[:batch_size],
        max_tokens=None,
        batch_size=batch_size,
        device=device,
        stats_device=None,
        show_progress=False,
    )
    sync(device)
    start = time.perf_counter()
    stats.to("cpu")
    result["copy_to_cpu_s"] = time.perf_counter() - start
    result["gram_megabytes"] = sum(g.numel() * g.element_size() for g in stats.grams.values()) / 2**20
    result["overhead_vs_forward"] = result["calibration_s"] / result["forward_s"]
    result["overhead_vs_trunk"] = result["calibration_s"] / result["trunk_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="Hub id / folder / .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated model dtypes to time")
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens per timed run")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--data", default="tutorial", help="'tutorial' (Python docs), 'random', or a text folder")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    base, tok = load_model_and_tokenizer(args.model)
    blocks = calibration_blocks(tok, args.tokens, args.seq_len, args.data)
    rows = []
    for name in args.dtypes.split(","):
        dtype = resolve_dtype(name)
        model = base.to(device=device, dtype=dtype).eval()
        row = {
            "dtype": name,
            "tokens": int(blocks.numel()),
            **measure(model, blocks, device, args.batch_size, args.repeats),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| dtype | tokens | forward (s) | trunk (s) | calibration (s) | vs forward | vs trunk | Gram MB | copy to CPU (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['tokens']:,} | {r['forward_s']:.3f} | {r['trunk_s']:.3f} | {r['calibration_s']:.3f} | "
            f"{r['overhead_vs_forward']:.2f}x | {r['overhead_vs_trunk']:.2f}x | {r['gram_megabytes']:.0f} | {r['copy_to_cpu_s']:.3f} |"
        )
    for r in rows:
        if "calibration_tensor_core_s" in r:
            print(
                f"{r['dtype']}: with tensor-core Gram products {r['calibration_tensor_core_s']:.3f} s "
                f"({r['calibration_tensor_core_s'] / r['forward_s']:.2f}x forward), statistics differ by up to "
                f"{r['tensor_core_max_relative_difference']:.1e} (relative)"
            )
    worst = max(r["overhead_vs_forward"] for r in rows)
    print(
        f"\ncalibration overhead: worst {worst:.2f}x a plain forward (target <= 1.2x): {'met' if worst <= 1.2 else 'NOT met'}"
    )
    if args.out is not None:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        write_json(
            args.out,
            {
                "device": device_name,
                "model": args.model or "embedded SmolLM2-135M-Instruct",
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
