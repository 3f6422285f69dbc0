"""benchmarks/ssl_gain_lib.py: the benchmark's own figures on hand-made inputs (no training)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ssl_gain_lib import (  # noqa: E402
    better_ceiling,
    budget_ema,
    format_mean_std,
    gap_closed,
    gaps_closed,
    mean_std,
    per_bracket_subset,
    pool_false_positive_rate,
    pool_figures,
    pool_top_precision,
    rare_recall,
)


def test_gap_closed_for_qwk_and_mae():
    assert gap_closed(0.60, 0.50, 0.70) == pytest.approx(0.5)
    assert gap_closed(0.70, 0.50, 0.70) == pytest.approx(1.0)
    assert gap_closed(0.45, 0.50, 0.70) == pytest.approx(-0.25)  # worse than the floor
    # MAE: lower is better, so the floor is the larger number
    assert gap_closed(0.80, 0.90, 0.70, higher_is_better=False) == pytest.approx(0.5)
    assert gap_closed(0.95, 0.90, 0.70, higher_is_better=False) == pytest.approx(-0.25)
    # no gap (or a ceiling below the floor) and missing values give NaN, never a division by ~0
    assert math.isnan(gap_closed(0.6, 0.6, 0.6))
    assert math.isnan(gap_closed(0.6, 0.6, 0.55))
    assert math.isnan(gap_closed(0.8, 0.7, 0.75, higher_is_better=False))
    assert math.isnan(gap_closed(float("nan"), 0.5, 0.7))
    assert gaps_closed([0.6, 0.7], [0.5, 0.5], [0.7, 0.9]) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError):
        gaps_closed([0.6], [0.5, 0.5], [0.7, 0.9])


def test_better_ceiling_by_mean():
    ceilings = {"oracle": [0.60, 0.62], "labels x4": [0.65, 0.59]}
    assert better_ceiling(ceilings) == "labels x4"  # 0.620 vs 0.610
    assert better_ceiling({"oracle": [0.7, 0.8], "labels x4": [0.6, 0.9]}, higher_is_better=False) == "oracle"
    assert better_ceiling({"oracle": [float("nan")], "labels x4": [0.5]}) == "labels x4"
    assert better_ceiling({"oracle": []}) is None


def test_pool_top_precision():
    true = np.arange(100, dtype=float)  # the true top 5% is 95..99
    assert pool_top_precision(true, true, 0.01) == 1.0  # perfect ranking
    assert pool_top_precision(true, true, 0.05) == 1.0
    assert pool_top_precision(-true, true, 0.05) == 0.0  # reversed ranking
    pred = true.copy()
    pred[[99, 98]] = -1  # the best two ranked last: the top 5 now holds 93..97
    assert pool_top_precision(pred, true, 0.05) == pytest.approx(3 / 5)
    assert pool_top_precision(pred, true, 0.01) == 1.0  # top 1 is 97: still in the true top 5%
    # ties at the boundary of the true top 5% are relevant too
    tied = np.array([0.0] * 90 + [5.0] * 10)
    assert pool_top_precision(np.arange(100.0), tied, 0.05) == 1.0
    # N and K are at least one image
    assert pool_top_precision([0.1, 0.9], [1.0, 0.0], 0.01) == 0.0
    with pytest.raises(ValueError):
        pool_top_precision([1.0], [1.0, 2.0], 0.05)


def test_pool_false_positive_rate():
    pred = np.array([6.0, 4.9, 5.0, 9.0, 1.0])
    true_bracket = np.array([0, 1, 1, 8, 2])
    assert pool_false_positive_rate(pred, true_bracket) == pytest.approx(2 / 3)  # 6.0 and 5.0 (>= 5 counts)
    assert math.isnan(pool_false_positive_rate([6.0], [5]))


def test_pool_figures_from_probabilities():
    probs = np.zeros((100, 11))
    true = np.linspace(0, 10, 100)
    probs[np.arange(100), np.clip(np.round(true).astype(int), 0, 10)] = 1.0  # right bracket, all mass
    fig = pool_figures(probs, true)
    assert fig["pool_top5_precision"] == 1.0 and fig["pool_top1_precision"] == 1.0
    assert fig["pool_false_positive_rate"] == 0.0
    probs_bad = np.zeros((100, 11))
    probs_bad[:, 10] = 1.0  # everything scored 10: every low image is a false positive
    assert pool_figures(probs_bad, true)["pool_false_positive_rate"] == 1.0


def test_per_bracket_subset():
    brackets = np.repeat(np.arange(11), [31, 162, 533, 675, 690, 576, 228, 95, 54, 29, 7])
    ten = per_bracket_subset(brackets, 0.1, seed=0)
    counts = np.bincount(brackets[ten], minlength=11)
    assert counts.tolist() == [3, 16, 53, 68, 69, 58, 23, 10, 5, 3, 1]  # round(0.1 n), at least one
    assert len(per_bracket_subset(brackets, 1.0, seed=0)) == len(brackets)
    assert np.array_equal(per_bracket_subset(brackets, 0.1, seed=0), ten)  # fixed by the seed
    assert not np.array_equal(per_bracket_subset(brackets, 0.1, seed=1), ten)
    forty = per_bracket_subset(brackets, 0.4, seed=0)
    assert set(ten) <= set(forty)  # nested
    small = np.array([3, 3, 7])
    assert sorted(small[per_bracket_subset(small, 0.01, seed=0)]) == [3, 7]  # one per bracket present
    with pytest.raises(ValueError):
        per_bracket_subset(brackets, 0.0, seed=0)


def test_mean_std_and_format():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_std([0.5]) == (0.5, 0.0, 1)
    assert mean_std([1.0, float("nan"), None, 3.0])[:2] == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([float("nan")])[2] == 0
    assert format_mean_std([0.61, 0.63]) == "0.620 ± 0.014"
    assert format_mean_std([]) == "–"
    assert format_mean_std([0.5, 0.7], percent=True) == "60% ± 14%"


def test_rare_recall_and_budget_ema():
    m = {"recall_0": 1.0, "recall_8": 0.5, "recall_9": 0.0, "recall_10": float("nan"), "recall_4": 0.2}
    assert rare_recall(m) == pytest.approx(0.5)
    assert budget_ema(500) == pytest.approx(0.96)
    assert budget_ema(20000) == pytest.approx(0.999)
    assert budget_ema(60) == 0.9 and budget_ema(10**7) == 0.999


def test_summarize_setting_picks_the_better_ceiling_per_metric():
    from ssl_gain import ORACLE, X4, summarize_setting

    def reps(qwk, mae):
        return [{"qwk": q, "mae": m} for q, m in zip(qwk, mae)]

    rows = {"supervised": reps([0.50, 0.52], [0.90, 0.88]),
            ORACLE: reps([0.70, 0.72], [0.80, 0.80]),  # best QWK
            X4: reps([0.60, 0.62], [0.70, 0.68]),  # best MAE
            "fixmatch": reps([0.60, 0.62], [0.85, 0.84])}
    s = summarize_setting(rows)
    assert s["ceiling"] == {"qwk": ORACLE, "mae": X4}
    assert s["gap"]["qwk"] == pytest.approx(0.20) and s["gap"]["mae"] == pytest.approx(0.20)
    assert s["gap_closed"]["fixmatch"]["qwk"] == pytest.approx([0.5, 0.5])
    assert s["gap_closed"]["fixmatch"]["mae"] == pytest.approx([0.25, 0.2])
    assert s["useful"] and s["shown"] == {"qwk": True, "mae": True}
    rows[ORACLE] = rows[X4] = reps([0.51, 0.53], [0.89, 0.87])  # ceilings within 0.05 of the floor
    s = summarize_setting(rows)
    assert not s["useful"] and s["shown"] == {"qwk": False, "mae": False}


def test_variant_rows_carry_algorithm_args_and_config_overrides():
    """--variant ROW=ALGO:key=value,...: plain keys are the algorithm's args, dotted keys
    config overrides; both reach the row's train.py command, on top of the algorithm's
    benchmark defaults."""
    import ssl_gain

    args = ssl_gain.parse_args(["--scale", "smoke", "--algorithms", "supervised", "--variant",
                                "fm-ema=flexmatch:p_cutoff=0.9,algorithm.teacher=ema,train.ema_decay=0.95"])
    assert "fm-ema" in args.rows and ssl_gain.algorithm_of("fm-ema") == "flexmatch"
    over = ssl_gain.algorithm_overrides("fm-ema", 1000)
    assert over[0] == "algorithm.name=flexmatch"
    assert {"algorithm.args.thresh_warmup=false", "algorithm.args.p_cutoff=0.9", "algorithm.teacher=ema",
            "train.ema_decay=0.95"} <= set(over)
    assert ssl_gain.algorithm_overrides("flexmatch", 1000) == ["algorithm.name=flexmatch",
                                                               "algorithm.args.thresh_warmup=false"]
    with pytest.raises(SystemExit):
        ssl_gain.parse_args(["--variant", "bad=flexmatch:teacher"])


def test_softlabel_variant_rows_name_their_teacher_and_student():
    """--variant ROW=softlabel:teacher=T[,student=A]: the row trains algorithm A (default
    supervised) on the labels plus T's pool export, with the soft-label defaults before its
    own overrides (so they win); a teacher not listed before the row is refused."""
    import ssl_gain

    args = ssl_gain.parse_args(["--scale", "smoke", "--algorithms", "supervised", "flexmatch", "--variant",
                                "sf=softlabel:teacher=flexmatch,data.pseudo_weight=1.0",
                                "sf2=softlabel:teacher=sf,student=flexmatch"])
    assert args.rows.index("flexmatch") < args.rows.index("sf") < args.rows.index("sf2")
    assert ssl_gain.TEACHERS["sf"] == "flexmatch" and ssl_gain.TEACHERS["sf2"] == "sf"
    assert ssl_gain.algorithm_of("sf") == "supervised" and ssl_gain.algorithm_of("sf2") == "flexmatch"
    over = ssl_gain.algorithm_overrides("sf", 1000)
    assert over[0] == "algorithm.name=supervised"
    assert over.index("data.pseudo_weight=0.5") < over.index("data.pseudo_weight=1.0")
    assert "algorithm.args.thresh_warmup=false" in ssl_gain.algorithm_overrides("sf2", 1000)
    run = ssl_gain.run_overrides("sf2", {"supervised": Path("l.csv")}, {"main": Path("/d")}, 0, 1000)
    assert "data.unlabeled=/d/unlabeled" in run  # an SSL student draws the pool too
    assert not any(o.startswith("data.unlabeled") for o in ssl_gain.run_overrides(
        "sf", {"supervised": Path("l.csv")}, {"main": Path("/d")}, 0, 1000))
    with pytest.raises(SystemExit):
        ssl_gain.parse_args(["--scale", "smoke", "--algorithms", "supervised", "--variant",
                             "early=softlabel:teacher=late", "late=flexmatch:p_cutoff=0.9"])
