"""bench/paper_report.py: the payoff report's statistics, schema and rendering, on tiny inputs.

The experiments themselves are bench/paper.py's (minutes to an hour); what is tested here is
the arithmetic that turns their measurements into claims, and that the committed
bench/results/paper.json is whole and renders.
"""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("paper_report", ROOT / "bench" / "paper_report.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)
RESULTS = ROOT / "bench" / "results" / "paper.json"


def test_time_to_reach_interpolates_between_probe_points():
    curve = [(10, 0.70), (20, 0.80), (40, 0.84)]
    assert R.time_to_reach(curve, 0.75) == pytest.approx(15.0)
    assert R.time_to_reach(curve, 0.82) == pytest.approx(30.0)
    assert R.time_to_reach(curve, 0.80) == pytest.approx(20.0)   # exactly on a point
    assert R.time_to_reach(curve, 0.60) == 10                      # reached at the first probe already
    assert R.time_to_reach(curve, 0.85) is None                    # never: "not reached within 4x"
    assert R.time_to_reach(list(reversed(curve)), 0.75) == pytest.approx(15.0)  # order does not matter


def test_time_to_reach_takes_the_first_crossing_of_a_noisy_curve():
    curve = [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.95)]
    assert R.time_to_reach(curve, 0.8) == pytest.approx(1 + 0.3 / 0.4)
    with pytest.raises(ValueError):
        R.time_to_reach([], 0.5)


def test_value_at_is_the_interpolated_curve_inside_its_range_only():
    curve = [(10, 0.70), (20, 0.80)]
    assert R.value_at(curve, 12.5) == pytest.approx(0.725)
    assert R.value_at(curve, 10) == pytest.approx(0.70) and R.value_at(curve, 20) == pytest.approx(0.80)
    assert R.value_at(curve, 5) is None and R.value_at(curve, 25) is None


def test_spearman_against_the_no_ties_formula_and_with_ties():
    rng = np.random.default_rng(0)
    for n in (5, 9, 23):
        x, y = rng.permutation(n), rng.permutation(n)
        d = R.ranks(x) - R.ranks(y)
        assert R.spearman(x, y) == pytest.approx(1 - 6 * (d * d).sum() / (n * (n * n - 1)))
    assert R.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert R.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert R.spearman([0.1, 5, 7], [1, 100, 1000]) == pytest.approx(1.0)  # ranks, not values
    assert list(R.ranks([3, 1, 3, 2])) == [3.5, 1, 3.5, 2]               # ties share the average rank
    # y = [5, 6, 7, 8, 7] ranks [1, 2, 3.5, 5, 3.5]: Pearson of the ranks, by hand
    rx, ry = np.arange(1, 6) - 3.0, np.array([1, 2, 3.5, 5, 3.5]) - 3.0
    assert R.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx((rx * ry).sum() / math.sqrt((rx**2).sum() * (ry**2).sum()))
    assert math.isnan(R.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        R.spearman([1], [1])


def test_bootstrap_spearman_signs_intervals_and_paired_differences():
    acc = [0.60, 0.70, 0.75, 0.80, 0.85, 0.90, 0.92, 0.95]
    perfect_low = [[-a for a in acc], [-a - 0.01 for a in acc]]       # lower is better, two seeds' S
    noisy = [[a + e for a, e in zip(acc, [0.3, -0.2, 0.1, -0.3, 0.2, 0.0, -0.1, 0.25])]] * 2
    b = R.bootstrap_spearman({"u": perfect_low, "noisy": noisy}, acc, n_boot=300, seed=1,
                             sign={"u": -1, "noisy": 1})
    u, nz = b["agreement"]["u"], b["agreement"]["noisy"]
    assert u["point"] == pytest.approx(1.0) and u["ci95"][0] == pytest.approx(1.0)  # perfect in every resample
    assert nz["ci95"][0] <= nz["point"] <= nz["ci95"][1] and nz["ci95"][0] < 0.9
    d = b["difference"]["u - noisy"]
    assert d["point"] == pytest.approx(1.0 - nz["point"]) and d["ci95"][0] >= 0  # paired: u never ranks worse
    again = R.bootstrap_spearman({"u": perfect_low, "noisy": noisy}, acc, n_boot=300, seed=1, sign={"u": -1})
    assert again["agreement"]["u"] == b["agreement"]["u"]  # seeded


def test_mean_std_keeps_the_values_and_skips_missing_ones():
    m = R.mean_std([0.8, 0.9, None])
    assert m["mean"] == pytest.approx(0.85) and m["std"] == pytest.approx(0.0707, abs=1e-4)
    assert m["n"] == 2 and m["values"] == [0.8, 0.9, None]
    one = R.mean_std([0.5])
    assert one["std"] is None and one["n"] == 1
    assert R.mean_std([])["mean"] is None


def _skeleton() -> dict:
    env = {"hardware": "h", "date": "d", "commit": "c"}
    res = {exp: {"env": dict(env), "seeds": [0], **{k: {} for k in R.REQUIRED[exp]}} for exp in R.EXPERIMENTS}
    res["table2"]["time_to_accuracy"] = {"label_using": {}, "label_free": {}}
    res["fig3c"]["spearman"] = {"uniformity": {}}
    return res


def test_check_schema_names_what_is_missing():
    assert R.check_schema(_skeleton()) == []
    r = _skeleton()
    del r["fig5"]
    del r["table2"]["env"]["commit"]
    del r["table2"]["time_to_accuracy"]["label_free"]
    r["fig3c"]["spearman"] = {}
    assert set(R.check_schema(r)) == {"fig5", "table2.env.commit", "table2.time_to_accuracy.label_free",
                                      "fig3c.spearman (empty)"}


@pytest.mark.skipif(not RESULTS.exists(), reason="bench/results/paper.json not committed yet")
def test_committed_results_are_whole_and_render(tmp_path):
    result = json.loads(RESULTS.read_text())
    assert R.check_schema(result) == []
    assert not result["meta"]["quick"] and len(result["meta"]["seeds"]) >= 3
    t2 = result["table2"]
    for arm in ("label_using", "label_free", "byol", "simclr"):
        assert len(t2[arm]["per_seed"]) == len(result["meta"]["seeds"])
        assert all(len(p["curve"]) >= 6 for p in t2[arm]["per_seed"])  # >= 6 probe points per run
    for arm in ("label_using", "label_free"):
        for p, s in zip(t2[arm]["per_seed"], t2["byol"]["per_seed"]):
            assert s["curve"][-1]["seconds"] >= 4 * p["t_coopt"] * 0.98  # SSL ran to >= 4x COOPT's time
    assert len(result["fig3c"]["priors"]) >= 8
    md = R.markdown(result)
    assert "Table 2" in md and "Figure 3c" in md
    figs = R.plots(result, tmp_path)
    assert len(figs) == 4 and all(Path(f).read_bytes()[:4] == b"\x89PNG" for f in figs)
