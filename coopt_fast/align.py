"""Step 2b: bring every participant's features into one n-dim space (DESIGN §3).

W_k: seeded Gaussian l_k x n, entries N(0, 1/n) (Johnson-Lindenstrauss); seed recorded.
Reference (README "How the reference is chosen, and why"): "consensus", the default: S* = the
top-n principal directions of all participants' projected features on S, each centred and scaled
to equal weight, so no one prior (one-hot labels included) decides the space alone, and every
participant is fitted to it; "best": the best prior by a score on S (coopt_fast.scores; --score
uniformity is the paper's choice); a named participant; or none (W only).
T_k = argmin ||F_k(S) W_k T - S*||^2 (+ ridge), map_k = W_k T_k, Y_k = F_k(D_k) map_k.

Writes RUN/participants/NAME/aligned.h5:
  shard/index, shard/targets [n_k, n] float16; shared/index, shared/targets [|S|, n] float16
  projection [l_k, n] float32 (W_k); map [l_k, n] float32 (W_k T_k)
  stats/sum, stats/sumsq [n] float64: per-dimension sums of the stored shard targets
  attrs: reference, residual, dim, projection_seed, ridge, prior, uniformity, round (features.h5's),
         features_sha256 (of the features.h5 it was fitted from), ...
  every float dataset is chunked with the fletcher32 checksum (store.create_rows / create_checked)

Devices: the shard's targets, the O(rows x l x n) bulk, are computed on --device through the
kernels' dispatcher (Triton on CUDA: fp16 features times the map's fp16 hi + lo halves, fp32
accumulation: within ~1e-5 of the CPU's fp32 product, then the same fp16 cast). Everything on S
(the fit, S*, shared.h5) stays on the CPU: S* names the alignment every upload is checked against
(s_star), so it must be the same bits on every machine. A rerun on another device finds its
aligned.h5 up to date (the identity holds no device).

Before computing anything, every features.h5 the command reads is checked (check_features: whole,
the sha256 its participant's manifest.json records, this run's data set, shard and S), so a bad
file refuses the command before any aligned.h5 is written. An existing aligned.h5 with the same
identity (reference, dim, ridge, projection seed, features, target dtype, S*) is up to date and
left alone; one with another identity is replaced only with force=True (--force).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import codec, layout, publish, remote, store
from . import scores as prior_scores
from .errors import CooptError, DiskFullError, WaitingError, disk_guard
from .layout import RESERVED_NAMES as RESERVED, check_name
from .plan import load_plan
from .store import file_sha256
from .progress import bar

CONSENSUS = "consensus"
APPLY_BLOCK_ROWS = 32768  # rows per grouped launch: 32k x 2048 fp16 = 128 MiB of features at most
RIDGE_AUTO_FACTOR = 1e-2  # ridge relative to mean squared singular value of F(S)W, when |S| < 4 l_k
MAX_DIM = 65536  # 32x resnet50's 2048 features; a float16 target row of 128 KiB (check_memory bounds it further)


def projection(l: int, n: int, seed: int) -> torch.Tensor:
    """W in R^{l x n}, N(0, 1/n), generated on the CPU in float64 so any machine gets the same bits."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(l, n, generator=g, dtype=torch.float64) / np.sqrt(n)).float()


