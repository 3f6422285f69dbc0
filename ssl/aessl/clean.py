"""Data quality: find the bad labels of a scored set (ssl/clean.py is the command line).

    features    a frozen backbone's eval-view features of every image, through the embedding
                cache (embedding.prepare_features: the same cache, key and skips as embedding-mode
                training, so a set cleaned once is not embedded again when it trains)
    OOF probs   K-fold (stratified by bracket, grouped by file content so copies and a
                multi-rater image's rows share a fold): per fold a multinomial logistic
                regression on the standardised features, its bracket probabilities for the
                held-out fold. Why logistic regression: convex (no seed, no early stopping,
                nothing to tune but one L2 strength, picked from C_GRID by out-of-fold log
                loss), fitted in seconds on CPU for thousands of images, and its probabilities
                are close to calibrated, which both rankings below read as probabilities (a
                small MLP head gives sharper, worse calibrated ones, and cleanlab's thresholds
                follow that). The price: a linear read of the features, so the rankings are
                only as good as the backbone.
    cleanlab    `cleanlab.filter.find_label_issues` (its default `prune_by_noise_rate`) flags,
                `cleanlab.rank.get_label_quality_scores` (self-confidence: the OOF
                probability of the given bracket) ranks. It treats brackets as unordered: a
                7 labelled 6 costs as much as a 10 labelled 0.
    ordinal     the OOF probability mass within one bracket of the given one,
                P(|k - given| <= 1): low means the model puts the image's score two or more
                brackets away from its label. Flagged below ORDINAL_CUT (0.2: fewer than one
                chance in five that the label is even a neighbour of the truth). A label one
                bracket off is, by design, almost never flagged: that is rater disagreement
                more than a bad label. Also reported: the expected absolute distance
                sum_k p_k |k - given| and the suggested bracket, the OOF median (the bracket
                with the least expected absolute error). docs/data_quality.md has the
                measurements behind the choice (the mass within one bracket finds far-moved
                labels better than the expected distance, which rewards sharp predictions).
    outliers    cleanlab.outlier.OutOfDistribution on the standardised features (mean
                Euclidean distance to the k nearest neighbours), flagged where -log(score)
                lies beyond Tukey's far-out fence, Q3 + OUTLIER_IQR x IQR (the distances are
                heavy-tailed: with cosine distances a robust z above 3.5 flagged 8% of a
                synthetic set that has no outliers; on a log scale, nothing at all). Only as good as the backbone: docs/data_quality.md.
    duplicates  identical bytes (sha256), and near-identical images: perceptual hash (DCT of
                the 32 x 32 grey image, 64 bits) within PHASH_BITS bits AND correlation of the
                32 x 32 RGB thumbnails >= NEAR_CORR (the hash alone pairs distinct
                images of the same layout; the correlation alone is O(n^2); the thresholds'
                measurements are in docs/data_quality.md). Rows naming the same file are
                duplicates unless they are two raters' scores of it. With a test set: test
                images that are labeled files or (near) copies of them.

Unreadable images (and files that cannot be read) are skipped and counted, as the pool is
in training: listed in issues.csv as kind `unreadable` and left out of cleaned.csv, which
must train. Everything a user can fix raises CleanError (or the data module's
LabeledSetError / DataSourceError) naming the file or option.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.outlier import OutOfDistribution
from cleanlab.rank import get_label_quality_scores
from PIL import Image
from safetensors.torch import load_file, save_file
from scipy.fft import dctn
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from . import grids
from .config import load_config
from .data import DataSourceError, LabeledSetError, load_scored_set
from .embedding import prepare_features
from .fileio import write_text_atomic
from .images import UnreadableImage, load_image
from .metrics import NUM_BRACKETS
from .models import WeightsUnavailable, resolve_model_folder

log = logging.getLogger(__name__)

ORDINAL_CUT = 0.2  # flag a label when P(|k - given| <= 1) under the OOF probabilities is below this
OUTLIER_IQR = 3.0  # outlier: -log(OOD score) above Q3 + 3 IQR (Tukey's far-out fence)
PHASH_BITS = 4  # near-identical: perceptual hashes at most this many bits apart ...
NEAR_CORR = 0.92  # ... and 32 x 32 RGB thumbnails correlated at least this much
C_GRID = (0.01, 0.1, 1.0)  # logistic regression L2 strengths tried; the best OOF log loss wins
ACTIONS = ("drop", "relabel", "none")
FLAG_BY = ("ordinal", "cleanlab", "both", "either")
KINDS = ("label_issue", "outlier", "near_duplicate", "unreadable")
ISSUE_COLUMNS = ("path", "kind", "given_bracket", "suggested_bracket", "quality_score", "ordinal_score",
                 "expected_distance", "argmax_bracket", "outlier_score", "flagged_by", "other_path", "other_bracket",
                 "detail")
REVIEW_SHOWN = 48  # images per review section (issues.csv has every row)
THUMB = 128


class CleanError(ValueError):
    """A clean.py input or option that cannot work; the message names it and says what to do."""


# --------------------------------------------------------------------------- inputs


def load_set(source, option: str):
    """A scored set (folder or manifest) as data.load_scored_set reads it, images not decoded
    yet (unreadable ones are skipped later, not fatal); errors name the option."""
    try:
        return load_scored_set(source, check_images=False)
    except LabeledSetError as exc:
        raise LabeledSetError(f"{option} {exc.source}", exc.problems) from None
    except DataSourceError as exc:
        raise DataSourceError(f"{option}: {exc}") from None


@dataclass
class Backbone:
    """The config overrides that build the frozen feature extractor, and what it is."""

    overrides: list[str]
    weights: str | bool  # model.pretrained: a file, or False (random init)
    kwargs: dict
    description: str
    option: str  # what the user gave: named in errors
    tmpdir: tempfile.TemporaryDirectory | None = None

    @property
    def random_init(self) -> bool:
        return self.weights is False


def backbone_from(model: str | None, name: str | None, pretrained: str | None, image_size: int | None) -> Backbone:
    """--model RUN (a run or model/ folder; its backbone, image size and crop), or --backbone
    NAME [--pretrained FILE] (random init without a file: allowed, warned about)."""
    if model is not None and (name is not None or pretrained is not None):
        raise CleanError("give --model RUN or --backbone NAME [--pretrained FILE], not both")
    if model is None:
        name = name or "test_convnext3"
        if pretrained is not None and not Path(pretrained).is_file():
            raise CleanError(f"--pretrained: weights file not found: {pretrained}")
        size = image_size or 64
        over = [f"model.name={name}", f"data.image_size={size}"]
        option = "--backbone/--pretrained" if pretrained else "--backbone"
        return Backbone(over, str(pretrained) if pretrained else False, {},
                        f"{name} ({pretrained or 'random init'}, {size} px)", option)
    try:
        folder = resolve_model_folder(model)
    except FileNotFoundError as exc:
        raise CleanError(f"--model: {exc}") from None
    try:
        info = json.loads((folder / "config.json").read_text())
        arch = info["architecture"]
    except (OSError, ValueError, KeyError) as exc:
        raise CleanError(f"--model: {folder / 'config.json'} is not a model config ({exc})") from None
    weights, tmp = folder / "model.safetensors", None
    if info.get("mode", "image") == "embedding":  # backbone.* and head.*: the backbone's own file
        tmp = tempfile.TemporaryDirectory(prefix="aessl-clean-")
        state = load_file(str(weights))
        weights = Path(tmp.name) / "backbone.safetensors"
        save_file({k[9:]: v for k, v in state.items() if k.startswith("backbone.")}, str(weights))
    size = image_size or int(info.get("image_size", 64))
    over = [f"model.name={arch}", f"data.image_size={size}", f"data.crop_pct={float(info.get('crop_pct', 1.0))}"]
    return Backbone(over, str(weights), dict(info.get("model_kwargs") or {}), f"{arch} from {folder} ({size} px)",
                    "--model", tmp)


def features_of(backbone: Backbone, table, accelerator, cache_dir: str | None, workers: int, batch_size: int):
    """(eval-view features [m, D] of the readable rows, their row positions, [(name, reason)]
    of the skipped rows) through the embedding cache."""
    cfg = load_config(None, list(backbone.overrides) + [f"embed.batch_size={batch_size}"])
    cfg.model.pretrained = backbone.weights  # paths set as they are, not parsed as YAML
    cfg.model.kwargs = backbone.kwargs
    if cache_dir:
        cfg.embed.cache_dir = str(cache_dir)
    try:
        feats = prepare_features(cfg, accelerator, {"scored": table}, workers)
    except WeightsUnavailable as exc:
        raise CleanError(f"{backbone.option}: {exc}") from None
    ft = feats["tables"]["scored"]
    X = ft.gather(np.arange(len(ft)), 0) if len(ft) else np.zeros((0, feats["stats"]["dim"]), np.float32)
    return X.astype(np.float32), np.asarray(ft.rows, dtype=np.int64), feats["skipped"]["scored"]


def add_backbone_arguments(p) -> None:
    """The frozen backbone's options, shared by ssl/clean.py and ssl/raters.py."""
    p.add_argument("--model", default=None, help="a run folder or model/ folder whose backbone gives the features "
                                                 "(image size and crop from its config)")
    p.add_argument("--backbone", default=None, help="timm name of the backbone instead of --model "
                                                    "(default test_convnext3)")
    p.add_argument("--pretrained", default=None, help="local weights file for --backbone (.safetensors/.pth); "
                                                      "without it the backbone is random init: weak, warned about")
    p.add_argument("--image-size", type=int, default=None, help="input size of the backbone (default: the model's, "
                                                                "else 64)")
    p.add_argument("--cache-dir", default=None, help="embedding cache folder (default .cache/embed, shared with "
                                                     "embedding-mode training)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the feature pass (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")


