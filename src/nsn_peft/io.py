"""Transactional writes: a kill at any instant leaves the previous artifact or the new one, never a mix.

Two primitives, used by every save path of the package:

- :func:`atomic_path` writes one file: a temporary sibling, ``fsync``, then ``os.replace``.
- :func:`atomic_directory` writes the files of a folder artifact (an adapter, statistics, a compressed
  export): they are first written into a *staging* sibling folder and fsynced; a manifest written into the
  staging folder then marks the new version as committed, and the files are renamed over their namesakes
  at the destination. Files of the destination that the new version does not write are never touched.
  A kill before the manifest leaves the previous artifact; a kill after it leaves a committed staging
  folder that :func:`finish_interrupted_save` completes (every loader of the package calls it first, and
  so does the next save to the same destination), so readers always see one whole version.

Temporaries are hidden siblings named after the destination, ``.<name>.nsn-tmp.<pid>-<random>`` (file)
and ``.<name>.nsn-save.<pid>-<random>`` (folder). Their writer holds an advisory lock on them; the next
save to the same destination deletes those whose lock is free and whose process is gone, so a killed save
leaves nothing behind for long and a live one in another process is never disturbed.

Files and folders are created with the usual modes (``0666``/``0777`` minus the umask), not the private
modes of :mod:`tempfile`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

try:  # advisory locks; without them (Windows) temporaries are told apart by their process id alone
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_directory",
    "atomic_path",
    "check_folder_destination",
    "check_safetensors",
    "finish_interrupted_save",
    "local_or_hub_folder",
    "looks_like_hub_id",
    "merge_safetensors",
    "read_safetensors",
    "write_json",
    "write_safetensors",
    "write_text",
]

TMP_FILE_TAG = ".nsn-tmp."
STAGING_TAG = ".nsn-save."
MANIFEST = ".nsn-commit.json"


# -- small helpers ---------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: Path, umask: int) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (some writers, e.g. safetensors, use 0600)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalised (``.``/``..`` resolved, symlinks kept), so that it has a real name
    and parent to put temporaries beside."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _temp_name(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}{tag}{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders; their renames are durable without it
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not (directory and err.errno in (errno.EINVAL, errno.EBADF, errno.EACCES)):
            raise
    finally:
        os.close(fd)


def _try_lock(fd: int, blocking: bool = False) -> bool:
    """Take an exclusive advisory lock on ``fd``; ``False`` if another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock: rely on the process id check
        return True


# Files and folders this process holds a lock on, by inode, with the thread that holds it. flock locks belong to
# open descriptions, so a second descriptor of this very process would wait for the first forever: a save nested
# in another save's staging folder (a statistics folder inside a calibration output) must see it as already held.
_HELD: dict[tuple[int, int], int] = {}
_HELD_GUARD = threading.Lock()


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _hold(fd: int) -> None:
    with _HELD_GUARD:
        _HELD[_inode(fd)] = threading.get_ident()


