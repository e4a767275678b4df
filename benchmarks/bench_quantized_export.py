"""Low rank and int8 stack: size and perplexity of SmolLM2-135M dense, int8, "60% kept" and "60% kept + int8".

"60% kept" is nsn-peft's training-free compression (whitened factors at loss-weighted per-layer ranks from
``allocate_ranks_for_budget``, as the ``mixed`` row of ``bench_task_accuracy.py``), exported with
``save_compressed`` and loaded back as a transformers model. int8 is torchao's weight-only quantization
(``Int8WeightOnlyConfig``: one scale per output row) of every linear layer of the blocks, factors included; the
embedding and the LM head tied to it stay as they are in every row. Perplexity is on held-out Python HOWTOs
(calibration uses the tutorial, library and FAQ parts).

    python benchmarks/bench_quantized_export.py --out benchmarks/results/quantized_export.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn

from nsn_peft import (
    NSNConfig,
    allocate_ranks_for_budget,
    collect_activation_stats,
    collect_gradient_stats,
    evaluate_perplexity,
    load_compressed,
    save_compressed,
)
from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
from nsn_peft.hub import load_model_and_tokenizer

CALIBRATION_PARTS = ("tutorial", "library", "faq")


def _leaves(tensor: torch.Tensor):
    """The plain tensors a tensor subclass (torchao's quantized weights) is made of; a plain tensor itself."""
    if hasattr(tensor, "__tensor_flatten__"):
        for name in tensor.__tensor_flatten__()[0]:
            yield from _leaves(getattr(tensor, name))
    else:
        yield tensor


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held (a torchao tensor: its int8 data and scales)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        for leaf in _leaves(tensor):
            key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset(), tuple(leaf.shape))
            if key not in seen:
                seen.add(key)
                total += leaf.numel() * leaf.element_size()
    return total


def int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(
        model,
        Int8WeightOnlyConfig(),
        filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and "lm_head" not in fqn,
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kept", type=float, default=0.6, help="share of the targeted layers' parameters kept")
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--gradient-tokens", type=int, default=4096)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    base, tok = load_model_and_tokenizer(None, dtype="float32")
    texts = [t for part in CALIBRATION_PARTS for t in load_texts(python_docs_dir(part))]
    random.Random(0).shuffle(texts)
    train = token_blocks(texts, tok, args.seq_len, args.calib_tokens)
    held_out = token_stream(load_texts(python_docs_dir("howto")), tok, args.ppl_tokens)
    t = time.perf_counter()
    stats = collect_activation_stats(
        base, train, max_tokens=None, seq_len=args.seq_len, batch_size=4, show_progress=True
    )
    grads = collect_gradient_stats(
        base,
        train[: max(1, args.gradient_tokens // args.seq_len)],
        max_tokens=None,
        seq_len=args.seq_len,
        batch_size=2,
        show_progress=True,
    )
    plan = allocate_ranks_for_budget(base, stats, args.kept, gradient_stats=grads, show_progress=True)
    nsn = get_peft_model(copy.deepcopy(base), NSNConfig(**plan.to_config_kwargs(stats=stats))).eval()
    compression_s = time.perf_counter() - t
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(nsn, Path(tmp) / "kept")
        kept = load_compressed(Path(tmp) / "kept")
        del nsn
        candidates = {
            "dense": lambda: base,
            "dense + int8": lambda: int8(copy.deepcopy(base)),
            f"{args.kept:.0%} kept": lambda: kept,
            f"{args.kept:.0%} kept + int8": lambda: int8(copy.deepcopy(kept)),
        }
        for label, build in candidates.items():
            model = build()
            result = evaluate_perplexity(model, held_out, seq_len=args.seq_len, batch_size=2)
            rows[label] = {"perplexity": result["perplexity"], "tokens": result["tokens"], "bytes": weight_bytes(model)}
            print(json.dumps({label: rows[label]}), flush=True)
    dense_bytes = rows["dense"]["bytes"]
    print(f"\n| model | size (MB) | vs dense | perplexity (Python HOWTOs, {rows['dense']['tokens']} tokens) |")
    print("|---|---:|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['bytes'] / 1e6:.0f} | {row['bytes'] / dense_bytes:.2f} | {row['perplexity']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "model": "SmolLM2-135M-Instruct (embedded)",
                    "kept": args.kept,
                    "torch": torch.__version__,
                    "calibration_tokens": int(train.numel()),
                    "gradient_tokens": args.gradient_tokens,
                    "compression_seconds": round(compression_s, 1),
                    "threads": args.threads,
                    "rows": rows,
                    "note": "int8: torchao Int8WeightOnlyConfig on every linear layer of the blocks; embedding/LM head (tied) as they are",
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
