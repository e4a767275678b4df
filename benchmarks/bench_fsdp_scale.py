"""How large a Llama-shaped model NSNTrainer can train with NSN on every linear layer at full rank, per strategy.

For each model size (Llama-3 shapes, random weights) and strategy, a few training steps in a fresh
``torch.distributed.run`` launch (an out-of-memory failure ends only that launch):

* ``nsn-fsdp2``   NSN on all linear layers of the decoder at full rank, ``NSNTrainer`` + FSDP2;
* ``nsn-ddp``     the same under DDP (every GPU holds the whole model, its gradients and optimizer state);
* ``dense-fsdp2`` plain finetuning of the same linear layers (no NSN, ``Trainer``) with the same FSDP2 setup.

Every run: bf16 compute (autocast / FSDP2 ``param_dtype``), float32 trainable weights and AdamW state, frozen
weights in bf16, activation checkpointing, ``--seq-len`` tokens x ``--batch-size`` sequences per GPU. NSN runs
train ``--num-random`` + 2 ranks per step (sandwich sampler), so they run that many forward/backward passes per
step; tokens/s counts training tokens (each once). Reported per run: peak memory per GPU
(``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``), seconds per step and tokens/s over the
steps after ``--warmup``, trainable parameters, or the failure (``oom`` or ``error``). Sizes are tried in
increasing order and a strategy stops at its first out-of-memory size.

    python benchmarks/bench_fsdp_scale.py --nproc 2 --sizes 1b,3b,8b --out benchmarks/results/fsdp_scale.json
    python benchmarks/bench_fsdp_scale.py --device cpu --nproc 2 --sizes tiny --steps 2 --warmup 1 --out /tmp/s.json

Each process builds the model in CPU memory first (bf16 frozen weights, float32 factors: about 6 bytes per
parameter of the model, times 2-2.5 for the factors at full rank) and computes the NSN factors on its GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_equivalence import exit_worker  # noqa: E402

logger = logging.getLogger("bench_fsdp_scale")

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {  # Llama-3 shapes (8b: Llama-3-8B, 3b/1b: Llama-3.2), 13b: Llama-2-13B widths with grouped KV
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
    "3b": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8
    ),
    "8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
    "13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8
    ),
}
STRATEGIES = ("nsn-fsdp2", "nsn-ddp", "dense-fsdp2")


def build_model(size: str, vocab: int, dtype: torch.dtype):
    """A randomly initialised Llama of ``size`` in CPU memory (built on the meta device, then filled: fast)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, **SIZES[size])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffer was built on the meta device
    return model


