"""``nsn-peft compress``: save a standalone compressed model (factored layers at fixed ranks)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .inputs import check_output_dir, model_for_inference, read_adapter_config
from .options import (
    FULL,
    UsageError,
    add_adapter_creation_options,
    add_common_options,
    add_data_options,
    add_model_options,
    add_overwrite_option,
    csv_floats,
    new_command,
    nonnegative_int,
    open_unit_fraction,
    positive_float,
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
            "is a transformers model (`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; see "
            "docs/export.md); an adapter with budget plans gives a nested export that keeps every budget. It "
            "loads with nsn_peft.load_compressed and works as --model for `eval` and `infer`."
        ),
        examples=[
            "--adapter ./nsn-adapter --rank 128 --output ./compressed",
            "--model HuggingFaceTB/SmolLM2-135M --stats ./stats --rank-plan plan.json --output ./compressed",
            "--model HuggingFaceTB/SmolLM2-135M --refine --budget 0.6 --data ./calib.txt --max-tokens 1000000 "
            "--refine-state ./refine-state --output ./compressed-60",
            "--model HuggingFaceTB/SmolLM2-135M --refine --budgets 0.5,0.6,0.8 --output ./nsn-ladder   "
            "# one adapter for three budgets, calibrated on the packaged general passages",
        ],
    )
    add_model_options(parser, task=False)
    parser.add_argument(
        "--adapter", default=None, metavar="DIR", help="NSN adapter folder (else --model is adapted on the fly)."
    )
    add_adapter_creation_options(parser, title="on-the-fly adapter (without --adapter)")
    ranks = parser.add_argument_group(
        "rank (at most one; default: the active ranks, and every budget of an adapter with budget plans: a nested export)"
    )
    ranks.add_argument(
        "--rank", type=rank_value, default=None, metavar="R", help="Rank of every layer (int or 'full')."
    )
    ranks.add_argument(
        "--target-flops",
        type=unit_fraction,
        default=None,
        metavar="F",
        help="FLOPs budget vs dense, in (0, 1]; an adapter with budget plans must have one for F (its per-layer ranks are used).",
    )
    refine = parser.add_argument_group(
        "calibration-trained compression (--refine): factor --model at --budget, then train the factors on --data "
        "against the dense model (block by block, then end to end)"
    )
    refine.add_argument("--refine", action="store_true", help="Compress --model with calibration-trained factors.")
    refine.add_argument(
        "--budget",
        type=open_unit_fraction,
        default=None,
        metavar="F",
        help="Share of the targeted layers' parameters (= their matmul FLOPs) kept, in (0, 1).",
    )
    refine.add_argument(
        "--budgets",
        type=csv_floats,
        default=None,
        metavar="LIST",
        help="Instead of --budget, a ladder of FLOPs budgets, ascending (e.g. 0.5,0.6,0.8): one NSN adapter "
        "(nested per-layer plans, every budget trained) saved to --output; serve a budget with "
        "set_rank(flops=b) or --target-flops b in eval/infer/compress.",
    )
    refine.add_argument(
        "--budget-sampling",
        default=None,
        choices=["cycle", "all", "sandwich"],
        help="With --budgets: which budgets each training step trains (default: all; cycle: one per step in turn, the cost of one single-budget run).",
    )
    refine.add_argument(
        "--budget-weighting",
        default=None,
        choices=["sum", "uncertainty"],
        help="With --budgets: how the budgets' losses add up (default: sum).",
    )
    refine.add_argument(
        "--allocation",
        default="auto",
        choices=["auto", "mixed", "uniform"],
        help="Per-layer ranks: auto = loss-weighted mixed ranks if better than uniform on validation text.",
    )
    refine.add_argument(
        "--refine-state",
        default=None,
        metavar="DIR",
        help="Folder for resumable checkpoints (rerun the same command to continue).",
    )
    refine.add_argument(
        "--blockwise-epochs", type=nonnegative_int, default=None, help="Block-wise passes (0 skips the stage)."
    )
    refine.add_argument(
        "--e2e-tokens",
        type=nonnegative_int,
        default=None,
        help="End-to-end distillation tokens (default: one pass over the calibration tokens; 0 skips it).",
    )
    refine.add_argument(
        "--e2e-lr", type=positive_float, default=None, help="End-to-end learning rate, relative to the factors' RMS."
    )
    refine.add_argument("--seed", type=nonnegative_int, default=0, help="Order of the calibration sequences.")
    add_data_options(parser, required=False, seq_len=512, max_tokens=1_000_000)
    # Without --data, --refine calibrates on the packaged general passages (Wikipedia, news, stories): general text
    # keeps task accuracy where calibration on one kind of text (e.g. documentation) loses it.
    parser.set_defaults(batch_size=8)  # the refinement's measured default (sequences per step)
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", default=None, metavar="DIR", help="Compressed model folder (required).")
    out.add_argument(
        "--save-tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Save the tokenizer into the folder too (default: on, so eval/infer --model <folder> work).",
    )
    out.add_argument(
        "--convert",
        default=None,
        metavar="DIR",
        help="Rewrite the compressed model folder DIR (any earlier format) as a transformers model folder.",
    )
    add_overwrite_option(out)
    add_common_options(parser)
    parser.set_defaults(func=run)
    return {"compress": parser}


def run(args: argparse.Namespace) -> CommandResult:
    from ..tuner.ranks import (
        budget_plans,
        estimate_flops,
        get_max_rank,
        get_rank,
        nsn_layers,
        select_rank_for_target_flops,
        set_rank,
    )

    if args.convert:
        return _run_convert(args)
    output = check_output_dir(args.output, args.overwrite)
    if args.refine:
        return _run_refine(args, output)
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
    elif args.target_flops is not None and budget_plans(model):
        try:
            set_rank(model, flops=args.target_flops)
        except ValueError as err:
            raise UsageError(f"--target-flops: {err}") from None
    elif args.target_flops is not None:
        set_rank(model, select_rank_for_target_flops(model, args.target_flops, scope="model"))
    report = estimate_flops(model)
    ranks = get_rank(model)
    layers = nsn_layers(model)
    dense_params = sum(layer.out_features * layer.in_features for layer in layers.values())
    kept_params = sum(r * (layers[n].out_features + layers[n].in_features) for n, r in ranks.items())
    # No rank chosen: an adapter with budget plans gives a nested export (every budget); a chosen rank is cut to.
    nested = None if args.rank is None and args.target_flops is None else False
    compression.save_compressed(model, output, tokenizer=tokenizer if args.save_tokenizer else None, nested=nested)
    data = {
        "output": str(output),
        "base_model": ref,
        "budgets": sorted(budget_plans(model)) if nested is None else [],
        "layers": len(ranks),
        "mean_rank": sum(ranks.values()) / len(ranks),
        "factored_params": kept_params,
        "dense_params": dense_params,
        "model_flops_fraction": report.model_fraction,
        "targeted_flops_fraction": report.targeted_fraction,
    }
    text = (
        f"Saved compressed model to {output}: {len(ranks)} factored layers at mean rank {data['mean_rank']:.1f}, "
        f"{kept_params:,} parameters instead of {dense_params:,}; {report.model_fraction:.3f} of the dense matmul FLOPs"
    )
    return CommandResult(data, text)


def _run_convert(args: argparse.Namespace) -> CommandResult:
    """``--convert DIR``: load a compressed folder (either format) and save it in the current one."""
    from ..export import compressed_size, is_export_folder, load_compressed, save_compressed

    if not is_export_folder(args.convert):
        raise UsageError(f"--convert {args.convert} is not a compressed model folder")
    same = args.output is None or Path(args.output).resolve() == Path(args.convert).resolve()
    output = Path(args.convert) if same else check_output_dir(args.output, args.overwrite)
    model = load_compressed(args.convert)
    tokenizer = None
    if (Path(args.convert) / "tokenizer_config.json").is_file() and not same:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.convert)
    save_compressed(model, output, tokenizer=tokenizer)
    sizes = compressed_size(model)
    return CommandResult(
        {"output": str(output), **sizes}, f"Rewrote {args.convert} as a transformers model folder in {output}"
    )


def _run_refine(args: argparse.Namespace, output) -> CommandResult:
    """``--refine``: calibration-trained compression of ``--model`` (:func:`nsn_peft.refine.compress_and_refine`)."""
    import random

    import torch

    from .. import export as compression
    from ..benchmark_data import general_texts
    from ..data import load_texts, token_blocks
    from ..hub import base_model_reference
    from ..refine import RefineConfig, check_budgets, compress_and_refine
    from .inputs import check_data_ref, check_target_modules, load_base
    from .runtime import progress_enabled

    if args.adapter or args.rank is not None or args.target_flops is not None or args.rank_plan:
        raise UsageError(
            "--refine factors --model itself at --budget or --budgets; it takes no --adapter, --rank, "
            "--target-flops or --rank-plan"
        )
    if (args.budget is None) == (args.budgets is None):
        raise UsageError(
            "--refine needs --budget F (share of the targeted parameters kept) or --budgets LIST (a ladder "
            "in one adapter), not both"
        )
    if args.budgets is None and (args.budget_sampling or args.budget_weighting):
        raise UsageError("--budget-sampling and --budget-weighting apply to --budgets only")
    if args.data:
        check_data_ref(args.data)
    overrides = {
        k: v
        for k, v in (
            ("blockwise_epochs", args.blockwise_epochs),
            ("e2e_tokens", args.e2e_tokens),
            ("e2e_lr", args.e2e_lr),
            ("budget_sampling", args.budget_sampling),
            ("budget_weighting", args.budget_weighting),
        )
        if v is not None
    }
    try:
        config = RefineConfig(batch_size=args.batch_size, seed=args.seed, **overrides)
        budgets = check_budgets(args.budgets) if args.budgets is not None else None
    except ValueError as err:
        raise UsageError(f"--budgets: {err}" if "budget" in str(err) else str(err)) from None
    base, tokenizer = load_base(args)
    check_target_modules(base, args.target_modules)
    if args.data:
        texts = load_texts(args.data, split=args.split, text_field=args.text_field, max_docs=args.max_docs)
    else:
        texts = general_texts(max_docs=args.max_docs)
        random.Random(args.seed).shuffle(texts)  # every source in the token budget, not the first one only
    blocks = token_blocks(texts, tokenizer, args.seq_len, args.max_tokens)
    # Shuffled sequences: the validation share is held out from the end, so it must not be one document's tail.
    blocks = blocks[torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(args.seed))]
    target = {"budgets": budgets} if budgets is not None else {"fraction": args.budget}
    model, report = compress_and_refine(
        base,
        blocks,
        **target,
        target_modules=args.target_modules,
        allocation=args.allocation,
        config=config,
        granularity=args.granularity or 1,
        state_dir=args.refine_state,
        show_progress=progress_enabled(),
    )
    model.peft_config[model.active_adapter].base_model_name_or_path = base_model_reference(args.model, args.gguf_file)
    calibration = args.data or "the packaged general passages"
    if budgets is not None:
        return _ladder_result(model, report, output, tokenizer if args.save_tokenizer else None, calibration)
    compression.save_compressed(model, output, tokenizer=tokenizer if args.save_tokenizer else None)
    nll = report.validation_nll
    data = {
        "output": str(output),
        "budget": args.budget,
        "allocation": report.allocation,
        "layers": len(report.ranks),
        "kept_dense": report.kept_dense,
        "calibration_tokens": report.calibration_tokens,
        "validation_tokens": report.validation_tokens,
        "validation_nll": nll,
        "seconds": report.seconds,
        "candidates": report.candidates,
        "resumed": report.resumed,
        "calibration": calibration,
    }
    final = nll.get("end_to_end", nll.get("blockwise", nll.get("init")))
    text = (
        f"Saved refined compressed model to {output}: {len(report.ranks)} factored layers ({report.allocation} ranks) "
        f"keeping {args.budget:.0%} of their parameters; validation NLL {nll['dense']:.4f} dense, "
        f"{nll['init']:.4f} at init, {final:.4f} refined ({report.calibration_tokens:,} calibration tokens, "
        f"{report.seconds.get('total', 0):.0f} s)"
    )
    return CommandResult(data, text)


def _ladder_result(model: Any, report: Any, output: Path, tokenizer: Any, calibration: str) -> CommandResult:
    """``--refine --budgets``: save the NSN adapter serving every budget, report each budget's validation NLL."""
    from ..io import atomic_directory

    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    final = (
        report.validation_nll_per_budget.get("end_to_end") or report.validation_nll_per_budget.get("blockwise") or {}
    )
    data = {
        "output": str(output),
        "budgets": report.budgets,
        "allocation": report.allocation,
        "layers": len(report.ranks),
        "budget_plans": report.budget_plans,
        "calibration_tokens": report.calibration_tokens,
        "validation_tokens": report.validation_tokens,
        "validation_nll": report.validation_nll,
        "validation_nll_per_budget": report.validation_nll_per_budget,
        "seconds": report.seconds,
        "candidates": report.candidates,
        "resumed": report.resumed,
        "calibration": calibration,
    }
    per_budget = ", ".join(f"{b}: {v:.4f}" for b, v in final.items())
    text = (
        f"Saved an NSN adapter for the FLOPs budgets {', '.join(f'{b:g}' for b in report.budgets)} to {output} "
        f"({report.allocation} nested plans over {len(report.ranks)} layers; serve one with --target-flops B or "
        f"set_rank(flops=B)). Validation NLL: dense {report.validation_nll['dense']:.4f}; refined {per_budget} "
        f"({report.calibration_tokens:,} calibration tokens of {calibration}, {report.seconds.get('total', 0):.0f} s)"
    )
    return CommandResult(data, text)
