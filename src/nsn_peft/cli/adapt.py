"""``nsn-peft adapt``: turn a dense model into an NSN adapter folder (``save_pretrained`` format)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..hub import base_model_reference
from ..tuner.build import adapter_summary
from .inputs import adapt_model, check_output_dir, load_base, nsn_config_from_args
from .options import (
    FULL,
    UsageError,
    add_adapter_creation_options,
    add_common_options,
    add_model_options,
    add_overwrite_option,
    new_command,
    rank_value,
)
from .output import CommandResult, clip_rows, format_table

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    parser = new_command(
        subparsers,
        "adapt",
        summary="Factor a model's linear layers into an NSN adapter folder.",
        description=(
            "Replace the targeted linear layers of a model by nested factorisations W = B A (SVD, whitened or "
            "utilized-rank init) and save the adapter with save_pretrained. The folder loads with "
            "PeftModel.from_pretrained(base, folder) and runs at any rank up to --max-rank."
        ),
        examples=[
            "--model HuggingFaceTB/SmolLM2-135M --max-rank 256 --output ./nsn-adapter",
            "--model ./model.gguf --init whitened --stats ./stats --output ./nsn-whitened",
            "--rank-plan plan.json --stats ./stats --output ./nsn-planned  # init from the plan",
        ],
    )
    add_model_options(parser)
    add_adapter_creation_options(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--output", "-o", default=None, metavar="DIR", help="Adapter folder to write (required).")
    group.add_argument(
        "--active-rank",
        type=rank_value,
        default=None,
        metavar="R",
        help="Rank the saved adapter runs at when loaded (int or 'full'; default: full).",
    )
    group.add_argument(
        "--base-model-id",
        default=None,
        metavar="ID",
        help="Base-model reference recorded in adapter_config.json (default: --model; set a Hub id before uploading).",
    )
    group.add_argument(
        "--save-tokenizer", action=argparse.BooleanOptionalAction, default=False, help="Also save the tokenizer."
    )
    add_overwrite_option(group)
    add_common_options(parser)
    parser.set_defaults(func=run)
    return {"adapt": parser}


def run(args: argparse.Namespace) -> CommandResult:
    from ..io import atomic_directory
    from ..tuner.ranks import get_max_rank, set_rank

    output = check_output_dir(args.output, args.overwrite)
    config = nsn_config_from_args(args)
    base, tokenizer = load_base(args, tokenizer=args.save_tokenizer)  # adapting needs no tokenizer
    ref = args.base_model_id or base_model_reference(args.model, args.gguf_file)
    model = adapt_model(base, config, ref)
    if args.active_rank is not None:
        top = max(get_max_rank(model).values())
        if args.active_rank != FULL and args.active_rank > top:
            raise UsageError(f"--active-rank {args.active_rank} exceeds the largest max rank ({top})")
        set_rank(model, top if args.active_rank == FULL else int(args.active_rank))
    with atomic_directory(output) as tmp:
        model.save_pretrained(str(tmp))
        if args.save_tokenizer:
            tokenizer.save_pretrained(str(tmp))
    summary = adapter_summary(model)
    data = {"output": str(output), "base_model": ref, "init": config.init, "max_rank": config.max_rank, **summary}
    rows, more = clip_rows([(rank, count) for rank, count in summary["max_rank_counts"].items()])
    text = "\n".join(
        [
            f"Saved NSN adapter to {output}",
            f"  base model: {ref}",
            f"  init: {config.init}; layers factored: {summary['layers']}; "
            f"factor params: {summary['factor_params']:,} (dense: {summary['targeted_dense_params']:,})",
            f"  FLOPs at the saved rank: {summary['targeted_flops_fraction']:.3f} of dense (targeted layers), "
            f"{summary['model_flops_fraction']:.3f} (all matmuls)",
            "",
            format_table(rows, ["max rank", "layers"], align="rr"),
        ]
        + ([more] if more else [])
    )
    return CommandResult(data, text)
