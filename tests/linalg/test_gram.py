"""Gram products and the packed storage of symmetric matrices."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsn_peft.linalg.gram import batch_gram, pack_symmetric, unpack_symmetric


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 40), tokens=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_packed_symmetric_matrices_round_trip_exactly(d, tokens, seed):
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gram = x.T @ x
    gram = (gram + gram.T) / 2  # exactly symmetric
    packed = pack_symmetric(gram)
    assert packed.shape == (d * (d + 1) // 2,) and packed.dtype == gram.dtype
    assert torch.equal(unpack_symmetric(packed, d), gram)


def test_unpacking_mirrors_the_upper_triangle():
    packed = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert torch.equal(unpack_symmetric(packed, 3), torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]]))
    assert torch.equal(pack_symmetric(batch_gram(torch.eye(3))), torch.tensor([1.0, 0, 0, 1, 0, 1]))


def test_packing_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="square matrix"):
        pack_symmetric(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"a packed 3×3 symmetric matrix has 6 values, got shape \(5,\)"):
        unpack_symmetric(torch.zeros(5), 3)
