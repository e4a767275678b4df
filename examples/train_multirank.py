"""Multi-rank finetuning of SmolLM2-135M with NSN adapters on the MLP, using ``NSNTrainer``.

Trains one nested model on the Python tutorial (the docs' ``tutorial`` sources) and reports held-out
perplexity on the ``howto`` sources at 25/50/75/100 % of the max rank, before and after training.
Runs offline (the model is the embedded SmolLM2 GGUF).

    # a real run on an H100
    python examples/train_multirank.py --device cuda --max-steps 100 --output-dir runs/multirank
    # a smoke test on CPU (a few minutes)
    python examples/train_multirank.py --device cpu --max-steps 3 --block-size 64 --batch-size 2 \\
        --eval-tokens 2048 --output-dir /tmp/multirank

The same script runs on several GPUs (the batch size is per process):

    torchrun --nproc_per_node 2 examples/train_multirank.py --device cuda ...                       # DDP
    accelerate launch --config_file examples/fsdp2.yaml examples/train_multirank.py --device cuda ...  # FSDP2
    accelerate launch --config_file examples/zero3.yaml examples/train_multirank.py --device cuda ...  # ZeRO-3

Under FSDP2 and ZeRO-3 each process holds a shard of the factors and of their optimizer state; the adapter
saved at the end is still the ordinary single-file PEFT adapter, loadable in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
from peft import get_peft_model
from transformers import TrainingArguments

import nsn_peft
from nsn_peft.calibrate.collect import collect_activation_stats
from nsn_peft.data import token_blocks
from nsn_peft.evaluation import perplexity as _perplexity
from nsn_peft.hub import load_model_and_tokenizer
from nsn_peft.training import (
    FixedRankSampler,
    NSNTrainer,
    TokenBlocks,
    activation_checkpointing_kwargs,
    make_rank_sampler,
    read_texts,
)

DOCS = Path(os.environ.get("NSN_PEFT_PYTHON_DOCS", "/usr/share/doc/python3.11/html/_sources"))
TARGETS = ["up_proj", "gate_proj", "down_proj"]
FRACTIONS = (0.25, 0.5, 0.75, 1.0)

logger = logging.getLogger("train_multirank")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--max-steps", type=int, default=100, help="the tutorial is ~68k tokens: 100 steps of 8x512 is ~6 epochs"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--output-dir", default="runs/train_multirank")
    p.add_argument("--model", default=None, help="model id/folder/.gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--train-data", default=str(DOCS / "tutorial"))
    p.add_argument("--eval-data", default=str(DOCS / "howto"))
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--logvar-lr", type=float, default=5e-2, help="learning rate of the log-variances")
    p.add_argument("--init", choices=["svd", "whitened"], default="whitened")
    p.add_argument("--calib-tokens", type=int, default=32768, help="training tokens for the whitened init's statistics")
    p.add_argument(
        "--sampler",
        choices=["served", "sandwich", "uniform"],
        default="served",
        help="'served': exactly the ranks evaluated below (25/50/75/100%% of the max) at every step, the "
        "best measured recipe when you know the ranks you will serve; 'sandwich': max + min + random",
    )
    p.add_argument("--num-random", type=int, default=2, help="random middle ranks of the sandwich sampler")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="self-distillation from the top rank (0 = off)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens for perplexity")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def perplexity(model, blocks: torch.Tensor, batch_size: int, autocast: Optional[torch.dtype]) -> float:
    """Held-out perplexity over the token blocks (:func:`nsn_peft.evaluation.perplexity`), bf16 autocast on GPUs."""
    device = next(model.parameters()).device
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        return _perplexity(model, blocks, seq_len=blocks.shape[1], batch_size=batch_size)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process under torchrun
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(args.seed)

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to(device)
    train_blocks = token_blocks(
        read_texts(args.train_data),
        tokenizer,
        args.block_size,
        max_tokens=args.max_steps * args.batch_size * args.grad_accum * args.block_size,
    )
    eval_blocks = token_blocks(read_texts(args.eval_data), tokenizer, args.block_size, max_tokens=args.eval_tokens)
    logger.info(
        "train: %d blocks x %d tokens; held-out: %d blocks", len(train_blocks), args.block_size, len(eval_blocks)
    )
    autocast = torch.bfloat16 if bf16 else None
    dense_ppl = perplexity(model, eval_blocks, args.batch_size, autocast)

    stats = None
    if args.init == "whitened":
        calib = train_blocks[: max(1, args.calib_tokens // args.block_size)]
        stats = collect_activation_stats(
            model,
            calib,
            max_tokens=None,
            seq_len=args.block_size,
            batch_size=args.batch_size,
            target_modules=TARGETS,
            show_progress=False,
        )
    config = nsn_peft.NSNConfig(target_modules=TARGETS, init=args.init, stats=stats)
    peft_model = get_peft_model(model, config)
    grid = nsn_peft.selectable_ranks(peft_model)
    top = grid[-1]
    ranks = sorted({max([r for r in grid if r <= f * top] or [grid[0]]) for f in FRACTIONS})

    def ppl_at_ranks() -> dict[int, float]:
        out = {}
        for r in ranks:
            with nsn_peft.at_rank(peft_model, r):
                out[r] = perplexity(peft_model, eval_blocks, args.batch_size, autocast)
        return out

    before = ppl_at_ranks()
    targs = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, args.max_steps // 20),
        save_strategy="steps",
        save_steps=max(1, args.max_steps // 2),
        save_total_limit=1,
        bf16=bf16,
        **activation_checkpointing_kwargs(args.activation_checkpointing),
        use_cpu=device.type == "cpu",
        report_to=[],
        seed=args.seed,
        dataloader_drop_last=True,
    )
    if args.sampler == "served":
        sampler = FixedRankSampler(ranks, seed=args.seed)
    else:
        sampler = make_rank_sampler(args.sampler, seed=args.seed, num_random=args.num_random, num_ranks=2)
    trainer = NSNTrainer(
        peft_model,
        targs,
        train_dataset=TokenBlocks(train_blocks),
        eval_dataset=TokenBlocks(eval_blocks),
        rank_sampler=sampler,
        logvar_learning_rate=args.logvar_lr,
        distill_alpha=args.distill_alpha,
        eval_ranks=ranks,
    )
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    after = ppl_at_ranks()
    final = Path(args.output_dir) / "final"
    trainer.save_model(str(final))  # every process: FSDP2/ZeRO-3 gather the shards; the main process writes
    if trainer.is_world_process_zero():
        print(f"\nSmolLM2-135M, NSN on {TARGETS} (init={args.init}), {args.max_steps} steps in {elapsed:.0f} s")
        print(f"held-out perplexity ({args.eval_data}); dense model: {dense_ppl:.2f}")
        print("| rank | % of max | MLP FLOPs vs dense | before | after |")
        print("|---:|---:|---:|---:|---:|")
        for r in ranks:
            flops = nsn_peft.estimate_flops(peft_model, r).targeted_fraction
            print(f"| {r} | {100 * r / top:.0f}% | {flops:.2f} | {before[r]:.2f} | {after[r]:.2f} |")
        print(
            f"log-variances: { {k: round(v, 3) for k, v in zip(trainer.rank_buckets.labels, trainer.rank_loss.log_vars.tolist())} }"
        )
        print(f"adapter saved to {final} (load with PeftModel.from_pretrained)")
        if any(not math.isfinite(v) for v in after.values()):
            raise SystemExit("non-finite perplexity after training")


if __name__ == "__main__":
    main()
