"""train and pretrain under torchrun, 2 gloo ranks on the CPU: the same run as one process with
the same global batch, resume (also with another world size), only rank 0 writes, world_size is
recorded, the ranks hold equal weights, and a failing rank ends the run instead of hanging.

Why 2 ranks are not bitwise one process: DDP averages the ranks' mean gradients, (g0 + g1) / 2,
where one process sums the 64 rows' gradients in one reduction (another summation order), and
the ranks' matmuls run on 32 rows, not 64 (other blocking). Both are float rounding: weights
agree to ~1e-8 after 12 steps of the linear student. With BatchNorm (convnet) the ranks also
normalise their 32 rows with their own statistics, a real difference in the computed function
(not rounding): ~1-2% on the epoch losses here.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coopt_fast.errors import CooptError
from coopt_fast.priors import read_checkpoint
from coopt_fast.ssl import pretrain
from coopt_fast.student import train

from .conftest import requires_fmnist
from .conftest_student import make_merged

pytestmark = requires_fmnist
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
EVERY_RANK = Path(__file__).with_name("ddp_every_rank.py")  # also saves every rank's weights
# 384 rows, global batch 64: 6 steps per epoch, 32 rows per rank
TRAIN = dict(epochs=2, batch_size=64, input_size=16, device="cpu")
# Float rounding only (linear student: no BatchNorm), over 12 AdamW steps: see the module doc.
LINEAR_RTOL, LINEAR_ATOL = 1e-5, 1e-6
# Per-rank BatchNorm statistics (convnet, SimCLR's projector): observed 1-2% on these losses
# (convnet student, 2 epochs: 0.824 vs 0.815, 0.592 vs 0.583).
BN_RTOL = 0.05


def _torchrun(*args, ranks: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 ranks on 2 cores
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _cli_args(kwargs: dict) -> list[str]:
    """train/pretrain keywords as CLI options (True: a flag)."""
    out = []
    for k, v in kwargs.items():
        out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


def _train2(run: Path, out: Path, student: str = "linear", **kw) -> dict:
    """`torchrun --nproc_per_node=2 -m coopt_fast train`; rank 0's --json summary."""
    r = _torchrun("-m", "coopt_fast", "train", run, "-o", out, "--student", student, "--quiet", "--json",
                  *_cli_args({**TRAIN, **kw}))
    return json.loads(r.stdout)  # exactly one JSON document: only rank 0 prints


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _state(out: Path) -> dict:
    return torch.load(out / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_merged(tmp_path_factory.mktemp("ddp") / "run" / "merged.h5").parent


@pytest.fixture(scope="module")
def full2(run) -> tuple[Path, dict]:
    """An uninterrupted 2-rank run of the linear student: (OUT, summary)."""
    out = run.parent / "full2"
    return out, _train2(run, out)


@pytest.fixture(scope="module")
def part2(run) -> Path:
    """A 2-rank run cut after 3 steps (mid first epoch), to be resumed."""
    out = run.parent / "part2"
    s = _train2(run, out, max_steps=3)
    assert (s["steps"], s["stopped"]) == (3, "max_steps")
    return out


def _assert_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max().item())


def test_two_ranks_match_one_process_linear(run, full2, tmp_path):
    out2, s2 = full2
    s1 = train(run, "linear", out=tmp_path / "one", progress=False, **TRAIN)
    assert (s1["steps"], s2["steps"], s1["world_size"], s2["world_size"]) == (12, 12, 1, 2)
    log1, log2 = _log(tmp_path / "one" / "train.jsonl"), _log(out2 / "train.jsonl")
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log1], rel=LINEAR_RTOL)
    st1, st2 = _state(tmp_path / "one"), _state(out2)
    assert [v for _, v in st2["loop"]["trace"]] == pytest.approx([v for _, v in st1["loop"]["trace"]], rel=LINEAR_RTOL)
    _assert_close(st1["model"], st2["model"], LINEAR_RTOL, LINEAR_ATOL)
    # the generator drew the global batch's augmentations on every rank: the same stream as one process
    assert torch.equal(st1["aug_rng"], st2["aug_rng"])


