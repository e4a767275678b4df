import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama
from torch import nn

from nsn_peft import NSNConfig


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_rank_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="max_rank"):
        NSNConfig(max_rank=bad)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="init"):
        NSNConfig(init="random")
    with pytest.raises(ValueError, match="rank_granularity"):
        NSNConfig(rank_granularity=0)
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]"):
        NSNConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match="energy_input"):
        NSNConfig(energy_input=1.5)


def test_unmatched_targets_list_available_modules():
    with pytest.raises(ValueError, match=r"match no module.*q_proj"):
        get_peft_model(tiny_llama(), NSNConfig(target_modules=["does_not_exist"]))


def test_embeddings_are_rejected_by_name():
    with pytest.raises(TypeError, match=r"model\.embed_tokens.*Embedding.*embeddings"):
        get_peft_model(tiny_llama(), NSNConfig(target_modules=["embed_tokens"]))


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3)
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        return self.proj(self.conv(x).mean((-1, -2)))


def test_convolutions_are_rejected_with_kernel_size():
    with pytest.raises(TypeError, match=r"'conv'.*Conv2d.*kernel size \(3, 3\)"):
        get_peft_model(_ConvNet(), NSNConfig(target_modules=["conv"]))


class _FakeQuantLinear(nn.Linear):
    """Stands in for bitsandbytes/GPTQ layers: an integer weight."""

    def __init__(self):
        super().__init__(8, 8)
        self.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)


class _QuantNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.qproj = _FakeQuantLinear()


def test_quantized_layers_are_rejected():
    with pytest.raises(TypeError, match=r"'qproj'.*quantized"):
        get_peft_model(_QuantNet(), NSNConfig(target_modules=["qproj"]))


def test_nan_weight_is_reported_with_module_name():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN"):
        get_peft_model(model, NSNConfig(target_modules=["up_proj"]))


@pytest.mark.parametrize("init", ["whitened", "projected"])
def test_data_aware_init_without_stats_says_how_to_collect(init):
    with pytest.raises(ValueError, match="collect_activation_stats"):
        get_peft_model(tiny_llama(), NSNConfig(init=init))


def test_rank_above_layer_max_is_rejected():
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=8))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    with pytest.raises(ValueError, match=r"up_proj.*\[1, 8\]"):
        layer.set_rank(9)


# -- silent wrong results that are now right or loud ------------------------------------------------------------
def test_set_rank_on_a_merged_model_remerges_at_the_new_rank(input_ids, tmp_path):
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj", "o_proj"], rank_granularity=8))
    with torch.no_grad():
        unmerged = {}
        for r in (8, 24):
            model.set_rank(r)
            unmerged[r] = model(input_ids).logits
        model.merge_adapter()
        model.set_rank(8)
        assert torch.allclose(model(input_ids).logits, unmerged[8], atol=1e-5)
        assert set(model.get_rank().values()) == {8}
        with model.at_rank(24):
            assert torch.allclose(model(input_ids).logits, unmerged[24], atol=1e-5)
        assert torch.allclose(model(input_ids).logits, unmerged[8], atol=1e-5)
        model.save_pretrained(tmp_path)
        assert model.peft_config["default"].active_rank == 8
        model.unmerge_adapter()
        assert torch.allclose(model(input_ids).logits, unmerged[8], atol=1e-5)
        with model.disable_adapter():
            dense = model(input_ids).logits
        model.set_rank(10**6)
        assert torch.allclose(model(input_ids).logits, dense, atol=1e-4)


def test_fractions_move_layers_whose_max_rank_is_below_the_granularity():
    model = get_peft_model(
        tiny_llama(), NSNConfig(target_modules=["up_proj", "q_proj"])
    )  # max ranks 32, granularity 64
    assert set(model.get_max_rank().values()) == {32}
    model.set_rank(fraction=0.5)
    assert set(model.get_rank().values()) == {16}
    model.set_rank(fraction=0.01)
    assert set(model.get_rank().values()) == {1}
    model.set_rank(fraction=1.0)
    assert set(model.get_rank().values()) == {32}


@pytest.mark.parametrize("target_modules", [None, "all-linear"])
def test_layers_to_transform_applies_to_all_linear_targets(target_modules, input_ids, tmp_path):
    from peft import PeftModel

    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=target_modules, layers_to_transform=[1]))
    names = set(model.get_rank())
    assert len(names) == 7 and all(n.startswith("model.layers.1.") for n in names)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert set(loaded.get_rank()) == names
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids).logits, model(input_ids).logits, atol=1e-5)


def test_layers_to_transform_out_of_range_names_the_option_and_the_range():
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\].*no layer 5.*numbered 0-1"):
        get_peft_model(tiny_llama(), NSNConfig(layers_to_transform=[5]))
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0, 7\].*no layer 7"):
        get_peft_model(tiny_llama(), NSNConfig(target_modules=["q_proj"], layers_to_transform=[0, 7]))
    with pytest.raises(ValueError, match=r"layers_pattern='blocks'.*\['layers'\]"):
        get_peft_model(
            tiny_llama(), NSNConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="blocks")
        )


def _saved_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj"], max_rank=8))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_non_finite_factors_are_named_on_load(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    folder = _saved_adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if "layers.1" in k and "nsn_B" in k)
    state[key][0, 0] = float("inf")
    save_file(state, weights)
    with pytest.raises(
        ValueError,
        match=r"adapter_model\.safetensors.*nsn_B factor of module 'model\.layers\.1\.mlp\.up_proj' holds Inf",
    ):
        PeftModel.from_pretrained(tiny_llama(), folder)


def test_config_missing_fields_names_them_and_the_file(tmp_path):
    import json

    from peft import PeftModel

    folder = _saved_adapter(tmp_path)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["target_modules"], config["max_rank"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config\.json lacks the NSN field\(s\) target_modules, max_rank"):
        PeftModel.from_pretrained(tiny_llama(), folder)


def test_truncated_adapter_is_named_before_the_base_model_loads(tmp_path, monkeypatch):
    from peft import PeftModel

    from nsn_peft import hub

    folder = _saved_adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded before the adapter was checked")

    monkeypatch.setattr(hub, "load_model_and_tokenizer", no_loading)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated"):
        hub.load_adapter(folder)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated"):
        PeftModel.from_pretrained(tiny_llama(), folder)


def test_transactional_save_keeps_other_files_and_refuses_a_file(tmp_path, input_ids):
    from peft import PeftModel

    model = get_peft_model(tiny_llama(), NSNConfig(target_modules=["up_proj"], max_rank=8))
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "README.md").write_text("# My adapter\n\nSome words of mine.\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    card = (tmp_path / "README.md").read_text()
    assert "Some words of mine." in card and "## NSN adapter" in card
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.nsn-")]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        model.save_pretrained(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
