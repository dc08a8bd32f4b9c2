"""coopt-fast: collaborative data optimization (COOPT) as a feature store with compiled kernels.

The steps, each a function of the same name as its `coopt-fast` command:
split -> extract -> score -> align -> merge -> inspect (data side).
"""
from .align import align, score
from .diagnostics import inspect
from .errors import CooptError
from .extract import extract
from .merge import merge
from .plan import split

__all__ = ["split", "extract", "score", "align", "merge", "inspect", "CooptError"]
__version__ = "0.1.0"
