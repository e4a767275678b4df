"""``nsn-peft infer``: generate text at a chosen rank or FLOPs budget."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from ..tuner.rank_points import RankPoint, describe_point
from ..vocab import check_token_ids
from .inputs import check_input_path, model_for_inference, read_adapter_config, resolve_rank_points
from .options import (
    UsageError,
    add_adapter_creation_options,
    add_common_options,
    add_model_options,
    add_serving_options,
    new_command,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    rank_value,
    unit_fraction,
)
from .output import CommandResult

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    parser = new_command(
        subparsers,
        "infer",
        summary="Generate text at a rank or a FLOPs budget.",
        description=(
            "Generate a completion with an NSN model at --rank, --fraction (of each layer's max rank) or "
            "--target-flops (fraction of the dense model's matmul FLOPs). The model is an adapter folder "
            "(--adapter), a plain model adapted on the fly (--model: Hub id, folder or .gguf file; the "
            "tokenizer comes from the GGUF or --tokenizer) or a compressed model folder (--model, fixed ranks). "
            "Instruct models get their chat template by default."
        ),
        examples=[
            '--target-flops 0.5 --prompt "The capital of France is"',
            '--adapter ./nsn-adapter --rank 128 --prompt "Once upon a time" --max-new-tokens 40',
            '--model ./SmolLM2-135M-Instruct.Q4_1.gguf --rank full --prompt "Hi!" --json',
        ],
    )
    add_model_options(parser, task=False)
    parser.add_argument(
        "--adapter", default=None, metavar="DIR", help="NSN adapter folder (else --model is adapted on the fly)."
    )
    add_adapter_creation_options(parser, title="on-the-fly adapter (without --adapter)")
    add_serving_options(parser)
    ranks = parser.add_argument_group("rank (at most one; default: full)")
    ranks.add_argument(
        "--rank", type=rank_value, default=None, metavar="R", help="Rank of every layer (int or 'full')."
    )
    ranks.add_argument("--fraction", type=unit_fraction, default=None, help="Fraction of each layer's max rank.")
    ranks.add_argument(
        "--target-flops", type=unit_fraction, default=None, metavar="F", help="FLOPs budget vs dense, in (0, 1]."
    )
    ranks.add_argument(
        "--flops-scope", default="model", choices=["model", "targeted"], help="What --target-flops budgets."
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", default=None, help="Prompt text.")
    gen.add_argument("--prompt-file", default=None, metavar="FILE", help="Read the prompt from this file.")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64, help="Tokens to generate.")
    gen.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy decoding.")
    gen.add_argument("--top-p", type=unit_fraction, default=1.0, help="Nucleus sampling mass (with --temperature > 0).")
    gen.add_argument("--seed", type=nonnegative_int, default=0, help="Random seed for sampling.")
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Wrap the prompt in the tokenizer's chat template (default: when it has one).",
    )
    gen.add_argument("--system", default=None, help="System message (with --chat).")
    add_common_options(parser)
    parser.set_defaults(func=run)
    return {"infer": parser}


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("pass --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        return check_input_path(args.prompt_file, "prompt file", kind="file").read_text(encoding="utf-8")
    if args.prompt is None:
        raise UsageError("the following arguments are required: --prompt (or --prompt-file)")
    return args.prompt


def encode_prompt(tokenizer: Any, prompt: str, chat: Any, system: Any) -> tuple[dict, bool]:
    """Token ids of ``prompt`` (through the chat template when asked for or, by default, when there is one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise UsageError("--chat: the tokenizer has no chat template")
    use_chat = has_template if chat is None else bool(chat)
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return dict(encoded), True
    return dict(tokenizer(prompt, return_tensors="pt")), False


def run(args: argparse.Namespace) -> CommandResult:
    import torch

    from ..tuner.ranks import nsn_layers

    prompt = _prompt(args)
    chosen = [n for n in ("rank", "fraction", "target_flops") if getattr(args, n) is not None]
    if len(chosen) > 1:
        raise UsageError("pass at most one of --rank, --fraction, --target-flops")
    if args.adapter:
        read_adapter_config(args.adapter)
    model, tokenizer, ref = model_for_inference(args, allow_compressed=True)
    if nsn_layers(model):
        (point,) = resolve_rank_points(
            model,
            ranks=[args.rank] if args.rank is not None else None,
            fractions=[args.fraction] if args.fraction is not None else None,
            target_flops=[args.target_flops] if args.target_flops is not None else None,
            flops_scope=args.flops_scope,
        )
        context, info = point.context(model), None
    else:  # a compressed model: fixed ranks
        if chosen:
            raise UsageError(
                "--rank/--fraction/--target-flops need an NSN model; a compressed model runs at fixed ranks"
            )
        from .evaluate import fixed_rank_flops

        point = RankPoint("compressed", "compressed", "compressed")
        context, info = (
            contextlib.nullcontext(),
            {"label": "compressed", "kind": "compressed", **fixed_rank_flops(model)},
        )
    inputs, used_chat = encode_prompt(tokenizer, prompt, args.chat, args.system)
    check_token_ids(model, inputs["input_ids"], "the tokenized prompt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    gen_kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": sample}
    if sample:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if tokenizer.pad_token_id is not None:
        gen_kwargs["pad_token_id"] = tokenizer.pad_token_id
    with context:
        info = info or describe_point(model, point)
        with torch.inference_mode():
            output = model.generate(**inputs, **gen_kwargs)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    completion = tokenizer.decode(new_tokens, skip_special_tokens=True)
    data = {
        "model": ref,
        "adapter": args.adapter,
        "prompt": prompt,
        "completion": completion,
        "chat_template": used_chat,
        "new_tokens": int(new_tokens.numel()),
        **info,
    }
    if not args.json and not args.quiet:
        how = (
            f"rank {info['mean_rank']:.0f}"
            if info["min_rank"] == info["max_rank"]
            else f"mean rank {info['mean_rank']:.1f}"
        )
        if point.kind != "rank":
            how += f" ({point.label})"
        sys.stderr.write(f"[{Path(str(ref)).name}: {how}, {info['model_flops_fraction']:.3f} of dense FLOPs]\n")
    return CommandResult(data, completion)
