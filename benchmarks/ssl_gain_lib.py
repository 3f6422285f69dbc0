"""The pure computations of benchmarks/ssl_gain.py: no training, no files, no torch.

Every figure the benchmark reports beyond what `ssl/train.py` writes to metrics.jsonl is
computed here, from arrays and numbers, so that tests/test_ssl_gain.py can check each one
on small hand-made inputs.
"""

from __future__ import annotations

import math

import numpy as np

from aessl.metrics import HIGH_SCORE_MIN, LOW_BRACKET_MAX, bracket_of, expected_score

RARE_BRACKETS = (0, 8, 9, 10)
#: "The pool's true top 5%": the set the pool top-N precision counts as relevant.
POOL_RELEVANT_FRACTION = 0.05
POOL_TOP_FRACTIONS = (0.01, 0.05)
#: The better ceiling must beat the floor by this much QWK for the setting to be able to
#: show the pool's value (issue 12). The same bar (in brackets) decides whether an MAE gap
#: closed is worth printing: below it the ratio divides noise by noise.
MIN_USEFUL_GAP = 0.05


# --------------------------------------------------------------------------- gap closed


def gap_closed(algorithm: float, floor: float, ceiling: float, higher_is_better: bool = True) -> float:
    """Share of the floor-to-ceiling gap an algorithm closes: 0 = no better than the floor,
    1 = as good as the ceiling, < 0 = worse than the floor, > 1 = better than the ceiling.

    QWK (higher is better): (algorithm - floor) / (ceiling - floor).
    MAE (lower is better):  (floor - algorithm) / (floor - ceiling).
    NaN where the ceiling is no better than the floor (no gap to close) or a value is missing.
    """
    values = (algorithm, floor, ceiling)
    if any(v is None or not math.isfinite(v) for v in values):
        return float("nan")
    sign = 1.0 if higher_is_better else -1.0
    gap = sign * (ceiling - floor)
    if gap <= 0:
        return float("nan")
    return sign * (algorithm - floor) / gap


def better_ceiling(ceilings: dict[str, list[float]], higher_is_better: bool = True) -> str | None:
    """Name of the ceiling with the better mean over its replicates (NaNs ignored); None
    when none has a value. One ceiling per setting and metric, so that every replicate's
    gap closed has the same denominator's meaning."""
    means = {name: _nanmean(v) for name, v in ceilings.items()}
    means = {k: v for k, v in means.items() if math.isfinite(v)}
    if not means:
        return None
    pick = max if higher_is_better else min
    return pick(means, key=means.get)


def gaps_closed(algorithm: list[float], floor: list[float], ceiling: list[float],
                higher_is_better: bool = True) -> list[float]:
    """gap_closed replicate by replicate (the three lists are aligned by replicate)."""
    if not len(algorithm) == len(floor) == len(ceiling):
        raise ValueError(f"unaligned replicates: {len(algorithm)}, {len(floor)}, {len(ceiling)}")
    return [gap_closed(a, f, c, higher_is_better) for a, f, c in zip(algorithm, floor, ceiling)]


# --------------------------------------------------------------------------- the pool, as a user sorts it


def pool_top_precision(pred_score, true_score, top_fraction: float,
                       relevant_fraction: float = POOL_RELEVANT_FRACTION) -> float:
    """Precision of the pool's predicted top N against the pool's true top `relevant_fraction`.

    N = max(1, round(top_fraction * n)) images with the highest predicted (expected) score,
    ties in the prediction broken by pool order (stable sort). An image is relevant when its
    true (continuous) score is >= t, where t is the K-th highest true score of the whole pool
    and K = max(1, ceil(relevant_fraction * n)): the true top 5% by default, every image tied
    with its lowest member included. Precision = share of the N that are relevant; 1.0 is
    reachable for any top_fraction <= relevant_fraction.
    """
    pred = np.asarray(pred_score, dtype=np.float64)
    true = np.asarray(true_score, dtype=np.float64)
    n = len(true)
    if n == 0 or len(pred) != n:
        raise ValueError(f"{len(pred)} predictions for {n} true scores")
    top_n = max(1, int(round(top_fraction * n)))
    k = max(1, math.ceil(relevant_fraction * n - 1e-9))
    threshold = np.sort(true)[::-1][k - 1]
    picked = np.argsort(-pred, kind="stable")[:top_n]
    return float(np.mean(true[picked] >= threshold))