def check_backbone_arguments(p, args):
    if args.workers < 0:
        p.error("--workers must be 0 or more")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # found before the features, not after
        p.error(f"--out {args.out} is a file; name a folder to write into")
    return args


# --------------------------------------------------------------------------- out-of-fold probabilities


def choose_folds(brackets: np.ndarray, folds: int, paths: list[str]) -> int:
    """The fold count: `folds`, or fewer where a bracket has fewer images (warned), so every
    fold's held-out part draws from every bracket and its training part still holds it.
    A bracket with a single image cannot be in both: no fold learns it, which is warned about
    (its label is checked against the neighbouring brackets only; cleanlab will flag it).
    Refused: --folds below 2, fewer than two brackets with two or more images."""
    if folds < 2:
        raise CleanError(f"--folds must be at least 2, got {folds}")
    present, counts = np.unique(brackets, return_counts=True)
    usable = counts[counts >= 2]
    if len(usable) < 2:
        raise CleanError(f"the scored set has {len(brackets)} readable image(s), per bracket "
                         f"{dict(zip(present.tolist(), counts.tolist()))}: out-of-fold probabilities need at least "
                         "two brackets with two or more images each")
    single = [int(b) for b, c in zip(present, counts) if c == 1]
    if single:
        where = "; ".join(f"bracket {b}: {paths[int(np.flatnonzero(brackets == b)[0])]}" for b in single)
        log.warning("a single image in bracket(s) %s (%s): no fold learns such a bracket, so the image is checked "
                    "against its neighbours only (cleanlab will flag it). Add images to the bracket to check it",
                    single, where)
    smallest = int(usable.min())
    if smallest < folds:
        b = int(present[counts >= 2][usable.argmin()])
        log.warning("bracket %d has %d images, fewer than --folds %d: using %d folds", b, smallest, folds, smallest)
        return smallest
    return folds


