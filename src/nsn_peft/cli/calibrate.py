"""``nsn-peft calibrate``: collect per-layer activation statistics (input Gram matrices) on calibration text."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..calibrate.stats import GRADIENT_STATS_SUBDIR
from ..devices import resolve_device
from ..hub import base_model_reference
from .inputs import check_output_dir, check_target_modules, compute_device, load_base
from .options import (
    UsageError,
    add_common_options,
    add_data_options,
    add_model_options,
    add_overwrite_option,
    module_list,
    new_command,
    positive_int,
)
from .output import CommandResult, format_table
from .runtime import progress_enabled, set_progress


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    parser = new_command(
        subparsers,
        "calibrate",
        summary="Collect activation statistics (XᵀX per linear layer) for data-aware inits and rank search.",
        description=(
            "Run the model over calibration text and accumulate the input Gram matrix XᵀX of every targeted "
            "linear layer (float64). The stats folder feeds `adapt --init whitened|projected` and `search-ranks`. "
            "With --gradients it also holds output-gradient statistics (one forward and backward pass per batch "
            "over --gradient-tokens tokens), which `search-ranks --target-fraction` uses to weigh each layer's "
            "truncation error by its effect on the loss."
        ),
        examples=[
            "--model HuggingFaceTB/SmolLM2-135M --data ./calib.txt --max-tokens 131072 --output ./stats",
            "--data ./calib.txt --max-tokens 16384 --gradients --output ./stats",
            "--data wikitext:wikitext-2-raw-v1 --split train --target-modules q_proj,k_proj,v_proj --output ./stats",
            "--data ./calib.txt --max-tokens 1048576 --num-processes 4 --output ./stats  # 4 processes, each a shard",
        ],
    )
    add_model_options(parser, task=False)
    add_data_options(parser, seq_len=512, max_tokens=131072)
    parser.add_argument(
        "--target-modules",
        type=module_list,
        default=None,
        metavar="NAMES",
        help="Layers to collect (comma-separated names, 'all-linear' or 're:<regex>'; default: all linear layers).",
    )
    parser.add_argument(
        "--exclude-modules",
        type=module_list,
        default=None,
        metavar="NAMES",
        help="Layers never collected (as in adapt: the same options select the same layers).",
    )
    parser.add_argument(
        "--gradients",
        action="store_true",
        help="Also collect output-gradient statistics into DIR/output_gradients (for search-ranks --target-fraction).",
    )
    parser.add_argument(
        "--gradient-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="Tokens for the output-gradient statistics (default: --max-tokens).",
    )
    parser.add_argument(
        "--num-processes",
        type=positive_int,
        default=1,
        metavar="N",
        help="Data-parallel calibration: N processes (gloo on CPUs, one GPU each with --device cuda) each run every "
        "N-th calibration sequence, and the statistics are summed once at the end (equal to one process's). Under "
        "`accelerate launch -m nsn_peft calibrate ...` or torchrun the launched processes do the same; leave this out.",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", default=None, metavar="DIR", help="Stats folder to write (required).")
    add_overwrite_option(out)
    add_common_options(parser)
    parser.set_defaults(func=run)
    return {"calibrate": parser}


def run(args: argparse.Namespace) -> CommandResult:
    from ..calibrate.parallel import data_parallel_group, run_data_parallel

    output = check_output_dir(args.output, args.overwrite)
    if args.num_processes > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError(
                "--num-processes starts its own processes: leave it out under accelerate launch or torchrun"
            )
        device = resolve_device(args.device)
        data = run_data_parallel(collect_shard, args.num_processes, (args, str(output)), device=device)
    else:
        with data_parallel_group(resolve_device(args.device)):
            data = collect_shard(args, str(output))
    if not data:  # a process other than the first under a launcher: the first one reports
        return CommandResult({}, printed=False)
    sizes: dict[int, int] = {}
    for d in data["in_features"].values():
        sizes[d] = sizes.get(d, 0) + 1
    text = "\n".join(
        [
            f"Saved activation statistics of {data['layers']} layers ({data['tokens']:,} tokens"
            + (f", {data['processes']} processes" if data["processes"] > 1 else "")
            + f") to {output}"
            + (
                f", output-gradient statistics ({data['gradient_tokens']:,} tokens) to {output / GRADIENT_STATS_SUBDIR}"
                if data["gradient_tokens"] is not None
                else ""
            ),
            "",
            format_table(sorted(sizes.items()), ["in_features", "layers"], align="rr"),
        ]
    )
    return CommandResult(data, text)


def collect_shard(args: argparse.Namespace, output: str) -> dict[str, Any]:
    """Collect the statistics (of this process's shard when several run) and save them (the first process).

    Returns the summary on the first process, ``{}`` on the others.
    """
    from .. import calibrate as calibration
    from ..calibrate.parallel import process_rank, shard_blocks
    from ..data import token_blocks
    from ..io import atomic_directory
    from .evaluate import load_texts

    rank, world_size = process_rank()
    if rank > 0:
        set_progress(False)  # one progress bar: the first process's
    device = compute_device(args)
    if world_size > 1 and device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    texts = load_texts(args)
    model, tokenizer = load_base(args, task="causal-lm")
    check_target_modules(model, args.target_modules)
    if args.exclude_modules is not None and not isinstance(args.exclude_modules, str):
        check_target_modules(model, list(args.exclude_modules), "--exclude-modules")

    def data(max_tokens: int) -> tuple[Any, Optional[int]]:
        """The texts as they are (one process), or this process's share of the same token blocks."""
        if world_size == 1:
            return texts, max_tokens
        return shard_blocks(token_blocks(texts, tokenizer, args.seq_len, max_tokens)), None

    calibration_data, max_tokens = data(args.max_tokens)
    stats = calibration.collect_activation_stats(
        model,
        calibration_data,
        tokenizer=tokenizer,
        max_tokens=max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        target_modules=args.target_modules,
        exclude_modules=args.exclude_modules,
        device=device,
        show_progress=progress_enabled(),
    )
    stats.model_id = base_model_reference(args.model, args.gguf_file)
    gradients = None
    if args.gradients:
        calibration_data, max_tokens = data(args.gradient_tokens or args.max_tokens)
        gradients = calibration.collect_gradient_stats(
            model,
            calibration_data,
            tokenizer=tokenizer,
            max_tokens=max_tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            target_modules=args.target_modules,
            exclude_modules=args.exclude_modules,
            device=device,
            show_progress=progress_enabled(),
        )
        gradients.model_id = stats.model_id
    if rank > 0:
        return {}
    # Both sets of statistics appear together or not at all.
    with atomic_directory(Path(output)) as tmp:
        stats.save(tmp)
        if gradients is not None:
            gradients.save(tmp / GRADIENT_STATS_SUBDIR)
    return {
        "output": output,
        "model": stats.model_id,
        "layers": len(stats.layer_names),
        "tokens": stats.num_tokens,
        "in_features": {n: int(stats.grams[n].shape[0]) for n in stats.layer_names},
        "gradient_tokens": gradients.num_tokens if gradients is not None else None,
        "processes": world_size,
    }
