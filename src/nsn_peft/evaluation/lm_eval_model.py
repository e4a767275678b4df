"""The NSN model as an lm-eval-harness model: lm-eval's HF wrapper, scoring shared prefixes once.

:class:`NSNLM` is lm-eval's own ``HFLM`` (its tokenisation, its request format, its generation) around a model
object that is already loaded: an NSN adapter (whose rank can change between evaluations without a reload), a
compressed export or any causal LM. It changes one thing, how log-likelihood requests are computed: requests
whose token sequences share a prefix (the choices of one multiple-choice question share their context;
WinoGrande's two contexts share the words before the blank) run that prefix once, keep its key/value cache,
and run only their own remainders, several per forward pass. The log-probabilities are those of the plain
computation (a test compares them); on SmolLM2 and the 7-task suite this scores about 2× fewer tokens.

``import nsn_peft.evaluation`` registers the class with lm-eval as ``nsn`` (lm-eval 0.4.13 finds models only
in its own registry, not through package entry points), so ``lm_eval --model nsn --model_args adapter=DIR,rank=64``
works wherever nsn-peft is imported first: ``python -m nsn_peft.lm_eval_cli`` is lm-eval's command line with
it registered.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .extra import require_lm_eval

require_lm_eval()
from lm_eval.api.registry import model_registry  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

logger = logging.getLogger(__name__)

LM_EVAL_NAME = "nsn"
# Requests join a group when the group's shared prefix stays at least this long (in tokens): shorter prefixes save
# less than the extra forward pass they cost.
MIN_SHARED_TOKENS = 2

__all__ = ["LM_EVAL_NAME", "MODEL_ARGS", "NSNLM", "lm_eval_model_from_args", "register_with_lm_eval"]

Request = tuple[tuple[str, str], list[int], list[int]]


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def group_by_prefix(
    inputs: Sequence[Sequence[int]], *, min_shared: int = MIN_SHARED_TOKENS, max_group: int = 64
) -> list[tuple[list[int], int]]:
    """Groups of request indices whose input sequences share a prefix: ``[(indices, prefix length), ...]``.

    Sequences are sorted, so those sharing a prefix are neighbours; a neighbour joins the group while the
    shared prefix stays at least ``min_shared`` tokens and keeps the tokens saved growing (a prefix shared by
    ``n`` requests saves ``(n - 1) × length`` tokens). Every index appears in exactly one group.
    """
    order = sorted(range(len(inputs)), key=lambda i: tuple(inputs[i]))
    groups: list[tuple[list[int], int]] = []
    for index in order:
        if groups:
            members, shared = groups[-1]
            first = inputs[members[0]]
            common = _common_prefix(first, inputs[index], shared)
            # joining shortens the shared prefix to `common`: worth it if (n)·common > (n-1)·shared
            if (
                len(members) < max_group
                and common >= min_shared
                and len(members) * common > (len(members) - 1) * shared
            ):
                groups[-1] = (members + [index], common)
                continue
        groups.append(([index], len(inputs[index])))
    return groups


def _cache_keyword(model: Any) -> str:
    """The forward keyword that takes a key/value cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        parameters = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _returned_cache(output: Any) -> Any:
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


