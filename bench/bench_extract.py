"""Benchmark extraction: images/s for decode-only, model-only and end-to-end (the whole extract).

    python bench/bench_extract.py                         # default cases for this machine (~8 min, 2 cores)
    python bench/bench_extract.py --only raw,64 --repeats 5
    python bench/bench_extract.py --n 8000 --layout flat   # bigger JPEG folders, no class subfolders

Data: Fashion-MNIST as raw uint8 arrays (28 px, model input 32 px), and folders of JPEGs written from
it under bench/scratch/ (cached): grayscale expanded to RGB, bilinear upscale to 64 and 224 px,
quality 90 with torchvision.io.encode_jpeg. For each data kind, at the prior's input size:
  decode  coopt_fast.decode.batches, output discarded: `dali` and `torchvision` (decode.py's two paths,
          both with --workers threads/processes) and, for folders, `pil` (reference: the torchvision
          path with PIL's decoder)
  model   ModelRunner on one preallocated input, called repeatedly: convnet at 32 (raw), convnet at
          64 (64 px folder: a checkpoint asking for 64 px), resnet18 at 224 (224 px folder)
  e2e     coopt_fast.extract on a 1-participant split (shard = all rows, S = 5%): images/s =
          (shard + S rows - the compile call's rows) / (seconds - compile_seconds) from its summary;
          `wall` is the whole call (plan load and the data set's fingerprint included)
`--only down` adds 224 px JPEGs decoded to 160 and 112 px (a real downscale in both paths).
Compiled vs eager: convnet on raw arrays (model and e2e). On CUDA also ResNet-18 at 32 px and ResNet-50
at 224 px, compiled, bf16 autocast (ModelRunner's), large batches. DALI rows are skipped where
nvidia.dali does not import; CUDA rows where torch.cuda is not available.

Investigation (folders; on unless --no-investigate): decode.py's pipelines with one thing changed
  dali-skipresize    fn.resize only for images not already S x S (a DALI conditional on
                     fn.peek_image_shape): the proposed fix, bit-identical output here
  dali-noresize      no fn.resize at all (valid only because these JPEGs are S x S)
  dali-noresize-hwc  that, returning uint8 HWC, normalised by torch in the main process
  dali-decode        read + decode only, uint8, nothing copied out: DALI's floor
  tv-uint8+norm      torchvision workers return uint8; one in-place normalise in the main process
  tv-uint8           torchvision workers return uint8, not normalised: the torchvision floor
and single-thread microseconds per image for each stage of both paths (`stages`).

Each data kind runs in its own subprocess, its cases interleaved: one warm-up run of each, then
--repeats rounds running each case once (order rotated), so that on a shared machine every path sees
the same drift in other jobs' load; the load average is recorded per group. Times are medians over
the rounds (`best` is the fastest round: on a busy machine, the nearest to an idle one's figure).
Ratios, all from medians of this run:
dali / best torchvision-side path (same data, same workers); e2e / min(decode, model) (target >= 0.9);
e2e / shared-cores bound, where the bound is 1 / (1/decode + 1/model): on a CPU decode and model run on
the same cores, so e2e cannot beat it; compiled / eager.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, machine, print_table, run_child, wait_quiet  # noqa: E402

SCRATCH = ROOT / "bench" / "scratch"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------ data

def jpeg_folder(size: int, n: int, layout: str) -> Path:
    """The first n Fashion-MNIST training images as size x size RGB JPEGs (q90), written once.

    layout "classes": one subfolder per label (an ImageFolder tree); "flat": one folder. A
    `.complete` marker is written last, so an interrupted run rebuilds the folder.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    from coopt_fast.data import load_dataset

    root = SCRATCH / f"fmnist-{size}px-{n}-{layout}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    ds = load_dataset("fashion-mnist")
    if n > len(ds):
        raise SystemExit(f"--n {n}: Fashion-MNIST has {len(ds)} training images")
    for b in range(0, n, 256):
        gray = torch.from_numpy(ds.images[b : min(n, b + 256)].copy()).permute(0, 3, 1, 2).float()
        # Upscaling: bilinear without antialias is exact here (antialias only widens the kernel when
        # shrinking) and 2x cheaper; resize the one gray channel, then expand to RGB.
        up = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False)
        up = up.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
        for i, data in enumerate(encode_jpeg(list(up.contiguous()), quality=90)):
            k = b + i
            d = root / str(int(ds.labels[k])) if layout == "classes" else root
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{k:06d}.jpg").write_bytes(data.numpy().tobytes())
    (root / ".complete").write_text(json.dumps({"n": n, "size": size, "layout": layout, "quality": 90}))
    return root


