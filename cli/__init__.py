"""`coopt-fast` command line: one thin module per command over the coopt_fast library."""
from .app import app
from . import split, extract, score, align, merge, inspect, verify, status, demo  # noqa: F401  (each registers its command)
from . import pretrain, train, probe  # noqa: F401


def main() -> None:
    """The `coopt-fast` entry point (usage errors: one line and exit 2, see app._OneLineUsageErrors)."""
    app(prog_name="coopt-fast")
