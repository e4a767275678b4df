"""kill -9 during real saves: the destination always holds the previous artifact or the new one, loadable.

A save server (``kill_harness.py``) imports everything once and forks one child per save, which it SIGKILLs
after a random delay drawn over the measured duration of a whole save, so kills land while tensors are
written, while files are fsynced and between the final renames. After every kill the artifact is loaded the
ordinary way and compared with the two versions; unrelated files at the destination must be unchanged; a
final save leaves no temporaries behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill_harness import MLP

import nsn_peft
from nsn_peft import ActivationStats, load_compressed

HARNESS = Path(__file__).with_name("kill_harness.py")
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the save server forks one child per save (POSIX)")


class SaveServer:
    def __init__(self) -> None:
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
        )
        src = str(Path(nsn_peft.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([src, str(HARNESS.parent), env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, str(HARNESS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert json.loads(self.process.stdout.readline())["ready"]

    def save(self, kind: str, version: int, dest: Path, delay: float | None = None) -> dict:
        request = {"cmd": "save", "kind": kind, "version": version, "dest": str(dest), "delay": delay}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the save server died"
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = SaveServer()
    yield s
    s.close()


# -- how each artifact is loaded and compared ------------------------------------------------------------------
def _load_adapter(path: Path) -> dict:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    model = PeftModel.from_pretrained(MLP(seed=0), str(path))
    state = get_peft_model_state_dict(model)
    return {"state": state, "rank": model.get_rank()}


def _load_stats(path: Path) -> dict:
    stats = ActivationStats.load(path)
    return {"state": stats.grams, "rank": stats.token_counts}


def _load_compressed(path: Path) -> dict:
    model = load_compressed(path)
    return {"state": {k: v for k, v in model.state_dict().items()}, "rank": None}


LOADERS = {"adapter": _load_adapter, "stats": _load_stats, "compressed": _load_compressed}


def _same(a: dict, b: dict) -> bool:
    if a["rank"] != b["rank"] or set(a["state"]) != set(b["state"]):
        return False
    return all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


def _snapshot(paths: list[Path]) -> dict[str, str]:
    """Hashes of the files that are not part of the artifact (they must never change)."""
    out = {}
    for root in paths:
        for file in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
            out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def _temporaries(dest: Path) -> list[str]:
    return [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.nsn-")]


def _bystanders(kind: str, dest: Path) -> list[Path]:
    """Unrelated files placed at the destination before the kills."""
    notes = dest / "notes.txt"
    notes.write_text("keep me\n")
    extra = [notes]
    if kind == "stats":  # what `nsn-peft calibrate --gradients` keeps inside a statistics folder
        grads = ActivationStats(
            {"layers.0": torch.eye(4, dtype=torch.float64)}, {"layers.0": 7}, extra={"kind": "output_gradient"}
        )
        grads.save(dest / "output_gradients")
        extra.append(dest / "output_gradients")
    return extra


def run_kills(server: SaveServer, tmp_path: Path, kind: str, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    refs = {}
    for version in (1, 2):
        ref = tmp_path / f"ref{version}"
        assert server.save(kind, version, ref)["exit"] == 0
        refs[version] = LOADERS[kind](ref)
    assert not _same(refs[1], refs[2])
    dest = tmp_path / "artifact"
    dest.mkdir()
    bystanders = _bystanders(kind, dest)
    before = _snapshot(bystanders)
    # How long a whole save takes now (the machine may be busy): the recent completed saves, kept up to date, so
    # that the kill delays keep spanning the whole save, its final renames included.
    recent = [server.save(kind, v, dest)["seconds"] for v in (1, 2, 1)]
    current, killed, outcomes = 1, 0, {"previous": 0, "new": 0}
    for _ in range(8 * kills):
        if killed >= kills:
            break
        duration = statistics.median(recent[-5:])
        new = 3 - current
        delay = rng.uniform(0.0, duration) if rng.random() < 0.5 else rng.uniform(0.6 * duration, 1.05 * duration)
        result = server.save(kind, new, dest, delay=delay)
        assert result["killed"] or result["exit"] == 0, result
        if not result["killed"]:
            recent.append(result["seconds"])
        loaded = LOADERS[kind](dest)
        if _same(loaded, refs[new]):
            current = new
            outcomes["new"] += result["killed"]
        else:
            assert _same(loaded, refs[current]), (
                f"after a kill at {result['seconds']:.4f}s the {kind} is neither version"
            )
            assert result["killed"], "a completed save left the previous version"
            outcomes["previous"] += 1
        killed += result["killed"]
        assert _snapshot(bystanders) == before, "a save touched files that are not part of the artifact"
    assert killed >= kills, f"only {killed} of the saves were killed before finishing"
    assert server.save(kind, 3 - current, dest)["exit"] == 0
    assert _same(LOADERS[kind](dest), refs[3 - current])
    assert _temporaries(dest) == [], "temporaries of killed saves were not cleaned by the next save"
    assert _snapshot(bystanders) == before


@pytest.mark.parametrize("kind", ["adapter", "stats", "compressed"])
def test_kill_during_save_leaves_previous_or_new_artifact(server, tmp_path, kind):
    run_kills(server, tmp_path, kind, kills=10, seed=["adapter", "stats", "compressed"].index(kind))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adapter", "stats", "compressed"])
def test_many_kills_during_save(server, tmp_path, kind):
    run_kills(server, tmp_path, kind, kills=100, seed=7)
