"""Transactional writes (``nsn_peft.io``): atomicity at every step, bystanders kept, modes, stale temporaries."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nsn_peft import io

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="simulates kills in forked children (POSIX)")

V1 = {"weights.bin": "old weights " * 100, "config.json": '{"v": 1}', "sub/extra.json": '{"v": 1}'}
V2 = {"weights.bin": "new weights " * 100, "config.json": '{"v": 2}', "sub/extra.json": '{"v": 2}'}


def _write_version(dest: Path, files: dict[str, str]) -> None:
    with io.atomic_directory(dest) as staging:
        for rel, text in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text)


def _read(dest: Path, files: dict[str, str]) -> dict[str, str]:
    return {rel: (dest / rel).read_text() if (dest / rel).exists() else None for rel in files}


def _temporaries(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.nsn-"))


def test_new_folder_and_replacement_keep_other_files(tmp_path):
    dest = tmp_path / "out"
    _write_version(dest, V1)
    assert _read(dest, V1) == V1
    (dest / "notes.txt").write_text("mine")
    (dest / "sub" / "other.txt").write_text("mine too")
    _write_version(dest, V2)
    assert _read(dest, V2) == V2
    assert (dest / "notes.txt").read_text() == "mine" and (dest / "sub" / "other.txt").read_text() == "mine too"
    assert _temporaries(dest) == []


def test_failed_block_leaves_destination_untouched(tmp_path):
    dest = tmp_path / "out"
    _write_version(dest, V1)
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_directory(dest) as staging:
            (staging / "weights.bin").write_text("half")
            raise RuntimeError("boom")
    assert _read(dest, V1) == V1
    assert _temporaries(dest) == []


def test_file_where_a_folder_belongs_is_a_clear_error(tmp_path):
    dest = tmp_path / "stats"
    dest.write_text("precious")
    with pytest.raises(NotADirectoryError, match=r"stats.*a file exists there"):
        with io.atomic_directory(dest):
            pass
    assert dest.read_text() == "precious"
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        io.check_folder_destination(dest / "inner")


def test_folder_where_a_file_belongs_is_a_clear_error(tmp_path):
    (tmp_path / "plan.json").mkdir()
    with pytest.raises(IsADirectoryError, match=r"plan\.json.*a folder exists there"):
        io.write_json(tmp_path / "plan.json", {})
    dest = tmp_path / "out"
    (dest / "config.json").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=r"config\.json"):
        _write_version(dest, V1)
    assert _temporaries(dest) == []


@pytest.mark.parametrize(
    "mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o002, 0o664, 0o775)]
)
def test_modes_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    previous = os.umask(mask)
    try:
        io.write_json(tmp_path / "plan.json", {"a": 1})
        io.write_safetensors(tmp_path / "t.safetensors", {})
        _write_version(tmp_path / "new", V1)  # a new folder: the staging folder becomes it
        (tmp_path / "existing").mkdir()
        _write_version(tmp_path / "existing", V1)  # an existing folder: files moved in
    finally:
        os.umask(previous)
    for file in [
        tmp_path / "plan.json",
        tmp_path / "t.safetensors",
        tmp_path / "new" / "weights.bin",
        tmp_path / "existing" / "weights.bin",
        tmp_path / "existing" / "sub" / "extra.json",
    ]:
        assert stat.S_IMODE(file.stat().st_mode) == file_mode, file
    for folder in [tmp_path / "new", tmp_path / "new" / "sub", tmp_path / "existing" / "sub"]:
        assert stat.S_IMODE(folder.stat().st_mode) == dir_mode, folder


def _crash_child(dest: Path, files: dict[str, str], crash_at: int) -> int:
    """Fork a child that writes ``files`` to ``dest`` and dies (``os._exit``) at its ``crash_at``-th
    rename/fsync, as a kill -9 would; returns the child's exit code (0: it finished first)."""
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
            _write_version(dest, files)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_fork
