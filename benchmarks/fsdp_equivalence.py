"""Sharded multi-rank training equals one process: NSNTrainer under FSDP2 or DeepSpeed ZeRO-3 vs a single process.

Runs :class:`nsn_peft.training.NSNTrainer` with the same global batch

1. in one process, unsharded (the reference; ``--bf16`` = autocast, as on one GPU; ``--shard-reference``: with the
   same strategy, so that both runs compute in the same precision);
2. in ``--nproc`` processes with ``--strategy`` (``fsdp2``, ``zero3`` or ``ddp``), ``global/N`` per process,
   writing a checkpoint half-way and at the end;
3. with ``--resume-check``: in ``--nproc`` processes again, resumed from run 2's half-way checkpoint;

and compares the loss curves step by step (the combined objective, every ``loss@r=<rank>``, the log-variances),
the trainable parameters after the first optimizer step (which parameters differ, and by how much) and the
final adapters, each loaded in one CPU process with ``PeftModel.from_pretrained`` (logits at the smallest and
the largest rank; for bf16 runs beside the bf16 noise floor: the reference adapter's logits in float32 vs in
bf16 autocast). With ``--bf16`` a control run measures how far bf16 rounding alone moves the curves (the
reference again, the global batch split into two micro-batches), and a run passes within ``--tol`` or within
``--control-factor`` times that control. The driver launches every run itself through
``python -m torch.distributed.run``.

Usage::

    # CPU (gloo; what the test-suite runs)
    python benchmarks/fsdp_equivalence.py --strategy fsdp2 --device cpu --steps 4 --resume-check --out /tmp/fsdp2.json
    python benchmarks/fsdp_equivalence.py --strategy zero3 --device cpu --steps 4 --out /tmp/zero3.json   # needs deepspeed
    # two GPUs (nccl): SmolLM2-135M, 50 steps, bf16
    python benchmarks/fsdp_equivalence.py --strategy fsdp2 --device cuda --model smollm2 --steps 50 --bf16 \\
        --resume-check --out benchmarks/results/fsdp2_smollm2_bf16.json
    # bisect a drift on GPUs: one reference/sharded pair per variant (fused AdamW, resharding, rank passes, ...)
    python benchmarks/fsdp_equivalence.py --strategy fsdp2 --device cuda --steps 20 --diagnose --out diag.json

Accelerate enables FSDP and DeepSpeed only on accelerators; on CPU the workers lift that restriction
(:func:`enable_accelerate_sharding_on_cpu`) so that the very same Trainer/Accelerate code paths run with gloo.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_equivalence import MarkovDataset, exit_worker, run_workers, tiny_model  # noqa: E402

logger = logging.getLogger("fsdp_equivalence")

MLP = ["up_proj", "gate_proj", "down_proj"]
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", *MLP]
STEP_DUMP = 1  # the optimizer step after which the trainable parameters are compared


# -- running sharded training on CPU -------------------------------------------------------------------------
def enable_accelerate_sharding_on_cpu() -> None:
    """Let Accelerate run FSDP and DeepSpeed on CPU processes (gloo), as it does on GPUs.

    Accelerate turns an FSDP plugin into ``DistributedType.FSDP`` only for accelerator devices (on CPU it silently
    trains with DDP), and finds no backend for DeepSpeed without one. PyTorch's FSDP2 (``fully_shard``) and
    DeepSpeed's CPU accelerator both work with gloo, so this lifts exactly those two checks; everything else
    (model preparation, optimizer mapping, checkpointing) is Accelerate's own code. For tests and this benchmark.
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType

    if getattr(state.AcceleratorState, "_nsn_cpu_sharding", False):
        return
    original_init = state.AcceleratorState.__init__
    original_backend = state.PartialState._prepare_backend

    def init(
        self,
        mixed_precision=None,
        cpu=False,
        dynamo_plugin=None,
        deepspeed_plugin=None,
        fsdp_plugin=None,
        *args,
        **kwargs,
    ):
        original_init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
            # AcceleratorState re-reads PartialState's type on every later instantiation.
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found = original_backend(self, cpu, sagemaker_dp, backend)
        if (
            found[0] is None
            and not cpu
            and not torch.cuda.is_available()
            and int(os.environ.get("LOCAL_RANK", -1)) != -1
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        ):
            return "gloo", DistributedType.MULTI_CPU
        return found

    state.AcceleratorState.__init__ = init
    state.PartialState._prepare_backend = prepare_backend
    state.AcceleratorState._nsn_cpu_sharding = True