def pool_false_positive_rate(pred_score, true_bracket) -> float:
    """Share of the pool's images of true bracket <= 1 (photos, noise, text, manga, no subject)
    whose expected score is >= 5 (scored 50% or more): the model card's worst error, measured
    where such images are common. NaN when the pool has none."""
    pred = np.asarray(pred_score, dtype=np.float64)
    low = np.asarray(true_bracket) <= LOW_BRACKET_MAX
    return float(np.mean(pred[low] >= HIGH_SCORE_MIN)) if low.any() else float("nan")


def pool_figures(probs, true_score) -> dict:
    """Everything the benchmark reports about a model's ranking of the pool, from its bracket
    probabilities (n x 11) and the pool's true scores: `pool_top1_precision`,
    `pool_top5_precision` and `pool_false_positive_rate`."""
    pred = expected_score(probs)
    true = np.asarray(true_score, dtype=np.float64)
    out = {f"pool_top{round(f * 100)}_precision": pool_top_precision(pred, true, f) for f in POOL_TOP_FRACTIONS}
    out["pool_false_positive_rate"] = pool_false_positive_rate(pred, bracket_of(true))
    return out


# --------------------------------------------------------------------------- label subsets


def per_bracket_subset(brackets, fraction: float, seed: int, min_per_bracket: int = 1) -> np.ndarray:
    """Sorted indices of a labeled subset: in every bracket present, max(min_per_bracket,
    fraction * n_b rounded half up) images (at most n_b), chosen by a permutation seeded by
    (seed, bracket). Fraction 1 keeps everything. The same seed gives nested subsets: the
    images kept at a smaller fraction are among those kept at a larger one."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    brackets = np.asarray(brackets, dtype=np.int64)
    keep = []
    for b in np.unique(brackets):
        idx = np.flatnonzero(brackets == b)
        k = min(len(idx), max(int(min_per_bracket), int(np.floor(fraction * len(idx) + 0.5))))
        order = np.random.default_rng([int(seed), int(b)]).permutation(len(idx))
        keep.append(idx[order[:k]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- summaries


def _finite(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)


def _nanmean(values) -> float:
    v = _finite(values)
    return float(v.mean()) if len(v) else float("nan")


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof 1; 0 for one value), count) over the finite
    values; (nan, nan, 0) when there are none."""
    v = _finite(values)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def format_mean_std(values, digits: int = 3, percent: bool = False) -> str:
    """'0.612 ± 0.014' ('61% ± 4%' with percent=True), '–' where nothing is finite."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    if percent:
        return f"{mean * 100:.0f}% ± {std * 100:.0f}%"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def rare_recall(metrics: dict) -> float:
    """Mean test-set recall over the rare brackets 0, 8, 9, 10 (those the test set has)."""
    return _nanmean([metrics.get(f"recall_{b}", float("nan")) for b in RARE_BRACKETS])


def budget_ema(steps: int, horizon: float = 0.05, low: float = 0.9, high: float = 0.999) -> float:
    """EMA momentum whose time constant is `horizon` of the step budget: 1 - 1/(horizon * steps),
    clipped to [low, high]. USB's 0.999 (a 1,000-step memory) was set for ~1M-step runs; at
    500 steps it leaves FreeMatch's and SoftMatch's statistics near their initial values (every
    pseudo-label accepted). 20,000 steps give back USB's 0.999."""
    return float(min(high, max(low, 1.0 - 1.0 / (horizon * max(1, int(steps))))))
