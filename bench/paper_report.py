"""The payoff report's analysis: pure functions over measured numbers, then markdown and plots.

Imported by bench/paper.py (which runs the experiments) and by tests/test_paper.py. Nothing
here trains or times anything, so every piece is testable on tiny inputs:

  time_to_reach(curve, target)   first time a piecewise-linear accuracy curve reaches target
  value_at(curve, t)             the curve's accuracy at time t (linear interpolation)
  spearman(x, y)                 rank correlation, ties get their average rank
  bootstrap_spearman(...)        percentile interval of (seed-averaged) rho, resampling priors
  mean_std(values)               mean, sample std and the values themselves
  check_schema(result)           the keys bench/results/paper.json promises
  markdown(result), plots(result, folder)
"""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import numpy as np

# What paper.json promises: one entry per experiment, each with its environment and seeds.
EXPERIMENTS = ("table2", "fig4d", "refchoice", "fig3c", "table5", "fig5", "fig3b", "collab")
ENTRY_KEYS = ("env", "seeds")
ENV_KEYS = ("hardware", "date", "commit")
REQUIRED = {
    "table2": ("label_using", "label_free", "byol", "simclr", "time_to_accuracy", "equal_time"),
    "fig4d": ("arms",),
    "refchoice": ("arms", "default_score"),
    "fig3c": ("priors", "spearman", "best_score"),
    "table5": ("arms",),
    "fig5": ("arms",),
    "fig3b": ("rounds",),
    "collab": ("ks",),
}


# ---- statistics -------------------------------------------------------------------------------

