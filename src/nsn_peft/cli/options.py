"""Argument parsing for the ``nsn-peft`` commands: value types, shared option groups, config files."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

PROG = "nsn-peft"
FULL = "full"


class UsageError(Exception):
    """A bad command line: reported as ``nsn-peft <cmd>: error: ...`` with exit code 2."""


# Value parsers (argparse ``type=`` callables: they raise ArgumentTypeError, which argparse turns into exit 2)
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


def epsilon_text(text: str) -> str:
    """A relative tolerance written as a percentage (``"0.5%"``) or a fraction (``"0.005"``); returned as written
    (validated), :func:`parse_epsilon` gives its value."""
    parse_epsilon(text)
    return str(text).strip()


def parse_epsilon(text: str) -> tuple[float, bool]:
    """``("0.5%") -> (0.005, True)``, ``("0.005") -> (0.005, False)``: the fraction, and whether it was a percentage."""
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a percentage like 0.5% or a fraction like 0.005, got {text!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return (value / 100 if percent else value), percent


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


def max_rank_value(text: str) -> Union[int, str]:
    """A positive int or ``"break-even"`` (each layer's factors no bigger than its dense weight)."""
    if text.strip().lower() == "break-even":
        return "break-even"
    return positive_int(text)


def rank_list(text: str) -> list[Union[int, str]]:
    """``"64,128,full"`` -> ``[64, 128, "full"]``."""
    return [rank_value(item) for item in csv_list(text)]


def memory_map(text: str) -> dict[Union[int, str], str]:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` → ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`` (accelerate's ``max_memory``)."""
    result: dict[Union[int, str], str] = {}
    for part in csv_list(text):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE pairs such as 0=70GiB,cpu=200GiB, got {part!r}")
        device = device.strip()
        result[int(device) if device.isdigit() else device] = size.strip()
    return result


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


# Shared option groups
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description/epilog layout; does not repeat defaults the help text already states."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def new_command(
    subparsers: Any, name: str, *, summary: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
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
        "--config",
        metavar="FILE",
        default=None,
        help="YAML or JSON file of option defaults (keys are option names, e.g. max_rank); flags override it.",
    )
    group.add_argument(
        "--json", action=argparse.BooleanOptionalAction, default=False, help="Print the result as JSON on stdout."
    )
    group.add_argument(
        "--debug", action=argparse.BooleanOptionalAction, default=False, help="Show tracebacks on errors."
    )
    group.add_argument("-v", "--verbose", action="count", default=0, help="More logging (repeat for more).")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=False, help="Only errors on stderr; no progress bars."
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Show progress bars on stderr (default: on).",
    )


def add_model_options(parser: argparse.ArgumentParser, *, task: bool = True, model_help: Optional[str] = None) -> None:
    """``--model``, ``--gguf-file``, ``--tokenizer``, ``--device``, ``--dtype``, ``--device-map`` (+ ``--max-memory``,
    ``--offload-folder``) and ``--task``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        metavar="ID_OR_PATH",
        help=model_help
        or "Hub id, local folder or .gguf file of the base model "
        "(default: the embedded SmolLM2-135M-Instruct, or the adapter's base model).",
    )
    group.add_argument(
        "--gguf-file", default=None, metavar="NAME", help="GGUF file inside --model (a folder or Hub repo)."
    )
    group.add_argument(
        "--tokenizer", default=None, metavar="ID_OR_PATH", help="Tokenizer to use instead of the model's own."
    )
    group.add_argument(
        "--device",
        default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps, ... (default: auto).",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="Weights dtype (default: auto = as saved).",
    )
    group.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="Place the model with accelerate instead of --device: auto (the GPUs, then the CPU, then --offload-folder on "
        "disk), balanced, sequential, or a device (cpu, cuda:1). Adapters load onto GPUs and the CPU only.",
    )
    group.add_argument(
        "--max-memory",
        type=memory_map,
        default=None,
        metavar="DEV=SIZE,...",
        help="Memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB.",
    )
    group.add_argument(
        "--offload-folder", default=None, metavar="DIR", help="Where --device-map puts what fits nowhere else."
    )
    if task:
        group.add_argument(
            "--task",
            default="causal-lm",
            choices=["causal-lm", "sequence-classification"],
            help="Model head (default: causal-lm).",
        )


def add_adapter_creation_options(parser: argparse.ArgumentParser, *, title: str = "NSN adapter") -> None:
    """Options of ``NSNConfig`` used by ``adapt`` and by commands that adapt a plain model on the fly."""
    group = parser.add_argument_group(title)
    group.add_argument(
        "--max-rank",
        type=max_rank_value,
        default=None,
        help="Max rank per layer, or 'break-even' (factors no bigger than the dense weight; default: full rank, exact).",
    )
    group.add_argument(
        "--max-params-fraction",
        type=unit_fraction,
        default=None,
        metavar="F",
        help="Instead of --max-rank: each layer's factors hold at most this fraction of its dense parameters.",
    )
    group.add_argument(
        "--target-modules",
        type=module_list,
        default=None,
        metavar="NAMES",
        help="Comma-separated module names (q_proj,v_proj), 'all-linear' (default) or 're:<regex>'.",
    )
    group.add_argument(
        "--exclude-modules", type=module_list, default=None, metavar="NAMES", help="Modules never adapted."
    )
    group.add_argument(
        "--init",
        default=None,
        choices=["svd", "whitened", "projected"],
        help="Factor initialisation: svd (weights only), whitened or projected (need --stats). "
        "Default: the rank plan's init with --rank-plan, else whitened with --stats, else svd.",
    )
    group.add_argument(
        "--stats", default=None, metavar="DIR", help="Activation statistics folder (from `nsn-peft calibrate`)."
    )
    group.add_argument(
        "--rank-plan",
        default=None,
        metavar="JSON",
        help="Rank plan JSON (from `nsn-peft search-ranks`): sets the layers, their ranks and the init.",
    )
    group.add_argument("--granularity", type=positive_int, default=None, help="Rank grid step (default: 64).")
    group.add_argument(
        "--energy-input", type=unit_fraction, default=None, help="Input-subspace energy kept (projected init)."
    )
    group.add_argument(
        "--energy-output", type=unit_fraction, default=None, help="Output-subspace energy kept (projected init)."
    )
    group.add_argument("--init-device", default=None, help="Device to decompose on (e.g. cuda for a CPU model).")


def add_serving_options(parser: argparse.ArgumentParser) -> None:
    """``--keep-base-weights``: inference commands serve from the factors only unless asked otherwise."""
    parser.add_argument(
        "--keep-base-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Keep the dense weights of adapted layers beside the factors (default: factors only, except while "
        "eval/sweep compute their dense baseline, which needs them).",
    )


def add_data_options(
    parser: argparse.ArgumentParser, *, required: bool = True, seq_len: int = 512, max_tokens: Optional[int] = 65536
) -> None:
    """``--data`` and how it is read and cut into blocks."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="Text source: a .txt/.md/.rst/.jsonl file, a folder of text files, or a datasets name "
        "(e.g. wikitext:wikitext-2-raw-v1)." + ("" if required else " Optional."),
    )
    group.add_argument("--split", default=None, help="Split of a datasets source (default: train).")
    group.add_argument("--text-field", default="text", help="Text field of JSONL/datasets records (default: text).")
    group.add_argument("--max-docs", type=positive_int, default=None, help="Read at most this many documents.")
    group.add_argument(
        "--max-tokens", type=positive_int, default=max_tokens, help=f"Token budget (default: {max_tokens})."
    )
    group.add_argument(
        "--seq-len", type=positive_int, default=seq_len, help=f"Tokens per sequence (default: {seq_len})."
    )
    group.add_argument("--batch-size", type=positive_int, default=4, help="Sequences per forward pass (default: 4).")


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action=argparse.BooleanOptionalAction, default=False, help="Replace an existing output."
    )


def required(args: argparse.Namespace, *names: str) -> None:
    """Usage error naming the first of ``names`` that is unset (argparse ``required=`` is not used so that
    required options can come from ``--config``)."""
    missing = [n for n in names if getattr(args, n, None) in (None, "", [])]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise UsageError(f"the following arguments are required: {flags}")


# Config files: YAML/JSON mappings of option defaults, placed before the user's flags so flags win
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
        if action.option_strings
        and action.dest not in ("help", "config")
        and not isinstance(action, argparse._HelpAction)
    }


def config_to_argv(
    parser: argparse.ArgumentParser,
    config: Mapping[str, Any],
    command: str,
    commands: Iterable[str],
    source: str = "config file",
) -> list[str]:
    """Turn a config mapping into option tokens placed *before* the user's flags (so flags override).

    Keys are option dests (``max_rank``; ``max-rank`` is accepted too). A file whose top-level keys are
    subcommand names holds one section per command (a section named after no command is an error that names
    it). Lists become comma-separated values.
    """
    import difflib

    commands = set(commands)
    sections = [key for key, value in config.items() if isinstance(value, Mapping)]
    if sections and (any(key in commands for key in sections) or len(sections) == len(config)):
        unknown = [str(key) for key in config if key not in commands]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(commands), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(
                f"{source}: section '{unknown[0]}' is not a command{hint} (commands: {', '.join(sorted(commands))})"
            )
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
            close = difflib.get_close_matches(key, sorted(actions), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"unknown key '{raw_key}' in {source}{hint} (valid keys for '{command}': {known})")
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
