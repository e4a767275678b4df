"""Sliding-window perplexity and text loading."""

import json
import math

import pytest
import torch
from tiny_models import TEXTS, char_tokenizer, tiny_gpt2, tiny_llama

from nsn_peft.data import load_texts, python_docs_dir, token_blocks, token_stream
from nsn_peft.evaluation import evaluate_perplexity, perplexity, sliding_windows


def _stream(n=100, seed=5):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed))


def test_sliding_windows_score_every_token_once():
    assert sliding_windows(100, 20) == [(b, b + 20, 19) for b in range(0, 100, 20)]
    windows = sliding_windows(100, 20, 10)
    assert sum(s for _, _, s in windows) == 99 and windows[0] == (0, 20, 19) and windows[1] == (10, 30, 10)
    assert windows[-1][1] == 100
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 20, 30)
    with pytest.raises(ValueError, match="seq_len"):
        sliding_windows(100, 1)


def test_perplexity_matches_a_manual_computation():
    model = tiny_llama()
    ids = _stream()
    disjoint = evaluate_perplexity(model, ids, seq_len=20)
    assert disjoint["tokens"] == 5 * 19 and disjoint["windows"] == 5
    with torch.no_grad():
        logits = model(input_ids=ids[None, :20]).logits[0, :-1]
    manual = torch.nn.functional.cross_entropy(logits, ids[1:20]).exp().item()
    assert math.isclose(perplexity(model, ids[:20], seq_len=20), manual, rel_tol=1e-5)
    assert math.isclose(disjoint["perplexity"], math.exp(disjoint["nll"]), rel_tol=1e-12)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_strided_windows_score_only_new_tokens(factory):
    model = factory()
    ids = _stream()
    overlapping = evaluate_perplexity(model, ids, seq_len=20, stride=10, batch_size=3)
    assert overlapping["tokens"] == 99  # every token after the first is scored exactly once
    # Reference: one window at a time, full logits, the last `scored` targets of each window.
    total = 0.0
    for begin, end, scored in sliding_windows(100, 20, 10):
        with torch.no_grad():
            logits = model(input_ids=ids[None, begin:end]).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[begin + 1 : end], reduction="none")
        total += nll[-scored:].sum().item()
    assert math.isclose(overlapping["nll"], total / 99, rel_tol=1e-5)


def test_perplexity_of_texts_equals_that_of_their_token_stream(tmp_path):
    model, tok = tiny_llama(), char_tokenizer()
    ids = token_stream(TEXTS, tok)
    from_ids = perplexity(model, ids, seq_len=32)
    assert math.isclose(perplexity(model, TEXTS, tokenizer=tok, seq_len=32), from_ids, rel_tol=1e-6)
    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / "b.txt").write_text(TEXTS[1])
    assert math.isclose(perplexity(model, tmp_path, tokenizer=tok, seq_len=32), from_ids, rel_tol=1e-6)
    capped = evaluate_perplexity(model, TEXTS, tokenizer=tok, seq_len=32, max_tokens=64)
    assert capped["tokens"] == 62
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, TEXTS)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, ids[:1])


def test_load_texts_from_folders_files_jsonl_and_datasets(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "a.rst.txt").write_text("first")
    (tmp_path / "sub" / "c.rst").write_text("third")
    (tmp_path / "ignored.py").write_text("not text")
    (tmp_path / "empty.txt").write_text("   \n")
    assert load_texts(tmp_path) == ["first", "second", "third"]  # sorted paths, recursive, blanks dropped
    assert load_texts(tmp_path, max_docs=2) == ["first", "second"]
    assert load_texts(tmp_path / "b.md") == ["second"]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert load_texts(jsonl, text_field="body") == ["one", "two"]
    with pytest.raises(ValueError, match=r"data\.jsonl:1.*'text'"):
        load_texts(jsonl)
    jsonl.write_text("{broken\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:1.*invalid JSON"):
        load_texts(jsonl)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):
        load_texts("./nope/folder")
    (tmp_path / "blank").mkdir()
    with pytest.raises(ValueError, match="No text files"):
        load_texts(tmp_path / "blank")
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": ["x", "", "y"], "other": [1, 2, 3]})
    assert load_texts(dataset) == ["x", "y"]
    with pytest.raises(ValueError, match="column 'body'"):
        load_texts(dataset, text_field="body")
    splits = datasets.DatasetDict({"train": dataset, "test": datasets.Dataset.from_dict({"text": ["z"]})})
    assert load_texts(splits) == ["x", "y"] and load_texts(splits, split="test") == ["z"]
    with pytest.raises(TypeError, match="Unsupported text source"):
        load_texts(42)


def test_token_blocks_and_stream():
    tok = char_tokenizer()
    stream = token_stream(TEXTS, tok)
    assert stream.dtype == torch.long and stream.numel() == sum(len(t) for t in TEXTS) + len(TEXTS)
    assert (stream == tok.eos_token_id).sum() == len(TEXTS)
    blocks = token_blocks(TEXTS, tok, 16)
    assert blocks.shape == (stream.numel() // 16, 16)
    assert torch.equal(blocks.reshape(-1), stream[: blocks.numel()])
    assert token_blocks(TEXTS, tok, 16, max_tokens=40).shape == (2, 16)
    with pytest.raises(ValueError, match="not one block"):
        token_blocks(["ab"], tok, 16)


def test_python_docs_dir_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("NSN_PEFT_PYTHON_DOCS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt install python3.11-doc"):
        python_docs_dir("tutorial")
    (tmp_path / "howto").mkdir()
    assert python_docs_dir("howto") == tmp_path / "howto"


def test_standard_protocol_joins_documents_with_blank_lines_and_drops_the_partial_window():
    from nsn_peft.evaluation import PERPLEXITY_PROTOCOLS

    model, tok = tiny_llama(), char_tokenizer()
    docs = ["abc def. " * 4, "ghi jkl! " * 4, "mno pqr? " * 3]  # 36 + 2 + 36 + 2 + 27 = 103 characters
    result = evaluate_perplexity(model, docs, tokenizer=tok, seq_len=20, protocol="standard")
    assert result["protocol"] == "standard" and result["windows"] == 5 and result["tokens"] == 5 * 19
    ids = torch.tensor(tok("\n\n".join(docs))["input_ids"])
    with torch.no_grad():
        nll = [
            torch.nn.functional.cross_entropy(
                model(input_ids=ids[None, b : b + 20]).logits[0, :-1], ids[b + 1 : b + 20]
            )
            for b in range(0, 100, 20)
        ]
    assert math.isclose(result["nll"], float(torch.stack(nll).mean()), rel_tol=1e-5)
    eos = evaluate_perplexity(model, docs, tokenizer=tok, seq_len=20)
    assert eos["protocol"] == "nsn" and eos["windows"] == 6  # EOS-joined stream (104 ids), last partial window scored
    assert PERPLEXITY_PROTOCOLS["standard"]["seq_len"] == 2048
    with pytest.raises(ValueError, match="whole windows of 2048"):
        evaluate_perplexity(model, docs, tokenizer=tok, protocol="standard")
    with pytest.raises(ValueError, match="unknown perplexity protocol"):
        evaluate_perplexity(model, docs, tokenizer=tok, protocol="gptq")