def _release(fd: int) -> None:
    with _HELD_GUARD, contextlib.suppress(OSError):
        _HELD.pop(_inode(fd), None)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise commits and recoveries of the artifacts inside ``folder`` (a lock on the folder itself)."""
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            with _HELD_GUARD:
                mine = _HELD.get(_inode(fd)) == threading.get_ident()
            if mine:  # this thread already holds it (an outer save's staging folder)
                os.close(fd)
                fd = None
            else:
                _try_lock(fd, blocking=True)
                _hold(fd)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd)
            os.close(fd)


def _pid_of(name: str, tag: str) -> Optional[int]:
    try:
        return int(name.rsplit(tag, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


def _process_alive(pid: Optional[int]) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _abandoned(path: Path, tag: str) -> bool:
    """Whether the temporary ``path`` belongs to no live writer (its lock is free and its process is gone)."""
    if _process_alive(_pid_of(path.name, tag)):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    except FileNotFoundError:
        return False
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)


def _temporaries(target: Path, tag: str) -> list[Path]:
    prefix = f".{target.name}{tag}"
    try:
        return [entry for entry in target.parent.iterdir() if entry.name.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- one file ---------------------------------------------------------------------------------------------
def _check_file_destination(target: Path) -> None:
    if target.is_dir():
        raise IsADirectoryError(
            f"cannot write the file {target}: a folder exists there (remove it or choose another path)"
        )
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {target}: {parent} is a file, not a folder")
            break


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` (fsynced) only if the block succeeds.

    Stale temporaries of ``path`` left by killed writers are removed first.
    """
    target = _absolute(path)
    _check_file_destination(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in _temporaries(target, TMP_FILE_TAG):
        if _abandoned(stale, TMP_FILE_TAG):
            _remove(stale)
    tmp = _temp_name(target, TMP_FILE_TAG)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        _try_lock(fd)
        _hold(fd)
        yield tmp
        _normal_mode(tmp, _umask())
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(target.parent, directory=True)
    finally:
        _release(fd)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def merge_safetensors(
    path: str | os.PathLike,
    parts: list[tuple[str | os.PathLike, dict[str, str]]],
    metadata: dict[str, str] | None = None,
    chunk_bytes: int = 64 * 2**20,
) -> None:
    """Write one safetensors file from tensors of several, holding one chunk of bytes at a time.

    ``parts`` lists ``(source file, {key in the source: key in the new file})``; tensors are copied byte for
    byte (dtype and shape kept), in the order given. Written through :func:`atomic_path`.
    """
    entries, header, offset = [], {}, 0
    for source, keys in parts:
        source_header = check_safetensors(source)
        start = 8 + int.from_bytes(_read_prefix(source), "little")
        for key, new_key in keys.items():
            if key not in source_header:
                raise KeyError(f"{source} holds no tensor {key!r}")
            info = source_header[key]
            begin, stop = info["data_offsets"]
            header[new_key] = {
                "dtype": info["dtype"],
                "shape": info["shape"],
                "data_offsets": [offset, offset + stop - begin],
            }
            entries.append((source, start + begin, stop - begin))
            offset += stop - begin
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for source, begin, size in entries:
            with open(source, "rb") as handle:
                handle.seek(begin)
                while size > 0:
                    chunk = handle.read(min(size, chunk_bytes))
                    if not chunk:
                        raise ValueError(f"{source} ended early while copying a tensor")
                    out.write(chunk)
                    size -= len(chunk)


def _read_prefix(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(8)


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a safetensors file from its header alone (cheap: no tensor is read) and return the header.

    Raises ``ValueError`` naming the file when it is truncated, has trailing bytes or a corrupt header, and
    ``FileNotFoundError`` when it is missing — before anyone spends minutes loading a model to find out.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, too short for a header (truncated?)")
        length = int.from_bytes(prefix, "little")
        if length > size - 8 or length > 100_000_000:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its header claims {length:,} bytes, the file has {size:,}"
            )
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{path} has a corrupt safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path} has a corrupt safetensors header (entry {name!r})") from None
        if not 0 <= begin <= stop:
            raise ValueError(f"{path} has a corrupt safetensors header (entry {name!r} offsets {begin}..{stop})")
        end = max(end, stop)
    expected = 8 + length + end
    if size < expected:
        raise ValueError(
            f"{path} is truncated: {size:,} bytes, its header describes {expected:,} (an interrupted copy or download?)"
        )
    if size > expected:
        raise ValueError(f"{path} is corrupt: {size - expected:,} unexpected bytes after the tensors")
    return header


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", column_major: Optional[Callable[[str], bool]] = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read with plain reads into memory each tensor owns.

    ``safetensors.torch.load_file`` maps the file and returns views into the mapping: every page read stays
    resident as long as any one tensor lives, so re-laying out or dropping a tensor does not give its memory
    back. Here memory grows by the tensors' size and nothing else. Matrices whose key ``column_major`` accepts
    are returned with column-major storage (``t.t().is_contiguous()``), transposed through one reused scratch
    buffer so that no per-tensor temporary is left for the allocator to hoard. Validates the file first
    (see :func:`check_safetensors`).
    """
    path = Path(path)
    header = check_safetensors(path)
    tensors: dict[str, torch.Tensor] = {}
    scratch = torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as handle:
        start = 8 + int.from_bytes(handle.read(8), "little")
        for begin, name in sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__"):
            info = header[name]
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(
                    f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which this reader does not know"
                )
            size, shape = info["data_offsets"][1] - begin, info["shape"]
            transpose = column_major is not None and len(shape) == 2 and column_major(name)
            if transpose and scratch.numel() < size:
                scratch = torch.empty(size, dtype=torch.uint8)
            raw = scratch[:size] if transpose else torch.empty(size, dtype=torch.uint8)
            handle.seek(start + begin)
            if size and handle.readinto(raw.numpy()) != size:
                raise ValueError(f"{path} is truncated inside tensor {name!r}")
            value = raw.view(dtype).reshape(shape)
            if transpose:
                value = torch.empty(shape[1], shape[0], dtype=dtype).t().copy_(value)
            tensors[name] = value.to(device)
    return tensors


# -- folder artifacts -------------------------------------------------------------------------------------
def check_folder_destination(path: str | os.PathLike, what: str = "folder") -> Path:
    """Raise a clear error if a folder cannot be written at ``path`` (a file is there, or above it)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(
            f"cannot write the {what} {target}: a file exists there (remove it or choose another path)"
        )
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write the {what} {target}: {parent} is a file, not a folder")
            break
    return target


