"""The hidden score model: brackets per split, scores, attributes, raters, the weak signal,
difficulty knobs.

Everything here is numbers; nothing is drawn. See the package docstring for the score
function and what each knob does.
"""

from __future__ import annotations

import math

import numpy as np

from ..metrics import NUM_BRACKETS, bracket_of  # bracket_of: the one rounding rule (halves up, 0..10)

#: Final v1.8 dataset histogram from the CityAesthetics model card (3,080 images).
MODEL_CARD_HISTOGRAM = (31, 162, 533, 675, 690, 576, 228, 95, 54, 29, 7)
#: A crawl (e.g. a booru dump) has more photos/text, manga, non-subjects and plain
#: screenshots than a hand-picked labeled set. Integer weights, per mille.
CRAWL_HISTOGRAM = (80, 150, 120, 120, 220, 160, 70, 40, 20, 12, 8)
UNLABELED_DISTRIBUTIONS = ("crawl", "labeled", "uniform")
SPLITS = ("labeled", "test", "unlabeled")

# Difficulty knobs: see the package docstring. generate() records them in synth.json.
ATTRIBUTE_VISIBILITY = 0.75
RENDER_JITTER = 0.12
NUISANCE_STRENGTH = 1.0
ATTRIBUTE_SPREAD = 0.15

#: Weight of min(a) in Q; the rest is the weighted mean.
MIN_WEIGHT = 0.2
#: The hidden quality function of shaded characters (brackets 5-10); flat characters
#: (bracket 4) use the same weights without shading.
SHADED_WEIGHTS = {"shading": 0.26, "palette": 0.20, "line_clean": 0.20, "composition": 0.14, "detail": 0.20}
FLAT_ATTRIBUTES = ("palette", "line_clean", "composition", "detail")
SKETCH_WEIGHTS = {"line_smooth": 0.4, "line_continuity": 0.3, "line_weight": 0.3}

#: Score-driving attributes (NaN where a category does not have them).
ATTRIBUTE_COLUMNS = (
    "shading", "palette", "line_clean", "composition", "detail",
    "line_smooth", "line_continuity", "line_weight", "quality",
)

#: Part of every random stream's key: default_rng([seed, SPLIT_CODE[split], ...]).
SPLIT_CODE = {"labeled": 1, "test": 2, "unlabeled": 3}
_STREAM_SHUFFLE, _STREAM_NOISE, _STREAM_RATERS = 101, 102, 103
#: The weak signal's stream, per pool image: default_rng([seed, SPLIT_CODE["unlabeled"], index,
#: _STREAM_WEAK]) (the image's own key with its own last word: turning --weak-signal on
#: changes no image and no other column, and an image's raw signal does not depend on the
#: pool size).
_STREAM_WEAK = 104

#: The weak signal (--weak-signal): a booru-favourite-count stand-in for every pool image,
#: see the package docstring for the formula. Recorded in synth.json's args when on, so a
#: set drawn with other values is redrawn.
WEAK_SIGNAL = {
    "base": 20.0,         # median favourites of a score-5 image with no boost and no luck
    "slope": 0.45,        # log-favourites per score point: x1.57 per point, monotone in expectation
    "sigma": 0.8,         # sd of the log-normal popularity noise
    "tail_shape": 1.5,    # Pareto (x_m = 1) virality factor: heavy tail, infinite variance
    "ears_boost": 0.5,    # log boost for animal ears (kemonomimi): x1.65, about 1.1 score points
    "meme_boost": 2.5,    # log boost for text memes (variant text_meme): x12, about 5.6 score points
}
WEAK_SIGNAL_FORMULA = ("raw = base * exp(slope * (score - 5) + ears_boost * ears + meme_boost * meme + sigma * z) "
                       "* (1 - u) ** (-1 / tail_shape), z ~ N(0, 1), u ~ U[0, 1)")


# --------------------------------------------------------------------------------------
# Counts and brackets


