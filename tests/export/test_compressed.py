import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_gpt2, tiny_llama

from nsn_peft import NSNConfig
from nsn_peft.export.compressed import FactoredLinear, compressed_size, load_compressed, save_compressed


@pytest.mark.parametrize("factory,targets", [(tiny_llama, ["up_proj", "down_proj", "q_proj"]), (tiny_gpt2, ["c_fc", "c_proj"])])
def test_compressed_export_round_trip(tmp_path, factory, targets, input_ids):
    model = get_peft_model(factory(), NSNConfig(target_modules=targets))
    model.set_rank(6)
    with torch.no_grad():
        expected = model(input_ids).logits
    save_compressed(model, tmp_path / "small")
    names = sorted(p.name for p in (tmp_path / "small").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "nsn_compression.json", "nsn_factors.safetensors"]
    loaded = load_compressed(tmp_path / "small")
    assert any(isinstance(m, FactoredLinear) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    # Sizes: the replaced layers take r(m+d) parameters, on disk and in memory.
    dense_dir = tmp_path / "dense"
    factory().save_pretrained(dense_dir)
    small_bytes = sum(p.stat().st_size for p in (tmp_path / "small").glob("*.safetensors"))
    assert small_bytes < (dense_dir / "model.safetensors").stat().st_size
    sizes = compressed_size(loaded)
    factored_layers = [m for m in loaded.modules() if isinstance(m, FactoredLinear)]
    assert sizes["factored_layer_params"] == sum(6 * (m.in_features + m.out_features) + (m.out_features if m.bias is not None else 0) for m in factored_layers)


def test_load_compressed_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a compressed NSN model"):
        load_compressed(tmp_path)


def test_save_compressed_needs_nsn_layers(tmp_path):
    with pytest.raises(ValueError, match="NSN layers"):
        save_compressed(tiny_llama(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mixed_rank_whitened_export_keeps_outputs_tokenizer_and_factored_size(tmp_path, input_ids):
    import json

    from tiny_models import char_tokenizer
    from transformers import AutoTokenizer

    from nsn_peft import collect_activation_stats
    from nsn_peft.planning.allocate import allocate_ranks_for_budget

    base = tiny_llama()
    stats = collect_activation_stats(base, torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(0)), show_progress=False)
    plan = allocate_ranks_for_budget(base, stats, 0.5, target_modules=["up_proj", "down_proj", "o_proj"], show_progress=False)
    model = get_peft_model(base, NSNConfig(**plan.to_config_kwargs(stats=stats)))
    architectures = list(model.get_base_model().config.architectures or [])
    with torch.no_grad():
        expected = model(input_ids).logits
    save_compressed(model, tmp_path / "c", tokenizer=char_tokenizer())
    assert list(model.get_base_model().config.architectures or []) == architectures  # caller's config untouched
    meta = json.loads((tmp_path / "c" / "nsn_compression.json").read_text())
    assert {n: info["rank"] for n, info in meta["layers"].items()} == plan.ranks
    loaded = load_compressed(tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    dense_total = sum(p.numel() for p in tiny_llama().parameters())
    replaced = sum(m * d for m, d in (plan.shapes[n] for n in plan.ranks))
    factored = sum(r * sum(plan.shapes[n]) for n, r in plan.ranks.items())
    assert compressed_size(loaded)["total_params"] == dense_total - replaced + factored
    assert AutoTokenizer.from_pretrained(tmp_path / "c")("ab")["input_ids"] == [65, 66]
    half = load_compressed(tmp_path / "c", dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_load_compressed_reports_damaged_folders(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj"]))
    save_compressed(model, tmp_path / "c")
    (tmp_path / "c" / "nsn_factors.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="nsn_factors.safetensors"):
        load_compressed(tmp_path / "c")
    save_compressed(model, tmp_path / "d")
    (tmp_path / "d" / "nsn_compression.json").write_text('{"format": "nsn-peft-compressed", "version": 99}')
    with pytest.raises(ValueError, match="version 99"):
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
    assert {m.rank for m in loaded.modules() if isinstance(m, FactoredLinear)} == {4}
    (tmp_path / "a_file").write_text("precious")
    with pytest.raises(NotADirectoryError, match="a_file: a file exists there"):
        save_compressed(model, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "precious"
    factors = folder / "nsn_factors.safetensors"
    factors.write_bytes(factors.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"nsn_factors\.safetensors is truncated"):
        load_compressed(folder)
