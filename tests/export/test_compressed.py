import json

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_gpt2, tiny_llama

from nsn_peft import NSNConfig
from nsn_peft.export import compressed_size, describe_export, is_factored_linear, load_compressed, save_compressed


@pytest.mark.parametrize(
    "factory,targets", [(tiny_llama, ["up_proj", "down_proj", "q_proj"]), (tiny_gpt2, ["c_fc", "c_proj"])]
)
def test_compressed_export_round_trip(tmp_path, factory, targets, input_ids):
    model = get_peft_model(factory(), NSNConfig(target_modules=targets))
    model.set_rank(6)
    with torch.no_grad():
        expected = model(input_ids).logits
    save_compressed(model, tmp_path / "small")
    names = sorted(p.name for p in (tmp_path / "small").iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors", "modeling_nsn.py"]
    loaded = load_compressed(tmp_path / "small")
    factored = [m for m in loaded.modules() if is_factored_linear(m)]
    assert factored and all(isinstance(m.down, torch.nn.Linear) and isinstance(m.up, torch.nn.Linear) for m in factored)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    # Sizes: the replaced layers take r(m+d) parameters, on disk and in memory.
    dense_dir = tmp_path / "dense"
    factory().save_pretrained(dense_dir)
    assert (tmp_path / "small" / "model.safetensors").stat().st_size < (dense_dir / "model.safetensors").stat().st_size
    sizes = compressed_size(loaded)
    assert sizes["factored_layer_params"] == sum(
        6 * (m.in_features + m.out_features) + (m.out_features if m.up.bias is not None else 0) for m in factored
    )
    described = describe_export(tmp_path / "small")
    assert {n: (v["rank"], v["out"], v["in"]) for n, v in described["layers"].items()} == {
        n: (6, m.out_features, m.in_features) for n, m in loaded.named_modules() if is_factored_linear(m)
    }


def test_load_compressed_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a compressed NSN model"):
        load_compressed(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="has no nsn_ranks"):
        load_compressed(tmp_path / "plain")


def test_save_compressed_needs_nsn_layers(tmp_path):
    with pytest.raises(ValueError, match="NSN layers"):
        save_compressed(tiny_llama(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mixed_rank_whitened_export_keeps_outputs_tokenizer_and_factored_size(tmp_path, input_ids):
    from tiny_models import char_tokenizer
    from transformers import AutoTokenizer

    from nsn_peft import collect_activation_stats
    from nsn_peft.planning.allocate import allocate_ranks_for_budget

    base = tiny_llama()
    stats = collect_activation_stats(
        base, torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(0)), show_progress=False
    )
    plan = allocate_ranks_for_budget(
        base, stats, 0.5, target_modules=["up_proj", "down_proj", "o_proj"], show_progress=False
    )
    model = get_peft_model(base, NSNConfig(**plan.to_config_kwargs(stats=stats)))
    architectures = list(model.get_base_model().config.architectures or [])
    with torch.no_grad():
        expected = model(input_ids).logits
    save_compressed(model, tmp_path / "c", tokenizer=char_tokenizer(), metrics={"perplexity": 12.5})
    assert list(model.get_base_model().config.architectures or []) == architectures  # caller's config untouched
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    factored = {n: r for n, r in plan.ranks.items() if n not in config["nsn_dense_layers"]}
    assert config["nsn_ranks"] == factored
    assert "| perplexity | 12.5 |" in (tmp_path / "c" / "README.md").read_text()
    loaded = load_compressed(tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    dense_total = sum(p.numel() for p in tiny_llama().parameters())
    replaced = sum(m * d for m, d in (plan.shapes[n] for n in factored))
    kept = sum(r * sum(plan.shapes[n]) for n, r in factored.items())
    assert compressed_size(loaded)["total_params"] == dense_total - replaced + kept
    assert AutoTokenizer.from_pretrained(tmp_path / "c")("ab")["input_ids"] == [65, 66]
    half = load_compressed(tmp_path / "c", dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_full_rank_layers_are_written_dense(tmp_path, input_ids):
    """Where r(m+d) >= md the factors are neither smaller nor faster: the export keeps the plain layer."""
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj", "q_proj"]))
    model.set_rank("full")
    with torch.no_grad():
        expected = model(input_ids).logits
    save_compressed(model, tmp_path / "full")
    loaded = load_compressed(tmp_path / "full")
    assert not any(is_factored_linear(m) for m in loaded.modules())
    assert type(loaded.get_submodule("model.layers.0.mlp.up_proj")) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_load_compressed_names_damaged_folders_before_loading(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj"]))
    model.set_rank(4)
    save_compressed(model, tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"c/model\.safetensors is missing"):
        load_compressed(tmp_path / "c")
    save_compressed(model, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "nsn_format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_compressed(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"d/config\.json is not valid JSON"):
        load_compressed(tmp_path / "d")


def test_export_keeps_other_files_refuses_a_file_and_names_a_truncated_one(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj"]))
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    model.set_rank(8)
    save_compressed(model, folder)
    model.set_rank(4)
    save_compressed(model, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    loaded = load_compressed(folder)
    assert {m.rank for m in loaded.modules() if is_factored_linear(m)} == {4}
    (tmp_path / "a_file").write_text("precious")
    with pytest.raises(NotADirectoryError, match="a_file: a file exists there"):
        save_compressed(model, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "precious"
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):
        load_compressed(folder)