def bracket_counts(n: int, weights=MODEL_CARD_HISTOGRAM) -> list[int]:
    """Split n images over the brackets in proportion to integer `weights`.

    Largest-remainder rounding in exact integer arithmetic (ties go to the bracket with the
    larger weight, then the lower bracket), so the counts sum to n and 3,080 reproduces the
    model card exactly. When n >= 11 every bracket gets at least one image, taken from the
    currently largest bracket.
    """
    w = [int(x) for x in weights]
    total = sum(w)
    if n < 0 or total <= 0:
        raise ValueError(f"bad count {n} or weights {weights}")
    counts = [n * x // total for x in w]
    rems = [n * x % total for x in w]
    order = sorted(range(len(w)), key=lambda i: (-rems[i], -w[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(w):
        for i in range(len(w)):
            if counts[i] == 0:
                j = max(range(len(w)), key=lambda k: (counts[k], -k))
                counts[j] -= 1
                counts[i] += 1
    return counts


def _split_weights(split: str, unlabeled_dist: str):
    if split != "unlabeled" or unlabeled_dist == "labeled":
        return MODEL_CARD_HISTOGRAM
    if unlabeled_dist == "crawl":
        return CRAWL_HISTOGRAM
    if unlabeled_dist == "uniform":
        return (1,) * NUM_BRACKETS
    raise ValueError(f"unlabeled_dist must be one of {UNLABELED_DISTRIBUTIONS}, got {unlabeled_dist!r}")


def split_brackets(seed: int, split: str, n: int, unlabeled_dist: str) -> np.ndarray:
    """Bracket of each index of a split: exact counts, then a seeded shuffle, so that ids
    (assigned by index) say nothing about the bracket."""
    counts = bracket_counts(n, _split_weights(split, unlabeled_dist))
    brackets = np.repeat(np.arange(NUM_BRACKETS), counts)
    rng = np.random.default_rng([seed, SPLIT_CODE[split], _STREAM_SHUFFLE])
    return rng.permutation(brackets)


def noisy_labels(seed: int, brackets: np.ndarray, p: float) -> np.ndarray:
    """Move round(p * n) labels by exactly one bracket (up or down at random; up from 0,
    down from 10), chosen by a seeded permutation."""
    labels = brackets.copy()
    n = len(brackets)
    k = int(round(p * n))
    if k == 0:
        return labels
    rng = np.random.default_rng([seed, _STREAM_NOISE])
    idx = rng.permutation(n)[:k]
    step = rng.choice([-1, 1], size=k)
    step[brackets[idx] == 0] = 1
    step[brackets[idx] == NUM_BRACKETS - 1] = -1
    labels[idx] += step
    return labels


# --------------------------------------------------------------------------------------
# Scores and attributes


def quality(attrs: dict, weights: dict) -> float:
    """Q(a) = (1 - MIN_WEIGHT) * weighted mean + MIN_WEIGHT * min; values may be arrays."""
    names = list(weights)
    total = sum(weights.values())
    mean = sum(weights[k] * np.asarray(attrs[k], dtype=np.float64) for k in names) / total
    low = np.min(np.stack([np.asarray(attrs[k], dtype=np.float64) for k in names]), axis=0)
    return (1.0 - MIN_WEIGHT) * mean + MIN_WEIGHT * low


def _attributes_for(rng, weights: dict, target: float) -> dict:
    """Attributes in [0, 1] whose Q equals target: a common level plus per-attribute noise,
    shifted by bisection (Q is monotone in the shift). Plain floats: this runs per image."""
    names = list(weights)
    w = [weights[k] / sum(weights.values()) for k in names]
    base = rng.normal(0.0, ATTRIBUTE_SPREAD, size=len(names)).tolist()

    def q_at(shift):
        a = [min(1.0, max(0.0, b + shift)) for b in base]
        return (1.0 - MIN_WEIGHT) * sum(wi * ai for wi, ai in zip(w, a)) + MIN_WEIGHT * min(a)

    lo, hi = -1.0 - 4 * ATTRIBUTE_SPREAD, 2.0 + 4 * ATTRIBUTE_SPREAD
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if q_at(mid) < target:
            lo = mid
        else:
            hi = mid
    return {k: min(1.0, max(0.0, base[i] + hi)) for i, k in enumerate(names)}


def _bracket_interval(b: int) -> tuple[float, float]:
    return max(0.0, b - 0.5), min(10.0, b + 0.5)


def sample_score_and_attributes(rng, bracket: int) -> tuple[float, str, dict]:
    """Category, continuous score and score-driving attributes of one image. Every
    category's attributes include "quality" (for brackets 0 and 1 it is all there is)."""
    lo, hi = _bracket_interval(bracket)
    t = lo + (hi - lo) * rng.uniform(0.02, 0.98)
    attrs = {}
    if bracket == 0:
        category = rng.choice(["photo", "noise", "text"], p=[0.4, 0.2, 0.4]).item()
        attrs["quality"] = (t - lo) / (hi - lo)
        score = t
    elif bracket == 1:
        category = rng.choice(["manga", "scenery", "animal", "object"], p=[0.4, 0.25, 0.2, 0.15]).item()
        attrs["quality"] = (t - lo) / (hi - lo)
        score = t
    elif bracket in (2, 3):
        category = "sketch"
        attrs.update(_attributes_for(rng, SKETCH_WEIGHTS, (t - 1.5) / 2.0))
        attrs["quality"] = float(quality(attrs, SKETCH_WEIGHTS))
        score = 1.5 + 2.0 * attrs["quality"]
    elif bracket == 4:
        category = "flat"
        w = {k: SHADED_WEIGHTS[k] for k in FLAT_ATTRIBUTES}
        attrs.update(_attributes_for(rng, w, t - 3.5))
        attrs["shading"] = 0.0
        attrs["quality"] = float(quality(attrs, w))
        score = 3.5 + attrs["quality"]
    else:
        category = "shaded"
        attrs.update(_attributes_for(rng, SHADED_WEIGHTS, (t - 4.5) / 5.5))
        attrs["quality"] = float(quality(attrs, SHADED_WEIGHTS))
        score = 4.5 + 5.5 * attrs["quality"]
    score = float(min(10.0, max(0.0, score)))
    assert int(bracket_of(score)) == bracket, (bracket, score, attrs)
    return score, category, attrs


def shown(rng, a: float) -> float:
    """How strongly an attribute is drawn: visibility-compressed, with per-image jitter."""
    v = 0.5 + ATTRIBUTE_VISIBILITY * (a - 0.5) + rng.normal(0.0, RENDER_JITTER)
    return min(1.0, max(0.0, v))


# --------------------------------------------------------------------------------------
# Simulated raters (--raters)


def rater_params(seed: int, raters: int, groups: int = 0) -> list[dict]:
    """Each simulated rater's taste: attribute weights, a bias (harshness, in score points) and
    the sd of their per-image noise. Without groups every rater's taste is drawn on its own;
    with `groups` (--rater-groups) see grouped_rater_params."""
    if groups:
        return grouped_rater_params(seed, raters, groups)
    rng = np.random.default_rng([seed, _STREAM_RATERS, 0])
    out = []
    for k in range(raters):
        w = {a: float(v * math.exp(rng.normal(0, 0.5))) for a, v in SHADED_WEIGHTS.items()}
        ws = {a: float(v * math.exp(rng.normal(0, 0.5))) for a, v in SKETCH_WEIGHTS.items()}
        out.append({"rater": k, "bias": float(rng.normal(0, 0.35)), "noise": float(rng.uniform(0.15, 0.5)),
                    "weights": w, "sketch_weights": ws})
    return out


#: Rater groups (--rater-groups G): raters inside a group share a taste. Recorded in synth.json.
RATER_GROUPS = {
    "taste_sd": 1.2,      # log-sd of a group's attribute weights around SHADED_WEIGHTS / SKETCH_WEIGHTS
    "harshness_sd": 0.8,  # sd of a group's bias (harshness offset), in score points
    "within_sd": 0.1,     # log-sd of a rater's weights and sd of their bias around their group's
    "activity_sd": 1.0,   # log-sd of a rater's activity: how many of the images they rate
}


def grouped_rater_params(seed: int, raters: int, groups: int, knobs: dict = RATER_GROUPS) -> list[dict]:
    """Raters in `groups` taste groups of unequal size (every group has two raters, or one
    where there are fewer than two per group):
    each group draws weights (SHADED/SKETCH_WEIGHTS x e^N(0, taste_sd)) and a bias
    (N(0, harshness_sd)); each member varies them a little (within_sd) and has their own
    noise sd and activity (log-normal: a few raters rate most images, as on real sites)."""
    if not 1 <= groups <= raters:
        raise ValueError(f"rater groups must be between 1 and the number of raters ({raters}), got {groups}")
    rng = np.random.default_rng([seed, _STREAM_RATERS, 2])
    taste = [{"weights": {a: v * math.exp(rng.normal(0, knobs["taste_sd"])) for a, v in SHADED_WEIGHTS.items()},
              "sketch_weights": {a: v * math.exp(rng.normal(0, knobs["taste_sd"])) for a, v in SKETCH_WEIGHTS.items()},
              "bias": rng.normal(0, knobs["harshness_sd"])} for _ in range(groups)]
    base = np.tile(np.arange(groups), min(2, raters // groups))  # two members each where there are enough raters
    member = np.concatenate([base, rng.choice(groups, raters - len(base), p=rng.dirichlet([4.0] * groups))])
    member = rng.permutation(member)
    out = []
    for k in range(raters):
        g = taste[int(member[k])]
        jit = knobs["within_sd"]
        out.append({"rater": k, "group": int(member[k]),
                    "bias": float(g["bias"] + rng.normal(0, jit)), "noise": float(rng.uniform(0.15, 0.5)),
                    "weights": {a: float(v * math.exp(rng.normal(0, jit))) for a, v in g["weights"].items()},
                    "sketch_weights": {a: float(v * math.exp(rng.normal(0, jit))) for a, v in g["sketch_weights"].items()},
                    "activity": float(math.exp(rng.normal(0, knobs["activity_sd"])))})
    return out


def _taste_inputs(rows: list[dict]) -> tuple[np.ndarray, dict, np.ndarray]:
    cat = np.array([r["category"] for r in rows])
    A = {k: np.nan_to_num(np.array([r[k] for r in rows], np.float64)) for k in ATTRIBUTE_COLUMNS}
    return cat, A, np.array([r["score"] for r in rows], np.float64)


def taste_scores(cat: np.ndarray, A: dict, score: np.ndarray, p: dict) -> np.ndarray:
    """A rater's noise-free score of every image: their weights where a category's score comes
    from attributes (shaded, flat, sketch), the true score elsewhere, plus their bias."""
    s = score.copy()
    shaded = cat == "shaded"
    s[shaded] = 4.5 + 5.5 * quality(A, p["weights"])[shaded]
    flat = cat == "flat"
    s[flat] = 3.5 + quality(A, {k: p["weights"][k] for k in FLAT_ATTRIBUTES})[flat]
    sk = cat == "sketch"
    s[sk] = 1.5 + 2.0 * quality(A, p["sketch_weights"])[sk]
    return s + p["bias"]


def rater_scores(seed: int, rows: list[dict], params: list[dict]) -> None:
    """Each rater's score for every image: their taste score (taste_scores) plus per-image
    noise, clipped to 0..10. Labeled and test images also get the rater who "scored" them.
    With rater groups every row also gets `consensus`, the mean noise-free score over all
    raters, each rater counting once (the population's view, whoever rates the most)."""
    if not params:
        return
    n = len(rows)
    cat, A, score = _taste_inputs(rows)
    rng = np.random.default_rng([seed, _STREAM_RATERS, 1])
    tastes = []
    for p in params:
        taste = taste_scores(cat, A, score, p)
        tastes.append(taste)
        s = np.clip(taste + rng.normal(0, p["noise"], n), 0, 10)
        for r, v in zip(rows, s):
            r[f"rater_{p['rater']}"] = float(v)
    who = rng.integers(0, len(params), n)
    for r, w in zip(rows, who):
        r["rater"] = int(w) if r["split"] != "unlabeled" else None
    if "group" in params[0]:
        consensus = np.clip(np.mean(tastes, axis=0), 0, 10)
        for r, v in zip(rows, consensus):
            r["consensus"] = float(v)


def ratings(seed: int, rows: list[dict], params: list[dict], per_image: int, split: str) -> list[tuple[str, int, int]]:
    """(path, rater, rating) rows: every image of `split` rated by `per_image` distinct raters,
    drawn in proportion to their activity; a rating is the bracket of that rater's score
    (people give whole scores)."""
    act = np.array([p["activity"] for p in params], np.float64)
    rng = np.random.default_rng([seed, _STREAM_RATERS, 3, SPLIT_CODE[split]])
    out = []
    for r in rows:
        if r["split"] != split:
            continue
        for k in sorted(rng.choice(len(params), per_image, replace=False, p=act / act.sum())):
            out.append((r["path"], int(k), int(bracket_of(r[f"rater_{int(k)}"]))))
    return out


# --------------------------------------------------------------------------------------
# The weak signal (--weak-signal)


def weak_signal_raw(seed: int, rows: list[dict], params: dict = WEAK_SIGNAL) -> dict[int, float]:
    """Raw weak signal (a positive favourite-count-like number) of every pool image in
    `rows`, by pool index. Reads score, ears and variant; draws from the image's own
    _STREAM_WEAK generator (two numbers: the log-normal noise, then the Pareto factor)."""
    out = {}
    for r in rows:
        if r["split"] != "unlabeled":
            continue
        rng = np.random.default_rng([int(seed), SPLIT_CODE["unlabeled"], int(r["index"]), _STREAM_WEAK])
        z = rng.standard_normal()
        u = rng.random()
        log_mean = (params["slope"] * (float(r["score"]) - 5.0)
                    + params["ears_boost"] * (r.get("ears") in (True,))  # None (no figure) or NaN: no
                    + params["meme_boost"] * (r.get("variant") == "text_meme"))
        virality = (1.0 - u) ** (-1.0 / params["tail_shape"])  # Pareto, x_m = 1
        out[int(r["index"])] = float(params["base"] * math.exp(log_mean + params["sigma"] * z) * virality)
    return out


def percentile_scores(raw) -> np.ndarray:
    """10 x the mid-rank percentile of each value within `raw`: 10 * (rank - 0.5) / n, ties
    sharing their average rank. In (0, 10); uniform over the pool whatever raw's scale."""
    from scipy.stats import rankdata

    raw = np.asarray(raw, dtype=np.float64)
    if raw.size == 0:
        return raw
    return 10.0 * (rankdata(raw, method="average") - 0.5) / raw.size
