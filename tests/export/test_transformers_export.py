"""Compressed and nested exports are transformers models: they open in a fresh process without nsn-peft or PEFT
(``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``) and compute what the NSN model computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import tiny_gpt2, tiny_llama, tiny_neox, tiny_opt

from nsn_peft import NSNConfig, load_compressed, save_compressed
from nsn_peft.export import is_factored_linear
from nsn_peft.tuner.ranks import nsn_layers


def tiny_mistral() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    return transformers.MistralForCausalLM(config).eval()


def tiny_qwen2() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


def tiny_gemma() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=101,
        max_position_embeddings=64,
    )
    return transformers.GemmaForCausalLM(config).eval()


FAMILIES = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "gemma": tiny_gemma,
    "gpt2": tiny_gpt2,
    "neox": tiny_neox,
    "opt": tiny_opt,
}

# Loads each export with transformers alone: nsn_peft and peft are made unimportable first.
FRESH_LOADER = r"""
import json, sys
sys.modules["nsn_peft"] = None
sys.modules["peft"] = None
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

jobs = json.loads(sys.argv[1])
for job in jobs:
    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=True)
    ids = torch.tensor(job["ids"])
    logits = {}
    for budget in job["budgets"] or [None]:
        if budget is not None:
            model.set_budget(budget)
        with torch.no_grad():
            logits[str(budget)] = model(ids).logits.contiguous()
    factored = [n for n, m in model.named_modules() if type(m).__name__ == "FactoredLinear"]
    save_file(logits, job["out"], metadata={"class": type(model).__name__, "factored": json.dumps(factored)})
"""


def run_fresh(jobs: list[dict], tmp_path: Path) -> None:
    """Run FRESH_LOADER on ``jobs`` in a new interpreter (its own module cache for the folders' code)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_LOADER, json.dumps(jobs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _mixed_ranks(model) -> dict[str, int]:
    """Rank 4 everywhere, except one layer at its full rank (where factoring does not pay: written dense)."""
    layers = nsn_layers(model)
    ranks = {name: min(4, layer.full_rank) for name, layer in layers.items()}
    first = next(iter(layers))
    ranks[first] = layers[first].full_rank
    return ranks


def test_every_family_exports_a_transformers_model_equal_to_the_nsn_model(tmp_path, input_ids):
    jobs, expected, dense_layers = [], {}, {}
    for family, factory in FAMILIES.items():
        model = get_peft_model(factory(), NSNConfig(init="svd"))
        ranks = _mixed_ranks(model)
        model.set_rank(ranks)
        with torch.no_grad():
            expected[family] = model(input_ids).logits
        folder = save_compressed(model, tmp_path / family)
        config = json.loads((folder / "config.json").read_text())
        first = next(iter(ranks))
        assert first in config["nsn_dense_layers"] and first not in config["nsn_ranks"]
        assert config["nsn_ranks"] == {n: r for n, r in ranks.items() if n != first}
        architecture = type(model.get_base_model()).__name__
        assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_nsn.NSNCompressed{architecture}"}
        assert config["model_type"] == model.get_base_model().config.model_type
        dense_layers[family] = first
        jobs.append(
            {"dir": str(folder), "ids": input_ids.tolist(), "budgets": None, "out": str(tmp_path / f"{family}.out")}
        )
        # In this process, through nsn-peft's own copy of the class (the folder's code is not run).
        loaded = load_compressed(folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids).logits, expected[family], rtol=1e-4, atol=1e-5)
        assert not is_factored_linear(loaded.get_submodule(first))
    run_fresh(jobs, tmp_path)
    for family in FAMILIES:
        with safe_open(str(tmp_path / f"{family}.out"), framework="pt") as handle:
            meta = handle.metadata()
        assert meta["class"].startswith("NSNCompressed"), family  # the folder's own modeling code ran
        assert dense_layers[family] not in json.loads(meta["factored"]) and json.loads(meta["factored"]), family
        out = load_file(tmp_path / f"{family}.out")
        torch.testing.assert_close(out["None"], expected[family], rtol=1e-4, atol=1e-5, msg=family)


def _nested_model():
    base = tiny_llama()
    targets = ["up_proj", "gate_proj", "down_proj", "q_proj"]
    names = [f"model.layers.{i}.{'mlp' if t != 'q_proj' else 'self_attn'}.{t}" for i in range(2) for t in targets]
    low = {n: 2 + i % 3 for i, n in enumerate(names)}
    plans = {0.25: low, 0.5: {n: r + 4 for n, r in low.items()}, 1.0: {n: r + 10 for n, r in low.items()}}
    return get_peft_model(base, NSNConfig(target_modules=targets, init="svd", budget_plans=plans)), plans


