"""Shared pieces of the ``nsn-peft`` command line: option groups, value parsers, config files, loading, output.

Exit codes used by every subcommand:

* ``0`` — success;
* ``2`` — usage error: an argparse error, a bad option value (rank < 1, fraction outside (0, 1], a rank above
  the adapter's largest max rank, a module name that matches no layer), a missing input file or folder, or an
  unknown key in a ``--config`` file;
* ``1`` — failure while running (e.g. activation statistics from another model, a checkpoint whose shapes do
  not match the base model, out of memory).

Errors are reported as one line, ``nsn-peft <command>: error: <message>``, on stderr; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

logger = logging.getLogger("nsn_peft.cli")

PROG = "nsn-peft"
FULL = "full"

__all__ = [
    "FULL",
    "PROG",
    "CommandResult",
    "UsageError",
    "add_adapter_creation_options",
    "add_common_options",
    "add_data_options",
    "add_model_options",
    "config_to_argv",
    "csv_floats",
    "csv_list",
    "load_config_file",
    "positive_float",
    "positive_int",
    "rank_list",
    "unit_fraction",
]


class UsageError(Exception):
    """A bad command line: reported as ``nsn-peft <cmd>: error: ...`` with exit code 2."""


@dataclass
class CommandResult:
    """What a subcommand returns: ``data`` is printed as JSON with ``--json``, ``text`` otherwise."""

    data: dict[str, Any]
    text: str = ""
    exit_code: int = 0


# ---------------------------------------------------------------------------------------------------------
# Value parsers (argparse ``type=`` callables: they raise ArgumentTypeError, which argparse turns into exit 2)
# ---------------------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite float >= 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def unit_fraction(text: str) -> float:
    """A float in (0, 1]."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def open_unit_fraction(text: str) -> float:
    """A float in (0, 1)."""
    value = unit_fraction(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def csv_list(text: str) -> list[str]:
    """``"a,b , c"`` -> ``["a", "b", "c"]`` (empty items are an error)."""
    items = [item.strip() for item in str(text).split(",")]
    if not items or any(not item for item in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {text!r}")
    return items


def csv_floats(text: str) -> list[float]:
    """Comma-separated fractions in (0, 1]."""
    return [unit_fraction(item) for item in csv_list(text)]


def rank_value(text: str) -> Union[int, str]:
    """A positive int or ``"full"`` (each layer's max rank)."""
    if str(text).strip().lower() in (FULL, "max"):
        return FULL
    return positive_int(text)


def rank_list(text: str) -> list[Union[int, str]]:
    """``"64,128,full"`` -> ``[64, 128, "full"]``."""
    return [rank_value(item) for item in csv_list(text)]


def module_list(text: str) -> Union[list[str], str]:
    """Module names (comma-separated), ``all-linear``, or ``re:<regex>`` (a full-match regex, PEFT semantics)."""
    text = str(text).strip()
    if text == "all-linear":
        return text
    if text.startswith("re:"):
        pattern = text[3:]
        try:
            re.compile(pattern)
        except re.error as err:
            raise argparse.ArgumentTypeError(f"invalid regex {pattern!r}: {err}") from None
        return pattern
    return csv_list(text)


# ---------------------------------------------------------------------------------------------------------
# Option groups
# ---------------------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description/epilog layout; does not repeat defaults the help text already states."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def new_command(subparsers: Any, name: str, *, summary: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """A subcommand parser whose ``--help`` ends with usage examples; the common options are added last."""
    epilog = "examples:\n" + "\n".join(f"  {PROG} {name} {e}" for e in examples)
    epilog += "\n\nexit codes: 0 ok, 2 usage error (bad value, missing input), 1 failure while running"
    return subparsers.add_parser(
        name, help=summary, description=description, epilog=epilog, formatter_class=_HelpFormatter
    )


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--json``, ``--debug``, ``-v/-q`` and ``--progress`` (every subcommand)."""
    group = parser.add_argument_group("general")
    group.add_argument(
        "--config", metavar="FILE", default=None,
        help="YAML or JSON file of option defaults (keys are option names, e.g. max_rank); flags override it.",
    )
    group.add_argument("--json", action=argparse.BooleanOptionalAction, default=False, help="Print the result as JSON on stdout.")
    group.add_argument("--debug", action=argparse.BooleanOptionalAction, default=False, help="Show tracebacks on errors.")
    group.add_argument("-v", "--verbose", action="count", default=0, help="More logging (repeat for more).")
    group.add_argument("-q", "--quiet", action="store_true", default=False, help="Only errors on stderr; no progress bars.")
    group.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="Show progress bars on stderr (default: on)."
    )


def add_model_options(parser: argparse.ArgumentParser, *, task: bool = True, model_help: Optional[str] = None) -> None:
    """``--model``, ``--gguf-file``, ``--tokenizer``, ``--device``, ``--dtype`` (and ``--task``)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=None, metavar="ID_OR_PATH",
        help=model_help or "Hub id, local folder or .gguf file of the base model "
        "(default: the embedded SmolLM2-135M-Instruct, or the adapter's base model).",
    )
    group.add_argument("--gguf-file", default=None, metavar="NAME", help="GGUF file inside --model (a folder or Hub repo).")
    group.add_argument("--tokenizer", default=None, metavar="ID_OR_PATH", help="Tokenizer to use instead of the model's own.")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda if available, else cpu).")
    group.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="Weights dtype (default: auto = as saved)."
    )
    if task:
        group.add_argument(
            "--task", default="causal-lm", choices=["causal-lm", "sequence-classification"], help="Model head (default: causal-lm)."
        )