class StepTimer:
    """Wall time of each optimizer step (device-synchronised) from a Trainer callback."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.times.append(time.perf_counter() - timer._start)

        return _Timer()


def worker(args) -> None:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    import nsn_peft
    from nsn_peft.training import NSNTrainer, SandwichRankSampler, activation_checkpointing_kwargs

    if args.device == "cpu":
        from fsdp_equivalence import enable_accelerate_sharding_on_cpu

        enable_accelerate_sharding_on_cpu()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    nsn = args.strategy.startswith("nsn")
    fsdp = args.strategy.endswith("fsdp2")
    started = time.perf_counter()
    model = build_model(args.size, args.vocab, torch.bfloat16 if cuda else torch.float32)
    if nsn:
        config = nsn_peft.NSNConfig(
            target_modules=ALL_LINEARS,
            rank_granularity=args.granularity,
            init_device=f"cuda:{local_rank}" if cuda else None,
        )
        model = get_peft_model(model, config)
    else:
        for name, param in model.named_parameters():
            param.requires_grad = ".layers." in name and any(f"{t}.weight" in name for t in ALL_LINEARS)
    with torch.no_grad():  # float32 master weights for what trains; frozen weights stay in bf16
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    build_seconds = time.perf_counter() - started

    steps = args.warmup + args.steps
    rows = args.batch_size * world * steps
    data = torch.randint(0, args.vocab, (rows, args.seq_len), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in data]
    sharding = {}
    if fsdp and world > 1:
        sharding = {
            "fsdp": "full_shard",
            "fsdp_config": {
                "version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
            },
        }
    targs = TrainingArguments(
        output_dir=args.run_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=cuda,
        use_cpu=not cuda,
        ddp_backend=("nccl" if cuda else "gloo") if world > 1 else None,
        disable_tqdm=True,
        dataloader_drop_last=True,
        **activation_checkpointing_kwargs(True),
        **sharding,
    )
    timer = StepTimer()
    if nsn:
        trainer = NSNTrainer(model, targs, train_dataset=dataset, rank_sampler=SandwichRankSampler(args.num_random))
    else:
        trainer = Trainer(model=model, args=targs, train_dataset=dataset)
    trainer.add_callback(timer.callback())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    allocated = torch.cuda.max_memory_allocated() if cuda else None
    reserved = torch.cuda.max_memory_reserved() if cuda else None
    peaks = [(allocated, reserved)]
    if world > 1:
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, (allocated, reserved))
    if trainer.is_world_process_zero():
        measured = timer.times[args.warmup :]
        step_s = sum(measured) / len(measured) if measured else None
        tokens_per_step = args.batch_size * world * args.seq_len
        result = {
            "status": "ok",
            "world_size": world,
            "wrapped_model": type(trainer.model_wrapped).__name__,
            "parameters": total,
            "trainable_parameters": trainable,
            "passes_per_step": (args.num_random + 2) if nsn else 1,
            "peak_allocated_gib_per_gpu": [None if a is None else a / 2**30 for a, _ in peaks],
            "peak_reserved_gib_per_gpu": [None if r is None else r / 2**30 for _, r in peaks],
            "seconds_per_step": step_s,
            "tokens_per_second": tokens_per_step / step_s if step_s else None,
            "build_seconds": build_seconds,
            "step_seconds": timer.times,
        }
        (Path(args.run_dir) / "result.json").write_text(json.dumps(result, indent=2))


def launch(args, size: str, strategy: str, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        __file__,
        "--worker",
        "--run-dir",
        str(run_dir),
        "--size",
        size,
        "--strategy",
        strategy,
        "--device",
        args.device,
    ]
    for key in ("steps", "warmup", "batch_size", "seq_len", "vocab", "granularity", "num_random"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]),
    }
    logger.info("%s / %s: %s", size, strategy, " ".join(cmd))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, code = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace"), None
    wall = time.perf_counter() - start
    result_file = run_dir / "result.json"
    if code == 0 and result_file.is_file():
        result = json.loads(result_file.read_text())
    elif "out of memory" in output.lower() or "OutOfMemoryError" in output:
        result = {"status": "oom"}
    else:
        result = {"status": "error" if code is not None else "timeout", "exit_code": code, "log_tail": output[-3000:]}
    result["wall_seconds"] = wall
    return result


def render(results: dict) -> str:
    lines = [
        "| size | strategy | status | trainable params | peak GiB/GPU (alloc) | s/step | tokens/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for size, by_strategy in results.items():
        for strategy, r in by_strategy.items():
            peak = max((p for p in r.get("peak_allocated_gib_per_gpu") or [] if p is not None), default=None)
            lines.append(
                f"| {size} | {strategy} | {r['status']} | {r.get('trainable_parameters', 0) / 1e9:.2f} B | "
                f"{'-' if peak is None else f'{peak:.1f}'} | {_fmt(r.get('seconds_per_step'))} | {_fmt(r.get('tokens_per_second'), 0)} |"
            )
    return "\n".join(lines)


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--nproc", type=int, default=2, help="GPUs (processes) per run")
    parser.add_argument("--sizes", default="1b,3b,8b", help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, from {list(STRATEGIES)}")
    parser.add_argument("--steps", type=int, default=5, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per GPU per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--granularity", type=int, default=256, help="NSN rank granularity (the sampler's grid)")
    parser.add_argument("--num-random", type=int, default=2, help="random ranks per step besides max and min")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per launch")
    parser.add_argument("--out", default="fsdp_scale.json")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.worker:
        worker(args)
        exit_worker()
        return
    sizes = [s for s in args.sizes.split(",") if s]
    strategies = [s for s in args.strategies.split(",") if s]
    bad = [s for s in sizes if s not in SIZES] + [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise SystemExit(f"unknown sizes/strategies {bad}; sizes: {list(SIZES)}, strategies: {list(STRATEGIES)}")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="nsn_scale_"))
    results: dict[str, dict[str, dict]] = {}
    stopped: set[str] = set()
    for size in sizes:
        results[size] = {}
        for strategy in strategies:
            if strategy in stopped:
                results[size][strategy] = {"status": "skipped (out of memory at a smaller size)"}
                continue
            results[size][strategy] = launch(args, size, strategy, work / f"{size}_{strategy}")
            if results[size][strategy]["status"] == "oom":
                stopped.add(strategy)
            logger.info(
                "%s / %s: %s", size, strategy, {k: v for k, v in results[size][strategy].items() if k != "log_tail"}
            )
    largest = {
        s: max((size for size in sizes if results[size][s]["status"] == "ok"), key=sizes.index, default=None)
        for s in strategies
    }
    from nsn_peft.io import write_json

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    write_json(
        args.out,
        {
            "config": {k: v for k, v in vars(args).items() if k not in ("worker", "run_dir", "size", "strategy")},
            "device": gpu,
            "torch": torch.__version__,
            "results": results,
            "largest_ok": largest,
        },
    )
    print(f"\n{args.nproc} x {gpu}\n" + render(results))
    print(f"largest size that trained: {largest}\nresults: {args.out}")


if __name__ == "__main__":
    main()
