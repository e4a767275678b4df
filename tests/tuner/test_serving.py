"""Serving from factors only (``keep_base_weights=False``), parameter-budget max ranks, rank-major storage."""

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from tiny_models import char_tokenizer, tiny_gpt2, tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, NSNLinear
from nsn_peft.linalg.flops import factored_params, rank_for_params_fraction
from nsn_peft.tuner import layer as layer_module
from nsn_peft.tuner.kernels import nested_linear


def _nsn_layers(model):
    return [m for m in model.modules() if isinstance(m, NSNLinear)]


def _held_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _factor_bytes(model) -> int:
    return sum(
        p.numel() * p.element_size()
        for layer in _nsn_layers(model)
        for p in (*layer.nsn_A.values(), *layer.nsn_B.values())
    )


@pytest.fixture(params=["llama", "gpt2"])
def pair(request):
    """(default-mode model, factors-only model) adapted from the same base weights."""
    factory = tiny_llama if request.param == "llama" else tiny_gpt2
    targets = None if request.param == "llama" else ["c_attn", "c_fc", "c_proj"]
    base = factory()
    keep = get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=targets))
    drop = get_peft_model(copy.deepcopy(base), NSNConfig(target_modules=targets, keep_base_weights=False))
    return base, keep, drop


def test_factors_only_holds_no_dense_weight(pair):
    base, keep, drop = pair
    for layer in _nsn_layers(drop):
        assert layer.base_weight_dropped and layer.get_base_layer().weight.numel() == 0
    adapted_dense = sum(layer.get_base_layer().weight.numel() * 4 for layer in _nsn_layers(keep))
    assert _held_bytes(drop) == _held_bytes(keep) - adapted_dense
    assert _held_bytes(drop) == _held_bytes(base) - adapted_dense + _factor_bytes(drop)
    assert drop.peft_config["default"].keep_base_weights is False


def test_factors_only_outputs_equal_default_mode_at_every_rank(pair, input_ids):
    _, keep, drop = pair
    top = max(nsn_peft.get_max_rank(keep).values())
    for rank in [
        1,
        2,
        5,
        8,
        16,
        top,
        {"up_proj": 3} if "llama" in type(keep.get_base_model()).__name__.lower() else {"c_fc": 3},
    ]:
        keep.set_rank(rank)
        drop.set_rank(rank)
        with torch.no_grad():
            torch.testing.assert_close(drop(input_ids).logits, keep(input_ids).logits, atol=0, rtol=0)


def test_factors_only_save_load_round_trip(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(keep_base_weights=False, max_rank=16, rank_granularity=8))
    model.set_rank(8)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["keep_base_weights"] is False
    with torch.no_grad():
        expected = model(input_ids).logits
    for kwargs in ({}, {"low_cpu_mem_usage": True}):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, **kwargs)
        assert all(layer.base_weight_dropped for layer in _nsn_layers(loaded))
        assert all(layer.nsn_B["default"].t().is_contiguous() for layer in _nsn_layers(loaded))
        assert loaded.get_rank() == model.get_rank()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids).logits, expected, atol=0, rtol=0)
    for kwargs in ({}, {"low_cpu_mem_usage": True}):  # training loads keep contiguous factors (FSDP needs them)
        kept = PeftModel.from_pretrained(tiny_llama(), tmp_path, keep_base_weights=True, is_trainable=True, **kwargs)
        assert not any(layer.base_weight_dropped for layer in _nsn_layers(kept))
        assert all(layer.nsn_B["default"].is_contiguous() for layer in _nsn_layers(kept))
        with torch.no_grad():
            torch.testing.assert_close(kept(input_ids).logits, expected, atol=0, rtol=0)


def test_keep_base_weights_false_overrides_a_saved_training_adapter(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, keep_base_weights=False)
    assert all(layer.base_weight_dropped for layer in _nsn_layers(loaded))
    assert loaded.peft_config["default"].keep_base_weights is False
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # the override did not leak
    assert not any(layer.base_weight_dropped for layer in _nsn_layers(again))


