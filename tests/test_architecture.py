"""The file list is the architecture: README's "Architecture" names every module, and the
library keeps to the limits bench/code_shape.py checks (no function over 60 lines or with more
than 8 parameters, a command's option list aside)."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _architecture_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Architecture", 1)[1]
    return section.split("```", 2)[1]


def test_readme_architecture_names_every_module():
    block = _architecture_block()
    named = set(re.findall(r"\b(\w+)\.py\b", block.split("\ncli/", 1)[0]))  # the library and kernels
    modules = {p.stem for p in (ROOT / "coopt_fast").glob("*.py")} - {"__init__", "__main__"}
    kernels = {p.stem for p in (ROOT / "kernels").glob("*.py")} - {"__init__"}
    assert modules - named == set(), "modules missing from README Architecture"
    assert kernels - named == set(), "kernel modules missing from README Architecture"
    assert named - modules - kernels - {"harness", "paper"} == set(), "README names modules that do not exist"


def test_library_functions_within_limits(capsys):
    spec = importlib.util.spec_from_file_location("code_shape", ROOT / "bench" / "code_shape.py")
    shape = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shape)
    fns = list(shape.functions(ROOT / "coopt_fast"))
    over = [f for f in fns if f[2] > shape.MAX_LINES or (f[3] > shape.MAX_PARAMS and f[1] not in shape.ENTRY_POINTS)]
    assert len(fns) > 200 and not over, over
