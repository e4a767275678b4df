"""What importing nsn-peft costs other PEFT methods: a LoRA adapter's save and load, with and without the patches.

The patched PEFT functions (docs/architecture.md, "The PEFT boundary") first check whether an NSN adapter is
involved; this times a LoRA ``save_pretrained`` and ``PeftModel.from_pretrained`` (plus the weight reader alone)
through PEFT's original functions and through the patched ones, alternating in one process, and prints the
ratios. Writes JSON::

    python benchmarks/bench_peft_boundary.py --out benchmarks/results/peft_boundary_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peft_boundary_cpu.json"))
    args = parser.parse_args()

    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import save_and_load

    originals = {
        "save": PeftModel.save_pretrained,
        "card": PeftModel.create_or_update_model_card,
        "reader": save_and_load.safe_load_file,
    }
    import nsn_peft  # noqa: F401  (installs the patches)

    patched = {
        "save": PeftModel.save_pretrained,
        "card": PeftModel.create_or_update_model_card,
        "reader": save_and_load.safe_load_file,
    }

    def use(functions: dict) -> None:
        PeftModel.save_pretrained = functions["save"]
        PeftModel.create_or_update_model_card = functions["card"]
        save_and_load.safe_load_file = functions["reader"]

    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4, vocab_size=512
    )
    torch.manual_seed(0)
    clean = transformers.LlamaForCausalLM(config)
    model = get_peft_model(copy.deepcopy(clean), LoraConfig(r=16, target_modules="all-linear"))
    times: dict[str, dict[str, list[float]]] = {
        k: {"peft": [], "with nsn-peft": []} for k in ("save", "load", "reader")
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "lora"
        model.save_pretrained(folder)
        for i in range(args.repeats):
            for label, functions in (("peft", originals), ("with nsn-peft", patched))[:: 1 if i % 2 else -1]:
                use(functions)
                start = time.perf_counter()
                model.save_pretrained(folder)
                times["save"][label].append(time.perf_counter() - start)
                base = copy.deepcopy(clean)  # a fresh base model each time (from_pretrained injects into it)
                start = time.perf_counter()
                PeftModel.from_pretrained(base, folder)
                times["load"][label].append(time.perf_counter() - start)
                start = time.perf_counter()
                save_and_load.safe_load_file(str(folder / "adapter_model.safetensors"))
                times["reader"][label].append(time.perf_counter() - start)
        # The only work the patches add to a LoRA load: one scan of the state dict's keys for NSN factors.
        from nsn_peft.tuner.loading import has_nsn_factors

        weights = save_and_load.safe_load_file(str(folder / "adapter_model.safetensors"))
        start = time.perf_counter()
        for _ in range(1000):
            has_nsn_factors(weights)
        scan_us = (time.perf_counter() - start) / 1000 * 1e6
    use(patched)
    result = {"key_scan_us": scan_us}
    print(f"key scan for NSN factors ({len(weights)} LoRA tensors): {scan_us:.1f} us per load")
    for case, runs in times.items():  # noisy where other processes share the cores: compare with the scan
        plain, nsn = statistics.median(runs["peft"]), statistics.median(runs["with nsn-peft"])
        result[case] = {"peft_ms": plain * 1e3, "with_nsn_peft_ms": nsn * 1e3, "ratio": nsn / plain}
        print(f"{case:>6}: PEFT {plain * 1e3:8.2f} ms, with nsn-peft {nsn * 1e3:8.2f} ms, ratio {nsn / plain:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "lora_layers": 56, "cases": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