def test_unload_at_full_rank_reproduces_the_dense_model(pair, input_ids):
    base, _, drop = pair
    with torch.no_grad():
        dense = base(input_ids).logits
        with drop.disable_adapter():
            torch.testing.assert_close(drop(input_ids).logits, dense, atol=1e-5, rtol=1e-4)
    drop.set_rank(4)
    unloaded = drop.unload()  # the dense weights, not the rank-4 model
    assert not any(isinstance(m, NSNLinear) for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids).logits, dense, atol=1e-5, rtol=1e-4)


def test_merge_and_unload_gives_the_current_rank(input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(keep_base_weights=False, max_rank=16, rank_granularity=8))
    model.set_rank(8)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.merge_adapter()
    layer = _nsn_layers(model)[0]
    assert layer.get_base_layer().weight.shape == (layer.out_features, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    assert layer.base_weight_dropped and layer.get_base_layer().weight.numel() == 0
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_operations_needing_dropped_weights_fail_clearly(input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(keep_base_weights=False, max_rank=16))
    layer = _nsn_layers(model)[0]
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj.*keeps rank 16 < 32"):
        model.unload()
    assert all(isinstance(m, NSNLinear) for m in _nsn_layers(model)) and layer.base_weight_dropped  # nothing changed
    with pytest.raises(RuntimeError, match="cannot be rebuilt"), model.disable_adapter(), torch.no_grad():
        model(input_ids)
    with pytest.raises(RuntimeError, match="holds no dense weight"):
        layer.dense_weight()
    with pytest.raises(RuntimeError, match="keep_base_weights=False"):
        model.add_adapter("second", NSNConfig())


def test_model_to_dtype_and_device_with_dropped_weights(input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(keep_base_weights=False))
    model.to(torch.float64)
    layer = _nsn_layers(model)[0]
    assert layer.nsn_A["default"].dtype == torch.float64 and layer.get_base_layer().weight.dtype == torch.float64
    assert layer.nsn_B["default"].t().is_contiguous()  # .to keeps the rank-major layout
    with torch.no_grad():
        assert model(input_ids).logits.dtype == torch.float64


def test_config_validation():
    with pytest.raises(ValueError, match="max_rank must be"):
        NSNConfig(max_rank="breakeven")
    with pytest.raises(ValueError, match="max_params_fraction must be in"):
        NSNConfig(max_params_fraction=1.5)
    with pytest.raises(ValueError, match="not both"):
        NSNConfig(max_rank=8, max_params_fraction=0.5)
    with pytest.raises(ValueError, match="keep_base_weights must be a bool"):
        NSNConfig(keep_base_weights="no")


@pytest.mark.parametrize("kwargs", [{"max_rank": "break-even"}, {"max_params_fraction": 0.5}])
def test_budget_max_ranks_round_trip(tmp_path, input_ids, kwargs):
    model = get_peft_model(tiny_llama(hidden=64), NSNConfig(rank_granularity=8, keep_base_weights=False, **kwargs))
    fraction = model.peft_config["default"].params_fraction
    for layer in _nsn_layers(model):
        m, d = layer.out_features, layer.in_features
        rank = layer.nsn_max_rank["default"]
        assert rank == rank_for_params_fraction(m, d, fraction, 8)
        assert factored_params(m, d, rank) <= fraction * m * d
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["max_rank"] == kwargs.get("max_rank")
    loaded = PeftModel.from_pretrained(tiny_llama(hidden=64), tmp_path)
    assert nsn_peft.get_max_rank(loaded) == nsn_peft.get_max_rank(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)


def test_break_even_ranks_of_the_8b_shapes():
    assert rank_for_params_fraction(4096, 4096, 1.0, 64) == 2048  # exactly md/(m+d): equal, not bigger
    assert rank_for_params_fraction(1024, 4096, 1.0, 64) == 768
    assert rank_for_params_fraction(14336, 4096, 1.0, 64) == 3136
    assert rank_for_params_fraction(4096, 14336, 1.0, 64) == 3136
    assert rank_for_params_fraction(32, 48, 1.0, 64) == 19  # below one grid step: the exact floor


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.floats(0.01, 1.0), st.sampled_from([1, 8, 64, 128]))
def test_params_fraction_rank_is_the_largest_grid_rank_within_budget(m, d, fraction, granularity):
    rank = rank_for_params_fraction(m, d, fraction, granularity)
    budget = fraction * m * d
    assert 1 <= rank <= min(m, d)
    exact = int(fraction * m * d / (m + d)) if fraction < 1 else m * d // (m + d)
    if min(exact, min(m, d)) >= granularity:
        assert rank % granularity == 0
        assert factored_params(m, d, rank) <= budget * (1 + 1e-12)
        assert rank + granularity > min(exact, min(m, d))
    else:
        assert rank == max(1, min(exact, min(m, d)))


