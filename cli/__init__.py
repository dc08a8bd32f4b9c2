"""`coopt-fast` command line: one thin module per command over the coopt_fast library."""
from .app import app
from . import split, extract, score, align, merge, inspect, verify, status, demo  # noqa: F401  (each registers its command)
from . import pretrain, train, probe  # noqa: F401


def main() -> None:
    """The `coopt-fast` entry point. A usage error (unknown command or option, a missing or
    unparsable value) is one line, `error: ...`, and exit 2, like every other refusal."""
    import sys

    try:
        code = app(standalone_mode=False, prog_name="coopt-fast")
    except Exception as e:  # click's UsageError family (Typer vendors click: matched by its interface)
        if not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)):
            raise
        ctx = getattr(e, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        print(f"error: {e.format_message()}{where}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
