"""Refinement state survives a kill -9 at any instant of its save: a resumed run reads one whole version."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from nsn_peft.refine.state import RefineState, load_state, restore_factors, save_state

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _factors(value: float) -> dict[str, nn.Parameter]:
    return {"a": nn.Parameter(torch.full((64, 64), value)), "b": nn.Parameter(torch.full((8,), value))}


def _save_and_die(directory, step: int, crash_at: int) -> int:
    """Fork a child that saves version ``step`` and dies at its ``crash_at``-th rename/fsync (as a kill -9 would)."""
    pid = os.fork()
    if pid == 0:
        calls = {"n": 0}

        def dying(original):
            def wrapper(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == crash_at:
                    os._exit(9)
                return original(*args, **kwargs)

            return wrapper

        os.replace, os.rename, os.fsync = dying(os.replace), dying(os.rename), dying(os.fsync)
        try:
            save_state(directory, RefineState(stage="end_to_end", step=step), _factors(float(step)))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_fork
def test_a_killed_save_leaves_state_and_factors_of_one_version(tmp_path):
    crash_at, seen = 1, set()
    while True:
        directory = tmp_path / f"state{crash_at}"
        save_state(directory, RefineState(stage="end_to_end", step=1), _factors(1.0))
        code = _save_and_die(directory, 2, crash_at)
        state, _ = load_state(directory)
        factors = _factors(0.0)
        restore_factors(directory, factors)
        assert state.step in (1, 2)
        assert all(torch.all(p == float(state.step)) for p in factors.values()), (crash_at, state.step)
        seen.add(state.step)
        if code == 0:
            break
        crash_at += 1
    assert crash_at > 3 and seen == {1, 2}