def test_nested_export_switches_budgets_on_the_plain_transformers_model(tmp_path, input_ids):
    model, plans = _nested_model()
    expected = {}
    for budget in sorted(plans):
        model.set_rank(flops=budget)
        with torch.no_grad():
            expected[budget] = model(input_ids).logits
    model.set_rank(flops=0.5)
    folder = save_compressed(model, tmp_path / "nested")
    config = json.loads((folder / "config.json").read_text())
    assert config["nsn_active_budget"] == 0.5 and config["nsn_ranks"] == plans[0.5]
    assert config["nsn_max_ranks"] == plans[1.0]  # the largest plan's factors are kept
    assert sorted(map(float, config["nsn_budget_plans"])) == [0.25, 0.5, 1.0]
    card = (folder / "README.md").read_text()
    assert "## Budgets" in card and "set_budget" in card
    loaded = load_compressed(folder)
    assert loaded.budgets() == [0.25, 0.5, 1.0]
    loaded.set_budget(0.25)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected[0.25], rtol=1e-4, atol=1e-5)
    assert loaded.get_ranks() == plans[0.25]
    with pytest.raises(ValueError, match=r"no stored plan for budget 0.3; this model has plans for \[0.25, 0.5, 1.0\]"):
        loaded.set_budget(0.3)
    with pytest.raises(ValueError, match="stores rank"):
        loaded.set_ranks({next(iter(plans[1.0])): 99})
    # transformers' own save_pretrained (what push_to_hub uploads) writes a folder that opens the same way.
    loaded.save_pretrained(tmp_path / "pretrained")
    assert (tmp_path / "pretrained" / "modeling_nsn.py").is_file()
    ids = input_ids.tolist()
    jobs = [
        {"dir": str(folder), "ids": ids, "budgets": [0.25, 1.0, 0.5], "out": str(tmp_path / "n.out")},
        {"dir": str(tmp_path / "pretrained"), "ids": ids, "budgets": None, "out": str(tmp_path / "p.out")},
    ]
    run_fresh(jobs, tmp_path)
    out = load_file(tmp_path / "n.out")
    for budget in (0.25, 0.5, 1.0):
        torch.testing.assert_close(out[str(budget)], expected[budget], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(load_file(tmp_path / "p.out")["None"], expected[0.25], rtol=1e-4, atol=1e-5)
    # Saved again as it runs (budget 0.25 active), the copy starts there and still holds every plan.
    save_compressed(loaded, tmp_path / "again")
    again = load_compressed(tmp_path / "again")
    assert again.get_ranks() == plans[0.25] and again.budgets() == [0.25, 0.5, 1.0]
    flat = save_compressed(model, tmp_path / "flat", nested=False)
    assert json.loads((flat / "config.json").read_text())["nsn_max_ranks"] == plans[0.5]
    with pytest.raises(ValueError, match="needs an adapter with budget plans"):
        save_compressed(
            get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj"])), tmp_path / "x", nested=True
        )


def write_first_format(model, folder: Path) -> None:
    """A folder as the first export format wrote it (nsn_compression.json + nsn_factors.safetensors)."""
    from safetensors.torch import save_file

    from nsn_peft.naming import canonical_module_name

    folder.mkdir()
    layers = nsn_layers(model)
    base = model.get_base_model()
    factors, meta_layers = {}, {}
    for name, layer in layers.items():
        r = layer.nsn_rank["default"]
        factors[f"{name}.A"] = layer.nsn_A["default"][:r].detach().contiguous()
        factors[f"{name}.B"] = layer.nsn_B["default"][:, :r].detach().contiguous()
        meta_layers[name] = {
            "rank": r,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.get_base_layer().bias is not None,
        }
    state = {}
    for key, value in base.state_dict().items():
        key = canonical_module_name(key)
        if ".nsn_" in key or key.removesuffix(".weight") in layers:
            continue
        state[key] = value.contiguous()
    tied = ["lm_head.weight"] if "lm_head.weight" in state and base.config.tie_word_embeddings else []
    for key in tied:
        state.pop(key)
    base.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"))
    save_file(factors, str(folder / "nsn_factors.safetensors"))
    (folder / "nsn_compression.json").write_text(
        json.dumps(
            {
                "format": "nsn-peft-compressed",
                "version": 1,
                "architecture": type(base).__name__,
                "dtype": "float32",
                "layers": meta_layers,
                "tied": tied,
            }
        )
    )


def test_first_format_folders_still_load_and_convert(tmp_path, input_ids):
    model = get_peft_model(tiny_gpt2(), NSNConfig(target_modules=["c_fc", "c_proj"]))
    model.set_rank(5)
    with torch.no_grad():
        expected = model(input_ids).logits
    write_first_format(model, tmp_path / "old")
    old = load_compressed(tmp_path / "old")
    with torch.no_grad():
        torch.testing.assert_close(old(input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    # Converting in place: the new files replace the old description.
    save_compressed(old, tmp_path / "old")
    assert (
        not (tmp_path / "old" / "nsn_compression.json").exists()
        and not (tmp_path / "old" / "nsn_factors.safetensors").exists()
    )
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "old")(input_ids).logits, expected, rtol=1e-5, atol=1e-6)
