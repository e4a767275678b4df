"""Reading text lazily: streamed datasets stop at max_docs / max_tokens, tokenisation in batches."""

from __future__ import annotations

import pytest
import torch
from tiny_models import char_tokenizer, sentences, tiny_llama

from nsn_peft import collect_activation_stats
from nsn_peft.data import block_dataset, iter_texts, load_texts, token_blocks, token_stream


class StreamStandIn:
    """Looks like a ``datasets.IterableDataset`` (columns, iteration, no length) and fails the test when a row
    beyond ``limit`` is read: a stream such as C4 never ends, so reading past what was asked is a bug."""

    column_names = ["text", "url"]

    def __init__(self, limit: int, length: int = 40) -> None:
        self.limit, self.length, self.read = limit, length, 0

    def __iter__(self):
        for i in range(10**9):
            if i >= self.limit:
                raise AssertionError(f"read past the requested amount: row {i + 1} of a limit of {self.limit}")
            self.read += 1
            yield {"text": f"document {i} " + "x" * (self.length - 12), "url": f"u{i}"}


def test_max_docs_reads_nothing_beyond_them():
    stream = StreamStandIn(limit=5)
    assert len(load_texts(stream, max_docs=5)) == 5 and stream.read == 5
    lazy = iter_texts(StreamStandIn(limit=3), max_docs=3)
    assert next(lazy).startswith("document 0")  # one row read, the rest when asked
    with pytest.raises(ValueError, match="no column 'body'"):
        load_texts(StreamStandIn(limit=1), text_field="body", max_docs=1)


def test_token_budget_stops_the_stream_within_a_document():
    tok = char_tokenizer()
    # 40 characters + EOS per document: a budget of 1,000 tokens needs 25 documents; the batches read at most one more.
    stream = StreamStandIn(limit=26)
    blocks = token_blocks(iter_texts(stream), tok, 100, max_tokens=1000)
    assert blocks.shape == (10, 100) and stream.read <= 26


def test_calibration_on_a_stream_stops_at_max_tokens():
    stream = StreamStandIn(limit=14)  # 512 tokens: 13 documents of 41 tokens, one read ahead at most
    stats = collect_activation_stats(
        tiny_llama(), stream, tokenizer=char_tokenizer(), max_tokens=512, seq_len=64, batch_size=4, show_progress=False
    )
    assert stats.num_tokens == 512


def test_hub_names_are_streamed(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return StreamStandIn(limit=2)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert len(load_texts("allenai/c4:en", max_docs=2)) == 2
    assert calls == [("allenai/c4", "en", "train", True)]


def test_batched_tokenisation_gives_the_document_by_document_ids():
    tok = char_tokenizer()
    texts = sentences(50, 3)
    expected = []
    for text in texts:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert torch.equal(token_stream(texts, tok, batch_size=7), torch.tensor(expected))
    assert torch.equal(token_stream(iter(texts), tok, max_tokens=333), torch.tensor(expected[:333]))


def test_block_dataset_tokenises_and_groups_with_datasets():
    tok = char_tokenizer()
    texts = sentences(40, 5)
    blocks = block_dataset(texts, tok, 32, batch_size=8)
    expected = []
    for start in range(0, len(texts), 8):  # each batch of documents is concatenated and cut; its remainder dropped
        stream = token_stream(texts[start : start + 8], tok)
        expected += stream[: stream.numel() // 32 * 32].view(-1, 32).tolist()
    assert blocks["input_ids"] == expected and blocks["labels"] == expected
    assert set(blocks.column_names) == {"input_ids", "labels", "attention_mask"}
    assert all(m == [1] * 32 for m in blocks["attention_mask"])


def test_block_dataset_with_a_token_budget_reads_only_what_it_needs():
    stream = StreamStandIn(limit=30)  # 41 tokens per document: 10 blocks of 64 need 16 documents, in batches of 10
    blocks = block_dataset(stream, char_tokenizer(), 64, max_tokens=640, batch_size=10)
    assert len(blocks) == 10 and stream.read <= 30
