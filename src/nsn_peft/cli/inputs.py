"""Checking a command's inputs and outputs early, and turning options into library calls.

Loading itself lives in :mod:`nsn_peft.hub`; this module maps options to its arguments and its errors to
usage errors (exit code 2) that name the option.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from ..devices import resolve_device
from ..errors import NoTokenizerError, UnknownModulesError
from ..hub import base_model_reference, is_compressed_folder
from .options import UsageError


def looks_like_path(ref: str) -> bool:
    """Whether ``ref`` is meant as a local path rather than a Hub id / datasets name."""
    text = str(ref)
    return (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or os.sep in text
        and os.sep != "/"
        or text.lower().endswith(
            (".gguf", ".txt", ".md", ".rst", ".jsonl", ".json", ".yaml", ".yml", ".safetensors", ".csv")
        )
        or Path(text).exists()
    )


def check_input_path(path: Optional[str], what: str, *, kind: str = "any") -> Optional[Path]:
    """Usage error unless ``path`` exists (``kind``: any, file or dir)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{what} not found: {path}")
    if kind == "file" and not p.is_file():
        raise UsageError(f"{what} must be a file: {path}")
    if kind == "dir" and not p.is_dir():
        raise UsageError(f"{what} must be a folder: {path}")
    return p


def check_model_ref(ref: Optional[str], what: str = "model", *, allow_compressed: bool = False) -> None:
    """A local-looking model reference must exist (Hub ids are left to transformers); a compressed export is
    refused unless the command runs it as it is (it is no transformers model: its factored layers would be random)."""
    from ..gguf_models import is_embedded_reference

    if is_embedded_reference(ref):
        return
    if looks_like_path(ref):
        check_input_path(ref, what)
    if not allow_compressed and is_compressed_folder(ref):
        raise UsageError(
            f"--{what} {ref} is a compressed export (from `nsn-peft compress`), not a base model to adapt; "
            "eval and infer run it with --model, but to adapt or train again start from the adapter it came from (--adapter)"
        )


def check_data_ref(ref: Optional[str]) -> None:
    if ref is not None and looks_like_path(ref):
        check_input_path(ref, "data")


def check_output_path(path: str, what: str = "output") -> Path:
    """The parent of an output must be creatable and the path must not be an existing file of the other kind."""
    p = Path(path).expanduser()
    if p.parent.exists() and not p.parent.is_dir():
        raise UsageError(f"{what}: parent {p.parent} is not a folder")
    return p


def check_output_dir(path: Optional[str], overwrite: bool, what: str = "--output") -> Path:
    """Usage error if ``path`` is a file, or a non-empty folder and ``overwrite`` is off."""
    if not path:
        raise UsageError(f"the following arguments are required: {what}")
    p = check_output_path(path, what)
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{what} {path} exists and is not a folder")
        if any(p.iterdir()) and not overwrite:
            raise UsageError(f"{what} {path} exists and is not empty; pass --overwrite to replace it")
    return p


def check_output_file(path: Optional[str], overwrite: bool, what: str = "--output") -> Path:
    """Usage error if ``path`` is a folder, or an existing file and ``overwrite`` is off."""
    if not path:
        raise UsageError(f"the following arguments are required: {what}")
    p = check_output_path(path, what)
    if p.is_dir():
        raise UsageError(f"{what} {path} is a folder; expected a file path")
    if p.exists() and not overwrite:
        raise UsageError(f"{what} {path} exists; pass --overwrite to replace it")
    return p


def load_base(
    args: argparse.Namespace, *, model: Optional[str] = None, task: Optional[str] = None, tokenizer: bool = True
):
    """``(model, tokenizer)`` from ``--model``/``--gguf-file``/``--tokenizer``/``--dtype``/``--device``.

    With ``tokenizer=False`` (commands that need none, e.g. ``adapt``) the tokenizer is ``None`` unless
    ``--tokenizer`` names one, so a checkpoint folder without tokenizer files works.
    """
    from ..hub import load_model, load_tokenizer

    ref = model if model is not None else args.model
    check_model_ref(ref)
    if getattr(args, "tokenizer", None) and looks_like_path(args.tokenizer):
        check_input_path(args.tokenizer, "tokenizer")
    tok = None
    if tokenizer or getattr(args, "tokenizer", None):
        try:
            tok = load_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer(ref, gguf_file=args.gguf_file)
        except NoTokenizerError:
            raise UsageError(f"{ref} holds no tokenizer; pass --tokenizer") from None
    dtype = None if args.dtype == "auto" else args.dtype
    task = task or getattr(args, "task", "causal-lm")
    base = load_model(
        ref, gguf_file=args.gguf_file, task=task, dtype=dtype, device=resolve_device(args.device), **placement(args)
    )
    return base, tok


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """``--device-map``/``--max-memory``/``--offload-folder`` as loading keywords (none without ``--device-map``)."""
    if getattr(args, "device_map", None) is None:
        if getattr(args, "max_memory", None) is not None or getattr(args, "offload_folder", None) is not None:
            raise UsageError("--max-memory and --offload-folder apply to --device-map (e.g. --device-map auto)")
        return {}
    return {"device_map": args.device_map, "max_memory": args.max_memory, "offload_folder": args.offload_folder}


