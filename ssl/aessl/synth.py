"""Synthetic anime-aesthetics benchmark: the project's built-in demo data.

`generate(out_dir, ...)` draws a labeled set, a test set and an unlabeled pool of small
images whose true score (continuous, 0-10) is known, in the project's data layout:

    out_dir/labeled/<label>/l000123.png      label = bracket, or a neighbour if label noise moved it
    out_dir/test/<bracket>/t000123.png
    out_dir/unlabeled/u000123.png            no score anywhere: not in the path, not in PNG metadata
    out_dir/truth.parquet                    one row per image: path, split, bracket, score, label,
                                             the latent attributes, per-rater scores (--raters)
    out_dir/synth.json                       arguments and counts; written last, so its presence
                                             means the set is whole (and re-running is a no-op)
    out_dir/preview/                         contact sheets (--preview)

What the brackets look like (the model card's table, drawn with numpy and PIL):

    0      photo-like textures, static noise, or text: glyph pages, memes, subtitled frames
    1      greyscale manga pages (panels, screentone), scenery with no subject, animals, objects
    2-3    rough sketches of a character on paper; the bracket comes from line quality
           (smoothness, continuity, weight consistency)
    4      flat-filled "screenshot" characters
    5-10   shaded characters; the score is a hidden function of five rendered attributes

Score and bracket. Every image has a continuous score in [0, 10] and
`bracket = floor(score + 0.5)` (round half up, clipped to 0..10), so bracket b covers
scores [b - 0.5, b + 0.5). Brackets are drawn first (from the histogram, exactly), then a
score uniformly inside the bracket, then attributes that produce that score:

    brackets 0, 1:  score = lo + quality * (hi - lo); quality shows only weakly
    brackets 2-3:   score = 1.5 + 2.0 * Q(line_smooth, line_continuity, line_weight)
    bracket 4:      score = 3.5 + 1.0 * Q(palette, line_clean, composition, detail)
    brackets 5-10:  score = 4.5 + 5.5 * Q(shading, palette, line_clean, composition, detail)

with Q(a) = (1 - MIN_WEIGHT) * weighted_mean(a) + MIN_WEIGHT * min(a): monotone in every
attribute, so a weak attribute drags an otherwise good image down. Attributes inside one
image disagree (each is the common level plus noise of sd ATTRIBUTE_SPREAD, then shifted
until Q hits the target), so no single attribute tells the bracket: a model has to see and
combine them all. What each attribute draws:

    shading        depth of the lighting and number of tone steps (2-tone cel ... smooth
                   gradients with highlights and rim light)
    palette        harmony of the hues/saturations/values of hair, clothes and eyes
                   (analogous/complementary scheme ... clashing random colours)
    line_clean     outline jitter, doubled and broken strokes, stray marks
    composition    subject centred and well sized ... off-centre, tiny or cropped, tilted
    detail         hair strands, eye highlights and lashes, a fine clothing pattern, small
                   accessories. Drawn at the supersampled resolution 1-3 "detail pixels"
                   wide (1/256 of the canvas each), so at --size 64 they blur out, at 128
                   they are faint and at 256 they show: a resolution ablation sees a real
                   difference.

Nuisance variation (never changes the score): hue rotation of the whole design, background
kind/colour/pattern (including a fine texture that looks like "detail"), hair style, animal
ears, arm pose, light direction, mirror flip, small position/size jitter, line colour and
width, paper tint, ink colour.

Difficulty knobs (module constants; the lead engineer tunes these against a measured
supervised kappa, see the README):

    ATTRIBUTE_VISIBILITY  (default 0.75) how far the rendered look moves across an
                          attribute's range: 1.0 = from worst to best look, 0.5 = only the
                          middle half, 0 = attributes invisible (brackets 5-10 unlearnable).
                          Lower = harder within 5-10, 2-3 and 4.
    RENDER_JITTER         (default 0.12) sd of per-image noise between an attribute and how
                          strongly it is drawn: irreducible error, the ceiling on kappa.
    NUISANCE_STRENGTH     (default 1.0) scales every nuisance: position/size/tilt jitter,
                          background pattern contrast, colour jitter. Higher = harder.
    ATTRIBUTE_SPREAD      (default 0.15) how much the attributes of one image disagree.

Determinism: every image's random numbers come from `default_rng([seed, split, index, k])`
(k = 0 for the scene, 1 for resolution-dependent texture), never from worker order, and
PNGs are written with fixed settings and no metadata, so a seed gives byte-identical files
and truth table whatever `workers` is. The scene (geometry, colours) is also the same at
every --size; only the rasterisation changes.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .metrics import bracket_of  # the one rounding rule: halves up, clipped to 0..10

# --------------------------------------------------------------------------------------
# Public constants

NUM_BRACKETS = 11
#: Final v1.8 dataset histogram from the CityAesthetics model card (3,080 images).
MODEL_CARD_HISTOGRAM = (31, 162, 533, 675, 690, 576, 228, 95, 54, 29, 7)
#: A crawl (e.g. a booru dump) has more photos/text, manga, non-subjects and plain
#: screenshots than a hand-picked labeled set. Integer weights, per mille.
CRAWL_HISTOGRAM = (80, 150, 120, 120, 220, 160, 70, 40, 20, 12, 8)
UNLABELED_DISTRIBUTIONS = ("crawl", "labeled", "uniform")
SPLITS = ("labeled", "test", "unlabeled")

#: Bump when the images or the truth columns change: part of the cache key in synth.json.
GENERATOR_VERSION = 1

# Difficulty knobs: see the module docstring.
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
#: How each image was drawn, independent of its score (nuisance), plus the realised
#: geometry (centre/scale/tilt come partly from composition, partly from nuisance jitter).
NUISANCE_COLUMNS = (
    ("hue", "float"), ("background", "str"), ("hair_style", "str"), ("ears", "bool"),
    ("arm_pose", "float"), ("light_angle", "float"), ("flip", "bool"),
    ("center_x", "float"), ("center_y", "float"), ("scale", "float"), ("tilt", "float"),
    ("variant", "str"),
)

_SPLIT_CODE = {"labeled": 1, "test": 2, "unlabeled": 3}
_ID_PREFIX = {"labeled": "l", "test": "t", "unlabeled": "u"}
_STREAM_SHUFFLE, _STREAM_NOISE, _STREAM_RATERS = 101, 102, 103


# --------------------------------------------------------------------------------------
# Counts, brackets, scores


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


def _split_brackets(seed: int, split: str, n: int, unlabeled_dist: str) -> np.ndarray:
    """Bracket of each index of a split: exact counts, then a seeded shuffle, so that ids
    (assigned by index) say nothing about the bracket."""
    counts = bracket_counts(n, _split_weights(split, unlabeled_dist))
    brackets = np.repeat(np.arange(NUM_BRACKETS), counts)
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], _STREAM_SHUFFLE])
    return rng.permutation(brackets)


def _noisy_labels(seed: int, brackets: np.ndarray, p: float) -> np.ndarray:
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


def _sample_score_and_attributes(rng, bracket: int) -> tuple[float, str, dict]:
    """Category, continuous score and score-driving attributes of one image."""
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


def _shown(rng, a: float) -> float:
    """How strongly an attribute is drawn: visibility-compressed, with per-image jitter."""
    v = 0.5 + ATTRIBUTE_VISIBILITY * (a - 0.5) + rng.normal(0.0, RENDER_JITTER)
    return min(1.0, max(0.0, v))


# --------------------------------------------------------------------------------------
# Drawing primitives (coordinates are canvas-relative, 0..1; converted to pixels late)

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(R: int):
    if R not in _GRIDS:
        c = (np.arange(R, dtype=np.float32) + 0.5) / R
        _GRIDS[R] = (c[None, :].repeat(R, 0), c[:, None].repeat(R, 1))
    return _GRIDS[R]


def _hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(1.0, max(0.0, s)), min(1.0, max(0.0, v))), dtype=np.float32)


def _u8(c) -> tuple:
    c = np.clip(np.asarray(c, dtype=np.float32), 0, 1)
    return tuple(int(round(float(x) * 255)) for x in c)


def _ellipse(cx, cy, rx, ry, n=40, a0=0.0, a1=2 * math.pi):
    t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * math.pi - 1e-9)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _px(pts, R) -> list:
    return (np.asarray(pts) * R).ravel().tolist()


_JITTER_K = np.array([2, 3, 5, 8, 13], np.float64)


def _jitter_closed(rng, pts, amp):
    """Offset a closed contour along its normals by smooth periodic noise of amplitude amp."""
    n = len(pts)
    if amp <= 0 or n < 3:
        return pts
    i = np.arange(n) / n
    a = rng.normal(0, 1.0, 5) / np.sqrt(_JITTER_K)
    ph = rng.random(5)
    off = a @ np.sin(2 * math.pi * (_JITTER_K[:, None] * i[None, :] + ph[:, None]))
    off = (off + rng.normal(0, 0.35, n)) * (amp / 1.5)
    d = np.empty_like(pts)
    d[1:-1] = pts[2:] - pts[:-2]
    d[0] = pts[1] - pts[-1]
    d[-1] = pts[0] - pts[-2]
    ln = np.hypot(d[:, 0], d[:, 1]) + 1e-9
    out = pts.copy()
    out[:, 0] += d[:, 1] / ln * off
    out[:, 1] -= d[:, 0] / ln * off
    return out


def _fractal(rng, R, base=3, octaves=5, persistence=0.55):
    """Smooth multi-octave noise in about [-1, 1]; grid sizes do not depend on R, so the
    same seed gives the same picture at every resolution."""
    acc = np.zeros((R, R), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        g = base * 2**o + 1
        cells = rng.standard_normal((g, g)).astype(np.float32)
        if g >= R:
            break
        up = np.asarray(Image.fromarray(cells).resize((R, R), Image.Resampling.BICUBIC))
        acc += amp * up
        total += amp
        amp *= persistence
    return acc / max(total, 1e-6)


def _blend(img, mask, color, alpha=1.0):
    """img (R,R,3) float; mask (R,R) in [0,1] or bool; paint color over it."""
    m = (mask.astype(np.float32) * alpha)[..., None]
    img *= 1 - m
    img += m * np.asarray(color, np.float32)
    return img


def _mask_from_polys(R, polys, width=0):
    im = Image.new("L", (R, R), 0)
    d = ImageDraw.Draw(im)
    for p in polys:
        d.polygon(_px(p, R), fill=255)
    return np.asarray(im, dtype=np.float32) / 255.0


def _field_image(fn, R, colors, n=48):
    """Smooth background from t = fn(X, Y) in [0, 1] evaluated on an n x n grid, mixed
    between two colours and upscaled bilinearly (cheap, and smooth at any R)."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    t = np.clip(fn(c[None, :], c[:, None]), 0, 1)[..., None]
    small = colors[0] + (colors[1] - colors[0]) * t
    small = (np.clip(small, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(small).resize((R, R), Image.Resampling.BILINEAR)


def _background(rng, tex_rng, R, hue, kind=None):
    """Nuisance background as a uint8 (R, R, 3) array. Returns (array, kind)."""
    kinds = ["solid", "gradient", "stripes", "dots", "glow", "room", "sky", "texture"]
    kind = kind or kinds[rng.integers(len(kinds))]
    h = hue + rng.uniform(-0.5, 0.5)
    s = rng.uniform(0.05, 0.45)
    v = rng.uniform(0.55, 0.98)
    c1 = _hsv(h, s, v)
    c2 = _hsv(h + rng.uniform(-0.15, 0.15), s * rng.uniform(0.5, 1.5), v * rng.uniform(0.6, 1.0))
    c2 = c1 + (c2 - c1) * min(1.0, NUISANCE_STRENGTH)  # pattern contrast is a nuisance
    im = Image.new("RGB", (R, R), _u8(c1))
    d = ImageDraw.Draw(im)
    if kind == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        ca, sa = math.cos(ang), math.sin(ang)
        im = _field_image(lambda X, Y: 0.5 + (X - 0.5) * ca + (Y - 0.5) * sa, R, (c1, c2))
    elif kind == "stripes":
        p = rng.uniform(0.06, 0.2)
        ang = rng.uniform(0, math.pi)
        u = np.array([math.cos(ang), math.sin(ang)])
        w = np.array([-u[1], u[0]])
        k0 = int(-1.5 / p) - 1
        for k in range(k0, -k0 + 1):
            a = np.array([0.5, 0.5]) + u * (k * p)
            poly = [a - w * 1.5, a + w * 1.5, a + u * (p / 2) + w * 1.5, a + u * (p / 2) - w * 1.5]
            d.polygon(_px(poly, R), fill=_u8(c2))
    elif kind == "dots":
        p = rng.uniform(0.08, 0.18)
        r = p * rng.uniform(0.15, 0.35)
        ox, oy = rng.random(2) * p
        for x in np.arange(-ox, 1 + p, p):
            for y in np.arange(-oy, 1 + p, p):
                d.ellipse([(x - r) * R, (y - r) * R, (x + r) * R, (y + r) * R], fill=_u8(c2))
    elif kind == "glow":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        im = _field_image(lambda X, Y: np.sqrt((X - cx) ** 2 + (Y - cy) ** 2) / 0.8, R, (c1, c2))
    elif kind == "room":
        fy = rng.uniform(0.62, 0.82)
        d.rectangle([0, fy * R, R, R], fill=_u8(c2))
        wx, wy = rng.uniform(0.05, 0.6), rng.uniform(0.08, 0.3)
        d.rectangle([wx * R, wy * R, (wx + 0.3) * R, (wy + 0.25) * R], fill=_u8(c1 * 0.1 + _hsv(0.58, 0.25, 0.97) * 0.9))
    elif kind == "sky":
        top = _hsv(0.58 + rng.uniform(-0.05, 0.05), 0.45, 0.95)
        im = _field_image(lambda X, Y: Y + 0 * X, R, (top, _hsv(0.58, 0.15, 1.0)))
        d = ImageDraw.Draw(im)
        for _ in range(rng.integers(1, 4)):
            cx, cy, w = rng.uniform(0, 1), rng.uniform(0.05, 0.5), rng.uniform(0.08, 0.2)
            for j in range(4):
                e = (cx + (j - 1.5) * w * 0.5, cy + rng.uniform(-0.02, 0.02), w * 0.45, w * 0.3)
                d.ellipse([(e[0] - e[2]) * R, (e[1] - e[3]) * R, (e[0] + e[2]) * R, (e[1] + e[3]) * R],
                          fill=(245, 248, 252))
    arr = np.asarray(im)
    if kind == "texture":
        # Mid-scale mottling plus full-resolution grain: looks like "detail" to a careless model.
        m = _fractal(rng, min(R, 128), base=6, octaves=3) * (0.08 * 255 * NUISANCE_STRENGTH)
        m = np.asarray(Image.fromarray(m.astype(np.float32)).resize((R, R), Image.Resampling.BILINEAR))
        g = tex_rng.standard_normal((R, R), dtype=np.float32) * (0.08 * 255 * NUISANCE_STRENGTH)
        arr = np.clip(arr + (m + g)[..., None], 0, 255).astype(np.uint8)
    return arr, kind


# --------------------------------------------------------------------------------------
# The character (local coordinates: figure about 1 unit tall, centred at 0, y down)

HAIR_STYLES = ("short", "long", "twintails", "ponytail", "bob")


def _character_parts(rng, flip: bool, style: str, ears: bool, arm_pose: float):
    """Polygons of a stylised character, back to front, each with a colour key and an
    ellipse (cx, cy, rx, ry) used as its pseudo-normal for shading."""
    parts = []
    hcx, hcy, hrx, hry = 0.0, -0.22, 0.15, 0.165

    def add(name, key, poly, ell, outline=True):
        parts.append({"name": name, "key": key, "poly": np.asarray(poly, np.float64), "ell": ell, "outline": outline})

    # back hair
    if style == "long":
        poly = np.concatenate([_ellipse(hcx, hcy, 0.2, 0.2, 24, math.pi, 2 * math.pi),
                               [[0.24, 0.05], [0.26, 0.32], [0.1, 0.36], [-0.1, 0.36], [-0.26, 0.32], [-0.24, 0.05]]])
        add("hair_back", "hair", poly, (0, 0.0, 0.26, 0.4))
    elif style == "bob":
        poly = np.concatenate([_ellipse(hcx, hcy, 0.21, 0.2, 24, math.pi, 2 * math.pi),
                               [[0.22, -0.05], [0.18, -0.02], [-0.18, -0.02], [-0.22, -0.05]]])
        add("hair_back", "hair", poly, (0, -0.15, 0.22, 0.2))
    else:
        add("hair_back", "hair", _ellipse(hcx, hcy - 0.01, 0.185, 0.19, 32), (0, -0.22, 0.19, 0.19))
    if style == "twintails":
        for sx in (-1, 1):
            a0 = -math.pi / 2 if sx > 0 else math.pi / 2  # the outer half of the tail's ellipse
            poly = np.concatenate([[[sx * 0.15, -0.32]], _ellipse(sx * 0.27, 0.0, 0.075, 0.26, 20, a0, a0 + math.pi)])
            add("tail", "hair", poly, (sx * 0.27, 0.0, 0.09, 0.28))
    elif style == "ponytail":
        sx = -1 if flip else 1
        add("tail", "hair", _ellipse(sx * 0.2, -0.08, 0.07, 0.22, 24), (sx * 0.2, -0.08, 0.08, 0.22))
    # ears
    if ears:
        for sx in (-1, 1):
            add("ear", "hair", [[sx * 0.06, -0.35], [sx * 0.17, -0.53], [sx * 0.17, -0.3]], (sx * 0.13, -0.4, 0.07, 0.1))
    # torso (dress) and skirt band
    torso = [[-0.05, -0.03], [0.05, -0.03], [0.17, 0.03], [0.19, 0.12], [0.13, 0.3], [0.22, 0.5],
             [-0.22, 0.5], [-0.13, 0.3], [-0.19, 0.12], [-0.17, 0.03]]
    add("torso", "cloth", torso, (0, 0.2, 0.22, 0.32))
    add("skirt", "cloth2", [[0.13, 0.3], [0.22, 0.5], [-0.22, 0.5], [-0.13, 0.3]], (0, 0.4, 0.22, 0.15))
    # arms: a sleeve and a hand each
    for sx in (-1, 1):
        ang = arm_pose * (0.6 if sx > 0 else 1.0)
        sx0, sy0 = sx * 0.165, 0.06
        ex, ey = sx0 + sx * 0.36 * math.sin(ang), sy0 + 0.36 * math.cos(ang)
        d = np.array([ex - sx0, ey - sy0])
        nrm = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9)
        w0, w1 = 0.045, 0.035
        poly = [[sx0 + nrm[0] * w0, sy0 + nrm[1] * w0], [ex + nrm[0] * w1, ey + nrm[1] * w1],
                [ex - nrm[0] * w1, ey - nrm[1] * w1], [sx0 - nrm[0] * w0, sy0 - nrm[1] * w0]]
        add("arm", "cloth", poly, ((sx0 + ex) / 2, (sy0 + ey) / 2, 0.06, 0.2))
        add("hand", "skin", _ellipse(ex + d[0] * 0.08, ey + d[1] * 0.08, 0.038, 0.042, 16), (ex, ey, 0.04, 0.045))
    add("neck", "skin", [[-0.038, -0.1], [0.038, -0.1], [0.038, -0.02], [-0.038, -0.02]], (0, -0.06, 0.05, 0.06))
    add("collar", "cloth2", [[-0.07, -0.03], [0.07, -0.03], [0.0, 0.06]], (0, 0.0, 0.07, 0.05))
    add("face", "skin", _ellipse(hcx, hcy, hrx, hry, 40), (hcx, hcy, hrx, hry))
    # bangs: the top of the head, with a zigzag fringe
    top = _ellipse(hcx, hcy - 0.005, 0.172, 0.18, 24, math.pi * 1.0, math.pi * 2.0)
    n_sp = int(rng.integers(4, 7))
    xs = np.linspace(0.17, -0.17, 2 * n_sp + 1)
    fringe = [[x, hcy - (0.02 if i % 2 else 0.085) + rng.uniform(-0.01, 0.01)] for i, x in enumerate(xs)]
    fringe[0][1] = hcy + 0.06
    fringe[-1][1] = hcy + 0.06
    add("bangs", "hair", np.concatenate([top, fringe]), (hcx, hcy - 0.06, 0.19, 0.16))
    if flip:
        for p in parts:
            p["poly"] = p["poly"] * [-1, 1]
            cx, cy, rx, ry = p["ell"]
            p["ell"] = (-cx, cy, rx, ry)
    return parts


def _to_canvas(parts, cx, cy, scale, tilt):
    c, s = math.cos(tilt), math.sin(tilt)
    rot = np.array([[c, -s], [s, c]])
    for p in parts:
        p["poly"] = p["poly"] @ rot.T * scale + [cx, cy]
        ex, ey, rx, ry = p["ell"]
        ex, ey = np.array([ex, ey]) @ rot.T * scale + [cx, cy]
        p["ell"] = (ex, ey, rx * scale, ry * scale)
    return parts


def _palette(rng, hue, harmony: float):
    """Colours of hair, clothes, eyes, skin. harmony 1: an analogous/complementary/triadic
    scheme with consistent saturation and value; 0: clashing random hues, saturations and
    values."""
    d = (1.0 - harmony)
    scheme = [0.08, -0.08, 0.5, 0.33, -0.33][rng.integers(5)]
    s0, v0 = rng.uniform(0.4, 0.7), rng.uniform(0.7, 0.92)

    def col(h, s, v):
        return _hsv(h + d * rng.uniform(-0.5, 0.5), s + d * rng.uniform(-0.45, 0.35), v + d * rng.uniform(-0.5, 0.1))

    skin = _hsv(0.06 + rng.uniform(-0.01, 0.01) + d * rng.uniform(-0.12, 0.12), 0.22 + d * rng.uniform(-0.1, 0.35),
                0.98 - d * rng.uniform(0, 0.25))
    return {
        "hair": col(hue, s0, v0 * rng.uniform(0.75, 1.0)),
        "cloth": col(hue + scheme, s0, v0),
        "cloth2": col(hue + scheme * rng.choice([0.0, 2.0]), s0 * 0.8, min(1.0, v0 * 1.1)),
        "eye": col(hue + rng.choice([0.0, scheme]), min(1.0, s0 + 0.2), v0 * 0.8),
        "skin": skin,
    }


_LINE = 128  # id-map values >= _LINE are outline pixels of part (value - _LINE)


def _shade_parts(R, base, parts, colors, depth, steps, light, highlight, pattern, outline=None):
    """Fill the parts over `base` with pseudo-3D lighting. depth 0 = flat fills; steps =
    number of tone bands (0 = smooth gradient); highlight adds specular sheen and rim light;
    pattern = (contrast, period_px, kind) for a zero-mean fine pattern on the clothes.
    outline = (rng, line_colors, width, clean): each part's outline is drawn right after its
    fill, into the same id map, so parts in front hide the lines behind them.
    Only covered pixels are computed."""
    idm = Image.new("L", (R, R), 0)
    d = ImageDraw.Draw(idm)
    n = len(parts)
    col = np.zeros((256, 3), np.float32)
    ell = np.zeros((256, 4), np.float32)
    ell[:] = (0.5, 0.5, 1, 1)
    is_cloth = np.zeros(256, np.float32)
    is_hair = np.zeros(256, np.float32)
    for i, p in enumerate(parts, start=1):
        d.polygon(_px(p["poly"], R), fill=i)
        col[i] = colors[p["key"]]
        ell[i] = p["ell"]
        ell[i, 2:] = np.maximum(ell[i, 2:], 1e-4)
        is_cloth[i] = p["key"].startswith("cloth")
        is_hair[i] = p["key"] == "hair"
        if outline is not None and p["outline"]:
            orng, line_colors, width, clean = outline
            col[_LINE + i] = line_colors[i - 1]
            ell[_LINE + i] = ell[i]
            _draw_outline(d, orng, R, p["poly"], _LINE + i, width, clean)
    ids = np.asarray(idm).ravel()
    nzi = np.flatnonzero(ids)
    pid = ids[nzi]
    yi, xi = np.divmod(nzi, R)
    e = ell[pid]
    dx = ((xi.astype(np.float32) + 0.5) / R - e[:, 0]) / e[:, 2]
    dy = ((yi.astype(np.float32) + 0.5) / R - e[:, 1]) / e[:, 3]
    r2 = np.minimum(dx * dx + dy * dy, 1.0)
    nz = np.sqrt(1.0 - r2)
    lx, ly, lz = (float(c) for c in light)
    lam_raw = dx * lx + dy * ly + nz * lz
    lam = np.clip(lam_raw, 0, 1)
    if steps > 0:
        lam = np.floor(lam * (steps * 0.999)) / max(steps - 1, 1)
    shade = 1.0 - depth * (1.0 - lam)
    if pattern is not None and pattern[0] > 0:
        contrast, period, kind = pattern
        if kind == 0:
            pat = ((xi + yi) // period) % 2
        elif kind == 1:
            pat = (xi // period + yi // period) % 2
        else:
            pat = (yi // period) % 2
        shade = shade * (1 + (pat.astype(np.float32) * 2 - 1) * (contrast * is_cloth[pid]))
    if highlight > 0:
        spec = np.clip(lam_raw - 0.82, 0, 1) * (highlight * 0.35 / 0.18) * is_hair[pid]
        rim = np.clip(r2 - 0.8, 0, 0.2) * np.clip(-(dx * lx + dy * ly), 0, 1) * (highlight * 0.25 / 0.2)
    line = pid >= _LINE
    if line.any():
        shade[line] = 1.0
        if highlight > 0:
            spec[line] = 0.0
            rim[line] = 0.0
    out = col[pid] * shade[:, None]
    if highlight > 0:
        out += (spec + rim)[:, None]
    img = np.array(base, dtype=np.uint8).reshape(-1, 3)
    img[nzi] = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    return img.reshape(R, R, 3)


def _draw_outline(draw, rng, R, pts, color, width, clean: float, closed=True):
    """Outline of a polygon. clean 1: one smooth stroke; lower: jitter, doubled strokes,
    gaps."""
    jit = (1.0 - clean) * 0.012
    p = _jitter_closed(rng, pts, jit) if jit > 0 else pts
    if closed:
        p = np.concatenate([p, p[:1]])
    w = max(1, int(round(width * R)))
    if clean > 0.75 or len(p) < 6:
        draw.line(_px(p, R), fill=color, width=w, joint="curve" if w > 2 else None)
    else:
        # broken into pieces; some pieces skipped
        k = max(3, len(p) // 6)
        for s in range(0, len(p) - 1, k):
            if rng.random() < (0.75 - clean) * 0.5:
                continue
            seg = p[s:s + k + 1]
            ww = max(1, int(round(w * rng.uniform(0.7, 1.0 + 1.2 * (1 - clean)))))
            draw.line(_px(seg, R), fill=color, width=ww)
    if rng.random() < (0.8 - clean):
        q = _jitter_closed(rng, pts, jit * 1.5 + 0.003)
        if closed:
            q = np.concatenate([q, q[:1]])
        draw.line(_px(q, R), fill=color, width=max(1, w // 2))


def _darker(c, f=0.45):
    return np.asarray(c, np.float32) * f


def _eyes(draw, rng, R, parts, colors, detail: float, line_color, cx, cy, scale, tilt, flip):
    """Eyes and mouth, in canvas coordinates; detail adds an iris ring, extra highlights
    and lashes (1-2 detail pixels wide: only visible at high resolution)."""
    c, s = math.cos(tilt), math.sin(tilt)
    u = R / 256.0

    def tc(x, y):
        return (cx + (x * c - y * s) * scale) * R, (cy + (x * s + y * c) * scale) * R

    er_x, er_y = 0.036 * scale * R, 0.05 * scale * R
    eye = colors["eye"]
    for sx in (-1, 1):
        ex, ey = tc(sx * 0.068, -0.195)
        draw.ellipse([ex - er_x, ey - er_y, ex + er_x, ey + er_y], fill=_u8(eye))
        draw.ellipse([ex - er_x * 0.5, ey - er_y * 0.35, ex + er_x * 0.5, ey + er_y * 0.55], fill=_u8(_darker(eye, 0.3)))
        hx, hy = ex - er_x * 0.3, ey - er_y * 0.4
        hr = er_x * 0.28
        draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=(255, 255, 255))
        # upper lid
        draw.line([ex - er_x * 1.2, ey - er_y * 0.9, ex, ey - er_y * 1.15, ex + er_x * 1.2, ey - er_y * 0.9],
                  fill=line_color, width=max(1, int(round(2.5 * u))))
        if detail > 0.25:  # iris ring
            w = max(1, int(round(u)))
            draw.ellipse([ex - er_x * 0.85, ey - er_y * 0.85, ex + er_x * 0.85, ey + er_y * 0.85],
                         outline=_u8(np.minimum(eye * 1.4, 1)), width=w)
        if detail > 0.45:  # second highlight
            hr2 = max(1.0, 1.5 * u)
            hx2, hy2 = ex + er_x * 0.35, ey + er_y * 0.45
            draw.ellipse([hx2 - hr2, hy2 - hr2, hx2 + hr2, hy2 + hr2], fill=(255, 255, 255))
        if detail > 0.6:  # lashes
            for k in range(3):
                x0 = ex + sx * er_x * (0.6 + 0.3 * k)
                y0 = ey - er_y * (1.0 - 0.1 * k)
                draw.line([x0, y0, x0 + sx * 3 * u, y0 - 3 * u], fill=line_color, width=max(1, int(round(u))))
    mx, my = tc(0.0, -0.105)
    draw.line([mx - 0.02 * scale * R, my, mx + 0.02 * scale * R, my], fill=_u8(_darker(colors["skin"], 0.5)),
              width=max(1, int(round(1.5 * u))))


def _detail_marks(draw, rng, R, parts, colors, detail: float):
    """Hair strands and small accessories: the high-resolution-only attribute."""
    u = R / 256.0
    bangs = next(p for p in parts if p["name"] == "bangs")
    poly = bangs["poly"]
    n_strands = int(round(detail * 14))
    hair_line = _u8(_darker(colors["hair"], 0.55))
    top = poly[:24]
    fringe = poly[24:]
    for k in range(n_strands):
        a = top[int(rng.integers(3, 21))]
        b = fringe[int(rng.integers(0, len(fringe)))]
        m = (a + b) / 2 + rng.normal(0, 0.006, 2)
        draw.line(_px([a, m, b * 0.9 + a * 0.1], R), fill=hair_line, width=max(1, int(round(u))))
    torso = next(p for p in parts if p["name"] == "torso")["poly"]
    n_acc = int(round(detail * 4))
    for k in range(n_acc):
        if k < 3:  # buttons down the front
            y0 = (torso[0] + torso[1]) / 2
            y1 = (torso[4] + torso[7]) / 2
            pnt = y0 + (y1 - y0) * (0.3 + 0.22 * k)
            r = 2.2 * u
            draw.ellipse([pnt[0] * R - r, pnt[1] * R - r, pnt[0] * R + r, pnt[1] * R + r],
                         fill=_u8(colors["cloth2"]), outline=hair_line)
        else:  # a small hair clip
            a = top[int(rng.integers(4, 20))]
            r = 3 * u
            draw.rectangle([a[0] * R - r, a[1] * R - r / 2, a[0] * R + r, a[1] * R + r / 2], fill=_u8(colors["cloth2"]))


def _render_character(rng, tex_rng, R, attrs, shaded: bool, row: dict):
    hue = float(rng.random())
    row["hue"] = hue
    style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    ears = bool(rng.random() < 0.3)
    flip = bool(rng.random() < 0.5)
    arm_pose = float(rng.uniform(-0.25, 0.9))
    row.update(hair_style=style, ears=ears, flip=flip, arm_pose=arm_pose)
    v = {k: _shown(rng, attrs[k]) for k in ("palette", "line_clean", "composition", "detail")}
    v["shading"] = _shown(rng, attrs["shading"]) if shaded else 0.0

    base, row["background"] = _background(rng, tex_rng, R, hue)
    letterbox = (not shaded) and rng.random() < 0.3
    # composition: well placed = centred, figure ~0.85 of the frame, upright
    bad = 1.0 - v["composition"]
    ang = rng.uniform(0, 2 * math.pi)
    off = bad * 0.3 * rng.uniform(0.5, 1.0)
    nj = 0.03 * NUISANCE_STRENGTH
    cx = 0.5 + off * math.cos(ang) + rng.normal(0, nj)
    cy = 0.52 + off * math.sin(ang) + rng.normal(0, nj)
    size_bad = rng.choice([0.5, 1.55]) if rng.random() < 0.7 else 1.0
    scale = 0.85 * (1 + (size_bad - 1) * bad) * (1 + rng.normal(0, 0.05 * NUISANCE_STRENGTH))
    tilt = bad * rng.uniform(-0.45, 0.45) + rng.normal(0, 0.03 * NUISANCE_STRENGTH)
    row.update(center_x=cx, center_y=cy, scale=scale, tilt=tilt)

    parts = _to_canvas(_character_parts(rng, flip, style, ears, arm_pose), cx, cy, scale, tilt)
    colors = _palette(rng, hue, v["palette"])
    la = rng.uniform(math.pi * 1.05, math.pi * 1.95)  # light from above, any side
    row["light_angle"] = la
    light = np.array([math.cos(la) * 0.8, math.sin(la) * 0.8, 0.6])
    light /= np.linalg.norm(light)
    if shaded:
        s = v["shading"]
        depth = 0.14 + 0.4 * s
        steps = 0 if s > 0.8 else 2 + int(s * 5)
        highlight = max(0.0, (s - 0.45) / 0.55)
        row["variant"] = "shaded"
    else:
        cel = rng.random() < 0.25
        depth = rng.uniform(0.04, 0.1) if cel else 0.0
        steps, highlight = 2, 0.0
        row["variant"] = ("cel" if cel else "flat") + ("_letterbox" if letterbox else "")
    u = 1.0 / 256.0
    pattern = (v["detail"] * 0.25, max(1, int(round(2 * R / 256))), int(rng.integers(3))) if v["detail"] > 0.3 else None
    lc_mode = rng.integers(3)
    lw = rng.uniform(1.2, 2.2) * u
    line_colors = [(_darker(colors[p["key"]], 0.35) if lc_mode == 0 else np.array([0.12, 0.09, 0.11])
                    if lc_mode == 1 else _darker(colors[p["key"]], 0.2)) for p in parts]
    parts[[p["name"] for p in parts].index("neck")]["outline"] = False
    img = _shade_parts(R, base, parts, colors, depth, steps, light, highlight, pattern,
                       outline=(rng, line_colors, lw, v["line_clean"]))
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    line_color = (40, 28, 36)
    _eyes(draw, rng, R, parts, colors, v["detail"], line_color, cx, cy, scale, tilt, flip)
    _detail_marks(draw, rng, R, parts, colors, v["detail"])
    # stray marks for messy lines
    for _ in range(int(round((1 - v["line_clean"]) ** 2 * 8))):
        a = np.array([cx, cy]) + rng.normal(0, 0.2 * scale, 2)
        b = a + rng.normal(0, 0.04, 2)
        draw.line(_px([a, b], R), fill=line_color, width=max(1, int(round(lw * R))))
    if letterbox:
        bh = int(R * 0.12)
        draw.rectangle([0, 0, R, bh], fill=(0, 0, 0))
        draw.rectangle([0, R - bh, R, R], fill=(0, 0, 0))
    return pil


# --------------------------------------------------------------------------------------
# Sketches (brackets 2-3)


def _render_sketch(rng, tex_rng, R, attrs, row):
    smooth, cont, weight = (_shown(rng, attrs[k]) for k in ("line_smooth", "line_continuity", "line_weight"))
    style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    ears = bool(rng.random() < 0.3)
    flip = bool(rng.random() < 0.5)
    arm_pose = float(rng.uniform(-0.25, 0.9))
    row.update(hair_style=style, ears=ears, flip=flip, arm_pose=arm_pose, hue=float(rng.random()))
    cx = 0.5 + rng.normal(0, 0.05 * NUISANCE_STRENGTH)
    cy = 0.52 + rng.normal(0, 0.04 * NUISANCE_STRENGTH)
    scale = 0.85 * (1 + rng.normal(0, 0.08 * NUISANCE_STRENGTH))
    tilt = rng.normal(0, 0.06 * NUISANCE_STRENGTH)
    row.update(center_x=cx, center_y=cy, scale=scale, tilt=tilt)
    parts = _to_canvas(_character_parts(rng, flip, style, ears, arm_pose), cx, cy, scale, tilt)

    paper = _hsv(rng.uniform(0.08, 0.16), rng.uniform(0.0, 0.12), rng.uniform(0.9, 1.0))
    img = np.empty((R, R, 3), np.float32)
    img[:] = paper
    grain = tex_rng.standard_normal((R, R)).astype(np.float32) * 0.03 * rng.random()
    img += grain[..., None]
    ink_kind = int(rng.integers(3))
    ink = [_hsv(0, 0, rng.uniform(0.15, 0.45)), _hsv(0.6, 0.6, 0.6), _hsv(0, 0, 0.08)][ink_kind]
    colored = rng.random() < 0.3
    row["variant"] = ["pencil", "bluepencil", "ink"][ink_kind] + ("_oekaki" if colored else "")
    row["background"] = "paper"
    if colored:  # oekaki: rough, misregistered flat colour blobs under the lines
        hue = row["hue"]
        colors = {"hair": _hsv(hue, 0.5, 0.85), "cloth": _hsv(hue + 0.4, 0.45, 0.9),
                  "cloth2": _hsv(hue + 0.2, 0.4, 0.9), "skin": _hsv(0.07, 0.2, 0.98), "eye": _hsv(hue, 0.6, 0.6)}
        im = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        off = rng.normal(0, 0.012, 2)
        for p in parts:
            if rng.random() < 0.8:
                d.polygon(_px(p["poly"] + off, R), fill=_u8(colors[p["key"]]))
        img = np.asarray(im, np.float32) / 255.0
    pil = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    u = 1.0 / 256.0
    base_w = rng.uniform(1.5, 3.0) * u
    # construction lines: faint guides, more in rough sketches
    q = (smooth + cont + weight) / 3
    faint = _u8(paper * 0.75 + ink * 0.25)
    for _ in range(int(round((1 - q) * 5))):
        c = np.array([cx, cy]) + rng.normal(0, 0.15 * scale, 2)
        draw.ellipse([(c[0] - 0.12 * scale) * R, (c[1] - 0.12 * scale) * R, (c[0] + 0.12 * scale) * R,
                      (c[1] + 0.12 * scale) * R], outline=faint, width=max(1, int(round(u * R))))
    # Strokes go into an ink-coverage mask; each part first erases what it hides (the
    # fill), so lines behind the face or the arms do not show through.
    cover = Image.new("L", (R, R), 0)
    dc = ImageDraw.Draw(cover)
    for p in parts:
        if p["name"] != "neck":
            dc.polygon(_px(p["poly"], R), fill=0)
        pts = np.concatenate([p["poly"], p["poly"][:1]])
        # strokes: pieces of the contour, each jittered on its own
        n = len(pts)
        k = max(3, n // int(rng.integers(2, 5)))
        for s in range(0, n - 1, k):
            seg = pts[s:min(n, s + k + 1 + int(rng.integers(0, 2)))]
            if len(seg) < 2:
                continue
            if rng.random() < (1 - cont) * 0.45:
                continue  # broken stroke
            amp = (1 - smooth) * 0.014 + 0.0008
            for rep in range(1 + int(rng.random() < (1 - smooth) * 0.8)):  # hairy doubled strokes
                j = seg + rng.normal(0, amp * 0.45, seg.shape) + rng.normal(0, amp, 2)
                w = base_w * max(0.3, 1 + (1 - weight) * rng.normal(0, 0.7))
                pressure = min(1.0, max(0.3, 1 + (1 - weight) * rng.normal(0, 0.35)))
                dc.line(_px(j, R), fill=int(255 * pressure), width=max(1, int(round(w * R))))
    m = np.asarray(cover, np.float32)[..., None] / 255.0
    arr = np.asarray(pil, np.float32)
    pil = Image.fromarray((arr * (1 - m) + (ink * 255) * m + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    # face
    _eyes(draw, rng, R, parts, {"eye": ink * 0.8, "skin": paper}, 0.0, _u8(ink), cx, cy, scale, tilt, flip)
    return pil


# --------------------------------------------------------------------------------------
# Bracket 0: photos, noise, text


def _render_photo(rng, tex_rng, R, q, row):
    """Photo-like: soft natural colour fields, a horizon, blurred bokeh, sensor grain.
    The smooth part is computed at <= 128 px and upscaled; only the grain is full size."""
    Rs = min(R, 128)
    X, Y = _grid(Rs)
    horizon = rng.uniform(0.3, 0.7)
    sky = _hsv(rng.uniform(0.5, 0.65), rng.uniform(0.1, 0.5), rng.uniform(0.6, 0.95))
    ground = _hsv(rng.uniform(0.05, 0.35), rng.uniform(0.2, 0.6), rng.uniform(0.25, 0.6))
    f = _fractal(rng, Rs, base=3, octaves=5, persistence=0.6)
    edge = np.clip((Y - horizon + 0.15 * f) / 0.04, 0, 1)[..., None]
    img = sky * (1 - edge) + ground * edge
    img = img * (1 + 0.35 * _fractal(rng, Rs, base=4, octaves=5, persistence=0.65)[..., None])
    blobs = Image.new("L", (Rs, Rs), 0)
    d = ImageDraw.Draw(blobs)
    for _ in range(int(rng.integers(2, 8))):
        x, y, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.15)
        d.ellipse([(x - r) * Rs, (y - r) * Rs, (x + r) * Rs, (y + r) * Rs], fill=int(rng.integers(80, 255)))
    b = np.asarray(blobs.filter(ImageFilter.GaussianBlur(Rs * 0.02)), np.float32)[..., None] / 255.0
    img = img * (1 - 0.5 * b) + _hsv(rng.random(), 0.3, 0.95) * 0.5 * b
    small = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    arr = np.asarray(small.resize((R, R), Image.Resampling.BICUBIC), np.float32)
    arr = arr + tex_rng.standard_normal((R, R, 1), dtype=np.float32) * 10.0  # sensor grain
    row.update(variant="photo", background="photo")
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def _render_noise(rng, tex_rng, R, q, row):
    g = int(rng.choice([8, 16, 32, 48]))
    cells = rng.random((g, g, 3)).astype(np.float32)
    if rng.random() < 0.5:
        cells = cells.mean(axis=2, keepdims=True).repeat(3, 2)
    img = np.asarray(Image.fromarray((cells * 255).astype(np.uint8)).resize((R, R), Image.Resampling.NEAREST),
                     np.float32) / 255.0
    img = img * 0.7 + 0.3 * tex_rng.random((R, R, 1)).astype(np.float32)
    row.update(variant=f"noise{g}", background="noise")
    return Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))


def _glyph_row(rng, n_glyphs):
    """Bitmap (7, 6 * n) of random blocky glyphs with strokes, spaces between words."""
    g = np.zeros((7, 6 * n_glyphs), np.uint8)
    for i in range(n_glyphs):
        if rng.random() < 0.15:
            continue  # space
        cell = np.zeros((7, 5), np.uint8)
        for _ in range(int(rng.integers(2, 4))):
            if rng.random() < 0.5:
                r = int(rng.integers(0, 7))
                a, b = sorted(rng.integers(0, 6, 2))
                cell[r, a:b + 1] = 1
            else:
                c = int(rng.integers(0, 5))
                a, b = sorted(rng.integers(0, 8, 2))
                cell[a:b + 1, c] = 1
        g[:, 6 * i:6 * i + 5] = cell
    return g


def _paste_text(img, rng, R, y0, h, n_glyphs, x0, color, outline=None):
    """Paint a row of glyphs of height h (canvas units) at (x0, y0) onto float img."""
    bm = _glyph_row(rng, n_glyphs)
    H = max(2, int(round(h * R)))
    W = max(2, int(round(H * bm.shape[1] / 7)))
    m = np.asarray(Image.fromarray(bm * 255).resize((W, H), Image.Resampling.NEAREST), np.float32) / 255.0
    X0, Y0 = int(round(x0 * R)), int(round(y0 * R))
    x1, y1 = min(R, X0 + W), min(R, Y0 + H)
    if x1 <= X0 or y1 <= Y0 or X0 < 0 or Y0 < 0:
        return img
    m = m[: y1 - Y0, : x1 - X0]
    if outline is not None:
        pad = max(1, H // 8)
        mo = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(2 * pad + 1)),
                        np.float32) / 255.0
        _blend(img[Y0:y1, X0:x1], mo, outline)
    _blend(img[Y0:y1, X0:x1], m, color)
    return img


def _render_text(rng, tex_rng, R, q, row):
    style = ["page", "meme", "subtitle", "chat"][int(rng.integers(4))]
    row["variant"] = "text_" + style
    if style in ("page", "chat"):
        bg = _hsv(rng.random(), rng.uniform(0, 0.15), rng.uniform(0.85, 1.0))
        ink = _hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0, 0.3))
        if rng.random() < 0.3:
            bg, ink = ink, bg
        img = np.empty((R, R, 3), np.float32)
        img[:] = bg
        h = rng.uniform(0.04, 0.08)
        y = rng.uniform(0.03, 0.08)
        fill = 1.0 - 0.4 * q  # higher in-bracket quality: a bit less text
        while y + h < 0.97:
            if rng.random() < fill:
                x0 = rng.uniform(0.03, 0.1) if style == "page" else rng.choice([0.05, rng.uniform(0.3, 0.5)])
                n = int((0.95 - x0) / (h * 6 / 7)) if style == "page" else int(rng.integers(4, 12))
                if style == "chat":
                    bubble = _hsv(rng.random(), 0.3, 0.9)
                    x1 = min(0.97, x0 + n * h * 6 / 7 + 0.02)
                    img[int((y - 0.01) * R):int((y + h + 0.01) * R), int((x0 - 0.01) * R):int(x1 * R)] = bubble
                img = _paste_text(img, rng, R, y, h, max(1, n), x0, ink)
            y += h * rng.uniform(1.4, 1.9)
        row["background"] = "plain"
    else:
        # a picture (photo or drawn) with big outlined text over it
        sub = {}
        if rng.random() < 0.5:
            pic = _render_photo(rng, tex_rng, R, q, sub)
        else:
            pic = _render_scenery(rng, tex_rng, R, q, sub)
        img = np.asarray(pic, np.float32) / 255.0
        img = img.copy()
        if style == "meme":
            h = rng.uniform(0.09, 0.14)
            for y in (0.04, 0.96 - h):
                n = int(rng.integers(5, 10))
                x0 = max(0.02, 0.5 - n * h * 6 / 7 / 2)
                img = _paste_text(img, rng, R, y, h, n, x0, (1, 1, 1), outline=(0, 0, 0))
        else:
            h = rng.uniform(0.06, 0.09)
            col = (1, 1, 1) if rng.random() < 0.6 else (1, 0.95, 0.3)
            for k in range(2):
                n = int(rng.integers(8, 15))
                x0 = max(0.02, 0.5 - n * h * 6 / 7 / 2)
                img = _paste_text(img, rng, R, 0.95 - (2 - k) * h * 1.3, h, n, x0, col, outline=(0.05, 0.05, 0.05))
        row["background"] = sub.get("variant", "picture")
    return Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------
# Bracket 1: manga pages, scenery, animals, objects


def _screentone(R, x0, y0, x1, y1, period, radius_fn):
    X, Y = _grid(R)
    cx = (X % period) - period / 2
    cy = (Y % period) - period / 2
    rad = radius_fn(X, Y)
    m = (cx * cx + cy * cy) < (rad * period) ** 2
    box = (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)
    return m & box


def _render_manga(rng, tex_rng, R, q, row):
    img = np.ones((R, R), np.float32) * rng.uniform(0.92, 1.0)
    # panels: split the page into 2-4 rectangles with gutters
    panels = [(0.04, 0.04, 0.96, 0.96)]
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(len(panels)))
        x0, y0, x1, y1 = panels.pop(i)
        g = 0.025
        if (x1 - x0) > (y1 - y0) * rng.uniform(0.6, 1.6):
            xm = rng.uniform(x0 + 0.3 * (x1 - x0), x0 + 0.7 * (x1 - x0))
            panels += [(x0, y0, xm - g / 2, y1), (xm + g / 2, y0, x1, y1)]
        else:
            ym = rng.uniform(y0 + 0.3 * (y1 - y0), y0 + 0.7 * (y1 - y0))
            panels += [(x0, y0, x1, ym - g / 2), (x0, ym + g / 2, x1, y1)]
    pil = Image.fromarray((img * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    u = 1.0 / 256
    tone_period = 4.0 / 256  # fine dots: a grey at 64 px, dots at 256 px
    arr = np.asarray(pil, np.float32) / 255.0
    for (x0, y0, x1, y1) in panels:
        kind = int(rng.integers(4))
        if kind == 0:  # gradient screentone
            a, b = rng.uniform(0.1, 0.45, 2)
            m = _screentone(R, x0, y0, x1, y1, tone_period, lambda X, Y: a + (b - a) * np.clip((Y - y0) / (y1 - y0), 0, 1))
            arr = np.where(m, 0.1, arr)
        elif kind == 1:  # speed lines
            fx, fy = rng.uniform(x0, x1), rng.uniform(y0, y1)
            pil2 = Image.fromarray((arr * 255).astype(np.uint8))
            d2 = ImageDraw.Draw(pil2)
            for _ in range(int(rng.integers(20, 45))):
                ang = rng.uniform(0, 2 * math.pi)
                r0 = rng.uniform(0.08, 0.2)
                d2.line(_px([[fx + r0 * math.cos(ang), fy + r0 * math.sin(ang)],
                             [fx + math.cos(ang), fy + math.sin(ang)]], R), fill=20, width=max(1, int(round(u * R))))
            sub = np.asarray(pil2, np.float32) / 255.0
            box = np.zeros((R, R), bool)
            box[int(y0 * R):int(y1 * R), int(x0 * R):int(x1 * R)] = True
            arr = np.where(box, sub, arr)
        elif kind == 2:  # a greyscale head (ink lines, tone in the hair)
            cx, cy = (x0 + x1) / 2 + rng.uniform(-0.05, 0.05), (y0 + y1) / 2 + 0.1
            sc = min(x1 - x0, y1 - y0) * 1.1
            parts = _to_canvas(_character_parts(rng, bool(rng.random() < 0.5), HAIR_STYLES[int(rng.integers(5))],
                                                bool(rng.random() < 0.2), 0.2), cx, cy, sc, 0.0)
            pil2 = Image.fromarray((arr * 255).astype(np.uint8))
            d2 = ImageDraw.Draw(pil2)
            grey = {"hair": 60, "skin": 250, "cloth": 200, "cloth2": 120, "eye": 30}
            for p in parts:
                d2.polygon(_px(p["poly"], R), fill=grey[p["key"]], outline=0, width=max(1, int(round(2 * u * R))))
            sub = np.asarray(pil2, np.float32) / 255.0
            box = np.zeros((R, R), bool)
            box[int(y0 * R):int(y1 * R), int(x0 * R):int(x1 * R)] = True
            arr = np.where(box, sub, arr)
        else:  # flat tone background with a speech bubble
            m = _screentone(R, x0, y0, x1, y1, tone_period, lambda X, Y: np.float32(rng.uniform(0.15, 0.3)))
            arr = np.where(m, 0.15, arr)
        if rng.random() < 0.5:  # speech bubble with glyph rows
            bx, by = rng.uniform(x0, x1), rng.uniform(y0, y1)
            w, h = min(0.2, (x1 - x0) / 2), min(0.12, (y1 - y0) / 2)
            pil2 = Image.fromarray((arr * 255).astype(np.uint8))
            d2 = ImageDraw.Draw(pil2)
            d2.ellipse([(bx - w) * R, (by - h) * R, (bx + w) * R, (by + h) * R], fill=255, outline=0,
                       width=max(1, int(round(1.5 * u * R))))
            sub = np.asarray(pil2, np.float32)[..., None].repeat(3, 2) / 255.0
            for k in range(2):
                sub = _paste_text(sub, rng, R, by - h * 0.45 + k * h * 0.5, h * 0.3, 5, bx - w * 0.6, (0, 0, 0))
            sub = sub[..., 0]
            box = np.zeros((R, R), bool)
            box[int(y0 * R):int(y1 * R), int(x0 * R):int(x1 * R)] = True
            arr = np.where(box, sub, arr)
    pil = Image.fromarray(np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    bw = max(1, int(round(rng.uniform(2.5, 4.5) * u * R)))
    for (x0, y0, x1, y1) in panels:
        draw.rectangle([x0 * R, y0 * R, x1 * R, y1 * R], outline=0, width=bw)
    row.update(variant="manga", background="page")
    return pil.convert("RGB")


def _render_scenery(rng, tex_rng, R, q, row):
    X, Y = _grid(R)
    hue = rng.random()
    top, bot = _hsv(hue, rng.uniform(0.3, 0.7), rng.uniform(0.6, 0.95)), _hsv(hue + rng.uniform(-0.15, 0.15), 0.25, 0.98)
    img = (top + (bot - top) * Y[..., None]).astype(np.float32)
    pil = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    sx, sy, sr = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.35), rng.uniform(0.04, 0.09)
    d.ellipse([(sx - sr) * R, (sy - sr) * R, (sx + sr) * R, (sy + sr) * R], fill=_u8(_hsv(0.12, 0.4, 1.0)))
    n_layers = int(rng.integers(2, 4))
    ghue = rng.uniform(0.2, 0.45) if rng.random() < 0.7 else rng.random()
    for k in range(n_layers):
        base = 0.45 + 0.15 * k + rng.uniform(-0.05, 0.05)
        xs = np.linspace(-0.05, 1.05, 24)
        ys = base + np.cumsum(rng.normal(0, 0.025, 24))
        poly = np.concatenate([np.stack([xs, ys], 1), [[1.05, 1.05], [-0.05, 1.05]]])
        c = _hsv(ghue + 0.03 * k, 0.35 + 0.1 * k, 0.75 - 0.15 * k + 0.2 * q)
        d.polygon(_px(poly, R), fill=_u8(c))
        for _ in range(int(rng.integers(0, 5))):  # trees
            tx = rng.uniform(0, 1)
            ty = np.interp(tx, xs, ys) + 0.01
            th = rng.uniform(0.05, 0.14) * (0.6 + 0.3 * k)
            d.polygon(_px([[tx, ty - th], [tx - th * 0.35, ty], [tx + th * 0.35, ty]], R), fill=_u8(_darker(c, 0.6)))
    row.update(variant="scenery", background="landscape")
    return pil


def _render_creature(rng, tex_rng, R, q, row, kind):
    hue = float(rng.random())
    base, row["background"] = _background(rng, tex_rng, R, hue)
    cx, cy = 0.5 + rng.normal(0, 0.06), 0.55 + rng.normal(0, 0.05)
    sc = rng.uniform(0.55, 0.9)
    parts = []

    def add(key, poly, ell):
        parts.append({"name": key, "key": key, "poly": np.asarray(poly, np.float64), "ell": ell, "outline": True})

    if kind == "animal":
        sx = -1 if rng.random() < 0.5 else 1
        add("body", _ellipse(0, 0.1, 0.3, 0.17, 40), (0, 0.1, 0.3, 0.17))
        for lx in (-0.2, -0.1, 0.1, 0.2):
            add("body", [[lx - 0.03, 0.15], [lx + 0.03, 0.15], [lx + 0.03, 0.36], [lx - 0.03, 0.36]], (lx, 0.26, 0.04, 0.12))
        add("body", [[-sx * 0.27, 0.05], [-sx * 0.45, -0.15], [-sx * 0.42, -0.18], [-sx * 0.24, 0.0]], (-sx * 0.35, -0.07, 0.1, 0.1))
        ear = rng.choice(["cat", "dog", "bunny"])
        hx, hy = sx * 0.3, -0.1
        if ear == "bunny":
            for e in (-0.05, 0.05):
                add("ear", _ellipse(hx + e, hy - 0.2, 0.035, 0.12, 16), (hx + e, hy - 0.2, 0.04, 0.12))
        elif ear == "cat":
            for e in (-1, 1):
                add("ear", [[hx + e * 0.02, hy - 0.1], [hx + e * 0.11, hy - 0.22], [hx + e * 0.13, hy - 0.04]], (hx + e * 0.08, hy - 0.12, 0.06, 0.08))
        else:
            for e in (-1, 1):
                add("ear", _ellipse(hx + e * 0.12, hy + 0.02, 0.04, 0.09, 16), (hx + e * 0.12, hy, 0.05, 0.09))
        add("head", _ellipse(hx, hy, 0.14, 0.13, 32), (hx, hy, 0.14, 0.13))
        row["variant"] = "animal_" + str(ear)
        colors = {"body": _hsv(rng.uniform(0.02, 0.12), rng.uniform(0.1, 0.6), rng.uniform(0.4, 0.95))}
        colors["head"] = colors["ear"] = colors["body"]
        eyes = [(hx + sx * 0.05, hy - 0.02), (hx + sx * 0.11, hy - 0.02)]
    else:
        obj = rng.choice(["mug", "bottle", "fruit", "box"])
        c = _hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.5, 0.95))
        if obj == "mug":
            add("ring", _ellipse(0.22, 0.05, 0.11, 0.12, 24), (0.22, 0.05, 0.11, 0.12))
            add("main", [[-0.2, -0.2], [0.2, -0.2], [0.18, 0.28], [-0.18, 0.28]], (0, 0.04, 0.22, 0.3))
        elif obj == "bottle":
            add("main", [[-0.05, -0.4], [0.05, -0.4], [0.05, -0.22], [0.14, -0.12], [0.14, 0.35], [-0.14, 0.35],
                         [-0.14, -0.12], [-0.05, -0.22]], (0, 0.0, 0.16, 0.4))
            add("ring", [[-0.14, 0.0], [0.14, 0.0], [0.14, 0.15], [-0.14, 0.15]], (0, 0.07, 0.16, 0.1))
        elif obj == "fruit":
            add("ring", [[0.0, -0.22], [0.15, -0.33], [0.05, -0.2]], (0.07, -0.26, 0.08, 0.06))
            add("main", _ellipse(0, 0.02, 0.25, 0.23, 40), (0, 0.02, 0.25, 0.23))
        else:
            add("main", [[-0.25, -0.1], [0.25, -0.1], [0.25, 0.3], [-0.25, 0.3]], (0, 0.1, 0.3, 0.25))
            add("ring", [[-0.25, -0.1], [-0.1, -0.25], [0.35, -0.25], [0.25, -0.1]], (0.05, -0.17, 0.3, 0.1))
        colors = {"main": c, "ring": _hsv(rng.random(), 0.4, 0.8)}
        row["variant"] = "object_" + str(obj)
        eyes = []
    parts = _to_canvas(parts, cx, cy, sc, rng.normal(0, 0.05))
    la = rng.uniform(math.pi * 1.05, math.pi * 1.95)
    light = np.array([math.cos(la) * 0.8, math.sin(la) * 0.8, 0.6])
    light /= np.linalg.norm(light)
    img = _shade_parts(R, base, parts, colors, 0.1 + 0.35 * q, 0 if q > 0.5 else 3, light, 0.0, None,
                       outline=(rng, [_darker(colors[p["key"]], 0.3) for p in parts], 1.6 / 256, 0.6 + 0.4 * q))
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for ex, ey in eyes:
        x, y = (cx + ex * sc) * R, (cy + ey * sc) * R
        r = 0.018 * sc * R
        d.ellipse([x - r, y - r, x + r, y + r], fill=(20, 20, 20))
    row.update(center_x=cx, center_y=cy, scale=sc)
    return pil


# --------------------------------------------------------------------------------------
# One image


def supersample_for(size: int) -> int:
    """Render at size * supersample: 4x up to 64 px, 2x above (256 px renders at 512)."""
    return 4 if size <= 64 else 2


def render_image(seed: int, split: str, index: int, bracket: int, size: int) -> tuple[Image.Image, dict]:
    """Draw one image and return it with its truth row (without path/label)."""
    key = [int(seed), _SPLIT_CODE[split], int(index)]
    rng = np.random.default_rng(key + [0])
    tex_rng = np.random.default_rng(key + [1])  # resolution-dependent noise lives here
    R = size * supersample_for(size)
    score, category, attrs = _sample_score_and_attributes(rng, int(bracket))
    row = {"split": split, "index": int(index), "bracket": int(bracket), "score": score, "category": category}
    for k in ATTRIBUTE_COLUMNS:
        row[k] = float(attrs[k]) if k in attrs else float("nan")
    q = attrs.get("quality", 0.5)
    if category == "photo":
        pil = _render_photo(rng, tex_rng, R, q, row)
    elif category == "noise":
        pil = _render_noise(rng, tex_rng, R, q, row)
    elif category == "text":
        pil = _render_text(rng, tex_rng, R, q, row)
    elif category == "manga":
        pil = _render_manga(rng, tex_rng, R, q, row)
    elif category == "scenery":
        pil = _render_scenery(rng, tex_rng, R, q, row)
    elif category in ("animal", "object"):
        pil = _render_creature(rng, tex_rng, R, q, row, category)
    elif category == "sketch":
        pil = _render_sketch(rng, tex_rng, R, attrs, row)
    else:
        pil = _render_character(rng, tex_rng, R, attrs, category == "shaded", row)
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    pil = pil.reduce(R // size)
    return pil, row


# --------------------------------------------------------------------------------------
# Generation (parallel, deterministic)

_WORKER_CFG: dict = {}


def _init_worker(cfg):
    _WORKER_CFG.clear()
    _WORKER_CFG.update(cfg)


def _render_chunk(tasks):
    cfg = _WORKER_CFG
    out = Path(cfg["out"])
    rows = []
    for split, index, bracket, rel in tasks:
        img, row = render_image(cfg["seed"], split, index, bracket, cfg["size"])
        # fixed settings, no metadata: identical bytes for identical pixels
        img.save(out / rel, format="PNG", compress_level=1)
        row["path"] = rel
        rows.append(row)
    return rows


def _columns(raters: int):
    cols = [("path", "str"), ("split", "str"), ("index", "int"), ("bracket", "int"), ("score", "float"),
            ("label", "int"), ("category", "str")]
    cols += [(k, "float") for k in ATTRIBUTE_COLUMNS]
    cols += list(NUISANCE_COLUMNS)
    if raters:
        cols += [("rater", "int")] + [(f"rater_{k}", "float") for k in range(raters)]
    return cols


def _rater_params(seed: int, raters: int) -> list[dict]:
    rng = np.random.default_rng([seed, _STREAM_RATERS, 0])
    out = []
    for k in range(raters):
        w = {a: float(v * math.exp(rng.normal(0, 0.5))) for a, v in SHADED_WEIGHTS.items()}
        ws = {a: float(v * math.exp(rng.normal(0, 0.5))) for a, v in SKETCH_WEIGHTS.items()}
        out.append({"rater": k, "bias": float(rng.normal(0, 0.35)), "noise": float(rng.uniform(0.15, 0.5)),
                    "weights": w, "sketch_weights": ws})
    return out


def _rater_scores(seed: int, rows: list[dict], params: list[dict]) -> None:
    """Each rater's score for every image: their own attribute weights (for the categories
    whose score comes from attributes), a personal bias and per-image noise. Labeled and
    test images also get the rater who "scored" them."""
    if not params:
        return
    n = len(rows)
    cat = np.array([r["category"] for r in rows])
    A = {k: np.nan_to_num(np.array([r[k] for r in rows], np.float64)) for k in ATTRIBUTE_COLUMNS}
    score = np.array([r["score"] for r in rows])
    rng = np.random.default_rng([seed, _STREAM_RATERS, 1])
    for p in params:
        s = score.copy()
        shaded = cat == "shaded"
        s[shaded] = 4.5 + 5.5 * quality(A, p["weights"])[shaded]
        flat = cat == "flat"
        s[flat] = 3.5 + quality(A, {k: p["weights"][k] for k in FLAT_ATTRIBUTES})[flat]
        sk = cat == "sketch"
        s[sk] = 1.5 + 2.0 * quality(A, p["sketch_weights"])[sk]
        s = np.clip(s + p["bias"] + rng.normal(0, p["noise"], n), 0, 10)
        for r, v in zip(rows, s):
            r[f"rater_{p['rater']}"] = float(v)
    who = rng.integers(0, len(params), n)
    for r, w in zip(rows, who):
        r["rater"] = int(w) if r["split"] != "unlabeled" else None


def _write_truth(path: Path, rows: list[dict], raters: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
    arrays, fields = [], []
    for name, typ in _columns(raters):
        vals = [r.get(name) for r in rows]
        if typ == "float":
            vals = [None if v is None else float(v) for v in vals]
        arrays.append(pa.array(vals, type=types[typ]))
        fields.append(pa.field(name, types[typ]))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


_OWNED = ("labeled", "test", "unlabeled", "preview", "truth.parquet", "truth.parquet.tmp", "synth.json.tmp")
_MARKER = ".synth-incomplete"


def _clear_previous(out: Path) -> None:
    """Remove a previous synthetic set, refusing to touch a folder that is not one."""
    if not out.exists():
        return
    ours = (out / "synth.json").exists() or (out / _MARKER).exists()
    if not ours and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty and holds no synthetic data set (no synth.json): refusing to overwrite it; "
            f"pass an empty or new folder")
    (out / "synth.json").unlink(missing_ok=True)  # first: from here on the set is incomplete
    (out / _MARKER).write_text("generation in progress or interrupted\n")
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _read_manifest(out: Path):
    try:
        return json.loads((out / "synth.json").read_text())
    except (OSError, ValueError):
        return None


def generate(out_dir, labeled: int = 3080, unlabeled: int = 20000, test: int = 1000, size: int = 64, seed: int = 0,
             workers: int | None = None, label_noise: float = 0.0, raters: int = 0, unlabeled_dist: str = "crawl",
             preview: bool = False, progress: bool = True) -> dict:
    """Write the synthetic benchmark into out_dir and return the content of synth.json.

    If out_dir/synth.json already records the same arguments, nothing is regenerated (a
    preview is still drawn if asked for and missing). Output is byte-identical for a given
    seed whatever `workers` is.
    """
    t0 = time.time()
    for name, v in (("labeled", labeled), ("unlabeled", unlabeled), ("test", test), ("raters", raters)):
        if int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if int(size) != size or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    if not 0.0 <= float(label_noise) <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise!r}")
    if unlabeled_dist not in UNLABELED_DISTRIBUTIONS:
        raise ValueError(f"unlabeled_dist must be one of {UNLABELED_DISTRIBUTIONS}, got {unlabeled_dist!r}")
    args = {"version": GENERATOR_VERSION, "labeled": int(labeled), "unlabeled": int(unlabeled), "test": int(test),
            "size": int(size), "seed": int(seed), "label_noise": float(label_noise), "raters": int(raters),
            "unlabeled_dist": unlabeled_dist,
            "knobs": {"attribute_visibility": ATTRIBUTE_VISIBILITY, "render_jitter": RENDER_JITTER,
                      "nuisance_strength": NUISANCE_STRENGTH, "attribute_spread": ATTRIBUTE_SPREAD}}
    out = Path(out_dir)
    old = _read_manifest(out)
    if old is not None and old.get("args") == args:
        if preview and not (out / "preview" / "overview.png").exists():
            make_preview(out)
        print(f"synthetic set in {out} is up to date (same arguments); nothing to do", file=sys.stderr)
        return old

    _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("generation in progress or interrupted\n")

    tasks, labels = [], {}
    for split, n in (("labeled", labeled), ("test", test), ("unlabeled", unlabeled)):
        br = _split_brackets(seed, split, n, unlabeled_dist)
        lab = _noisy_labels(seed, br, label_noise) if split == "labeled" else br
        for i in range(n):
            name = f"{_ID_PREFIX[split]}{i:06d}.png"
            rel = f"unlabeled/{name}" if split == "unlabeled" else f"{split}/{int(lab[i])}/{name}"
            tasks.append((split, i, int(br[i]), rel))
            labels[(split, i)] = None if split == "unlabeled" else int(lab[i])
        if split == "unlabeled":
            (out / split).mkdir(parents=True, exist_ok=True)
        else:
            for b in range(NUM_BRACKETS):
                (out / split / str(b)).mkdir(parents=True, exist_ok=True)

    cfg = {"out": str(out), "seed": int(seed), "size": int(size)}
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    chunk = 32
    chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
    rows: list[dict] = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None
    if workers == 1 or len(chunks) <= 1:
        _init_worker(cfg)
        for c in chunks:
            rows += _render_chunk(c)
            if bar:
                bar.update(len(c))
    else:
        with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
            for part in pool.imap(_render_chunk, chunks):
                rows += part
                if bar:
                    bar.update(len(part))
    if bar:
        bar.close()
    for r in rows:
        r["label"] = labels[(r["split"], r["index"])]
    params = _rater_params(seed, raters)
    _rater_scores(seed, rows, params)
    _write_truth(out / "truth.parquet", rows, raters)

    counts = {}
    for split in SPLITS:
        c = [0] * NUM_BRACKETS
        for r in rows:
            if r["split"] == split:
                c[r["bracket"]] += 1
        counts[split] = c
    noisy = sum(1 for r in rows if r["split"] == "labeled" and r["label"] != r["bracket"])
    manifest = {
        "args": args,
        "counts": {s: {"total": sum(c), "per_bracket": c} for s, c in counts.items()},
        "label_noise_moved": noisy,
        "bracket_rule": "bracket = clip(floor(score + 0.5), 0, 10)",
        "raters": params,
        "files": {"truth": "truth.parquet", "labeled": "labeled/<label>/", "test": "test/<bracket>/",
                  "unlabeled": "unlabeled/"},
    }
    if preview:
        make_preview(out, rows)
    elapsed = time.time() - t0
    _write_json_atomic(out / "synth.json", manifest)  # last: its presence means the set is whole
    (out / _MARKER).unlink(missing_ok=True)
    print(f"wrote {len(tasks)} images ({labeled} labeled, {test} test, {unlabeled} unlabeled) at {size} px "
          f"to {out} in {elapsed:.1f} s with {workers} worker(s)", file=sys.stderr)
    return manifest


# --------------------------------------------------------------------------------------
# Preview sheets


def make_preview(out, rows=None, cols: int = 8, per_bracket_rows: int = 4, overview_cols: int = 10) -> Path:
    """Contact sheets: preview/bracket_XX.png (cols x rows, upscaled) and preview/overview.png
    (one row per bracket). Labeled images first, then test, then unlabeled."""
    out = Path(out)
    if rows is None:
        import pyarrow.parquet as pq
        rows = pq.read_table(out / "truth.parquet", columns=["path", "split", "bracket", "index"]).to_pylist()
    order = {"labeled": 0, "test": 1, "unlabeled": 2}
    by = {b: [] for b in range(NUM_BRACKETS)}
    for r in sorted(rows, key=lambda r: (order[r["split"]], r["index"])):
        by[r["bracket"]].append(r["path"])
    pdir = out / "preview"
    pdir.mkdir(exist_ok=True)
    need = max(cols * per_bracket_rows, overview_cols)
    imgs = {b: [Image.open(out / p).convert("RGB") for p in by[b][:need]] for b in by}
    size = next((im.width for v in imgs.values() for im in v), 64)
    tile = max(128, size)
    for b, ims in imgs.items():
        sheet = Image.new("RGB", (cols * tile, per_bracket_rows * tile), (40, 40, 40))
        for k, im in enumerate(ims[: cols * per_bracket_rows]):
            sheet.paste(im.resize((tile, tile), Image.Resampling.NEAREST), ((k % cols) * tile, (k // cols) * tile))
        sheet.save(pdir / f"bracket_{b:02d}.png", optimize=True)
    otile = max(64, size)
    margin = 28
    ov = Image.new("RGB", (margin + overview_cols * otile, NUM_BRACKETS * otile), (255, 255, 255))
    d = ImageDraw.Draw(ov)
    for b, ims in imgs.items():
        d.text((4, b * otile + otile // 2 - 6), str(b), fill=(0, 0, 0))
        for k, im in enumerate(ims[:overview_cols]):
            ov.paste(im.resize((otile, otile), Image.Resampling.NEAREST), (margin + k * otile, b * otile))
    ov.save(pdir / "overview.png", optimize=True)
    return pdir / "overview.png"


# --------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        description="Generate the synthetic anime-aesthetics benchmark (labeled/test folders by bracket, an "
                    "unlabeled pool, truth.parquet and synth.json).")
    p.add_argument("--out", required=True, help="output folder (created; a previous synthetic set there is replaced)")
    p.add_argument("--labeled", type=int, default=3080, help="labeled images, model-card histogram (default 3080)")
    p.add_argument("--unlabeled", type=int, default=20000, help="unlabeled pool size (default 20000)")
    p.add_argument("--test", type=int, default=1000, help="test images, model-card histogram (default 1000)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs); output does not depend on it")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="fraction of labeled (not test) labels moved by +-1 bracket (default 0)")
    p.add_argument("--raters", type=int, default=0, help="simulate K raters: per-rater score columns in truth.parquet")
    p.add_argument("--unlabeled-dist", choices=UNLABELED_DISTRIBUTIONS, default="crawl",
                   help="bracket distribution of the unlabeled pool (default crawl: more photos/text/manga/flat)")
    p.add_argument("--preview", action="store_true", help="write contact sheets to OUT/preview/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        generate(a.out, labeled=a.labeled, unlabeled=a.unlabeled, test=a.test, size=a.size, seed=a.seed,
                 workers=a.workers, label_noise=a.label_noise, raters=a.raters, unlabeled_dist=a.unlabeled_dist,
                 preview=a.preview, progress=not a.no_progress)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