def _fit_fold(X, y, tr, te, C: float, classes: np.ndarray) -> np.ndarray:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X[tr], y[tr])
    out = np.zeros((len(te), len(classes)))
    out[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(X[te])
    return out


def out_of_fold_probs(X: np.ndarray, brackets: np.ndarray, groups: list[str], folds: int, seed: int = 0):
    """[n, 11] out-of-fold bracket probabilities (0 for brackets absent from the set, and from
    a fold whose training part lacks a bracket) and the chosen C."""
    classes = np.unique(brackets)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a single-image bracket: choose_folds warned already
        splits = list(splitter.split(X, brackets, groups))
    best = None
    for C in C_GRID:
        P = np.zeros((len(X), len(classes)))
        for tr, te in splits:
            P[te] = _fit_fold(X, brackets, tr, te, C, classes)
        loss = float(-np.log(np.clip(P[np.arange(len(P)), np.searchsorted(classes, brackets)], 1e-12, None)).mean())
        log.info("out-of-fold log loss %.4f at C=%g", loss, C)
        if best is None or loss < best[0]:
            best = (loss, C, P)
    full = np.zeros((len(X), NUM_BRACKETS))
    full[:, classes] = best[2]
    return full / full.sum(1, keepdims=True), best[1]


# --------------------------------------------------------------------------- rankings


def ordinal_scores(P: np.ndarray, given: np.ndarray) -> dict:
    """Ordinal view of OOF probabilities P [n, 11] against the given brackets:
    within1 = P(|k - given| <= 1) (the ordinal score: low = bad), expected_distance =
    sum_k p_k |k - given|, suggested = the median bracket (least expected absolute error)."""
    k = np.arange(P.shape[1])
    dist = np.abs(k[None, :] - np.asarray(given)[:, None])
    return {"within1": (P * (dist <= 1)).sum(1),
            "expected_distance": (P * dist).sum(1),
            "suggested": (np.cumsum(P, 1) >= 0.5 - 1e-9).argmax(1)}


def cleanlab_scores(P: np.ndarray, given: np.ndarray) -> dict:
    """cleanlab on the brackets present in the set: quality (self-confidence), flagged
    (find_label_issues' default filter), argmax bracket."""
    classes = np.unique(given)
    labels = np.searchsorted(classes, given)
    sub = P[:, classes]
    sub = sub / np.clip(sub.sum(1, keepdims=True), 1e-12, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = find_label_issues(labels, sub, n_jobs=1)
        quality = get_label_quality_scores(labels, sub, method="self_confidence")
    return {"quality": quality, "flagged": np.asarray(flagged, dtype=bool), "argmax": classes[sub.argmax(1)]}


def outlier_scores(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's OutOfDistribution scores (0-1, low = atypical) of standardised features with
    Euclidean k-nearest neighbours (cleanlab's default cosine flagged 1.7% of a synthetic set
    that has no outliers, and ranked injected random-noise images lower), and the flag:
    -log(score), proportional to the mean distance to the k nearest neighbours, beyond
    Tukey's far-out fence (Q3 + OUTLIER_IQR x IQR)."""
    n = len(X)
    if n < 3:
        return np.ones(n), np.zeros(n, dtype=bool)
    Xs = StandardScaler().fit_transform(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        knn = NearestNeighbors(n_neighbors=min(10, n - 1), metric="euclidean").fit(Xs)
        scores = np.asarray(OutOfDistribution(params={"knn": knn}).fit_score(features=Xs, verbose=False),
                            dtype=np.float64)
    d = -np.log(np.clip(scores, 1e-300, 1.0))
    q1, q3 = np.percentile(d, [25, 75])
    return scores, d > q3 + OUTLIER_IQR * (q3 - q1)


def flag_labels(cl: dict, ordinal: dict, flag_by: str) -> np.ndarray:
    """The label issues an --action applies to."""
    o = ordinal["within1"] < ORDINAL_CUT
    c = cl["flagged"]
    return {"ordinal": o, "cleanlab": c, "both": o & c, "either": o | c}[flag_by]


# --------------------------------------------------------------------------- duplicates


@dataclass
class Prints:
    """Per image: sha256 of the bytes, the 64-bit perceptual hash and a 32 x 32 RGB
    thumbnail (None where the file could not be read or decoded)."""

    sha: list
    phash: np.ndarray
    thumbs: np.ndarray
    ok: np.ndarray


def _one_print(path: str):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        img = load_image(data, draft_size=64)
    except UnreadableImage:
        return hashlib.sha256(data).hexdigest(), 0, None
    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].ravel()
    bits = np.packbits(low > np.median(low[1:])).view(">u8")[0]
    thumb = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.uint8)
    return hashlib.sha256(data).hexdigest(), int(bits), thumb


def fingerprints(paths: list[str], workers: int = 4) -> Prints:
    with ThreadPoolExecutor(max(1, workers)) as pool:
        got = list(pool.map(_one_print, paths, chunksize=32))
    sha = [g[0] if g else None for g in got]
    ok = np.array([g is not None and g[2] is not None for g in got], dtype=bool)
    phash = np.array([g[1] if g else 0 for g in got], dtype=np.uint64)
    thumbs = np.zeros((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, g in enumerate(got):
        if g is not None and g[2] is not None:
            thumbs[i] = g[2]
    return Prints(sha, phash, thumbs, ok)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float(np.array_equal(a, b))


def duplicate_pairs(a: Prints, paths_a: list[str], b: Prints | None = None, paths_b: list[str] | None = None,
                    raters: list | None = None):
    """Pairs (i, j, how) of identical or near-identical images: within `a` (i < j) or, with
    `b`, between a[i] and b[j]. how: 'the same file', 'identical bytes' or 'near-identical
    (...)'. Within `a`, rows naming the same file are a pair only when they are not two
    raters' scores of it (`raters`: each row's rater or None); between sets, always (a test
    image that is a labeled one)."""
    within = b is None
    b, paths_b = (a, paths_a) if within else (b, paths_b)
    real_a = [os.path.realpath(p) for p in paths_a]
    real_b = real_a if within else [os.path.realpath(p) for p in paths_b]
    raters = raters or [None] * len(paths_a)
    by_sha: dict[str, list[int]] = {}
    for j, s in enumerate(b.sha):
        if s is not None:
            by_sha.setdefault(s, []).append(j)
    pairs, seen = [], set()
    for i, s in enumerate(a.sha):
        for j in by_sha.get(s, []) if s is not None else []:
            if within and j <= i:
                continue
            same = real_a[i] == real_b[j]
            if same and within and raters[i] is not None and raters[j] is not None and raters[i] != raters[j]:
                continue  # two raters' scores of one image: rater disagreement, not a duplicate
            pairs.append((i, j, "the same file" if same else "identical bytes"))
            seen.add((i, j))
    ia, ib = np.flatnonzero(a.ok), np.flatnonzero(b.ok)
    for s in range(0, len(ia), 512):
        rows = ia[s:s + 512]
        close = np.bitwise_count(a.phash[rows][:, None] ^ b.phash[ib][None, :]) <= PHASH_BITS
        for r, c in zip(*np.nonzero(close)):
            i, j = int(rows[r]), int(ib[c])
            if (within and j <= i) or (i, j) in seen or real_a[i] == real_b[j]:
                continue
            corr = _corr(a.thumbs[i], b.thumbs[j])
            if corr >= NEAR_CORR:
                bits = int(np.bitwise_count(a.phash[i] ^ b.phash[j]))
                pairs.append((i, j, f"near-identical (hash {bits} bits apart, thumbnail correlation {corr:.3f})"))
    return pairs


# --------------------------------------------------------------------------- the whole pass


@dataclass
class Result:
    """What clean.py prints and the tests read."""

    out: Path
    images: int
    readable: int
    unreadable: int
    folds: int
    C: float
    counts: dict = field(default_factory=dict)
    cleaned_rows: int = 0
    seconds: float = 0.0
    backbone: str = ""


def run_clean(labeled, out, accelerator, model=None, backbone=None, pretrained=None, folds: int = 5,
              action: str = "none", flag_by: str = "ordinal", image_size: int | None = None, test=None,
              cache_dir: str | None = None, workers: int = 2, batch_size: int = 64, seed: int = 0) -> Result:
    """The whole pass: features, OOF probabilities, rankings, outliers, duplicates, then
    issues.csv, review.html and cleaned.csv in `out`."""
    t0 = time.time()
    if action not in ACTIONS:
        raise CleanError(f"--action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if flag_by not in FLAG_BY:
        raise CleanError(f"--flag-by must be one of {', '.join(FLAG_BY)}, got {flag_by!r}")
    if folds < 2:
        raise CleanError(f"--folds must be at least 2, got {folds}")
    if image_size is not None and image_size < 8:
        raise CleanError(f"--image-size must be at least 8, got {image_size}")
    table = load_set(labeled, "--labeled")
    test_table = load_set(test, "--test") if test is not None else None
    bb = backbone_from(model, backbone, pretrained, image_size)
    if bb.random_init:
        log.warning("clean: the backbone %s is randomly initialised: its features are weak, and so are the label "
                    "rankings. Give --model RUN (a trained run) or --backbone NAME --pretrained FILE", bb.description)
    try:
        X, rows, skipped = features_of(bb, table, accelerator, cache_dir, workers, batch_size)
    finally:
        if bb.tmpdir is not None:
            bb.tmpdir.cleanup()
    paths = list(table["path"])
    given_all = np.asarray(table["bracket"], dtype=np.int64)
    if skipped:
        log.warning("clean: %d of %d images could not be read and are skipped (listed in issues.csv), e.g. %s",
                    len(skipped), len(paths), "; ".join(f"{n}: {r}" for n, r in skipped[:3]))
    if len(rows) == 0:
        raise CleanError(f"--labeled {labeled}: none of its {len(paths)} images could be read, e.g. "
                         + "; ".join(f"{n}: {r}" for n, r in skipped[:3]))
    prints = fingerprints(paths, workers=max(1, workers) * 2)
    given = given_all[rows]
    groups = [prints.sha[r] or paths[r] for r in rows]
    k = choose_folds(given, folds, [paths[r] for r in rows])
    P, C = out_of_fold_probs(X, given, groups, k, seed)
    analysis = {"rows": rows, "P": P, "given": given, "ordinal": ordinal_scores(P, given),
                "cleanlab": cleanlab_scores(P, given), "outlier": outlier_scores(X)}
    analysis["flagged"] = flag_labels(analysis["cleanlab"], analysis["ordinal"], flag_by)
    dups = duplicate_pairs(prints, paths, raters=list(table["rater"]) if "rater" in table.column_names else None)
    test_dups, test_paths, test_given = [], [], None
    if test_table is not None:
        test_paths = list(test_table["path"])
        test_given = np.asarray(test_table["bracket"], dtype=np.int64)
        test_dups = duplicate_pairs(prints, paths, fingerprints(test_paths, workers=max(1, workers) * 2), test_paths)
    issues = issue_rows(paths, given_all, analysis, dups, test_dups, test_paths, test_given, skipped, rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_issues(out / "issues.csv", issues)
    write_scores(out / "scores.csv", paths, analysis)
    n_clean = write_cleaned(out / "cleaned.csv", table, analysis, action)
    summary = {"backbone": bb.description, "images": len(paths), "readable": len(rows), "folds": k, "C": C,
               "flag_by": flag_by, "action": action, "ordinal_cut": ORDINAL_CUT, "outlier_iqr": OUTLIER_IQR}
    write_review(out / "review.html", issues, summary)
    counts = {kind: sum(1 for r in issues if r["kind"] == kind) for kind in KINDS}
    counts.update({"cleanlab_flagged": int(analysis["cleanlab"]["flagged"].sum()),
                   "ordinal_flagged": int((analysis["ordinal"]["within1"] < ORDINAL_CUT).sum()),
                   "acted_on": int(analysis["flagged"].sum())})
    return Result(out, len(paths), len(rows), len(skipped), k, C, counts, n_clean, round(time.time() - t0, 1),
                  bb.description)


# --------------------------------------------------------------------------- issues.csv


def _base_row(paths, given_all, analysis, pos: int | None, row: int) -> dict:
    """The columns every kind shares for labeled row `row` (pos: its place among the readable rows)."""
    r = {c: "" for c in ISSUE_COLUMNS}
    r.update(path=paths[row], given_bracket=int(given_all[row]))
    if pos is not None:
        o, cl = analysis["ordinal"], analysis["cleanlab"]
        r.update(suggested_bracket=int(o["suggested"][pos]), quality_score=round(float(cl["quality"][pos]), 5),
                 ordinal_score=round(float(o["within1"][pos]), 5),
                 expected_distance=round(float(o["expected_distance"][pos]), 4),
                 argmax_bracket=int(cl["argmax"][pos]), outlier_score=round(float(analysis["outlier"][0][pos]), 5))
    return r


def issue_rows(paths, given_all, analysis, dups, test_dups, test_paths, test_given, skipped, rows) -> list[dict]:
    """Every issue, kind by kind, each kind sorted by severity (worst first)."""
    pos_of = {int(r): p for p, r in enumerate(rows)}
    o, cl = analysis["ordinal"], analysis["cleanlab"]
    out = []
    o_flag, c_flag = o["within1"] < ORDINAL_CUT, cl["flagged"]
    label = np.flatnonzero(o_flag | c_flag)
    # ordinal severity first (how far), then cleanlab's quality
    for p in label[np.lexsort((cl["quality"][label], -o["expected_distance"][label], o["within1"][label]))]:
        r = _base_row(paths, given_all, analysis, int(p), int(rows[p]))
        by = [name for name, f in (("ordinal", o_flag[p]), ("cleanlab", c_flag[p])) if f]
        r.update(kind="label_issue", flagged_by="+".join(by))
        out.append(r)
    scores, is_out = analysis["outlier"]
    for p in np.flatnonzero(is_out)[np.argsort(scores[is_out], kind="stable")]:
        r = _base_row(paths, given_all, analysis, int(p), int(rows[p]))
        r.update(kind="outlier", detail="far from its nearest neighbours in feature space")
        out.append(r)
    dup_rows = []
    for i, j, how in dups:
        r = _base_row(paths, given_all, analysis, pos_of.get(i), i)
        differ = int(given_all[i]) != int(given_all[j])
        r.update(kind="near_duplicate", other_path=paths[j], other_bracket=int(given_all[j]),
                 detail=f"{how}; " + ("different scores" if differ else "same bracket"))
        dup_rows.append((-abs(int(given_all[i]) - int(given_all[j])), how != "identical bytes", r))
    for i, j, how in test_dups:
        r = _base_row(paths, given_all, analysis, pos_of.get(i), i)
        r.update(kind="near_duplicate", other_path=test_paths[j], other_bracket=int(test_given[j]),
                 detail=f"{how}; the test image is a copy of this labeled image (test leak)")
        dup_rows.append((-100, how != "identical bytes", r))
    out += [r for *_, r in sorted(dup_rows, key=lambda t: (t[0], t[1]))]
    reasons = dict(skipped)
    for row in sorted(set(range(len(paths))) - set(pos_of)):
        r = _base_row(paths, given_all, analysis, None, row)
        r.update(kind="unreadable", detail=reasons.get(paths[row], "could not be read"))
        out.append(r)
    return out


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_issues(path: Path, issues: list[dict]) -> None:
    write_text_atomic(path, _csv_text(ISSUE_COLUMNS, issues))


SCORE_COLUMNS = ("path", "given_bracket", "suggested_bracket", "argmax_bracket", "quality_score", "ordinal_score",
                 "expected_distance", "outlier_score", "cleanlab_flag", "ordinal_flag", "outlier_flag",
                 *(f"p{k}" for k in range(NUM_BRACKETS)))


def write_scores(path: Path, paths: list[str], analysis) -> None:
    """scores.csv: every readable image's scores, flags and out-of-fold probabilities (p0-p10),
    for a cut of one's own (benchmarks/clean_recall.py reads it)."""
    o, cl, (ood, is_out) = analysis["ordinal"], analysis["cleanlab"], analysis["outlier"]
    rows = []
    for pos, row in enumerate(analysis["rows"].tolist()):
        rec = {"path": paths[row], "given_bracket": int(analysis["given"][pos]),
               "suggested_bracket": int(o["suggested"][pos]), "argmax_bracket": int(cl["argmax"][pos]),
               "quality_score": f"{cl['quality'][pos]:.6g}", "ordinal_score": f"{o['within1'][pos]:.6g}",
               "expected_distance": f"{o['expected_distance'][pos]:.6g}", "outlier_score": f"{ood[pos]:.6g}",
               "cleanlab_flag": int(cl["flagged"][pos]), "ordinal_flag": int(o["within1"][pos] < ORDINAL_CUT),
               "outlier_flag": int(is_out[pos])}
        rec.update({f"p{k}": f"{analysis['P'][pos, k]:.6g}" for k in range(NUM_BRACKETS)})
        rows.append(rec)
    write_text_atomic(path, _csv_text(SCORE_COLUMNS, rows))


def write_cleaned(path: Path, table, analysis, action: str) -> int:
    """cleaned.csv: path (absolute), score[, rater] of every readable row; flagged label issues
    dropped, relabelled to the suggested bracket (the OOF median) or kept. Returns its rows."""
    paths = [os.path.abspath(p) for p in table["path"]]
    scores = list(table["score"])
    raters = list(table["rater"]) if "rater" in table.column_names else None
    flagged = dict(zip(analysis["rows"].tolist(), analysis["flagged"].tolist()))
    suggested = dict(zip(analysis["rows"].tolist(), analysis["ordinal"]["suggested"].tolist()))
    out = []
    for row in analysis["rows"].tolist():
        score = scores[row]
        if flagged[row] and action == "drop":
            continue
        if flagged[row] and action == "relabel":
            score = float(suggested[row])
        rec = {"path": paths[row], "score": f"{float(score):g}"}
        if raters is not None:
            rec["rater"] = "" if raters[row] is None else raters[row]
        out.append(rec)
    header = ("path", "score", "rater") if raters is not None else ("path", "score")
    write_text_atomic(path, _csv_text(header, out))
    return len(out)


# --------------------------------------------------------------------------- review.html

_SECTIONS = (
    ("label_issue", "Label issues", "Given bracket → suggested (the out-of-fold median), worst first: least "
     "probability within one bracket of the label, then the largest expected distance. `flagged by` says which "
     "ranking flagged it (ordinal: P(|k − given| ≤ 1) < {cut}; cleanlab: find_label_issues)."),
    ("outlier", "Outliers", "Images far from their nearest neighbours in the backbone's feature space, most "
     "atypical first (cleanlab OutOfDistribution score; flagged where −log(score) is beyond Q3 + {z} IQR, "
     "Tukey's far-out fence)."),
    ("near_duplicate", "Near-duplicates", "Pairs side by side: the labeled image, then its copy (another labeled "
     "image, or a test image). Different scores and test leaks first."),
    ("unreadable", "Unreadable", "Skipped: not in the analysis, not in cleaned.csv."),
)

_PAGE = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""<!doctype html>
<html><head><meta charset='utf-8'><title>Label review</title>
<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}.note{color:#555}</style></head>
<body><h1>Label review</h1>
<p class='note'>backbone {{ s.backbone }}; {{ s.images }} images, {{ s.readable }} readable; {{ s.folds }} folds,
logistic regression C={{ s.C }}; --flag-by {{ s.flag_by }}, --action {{ s.action }}.</p>
<ul>{% for sec in sections %}<li><a href='#{{ sec.kind }}'>{{ sec.title }}</a>: {{ sec.total }}</li>{% endfor %}</ul>
{% for sec in sections %}
<h2 id='{{ sec.kind }}'>{{ sec.title }} ({{ sec.total }})</h2>
<p class='note'>{{ sec.caption }}{% if sec.total > sec.shown %} The first {{ sec.shown }} are shown; issues.csv has all.{% endif %}</p>
{% if sec.image %}<img src='{{ sec.image }}' alt='{{ sec.title }}'>{% endif %}
{% if sec.rows %}
<table><tr><th>#</th><th>file</th><th>given</th><th>suggested</th><th>quality</th><th>ordinal</th><th>flagged by</th><th>other</th><th>detail</th></tr>
{% for r in sec.rows %}<tr><td>{{ loop.index }}</td><td>{{ r.path }}</td><td>{{ r.given_bracket }}</td><td>{{ r.suggested_bracket }}</td><td>{{ r.quality_score }}</td><td>{{ r.ordinal_score }}</td><td>{{ r.flagged_by }}</td><td>{{ r.other_path }}{% if r.other_bracket != '' %} ({{ r.other_bracket }}){% endif %}</td><td>{{ r.detail }}</td></tr>
{% endfor %}</table>
{% endif %}
{% endfor %}
</body></html>
""")


def _caption(r: dict, pair_side: int | None = None) -> str:
    if r["kind"] == "near_duplicate":
        other = "test" if "test leak" in r["detail"] else "copy"
        return f"{r['given_bracket']}" if pair_side == 0 else f"{other} {r['other_bracket']}"
    if r["kind"] == "unreadable" or r["suggested_bracket"] == "":
        return f"{r['given_bracket']}"
    return f"{r['given_bracket']} -> {r['suggested_bracket']}"


def _section_image(rows: list[dict], kind: str) -> str | None:
    if not rows:
        return None
    tiles, caps = [], []
    for r in rows:
        if kind == "near_duplicate":
            tiles += [grids.tile(r["path"], THUMB, (235, 235, 235), whole=True),
                      grids.tile(r["other_path"], THUMB, (235, 235, 235), whole=True)]
            caps += [_caption(r, 0), _caption(r, 1)]
        else:
            tiles.append(grids.tile(r["path"], THUMB, (235, 235, 235), whole=True))
            caps.append(_caption(r))
    img = grids.sheet(tiles, 8, THUMB + 6, (255, 255, 255), captions=caps)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return grids.data_uri(buf.getvalue())


def write_review(path: Path, issues: list[dict], summary: dict) -> None:
    """review.html: one self-contained page, a grid and a table per kind (worst first)."""
    sections = []
    for kind, title, caption in _SECTIONS:
        rows = [r for r in issues if r["kind"] == kind]
        shown = rows[: REVIEW_SHOWN // 2 if kind == "near_duplicate" else REVIEW_SHOWN]
        sections.append({"kind": kind, "title": title, "total": len(rows), "shown": len(shown), "rows": shown,
                         "caption": caption.format(cut=ORDINAL_CUT, z=OUTLIER_IQR),
                         "image": _section_image(shown, kind)})
    write_text_atomic(path, _PAGE.render(s=summary, sections=sections))
