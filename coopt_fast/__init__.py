"""coopt-fast: collaborative data optimization (COOPT) as a feature store with compiled kernels.

The steps, each a function of the same name as its `coopt-fast` command:
split -> extract -> score -> align -> merge -> inspect (data side), then
pretrain (priors and SSL baselines), train (the student), probe (evaluation).
"""
import sys
import types
from importlib import import_module

from .errors import CooptError

# Each step's module is imported when the step is first used: `import coopt_fast` (and so
# `coopt-fast --help` or `status`) must not pay for torch and torchvision.
_STEPS = {"split": "plan", "extract": "extract", "score": "ranking", "align": "align", "merge": "merge",
          "inspect": "diagnostics", "status": "status", "verify": "verify", "pretrain": "ssl", "train": "student",
          "probe": "evaluate", "demo": "demo",
          # the options of train, pretrain, probe and demo as dataclasses (torch-free modules)
          "TrainConfig": "configs", "PretrainConfig": "configs", "ProbeConfig": "configs", "DemoConfig": "demo"}

__all__ = ["split", "extract", "score", "align", "merge", "inspect", "status", "verify",
           "pretrain", "train", "probe", "demo", "TrainConfig", "PretrainConfig", "ProbeConfig", "DemoConfig",
           "CooptError"]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """Five steps share their module's name (extract, align, merge, status, verify). Importing a
    submodule sets it as an attribute of the package; here that name stays the step's function
    (the module is sys.modules["coopt_fast.NAME"], what importlib.import_module returns)."""

    def __setattr__(self, name, value):
        if name in _STEPS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _STEPS:
        fn = getattr(import_module(f".{_STEPS[name]}", __name__), name)
        globals()[name] = fn  # once bound, later lookups do not come here
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_STEPS))
