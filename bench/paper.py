"""Does COOPT pay off? Every claim of the paper, measured on Fashion-MNIST with the product.

    python bench/paper.py --quick      # every experiment at toy size, one seed (<= 10 min on 2 cores)
    python bench/paper.py              # the full run, seeds 0,1,2 (~100 min on 2 cores: over the 90-minute target)
    python bench/paper.py --only table2,fig3c   # a subset (the others are kept from earlier runs)

Experiments (keys of paper.json; DESIGN.md §3 for the math):
  table2  time to accuracy: COOPT students (label-using: one participant's prior saw labels;
          label-free: none did) against BYOL and SimCLR of the same convnet on the same images,
          each SSL run to 4x COOPT's wall time; every run probed at 6 points (train/pretrain
          --snapshots); plus each SSL method annealed within COOPT's time (equal time).
  fig4d   the label-free arm aligned to each participant in turn, or to none (projection only):
          student accuracy, store effective rank, G before/after (kNN and linear estimators),
          and which reference each score on S would pick.
  refchoice  the same for the label-using arm and table5's +labels arm, for the reference each
          score picks: does the default score choose well, and does the store keep its rank?
  fig3c   >= 8 priors of varied quality: own linear-probe accuracy vs label-free scores on S
          (the paper's uniformity, uniformity of centred features, effective rank); Spearman
          and a bootstrap over priors.
  table5  adding a human-labels participant; adding weak participants.
  fig5    |S|/N in {0.002, 0.005, 0.01, 0.05, 0.1, 0.2}.
  fig3b   5 rounds; in each one of 4 participants upgrades its prior (extract --round).
  collab  K in {1, 2, 4} participants extracting as parallel processes, and each alone.

Data roles. D = the first N images of Fashion-MNIST train (N = 8,000 in the full run: the
whole 60,000 would take ~7x longer than the 90-minute budget allows). The priors are trained
on P = train images [50,000, 60,000), disjoint from D, so no prior has seen D; their training
time is reported beside COOPT's (all-in) and left out of it (the paper's accounting). The
probes train on the first 10,000 train images and test on all 10,000 test images.

Timing. Everything that is a time claim (prior training, table2, collab) runs alone on the
machine with both cores; the rest (probes, ablations) runs afterwards as 2 single-threaded
processes. Seconds are wall time of the library calls: COOPT = split + parallel extraction
(one OS process per participant, as the demo) + score + align + merge + train; SSL = the
pretrain training loop. Each finished job is cached under WORK/jobs/, so an interrupted run
continues where it stopped (delete WORK to start over).

Output: bench/results/paper.json (per-seed values, hardware, date, commit in every entry),
paper.md (the tables) and paper_*.png; --quick writes to WORK/results/ instead.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import paper_report as R  # noqa: E402
from coopt_fast import scores as prior_scores  # noqa: E402
from coopt_fast.align import align  # noqa: E402
from coopt_fast.ranking import score  # noqa: E402
from coopt_fast.data import Dataset, load_dataset  # noqa: E402
from coopt_fast.demo import _extract_in_parallel  # noqa: E402
from coopt_fast.diagnostics import inspect  # noqa: E402
from coopt_fast.evaluate import features, load_frozen, probe  # noqa: E402
from coopt_fast.extract import extract  # noqa: E402
from coopt_fast.merge import merge  # noqa: E402
from coopt_fast.plan import split  # noqa: E402
from coopt_fast.priors import CONVNET_MEAN, CONVNET_STD, build_backbone, save_checkpoint  # noqa: E402
from coopt_fast.ssl import pretrain  # noqa: E402
from coopt_fast.student import train  # noqa: E402

DATA = "fashion-mnist"
TEST = "fashion-mnist:test"
N_TRAIN = 60000


# refchoice realigns these arms (label_free: fig4d aligns it to every participant)
REFCHOICE_ARMS = ("label_using", "t5-labels")


@dataclass(frozen=True)
class Scale:
    name: str
    seeds: tuple = (0, 1, 2)
    d_size: int = 8000                 # D = the first d_size train images
    p_start: int = 50000               # P = train images [p_start, 60000): the priors' data
    probe_train: int = 10000
    probe_test: int = 10000
    shared_fraction: float = 0.05      # |S| = 400 at d_size 8,000
    dim: int = 256                     # n, the common target dimension
    student_epochs: int = 3
    batch_size: int = 128
    snapshots: int = 6                 # probe points per COOPT student
    ssl_snapshots: int = 8             # per SSL run (over 4x the time: finer where it crosses COOPT)
    ssl_multiple: float = 4.0          # SSL runs to this multiple of COOPT's time
    prior_epochs: int = 6              # sup, byol, simclr, linear-sup priors on P
    r18_epochs: int = 2
    fractions: tuple = (0.002, 0.005, 0.01, 0.05, 0.1, 0.2)
    collab_ks: tuple = (1, 2, 4)
    refchoice_arms: tuple = REFCHOICE_ARMS


FULL = Scale("full")
QUICK = Scale("quick", seeds=(0,), d_size=1000, p_start=58000, probe_train=2000, probe_test=2000,
              prior_epochs=2, r18_epochs=1, fractions=(0.01, 0.05, 0.2), collab_ks=(1, 2), ssl_snapshots=6,
              refchoice_arms=("label_using",))

# The participants' priors, all trained on P (recipe, the training run it comes from).
# `-early` priors are the 1st of 4 snapshots of the full run: a quarter of it, not annealed.
PRIORS = {
    "sup": dict(method="supervised", arch="convnet"),
    "sup-weak": dict(method="supervised", arch="convnet", epochs=1, labeled_fraction=0.05),
    "byol": dict(method="byol", arch="convnet"),
    "byol-early": dict(snapshot_of="byol"),
    "simclr": dict(method="simclr", arch="convnet"),
    "simclr-early": dict(snapshot_of="simclr"),
    "resnet18-sup": dict(method="supervised", arch="resnet18", input_size=32),
    "linear-sup": dict(method="supervised", arch="linear"),
    "random": dict(random="convnet"),
    "resnet18-random": dict(random="resnet18", input_size=32),
}
LABEL_FREE = ("byol", "simclr", "byol-early", "random")      # no prior saw a label
LABEL_USING = ("sup", "simclr", "byol-early", "random")      # participant 0's prior saw P's labels
SAW_LABELS = {"sup", "sup-weak", "resnet18-sup", "linear-sup", "labels"}
TABLE5 = {"base": LABEL_FREE, "+labels": LABEL_FREE + ("labels",),
          "+weak": LABEL_FREE + ("resnet18-random", "simclr-early")}
# Rounds: everyone starts with a random convnet of its own; one upgrade per round.
ROUND_START = ("random", "random", "random", "random")
ROUND_UPGRADES = ((0, "byol-early"), (1, "simclr-early"), (2, "simclr"), (3, "byol"), (0, "byol"))
SCORES = tuple(prior_scores.SCORES)  # the library's (coopt_fast.scores)
SCORE_SIGN = {s: -v for s, v in prior_scores.SCORES.items()}  # +1: higher = better
FIG4D_REFS = ["none"] + [f"p{i}-{nm}" for i, nm in enumerate(LABEL_FREE)] + ["consensus"]


# ---- environment, logging, the job cache --------------------------------------------------------

def environment() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        mem = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except OSError:
        commit = "unknown"
    return {"hardware": f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg())}


T_START = time.perf_counter()


def log(msg: str) -> None:
    el = time.perf_counter() - T_START
    print(f"[{int(el // 60):3d}:{int(el % 60):02d}] {msg}", flush=True)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def job_path(work: Path, name: str) -> Path:
    return work / "jobs" / f"{name}.json"


def cached(work: Path, name: str, fn, *args, **kwargs):
    """Run fn once per job name; an interrupted bench resumes from the finished jobs."""
    path = job_path(work, name)
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    log(f"{name} ...")
    r = fn(*args, **kwargs)
    log(f"{name} done in {time.perf_counter() - t0:.0f} s")
    _write_json(path, r)
    return r


def _pool_init() -> None:
    # Untimed work runs two jobs at once, one core each: more throughput than one job on two
    # cores (measured here: 1.4-1.8x for the convnet steps), and no oversubscription.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def _pool_job(work: str, name: str, fn_name: str, kwargs: dict):
    r = globals()[fn_name](**kwargs)
    _write_json(job_path(Path(work), name), r)
    return name


def run_pool(work: Path, jobs: list[tuple[str, str, dict]], workers: int = 2) -> None:
    """Run (name, function name, kwargs) jobs not yet cached, two single-threaded processes at once."""
    todo = [j for j in jobs if not job_path(work, j[0]).exists()]
    if not todo:
        return
    log(f"{len(todo)} untimed jobs on {workers} single-threaded processes")
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_pool_init) as ex:
        futs = {ex.submit(_pool_job, str(work), n, f, kw): n for n, f, kw in todo}
        for i, fut in enumerate(cf.as_completed(futs), 1):
            fut.result()  # a failed job stops the bench here, with its traceback
            log(f"  [{i}/{len(todo)}] {futs[fut]} ({time.perf_counter() - t0:.0f} s)")


def load_job(work: Path, name: str):
    return json.loads(job_path(work, name).read_text())


# ---- priors ---------------------------------------------------------------------------------------

def prior_data(work: Path, sc: Scale) -> str:
    """P as an npy: data set (train images [p_start, 60000) with labels)."""
    folder = work / "data"
    x, y = folder / f"P{sc.p_start}-images.npy", folder / f"P{sc.p_start}-labels.npy"
    if not y.exists():
        ds = load_dataset(DATA)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(x, ds.images[sc.p_start:, :, :, 0])
        np.save(y, ds.labels[sc.p_start:])
    return f"npy:{x},{y}"


def prior_ckpt(work: Path, name: str) -> Path:
    return work / "priors" / f"{name}.safetensors"


def train_prior(work: Path, sc: Scale, name: str) -> dict:
    """One prior on P, timed alone (its seconds enter the all-in accounting)."""
    r = PRIORS[name]
    out = prior_ckpt(work, name)
    if "random" in r:  # a randomly initialised network, saved so every step loads the same one
        size = r.get("input_size", 32)
        model, _, _ = build_backbone(r["random"], size, seed=1000)
        mean, std = (CONVNET_MEAN, CONVNET_STD) if r["random"] == "convnet" else ((0.5,) * 3, (0.5,) * 3)
        save_checkpoint(out, model, {"arch": r["random"], "input_size": size, "mean": list(mean), "std": list(std),
                                     "method": "random"})
        return {"name": name, "arch": r["random"], "recipe": f"{r['random']}, random init", "seconds": 0.0,
                "run": name, "checkpoint": str(out)}
    epochs = r.get("epochs", sc.r18_epochs if r["arch"] == "resnet18" else sc.prior_epochs)
    kw = dict(labeled_fraction=r["labeled_fraction"]) if "labeled_fraction" in r else {}
    if "input_size" in r:
        kw["input_size"] = r["input_size"]
    snaps = 4 if r["method"] in ("byol", "simclr") else 0
    s = pretrain(prior_data(work, sc), r["method"], r["arch"], epochs, out, seed=0, snapshots=snaps, progress=False,
                 force=True, **kw)  # a job that reruns starts over
    recipe = f"{r['arch']} {r['method']}, {epochs} ep on P" + (f", {r['labeled_fraction']:.0%} labels" if kw.get("labeled_fraction") else "")
    return {"name": name, "arch": r["arch"], "recipe": recipe, "seconds": s["train_seconds"], "run": name,
            "checkpoint": str(out), "snapshots": s["snapshots"], "samples_per_s": s["samples_per_s"]}


def prior_table(work: Path, sc: Scale) -> dict:
    """name -> {checkpoint, seconds (to produce it), run (training run it comes from), recipe}."""
    table = {}
    for name, r in PRIORS.items():
        if "snapshot_of" in r:
            continue
        table[name] = cached(work, f"prior-{name}", train_prior, work, sc, name)
    for name, r in PRIORS.items():
        if "snapshot_of" in r:
            base = table[r["snapshot_of"]]
            snap = base["snapshots"][0]
            table[name] = {"name": name, "arch": base["arch"], "recipe": f"{base['recipe']}: snapshot at step "
                           f"{snap['step']} (1/4, not annealed)", "seconds": snap["seconds"], "run": base["run"],
                           "checkpoint": snap["path"]}
    return table


def prior_spec(priors: dict, name: str) -> str:
    return "labels" if name == "labels" else f"{priors[name]['arch']}:{priors[name]['checkpoint']}"


def prior_cost(priors: dict, names) -> float:
    """Seconds to produce a set of priors: each training run counted once (an -early snapshot
    comes free with its full run; alone, it costs the time up to the snapshot)."""
    runs: dict[str, float] = {}
    for nm in names:
        if nm == "labels":
            continue
        p = priors[nm]
        runs[p["run"]] = max(runs.get(p["run"], 0.0), p["seconds"])
    return float(sum(runs.values()))


# ---- the COOPT pipeline -------------------------------------------------------------------------

def participant_names(names) -> list[str]:
    return [f"p{i}-{nm}" for i, nm in enumerate(names)]


def data_side(run: Path, sc: Scale, priors: dict, names, seed: int, fraction: float | None = None,
              parallel: bool = True, reference: str = "consensus") -> dict:
    """split -> extract (parallel processes, or in this process) -> score -> align -> merge; timed."""
    if run.exists():
        shutil.rmtree(run)
    t = {}
    t0 = time.perf_counter()
    split(DATA, run, participants=len(names), shared_fraction=fraction or sc.shared_fraction, seed=seed,
          limit=sc.d_size)
    t["split"] = time.perf_counter() - t0
    jobs = [(pn, k, prior_spec(priors, nm), seed) for k, (pn, nm) in enumerate(zip(participant_names(names), names))]
    t1 = time.perf_counter()
    if parallel:
        logs = run.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _extract_in_parallel(run, jobs, logs, "cpu")
    else:
        for pn, k, spec, sd in jobs:
            extract(run, pn, k, spec, seed=sd, workers=1, progress=False)
    t["extract"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    sc_ = score(run)
    t["score"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    al = align(run, dim=sc.dim, reference=reference, progress=False)
    t["align"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    merge(run, progress=False)
    t["merge"] = time.perf_counter() - t4
    return {"seconds": time.perf_counter() - t0, "steps": t, "reference": al["reference"],
            "participants": [{"name": r["participant"], "uniformity": r["uniformity"], "rank": r["rank"]}
                             for r in sc_["participants"]],
            "residuals": {r["participant"]: r["residual"] for r in al["participants"]},
            "shared_size": len(json.loads((run / "plan.json").read_text())["shared"])}


def call_clock(call_seconds: float, s: dict) -> list[dict]:
    """Snapshot times counted from the start of the call (opening the store or data set, building
    the model), not from the training loop's: what a user waits for."""
    setup = max(0.0, call_seconds - s["train_seconds"])
    return [{**r, "seconds": r["seconds"] + setup} for r in s["snapshots"]]


