"""Data-aware initialisations (whitened, projected): exactness, the nested property, mixed ranks, dense fallback."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_gpt2, tiny_llama

import nsn_peft
from nsn_peft import NSNConfig, collect_activation_stats
from nsn_peft.linalg.spectra import whitened_spectrum


def _blocks(n=8, length=16, seed=0):
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))


def _layer_outputs(model, ids, names):
    outputs = {}

    def hook(name):
        def fn(module, args, output):
            outputs[name] = output.detach().double()

        return fn

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("init", ["whitened", "projected"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_full_rank_and_full_energy_reproduce_every_layer_output(init, factory):
    base = factory()
    ids = _blocks()
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"] or [
        n for n, m in base.named_modules() if type(m).__name__ == "Conv1D"
    ]
    expected = _layer_outputs(base, ids, names)
    with torch.no_grad():
        ref = base(ids).logits
    stats = collect_activation_stats(base, ids, show_progress=False)
    model = get_peft_model(base, NSNConfig(init=init, stats=stats, keep_dense_if_no_savings=False, whitening_damp=0.0))
    got = _layer_outputs(model, ids, [f"base_model.model.{n}" for n in names])
    for name in names:
        out, want = got[f"base_model.model.{name}"], expected[name]
        assert (out - want).abs().max() <= 1e-4 * want.abs().max(), name
    with torch.no_grad():
        out = model(ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-4


def test_whitened_is_nested_and_optimal_in_the_output_metric():
    base = tiny_llama()
    ids = _blocks(16, 16)
    stats = collect_activation_stats(base, ids, show_progress=False)
    name = "model.layers.1.mlp.down_proj"
    model = get_peft_model(
        base, NSNConfig(init="whitened", stats=stats, target_modules=["down_proj"], whitening_damp=0.0)
    )
    layer = nsn_peft.tuner.ranks.nsn_layers(model)[name]
    w = layer.dense_weight().detach().double()
    gram = stats.gram(name).double()
    spectrum = whitened_spectrum(w, gram, damp=0.0)
    errors = []
    for r in range(1, layer.nsn_max_rank["default"] + 1):
        delta = w - layer.effective_weight("default", r).detach().double()
        error = torch.trace(delta @ gram @ delta.T).item()
        # The optimum of rank r in the output metric: the tail of the whitened spectrum (Eckart–Young on W L).
        assert error == pytest.approx(spectrum[r:].sum().item(), rel=1e-6, abs=1e-9 * spectrum.sum().item())
        errors.append(error)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))  # every prefix is nested: more rank, less error


def test_whitened_beats_plain_svd_on_calibration_outputs():
    base = tiny_llama()
    ids = _blocks()
    stats = collect_activation_stats(base, ids, show_progress=False)
    name = "model.layers.0.mlp.down_proj"
    errors = {}
    for init in ("svd", "whitened"):
        model = get_peft_model(tiny_llama(), NSNConfig(init=init, stats=stats, target_modules=["down_proj"]))
        layer = nsn_peft.tuner.ranks.nsn_layers(model)[name]
        w = layer.dense_weight().double()
        gram = stats.gram(name).double()
        errors[init] = []
        for r in (2, 8, 16):
            delta = w - layer.effective_weight("default", r).double()
            errors[init].append(torch.trace(delta @ gram @ delta.T).item())
    assert all(wh <= sv * (1 + 1e-6) for wh, sv in zip(errors["whitened"], errors["svd"]))


@pytest.mark.parametrize("init", ["whitened", "projected"])
def test_data_aware_init_without_stats_explains_how_to_collect_them(init):
    with pytest.raises(ValueError, match=r"collect_activation_stats.*stats_path"):
        get_peft_model(tiny_llama(), NSNConfig(init=init, target_modules=["up_proj"]))


def _low_rank_inputs(stats, name, k):
    values, vectors = torch.linalg.eigh(stats.grams[name])
    stats.grams[name] = (vectors[:, -k:] * values[-k:]) @ vectors[:, -k:].T


def test_projected_mixed_ranks_round_trip_and_dense_fallback(tmp_path):
    base = tiny_llama()
    stats = collect_activation_stats(base, _blocks(), show_progress=False)
    # Inputs of one MLP layer confined to 3 directions: its utilized rank is 3, so factoring saves.
    _low_rank_inputs(stats, "model.layers.0.mlp.down_proj", 3)
    model = get_peft_model(base, NSNConfig(init="projected", stats=stats, target_modules=["down_proj", "q_proj"]))
    config = model.peft_config["default"]
    assert config.rank_pattern["model.layers.0.mlp.down_proj"] == 3
    # q_proj (32x32) at full utilized rank would not save: kept dense, reported and excluded for reloading.
    assert "model.layers.0.self_attn.q_proj" in config.kept_dense
    assert "model.layers.0.self_attn.q_proj" not in nsn_peft.get_rank(model)
    assert isinstance(model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj"), torch.nn.Linear)
    ids = _blocks(2, 12, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert nsn_peft.get_max_rank(loaded) == nsn_peft.get_max_rank(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_projected_energy_thresholds_shrink_the_utilized_rank():
    base = tiny_llama()
    stats = collect_activation_stats(base, _blocks(), show_progress=False)
    ranks = {}
    for energy in (1.0, 0.99, 0.8, 0.5):
        model = get_peft_model(
            tiny_llama(),
            NSNConfig(
                init="projected",
                stats=stats,
                target_modules=["down_proj"],
                energy_input=energy,
                energy_output=energy,
                keep_dense_if_no_savings=False,
            ),
        )
        ranks[energy] = nsn_peft.get_max_rank(model)["model.layers.0.mlp.down_proj"]
    assert ranks[1.0] >= ranks[0.99] >= ranks[0.8] >= ranks[0.5] >= 1
    assert ranks[0.5] < ranks[1.0]


def test_whitened_mixed_rank_pattern_round_trip(tmp_path):
    base = tiny_llama()
    stats = collect_activation_stats(base, _blocks(), show_progress=False)
    pattern = {"model.layers.0.mlp.up_proj": 5, "model.layers.1.mlp.up_proj": 11, "down_proj": 7}
    model = get_peft_model(
        base, NSNConfig(init="whitened", stats=stats, target_modules=["up_proj", "down_proj"], rank_pattern=pattern)
    )
    ranks = nsn_peft.get_max_rank(model)
    assert ranks["model.layers.0.mlp.up_proj"] == 5 and ranks["model.layers.1.mlp.up_proj"] == 11
    assert ranks["model.layers.0.mlp.down_proj"] == ranks["model.layers.1.mlp.down_proj"] == 7
    ids = _blocks(2, 12, seed=4)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert nsn_peft.get_max_rank(loaded) == ranks
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.slow
def test_smollm2_whitened_beats_projected_beats_svd_at_80_percent_of_the_mlp():
    """On the real SmolLM2-135M (embedded GGUF): the ordering behind the reference figures (svd ≫ projected ≫ whitened)."""
    import copy

    from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
    from nsn_peft.evaluation import perplexity
    from nsn_peft.hub import load_model_and_tokenizer
    from nsn_peft.planning.allocate import projected_plan_for_budget, uniform_plan

    base, tok = load_model_and_tokenizer()
    calib = token_blocks(load_texts(python_docs_dir("tutorial")), tok, 512, 8 * 512)
    eval_ids = token_stream(load_texts(python_docs_dir("howto")), tok, 2048)
    stats = collect_activation_stats(base, calib, show_progress=False)
    targets = ["gate_proj", "up_proj", "down_proj"]
    uniform = uniform_plan(base, 0.8, target_modules=targets)
    ppl = {"dense": perplexity(base, eval_ids)}
    for init in ("svd", "whitened"):
        model = get_peft_model(copy.deepcopy(base), NSNConfig(**uniform.to_config_kwargs(init=init, stats=stats)))
        ppl[init] = perplexity(model, eval_ids)
    projected = projected_plan_for_budget(base, stats, 0.8, target_modules=targets, show_progress=False)
    model = get_peft_model(copy.deepcopy(base), NSNConfig(**projected.to_config_kwargs(stats=stats)))
    ppl["projected"] = perplexity(model, eval_ids)
    assert ppl["dense"] < ppl["whitened"] < ppl["projected"] < ppl["svd"], ppl
    assert ppl["whitened"] < 4 * ppl["dense"], ppl