def _staged_files(staging: Path) -> list[str]:
    """Relative paths of the files of a staging folder: data first, JSON metadata and configs last."""
    files = []
    for root, _dirs, names in os.walk(staging):
        for name in names:
            full = Path(root) / name
            rel = full.relative_to(staging).as_posix()
            if rel in (MANIFEST, MANIFEST + ".draft"):
                continue
            if full.is_symlink() or not full.is_file():
                raise ValueError(f"cannot save {full}: only regular files can be part of a saved artifact")
            files.append(rel)
    return sorted(files, key=lambda rel: (rel.endswith(".json"), rel))


def _check_conflicts(target: Path, files: list[str]) -> None:
    """Refuse, before the commit point, a version whose files collide with folders (or files) at ``target``."""
    for rel in files:
        destination = target / rel
        if destination.is_dir():
            raise IsADirectoryError(f"cannot write {destination}: a folder exists there")
        for parent in destination.parents:
            if parent == target:
                break
            if parent.exists() and not parent.is_dir():
                raise NotADirectoryError(f"cannot write {destination}: {parent} is a file, not a folder")


def _roll_forward(staging: Path, target: Path, files: list[str], committed_ns: Optional[int] = None) -> None:
    """Move the staged ``files`` over their namesakes; when recovering (``committed_ns``), keep newer ones."""
    touched = {target}
    for rel in files:
        source, destination = staging / rel, target / rel
        if not source.exists():
            continue  # moved before the interruption
        if committed_ns is not None:
            with contextlib.suppress(FileNotFoundError):
                if destination.stat().st_mtime_ns > committed_ns:
                    continue  # written by someone else after this version was committed: newer, keep it
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
        touched.add(destination.parent)
    for folder in touched:
        _fsync_path(folder, directory=True)


def _recover_staging(staging: Path, target: Path) -> bool:
    """Finish a committed staging folder or discard an abandoned one; ``True`` if it rolled forward."""
    manifest = staging / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError, OSError):
            files = None  # the manifest itself was cut short: the version never became committed
        if files is not None:
            _roll_forward(staging, target, files, manifest.stat().st_mtime_ns)
            _remove(staging)
            logger.info("Completed an interrupted save of %s", target)
            return True
    if _abandoned(staging, STAGING_TAG):
        _remove(staging)
    return False


