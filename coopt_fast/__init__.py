"""coopt-fast: collaborative data optimization (COOPT) as a feature store with compiled kernels.

The steps, each a function of the same name as its `coopt-fast` command:
split -> extract -> score -> align -> merge -> inspect (data side), then
pretrain (priors and SSL baselines), train (the student), probe (evaluation).
"""
from .align import align
from .diagnostics import inspect
from .evaluate import probe
from .errors import CooptError
from .extract import extract
from .merge import merge
from .plan import split
from .ranking import score
from .ssl import pretrain
from .status import status
from .student import train
from .verify import verify

__all__ = ["split", "extract", "score", "align", "merge", "inspect", "status", "verify",
           "pretrain", "train", "probe", "CooptError"]
__version__ = "0.1.0"
