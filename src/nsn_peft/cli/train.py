"""``nsn-peft train``: multi-rank finetuning of an NSN causal LM with :class:`~nsn_peft.training.NSNTrainer`."""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..devices import resolve_device
from ..hub import base_model_reference
from .inputs import (
    adapt_model,
    check_data_ref,
    check_output_dir,
    load_adapter,
    load_base,
    nsn_config_from_args,
    read_adapter_config,
)
from .options import (
    UsageError,
    add_adapter_creation_options,
    add_common_options,
    add_data_options,
    add_model_options,
    add_overwrite_option,
    new_command,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    rank_list,
    required,
)
from .output import CommandResult, format_table
from .runtime import exit_without_finalization

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    parser = new_command(
        subparsers,
        "train",
        summary="Finetune an NSN model at several ranks per step (NSNTrainer).",
        description=(
            "Train the nested factors of a causal LM so that every rank works well: each step trains at ranks "
            "drawn by a rank sampler and combines the per-rank losses with learned uncertainty weights. Starts "
            "from an adapter folder (--adapter) or adapts --model on the fly; writes the trained adapter to "
            "--output at the end (intermediate checkpoints go to --checkpoint-dir when --save-steps is set)."
        ),
        examples=[
            "--adapter ./nsn-adapter --data ./train.txt --max-steps 200 --output ./nsn-trained",
            "--model HuggingFaceTB/SmolLM2-135M --max-rank 256 --data ./docs --epochs 1 --rank-sampler sandwich "
            "--eval-data ./valid.txt --output ./nsn-trained --bf16",
            "--adapter ./nsn-adapter --data ./train.txt --max-steps 200 --bf16 --fsdp --output ./nsn-trained   "
            "(under torchrun --nproc_per_node 2 -m nsn_peft)",
        ],
    )
    add_model_options(parser, task=False)
    parser.add_argument("--adapter", default=None, metavar="DIR", help="NSN adapter folder to continue from.")
    add_adapter_creation_options(parser, title="on-the-fly adapter (without --adapter)")
    add_data_options(parser, seq_len=512, max_tokens=None)
    parser.add_argument("--eval-data", default=None, metavar="SOURCE", help="Evaluation text (same formats as --data).")
    parser.add_argument("--eval-max-tokens", type=positive_int, default=65536, help="Token budget of --eval-data.")

    tr = parser.add_argument_group("training (TrainingArguments)")
    tr.add_argument("--epochs", type=positive_float, default=1.0, help="Training epochs (num_train_epochs).")
    tr.add_argument("--max-steps", type=positive_int, default=None, help="Optimizer steps (overrides --epochs).")
    tr.add_argument("--learning-rate", "--lr", type=positive_float, default=1e-4, help="Peak learning rate.")
    tr.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay.")
    tr.add_argument(
        "--warmup-steps", type=nonnegative_float, default=0.0, help="Warm-up steps (a value < 1 is a ratio)."
    )
    tr.add_argument("--lr-scheduler", default="linear", help="lr_scheduler_type (linear, cosine, constant, ...).")
    tr.add_argument("--grad-accum", type=positive_int, default=1, help="Gradient accumulation steps.")
    tr.add_argument("--logging-steps", type=positive_int, default=10, help="Log every N steps.")
    tr.add_argument("--eval-steps", type=positive_int, default=None, help="Evaluate every N steps (needs --eval-data).")
    tr.add_argument(
        "--save-steps", type=positive_int, default=None, help="Checkpoint every N steps (default: no checkpoints)."
    )
    tr.add_argument("--save-total-limit", type=positive_int, default=None, help="Keep at most N checkpoints.")
    tr.add_argument(
        "--checkpoint-dir", default=None, metavar="DIR", help="Trainer output_dir (default: <output>-checkpoints)."
    )
    tr.add_argument("--resume", default=None, metavar="CHECKPOINT", help="Resume from this checkpoint folder.")
    tr.add_argument("--seed", type=nonnegative_int, default=42, help="Random seed.")
    precision = tr.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", default=False, help="bf16 mixed precision.")
    precision.add_argument("--fp16", action="store_true", default=False, help="fp16 mixed precision.")
    tr.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Activation checkpointing.",
    )

    sharding = parser.add_argument_group("several GPUs (launch with torchrun --nproc_per_node N or accelerate launch)")
    shard = sharding.add_mutually_exclusive_group()
    shard.add_argument(
        "--fsdp",
        action="store_true",
        default=False,
        help="Shard the model, gradients and optimizer state over the processes with FSDP2 (one shard unit "
        "per decoder layer); without it a multi-process run is DDP.",
    )
    shard.add_argument(
        "--deepspeed",
        default=None,
        metavar="CONFIG",
        help="DeepSpeed config file for Trainer (e.g. examples/zero3.json for ZeRO-3); needs deepspeed.",
    )

    mr = parser.add_argument_group("multi-rank training (NSNTrainer)")
    mr.add_argument(
        "--rank-sampler",
        default="sandwich",
        choices=["sandwich", "uniform", "fixed"],
        help="How ranks are drawn each step.",
    )
    mr.add_argument("--sampler-ranks", type=rank_list, default=None, metavar="LIST", help="Ranks of the fixed sampler.")
    mr.add_argument("--num-random", type=nonnegative_int, default=2, help="Random ranks per step (sandwich sampler).")
    mr.add_argument("--num-ranks", type=positive_int, default=2, help="Ranks per step (uniform sampler).")
    mr.add_argument(
        "--weighting", default="uncertainty", choices=["uncertainty", "sum"], help="How per-rank losses are combined."
    )
    mr.add_argument(
        "--num-rank-buckets", type=positive_int, default=None, help="Rank buckets sharing one log-variance."
    )
    mr.add_argument(
        "--logvar-learning-rate", type=nonnegative_float, default=1e-2, help="Learning rate of the log-variances."
    )
    mr.add_argument("--distill-alpha", type=nonnegative_float, default=0.0, help="Self-distillation weight in [0, 1].")
    mr.add_argument("--distill-temperature", type=positive_float, default=1.0, help="Distillation temperature.")
    mr.add_argument("--eval-ranks", type=rank_list, default=None, metavar="LIST", help="Ranks reported by evaluation.")

    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", default=None, metavar="DIR", help="Folder of the trained adapter (required).")
    out.add_argument(
        "--save-tokenizer", action=argparse.BooleanOptionalAction, default=False, help="Also save the tokenizer."
    )
    add_overwrite_option(out)
    add_common_options(parser)
    _add_training_arguments(parser)  # last: the options above keep their names
    parser.set_defaults(func=run)
    return {"train": parser}


