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
