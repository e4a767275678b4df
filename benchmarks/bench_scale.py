"""Sequential compression of models larger than the device: peak memory and time per block, flat in depth.

Builds Llama-shaped models on the ``meta`` device (no memory) whose weights are random and made on the device
one block at a time (``materialize``), and compresses them with :func:`nsn_peft.sequential.compress_sequential`:
60% of the linear parameters kept, activation and output-gradient statistics, mixed (loss-weighted) ranks,
whitened factors and one epoch of block-wise refinement over a few thousand random calibration tokens. Each
variant (``shape:blocks``) reports the peak device memory, the process's peak RSS and the seconds per block
and pass; the same width at several depths shows the memory flat in depth, and a Llama-3-70B-shaped block
gives the per-block figures from which the whole 70B run is extrapolated (80 blocks).

The statistics are accumulated and kept in float32 (``--stats-dtype fp64`` for exact sums). Each variant runs in
its own process (its peak memory is its own) and the JSON is rewritten after every variant; variants that would
end after ``--time-limit`` seconds are skipped (and recorded so), a running one is stopped there.

GPU (one H100; the 70B block comes second so that it is measured whatever the time left for the deep 8B runs)::

    PYTHONPATH=src python benchmarks/bench_scale.py --device cuda --variants 8b:4,70b:1,8b:16,8b:32 \\
        --time-limit 285 --out benchmarks/results/scale_gpu.json

CPU, flat memory in depth (statistics, factors and hidden states on disk; one thread, on a shared CPU)::

    PYTHONPATH=src nice -n 10 python benchmarks/bench_scale.py --device cpu --variants small:4,small:16,small:64 \\
        --tokens 2048 --seq-len 128 --threads 1 --mmap-threshold 65536 --offload-folder /tmp/nsn-scale \\
        --time-limit 7200 --out benchmarks/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
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
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
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
    tokens = torch.randint(
        0, vocab, (args.tokens // args.seq_len, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    config = RefineConfig(
        batch_size=args.batch_size,
        blockwise_epochs=args.blockwise_epochs,
        blockwise_tokens=None,
        gradient_tokens=args.gradient_tokens,
        precision=args.precision,
    )
    folder = None
    if args.offload_folder:
        folder = Path(args.offload_folder) / f"{shape}-{blocks}"
        shutil.rmtree(folder, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    peft_model, report = compress_sequential(
        model,
        tokens,
        args.fraction,
        allocation=args.allocation,
        config=config,
        device=device,
        materialize=materialize,
        offload_folder=folder,
        output_dir=folder / "adapter" if folder is not None else None,
        stats_dtype={"fp32": torch.float32, "fp64": torch.float64}[args.stats_dtype],
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    # The pipeline measures each block's peak (it resets the counter per block): a pass's peak is the maximum
    # over its blocks, the run's the maximum over the passes.
    by_pass = {phase: max(peaks) for phase, peaks in report.peak_device_bytes.items() if peaks}
    per_block = {k: round(sum(v) / len(v), 3) for k, v in report.block_seconds.items() if v}
    row = {
        "shape": shape,
        "blocks": blocks,
        "seconds": round(seconds, 2),
        **sizes,
        "peak_device_bytes": max(by_pass.values()) if by_pass else None,
        "peak_device_bytes_by_pass": by_pass,
        "estimated_bytes_by_pass": report.estimated_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds_per_block": per_block,
        # statistics + gradients (spectra included) + refine (initialisation included): one block's whole work
        "seconds_per_block_total": round(sum(per_block.get(k, 0.0) for k in ("statistics", "gradients", "refine")), 3),
        "report": report.to_dict(),
    }
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    del peft_model
    return row


def run_isolated(args: argparse.Namespace, shape: str, blocks: int, timeout: float | None) -> dict:
    """The variant in a fresh process, so that its peak memory (device and RSS) is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        argv = [sys.executable, __file__, "--single", f"{shape}:{blocks}", "--result-file", str(result)]
        for key in (
            "device",
            "dtype",
            "stats_dtype",
            "tokens",
            "seq_len",
            "batch_size",
            "fraction",
            "allocation",
            "blockwise_epochs",
            "gradient_tokens",
            "precision",
            "offload_folder",
            "threads",
        ):
            value = getattr(args, key)
            if value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        env = dict(os.environ)
        if args.mmap_threshold:
            # glibc's mmap threshold grows with the largest block freed, after which large temporaries come from the
            # heap, whose holes the process keeps: a fixed threshold returns every large block to the system when freed.
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        started = time.perf_counter()
        try:
            subprocess.run(argv, check=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"stopped after {timeout:.0f} s (--time-limit)") from None
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                f"the variant's process exited with status {err.returncode} (its error is printed above)"
            ) from None
        row = json.loads(result.read_text())
        row["wall_seconds"] = round(time.perf_counter() - started, 2)  # process start and model building included
        return row


