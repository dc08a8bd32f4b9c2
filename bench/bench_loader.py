"""Benchmark StoreLoader: shuffled batches from the merged store vs the alternatives.

    python bench/bench_loader.py                 # N = 1,000,000 rows (1.8 GB store under bench/scratch/)
    python bench/bench_loader.py --rows 300000   # smaller

Store: the merged format (format_version 1, complete, targets float16 [N, 512] and images uint8
[N, 28, 28, 1] contiguous, index, participant, target_mean/std), written the way merge._write does:
h5py layout (store.create_contiguous) then the bulk bytes through np.memmap. Write GB/s covers
layout + memmap writes + flush (msync) + publish; the synthetic rows are generated outside it.

Providers, shuffled (epoch_permutation(N, seed=0, epoch)), fields images + targets:
  storeloader  coopt_fast.loader.StoreLoader, device cpu, a whole epoch
  memmap       the limit: np.memmap row gathers of the same bytes in the same permutation (precomputed)
  h5py         h5py fancy indexing per batch with the batch's indices sorted (--h5py-batches batches)
  persample    torch DataLoader as users run it: --persample-workers worker processes (default 2,
               this machine's cores), persistent_workers, pin_memory on CUDA, prefetch 2 batches
               per worker, over a Dataset whose __getitem__ reads one row of each field through
               h5py (each worker opens the file itself); the shuffled order comes from a sampler
               whose epoch is set before each pass (--persample-batches batches). Workers start
               once, before the clock (persistent: what an epoch loop pays after the first epoch)
Training with a trivial model (`train --student linear`: 4x4 pooling + one linear layer, so the
step is augmentation + optimizer, not a network), --train-steps steps per run, two feeds:
  train        the real train(): StoreLoader over the store; the time spent inside the loader's
               next() is recorded (what the step waits on the store)
  train_ram    the same train() with the loader swapped for one holding the same batches,
               gathered before the clock starts: the loop's rate when the store costs nothing
Targets: train / train_ram >= 0.9 (the trainer does not wait on the store); train / storeloader
is printed too (the issue's literal "equals the loader's rate"; on a CPU the step itself is
slower than the gather, so that ratio measures the step, not the store).
--device cuda (a GPU machine): StoreLoader runs twice, staged (pinned double-buffered copies,
resident=False) and resident (the store uploaded once, gathers on the GPU); train/train_ram
run on the GPU; memmap stays the host-side limit; h5py is skipped, persample pins its batches.
Times: one warm-up, then --repeats rounds (providers interleaved), medians. The store fits in RAM
(page cache) after the first pass, so these are warm-cache numbers; a cold-ish pass (file evicted
with posix_fadvise(DONTNEED) after fsync) is reported separately for StoreLoader and sequential read.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from coopt_fast import store  # noqa: E402
from coopt_fast.loader import StoreLoader, epoch_permutation  # noqa: E402

DIM, IMG = 512, (28, 28, 1)
ROW_BYTES = DIM * 2 + int(np.prod(IMG))
BLOCK = 65536


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_store(path: Path, n: int) -> dict:
    rng = np.random.default_rng(0)
    # Synthetic blocks generated once, outside the timing; each block is made distinct by a row stamp.
    tg_block = rng.standard_normal((BLOCK, DIM), dtype=np.float32).astype(np.float16)
    im_block = rng.integers(0, 256, (BLOCK,) + IMG, dtype=np.uint8)
    part = store.partial_path(path)
    path.unlink(missing_ok=True)
    part.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with h5py.File(part, "w") as f:
        for k, v in store.provenance(dataset="synthetic", limit=-1, dim=DIM, target_dtype="float16").items():
            f.attrs[k] = v
        store.write_merged_meta(f, [{"name": "a"}, {"name": "b"}], {"n": n, "sha256": "synthetic"})
        store.create_contiguous(f, "targets", (n, DIM), np.float16)
        store.create_contiguous(f, "images", (n,) + IMG, np.uint8)
        f.create_dataset("index", data=np.arange(n, dtype=np.int64))
        f.create_dataset("participant", data=(np.arange(n) % 2).astype(np.int16))
        f.create_dataset("target_mean", data=np.zeros(DIM, np.float32))
        f.create_dataset("target_std", data=np.ones(DIM, np.float32))
    t_layout = time.perf_counter() - t0
    tg = store.memmap(part, "targets", mode="r+")
    for b in range(0, n, BLOCK):
        m = min(BLOCK, n - b)
        tg[b : b + m] = tg_block[:m]
        tg[b : b + m, 0] = np.arange(b, b + m) % 2048  # row stamp (exact in fp16)
    tg.flush()
    del tg
    im = store.memmap(part, "images", mode="r+")
    for b in range(0, n, BLOCK):
        m = min(BLOCK, n - b)
        im[b : b + m] = im_block[:m]
        im[b : b + m, 0, 0, 0] = (np.arange(b, b + m) % 256).astype(np.uint8)
    im.flush()
    del im
    store.publish(h5py.File(part, "r+"), path)
    t_total = time.perf_counter() - t0
    t1 = time.perf_counter()
    evict(path)  # fsync: the bytes reach the disk
    t_fsync = time.perf_counter() - t1
    gb = n * ROW_BYTES / 1e9
    return {"bytes": n * ROW_BYTES, "file_bytes": path.stat().st_size, "layout_s": t_layout, "seconds": t_total,
            "gb_per_s": gb / t_total, "fsync_s": t_fsync, "gb_per_s_incl_fsync": gb / (t_total + t_fsync)}


def seq_read(path: Path) -> float:
    """Seconds to read both datasets front to back (through the memmap, copying blocks out)."""
    with h5py.File(path, "r") as f:
        arrs = [store.memmap_dataset(path, f[k]) for k in ("targets", "images")]
    t0 = time.perf_counter()
    s = 0
    for a in arrs:
        for b in range(0, a.shape[0], BLOCK):
            s += int(np.array(a[b : b + BLOCK]).view(np.uint8)[::4096].sum())
    return time.perf_counter() - t0


# ---- providers: each returns (rows, seconds) ----

def run_storeloader(ld, epoch, max_batches=None, max_s=None):
    """Iteration only: the loader is built outside the timing (its init is timed separately)."""
    ld.set_epoch(epoch)
    rows, t0 = 0, time.perf_counter()
    for i, batch in enumerate(ld):
        rows += batch["targets"].shape[0]
        if (max_batches and i + 1 >= max_batches) or (max_s and time.perf_counter() - t0 > max_s):
            break
    if ld.device.type == "cuda":
        torch.cuda.synchronize(ld.device)  # the last copies/gathers are asynchronous
    return rows, time.perf_counter() - t0


def run_memmap(arrs, order, bs, max_batches=None):
    tg, im = arrs
    nb = -(-len(order) // bs)
    if max_batches:
        nb = min(nb, max_batches)
    rows, t0 = 0, time.perf_counter()
    for b in range(nb):
        r = order[b * bs : (b + 1) * bs]
        t, i = tg[r], im[r]
        rows += len(t)
    return rows, time.perf_counter() - t0


def run_h5py(path, order, bs, nb):
    with h5py.File(path, "r") as f:
        tg, im = f["targets"], f["images"]
        rows, t0 = 0, time.perf_counter()
        for b in range(nb):
            r = np.sort(order[b * bs : (b + 1) * bs])
            t = torch.from_numpy(tg[r])
            i = torch.from_numpy(im[r])
            rows += len(t)
        return rows, time.perf_counter() - t0


class H5Dataset(torch.utils.data.Dataset):
    def __init__(self, path):
        self.path, self.f = path, None
        with h5py.File(path, "r") as f:
            self.n = f["targets"].shape[0]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.f is None:
            self.f = h5py.File(self.path, "r")
        return {"images": torch.from_numpy(self.f["images"][i]), "targets": torch.from_numpy(self.f["targets"][i])}


class EpochSampler(torch.utils.data.Sampler):
    """The first nb*bs indices of epoch_permutation(n, 0, epoch); set_epoch before each pass (as
    DistributedSampler): with persistent workers the sampler runs in the main process, so one
    DataLoader serves every epoch."""

    def __init__(self, n, count):
        self.n, self.count, self.epoch = n, count, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_permutation(self.n, 0, self.epoch)[: self.count].tolist())

    def __len__(self):
        return self.count


def persample_loader(ds, bs, nb, workers, pin):
    """A DataLoader as users run it; its workers started (one warm pass) before any timing."""
    sampler = EpochSampler(len(ds), nb * bs)
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=workers, pin_memory=pin,
                                     persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
    for _ in dl:  # starts the workers, opens each one's h5py file
        pass
    return dl


def run_persample(dl, epoch):
    dl.sampler.set_epoch(epoch)
    rows, t0 = 0, time.perf_counter()
    for batch in dl:
        rows += batch["targets"].shape[0]
    return rows, time.perf_counter() - t0


class TimedLoader(StoreLoader):
    """StoreLoader that adds the seconds spent producing each batch to TimedLoader.wait."""
    wait = 0.0

    def __iter__(self):
        it = super().__iter__()
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                TimedLoader.wait += time.perf_counter() - t0
            yield batch


class RamLoader(StoreLoader):
    """StoreLoader whose batches were all gathered in __init__ (before train's clock starts):
    the same batches in the same order as the real run, at no cost per step. (Replaying one
    batch instead is no baseline: the model fits it and the step's speed changes.)"""
    steps = 0

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cached = []
        for b in StoreLoader.__iter__(self):
            if len(self.cached) == RamLoader.steps:
                break
            self.cached.append(b)

    def __iter__(self):
        yield from self.cached[self.start_batch :]


def run_train(path, bs, steps, loader_cls, out, device="cpu"):
    """(samples/s, seconds waiting on the loader) of train(--student linear) for `steps` steps."""
    import coopt_fast.student as student

    saved, student.StoreLoader = student.StoreLoader, loader_cls
    TimedLoader.wait, RamLoader.steps = 0.0, steps
    try:
        r = student.train(path, student="linear", epochs=1, out=out, batch_size=bs, max_steps=steps, progress=False,
                          compile=False,  # a new model per run would recompile inside the clock
                          device=device)
    finally:
        student.StoreLoader = saved
    return r["samples_per_s"], r["seconds"], TimedLoader.wait


def breakdown(arrs, order, bs, nb=2000):
    """Per-batch microseconds of StoreLoader's steps (CPU device), measured in isolation."""
    tg, im = arrs
    nb = min(nb, len(order) // bs)
    out = {}
    t0 = time.perf_counter()
    for b in range(nb):
        tg[order[b * bs : (b + 1) * bs]]
    out["gather_targets_us"] = (time.perf_counter() - t0) / nb * 1e6
    t0 = time.perf_counter()
    for b in range(nb):
        im[order[b * bs : (b + 1) * bs]]
    out["gather_images_us"] = (time.perf_counter() - t0) / nb * 1e6
    x, y = tg[order[:bs]], im[order[:bs]]
    t0 = time.perf_counter()
    for b in range(nb):
        torch.from_numpy(x).to("cpu")
        torch.from_numpy(y).to("cpu")
    out["from_numpy_to_cpu_us"] = (time.perf_counter() - t0) / nb * 1e6
    t0 = time.perf_counter()
    epoch_permutation(len(order), 0, 0)
    out["randperm_epoch_ms"] = (time.perf_counter() - t0) * 1e3
    # sorted row indices: does the gather's access order matter?
    t0 = time.perf_counter()
    for b in range(nb):
        r = np.sort(order[b * bs : (b + 1) * bs])
        tg[r], im[r]
    out["gather_both_sorted_us"] = (time.perf_counter() - t0) / nb * 1e6
    # pure-RAM gather (np.ndarray copy of the first rows, not a memmap): page-mapping cost vs memory
    m = min(len(order), 200_000)
    tg_ram, im_ram = np.array(tg[:m]), np.array(im[:m])
    o = order[order < m]
    nbr = min(nb, len(o) // bs)
    t0 = time.perf_counter()
    for b in range(nbr):
        r = o[b * bs : (b + 1) * bs]
        tg_ram[r], im_ram[r]
    out["gather_both_ram_us"] = (time.perf_counter() - t0) / nbr * 1e6
    try:
        torch.from_numpy(x).pin_memory()
        out["pin_memory"] = "available"
    except Exception as e:  # no CUDA: pinning is not possible (StoreLoader only pins for cuda devices)
        out["pin_memory"] = f"unavailable: {type(e).__name__}"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", default="128,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--h5py-batches", type=int, default=100)
    ap.add_argument("--persample-batches", type=int, default=50)
    ap.add_argument("--persample-workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="DataLoader worker processes of the per-sample baseline (0: in the main process)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: StoreLoader staged and resident, train on the GPU")
    ap.add_argument("--train-steps", type=int, default=1500, help="steps per train run (0: skip the train rows)")
    ap.add_argument("--cold-seconds", type=float, default=30.0, help="cap on the cold StoreLoader pass")
    ap.add_argument("--out", default=str(ROOT / "bench/results/loader.json"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch store")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    n, sizes = args.rows, [int(b) for b in args.batch.split(",")]
    scratch = ROOT / "bench/scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"loader_{n}.h5"
    cuda = args.device.startswith("cuda")
    res = {"rows": n, "row_bytes": ROW_BYTES, "device": args.device, "dim": DIM, "image_shape": list(IMG), "repeats": args.repeats,
           "load_start": os.getloadavg()}

    print(f"writing {n:,} rows ({n * ROW_BYTES / 1e9:.2f} GB) to {path} ...", flush=True)
    res["write"] = w = write_store(path, n)
    print(f"write: {w['gb_per_s']:.2f} GB/s ({w['seconds']:.1f} s, layout {w['layout_s'] * 1e3:.0f} ms); "
          f"+fsync {w['fsync_s']:.1f} s -> {w['gb_per_s_incl_fsync']:.2f} GB/s", flush=True)

    # cold-ish passes: file evicted from the page cache after fsync
    evict(path)
    t0 = time.perf_counter()
    ld = StoreLoader(path, 1024)
    init_cold = time.perf_counter() - t0  # reads all targets once (finite check)
    evict(path)  # init warmed the targets: evict again so the pass itself is cold
    rows, s = run_storeloader(ld, 0, max_s=args.cold_seconds)
    res["cold_storeloader_b1024"] = {"rows": rows, "seconds": s, "rows_per_s": rows / s,
                                     "gb_per_s": rows * ROW_BYTES / s / 1e9, "init_cold_s": init_cold}
    print(f"cold StoreLoader b1024: {rows / s:,.0f} rows/s over {rows:,} rows", flush=True)
    evict(path)
    s = seq_read(path)
    res["seq_read_cold"] = {"seconds": s, "gb_per_s": n * ROW_BYTES / s / 1e9}
    s = statistics.median(seq_read(path) for _ in range(args.repeats))
    res["seq_read_warm"] = {"seconds": s, "gb_per_s": n * ROW_BYTES / s / 1e9}
    print(f"sequential read: cold {res['seq_read_cold']['gb_per_s']:.2f} GB/s, warm {res['seq_read_warm']['gb_per_s']:.2f} GB/s", flush=True)

    t0 = time.perf_counter()
    StoreLoader(path, 128)
    res["storeloader_init_s"] = time.perf_counter() - t0  # warm; includes the finite check over all targets

    with h5py.File(path, "r") as f:
        arrs = (store.memmap_dataset(path, f["targets"]), store.memmap_dataset(path, f["images"]))
    # correctness: StoreLoader's first batch equals memmap gather in the same permutation
    order0 = epoch_permutation(n, 0, 0).numpy()
    b0 = next(iter(StoreLoader(path, 128)))
    assert np.array_equal(b0["targets"].numpy(), arrs[0][order0[:128]]) and np.array_equal(b0["images"].numpy(), arrs[1][order0[:128]])

    ds = H5Dataset(path)
    res["batches"] = {}
    for bs in sizes:
        loader = StoreLoader(path, bs, fields=("images", "targets"), seed=0)
        nb_h5 = min(args.h5py_batches, n // bs)
        nb_ps = min(args.persample_batches, n // bs)
        cases = {
            "storeloader": lambda e: run_storeloader(loader, e),
            "memmap": lambda e: run_memmap(arrs, epoch_permutation(n, 0, e).numpy(), bs),
            "h5py": lambda e: run_h5py(path, epoch_permutation(n, 0, e).numpy(), bs, nb_h5),
            "persample": lambda e: run_persample(dl, e),
        }
        dl = persample_loader(ds, bs, nb_ps, args.persample_workers, pin=cuda)
        if cuda:  # host-side baselines other than the memmap limit say nothing new on a GPU machine
            loader = StoreLoader(path, bs, fields=("images", "targets"), seed=0, device=args.device, resident=False)
            resident = StoreLoader(path, bs, fields=("images", "targets"), seed=0, device=args.device, resident=True)
            del cases["h5py"]
            cases["resident"] = lambda e: run_storeloader(resident, e)
        times = {k: [] for k in cases}
        for rnd in range(args.repeats + 1):  # round 0 = warm-up
            names = list(cases)
            names = names[rnd % len(names):] + names[: rnd % len(names)]
            for k in names:
                rows, s = cases[k](rnd)
                if rnd:
                    times[k].append((rows, s))
        del dl  # its persistent workers end here
        r = {"load": os.getloadavg(), "h5py_batches": nb_h5, "persample_batches": nb_ps,
             "persample_workers": args.persample_workers}
        for k, v in times.items():
            rps = statistics.median(rows / s for rows, s in v)
            r[k] = {"rows": v[0][0], "seconds": [s for _, s in v], "rows_per_s": rps, "gb_per_s": rps * ROW_BYTES / 1e9}
        r["ratio_storeloader_memmap"] = r["storeloader"]["rows_per_s"] / r["memmap"]["rows_per_s"]
        for k in ("h5py", "persample", "resident"):
            if k in r:
                r[f"ratio_storeloader_{k}"] = r["storeloader"]["rows_per_s"] / r[k]["rows_per_s"]
        r["breakdown"] = breakdown(arrs, order0, bs)
        if args.train_steps:
            steps = min(args.train_steps, n // bs)
            tr = {"train": [], "train_ram": []}
            for rnd in range(args.repeats + 1):  # round 0 = warm-up; feeds alternate who goes first
                feeds = [("train", TimedLoader), ("train_ram", RamLoader)][:: 1 if rnd % 2 else -1]
                for k, cls in feeds:
                    out = run_train(path, bs, steps, cls, scratch / f"train_{k}", args.device)
                    if rnd:
                        tr[k].append(out)
            for k, v in tr.items():
                r[k] = {"steps": steps, "rows_per_s": statistics.median(x[0] for x in v),
                        "seconds": [x[1] for x in v], "loader_wait_s": [x[2] for x in v]}
            r["train"]["loader_wait_fraction"] = statistics.median(x[2] / x[1] for x in tr["train"])
            r["ratio_train_train_ram"] = r["train"]["rows_per_s"] / r["train_ram"]["rows_per_s"]
            r["ratio_train_storeloader"] = r["train"]["rows_per_s"] / r["resident" if cuda else "storeloader"]["rows_per_s"]
        res["batches"][str(bs)] = r
        print(f"batch {bs} done", flush=True)

    res["targets"] = {"storeloader_over_memmap_min": 0.9, "storeloader_over_h5py_min": 50, "train_over_train_ram_min": 0.9}
    res["meets"] = {bs: {"memmap": r["ratio_storeloader_memmap"] >= 0.9,
                         **({"h5py": r["ratio_storeloader_h5py"] >= 50} if "h5py" in r else {}),
                         **({"train": r["ratio_train_train_ram"] >= 0.9} if "train" in r else {})}
                    for bs, r in res["batches"].items()}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    res["hardware"] = {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
                       "torch": torch.__version__, "h5py": h5py.__version__, "numpy": np.__version__, "hdf5": h5py.version.hdf5_version}
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    res["commit"] = commit
    res["load_end"] = os.getloadavg()
    res["page_cache_note"] = ("the store fits in RAM: every provider after the warm-up reads from the page cache; "
                              "cold_* numbers come from a pass right after posix_fadvise(DONTNEED)")

    print(f"\n{n:,} rows x {ROW_BYTES} B (512 fp16 + 28x28 uint8); medians of {args.repeats} after a warm-up; warm page cache")
    print(f"{'batch':>6} {'provider':<12} {'rows/s':>12} {'GB/s':>7} {'StoreLoader/x':>14}")
    for bs, r in res["batches"].items():
        for k in [k for k in ("storeloader", "resident", "memmap", "h5py", "persample") if k in r]:
            ratio = r["storeloader"]["rows_per_s"] / r[k]["rows_per_s"]
            print(f"{bs:>6} {k:<12} {r[k]['rows_per_s']:>12,.0f} {r[k]['gb_per_s']:>7.3f} {ratio:>14.2f}")
        if "train" in r:
            print(f"{bs:>6} {'train':<12} {r['train']['rows_per_s']:>12,.0f} {'':>7} {'':>14}  "
                  f"(waits on the loader {r['train']['loader_wait_fraction']:.1%} of the time)")
            print(f"{bs:>6} {'train_ram':<12} {r['train_ram']['rows_per_s']:>12,.0f} {'':>7} {'':>14}  "
                  f"train/train_ram {r['ratio_train_train_ram']:.3f}, train/storeloader {r['ratio_train_storeloader']:.3f}")
        bd = r["breakdown"]
        print(f"       per batch: gather targets {bd['gather_targets_us']:.0f} us, images {bd['gather_images_us']:.0f} us, "
              f"from_numpy+to(cpu) {bd['from_numpy_to_cpu_us']:.1f} us, sorted gather {bd['gather_both_sorted_us']:.0f} us, "
              f"RAM-array gather {bd['gather_both_ram_us']:.0f} us")
    print(f"write {w['gb_per_s']:.2f} GB/s (incl. fsync {w['gb_per_s_incl_fsync']:.2f}); sequential read cold "
          f"{res['seq_read_cold']['gb_per_s']:.2f} / warm {res['seq_read_warm']['gb_per_s']:.2f} GB/s; cold StoreLoader b1024 "
          f"{res['cold_storeloader_b1024']['rows_per_s']:,.0f} rows/s; StoreLoader init (not in rows/s) warm {res['storeloader_init_s']:.2f} s / cold {init_cold:.2f} s; "
          f"load {res['load_start']} -> {res['load_end']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.keep:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
