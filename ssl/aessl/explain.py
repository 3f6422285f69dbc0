"""Why this score? Interpretable measurements of every image, their importance for the human
labels and for a model's scores, and (on the synthetic set) a check against the generator's
known weights. `ssl/explain.py` is the command line.

    measurements   nine numbers per image, computed with scikit-image on the image as it is
                   (its longest side shrunk to --measure-size when larger): brightness, contrast,
                   saturation, colourfulness, hue diversity, sharpness, edge density, text-like
                   structure and foreground size (MEASURES says how each is computed). Cached
                   in a parquet file keyed by (real path, mtime, size, measure version, size cap),
                   so a second run over the same images measures nothing.
    targets        "human": the scored set's scores (one row per rating when the set has a rater
                   column); "model": the run's expected score (sum_b p_b * b) of each image,
                   scored through report.predict_probs (image- and embedding-mode runs alike).
    importance     a surrogate (--surrogate hgb: HistGradientBoostingRegressor; ridge: one-hot +
                   standardised RidgeCV) is fitted from the features to each target on a bootstrap
                   resample of the images and scored on the images it did not draw (out of bag):
                   permutation importance = the drop in out-of-bag R^2 when one feature is
                   shuffled. --bootstrap B resamples give the mean and a 95% percentile
                   interval; the draws are the same images for every target, so the difference
                   between the model's and the humans' importance *shares* (importance / sum over
                   features, which removes the targets' different noise levels) has a paired CI.
                   Partial dependence (sklearn.inspection) of the surrogate fitted on all images.
    truth          (--truth truth.parquet of a synthetic set) on the shaded images (true bracket
                   5-10), the same importance of the generator's five attributes and its
                   nuisance variables (NUISANCE_COLUMNS that vary), for three targets: the
                   generator's own score (the reference), the human labels and the model. The
                   attributes' importance ranking is compared with SHADED_WEIGHTS by Spearman
                   (with a bootstrap CI). The weights tie (palette = line_clean = detail = 0.20),
                   so a perfect ranking reaches Spearman 0.894, not 1 (`spearman_max`).

Writes OUT/summary.md, explain.json, importance.csv, images.csv, importance.png,
partial_dependence.png and, with --truth, truth_importance.png and truth_partial_dependence.png.
Bad input raises ExplainError naming the file or option and what to do.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import ndimage
from scipy.stats import kendalltau, spearmanr
from skimage import color, feature, filters, measure
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.impute import SimpleImputer
from sklearn.inspection import partial_dependence, permutation_importance
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import DataSourceError, LabeledSetError, load_scored_set, worker_init
from .export import resolve_device
from .fileio import write_atomic, write_bytes_atomic, write_text_atomic
from .images import UnreadableImage, load_image
from .metrics import expected_score
from .models import load_model_folder
from .report import ReportError, figure_png, open_run, predict_probs
from .synth import NUISANCE_COLUMNS, SHADED_WEIGHTS

log = logging.getLogger(__name__)

MEASURES = {
    "brightness": "mean luminance (skimage rgb2gray), 0-1",
    "contrast": "RMS contrast: standard deviation of the luminance, 0-0.5",
    "saturation": "mean HSV saturation, 0-1",
    "colourfulness": "Hasler & Suesstrunk M = sd(rg, yb) + 0.3 |mean(rg, yb)| on 0-255 RGB",
    "hue_diversity": "entropy of the 18-bin hue histogram weighted by saturation x value, / log 18: 0-1",
    "sharpness": "log10 variance of the Laplacian of the luminance",
    "edge_density": "share of pixels on Canny edges (sigma 1)",
    "text_structure": "share of the image covered by small glyph-like ink blobs (Sauvola binarisation, "
                      "connected components of 0.02%-1% of the area, aspect 1:5 to 5:1)",
    "foreground_size": "share of the image in the largest region that differs from the border colour "
                       "(Lab distance from the border's median, Otsu threshold, holes filled)",
}
MEASURE_VERSION = 1
SURROGATES = ("hgb", "ridge")
TARGETS = ("human", "model")
TRUTH_TARGETS = ("generator", "human", "model")
NEAR_ZERO_SHARE = 0.05  # a nuisance is "near zero" when its mean importance share is below this
PERM_REPEATS = 3
PD_GRID = 20


class ExplainError(ValueError):
    """A problem with explain's inputs, in one line that names the file or option."""


# --------------------------------------------------------------------------- measurements


