"""`score`: every participant's label-free scores on S, ranked, and the reference each would pick.

From the participants' published records (coopt_fast.publish: extract computes them from the
features on S), so the platform needs no features; a run made before records, or `recompute`,
computes them from features.h5 on `device` (the kernels' dispatcher: Triton on CUDA). Under
`torchrun --nproc_per_node=G -m coopt_fast score RUN --recompute` every rank reads the same rows
of S and takes a band of U's pairs (kernels.uniformity_sharded), all-gathered over the gloo
coordination group: every rank gets the full-|S| value; the CLI prints on rank 0 only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import distributed, layout, publish, remote, store
from . import scores as prior_scores
from .align import feature_layout
from .errors import CooptError


@remote.on_platform
def score(run: str | Path, by: str = prior_scores.DEFAULT_SCORE, device: str = "auto", recompute: bool = False) -> dict:
    """Every participant's scores on S, ranked by `by`, from their published records (computed by
    extract from the features on S), or computed from features.h5 (runs made before records, or
    recompute). Under torchrun every rank must call it: U's pairs are split across the ranks.

    Args:
        run: the run folder (or an s3:// URL: pulled whole first).
        by: the score to rank by (coopt_fast.scores.SCORES).
        device: where computed scores are computed: auto | cpu | cuda | cuda:N (the kernels'
            dispatcher: Triton on CUDA, within ~1e-5 of the CPU's U).
        recompute: compute every score from the features.h5 in the run folder, not the records.

    Returns:
        A summary: participants (ranked rows with every score), by, best, picks (the participant
        each score would choose as the reference), recomputed, device.

    Raises:
        CooptError: an unknown score or device, no participant, a faulty record or features.h5,
            a participant with neither record nor features here (with recompute: no features).
    """
    from .training import resolve_device

    if by not in prior_scores.SCORES:
        raise CooptError(f"--by: unknown score {by!r}; choose from {', '.join(prior_scores.SCORES)}")
    run = Path(run)
    names = layout.participants(run)
    if not names:
        raise CooptError(f"{run}: no participant has extracted features yet")
    w = distributed.world()
    dev = distributed.rank_device(resolve_device(device), w)
    with distributed.process_group(dev, w):  # every rank computes the same records, in the same order
        recs = {nm: _record(run, nm, dev, recompute) for nm in names}
    values, rows = {}, []
    for nm, rec in recs.items():
        values[nm] = rec["scores"]
        rows.append({"participant": nm, "prior": rec["prior"], "feature_dim": rec["feature_dim"],
                     "rows": rec["rows"], "shared_rows": rec["shared_rows"], "round": rec["round"],
                     **{k.replace("-", "_"): values[nm].get(k, float("nan")) for k in prior_scores.SCORES},
                     "published_uniformity": rec["uniformity"]})
    key = by.replace("-", "_")
    sign = prior_scores.SCORES[by]
    order = sorted(rows, key=lambda r: (not np.isfinite(r[key]), sign * r[key] if np.isfinite(r[key]) else 0,
                                        r["participant"]))
    for rank, r in enumerate(order, 1):
        r["rank"] = rank
    picks = {sc: prior_scores.best({nm: v.get(sc, float("nan")) for nm, v in values.items()}, sc)
             for sc in prior_scores.SCORES}
    return {"participants": order, "by": by, "best": picks[by], "picks": picks, "recomputed": recompute,
            "device": str(dev)}


def _record(run: Path, name: str, dev, recompute: bool) -> dict:
    """NAME's published record, or (none published, or recompute) one computed from its features.h5."""
    rec = None if recompute else publish.read_record(run, name)
    if rec is None:
        path = layout.features_path(run, name)
        if not path.exists():
            if recompute:
                raise CooptError(f"{path}: not found; --recompute needs every participant's features.h5 in the run "
                                 f"folder ({name}'s workspace is elsewhere: score without --recompute reads its record)")
            raise CooptError(f"{layout.participant_dir(run, name)}: participant {name} has published no record.json")
        with store.open_complete(path, "features") as f:
            feature_layout(f, path)
        rec = publish.record_of(path, "", dev, distributed.coord_group())
    return rec