def projection_seed(plan_seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{plan_seed}:{name}".encode()).digest()[:7], "little")


def fit_map(fs: torch.Tensor, w: torch.Tensor, target: torch.Tensor, ridge: float | None) -> tuple[torch.Tensor, float]:
    """map = W T with T = argmin ||fs W T - target||^2 + ridge ||T||^2; returns (map, ridge used).

    Factorisation: LAPACK gelsd (SVD, divide and conquer) in float64 on the CPU. It is
    rank-revealing, so it returns the minimum-norm T when fs W is rank-deficient (n > l_k,
    or |S| < n), and it never forms (fs W)^T (fs W), whose condition number is the square
    of fs W's: that keeps the fit accurate when |S| is close to l_k. Ridge is solved as the
    augmented least-squares problem [A; sqrt(λ) I] T = [target; 0] with the same driver.
    """
    a = fs.double() @ w.double()
    b = target.double()
    if ridge is None:  # auto: regularise only when S is small relative to the feature dim
        ridge = RIDGE_AUTO_FACTOR * float(a.square().sum()) / a.shape[1] if fs.shape[0] < 4 * fs.shape[1] else 0.0
    if ridge < 0:
        raise CooptError(f"--ridge must be >= 0, got {ridge}")
    if ridge > 0:
        n = a.shape[1]
        a = torch.cat([a, np.sqrt(ridge) * torch.eye(n, dtype=a.dtype)])
        b = torch.cat([b, torch.zeros(n, b.shape[1], dtype=b.dtype)])
    t = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return (w.double() @ t).float(), float(ridge)


def check_reference(run: Path, names: list[str], reference: str, score: str) -> None:
    """--reference and --score, before any file is read. names: the participants of the run."""
    if score not in prior_scores.SCORES:
        raise CooptError(f"--score: unknown score {score!r}; choose from {', '.join(prior_scores.SCORES)}")
    if reference in RESERVED:
        if reference in names:
            raise CooptError(f"--reference {reference} is ambiguous: a participant is named {reference!r}")
        return
    check_name(reference)
    if reference not in names:
        raise CooptError(f"--reference {reference}: no such participant in {run}")


class Peers:
    """What one align knows of each participant: the features this process may read (a
    participant's own workspace; on one disk, everyone's default workspace), each checked before
    use, and what the others published (record.json, shared.h5). Raw features of a participant
    whose workspace is elsewhere are never needed: its published files stand in for them."""

    def __init__(self, run: Path, plan: dict, names: list[str], local: dict[str, Path]):
        self.run, self.plan, self.names, self.local = run, plan, names, local
        self._records: dict[str, dict | None] = {}
        self.digests: dict[str, str] = {}

    def record(self, name: str) -> dict | None:
        if name not in self._records:
            self._records[name] = publish.read_record(self.run, name)
        return self._records[name]

    def features(self, name: str, shard: bool = False) -> Path:
        """The checked features.h5 of `name` (check_features once per file; `shard` also reads its rows)."""
        if name not in self.local:
            raise CooptError(f"{self.run}: participant {name}'s features are not here (its workspace is elsewhere)")
        key = name + (":shard" if shard else "")
        if key not in self.digests:
            self.digests[key] = self.digests[name] = check_features(self.local[name], name, self.plan, shard=shard)
        return self.local[name]

    def describe(self, name: str) -> dict:
        """Round and features sha256 of `name`'s latest features: what its published files must match."""
        if name in self.local:  # its features first: a fault there is what to name
            self.features(name)
            rec = self.record(name)
            if rec is not None and rec["features_sha256"] != self.digests[name]:
                raise CooptError(f"{layout.record_path(self.run, name)}: describes other features than "
                                 f"{self.local[name]} (rerun extract for {name} to publish its record)")
            with store.open_complete(self.local[name], "features") as f:
                return {"round": int(f.attrs["round"]), "features_sha256": self.digests[name]}
        rec = self.record(name)
        if rec is None:
            raise CooptError(f"{layout.participant_dir(self.run, name)}: participant {name} has published no record.json "
                             f"(it runs extract)")
        return {"round": rec["round"], "features_sha256": rec["features_sha256"]}


    def score(self, name: str, score: str) -> float:
        self.describe(name)  # the record (if any) is of the features it names
        rec = self.record(name)
        if rec is not None:
            return rec["scores"].get(score, float("nan"))
        return prior_scores.compute(_shared_features(self.features(name)), score)

    def shared(self, name: str, identity: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A published shared.h5 of exactly `identity`, else None."""
        return publish.read_shared(self.run, name, identity)


def _shared_features(path: Path) -> torch.Tensor:
    """Features on S of a (checked) features.h5, the rows it could decode."""
    with store.open_complete(path, "features") as f:
        ok = store.decoded_on_s(f)
        return torch.from_numpy(f["shared/features"][:][ok].astype(np.float32))


def _features_on_s(path: Path) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """(features on S float32, decoded mask, S index, S skipped) of a checked features.h5."""
    with store.open_complete(path, "features") as f:
        return (torch.from_numpy(f["shared/features"][:].astype(np.float32)), torch.from_numpy(store.decoded_on_s(f)),
                f["shared/index"][:], f["shared/skipped"][:])


def choose_reference(peers: Peers, reference: str, score: str = prior_scores.DEFAULT_SCORE) -> str | None:
    if reference == "none":
        return None
    if reference != "best":
        return reference
    ref = prior_scores.best({nm: peers.score(nm, score) for nm in peers.names}, score)
    if ref is None:
        raise CooptError(f"{peers.run}: no participant has a finite {score} on S")
    return ref


def reference_warnings(peers: Peers, ref: str | None, dim: int, s_star: torch.Tensor | None) -> list[str]:
    """The reference spans the target space: say so when it uses fewer directions than --dim.
    s_star: S* on the rows of S the reference (every participant, for the consensus) decoded."""
    if ref is None:
        return []
    if ref != CONSENSUS and peers.record(ref) is not None:
        er = peers.record(ref)["scores"].get("effective-rank", float("nan"))
    elif ref != CONSENSUS:
        er = prior_scores.effective_rank(_shared_features(peers.features(ref)).numpy())
    else:
        er = prior_scores.effective_rank(s_star.numpy())
    if not er < dim:
        return []
    msg = f"reference {ref} has effective rank {er:.1f} on S, below --dim {dim}: the targets use about {er:.0f} of {dim} dims"
    if ref != CONSENSUS:
        msg += (" and every other participant is fitted into its space (one-hot labels or a collapsed prior "
                "there lose the others' information: --reference consensus keeps them)")
    return [msg]


@remote.on_participant(others=(layout.RECORD, layout.SHARED))
def align(
    run: str | Path,
    dim: int = 512,
    participant: str | None = None,
    reference: str = "consensus",
    ridge: float | None = None,
    target_dtype: str = "float16",
    progress: bool = True,
    score: str = prior_scores.DEFAULT_SCORE,
    force: bool = False,
    workspace: str | Path | None = None,
    device: str = "auto",
) -> dict:
    """Align one participant (local mode) or all of them; write each aligned.h5.

    Under the consensus a participant aligning alone first publishes its own shared.h5; while
    another participant's is missing it raises WaitingError (exit 75) naming them, and a rerun
    once they have published finishes.

    Args:
        run: the run folder (or an s3:// URL, with participant: pulled, aligned, pushed).
        dim: n, the common target dimension.
        participant: align only this one, from its own features (in `workspace`) and what the
            others published (record.json; shared.h5: their projected features on S for the
            consensus, the reference's S* otherwise). None: every participant here.
        reference: consensus | best (the participant with the best `score` on S) | NAME | none.
        ridge: ridge λ of the fit (None: auto).
        target_dtype: how the uploaded targets are stored (see coopt_fast.codec).
        progress: a progress bar (or plain lines without a terminal) on stderr.
        score: what reference "best" ranks by (coopt_fast.scores).
        force: (re)write every participant's aligned.h5 and shared.h5. Without it, an existing
            file identical to what align would write is left alone (its row says "skipped"),
            and any other is refused, naming what differs.
        workspace: with participant, the folder holding its features.h5 (default
            RUN/participants/NAME).
        device: where the shard's targets are computed: auto | cpu | cuda | cuda:N (module
            docstring, "Devices"; the fit on S stays on the CPU).

    Returns:
        A summary: reference, score, warnings (a reference of low effective rank, fits with fewer
        rows of S than feature dims), dim, target_dtype, bytes_per_row, participants, seconds.

    Raises:
        CooptError: bad options or device, a faulty or missing features.h5 or record, a
            different aligned.h5 without force; WaitingError while a peer's file is missing.
    """
    run = Path(run)
    dev = _check_options(dim, ridge, target_dtype, participant, workspace, device)
    plan = load_plan(run)
    everyone, local, todo = _who(run, participant, workspace)
    check_reference(run, everyone, reference, score)
    check_memory(plan, dim, len(everyone), len(todo))
    peers = Peers(run, plan, everyone, local)
    ref, todo = _checked_reference(peers, todo, reference, score)
    t0 = time.perf_counter()
    job = Job(run, plan, peers, ref, dim, ridge, target_dtype, force, progress, dev)
    s_star = ref_ok = None
    to_publish = {}  # name -> shared.h5 contents, published once every fit has succeeded
    if ref == CONSENSUS:
        s_star, ref_ok, to_publish = _consensus(peers, todo, dim, force)
    elif ref is not None and ref not in todo:
        s_star, ref_ok = _reference_targets(peers, ref, dim)
    warnings = reference_warnings(peers, ref, dim, None if s_star is None else s_star[ref_ok])
    fits = {}
    for name in todo:
        fits[name] = _fit(job, name, s_star, ref_ok, warnings)
        if name == ref:  # the reference's targets on S are S* for the others
            s_star, ref_ok = fits[name]["shared"].float(), fits[name]["ok"]
            to_publish[name] = fits[name]["s_star"]
    written = _write(job, fits, to_publish)
    rows = [
        {"participant": nm, "prior": str(ft["meta"]["prior"]), "uniformity": float(ft["meta"]["uniformity"]),
         "feature_dim": int(ft["meta"]["feature_dim"]), "residual": ft["residual"], "ridge": ft["ridge"],
         "reference": nm == ref, "round": ft["meta"]["round"], "skipped": nm not in written} for nm, ft in fits.items()]
    return {"reference": ref, "score": score if reference == "best" else None, "warnings": warnings,
            "dim": dim, "target_dtype": target_dtype,
            "bytes_per_row": codec.bytes_per_row(target_dtype, dim), "participants": rows,
            "seconds": time.perf_counter() - t0}


@dataclass(frozen=True, eq=False)
class Job:
    """What one align resolved before fitting, passed whole to its steps."""
    run: Path
    plan: dict
    peers: Peers
    ref: str | None             # a participant, CONSENSUS, or None (--reference none)
    dim: int
    ridge: float | None
    target_dtype: str
    force: bool
    progress: bool
    device: torch.device        # where the shard's targets are computed (_apply_all)


def _check_options(dim: int, ridge: float | None, target_dtype: str, participant, workspace, device: str) -> torch.device:
    """Refuse bad options before anything is read; the resolved device."""
    from .training import resolve_device

    codec.check(target_dtype)
    if not 1 <= dim <= MAX_DIM:
        raise CooptError(f"--dim must be in [1, {MAX_DIM}], got {dim}")
    if ridge is not None and not (math.isfinite(ridge) and ridge >= 0):
        raise CooptError(f"--ridge must be a finite number >= 0, got {ridge}")
    if workspace is not None and participant is None:
        raise CooptError("--workspace is one participant's: give --participant NAME with it")
    return resolve_device(device)


def _checked_reference(peers: Peers, todo: list[str], reference: str, score: str) -> tuple[str | None, list[str]]:
    """Every file align reads checked before anything is computed or written; then the
    reference, and the order to align in: the reference first, since its stored (float16)
    targets on S are S* for everyone (local and all-participants mode then give the same bits)."""
    for nm in todo:
        peers.features(nm, shard=True)
    for nm in peers.names if reference in (CONSENSUS, "best") else sorted({reference} - {"none"}):
        peers.describe(nm)
    ref = choose_reference(peers, reference, score)
    return ref, ([ref] + [p for p in todo if p != ref]) if ref in todo else todo


def _who(run: Path, participant: str | None, workspace) -> tuple[list[str], dict[str, Path], list[str]]:
    """(every participant, the features this process can read, the participants it aligns)."""
    everyone = layout.participants(run)
    local = {nm: layout.features_path(run, nm) for nm in everyone}
    if participant is not None:
        own = layout.features_path(run, check_name(participant), workspace)
        if not own.exists():
            raise CooptError(f"{own}: not found (run extract first)")
        everyone = sorted(set(everyone) | {participant})
        local[participant] = own
    local = {nm: p for nm, p in local.items() if p.exists()}
    if not everyone:
        raise CooptError(f"{run}: no participant has extracted features yet")
    todo = [participant] if participant else everyone
    away = [nm for nm in todo if nm not in local]
    if away:
        raise CooptError(f"{run}: the features of {', '.join(away)} are not in this run folder (their workspaces are "
                         f"elsewhere): each participant aligns itself, align --participant NAME --workspace DIR")
    return everyone, local, todo


def _fit(job: Job, name: str, s_star, ref_ok, warnings: list[str]) -> dict:
    """NAME's projection W, map W T (fitted to S* unless it is the reference or there is none),
    its targets on S and residual, and the identity of the aligned.h5 they make."""
    from .kernels import align_apply

    fpath, ref, dim, ridge = job.peers.local[name], job.ref, job.dim, job.ridge
    fs, ok, s_index, s_skipped = _features_on_s(fpath)
    with store.open_complete(fpath, "features") as f:
        meta = {k: f.attrs[k] for k in ("prior", "uniformity", "feature_dim")}
        meta["round"] = int(f.attrs.get("round", 0))
    seed = projection_seed(job.plan["seed"], name)
    w = projection(fs.shape[1], dim, seed)
    if ref is None or name == ref:
        m, lam = w, 0.0
    else:
        use = ok & ref_ok  # rows of S that both sides decoded
        if int(use.sum()) < 2 and not ridge:
            raise CooptError(f"{fpath}: S has {int(use.sum())} usable rows, too few for a fit without --ridge")
        m, lam = fit_map(fs[use], w, s_star[use], ridge)
        if int(use.sum()) < fs.shape[1]:
            warnings.append(f"{name}: {int(use.sum())} usable rows of S for {fs.shape[1]} feature dims, "
                            f"an under-determined fit (ridge {lam:.3g} applied; a larger S fits better)")
    shared_t = align_apply([fs.half()], [m])[0][0]
    if name == ref:
        s_star = shared_t.float()
    # The reference (and --reference none) fits nothing: residual 0 by definition.
    residual = 0.0 if ref is None or name == ref else float(
        (fs[use] @ m - s_star[use]).norm() / s_star[use].norm().clamp_min(1e-30))
    # What an aligned.h5 is made from: a partial resumes, and a published one is up to date, only if equal.
    identity = {"participant": name, "reference": ref or "none", "dim": int(dim), "ridge": float(lam),
                "projection_seed": int(seed), "features_sha256": job.peers.digests[name],
                "target_dtype": job.target_dtype, "s_star": s_star_id(None if ref is None else s_star)}
    return dict(w=w, map=m, ridge=lam, seed=seed, shared=shared_t, ok=ok, residual=residual, meta=meta,
                identity=identity, features=fpath,
                s_star=(_shared_identity(name, "s_star", dim, seed, job.peers.describe(name)), s_index, s_skipped,
                        shared_t) if name == ref else None)


def _write(job: Job, fits: dict, to_publish: dict) -> set[str]:
    """Decide for everyone before writing anything (one refusal leaves every file as it was), then
    publish the shared.h5 files and the aligned.h5 uploads that are new; the names written."""
    from .kernels import align_apply

    run = job.run
    state = {nm: "write" if job.force else _published(layout.upload_path(run, nm), ft["identity"])
             for nm, ft in fits.items()}
    s_state = {nm: _shared_state(run, nm, m[0], job.force) for nm, m in to_publish.items()}
    for nm, st in s_state.items():
        if st == "write":
            publish.write_shared(run, nm, *to_publish[nm])
    write = {nm: ft for nm, ft in fits.items() if state[nm] == "write"}
    if write:
        with contextlib.ExitStack() as locks:  # one writer per aligned.h5
            for nm in write:
                locks.enter_context(store.Lock(layout.upload_path(run, nm)))
            with disk_guard(run / "participants"):
                _apply_all(job, write, align_apply)
    for nm in fits:
        if state[nm] in ("write", "unrecorded"):
            store.write_manifest(layout.participant_dir(run, nm), layout.UPLOAD)
    return set(write)


def _shared_identity(name: str, kind: str, dim: int, seed: int, described: dict) -> dict:
    return {"participant": name, "kind": kind, "dim": int(dim), "projection_seed": int(seed),
            "round": int(described["round"]), "features_sha256": described["features_sha256"]}


def _shared_state(run: Path, name: str, identity: dict, force: bool) -> str:
    """"write" or "skip" (the same, recorded) for NAME's shared.h5. Another published one goes with
    NAME's upload: replaced freely when there is no upload, else only with force (like aligned.h5)."""
    path = layout.shared_path(run, name)
    if force or not path.exists():
        return "write"
    try:
        with store.open_complete(path, "shared") as f:
            diff = {k: (f.attrs.get(k), v) for k, v in identity.items() if not store._attr_eq(f.attrs.get(k), v)}
    except CooptError as e:
        if layout.upload_path(run, name).exists():
            raise CooptError(f"{e}; rerun with --force to replace it") from None
        return "write"
    if diff and layout.upload_path(run, name).exists():  # the upload it goes with is another alignment too
        said = "; ".join(f"{k} {store.plain(old)!r}, now {new!r}" for k, (old, new) in diff.items())
        raise CooptError(f"{layout.upload_path(run, name)}: holds another alignment (its shared.h5: {said}); everyone "
                         f"is fitted to the same S*: rerun with --force to realign everyone")
    recorded = store.read_manifest(path.parent).get(layout.SHARED)
    return "skip" if not diff and recorded == file_sha256(path) else "write"


def _consensus(peers: Peers, todo: list[str], dim: int, force: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """S* from everyone's projected features on S: computed from the features this process
    holds, read from the others' published shared.h5. Returns (S*, rows everyone decoded, what
    to publish as shared.h5 for `todo`). WaitingError, after publishing ours, while someone's is
    missing: it is what they wait for."""
    seed = peers.plan["seed"]
    blocks, mine, missing = {}, {}, []
    for nm in peers.names:
        identity = _shared_identity(nm, "projected", dim, projection_seed(seed, nm), peers.describe(nm))
        if nm in todo:
            fs, ok, s_index, s_skipped = _features_on_s(peers.local[nm])
            block = _projected(fs, dim, identity["projection_seed"])
            blocks[nm] = (block, ok)
            mine[nm] = (identity, s_index, s_skipped, block)
        elif (got := peers.shared(nm, identity)) is not None:
            blocks[nm] = got
        elif nm in peers.local:  # one disk: its features are here
            fs, ok, _, _ = _features_on_s(peers.features(nm))
            blocks[nm] = (_projected(fs, dim, identity["projection_seed"]), ok)
        else:
            missing.append(nm)
    states = {nm: _shared_state(peers.run, nm, m[0], force) for nm, m in mine.items()}
    if missing:
        for nm, m in mine.items():
            if states[nm] == "write":
                publish.write_shared(peers.run, nm, *m)
        raise WaitingError(f"{peers.run}: the consensus needs every participant's projected features on S; "
                           f"{', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} not published "
                           f"shared.h5 for --dim {dim} yet ({', '.join(mine)}'s is published): rerun once "
                           f"they have run align --participant NAME")
    return (*consensus_targets(blocks, dim, seed), mine)


def check_memory(plan: dict, dim: int, k: int, writers: int) -> None:
    """Refuse a --dim whose largest allocations exceed this machine's memory (one line, not a failed
    allocation or the OOM killer): fit_map's ridge system [|S| + n, n] float64 (n^2 dominates:
    32 GiB at n = 65536), consensus_targets' [|S|, K n] float64 three times (projected, centred,
    SVD), and one grouped block of float32 outputs [APPLY_BLOCK_ROWS, n] per participant written."""
    s = len(plan["shared"])
    rows = min(APPLY_BLOCK_ROWS, max(len(sh) for sh in plan["shards"]))
    need = 8 * dim * (dim + s) + 3 * 8 * s * k * dim + 4 * rows * dim * writers
    ram = physical_memory()
    if need > ram:
        raise CooptError(f"--dim {dim}: align needs about {need / 2**30:.1f} GiB of memory at this dim "
                         f"(|S| = {s}, {k} participants), more than this machine's {ram / 2**30:.1f} GiB")


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def number_attr(f, path: Path, name: str, kind=float):
    """A numeric attribute; one line naming it when a hand-edited file holds something else."""
    try:
        return kind(f.attrs[name])
    except (TypeError, ValueError):
        raise CooptError(f"{path}: attribute {name!r} is {f.attrs[name]!r}, not {'an integer' if kind is int else 'a number'}") from None


def feature_layout(f, path: Path) -> int:
    """The width of an open features.h5 whose shapes and numbers are what extract writes: both groups
    [index rows, feature_dim], numeric feature_dim, uniformity and round. score and inspect check
    this before reading (check_features too)."""
    for name, kind in (("uniformity", float), ("round", int)):
        number_attr(f, path, name, kind)
    width = number_attr(f, path, "feature_dim", int)
    for g in ("shard", "shared"):
        n, x = f[f"{g}/index"].shape[0], f[f"{g}/features"]
        if x.shape != (n, width) or width < 1:
            raise CooptError(f"{path}: {g}/features has shape {x.shape}, expected ({n}, {width}) "
                             f"({g}/index rows, attribute feature_dim)")
    return width


def check_features(path: Path, name: str, plan: dict, shard: bool = True) -> str:
    """A participant's features.h5 is what it published, for this run: whole (store.SCHEMA), the
    sha256 its manifest.json records, written by this participant from this plan's data set, shard
    and S, with shapes that agree and finite features on S (and on its shard, when `shard`: the
    participants align writes). Costs one hash of the file and one read of its shard features."""
    folder = path.parent
    with store.open_complete(path, "features") as f:
        recorded = store.read_manifest(folder).get("features.h5")
        if recorded is None:
            raise CooptError(f"{path}: not recorded in {folder / 'manifest.json'} (extract records what it publishes)")
        digest = file_sha256(path)
        if digest != recorded:
            raise CooptError(f"{path}: sha256 {digest[:12]} differs from the {recorded[:12]} recorded in "
                             f"{folder / 'manifest.json'} (replaced or changed since extract published it)")
        if not store._attr_eq(f.attrs["participant"], name):
            raise CooptError(f"{path}: extracted by participant {f.attrs['participant']!r}, not by {name!r} whose folder holds it")
        fp = plan["fingerprint"]["sha256"]
        if not store._attr_eq(f.attrs["dataset_sha256"], fp):
            raise CooptError(f"{path}: extracted from another data set (dataset_sha256 {str(f.attrs['dataset_sha256'])[:12]}, "
                             f"plan.json has {fp[:12]})")
        k = number_attr(f, path, "shard", int)
        if not (0 <= k < len(plan["shards"]) and np.array_equal(f["shard/index"][:], plan["shards"][k])):
            raise CooptError(f"{path}: shard/index is not shard {k} of plan.json")
        if not np.array_equal(f["shared/index"][:], plan["shared"]):
            raise CooptError(f"{path}: shared/index is not plan.json's shared set S")
        feature_layout(f, path)
        for g in ("shard", "shared"):
            if not np.isin(f[f"{g}/skipped"][:], f[f"{g}/index"][:]).all():
                raise CooptError(f"{path}: {g}/skipped lists samples outside {g}/index")
        for g in ("shared", "shard") if shard else ("shared",):
            x = f[f"{g}/features"]
            bad = next((b for b in range(0, x.shape[0], APPLY_BLOCK_ROWS)
                        if not np.isfinite(x[b : b + APPLY_BLOCK_ROWS]).all()), None)
            if bad is not None:
                raise CooptError(f"{path}: {g}/features has NaN or Inf values (rows {bad}..)")
    return digest


def _published(path: Path, identity: dict) -> str:
    """What to do with a participant's aligned.h5: "write" (none yet), "skip" (it is this very
    alignment), "unrecorded" (it is, but its manifest.json lacks it: an align interrupted after
    publishing). Anything else there is refused: replacing it takes --force."""
    if not path.exists():
        return "write"
    again = "rerun with --force to replace it"
    try:
        f = store.open_complete(path, "aligned targets")
    except CooptError as e:
        raise CooptError(f"{e}; {again}") from None
    with f:
        diff = {k: (f.attrs.get(k), v) for k, v in identity.items() if not store._attr_eq(f.attrs.get(k), v)}
    if diff:
        if identity["reference"] == CONSENSUS:  # one S* for all: a change for one is a change for everyone
            why = " (another participant's features changed since)" if set(diff) == {"s_star"} else ""
            again = f"the consensus S* moved{why} and everyone is fitted to it: rerun with --force to realign everyone"
        said = "; ".join(f"{k} {store.plain(old)!r}, now {new!r}" for k, (old, new) in diff.items())
        raise CooptError(f"{path}: holds another alignment ({said}); {again}")
    recorded = store.read_manifest(path.parent).get("aligned.h5")
    if recorded is None:
        return "unrecorded"
    if recorded != file_sha256(path):
        raise CooptError(f"{path}: sha256 differs from the {recorded[:12]} recorded in {path.parent / 'manifest.json'} "
                         f"(changed since align published it); {again}")
    return "skip"


def _projected(fs: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """F(S) W in float64, published (and used) as float32: half the bytes of float64, and every
    machine, whether it computed a block or read it, feeds the consensus the same bits."""
    return (fs.double() @ projection(fs.shape[1], dim, seed).double()).float()


def consensus_targets(blocks: dict[str, tuple[torch.Tensor, torch.Tensor]], dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S* [|S|, dim] shared by every participant, and the rows of S all of them decoded.

    blocks: each participant's projected features on S, F_k(S) W_k (the same W_k as its fit;
    float32, computed in float64), with its decoded rows. Each is centred and scaled to unit
    Frobenius norm, so each weighs the same whatever its scale or dimension; S* = the top-dim
    principal directions of their concatenation (U Σ), spread over all dim columns by a seeded
    Gaussian (seed: the plan's) when S has fewer directions than dim, and scaled to unit RMS
    (float16 targets keep their precision). Deterministic: any machine computes the same S* from the same blocks.
    """
    ok = None
    for _, dec in blocks.values():
        ok = dec if ok is None else ok & dec
    if int(ok.sum()) < 2:
        raise CooptError("fewer than 2 rows of S decoded by every participant; no consensus to fit")
    z = []
    for nm in sorted(blocks):
        b = blocks[nm][0].double()
        b = b[ok] - b[ok].mean(0)
        z.append(b / b.norm().clamp_min(1e-30))
    u, sv, _ = torch.linalg.svd(torch.cat(z, 1), full_matrices=False)
    k = min(dim, len(sv))
    t = u[:, :k] * sv[:k]
    if k < dim:
        g = torch.Generator().manual_seed(seed)
        t = t @ (torch.randn(k, dim, generator=g, dtype=torch.float64) / np.sqrt(dim))
    t = t / t.square().mean().sqrt().clamp_min(1e-30)
    s_star = torch.zeros(len(ok), dim, dtype=torch.float64)
    s_star[ok] = t
    return s_star.float(), ok


def s_star_id(s_star: torch.Tensor | None) -> str:
    """Names the S* a participant was fitted to: merge refuses uploads fitted to different ones
    (after an upgrade, with the consensus, everyone's fit is stale until everyone realigns)."""
    if s_star is None:
        return "none"
    return hashlib.sha256(s_star.float().contiguous().numpy().tobytes()).hexdigest()[:16]


def _reference_targets(peers: Peers, ref: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's published S* (its shared.h5) and which rows of S it could decode."""
    identity = _shared_identity(ref, "s_star", dim, projection_seed(peers.plan["seed"], ref), peers.describe(ref))
    got = peers.shared(ref, identity)
    if got is None:
        raise WaitingError(f"{layout.shared_path(peers.run, ref)}: the reference {ref!r} has not published its shared "
                           f"targets S* for --dim {dim} and its latest features yet (it runs align --participant {ref})")
    return got


def _apply_all(job: Job, fits: dict, align_apply) -> None:
    """Apply every participant's map to its shard (one grouped launch per block of rows, on
    job.device): open each upload's partial, apply block by block, publish each."""
    dim, td, dev = job.dim, job.target_dtype, job.device
    srcs, outs = {}, {}
    try:
        for name, ft in fits.items():
            srcs[name] = store.open_complete(ft["features"], "features")
            path = layout.upload_path(job.run, name)
            outs[name] = (*_open_upload(path, srcs[name], ft, dim, td), path)
        maps = {nm: ft["map"].to(dev) for nm, ft in fits.items()}  # moved once, not per block
        total = sum(srcs[nm]["shard/features"].shape[0] for nm in fits)
        with bar("align", total, job.progress, unit="rows") as advance:
            advance(sum(store.rows_done(t) for _, t, _ in outs.values()))
            while live := [nm for nm, (_, t, _) in outs.items() if store.rows_done(t) < t.shape[0]]:
                at = {nm: store.rows_done(outs[nm][1]) for nm in live}  # finite rows: check_features read them
                xs = [torch.from_numpy(srcs[nm]["shard/features"][at[nm] : at[nm] + APPLY_BLOCK_ROWS]).to(dev)
                      for nm in live]
                ys, sums, sumsqs = align_apply(xs, [maps[nm] for nm in live], out_dtype=codec.kernel_dtype(td))
                ys, sums, sumsqs = [y.cpu() for y in ys], sums.cpu(), sumsqs.cpu()
                for g, nm in enumerate(live):
                    _store_block(outs[nm][0], outs[nm][1], ys[g], sums[g], sumsqs[g], td, dim)
                    advance(len(ys[g]))
        for f, _, path in outs.values():
            _publish_upload(f, path, job.ref, td, dim)
        outs.clear()
    except CooptError as e:  # bad input (not a full disk): keep no partial output
        for f, _, path in outs.values():
            store.abandon(f)
            if not isinstance(e, DiskFullError):
                store.partial_path(path).unlink(missing_ok=True)
        outs.clear()
        raise
    finally:
        for f, _, _ in outs.values():
            store.abandon(f)
        for s in srcs.values():
            s.close()


def _open_upload(path: Path, src, ft: dict, dim: int, td: str):
    """(open partial aligned.h5, its shard/targets dataset): everything but the shard's targets
    written (indices, W, map, S targets, inspect's sample), resumed where a crash left it."""
    f, _ = store.open_partial(path, ft["identity"])
    for key in ("shard/index", "shared/index", "shard/skipped", "shared/skipped"):
        if key not in f:
            f.create_dataset(key, data=src[key][:])
    for key, val in (("projection", ft["w"]), ("map", ft["map"]), ("shared/targets", ft["shared"])):
        if key not in f:
            store.create_checked(f, key, val.numpy())
    if "sample/rows" not in f:  # what inspect compares, so it needs no features: W-only targets of a sample
        rows = inspect_rows(src["shard/features"].shape[0], ft["seed"])
        before = torch.from_numpy(src["shard/features"][rows].astype(np.float32)) @ ft["w"]
        store.create_checked(f, "sample/projected", before.half().numpy())  # float16, like the targets
        f.create_dataset("sample/rows", data=rows)
    n_k = src["shard/features"].shape[0]
    tgt = store.create_rows(f, "shard/targets", n_k, dim, codec.storage_dtype(td))
    if td == "int8":
        store.create_rows(f, "shard/scale", n_k, 1, np.float32)
    if td == "int8-dim" and "scale" not in f:
        store.create_checked(f, "scale", codec.dim_scale(ft["shared"]).numpy())
    if "stats/running" not in f:
        f.create_dataset("stats/running", data=np.zeros(2 * dim + 2))
    _resume_stats(f, tgt)
    f.attrs.update({"residual": ft["residual"], "prior": ft["meta"]["prior"], "s_star": ft["identity"]["s_star"],
                    "uniformity": ft["meta"]["uniformity"], "round": ft["meta"]["round"]})
    return f, tgt


def _store_block(f, tgt, y: torch.Tensor, s: torch.Tensor, ss: torch.Tensor, td: str, dim: int) -> None:
    """Append one block of targets y (with the kernel's column sums s and sums of squares ss) at
    rows_done, and the running statistics, in the order a resume relies on."""
    start = store.rows_done(tgt)
    scale = torch.from_numpy(f["scale"][:]) if td == "int8-dim" else None
    stored, row_scale = codec.encode(y, td, scale)
    if td.startswith("int8"):  # the statistics of what the loader will decode, not of the fp32 values
        dec = codec.decode(torch.from_numpy(stored), td, torch.from_numpy(row_scale) if
                           row_scale is not None else scale).double()
        s, ss = dec.sum(0), dec.square().sum(0)
    # Rows flushed, then the running statistics (sums, sums of squares, the row count they cover,
    # clipped values) in ONE dataset write, then rows_done: a crash between the last two is
    # repaired by _resume_stats, trusting the statistics' row count, whose rows are on disk.
    tgt[start : start + len(stored)] = stored
    if row_scale is not None:
        f["shard/scale"][start : start + len(stored), 0] = row_scale
    f.flush()
    run_stats = f["stats/running"][:]
    run_stats[:dim] += s.numpy()
    run_stats[dim : 2 * dim] += ss.numpy()
    run_stats[-2] = start + len(stored)
    run_stats[-1] += codec.clipped(y, scale) if scale is not None else 0
    f["stats/running"][...] = run_stats
    f.flush()
    store.set_rows_done(tgt, start + len(y))
    f.flush()


def _publish_upload(f, path: Path, ref, td: str, dim: int) -> None:
    """The running statistics become stats/sum and stats/sumsq; then complete and renamed."""
    run_stats = f["stats/running"][:]
    for key, val in (("stats/sum", run_stats[:dim]), ("stats/sumsq", run_stats[dim : 2 * dim])):
        if key in f:  # left by a run interrupted while publishing
            del f[key]
        store.create_checked(f, key, val)
    del f["stats/running"]
    f.attrs["reference"] = ref or "none"
    if td == "int8-dim":
        f.attrs["clipped"] = int(run_stats[-1])
    store.publish(f, path)


def _resume_stats(f, tgt) -> None:
    """Make rows_done and the statistics agree after a crash (see the write order in _apply_all)."""
    stats_rows = int(f["stats/running"][-2])
    if stats_rows > store.rows_done(tgt):
        store.set_rows_done(tgt, stats_rows)
    elif stats_rows < store.rows_done(tgt):  # cannot happen with that order; refuse to guess
        raise CooptError(f"{f.filename}: statistics and rows disagree; remove the .partial file and rerun align")


INSPECT_ROWS = 1000  # shard rows per upload that inspect compares: a CI of about ±0.06 on its bound


def inspect_rows(n: int, seed: int) -> np.ndarray:
    """The rows of a shard whose W-only targets an upload carries for inspect (sorted, seeded)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, INSPECT_ROWS), replace=False))
