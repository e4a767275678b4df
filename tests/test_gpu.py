"""GPU checks (run with ``pytest -m gpu`` on a CUDA machine)."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama

import nsn_peft

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_rank_equivalence_on_gpu(dtype, input_ids):
    base = tiny_llama().to("cuda", dtype)
    ids = input_ids.cuda()
    with torch.no_grad():
        ref = base(ids).logits.float()
    model = get_peft_model(base, nsn_peft.NSNConfig())
    assert model.base_model.model.model.layers[0].mlp.up_proj.nsn_A["default"].device.type == "cuda"
    with torch.no_grad():
        out = model(ids).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert ((out - ref).abs().max() / ref.abs().max()) < tol


def test_autocast_training_step_on_gpu(input_ids):
    model = get_peft_model(tiny_llama().cuda(), nsn_peft.NSNConfig(max_rank=16))
    ids = input_ids.cuda()
    model.train()
    model.set_rank(8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_init_on_gpu_for_cpu_model(input_ids):
    base = tiny_llama()
    with torch.no_grad():
        ref = base(input_ids).logits
    model = get_peft_model(base, nsn_peft.NSNConfig(init_device="cuda"))
    with torch.no_grad():
        out = model(input_ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-4


def test_factors_only_decode_with_kernels_and_compiled_rank_switching():
    """Factors only, the Triton decode path and CUDA-graph compiled decoding: every warmed rank equals eager."""
    model = get_peft_model(
        tiny_llama(hidden=64).to("cuda", torch.bfloat16),
        nsn_peft.NSNConfig(keep_base_weights=False, rank_granularity=8),
    ).eval()
    model.set_runtime_options(kernels=True)
    base = model.get_base_model()
    ids = torch.randint(0, 101, (1, 1), device="cuda")
    warm = nsn_peft.compile_for_ranks(base, [64, 32, 16, 8], example_inputs=(ids,), mode="reduce-overhead")
    assert warm.recompiles_after_first == 0
    for rank in (8, 32, 16, 64):
        model.set_rank(rank)
        with torch.no_grad():
            out = warm.module(ids).logits.float().clone()
            ref = base(ids).logits.float()
        assert ((out - ref).abs().max() / ref.abs().max()) < 5e-2
