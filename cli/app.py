"""The Typer app and the two habits every command shares: one-line errors, --json output."""
from __future__ import annotations

import functools
import math
import os
import json
import sys

import numpy as np

import typer
from rich.console import Console

from coopt_fast.errors import CooptError, DiskFullError, is_disk_full

app = typer.Typer(
    help="coopt-fast: collaborative data optimization (COOPT) — split a data set among participants, "
    "turn each shard into targets with a prior model, align, merge, and train a student on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Tables and progress go to stderr so that `--json` leaves stdout machine-readable.
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from coopt_fast import __version__

        print(f"coopt-fast {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="print the version and exit")) -> None:
    """coopt-fast: collaborative data optimization (COOPT) — split a data set among participants,
    turn each shard into targets with a prior model, align, merge, and train a student on them."""


def _quiet_disk_full(unraisable, _default=sys.unraisablehook):
    """After a failed write h5py's objects fail again as they are garbage-collected ("Exception
    ignored in ObjectID.__dealloc__"); the one-line DiskFullError already said it all."""
    if unraisable.exc_value is not None and is_disk_full(unraisable.exc_value):
        return
    _default(unraisable)


sys.unraisablehook = _quiet_disk_full


def command(fn):
    """Register `fn` as a command; a CooptError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiskFullError as e:
            # After a failed write HDF5 keeps dirty metadata it cannot flush, and its exit-time
            # cleanup then crashes (seen: SIGSEGV). The partial file stays for a rerun once
            # there is space; leave without that cleanup.
            print(f"error: {e}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        except CooptError as e:  # WaitingError: "waiting: ...", exit 75 (try again later)
            print(f"{'waiting' if getattr(e, 'exit_code', 2) == 75 else 'error'}: {e}", file=sys.stderr)
            raise typer.Exit(getattr(e, "exit_code", 2))
        except OSError as e:
            # Disk full (ENOSPC), file size limit (EFBIG), permissions: one line, not a traceback.
            # Finished files are never touched; a resumable command's NAME.partial stays for the rerun.
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if is_disk_full(e):
                msg = f"disk full or file size limit reached while writing ({msg[:200]})"
            print(f"error: {msg}", file=sys.stderr)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume", file=sys.stderr)
            raise typer.Exit(130)

    return app.command()(wrapper)


def emit(summary: dict, as_json: bool, table=None) -> None:
    """--json: the summary on stdout; otherwise the rich table (if any) on stderr. The summary's
    "warnings" go to stderr, one line each, either way."""
    for w in summary.get("warnings") or []:
        print(f"warning: {w}", file=sys.stderr)
    if as_json:  # allow_nan=False: a bare NaN/Infinity is not JSON, and strict parsers reject the whole output
        print(json.dumps(_finite(summary), indent=2, default=str, allow_nan=False))
    elif table is not None:
        console.print(table)


def _finite(v):
    """A summary as plain JSON values: numpy scalars and arrays unwrapped, NaN and +-Inf as null
    (a uniformity of one row of S, a residual of an exact fit, ...)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (np.ndarray, np.generic)):
        return _finite(v.tolist())
    return None if isinstance(v, float) and not math.isfinite(v) else v