def test_two_ranks_write_once_and_record_world_size(full2):
    out, s = full2
    assert sorted(p.name for p in out.iterdir()) == ["curve.png", "state.pt", "student.pt", "train.jsonl"]
    assert s["world_size"] == 2 and s["rows"] == 384 and s["stopped"] == "epochs"
    assert [r["world_size"] for r in _log(out / "train.jsonl")] == [2, 2]
    _, meta = read_checkpoint(out / "student.pt")
    assert meta["world_size"] == 2 and meta["batch_size"] == 64  # the global batch
    assert _state(out)["world_size"] == 2


def test_killed_two_rank_run_resumes_bitwise(run, full2, part2, tmp_path):
    out = tmp_path / "part"
    shutil.copytree(part2, out)
    s = _train2(run, out, resume=True)
    assert s["resumed"] and s["steps"] == 12 and s["world_size"] == 2
    a, b = _state(full2[0]), _state(out)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, sa in a["optimizer"]["state"].items():
        assert all(torch.equal(sa[k], b["optimizer"]["state"][i][k]) for k in sa), i
    assert torch.equal(a["aug_rng"], b["aug_rng"])
    # the cut regrouped the epoch's loss sum (3 + 3 steps instead of one window of 6): rounding
    assert [r["loss"] for r in b["loop"]["log"]] == pytest.approx([r["loss"] for r in a["loop"]["log"]], rel=1e-6)


def test_two_rank_run_resumes_in_one_process(run, full2, part2, tmp_path):
    """The order and the augmentation draws do not depend on the world size: a 2-rank run
    continued by one process ends where the uninterrupted 2-rank run does (up to rounding)."""
    out = tmp_path / "part"
    shutil.copytree(part2, out)
    s = train(run, "linear", out=out, resume=True, progress=False, **TRAIN)
    assert s["resumed"] and s["steps"] == 12 and s["world_size"] == 1
    a, b = _state(full2[0]), _state(out)
    _assert_close(a["model"], b["model"], LINEAR_RTOL, LINEAR_ATOL)
    assert torch.equal(a["aug_rng"], b["aug_rng"])
    assert [r["world_size"] for r in b["loop"]["log"]] == [1, 1]  # both epochs ended in this process


def test_ranks_that_do_not_see_the_same_state_are_refused(run, part2, tmp_path):
    """A node that does not share OUT's folder would start over while the others continue."""
    out = tmp_path / "part"
    shutil.copytree(part2, out)
    kw = dict(TRAIN, run=str(run), student="linear", out=str(out), resume=True, progress=False)
    r = _torchrun(EVERY_RANK, "train", json.dumps(kw), "--hide-state-from-rank-1", check=False)
    assert r.returncode != 0
    assert "the ranks do not see the same resume state (rank 0: step 3, rank 1: no state)" in r.stderr
    assert _state(out)["loop"]["step"] == 3  # nothing trained, nothing saved


def test_world_size_that_does_not_divide_the_batch_is_refused(run, tmp_path, monkeypatch):
    # Refused before any process group starts, so one process posing as rank 0 of 3 sees it.
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CooptError, match="--batch-size 64: the global batch must split evenly over the 3 ranks"):
        train(run, "linear", out=tmp_path / "o", progress=False, **TRAIN)
    with pytest.raises(CooptError, match="split evenly over the 3 ranks"):
        pretrain("fashion-mnist", "simclr", "convnet", 1, tmp_path / "p.pt", batch_size=32, limit=64, progress=False)
    assert not (tmp_path / "o").exists()