def finish_interrupted_save(path: str | os.PathLike, clean: bool = False) -> bool:
    """Complete a save of the folder ``path`` that was killed after its commit point.

    Loaders call this before reading, so a kill during the final renames never leaves a mix of versions.
    With ``clean``, abandoned temporaries of ``path`` (killed before their commit point) are deleted too.
    Returns whether a save was completed. Never raises for a read-only location: it logs and returns.
    """
    target = _absolute(path)
    stagings = _temporaries(target, STAGING_TAG)
    leftovers = _temporaries(target, TMP_FILE_TAG) if clean else []
    if not stagings and not leftovers:
        return False
    finished = False
    try:
        with _folder_lock(target.parent):
            for staging in _temporaries(target, STAGING_TAG):
                if staging.is_dir() and ((staging / MANIFEST).is_file() or clean):
                    finished |= _recover_staging(staging, target)
            for stale in leftovers:
                if _abandoned(stale, TMP_FILE_TAG):
                    _remove(stale)
    except OSError as err:
        logger.warning("Could not complete an interrupted save of %s: %s", target, err)
    return finished


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder; when the block succeeds, its files become the files of ``path``, atomically.

    Each file written into the staging folder (subfolders included) replaces its namesake under ``path``;
    other files already at ``path`` are kept. A kill at any instant leaves the previous version or the new
    one (see the module docstring); if the block raises, ``path`` is untouched. A file at ``path`` is an
    error, raised before anything is written.
    """
    target = check_folder_destination(_absolute(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(target, clean=True)
    staging = _temp_name(target, STAGING_TAG)
    os.mkdir(staging, 0o777)
    fd = os.open(staging, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    committed = False
    try:
        _try_lock(fd)
        _hold(fd)
        yield staging
        files = _staged_files(staging)
        check_folder_destination(target)
        _check_conflicts(target, files)
        umask = _umask()
        for rel in files:
            _normal_mode(staging / rel, umask)
            _fsync_path(staging / rel)
        for root, _dirs, _names in os.walk(staging):
            _normal_mode(Path(root), umask)
            _fsync_path(Path(root), directory=True)
        with _folder_lock(target.parent):
            if not os.path.lexists(target):
                # Nothing to keep: the whole staging folder becomes the artifact in one rename.
                try:
                    os.rename(staging, target)
                    committed = True
                except OSError:
                    pass  # created meanwhile: commit file by file below
                else:
                    _fsync_path(target.parent, directory=True)
                    return
            manifest = staging / MANIFEST
            draft = staging / (MANIFEST + ".draft")
            with open(draft, "w", encoding="utf-8") as handle:
                json.dump({"target": target.name, "files": files}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(draft, manifest)  # the commit point: the manifest exists whole or not at all
            _fsync_path(staging, directory=True)
            committed = True  # from here on the new version is the truth, even if we are killed
            _roll_forward(staging, target, files)
            _remove(staging)
    finally:
        _release(fd)
        os.close(fd)
        if not committed and staging.exists():
            _remove(staging)


# -- references to folders on the Hugging Face Hub ---------------------------------------------------------
def looks_like_hub_id(ref: Any) -> bool:
    """Whether ``ref`` reads as a Hub repository id (``owner/name``) rather than a local path."""
    text = str(ref)
    if os.path.exists(os.path.expanduser(text)) or text.startswith((".", "/", "~")) or "\\" in text:
        return False
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.endswith((".gguf", ".json", ".safetensors"))


def local_or_hub_folder(ref: str | os.PathLike, allow_patterns: list[str], what: str = "folder") -> Path:
    """``ref`` as a local folder: a path as it is, a Hub id (``owner/name``) downloaded first.

    Only files matching ``allow_patterns`` are downloaded (``huggingface_hub.snapshot_download``; it honours
    ``HF_HUB_OFFLINE`` and the cache), so a reference to a large repository reads what the caller needs.
    """
    if not looks_like_hub_id(ref):
        return Path(ref).expanduser()
    import huggingface_hub

    logger.info("Downloading %s %s from the Hugging Face Hub (%s)", what, ref, ", ".join(allow_patterns))
    try:
        return Path(huggingface_hub.snapshot_download(repo_id=str(ref), allow_patterns=allow_patterns))
    except Exception as err:  # noqa: BLE001  (the Hub client raises many kinds; the message names the reference)
        raise FileNotFoundError(
            f"{what} {ref!r} is not a local path, and the Hub repository could not be read: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from err
