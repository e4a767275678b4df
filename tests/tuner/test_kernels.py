"""The nested factored forward: the PyTorch reference (CPU, property tests) and the Triton path against it.

GPU tests (``pytest -m gpu``) need CUDA and triton; the interpreter test needs triton only (it runs the kernels on
the CPU through ``TRITON_INTERPRET=1``) and is skipped without it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from nsn_peft.tuner.kernels import (
    TRITON_AVAILABLE,
    TRITON_MAX_TOKENS,
    nested_linear,
    nested_linear_reference,
    use_triton,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the GPU machine may lack hypothesis; only the property tests need it
    given = None

needs_hypothesis = pytest.mark.skipif(given is None, reason="needs hypothesis")
gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not TRITON_AVAILABLE, reason="needs CUDA and triton"),
]

# ‖out − ref‖/‖ref‖ against a float64 reference on the same (rounded) inputs. bf16/fp16 include the rounding of the
# intermediate h to the input dtype, which the two-GEMM reference does too.
REL_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def _factors(gen: torch.Generator, d: int, m: int, max_rank: int, dtype: torch.dtype, b_layout: str = "row"):
    """Random factors on ``gen``'s device, scaled so every product stays O(1); ``b_layout``: row-major, a column
    slice of a wider parent (row stride > R), or column-major."""
    dev = gen.device
    a = (torch.randn(max_rank, d, generator=gen, dtype=torch.float64, device=dev) / math.sqrt(d)).to(dtype)
    b64 = torch.randn(m, max_rank, generator=gen, dtype=torch.float64, device=dev) / math.sqrt(max_rank)
    if b_layout == "row":
        b = b64.to(dtype)
    elif b_layout == "slice":
        pad = torch.randn(m, 5, generator=gen, dtype=torch.float64, device=dev)
        b = torch.cat([b64, pad], dim=1).to(dtype)[:, :max_rank]
    else:
        b = b64.T.contiguous().to(dtype).T
    return a, b


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=gen.device).to(dtype)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


# -- the reference (CPU) -------------------------------------------------------------------------------------------

if given is not None:

    @st.composite
    def nested_problems(draw):
        d = draw(st.integers(1, 48))
        m = draw(st.integers(1, 48))
        max_rank = draw(st.integers(1, 24))
        rank = draw(st.integers(1, max_rank))
        lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
        layout = draw(st.sampled_from(["row", "slice", "col"]))
        bias = draw(st.booleans())
        seed = draw(st.integers(0, 2**31 - 1))
        return d, m, max_rank, rank, tuple(lead), layout, bias, seed

    @needs_hypothesis
    @settings(max_examples=60, deadline=None)
    @given(nested_problems())
    def test_reference_is_two_linears_and_the_dense_product(problem):
        d, m, max_rank, rank, lead, layout, has_bias, seed = problem
        gen = torch.Generator().manual_seed(seed)
        a, b = _factors(gen, d, m, max_rank, torch.float64, b_layout=layout)
        x = _randn(gen, *lead, d, dtype=torch.float64)
        bias = _randn(gen, m, dtype=torch.float64) if has_bias else None
        out = nested_linear_reference(x, a, b, rank, bias)
        assert out.shape == (*lead, m)
        assert torch.equal(out, F.linear(F.linear(x, a[:rank]), b[:, :rank], bias))
        dense = x @ (b[:, :rank] @ a[:rank]).T + (bias if bias is not None else 0)
        torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)

    @needs_hypothesis
    @settings(max_examples=30, deadline=None)
    @given(nested_problems())
    def test_dispatcher_on_cpu_is_the_reference(problem):
        d, m, max_rank, rank, lead, layout, has_bias, seed = problem
        gen = torch.Generator().manual_seed(seed)
        a, b = _factors(gen, d, m, max_rank, torch.float32, b_layout=layout)
        x = _randn(gen, *lead, d)
        bias = _randn(gen, m) if has_bias else None
        assert not use_triton(x, a, b, bias)
        assert torch.equal(nested_linear(x, a, b, rank, bias), nested_linear_reference(x, a, b, rank, bias))


@pytest.mark.parametrize("rank", [0, -1, 9])
def test_rank_out_of_range_is_rejected(rank):
    x, a, b = torch.randn(2, 6), torch.randn(8, 6), torch.randn(5, 8)
    with pytest.raises(ValueError, match="rank"):
        nested_linear(x, a, b, rank)


def test_shape_mismatches_are_rejected():
    x, a, b = torch.randn(2, 6), torch.randn(8, 6), torch.randn(5, 8)
    with pytest.raises(ValueError, match="features"):
        nested_linear(torch.randn(2, 7), a, b, 3)
    with pytest.raises(ValueError, match="columns"):
        nested_linear(x, a, torch.randn(5, 7), 3)
    with pytest.raises(ValueError, match="bias"):
        nested_linear(x, a, b, 3, torch.randn(4))


# -- the Triton kernels under the interpreter (CPU; needs triton) ---------------------------------------------------

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import math, sys, torch
    import triton, triton.language as tl

    @triton.jit
    def _probe(o, n):
        for i in range(0, n):
            tl.store(o + i, i)

    try:
        _probe[(1,)](torch.zeros(4, dtype=torch.int32), 4)
    except Exception as exc:  # this triton's interpreter cannot run on the installed numpy
        print("interpreter unusable:", repr(exc))
        sys.exit(77)

    from nsn_peft.tuner.kernels import KernelConfig, nested_linear_reference, nested_linear_triton
    import nsn_peft.tuner.kernels.triton_nested as tn

    sync = torch.zeros(tn._SYNC_INTS, dtype=torch.int32)
    tn._sync_buffer = lambda device: sync  # one buffer: it must be back at zero after every launch
    gen = torch.Generator().manual_seed(0)
    cases = [  # tokens, d, m, R, rank, dtype, bias, fused, config
        (1, 300, 70, 40, 37, torch.float32, True, True, None),
        (1, 300, 70, 40, 37, torch.float32, False, False, None),
        (3, 577, 33, 64, 17, torch.float32, True, True, None),
        (20, 577, 33, 64, 64, torch.float32, True, False, None),
        (1, 512, 64, 64, 33, torch.float32, False, True, KernelConfig(16, 16, 64, 16, 32)),
        (5, 1024, 64, 64, 48, torch.float16, True, True, None),
        # bf16 only on the GEMV path: triton 3.6's interpreter gets bf16 tl.dot wrong (bit patterns as numbers)
        (1, 256, 48, 32, 1, torch.bfloat16, False, True, None),
    ]
    for n, d, m, R, rank, dtype, has_bias, fused, cfg in cases:
        x = torch.randn(n, d, generator=gen).to(dtype)
        a = (torch.randn(R, d, generator=gen) / math.sqrt(d)).to(dtype)
        b = (torch.randn(R + 3, m, generator=gen) / math.sqrt(R)).to(dtype).T[:, :R]  # column-major slice
        bias = torch.randn(m, generator=gen).to(dtype) if has_bias else None
        out = torch.full((n, m), float("nan"), dtype=dtype)
        nested_linear_triton(x, a, b, rank, bias, config=cfg, fused=fused, out=out)
        ref = nested_linear_reference(x.double(), a.double(), b.double(), rank, None if bias is None else bias.double())
        err = ((out.double() - ref).norm() / ref.norm()).item()
        tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dtype]
        assert torch.isfinite(out).all(), (n, d, m, rank)
        assert err < tol, (n, d, m, rank, dtype, err)
        assert int(sync.abs().sum()) == 0, sync.nonzero()
    print("ok", len(cases))
    """
)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs triton (its interpreter runs the kernels on the CPU)")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().startswith("ok")


