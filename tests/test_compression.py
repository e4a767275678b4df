import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import get_peft_model

from nsn_peft import NSNConfig
from nsn_peft.compression import FactoredLinear, compressed_size, load_compressed, save_compressed


@pytest.mark.parametrize("factory,targets", [(tiny_llama, ["up_proj", "down_proj", "q_proj"]), (tiny_gpt2, ["c_fc", "c_proj"])])
def test_compressed_export_round_trip(tmp_path, factory, targets, input_ids):
    model = get_peft_model(factory(), NSNConfig(target_modules=targets))
    model.set_rank(6)
    with torch.no_grad():
        expected = model(input_ids).logits
    save_compressed(model, tmp_path / "small")
    names = sorted(p.name for p in (tmp_path / "small").iterdir())
    assert names == ["config.json", "model.safetensors", "nsn_compression.json", "nsn_factors.safetensors"]
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
