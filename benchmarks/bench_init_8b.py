"""Initialisation time of NSN on a Llama-3-8B-shaped model, and the cost of ``set_rank``.

Builds a randomly initialised Llama-3-8B-shaped model in bf16 on the GPU (vocabulary shrunk: embeddings
are not adapted), adapts all 224 linear layers at full rank, and compares with the naive baseline
(``torch.linalg.svd`` in fp32 per layer) measured in the same run. The baseline runs on ``--naive-blocks``
transformer blocks and is extrapolated linearly to all 32 (every block has the same seven shapes).

    python benchmarks/bench_init_8b.py --out results/init_8b.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import transformers
from peft import get_peft_model

import nsn_peft
from nsn_peft.tuner.layer import NSNLinear


def build_model(layers: int, device: str) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=1024,
        max_position_embeddings=8192,
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def naive_svd_seconds(model, blocks: int) -> tuple[float, int]:
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    per_block = len(linears) // model.config.num_hidden_layers
    subset = linears[: blocks * per_block]
    torch.linalg.svd(subset[0].weight.float(), full_matrices=False)  # warm-up (cuSOLVER handles)
    sync()
    start = time.perf_counter()
    for layer in subset:
        u, s, vh = torch.linalg.svd(layer.weight.float(), full_matrices=False)
        root = s.sqrt()
        b, a = (u * root).to(torch.bfloat16), (root[:, None] * vh).to(torch.bfloat16)
        del u, s, vh, b, a
    sync()
    return time.perf_counter() - start, len(subset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--naive-blocks", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = build_model(args.layers, args.device)
    n_linear = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".layers." in n)
    naive_s, naive_n = naive_svd_seconds(model, args.naive_blocks)
    naive_total = naive_s * n_linear / naive_n

    # Warm the eigensolver once so the timing is not dominated by library loading.
    nsn_peft.linalg.decompose.svd_factors(torch.randn(256, 256, device=args.device))
    sync()
    start = time.perf_counter()
    peft_model = get_peft_model(model, nsn_peft.NSNConfig(target_modules="all-linear"))
    sync()
    nsn_s = time.perf_counter() - start
    layers = [m for m in peft_model.modules() if isinstance(m, NSNLinear)]

    # Exactness at full rank on one layer of each shape (bf16 storage bounds the error).
    errors = {}
    for layer in layers[:7]:
        w = layer.dense_weight().float()
        err = (layer.effective_weight("default").float() - w).abs().max() / w.abs().max()
        errors[layer.module_name.split(".")[-1]] = float(err)

    # set_rank on the whole model: time per call and proof that no tensor is copied.
    ptrs = [layer.nsn_A["default"].data_ptr() for layer in layers]
    allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    ranks = [64, 1024, 4096, 512]
    peft_model.set_rank(ranks[0])
    calls = 2000
    start = time.perf_counter()
    for i in range(calls):
        peft_model.set_rank(ranks[i % len(ranks)])
    set_rank_ms = (time.perf_counter() - start) / calls * 1e3
    copies = sum(p != layer.nsn_A["default"].data_ptr() for p, layer in zip(ptrs, layers))
    extra_bytes = (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) - allocated

    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "linear_layers": n_linear,
        "nsn_init_s": nsn_s,
        "naive_svd_fp32_s_extrapolated": naive_total,
        "naive_measured_layers": naive_n,
        "naive_measured_s": naive_s,
        "speedup_vs_naive": naive_total / nsn_s,
        "full_rank_rel_error_bf16": errors,
        "set_rank_ms": set_rank_ms,
        "set_rank_tensor_copies": copies,
        "set_rank_extra_bytes": extra_bytes,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    print(
        f"\nNSN init of {n_linear} layers: {nsn_s:.1f} s  vs naive fp32 SVD loop {naive_total:.1f} s "
        f"-> {naive_total / nsn_s:.1f}x faster (target: <= 30 s and >= 5x)"
    )
    print(f"set_rank on the whole model: {set_rank_ms * 1e3:.1f} us per call, {copies} tensor copies (target < 1 ms)")
    if args.out:
        nsn_peft.io.write_json(args.out, result)


if __name__ == "__main__":
    main()
