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
    out_dir/weak_signal.csv                  path,score of every pool image from its weak signal
                                             (--weak-signal; truth.parquet then has weak_signal)

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

Weak signal (--weak-signal, off by default). A stand-in for what a crawl gives for free, a
booru favourite count or score percentile: a noisy, biased, heavy-tailed signal of the true
score for every pool image, to try weak supervision (or pool ranking) against. With the
parameters of WEAK_SIGNAL in `scores.py`:

    raw = base * exp(slope * (score - 5) + ears_boost * ears + meme_boost * meme + sigma * z)
               * (1 - u) ** (-1 / tail_shape)          z ~ N(0, 1), u ~ U[0, 1)

    base 20 (median favourites of a plain score-5 image), slope 0.45 (x1.57 a score point),
    sigma 0.8 (log-normal popularity noise), tail_shape 1.5 (a Pareto "virality" factor
    with x_m = 1: infinite variance; on the default pool the top 1% of images hold a third
    of all favourites and the largest is ~3,000 x the median)

Monotone in expectation: E[raw | score, nuisances] = base * e^(slope (score - 5) + boosts)
* e^(sigma^2 / 2) * 3. The bias, towards things popular on boorus whatever their quality:
`ears` (animal ears, a nuisance of every character and sketch, brackets 2-10) multiplies
favourites by e^0.5 = 1.65, about a bracket; `meme` (bracket-0 text images of variant
text_meme) by e^2.5 = 12, which lifts a score-0 meme to the pool's middle (its mean manifest
score is ~6.9 against ~1.8 for the other bracket-0 images). truth.parquet's `weak_signal` is
`raw` (NaN off the pool); weak_signal.csv scores each pool image 10 x its mid-rank pool
percentile, 10 * (rank - 0.5) / n (ties averaged), so the scores spread uniformly over
(0, 10) and the file trains as `data.labeled=<set>/weak_signal.csv` (paths relative to the
set folder). Spearman of raw with the true score on the default pool (20,000 crawl images,
seed 0): 0.662 (0.61-0.75 on pools of 400). synth.json records the parameters in its args
(so changing them, or turning the flag on, redraws the set; off, the args are as before),
plus the formula and the set's own Spearman. The draw has its own stream per image
(`_STREAM_WEAK`): turning it on changes no image and no other column.

Difficulty knobs (constants at the top of `aessl/synth/scores.py`; the lead engineer tunes
them against a measured supervised kappa; synth.json records them, so a set generated with
other values is redrawn):

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
(k = 0 for the scene, 1 for resolution-dependent texture, 104 for the weak signal), never from worker order, and
PNGs are written with fixed settings and no metadata, so a seed gives byte-identical files
and truth table whatever `workers` is. The scene (geometry, colours) is also the same at
every --size; only the rasterisation changes.

Modules, one job each:

    scores     brackets per split, scores, attributes, simulated raters, the weak signal, the knobs
    draw       drawing primitives: colours, contours, noise, backgrounds, pseudo-3D shading
    character  the character: flat/shaded illustrations (4-10) and sketches (2-3)
    scenes     everything else: photos, noise, text (0); manga, scenery, animals, objects (1)
    render     render_image(): score model, then the category's renderer from RENDERERS
    dataset    generate(): worker pool, PNGs, truth.parquet, synth.json
    preview    contact sheets
    cli        `python ssl/synth.py`
"""

from ..metrics import bracket_of
from .character import HAIR_STYLES
from .cli import main
from .dataset import GENERATOR_VERSION, generate
from .preview import make_preview
from .render import NUISANCE_COLUMNS, RENDERERS, render_image, supersample_for
from .scores import (
    ATTRIBUTE_COLUMNS, ATTRIBUTE_SPREAD, ATTRIBUTE_VISIBILITY, CRAWL_HISTOGRAM, FLAT_ATTRIBUTES, MIN_WEIGHT,
    MODEL_CARD_HISTOGRAM, NUISANCE_STRENGTH, NUM_BRACKETS, RENDER_JITTER, SHADED_WEIGHTS, SKETCH_WEIGHTS, SPLITS,
    UNLABELED_DISTRIBUTIONS, WEAK_SIGNAL, bracket_counts, quality,
)

__all__ = [
    "ATTRIBUTE_COLUMNS", "ATTRIBUTE_SPREAD", "ATTRIBUTE_VISIBILITY", "CRAWL_HISTOGRAM", "FLAT_ATTRIBUTES",
    "GENERATOR_VERSION", "HAIR_STYLES", "MIN_WEIGHT", "MODEL_CARD_HISTOGRAM", "NUISANCE_COLUMNS", "NUISANCE_STRENGTH",
    "NUM_BRACKETS", "RENDERERS", "RENDER_JITTER", "SHADED_WEIGHTS", "SKETCH_WEIGHTS", "SPLITS",
    "UNLABELED_DISTRIBUTIONS", "WEAK_SIGNAL", "bracket_counts", "bracket_of", "generate", "main", "make_preview",
    "quality", "render_image", "supersample_for",
]
