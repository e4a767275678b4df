"""Process setup for a command: logging verbosity, Python warnings, progress bars."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any

from .options import PROG


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

        (
            transformers.utils.logging.enable_progress_bar
            if enabled
            else transformers.utils.logging.disable_progress_bar
        )()
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


# Set by a command that tore down a gloo process group (``train`` under torchrun on CPUs): gloo's C++ worker
# threads can abort the process (SIGABRT) during interpreter finalization, after all the work is done and
# saved, and torchrun would then report the run as failed. The console entry point then exits without
# finalization.
_EXIT_WITHOUT_FINALIZATION = {"requested": False}


def exit_without_finalization(requested: bool = True) -> None:
    _EXIT_WITHOUT_FINALIZATION["requested"] = requested


def exit_without_finalization_requested() -> bool:
    return _EXIT_WITHOUT_FINALIZATION["requested"]