def student(run: Path, out: Path, sc: Scale, seed: int, snapshots: int = 0) -> dict:
    t0 = time.perf_counter()
    s = train(run, "convnet", sc.student_epochs, out, batch_size=sc.batch_size, seed=seed, device="cpu",
              snapshots=snapshots, progress=False, force=True)  # a rerun job retrains over its last try
    wall = time.perf_counter() - t0
    return {"seconds": wall, "train_seconds": s["train_seconds"], "checkpoint": s["checkpoint"],
            "snapshots": call_clock(wall, s), "loss": s["loss"], "trace": s_trace(out)}


def s_trace(out: Path, keep: int = 60) -> list:
    """The student's loss trace (step, loss), thinned to `keep` points for the JSON."""
    st = torch.load(out / "state.pt", weights_only=True)
    tr = st["loop"]["trace"]
    step = max(1, len(tr) // keep)
    return [[int(s), float(v)] for s, v in tr[::step]]


def probe_ckpt(ckpt: str, sc: Scale) -> dict:
    p = probe(ckpt, DATA, TEST, limit_train=sc.probe_train, limit_test=sc.probe_test, progress=False)
    return {"linear": p["probe_accuracy"], "knn": p["knn_accuracy"], "checkpoint": ckpt}


def probe_name(ckpt: str) -> str:
    return "probe-" + hashlib.sha256(ckpt.encode()).hexdigest()[:12]


# ---- table 2: timed runs --------------------------------------------------------------------------

def coopt_arm(work: Path, sc: Scale, priors: dict, arm: str, names, seed: int) -> dict:
    base = work / f"s{seed}" / arm
    ds = data_side(base / "run", sc, priors, names, seed)
    st = student(base / "run", base / "student", sc, seed, snapshots=sc.snapshots)
    t_coopt = ds["seconds"] + st["seconds"]
    return {"seed": seed, "participants": list(names), "data_side": ds, "t_dataopt": ds["seconds"],
            "t_student": st["seconds"], "t_coopt": t_coopt, "t_priors": prior_cost(priors, names),
            "t_all_in": t_coopt + prior_cost(priors, names), "reference": ds["reference"],
            "snapshots": [{**s, "seconds": ds["seconds"] + s["seconds"]} for s in st["snapshots"]],
            "trace": st["trace"], "checkpoint": st["checkpoint"], "run": str(base / "run")}


def ssl_run(work: Path, sc: Scale, method: str, seed: int, budget: float, tag: str, snapshots: int) -> dict:
    out = work / f"s{seed}" / f"{method}-{tag}" / f"{method}.safetensors"
    t0 = time.perf_counter()
    # The budget is the training loop's (--max-seconds); the call's few seconds of set-up are
    # counted on the curve's time axis all the same (call_clock), as COOPT's are.
    s = pretrain(DATA, method, "convnet", 100000, out, limit=sc.d_size, max_seconds=budget, seed=seed,
                 snapshots=snapshots, progress=False, force=True)  # a job that reruns starts over
    wall = time.perf_counter() - t0
    return {"seed": seed, "method": method, "budget": budget, "train_seconds": s["train_seconds"], "seconds": wall,
            "steps": s["steps"], "samples": s["steps"] * min(256, sc.d_size), "snapshots": call_clock(wall, s),
            "checkpoint": s["checkpoint"]}


def table2_timed(work: Path, sc: Scale, priors: dict) -> None:
    for seed in sc.seeds:
        arms = {}
        for arm, names in (("label_using", LABEL_USING), ("label_free", LABEL_FREE)):
            arms[arm] = cached(work, f"t2-s{seed}-{arm}", coopt_arm, work, sc, priors, arm, names, seed)
        t_ref = max(a["t_coopt"] for a in arms.values())
        for method in ("byol", "simclr"):
            cached(work, f"t2-s{seed}-{method}-long", ssl_run, work, sc, method, seed, sc.ssl_multiple * t_ref,
                   "long", sc.ssl_snapshots)
            cached(work, f"t2-s{seed}-{method}-equal", ssl_run, work, sc, method, seed, t_ref, "equal", 1)


def table2_probe_jobs(work: Path, sc: Scale) -> list:
    jobs = []
    for seed in sc.seeds:
        for key in ("label_using", "label_free", "byol-long", "simclr-long", "byol-equal", "simclr-equal"):
            r = load_job(work, f"t2-s{seed}-{key}")
            for s in r["snapshots"]:
                jobs.append((probe_name(s["path"]), "probe_ckpt", dict(ckpt=s["path"], sc=sc)))
    return jobs


def curve(work: Path, snaps: list) -> list[dict]:
    out = []
    for s in snaps:
        p = load_job(work, probe_name(s["path"]))
        out.append({"k": s["k"], "step": s["step"], "seconds": s["seconds"], "linear": p["linear"], "knn": p["knn"]})
    return out


def table2_result(work: Path, sc: Scale, env: dict) -> dict:
    res = {"env": env, "seeds": list(sc.seeds),
           "setting": f"D = first {sc.d_size} train images; convnet student {sc.student_epochs} epochs batch "
                      f"{sc.batch_size}; SSL: same convnet, batch 256, to {sc.ssl_multiple:g}x COOPT's time; "
                      f"{sc.snapshots} probe points per COOPT run, {sc.ssl_snapshots} per SSL run"}
    for arm, names in (("label_using", LABEL_USING), ("label_free", LABEL_FREE)):
        per = []
        for seed in sc.seeds:
            r = load_job(work, f"t2-s{seed}-{arm}")
            c = curve(work, r["snapshots"])
            per.append({k: r[k] for k in ("seed", "t_dataopt", "t_student", "t_coopt", "t_priors", "t_all_in",
                                          "reference")} | {"curve": c, "steps": r["data_side"]["steps"],
                                                           "uniformity": r["data_side"]["participants"]})
        res[arm] = {"participants": list(names), "per_seed": per,
                    "final_linear": R.mean_std([p["curve"][-1]["linear"] for p in per]),
                    "final_knn": R.mean_std([p["curve"][-1]["knn"] for p in per]),
                    "t_coopt": R.mean_std([p["t_coopt"] for p in per]),
                    "t_dataopt": R.mean_std([p["t_dataopt"] for p in per]),
                    "t_student": R.mean_std([p["t_student"] for p in per]),
                    "t_all_in": R.mean_std([p["t_all_in"] for p in per])}
    for m in ("byol", "simclr"):
        per = []
        for seed in sc.seeds:
            lg, eq = load_job(work, f"t2-s{seed}-{m}-long"), load_job(work, f"t2-s{seed}-{m}-equal")
            pe = load_job(work, probe_name(eq["snapshots"][-1]["path"]))
            per.append({"seed": seed, "budget": lg["budget"], "steps": lg["steps"], "samples": lg["samples"],
                        "curve": curve(work, lg["snapshots"]),
                        "equal_time": {"seconds": eq["snapshots"][-1]["seconds"], "budget": eq["budget"],
                                       "linear": pe["linear"], "knn": pe["knn"]}})
        res[m] = {"per_seed": per, "budget": R.mean_std([p["budget"] for p in per]),
                  "final_linear": R.mean_std([p["curve"][-1]["linear"] for p in per]),
                  "final_knn": R.mean_std([p["curve"][-1]["knn"] for p in per]),
                  "equal_time_budget": R.mean_std([p["equal_time"]["budget"] for p in per]),
                  "equal_time_linear": R.mean_std([p["equal_time"]["linear"] for p in per]),
                  "equal_time_knn": R.mean_std([p["equal_time"]["knn"] for p in per])}
    res["time_to_accuracy"], res["equal_time"] = {}, {}
    for arm in ("label_using", "label_free"):
        res["time_to_accuracy"][arm], res["equal_time"][arm] = {}, {}
        for m in ("byol", "simclr"):
            rows, eqs = [], []
            for a, s in zip(res[arm]["per_seed"], res[m]["per_seed"]):
                target = a["curve"][-1]["linear"]
                t = R.time_to_reach([(p["seconds"], p["linear"]) for p in s["curve"]], target)
                rows.append({"seed": a["seed"], "target": target, "seconds": t, "budget": s["budget"],
                             # reached at SSL's first probe: the true time is at most this
                             "at_first_probe": t is not None and t == s["curve"][0]["seconds"],
                             "speedup": None if t is None else t / a["t_coopt"],
                             "speedup_all_in": None if t is None else t / a["t_all_in"],
                             "speedup_at_least": None if t is not None else s["budget"] / a["t_coopt"]})
                at_t = {k: R.value_at([(p["seconds"], p[k]) for p in s["curve"]], a["t_coopt"]) for k in ("linear", "knn")}
                eqs.append({"seed": a["seed"], "t_coopt": a["t_coopt"],
                            "coopt_linear": a["curve"][-1]["linear"], "coopt_knn": a["curve"][-1]["knn"],
                            "ssl_annealed_linear": s["equal_time"]["linear"], "ssl_annealed_knn": s["equal_time"]["knn"],
                            "ssl_curve_linear_at_t": at_t["linear"], "ssl_curve_knn_at_t": at_t["knn"],
                            "delta_linear": a["curve"][-1]["linear"] - s["equal_time"]["linear"],
                            "delta_knn": a["curve"][-1]["knn"] - s["equal_time"]["knn"]})
            reached = [r for r in rows if r["seconds"] is not None]
            res["time_to_accuracy"][arm][m] = {
                "per_seed": rows, "n": len(rows), "reached": len(reached),
                "target": R.mean_std([r["target"] for r in rows]),
                "seconds": R.mean_std([r["seconds"] for r in reached]),
                "speedup": R.mean_std([r["speedup"] for r in reached]),
                "speedup_all_in": R.mean_std([r["speedup_all_in"] for r in reached]),
                "at_first_probe": sum(r["at_first_probe"] for r in rows),
                "not_reached_within": None if reached else f"{sc.ssl_multiple:g}x"}
            res["equal_time"][arm][m] = {"per_seed": eqs, "delta_linear": R.mean_std([e["delta_linear"] for e in eqs]),
                                         "delta_knn": R.mean_std([e["delta_knn"] for e in eqs])}
    # The other way round: when does COOPT reach what the SSL method ends at after 4x the time?
    res["coopt_to_ssl_final"] = {}
    for arm in ("label_using", "label_free"):
        res["coopt_to_ssl_final"][arm] = {}
        for m in ("byol", "simclr"):
            rows = []
            for a, s in zip(res[arm]["per_seed"], res[m]["per_seed"]):
                target, t_ssl = s["curve"][-1]["linear"], s["curve"][-1]["seconds"]
                t = R.time_to_reach([(p["seconds"], p["linear"]) for p in a["curve"]], target)
                rows.append({"seed": a["seed"], "target": target, "ssl_seconds": t_ssl, "seconds": t,
                             "at_first_probe": t is not None and t == a["curve"][0]["seconds"],
                             "fraction_of_ssl_time": None if t is None else t / t_ssl})
            reached = [r for r in rows if r["seconds"] is not None]
            res["coopt_to_ssl_final"][arm][m] = {
                "per_seed": rows, "n": len(rows), "reached": len(reached),
                "target": R.mean_std([r["target"] for r in rows]),
                "ssl_seconds": R.mean_std([r["ssl_seconds"] for r in rows]),
                "seconds": R.mean_std([r["seconds"] for r in reached]),
                "fraction_of_ssl_time": R.mean_std([r["fraction_of_ssl_time"] for r in reached])}
    return res


# ---- collab: timed --------------------------------------------------------------------------------

def collab_run(work: Path, sc: Scale, priors: dict, k: int, seed: int) -> dict:
    """K participants with the same prior (only K varies): parallel processes, then each alone."""
    names = ("byol",) * k
    base = work / f"s{seed}" / f"collab-k{k}"
    ds = data_side(base / "run", sc, priors, names, seed)
    alone = []
    for i in range(k):  # the same extraction with the machine to itself: one participant's own machine
        solo = base / f"solo{i}"
        if solo.exists():
            shutil.rmtree(solo)
        solo.mkdir(parents=True)
        shutil.copy(base / "run" / "plan.json", solo / "plan.json")
        t0 = time.perf_counter()
        _extract_in_parallel(solo, [(f"p{i}", i, prior_spec(priors, "byol"), seed)], solo, "cpu")
        alone.append(time.perf_counter() - t0)
        shutil.rmtree(solo)
    other = ds["seconds"] - ds["steps"]["extract"]
    return {"k": k, "seed": seed, "wall": ds["seconds"], "extract": ds["steps"]["extract"], "steps": ds["steps"],
            "alone": alone, "separate_machines": max(alone) + other}


def collab_result(work: Path, sc: Scale, env: dict) -> dict:
    ks = []
    base = {seed: load_job(work, f"collab-s{seed}-k1")["wall"] for seed in sc.seeds}
    for k in sc.collab_ks:
        per = [load_job(work, f"collab-s{seed}-k{k}") for seed in sc.seeds]
        ks.append({"k": k, "per_seed": per, "wall": R.mean_std([p["wall"] for p in per]),
                   "speedup": R.mean_std([base[p["seed"]] / p["wall"] for p in per]),
                   "separate_machines": R.mean_std([p["separate_machines"] for p in per]),
                   "separate_speedup": R.mean_std([base[p["seed"]] / p["separate_machines"] for p in per])})
    return {"env": env, "seeds": list(sc.seeds), "ks": ks,
            "setting": f"every participant holds the byol prior; D = {sc.d_size} images split K ways; wall = split + "
                       "extraction as K parallel processes + score + align + merge. 'Own machine' runs each "
                       "participant's extraction alone on this 2-core machine and takes the slowest."}


# ---- untimed ablation jobs (run in the pool) ------------------------------------------------------

def train_and_probe(run: Path, out: Path, sc: Scale, seed: int) -> dict:
    st = student(run, out, sc, seed)
    p = probe_ckpt(st["checkpoint"], sc)
    return {"linear": p["linear"], "knn": p["knn"], "loss": st["loss"], "trace": st["trace"]}


def effective_rank_of_store(run: Path) -> float:
    import h5py

    with h5py.File(run / "merged.h5", "r") as f:
        y = f["targets"][:].astype(np.float32)
    return prior_scores.effective_rank(y)


def realign(src: Path, base: Path, sc: Scale, seed: int, reference: str) -> dict:
    """Copy a finished run's features, align them to `reference` (a participant, or none), merge,
    train and probe a fresh student: everything but the reference held fixed."""
    if base.exists():
        shutil.rmtree(base)
    run = base / "run"
    run.mkdir(parents=True)
    shutil.copy(src / "plan.json", run / "plan.json")
    for pdir in (src / "participants").iterdir():  # features only: align and merge are redone
        (run / "participants" / pdir.name).mkdir(parents=True)
        shutil.copy(pdir / "features.h5", run / "participants" / pdir.name / "features.h5")
        manifest = json.loads((pdir / "manifest.json").read_text())
        (run / "participants" / pdir.name / "manifest.json").write_text(
            json.dumps({"features.h5": manifest["features.h5"]}))
    al = align(run, dim=sc.dim, reference=reference, progress=False)
    merge(run, progress=False)
    r = train_and_probe(run, base / "student", sc, seed)
    return {"seed": seed, "reference": al["reference"] or "none", "warnings": al.get("warnings", []),
            "residuals": {p["participant"]: p["residual"] for p in al["participants"]}, **r}


def fig4d_job(work: str, sc: Scale, seed: int, reference: str) -> dict:
    """The label-free arm's features aligned to one participant (or none)."""
    work = Path(work)
    src = Path(load_job(work, f"t2-s{seed}-label_free")["run"])
    return realign(src, work / f"s{seed}" / f"fig4d-{reference}", sc, seed, reference)


def g_job(work: str, seed: int, run: str) -> dict:
    """G before/after alignment of one run, by each two-sample test (MLP: the default)."""
    out = {"seed": seed, "run": run}
    for clf in ("mlp", "knn", "linear"):
        ins = inspect(run, plot=False, classifier=clf)
        out[clf] = {**ins["inconsistency"], "ci95": ins["inconsistency_ci95"]}
    return out


def refchoice_src(work: Path, arm: str, seed: int) -> Path:
    if arm == "label_using":
        return Path(load_job(work, f"t2-s{seed}-label_using")["run"])
    return work / f"s{seed}" / arm / "run"


def refchoice_jobs(work: Path, sc: Scale) -> list:
    """One realignment per (arm, seed, participant some score picks as the reference)."""
    jobs = []
    for s in sc.seeds:
        for arm in sc.refchoice_arms:
            picks = score(refchoice_src(work, arm, s))["picks"]
            for ref in sorted(set(picks.values()) | {"consensus"}):
                jobs.append((f"refchoice-s{s}-{arm}-{ref}", "refchoice_job",
                             dict(work=str(work), sc=sc, seed=s, arm=arm, reference=ref)))
    return jobs


def refchoice_job(work: str, sc: Scale, seed: int, arm: str, reference: str) -> dict:
    work = Path(work)
    return realign(refchoice_src(work, arm, seed), work / f"s{seed}" / f"refchoice-{arm}-{reference}",
                   sc, seed, reference)


def arm_job(work: str, sc: Scale, seed: int, tag: str, names: list, fraction: float | None = None) -> dict:
    """A whole COOPT run in this process (untimed): data side, student, probe."""
    work = Path(work)
    priors = prior_table_loaded(work)
    base = work / f"s{seed}" / tag
    ds = data_side(base / "run", sc, priors, names, seed, fraction=fraction, parallel=False)
    r = train_and_probe(base / "run", base / "student", sc, seed)
    erank = effective_rank_of_store(base / "run")
    return {"seed": seed, "tag": tag, "participants": list(names), "reference": ds["reference"],
            "shared_size": ds["shared_size"], "residuals": ds["residuals"], "uniformity": ds["participants"],
            "effective_rank": erank, **r}


def rounds_job(work: str, sc: Scale, seed: int) -> dict:
    """Figure 3b: round 0 everyone random; each later round one participant re-extracts with a
    better prior (extract --round r archives its previous round); align, merge, train, probe."""
    work = Path(work)
    priors = prior_table_loaded(work)
    base = work / f"s{seed}" / "rounds"
    if base.exists():
        shutil.rmtree(base)
    run = base / "run"
    current = list(ROUND_START)
    names = [f"p{i}" for i in range(4)]  # a participant keeps its name across rounds
    split(DATA, run, participants=4, shared_fraction=sc.shared_fraction, seed=seed, limit=sc.d_size)
    for k in range(4):  # random convnets of their own: the init seed differs per participant
        extract(run, names[k], k, "convnet", seed=seed * 10 + k, workers=1, progress=False)
    out = []
    for r in range(len(ROUND_UPGRADES) + 1):
        upgrade = "—"
        if r > 0:
            who, new = ROUND_UPGRADES[r - 1]
            current[who] = new
            extract(run, names[who], who, prior_spec(priors, new), round=r, seed=seed, workers=1, progress=False)
            upgrade = f"p{who} → {new}"
        al = align(run, dim=sc.dim, progress=False, force=True)  # the upgrade moved the consensus S*
        mg = merge(run, progress=False, force=True)
        res = train_and_probe(run, base / f"student-r{r}", sc, seed)
        out.append({"round": r, "upgrade": upgrade, "priors": list(current), "reference": al["reference"],
                    "rounds": mg.get("rounds"), **{k: res[k] for k in ("linear", "knn", "loss")}})
    return {"seed": seed, "rounds": out}


def scores_job(work: str, sc: Scale, seed: int) -> dict:
    """Every prior's label-free scores on this seed's S (the label-free arm's shared set)."""
    work = Path(work)
    priors = prior_table_loaded(work)
    plan = json.loads((Path(load_job(work, f"t2-s{seed}-label_free")["run"]) / "plan.json").read_text())
    ds = load_dataset(DATA)
    s_idx = np.asarray(plan["shared"], dtype=np.int64)
    sub = Dataset(spec=DATA, images=ds.images[s_idx], labels=ds.labels[s_idx], classes=ds.classes)
    out = {}
    for name in list(priors) + ["labels"]:
        if name == "labels":
            f = torch.nn.functional.one_hot(torch.from_numpy(sub.labels), 10).float()
        else:
            f = features(load_frozen(priors[name]["checkpoint"]), sub, torch.device("cpu"), progress=False)
        out[name] = prior_scores.all_scores(f)
    return {"seed": seed, "shared_size": len(s_idx), "scores": out}


def prior_table_loaded(work: Path) -> dict:
    return json.loads((work / "priors.json").read_text())


# ---- results of the pool jobs ---------------------------------------------------------------------

def fig3c_result(work: Path, sc: Scale, env: dict, priors: dict) -> dict:
    names = list(priors)
    per_seed = [load_job(work, f"scores-s{seed}") for seed in sc.seeds]
    rows = []
    for nm in names:
        p = load_job(work, probe_name(priors[nm]["checkpoint"]))
        rows.append({"name": nm, "recipe": priors[nm]["recipe"], "saw_labels": nm in SAW_LABELS,
                     "linear": p["linear"], "knn": p["knn"], "train_seconds": priors[nm]["seconds"],
                     "scores": {s: per_seed[0]["scores"][nm][s] for s in SCORES},
                     "scores_per_seed": {s: [ps["scores"][nm][s] for ps in per_seed] for s in SCORES}})
    acc = [r["linear"] for r in rows]
    spear = {}
    for s in SCORES:
        rhos = [R.spearman([ps["scores"][nm][s] for nm in names], acc) for ps in per_seed]
        spear[s] = {"rho": R.mean_std(rhos), "per_seed": rhos, "sign": SCORE_SIGN[s]}
    knn = [r["knn"] for r in rows]
    spear_knn = {s: {"rho": R.mean_std([R.spearman([ps["scores"][nm][s] for nm in names], knn) for ps in per_seed])}
                 for s in SCORES}
    boot = R.bootstrap_spearman({s: [[ps["scores"][nm][s] for nm in names] for ps in per_seed] for s in SCORES},
                                acc, n_boot=2000, seed=0, sign=SCORE_SIGN)
    best = max(SCORES, key=lambda s: boot["agreement"][s]["point"])
    labels = {"scores": {s: float(np.mean([ps["scores"]["labels"][s] for ps in per_seed])) for s in SCORES}}
    return {"env": env, "seeds": list(sc.seeds), "score_names": list(SCORES), "priors": rows, "spearman": spear,
            "spearman_knn": spear_knn,
            "bootstrap": boot, "best_score": best, "labels": labels,
            "setting": f"{len(names)} priors trained on P (or random); scores on each seed's S "
                       f"(|S| = {per_seed[0]['shared_size']}); accuracy = the prior's own linear probe"}


def arms_result(work: Path, sc: Scale, jobs: dict[str, list[str]]) -> list[dict]:
    """name -> job names per seed; mean ± std of the usual numbers."""
    out = []
    for name, names in jobs.items():
        per = [load_job(work, n) for n in names]
        out.append({"name": name, "per_seed": per, "linear": R.mean_std([p["linear"] for p in per]),
                    "knn": R.mean_std([p["knn"] for p in per])})
    return out


def g_name(run: Path) -> str:
    return f"g-{hashlib.sha256(str(run).encode()).hexdigest()[:12]}"


def g_jobs(work: Path, runs: list[tuple[int, Path]]) -> list:
    return [(g_name(r), "g_job", dict(work=str(work), seed=s, run=str(r))) for s, r in runs]


def fig4d_runs(work: Path, sc: Scale) -> list[tuple[int, str, Path]]:
    return [(s, k, work / f"s{s}" / f"fig4d-{k}" / "run") for s in sc.seeds for k in FIG4D_REFS]


def _realigned_arm(work: Path, name: str, per: list[dict], runs: list[Path], picks: list[dict]) -> dict:
    """mean ± std over seeds of one realignment: accuracy, store rank, G (both estimators)."""
    gs = [load_job(work, g_name(r)) for r in runs]
    return {"name": name, "per_seed": per, "linear": R.mean_std([p["linear"] for p in per]),
            "knn": R.mean_std([p["knn"] for p in per]),
            "effective_rank": R.mean_std([effective_rank_of_store(r) for r in runs]),
            "picked_by": sorted({sc_ for pk in picks for sc_, ref in pk.items() if ref == name}),
            "reference_names": [p["reference"] for p in per],
            **{f"g_{when}{'' if clf == 'mlp' else '_' + clf}": R.mean_std([g[clf][when] for g in gs])
               for clf in ("mlp", "knn", "linear") for when in ("before", "after")},
            "g_after_ci95": [float(np.mean([g["mlp"]["ci95"]["after"][i] for g in gs])) for i in (0, 1)],
            "loss": R.mean_std([p["loss"] for p in per]), "loss_curve": per[0]["trace"]}


def fig4d_result(work: Path, sc: Scale, env: dict) -> dict:
    picks = [score(Path(load_job(work, f"t2-s{s}-label_free")["run"]))["picks"] for s in sc.seeds]
    arms = []
    for key in FIG4D_REFS:
        per = [load_job(work, f"fig4d-s{s}-{key}") for s in sc.seeds]
        arm = _realigned_arm(work, key, per, [work / f"s{s}" / f"fig4d-{key}" / "run" for s in sc.seeds], picks)
        arms.append({**arm, "reference_kind": key})
    return {"env": env, "seeds": list(sc.seeds), "arms": arms, "participants": list(LABEL_FREE), "picks": picks,
            "setting": "the label-free arm's features aligned to each participant in turn, or not aligned "
                       "(projection only); G = mean pairwise tv_lower_bound (MLP two-sample test; _knn, _linear: the kNN test and "
                       "the logistic one the MLP replaced); 'picked by' = the scores on S whose best is that participant"}


def refchoice_result(work: Path, sc: Scale, env: dict) -> dict:
    out = {}
    for arm in sc.refchoice_arms:
        picks = [score(refchoice_src(work, arm, s))["picks"] for s in sc.seeds]
        rows = []
        for sname in SCORES + ("consensus",):
            refs = [pk[sname] if sname in pk else "consensus" for pk in picks]
            per = [load_job(work, f"refchoice-s{s}-{arm}-{r}") for s, r in zip(sc.seeds, refs)]
            runs = [work / f"s{s}" / f"refchoice-{arm}-{r}" / "run" for s, r in zip(sc.seeds, refs)]
            rows.append({**_realigned_arm(work, "/".join(sorted(set(refs))), per, runs, picks),
                         "score": (sname + (" (best's default)" if sname == prior_scores.DEFAULT_SCORE else "")
                                   if sname in SCORES else "— (--reference consensus)"),
                         "default": sname == "consensus"})
        out[arm] = rows
    return {"env": env, "seeds": list(sc.seeds), "arms": out, "default_score": prior_scores.DEFAULT_SCORE,
            "default_reference": "consensus",
            "participants": {"label_using": list(LABEL_USING), "t5-labels": list(TABLE5["+labels"])},
            "setting": "each arm's features aligned to the participant each score on S picks; student, store "
                       "effective rank (of the merged z-scorable targets) and G as in fig4d"}


def table5_result(work: Path, sc: Scale, env: dict) -> dict:
    jobs = {"base": [f"t5-s{s}-base" for s in sc.seeds], "+labels": [f"t5-s{s}-labels" for s in sc.seeds],
            "+weak": [f"t5-s{s}-weak" for s in sc.seeds]}
    arms = []
    for a in arms_result(work, sc, jobs):
        per = a["per_seed"]
        arms.append({**a, "participants": list(TABLE5[a["name"]]), "reference_names": [p["reference"] for p in per],
                     "effective_rank": R.mean_std([p["effective_rank"] for p in per])})
    return {"env": env, "seeds": list(sc.seeds), "arms": arms,
            "setting": "label-free participants, then + a human-labels participant, or + two weak ones; "
                       "D re-split K ways; reference = best by U on S"}


def fig5_result(work: Path, sc: Scale, env: dict) -> dict:
    arms = []
    for f in sc.fractions:
        for a in arms_result(work, sc, {f: [f"fig5-s{s}-f{f}" for s in sc.seeds]}):
            per = a["per_seed"]
            arms.append({**a, "shared_fraction": f, "shared_size": per[0]["shared_size"],
                         "residual": R.mean_std([float(np.mean([v for v in p["residuals"].values() if v > 0] or [0]))
                                                 for p in per])})
    return {"env": env, "seeds": list(sc.seeds), "arms": arms, "participants": list(LABEL_FREE),
            "setting": "label-free participants; |S| = round(f N); align's default ridge"}


def fig3b_result(work: Path, sc: Scale, env: dict) -> dict:
    per = [load_job(work, f"rounds-s{s}") for s in sc.seeds]
    rounds = []
    for i, r in enumerate(per[0]["rounds"]):
        vals = [p["rounds"][i] for p in per]
        rounds.append({"round": r["round"], "upgrade": r["upgrade"], "priors": r["priors"],
                       "references": [v["reference"] for v in vals],
                       "linear": R.mean_std([v["linear"] for v in vals]), "knn": R.mean_std([v["knn"] for v in vals]),
                       "per_seed": vals})
    return {"env": env, "seeds": list(sc.seeds), "rounds": rounds,
            "setting": "4 participants starting from random convnets; one upgrade per round (extract --round r); "
                       "align all, merge each participant's latest round, train and probe a fresh student"}


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes, one seed (<= 10 minutes on 2 cores)")
    ap.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2; --quick: 0)")
    ap.add_argument("--work", help="scratch folder (default runs/paper or runs/paper-quick); jobs cached there")
    ap.add_argument("--results", help="where paper.json/.md/.png go (default bench/results; --quick: WORK/results)")
    ap.add_argument("--only", help=f"comma-separated experiments from {','.join(R.EXPERIMENTS)}")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild paper.json/.md/.png from the cached jobs (keeps the recorded run's wall time)")
    args = ap.parse_args(argv)

    sc = QUICK if args.quick else FULL
    if args.seeds:
        sc = replace(sc, seeds=tuple(int(s) for s in args.seeds.split(",")))
    work = Path(args.work or ROOT / "runs" / ("paper-quick" if args.quick else "paper")).resolve()
    results = Path(args.results) if args.results else (work / "results" if args.quick else ROOT / "bench" / "results")
    only = set(args.only.split(",")) if args.only else set(R.EXPERIMENTS)
    bad = only - set(R.EXPERIMENTS)
    if bad:
        ap.error(f"--only: unknown {sorted(bad)}")
    os.environ.setdefault("COOPT_PROGRESS", "0")
    work.mkdir(parents=True, exist_ok=True)
    env0 = environment()
    log(f"{sc.name} run, seeds {list(sc.seeds)}, work {work}; {env0['hardware']}; load {env0['load_average']}")

    out_json = results / "paper.json"
    if args.report_only:
        if not (work / "priors.json").exists() or not out_json.exists():
            ap.error(f"--report-only: no finished run in {work} / {out_json}")
        old = json.loads(out_json.read_text())
        priors = prior_table_loaded(work)
        return report(work, sc, priors, results, only, old["meta"], quick=args.quick)

    # 1. priors, timed alone (their seconds are the all-in accounting)
    priors = prior_table(work, sc)
    _write_json(work / "priors.json", priors)

    # 2. the timed experiments, alone on the machine
    if "table2" in only or {"fig4d", "fig3c", "refchoice"} & only:  # these build on table2's runs
        table2_timed(work, sc, priors)
    if "collab" in only:
        for seed in sc.seeds:
            for k in sc.collab_ks:
                cached(work, f"collab-s{seed}-k{k}", collab_run, work, sc, priors, k, seed)

    # 3. untimed work, two single-threaded processes at a time
    jobs = []
    if "table2" in only:
        jobs += table2_probe_jobs(work, sc)
    if "fig3c" in only:
        jobs += [(probe_name(p["checkpoint"]), "probe_ckpt", dict(ckpt=p["checkpoint"], sc=sc)) for p in priors.values()]
        jobs += [(f"scores-s{s}", "scores_job", dict(work=str(work), sc=sc, seed=s)) for s in sc.seeds]
    if "fig3b" in only:  # the longest jobs first, so the pool's tail is short
        jobs += [(f"rounds-s{s}", "rounds_job", dict(work=str(work), sc=sc, seed=s)) for s in sc.seeds]
    if "table5" in only or "refchoice" in only:  # refchoice realigns table5's +labels arm
        for s in sc.seeds:
            for tag, key in (("base", "base"), ("labels", "+labels"), ("weak", "+weak")):
                jobs.append((f"t5-s{s}-{tag}", "arm_job", dict(work=str(work), sc=sc, seed=s, tag=f"t5-{tag}",
                                                               names=list(TABLE5[key]))))
    if "fig5" in only:
        for s in sc.seeds:
            for f in sc.fractions:
                jobs.append((f"fig5-s{s}-f{f}", "arm_job", dict(work=str(work), sc=sc, seed=s, tag=f"fig5-f{f}",
                                                                names=list(LABEL_FREE), fraction=f)))
    if "fig4d" in only:
        jobs += [(f"fig4d-s{s}-{k}", "fig4d_job", dict(work=str(work), sc=sc, seed=s, reference=k))
                 for s, k, _ in fig4d_runs(work, sc)]
    seen, unique = set(), []
    for j in jobs:
        if j[0] not in seen:
            seen.add(j[0])
            unique.append(j)
    run_pool(work, [j for j in unique if j[1] in ("probe_ckpt", "scores_job")])
    run_pool(work, [j for j in unique if j[1] not in ("probe_ckpt", "scores_job")])
    # what builds on the pool's runs: realignments of table5's arm, G of every realigned run
    later = refchoice_jobs(work, sc) if "refchoice" in only else []
    run_pool(work, later)
    runs = [(s, r) for s, _, r in fig4d_runs(work, sc)] if "fig4d" in only else []
    runs += [(j[2]["seed"], work / f"s{j[2]['seed']}" / f"refchoice-{j[2]['arm']}-{j[2]['reference']}" / "run")
             for j in later]
    run_pool(work, g_jobs(work, runs))

    # 4. results
    meta = {"env": environment(), "env_at_start": env0, "wall_seconds": time.perf_counter() - T_START}
    if args.only and out_json.exists():  # a subset: the other experiments stay as they were
        meta["partial_rerun"] = sorted(only)
    return report(work, sc, priors, results, only, meta, quick=args.quick, merge_with=bool(args.only))


def report(work: Path, sc: Scale, priors: dict, results: Path, only: set, meta: dict, quick: bool,
           merge_with: bool = True) -> int:
    out_json = results / "paper.json"
    env = meta["env"]
    result = json.loads(out_json.read_text()) if out_json.exists() and merge_with else {}
    result["meta"] = {**meta, "quick": quick, "seeds": list(sc.seeds), "scale": asdict(sc),
                      "priors": {k: {kk: v[kk] for kk in ("recipe", "seconds", "run")} for k, v in priors.items()},
                      "arms": {"label_free": list(LABEL_FREE), "label_using": list(LABEL_USING)},
                      "setting": f"D = first {sc.d_size} Fashion-MNIST train images; priors trained on train images "
                                 f"[{sc.p_start}, 60000) (disjoint from D); probes: linear + kNN (k=20) trained on the "
                                 f"first {sc.probe_train} train images, tested on {sc.probe_test} test images; "
                                 f"seeds vary the split, S, projections, student and SSL runs (priors fixed)."}
    builders = {"table2": lambda: table2_result(work, sc, env), "collab": lambda: collab_result(work, sc, env),
                "fig3c": lambda: fig3c_result(work, sc, env, priors), "fig4d": lambda: fig4d_result(work, sc, env),
                "table5": lambda: table5_result(work, sc, env), "fig5": lambda: fig5_result(work, sc, env),
                "fig3b": lambda: fig3b_result(work, sc, env), "refchoice": lambda: refchoice_result(work, sc, env)}
    for exp in R.EXPERIMENTS:
        if exp in only:
            result[exp] = builders[exp]()
    missing = R.check_schema(result)
    _write_json(out_json, result)
    (results / "paper.md").write_text(R.markdown(result))
    figs = R.plots(result, results)
    log(f"wrote {out_json}, {results / 'paper.md'}, {len(figs)} figures; run wall {meta['wall_seconds']:.0f} s")
    if missing:
        log(f"incomplete: {', '.join(missing)} (run the missing experiments to complete paper.json)")
    print(R.markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