# TrainingArguments fields this command sets from its own options (or itself): the rest are options of their own.
OWN_TRAINING_FIELDS = frozenset(
    {
        "output_dir",
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "lr_scheduler_type",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "eval_strategy",
        "eval_steps",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "seed",
        "bf16",
        "fp16",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "use_cpu",
        "fsdp",
        "fsdp_config",
        "deepspeed",
        "disable_tqdm",
        "remove_unused_columns",
        "resume_from_checkpoint",
    }
)
TRAINING_ARGUMENT_PREFIX = "training_argument__"


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Every other field of transformers' ``TrainingArguments`` as ``--<field_name>`` (through ``HfArgumentParser``,
    so types, choices and help are transformers' own): ``--report_to wandb``, ``--optim adamw_torch_fused``,
    ``--push_to_hub --hub_model_id me/model``, ``--dataloader_num_workers 4``…"""
    import copy

    from transformers import HfArgumentParser, TrainingArguments

    group = parser.add_argument_group(
        "every other TrainingArguments field (transformers' own options, e.g. --report_to wandb, --optim "
        "adamw_torch_fused, --push_to_hub; see the TrainingArguments documentation)"
    )
    taken = set(parser._option_string_actions)
    for action in HfArgumentParser(TrainingArguments)._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in OWN_TRAINING_FIELDS:
            continue
        options = [o for o in action.option_strings if o not in taken]
        if not options:
            continue
        option = copy.copy(action)
        option.option_strings, option.dest, option.default, option.required = (
            options,
            (TRAINING_ARGUMENT_PREFIX + action.dest),
            argparse.SUPPRESS,
            False,
        )
        if option.metavar is None and option.nargs != 0:
            option.metavar = action.dest.upper()
        option.training_arguments_field = True  # type: ignore[attr-defined]  (documented as a group in docs/cli.md)
        group._add_action(option)
        taken.update(options)


def _training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainingArguments`` fields given on the command line through :func:`_add_training_arguments`."""
    return {
        k.removeprefix(TRAINING_ARGUMENT_PREFIX): v
        for k, v in vars(args).items()
        if k.startswith(TRAINING_ARGUMENT_PREFIX)
    }