def checkpoint(arch: str, size: int) -> Path:
    """A seeded random `arch` checkpoint that asks for `size` px inputs (the ARCH:CKPT path).

    Rewritten on every run: a cached one goes stale when priors.py changes the architecture.
    """
    from coopt_fast.priors import build_backbone, save_checkpoint

    path = SCRATCH / f"{arch}-{size}px.safetensors"
    model, _, _ = build_backbone(arch, seed=0)
    save_checkpoint(path, model, {"arch": arch, "input_size": size})
    return path


def split_run(dataset: str, tag: str, limit: int | None) -> Path:
    """A 1-participant plan (shard = every row, S = 5%) over `dataset`, reused while it matches."""
    from coopt_fast.plan import split

    run = SCRATCH / "runs" / f"{tag}-{limit or 'all'}"
    plan = run / "plan.json"
    if plan.exists():
        p = json.loads(plan.read_text())
        if p.get("dataset") == dataset and p.get("limit") == limit:
            return run
    shutil.rmtree(run, ignore_errors=True)
    split(dataset, run, participants=1, shared_fraction=0.05, seed=0, limit=limit)
    return run


# ------------------------------------------------------------------------------ children

def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _round_robin(setups: list, repeats: int) -> list[tuple[list[float], list]]:
    """One warm-up run of each, then `repeats` rounds running each once, the order rotated every round.

    On a shared machine the load drifts over minutes: interleaving puts every path under the same
    drift, so the ratios between them hold even where the absolute figures do not.
    """
    for run in setups:
        if run is not None:
            run()
    out = [([], []) for _ in setups]
    for k in range(repeats):
        for i in [(j + k) % len(setups) for j in range(len(setups))]:
            if setups[i] is None:
                continue
            t = time.perf_counter()
            info = setups[i]()
            out[i][0].append(time.perf_counter() - t)
            out[i][1].append(info)
    return out


def _batchset(spec: dict):
    """decode.py's folder batch set with one thing changed: the decoder (PIL) or the output (uint8)."""
    import numpy as np
    import torch

    from coopt_fast.decode import _FolderBatchSet

    class Variant(_FolderBatchSet):
        def __getitem__(self, i):
            from PIL import Image
            from torchvision.transforms.v2 import functional as TF

            from coopt_fast.data import read_image_file

            rows = self.rows[i * self.bs : (i + 1) * self.bs]
            out = torch.zeros(len(rows), 3, self.size, self.size, dtype=torch.uint8)
            for j, r in enumerate(rows):
                if spec["reader"] == "pil":
                    with Image.open(self.files[r]) as im:
                        im = im.convert("RGB")
                        if im.size != (self.size, self.size):
                            im = im.resize((self.size, self.size), Image.BILINEAR)
                        img = torch.from_numpy(np.asarray(im)).permute(2, 0, 1)
                else:
                    img = torch.from_numpy(read_image_file(self.files[r])).permute(2, 0, 1)
                    if img.shape[0] == 1:
                        img = img.expand(3, -1, -1)
                    img = TF.resize(img, [self.size, self.size], antialias=True)
                out[j] = img
            if spec["worker_out"] == "uint8":
                return i * self.bs, out, [], []
            return i * self.bs, (out.float() - self.mean) / self.std, [], []

    return Variant


