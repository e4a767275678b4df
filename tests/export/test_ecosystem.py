"""An export composes with the ecosystem: torchao quantization reaches the factors (through ``quantize_`` and through
``from_pretrained(quantization_config=TorchAoConfig(...))``), accelerate's ``device_map`` places and offloads them,
and lm-eval's ``hf`` backend scores the folder as it scores any transformers model."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import char_tokenizer, tiny_llama

from nsn_peft import NSNConfig, load_compressed, save_compressed
from nsn_peft.export import is_factored_linear

# int8 weight-only quantization (one scale per output row) of the factors and of the other linear layers: the
# logits move by at most this share of their spread on the tiny model.
INT8_LOGIT_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """``(folder, expected logits, input ids)`` of a rank-8 tiny Llama export with a tokenizer."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(hidden=64), NSNConfig(init="svd"))
    model.set_rank(8)
    ids = torch.randint(0, 98, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    folder = save_compressed(model, tmp_path_factory.mktemp("export") / "m", tokenizer=char_tokenizer())
    return folder, expected, ids


def _assert_int8_close(logits: torch.Tensor, expected: torch.Tensor) -> None:
    error = (logits - expected).abs().max().item()
    assert error <= INT8_LOGIT_TOLERANCE * expected.std().item(), (error, expected.std().item())


def _is_torchao(tensor: torch.Tensor) -> bool:
    return type(tensor).__module__.startswith("torchao")


def test_torchao_int8_weight_only_reaches_the_factors(export):
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed: pip install 'nsn-peft[quant]'")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    folder, expected, ids = export
    model = load_compressed(folder)
    quantize_(model, Int8WeightOnlyConfig())
    factored = [m for m in model.modules() if is_factored_linear(m)]
    assert factored and all(_is_torchao(m.down.weight) and _is_torchao(m.up.weight) for m in factored)
    with torch.no_grad():
        _assert_int8_close(model(ids).logits, expected)


def test_torchao_through_from_pretrained_quantization_config(export):
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed: pip install 'nsn-peft[quant]'")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    folder, expected, ids = export
    model = load_compressed(folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    factored = [m for m in model.modules() if is_factored_linear(m)]
    assert factored and all(_is_torchao(m.down.weight) and _is_torchao(m.up.weight) for m in factored)
    with torch.no_grad():
        _assert_int8_close(model(ids).logits, expected)


def test_device_map_auto_places_and_offloads_the_factors(export, tmp_path):
    folder, expected, ids = export
    model = load_compressed(folder, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # Memory for part of the model: accelerate keeps some blocks in memory and offloads the rest to disk.
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    offloaded = load_compressed(
        folder, device_map="auto", max_memory={"cpu": int(0.6 * size)}, offload_folder=str(tmp_path / "off")
    )
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}, offloaded.hf_device_map
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_lm_eval_hf_backend_scores_the_export_like_the_nsn_model(export, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    import lm_eval
    import transformers.dynamic_module_utils as dynamic
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from tiny_tasks import TASK, write_task

    folder, _, _ = export
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # the folder's code goes here
    tasks = TaskManager(include_path=str(write_task(tmp_path / "tasks")), include_defaults=False)
    run = {"tasks": [TASK], "task_manager": tasks, "log_samples": True, "batch_size": 2}
    by_name = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},trust_remote_code=True,device=cpu", **run
    )
    reference = lm_eval.simple_evaluate(
        model=HFLM(pretrained=load_compressed(folder), tokenizer=char_tokenizer()), **run
    )
    scores = [[resp[0] for resp in sample["filtered_resps"]] for sample in by_name["samples"][TASK]]
    expected = [[resp[0] for resp in sample["filtered_resps"]] for sample in reference["samples"][TASK]]
    assert len(scores) == 6
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert by_name["results"][TASK]["acc,none"] == reference["results"][TASK]["acc,none"]