def test_byol_ranks_hold_equal_weights_and_ema_targets(tmp_path):
    """Every rank's parameters after each epoch, online and EMA target, are bitwise equal. With a
    time budget the schedule reads a clock: rank 0's is used by all (own clocks would give the
    ranks different learning rates and EMA rates on the first step, and part their weights)."""
    out = tmp_path / "byol.pt"
    kw = dict(dataset="fashion-mnist", method="byol", arch="convnet", epochs=1, out=str(out), batch_size=32,
              limit=64, input_size=16, proj_hidden=64, max_seconds=1000, device="cpu", progress=False)
    _torchrun(EVERY_RANK, "pretrain", json.dumps(kw))
    r0, r1 = (torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any(k.startswith("target_") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    _, meta = read_checkpoint(out)
    assert meta["world_size"] == 2 and meta["method"] == "byol"
    assert [r["world_size"] for r in _log(Path(f"{out}.log.jsonl"))] == [2]


def test_simclr_negatives_span_every_rank(tmp_path):
    """SimCLR's loss over 2 ranks is the one-process loss of the global batch (64 views per
    batch, 63 candidates per anchor), not a per-rank loss over 32 views (~ln 31 instead of ~ln 63
    at the start, 17% lower): the projections are gathered across ranks."""
    kw = dict(epochs=1, batch_size=32, limit=64, input_size=16, proj_hidden=64, device="cpu", progress=False)
    _torchrun(EVERY_RANK, "pretrain", json.dumps(dict(kw, dataset="fashion-mnist", method="simclr", out=str(tmp_path / "two.pt"))))
    one = pretrain("fashion-mnist", "simclr", "convnet", out=tmp_path / "one.pt", **kw)
    two = _log(tmp_path / "two.pt.log.jsonl")
    assert len(two) == 1 and two[0]["steps"] == one["steps"] == 2 and two[0]["world_size"] == 2
    assert two[0]["loss"] == pytest.approx(one["loss"], rel=BN_RTOL)  # per-rank BatchNorm in the projector


def test_a_failing_rank_ends_the_run(run, tmp_path):
    """Rank 0 cannot save (its state.pt.tmp is a folder): it exits with the error, rank 1 is
    stopped in its next collective instead of waiting there; the run ends, non-zero, in seconds."""
    out = tmp_path / "o"
    (out / "state.pt.tmp").mkdir(parents=True)
    r = _torchrun("-m", "coopt_fast", "train", run, "-o", out, "--student", "linear", "--quiet",
                  *_cli_args({**TRAIN, "epochs": 3}), check=False)
    assert r.returncode != 0
    assert "error:" in r.stderr and "state.pt.tmp" in r.stderr
    assert not (out / "state.pt").exists()


def test_one_rank_forced_through_ddp_equals_one_process(run, tmp_path):
    """COOPT_PROCESS_GROUP=always: one torchrun rank takes the whole multi-rank path (process group,
    DDP wrapper, all-reduce of one rank's gradients, rank-0 broadcasts): what bench/gpu_check.sh
    smoke-tests on a one-GPU machine. With one rank DDP divides the summed gradient by 1: bitwise."""
    plain = train(run, "linear", out=tmp_path / "plain", progress=False, max_steps=4, **TRAIN)
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=1", "-m", "coopt_fast", "train", run, "-o", tmp_path / "ddp1",
           "--student", "linear", "--quiet", "--json", "--max-steps", "4", *_cli_args(TRAIN)]
    env = dict(os.environ, COOPT_PROCESS_GROUP="always")
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["world_size"] == 1 and s["data_parallel"] and not plain["data_parallel"]
    assert s["steps"] == plain["steps"] == 4
    a, b = _state(tmp_path / "plain"), _state(tmp_path / "ddp1")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_a_rank_failing_on_another_node_ends_this_one(tmp_path):
    """Two torchrun "nodes" on this machine (static rendezvous): each agent stops only its own
    ranks, so rank 0, busy for 10 minutes with no barrier ahead, ends only if the peer watchdog
    sees rank 1's posted failure. The subprocess timeout is a hang guard, not a speed claim."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={k}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", str(Path(__file__).with_name("watchdog_rank.py"))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for k in (0, 1)]
    try:
        out = [p.communicate(timeout=120) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert "error: rank 0: stopping, another rank failed: rank 1: rank 1 gives up on purpose" in out[0][1], out[0][1][-3000:]