def _select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """The prefixes' key/value cache with one row per remainder (``rows[i]``: the prefix row it continues)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(rows)
        return cache
    if isinstance(cache, tuple):  # legacy tuples of (key, value) per layer
        return tuple(tuple(t[rows] for t in layer) for layer in cache)
    raise TypeError(f"cannot select rows of a key/value cache of type {type(cache).__name__}")


class NSNLM(HFLM):
    """lm-eval's ``HFLM`` around a loaded model (NSN adapter, compressed export or any causal LM).

    Args:
        model: the model object; its current rank is what gets scored (switch it between evaluations with
            :func:`nsn_peft.set_rank` / :func:`nsn_peft.at_rank`, no reload).
        tokenizer: its tokenizer.
        batch_size: requests per forward pass on the plain path (``share_prefixes=False``).
        max_length: context length (default: the model's).
        share_prefixes: score shared prefixes once (default); ``False`` uses lm-eval's plain computation.
        max_group: at most this many requests share one prefix pass.
        batch_tokens: tokens (padding included) per forward pass of the shared-prefix path.
        logit_bytes: memory for the logits of one forward pass (bounds the positions scored per pass).
        show_progress: a progress bar over the log-likelihood requests.
        **kwargs: further ``HFLM`` arguments.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_length: Optional[int] = None,
        share_prefixes: bool = True,
        max_group: int = 64,
        batch_tokens: int = 4096,
        logit_bytes: int = 256 * 1024**2,
        show_progress: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(model, str):
            raise TypeError(
                "NSNLM takes a loaded model; from lm-eval's command line use --model nsn with "
                "--model_args adapter=DIR or pretrained=REF (see NSNLM.create_from_arg_string)"
            )
        # HFLM warns that an already-loaded model ignores its loading arguments: that is the point here.
        hf_logger = logging.getLogger("lm_eval.models.huggingface")
        level = hf_logger.level
        hf_logger.setLevel(logging.ERROR)
        try:
            super().__init__(
                pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, **kwargs
            )
        finally:
            hf_logger.setLevel(level)
        self.show_progress = show_progress
        self.share_prefixes = share_prefixes
        self._cache_keyword = _cache_keyword(model)
        self.max_group = max_group
        self.batch_tokens = batch_tokens
        self.logit_bytes = logit_bytes
        self.scored_tokens = 0  # tokens run through the model by log-likelihood requests (the last call)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> NSNLM:
        """``lm_eval --model nsn --model_args KEY=VALUE,...``: see :func:`nsn_peft.evaluation.lm_eval_model_from_args`."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> NSNLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return lm_eval_model_from_args({**arg_dict, **extra})

    # -- log-likelihoods ---------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: Optional[int] = None
    ) -> list[tuple[float, bool]]:
        if not self.share_prefixes or self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        limit = self.max_length + 1
        # As lm-eval: a sequence longer than the context keeps its last max_length + 1 tokens.
        full = [(ctx + cont)[-limit:] for _, ctx, cont in requests]
        jobs = [_Job(tokens[:-1], tokens[-len(cont) :]) for tokens, (_, _, cont) in zip(full, requests)]
        groups = [
            _Group([jobs[i] for i in members], members, shared)
            for members, shared in group_by_prefix([j.inputs for j in jobs], max_group=self.max_group)
        ]
        groups.sort(key=lambda g: g.shared)  # neighbours of similar length pad little
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        self.scored_tokens = 0
        with tqdm(
            total=len(requests),
            desc="Log-likelihoods",
            unit="req",
            disable=disable_tqdm or not self.show_progress or self.rank != 0,
        ) as bar:
            for chunk in self._chunks(groups):
                self._score_chunk(chunk)
                for group in chunk:
                    for index, job in zip(group.indices, group.jobs):
                        results[index] = job.score
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], job.score)
                    bar.update(len(group.jobs))
        return results  # type: ignore[return-value]

    def _chunks(self, groups: list[_Group]) -> Iterator[list[_Group]]:
        """Groups batched into forward passes of at most ``batch_tokens`` (padded) tokens and ``logit_rows``
        positions of logits per pass; a group larger than that runs alone."""
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 50_000)
        rows_budget = max(64, self.logit_bytes // (4 * vocab))
        chunk: list[_Group] = []
        for group in groups:
            trial = chunk + [group]
            longest = max(g.shared for g in trial)
            rest = [j for g in trial for j in g.jobs if len(j.inputs) > g.shared]
            width = max(
                (len(j.inputs) - g.shared for g in trial for j in g.jobs if len(j.inputs) > g.shared), default=0
            )
            fits = (
                len(trial) * longest <= self.batch_tokens
                and len(rest) * width <= self.batch_tokens
                and len(trial) * max(g.prefix_keep for g in trial) <= rows_budget
                and len(rest) * width <= rows_budget
            )
            if chunk and not fits:
                yield chunk
                chunk = [group]
            else:
                chunk = trial
        if chunk:
            yield chunk

    @torch.no_grad()
    def _score_chunk(self, groups: list[_Group]) -> None:
        """Score every job of ``groups``: one pass over their prefixes (left-padded, so every prefix ends at the
        same position), one over the remainders of their requests with the prefixes' cache."""
        device, pad = self.device, self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(g.shared for g in groups)
        keep = max(g.prefix_keep for g in groups)
        ids = torch.full((len(groups), longest), pad, dtype=torch.long)
        prefix_mask = torch.zeros((len(groups), longest), dtype=torch.long)
        for row, g in enumerate(groups):
            ids[row, longest - g.shared :] = torch.tensor(g.jobs[0].inputs[: g.shared])
            prefix_mask[row, longest - g.shared :] = 1
        positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=prefix_mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=keep,
        )
        self.scored_tokens += sum(g.shared for g in groups)
        prefix_logits = out.logits  # (groups, keep, vocab): the last `keep` prefix positions of each row
        rest = [(row, g, j) for row, g in enumerate(groups) for j in g.jobs if len(j.inputs) > g.shared]
        if rest:
            width = max(len(j.inputs) - g.shared for _, g, j in rest)
            tail_ids = torch.full((len(rest), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rest), longest + width), dtype=torch.long)
            tail_positions = torch.zeros((len(rest), width), dtype=torch.long)
            for r, (row, g, j) in enumerate(rest):
                tail = j.inputs[g.shared :]
                tail_ids[r, : len(tail)] = torch.tensor(tail)
                mask[r, :longest] = prefix_mask[row]
                mask[r, longest : longest + len(tail)] = 1
                tail_positions[r] = torch.arange(g.shared, g.shared + width)
            # Right padding of the remainders: a row's positions never attend to its own padding, so its
            # log-probabilities are exact.
            lowest = min(max(j.start, g.shared) - g.shared for _, g, j in rest)
            source = torch.tensor([row for row, _, _ in rest], device=device)
            cache = {self._cache_keyword: _select_cache_rows(_returned_cache(out), source)}
            tail_logits = self.model(
                input_ids=tail_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=tail_positions.to(device),
                use_cache=True,
                logits_to_keep=width - lowest,
                **cache,
            ).logits  # (rest, width - lowest, vocab)
            self.scored_tokens += sum(len(j.inputs) - g.shared for _, g, j in rest)
        tail_row = {id(j): r for r, (_, _, j) in enumerate(rest)}
        for row, g in enumerate(groups):
            for j in g.jobs:
                pieces = []
                end = len(j.inputs)
                if j.start < g.shared:  # kept prefix logits: row index p - shared + keep for prefix position p
                    pieces.append(prefix_logits[row, j.start - g.shared + keep : min(end, g.shared) - g.shared + keep])
                if end > g.shared:  # tail logits: row index p - shared - lowest for input position p
                    r = tail_row[id(j)]
                    pieces.append(tail_logits[r, max(j.start, g.shared) - g.shared - lowest : end - g.shared - lowest])
                logprobs = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).float().log_softmax(-1)
                targets = torch.tensor(j.targets, device=logprobs.device)
                chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1)
                j.score = (float(chosen.sum()), bool((logprobs.argmax(-1) == targets).all()))


