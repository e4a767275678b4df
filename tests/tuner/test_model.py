import copy
import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file
from tiny_models import CAUSAL_FACTORIES, tiny_bert_classifier, tiny_gpt2, tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, NSNLinear


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", sorted(CAUSAL_FACTORIES))
def test_full_rank_reproduces_dense_model(arch, input_ids):
    base = CAUSAL_FACTORIES[arch]()
    with torch.no_grad():
        ref = base(input_ids).logits
    model = get_peft_model(base, NSNConfig())
    assert any(isinstance(m, NSNLinear) for m in model.modules())
    with torch.no_grad():
        out = model(input_ids).logits
    assert _rel_err(out, ref) < 1e-4


def test_gpt2_conv1d_layers_are_adapted():
    model = get_peft_model(tiny_gpt2(), NSNConfig(target_modules=["c_attn", "c_fc", "c_proj"]))
    layers = nsn_peft.get_max_rank(model)
    assert "transformer.h.0.attn.c_attn" in layers and layers["transformer.h.0.attn.c_attn"] == 32


def test_bert_sequence_classification_full_rank(input_ids):
    base = tiny_bert_classifier()
    with torch.no_grad():
        ref = base(input_ids).logits
    model = get_peft_model(
        base, NSNConfig(target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"])
    )
    with torch.no_grad():
        assert _rel_err(model(input_ids).logits, ref) < 1e-4


def test_nested_property_each_rank_is_the_truncation(input_ids):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=["up_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    w = layer.dense_weight().double()
    u, s, vh = torch.linalg.svd(w)
    x = torch.randn(5, 32)
    for r in (1, 4, 17, 32):
        model.set_rank(r)
        truncated = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(layer(x).double(), x.double() @ truncated.T, atol=1e-5, rtol=1e-4)
        # best rank-r approximation: its error is the tail of the spectrum
        err = torch.linalg.matrix_norm(w - layer.effective_weight("default").double())
        torch.testing.assert_close(err, s[r:].square().sum().sqrt(), atol=1e-5, rtol=1e-4)


def test_set_rank_variants_and_context_manager(input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=24, rank_granularity=8))
    model.set_rank(10**6)  # clamps to each layer's max
    assert set(model.get_rank().values()) == {24, 16}  # k/v are 32->16
    model.set_rank(8)
    assert set(model.get_rank().values()) == {8}
    model.set_rank({"model.layers.0.mlp.up_proj": 3, "down_proj": 5})
    ranks = model.get_rank()
    assert ranks["model.layers.0.mlp.up_proj"] == 3 and ranks["model.layers.1.mlp.down_proj"] == 5
    assert ranks["model.layers.1.mlp.up_proj"] == 8
    model.set_rank(fraction=0.5)
    ranks = model.get_rank()
    assert ranks["model.layers.0.mlp.up_proj"] == 8 and ranks["model.layers.0.self_attn.k_proj"] == 8
    with nsn_peft.at_rank(model, 2):
        assert set(model.get_rank().values()) == {2}
    assert model.get_rank() == ranks
    with pytest.raises(ValueError, match="outside"):
        model.set_rank({"up_proj": 25})
    with pytest.raises(ValueError, match="matches no NSN layer"):
        model.set_rank({"nonexistent": 2})
    with pytest.raises(ValueError):
        model.set_rank(0)
    with pytest.raises(ValueError):
        model.set_rank(fraction=1.5)


def test_rank_switch_shares_storage():
    model = get_peft_model(tiny_llama(), NSNConfig())
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    ptr = layer.nsn_A["default"].data_ptr()
    model.set_rank(4)
    model.set_rank(32)
    assert layer.nsn_A["default"].data_ptr() == ptr


def test_rank_pattern_sets_per_module_max_rank():
    model = get_peft_model(
        tiny_llama(), NSNConfig(max_rank=16, rank_pattern={"down_proj": 4, "layers.1.self_attn.q_proj": 6})
    )
    maxima = model.get_max_rank()
    assert maxima["model.layers.0.mlp.down_proj"] == 4
    assert maxima["model.layers.1.self_attn.q_proj"] == 6
    assert maxima["model.layers.0.self_attn.q_proj"] == 16


def test_flops_accounting_and_budget_selection():
    model = get_peft_model(tiny_llama(), NSNConfig(rank_granularity=4))
    dense = nsn_peft.estimate_flops(model, tokens=3)
    per_block = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 48 * 32  # q,o + k,v + gate,up,down
    assert dense.targeted_dense == 2 * 3 * 2 * per_block  # 2 FLOPs/MAC, 3 tokens, 2 blocks
    assert dense.other == 3 * 2 * 101 * 32  # lm_head
    r = model.select_rank_for_target_flops(0.5)
    assert nsn_peft.estimate_flops(model, r).targeted_fraction <= 0.5
    assert nsn_peft.estimate_flops(model, r + 4).targeted_fraction > 0.5
    per_layer = nsn_peft.select_rank_for_target_flops(model, 0.5, per_layer=True)
    assert per_layer["model.layers.0.mlp.up_proj"] == 8  # 0.5*32*48/80 = 9.6, rounded down to the grid of 4
    model_scope = nsn_peft.select_rank_for_target_flops(model, 0.6, scope="model")
    assert nsn_peft.estimate_flops(model, model_scope).model_fraction <= 0.6


def test_only_factors_are_trainable_and_get_gradients(input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".nsn_A." in n or ".nsn_B." in n for n in trainable)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merge_and_unload_and_unload(input_ids):
    base = tiny_llama()
    with torch.no_grad():
        ref = base(input_ids).logits
    model = get_peft_model(base, NSNConfig())
    model.set_rank(5)
    with torch.no_grad():
        at5 = model(input_ids).logits
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, NSNLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, at5, atol=1e-5, rtol=1e-4)

    base2 = tiny_llama()
    model2 = get_peft_model(base2, NSNConfig())
    model2.set_rank(3)
    restored = model2.unload()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids).logits, ref)