def _variant_batches(spec: dict, ds, rows, mean, std):
    """Decode variants for the investigation; each yields x like decode.batches does."""
    import torch

    size, bs, workers = spec["size"], spec["bs"], spec["workers"]
    path = spec["path"]
    if path.startswith("dali-"):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=bs, num_threads=workers, device_id=None, prefetch_queue_depth=2, exec_dynamic=True,
                      enable_conditionals=path == "dali-skipresize")
        def pipe():
            enc, _ = fn.readers.file(files=[str(ds.files[r]) for r in rows], random_shuffle=False, pad_last_batch=True)
            img = fn.decoders.image(enc, device="cpu", output_type=types.RGB)
            if path == "dali-decode":
                return img
            if path == "dali-noresize-hwc":  # uint8 HWC batch: torch sees NCHW channels_last, no transpose
                return img
            if path == "dali-skipresize":  # the general fix: resize only the images not already size x size
                hw = fn.peek_image_shape(enc)
                if (hw[0] == size) & (hw[1] == size):
                    out = img
                else:
                    out = fn.resize(img, resize_x=size, resize_y=size, antialias=True)
                img = out
            elif path != "dali-noresize":
                img = fn.resize(img, resize_x=size, resize_y=size, antialias=True)
            return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[m * 255 for m in mean], std=[s * 255 for s in std])

        p = pipe()
        p.build()
        m = torch.tensor(mean).view(1, 3, 1, 1) * 255
        s = torch.tensor(std).view(1, 3, 1, 1) * 255
        for _ in range(0, len(rows), bs):
            out, = p.run()
            if path == "dali-decode":
                yield None  # decode only: leave DALI's buffer where it is
            elif path == "dali-noresize-hwc":
                u8 = torch.from_dlpack(out.as_tensor()).permute(0, 3, 1, 2)
                yield (u8.float() - m) / s
            else:
                yield torch.from_dlpack(out.as_tensor()).clone()
        del p
        return
    # torchvision-side variants: decode.py's DataLoader with a Variant batch set
    Variant = _batchset({"reader": "pil" if path == "pil" else "torchvision",
                         "worker_out": "uint8" if path.startswith("tv-uint8") else "float"})
    data = Variant(ds.files, rows, size, mean, std, bs, "fail")
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    for _, x, _, _ in loader:
        if path == "tv-uint8+norm":  # normalise in the main process: one fresh float tensor, in place
            x = x.float().sub_(data.mean).div_(data.std)
        yield x


def _setup_decode(spec: dict):
    """-> (run, summary): one pass of decode.batches (or a variant) over the rows, output discarded."""
    import numpy as np
    import torch

    from coopt_fast.data import load_dataset
    from coopt_fast.decode import batches, decode_job
    from coopt_fast.priors import CONVNET_MEAN, CONVNET_STD

    # extract imports torchvision (load_prior) before it decodes, and forked DataLoader workers inherit
    # it; without it here every worker would import it itself (~3 s per batches() call on 2 cores).
    import torchvision  # noqa: F401

    ds = load_dataset(spec["dataset"])
    rows = np.arange(min(spec["n"], len(ds)))
    mean, std = CONVNET_MEAN, CONVNET_STD  # the statistics change no cost
    dev = torch.device(spec["device"])

    def run():
        t = time.perf_counter()
        if spec["path"] in ("dali", "torchvision"):
            how = decode_job(ds, spec["size"], mean, std, spec["bs"], dev, "fail", spec["workers"])
            it = (b.x for b in batches(how, rows, spec["path"]))
        else:
            it = _variant_batches(spec, ds, rows, mean, std)
        first = None
        for x in it:
            if first is None:
                _sync(spec["device"])
                first = (time.perf_counter() - t, len(x) if x is not None else spec["bs"])
        _sync(spec["device"])
        return first

    def summary(times, firsts):
        med = statistics.median(times)
        # steady: the rate once the first batch is out (pipeline start and the first batch left out)
        steady = [(len(rows) - b) / (t - f) for t, (f, b) in zip(times, firsts)]
        return {"img_s": len(rows) / med, "median_s": med, "times_s": [round(t, 3) for t in times],
                "best_img_s": len(rows) / min(times),
                "startup_s": statistics.median(f for f, _ in firsts), "steady_img_s": statistics.median(steady),
                "images": len(rows)}

    return run, summary


def _setup_model(spec: dict):
    """-> (run, summary): ModelRunner called on one preallocated input, enough calls to fill min_seconds."""
    import torch

    from coopt_fast.extract import ModelRunner
    from coopt_fast.priors import load_prior

    dev = torch.device(spec["device"])
    p = load_prior(spec["prior"])
    runner = ModelRunner(p, dev, spec["compile"], spec["bs"])
    g = torch.Generator().manual_seed(0)
    # NCHW float32 on the device, as decode delivers it: ModelRunner's channels_last copy is counted.
    x = torch.randn(spec["bs"], 3, spec["size"], spec["size"], generator=g).to(dev)
    t = time.perf_counter()
    runner(x)  # compiled: the compile; eager: oneDNN/cuDNN primitive creation
    first = time.perf_counter() - t
    t = time.perf_counter()
    runner(x)
    calls = max(1, math.ceil(spec["min_seconds"] / max(time.perf_counter() - t, 1e-6)))

    def run():
        for _ in range(calls):
            runner(x)  # ends in .cpu(): synchronised

    def summary(times, _):
        med = statistics.median(times)
        return {"img_s": calls * spec["bs"] / med, "median_s": med, "times_s": [round(t, 3) for t in times],
                "best_img_s": calls * spec["bs"] / min(times),
                "calls": calls, "compile_s": first if spec["compile"] else None, "first_call_s": first,
                "threads": torch.get_num_threads()}

    return run, summary