def _colour_measures(rgb: np.ndarray) -> dict:
    hsv = color.rgb2hsv(rgb)
    gray = color.rgb2gray(rgb)
    r, g, b = (rgb[..., k] * 255.0 for k in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    colourful = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    weight = (hsv[..., 1] * hsv[..., 2]).ravel()
    hist, _ = np.histogram(hsv[..., 0].ravel(), bins=18, range=(0.0, 1.0), weights=weight)
    p = hist[hist > 0] / hist.sum() if hist.sum() > 1e-9 else np.array([1.0])
    return {"brightness": float(gray.mean()), "contrast": float(gray.std()), "saturation": float(hsv[..., 1].mean()),
            "colourfulness": float(colourful), "hue_diversity": float(-(p * np.log(p)).sum() / math.log(18))}


def _text_structure(gray: np.ndarray) -> float:
    """Share of the area in small glyph-like components of the ink (dark or light, whichever
    is the minority after Sauvola binarisation)."""
    window = max(3, (min(gray.shape) // 8) | 1)
    ink = gray < filters.threshold_sauvola(gray, window_size=window)
    if ink.mean() > 0.5:
        ink = ~ink
    area = gray.size
    covered = 0
    for region in measure.regionprops(measure.label(ink, connectivity=2)):
        h, w = region.bbox[2] - region.bbox[0], region.bbox[3] - region.bbox[1]
        if 0.0002 * area <= region.area <= 0.01 * area and 0.2 <= h / max(w, 1) <= 5 and region.extent > 0.2:
            covered += region.area
    return covered / area


def _foreground_size(rgb: np.ndarray) -> float:
    lab = color.rgb2lab(rgb)
    b = max(1, min(rgb.shape[:2]) // 25)
    border = np.concatenate([lab[:b].reshape(-1, 3), lab[-b:].reshape(-1, 3), lab[:, :b].reshape(-1, 3),
                             lab[:, -b:].reshape(-1, 3)])
    dist = np.linalg.norm(lab - np.median(border, axis=0), axis=-1)
    if dist.max() - dist.min() < 1e-6:
        return 0.0
    mask = ndimage.binary_fill_holes(dist > max(filters.threshold_otsu(dist), 10.0))
    labels = measure.label(mask, connectivity=2)
    if labels.max() == 0:
        return 0.0
    return float(np.bincount(labels.ravel())[1:].max() / mask.size)


def measure_array(rgb: np.ndarray) -> dict:
    """Every MEASURES value of one RGB image (H x W x 3, float 0-1)."""
    gray = color.rgb2gray(rgb)
    out = _colour_measures(rgb)
    out["sharpness"] = float(np.log10(filters.laplace(gray).var() + 1e-8))
    out["edge_density"] = float(feature.canny(gray, sigma=1.0).mean())
    out["text_structure"] = float(_text_structure(gray))
    out["foreground_size"] = _foreground_size(rgb)
    return out


class MeasureDataset(Dataset):
    """One image per item: its measurements, or NaNs and the reason it could not be read."""

    def __init__(self, paths: list[str], max_side: int):
        self.paths, self.max_side = paths, int(max_side)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = load_image(self.paths[i], draft_size=self.max_side)
            if max(img.size) > self.max_side:
                img.thumbnail((self.max_side, self.max_side))
            values, reason = measure_array(np.asarray(img, dtype=np.float64) / 255.0), ""
        except UnreadableImage as exc:
            values, reason = {k: float("nan") for k in MEASURES}, exc.reason
        return {"index": int(i), "reason": reason, **values}


def _file_keys(paths: list[str]) -> pd.DataFrame:
    rows = []
    for p in paths:
        try:
            st = os.stat(p)
            rows.append((p, int(st.st_mtime_ns), int(st.st_size)))
        except OSError:
            rows.append((p, -1, -1))
    return pd.DataFrame(rows, columns=["path", "mtime_ns", "size"])


def _read_cache(cache: Path, max_side: int) -> pd.DataFrame | None:
    if not cache.is_file():
        return None
    try:
        old = pd.read_parquet(cache)
    except Exception as exc:  # a broken cache is rebuilt, not fatal
        log.warning("%s: unreadable measurement cache, measuring again (%s)", cache, exc)
        return None
    need = {"path", "mtime_ns", "size", "version", "max_side", *MEASURES}
    if not need <= set(old.columns):
        return None
    return old[(old["version"] == MEASURE_VERSION) & (old["max_side"] == max_side)]


def measure_images(paths: list[str], cache: Path, workers: int = 0, max_side: int = 256,
                   progress: bool = True) -> pd.DataFrame:
    """MEASURES of every path (one row each, in order, plus `reason`: '' or why it could not
    be read), reusing the rows of `cache` whose file is unchanged; the cache is rewritten
    with the union."""
    keys = _file_keys(paths)
    old = _read_cache(cache, max_side)
    merged = keys.merge(old.drop_duplicates(["path", "mtime_ns", "size"]), on=["path", "mtime_ns", "size"],
                        how="left") if old is not None else keys.assign(reason=None)
    todo = [i for i, r in enumerate(merged["reason"]) if not isinstance(r, str)]
    if todo:
        loader = DataLoader(MeasureDataset([paths[i] for i in todo], max_side), batch_size=None, shuffle=False,
                            num_workers=int(workers), worker_init_fn=worker_init if workers else None)
        got = [item for item in tqdm(loader, total=len(todo), desc="measure", disable=not progress,
                                     dynamic_ncols=True)]
        fresh = pd.DataFrame(got).sort_values("index")
        for col in ("reason", *MEASURES):
            merged.loc[todo, col] = fresh[col].to_numpy()
    merged["version"], merged["max_side"] = MEASURE_VERSION, int(max_side)
    keep = merged if old is None else pd.concat([old[~old["path"].isin(merged["path"])], merged])
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache, lambda tmp: keep.to_parquet(tmp, index=False))
    log.info("measured %d image(s), %d from the cache %s", len(todo), len(paths) - len(todo), cache)
    return merged[["path", "reason", *MEASURES]].reset_index(drop=True)


# --------------------------------------------------------------------------- scoring


def model_scores(model: str | Path, paths: list[str], batch_size: int, workers: int, device,
                 progress: bool = True) -> tuple[np.ndarray, dict]:
    """Expected score (0-10) of every path under the run or model folder `model`, and the
    model's run name and config."""
    try:
        run = open_run(model)
    except ReportError as exc:
        raise ExplainError(f"--model {model}: {exc}") from None
    try:
        net, info = load_model_folder(run.model_dir, device=device)
    except Exception as exc:
        raise ExplainError(f"--model {run.model_dir}: cannot load the model: {type(exc).__name__}: {exc}") from None
    table = datasets.Dataset.from_dict({"path": list(paths)})
    probs, ok, reasons = predict_probs(net, info, table, batch_size, workers, device, desc=f"score {run.name}",
                                       progress=progress)
    if not ok.all():
        bad = [f"{paths[i]}: {reasons[i]}" for i in np.flatnonzero(~ok)]
        raise ExplainError(f"{len(bad)} image(s) could not be scored: " + "; ".join(bad[:5]))
    return expected_score(probs), {"name": run.name, "model_dir": str(run.model_dir), **info}


# --------------------------------------------------------------------------- importance


def design_matrix(X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(float matrix, mask of categorical columns): pandas categories become their codes
    (NaN where missing), so the surrogates see plain numpy arrays (fast to predict)."""
    cat = np.array([isinstance(X[c].dtype, pd.CategoricalDtype) for c in X.columns])
    cols = [np.where(X[c].cat.codes < 0, np.nan, X[c].cat.codes) if m else X[c].to_numpy(float)
            for c, m in zip(X.columns, cat)]
    return np.column_stack(cols).astype(float), cat


def make_surrogate(kind: str, cat: np.ndarray, seed: int = 0):
    """An unfitted regressor from a design matrix (categorical columns by `cat`) to a score."""
    if kind == "hgb":
        return HistGradientBoostingRegressor(max_iter=100, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=10,
                                             l2_regularization=1.0, categorical_features=cat if cat.any() else None,
                                             early_stopping=False, random_state=seed)
    if kind == "ridge":
        nums, cats = np.flatnonzero(~cat), np.flatnonzero(cat)
        num = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler())
        cat_enc = make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore"))
        pre = ColumnTransformer([("num", num, nums), ("cat", cat_enc, cats)])
        return Pipeline([("pre", pre), ("ridge", RidgeCV(alphas=np.logspace(-3, 4, 15)))])
    raise ExplainError(f"--surrogate {kind!r}: choose one of {', '.join(SURROGATES)}")


def bootstrap_draws(n_groups: int, n: int, seed: int) -> list[np.ndarray]:
    """n bootstrap resamples of the images: how many times each image is drawn."""
    rng = np.random.default_rng([int(seed), 7041])
    return [np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups) for _ in range(int(n))]


def bootstrap_importance(X: pd.DataFrame, y: np.ndarray, groups: np.ndarray, draws: list[np.ndarray], kind: str,
                         seed: int = 0) -> dict:
    """Permutation importance (drop in out-of-bag R^2) of every column, per resample.
    `groups[i]` is row i's image: a resample draws images, with all their rows; rows of
    undrawn images are the out-of-bag rows. Returns {'importance': B x F, 'r2': B}."""
    A, cat = design_matrix(X)
    imps, r2s = [], []
    for b, counts in enumerate(draws):
        inbag = np.repeat(np.arange(len(y)), counts[groups])
        oob = np.flatnonzero(counts[groups] == 0)
        if len(oob) < 5 or np.ptp(y[oob]) == 0:
            continue
        est = make_surrogate(kind, cat, seed).fit(A[inbag], y[inbag])
        r2s.append(r2_score(y[oob], est.predict(A[oob])))
        res = permutation_importance(est, A[oob], y[oob], n_repeats=PERM_REPEATS, random_state=seed + b,
                                     scoring="r2")
        imps.append(res.importances_mean)
    if not imps:
        raise ExplainError("too few images for a bootstrap: no resample left enough images out of the bag; "
                           "give a larger --data set")
    return {"importance": np.array(imps), "r2": np.array(r2s)}


def _interval(a: np.ndarray) -> tuple[float, float, float]:
    lo, hi = np.percentile(a, [2.5, 97.5]) if len(a) > 1 else (a[0], a[0])
    return float(np.mean(a)), float(lo), float(hi)


def shares(imp: np.ndarray) -> np.ndarray:
    """Each resample's importances as shares of their sum (negative ones counted as 0)."""
    pos = np.clip(imp, 0, None)
    return pos / np.maximum(pos.sum(axis=1, keepdims=True), 1e-12)


def summarise(features: list[str], boot: dict) -> list[dict]:
    """One row per feature: mean importance and share with 95% intervals, and its rank (1 = most)."""
    imp, sh = boot["importance"], shares(boot["importance"])
    order = (-imp.mean(axis=0)).argsort(kind="stable")
    rank = np.empty(len(features), dtype=int)
    rank[order] = np.arange(1, len(features) + 1)
    rows = []
    for j, f in enumerate(features):
        m, lo, hi = _interval(imp[:, j])
        s, slo, shi = _interval(sh[:, j])
        rows.append({"feature": f, "importance": m, "ci_low": lo, "ci_high": hi, "share": s, "share_low": slo,
                     "share_high": shi, "rank": int(rank[j])})
    return rows


def share_differences(features: list[str], a: dict, b: dict) -> list[dict]:
    """Share in b minus share in a, per feature, paired over the resamples both kept."""
    n = min(len(a["importance"]), len(b["importance"]))
    diff = shares(b["importance"][:n]) - shares(a["importance"][:n])
    rows = []
    for j, f in enumerate(features):
        m, lo, hi = _interval(diff[:, j])
        rows.append({"feature": f, "difference": m, "ci_low": lo, "ci_high": hi, "differs": bool(lo > 0 or hi < 0)})
    return rows


def pd_curves(X: pd.DataFrame, y: np.ndarray, kind: str, features: list[str], seed: int = 0) -> dict:
    """Partial dependence of the surrogate fitted on every row: {feature: (grid, average)}."""
    A, cat = design_matrix(X)
    est = make_surrogate(kind, cat, seed).fit(A, y)
    out = {}
    for f in features:
        if X[f].nunique() < 2:
            continue
        res = partial_dependence(est, A, [list(X.columns).index(f)], grid_resolution=PD_GRID,
                                 percentiles=(0.05, 0.95), kind="average", method="brute")  # brute: in score units
        out[f] = (np.asarray(res["grid_values"][0], dtype=float), np.asarray(res["average"][0], dtype=float))
    return out


def explain_targets(X: pd.DataFrame, targets: dict[str, tuple[np.ndarray, np.ndarray]], n_groups: int, kind: str,
                    bootstrap: int, seed: int) -> dict:
    """Importance, intervals and partial dependence of X's columns for every target
    {name: (y per row, image index per row)}, on the same resampled images."""
    draws = bootstrap_draws(n_groups, bootstrap, seed)
    feats = list(X.columns)
    res = {}
    for name, (y, groups) in targets.items():
        rows = np.asarray(groups)
        boot = bootstrap_importance(X.iloc[rows].reset_index(drop=True), np.asarray(y, float), rows, draws, kind, seed)
        num = [f for f in feats if not isinstance(X[f].dtype, pd.CategoricalDtype)]
        res[name] = {"boot": boot, "rows": summarise(feats, boot), "r2": _interval(boot["r2"]),
                     "pd": pd_curves(X.iloc[rows].reset_index(drop=True), np.asarray(y, float), kind, num, seed)}
    return res


# --------------------------------------------------------------------------- truth


def load_truth_table(path: str | Path) -> pd.DataFrame:
    """truth.parquet indexed by each image's real path (paths in the file are relative to its folder)."""
    path = Path(path)
    if not path.is_file():
        raise ExplainError(f"--truth {path}: no such file (a synthetic set's truth.parquet)")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise ExplainError(f"--truth {path}: cannot read it as parquet ({type(exc).__name__}: {exc})") from None
    need = ["path", "bracket", "score", *SHADED_WEIGHTS]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ExplainError(f"--truth {path}: missing column(s) {missing}; a synthetic set's truth.parquet "
                           f"(ssl/synth.py) has them")
    base = path.parent
    df.index = [os.path.realpath(p if os.path.isabs(p) else base / p) for p in df["path"]]
    return df


# How the generator draws `composition` (synth/character.py _placement): bad composition moves
# the figure off-centre, shrinks or crops it and tilts it, plus a small jitter. These columns are
# the *rendered* placement, so a model that reads composition from the pixels reads them; as
# features they would take composition's credit. They are left out: composition stands for them.
COMPOSITION_RENDERING = ("center_x", "center_y", "scale", "tilt")


def truth_features(truth: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str]]:
    """(frame of the five attributes and every nuisance that varies, attributes, nuisances).
    Strings become categories, booleans 0/1. The placement columns are composition's
    rendering, not nuisances (COMPOSITION_RENDERING)."""
    attrs = list(SHADED_WEIGHTS)
    cols = {a: truth[a].astype(float).to_numpy() for a in attrs}
    nuis = []
    for name, typ in NUISANCE_COLUMNS:
        if name in COMPOSITION_RENDERING:
            continue
        if name not in truth.columns or truth[name].nunique(dropna=True) < 2:
            continue
        v = truth[name]
        cols[name] = (pd.Categorical(v.astype(str)) if typ == "str" else v.astype(float).to_numpy())
        nuis.append(name)
    return pd.DataFrame(cols), attrs, nuis


def ranking_check(rows: list[dict], boot: dict, attrs: list[str]) -> dict:
    """Spearman (and Kendall's tau-b) between the attributes' mean importance and their true
    weights, a 95% interval over the resamples, and the most a tie-respecting ranking can reach."""
    weights = np.array([SHADED_WEIGHTS[a] for a in attrs])
    by = {r["feature"]: r["importance"] for r in rows}
    imp = np.array([by[a] for a in attrs])
    idx = [next(j for j, r in enumerate(rows) if r["feature"] == a) for a in attrs]
    per = [spearmanr(b[idx], weights).statistic for b in boot["importance"]]
    best = spearmanr(weights + np.arange(len(weights)) * 1e-9, weights).statistic
    s, lo, hi = _interval(np.nan_to_num(np.array(per)))
    return {"spearman": float(spearmanr(imp, weights).statistic), "spearman_boot_mean": s, "ci_low": lo,
            "ci_high": hi, "kendall_tau_b": float(kendalltau(imp, weights).statistic), "spearman_max": float(best),
            "order": [a for _, a in sorted(zip(-imp, attrs))],
            "true_order": sorted(attrs, key=lambda a: -SHADED_WEIGHTS[a])}


def nuisance_check(rows: list[dict], nuisances: list[str]) -> dict:
    by = {r["feature"]: r for r in rows}
    worst = max((by[n]["share"] for n in nuisances), default=0.0)
    return {"max_share": worst, "near_zero": bool(worst < NEAR_ZERO_SHARE), "threshold": NEAR_ZERO_SHARE,
            "per_nuisance": {n: {k: by[n][k] for k in ("importance", "ci_low", "ci_high", "share")} for n in nuisances}}


def check_truth_overlap(truth: pd.DataFrame, img_paths: list[str], truth_file) -> list[bool]:
    """Which images the truth table holds; an error when it holds none of them."""
    found = [p in truth.index for p in img_paths]
    if not any(found):
        raise ExplainError(f"--truth {truth_file}: none of the scored set's images is in it (e.g. {img_paths[0]}); "
                           "give the truth.parquet of the set the images come from")
    return found


def truth_analysis(truth: pd.DataFrame, img_paths: list[str], human: tuple[np.ndarray, np.ndarray],
                   model: np.ndarray, kind: str, bootstrap: int, seed: int, truth_file: str) -> dict:
    """The attributes' and nuisances' importance for the generator's score, the human labels
    and the model on the shaded images (true bracket 5-10) of the scored set."""
    found = check_truth_overlap(truth, img_paths, truth_file)
    keep = np.array([f and int(truth.at[p, "bracket"]) >= 5 for p, f in zip(img_paths, found)])
    if keep.sum() < 20:
        raise ExplainError(f"--truth {truth_file}: only {int(keep.sum())} scored image(s) are shaded (true bracket "
                           "5-10); the check needs at least 20")
    sel = np.flatnonzero(keep)
    sub = truth.loc[[img_paths[i] for i in sel]].reset_index(drop=True)
    X, attrs, nuis = truth_features(sub)
    remap = np.full(len(img_paths), -1)
    remap[sel] = np.arange(len(sel))
    hy, hg = human
    hmask = remap[hg] >= 0
    targets = {"generator": (sub["score"].to_numpy(float), np.arange(len(sel))),
               "human": (hy[hmask], remap[hg[hmask]]), "model": (model[sel], np.arange(len(sel)))}
    res = explain_targets(X, targets, len(sel), kind, bootstrap, seed)
    for name in TRUTH_TARGETS:
        res[name]["ranking"] = ranking_check(res[name]["rows"], res[name]["boot"], attrs)
        res[name]["nuisance"] = nuisance_check(res[name]["rows"], nuis)
    diffs = {f"{b}-{a}": share_differences(list(X.columns), res[a]["boot"], res[b]["boot"])
             for a, b in (("human", "model"), ("generator", "model"), ("generator", "human"))}
    return {"images": int(len(sel)), "missing": int(len(found) - sum(found)), "attributes": attrs,
            "nuisances": nuis, "targets": res, "differences": diffs}


# --------------------------------------------------------------------------- plots

COLOURS = {"generator": "#555555", "human": "#1f77b4", "model": "#d62728"}


def plot_importance(features: list[str], res: dict, title: str, weights: dict | None = None) -> Figure:
    """Importance shares with 95% intervals, one bar per target and feature; the true weights'
    shares as black diamonds where given."""
    names = list(res)
    height = 1.2 + 0.42 * len(features) * max(1, len(names) / 2)
    fig = Figure(figsize=(7.5, height), dpi=100)
    fig.subplots_adjust(left=0.2, right=0.97, top=1 - 0.45 / height, bottom=0.65 / height)
    ax = fig.add_subplot()
    h = 0.8 / len(names)
    y = np.arange(len(features))[::-1]
    for k, name in enumerate(names):
        rows = {r["feature"]: r for r in res[name]["rows"]}
        m = np.array([rows[f]["share"] for f in features])
        err = np.array([[m[j] - rows[f]["share_low"], rows[f]["share_high"] - m[j]] for j, f in enumerate(features)]).T
        r2 = res[name]["r2"][0]
        ax.barh(y + 0.4 - h * (k + 0.5), m, h, xerr=np.clip(err, 0, None), color=COLOURS.get(name, "#2ca02c"),
                capsize=2, label=f"{name} (surrogate R² {r2:.2f})")
    if weights:
        total = sum(weights.values())
        wy = [y[j] for j, f in enumerate(features) if f in weights]
        ax.scatter([weights[f] / total for f in features if f in weights], wy, marker="D", color="black", zorder=3,
                   label="true weight share")
    ax.set_yticks(y, features)
    ax.set_xlabel("share of permutation importance (out-of-bag R² drop; 95% bootstrap CI)")
    ax.set_title(title)
    ax.legend(loc="lower right", frameon=False, fontsize=9)
    return fig


def plot_partial_dependence(features: list[str], res: dict, title: str) -> Figure | None:
    feats = [f for f in features if any(f in res[n]["pd"] for n in res)]
    if not feats:
        return None
    cols = 3
    rows = math.ceil(len(feats) / cols)
    fig = Figure(figsize=(12, 3.0 * rows + 0.6), dpi=100)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.3 / rows, top=1 - 0.6 / (3 * rows), hspace=0.5, wspace=0.25)
    for i, f in enumerate(feats):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name in res:
            if f in res[name]["pd"]:
                grid, avg = res[name]["pd"][f]
                ax.plot(grid, avg, color=COLOURS.get(name, "#2ca02c"), lw=2, label=name)
        ax.set_title(f, fontsize=11)
        if i % cols == 0:
            ax.set_ylabel("score (partial dependence)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(frameon=False, fontsize=9)
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- outputs


def _json_safe(v):
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return _json_safe(v.tolist())
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


def _public(res: dict) -> dict:
    """A target's results without the raw resamples and curves (what explain.json keeps)."""
    out = {k: v for k, v in res.items() if k not in ("boot", "pd")}
    out["r2"] = dict(zip(("mean", "ci_low", "ci_high"), res["r2"]))
    out["resamples"] = int(len(res["boot"]["importance"]))
    out["partial_dependence"] = {f: {"grid": g, "average": a} for f, (g, a) in res["pd"].items()}
    return out


def importance_table(measured: dict, truth: dict | None) -> pd.DataFrame:
    frames = []
    for set_name, res, kinds in (("measurements", measured, None), ("truth", truth and truth["targets"], truth)):
        if not res:
            continue
        for target, r in res.items():
            f = pd.DataFrame(r["rows"]).assign(feature_set=set_name, target=target, surrogate_r2=r["r2"][0])
            if kinds:
                f["kind"] = ["attribute" if x in kinds["attributes"] else "nuisance" for x in f["feature"]]
            else:
                f["kind"] = "measurement"
            frames.append(f)
    cols = ["feature_set", "target", "feature", "kind", "importance", "ci_low", "ci_high", "share", "share_low",
            "share_high", "rank", "surrogate_r2"]
    return pd.concat(frames)[cols]


def _f(v, d: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"


def _share_cell(r: dict) -> str:
    return f"{_f(r['share'])} [{_f(r['share_low'])}, {_f(r['share_high'])}]"


def _measure_md(s: dict) -> list[str]:
    m = s["measurements"]
    h, mo = ({r["feature"]: r for r in m["targets"][t]["rows"]} for t in TARGETS)
    d = {r["feature"]: r for r in m["differences"]}
    lines = ["## Interpretable measurements", "",
             f"Surrogate R² out of bag: human {_f(m['targets']['human']['r2']['mean'])}, "
             f"model {_f(m['targets']['model']['r2']['mean'])}. Shares of permutation importance, 95% bootstrap "
             "intervals; *differs*: the paired interval of model − human excludes 0.", "",
             "| measurement | human share | model share | model − human | differs |", "|---|---|---|---|---|"]
    for f in sorted(MEASURES, key=lambda f: -mo[f]["share"]):
        lines.append(f"| {f} | {_share_cell(h[f])} | {_share_cell(mo[f])} | {_f(d[f]['difference'])} "
                     f"[{_f(d[f]['ci_low'])}, {_f(d[f]['ci_high'])}] | {'yes' if d[f]['differs'] else ''} |")
    return lines + ["", *[f"- **{k}**: {v}" for k, v in MEASURES.items()], ""]


def _truth_md(t: dict) -> list[str]:
    res = t["targets"]
    by = {n: {r["feature"]: r for r in res[n]["rows"]} for n in TRUTH_TARGETS}
    lines = ["## Check against the generator (shaded images, true bracket 5-10)", "",
             f"{t['images']} shaded images. Surrogate R² out of bag: "
             + ", ".join(f"{n} {_f(res[n]['r2']['mean'])}" for n in TRUTH_TARGETS) + ".", "",
             "| feature | true weight | generator share | human share | model share |", "|---|---|---|---|---|"]
    for f in t["attributes"] + t["nuisances"]:
        w = _f(SHADED_WEIGHTS[f], 2) if f in SHADED_WEIGHTS else "0 (nuisance)"
        lines.append(f"| {f} | {w} | " + " | ".join(_share_cell(by[n][f]) for n in TRUTH_TARGETS) + " |")
    lines += ["", "| target | Spearman vs true weights | 95% interval | Kendall τ-b | order found | "
                  "largest nuisance share | nuisances near zero |", "|---|---|---|---|---|---|---|"]
    for n in TRUTH_TARGETS:
        r, q = res[n]["ranking"], res[n]["nuisance"]
        lines.append(f"| {n} | {_f(r['spearman'])} | [{_f(r['ci_low'])}, {_f(r['ci_high'])}] | "
                     f"{_f(r['kendall_tau_b'])} | {' > '.join(r['order'])} | {_f(q['max_share'])} | "
                     f"{'yes' if q['near_zero'] else 'no'} |")
    first = res["model"]["ranking"]
    lines += ["", f"True order: {' > '.join(first['true_order'])} (palette = line_clean = detail tie, so a "
                  f"perfect ranking scores Spearman {_f(first['spearman_max'])}). Near zero: share < "
                  f"{NEAR_ZERO_SHARE}.", ""]
    diff = [r for r in t["differences"]["model-human"] if r["differs"]]
    lines.append("Where the model's and the humans' explanations differ (paired interval excludes 0): "
                 + (", ".join(f"{r['feature']} ({r['difference']:+.3f})" for r in diff) if diff else "nowhere") + ".")
    return lines + [""]


def summary_markdown(s: dict) -> str:
    m = s["model"]
    lines = ["# Why this score?", "",
             f"Model `{m['name']}` ({m.get('mode', 'image')} mode, {m.get('architecture')}, {m.get('image_size')} px, "
             f"target {m.get('target', 'classification')}); data `{s['data']}`: {s['images']} images, "
             f"{s['ratings']} scores. Surrogate `{s['surrogate']}`, {s['bootstrap']} bootstrap resamples, "
             f"seed {s['seed']}.", ""]
    lines += _measure_md(s)
    if s.get("truth"):
        lines += _truth_md(s["truth"])
    return "\n".join(lines)


def write_outputs(out: Path, summary: dict, measured: dict, truth: dict | None, images: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figs = {"importance.png": plot_importance(list(MEASURES), measured, "measurements: what each score leans on"),
            "partial_dependence.png": plot_partial_dependence(list(MEASURES), measured, "partial dependence")}
    if truth:
        feats = truth["attributes"] + truth["nuisances"]
        figs["truth_importance.png"] = plot_importance(feats, truth["targets"], "shaded images: attributes and "
                                                       "nuisances", SHADED_WEIGHTS)
        figs["truth_partial_dependence.png"] = plot_partial_dependence(truth["attributes"], truth["targets"],
                                                                       "attributes: partial dependence")
    for name, fig in figs.items():
        if fig is not None:
            write_bytes_atomic(out / name, figure_png(fig))
    table = importance_table(measured, truth)
    write_text_atomic(out / "importance.csv", table.to_csv(index=False, float_format="%.6g"))
    write_text_atomic(out / "images.csv", images.to_csv(index=False, float_format="%.6g"))
    write_text_atomic(out / "explain.json", json.dumps(_json_safe(summary), indent=1))
    write_text_atomic(out / "summary.md", summary_markdown(summary))


# --------------------------------------------------------------------------- the pass


@dataclass
class ExplainResult:
    out: Path
    summary: dict
    seconds: float


def _check_options(out: Path, surrogate: str, bootstrap: int, measure_size: int) -> None:
    if surrogate not in SURROGATES:
        raise ExplainError(f"--surrogate {surrogate!r}: choose one of {', '.join(SURROGATES)}")
    if int(bootstrap) < 2:
        raise ExplainError(f"--bootstrap {bootstrap}: needs at least 2 resamples for an interval")
    if int(measure_size) < 16:
        raise ExplainError(f"--measure-size {measure_size}: at least 16 pixels")
    if out.exists() and not out.is_dir():
        raise ExplainError(f"--out {out}: exists and is not a folder")


def load_human(data) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """(unique real image paths, score per row, image index per row, rows) of a scored set."""
    table = load_scored_set(data)
    real = [os.path.realpath(p) for p in table["path"]]
    index: dict[str, int] = {}
    groups = np.array([index.setdefault(p, len(index)) for p in real])
    if len(index) < 10:
        raise ExplainError(f"--data {data}: {len(index)} image(s); importance needs at least 10")
    return list(index), np.asarray(table["score"], dtype=float), groups, len(real)


def run_explain(model, data, out, truth=None, cache=None, workers: int = 0, batch_size: int = 64, device=None,
                bootstrap: int = 30, surrogate: str = "hgb", measure_size: int = 256, seed: int = 0,
                progress: bool = True) -> ExplainResult:
    """Measure, score and explain `data` with the run or model folder `model` (see the module
    docstring); everything is written into `out`."""
    t0 = time.time()
    out = Path(out)
    _check_options(out, surrogate, bootstrap, measure_size)
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise ExplainError(str(exc)) from None
    paths, hy, hg, n_rows = load_human(data)
    truth_df = load_truth_table(truth) if truth else None
    if truth_df is not None:
        check_truth_overlap(truth_df, paths, truth)
    scores, info = model_scores(model, paths, batch_size, workers, dev, progress)
    meas = measure_images(paths, Path(cache) if cache else out / "measurements.parquet", workers, measure_size,
                          progress)
    bad = meas["reason"].astype(str).str.len() > 0
    if bad.any():
        raise ExplainError(f"{int(bad.sum())} image(s) could not be measured, e.g. {meas['path'][bad.idxmax()]}: "
                           f"{meas['reason'][bad.idxmax()]}")
    X = meas[list(MEASURES)].astype(float)
    measured = explain_targets(X, {"human": (hy, hg), "model": (scores, np.arange(len(paths)))}, len(paths),
                               surrogate, bootstrap, seed)
    truth_res = (truth_analysis(truth_df, paths, (hy, hg), scores, surrogate, bootstrap, seed, str(truth))
                 if truth_df is not None else None)
    human_mean = np.bincount(hg, weights=hy, minlength=len(paths)) / np.bincount(hg, minlength=len(paths))
    images = pd.DataFrame({"path": paths, "human_score": human_mean, "model_score": scores}).join(X)
    summary = _summary_dict(info, data, paths, n_rows, surrogate, bootstrap, seed, measured, truth_res, truth)
    write_outputs(out, summary, measured, truth_res, images)
    summary["seconds"] = round(time.time() - t0, 1)
    return ExplainResult(out, summary, summary["seconds"])


def _summary_dict(info, data, paths, n_rows, surrogate, bootstrap, seed, measured, truth_res, truth) -> dict:
    model = {k: info.get(k) for k in ("name", "model_dir", "architecture", "image_size")}
    model.update(mode=info.get("mode", "image"), target=info.get("target", "classification"))
    s = {"model": model, "data": str(data), "images": len(paths), "ratings": int(n_rows), "surrogate": surrogate,
         "bootstrap": int(bootstrap), "seed": int(seed), "measures": MEASURES,
         "measurements": {"targets": {t: _public(r) for t, r in measured.items()},
                          "differences": share_differences(list(MEASURES), measured["human"]["boot"],
                                                           measured["model"]["boot"])}}
    if truth_res is not None:
        s["truth"] = {**{k: v for k, v in truth_res.items() if k != "targets"}, "file": str(truth),
                      "true_weights": SHADED_WEIGHTS,
                      "targets": {t: _public(r) for t, r in truth_res["targets"].items()}}
    return s


USER_ERRORS = (ExplainError, LabeledSetError, DataSourceError)