def test_disable_adapter_context_gives_base_outputs(input_ids):
    base = tiny_llama()
    with torch.no_grad():
        ref = base(input_ids).logits
    model = get_peft_model(base, NSNConfig())
    model.set_rank(2)
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids).logits, ref)
        assert _rel_err(model(input_ids).logits, ref) > 1e-3


def test_multiple_adapters(input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=8), adapter_name="small")
    model.add_adapter("big", NSNConfig(max_rank=16))
    model.set_adapter("big")
    assert set(model.get_max_rank().values()) == {16}
    with torch.no_grad():
        big = model(input_ids).logits
    model.set_adapter("small")
    assert set(model.get_max_rank().values()) == {8}
    with torch.no_grad():
        small = model(input_ids).logits
    assert not torch.allclose(big, small)
    model.delete_adapter("big")
    assert list(model.peft_config) == ["small"]
    with pytest.raises(ValueError, match="one active adapter"):
        model.base_model.set_adapter(["small", "small2"])


def test_save_load_round_trip_is_bit_exact_without_decomposing(tmp_path, input_ids, monkeypatch):
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=16, rank_pattern={"down_proj": 8}))
    model.set_rank({"up_proj": 5})
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "NSN" and config["rank_pattern"] == {"down_proj": 8}
    assert "stats" not in config
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".nsn_A" in k or ".nsn_B" in k for k in weights)
    card = (tmp_path / "README.md").read_text()
    assert "## NSN adapter" in card and "FLOPs" in card
    assert "- nsn" in card and "library_name: peft" in card

    def fail(*args, **kwargs):
        raise AssertionError("decomposition must not run when loading a checkpoint")

    monkeypatch.setattr(nsn_peft.linalg.decompose, "svd_factors", fail)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert loaded.get_rank()["model.layers.0.mlp.up_proj"] == 5
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)
    assert PeftConfig.from_pretrained(tmp_path).peft_type == PeftType.NSN


def test_auto_peft_model_from_local_directory(tmp_path, input_ids):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_llama()
    base.save_pretrained(base_dir)
    model = get_peft_model(base, NSNConfig(max_rank=8))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(adapter_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)


def test_auto_peft_sequence_classification(tmp_path, input_ids):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_bert_classifier()
    base.save_pretrained(base_dir)
    model = get_peft_model(
        base,
        NSNConfig(max_rank=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
    )
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
        expected = model(input_ids).logits
    model.save_pretrained(adapter_dir)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected)


def test_loading_on_wrong_base_model_names_module_and_shapes(tmp_path):
    model = get_peft_model(tiny_llama(hidden=32), NSNConfig())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(32, 32\).*\(48, 48\)"):
        PeftModel.from_pretrained(tiny_llama(hidden=48), tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_autocast(dtype, input_ids):
    base = tiny_llama().to(dtype)
    model = get_peft_model(base, NSNConfig())
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert layer.nsn_A["default"].dtype == dtype
    with torch.no_grad():
        out = model(input_ids).logits
    assert torch.isfinite(out).all()
    fp32 = get_peft_model(tiny_llama(), NSNConfig())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fp32(input_ids).logits
    assert torch.isfinite(auto).all()


def test_print_trainable_parameters(capsys):
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=4))
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out


def test_peft_type_is_a_real_enum_member():
    assert PeftType("NSN") is PeftType.NSN is PeftType["NSN"]
    assert PeftType.NSN in list(PeftType) and PeftType.NSN == "NSN"
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.NSN] is NSNConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.NSN] is nsn_peft.NSNModel
    nsn_peft.tuner.registration.register()  # idempotent


def test_load_adapter_adds_a_second_saved_adapter(tmp_path, input_ids):
    first = get_peft_model(tiny_llama(), NSNConfig(max_rank=8))
    first.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = first(input_ids).logits
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=4), adapter_name="other")
    model.load_adapter(tmp_path, adapter_name="loaded")
    model.set_adapter("loaded")
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)
