"""probe: linear and kNN on separable data, the whole probe on images, and the three CLI commands."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from coopt_fast.cli import app
from coopt_fast.errors import CooptError
from coopt_fast.evaluate import ProbeConfig, knn_accuracy, linear_probe, probe
from coopt_fast.priors import build_backbone

from .conftest import requires_fmnist
from .conftest_student import merged_run  # noqa: F401  (fixture)

runner = CliRunner()


def blobs(n, d=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 5
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, d, generator=g), y


def test_linear_and_knn_on_separable_features():
    xtr, ytr = blobs(300)
    xte, yte = blobs(150, seed=1)
    cfg = ProbeConfig(epochs=50, min_steps=100)
    assert linear_probe(xtr, ytr, xte, yte, 3, cfg) >= 0.99
    assert knn_accuracy(xtr, ytr, xte, yte, 3) >= 0.99
    # chance level when labels carry no information
    shuffled = ytr[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    assert linear_probe(xtr, shuffled, xte, yte, 3, cfg) < 0.6


def test_knn_votes_are_weighted_by_similarity():
    # one very close neighbour of class 1 outvotes two distant ones of class 0 (exp(sim / 0.07))
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.02]])
    assert knn_accuracy(train, labels, query, torch.tensor([1]), 2, k=3) == 1.0
    # with a huge temperature the vote is a plain majority
    assert knn_accuracy(train, labels, query, torch.tensor([0]), 2, k=3, temperature=1e6) == 1.0


def _separable_npy(tmp_path, n, seed):
    """Three classes of 8x8 images: dark, bright, vertical stripes (plus noise)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    base = np.stack([np.full((8, 8), 30), np.full((8, 8), 220), np.tile([0, 255], (8, 4))])[y]
    x = np.clip(base + rng.integers(-20, 21, size=(n, 8, 8)), 0, 255).astype(np.uint8)
    np.save(tmp_path / f"x{seed}.npy", x)
    np.save(tmp_path / f"y{seed}.npy", y)
    return f"npy:{tmp_path / f'x{seed}.npy'},{tmp_path / f'y{seed}.npy'}"


def test_probe_reaches_high_accuracy_on_a_trivially_separable_set(tmp_path):
    train, test = _separable_npy(tmp_path, 60, 0), _separable_npy(tmp_path, 30, 1)
    s = probe("convnet", train, test, progress=False, min_steps=200)  # a random convnet already separates these
    assert s["probe_accuracy"] >= 0.95 and s["knn_accuracy"] >= 0.95, s
    assert (s["n_train"], s["n_test"], s["classes"], s["dim"]) == (60, 30, 3, 256)


def test_probe_refusals(tmp_path):
    train = _separable_npy(tmp_path, 30, 0)
    with pytest.raises(CooptError, match="checkpoint not found"):
        probe(str(tmp_path / "missing.pt"), train, train, progress=False)
    np.save(tmp_path / "u.npy", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(CooptError, match="has no labels"):
        probe("convnet", f"npy:{tmp_path / 'u.npy'}", train, progress=False)
    plain = tmp_path / "plain.pt"  # a bare state dict records no architecture
    torch.save(build_backbone("convnet", 32, 0)[0].state_dict(), plain)
    with pytest.raises(CooptError, match="--arch"):
        probe(str(plain), train, train, progress=False)
    assert probe(str(plain), train, train, arch="convnet", progress=False)["probe_accuracy"] >= 0.9


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@requires_fmnist
def test_cli_pretrain_train_probe_json(tmp_path, merged_run):
    r = invoke("pretrain", "fashion-mnist", "--method", "simclr", "--epochs", "1", "--out", tmp_path / "p.pt",
               "--limit", "64", "--batch-size", "32", "--input-size", "16", "--device", "cpu", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 2
    r = invoke("train", merged_run, "--student", "convnet", "--epochs", "1", "--out", tmp_path / "s",
               "--batch-size", "64", "--input-size", "16", "--max-steps", "2", "--device", "cpu", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["steps"] == 2 and s["stopped"] == "max_steps"
    for ckpt in (tmp_path / "p.pt", s["checkpoint"]):
        r = invoke("probe", ckpt, "--train", "fashion-mnist", "--test", "fashion-mnist:test", "--limit-train", "60",
                   "--limit-test", "40", "--device", "cpu", "--quiet", "--json")
        assert r.exit_code == 0, r.output
        p = json.loads(r.stdout)
        assert 0 <= p["probe_accuracy"] <= 1 and 0 <= p["knn_accuracy"] <= 1 and p["n_test"] == 40
    r = invoke("train", merged_run, "--epochs", "1", "--out", tmp_path / "s2", "--input-size", "16", "--max-steps", "1",
               "--device", "cpu")
    assert r.exit_code == 0 and r.stdout == "", r.output  # the table goes to stderr


@pytest.mark.parametrize("args, msg", [
    (("pretrain", "fashion-mnist", "--method", "moco", "--out", "{tmp}/p.pt"), "'moco' is not one of"),
    (("pretrain", "nope", "--out", "{tmp}/p.pt"), "unknown dataset spec"),
    (("train", "{tmp}/missing", "--out", "{tmp}/s"), "merged store not found"),
    (("train", "{tmp}", "--out", "{tmp}/s", "--device", "tpu"), "device"),
    (("probe", "{tmp}/missing.pt"), "checkpoint not found"),
    (("probe", "nonet"), "unknown architecture"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, msg):
    r = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "p.pt").exists()