def _setup_e2e(spec: dict):
    """-> (run, summary): one whole coopt_fast.extract into a fresh participant folder."""
    import coopt_fast
    from coopt_fast.layout import participant_dir

    run_dir = Path(spec["run"])
    count = iter(range(10**6))

    def run():
        name = f"bench-{spec['decoder']}-{'c' if spec['compile'] else 'e'}-{next(count)}"
        shutil.rmtree(participant_dir(run_dir, name), ignore_errors=True)
        t = time.perf_counter()
        s = coopt_fast.extract(run_dir, name, 0, spec["prior"], batch_size=spec["bs"], device=spec["device"],
                               decoder=spec["decoder"], compile=spec["compile"], workers=spec["workers"],
                               progress=False)
        s["wall_s"] = time.perf_counter() - t
        shutil.rmtree(participant_dir(run_dir, name), ignore_errors=True)
        return s

    def summary(_, outs):
        images = outs[0]["rows"] + outs[0]["shared_rows"]
        # The compile call's rows (the first batch of S, padded to bs) are inside compile_seconds.
        in_compile = min(spec["bs"], outs[0]["shared_rows"]) if spec["compile"] else 0
        rates = [(images - in_compile) / (o["seconds"] - o["compile_seconds"]) for o in outs]
        return {"img_s": statistics.median(rates), "rates": [round(r, 1) for r in rates], "images": images,
                "best_img_s": max(rates),
                "seconds": statistics.median(o["seconds"] for o in outs),
                "wall_img_s": images / statistics.median(o["wall_s"] for o in outs),
                "compile_s": statistics.median(o["compile_seconds"] for o in outs) if spec["compile"] else None,
                "model_s": statistics.median(o["model_seconds"] for o in outs),
                "model_share": statistics.median(o["model_seconds"] / (o["seconds"] - o["compile_seconds"])
                                                 for o in outs),
                # the model's own rate inside e2e, against model-only: the cost of sharing the cores
                "model_img_s_in_e2e": statistics.median((images - in_compile) / o["model_seconds"] for o in outs),
                "decoder_used": outs[0]["decoder"]}

    return run, summary


def _child_group(spec: dict) -> dict:
    """Every case of one data kind in one process, interleaved round by round (_round_robin).

    A case that fails reports its error; the others go on.
    """
    setup = {"decode": _setup_decode, "model": _setup_model, "e2e": _setup_e2e}
    runs, summaries, results = [], [], [{} for _ in spec["cases"]]

    def guarded(i, fn):
        def run():
            if "error" in results[i]:
                return None
            try:
                return fn()
            except Exception as e:  # noqa: BLE001  (reported in the table, not raised)
                results[i]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                return None
        return run

    for i, c in enumerate(spec["cases"]):
        try:
            run, summary = setup[c["kind"]](c)
        except Exception as e:  # noqa: BLE001
            results[i]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            run, summary = None, None
        runs.append(guarded(i, run) if run else None)
        summaries.append(summary)
    for i, (times, infos) in enumerate(_round_robin(runs, spec["repeats"])):
        if "error" not in results[i] and summaries[i] is not None and times:
            results[i].update(summaries[i](times, infos))
    return {"results": results}


