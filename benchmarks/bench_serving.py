"""Serving an NSN model vs the dense model: memory, prefill and decode speed, rank switching (one H100).

A Llama-3-8B-shaped model (32 blocks, hidden 4096, MLP 14336, GQA 32/8 heads, vocabulary 128256) with random
bf16 weights is measured dense first; then the *same* model object is adapted in place with
``NSNConfig(max_rank="break-even", keep_base_weights=False)`` on all 224 linear layers of the blocks (each
dense weight is freed as soon as its factors exist, so the process never holds both models) and measured at
FLOPs fractions 1.0 / 0.75 / 0.5 / 0.25 (each layer at the largest rank on the 64-grid within that fraction
of its dense FLOPs). Factors are random: a matmul's speed does not depend on its values, and 224 SVDs of an
8B model would dominate the run. Last, a fresh model is adapted at full rank (``max_rank=None``), factors
only, for its memory.

Measured, with the same inputs for every model:

- memory: bytes of parameters and buffers (what the model holds), and CUDA memory allocated;
- prefill: tokens/s of one eager forward over b1×2048 and b8×2048 tokens (``logits_to_keep=1``);
- decode: tokens/s of greedy decoding, 128 new tokens after a 128-token prompt, batch 1 and 16, with a
  static KV cache and the decode step compiled (``torch.compile(mode="reduce-overhead")``: CUDA graphs,
  argmax inside the graph, no host sync per token; the loop a server runs), and eagerly (8 tokens);
- rank switching: the ranks are warmed once with :func:`nsn_peft.compile_for_ranks`; then switching among
  them is timed and the graphs dynamo compiles are counted (``switch_recompiles``).

Ratios are NSN / dense speed (dense memory / NSN memory for ``memory_ratio``: NSN bytes over dense bytes).

    python benchmarks/bench_serving.py --out benchmarks/results/serving_8b.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from peft import get_peft_model

import nsn_peft
from nsn_peft.tuner.layer import NSNLinear
from nsn_peft.tuner.peft_type import checkpoint_load_scope

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
SHAPE_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "num_hidden_layers": 32,
}
SHAPE_TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "num_hidden_layers": 2,
}

logger = logging.getLogger("bench_serving")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = "cpu" if args.tiny_cpu else "cuda"
        self.shape = dict(SHAPE_TINY if args.tiny_cpu else SHAPE_8B)
        if args.layers:
            self.shape["num_hidden_layers"] = args.layers
        self.prefill_len = 64 if args.tiny_cpu else args.prefill_len
        self.mode = None if args.tiny_cpu else "reduce-overhead"
        gen = torch.Generator(self.device).manual_seed(0)
        vocab = self.shape["vocab_size"]
        self.prompts = {
            b: torch.randint(0, vocab, (b, args.prompt_len), device=self.device, generator=gen) for b in (1, 16)
        }
        self.prefill_inputs = {
            b: torch.randint(0, vocab, (b, self.prefill_len), device=self.device, generator=gen) for b in (1, 8)
        }
        self.started = time.perf_counter()

    # -- helpers ---------------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def build_dense(self) -> transformers.PreTrainedModel:
        config = transformers.LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **self.shape)
        torch.manual_seed(0)
        with torch.device(self.device):
            model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        return model.eval()

    @staticmethod
    def held_bytes(model: torch.nn.Module) -> int:
        seen, total = set(), 0
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_meta or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
        return total

    def allocated(self) -> Optional[int]:
        return torch.cuda.memory_allocated() if self.device == "cuda" else None

    def timed(self, fn: Callable[[], Any], repeats: int) -> float:
        """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
        fn()
        samples = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    # -- prefill -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill_tps(self, model, batch: int) -> float:
        ids = self.prefill_inputs[batch]
        seconds = self.timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), self.args.repeats)
        return batch * ids.shape[1] / seconds

    # -- decode --------------------------------------------------------------------------------------------
    def decode_runner(self, model, batch: int, compiled_step: Optional[Callable]) -> Callable[[int], torch.Tensor]:
        """A function that greedily decodes ``n`` tokens after the prompt with a static KV cache."""
        prompt = self.prompts[batch]
        length = prompt.shape[1]
        cache = transformers.StaticCache(config=model.config, max_cache_len=length + self.args.new_tokens + 8)
        positions = torch.arange(length, length + self.args.new_tokens + 8, device=self.device)

        def step(ids, position):
            out = model(input_ids=ids, past_key_values=cache, cache_position=position, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].argmax(-1, keepdim=True)

        run_step = compiled_step(step) if compiled_step is not None else step

        @torch.no_grad()
        def run(n: int) -> torch.Tensor:
            cache.reset()
            token = step(prompt, positions.new_tensor(list(range(length))))  # prefill, eager
            tokens = [token]
            for i in range(n - 1):
                if compiled_step is not None:
                    torch.compiler.cudagraph_mark_step_begin()
                token = run_step(token, positions[i : i + 1]).clone()
                tokens.append(token)
            return torch.cat(tokens, dim=1)

        return run

    def decode_tps(self, run: Callable[[int], torch.Tensor], batch: int, new_tokens: int, repeats: int) -> float:
        """Decode tokens/s, prefill excluded: (time of n tokens − time of 1 token) over the n − 1 decode steps."""
        full = self.timed(lambda: run(new_tokens), repeats)
        first = self.timed(lambda: run(1), repeats)
        return batch * (new_tokens - 1) / max(full - first, 1e-9)

    def compiler(self) -> Callable:
        mode = self.mode
        return lambda fn: torch.compile(fn, mode=mode)

    # -- one model at many ranks ----------------------------------------------------------------------
    def measure(self, model, label: str, rank_points: list[tuple[str, Any]], peft_model=None) -> dict[str, dict]:
        """Prefill, eager and compiled decode at every rank point (the compiled step is shared by all)."""
        results: dict[str, dict] = {name: {} for name, _ in rank_points}
        for name, spec in rank_points:
            if spec is not None:
                peft_model.set_rank(spec)
            row = results[name]
            if peft_model is not None:
                report = nsn_peft.estimate_flops(peft_model)
                row["flops_fraction"] = report.targeted_fraction
                row["mean_rank"] = statistics.mean(nsn_peft.get_rank(peft_model).values())
            for batch in (1, 8):
                row[f"prefill_b{batch}_tps"] = self.prefill_tps(model, batch)
            for batch in (1, 16):
                run = self.decode_runner(model, batch, None)
                row[f"decode_b{batch}_eager_tps"] = self.decode_tps(run, batch, self.args.eager_tokens, 1)
            logger.info("%s %s: %s", label, name, {k: round(v, 1) for k, v in row.items()})
            print(f"{label} {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
        compile_step = self.compiler()
        for batch in (1, 16):
            run = self.decode_runner(model, batch, compile_step)
            points = [spec for _, spec in rank_points]
            if peft_model is not None:
                warm = nsn_peft.compile_for_ranks(peft_model, points, warmup=lambda run=run: run(3))
                warm_info = {"seconds": warm.seconds, "new_graphs": warm.new_graphs}
            else:
                start = time.perf_counter()
                before = nsn_peft.tuner.compile.compiled_graph_count()
                run(3)
                warm_info = {
                    "seconds": [time.perf_counter() - start],
                    "new_graphs": [nsn_peft.tuner.compile.compiled_graph_count() - before],
                }
            for (name, _spec), seconds, graphs in zip(rank_points, warm_info["seconds"], warm_info["new_graphs"]):
                results[name][f"warm_b{batch}_s"] = seconds
                results[name][f"warm_b{batch}_graphs"] = graphs
            for name, spec in rank_points:
                if spec is not None:
                    peft_model.set_rank(spec)
                before = nsn_peft.tuner.compile.compiled_graph_count()
                results[name][f"decode_b{batch}_tps"] = self.decode_tps(
                    run, batch, self.args.new_tokens, self.args.repeats
                )
                results[name][f"decode_b{batch}_new_graphs"] = nsn_peft.tuner.compile.compiled_graph_count() - before
                print(
                    f"{label} {name}: compiled decode b{batch} {results[name][f'decode_b{batch}_tps']:.1f} tokens/s "
                    f"(warm-up {results[name][f'warm_b{batch}_s']:.1f}s, {results[name][f'warm_b{batch}_graphs']} graph(s))",
                    flush=True,
                )
            if peft_model is not None and batch == 1:
                results["_switch"] = self.switch_cost(peft_model, run, rank_points)
        return results

    def switch_cost(self, peft_model, run, rank_points) -> dict:
        """Switch among the warmed ranks (twice round): set_rank time, first decode after it, graphs compiled."""
        rows = []
        for _ in range(2):
            for name, spec in rank_points:
                before = nsn_peft.tuner.compile.compiled_graph_count()
                self.sync()
                start = time.perf_counter()
                peft_model.set_rank(spec)
                set_s = time.perf_counter() - start
                run(2)
                self.sync()
                rows.append(
                    {
                        "to": name,
                        "set_rank_ms": set_s * 1e3,
                        "first_call_ms": (time.perf_counter() - start) * 1e3,
                        "recompiles": nsn_peft.tuner.compile.compiled_graph_count() - before,
                    }
                )
        print(
            "rank switches:",
            [(r["to"], round(r["set_rank_ms"], 2), round(r["first_call_ms"], 1), r["recompiles"]) for r in rows],
            flush=True,
        )
        return {"switches": rows, "recompiles": sum(r["recompiles"] for r in rows)}

    # -- NSN models -------------------------------------------------------------------------------------
    def adapt(self, model, **config_kwargs):
        """NSN on every linear layer of the blocks, factors only, random factors (no SVD); peak memory recorded."""
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        config = nsn_peft.NSNConfig(target_modules="all-linear", keep_base_weights=False, **config_kwargs)
        with checkpoint_load_scope():  # factors are not computed here: they are installed below, layer by layer
            peft_model = get_peft_model(model, config)
        gen = torch.Generator(self.device).manual_seed(1)
        for layer in peft_model.modules():
            if isinstance(layer, NSNLinear):
                r, m, d = layer.nsn_max_rank["default"], layer.out_features, layer.in_features
                a = torch.randn(r, d, device=self.device, generator=gen, dtype=torch.bfloat16) * d**-0.5
                b = torch.randn(m, r, device=self.device, generator=gen, dtype=torch.bfloat16) * r**-0.5
                layer.set_factors("default", b, a)
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else None
        return peft_model.eval(), peak


TARGETS = {  # the targets: FLOPs fraction -> minimum speed ratio vs dense
    "prefill_b8_ratio": {0.75: 1.25, 0.5: 1.7, 0.25: 2.8},
    "prefill_b1_ratio": {0.75: 1.2, 0.5: 1.6, 0.25: 2.4},
    "decode_b1_ratio": {0.75: 1.2, 0.5: 1.5, 0.25: 2.4},
    "decode_b16_ratio": {0.75: 1.2, 0.5: 1.45, 0.25: 2.2},
}


def plot(result: dict, path: Path) -> None:
    """Speed ratios vs dense per FLOPs fraction (targets as open markers), memory in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["fractions"]
    xs = [float(name) for name in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = {
        "prefill_b1_ratio": "prefill b1×2048",
        "prefill_b8_ratio": "prefill b8×2048",
        "decode_b1_ratio": "decode b1 (compiled)",
        "decode_b16_ratio": "decode b16 (compiled)",
    }
    for (key, label), color in zip(labels.items(), ["C0", "C1", "C2", "C3"]):
        ax.plot(xs, [rows[n][key] for n in rows], "o-", color=color, label=label)
        targets = TARGETS[key]
        ax.plot(list(targets), list(targets.values()), "o", mfc="none", color=color, ms=9)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("FLOPs fraction of the dense model (break-even max rank × fraction)")
    ax.set_ylabel("speed vs dense (×)")
    ax.invert_xaxis()
    memory = next(iter(rows.values()))["memory_ratio"]
    full = result.get("full_rank_factors", {}).get("memory_ratio")
    ax.set_title(
        f"Llama-3-8B-shaped, H100, factors only: memory {memory:.3f}× dense"
        + (f" (full-rank factors {full:.2f}×)" if full else ""),
        fontsize=10,
    )
    ax.legend(fontsize=8, title="filled: measured, open: target", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def ratio(nsn: dict, dense: dict, key: str) -> Optional[float]:
    if key not in nsn or key not in dense:
        return None
    return nsn[key] / dense[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="blocks (default 32)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--eager-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    parser.add_argument("--skip-full-rank", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tiny-cpu", action="store_true", help="tiny model on the CPU (checks the script runs)")
    parser.add_argument("--plot", type=Path, default=None, help="also write the ratio plot (PNG) here")
    parser.add_argument("--plot-only", type=Path, default=None, metavar="JSON", help="only plot a results file")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot or args.plot_only.with_suffix(".png"))
        return
    logging.basicConfig(level=logging.WARNING)
    torch._dynamo.config.automatic_dynamic_shapes = False  # batch 1 and 16 each get their own static graph
    bench = Bench(args)
    fractions = [float(f) for f in args.fractions.split(",")]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if bench.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": bench.shape,
        "dtype": "bf16",
        "prompt_len": args.prompt_len,
        "prefill_len": bench.prefill_len,
        "new_tokens": args.new_tokens,
        "decode": "greedy, static KV cache, step compiled with torch.compile(mode='reduce-overhead'), argmax in graph",
    }

    def save() -> None:
        if args.out:
            nsn_peft.io.write_json(args.out, result)

    # 1. dense
    model = bench.build_dense()
    dense_bytes, dense_alloc = bench.held_bytes(model), bench.allocated()
    dense = bench.measure(model, "dense", [("dense", None)])["dense"]
    dense.update({"bytes": dense_bytes, "allocated": dense_alloc})
    result["dense"] = dense
    save()
    torch._dynamo.reset()

    # 2. the same model, break-even max ranks, factors only
    peft_model, peak = bench.adapt(model, max_rank="break-even")
    nsn_bytes, nsn_alloc = bench.held_bytes(peft_model), bench.allocated()
    result["nsn_build"] = {
        "bytes": nsn_bytes,
        "allocated": nsn_alloc,
        "peak_allocated_while_adapting": peak,
        "max_ranks": sorted(set(nsn_peft.get_max_rank(peft_model).values())),
    }
    points = []
    for f in fractions:
        spec = nsn_peft.select_rank_for_target_flops(peft_model, f, per_layer=True)
        points.append((f"{f:g}", spec))
    base = peft_model.base_model.model
    measured = bench.measure(base, "nsn", points, peft_model=peft_model)
    switch = measured.pop("_switch", None)
    result["switch"] = switch
    per_fraction = {}
    for name, row in measured.items():
        row.update(
            {
                "memory_ratio": nsn_bytes / dense_bytes,
                "allocated_ratio": nsn_alloc / dense_alloc if dense_alloc else None,
                "prefill_b1_ratio": ratio(row, dense, "prefill_b1_tps"),
                "prefill_b8_ratio": ratio(row, dense, "prefill_b8_tps"),
                "decode_b1_ratio": ratio(row, dense, "decode_b1_tps"),
                "decode_b16_ratio": ratio(row, dense, "decode_b16_tps"),
                "decode_b1_eager_ratio": ratio(row, dense, "decode_b1_eager_tps"),
                "decode_b16_eager_ratio": ratio(row, dense, "decode_b16_eager_tps"),
                "switch_recompiles": sum(s["recompiles"] for s in switch["switches"] if s["to"] == name)
                if switch
                else None,
            }
        )
        per_fraction[name] = row
    result["fractions"] = per_fraction
    save()
    del peft_model, base, model
    torch._dynamo.reset()
    if bench.device == "cuda":
        torch.cuda.empty_cache()

    # 3. full-rank factors, factors only: memory
    if not args.skip_full_rank:
        full_model, full_peak = bench.adapt(bench.build_dense(), max_rank=None)
        result["full_rank_factors"] = {
            "bytes": bench.held_bytes(full_model),
            "memory_ratio": bench.held_bytes(full_model) / dense_bytes,
            "allocated": bench.allocated(),
            "peak_allocated_while_adapting": full_peak,
        }
        del full_model
    result["seconds"] = time.perf_counter() - bench.started
    save()

    keys = [
        "flops_fraction",
        "memory_ratio",
        "prefill_b1_ratio",
        "prefill_b8_ratio",
        "decode_b1_ratio",
        "decode_b16_ratio",
        "decode_b1_eager_ratio",
        "decode_b16_eager_ratio",
        "switch_recompiles",
    ]
    print("\nfraction | " + " | ".join(keys))
    for name, row in per_fraction.items():
        print(f"{name:>8} | " + " | ".join("-" if row.get(k) is None else f"{row[k]:.3f}" for k in keys))
    if args.plot:
        plot(result, args.plot)
    if "full_rank_factors" in result:
        print(f"full-rank factors (factors only): memory {result['full_rank_factors']['memory_ratio']:.3f}x dense")
    print(
        f"dense: {dense_bytes / 2**30:.2f} GiB held; NSN break-even: {nsn_bytes / 2**30:.2f} GiB; "
        f"total {result['seconds']:.0f}s"
    )


if __name__ == "__main__":
    main()
