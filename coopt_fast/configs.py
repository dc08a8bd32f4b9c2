"""The options of train, pretrain and probe as dataclasses, apart from the code that runs them:
the CLI takes its defaults from here without importing torch (`coopt-fast --help` stays fast).
Each is re-exported by its module (coopt_fast.student.TrainConfig, ...)."""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass


def options_of(config, positional: tuple[str, ...]):
    """Decorator: `fn(*positional, **options)` that builds `config` shows the config's fields as its
    own parameters (help(), inspect.signature, IDEs): the defaults live once, in the dataclass."""
    def wrap(fn):
        params = []
        for f in dataclasses.fields(config):
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name in positional else inspect.Parameter.KEYWORD_ONLY
            default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
            params.append(inspect.Parameter(f.name, kind, default=default, annotation=f.type))
        params.sort(key=lambda p: (p.kind, positional.index(p.name) if p.name in positional else 0))
        fn.__signature__ = inspect.Signature(params, return_annotation="dict")
        return fn
    return wrap


@dataclass
class TrainConfig:
    run: str
    student: str = "convnet"
    epochs: int = 10
    out: str = "student"
    batch_size: int = 128
    lr: float = 1e-3
    wd: float = 0.01
    seed: int = 0
    resume: bool = False
    force: bool = False              # start over in an OUT that holds a run (without it: refused)
    device: str = "auto"
    compile: bool | None = None      # None: on CUDA only; True: anywhere
    store_on_device: bool | None = None  # the merged store in device memory (StoreLoader resident); None: if it fits
    max_seconds: float | None = None  # wall-clock budget of this call; stop after the step that exceeds it
    max_steps: int | None = None      # stop after this many optimizer steps in all (smoke runs, tests)
    input_size: int | None = None     # None: default_input_size
    crop_scale: tuple = (0.25, 1.0)   # milder than ImageNet's 0.08: the target describes the whole image
    snapshots: int = 0                # N copies of the backbone at evenly spaced points (OUT/snapshots/)
    progress: bool = True


@dataclass
class PretrainConfig:
    dataset: str
    method: str = "byol"
    arch: str = "convnet"
    epochs: int = 10
    out: str = "prior.pt"
    batch_size: int = 256
    lr: float = 1e-3
    wd: float | None = None           # None: 0.01 supervised, 1e-4 byol/simclr
    labeled_fraction: float = 1.0     # supervised only
    seed: int = 0
    limit: int | None = None          # first N samples of the data set
    input_size: int | None = None     # None: convnet -> image side rounded up to 32; else priors default
    max_seconds: float | None = None  # wall-clock budget of this call (schedule anneals within it)
    max_steps: int | None = None
    resume: bool = False
    force: bool = False               # start over in an OUT that holds a run
    device: str = "auto"
    compile: bool | None = None       # None: on CUDA only; True: anywhere
    progress: bool = True
    tau_base: float = 0.99            # BYOL
    temperature: float = 0.2          # SimCLR
    proj_hidden: int | None = None    # projector/predictor hidden width; None: 4096 byol, 2048 simclr
    proj_dim: int = 256               # projector output
    snapshots: int = 0                # N copies of the backbone at evenly spaced points: OUT.snapK.<ext>


@dataclass
class ProbeConfig:
    batch_size: int = 256       # feature extraction
    epochs: int = 100           # linear probe
    lr: float = 0.1
    probe_batch: int = 512
    min_steps: int = 1000       # small train sets: more epochs, so the probe itself is not undertrained
    k: int = 20
    temperature: float = 0.07
    seed: int = 0
