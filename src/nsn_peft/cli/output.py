"""What a command returns and how it is printed: text tables on stdout, or JSON with ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass
class CommandResult:
    """What a subcommand returns: ``data`` is printed as JSON with ``--json``, ``text`` otherwise."""

    data: dict[str, Any]
    text: str = ""
    exit_code: int = 0
    printed: bool = True  # False: nothing on stdout (e.g. the other processes of a data-parallel run)


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


def clip_rows(rows: Sequence[Sequence[Any]], limit: int = 12) -> tuple[list[Sequence[Any]], str]:
    """At most ``limit`` rows of a long table, and a line saying how many were left out (``""`` if none)."""
    rows = list(rows)
    if len(rows) <= limit:
        return rows, ""
    return rows[:limit], f"... {len(rows) - limit} more rows (--json lists them all)"


def emit(args: argparse.Namespace, result: CommandResult) -> None:
    """Print ``result`` as JSON (``--json``) or as text on stdout."""
    if not result.printed:
        return
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