def compute_device(args: argparse.Namespace) -> Optional[str]:
    """Where the work runs: ``--device``, or ``None`` (wherever accelerate placed the model) with ``--device-map``."""
    return None if getattr(args, "device_map", None) is not None else resolve_device(args.device)


def load_adapter(args: argparse.Namespace, *, trainable: bool = False, task: Optional[str] = None):
    """``(peft_model, tokenizer, base_ref)`` from ``--adapter`` (base: ``--model`` or the adapter's own)."""
    from ..hub import check_adapter_files
    from ..hub import load_adapter as load

    check_input_path(args.adapter, "adapter folder", kind="dir")
    try:
        check_adapter_files(args.adapter)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    if args.model:
        check_model_ref(args.model)
    return load(
        args.adapter,
        model=args.model or None,
        gguf_file=args.gguf_file,
        tokenizer=args.tokenizer or None,
        task=task,
        dtype=None if args.dtype == "auto" else args.dtype,
        device=resolve_device(args.device),
        trainable=trainable,
        keep_base_weights=keep_base_weights(args),
        **{k: v for k, v in placement(args).items() if k != "offload_folder"},
    )


def keep_base_weights(args: argparse.Namespace) -> Optional[bool]:
    """``--keep-base-weights`` resolved: serve from the factors only unless the dense model is evaluated too.

    ``infer`` runs from the factors only; ``eval``/``sweep`` keep the dense weights while their dense baseline is
    on (the default) and drop them with ``--no-baseline`` or ``--no-keep-base-weights`` (baseline then skipped).
    """
    if not hasattr(args, "keep_base_weights"):
        return None  # commands without the option (train, compress, ...) keep what the adapter says
    baseline = getattr(args, "baseline", False)
    if args.keep_base_weights is False and baseline is True:
        raise UsageError("--baseline evaluates the dense model and needs its weights: drop --no-keep-base-weights")
    if args.keep_base_weights is None:
        return baseline is not False
    return args.keep_base_weights


def nsn_config_from_args(args: argparse.Namespace, *, task: Optional[str] = None):
    """An :class:`~nsn_peft.NSNConfig` from the adapter-creation options (and ``--rank-plan``)."""
    from ..tuner.config import NSNConfig

    kwargs: dict[str, Any] = {}
    if args.max_rank is not None:
        kwargs["max_rank"] = args.max_rank
    if getattr(args, "max_params_fraction", None) is not None:
        kwargs["max_params_fraction"] = args.max_params_fraction
    if args.target_modules is not None:
        kwargs["target_modules"] = args.target_modules
    if args.exclude_modules is not None:
        kwargs["exclude_modules"] = args.exclude_modules
    if args.granularity is not None:
        kwargs["rank_granularity"] = args.granularity
    if args.energy_input is not None:
        kwargs["energy_input"] = args.energy_input
    if args.energy_output is not None:
        kwargs["energy_output"] = args.energy_output
    if args.init_device is not None:
        kwargs["init_device"] = args.init_device
    if args.rank_plan:
        kwargs.update(rank_plan_kwargs(args.rank_plan))
    # An explicit --init wins over the plan's, which wins over the default: whitened with --stats, else svd.
    kwargs["init"] = args.init or kwargs.get("init") or ("whitened" if args.stats else "svd")
    if kwargs["init"] in ("whitened", "projected") and not args.stats:
        origin = "--init" if args.init else "the rank plan's init"
        raise UsageError(
            f"{origin} {kwargs['init']} needs activation statistics: pass --stats DIR (from `nsn-peft calibrate`)"
        )
    if args.stats:
        check_stats_dir(args.stats)
        kwargs["stats_path"] = str(Path(args.stats).expanduser())
    task = task or getattr(args, "task", "causal-lm")
    kwargs["task_type"] = "SEQ_CLS" if task == "sequence-classification" else "CAUSAL_LM"
    try:
        return NSNConfig(**kwargs)
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_stats_dir(path: str) -> Path:
    """Usage error unless ``path`` is an activation-statistics folder written by ``calibrate``."""
    from ..calibrate.stats import GRADIENT_STATS_SUBDIR, META_FILE, STATS_FILE
    from ..io import check_safetensors, finish_interrupted_save

    folder = check_input_path(path, "stats folder", kind="dir")
    finish_interrupted_save(folder)
    if not (folder / META_FILE).is_file() or not (folder / STATS_FILE).is_file():
        raise UsageError(
            f"{path} is not an activation-stats folder (expected {META_FILE} and {STATS_FILE}; create it with `nsn-peft calibrate`)"
        )
    # Cheap checks of the files now, rather than a failure after the model has loaded.
    for stats_dir in [folder] + ([folder / GRADIENT_STATS_SUBDIR] if (folder / GRADIENT_STATS_SUBDIR).is_dir() else []):
        try:
            json.loads((stats_dir / META_FILE).read_text(encoding="utf-8"))
            check_safetensors(stats_dir / STATS_FILE)
        except json.JSONDecodeError as err:
            raise UsageError(f"corrupt {stats_dir / META_FILE}: {err}") from None
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(str(err)) from None
    return folder


