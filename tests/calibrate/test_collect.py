"""Calibration: Gram matrices of layer inputs, padding, names, persistence, mismatches, data sources."""

import json
import socket

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import TEXTS, char_tokenizer, tiny_gpt2, tiny_llama

from nsn_peft import ActivationStats, NSNConfig, collect_activation_stats
from nsn_peft.calibrate.collect import calibration_targets


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

    handles = [
        m.register_forward_pre_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
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
        torch.testing.assert_close(
            stats.grams[name], gram, rtol=1e-4, atol=1e-5 * gram.abs().max().item()
        )  # fp32 per batch
        assert stats.token_counts[name] == ids.numel()
    assert stats.grams["model.layers.0.mlp.up_proj"].dtype == torch.float64


def test_padding_is_excluded():
    model = tiny_llama()
    ids = _blocks(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    stats = collect_activation_stats(
        model, [{"input_ids": ids, "attention_mask": mask}], max_tokens=None, show_progress=False
    )
    expected = _manual_grams(model, ids, mask)
    expected_gram = expected["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(
        stats.grams["model.layers.1.mlp.down_proj"],
        expected_gram,
        rtol=1e-4,
        atol=1e-5 * expected_gram.abs().max().item(),
    )
    assert stats.token_counts["model.layers.1.mlp.down_proj"] == 16


def test_max_tokens_and_target_modules_and_conv1d():
    stats = collect_activation_stats(
        tiny_gpt2(), _blocks(8, 16), max_tokens=32, batch_size=2, target_modules=["c_fc"], show_progress=False
    )
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
    stats.save(tmp_path / "exact", dtype=torch.float64)
    assert sorted(p.name for p in (tmp_path / "exact").iterdir()) == ["activation_stats.safetensors", "stats.json"]
    again = ActivationStats.load(tmp_path / "exact")
    assert again.token_counts == stats.token_counts and again.model_id == stats.model_id
    for name in stats.grams:
        assert torch.equal(again.grams[name], stats.grams[name])  # float64 storage: bit for bit
    stats.save(tmp_path / "compact")  # default: float32, the sums rounded once
    compact = ActivationStats.load(tmp_path / "compact")
    for name in stats.grams:
        assert compact.grams[name].dtype == torch.float32
        torch.testing.assert_close(compact.grams[name].double(), stats.grams[name], rtol=1e-7, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_layers_reading_one_input_share_one_matrix_in_memory_and_on_disk(tmp_path):
    stats = collect_activation_stats(tiny_llama(), _blocks(), show_progress=False)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert stats.grams[attn + "q_proj"] is stats.grams[attn + "k_proj"] is stats.grams[attn + "v_proj"]
    assert stats.grams[mlp + "gate_proj"] is stats.grams[mlp + "up_proj"]
    assert stats.grams[attn + "o_proj"] is not stats.grams[attn + "q_proj"]
    stats.save(tmp_path / "stats")
    meta = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert meta["aliases"][attn + "k_proj"] == attn + "q_proj" and meta["aliases"][mlp + "up_proj"] == mlp + "gate_proj"
    with safe_open(str(tmp_path / "stats" / "activation_stats.safetensors"), "pt") as f:
        stored = set(f.keys())
        shape = f.get_slice(attn + "q_proj").get_shape()
    assert len(stored) == 2 * 4  # q/k/v, o, gate/up, down per block: each distinct input once
    assert shape == [32 * 33 // 2]  # one triangle of a symmetric 32×32 matrix
    loaded = ActivationStats.load(tmp_path / "stats")
    assert loaded.grams[attn + "q_proj"] is loaded.grams[attn + "v_proj"]
    assert set(loaded.grams) == set(stats.grams)
    only_k = ActivationStats.load(tmp_path / "stats", layers=[attn + "k_proj"])  # an alias alone loads too
    torch.testing.assert_close(only_k.grams[attn + "k_proj"], loaded.grams[attn + "q_proj"])
    # Sharing survives merging and moving.
    merged = stats.merge(stats)
    assert merged.grams[attn + "q_proj"] is merged.grams[attn + "k_proj"]
    torch.testing.assert_close(merged.grams[attn + "k_proj"], 2 * stats.grams[attn + "k_proj"])
    assert stats.to("cpu").grams[mlp + "gate_proj"] is stats.to("cpu").grams[mlp + "gate_proj"]


def test_equal_matrices_are_stored_once_even_as_separate_tensors(tmp_path):
    gram = torch.eye(4, dtype=torch.float64) * 2
    stats = ActivationStats({"a": gram, "b": gram.clone(), "c": gram * 3}, {"a": 5, "b": 5, "c": 5})
    stats.save(tmp_path)
    meta = json.loads((tmp_path / "stats.json").read_text())
    assert meta["aliases"] == {"b": "a"}
    same_values_other_count = ActivationStats({"a": gram, "b": gram.clone()}, {"a": 5, "b": 6})
    same_values_other_count.save(tmp_path / "counts")
    assert json.loads((tmp_path / "counts" / "stats.json").read_text())["aliases"] == {}


def test_statistics_of_format_version_1_still_load(tmp_path):
    """The first format: every layer's float64 matrix in full, no aliases."""
    grams = {
        "m.a": torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64),
        "m.b": torch.eye(2, dtype=torch.float64),
    }
    save_file(grams, str(tmp_path / "activation_stats.safetensors"))
    meta = {
        "format_version": 1,
        "model_id": "old",
        "dtype": "float64",
        "layers": {"m.a": {"in_features": 2, "tokens": 7}, "m.b": {"in_features": 2, "tokens": 7}},
        "extra": {},
    }
    (tmp_path / "stats.json").write_text(json.dumps(meta))
    stats = ActivationStats.load(tmp_path)
    assert stats.model_id == "old" and stats.token_counts == {"m.a": 7, "m.b": 7}
    assert torch.equal(stats.grams["m.a"], grams["m.a"]) and stats.grams["m.a"].dtype == torch.float64


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
    stats = collect_activation_stats(
        _ReusesMemory(), torch.zeros(1, 4, dtype=torch.long), max_tokens=None, show_progress=False
    )
    b = torch.arange(32, dtype=torch.float64).view(4, 8)
    torch.testing.assert_close(stats.grams["second"], b.T @ b)
    torch.testing.assert_close(stats.grams["first"], torch.full((8, 8), 4.0, dtype=torch.float64))


def test_texts_paths_and_token_tensors_give_the_same_stats(tmp_path):
    model, tok = tiny_llama(), char_tokenizer()
    from_texts = collect_activation_stats(model, TEXTS, tokenizer=tok, seq_len=16, max_tokens=96, show_progress=False)
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "docs" / f"{i}.txt").write_text(text)
    from_folder = collect_activation_stats(
        model, tmp_path / "docs", tokenizer=tok, seq_len=16, max_tokens=96, show_progress=False
    )
    from nsn_peft.data import token_blocks

    blocks = token_blocks(TEXTS, tok, 16, 96)
    from_tensor = collect_activation_stats(model, blocks, max_tokens=None, show_progress=False)
    assert from_texts.num_tokens == 96 and from_texts.extra["tokens"] == 96
    for name in from_tensor.grams:
        torch.testing.assert_close(from_texts.grams[name], from_tensor.grams[name])
        torch.testing.assert_close(from_folder.grams[name], from_tensor.grams[name])
    with pytest.raises(ValueError, match="tokenizer"):
        collect_activation_stats(model, TEXTS, show_progress=False)


def test_a_token_stream_is_cut_into_blocks_and_bad_inputs_are_named():
    model = tiny_llama()
    stream = torch.randint(0, 101, (70,), generator=torch.Generator().manual_seed(2))
    stats = collect_activation_stats(model, stream, seq_len=16, max_tokens=None, show_progress=False)
    assert stats.num_tokens == 64  # 4 full blocks; the 6 leftover tokens are dropped
    with pytest.raises(TypeError, match="token ids"):
        collect_activation_stats(model, torch.randn(2, 8), show_progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        collect_activation_stats(model, [{"ids": stream[:8]}], show_progress=False)
    with pytest.raises(ValueError, match="match"):
        collect_activation_stats(model, stream, target_modules=["no_such_layer"], show_progress=False)


def test_float32_accumulator_and_stats_on_the_run_device():
    stats = collect_activation_stats(
        tiny_llama(), _blocks(), dtype=torch.float32, stats_device=None, show_progress=False
    )
    assert all(g.dtype == torch.float32 for g in stats.grams.values())
    assert stats.extra["accumulate_dtype"] == "float32"


def test_default_targets_skip_the_head_but_a_regex_can_pick_it():
    model = tiny_llama()
    assert "lm_head" not in calibration_targets(model)
    assert list(calibration_targets(model, r"lm_head")) == ["lm_head"]
    stats = collect_activation_stats(model, _blocks(), target_modules=r"lm_head", show_progress=False)
    expected = sum(h.T @ h for h in _final_hidden(model, _blocks()))
    torch.testing.assert_close(stats.grams["lm_head"], expected, rtol=1e-4, atol=1e-3)


def _final_hidden(model, ids):
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return [hidden.reshape(-1, hidden.shape[-1]).double()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["activation", "output_gradient"])
def test_sums_are_all_reduced_under_torch_distributed(kind):
    import torch.distributed as dist

    from nsn_peft import collect_gradient_stats

    collect = collect_activation_stats if kind == "activation" else collect_gradient_stats
    model = tiny_llama()
    local = collect(model, _blocks(), show_progress=False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        reduced = collect(model, _blocks(), show_progress=False)
    finally:
        dist.destroy_process_group()
    assert reduced.kind == kind
    assert reduced.token_counts == local.token_counts and reduced.extra["tokens"] == local.extra["tokens"]
    for name in local.grams:
        torch.testing.assert_close(reduced.grams[name], local.grams[name])


def test_calibration_restores_the_model_when_a_batch_fails():
    from nsn_peft import collect_gradient_stats

    model = tiny_llama().train()
    for collect in (collect_activation_stats, collect_gradient_stats):
        with pytest.raises(TypeError, match="dicts with 'input_ids'"):
            collect(model, [{"input_ids": _blocks(1, 8)}, "not a batch"], max_tokens=None, show_progress=False)
        assert model.training and all(p.requires_grad for p in model.parameters())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _SometimesShared(torch.nn.Module):
    """Two layers read the same tensor in the first batch and different tensors afterwards."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(4, 4)
        self.second = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        x = input_ids.float()[..., :4]
        self.first(x)
        self.calls += 1
        self.second(x if self.calls == 1 else x * 2)


def test_shared_inputs_share_one_product_and_split_exactly_when_they_diverge():
    ids = torch.arange(24).view(3, 2, 4)  # three batches of 2 tokens x 4 "features"
    stats = collect_activation_stats(_SometimesShared(), list(ids), max_tokens=None, show_progress=False)
    xs = [b.double() for b in ids]
    first = sum(x.T @ x for x in xs)
    second = xs[0].T @ xs[0] + sum((2 * x).T @ (2 * x) for x in xs[1:])
    torch.testing.assert_close(stats.grams["first"], first)
    torch.testing.assert_close(stats.grams["second"], second)
    assert stats.token_counts == {"first": 6, "second": 6}


def test_qkv_and_gate_up_share_accumulators_and_match_separate_ones():
    model = tiny_llama()
    shared = collect_activation_stats(model, _blocks(), show_progress=False)
    separate = collect_activation_stats(model, _blocks(), share_inputs=False, show_progress=False)
    q, k = shared.grams["model.layers.0.self_attn.q_proj"], shared.grams["model.layers.0.self_attn.k_proj"]
    assert q is k
    for name in shared.grams:
        assert torch.equal(shared.grams[name], separate.grams[name])


def _manual_output_gradients(model, ids, names, mask=None):
    outputs = {}

    def keep(name):
        def fn(module, args, output):
            output.retain_grad()
            outputs[name] = output

        return fn

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    labels = ids.clone() if mask is None else ids.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum"
    ).backward()
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    grams = {}
    for name, out in outputs.items():
        g = out.grad.reshape(-1, out.shape[-1]).double()
        if mask is not None:
            g = g[mask.reshape(-1).bool()]
        grams[name] = g.T @ g
    return grams


def test_gradient_stats_match_autograd_and_exclude_padding():
    from nsn_peft import collect_gradient_stats

    model = tiny_llama()
    ids = _blocks(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    expected = _manual_output_gradients(model, ids, names, mask)
    stats = collect_gradient_stats(
        model, [{"input_ids": ids, "attention_mask": mask}], max_tokens=None, show_progress=False
    )
    assert stats.extra["kind"] == "output_gradient" and stats.token_counts[names[0]] == 20
    for name in names:
        assert stats.grams[name].shape == (expected[name].shape[0],) * 2
        torch.testing.assert_close(
            stats.grams[name], expected[name], rtol=1e-4, atol=1e-6 * expected[name].abs().max().item()
        )
    assert all(p.requires_grad for p in model.parameters())  # parameters are unfrozen again
    assert all(p.grad is None for p in model.parameters())


def test_batch_gram_is_the_float32_product():
    from nsn_peft.linalg.gram import batch_gram

    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch_gram(x), x.T @ x, rtol=0, atol=0)
    half = x.bfloat16()
    assert batch_gram(half).dtype == torch.float32  # 16-bit activations are upcast, never summed in 16 bits
    torch.testing.assert_close(batch_gram(half), half.float().T @ half.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="matrix"):
        batch_gram(x[None])


# -- bad statistics are named, and saving never destroys what is at the destination -----------------------------
def _saved_stats(tmp_path):
    stats = collect_activation_stats(
        tiny_llama(), _blocks(), target_modules=["up_proj", "down_proj"], show_progress=False
    )
    stats.save(tmp_path / "stats")
    return stats, tmp_path / "stats"


@pytest.mark.parametrize("init", ["whitened", "projected"])
def test_statistics_over_zero_tokens_are_refused_by_layer_and_folder(tmp_path, init):
    stats, folder = _saved_stats(tmp_path)
    stats.token_counts["model.layers.1.mlp.up_proj"] = 0
    stats.grams["model.layers.1.mlp.up_proj"].zero_()
    stats.save(folder)
    with pytest.raises(ValueError, match=r"stats.*model\.layers\.1\.mlp\.up_proj.*0 tokens"):
        get_peft_model(tiny_llama(), NSNConfig(init=init, stats_path=str(folder), target_modules=["up_proj"]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_named_by_layer(tmp_path, bad):
    stats, folder = _saved_stats(tmp_path)
    stats.grams["model.layers.0.mlp.down_proj"][3, 3] = bad
    stats.save(folder)
    with pytest.raises(ValueError, match=rf"{folder}.*model\.layers\.0\.mlp\.down_proj.*NaN/Inf"):
        get_peft_model(tiny_llama(), NSNConfig(init="whitened", stats_path=str(folder), target_modules=["down_proj"]))


def test_a_failing_decomposition_names_the_layer(monkeypatch):
    from nsn_peft.linalg import decompose

    stats = collect_activation_stats(tiny_llama(), _blocks(), target_modules=["up_proj"], show_progress=False)

    def singular(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    monkeypatch.setattr(decompose, "whitened_factors", singular)
    with pytest.raises(
        ValueError, match=r"init='whitened' failed for layer 'model\.layers\.0\.mlp\.up_proj'.*cholesky"
    ):
        get_peft_model(tiny_llama(), NSNConfig(init="whitened", stats=stats, target_modules=["up_proj"]))


def test_truncated_statistics_file_is_named(tmp_path):
    _, folder = _saved_stats(tmp_path)
    tensors = folder / "activation_stats.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"activation_stats\.safetensors is truncated"):
        ActivationStats.load(folder)


def test_saving_keeps_gradient_statistics_and_other_files(tmp_path):
    stats, folder = _saved_stats(tmp_path)
    grads = ActivationStats(
        {"model.layers.0.mlp.up_proj": torch.eye(48, dtype=torch.float64)},
        {"model.layers.0.mlp.up_proj": 5},
        extra={"kind": "output_gradient"},
    )
    grads.save(folder / "output_gradients")
    (folder / "notes.txt").write_text("mine")
    stats.token_counts = {k: v + 1 for k, v in stats.token_counts.items()}
    stats.save(folder)
    assert ActivationStats.load(folder).token_counts == stats.token_counts
    assert ActivationStats.load(folder / "output_gradients").token_counts == {"model.layers.0.mlp.up_proj": 5}
    assert (folder / "notes.txt").read_text() == "mine"


def test_saving_over_a_file_is_a_clear_error(tmp_path):
    stats, _ = _saved_stats(tmp_path)
    target = tmp_path / "plain_file"
    target.write_text("precious")
    with pytest.raises(NotADirectoryError, match=r"statistics folder .*plain_file: a file exists there"):
        stats.save(target)
    assert target.read_text() == "precious"
