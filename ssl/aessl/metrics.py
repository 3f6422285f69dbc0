"""Evaluation metrics shared by training, export and reports.

Every figure is computed from two arrays: the model's bracket probabilities (N x 11) and
the true scores (N, possibly fractional). Conventions, fixed here once:
- expected score = sum_b p_b * b (0-10); "percent" = expected score * 10;
- predicted bracket = argmax of the probabilities (what the export writes as `bracket`);
- true bracket = the score rounded to the nearest integer, halves up (`bracket_of`);
- false-positive rate = share of images whose true bracket is <= 1 (photos, text, manga)
  that the model scores at 50% or more (expected score >= 5): the model card's worst error;
- top-K precision = share of the K images with the highest expected score whose true
  score is at least the K-th highest true score (ties count as relevant). K is
  `top_k` or, by default, 10% of the set (at least 1).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score

NUM_BRACKETS = 11
BRACKETS = np.arange(NUM_BRACKETS)
LOW_BRACKET_MAX = 1  # brackets 0-1: photos, noise, text, manga
HIGH_SCORE_MIN = 5.0  # "high quality" starts at 50%
# The acceptance threshold of every bracket for a model that records none (a supervised
# run): FixMatch's usual cutoff. Export and report use it.
DEFAULT_THRESHOLD = 0.95

METRIC_KEYS = (
    "mae",
    "qwk",
    "spearman",
    "accuracy",
    "accuracy_within_1",
    "false_positive_rate",
    "top_k_precision",
)


def expected_score(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs, dtype=np.float64) @ BRACKETS.astype(np.float64)


def bracket_of(score) -> np.ndarray:
    """True bracket of a (possibly fractional) score: round half up (6.5 -> 7, 7.5 -> 8),
    clipped to 0-10. The project's one rounding rule (data, metrics, reports, the synthetic
    generator); numpy's rint rounds halves to even and would send averaged scores of 6.5
    down but 7.5 up."""
    x = np.asarray(score, dtype=np.float64)
    whole = np.floor(x)
    # x - floor(x) is exact; floor(x + 0.5) is not (0.49999999999999994 + 0.5 == 1.0)
    return np.clip(whole + (x - whole >= 0.5), 0, NUM_BRACKETS - 1).astype(np.int64)


def default_top_k(n: int, fraction: float = 0.1) -> int:
    return max(1, int(round(n * fraction)))


def top_k_precision(pred_score: np.ndarray, true_score: np.ndarray, k: int) -> float:
    n = len(pred_score)
    k = max(1, min(int(k), n))
    # Stable sort on the negated score so ties keep input order: deterministic.
    top_pred = np.argsort(-np.asarray(pred_score), kind="stable")[:k]
    kth_true = np.sort(np.asarray(true_score))[::-1][k - 1]
    return float(np.mean(np.asarray(true_score)[top_pred] >= kth_true))


def _safe(x: float) -> float:
    return float(x) if x is not None and math.isfinite(x) else float("nan")


def compute_metrics(probs, true_score, top_k: int | None = None) -> dict:
    """Every evaluation metric of the project's contract (MAE, QWK, Spearman, accuracy and
    within-one accuracy, false-positive rate, top-k precision, per-bracket recall) for one
    evaluation, as a flat dict of floats.

    Per-bracket recall is `recall_<b>` (NaN where the set has no image of bracket b)."""
    probs = np.asarray(probs, dtype=np.float64)
    true_score = np.asarray(true_score, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != NUM_BRACKETS:
        raise ValueError(f"probs must be N x {NUM_BRACKETS}, got {probs.shape}")
    if len(probs) != len(true_score):
        raise ValueError(f"{len(probs)} predictions for {len(true_score)} scores")
    if len(probs) == 0:
        raise ValueError("no images to evaluate")
    pred_score = expected_score(probs)
    pred_bracket = probs.argmax(axis=1)
    true_bracket = bracket_of(true_score)

    if len(np.unique(np.concatenate([pred_bracket, true_bracket]))) > 1:
        qwk = cohen_kappa_score(true_bracket, pred_bracket, weights="quadratic", labels=BRACKETS)
    else:
        qwk = 1.0  # one bracket everywhere, predicted right: kappa is undefined, agreement is total
    if np.std(pred_score) > 0 and np.std(true_score) > 0:
        rho = spearmanr(pred_score, true_score).statistic
    else:
        rho = float("nan")
    low = true_bracket <= LOW_BRACKET_MAX
    fpr = float(np.mean(pred_score[low] >= HIGH_SCORE_MIN)) if low.any() else float("nan")
    k = top_k if top_k else default_top_k(len(probs))

    out = {
        "mae": float(np.mean(np.abs(pred_score - true_score))),
        "qwk": _safe(qwk),
        "spearman": _safe(rho),
        "accuracy": float(np.mean(pred_bracket == true_bracket)),
        "accuracy_within_1": float(np.mean(np.abs(pred_bracket - true_bracket) <= 1)),
        "false_positive_rate": fpr,
        "top_k_precision": top_k_precision(pred_score, true_score, k),
        "top_k": int(min(k, len(probs))),
        "num_images": int(len(probs)),
    }
    for b in BRACKETS:
        sel = true_bracket == b
        out[f"recall_{b}"] = float(np.mean(pred_bracket[sel] == b)) if sel.any() else float("nan")
    return out


def confidence(probs, radius: int = 0) -> np.ndarray:
    """A model's confidence in its argmax bracket: the argmax probability (radius 0, USB's
    algorithms) or the mass within +-radius brackets of it (the ordinal algorithm; the
    model's config.json records `confidence_radius`)."""
    probs = np.asarray(probs, dtype=np.float64)
    if not radius:
        return probs.max(axis=1)
    top = probs.argmax(axis=1)
    near = np.abs(BRACKETS[None, :] - top[:, None]) <= int(radius)
    return np.minimum((probs * near).sum(axis=1), 1.0)


def accepted_by_threshold(probs, thresholds, radius: int = 0) -> np.ndarray:
    """Whether each pseudo-label passes the model's threshold for its argmax bracket."""
    probs = np.asarray(probs)
    return confidence(probs, radius) >= np.asarray(thresholds, dtype=np.float64)[probs.argmax(axis=1)]


def pseudo_label_quality(probs, true_bracket, accepted) -> dict:
    """Accuracy and coverage of accepted pseudo-labels per true bracket (synthetic truth).

    coverage_<b>: share of pool images of true bracket b that the threshold accepts;
    accuracy_<b>: share of those accepted whose argmax is b."""
    probs = np.asarray(probs)
    true_bracket = np.asarray(true_bracket, dtype=np.int64)
    accepted = np.asarray(accepted, dtype=bool)
    pred = probs.argmax(axis=1)
    out = {
        "pseudo_coverage": float(accepted.mean()) if len(accepted) else float("nan"),
        "pseudo_accuracy": float(np.mean(pred[accepted] == true_bracket[accepted])) if accepted.any() else float("nan"),
    }
    for b in BRACKETS:
        sel = true_bracket == b
        acc_sel = sel & accepted
        out[f"pseudo_coverage_{b}"] = float(acc_sel.sum() / sel.sum()) if sel.any() else float("nan")
        out[f"pseudo_accuracy_{b}"] = float(np.mean(pred[acc_sel] == b)) if acc_sel.any() else float("nan")
    return out
