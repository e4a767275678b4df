"""The generic behaviours PEFT's own custom-model and decoder-model suites check, run with NSN rows.

Our own tests, written after the behaviours PEFT's ``testing_common.py`` / ``test_custom_models.py`` /
``test_decoder_models.py`` exercise for every method: save/load (safetensors and ``.bin``, selected
adapters, subfolders), merge/unmerge/merge_and_unload/safe_merge, unload, disable_adapter, several adapters
(add/set/delete/load), modules_to_save, training steps that change only adapter parameters, state-dict round
trips, layers_to_transform, low_cpu_mem_usage, gradient checkpointing, generate, half precision.

Where PEFT assumes LoRA's additive deltas NSN differs by design and the test says so: NSN factors *replace* the
dense weight, so at full rank an untouched adapter computes the base model (tests first perturb the factors,
as training would), several adapters cannot be active or merged at once, and mixed-adapter batches are
refused — each with a clear error rather than a silent wrong result. Factors keep the base weight's dtype
(no fp32 upcast: they are as large as the weight).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import tiny_gpt2, tiny_llama, tiny_neox, tiny_opt
from torch import nn
from transformers.pytorch_utils import Conv1D

import nsn_peft
from nsn_peft import NSNConfig
from nsn_peft.tuner import NSNLayer


# -- models ----------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """A custom (non-transformers) model, as in PEFT's custom-model suite."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803 - PEFT's custom models take X
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(X)))))


class Conv1DNet(nn.Module):
    """transformers' Conv1D layers (weights stored transposed), outside any transformers model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.c_in = Conv1D(24, 10)
        self.c_out = Conv1D(3, 24)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803
        return self.c_out(torch.tanh(self.c_in(X)))


DECODER_TARGETS = {
    tiny_llama: ["q_proj", "v_proj", "up_proj", "down_proj"],
    tiny_gpt2: ["c_attn", "c_fc"],
    tiny_opt: ["q_proj", "fc1"],
    tiny_neox: ["query_key_value", "dense_h_to_4h"],
}

# (model factory, NSNConfig kwargs): the "NSN rows" of the suites.
CUSTOM_ROWS = [
    (MLP, {"target_modules": ["lin0"]}),
    (MLP, {"target_modules": ["lin0", "lin1"], "max_rank": 6}),
    (MLP, {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 3}, "max_rank": 8}),
    (MLP, {"target_modules": ["lin0"], "modules_to_save": ["lin2"]}),
    (MLP, {"target_modules": None}),
    (Conv1DNet, {"target_modules": ["c_in", "c_out"]}),
]
DECODER_ROWS = [(f, {"target_modules": t, "max_rank": 8}) for f, t in DECODER_TARGETS.items()] + [
    (tiny_llama, {"target_modules": None}),
    (tiny_gpt2, {"target_modules": None}),
]
ROWS = CUSTOM_ROWS + DECODER_ROWS


def _id(row) -> str:
    factory, kwargs = row
    name = getattr(factory, "__name__", str(factory))
    return f"{name}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def _is_decoder(factory) -> bool:
    return factory in DECODER_TARGETS


def _inputs(factory) -> dict:
    g = torch.Generator().manual_seed(0)
    if _is_decoder(factory):
        ids = torch.randint(0, 101, (2, 10), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"X": torch.randn(4, 10, generator=g)}


def _out(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def _config(kwargs: dict, **extra) -> NSNConfig:
    kwargs = copy.deepcopy(kwargs)
    kwargs.update(extra)
    return NSNConfig(rank_granularity=2, **kwargs)


@torch.no_grad()
def _perturb(model, adapter: str = "default", seed: int = 1, scale: float = 0.3) -> None:
    """Change the factors the way training would (an untouched full-rank NSN adapter computes the base model)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, NSNLayer) and adapter in module.nsn_B:
            b = module.nsn_B[adapter]
            b.add_(scale * b.abs().mean() * torch.randn(b.shape, generator=g).to(b))


def _peft(row, adapter_name: str = "default", **extra):
    factory, kwargs = row
    model = get_peft_model(factory(), _config(kwargs, **extra), adapter_name=adapter_name)
    _perturb(model, adapter_name)
    return model.eval()


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "nsn_" in n}


parametrize_rows = pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
parametrize_decoders = pytest.mark.parametrize("row", DECODER_ROWS, ids=[_id(r) for r in DECODER_ROWS])


# -- construction ------------------------------------------------------------------------------------------------
@parametrize_rows
def test_adapter_name_and_attributes(row):
    model = _peft(row, adapter_name="test-adapter")
    assert any("test-adapter" in n for n, _ in model.named_parameters())
    for attr in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert hasattr(model, attr)
    with torch.no_grad():
        assert torch.isfinite(_out(model, _inputs(row[0]))).all()
    assert "NSNLinear" in repr(model)