# -- worker --------------------------------------------------------------------------------------------------
def build_model_and_data(args) -> tuple[Any, Any, str]:
    """``(peft model, train dataset, decoder-layer class name)`` — identical in every process."""
    from peft import get_peft_model

    import nsn_peft

    targets = ALL_LINEARS if args.targets == "all" else MLP
    if args.model == "tiny":
        base = tiny_model(args.seed, args.hidden, args.layers, args.vocab)
        train = MarkovDataset(args.global_batch * args.steps, args.seq_len, args.vocab, seed=args.seed + 1)
    else:
        from nsn_peft.data import load_texts, python_docs_dir, token_blocks
        from nsn_peft.hub import load_model_and_tokenizer
        from nsn_peft.training import TokenBlocks, clear_dequantized_gguf_marker

        base, tokenizer = load_model_and_tokenizer(None, dtype="float32")
        clear_dequantized_gguf_marker(base)
        texts = load_texts(python_docs_dir("tutorial"))
        tokens = args.global_batch * args.steps * args.seq_len
        train = TokenBlocks(token_blocks(texts, tokenizer, args.seq_len, max_tokens=tokens))
    config = nsn_peft.NSNConfig(target_modules=targets, rank_granularity=args.granularity)
    model = get_peft_model(base, config)
    layer_cls = type(model.base_model.model.model.layers[0]).__name__
    return model, train, layer_cls


def strategy_arguments(args, world: int, layer_cls: str) -> dict:
    """The ``TrainingArguments`` keywords that select the sharding strategy."""
    if world == 1 and not args.shard_reference:
        return {}
    if args.strategy == "fsdp2":
        config = {
            "version": 2,
            "transformer_layer_cls_to_wrap": [layer_cls],
            "reshard_after_forward": not args.no_reshard,
        }
        if args.gc == "fsdp":
            config["activation_checkpointing"] = True
        return {"fsdp": "full_shard", "fsdp_config": config}
    if args.strategy == "zero3":
        return {"deepspeed": zero3_config()}
    return {}


def zero3_config() -> dict:
    """DeepSpeed ZeRO-3 config of the benchmark (the same as examples/zero3.json): "auto" values come from Trainer."""
    return {
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
        },
    }