def rank_plan_kwargs(path: str) -> dict[str, Any]:
    """``NSNConfig`` keyword arguments of a rank plan JSON written by ``search-ranks``."""
    check_input_path(path, "rank plan", kind="file")
    try:
        from ..planning.plan import RankPlan
    except ImportError:
        RankPlan = None  # noqa: N806
    if RankPlan is not None:
        try:
            return dict(RankPlan.load(path).to_config_kwargs())
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise UsageError(f"invalid rank plan {path}: {' '.join(str(err).split())}") from None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"invalid rank plan {path}: {err}") from None
    ranks = data.get("ranks") or data.get("rank_pattern")
    if not isinstance(ranks, Mapping):
        raise UsageError(f"invalid rank plan {path}: no 'ranks' mapping")
    return {"rank_pattern": {str(k): int(v) for k, v in ranks.items()}}


def check_target_modules(model: Any, target_modules: Any, what: str = "--target-modules") -> None:
    """Usage error when a listed module name matches no Linear/Conv1D layer of ``model``."""
    from ..tuner.build import check_module_names

    try:
        check_module_names(model, target_modules, what)
    except UnknownModulesError as err:
        raise UsageError(str(err)) from None


def adapt_model(base: Any, config: Any, model_ref: Optional[str]):
    """:func:`nsn_peft.adapt_model`, its name errors as usage errors naming the CLI's options."""
    from ..tuner.build import adapt_model as adapt

    check_target_modules(base, config.target_modules)
    check_target_modules(base, config.exclude_modules, "--exclude-modules")
    return adapt(base, config, base_model_name_or_path=model_ref)


def load_compressed_model(args: argparse.Namespace, ref: str):
    """``(model, tokenizer)`` of a compressed model folder (fixed ranks, no NSN layers)."""
    from ..hub import load_compressed_model as load

    try:
        return load(
            ref,
            tokenizer=args.tokenizer or None,
            dtype=None if args.dtype == "auto" else args.dtype,
            device=resolve_device(args.device),
            **placement(args),
        )
    except NoTokenizerError:
        raise UsageError(f"{ref} holds no tokenizer; pass --tokenizer") from None


def model_for_inference(args: argparse.Namespace, *, allow_compressed: bool = False):
    """``(peft_model, tokenizer, base_ref)``: ``--adapter`` when given, else adapt ``--model`` on the fly.

    With ``allow_compressed``, a ``--model`` folder written by ``compress`` is loaded as it is (fixed ranks).
    """
    if getattr(args, "adapter", None):
        return load_adapter(args)
    if allow_compressed and is_compressed_folder(args.model):
        model, tokenizer = load_compressed_model(args, args.model)
        return model, tokenizer, str(Path(args.model).resolve())
    config = nsn_config_from_args(args)
    keep = keep_base_weights(args)
    if keep is not None:
        config.keep_base_weights = keep
    base, tokenizer = load_base(args)
    ref = base_model_reference(args.model, args.gguf_file)
    return adapt_model(base, config, ref), tokenizer, ref


def resolve_rank_points(model: Any, **kwargs: Any):
    """:func:`nsn_peft.tuner.rank_points.resolve_rank_points`, a bad rank reported as a usage error."""
    from ..tuner.rank_points import resolve_rank_points as resolve

    try:
        return resolve(model, **kwargs)
    except ValueError as err:
        raise UsageError(str(err)) from None


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """:func:`nsn_peft.hub.read_adapter_config`, a folder that is not an NSN adapter reported as a usage error."""
    from ..hub import read_adapter_config as read

    check_input_path(str(folder), "adapter folder", kind="dir")
    try:
        return read(folder)
    except ValueError as err:
        raise UsageError(str(err)) from None


def fetch_hub_references(args: argparse.Namespace) -> None:
    """Replace a Hub id given as ``--adapter`` (an NSN adapter or an export) or ``--model`` (an export) by its
    downloaded folder, so every command takes Hub ids where it takes folders. Only the files needed are read;
    other Hub models are left to transformers."""
    from ..hub import fetch_adapter, fetch_hub_export
    from ..io import looks_like_hub_id

    adapter = getattr(args, "adapter", None)
    if isinstance(adapter, str) and looks_like_hub_id(adapter):
        try:
            args.adapter = str(fetch_hub_export(adapter) or fetch_adapter(adapter))  # info reads exports too
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None
    model = getattr(args, "model", None)
    if isinstance(model, str):
        export = fetch_hub_export(model)
        if export is not None:
            args.model = str(export)
