"""The data-side commands through Typer's CliRunner: exit codes, --json, one-line errors."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from coopt_fast.cli import app

from .conftest import requires_fmnist

pytestmark = requires_fmnist
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_every_command():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("split", "extract", "score", "align", "merge", "inspect"):
        assert cmd in r.output
    r = invoke("extract", "--help")
    assert r.exit_code == 0 and "resumes" in r.output


def test_pipeline_through_the_cli(tmp_path):
    run = tmp_path / "run"
    r = invoke("split", "fashion-mnist", "--out", run, "-k", "2", "--limit", "300", "--shared-fraction", "0.2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shard_sizes"] == [150, 150]
    for k, prior in enumerate(("labels", "convnet")):
        r = invoke("extract", run, "--participant", f"p{k}", "--shard", k, "--prior", prior, "--quiet", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["rows"] == 150
    r = invoke("score", run, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["picks"]["uniformity"] == "p0"  # one-hot labels win raw U
    best = json.loads(r.stdout)["best"]
    r = invoke("align", run, "--dim", "16", "--reference", "best", "--quiet", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["reference"] == best, r.output
    r = invoke("align", run, "--dim", "16", "--quiet", "--json", "--force")  # the default: everyone fitted to the consensus
    assert r.exit_code == 0 and json.loads(r.stdout)["reference"] == "consensus", r.output
    r = invoke("merge", run, "--quiet", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == 300
    r = invoke("inspect", run, "--json", "--no-plot")
    assert r.exit_code == 0 and set(json.loads(r.stdout)["inconsistency"]) == {"before", "after"}


@pytest.mark.parametrize("args, msg", [
    (("split", "nope", "--out", "{tmp}/r"), "unknown dataset spec"),
    (("split", "fashion-mnist", "--out", "{tmp}/r", "--sizes", "1,x"), "--sizes"),
    (("extract", "{tmp}/missing", "--participant", "a", "--shard", "0", "--prior", "convnet"), "no plan"),
    (("align", "{tmp}/missing"), "no plan"),
    (("merge", "{tmp}/missing"), "no plan"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, msg):
    r = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.stderr
    assert not (tmp_path / "r").exists()


def _cli(*args, env=None):
    """coopt-fast in a fresh process (the real entry point, not CliRunner)."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "coopt_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, msg", [
    (("align",), "Missing argument 'run'"),
    (("align", "x", "--dim", "abc"), "Invalid value for '--dim'"),
    (("nosuch",), "No such command 'nosuch'"),
    (("split", "fashion-mnist", "--out", "x", "--no-such-option"), "No such option"),
])
def test_usage_errors_are_one_line_and_exit_2(args, msg):
    r = _cli(*args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert msg in r.stderr and "--help" in r.stderr and r.stdout == ""


def test_version_and_a_run_one_level_down(tmp_path):
    import coopt_fast

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"coopt-fast {coopt_fast.__version__}"
    coopt_fast.split("fashion-mnist", tmp_path / "demo" / "run", participants=2, limit=50)
    r = _cli("status", tmp_path / "demo")
    assert r.returncode == 2 and f"{tmp_path / 'demo' / 'run'} holds a run" in r.stderr, r.stderr


def test_progress_lines_without_a_terminal(tmp_path):
    """Under CI, nohup or a pipe (stderr not a terminal): plain lines with rate and ETA."""
    run = tmp_path / "run"
    import coopt_fast

    coopt_fast.split("fashion-mnist", run, participants=2, limit=400)
    r = _cli("extract", run, "--participant", "a", "--shard", 0, "--prior", "convnet", "--batch-size", 20,
             env={"COOPT_PROGRESS": "", "COOPT_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("a shard: ")]
    assert len(lines) >= 5 and lines[-1].startswith("a shard: 200/200 (100%)"), r.stderr
    assert "img/s" in lines[0] and "ETA" in lines[1]
    assert "\x1b[" not in r.stderr  # no terminal control codes
    r = _cli("extract", run, "--participant", "b", "--shard", 1, "--prior", "labels",
             env={"COOPT_PROGRESS": "0", "COOPT_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0 and "shard:" not in r.stderr


def test_help_version_and_status_do_not_import_torch(tmp_path):
    """What keeps `--help`, `--version` and `status` fast (bench/bench_startup.py measures it):
    none of them imports torch. Structural, not timed: a module-level `import torch` anywhere on
    the CLI's import path fails it."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom coopt_fast.cli.app import app\nimport coopt_fast.cli\n"
            "for args in (['--help'], ['--version'], ['status', sys.argv[1]], ['score', '--help'], ['train', '--help']):\n"
            "    CliRunner().invoke(app, args)\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'h5py', 'triton') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch" not in r.stdout.split("[")[-1], r.stdout