def _child_stages(spec: dict) -> dict:
    """Single-thread microseconds per image for each stage of both folder paths (256 images)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    from coopt_fast.data import load_dataset, read_image_file

    torch.set_num_threads(1)
    ds = load_dataset(spec["dataset"])
    files, S = ds.files[:256], spec["size"]
    n = len(files)

    def us(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return round(statistics.median(ts) / n * 1e6, 1)

    raw = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    imgs = [decode_jpeg(r) for r in raw]
    batch = torch.stack(imgs)
    m = torch.tensor([0.5] * 3).view(1, 3, 1, 1) * 255
    s = torch.tensor([0.5] * 3).view(1, 3, 1, 1) * 255
    buf, buf2 = torch.empty(batch.shape), torch.empty(batch.shape)
    r = {
        "read_bytes": us(lambda: [f.read_bytes() for f in files]),
        "decode_jpeg (bytes in memory)": us(lambda: [decode_jpeg(x) for x in raw]),
        "read_image_file (decode.py: read + decode)": us(lambda: [read_image_file(f) for f in files]),
        "PIL open + RGB + asarray": us(lambda: [np.asarray(Image.open(f).convert("RGB")) for f in files]),
        "TF.resize to the same size (skipped)": us(lambda: [TF.resize(i, [S, S], antialias=True) for i in imgs]),
        "normalise (x.float()-m)/s, fresh memory (decode.py)": us(lambda: (batch.float() - m) / s),
        "normalise in place, one fresh tensor": us(lambda: batch.float().sub_(m).div_(s)),
        "normalise into a reused buffer": us(lambda: buf.copy_(batch).sub_(m).div_(s)),
        "float batch clone, fresh memory (DALI path's .clone())": us(lambda: buf.clone()),
        "float batch copy into a reused buffer": us(lambda: buf2.copy_(buf)),
    }
    if dali_available():
        from nvidia.dali import fn, pipeline_def, types

        paths = [str(f) for f in files]

        def dali(stage):
            @pipeline_def(batch_size=n, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_dynamic=True)
            def pipe():
                enc, _ = fn.readers.file(files=paths, random_shuffle=False)
                img = fn.decoders.image(enc, device="cpu", output_type=types.RGB)
                if stage in ("resize", "full"):
                    img = fn.resize(img, resize_x=S, resize_y=S, antialias=True)
                if stage in ("cmn", "full"):
                    img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                                   mean=[127.5] * 3, std=[127.5] * 3)
                return img

            p = pipe()
            p.build()
            t = us(lambda: p.run())
            del p
            return t

        d = {k: dali(k) for k in ("decode", "resize", "cmn", "full")}
        r["DALI read + decode (1 thread)"] = d["decode"]
        r["DALI fn.resize to the same size, linear + antialias"] = round(d["resize"] - d["decode"], 1)
        r["DALI crop_mirror_normalize to float CHW"] = round(d["cmn"] - d["decode"], 1)
        r["DALI whole decode.py pipeline (1 thread)"] = d["full"]
    return r


def _child(spec: dict) -> None:
    fn = {"group": _child_group, "stages": _child_stages}[spec["kind"]]
    print(json.dumps(fn(spec)))


# ------------------------------------------------------------------------------ parent

def cases(args, cuda: bool, dali: bool) -> list[dict]:
    """What to measure on this machine, in order: one dict per case; a group's cases share a subprocess."""
    dev = "cuda" if cuda else "cpu"
    only = set(args.only.split(","))
    w, bs = args.workers, args.batch_size
    out = []

    def add(**c):
        out.append({"device": dev, "workers": w, "bs": bs, "compile": False, "group": c["data"], **c})

    decoders = ["dali", "torchvision"] if dali else ["torchvision"]
    from coopt_fast.data import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        print(f"{FASHION_MNIST_DIR}: no Fashion-MNIST (apt-get install dataset-fashion-mnist): "
              "only the CUDA model-only cases run", flush=True)
        only &= {"cuda"}
    if "raw" in only:
        ds = "fashion-mnist"
        for d in decoders:
            add(kind="decode", data="raw", dataset=ds, path=d, size=32, n=args.raw_n)
        for c in (False, True):
            add(kind="model", data="raw", prior="convnet", size=32, compile=c, min_seconds=args.min_seconds)
        for d in decoders:
            add(kind="e2e", data="raw", dataset=ds, prior="convnet", size=32, decoder=d, limit=args.e2e_n)
        add(kind="e2e", data="raw", dataset=ds, prior="convnet", size=32, decoder=decoders[0], compile=True,
            limit=args.e2e_n)
    for size, prior, limit in ((64, f"convnet:{checkpoint('convnet', 64)}" if "64" in only else None, args.e2e_n),
                               (224, "resnet18", args.e2e_224_n)):
        if str(size) not in only:
            continue
        folder = jpeg_folder(size, args.n, args.layout)
        ds = f"folder:{folder}"
        paths = decoders + ["pil"]
        if args.investigate:
            paths += (["dali-skipresize", "dali-noresize", "dali-noresize-hwc", "dali-decode"] if dali else []) \
                + ["tv-uint8+norm", "tv-uint8"]
        for d in paths:
            add(kind="decode", data=f"{size}px", dataset=ds, path=d, size=size,
                n=args.n if size == 64 else min(args.n, args.decode_224_n or args.n))
        add(kind="model", data=f"{size}px", prior=prior, size=size, min_seconds=args.min_seconds)
        for d in decoders:
            add(kind="e2e", data=f"{size}px", dataset=ds, prior=prior, size=size, decoder=d, limit=limit)
        if args.investigate:
            add(kind="stages", data=f"{size}px", dataset=ds, size=size)
    if "down" in only:
        # Folder images larger than the input: a real downscale, which both paths must do.
        ds = f"folder:{jpeg_folder(224, args.n, args.layout)}"
        for size in (160, 112):
            for d in decoders:
                add(kind="decode", data=f"224px->{size}", dataset=ds, path=d, size=size,
                    n=min(args.n, args.decode_224_n or args.n))
    if cuda and "cuda" in only:
        # The H200 targets: model side only (DALI is absent there), compiled bf16, large batches.
        for prior, size, b in (("resnet18", 32, args.cuda_batch_32), ("resnet50", 224, args.cuda_batch_224)):
            for c in (False, True):
                add(kind="model", data="raw" if size == 32 else f"{size}px", prior=prior, size=size, compile=c, bs=b,
                    min_seconds=args.min_seconds, group="cuda")
        if "raw" in only:  # and the whole of Fashion-MNIST through extract, ResNet-18 at 32 px
            add(kind="e2e", data="raw", dataset="fashion-mnist", prior=f"resnet18:{checkpoint('resnet18', 32)}",
                size=32, decoder=decoders[0], compile=True, bs=args.cuda_batch_32, limit=None, group="cuda")
    return out