def add_adapter_creation_options(parser: argparse.ArgumentParser, *, title: str = "NSN adapter") -> None:
    """Options of ``NSNConfig`` used by ``adapt`` and by commands that adapt a plain model on the fly."""
    group = parser.add_argument_group(title)
    group.add_argument("--max-rank", type=positive_int, default=None, help="Max rank per layer (default: full rank, exact).")
    group.add_argument(
        "--target-modules", type=module_list, default=None, metavar="NAMES",
        help="Comma-separated module names (q_proj,v_proj), 'all-linear' (default) or 're:<regex>'.",
    )
    group.add_argument("--exclude-modules", type=module_list, default=None, metavar="NAMES", help="Modules never adapted.")
    group.add_argument(
        "--init", default=None, choices=["svd", "whitened", "projected"],
        help="Factor initialisation: svd (weights only), whitened or projected (need --stats). "
        "Default: the rank plan's init with --rank-plan, else svd.",
    )
    group.add_argument("--stats", default=None, metavar="DIR", help="Activation statistics folder (from `nsn-peft calibrate`).")
    group.add_argument("--rank-plan", default=None, metavar="JSON", help="Rank plan JSON (from `nsn-peft search-ranks`): sets the layers, their ranks and the init.")
    group.add_argument("--granularity", type=positive_int, default=None, help="Rank grid step (default: 64).")
    group.add_argument("--energy-input", type=unit_fraction, default=None, help="Input-subspace energy kept (projected init).")
    group.add_argument("--energy-output", type=unit_fraction, default=None, help="Output-subspace energy kept (projected init).")
    group.add_argument("--init-device", default=None, help="Device to decompose on (e.g. cuda for a CPU model).")