def mean_std(values) -> dict:
    """{"mean", "std", "n", "values"}; std is the sample std (None for fewer than 2 values)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) >= 2 else None,
            "n": len(vals), "values": [None if v is None else float(v) for v in values]}


def _points(curve) -> list[tuple[float, float]]:
    pts = sorted((float(t), float(a)) for t, a in curve)
    if not pts:
        raise ValueError("empty curve")
    return pts


def time_to_reach(curve, target: float) -> float | None:
    """First time the curve (points (t, acc), joined by straight lines) reaches `target`.

    The curve starts at its first point: if that point already reaches the target its time is
    returned (nothing is known before it). None if the target is never reached.
    """
    pts = _points(curve)
    if pts[0][1] >= target:
        return pts[0][0]
    for (t0, a0), (t1, a1) in zip(pts, pts[1:]):
        if a1 >= target:
            return t0 + (t1 - t0) * (target - a0) / (a1 - a0)  # a1 > a0 here: a0 < target <= a1
    return None


def value_at(curve, t: float) -> float | None:
    """The curve's accuracy at time t, interpolated; None outside [first point, last point]."""
    pts = _points(curve)
    if t < pts[0][0] or t > pts[-1][0]:
        return None
    for (t0, a0), (t1, a1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            return a0 if t1 == t0 else a0 + (a1 - a0) * (t - t0) / (t1 - t0)
    return pts[-1][1]


def ranks(x) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (what Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of the ranks. NaN when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def bootstrap_spearman(scores: dict[str, list], accuracy, n_boot: int = 2000, seed: int = 0,
                       sign: dict[str, int] | None = None) -> dict:
    """Bootstrap over priors of each score's rank agreement with accuracy, seeds averaged.

    scores: name -> per-seed lists of the priors' scores ([seed][prior]); accuracy: [prior].
    sign: +1 where a higher score should mean a better prior, -1 where lower should (the
    uniformities). Agreement = sign * rho, so +1 is a perfect ranking for every score.
    Returns per score the point estimate and 95% percentile interval of the agreement, and for
    every pair of scores the interval of their difference on the same resamples (paired).
    Resamples where a side is constant (rho undefined) are dropped and counted.
    """
    sign = sign or {}
    acc = np.asarray(accuracy, dtype=np.float64)
    n = len(acc)
    names = list(scores)
    S = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}  # [seeds, priors]

    def agreement(k, idx):
        return sign.get(k, 1) * float(np.mean([spearman(row[idx], acc[idx]) for row in S[k]]))

    point = {k: agreement(k, np.arange(n)) for k in names}
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in names}
    dropped = 0
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        vals = {k: agreement(k, idx) for k in names}
        if any(not math.isfinite(v) for v in vals.values()):
            dropped += 1
            continue
        for k in names:
            draws[k].append(vals[k])
    out = {"n_boot": n_boot, "dropped": dropped, "agreement": {}, "difference": {}}
    for k in names:
        d = np.asarray(draws[k])
        out["agreement"][k] = {"point": point[k], "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
                               if len(d) else [None, None]}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = np.asarray(draws[a]) - np.asarray(draws[b])
            out["difference"][f"{a} - {b}"] = {
                "point": point[a] - point[b],
                "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))] if len(d) else [None, None]}
    return out


# ---- schema -----------------------------------------------------------------------------------

def check_schema(result: dict) -> list[str]:
    """Every promised key, as a list of what is missing (empty when the file is whole)."""
    missing = []
    for exp in EXPERIMENTS:
        entry = result.get(exp)
        if not isinstance(entry, dict):
            missing.append(exp)
            continue
        for k in ENTRY_KEYS + REQUIRED[exp]:
            if k not in entry:
                missing.append(f"{exp}.{k}")
        for k in ENV_KEYS:
            if k not in entry.get("env", {}):
                missing.append(f"{exp}.env.{k}")
    for arm in ("label_using", "label_free"):
        if arm not in result.get("table2", {}).get("time_to_accuracy", {}):
            missing.append(f"table2.time_to_accuracy.{arm}")
    if "fig3c" in result and not result["fig3c"].get("spearman"):
        missing.append("fig3c.spearman (empty)")
    return missing


# ---- markdown ---------------------------------------------------------------------------------

def pct(ms: dict | float | None, digits: int = 1) -> str:
    """'84.3 ± 0.4' from a mean_std of fractions (or a bare fraction)."""
    if ms is None:
        return "—"
    if isinstance(ms, dict):
        if ms.get("mean") is None:
            return "—"
        s = f"{100 * ms['mean']:.{digits}f}"
        return s + (f" ± {100 * ms['std']:.{digits}f}" if ms.get("std") is not None else "")
    return f"{100 * ms:.{digits}f}"


def sec(ms: dict | float | None) -> str:
    if ms is None:
        return "—"
    if isinstance(ms, dict):
        if ms.get("mean") is None:
            return "—"
        return f"{ms['mean']:.0f}" + (f" ± {ms['std']:.0f}" if ms.get("std") is not None else "")
    return f"{ms:.0f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _g_after(a: dict) -> str:
    ci = a.get("g_after_ci95")
    return _num(a["g_after"]) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else "")