@parametrize_rows
def test_only_adapter_parameters_require_grad(row):
    model = _peft(row)
    for name, param in model.named_parameters():
        trainable = "nsn_" in name or "modules_to_save" in name
        assert param.requires_grad == trainable, name


# -- save / load ---------------------------------------------------------------------------------------------------
@parametrize_rows
@pytest.mark.parametrize("safe", [True, False])
def test_save_and_load_round_trip(row, safe, tmp_path):
    factory, _ = row
    model = _peft(row)
    inputs = _inputs(factory)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    files = {p.name for p in tmp_path.iterdir()}
    assert ("adapter_model.safetensors" if safe else "adapter_model.bin") in files
    assert "adapter_config.json" in files and "README.md" in files
    assert not {"model.safetensors", "config.json"} & files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(factory(), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert get_peft_model_state_dict(loaded).keys() == get_peft_model_state_dict(model).keys()
    for key, value in get_peft_model_state_dict(model).items():
        assert torch.equal(get_peft_model_state_dict(loaded)[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, inputs), _out(model, inputs))
    assert loaded.peft_config["default"].inference_mode
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "## NSN adapter" in card
    if _is_decoder(factory):
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        # PEFT < 0.19 records an unnamed base model as "", later versions as None.
        assert (config["base_model_name_or_path"] or None) == (model.config.to_dict()["_name_or_path"] or None)


@parametrize_rows
def test_several_adapters_save_in_subfolders_and_selected_adapters(row, tmp_path):
    factory, kwargs = row
    model = _peft(row)
    model.add_adapter("new_adapter", _config(kwargs))
    _perturb(model, "new_adapter", seed=2)
    model.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all" / "new_adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "all" / "new_adapter" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(factory(), tmp_path / "all")
    loaded.load_adapter(tmp_path / "all" / "new_adapter", "new_adapter")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    model.save_pretrained(tmp_path / "one", selected_adapters=["default"])
    again = PeftModel.from_pretrained(factory(), tmp_path / "one")
    assert list(again.peft_config) == ["default"] and not (tmp_path / "one" / "new_adapter").exists()


@parametrize_rows
def test_selected_adapter_with_similar_names_saves_only_its_weights(row, tmp_path):
    factory, kwargs = row
    model = _peft(row)
    expected = len(get_peft_model_state_dict(model))
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        model.add_adapter(name, _config(kwargs))
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    from safetensors.torch import load_file

    assert len(load_file(tmp_path / "adapter_model.safetensors")) == expected


@parametrize_rows
def test_from_pretrained_with_a_config_object(row, tmp_path):
    factory, kwargs = row
    model = _peft(row)
    model.save_pretrained(tmp_path)
    config = _config(kwargs)
    loaded = PeftModel.from_pretrained(factory(), tmp_path, is_trainable=False, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode


@parametrize_rows
def test_load_adapter_twice_under_other_names(row, tmp_path):
    factory, _ = row
    model = _peft(row)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(factory(), tmp_path)
    for name in ("other", "yet-another"):
        result = loaded.load_adapter(tmp_path, adapter_name=name)
        assert result.missing_keys == []
    loaded.set_adapter("yet-another")
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, _inputs(factory)), _out(model, _inputs(factory)))


@parametrize_rows
def test_low_cpu_mem_usage_loading_and_injection(row, tmp_path):
    factory, kwargs = row
    model = _peft(row)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(factory(), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, _inputs(factory)), _out(model, _inputs(factory)))
    injected = inject_adapter_in_model(_config(kwargs), factory(), low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in injected.parameters()}


@parametrize_rows
def test_state_dict_round_trip_between_models(row):
    factory, kwargs = row
    source = _peft(row)
    target = get_peft_model(factory(), _config(kwargs)).eval()
    result = set_peft_model_state_dict(target, get_peft_model_state_dict(source))
    assert not [k for k in result.unexpected_keys if "nsn_" in k]
    with torch.no_grad():
        torch.testing.assert_close(_out(target, _inputs(factory)), _out(source, _inputs(factory)))


