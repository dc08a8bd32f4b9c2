"""The library's shape: its longest functions and widest signatures, against the limits the team
reads to (README "Architecture"): no function in coopt_fast/ over MAX_LINES lines or with more than
MAX_PARAMS parameters. A command's public entry point (the function the CLI's Typer options map
onto, one keyword per option; and the loader's constructor) is exempt from the parameter limit: its
options are its interface.

    python bench/code_shape.py            # the table; exit 1 if a limit is broken
    python bench/code_shape.py --top 20
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES, MAX_PARAMS = 60, 8
# Public entry points whose keywords mirror a command's options (coopt_fast/__init__.py exports them).
# StoreLoader's constructor: its keywords are the loader's options (what `train` and users pass).
ENTRY_POINTS = {"split", "extract", "align", "merge", "inspect", "train", "pretrain", "probe", "demo", "score",
                "StoreLoader.__init__"}


def functions(root: Path):
    """(file, qualified name, lines without the docstring, parameters) of every function under root."""
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = child.args
                    params = [p for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                    lines = child.end_lineno - child.lineno + 1
                    body0 = child.body[0]  # a docstring documents; the limit is on the code
                    if isinstance(body0, ast.Expr) and isinstance(getattr(body0, "value", None), ast.Constant) \
                            and isinstance(body0.value.value, str):
                        lines -= body0.end_lineno - body0.lineno + 1
                    yield path.relative_to(ROOT), prefix + child.name, lines, len(params)
                    stack.append((child, prefix + child.name + "."))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, prefix + child.name + "."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--root", default=str(ROOT / "coopt_fast"))
    args = ap.parse_args()
    fns = list(functions(Path(args.root)))
    broken = [f for f in fns if f[2] > MAX_LINES or (f[3] > MAX_PARAMS and f[1] not in ENTRY_POINTS)]
    for title, key in (("longest functions", 2), ("widest signatures", 3)):
        print(f"{title} (limit {MAX_LINES if key == 2 else MAX_PARAMS}):")
        for path, name, lines, params in sorted(fns, key=lambda f: -f[key])[: args.top]:
            mark = " *" if (path, name, lines, params) in broken else ""
            print(f"  {lines:4d} lines {params:3d} params  {path}:{name}{mark}")
    print(f"{len(fns)} functions; {len(broken)} over a limit" + (" (marked *)" if broken else ""))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