def markdown(result: dict) -> str:
    """paper.md: every experiment's table, from paper.json alone."""
    meta = result.get("meta", {})
    env = meta.get("env", {})
    out = [f"# Does COOPT pay off? Measured on Fashion-MNIST ({'quick' if meta.get('quick') else 'full'} run)", "",
           f"{env.get('hardware', '?')}; {env.get('date', '?')}; commit {env.get('commit', '?')}; "
           f"seeds {meta.get('seeds')}; wall {sec(meta.get('wall_seconds'))} s.", "",
           meta.get("setting", ""), ""]
    t2 = result.get("table2")
    if t2:
        out += ["## Table 2 / Figure 3a: time to accuracy", "",
                "Times are wall seconds on the machine above. COOPT = data optimisation (split, parallel extraction, "
                "score, align, merge) + student training; all-in adds the training time of the participants' priors.", ""]
        rows = []
        for arm in ("label_using", "label_free"):
            a = t2[arm]
            rows.append([f"COOPT {arm.replace('_', '-')}", pct(a["final_linear"]), pct(a["final_knn"]),
                         sec(a["t_coopt"]), sec(a["t_all_in"])])
        for m in ("byol", "simclr"):
            a = t2[m]
            rows.append([f"{m.upper()} (4× budget, final)", pct(a["final_linear"]), pct(a["final_knn"]),
                         sec(a["budget"]), sec(a["budget"])])
            rows.append([f"{m.upper()} (annealed at COOPT's time)", pct(a["equal_time_linear"]), pct(a["equal_time_knn"]),
                         sec(a["equal_time_budget"]), sec(a["equal_time_budget"])])
        out += [_table(["arm", "linear probe %", "kNN %", "seconds", "seconds all-in"], rows), ""]
        rows = []
        for arm in ("label_using", "label_free"):
            for m in ("byol", "simclr"):
                tt = t2["time_to_accuracy"][arm][m]
                eq = t2["equal_time"][arm][m]
                le = "≤ " if tt["reached"] and tt.get("at_first_probe") == tt["reached"] else ""
                rows.append([arm.replace("_", "-"), m.upper(), pct(tt["target"]), f"{tt['reached']}/{tt['n']}",
                             le + sec(tt["seconds"]), le + _ratio(tt["speedup"]), le + _ratio(tt["speedup_all_in"]),
                             _pts(eq["delta_linear"]), _pts(eq["delta_knn"])])
        out += [_table(["COOPT arm", "vs", "target (COOPT final linear) %", "reached within 4×",
                        "SSL seconds to reach", "speed-up (paper's accounting)", "speed-up all-in",
                        "COOPT − SSL at equal time, linear (pt)", "kNN (pt)"], rows), "",
                "Speed-up = SSL seconds to reach the target / COOPT seconds, over the seeds where SSL reached it "
                "(≤: already reached at SSL's first probe, so the true time is at most this); 'equal time' compares "
                "with the SSL run annealed within COOPT's time.", ""]
        if t2.get("coopt_to_ssl_final"):
            rows = []
            for arm, by_m in t2["coopt_to_ssl_final"].items():
                for m, v in by_m.items():
                    rows.append([arm.replace("_", "-"), m.upper(), pct(v["target"]), sec(v["ssl_seconds"]),
                                 f"{v['reached']}/{v['n']}", sec(v["seconds"]), _ratio(v["fraction_of_ssl_time"])])
            out += [_table(["COOPT arm", "vs", "SSL's final linear % (4× run)", "SSL seconds", "COOPT reached it",
                            "COOPT seconds to reach", "fraction of SSL's time"], rows), "",
                    "The other way round: how soon COOPT reaches the accuracy each SSL method ends at.", ""]
    f4 = result.get("fig4d")
    if f4:
        out += ["## Figure 4d: which reference to align to (label-free participants)", ""]
        rows = [[a["reference_kind"], ", ".join(a.get("picked_by", [])) or "—", pct(a["linear"]), pct(a["knn"]),
                 _num(a.get("effective_rank"), 1), _num(a["g_before"]), _g_after(a),
                 _num(a.get("g_after_knn")), _num(a.get("g_after_linear")), _num(a["loss"])] for a in f4["arms"]]
        out += [_table(["reference", "picked by", "linear %", "kNN %", "store effective rank", "G before (MLP)",
                        "G after (MLP) [95% CI]", "G after (kNN test)", "G after (linear test)", "final loss"], rows), "",
                "G = mean over participant pairs of a held-out two-sample test's TV lower bound (2·accuracy − 1, "
                "not clipped; the CI averages the pairs' Wilson intervals). The MLP test is the default; 'linear' is "
                "the logistic test it replaced, which a least-squares fit can satisfy by matching means alone.", ""]
    rc = result.get("refchoice")
    if rc:
        out += ["## Reference choice: what each score on S picks, and what the student gets", ""]
        for arm, rows_ in rc["arms"].items():
            rows = [[r["score"] + (" (default)" if r["default"] else ""), r["name"], pct(r["linear"]), pct(r["knn"]),
                     _num(r.get("effective_rank"), 1), _g_after(r)] for r in rows_]
            out += [f"**{arm}** ({', '.join(rc['participants'][arm])})", "",
                    _table(["score", "reference picked", "linear %", "kNN %", "store effective rank",
                            "G after (MLP) [95% CI]"], rows), ""]
    f3 = result.get("fig3c")
    if f3:
        out += ["## Figure 3c: does a label-free score on S rank the priors?", ""]
        rows = [[p["name"], p["recipe"], pct(p["linear"]), pct(p["knn"])] + [_num(p["scores"][s]) for s in f3["score_names"]]
                for p in f3["priors"]]
        out += [_table(["prior", "recipe", "own linear %", "own kNN %"] + f3["score_names"], rows), ""]
        rows = []
        for s, v in f3["spearman"].items():
            b = f3["bootstrap"]["agreement"][s]
            rows.append([s, _num(v["rho"]["mean"]) + (f" ± {v['rho']['std']:.2f}" if v["rho"]["std"] is not None else ""),
                         _num(b["point"]), f"[{_num(b['ci95'][0])}, {_num(b['ci95'][1])}]"])
            if f3.get("spearman_knn"):
                rows[-1].append(_num(f3["spearman_knn"][s]["rho"], 2))
        out += [_table(["score", "Spearman ρ with linear-probe accuracy (mean ± sd over seeds' S)",
                        "agreement (+1 = perfect)", "bootstrap 95% CI"]
                       + (["ρ with kNN accuracy"] if f3.get("spearman_knn") else []), rows), "",
                f"Best: **{f3['best_score']}**. Differences (same resamples): " +
                "; ".join(f"{k} {_num(v['point'])} [{_num(v['ci95'][0])}, {_num(v['ci95'][1])}]"
                          for k, v in f3["bootstrap"]["difference"].items()), ""]
        if f3.get("labels"):
            lb = f3["labels"]
            out += [f"The labels participant (one-hot): " + ", ".join(f"{s} {_num(lb['scores'][s])}" for s in f3["score_names"])
                    + " — not in ρ (its 'probe accuracy' is 100% by construction).", ""]
    t5 = result.get("table5")
    if t5:
        out += ["## Table 5: human labels and weak participants", ""]
        rows = [[a["name"], ", ".join(a["participants"]), ", ".join(sorted(set(a.get("reference_names", [])))),
                 pct(a["linear"]), pct(a["knn"]), _num(a.get("effective_rank"), 1)] for a in t5["arms"]]
        out += [_table(["arm", "participants", "reference chosen", "linear %", "kNN %", "merged targets' effective rank"],
                       rows), ""]
    f5 = result.get("fig5")
    if f5:
        out += ["## Figure 5: size of the shared set S", ""]
        rows = [[a["shared_fraction"], a["shared_size"], pct(a["linear"]), pct(a["knn"]), _num(a["residual"])]
                for a in f5["arms"]]
        out += [_table(["|S|/N", "|S|", "linear %", "kNN %", "mean fit residual"], rows), ""]
    f3b = result.get("fig3b")
    if f3b:
        out += ["## Figure 3b: rounds of prior upgrades", ""]
        rows = [[r["round"], r["upgrade"], ", ".join(r["priors"]), pct(r["linear"]), pct(r["knn"])] for r in f3b["rounds"]]
        out += [_table(["round", "upgrade", "priors (p0..p3)", "linear %", "kNN %"], rows), ""]
    co = result.get("collab")
    if co:
        out += ["## Collaboration: participants extracting in parallel", ""]
        rows = [[k["k"], sec(k["wall"]), _ratio(k["speedup"]), sec(k["separate_machines"]),
                 _ratio(k["separate_speedup"])] for k in co["ks"]]
        out += [_table(["K", "data-optimisation wall s (this machine, K processes)", "speed-up vs K=1",
                        "wall s if each participant had its own machine (slowest alone)", "speed-up"], rows), ""]
    return "\n".join(out) + "\n"