def gather_trainable(trainer) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters on every process (collective under FSDP2 and ZeRO-3)."""
    from nsn_peft.training.distributed import canonical_parameter_name, full_trainable_state_dict

    model = trainer.model_wrapped
    if trainer.is_deepspeed_enabled:
        import deepspeed

        params = [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {canonical_parameter_name(n): p.detach().float().cpu().clone() for n, p in params}
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return {k: v.float() for k, v in full_trainable_state_dict(model).items()}


def worker(args) -> None:
    from transformers import TrainerCallback, TrainingArguments

    from nsn_peft.io import write_safetensors
    from nsn_peft.training import NSNTrainer, SandwichRankSampler, activation_checkpointing_kwargs, save_trained_adapter
    from nsn_peft.training.distributed import sharding_name

    if args.device == "cpu":
        enable_accelerate_sharding_on_cpu()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch % (world * args.grad_accum):
        raise SystemExit(
            f"--global-batch {args.global_batch} is not divisible by {world} processes x {args.grad_accum} micro-batches"
        )
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model, train, layer_cls = build_model_and_data(args)
    sharded = world > 1 or args.shard_reference
    zero3_on_cpu = args.strategy == "zero3" and sharded and args.device == "cpu"
    extra = {"optim": args.optim} if args.optim else {}
    targs = TrainingArguments(
        output_dir=args.run_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.global_batch // (world * args.grad_accum),
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=max(args.steps // 2, 1),
        report_to=[],
        seed=args.seed,
        use_cpu=args.device == "cpu" and not zero3_on_cpu,
        ddp_backend=("gloo" if args.device == "cpu" else "nccl") if world > 1 else None,
        dataloader_drop_last=True,
        disable_tqdm=True,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        **activation_checkpointing_kwargs(args.gc == "hf"),
        **strategy_arguments(args, world, layer_cls),
        **extra,
    )
    ranks = [int(r) for r in args.fixed_ranks.split(",")] if args.fixed_ranks else SandwichRankSampler(args.num_random)
    trainer = NSNTrainer(
        model,
        targs,
        train_dataset=train,
        rank_sampler=ranks,
        distill_alpha=args.distill_alpha,
        backward_per_rank=not args.single_graph,
        weighting=args.weighting,
    )
    run_dir = Path(args.run_dir)

    class DumpAfterStep(TrainerCallback):
        """The trainable parameters after optimizer step ``STEP_DUMP`` (every process joins the gather)."""

        def on_step_end(self, targs_, state, control, **kwargs):
            if state.global_step == STEP_DUMP and not args.resume_from:
                params = gather_trainable(trainer)
                if trainer.is_world_process_zero():
                    write_safetensors(run_dir / f"params_step{STEP_DUMP}.safetensors", params)

    trainer.add_callback(DumpAfterStep())
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    save_trained_adapter(trainer, run_dir / "final_adapter")  # every process: the library's own final save
    peaks = [peak]
    if torch.distributed.is_available() and torch.distributed.is_initialized() and world > 1:
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, peak)
    param = next(p for n, p in trainer.model_wrapped.named_parameters() if "nsn_A" in n)
    if trainer.is_world_process_zero():
        import accelerate
        import transformers

        steps = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
        result = {
            "world_size": world,
            "strategy": args.strategy if sharded else "none",
            "sharding": sharding_name(trainer),
            "device": str(trainer.args.device),
            "per_device_batch": args.global_batch // (world * args.grad_accum),
            "wrapped_model": type(trainer.model_wrapped).__name__,
            "nsn_param_type": type(param.data).__name__,
            "mixed_precision": getattr(trainer.accelerator.state, "mixed_precision", None),
            "fsdp_mixed_precision_policy": str(
                getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "mixed_precision_policy", None)
            ),
            "train_seconds": elapsed,
            "peak_memory_bytes_per_process": peaks,
            "log": steps,
            "final_log_vars": trainer.rank_loss.log_vars.detach().cpu().tolist(),
            "checkpoint": str(run_dir / f"checkpoint-{args.steps}"),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
            },
        }
        (run_dir / "curve.json").write_text(json.dumps(result, indent=2))


# -- driver --------------------------------------------------------------------------------------------------
WORKER_FLAGS = (
    "device",
    "model",
    "targets",
    "steps",
    "global_batch",
    "grad_accum",
    "seq_len",
    "hidden",
    "layers",
    "vocab",
    "granularity",
    "lr",
    "seed",
    "num_random",
    "distill_alpha",
    "weighting",
    "strategy",
    "gc",
    "max_grad_norm",
    "optim",
    "fixed_ranks",
)
WORKER_SWITCHES = ("bf16", "single_graph", "no_reshard", "shard_reference")


def launch(
    args, nproc: int, run_dir: Path, resume_from: Optional[str] = None, overrides: Optional[dict] = None
) -> dict:
    settings = copy.copy(args)
    for key, value in (overrides or {}).items():
        setattr(settings, key, value)
    flags = []
    for key in WORKER_FLAGS:
        value = getattr(settings, key)
        if value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    flags += [f"--{key.replace('_', '-')}" for key in WORKER_SWITCHES if getattr(settings, key)]
    if resume_from:
        flags += ["--resume-from", resume_from]
    env = (
        {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        if args.device == "cpu" and settings.strategy == "zero3"
        else {}
    )
    return run_workers(__file__, nproc, flags, run_dir, env=env, label=run_dir.name)


def series(log: list[dict]) -> dict[str, dict[int, float]]:
    keys = sorted({k for h in log for k in h if k == "loss" or k.startswith(("loss@", "logvar@", "distill@"))})
    return {k: {h["step"]: h[k] for h in log if k in h} for k in keys}


def compare_curves(a_log: list[dict], b_log: list[dict], from_step: int = 0) -> tuple[dict, float, Optional[int]]:
    """Per-key max abs/rel difference, the worst relative difference of the loss curves, and the first step at
    which any loss curve differs by more than 1e-4 relative."""
    a, b = series(a_log), series(b_log)
    out, worst, first = {}, 0.0, None
    for key, points in a.items():
        pairs = [
            (s, x, b[key][s])
            for s, x in points.items()
            if s > from_step and s in b.get(key, {}) and not (math.isnan(x) or math.isnan(b[key][s]))
        ]
        if not pairs:
            continue
        rel = [abs(x - y) / max(abs(x), 1e-8) for _, x, y in pairs]
        out[key] = {
            "max_abs_diff": max(abs(x - y) for _, x, y in pairs),
            "max_rel_diff": max(rel),
            "points": len(pairs),
        }
        if key == "loss" or key.startswith("loss@"):
            worst = max(worst, max(rel))
            over = [s for (s, _, _), r in zip(pairs, rel) if r > 1e-4]
            if over and (first is None or over[0] < first):
                first = over[0]
    return out, worst, first


def compare_step_params(reference: Path, other: Path, top: int = 5) -> Optional[dict]:
    """Which trainable parameters differ after optimizer step ``STEP_DUMP`` (relative to the reference's scale)."""
    from safetensors.torch import load_file

    name = f"params_step{STEP_DUMP}.safetensors"
    if not (reference / name).is_file() or not (other / name).is_file():
        return None
    a, b = load_file(str(reference / name)), load_file(str(other / name))
    rel = {k: ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a if k in b}
    worst = sorted(rel.items(), key=lambda kv: -kv[1])[:top]
    return {
        "step": STEP_DUMP,
        "params": len(rel),
        "missing": sorted(set(a) ^ set(b)),
        "max_rel_diff": max(rel.values()) if rel else None,
        "worst": dict(worst),
    }


def adapter_logits(args, checkpoint: str, dtype: Optional[torch.dtype] = None) -> dict[int, torch.Tensor]:
    """Logits of a saved adapter, loaded in this (single, CPU) process, at the smallest and largest rank."""
    from peft import PeftModel

    import nsn_peft

    if args.model == "tiny":
        base = tiny_model(args.seed, args.hidden, args.layers, args.vocab)
        batch = MarkovDataset(4, args.seq_len, args.vocab, seed=args.seed + 99).data
    else:
        from nsn_peft.data import load_texts, python_docs_dir, token_blocks
        from nsn_peft.hub import load_model_and_tokenizer

        base, tokenizer = load_model_and_tokenizer(None, dtype="float32")
        batch = token_blocks(
            load_texts(python_docs_dir("howto")), tokenizer, args.seq_len, max_tokens=4 * args.seq_len
        )[:4]
    model = PeftModel.from_pretrained(base, checkpoint).to("cpu").eval()
    ranks = nsn_peft.selectable_ranks(model)
    out = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for r in (ranks[0], ranks[-1]):
            with nsn_peft.at_rank(model, r):
                out[r] = model(batch).logits.float()
    return out


def check_adapter_folder(checkpoint: str) -> dict:
    """The saved adapter is the ordinary single-file PEFT layout with plain, full-size tensors."""
    from safetensors import safe_open

    folder = Path(checkpoint)
    files = sorted(p.name for p in folder.glob("adapter_model*"))
    shapes = {}
    if (folder / "adapter_model.safetensors").is_file():
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    return {"adapter_files": files, "tensors": len(shapes), "shapes": shapes}


def compare_adapters(args, reference: dict, others: dict[str, dict]) -> dict:
    ref = adapter_logits(args, reference["checkpoint"])
    ref_layout = check_adapter_folder(reference["checkpoint"])
    out: dict[str, Any] = {"loaded_on": "cpu, one process"}
    if args.bf16:
        noisy = adapter_logits(args, reference["checkpoint"], torch.bfloat16)
        out["bf16_noise_floor"] = {f"max_abs_logit_diff@r={r}": (noisy[r] - ref[r]).abs().max().item() for r in ref}
    for name, run in others.items():
        logits = adapter_logits(args, run["checkpoint"])
        layout = check_adapter_folder(run["checkpoint"])
        final = adapter_logits(args, str(Path(run["checkpoint"]).parent / "final_adapter"))
        out[name] = {
            **{f"max_abs_logit_diff@r={r}": (logits[r] - ref[r]).abs().max().item() for r in ref},
            "save_trained_adapter_matches_checkpoint": all(torch.equal(final[r], logits[r]) for r in ref),
            "logit_scale": max(v.abs().max().item() for v in ref.values()),
            "adapter_files": layout["adapter_files"],
            "same_tensor_shapes_as_reference": layout["shapes"] == ref_layout["shapes"] and bool(layout["shapes"]),
        }
    return out


DIAGNOSE_VARIANTS = {
    "as_configured": {},
    "adamw_foreach": {"optim": "adamw_torch"},
    "no_reshard_after_forward": {"no_reshard": True},
    "one_backward_per_step": {"single_graph": True},
    "one_rank_per_step": {"fixed_ranks": "TOP"},
    "no_grad_clipping": {"max_grad_norm": 0.0},
    "sharded_reference": {"shard_reference": True},
}


def diagnose(args, work: Path) -> dict:
    """One reference/sharded pair per variant: which change makes a drift disappear."""
    top = None
    results = {}
    for name, overrides in DIAGNOSE_VARIANTS.items():
        overrides = dict(overrides)
        if overrides.get("fixed_ranks") == "TOP":
            if top is None:
                model, _, _ = build_model_and_data(args)
                import nsn_peft

                top = nsn_peft.selectable_ranks(model)[-1]
                del model
            overrides["fixed_ranks"] = str(top)
        single = launch(args, 1, work / f"{name}_np1", overrides=overrides)
        multi = launch(args, args.nproc, work / f"{name}_np{args.nproc}", overrides=overrides)
        _, worst, first = compare_curves(single["log"], multi["log"])
        results[name] = {
            "overrides": overrides,
            "max_rel_loss_diff": worst,
            "first_step_over_1e-4": first,
            "params_after_step": compare_step_params(work / f"{name}_np1", work / f"{name}_np{args.nproc}"),
        }
        logger.info("%s: max rel loss diff %.2e (first step > 1e-4: %s)", name, worst, first)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["fsdp2", "zero3", "ddp"], default="fsdp2")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the sharded run")
    parser.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny random Llama on Markov-chain data, or SmolLM2-135M on the Python tutorial",
    )
    parser.add_argument("--targets", choices=["mlp", "all"], default="mlp", help="NSN on the MLP or on all linears")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (every run)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64, help="tiny model width")
    parser.add_argument("--layers", type=int, default=2, help="tiny model depth")
    parser.add_argument("--vocab", type=int, default=128, help="tiny model vocabulary")
    parser.add_argument("--granularity", type=int, default=None, help="rank granularity (default: 16 tiny, 64 smollm2)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3 tiny, 2e-4 smollm2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-random", type=int, default=1, help="random ranks per step of the sandwich sampler")
    parser.add_argument("--fixed-ranks", default=None, help="train these ranks every step instead (comma-separated)")
    parser.add_argument("--distill-alpha", type=float, default=0.0)
    parser.add_argument("--weighting", choices=["uncertainty", "sum"], default="uncertainty")
    parser.add_argument(
        "--gc",
        choices=["none", "hf", "fsdp"],
        default="none",
        help="activation checkpointing: none, the model's own (hf), or FSDP's (fsdp2 only)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision in every run")
    parser.add_argument("--single-graph", action="store_true", help="NSNTrainer(backward_per_rank=False)")
    parser.add_argument("--no-reshard", action="store_true", help="FSDP2 reshard_after_forward=False")
    parser.add_argument("--shard-reference", action="store_true", help="the 1-process reference also runs the strategy")
    parser.add_argument("--optim", default=None, help="TrainingArguments.optim (default: Trainer's)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--resume-check", action="store_true", help="also resume the sharded run from its half-way checkpoint"
    )
    parser.add_argument("--diagnose", action="store_true", help="run the drift-bisection variants instead")
    parser.add_argument(
        "--tol", type=float, default=None, help="max relative loss-curve difference to pass (default 1e-5, bf16 1e-3)"
    )
    parser.add_argument(
        "--control-factor",
        type=float,
        default=2.0,
        help="bf16: also pass within this factor of the split-batch control's difference",
    )
    parser.add_argument("--out", default="fsdp_equivalence.json")
    parser.add_argument("--work-dir", default=None, help="where the runs write (default: a temporary folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resume-from", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.granularity is None:
        args.granularity = 16 if args.model == "tiny" else 64
    if args.lr is None:
        args.lr = 3e-3 if args.model == "tiny" else 2e-4
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.worker:
        worker(args)
        exit_worker()
        return
    if args.gc == "fsdp" and args.strategy != "fsdp2":
        raise SystemExit("--gc fsdp needs --strategy fsdp2")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    tol = args.tol if args.tol is not None else (1e-3 if args.bf16 else 1e-5)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="nsn_shard_"))
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "run_dir", "resume_from")}
    from nsn_peft.io import write_json

    if args.diagnose:
        result = {"config": config, "diagnose": diagnose(args, work)}
        write_json(args.out, result)
        print(f"\n{'variant':<26} | max rel loss diff | first step > 1e-4 | worst param after step {STEP_DUMP}")
        for name, row in result["diagnose"].items():
            params = row["params_after_step"] or {}
            worst = next(iter(params.get("worst", {}).items()), ("-", float("nan")))
            print(
                f"{name:<26} | {row['max_rel_loss_diff']:17.2e} | {str(row['first_step_over_1e-4']):>17} | {worst[0]} {worst[1]:.2e}"
            )
        print(f"results: {args.out}")
        return

    single = launch(args, 1, work / "np1")
    multi = launch(args, args.nproc, work / f"np{args.nproc}")
    comparison, worst, first = compare_curves(single["log"], multi["log"])
    control = None
    if args.bf16:
        # How far bf16 rounding alone moves the curves: the reference again in one process, but with the global
        # batch split into two micro-batches (the same sum, rounded differently — as two processes round it).
        split = launch(args, 1, work / "np1_split", overrides={"grad_accum": args.grad_accum * 2})
        _, control_worst, _ = compare_curves(single["log"], split["log"])
        control = {"max_rel_loss_diff": control_worst, "log": split["log"]}
    runs = {"sharded": multi}
    resumed, resume_cmp = None, None
    if args.resume_check:
        middle = max(args.steps // 2, 1)
        resumed = launch(
            args, args.nproc, work / "resumed", resume_from=str(work / f"np{args.nproc}" / f"checkpoint-{middle}")
        )
        curves, resume_worst, _ = compare_curves(multi["log"], resumed["log"], from_step=middle)
        resume_cmp = {
            "from_step": middle,
            "curves": curves,
            "max_rel_loss_diff_vs_uninterrupted": resume_worst,
            "final_log_vars": resumed["final_log_vars"],
        }
        runs["resumed"] = resumed
    adapters = compare_adapters(args, single, runs)
    params = compare_step_params(work / "np1", work / f"np{args.nproc}")
    log_var_diff = max((abs(x - y) for x, y in zip(single["final_log_vars"], multi["final_log_vars"])), default=0.0)
    expected = {"fsdp2": "fsdp2", "zero3": "deepspeed", "ddp": None}[args.strategy]
    bound = max(tol, args.control_factor * control["max_rel_loss_diff"]) if control else tol
    passed = worst <= bound and multi["sharding"] == expected
    if resume_cmp is not None:
        passed = passed and resume_cmp["max_rel_loss_diff_vs_uninterrupted"] <= tol
    result = {
        "config": config,
        "tolerance": tol,
        "bf16_split_control": control,
        "pass_bound": bound,
        "single": single,
        "sharded": multi,
        "resumed": resumed,
        "comparison": comparison,
        "max_rel_loss_diff": worst,
        "first_step_over_1e-4": first,
        "max_abs_log_var_diff": log_var_diff,
        "params_after_first_step": params,
        "resume_check": resume_cmp,
        "adapter_check": adapters,
        "passed": passed,
    }
    write_json(args.out, result)
    print(f"\n{'step':>4} | {'loss 1 proc':>12} | {f'loss {args.nproc} procs':>13} | rel diff")
    a, b = series(single["log"])["loss"], series(multi["log"])["loss"]
    for step in sorted(a):
        if step in b:
            print(
                f"{step:>4} | {a[step]:12.6f} | {b[step]:13.6f} | {abs(a[step] - b[step]) / max(abs(a[step]), 1e-8):.2e}"
            )
    print(
        f"\n{args.strategy} ({multi['wrapped_model']}, NSN factors as {multi['nsn_param_type']}): max relative difference "
        f"of loss / loss@r curves {worst:.2e} (pass bound {bound:.2e}), log-variances {log_var_diff:.2e}"
    )
    if control is not None:
        print(f"bf16 control (1 process, the global batch as 2 micro-batches): {control['max_rel_loss_diff']:.2e}")
    if resume_cmp is not None:
        print(
            f"resumed at step {resume_cmp['from_step']}: max relative difference to the uninterrupted run "
            f"{resume_cmp['max_rel_loss_diff_vs_uninterrupted']:.2e}"
        )
    for name in runs:
        diffs = {k: f"{v:.2e}" for k, v in adapters[name].items() if k.startswith("max_abs")}
        print(f"{name} adapter {adapters[name]['adapter_files']} loaded on CPU; logits vs 1-process run: {diffs}")
    if "bf16_noise_floor" in adapters:
        print(
            f"bf16 noise floor (reference adapter, float32 vs bf16 autocast): "
            f"{ {k: f'{v:.2e}' for k, v in adapters['bf16_noise_floor'].items()} }"
        )
    print(f"{'PASS' if passed else 'FAIL'}; results: {args.out}")
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