def groups(todo: list[dict]) -> list[list[dict]]:
    """Consecutive cases of one group run in one subprocess, interleaved; `stages` runs alone."""
    out: list[list[dict]] = []
    for c in todo:
        if out and c["kind"] != "stages" and out[-1][0]["kind"] != "stages" and out[-1][0]["group"] == c["group"]:
            out[-1].append(c)
        else:
            out.append([c])
    return out


def label(c: dict) -> str:
    return c["prior"].split(":")[0] + ("-64px" if "convnet-64px" in c["prior"] else "") if c.get("prior") else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="raw,64,224,cuda",
                    help="data kinds to run: raw,64,224,cuda and down (224 px JPEGs resized to 160 and 112)")
    ap.add_argument("--n", type=int, default=4000, help="images per JPEG folder, and rows for the 64 px decode-only")
    ap.add_argument("--raw-n", type=int, default=4000, help="Fashion-MNIST rows for decode-only")
    ap.add_argument("--e2e-n", type=int, default=None,
                    help="rows (before S) for the raw and 64 px e2e (default: 1000 on a CPU, all on CUDA)")
    ap.add_argument("--e2e-224-n", type=int, default=None,
                    help="rows for the 224 px e2e (default: 256 on a CPU, where ResNet-18 runs ~50 img/s; all on CUDA)")
    ap.add_argument("--decode-224-n", type=int, default=None,
                    help="rows for the 224 px decode-only runs (default: 2000 on a CPU, --n on CUDA)")
    ap.add_argument("--layout", choices=["classes", "flat"], default="classes", help="JPEG folder layout")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DALI threads = torchvision DataLoader processes (default: extract's, min(4, cores))")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--cuda-batch-32", type=int, default=2048, help="CUDA ResNet-18 batch at 32 px")
    ap.add_argument("--cuda-batch-224", type=int, default=512, help="CUDA ResNet-50 batch at 224 px")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="model-only: calls per timed run fill this")
    ap.add_argument("--no-investigate", dest="investigate", action="store_false",
                    help="skip the decode variants and the per-stage breakdown")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess (one data kind)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for load < 1")
    ap.add_argument("--out", default=None, help="default bench/results/extract.json (extract_cuda.json on CUDA)")
    args = ap.parse_args()
    if args.child:
        return _child(json.loads(args.child))

    import torch

    from coopt_fast.data import load_dataset
    from coopt_fast.decode import choose_decoder

    cuda = torch.cuda.is_available()
    dali = dali_available()
    if not cuda:
        args.e2e_n = args.e2e_n or 1000
        args.e2e_224_n = args.e2e_224_n or 256
        args.decode_224_n = args.decode_224_n or 2000
    out_path = Path(args.out or ROOT / "bench/results" / ("extract_cuda.json" if cuda else "extract.json"))
    SCRATCH.mkdir(parents=True, exist_ok=True)
    todo = cases(args, cuda, dali)
    wait_quiet(args.wait_quiet)
    meta = machine()
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    meta.update({
        "git_commit_short": git("rev-parse", "--short", "HEAD") or "no commit",
        "git_dirty_coopt_fast": bool(git("status", "--porcelain", "--", "coopt_fast")),
        "dali": __import__("nvidia.dali", fromlist=["__version__"]).__version__ if dali else None,
        "torchvision": __import__("torchvision").__version__,
        "workers": args.workers, "batch_size": args.batch_size, "jpeg_images": args.n, "layout": args.layout,
        # the measured code, in case the working tree differs from the commit
        "sha256_12": {f: hashlib.sha256((ROOT / "coopt_fast" / f).read_bytes()).hexdigest()[:12]
                      for f in ("decode.py", "extract.py", "priors.py", "data.py")},
    })
    rows, stages = [], {}
    t_all = time.perf_counter()
    for group in groups(todo):
        for c in group:
            if c["kind"] == "e2e":
                tag = f"{c['data']}-{args.layout if c['data'] != 'raw' else 'fm'}"
                c["run"] = str(split_run(c["dataset"], tag, c.get("limit")))
        load = round(os.getloadavg()[0], 1)  # a shared machine: other jobs' load, group by group
        t = time.perf_counter()
        if group[0]["kind"] == "stages":
            res = run_child(__file__, group[0], args.timeout)
            stages[group[0]["data"]] = res
            print(f"stages {group[0]['data']}: {res} [{time.perf_counter() - t:.0f} s]", flush=True)
            continue
        res = run_child(__file__, {"kind": "group", "repeats": args.repeats, "cases": group}, args.timeout)
        took = time.perf_counter() - t
        for c, r in zip(group, res.get("results") or [res] * len(group)):
            row = {k: c.get(k) for k in ("data", "kind", "device", "size", "compile", "workers", "bs", "dataset")}
            row["path"] = c.get("path") or c.get("decoder") or ("compiled" if c["compile"] else "eager")
            row["model"] = label(c)
            if c["kind"] == "e2e" and c.get("compile"):
                row["path"] += "+compiled"
            row.update(r)
            row["group_s"], row["load_before"] = round(took, 1), load
            rows.append(row)
            brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                     if k not in ("times_s", "rates", "dataset")}
            print(f"{c['data']} {c['kind']} {row['path']} {row['model']}: {brief}", flush=True)
        print(f"[group {group[0]['group']}: {took:.0f} s]", flush=True)
    meta["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    meta["total_s"] = round(time.perf_counter() - t_all, 1)

    checks, auto = summarise(rows, cuda)
    # What decode.py's `auto` picks today for each case, next to what this run measured faster.
    for a in auto:
        ds = load_dataset(a.pop("dataset"))
        try:
            a["auto_now"] = choose_decoder("auto", ds, torch.device("cuda" if cuda else "cpu"), a["size"])
        except Exception as e:  # noqa: BLE001  (a bench reports, it does not stop)
            a["auto_now"] = f"error: {e}"

    print(f"\nextract, {meta['gpu'] or meta['cpu']} ({meta['cpu_cores']} cores, {args.workers} decode workers), "
          f"torch {meta['torch']}, DALI {meta['dali']}, commit {meta['git_commit_short']}, "
          f"load {meta['loadavg_1min_before']} -> {meta['loadavg_1min_after']}, {meta['total_s']:.0f} s")
    print_table(rows, [("data", "data", "s"), ("kind", "stage", "s"), ("path", "path", "s"), ("model", "model", "s"),
                       ("size", "px", "d"), ("img_s", "img/s", ",.0f"), ("best_img_s", "best img/s", ",.0f"),
                       ("ratio", "ratio", ".2f"),
                       ("ratio_of", "ratio of", "s"), ("startup_s", "startup s", ".2f"),
                       ("steady_img_s", "steady img/s", ",.0f"),
                       ("compile_s", "compile s", ".1f"), ("model_share", "model time", ".0%"),
                       ("model_img_s_in_e2e", "model img/s in e2e", ",.0f"),
                       ("wall_img_s", "wall img/s", ",.0f"), ("load_before", "load", ".1f")])
    for r in rows:
        if r.get("error"):
            print(f"  {r['data']} {r['kind']} {r['path']}: {r['error']}")
    print()
    print_table(checks, [("check", "check", "s"), ("value", "value", ".2f"), ("target", "target", "s"),
                         ("ok", "met", "s")])
    print()
    print_table(auto, [("device", "device", "s"), ("data", "input", "s"), ("size", "model px", "d"),
                       ("decode_winner", "faster decode", "s"), ("e2e_winner", "faster e2e", "s"),
                       ("auto_now", "auto today", "s")])
    for k, v in stages.items():
        print(f"\nsingle-thread us per image, {k} JPEGs:")
        for name, t in v.items():
            print(f"  {name:<58} {t:>9}")
    meta["method"] = {
        "time": f"median of {args.repeats} rounds after 1 warm-up run; one subprocess per data kind, its cases "
                "interleaved round by round (order rotated)",
        "decode": "coopt_fast.decode.batches over the first N rows, output discarded; a run includes the "
                  "pipeline start (DALI build / DataLoader workers), reported as startup_s (to the first batch)",
        "model": "ModelRunner on one preallocated NCHW float32 input, calls per run filling --min-seconds",
        "e2e": "coopt_fast.extract, 1 participant, S = 5%: (rows - compile call rows) / (seconds - compile_seconds)",
        "shared_cores_bound": "1 / (1/decode + 1/model): decode and model share the CPU cores",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"meta": meta, "results": rows, "checks": checks, "auto": auto,
                                    "stages_us_per_image": stages}, indent=1) + "\n")
    print(f"wrote {out_path}")