def estimate_seconds(rows: list[dict], shape: str, blocks: int) -> float | None:
    """From a finished variant: its seconds per block (the same shape, or 8× the 8B's for a 70B block: the
    decompositions dominate and grow with the cube of the width) times ``blocks``, plus its fixed cost."""
    done = [r for r in rows if "seconds" in r]
    same = [r for r in done if r["shape"] == shape]
    source = same[-1] if same else (done[-1] if done and shape == "70b" else None)
    if source is None:
        return None
    per_block = source["seconds_per_block_total"] * (1 if same else 8)
    fixed = source.get("wall_seconds", source["seconds"]) - source["seconds_per_block_total"] * source["blocks"]
    return (per_block * blocks + max(fixed, 0.0)) * 1.1


def extrapolate(rows: list[dict]) -> dict | None:
    """The whole Llama-3-70B (80 blocks) from one measured 70B-shaped block.

    Memory: the peak of one block's work, which does not grow with depth (the 8B rows at several depths show
    it): the measured 70B block's per-pass peaks. Time: the measured seconds of one block's work × 80, plus the
    run's fixed cost (embeddings and head, allocation, saving) as measured.
    """
    measured = [r for r in rows if r["shape"] == "70b" and "seconds" in r]
    if not measured:
        return None
    row = measured[-1]
    full = SHAPES["70b"][5]
    per_block = row["seconds_per_block_total"]
    fixed = max(row["seconds"] - per_block * row["blocks"], 0.0)
    hidden, intermediate = SHAPES["70b"][0], SHAPES["70b"][1]
    stats_per_block = 4 * (3 * hidden**2 + intermediate**2)  # float32 input Grams kept between passes (on disk)
    return {
        "blocks": full,
        "basis": f"measured on {row['blocks']} Llama-3-70B-shaped block(s): memory = the largest per-block peak "
        f"(flat in depth), time = seconds per block x {full} + the fixed cost",
        "seconds_per_block": round(per_block, 2),
        "seconds_per_block_by_pass": row["seconds_per_block"],
        "fixed_seconds": round(fixed, 1),
        "seconds_estimated": round(per_block * full + fixed, 1),
        "peak_device_bytes": row["peak_device_bytes"],
        "peak_device_bytes_by_pass": row["peak_device_bytes_by_pass"],
        "estimated_bytes_by_pass": row["estimated_bytes_by_pass"],
        "model_bytes": row["block_bytes"] * full + row["outside_blocks_bytes"],
        "statistics_bytes_between_passes": stats_per_block * full,
    }


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


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
    parser.add_argument(
        "--stats-dtype",
        choices=("fp32", "fp64"),
        default="fp32",
        help="statistics accumulated and kept in (fp64: exact sums, twice the memory)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch (on a CPU shared with other work, 1 avoids oversubscription)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="fixed glibc mmap threshold for the variants' processes (e.g. 65536): without it the heap "
        "fragments and the peak RSS creeps up with the number of blocks processed, with or without held tensors",
    )
    parser.add_argument(
        "--isolate",
        choices=("yes", "no"),
        default="yes",
        help="one process per variant, so that its peak memory is its own",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=540.0,
        help="whole run (seconds): a variant that would end later is skipped, a running one stopped",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("highest")  # the statistics' float32 products stay exact
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        # One line per block and pass (seconds, peak device memory): readable even if the variant is stopped.
        logging.basicConfig(format=f"[{args.single}] %(message)s", stream=sys.stdout)
        logging.getLogger("nsn_peft.sequential").setLevel(logging.INFO)
        shape, blocks = args.single.split(":")
        args.result_file.write_text(json.dumps(run_variant(args, shape, int(blocks))))
        return
    out = args.out or Path(f"benchmarks/results/scale_{'gpu' if args.device.startswith('cuda') else 'cpu'}.json")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "calibration_tokens": args.tokens // args.seq_len * args.seq_len,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "fraction": args.fraction,
        "allocation": args.allocation,
        "blockwise_epochs": args.blockwise_epochs,
        "dtype": args.dtype,
        "stats_dtype": args.stats_dtype,
        "offload_folder": bool(args.offload_folder),
        "threads": torch.get_num_threads(),
        "mmap_threshold": args.mmap_threshold,
        "command": "python " + " ".join(sys.argv),
    }
    rows: list[dict] = []
    started = time.perf_counter()
    header = (
        f"{'variant':>9} {'wall s':>7} {'s/block':>8} {'peak GiB':>9} {'stats':>6} {'grads':>6} {'refine':>6} "
        f"{'RSS GiB':>8} {'model GiB':>10} {'block GiB':>10}"
    )
    print(header, flush=True)

    def save() -> None:
        write_json(out, {**meta, "rows": rows, "extrapolated_70b": extrapolate(rows)})

    for variant in args.variants.split(","):
        shape, blocks = variant.split(":")
        blocks = int(blocks)
        estimate = estimate_seconds(rows, shape, blocks)
        elapsed = time.perf_counter() - started
        if estimate is not None and elapsed + estimate > args.time_limit:
            rows.append(
                {
                    "shape": shape,
                    "blocks": blocks,
                    "skipped": f"estimated {estimate:.0f} s after {elapsed:.0f} s "
                    f"would pass --time-limit {args.time_limit:.0f} s",
                }
            )
            print(f"{variant:>9} skipped ({rows[-1]['skipped']})", flush=True)
            save()
            continue
        try:
            if args.isolate == "yes":
                row = run_isolated(args, shape, blocks, max(args.time_limit - elapsed, 1.0))
            else:
                row = run_variant(args, shape, blocks)
        except Exception as err:  # noqa: BLE001 - record it and go on with the next variant
            rows.append({"shape": shape, "blocks": blocks, "error": f"{type(err).__name__}: {err}"})
            print(f"{variant:>9} failed: {rows[-1]['error']}", flush=True)
            save()
            continue
        rows.append(row)
        by_pass = row["peak_device_bytes_by_pass"]
        print(
            f"{variant:>9} {row.get('wall_seconds', row['seconds']):7.1f} {row['seconds_per_block_total']:8.2f} "
            f"{_gib(row['peak_device_bytes']):>9} {_gib(by_pass.get('statistics')):>6} {_gib(by_pass.get('gradients')):>6} "
            f"{_gib(by_pass.get('refine')):>6} {_gib(row['peak_rss_bytes']):>8} {_gib(row['model_bytes']):>10} "
            f"{_gib(row['block_bytes']):>10}",
            flush=True,
        )
        save()
    result = {**meta, "rows": rows, "extrapolated_70b": extrapolate(rows)}
    if result["extrapolated_70b"]:
        e = result["extrapolated_70b"]
        print(
            f"Llama-3-70B, all 80 blocks ({e['model_bytes'] / 2**30:.0f} GiB of weights): about "
            f"{e['seconds_estimated'] / 60:.0f} min ({e['seconds_per_block']:.1f} s per block), peak device memory "
            f"{_gib(e['peak_device_bytes'])} GiB ("
            + ", ".join(f"{k} {_gib(v)}" for k, v in e["peak_device_bytes_by_pass"].items())
            + " GiB)",
            flush=True,
        )
    write_json(out, result)


if __name__ == "__main__":
    main()