# -- merging ---------------------------------------------------------------------------------------------------------
@parametrize_rows
def test_merge_unmerge_and_merge_and_unload(row, tmp_path):
    factory, _ = row
    model = _peft(row)
    inputs = _inputs(factory)
    with torch.no_grad():
        base = _out(factory(), inputs)
        logits = _out(model, inputs)
        assert not torch.allclose(logits, base, atol=1e-6)
        model.merge_adapter()
        merged = _out(model, inputs)
        model.unmerge_adapter()
        unmerged = _out(model, inputs)
        unloaded = model.merge_and_unload()
        final = _out(unloaded, inputs)
    for other in (merged, unmerged, final):
        torch.testing.assert_close(other, logits, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert not hasattr(unloaded, "peft_config")
    if _is_decoder(factory):  # a merged transformers model saves and reloads as a plain model
        unloaded.save_pretrained(tmp_path)
        reloaded = type(unloaded).from_pretrained(tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(_out(reloaded, inputs), final, atol=1e-4, rtol=1e-4)


@parametrize_rows
def test_merging_twice_warns_and_changes_nothing(row):
    model = _peft(row)
    inputs = _inputs(row[0])
    with torch.no_grad():
        model.merge_adapter()
        first = _out(model, inputs)
        with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
            model.merge_adapter()
        torch.testing.assert_close(_out(model, inputs), first, atol=1e-6, rtol=1e-6)


@parametrize_rows
def test_safe_merge_matches_and_refuses_non_finite_factors(row):
    factory, _ = row
    model = _peft(row)
    inputs = _inputs(factory)
    with torch.no_grad():
        expected = _out(model, inputs)
        safe = copy.deepcopy(model).merge_and_unload(safe_merge=True)
        torch.testing.assert_close(_out(safe, inputs), expected, atol=1e-5, rtol=1e-5)
    assert all(t.is_contiguous() for t in safe.state_dict().values())  # so that safetensors can serialise it
    layer = next(m for m in model.modules() if isinstance(m, NSNLayer))
    weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.nsn_A["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weight) and not layer.merged
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


@parametrize_rows
def test_merge_in_half_precision(row):
    factory, kwargs = row
    model = get_peft_model(factory().to(torch.bfloat16), _config(kwargs))
    assert {p.dtype for n, p in model.named_parameters() if "nsn_" in n} == {torch.bfloat16}  # no fp32 upcast
    merged = model.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


@parametrize_rows
def test_unload_returns_the_untouched_base_model(row):
    factory, _ = row
    base = factory()
    n_params = len(base.state_dict())
    inputs = _inputs(factory)
    with torch.no_grad():
        expected = _out(base, inputs)
        model = _peft(row)
        adapted = _out(model, inputs)
        unloaded = model.unload()
        out = _out(unloaded, inputs)
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert not torch.allclose(adapted, out, atol=1e-10)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert len(unloaded.state_dict()) == n_params


# -- disabling, several adapters ---------------------------------------------------------------------------------------
@parametrize_rows
def test_disable_adapter_gives_the_base_model_and_comes_back(row):
    factory, _ = row
    inputs = _inputs(factory)
    with torch.no_grad():
        base = _out(factory(), inputs)
        model = _peft(row)
        adapted = _out(model, inputs)
        assert not torch.allclose(base, adapted)
        with model.disable_adapter():
            torch.testing.assert_close(_out(model, inputs), base, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(_out(model, inputs), adapted)
        model.merge_adapter()  # disabling a merged model unmerges it first
        with model.disable_adapter():
            torch.testing.assert_close(_out(model, inputs), base, atol=1e-5, rtol=1e-5)


@parametrize_rows
def test_set_adapter_switches_outputs_and_trainable_parameters(row):
    factory, kwargs = row
    model = _peft(row)
    inputs = _inputs(factory)
    model.add_adapter("adapter-2", _config(kwargs))
    _perturb(model, "adapter-2", seed=5)
    with torch.no_grad():
        first = _out(model, inputs)
        model.set_adapter("adapter-2")
        second = _out(model, inputs)
        assert not torch.allclose(first, second, atol=1e-4)
        for name, param in model.named_parameters():
            if ".nsn_" in name:
                assert param.requires_grad == name.endswith(".adapter-2"), name
        model.set_adapter("default")
        torch.testing.assert_close(_out(model, inputs), first)
        merged_2 = copy.deepcopy(model).merge_and_unload(adapter_names=["adapter-2"])
        torch.testing.assert_close(_out(merged_2, inputs), second, atol=1e-4, rtol=1e-4)
    # LoRA sums the deltas of several adapters; NSN factors replace the weight, so it says so instead.
    with pytest.raises(ValueError, match="one active adapter at a time"):
        model.base_model.set_adapter(["default", "adapter-2"])  # (PeftModel itself takes a single name)
    with pytest.raises(ValueError, match="Only one NSN adapter can be merged"):
        model.merge_and_unload(adapter_names=["adapter-2", "default"])


@parametrize_rows
def test_mixed_adapter_batches_are_refused_not_ignored(row):
    model = _peft(row)
    inputs = _inputs(row[0])
    rows = next(iter(inputs.values())).shape[0]
    with pytest.raises(ValueError, match="NSN does not support mixed-adapter batches"):
        model(**inputs, adapter_names=["default"] * rows)


@parametrize_rows
@pytest.mark.parametrize("active", [True, False])
def test_delete_adapter(row, active):
    factory, kwargs = row
    model = _peft(row)
    model.add_adapter("delete_me", _config(kwargs))
    if active:
        model.set_adapter("delete_me")
    model.delete_adapter("delete_me")
    assert "delete_me" not in model.peft_config and model.active_adapters == ["default"]
    for module in model.modules():
        if isinstance(module, NSNLayer):
            for attr in NSNLayer.adapter_layer_names + NSNLayer.other_param_names:
                assert "delete_me" not in getattr(module, attr)
    with torch.no_grad():
        _out(model, _inputs(factory))
    model.delete_adapter("default")
    assert "default" not in model.peft_config and model.active_adapters == []
    with torch.no_grad():
        torch.testing.assert_close(_out(model.base_model, _inputs(factory)), _out(factory(), _inputs(factory)))
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")


def test_modules_to_save_are_trained_saved_and_kept_per_adapter(tmp_path):
    row = (MLP, {"target_modules": ["lin0"], "modules_to_save": ["lin2"]})
    model = _peft(row)
    with torch.no_grad():
        model.base_model.model.lin2.modules_to_save["default"].weight.add_(1.0)
    inputs = _inputs(MLP)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, inputs), _out(model, inputs))
    model.add_adapter("other", _config(row[1]))
    model.set_adapter("other")
    assert not torch.equal(
        model.base_model.model.lin2.modules_to_save["other"].weight,
        model.base_model.model.lin2.modules_to_save["default"].weight,
    )


# -- training ----------------------------------------------------------------------------------------------------------
@parametrize_rows
def test_a_training_step_changes_only_adapter_parameters(row):
    factory, _ = row
    model = _peft(row)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = _out(model, _inputs(factory)).float().pow(2).mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if "nsn_" in name or "modules_to_save" in name:
            continue  # trainable: may change
        assert not changed, f"{name} changed although it is not an adapter parameter"
    assert any(not torch.equal(p, before[n]) for n, p in _adapter_params(model).items())


@parametrize_decoders
def test_layers_to_transform_targets_fewer_layers_and_round_trips(row, tmp_path):
    factory, kwargs = row
    model = _peft(row, layers_to_transform=[0])
    names = set(nsn_peft.get_rank(model))
    assert names and all(".0." in n for n in names)
    everything = _peft(row)
    assert len(_adapter_params(model)) < len(_adapter_params(everything))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(factory(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, _inputs(factory)), _out(model, _inputs(factory)))


@parametrize_decoders
def test_gradient_checkpointing_reaches_the_same_parameters(row):
    factory, _ = row
    model = _peft(row)
    model.train()
    inputs = _inputs(factory)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads():
        for p in params.values():
            p.grad = None
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays the RNG state)
        (_out(model, inputs) ** 2).sum().backward()
        return {n: 0.0 if p.grad is None else p.grad.abs().sum().item() for n, p in params.items()}

    plain = grads()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    checkpointed = grads()
    for name in params:
        assert checkpointed[name] == pytest.approx(plain[name], rel=1e-3, abs=1e-6), name
        assert plain[name] > 0, name


@parametrize_decoders
def test_input_embeddings_need_grad_only_when_asked(row):
    model = _peft(row)
    ids = _inputs(row[0])["input_ids"]
    assert not model.get_input_embeddings()(ids).requires_grad
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(ids).requires_grad


# -- generation, devices, dtypes -------------------------------------------------------------------------------------
@parametrize_decoders
def test_generate_keyword_positional_and_half_precision(row):
    factory, kwargs = row
    model = _peft(row)
    inputs = _inputs(factory)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        model.generate(inputs["input_ids"], max_new_tokens=2, do_sample=False)
    half = get_peft_model(factory().to(torch.bfloat16), _config(kwargs))
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    with torch.no_grad():
        half.generate(
            input_ids=torch.tensor([[1, 1, 1], [2, 1, 2]]), attention_mask=mask, max_new_tokens=2, do_sample=False
        )


@parametrize_decoders
def test_load_with_a_device_map_and_added_adapters_keep_the_dtype(row, tmp_path):
    factory, kwargs = row
    model = _peft(row)
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(factory(), tmp_path, device_map={"": "cpu"})
    half = get_peft_model(factory().to(torch.bfloat16), _config(kwargs), autocast_adapter_dtype=False)
    half.add_adapter("added", _config(kwargs), autocast_adapter_dtype=False)
    half.load_adapter(tmp_path, adapter_name="loaded", autocast_adapter_dtype=False)
    for adapter in ("default", "added", "loaded"):
        assert {p.dtype for n, p in half.named_parameters() if "nsn_" in n and n.endswith(adapter)} == {torch.bfloat16}