def summarise(rows: list[dict], cuda: bool) -> tuple[list[dict], list[dict]]:
    """Fill each row's ratio against its baseline; return the target checks and the auto table."""
    def get(data, kind, path=None, compile=None, model=None):
        for r in rows:
            if (r["data"], r["kind"]) == (data, kind) and (path is None or r["path"] == path) \
                    and (compile is None or r["compile"] == compile) and (model is None or r["model"] == model) \
                    and r.get("img_s"):
                return r
        return None

    checks, auto = [], []
    for data in dict.fromkeys(r["data"] for r in rows):
        tv = get(data, "decode", "torchvision")
        best_tv = max((r for r in (tv, get(data, "decode", "pil")) if r), key=lambda r: r["img_s"], default=None)
        for r in rows:
            if r["data"] != data or not r.get("img_s"):
                continue
            if r["kind"] == "decode" and r["path"] != "torchvision" and tv:
                r["ratio"], r["ratio_of"] = r["img_s"] / tv["img_s"], "/ torchvision"
            if r["kind"] == "model" and r["compile"]:
                eager = get(data, "model", compile=False, model=r["model"])
                if eager and eager["bs"] == r["bs"]:
                    r["ratio"], r["ratio_of"] = r["img_s"] / eager["img_s"], "/ eager"
            if r["kind"] == "e2e":
                dec = get(data, "decode", r["path"].split("+")[0])
                mod = get(data, "model", compile=r["compile"], model=r["model"])
                if dec and mod:
                    lo = min(dec["img_s"], mod["img_s"])
                    bound = 1 / (1 / dec["img_s"] + 1 / mod["img_s"])
                    r["ratio"], r["ratio_of"] = r["img_s"] / lo, "/ min(dec, model)"
                    r["shared_cores_bound"] = bound
                    checks.append({"check": f"{data} e2e {r['path']} {r['model']}: e2e / min(decode, model)",
                                   "value": r["img_s"] / lo, "target": ">= 0.90", "ok": str(r["img_s"] >= 0.9 * lo)})
                    checks.append({"check": f"{data} e2e {r['path']} {r['model']}: e2e / 1/(1/dec + 1/model)",
                                   "value": r["img_s"] / bound, "target": "(<= ~1 on shared cores)",
                                   "ok": "-"})
        dali = get(data, "decode", "dali")
        if dali and best_tv:
            checks.append({"check": f"{data} decode dali / best torchvision-side ({best_tv['path']})",
                           "value": dali["img_s"] / best_tv["img_s"],
                           "target": ">= 1.5" if data == "64px" else "-",
                           "ok": str(dali["img_s"] >= 1.5 * best_tv["img_s"]) if data == "64px" else "-"})
        if tv:
            dec_win = "dali" if dali and dali["img_s"] > tv["img_s"] else "torchvision"
            e2e = {p: get(data, "e2e", p, compile=False) for p in ("dali", "torchvision")}
            e2e_win = max((p for p in e2e if e2e[p]), key=lambda p: e2e[p]["img_s"], default="-")
            auto.append({"device": tv["device"], "data": "raw" if data == "raw" else f"folder {data.split('-')[0]}",
                         "size": tv["size"], "decode_winner": dec_win, "e2e_winner": e2e_win,
                         "dataset": tv["dataset"]})
    if cuda:
        for model, size, target in (("resnet18", 32, 100_000), ("resnet50", 224, 20_000)):
            r = next((r for r in rows if r["kind"] == "model" and r["model"] == model and r["size"] == size
                      and r["compile"] and r.get("img_s")), None)
            if r:
                checks.append({"check": f"CUDA {model} {size} px compiled bf16 img/s (/1000)",
                               "value": r["img_s"] / 1000, "target": f">= {target // 1000}",
                               "ok": str(r["img_s"] >= target)})
    return checks, auto


if __name__ == "__main__":
    main()
