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
from rich.table import Table
from typer.core import TyperGroup

from coopt_fast.errors import CooptError, DiskFullError, is_disk_full

class _OneLineUsageErrors(TyperGroup):
    """A usage error (unknown command or option, a bad choice, a missing or unparsable value) is
    one line, `error: ...`, and exit 2, like every other refusal: in the console script and under
    CliRunner alike (Typer would print a boxed panel with the usage)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except Exception as e:  # click's UsageError family (Typer vendors click: matched by its interface)
            if not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)):
                raise
            ctx = getattr(e, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            print(f"error: {e.format_message()}{where}", file=sys.stderr)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
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
                                       help="print the version and exit", metavar="")) -> None:
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


def kv_table(title: str, summary: dict, keys, fmt: str = ".4g") -> Table:
    """A two-column key/value table without the empty header row a headerless Table prints."""
    t = Table(title=title, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k in keys:
        v = summary[k]
        t.add_row(k, f"{v:{fmt}}" if isinstance(v, float) else str(v))
    return t


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


def synopsis(name: str) -> str:
    """`coopt-fast NAME ARGS [--option VALUE] ...` built from the command's own parameters: the
    README's command table holds these lines, and tests/test_cli_vocabulary.py checks they match."""
    import typer.main

    words = [f"coopt-fast {name}"]
    for p in typer.main.get_command(app).commands[name].params:
        if p.param_type_name == "argument":  # Typer's own parameter classes: matched by interface
            words.append(p.name.upper())
            continue
        if p.name == "help":
            continue
        opt = max(p.opts, key=len)
        if p.is_flag:
            w = f"{opt}/{max(p.secondary_opts, key=len)}" if p.secondary_opts else opt
        else:
            d = p.type_descriptor
            w = f"{opt} {'|'.join(map(str, d.choices)) if d.is_choice else (p.metavar or p.name.upper())}"
        words.append(w if p.required else f"[{w}]")
    return " ".join(words)
