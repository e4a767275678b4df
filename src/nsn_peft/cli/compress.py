"""``nsn-peft compress``: save a standalone compressed model (factored layers at fixed ranks)."""

from __future__ import annotations

import argparse
from typing import Any

from .inputs import check_output_dir, model_for_inference, read_adapter_config
from .options import (
    FULL,
    UsageError,
    add_adapter_creation_options,
    add_common_options,
    add_model_options,
    add_overwrite_option,
    new_command,
    rank_value,
    unit_fraction,
)
from .output import CommandResult


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    parser = new_command(
        subparsers,
        "compress",
        summary="Write a compressed model folder (factored layers truncated to their ranks).",
        description=(
            "Truncate the factors of an NSN model to its active ranks (or --rank / --target-flops) and save a "
            "compressed model folder that loads without the dense weights. The model is an adapter folder "
            "(--adapter) or --model adapted on the fly, typically with --rank-plan plan.json --stats DIR. The folder "
            "loads with nsn_peft.load_compressed and works as --model for `eval` and `infer`."
        ),
        examples=[
            "--adapter ./nsn-adapter --rank 128 --output ./compressed",
            "--model HuggingFaceTB/SmolLM2-135M --stats ./stats --rank-plan plan.json --output ./compressed",
        ],
    )
    add_model_options(parser, task=False)
    parser.add_argument("--adapter", default=None, metavar="DIR", help="NSN adapter folder (else --model is adapted on the fly).")
    add_adapter_creation_options(parser, title="on-the-fly adapter (without --adapter)")
    ranks = parser.add_argument_group("rank (at most one; default: the active ranks)")
    ranks.add_argument("--rank", type=rank_value, default=None, metavar="R", help="Rank of every layer (int or 'full').")
    ranks.add_argument("--target-flops", type=unit_fraction, default=None, metavar="F", help="FLOPs budget vs dense, in (0, 1].")
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", default=None, metavar="DIR", help="Compressed model folder (required).")
    out.add_argument(
        "--save-tokenizer", action=argparse.BooleanOptionalAction, default=True,
        help="Save the tokenizer into the folder too (default: on, so eval/infer --model <folder> work).",
    )
    add_overwrite_option(out)
    add_common_options(parser)
    parser.set_defaults(func=run)
    return {"compress": parser}


def run(args: argparse.Namespace) -> CommandResult:
    from ..tuner.ranks import estimate_flops, get_max_rank, get_rank, nsn_layers, select_rank_for_target_flops, set_rank

    output = check_output_dir(args.output, args.overwrite)
    if args.rank is not None and args.target_flops is not None:
        raise UsageError("pass at most one of --rank and --target-flops")
    if args.adapter:
        read_adapter_config(args.adapter)
    from .. import export as compression
    model, tokenizer, ref = model_for_inference(args)
    top = max(get_max_rank(model).values())
    if args.rank is not None:
        if args.rank != FULL and args.rank > top:
            raise UsageError(f"--rank {args.rank} exceeds the largest max rank ({top})")
        set_rank(model, top if args.rank == FULL else int(args.rank))
    elif args.target_flops is not None:
        set_rank(model, select_rank_for_target_flops(model, args.target_flops, scope="model"))
    report = estimate_flops(model)
    ranks = get_rank(model)
    layers = nsn_layers(model)
    dense_params = sum(layer.out_features * layer.in_features for layer in layers.values())
    kept_params = sum(r * (layers[n].out_features + layers[n].in_features) for n, r in ranks.items())
    compression.save_compressed(model, output, tokenizer=tokenizer if args.save_tokenizer else None)
    data = {
        "output": str(output), "base_model": ref, "layers": len(ranks), "mean_rank": sum(ranks.values()) / len(ranks),
        "factored_params": kept_params, "dense_params": dense_params, "model_flops_fraction": report.model_fraction,
        "targeted_flops_fraction": report.targeted_fraction,
    }
    text = (f"Saved compressed model to {output}: {len(ranks)} factored layers at mean rank {data['mean_rank']:.1f}, "
            f"{kept_params:,} parameters instead of {dense_params:,}; {report.model_fraction:.3f} of the dense matmul FLOPs")
    return CommandResult(data, text)