def _num(v, digits: int = 3) -> str:
    if isinstance(v, dict):
        if v.get("mean") is None:
            return "—"
        return f"{v['mean']:.{digits}f}" + (f" ± {v['std']:.{digits}f}" if v.get("std") is not None else "")
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _ratio(v) -> str:
    if isinstance(v, dict):
        if v.get("mean") is None:
            return "—"
        return f"{v['mean']:.2f}×" + (f" ± {v['std']:.2f}" if v.get("std") is not None else "")
    return "—" if v is None else f"{v:.2f}×"


def _pts(v) -> str:
    if isinstance(v, dict):
        if v.get("mean") is None:
            return "—"
        return f"{100 * v['mean']:+.1f}" + (f" ± {100 * v['std']:.1f}" if v.get("std") is not None else "")
    return "—" if v is None else f"{100 * v:+.1f}"


# ---- plots ------------------------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _mean_curve(per_seed: list[dict], key: str):
    """Snapshot-wise mean time and mean/std accuracy over seeds (snapshots are aligned by index)."""
    n = min(len(s["curve"]) for s in per_seed)
    t = np.array([[s["curve"][i]["seconds"] for i in range(n)] for s in per_seed])
    a = np.array([[s["curve"][i][key] for i in range(n)] for s in per_seed]) * 100
    return t.mean(0), a.mean(0), (a.std(0, ddof=1) if len(per_seed) > 1 else np.zeros(n))


