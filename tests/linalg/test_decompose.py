import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsn_peft.linalg import decompose, flops


def _random(m, d, seed=0, dtype=torch.float64):
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), d=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_svd_factors_are_exact_at_full_rank_and_optimal_for_every_prefix(m, d, seed):
    w = _random(m, d, seed)
    b, a = decompose.svd_factors(w, compute_dtype=torch.float64)
    full = min(m, d)
    assert b.shape == (m, full) and a.shape == (full, d)
    torch.testing.assert_close(b @ a, w, atol=1e-9, rtol=1e-9)
    s = torch.linalg.svdvals(w)
    for r in range(1, full + 1):
        err = torch.linalg.matrix_norm(w - b[:, :r] @ a[:r])
        optimum = s[r:].square().sum().sqrt()  # Eckart–Young
        assert err <= optimum * (1 + 1e-6) + 1e-9


def test_balanced_split_gives_equal_norms():
    w = _random(30, 20)
    b, a = decompose.svd_factors(w, compute_dtype=torch.float64)
    torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1))
    torch.testing.assert_close(b.norm(dim=0).square(), torch.linalg.svdvals(w))


def test_svd_factors_fp32_full_rank_relative_error():
    w = _random(64, 96, dtype=torch.float32)
    b, a = decompose.svd_factors(w)
    assert ((b @ a - w).abs().max() / w.abs().max()) < 1e-4


def test_svd_factors_handles_rank_deficient_and_zero():
    low = _random(20, 3) @ _random(3, 16, seed=1)
    b, a = decompose.svd_factors(low, compute_dtype=torch.float64)
    torch.testing.assert_close(b @ a, low)
    zero = torch.zeros(5, 7, dtype=torch.float64)
    b, a = decompose.svd_factors(zero, compute_dtype=torch.float64)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    torch.testing.assert_close(b @ a, zero)


def test_check_finite_names_module():
    w = torch.ones(3, 3)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="layers.0.q_proj"):
        decompose.check_finite(w, "layers.0.q_proj")


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 24), d=st.integers(2, 24), seed=st.integers(0, 10_000))
def test_whitened_factors_minimise_output_error_for_every_rank(m, d, seed):
    w = _random(m, d, seed)
    x = _random(64, d, seed + 1) * torch.linspace(0.1, 3, d, dtype=torch.float64)
    gram = x.T @ x
    b, a = decompose.whitened_factors(w, gram, damp=0.0)
    torch.testing.assert_close(b @ a, w, atol=1e-7, rtol=1e-7)
    s = torch.linalg.svdvals(w @ x.T)
    for r in range(1, min(m, d) + 1):
        err = torch.linalg.matrix_norm((w - b[:, :r] @ a[:r]) @ x.T)
        assert err <= s[r:].square().sum().sqrt() * (1 + 1e-6) + 1e-7


def test_projected_full_energy_is_exact_and_low_energy_is_low_rank():
    w = _random(24, 16)
    x = _random(200, 16, 3)
    res = decompose.projected_factors(w, x.T @ x)
    torch.testing.assert_close(res.b @ res.a, w, atol=1e-8, rtol=1e-8)
    assert res.utilized_rank == 16
    # Inputs confined to a 5-dim subspace: the utilized rank is 5 at full energy.
    x5 = _random(200, 5, 4) @ _random(5, 16, 5)
    res5 = decompose.projected_factors(w, x5.T @ x5)
    assert res5.input_rank == 5 and res5.utilized_rank == 5
    torch.testing.assert_close(res5.b @ res5.a @ x5.T, w @ x5.T, atol=1e-7, rtol=1e-7)
    low = decompose.projected_factors(w, x.T @ x, energy_input=0.5, energy_output=0.5)
    assert low.utilized_rank <= min(low.input_rank, low.output_rank) < 16


def test_energy_rank():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert decompose.energy_rank(values, 0.4) == 1
    assert decompose.energy_rank(values, 0.7) == 2
    assert decompose.energy_rank(values, 1.0) == 4
    with pytest.raises(ValueError):
        decompose.energy_rank(values, 0.0)


