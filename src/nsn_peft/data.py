"""Text sources for calibration and evaluation: local folders/files, JSONL, ``datasets`` datasets.

``iter_texts`` reads any of them lazily, one document at a time (``datasets`` Hub names are streamed, so a
corpus that never ends, such as C4, is read only as far as it is used); ``load_texts`` is the same as a list;
``token_stream`` and ``token_blocks`` tokenise documents in batches, stop reading at a token budget, and
concatenate them (EOS between them) into fixed-length blocks of token ids.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".rst", ".md")
PYTHON_DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")

__all__ = ["block_dataset", "iter_texts", "load_texts", "python_docs_dir", "token_blocks", "token_stream"]


def python_docs_dir(part: str = "tutorial") -> Path:
    """A folder of the Python 3.11 documentation sources (Debian ``python3.11-doc``): real English offline.

    ``NSN_PEFT_PYTHON_DOCS`` overrides the root (a copy of the ``_sources`` folder elsewhere).
    """
    folder = Path(os.environ.get("NSN_PEFT_PYTHON_DOCS", PYTHON_DOCS_ROOT)) / part
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: install the Python docs sources (apt install python3.11-doc)")
    return folder


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{number}: no '{text_field}' field (set text_field=)")
            texts.append(str(record[text_field]))
    return texts


def _is_dataset_dict(source: Any) -> bool:
    return type(source).__name__ in ("DatasetDict", "IterableDatasetDict") and type(source).__module__.startswith(
        "datasets"
    )


def _is_iterable_dataset(source: Any) -> bool:
    """A ``datasets.IterableDataset`` (streamed: no length, no random access), or any object like it."""
    return hasattr(source, "column_names") and not hasattr(source, "__len__") and hasattr(source, "__iter__")


def _looks_like_dataset_name(text: str) -> bool:
    """``"name"``, ``"org/name"`` or ``"name:config"``; not a path (``./x``, ``/x``, ``a/b/c``, ``x.txt``)."""
    name = text.partition(":")[0]
    return (
        bool(name)
        and not text.startswith((".", "/", "~"))
        and "\\" not in text
        and name.count("/") <= 1
        and Path(name).suffix.lower() not in (*TEXT_SUFFIXES, ".jsonl", ".json")
    )


def _column(source: Any, text_field: str) -> Iterator[str]:
    """The ``text_field`` of every row of a ``datasets`` dataset, row by row (nothing read ahead)."""
    columns = source.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"Dataset has no column '{text_field}' (columns: {columns})")
    for row in source:
        if text_field not in row:
            raise ValueError(f"Dataset has no column '{text_field}' (columns: {list(row)})")
        yield str(row[text_field])


def _documents(source: Any, split: Optional[str], text_field: str) -> Iterator[str]:
    if isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
        yield from source
    elif _is_dataset_dict(source):  # datasets.DatasetDict: pick the split
        split = split or ("train" if "train" in source else next(iter(source)))
        if split not in source:
            raise ValueError(f"Dataset has no split '{split}' (splits: {list(source)})")
        yield from _documents(source[split], None, text_field)
    elif hasattr(source, "column_names") and (hasattr(source, "__getitem__") or _is_iterable_dataset(source)):
        yield from _column(source, text_field)  # datasets.Dataset or IterableDataset
    elif not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Unsupported text source of type {type(source).__name__}: pass a path, a list of strings, "
            "a datasets.Dataset or a dataset name"
        )
    else:
        path = Path(os.fspath(source))
        if path.is_dir():
            files = _text_files(path)
            if not files:
                raise ValueError(f"No text files ({', '.join(TEXT_SUFFIXES)}) under {path}")
            for f in files:
                yield f.read_text(encoding="utf-8", errors="replace")
        elif path.is_file():
            yield from (
                _read_jsonl(path, text_field)
                if path.suffix == ".jsonl"
                else [path.read_text(encoding="utf-8", errors="replace")]
            )
        elif not _looks_like_dataset_name(str(source)):
            raise FileNotFoundError(f"Data file or folder not found: {path}")
        else:
            import datasets  # only needed for Hub datasets

            name, _, config = str(source).partition(":")
            # Streamed: rows arrive as they are read, and reading stops where the caller stops.
            yield from _documents(
                datasets.load_dataset(name, config or None, split=split or "train", streaming=True), None, text_field
            )


def iter_texts(
    source: Any, *, split: Optional[str] = None, text_field: str = "text", max_docs: Optional[int] = None
) -> Iterator[str]:
    """The non-empty documents of ``source``, one at a time, read only as far as they are consumed.

    Accepts what :func:`load_texts` accepts, and ``datasets.IterableDataset`` objects; ``datasets`` Hub names are
    loaded with ``streaming=True``. After ``max_docs`` documents nothing more is read. Errors as in
    :func:`load_texts`, raised when the iteration starts.
    """
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be positive or None, got {max_docs}")
    documents = (t for t in _documents(source, split, text_field) if t.strip())
    return itertools.islice(documents, max_docs)


def load_texts(
    source: Any, *, split: Optional[str] = None, text_field: str = "text", max_docs: Optional[int] = None
) -> list[str]:
    """Documents from ``source``.

    Args:
        source: a folder (every ``*.txt``/``*.rst``/``*.md`` below it, sorted), a text file, a ``.jsonl``
            file (one JSON object per line, text in ``text_field``), a ``datasets.Dataset``, ``IterableDataset``
            or ``DatasetDict``, a list of strings, or a ``datasets`` Hub name ``"name"`` / ``"org/name"`` /
            ``"name:config"`` (e.g. ``"wikitext:wikitext-2-raw-v1"``, split ``split`` or ``"train"``; streamed,
            needs network access).
        split: dataset split for Hub names and ``DatasetDict`` objects (default ``"train"``).
        text_field: the column / JSON field holding the text.
        max_docs: keep only the first documents (nothing after them is read). A streamed corpus without
            ``max_docs`` is read to its end: use :func:`iter_texts` with a token budget instead.

    Returns:
        The non-empty documents, in order.

    Raises:
        FileNotFoundError: ``source`` looks like a path that does not exist.
        ValueError: no text, a missing column/field, or an invalid JSONL line (file and line named).
        TypeError: an unsupported source type.
    """
    texts = list(iter_texts(source, split=split, text_field=text_field, max_docs=max_docs))
    if not texts:
        raise ValueError(f"No non-empty text in {source!r}")
    return texts


def token_stream(
    texts: Iterable[str], tokenizer, max_tokens: Optional[int] = None, batch_size: int = 64
) -> torch.Tensor:
    """All documents tokenised and concatenated (EOS between documents), as one 1-D id tensor.

    ``texts`` may be lazy (:func:`iter_texts`): documents are tokenised ``batch_size`` at a time (fast
    tokenizers work through a batch in parallel), and once ``max_tokens`` is reached no further document is
    read. Near the budget a batch holds only as many documents as the mean length so far says are needed, so
    at most a few documents past the budget are ever read.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    documents = iter(texts)
    read = 0
    while max_tokens is None or len(ids) < max_tokens:
        wanted = batch_size
        if max_tokens is not None:  # one document first, then as many as the mean length says are still needed
            mean = max(len(ids) / read, 1.0) if read else float(max_tokens)
            wanted = max(1, min(batch_size, int((max_tokens - len(ids)) / mean) + 1))
        batch = list(itertools.islice(documents, wanted))
        if not batch:
            break
        read += len(batch)
        for document in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(document)
            if eos is not None:
                ids.append(eos)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(texts: Iterable[str], tokenizer, block_size: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """``(n, block_size)`` blocks of token ids cut from :func:`token_stream` (the remainder is dropped)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    stream = token_stream(texts, tokenizer, None if max_tokens is None else max(max_tokens, block_size))
    n = stream.numel() // block_size
    if n == 0:
        raise ValueError(f"Only {stream.numel()} tokens of text: not one block of {block_size}")
    return stream[: n * block_size].view(n, block_size)


def block_dataset(
    source: Any,
    tokenizer,
    block_size: int,
    *,
    max_tokens: Optional[int] = None,
    split: Optional[str] = None,
    text_field: str = "text",
    max_docs: Optional[int] = None,
    batch_size: int = 1000,
):
    """A ``datasets.Dataset`` of causal-LM examples (``input_ids``, ``labels``, ``attention_mask``) of ``block_size``
    tokens, built the ``datasets`` way: tokenised with ``map(batched=True)`` (EOS after each document), then
    grouped into blocks with a second batched ``map`` (each batch of ``batch_size`` documents is concatenated
    and cut; its remainder is dropped, as in transformers' ``run_clm``).

    ``source`` is anything :func:`iter_texts` reads (``datasets`` Hub names streamed). With ``max_tokens`` the
    pipeline runs lazily and stops after ``max_tokens // block_size`` blocks, so only the documents those blocks
    need are read and tokenised.
    """
    import datasets

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids] if eos is not None else ids}

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
        return {
            "input_ids": blocks,
            "labels": [list(b) for b in blocks],
            "attention_mask": [[1] * block_size for _ in blocks],
        }

    def documents() -> Iterator[dict[str, str]]:
        for text in iter_texts(source, split=split, text_field=text_field, max_docs=max_docs):
            yield {"text": text}

    raw = datasets.IterableDataset.from_generator(documents)
    if max_tokens is None:  # every document: a map-style dataset from the start
        raw = datasets.Dataset.from_list(list(raw))
    tokenized = raw.map(tokenize, batched=True, batch_size=batch_size, remove_columns=["text"])
    blocks = tokenized.map(group, batched=True, batch_size=batch_size, remove_columns=["input_ids"])
    if max_tokens is not None:
        # Only the blocks asked for are computed; they become a map-style dataset (Trainer needs a length).
        blocks = datasets.Dataset.from_list(list(blocks.take(max(1, max_tokens // block_size))))
    if len(blocks) == 0:
        raise ValueError(f"Too little text in {source!r}: not one block of {block_size} tokens")
    return blocks
