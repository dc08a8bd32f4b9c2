"""The option vocabulary every command shares: one definition per option, so the same flag has
the same name, default and help everywhere (tests/test_cli_vocabulary.py holds them to it).

Flags carry an empty metavar: Typer would print `<bool>` after `--json`, which says nothing.
Fixed choices are `Literal` types, so --help lists them and a wrong one is a one-line usage error.
"""
from __future__ import annotations

from typing import Literal

import typer

from coopt_fast.scores import SCORES

AutoYesNo = Literal["auto", "yes", "no"]
Decoder = Literal["auto", "dali", "torchvision"]
OnBadImage = Literal["fail", "skip"]
TargetDtype = Literal["float16", "bfloat16", "int8", "int8-dim"]
Method = Literal["byol", "simclr", "supervised"]
Score = Literal[tuple(SCORES)]  # type: ignore[valid-type]  (the names in coopt_fast.scores)

DEVICE_HELP = "auto (cuda if present), cpu, cuda, cuda:N"


def flag(name: str, help: str, *, default: bool = False) -> typer.models.OptionInfo:
    return typer.Option(default, name, help=help, metavar="")


def json_flag() -> typer.models.OptionInfo:
    return flag("--json", "print a JSON summary on stdout (tables and progress go to stderr)")


def quiet_flag() -> typer.models.OptionInfo:
    return flag("--quiet", "no progress (bars on a terminal, periodic lines elsewhere)")


def device(what: str = "") -> typer.models.OptionInfo:
    return typer.Option("auto", "--device", help=DEVICE_HELP + (f"; {what}" if what else ""), metavar="DEVICE")


def compile_flag() -> typer.models.OptionInfo:
    # None = auto: on the CPU, Inductor's compile time exceeds what it saves at these sizes.
    return typer.Option(None, "--compile/--no-compile", metavar="", show_default=False,
                        help="torch.compile the model; default: on CUDA only")


def out(help: str, default: str | None = None) -> typer.models.OptionInfo:
    return typer.Option(... if default is None else default, "-o", "--out", help=help, metavar="PATH")


def seed(help: str, default: int = 0) -> typer.models.OptionInfo:
    return typer.Option(default, "--seed", help=f"seeds {help}", metavar="INT")


def limit(what: str = "", name: str = "--limit") -> typer.models.OptionInfo:
    return typer.Option(None, name, help=f"use the first N samples{' of ' + what if what else ''} only (default: all)",
                        metavar="N")


def batch_size(default: int, what: str = "") -> typer.models.OptionInfo:
    return typer.Option(default, "--batch-size", help=what or "samples per batch", metavar="N")