def test_flops_helpers():
    assert flops.rank_grid(200, 64) == [64, 128, 192, 200]
    assert flops.rank_grid(32, 64) == [32]
    assert flops.rank_for_flops_fraction(4096, 4096, 0.5, 4096, 64) == 1024
    assert flops.factoring_saves(100, 100, 49) and not flops.factoring_saves(100, 100, 50)
    assert flops.break_even_rank(100, 100) == 49
    with pytest.raises(ValueError):
        flops.rank_grid(0, 64)


@pytest.mark.parametrize("weight_rank", [12, 3])
def test_projected_weight_from_precomputed_bases_is_the_factored_product(weight_rank):
    torch.manual_seed(0)
    weight = torch.randn(12, weight_rank, dtype=torch.float64) @ torch.randn(weight_rank, 20, dtype=torch.float64)
    x = torch.randn(50, 20, dtype=torch.float64)
    gram = x.T @ x
    bases = decompose.projection_bases(weight, gram)
    for energy in (0.5, 0.9, 0.999, 1.0):
        direct = decompose.projected_factors(weight, gram, energy, energy)
        product, rank = decompose.projected_weight(bases, weight, energy, energy)
        assert rank == direct.utilized_rank
        torch.testing.assert_close(product, direct.b @ direct.a)
    with pytest.raises(ValueError, match="does not match"):
        decompose.projection_bases(weight, gram[:5, :5])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), strip=st.integers(1, 32), seed=st.integers(0, 10_000))
def test_symmetrized_in_strips_equals_the_mean_with_the_transpose_bit_for_bit(n, strip, seed):
    c = _random(n, n, seed, torch.float32)
    expected = c.double()
    expected = (expected + expected.T) / 2
    got = decompose.symmetrized(c, torch.float64, strip=strip)
    assert torch.equal(got, expected) and torch.equal(c, _random(n, n, seed, torch.float32))  # the input is kept


def test_damped_cholesky_leaves_its_input_alone_unless_told_to_overwrite():
    x = _random(20, 6)
    gram = x.T @ x  # rank 6 of 6: positive definite
    kept = gram.clone()
    factor = decompose.damped_cholesky(gram, 1e-6)
    assert torch.equal(gram, kept)
    eye = torch.eye(6, dtype=gram.dtype)
    torch.testing.assert_close(
        factor, torch.linalg.cholesky(kept + 1e-6 * kept.diagonal().mean() * eye), rtol=0, atol=0
    )
    singular = torch.zeros(4, 4, dtype=torch.float64)  # needs the damping to grow: still succeeds
    assert torch.isfinite(decompose.damped_cholesky(singular, 0.0, overwrite=True)).all()


@pytest.mark.parametrize("failures", [1, 2, 3])
def test_robust_eigh_falls_back_when_the_solver_fails(monkeypatch, failures, caplog):
    """A solver that fails to converge (as cuSOLVER does on some ill-conditioned Grams) is retried in float64 and
    with a diagonal shift; the result is the eigendecomposition all the same."""
    x = _random(30, 8, dtype=torch.float32)
    matrix = x.T @ x
    expected = torch.linalg.eigh(matrix.double())
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky(m, *args, **kwargs):
        calls.append(m.dtype)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError(
                "linalg.eigh: The algorithm failed to converge because the input matrix is ill-conditioned"
            )
        return real_eigh(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    if failures == 3:  # float32 on the CPU: float64, then the shift; a third failure is the last
        with pytest.raises(torch.linalg.LinAlgError, match="ill-conditioned"):
            decompose.robust_eigh(matrix)
        return
    values, vectors = decompose.robust_eigh(matrix)
    assert values.dtype == vectors.dtype == torch.float32
    assert calls[1] == torch.float64 and "solved in float64" in caplog.text
    torch.testing.assert_close(values.double(), expected.eigenvalues, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        (vectors @ torch.diag(values) @ vectors.T).double(), matrix.double(), rtol=1e-4, atol=1e-3
    )


def test_robust_eigh_names_non_finite_input():
    matrix = torch.eye(3)
    matrix[1, 0] = matrix[0, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN|2 NaN"):
        decompose.robust_eigh(matrix)
