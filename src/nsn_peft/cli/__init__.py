"""``nsn-peft``: the NSN pipeline from a shell (also ``python -m nsn_peft``).

Subcommands: ``adapt``, ``calibrate``, ``search-ranks``, ``compress``, ``train``, ``eval``, ``sweep``,
``infer``, ``info``, ``fetch-model``, ``fetch-tasks``. Run ``nsn-peft <command> --help`` for the options and an example of each.

Exit codes: 0 success; 2 usage error (bad option value, missing input file, unknown config key); 1 failure
while running. Errors are one line on stderr (``nsn-peft <command>: error: ...``); ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Optional

from .inputs import fetch_hub_references
from .options import PROG, UsageError, config_to_argv, load_config_file
from .output import CommandResult, emit, one_line
from .runtime import exit_without_finalization_requested, setup_runtime

__all__ = ["build_parser", "main"]

logger = logging.getLogger("nsn_peft.cli")

_EPILOG = f"""\
examples:
  {PROG} adapt --model ./my-model --max-rank 256 --output ./nsn-adapter
  {PROG} eval --adapter ./nsn-adapter --data ./valid.txt --ranks 64,128,full
  {PROG} infer --target-flops 0.5 --prompt "Low-rank models are"

Exit codes: 0 ok, 2 usage error (bad option value, missing input), 1 failure while running.
Run '{PROG} <command> --help' for the options of each command.
"""


def _command_modules():
    from . import adapt, calibrate, compress, evaluate, fetch, infer, info, search, sweep, train

    return [adapt, calibrate, search, compress, train, evaluate, sweep, infer, info, fetch]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and ``{command: subparser}``."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Nested Subspace Networks for Hugging Face models: adapt a model once, run it at any rank.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands: dict[str, argparse.ArgumentParser] = {}
    for module in _command_modules():
        commands.update(module.register(subparsers))
    return parser, commands


def _run(args: argparse.Namespace) -> CommandResult:
    # Libraries print (e.g. Trainer's log dicts): keep stdout for the result, so --json output stays parseable.
    with contextlib.redirect_stdout(sys.stderr):
        fetch_hub_references(args)
        return args.func(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nsn-peft``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()

    def parse(tokens: list[str]) -> argparse.Namespace:
        args, extras = parser.parse_known_args(tokens)
        if extras:  # reported by the subcommand's parser, so the message names the command
            owner = commands.get(getattr(args, "command", None) or "", parser)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return args

    try:
        args = parse(argv)
    except SystemExit as exit_:  # argparse: --help / --version (0) or a usage error (2)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    sub = commands[args.command]
    try:
        if args.config:
            tokens = config_to_argv(
                sub, load_config_file(args.config), args.command, commands, source=f"config file {args.config}"
            )
            index = argv.index(args.command)
            args = parse(argv[: index + 1] + tokens + argv[index + 1 :])
    except UsageError as err:
        sub.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG} {args.command}: error: {one_line(str(err))}\n")
        return 2
    except SystemExit as exit_:
        return int(exit_.code or 0)
    setup_runtime(args)
    try:
        result = _run(args)
        emit(args, result)
        return result.exit_code
    except UsageError as err:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"{PROG} {args.command}: error: {one_line(str(err))}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG} {args.command}: interrupted\n")
        return 130
    except Exception as err:  # noqa: BLE001 - every runtime failure becomes one line + exit 1
        if args.debug:
            traceback.print_exc()
        message = one_line(str(err)) or type(err).__name__
        if isinstance(err, (MemoryError,)) or type(err).__name__ == "OutOfMemoryError":
            message = f"out of memory: {message}"
        sys.stderr.write(f"{PROG} {args.command}: error: {message}\n")
        return 1


def console_main() -> None:
    """The ``nsn-peft`` console script: :func:`main`, then exit with its code.

    After a command that tore down a gloo process group it leaves without interpreter finalization (see
    :func:`nsn_peft.cli.runtime.exit_without_finalization`), once every stream and log handler is flushed.
    """
    code = main()
    if exit_without_finalization_requested():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
