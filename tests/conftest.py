"""Shared fixtures; the tiny model factories live in tiny_models.py."""

from __future__ import annotations

import pytest
import torch

import nsn_peft  # noqa: F401  (registers the method with PEFT)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