def test_rank_major_storage_for_serving_row_major_for_training(input_ids):
    training = get_peft_model(tiny_llama(), NSNConfig(max_rank=16))
    assert all(layer.nsn_B["default"].is_contiguous() for layer in _nsn_layers(training))  # FSDP needs contiguous
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=16, keep_base_weights=False))
    layer = _nsn_layers(model)[0]
    assert layer.nsn_B["default"].shape == (32, 16) and layer.nsn_B["default"].t().is_contiguous()
    layer.set_factors("default", torch.randn(32, 8), torch.randn(8, 32))
    assert layer.nsn_B["default"].shape == (32, 8) and layer.nsn_B["default"].t().is_contiguous()
    state = model.state_dict()
    key = next(k for k in state if k.endswith("q_proj.nsn_B.default"))
    assert state[key].shape == (32, 8)
    with torch.no_grad():
        before = training(input_ids).logits
        assert all(layer.make_rank_major() for layer in _nsn_layers(training))
        torch.testing.assert_close(training(input_ids).logits, before, atol=0, rtol=0)
    assert all(layer.nsn_B["default"].t().is_contiguous() for layer in _nsn_layers(training))


def test_hub_load_adapter_factors_only_never_reads_dense_weights(tmp_path, input_ids):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=16, rank_granularity=8))
    model.set_rank(8)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids).logits
    from nsn_peft.hub import load_adapter

    served, tok, _ = load_adapter(tmp_path / "adapter", model=tmp_path / "base", keep_base_weights=False)
    assert all(layer.base_weight_dropped for layer in _nsn_layers(served))
    assert not any(p.is_meta for p in served.parameters())
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids).logits, expected, atol=0, rtol=0)
    assert tok is not None


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch, nsn_peft
    from nsn_peft.hub import load_adapter

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    # Import up front what loading imports lazily (model code, accelerate, tokenizers), so RSS shows tensors only.
    import accelerate, peft, safetensors.torch, transformers
    from transformers.models.llama import modeling_llama
    from transformers import AutoConfig, AutoTokenizer
    AutoConfig.from_pretrained(sys.argv[2]); AutoTokenizer.from_pretrained(sys.argv[2])
    peak, done = [rss_kib()], threading.Event()
    def poll():
        while not done.is_set():
            peak.append(rss_kib())
            time.sleep(0.0005)
    before = rss_kib()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    model, _, _ = load_adapter(sys.argv[1], model=sys.argv[2], keep_base_weights=False)
    done.set()
    thread.join()
    peak.append(rss_kib())
    held = sum(t.numel() * t.element_size() for t in model.parameters())
    print(json.dumps({"peak_kib": max(peak) - before, "held_kib": held / 1024}))
    """
)


@pytest.mark.slow
def test_factors_only_loading_peak_memory_stays_near_the_final_size(tmp_path):
    import transformers

    # Layers large enough (64 MiB dense) that the interpreter's own ~10-30 MB of objects and allocator slack,
    # which RSS also counts, stay under the one-layer bound.
    config = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=128,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    from nsn_peft.tuner.peft_type import checkpoint_load_scope

    with checkpoint_load_scope():  # factors need not be meaningful here, only their size
        adapter = get_peft_model(transformers.LlamaForCausalLM(config), NSNConfig(max_params_fraction=0.25))
    for layer in _nsn_layers(adapter):
        for p in (*layer.nsn_A.values(), *layer.nsn_B.values()):
            torch.nn.init.normal_(p)
    adapter.save_pretrained(tmp_path / "adapter")
    dense_kib = sum(p.numel() * 4 for p in transformers.LlamaForCausalLM(config).parameters()) / 1024
    src = str(Path(nsn_peft.__file__).parents[1])
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "adapter"), str(tmp_path / "base")],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    run = json.loads(out.stdout.strip().splitlines()[-1])
    largest_layer_kib = 2048 * 8192 * 4 / 1024
    assert run["held_kib"] < 0.4 * dense_kib  # the served model is far smaller than the dense one ...
    # ... and loading it never exceeded its final size by more than one dense layer (measured: 0.7 layer).
    assert run["peak_kib"] <= run["held_kib"] + largest_layer_kib, run
    assert run["peak_kib"] < 0.5 * dense_kib, run


def test_kernel_dispatch_on_cpu_is_the_reference(input_ids, monkeypatch):
    """The kernels option sends only CUDA 1-token calls to Triton; on the CPU outputs are unchanged."""
    model = get_peft_model(tiny_llama(), NSNConfig(keep_base_weights=False, max_rank=16, rank_granularity=8))
    model.set_rank(8)
    calls = []
    monkeypatch.setattr(layer_module, "nested_linear", lambda *args: calls.append(1) or nested_linear(*args))
    with torch.no_grad():
        expected = model(input_ids).logits
        assert not calls
        assert nsn_peft.set_runtime_options(model, kernels=True) == nsn_peft.RuntimeOptions(
            kernels=True, rank_major=True
        )
        torch.testing.assert_close(model(input_ids).logits, expected, atol=0, rtol=0)
        assert calls
        torch.testing.assert_close(model(input_ids[:, :1]).logits, model.get_base_model()(input_ids[:, :1]).logits)


def test_runtime_options_belong_to_one_model(input_ids, monkeypatch):
    calls = []
    monkeypatch.setattr(layer_module, "nested_linear", lambda *args: calls.append(1) or nested_linear(*args))
    fast = get_peft_model(tiny_llama(), NSNConfig(max_rank=16))
    plain = get_peft_model(tiny_llama(), NSNConfig(max_rank=16))
    fast.set_runtime_options(kernels=True)
    assert nsn_peft.get_runtime_options(fast).kernels and not nsn_peft.get_runtime_options(plain).kernels
    with torch.no_grad():
        plain(input_ids)
        assert not calls  # the other model of the process is untouched
        fast(input_ids)
        assert calls
    fast.add_adapter("second", NSNConfig(max_rank=8))  # layers the tuner creates later run the same way
    assert all(m.runtime_options.kernels for m in fast.modules() if isinstance(m, NSNLinear))
    fast.set_runtime_options(nsn_peft.RuntimeOptions())
    assert not any(m.runtime_options.kernels for m in fast.modules() if isinstance(m, NSNLinear))
    with pytest.raises(ValueError, match="must be a bool"):
        nsn_peft.RuntimeOptions(kernels="yes")


def test_the_process_wide_kernel_switch_still_works_but_warns(input_ids, monkeypatch):
    calls = []
    monkeypatch.setattr(layer_module, "nested_linear", lambda *args: calls.append(1) or nested_linear(*args))
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=16))
    monkeypatch.setattr(NSNLinear, "use_kernels", True)
    with torch.no_grad(), pytest.warns(FutureWarning, match="set_runtime_options"):
        model(input_ids)
    assert calls


def test_storage_layout_is_a_runtime_option(input_ids):
    model = get_peft_model(tiny_llama(), NSNConfig(max_rank=16)).eval()
    layers = [m for m in model.modules() if isinstance(m, NSNLinear)]
    with torch.no_grad():
        before = model(input_ids).logits
        model.set_runtime_options(rank_major=True)
        assert all(layer.rank_major_storage and layer.nsn_B["default"].t().is_contiguous() for layer in layers)
        torch.testing.assert_close(model(input_ids).logits, before, atol=0, rtol=0)
        nsn_peft.set_runtime_options(model, rank_major=False)
        assert all(not layer.rank_major_storage and layer.nsn_B["default"].is_contiguous() for layer in layers)
    with pytest.raises(AttributeError):
        layers[0].rank_major_storage = True  # read-only: the layout changes through the runtime options