def add_data_options(parser: argparse.ArgumentParser, *, required: bool = True, seq_len: int = 512, max_tokens: Optional[int] = 65536) -> None:
    """``--data`` and how it is read and cut into blocks."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", default=None, metavar="SOURCE",
        help="Text source: a .txt/.md/.rst/.jsonl file, a folder of text files, or a datasets name "
        "(e.g. wikitext:wikitext-2-raw-v1)."
        + ("" if required else " Optional."),
    )
    group.add_argument("--split", default=None, help="Split of a datasets source (default: train).")
    group.add_argument("--text-field", default="text", help="Text field of JSONL/datasets records (default: text).")
    group.add_argument("--max-docs", type=positive_int, default=None, help="Read at most this many documents.")
    group.add_argument("--max-tokens", type=positive_int, default=max_tokens, help=f"Token budget (default: {max_tokens}).")
    group.add_argument("--seq-len", type=positive_int, default=seq_len, help=f"Tokens per sequence (default: {seq_len}).")
    group.add_argument("--batch-size", type=positive_int, default=4, help="Sequences per forward pass (default: 4).")


def required(args: argparse.Namespace, *names: str) -> None:
    """Usage error naming the first of ``names`` that is unset (argparse ``required=`` is not used so that
    required options can come from ``--config``)."""
    missing = [n for n in names if getattr(args, n, None) in (None, "", [])]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise UsageError(f"the following arguments are required: {flags}")


# ---------------------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------------------
def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON mapping of option defaults."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"cannot parse config file {path}: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"config file {path} must hold a mapping of option names to values, got {type(data).__name__}")
    return dict(data)


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        action.dest: action
        for action in parser._actions
        if action.option_strings and action.dest not in ("help", "config") and not isinstance(action, argparse._HelpAction)
    }


def config_to_argv(parser: argparse.ArgumentParser, config: Mapping[str, Any], command: str, commands: Iterable[str]) -> list[str]:
    """Turn a config mapping into option tokens placed *before* the user's flags (so flags override).

    Keys are option dests (``max_rank``; ``max-rank`` is accepted too). A file whose top-level keys are all
    subcommand names holds one section per command. Lists become comma-separated values.
    """
    commands = set(commands)
    if config and all(key in commands for key in config):
        section = config.get(command) or {}
        if not isinstance(section, Mapping):
            raise UsageError(f"config section '{command}' must be a mapping")
        config = section
    actions = _option_actions(parser)
    tokens: list[str] = []
    for raw_key, value in config.items():
        key = str(raw_key).replace("-", "_")
        action = actions.get(key)
        if action is None:
            known = ", ".join(sorted(actions))
            raise UsageError(f"unknown key '{raw_key}' in config file (valid keys for '{command}': {known})")
        option = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UsageError(f"config key '{raw_key}' must be true or false, got {value!r}")
            tokens.append(option if value else "--no-" + option[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"config key '{raw_key}' must be true or false, got {value!r}")
            if value:
                tokens.append(option)
        elif isinstance(action, argparse._CountAction):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"config key '{raw_key}' must be a count >= 0, got {value!r}")
            tokens.extend([option] * value)
        else:
            if isinstance(value, bool) or isinstance(value, Mapping):
                raise UsageError(f"config key '{raw_key}' has an invalid value {value!r}")
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            tokens.append(f"{option}={value}")
    return tokens


# ---------------------------------------------------------------------------------------------------------
# Runtime setup: logging, warnings, progress bars
# ---------------------------------------------------------------------------------------------------------
def setup_runtime(args: argparse.Namespace) -> None:
    """Configure logging verbosity, Python warnings and progress bars from the common options."""
    verbose = 0 if args.quiet else int(args.verbose) + (1 if args.debug else 0)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if args.quiet:
        level = logging.ERROR
    root = logging.getLogger()
    if not any(getattr(h, "_nsn_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        handler._nsn_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("nsn_peft").setLevel(level)
    try:
        import transformers

        transformers.logging.set_verbosity(logging.ERROR if verbose == 0 else level)
        transformers.logging.disable_default_handler()
        transformers.logging.enable_propagation()
    except Exception:  # pragma: no cover - transformers always present in practice
        pass
    if verbose == 0:
        warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_progress(args.progress and not args.quiet)


_PROGRESS = {"enabled": True}


def set_progress(enabled: bool) -> None:
    """Turn every tqdm progress bar (ours, transformers', datasets') on or off."""
    import functools

    import tqdm.std

    _PROGRESS["enabled"] = enabled
    original = getattr(tqdm.std.tqdm, "_nsn_original_init", None)
    if original is None:
        original = tqdm.std.tqdm.__init__
        tqdm.std.tqdm._nsn_original_init = original  # type: ignore[attr-defined]

    @functools.wraps(original)
    def silent_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True  # wins over callers that pass disable= themselves
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = original if enabled else silent_init  # type: ignore[method-assign]
    try:
        import transformers

        (transformers.utils.logging.enable_progress_bar if enabled else transformers.utils.logging.disable_progress_bar)()
    except Exception:  # pragma: no cover
        pass


def progress_enabled() -> bool:
    """Whether progress bars are on (``--progress``, not ``--quiet``)."""
    return _PROGRESS["enabled"]


def progress(iterable: Iterable, **kwargs: Any) -> Iterable:
    """A tqdm progress bar on stderr (disabled by ``--quiet``/``--no-progress``)."""
    from tqdm.auto import tqdm

    if not _PROGRESS["enabled"]:
        kwargs["disable"] = True
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Paths and inputs
# ---------------------------------------------------------------------------------------------------------
def looks_like_path(ref: str) -> bool:
    """Whether ``ref`` is meant as a local path rather than a Hub id / datasets name."""
    text = str(ref)
    return (
        text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text and os.sep != "/"
        or text.lower().endswith((".gguf", ".txt", ".md", ".rst", ".jsonl", ".json", ".yaml", ".yml", ".safetensors", ".csv"))
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


def check_model_ref(ref: Optional[str], what: str = "model") -> None:
    """A local-looking model reference must exist (Hub ids are left to transformers)."""
    from ..models import DEFAULT_MODEL

    if ref is None or ref == DEFAULT_MODEL:
        return
    if looks_like_path(ref):
        check_input_path(ref, what)


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


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False, help="Replace an existing output.")


def model_ref_for_saving(ref: Optional[str], gguf_file: Optional[str]) -> str:
    """The base-model reference to record in an adapter: absolute for local paths, the GGUF file included."""
    from ..models import DEFAULT_MODEL

    if ref is None or ref == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(ref).expanduser()
    if path.exists():
        path = path.resolve()
        if gguf_file and path.is_dir():
            return str(path / gguf_file)
        return str(path)
    return ref


def resolve_device(device: Optional[str]) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------------
# Models and adapters
# ---------------------------------------------------------------------------------------------------------
def load_base(args: argparse.Namespace, *, model: Optional[str] = None, task: Optional[str] = None):
    """``(model, tokenizer)`` from ``--model``/``--gguf-file``/``--tokenizer``/``--dtype``/``--device``."""
    from ..models import load_model_and_tokenizer

    ref = model if model is not None else args.model
    check_model_ref(ref)
    if getattr(args, "tokenizer", None) and looks_like_path(args.tokenizer):
        check_input_path(args.tokenizer, "tokenizer")
    dtype = None if args.dtype == "auto" else args.dtype
    task = task or getattr(args, "task", "causal-lm")
    return load_model_and_tokenizer(
        ref, gguf_file=args.gguf_file, tokenizer=args.tokenizer, task=task, dtype=dtype, device=resolve_device(args.device)
    )


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of an NSN adapter folder (usage error if it is not one)."""
    folder = check_input_path(str(folder), "adapter folder", kind="dir")
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise UsageError(f"{folder} is not an adapter folder (no adapter_config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"corrupt {path}: {err}") from None
    if config.get("peft_type") != "NSN":
        raise UsageError(f"{folder} holds a {config.get('peft_type')!r} adapter, not an NSN adapter")
    return config


def load_adapter(args: argparse.Namespace, *, trainable: bool = False, task: Optional[str] = None):
    """``(peft_model, tokenizer, base_ref)`` from ``--adapter`` (base: ``--model`` or the adapter's own)."""
    from peft import PeftModel

    config = read_adapter_config(args.adapter)
    ref = args.model or config.get("base_model_name_or_path")
    if task is None:
        task = "sequence-classification" if config.get("task_type") == "SEQ_CLS" else getattr(args, "task", "causal-lm")
    if not args.tokenizer and (Path(args.adapter) / "tokenizer_config.json").is_file():
        args.tokenizer = str(args.adapter)  # saved with --save-tokenizer
    base, tokenizer = load_base(args, model=ref, task=task)
    model = PeftModel.from_pretrained(base, str(args.adapter), is_trainable=trainable)
    if not trainable:
        model.eval()
    return model, tokenizer, ref


def nsn_config_from_args(args: argparse.Namespace, *, task: Optional[str] = None):
    """An :class:`~nsn_peft.NSNConfig` from the adapter-creation options (and ``--rank-plan``)."""
    from ..config import NSNConfig

    kwargs: dict[str, Any] = {}
    if args.max_rank is not None:
        kwargs["max_rank"] = args.max_rank
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
    # An explicit --init wins over the plan's, which wins over the default (svd).
    kwargs["init"] = args.init or kwargs.get("init") or "svd"
    if kwargs["init"] in ("whitened", "projected") and not args.stats:
        origin = "--init" if args.init else "the rank plan's init"
        raise UsageError(f"{origin} {kwargs['init']} needs activation statistics: pass --stats DIR (from `nsn-peft calibrate`)")
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
    from ..stats import META_FILE, STATS_FILE

    folder = check_input_path(path, "stats folder", kind="dir")
    if not (folder / META_FILE).is_file() or not (folder / STATS_FILE).is_file():
        raise UsageError(f"{path} is not an activation-stats folder (expected {META_FILE} and {STATS_FILE}; create it with `nsn-peft calibrate`)")
    return folder


def rank_plan_kwargs(path: str) -> dict[str, Any]:
    """``NSNConfig`` keyword arguments of a rank plan JSON written by ``search-ranks``."""
    check_input_path(path, "rank plan", kind="file")
    try:
        from ..rank_search import RankPlan
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
    if target_modules is None or isinstance(target_modules, str):
        return
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise UsageError(f"{what}: {', '.join(unknown)} match(es) no linear layer of the model (layer names: {', '.join(suffixes)})")


def adapt_model(base: Any, config: Any, model_ref: Optional[str]):
    """``get_peft_model(base, config)``, recording ``model_ref`` as the adapter's base model."""
    from peft import get_peft_model

    check_target_modules(base, config.target_modules)
    if config.exclude_modules is not None and not isinstance(config.exclude_modules, str):
        check_target_modules(base, list(config.exclude_modules), "--exclude-modules")
    model = get_peft_model(base, config)
    if model_ref is not None:
        model.peft_config[model.active_adapter].base_model_name_or_path = model_ref
    model.eval()
    return model


def is_compressed_folder(ref: Optional[str]) -> bool:
    """Whether ``ref`` is a folder written by ``nsn-peft compress`` / :func:`nsn_peft.compression.save_compressed`."""
    from ..compression import META_FILE

    return ref is not None and Path(ref).expanduser().is_dir() and (Path(ref).expanduser() / META_FILE).is_file()


def load_compressed_model(args: argparse.Namespace, ref: str):
    """``(model, tokenizer)`` of a compressed model folder (fixed ranks, no NSN layers)."""
    from transformers import AutoTokenizer

    from ..compression import load_compressed
    from ..models import resolve_dtype

    tokenizer_ref = args.tokenizer or ref
    if not args.tokenizer and not any((Path(ref) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise UsageError(f"{ref} holds no tokenizer; pass --tokenizer")
    dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype)
    model = load_compressed(ref, device=resolve_device(args.device), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_ref))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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
    base, tokenizer = load_base(args)
    ref = model_ref_for_saving(args.model, args.gguf_file)
    return adapt_model(base, config, ref), tokenizer, ref


# ---------------------------------------------------------------------------------------------------------
# Rank points: --ranks / --fractions / --target-flops
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RankPoint:
    """One operating point of an NSN model: ``kind`` is rank, fraction or flops."""

    label: str
    kind: str
    value: Union[int, float, str]
    rank: Any = None  # what set_rank receives (int / dict), None for fraction
    fraction: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def context(self, model: Any):
        from ..ranks import at_rank

        if self.fraction is not None:
            return at_rank(model, fraction=self.fraction)
        return at_rank(model, self.rank)


def resolve_rank_points(
    model: Any,
    *,
    ranks: Optional[Sequence[Union[int, str]]] = None,
    fractions: Optional[Sequence[float]] = None,
    target_flops: Optional[Sequence[float]] = None,
    flops_scope: str = "model",
    default_full: bool = True,
) -> list[RankPoint]:
    """Turn the rank options into :class:`RankPoint` objects, validating ranks against the model's max ranks."""
    from ..ranks import get_max_rank, select_rank_for_target_flops

    maxima = get_max_rank(model)
    top = max(maxima.values())
    points: list[RankPoint] = []
    for r in ranks or []:
        if r == FULL:
            points.append(RankPoint(FULL, "rank", FULL, rank=top))
        else:
            if r > top:
                raise UsageError(f"rank {r} exceeds the adapter's largest max rank ({top}); use a rank <= {top} or 'full'")
            points.append(RankPoint(str(r), "rank", int(r), rank=int(r)))
    for f in fractions or []:
        points.append(RankPoint(f"fraction={f:g}", "fraction", float(f), fraction=float(f)))
    for f in target_flops or []:
        chosen = select_rank_for_target_flops(model, float(f), scope=flops_scope)
        points.append(RankPoint(f"flops<={f:g}", "flops", float(f), rank=chosen, extra={"selected_rank": chosen}))
    if not points and default_full:
        points.append(RankPoint(FULL, "rank", FULL, rank=top))
    return points


def describe_point(model: Any, point: RankPoint) -> dict[str, Any]:
    """Ranks and FLOPs of ``model`` at ``point`` (call inside ``point.context(model)``)."""
    from ..ranks import estimate_flops, get_rank

    current = get_rank(model)
    values = list(current.values())
    report = estimate_flops(model)
    info = {
        "label": point.label,
        "kind": point.kind,
        "value": point.value,
        "mean_rank": sum(values) / len(values),
        "min_rank": min(values),
        "max_rank": max(values),
        "targeted_flops_fraction": report.targeted_fraction,
        "model_flops_fraction": report.model_fraction,
        "flops_per_token": report.model,
    }
    info.update(point.extra)
    return info


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], align: Optional[str] = None) -> str:
    """A plain-text table (``align``: one of l/r per column; default: left for text, right for numbers)."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
        return str(value)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join(
            "r" if rows and all(isinstance(r[i], (int, float)) for r in rows) else "l" for i in range(len(headers))
        )

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def emit(args: argparse.Namespace, result: CommandResult) -> None:
    """Print ``result`` as JSON (``--json``) or as text on stdout."""
    if args.json:
        sys.stdout.write(json.dumps(result.data, indent=2, default=_json_default) + "\n")
    elif result.text:
        sys.stdout.write(result.text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(str(message).split())


def lazy_import(module: str, what: str) -> Any:
    """Import ``nsn_peft.<module>`` or fail with a clear message naming the missing feature."""
    import importlib

    try:
        return importlib.import_module(f"nsn_peft.{module}")
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("nsn_peft"):
            raise RuntimeError(f"{what} needs nsn_peft.{module}, which this installation lacks") from None
        raise