@pytest.mark.parametrize("existing", [True, False])
def test_a_kill_at_every_step_leaves_one_whole_version(tmp_path, existing):
    """Die before each rename and fsync of a save in turn: readers (after recovery) see V1 or V2, never a mix."""
    crash_at, seen = 1, set()
    while True:
        dest = tmp_path / f"out{crash_at}"
        if existing:
            _write_version(dest, V1)
            (dest / "notes.txt").write_text("mine")
        code = _crash_child(dest, V2, crash_at)
        io.finish_interrupted_save(dest)  # what every loader does first
        state = _read(dest, V1)
        if existing:
            assert state in (V1, V2), f"crash at step {crash_at}: {state}"
            assert (dest / "notes.txt").read_text() == "mine"
        else:
            assert state in (V2, dict.fromkeys(V1)), f"crash at step {crash_at}: {state}"
        seen.add("new" if state == V2 else "old")
        _write_version(dest, V1)  # the next save cleans what the killed one left
        assert _temporaries(dest) == [] and _read(dest, V1) == V1
        if code == 0:
            break
        crash_at += 1
    assert crash_at > 6 and seen == {"new", "old"}


@needs_fork
def test_live_temporaries_of_another_process_are_kept(tmp_path):
    dest = tmp_path / "out"
    _write_version(dest, V1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a "live save" in another process: holds its staging folder open and locked
        try:
            staging = io._temp_name(dest, io.STAGING_TAG)
            staging.mkdir()
            fd = os.open(staging, os.O_RDONLY)
            io._try_lock(fd)
            os.write(write, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.read(read, 1)
    try:
        _write_version(dest, V2)
        assert len(_temporaries(dest)) == 1, "a live process's staging folder was deleted"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    _write_version(dest, V1)
    assert _temporaries(dest) == []


@needs_fork
def test_stale_file_temporaries_are_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "plan.json"
    pid = os.fork()
    if pid == 0:
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            os._exit(9)
    os.waitpid(pid, 0)
    assert len(_temporaries(target)) == 1
    io.write_json(target, {"ok": True})
    assert _temporaries(target) == [] and target.read_text().strip().endswith("}")


def test_check_safetensors_names_truncated_and_corrupt_files(tmp_path):
    import torch

    path = tmp_path / "t.safetensors"
    io.write_safetensors(path, {"a": torch.arange(100.0), "b": torch.zeros(3, 3)})
    header = io.check_safetensors(path)
    assert set(header) - {"__metadata__"} == {"a", "b"}
    data = path.read_bytes()
    for cut, message in [
        (data[:-1], "is truncated"),
        (data[:5], "too short"),
        (data[:20], "truncated or not a safetensors"),
        (data + b"x", "unexpected bytes"),
    ]:
        path.write_bytes(cut)
        with pytest.raises(ValueError, match=rf"t\.safetensors.*{message}"):
            io.check_safetensors(path)
    path.write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        io.check_safetensors(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        io.check_safetensors(tmp_path / "nope.safetensors")


@needs_fork
def test_nested_saves_into_a_staging_folder_do_not_deadlock(tmp_path):
    """A save into a subfolder of another save's staging folder (statistics + gradient statistics in one
    calibration output) must not wait for the lock its own outer save holds."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with io.atomic_directory(tmp_path / "out") as staging:
                _write_version(staging, V1)  # into the staging folder itself
                _write_version(staging / "output_gradients", V2)  # a new folder inside it
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("nested saves deadlocked")
    assert os.waitstatus_to_exitcode(status) == 0
    assert _read(tmp_path / "out", V1) == V1 and _read(tmp_path / "out" / "output_gradients", V2) == V2


def test_relative_destinations_keep_temporaries_outside_the_folder(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    _write_version(Path("."), V1)
    assert _read(tmp_path / "out", V1) == V1
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    assert _temporaries(tmp_path / "out") == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_read_safetensors_equals_the_reference_reader_and_owns_its_memory(tmp_path, dtype):
    tensors = {
        "w": (torch.randn(7, 5) * 3).to(dtype),
        "b": torch.arange(4).to(dtype),
        "empty": torch.zeros(0, 3, dtype=dtype),
        "scalar": torch.tensor(2).to(dtype),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    read = io.read_safetensors(tmp_path / "t.safetensors", column_major=lambda key: key == "w")
    expected = load_file(str(tmp_path / "t.safetensors"))
    assert read.keys() == expected.keys()
    for key, value in expected.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value), key
    assert read["w"].t().is_contiguous() and not read["w"].is_contiguous()  # column-major as asked
    assert read["b"].is_contiguous()
    # Each tensor has its own storage, none a view into a file mapping or into a shared scratch buffer.
    pointers = [t.untyped_storage().data_ptr() for t in read.values() if t.numel()]
    assert len(set(pointers)) == len(pointers)


def test_read_safetensors_names_a_truncated_file(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="t.safetensors is truncated"):
        io.read_safetensors(tmp_path / "t.safetensors")