@dataclass
class _Job:
    """One log-likelihood request: the model's input and the continuation tokens it must predict."""

    inputs: list[int]
    targets: list[int]
    score: Optional[tuple[float, bool]] = None

    @property
    def start(self) -> int:
        """The first input position whose next-token logits score the continuation."""
        return len(self.inputs) - len(self.targets)


@dataclass
class _Group:
    """Requests sharing their first ``shared`` input tokens (run once)."""

    jobs: list[_Job]
    indices: list[int]
    shared: int

    @property
    def prefix_keep(self) -> int:
        """How many of the prefix's last positions score a continuation (at least one: the model returns them)."""
        return max(1, self.shared - min(j.start for j in self.jobs))


MODEL_ARGS = {
    "adapter": "NSN adapter folder (its base model is the one it records, or `pretrained`)",
    "pretrained": "base model (Hub id, folder, .gguf) or a compressed export; default: the embedded SmolLM2",
    "rank": "rank of every layer, or 'full'",
    "fraction": "fraction of each layer's max rank",
    "flops": "FLOPs budget (a stored budget plan of the adapter, else the largest grid rank within it)",
    "tokenizer": "tokenizer instead of the model's own",
    "dtype": "fp32, bf16, fp16 or auto",
    "device": "cpu, cuda, ... (default: auto)",
    "batch_size": "requests per forward pass on the plain path",
    "max_length": "context length",
    "share_prefixes": "score shared prefixes once (default true)",
}


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def lm_eval_model_from_args(args: dict[str, Any]) -> Any:
    """An :class:`NSNLM` from lm-eval ``--model_args`` (keys: :data:`MODEL_ARGS`; lm-eval also passes
    ``batch_size``/``device``). At most one of ``rank``/``fraction``/``flops`` sets the operating point of an
    adapter; without one the adapter runs at its saved rank.

    Raises:
        ValueError: an unknown key, an operating point without an adapter, or several operating points.
    """
    from ..devices import resolve_device
    from ..hub import is_compressed_folder, load_adapter, load_compressed_model, load_model_and_tokenizer
    from ..tuner.rank_points import resolve_rank_points

    args = {k: v for k, v in args.items() if v is not None and v != ""}
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise ValueError(f"unknown --model_args {unknown} for --model nsn; known: {', '.join(MODEL_ARGS)}")
    chosen = [k for k in ("rank", "fraction", "flops") if k in args]
    if len(chosen) > 1:
        raise ValueError(f"pass at most one of rank, fraction, flops (got {chosen})")
    if chosen and "adapter" not in args:
        raise ValueError(
            f"{chosen[0]}= needs adapter=DIR (an NSN adapter); a plain or compressed model has fixed ranks"
        )
    dtype = None if str(args.get("dtype", "auto")) == "auto" else str(args["dtype"])
    device = resolve_device(args.get("device") or "auto")
    tokenizer = args.get("tokenizer")
    if "adapter" in args:
        model, tok, _ = load_adapter(
            args["adapter"], model=args.get("pretrained"), tokenizer=tokenizer, dtype=dtype, device=device
        )
    elif is_compressed_folder(args.get("pretrained")):
        model, tok = load_compressed_model(args["pretrained"], tokenizer=tokenizer, dtype=dtype, device=device)
    else:
        model, tok = load_model_and_tokenizer(args.get("pretrained"), tokenizer=tokenizer, dtype=dtype, device=device)
    model.eval()
    options = {
        "batch_size": int(args.get("batch_size", 8)) if str(args.get("batch_size", "8")).isdigit() else 8,
        "share_prefixes": _flag(args.get("share_prefixes", True)),
    }
    if "max_length" in args:
        options["max_length"] = int(args["max_length"])
    lm = NSNLM(model, tok, **options)
    if chosen:
        value = args[chosen[0]]
        if chosen[0] == "rank":
            points = resolve_rank_points(model, ranks=[value if str(value) == "full" else int(value)])
        elif chosen[0] == "fraction":
            points = resolve_rank_points(model, fractions=[float(value)])
        else:
            points = resolve_rank_points(model, target_flops=[float(value)])
        # The LM owns its model: the operating point stays set for as long as the LM lives.
        lm.operating_point = points[0].label
        lm._point_stack = contextlib.ExitStack()
        lm._point_stack.enter_context(points[0].context(model))
    return lm


def register_with_lm_eval() -> None:
    """Make ``--model nsn`` known to lm-eval's registry (idempotent)."""
    if LM_EVAL_NAME not in model_registry:
        model_registry.register(LM_EVAL_NAME)(NSNLM)


register_with_lm_eval()
