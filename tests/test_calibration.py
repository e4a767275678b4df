import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model

import nsn_peft
from nsn_peft import ActivationStats, NSNConfig, collect_activation_stats
from nsn_peft.evaluation import evaluate_perplexity, perplexity


def _blocks(n=6, length=16, seed=0):
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))


def _manual_grams(model, ids, attention_mask=None):
    grams = {}

    def hook(name):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            if attention_mask is not None:
                x = x[attention_mask.reshape(-1).bool()]
            grams[name] = grams.get(name, 0) + x.T @ x

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    for h in handles:
        h.remove()
    return grams


def test_stats_match_direct_computation_and_skip_the_head():
    model = tiny_llama()
    ids = _blocks()
    stats = collect_activation_stats(model, ids, max_tokens=None, batch_size=4, show_progress=False)
    expected = _manual_grams(model, ids)
    assert set(stats.layer_names) == set(expected) and "lm_head" not in stats
    for name, gram in expected.items():
        torch.testing.assert_close(stats.grams[name], gram, rtol=1e-4, atol=1e-5 * gram.abs().max().item())  # fp32 per batch
        assert stats.token_counts[name] == ids.numel()
    assert stats.grams["model.layers.0.mlp.up_proj"].dtype == torch.float64


def test_padding_is_excluded():
    model = tiny_llama()
    ids = _blocks(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    stats = collect_activation_stats(model, [{"input_ids": ids, "attention_mask": mask}], max_tokens=None, show_progress=False)
    expected = _manual_grams(model, ids, mask)
    expected_gram = expected["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(stats.grams["model.layers.1.mlp.down_proj"], expected_gram, rtol=1e-4, atol=1e-5 * expected_gram.abs().max().item())
    assert stats.token_counts["model.layers.1.mlp.down_proj"] == 16


def test_max_tokens_and_target_modules_and_conv1d():
    stats = collect_activation_stats(tiny_gpt2(), _blocks(8, 16), max_tokens=32, batch_size=2, target_modules=["c_fc"], show_progress=False)
    assert stats.layer_names == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert stats.num_tokens == 32
    assert stats.grams["transformer.h.0.mlp.c_fc"].shape == (32, 32)


def test_names_are_canonical_on_an_adapted_model():
    base = tiny_llama()
    ids = _blocks()
    plain = collect_activation_stats(base, ids, show_progress=False)
    adapted = get_peft_model(base, NSNConfig(target_modules=["up_proj"]))
    wrapped = collect_activation_stats(adapted, ids, show_progress=False)
    assert set(wrapped.layer_names) == set(plain.layer_names)
    torch.testing.assert_close(wrapped.grams["model.layers.0.mlp.up_proj"], plain.grams["model.layers.0.mlp.up_proj"])


def test_stats_round_trip_and_atomic_folder(tmp_path):
    stats = collect_activation_stats(tiny_llama(), _blocks(), show_progress=False)
    stats.save(tmp_path / "stats")
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["activation_stats.safetensors", "stats.json"]
    again = ActivationStats.load(tmp_path / "stats")
    assert again.token_counts == stats.token_counts and again.model_id == stats.model_id
    for name in stats.grams:
        assert torch.equal(again.grams[name], stats.grams[name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_mismatched_stats_name_the_layer(tmp_path):
    stats = collect_activation_stats(tiny_llama(hidden=48), _blocks(), show_progress=False)
    stats.save(tmp_path)
    with pytest.raises(ValueError, match=r"wrong shapes.*model\.layers\.0\.mlp\.up_proj"):
        get_peft_model(tiny_llama(), NSNConfig(init="whitened", stats_path=str(tmp_path), target_modules=["up_proj"]))
    partial = collect_activation_stats(tiny_llama(), _blocks(), target_modules=["up_proj"], show_progress=False)
    with pytest.raises(ValueError, match=r"missing layers.*down_proj"):
        get_peft_model(tiny_llama(), NSNConfig(init="whitened", stats=partial, target_modules=["down_proj"]))
    with pytest.raises(FileNotFoundError, match="activation-stats folder"):
        ActivationStats.load(tmp_path / "nope")


@pytest.mark.parametrize("init", ["whitened", "projected"])
def test_data_aware_inits_are_exact_at_full_rank(init):
    base = tiny_llama()
    ids = _blocks(8, 16)
    with torch.no_grad():
        ref = base(ids).logits
    stats = collect_activation_stats(base, ids, show_progress=False)
    model = get_peft_model(base, NSNConfig(init=init, stats=stats, keep_dense_if_no_savings=False, whitening_damp=0.0))
    with torch.no_grad():
        out = model(ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-4


def test_whitened_beats_plain_svd_on_calibration_outputs():
    base = tiny_llama()
    ids = _blocks(8, 16)
    stats = collect_activation_stats(base, ids, show_progress=False)
    name = "model.layers.0.mlp.down_proj"
    errors = {}
    for init in ("svd", "whitened"):
        model = get_peft_model(tiny_llama(), NSNConfig(init=init, stats=stats, target_modules=["down_proj"]))
        layer = nsn_peft.ranks.nsn_layers(model)[name]
        w = layer.dense_weight().double()
        gram = stats.gram(name).double()
        errors[init] = []
        for r in (2, 8, 16):
            delta = w - layer.effective_weight("default", r).double()
            errors[init].append(torch.trace(delta @ gram @ delta.T).item())
    assert all(wh <= sv * (1 + 1e-6) for wh, sv in zip(errors["whitened"], errors["svd"]))
    assert errors["whitened"] == sorted(errors["whitened"], reverse=True)  # nested: more rank, less error


def test_projected_mixed_ranks_round_trip_and_dense_fallback(tmp_path):
    base = tiny_llama()
    # Inputs of the MLP confined to few directions: low utilized rank, so factoring saves.
    stats = collect_activation_stats(base, _blocks(8, 16), show_progress=False)
    low = stats.grams["model.layers.0.mlp.down_proj"]
    values, vectors = torch.linalg.eigh(low)
    stats.grams["model.layers.0.mlp.down_proj"] = (vectors[:, -3:] * values[-3:]) @ vectors[:, -3:].T
    model = get_peft_model(base, NSNConfig(init="projected", stats=stats, target_modules=["down_proj", "q_proj"]))
    config = model.peft_config["default"]
    assert config.rank_pattern["model.layers.0.mlp.down_proj"] == 3
    # q_proj (32x32) at full utilized rank would not save: kept dense and excluded for reloading.
    assert "model.layers.0.self_attn.q_proj" in config.kept_dense
    assert "model.layers.0.self_attn.q_proj" not in nsn_peft.get_rank(model)
    ids = _blocks(2, 12, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert nsn_peft.get_max_rank(loaded) == nsn_peft.get_max_rank(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_perplexity_sliding_window_and_texts():
    model = tiny_llama()
    ids = torch.randint(0, 101, (100,), generator=torch.Generator().manual_seed(5))
    disjoint = evaluate_perplexity(model, ids, seq_len=20)
    assert disjoint["tokens"] == 5 * 19
    overlapping = evaluate_perplexity(model, ids, seq_len=20, stride=10)
    assert overlapping["tokens"] == 99  # every token after the first is scored exactly once
    with torch.no_grad():
        logits = model(input_ids=ids[None, :20]).logits[0, :-1]
    manual = torch.nn.functional.cross_entropy(logits, ids[1:20]).exp().item()
    assert math.isclose(perplexity(model, ids[:20], seq_len=20), manual, rel_tol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, seq_len=20, stride=30)


class _ReusesMemory(torch.nn.Module):
    """Feeds two layers different inputs that the allocator may place at the same address."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 8)
        self.second = torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        a = torch.ones(4, 8)
        self.first(a)
        del a
        b = torch.arange(32, dtype=torch.float32).view(4, 8)
        self.second(b)


def test_distinct_inputs_never_share_a_gram_even_at_the_same_address():
    stats = collect_activation_stats(_ReusesMemory(), torch.zeros(1, 4, dtype=torch.long), max_tokens=None, show_progress=False)
    b = torch.arange(32, dtype=torch.float64).view(4, 8)
    torch.testing.assert_close(stats.grams["second"], b.T @ b)
    torch.testing.assert_close(stats.grams["first"], torch.full((8, 8), 4.0, dtype=torch.float64))
