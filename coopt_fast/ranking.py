"""`score`: every participant's label-free scores on S, ranked, and the reference each would pick.

From the participants' published records (coopt_fast.publish: extract computes them from the
features on S), so the platform needs no features; a run made before records recomputes them
from features.h5.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import layout, publish, remote, store
from . import scores as prior_scores
from .align import feature_layout
from .errors import CooptError


@remote.on_platform
def score(run: str | Path, by: str = prior_scores.DEFAULT_SCORE) -> dict:
    """Every participant's scores on S, ranked by `by`, from their published records (computed by
    extract from the features on S; runs made before records: recomputed from features.h5);
    "picks": the participant each score would choose as the reference."""
    if by not in prior_scores.SCORES:
        raise CooptError(f"--by: unknown score {by!r}; choose from {', '.join(prior_scores.SCORES)}")
    run = Path(run)
    names = layout.participants(run)
    if not names:
        raise CooptError(f"{run}: no participant has extracted features yet")
    values, rows = {}, []
    for nm in names:
        rec = publish.read_record(run, nm)
        if rec is None:
            path = layout.features_path(run, nm)
            if not path.exists():
                raise CooptError(f"{layout.participant_dir(run, nm)}: participant {nm} has published no record.json")
            with store.open_complete(path, "features") as f:
                feature_layout(f, path)
            rec = publish.record_of(path, "")
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
    return {"participants": order, "by": by, "best": picks[by], "picks": picks}
