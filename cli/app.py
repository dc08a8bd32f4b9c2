"""The Typer app and the two habits every command shares: one-line errors, --json output."""
from __future__ import annotations

import functools
import json
import sys

import typer
from rich.console import Console

from coopt_fast.errors import CooptError

app = typer.Typer(
    help="coopt-fast: collaborative data optimization (COOPT) — split a data set among participants, "
    "turn each shard into targets with a prior model, align, merge, and train a student on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Tables and progress go to stderr so that `--json` leaves stdout machine-readable.
console = Console(stderr=True)


def command(fn):
    """Register `fn` as a command; a CooptError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CooptError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume", file=sys.stderr)
            raise typer.Exit(130)

    return app.command()(wrapper)


def emit(summary: dict, as_json: bool, table=None) -> None:
    """--json: the summary on stdout; otherwise the rich table (if any) on stderr."""
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    elif table is not None:
        console.print(table)