def _blocks(args: argparse.Namespace, source: str, tokenizer: Any, max_tokens: Optional[int]) -> Any:
    """A ``datasets.Dataset`` of ``input_ids``/``labels`` blocks of ``--seq-len`` tokens (:func:`nsn_peft.data.block_dataset`:
    batched ``map`` tokenisation and grouping; with a token budget only what it needs is read)."""
    from .. import data

    check_data_ref(source)
    return data.block_dataset(
        source,
        tokenizer,
        args.seq_len,
        max_tokens=max_tokens,
        split=args.split,
        text_field=args.text_field,
        max_docs=args.max_docs,
    )


def _sampler(args: argparse.Namespace, model: Any) -> Any:
    from .. import training
    from ..tuner.ranks import get_max_rank

    top = max(get_max_rank(model).values())
    ranks = None
    if args.rank_sampler == "fixed":
        if not args.sampler_ranks:
            raise UsageError("--rank-sampler fixed needs --sampler-ranks")
        ranks = [top if r == "full" else int(r) for r in args.sampler_ranks]
    try:
        return training.make_rank_sampler(
            args.rank_sampler, seed=args.seed, num_ranks=args.num_ranks, num_random=args.num_random, ranks=ranks
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def run(args: argparse.Namespace) -> CommandResult:
    from ..tuner.ranks import get_max_rank

    output = check_output_dir(args.output, args.overwrite)
    device = resolve_device(args.device)
    if args.fp16 and device == "cpu":  # (bf16 works on CPUs, fp16 mixed precision does not)
        raise UsageError("--fp16 mixed precision needs a GPU; on CPU use --bf16 or leave it out (fp32)")
    required(args, "data")
    if args.eval_steps and not args.eval_data:
        raise UsageError("--eval-steps needs --eval-data")
    if not 0 <= args.distill_alpha <= 1:
        raise UsageError(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}")
    if args.resume:
        from .inputs import check_input_path

        check_input_path(args.resume, "checkpoint", kind="dir")
    if args.deepspeed:
        import importlib.util

        from .inputs import check_input_path

        check_input_path(args.deepspeed, "DeepSpeed config", kind="file")
        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError("--deepspeed needs the deepspeed package (pip install deepspeed)")
    if args.adapter:
        read_adapter_config(args.adapter)
        model, tokenizer, ref = load_adapter(args, trainable=True, task="causal-lm")
    else:
        config = nsn_config_from_args(args, task="causal-lm")
        base, tokenizer = load_base(args, task="causal-lm")
        ref = base_model_reference(args.model, args.gguf_file)
        model = adapt_model(base, config, ref)
    model.train()
    train_set = _blocks(args, args.data, tokenizer, args.max_tokens)
    eval_set = _blocks(args, args.eval_data, tokenizer, args.eval_max_tokens) if args.eval_data else None
    top = max(get_max_rank(model).values())
    eval_ranks = [top if r == "full" else int(r) for r in args.eval_ranks] if args.eval_ranks else None
    if eval_ranks and max(eval_ranks) > top:
        raise UsageError(f"--eval-ranks: {max(eval_ranks)} exceeds the largest max rank ({top})")

    # Checkpoints only when asked for (--save-steps); otherwise Trainer gets a scratch folder that never outlives the run.
    if args.save_steps:
        checkpoint_dir = args.checkpoint_dir or f"{str(output).rstrip('/')}-checkpoints"
        scratch = None
    else:
        scratch = tempfile.TemporaryDirectory(prefix="nsn-peft-train-")
        checkpoint_dir = scratch.name
    try:
        return _train(args, model, tokenizer, ref, output, train_set, eval_set, eval_ranks, device, checkpoint_dir)
    finally:
        if scratch is not None:
            scratch.cleanup()
        elif Path(checkpoint_dir).is_dir() and not any(Path(checkpoint_dir).iterdir()):
            Path(checkpoint_dir).rmdir()  # a run that failed before its first checkpoint leaves no empty folder


def _train(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    ref: str,
    output: Path,
    train_set: Any,
    eval_set: Any,
    eval_ranks: Optional[list[int]],
    device: str,
    checkpoint_dir: str,
) -> CommandResult:
    from transformers import TrainingArguments, default_data_collator

    from .. import training

    own = dict(
        output_dir=checkpoint_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        bf16=args.bf16,
        fp16=args.fp16,
        **training.activation_checkpointing_kwargs(args.gradient_checkpointing),
        use_cpu=device == "cpu",
        **_sharding_arguments(args),
        report_to="none",
        disable_tqdm=not _progress_enabled(args),
        remove_unused_columns=False,
    )
    training_args = TrainingArguments(**{**own, **_training_overrides(args)})
    trainer = training.NSNTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        rank_sampler=_sampler(args, model),
        weighting=args.weighting,
        num_rank_buckets=args.num_rank_buckets,
        logvar_learning_rate=args.logvar_learning_rate,
        distill_alpha=args.distill_alpha,
        distill_temperature=args.distill_temperature,
        eval_ranks=eval_ranks,
    )
    result = trainer.train(resume_from_checkpoint=args.resume)
    metrics = dict(result.metrics)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
    model.eval()
    # Every process takes part (FSDP2/ZeRO-3 gather the sharded factors); the main process writes.
    training.save_trained_adapter(trainer, output, tokenizer if args.save_tokenizer else None)
    metrics = {
        k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in metrics.items()
    }
    data = {
        "output": str(output),
        "base_model": ref,
        "train_blocks": len(train_set),
        "steps": int(result.global_step),
        "training_loss": float(result.training_loss),
        "metrics": metrics,
        "rank_counts": {str(k): v for k, v in trainer.rank_counts.items()},
        "processes": int(training_args.world_size),
        "sharding": training.distributed.sharding_name(trainer),
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "training_arguments": {k: getattr(training_args, k) for k in _training_overrides(args)},
    }
    if "gloo" in (training.distributed.end_distributed() or ""):  # also "cpu:gloo,cuda:nccl"
        exit_without_finalization()
    per_rank = sorted(
        ((k.split("@r=")[1], v) for k, v in metrics.items() if k.startswith("eval_loss@r=")), key=lambda kv: int(kv[0])
    )
    lines = [
        f"Trained {result.global_step} steps on {len(train_set)} blocks of {args.seq_len} tokens; "
        f"training loss {result.training_loss:.4f}",
        f"Saved the trained adapter to {output}",
    ]
    if per_rank:
        lines += [
            "",
            format_table(
                [(r, round(v, 4), round(math.exp(min(v, 50)), 3)) for r, v in per_rank],
                ["rank", "eval loss", "perplexity"],
            ),
        ]
    return CommandResult(data, "\n".join(lines))


def _sharding_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``TrainingArguments`` keywords of --fsdp / --deepspeed."""
    if args.fsdp:
        return {"fsdp": "full_shard", "fsdp_config": {"version": 2, "reshard_after_forward": True}}
    if args.deepspeed:
        return {"deepspeed": args.deepspeed}
    return {}


def _progress_enabled(args: argparse.Namespace) -> bool:
    return bool(args.progress and not args.quiet)