def plots(result: dict, folder: Path, prefix: str = "paper") -> list[str]:
    """PNG figures: accuracy vs wall time, score vs accuracy, alignment ablation, S size and rounds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    t2 = result.get("table2")
    if t2:
        fig = _figure(11, 4.2)
        styles = {"label_using": ("C0", "COOPT label-using"), "label_free": ("C2", "COOPT label-free"),
                  "byol": ("C3", "BYOL"), "simclr": ("C1", "SimCLR")}
        for i, key in enumerate(("linear", "knn")):
            ax = fig.add_subplot(1, 2, i + 1)
            for arm, (c, label) in styles.items():
                t, m, s = _mean_curve(t2[arm]["per_seed"], key)
                ax.plot(t, m, "o-", color=c, label=label, ms=3)
                ax.fill_between(t, m - s, m + s, color=c, alpha=0.15)
                if arm in ("byol", "simclr"):
                    et = [p["equal_time"] for p in t2[arm]["per_seed"]]
                    ax.errorbar(np.mean([e["seconds"] for e in et]), 100 * np.mean([e[key] for e in et]),
                                yerr=100 * np.std([e[key] for e in et], ddof=1) if len(et) > 1 else 0,
                                fmt="s", color=c, mfc="white", ms=6, label=f"{label} annealed at COOPT's time")
            tc = t2["label_free"]["t_coopt"]["mean"]
            ax.axvline(tc, color="gray", ls=":", lw=1)
            ax.set_xlabel("wall seconds (COOPT: data optimisation + student; priors not counted)")
            ax.set_ylabel(f"{'linear-probe' if key == 'linear' else 'kNN (k=20)'} accuracy, %")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.legend(fontsize=7, loc="lower right")
        fig.suptitle("Time to accuracy on Fashion-MNIST (mean ± sd over seeds; dotted: COOPT label-free finishes)",
                     fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, folder / f"{prefix}_time_to_accuracy.png"))
    f3 = result.get("fig3c")
    if f3:
        names = f3["score_names"]
        fig = _figure(4 * len(names), 3.6)
        acc = np.array([p["linear"] for p in f3["priors"]]) * 100
        for i, s in enumerate(names):
            ax = fig.add_subplot(1, len(names), i + 1)
            x = np.array([p["scores"][s] for p in f3["priors"]])
            ax.scatter(x, acc, s=18)
            for p, xi, yi in zip(f3["priors"], x, acc):
                ax.annotate(p["name"], (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
            rho = f3["spearman"][s]["rho"]["mean"]
            ax.set_title(f"{s}: ρ = {rho:.2f}", fontsize=9)
            ax.set_xlabel(f"{s} on S (seed {f3['seeds'][0]})")
            ax.set_ylabel("prior's own linear-probe accuracy, %")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, folder / f"{prefix}_prior_ranking.png"))
    f4 = result.get("fig4d")
    if f4:
        fig = _figure(12, 3.8)
        kinds = [re.sub(r"^p\d+-", "", a["reference_kind"]) for a in f4["arms"]]
        x = np.arange(len(kinds))
        ax = fig.add_subplot(1, 3, 1)
        for j, (key, c) in enumerate((("linear", "C0"), ("knn", "C2"))):
            m = [100 * (a[key]["mean"] or 0) for a in f4["arms"]]
            s = [100 * (a[key]["std"] or 0) for a in f4["arms"]]
            ax.bar(x + (j - 0.5) * 0.38, m, 0.38, yerr=s, color=c, label=key)
        ax.set_xticks(x, kinds, rotation=25, fontsize=8)
        lo = min(100 * (a["knn"]["mean"] or 0) for a in f4["arms"])
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_ylabel("student accuracy, %")
        ax.legend(fontsize=7)
        ax.set_title("student by reference", fontsize=9)
        ax = fig.add_subplot(1, 3, 2)
        for j, (key, label, c) in enumerate((("g_before", "before (W only)", "C7"), ("g_after", "after alignment", "C3"))):
            m = [a[key]["mean"] or 0 for a in f4["arms"]]
            s = [a[key]["std"] or 0 for a in f4["arms"]]
            ax.bar(x + (j - 0.5) * 0.38, m, 0.38, yerr=s, color=c, label=label)
        ax.set_xticks(x, kinds, rotation=25, fontsize=8)
        ax.set_ylabel("G (mean pairwise TV lower bound, MLP test)")
        ax.legend(fontsize=7)
        ax.set_title("target inconsistency G", fontsize=9)
        ax = fig.add_subplot(1, 3, 3)
        for a in f4["arms"]:
            tr = a.get("loss_curve") or []
            if tr:
                ax.plot([p[0] for p in tr], [p[1] for p in tr], lw=1, label=re.sub(r"^p\d+-", "", a["reference_kind"]))
        ax.set_xlabel("step (seed 0)")
        ax.set_ylabel("student loss (1 − cos)")
        ax.legend(fontsize=7)
        ax.set_title("training curve", fontsize=9)
        for a_ in fig.axes:
            a_.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, folder / f"{prefix}_alignment.png"))
    f5, f3b = result.get("fig5"), result.get("fig3b")
    if f5 or f3b:
        fig = _figure(10, 3.6)
        if f5:
            ax = fig.add_subplot(1, 2, 1)
            xs = [a["shared_fraction"] for a in f5["arms"]]
            for key, c in (("linear", "C0"), ("knn", "C2")):
                ax.errorbar(xs, [100 * a[key]["mean"] for a in f5["arms"]],
                            yerr=[100 * (a[key]["std"] or 0) for a in f5["arms"]], fmt="o-", color=c, label=key, ms=3)
            ax.set_xscale("log")
            ax.set_xlabel("|S| / N")
            ax.set_ylabel("student accuracy, %")
            ax.set_title("Figure 5: shared-set size", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        if f3b:
            ax = fig.add_subplot(1, 2, 2)
            xs = [r["round"] for r in f3b["rounds"]]
            for key, c in (("linear", "C0"), ("knn", "C2")):
                ax.errorbar(xs, [100 * r[key]["mean"] for r in f3b["rounds"]],
                            yerr=[100 * (r[key]["std"] or 0) for r in f3b["rounds"]], fmt="o-", color=c, label=key, ms=3)
            ax.set_xlabel("round (one participant upgrades its prior per round)")
            ax.set_ylabel("student accuracy, %")
            ax.set_title("Figure 3b: rounds", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, folder / f"{prefix}_shared_set_and_rounds.png"))
    return written


def _save(fig, path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return str(path)
