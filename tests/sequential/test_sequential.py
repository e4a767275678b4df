"""Sequential (block-by-block, offloaded) compression equals the in-memory path; memory checks and offloading."""

import copy

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from peft import PeftModel
from tiny_models import tiny_gpt2, tiny_llama

from nsn_peft import collect_activation_stats, collect_gradient_stats
from nsn_peft.refine import RefineConfig, compress_and_refine, nsn_factors
from nsn_peft.sequential import (
    BlockDoesNotFitError,
    collect_activation_stats_sequential,
    collect_gradient_stats_sequential,
    compress_sequential,
)

CONFIG = RefineConfig(batch_size=4, e2e_tokens=0, blockwise_epochs=2, gradient_tokens=96)


def _tokens(n=20, length=12, seed=0):
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))


def _assert_same_stats(got, expected):
    assert got.layer_names == expected.layer_names
    assert got.token_counts == expected.token_counts
    for name in expected.layer_names:
        scale = expected.grams[name].abs().max().item()
        torch.testing.assert_close(got.grams[name], expected.grams[name], rtol=1e-6, atol=1e-9 * scale)


def _assert_same_factors(got, expected, atol=0.0):
    a, b = nsn_factors(got), nsn_factors(expected)
    assert set(a) == set(b)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_statistics_equal_the_whole_model_ones(factory):
    model, ids = factory(), _tokens(10)
    _assert_same_stats(
        collect_activation_stats_sequential(model, ids, batch_size=4, device="cpu", show_progress=False),
        collect_activation_stats(model, ids, max_tokens=None, batch_size=4, show_progress=False),
    )
    _assert_same_stats(
        collect_gradient_stats_sequential(model, ids, batch_size=3, device="cpu", show_progress=False),
        collect_gradient_stats(model, ids, max_tokens=None, batch_size=3, show_progress=False),
    )


@pytest.mark.parametrize("allocation", ["mixed", "uniform"])
def test_plan_and_factors_equal_the_in_memory_recipe(allocation):
    calibration, validation = _tokens(), _tokens(4, seed=1)
    dense = tiny_llama(layers=3)
    expected, report = compress_and_refine(
        copy.deepcopy(dense),
        calibration,
        0.6,
        allocation=allocation,
        validation=validation,
        config=CONFIG,
        show_progress=False,
    )
    model, sequential = compress_sequential(
        dense, calibration, 0.6, allocation=allocation, config=CONFIG, device="cpu", show_progress=False
    )
    assert sequential.ranks == report.ranks and sequential.kept_dense == report.kept_dense
    assert sequential.error_after == report.blockwise["error_after"]
    assert all(a < b for a, b in zip(sequential.error_after, sequential.error_before))
    _assert_same_factors(model, expected)
    assert sequential.blocks == 3 and len(sequential.block_seconds["refine"]) == 3


def test_gpt2_conv1d_blocks_and_the_saved_adapter_reloads(tmp_path):
    calibration = _tokens()
    model, report = compress_sequential(tiny_gpt2(), calibration, 0.5, config=CONFIG, device="cpu", show_progress=False)
    assert report.ranks and len(report.error_after) == 2
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=calibration[:2]).logits, model(input_ids=calibration[:2]).logits)


def test_disk_offloaded_model_and_offload_folder_give_the_same_result(tmp_path):
    calibration = _tokens()
    dense = tiny_llama(layers=3)
    expected, _ = compress_sequential(
        copy.deepcopy(dense), calibration, 0.6, config=CONFIG, device="cpu", show_progress=False
    )
    dense.save_pretrained(tmp_path / "dense")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
        **{f"model.layers.{i}": "disk" for i in range(3)},
    }
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", device_map=device_map, offload_folder=tmp_path / "accelerate"
    )
    assert offloaded.model.layers[1].mlp.up_proj.weight.is_meta
    model, report = compress_sequential(
        offloaded, calibration, 0.6, config=CONFIG, device="cpu", offload_folder=tmp_path / "work", show_progress=False
    )
    assert (tmp_path / "work" / "factors" / "block-00002.safetensors").is_file()
    assert (tmp_path / "work" / "stats" / "block-00000" / "stats.json").is_file()
    assert offloaded.model.layers[1].mlp.up_proj.base_layer.weight.is_meta  # the dense weights stayed on disk
    assert hasattr(offloaded.model.layers[1].mlp.up_proj.base_layer, "_hf_hook")  # accelerate's hooks are back
    _assert_same_factors(model, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calibration[:2]).logits, expected(input_ids=calibration[:2]).logits)


def test_meta_model_with_materialize_equals_the_model_in_memory():
    calibration = _tokens()
    dense = tiny_llama(layers=2)
    weights = {n: t.detach().clone() for n, t in dense.state_dict().items()}
    expected, _ = compress_sequential(
        copy.deepcopy(dense), calibration, 0.6, config=CONFIG, device="cpu", show_progress=False
    )
    with init_empty_weights(include_buffers=False):
        empty = transformers.LlamaForCausalLM(dense.config).eval()
    assert empty.model.layers[0].mlp.up_proj.weight.is_meta
    made = []

    def materialize(name, meta, device):
        made.append(name)
        return weights[name].to(device)

    model, _ = compress_sequential(
        empty, calibration, 0.6, config=CONFIG, device="cpu", materialize=materialize, show_progress=False
    )
    _assert_same_factors(model, expected)
    assert (
        "model.layers.1.mlp.down_proj.weight" in made and empty.model.layers[1].mlp.down_proj.base_layer.weight.is_meta
    )


def test_a_block_that_does_not_fit_is_named_with_its_need():
    with pytest.raises(
        BlockDoesNotFitError, match=r"model\.layers\.0 needs about [0-9.]+ MiB on cpu \(.*statistics .*max_memory="
    ):
        compress_sequential(
            tiny_llama(), _tokens(), 0.6, config=CONFIG, device="cpu", max_memory="100KB", show_progress=False
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="allocation must be one of"):
        compress_sequential(tiny_llama(), _tokens(), 0.6, allocation="auto", device="cpu")
    with pytest.raises(ValueError, match="outside the transformer blocks"):
        compress_sequential(tiny_llama(), _tokens(), 0.6, target_modules=["lm_head", "up_proj"], device="cpu")


def test_offloaded_factors_are_saved_block_by_block_as_a_loadable_adapter(tmp_path):
    calibration = _tokens()
    dense = tiny_llama(layers=3)
    expected, _ = compress_sequential(
        copy.deepcopy(dense),
        calibration,
        0.6,
        config=CONFIG,
        device="cpu",
        output_dir=tmp_path / "in-memory",
        show_progress=False,
    )
    model, _ = compress_sequential(
        copy.deepcopy(dense),
        calibration,
        0.6,
        config=CONFIG,
        device="cpu",
        offload_folder=tmp_path / "work",
        output_dir=tmp_path / "streamed",
        show_progress=False,
    )
    assert model.base_model.model.model.layers[0].mlp.up_proj.nsn_A["default"].is_meta  # never loaded back
    streamed = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path / "streamed")
    _assert_same_factors(streamed, expected)
    saved = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path / "in-memory")
    _assert_same_factors(saved, expected)