# -- the Triton path on the GPU ----------------------------------------------------------------------------------


def _poison_allocator(*numels: int) -> None:
    """Leave NaN-filled blocks of these sizes in the caching allocator, so that workspaces the kernel allocates
    next start as NaN instead of stale finite values or zeros."""
    blocks = [torch.full((k,), float("nan"), device="cuda") for k in numels]
    del blocks


def _random_cases(seed: int, count: int):
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    sizes = [64, 577, 1000, 1024, 4096, 4160, 14336]
    for _ in range(count):
        d, m = pick(sizes), pick(sizes)
        max_rank = min(d, m, pick([16, 100, 256, 577, 1024, 2048]))
        rank = pick([1, 7, 16, 31, max_rank // 3 + 1, max_rank - 1, max_rank])
        rank = max(1, min(rank, max_rank))
        tokens = pick([1, 1, 2, 3, 8, 16, 17, 33, 64])
        lead = pick([(tokens,), (1, tokens), (tokens, 1)]) if tokens > 1 else pick([(1,), (1, 1)])
        yield d, m, max_rank, rank, lead, pick(["row", "slice", "col"]), pick([True, False])


def _gpu(fn):
    for mark in gpu:
        fn = mark(fn)
    return fn


@_gpu
@pytest.mark.parametrize(
    ("dtype", "fused"),
    [(torch.float32, True), (torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)],
    ids=["fp32", "bf16", "fp16", "bf16-two-launches"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_matches_reference_on_random_shapes(dtype, fused, seed):
    from nsn_peft.tuner.kernels import nested_linear_triton

    gen = torch.Generator(device="cuda").manual_seed(1000 + seed)
    for d, m, max_rank, rank, lead, layout, has_bias in _random_cases(seed * 7 + fused, 12):
        a, b = _factors(gen, d, m, max_rank, dtype, layout)
        x = _randn(gen, *lead, d, dtype=dtype)
        bias = _randn(gen, m, dtype=dtype) if has_bias else None
        tokens = math.prod(lead)
        out = torch.full((tokens, m), float("nan"), dtype=dtype, device="cuda")
        _poison_allocator(tokens * max_rank * 16, tokens * 4096, 1 << 20)
        y = nested_linear_triton(x, a, b, rank, bias, fused=fused, out=out)
        ref = nested_linear_reference(x.double(), a.double(), b.double(), rank, None if bias is None else bias.double())
        assert y.shape == (*lead, m)
        assert torch.isfinite(out).all(), (d, m, max_rank, rank, lead, layout)
        err = _rel_err(y, ref)
        assert err < REL_TOL[dtype], (d, m, max_rank, rank, lead, layout, has_bias, err)


@_gpu
@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
def test_every_rank_of_one_layer(tokens):
    from nsn_peft.tuner.kernels import nested_linear_triton

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    a, b = _factors(gen, 577, 1000, 200, torch.bfloat16, "slice")
    x = _randn(gen, tokens, 577, dtype=torch.bfloat16)
    bias = _randn(gen, 1000, dtype=torch.bfloat16)
    for rank in range(1, 201):
        out = torch.full((tokens, 1000), float("nan"), dtype=torch.bfloat16, device="cuda")
        nested_linear_triton(x, a, b, rank, bias, out=out)
        ref = nested_linear_reference(x.double(), a.double(), b.double(), rank, bias.double())
        assert torch.isfinite(out).all() and _rel_err(out, ref) < REL_TOL[torch.bfloat16], rank


@_gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_repeated_calls_are_bitwise_identical_and_leave_counters_at_zero(tokens):
    """A race between programs shows up as results that move between runs on the same inputs."""
    import nsn_peft.tuner.kernels.triton_nested as tn

    gen = torch.Generator(device="cuda").manual_seed(5)
    a, b = _factors(gen, 4096, 14336, 2048, torch.bfloat16)
    x = _randn(gen, tokens, 4096, dtype=torch.bfloat16)
    first = tn.nested_linear_triton(x, a, b, 1500)
    for _ in range(20):
        assert torch.equal(tn.nested_linear_triton(x, a, b, 1500), first)
    torch.cuda.synchronize()
    for buf in tn._SYNC.values():
        assert int(buf.abs().sum()) == 0


@_gpu
def test_dispatcher_takes_the_kernel_only_where_it_should():
    gen = torch.Generator(device="cuda").manual_seed(3)
    a, b = _factors(gen, 256, 384, 64, torch.bfloat16)
    x = _randn(gen, 1, TRITON_MAX_TOKENS, 256, dtype=torch.bfloat16)  # 3-D, at the threshold
    assert use_triton(x, a, b)
    ref = nested_linear_reference(x.double(), a.double(), b.double(), 40)
    assert _rel_err(nested_linear(x, a, b, 40), ref) < REL_TOL[torch.bfloat16]
    big = torch.randn(TRITON_MAX_TOKENS + 1, 256, device="cuda", dtype=torch.bfloat16)
    assert not use_triton(big, a, b)
    assert not use_triton(x.float(), a, b)  # mixed dtypes: the reference (and its error message)
    assert not use_triton(x.to(torch.float64), a.double(), b.double())
    a_train = a.clone().requires_grad_()
    assert not use_triton(x, a_train, b)
    y = nested_linear(x, a_train, b, 40)
    y.float().sum().backward()
    assert a_train.grad is not None and a_train.grad[40:].abs().sum() == 0
    with torch.no_grad():
        assert use_triton(x, a_train, b)


def _compile_problem():
    gen = torch.Generator(device="cuda").manual_seed(11)
    a, b = _factors(gen, 512, 768, 128, torch.bfloat16)
    x = _randn(gen, min(4, TRITON_MAX_TOKENS), 512, dtype=torch.bfloat16)
    bias = _randn(gen, 768, dtype=torch.bfloat16)
    return x, a, b, bias


@_gpu
@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic_dynamic"])
def test_compiled_switching_ranks_recompiles_nothing(dynamic):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    x, a, b, bias = _compile_problem()
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(nested_linear, backend=counter, fullgraph=True, dynamic=dynamic)
    ranks = [8, 16, 100, 128, 1, 77, 8]
    with torch.no_grad():
        for i, rank in enumerate(ranks):
            y = fn(x, a, b, rank, bias)
            ref = nested_linear_reference(x.double(), a.double(), b.double(), rank, bias.double())
            assert _rel_err(y, ref) < REL_TOL[torch.bfloat16], rank
            if i == 1:
                after_first_switch = counter.frame_count
    # dynamic=True: one compile for every rank. Default: the first rank is specialised, the first switch compiles
    # once more with the rank symbolic, and no later switch compiles anything.
    assert counter.frame_count == (1 if dynamic else after_first_switch)
    assert counter.frame_count <= 2


@_gpu
def test_reduce_overhead_captures_the_kernel_in_cuda_graphs():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, a, b, bias = _compile_problem()
    fn = torch.compile(nested_linear, mode="reduce-overhead", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            for rank in (8, 100, 128, 33):
                x.normal_()
                y = fn(x, a, b, rank, bias).clone()
                ref = nested_linear_reference(x.double(), a.double(), b.double(), rank, bias.double())
                assert _rel_err(y, ref) < REL_TOL[torch.bfloat16], rank
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)) == 0
