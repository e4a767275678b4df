"""Sequential compression of models larger than the device: peak memory and time per block, flat in depth.

Builds Llama-shaped models on the ``meta`` device (no memory) whose weights are random and made on the device
one block at a time (``materialize``), and compresses them with :func:`nsn_peft.sequential.compress_sequential`:
60% of the linear parameters kept, activation and output-gradient statistics, mixed (loss-weighted) ranks,
whitened factors and one epoch of block-wise refinement over a few thousand random calibration tokens. Each
variant (``shape:blocks``) reports the peak device memory, the process's peak RSS and the seconds per block
and pass; the same width at several depths shows the memory flat in depth, and a Llama-3-70B-shaped block
gives the per-block figures from which the whole 70B run is extrapolated (80 blocks).

GPU (one H100, about 7 minutes; results are written after every variant)::

    PYTHONPATH=src python benchmarks/bench_scale.py --variants 8b:4,8b:16,8b:32,70b:1 \\
        --out benchmarks/results/scale_gpu.json

CPU, flat memory in depth (each variant in its own process, statistics/factors/hidden states on disk)::

    python benchmarks/bench_scale.py --device cpu --variants small:4,small:16,small:64 \\
        --offload-folder /tmp/nsn-scale --out benchmarks/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import transformers

from nsn_peft.io import write_json
from nsn_peft.refine import RefineConfig
from nsn_peft.sequential import compress_sequential

# hidden, intermediate, attention heads, key/value heads, vocabulary, blocks of the real model
SHAPES = {
    "8b": (4096, 14336, 32, 8, 128256, 32),  # Llama-3-8B
    "70b": (8192, 28672, 64, 8, 128256, 80),  # Llama-3-70B
    "small": (256, 896, 4, 2, 4096, 64),  # a CPU-sized model of the same layout
    "tiny": (64, 176, 4, 2, 512, 2),  # for the test-suite
}


def build_model(shape: str, blocks: int, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The model on ``meta`` (buffers such as the rotary frequencies are real): nothing allocated."""
    from accelerate import init_empty_weights

    hidden, intermediate, heads, kv_heads, vocab, _ = SHAPES[shape]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                      max_position_embeddings=8192, tie_word_embeddings=False)
    with init_empty_weights(include_buffers=False):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def materialize(name: str, meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Random weights, the same for a name at every visit: norms 1, biases 0, matrices N(0, 0.02²)."""
    if "norm" in name:
        return torch.ones(meta.shape, dtype=meta.dtype, device=device)
    if name.endswith("bias"):
        return torch.zeros(meta.shape, dtype=meta.dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    return torch.randn(meta.shape, generator=generator, dtype=meta.dtype, device=device).mul_(0.02)


def count(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> dict[str, int]:
    element = next(model.parameters()).element_size()
    block = sum(p.numel() for p in blocks[0].parameters()) * element
    total = sum(p.numel() for p in model.parameters()) * element
    return {"model_bytes": total, "block_bytes": block, "outside_blocks_bytes": total - block * len(blocks)}


def run_variant(args: argparse.Namespace, shape: str, blocks: int) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = build_model(shape, blocks, dtype)
    sizes = count(model, model.model.layers)
    vocab = SHAPES[shape][4]
    tokens = torch.randint(0, vocab, (args.tokens // args.seq_len, args.seq_len), generator=torch.Generator().manual_seed(0))
    config = RefineConfig(batch_size=args.batch_size, blockwise_epochs=args.blockwise_epochs, blockwise_tokens=None,
                          gradient_tokens=args.gradient_tokens, precision=args.precision)
    folder = None
    if args.offload_folder:
        folder = Path(args.offload_folder) / f"{shape}-{blocks}"
        shutil.rmtree(folder, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    peft_model, report = compress_sequential(
        model, tokens, args.fraction, allocation=args.allocation, config=config, device=device, materialize=materialize,
        offload_folder=folder, output_dir=folder / "adapter" if folder is not None else None, stats_dtype=torch.float32,
        show_progress=False)
    seconds = time.perf_counter() - start
    # The pipeline measures each block's peak (it resets the counter per block): the run's peak is their maximum.
    peaks = [b for phase in report.peak_device_bytes.values() for b in phase]
    row = {
        "shape": shape, "blocks": blocks, "seconds": round(seconds, 2), **sizes,
        "peak_device_bytes": max(peaks) if peaks else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds_per_block": {k: round(sum(v) / len(v), 3) for k, v in report.block_seconds.items() if v},
        "report": report.to_dict(),
    }
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    del peft_model
    return row


def run_isolated(args: argparse.Namespace, shape: str, blocks: int) -> dict:
    """The variant in a fresh process, so its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        argv = [sys.executable, __file__, "--single", f"{shape}:{blocks}", "--result-file", str(result)]
        for key in ("device", "dtype", "tokens", "seq_len", "batch_size", "fraction", "allocation", "blockwise_epochs",
                    "gradient_tokens", "precision", "offload_folder"):
            value = getattr(args, key)
            if value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        subprocess.run(argv, check=True)
        return json.loads(result.read_text())


def estimate_seconds(rows: list[dict], shape: str, blocks: int) -> float | None:
    """From a finished variant: its time per block (same shape, or 8× the 8B's for the 70B) times ``blocks``."""
    same = [r for r in rows if r["shape"] == shape and "seconds" in r]
    if same:
        return same[-1]["seconds"] / same[-1]["blocks"] * blocks * 1.1
    done = [r for r in rows if "seconds" in r]
    if done and shape == "70b":
        return done[-1]["seconds"] / done[-1]["blocks"] * 8 * blocks * 1.1
    return None


def extrapolate(rows: list[dict]) -> dict | None:
    """The whole Llama-3-70B (80 blocks) from a measured 70B-shaped block: time per block × 80; memory as measured
    (flat in depth)."""
    measured = [r for r in rows if r["shape"] == "70b" and "seconds" in r]
    if not measured:
        return None
    row = measured[-1]
    per_block = sum(row["seconds_per_block"].get(k, 0.0) for k in ("statistics", "gradients", "refine"))
    full = SHAPES["70b"][5]
    hidden, intermediate = SHAPES["70b"][0], SHAPES["70b"][1]
    stats_per_block = 4 * (3 * hidden**2 + intermediate**2)  # float32 input Grams kept between passes
    return {"blocks": full, "seconds_per_block": round(per_block, 2), "seconds_estimated": round(per_block * full, 1),
            "peak_device_bytes": row["peak_device_bytes"],
            "model_bytes": row["block_bytes"] * full + row["outside_blocks_bytes"],
            "cpu_statistics_bytes": stats_per_block * full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="8b:4,8b:16,8b:32,70b:1", help="shape:blocks, comma-separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPUs, fp32 on CPUs")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.6)
    parser.add_argument("--allocation", choices=("mixed", "uniform"), default="mixed")
    parser.add_argument("--blockwise-epochs", type=int, default=1)
    parser.add_argument("--gradient-tokens", type=int, default=None, help="default: all calibration tokens")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--offload-folder", default=None, help="statistics, factors and hidden states on disk")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="one process per variant (its own peak RSS); auto: on CPUs")
    parser.add_argument("--time-limit", type=float, default=540.0, help="skip variants that would end later (seconds)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("highest")  # the statistics' float32 products stay exact
    if args.single:
        shape, blocks = args.single.split(":")
        args.result_file.write_text(json.dumps(run_variant(args, shape, int(blocks))))
        return
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.device.startswith("cuda"))
    out = args.out or Path(f"benchmarks/results/scale_{'gpu' if args.device.startswith('cuda') else 'cpu'}.json")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    meta = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "calibration_tokens": args.tokens // args.seq_len * args.seq_len, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "fraction": args.fraction, "allocation": args.allocation,
            "blockwise_epochs": args.blockwise_epochs, "dtype": args.dtype, "offload_folder": bool(args.offload_folder),
            "command": "python " + " ".join(sys.argv)}
    rows: list[dict] = []
    started = time.perf_counter()
    print(f"{'variant':>10} {'seconds':>8} {'s/block':>8} {'peak device':>12} {'peak RSS':>10} {'model':>10} {'block':>9}")
    for variant in args.variants.split(","):
        shape, blocks = variant.split(":")
        blocks = int(blocks)
        estimate = estimate_seconds(rows, shape, blocks)
        elapsed = time.perf_counter() - started
        if estimate is not None and elapsed + estimate > args.time_limit:
            rows.append({"shape": shape, "blocks": blocks, "skipped": f"estimated {estimate:.0f} s after {elapsed:.0f} s "
                         f"would pass --time-limit {args.time_limit:.0f} s"})
            print(f"{variant:>10} skipped ({rows[-1]['skipped']})", flush=True)
            continue
        try:
            row = run_isolated(args, shape, blocks) if isolate else run_variant(args, shape, blocks)
        except Exception as err:  # noqa: BLE001 - record it and go on with the next variant
            rows.append({"shape": shape, "blocks": blocks, "error": f"{type(err).__name__}: {err}"})
            print(f"{variant:>10} failed: {rows[-1]['error']}", flush=True)
            write_json(out, {**meta, "rows": rows, "extrapolated_70b": extrapolate(rows)})
            continue
        rows.append(row)
        gib = 2**30
        peak = f"{row['peak_device_bytes'] / gib:.2f} GiB" if row["peak_device_bytes"] is not None else "-"
        print(f"{variant:>10} {row['seconds']:8.1f} {row['seconds'] / blocks:8.2f} {peak:>12} "
              f"{row['peak_rss_bytes'] / gib:7.2f} GiB {row['model_bytes'] / gib:6.2f} GiB {row['block_bytes'] / gib:5.2f} GiB",
              flush=True)
        write_json(out, {**meta, "rows": rows, "extrapolated_70b": extrapolate(rows)})
    result = {**meta, "rows": rows, "extrapolated_70b": extrapolate(rows)}
    if result["extrapolated_70b"]:
        e = result["extrapolated_70b"]
        print(f"Llama-3-70B (80 blocks, {e['model_bytes'] / 2**30:.0f} GiB): about {e['seconds_estimated'] / 60:.0f} min, "
              f"peak device {e['peak_device_bytes'] / 2**30:.1f} GiB")
    write_json(out, result)


if __name__ == "__main__":
    main()
