"""Evaluation reports: score a scored set (and optionally an unlabeled pool) with one or more
trained models, compute every metric of the report (metrics.py), draw the plots and write one self-contained
`report.html` next to `metrics.json`, the PNGs and the raw predictions.

Pieces, each usable alone:
- `open_run(path)`: a run folder or a bare `model/` folder -> `RunInput` (model config,
  training curves from metrics.jsonl, run.json, split);
- `predict_probs(model, info, table)`: bracket probabilities (aessl/targets.py) of every row of a table
  (an `EvalDataset` through a `DataLoader`), with the rows that could not be read; with
  `tiles=TileSettings(n, reduce, scale)` each row is scored as n tile views and reduced
  (aessl/tiles.py; `predict_tile_probs` gives the per-tile probabilities unreduced);
- `calibration(probs, true_bracket)`: reliability bins and expected calibration error;
- `plot_*`: matplotlib figures (Agg, no pyplot state);
- `build_report(...)`: all of the above, written into one folder.
- `render_html(report, images, grids)`: the page, from templates/report.html.j2 (Jinja2,
  autoescaped).

The run folder's files are read through `aessl.runfolder`, which owns their format.

Conventions are those of `aessl.metrics`: predicted bracket = argmax, expected score =
sum_b p_b * b, percent = expected score * 10, confidence = max probability.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # no pyplot: no global state, Agg when saved
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import confusion_matrix
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import corrections, grids, runfolder
from .data import (MANIFEST_SUFFIXES, DataSourceError, EvalDataset, LabeledSetError, load_pool, load_scored_set,
                   read_manifest, row_name, row_source, scan_labeled_folder, worker_init)
from .export import resolve_device
from .fileio import write_bytes_atomic
from .models import load_model_folder, resolve_model_folder
from .saliency import METHOD as SALIENCY_METHOD, SaliencyOptions, overlay_tile, saliency_maps
from .scoring import bracket_probs, resolve_precision
from .targets import target_of
from .tiles import TiledEvalDataset, TileSettings, flatten_tiles, reduce_tiles
from .transforms import eval_transform
from .metrics import (BRACKETS, DEFAULT_THRESHOLD, HIGH_SCORE_MIN, LOW_BRACKET_MAX, NUM_BRACKETS, bracket_of, compute_metrics,
                      accepted_by_threshold, confidence, default_top_k, expected_score,
                      pseudo_label_quality)

log = logging.getLogger(__name__)

CALIBRATION_BINS = 10
THUMB_PX = 192  # grid cell; 24, 32, 48, 64 and 96 px images upscale to it by a whole factor

# (key in the run's metrics, label in the table, which way is better: "low", "high" or None)
TABLE_ROWS = [
    ("mae", "MAE (brackets)", "low"),
    ("qwk", "quadratic-weighted kappa", "high"),
    ("spearman", "Spearman ρ", "high"),
    ("accuracy", "accuracy (exact bracket)", "high"),
    ("accuracy_within_1", "accuracy ±1 bracket", "high"),
    ("false_positive_rate", "false-positive rate (true ≤ 1 scored ≥ 50%)", "low"),
    ("top_k_precision", "top-K precision", "high"),
    ("ece", "expected calibration error", "low"),
] + [(f"recall_{b}", f"recall, bracket {b}", "high") for b in BRACKETS] + [
    ("skipped_images", "unreadable images skipped in training", None),
]
CURVE_KEYS = ("qwk", "mae", "spearman", "false_positive_rate", "accuracy", "accuracy_within_1", "top_k_precision",
              "pseudo_label_rate", "sup_loss", "unsup_loss", "total_loss", "lr")


class ReportError(ValueError):
    """A problem with the report's inputs, said in one line that names the file."""


# --------------------------------------------------------------------------- inputs


@dataclass
class RunInput:
    """One model to report on: where it came from and what its folder says about it."""

    name: str
    given: Path
    model_dir: Path
    run_dir: Path | None
    info: dict
    history: list[dict] = field(default_factory=list)
    run_json: dict | None = None

    @property
    def thresholds(self) -> np.ndarray:
        thr = self.info.get("thresholds") or []
        if len(thr) != NUM_BRACKETS:
            return np.full(NUM_BRACKETS, DEFAULT_THRESHOLD)
        return np.asarray(thr, dtype=np.float64)


def open_run(path: str | Path, name: str | None = None) -> RunInput:
    """A run folder (holding model/) or a bare model/ folder. A model/ folder that still
    sits in its run folder brings that run's curves along."""
    given = Path(path)
    if not given.exists():
        raise ReportError(f"{given}: no such run or model folder")
    try:
        model_dir = resolve_model_folder(given)
        info = runfolder.read_model_info(model_dir)
    except (FileNotFoundError, runfolder.RunFolderError) as exc:
        raise ReportError(str(exc)) from None
    run_dir = runfolder.run_folder_of(model_dir)
    if name is None:
        if run_dir is not None:
            name = run_dir.name
        elif model_dir.name == "model" and model_dir.parent.name:
            name = f"{model_dir.parent.name}/model"
        else:
            name = model_dir.name
    return RunInput(name=name, given=given, model_dir=model_dir, run_dir=run_dir, info=info,
                    history=runfolder.read_metrics(run_dir) if run_dir else [],
                    run_json=runfolder.read_run_info(run_dir))


def unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def run_sources(run: RunInput) -> dict[str, str]:
    """run.json's `sources` (labeled, test, truth, ...), keeping only the string values: a
    hand-edited run.json must not break a report."""
    return runfolder.run_sources(run.run_json)


def load_truth(path: str | Path) -> dict[str, int]:
    """truth.parquet -> {real path of the image: true bracket}. Paths in the file are
    relative to the file's folder (absolute ones are kept)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"truth file not found: {path}")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise ReportError(f"{path}: cannot read truth file: {exc}") from None
    if "path" not in df.columns or not ({"bracket", "score"} & set(df.columns)):
        raise ReportError(f"{path}: a truth file needs columns 'path' and 'bracket' (or 'score'); it has {sorted(df.columns)}")
    bad = [i for i, p in enumerate(df["path"]) if not isinstance(p, str) or not p]
    if bad:
        raise ReportError(f"{path}: column 'path' must hold file names (strings); row {bad[0] + 1} holds "
                          f"{df['path'].iloc[bad[0]]!r} ({len(bad)} such row(s))")
    column = "bracket" if "bracket" in df.columns else "score"
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~((values >= 0) & (values <= NUM_BRACKETS - 1)))  # NaN fails too
    if len(bad):
        raise ReportError(f"{path}: column {column!r} must hold numbers 0-10; row {bad[0] + 1} ({df['path'].iloc[bad[0]]}) "
                          f"holds {df[column].iloc[bad[0]]!r} ({len(bad)} such row(s))")
    brackets = values.astype(np.int64) if column == "bracket" else bracket_of(values)
    base = path.parent
    return {os.path.realpath(p if os.path.isabs(p) else base / p): int(b) for p, b in zip(df["path"], brackets)}


def training_paths(run: RunInput) -> set[str] | None:
    """Real paths of the images the run trained on, when its folder says (split.csv, or the
    labeled source in run.json); None when unknown."""
    if run.run_dir is None:
        return None
    split = runfolder.read_split(run.run_dir)
    if split is not None:
        return {os.path.realpath(p) for p in runfolder.split_paths(split, "train")}
    labeled = run_sources(run).get("labeled")
    if not labeled or not Path(labeled).exists():
        return None

    try:
        if Path(labeled).is_dir():
            records, _ = scan_labeled_folder(labeled)
        elif Path(labeled).suffix.lower() in MANIFEST_SUFFIXES:
            records, _ = read_manifest(labeled, need_score=True)
        else:
            return None
    except Exception:  # the training source moved or changed: nothing to say about it
        return None
    return {os.path.realpath(r["path"]) for r in records}


def test_set_identity(run: RunInput) -> str | None:
    """What the run evaluated on while training: its test source, or its carved split."""
    if run.run_dir is None:
        return None
    test = run_sources(run).get("test")
    if test:
        return f"source:{os.path.realpath(test)}"
    split = runfolder.read_split(run.run_dir)
    if split is not None:
        paths = sorted(os.path.realpath(p) for p in runfolder.split_paths(split, "test"))
        return "split:" + hashlib.sha1("\n".join(paths).encode()).hexdigest()
    return None


# --------------------------------------------------------------------------- scoring


def predict_probs(model, info: dict, table, batch_size: int = 64, workers: int = 0, device="cpu",
                  desc: str | None = None, precision: str = "auto",
                  tiles: TileSettings | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Softmax over the 11 logits for every row of `table` (a datasets table with `path` or
    `image`), in row order. Returns (probs N x 11, ok mask N, reason per row ('' if ok));
    rows that could not be read have ok=False and NaN probabilities. `model` must already
    be on `device`; precision as export's --precision (auto: bf16 autocast on CUDA, fp32 on
    CPU), the softmax always in float32 (aessl/scoring.py). `tiles` with n > 1: each row is
    scored as its n tile views (aessl/tiles.py) and they are reduced with `tiles.reduce`.
    progress=False: no progress bar (there is none anyway for a single batch)."""
    if tiles is not None and tiles.on:
        per_tile, ok, reasons = predict_tile_probs(model, info, table, tiles.n, tiles.scale, batch_size, workers,
                                                   device, desc, precision, progress)
        probs = np.full((len(ok), NUM_BRACKETS), np.nan, dtype=np.float64)
        probs[ok] = reduce_tiles(per_tile[ok], tiles.reduce)
        return probs, ok, reasons
    dataset = EvalDataset(table, eval_transform(info), int(info["image_size"]))
    return _score_dataset(model, info, dataset, batch_size, workers, device, desc, precision, progress=progress)


def predict_tile_probs(model, info: dict, table, n: int, scale: float = 2.0, batch_size: int = 64, workers: int = 0,
                       device="cpu", desc: str | None = None, precision: str = "auto",
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """predict_probs of every tile: (probs N x n x 11, ok N, reasons), the n tile views of
    each row (aessl/tiles.py tile_views) scored as B * n images a batch of B rows; reduce
    them with tiles.reduce_tiles (one scoring pass serves every reduce)."""
    dataset = TiledEvalDataset(table, info, n, scale)
    return _score_dataset(model, info, dataset, batch_size, workers, device, desc, precision, views=int(n),
                          progress=progress)


def _score_dataset(model, info: dict, dataset, batch_size: int, workers: int, device, desc: str | None,
                   precision: str, views: int = 1, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    device = torch.device(device)
    # pinned pages only where a GPU copies from them (non_blocking)
    loader = DataLoader(dataset, batch_size=int(batch_size), num_workers=int(workers), shuffle=False,
                        worker_init_fn=worker_init if workers else None, pin_memory=device.type == "cuda")
    n = len(dataset)
    shape = (n, NUM_BRACKETS) if views == 1 else (n, views, NUM_BRACKETS)
    probs = np.full(shape, np.nan, dtype=np.float64)
    ok = np.zeros(n, dtype=bool)
    reasons = [""] * n
    batches = tqdm(loader, desc=desc or "score", disable=not progress or n <= batch_size, leave=False,
                   dynamic_ncols=True)
    if views > 1:
        batches = flatten_tiles(batches)
    # A batch's unreadable rows are zero images; they are scored with it and dropped here.
    for p, batch in bracket_probs(model, batches, device, resolve_precision(precision, device), target=target_of(info)):
        idx = batch["index"].numpy()
        good = batch["ok"].numpy().astype(bool)
        for i, g, r in zip(idx, good, batch["reason"]):
            if not g:
                reasons[i] = r
        probs[idx[good]] = p.numpy().reshape((len(idx),) + shape[1:])[good]
        ok[idx[good]] = True
    return probs, ok, reasons


def calibration(probs, true_bracket, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability of the argmax: confidence (max prob) against accuracy in equal-width bins
    (first bin [0, 1/bins], then (lo, hi]). ECE = sum over bins of n_b/N * |acc_b - conf_b|."""
    probs = np.asarray(probs, dtype=np.float64)
    true_bracket = np.asarray(true_bracket)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == true_bracket).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(which, weights=correct, minlength=bins) / count
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] / len(conf) * np.abs(acc[filled] - mean_conf[filled]))) if len(conf) else float("nan")
    return {"ece": ece, "edges": edges, "count": count, "accuracy": acc, "confidence": mean_conf}


# --------------------------------------------------------------------------- plots

PLOT_RC = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
    # Every string drawn is literal text: file and run names such as "x$_a_b$.png" are not
    # TeX (mathtext would stop the report on them, or set them in italics).
    "text.parse_math": False,
    "text.usetex": False,
}
RUN_STYLES = ["-", "--", ":", "-."]
RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _figure(w: float, h: float, **margins):
    """A figure with fixed margins in inches-free fractions (constrained layout costs a
    third of the plotting time and every figure here has a known shape)."""
    fig = Figure(figsize=(w, h), dpi=100)
    fig.subplots_adjust(**{"left": 0.11, "right": 0.97, "bottom": 0.13, "top": 0.9, **margins})
    return fig


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def _rc():
    return matplotlib.rc_context(PLOT_RC)


def plot_confusion(true_bracket, pred_bracket, title: str = ""):
    """Counts of true x predicted bracket, shaded by row share (recall per true bracket)."""
    cm = confusion_matrix(true_bracket, pred_bracket, labels=BRACKETS)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm, dtype=np.float64), where=rows > 0)
    with _rc():
        fig = _figure(6.2, 5.4, left=0.1, right=0.99, bottom=0.1, top=0.93)
        ax = fig.add_subplot()
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for t in BRACKETS:
            for p in BRACKETS:
                if cm[t, p]:
                    ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=9,
                            color="white" if share[t, p] > 0.55 else "#222")
        ax.plot([-0.5, 10.5], [-0.5, 10.5], color="#999", lw=0.6, ls=":")
        ax.set_xticks(BRACKETS)
        ax.set_yticks(BRACKETS)
        ax.set_xlabel("predicted bracket (argmax)")
        ax.set_ylabel("true bracket")
        ax.set_title(title or "confusion matrix (counts; shade = share of the row)")
        fig.colorbar(im, ax=ax, shrink=0.8, label="share of true bracket")
    return fig


def plot_score_histogram(true_score, probs, title: str = ""):
    """How many images per bracket: the truth, the argmax and the expected score (rounded)."""
    true_b = np.bincount(bracket_of(true_score), minlength=NUM_BRACKETS)
    pred_b = np.bincount(np.asarray(probs).argmax(axis=1), minlength=NUM_BRACKETS)
    exp_b = np.bincount(bracket_of(expected_score(probs)), minlength=NUM_BRACKETS)
    w = 0.27
    with _rc():
        fig = _figure(6.2, 4.2, top=0.84)
        ax = fig.add_subplot()
        ax.bar(BRACKETS - w, true_b, w, label="true", color="#555")
        ax.bar(BRACKETS, pred_b, w, label="argmax", color="#1f77b4")
        ax.bar(BRACKETS + w, exp_b, w, label="expected score, rounded", color="#ff7f0e")
        ax.set_xticks(BRACKETS)
        ax.set_xlabel("bracket (score × 10 = percent)")
        ax.set_ylabel("images")
        ax.set_title(title or "true vs predicted scores", pad=26)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False, fontsize=10)
    return fig


def plot_reliability(cal: dict, title: str = ""):
    edges, count = cal["edges"], cal["count"]
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = count > 0
    with _rc():
        fig = _figure(6.2, 4.6, bottom=0.12, top=0.92)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1, label="perfect calibration")
        ax.bar(centers[filled], cal["accuracy"][filled], width * 0.9, color="#1f77b4", alpha=0.85, label="accuracy in bin")
        ax.scatter(cal["confidence"][filled], cal["accuracy"][filled], color="#d62728", zorder=3, s=18, label="mean confidence")
        for c, a, n in zip(centers[filled], cal["accuracy"][filled], count[filled]):
            ax.text(c, min(a + 0.03, 0.97), f"n={n}", ha="center", fontsize=8, color="#333")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence of the argmax bracket")
        ax.set_ylabel("accuracy")
        ax.set_title(title or f"reliability: ECE = {cal['ece']:.3f}")
        ax.legend(loc="upper left", frameon=False)
    return fig


def plot_recall(metrics: dict, true_bracket, title: str = ""):
    counts = np.bincount(np.asarray(true_bracket), minlength=NUM_BRACKETS)
    recall = np.array([metrics.get(f"recall_{b}", float("nan")) for b in BRACKETS], dtype=np.float64)
    with _rc():
        fig = _figure(6.2, 4.2)
        ax = fig.add_subplot()
        has = np.isfinite(recall)
        ax.bar(BRACKETS[has], recall[has], 0.7, color=["#d62728" if b <= LOW_BRACKET_MAX else "#1f77b4" for b in BRACKETS[has]])
        for b in BRACKETS:
            label = f"n={counts[b]}" if has[b] else "none"
            ax.text(b, (recall[b] if has[b] else 0) + 0.02, label, ha="center", fontsize=8, color="#333")
        ax.set_xticks(BRACKETS)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("true bracket")
        ax.set_ylabel("recall (argmax = true)")
        ax.set_title(title or "per-bracket recall")
    return fig


def plot_curves(histories: dict[str, list[dict]]):
    """One panel per figure that any run logged, one line per run, against step."""
    keys = [k for k in CURVE_KEYS if any(
        isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for h in histories.values() for r in h)]
    if not keys:
        return None

    cols = 3
    rows = math.ceil(len(keys) / cols)
    with _rc():
        fig = _figure(13, 3.0 * rows, left=0.06, right=0.98, bottom=0.45 / (3.0 * rows), top=1 - 0.6 / (3.0 * rows),
                      hspace=0.55, wspace=0.22)
        for i, key in enumerate(keys):
            ax = fig.add_subplot(rows, cols, i + 1)
            for j, (name, hist) in enumerate(histories.items()):
                pts = [(r["step"], r[key]) for r in hist if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
                       and isinstance(r.get("step"), (int, float))]
                if pts:
                    s, v = zip(*pts)
                    # dashes and shrinking markers keep runs with equal values visible
                    ax.plot(s, v, marker="o", ms=max(2.5, 6 - 1.5 * j), lw=1.8, ls=RUN_STYLES[j % len(RUN_STYLES)],
                            color=RUN_COLORS[j % len(RUN_COLORS)], label=name)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.grid(alpha=0.3)
        legend = {}
        for ax in fig.axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, h)
        fig.legend(list(legend.values()), list(legend), loc="upper center", ncols=min(len(legend), 6), frameon=False,
                   fontsize=12)
    return fig


def plot_pool_histogram(percents: dict[str, np.ndarray]):
    bins = np.arange(0, 105, 5)
    with _rc():
        fig = _figure(8, 4.2 + 0.2 * math.ceil(len(percents) / 2), left=0.09, top=0.84)
        ax = fig.add_subplot()
        for j, (name, pct) in enumerate(percents.items()):
            if len(pct):
                color = RUN_COLORS[j % len(RUN_COLORS)]
                weights = np.full(len(pct), 100.0 / len(pct))
                ax.hist(pct, bins=bins, weights=weights, histtype="stepfilled", color=color, alpha=0.15)
                ax.hist(pct, bins=bins, weights=weights, histtype="step", lw=2, color=color,
                        label=f"{name} ({np.mean(pct >= 10 * HIGH_SCORE_MIN):.1%} ≥ 50%)")
        ax.axvline(10 * HIGH_SCORE_MIN, color="#999", ls="--", lw=1)
        ax.set_xlim(0, 100)
        ax.set_xlabel("predicted score (percent = expected score × 10)")
        ax.set_ylabel("% of pool images")
        ax.set_title("predicted scores on the unlabeled pool", pad=12 + 16 * math.ceil(len(percents) / 2))
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
    return fig


def plot_pseudo_quality(quality: dict, counts, title: str = ""):
    cov = np.array([quality.get(f"pseudo_coverage_{b}", float("nan")) for b in BRACKETS], dtype=np.float64)
    acc = np.array([quality.get(f"pseudo_accuracy_{b}", float("nan")) for b in BRACKETS], dtype=np.float64)
    w = 0.38
    with _rc():
        fig = _figure(6.2, 4.2)
        ax = fig.add_subplot()
        ok = np.isfinite(cov)
        ax.bar(BRACKETS[ok] - w / 2, cov[ok], w, color="#7f7f7f", label="coverage (accepted / pool images)")
        ok = np.isfinite(acc)
        ax.bar(BRACKETS[ok] + w / 2, acc[ok], w, color="#2ca02c", label="accuracy of accepted labels")
        for b in BRACKETS:
            ax.text(b, 1.02, f"{counts[b]}", ha="center", fontsize=8, color="#333")
            if np.isfinite(acc[b]) and acc[b] < 0.03:  # accepted but all wrong: a bar too low to see
                ax.text(b + w / 2, 0.02, "0", ha="center", fontsize=8, color="#c00000", weight="bold")
        ax.set_xticks(BRACKETS)
        ax.set_ylim(0, 1.25)
        ax.set_xlabel("true bracket (numbers above: pool images with truth)")
        ax.set_ylabel("share")
        ax.set_title(title or (f"pseudo-labels: accuracy {quality['pseudo_accuracy']:.3f}, "
                               f"coverage {quality['pseudo_coverage']:.3f}"))
        ax.legend(loc="upper left", frameon=False, ncols=2, fontsize=9)
    return fig


def plot_image_grid(items: list[dict], cols: int = 6, size: int = THUMB_PX, overlays: list | None = None):
    """Thumbnails at 1:1 pixels with 'true b · p%' and the file name under each. Tiles are
    letterboxed on light grey, small images enlarged by a whole factor (pixels stay sharp).
    overlays: one size x size tile per item (the saliency map over the model's view, or None),
    shown right of its thumbnail; the caption is then centred under the pair.

    items: {'path', 'true' (bracket or None), 'percent', 'alert' (bool: red caption)[, 'caption'
    (replaces the 'true · pred' line)]}."""
    if not items:
        return None
    cols = max(1, min(cols, len(items)))
    pad, cap = 12, 40
    tiles = [grids.tile(it["path"], size, (235, 235, 235), whole=True) for it in items]
    if overlays is not None:
        tiles = [_pair(t, o, size) for t, o in zip(tiles, overlays)]
    tw = tiles[0].width
    sheet = grids.sheet(tiles, cols, (tw + pad, size + cap), (255, 255, 255), margin=pad)
    W, H = sheet.size
    with _rc():
        fig = _figure(W / 100, H / 100)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(np.asarray(sheet), interpolation="none")
        ax.set_axis_off()
        for i, it in enumerate(items):
            r, c = divmod(i, cols)
            x = (pad + c * (tw + pad) + tw / 2) / W
            y0 = H - pad - r * (size + cap) - size  # the tile's bottom edge, in pixels from the bottom
            true = "?" if it.get("true") is None else str(it["true"])
            caption = it.get("caption") or f"true {true} · pred {math.floor(it['percent'])}%"
            fig.text(x, (y0 - 4) / H, caption, ha="center", va="top",
                     fontsize=11, color="#c00000" if it.get("alert") else "#111", weight="bold")
            fig.text(x, (y0 - 21) / H, _short(Path(str(it["path"])).name, 30), ha="center", va="top",
                     fontsize=8, color="#666")
    return fig


PAIR_GAP = 4  # pixels between a thumbnail and its saliency overlay


def _pair(thumb, overlay, size: int):
    """A thumbnail and its overlay side by side (an empty grey tile where there is no overlay)."""
    out = Image.new("RGB", (2 * size + PAIR_GAP, size), (255, 255, 255))
    out.paste(thumb, (0, 0))
    out.paste(overlay if overlay is not None else Image.new("RGB", (size, size), (235, 235, 235)), (size + PAIR_GAP, 0))
    return out


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n // 2 - 1] + "…" + text[-(n // 2 - 1):]


def grid_items(kind: str, paths, true_bracket, probs, n: int) -> list[dict]:
    """The images of one grid: 'top' (highest expected score), 'false_positives' (true
    bracket <= 1, highest expected score first) or 'misses' (largest |expected - true|)."""
    score = expected_score(probs)
    true_bracket = np.asarray(true_bracket)
    if kind == "top":
        order = np.argsort(-score, kind="stable")
    elif kind == "false_positives":
        low = np.flatnonzero(true_bracket <= LOW_BRACKET_MAX)
        order = low[np.argsort(-score[low], kind="stable")]
    elif kind == "misses":
        order = np.argsort(-np.abs(score - true_bracket), kind="stable")
    else:
        raise ValueError(kind)
    return [{"path": paths[i], "row": int(i), "true": int(true_bracket[i]), "percent": 10 * score[i],
             "alert": bool(true_bracket[i] <= LOW_BRACKET_MAX and score[i] >= HIGH_SCORE_MIN)} for i in order[:n]]


GRIDS = [
    ("top", "Top images by predicted score",
     "What a user keeping the top N would keep. Caption: true bracket · predicted percent (rounded down: 50% means at least 50)."),
    ("false_positives", "Worst false positives",
     "Images of true bracket 0–1 (photos, text, manga, no subject) with the highest predicted score; "
     "red = scored 50% or more, the error users mind most."),
    ("misses", "Worst misses", "Largest distance between the expected score and the true bracket."),
]


# --------------------------------------------------------------------------- the report


@dataclass
class Png:
    """A PNG written to the report folder and embedded in the HTML."""

    file: str
    data: bytes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def unique_slugs(names: list[str]) -> dict[str, str]:
    """name -> file-name part; names that slug alike ('a$b', 'a_b') get -2, -3, ..."""
    slugs: dict[str, str] = {}
    for n in names:
        base = slug = _slug(n)
        i = 2
        while slug in slugs.values():
            slug, i = f"{base}-{i}", i + 1
        slugs[n] = slug
    return slugs


def _read_input(flag: str, source, load):
    """load(), with any failure but the data module's own clear ones said as a ReportError
    that names the flag and the source."""
    try:
        return load()
    except (ReportError, DataSourceError, LabeledSetError):
        raise
    except Exception as exc:
        raise ReportError(f"{flag} {source}: cannot read it ({type(exc).__name__}: {exc})") from None


def _clean(value):
    """JSON-safe: NaN/inf -> null, numpy -> python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def best_runs(values: dict[str, float], better: str | None) -> set[str]:
    """Names holding the best finite value of a row; none when fewer than two runs have a
    value or all runs agree (nothing to tell apart)."""
    finite = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if better is None or len(finite) < 2 or len(values) < 2:
        return set()
    target = min(finite.values()) if better == "low" else max(finite.values())
    best = {k for k, v in finite.items() if abs(v - target) <= 1e-12}
    return set() if len(best) == len(values) else best


@dataclass
class _Scoring:
    """How every model of one report scores a table."""

    batch_size: int
    workers: int
    device: object
    precision: str
    tiles: TileSettings | None = None  # tiled inference (aessl/tiles.py); None or n == 1: the eval view

    def probs(self, model, info: dict, table, desc: str):
        return predict_probs(model, info, table, self.batch_size, self.workers, self.device, desc=desc,
                             precision=self.precision, tiles=self.tiles)

    @property
    def tile_record(self) -> dict:
        return (self.tiles or TileSettings()).record()


@dataclass
class _ScoredSet:
    """The scored set every run is measured on."""

    table: object
    paths: list[str]
    true_score: np.ndarray
    true_bracket: np.ndarray
    top_k: int
    raters: list[str] | None = None  # the scored set's rater column, when it has one


@dataclass
class _Pool:
    """The unlabeled pool while the runs score it in turn: row names, unreadable rows and
    truth files are found once for all runs."""

    source: str | Path
    table: object
    truth_file: Path | None
    paths: list[str] | None = None
    skipped: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (name, reason); byte rows' names repeat
    truths: dict[str, dict[str, int]] = field(default_factory=dict)


def build_report(runs: list[str | Path], data: str | Path, out: str | Path, pool: str | Path | None = None,
                 truth: str | Path | None = None, batch_size: int = 64, top_k: int | None = None, grid: int = 12,
                 workers: int | None = None, device: str | None = None, pool_limit: int | None = None,
                 precision: str = "auto", saliency: SaliencyOptions | None = None,
                 tiles: TileSettings | None = None) -> dict:
    """Score `data` (and `pool`) with every run and write the report into `out`.

    Returns what metrics.json holds. Raises ReportError / LabeledSetError / DataSourceError
    on bad inputs before anything is written. `device`: auto (None), cpu, cuda or cuda:N;
    `precision`: auto (bf16 autocast on CUDA), fp32, bf16 or fp16. `saliency`: also draw an
    integrated-gradients map beside every image of the grids (aessl/saliency.py); None: not.
    `tiles`: score the set (and the pool) with tiled inference (aessl/tiles.py; None: off);
    metrics.json records it under `tiles` (and each run's entry too)."""
    if not runs:
        raise ReportError("give at least one run or model folder")
    try:
        device = resolve_device(device)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a folder")
    inputs = [open_run(r) for r in runs]
    for inp, name in zip(inputs, unique_names([i.name for i in inputs])):
        inp.name = name
    truth_file = Path(truth) if truth else None
    if truth_file is not None and not truth_file.is_file():
        raise ReportError(f"truth file not found: {truth_file}")
    # validated whole: a bad image stops here with the full list
    table = _read_input("--data", data, lambda: load_scored_set(data))
    pool_table = _read_input("--pool", pool, lambda: load_pool(str(pool), limit=pool_limit)) if pool else None
    scoring = _Scoring(batch_size, min(4, os.cpu_count() or 1) if workers is None else int(workers), device, precision,
                       tiles)

    paths = list(table["path"])
    true_score = np.asarray(table["score"], dtype=np.float64)
    scored = _ScoredSet(table, paths, true_score, bracket_of(true_score),
                        int(top_k) if top_k else default_top_k(len(paths)), _raters_of(table))
    notes = _data_notes(inputs, data, paths)
    if tiles is not None and tiles.on:
        notes.append(f"tiled inference: every model scored each image as {tiles.describe()} (aessl/tiles.py); "
                     "the figures are those of the reduced scores; the image grids and saliency maps show the "
                     "whole image and its normal eval view.")
    pool_state = _Pool(pool, pool_table, truth_file) if pool_table is not None else None
    results: dict[str, dict] = {}
    pred_frames, pool_frames = [], []
    for inp in inputs:
        results[inp.name], frame, pool_frame = _score_run(inp, scoring, scored, pool_state, notes, grid, saliency)
        pred_frames.append(frame)
        if pool_frame is not None:
            pool_frames.append(pool_frame)
    if pool_state is not None and pool_state.skipped:
        log.warning("skipped %d unreadable pool image(s), e.g. %s: %s", len(pool_state.skipped),
                    *next(iter(pool_state.skipped.values())))
    if truth_file is not None and pool_table is None:
        notes.append("--truth was given without --pool: pseudo-label quality needs the pool images")

    histories = {inp.name: inp.history for inp in inputs if inp.history}
    images = _draw_figures(results, histories, scored, grid, with_pool=pool_table is not None)
    try:  # created only now: inputs that fail above leave no folder behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot create the folder ({exc})") from None
    for img in images.values():
        write_bytes_atomic(out / img.file, img.data)

    report = _report_dict(data, scored, results, pool_state, notes, saliency)
    report["tiles"] = scoring.tile_record
    write_bytes_atomic(out / "metrics.json", json.dumps(report, indent=1).encode())
    _write_predictions(out, pred_frames, pool_frames)
    shown = GRIDS + ([CORRECTED_GRID] if any(r.get("corrections") for r in report["runs"].values()) else [])
    write_bytes_atomic(out / "report.html", render_html(report, images, {g[0]: g for g in shown}).encode())
    return report


def _score_run(inp: RunInput, scoring: _Scoring, scored: _ScoredSet, pool: _Pool | None, notes: list[str],
               grid: int = 12, saliency: SaliencyOptions | None = None):
    """(the run's entry in the report, its prediction rows, its pool prediction rows or
    None). The model is loaded for this run only, so its saliency maps are made here too."""
    paths = scored.paths
    log.info("scoring %d images with %s (%s, %d px)", len(paths), inp.name, inp.info["architecture"], inp.info["image_size"])
    try:
        model, _ = load_model_folder(inp.model_dir, device=scoring.device)
    except Exception as exc:
        raise ReportError(f"{inp.model_dir}: cannot load the model: {type(exc).__name__}: {exc}") from None
    probs, ok, reasons = scoring.probs(model, inp.info, scored.table, f"score {inp.name}")
    if not ok.all():  # validated above; the files changed under us
        bad = [f"{paths[i]}: {reasons[i]}" for i in np.flatnonzero(~ok)]
        raise ReportError(f"{len(bad)} scored image(s) became unreadable: " + "; ".join(bad[:5]))
    entry = _run_entry(inp, probs, scored)
    entry["tiles"] = scoring.tile_record
    if saliency is not None:
        entry["saliency"], entry["overlays"] = _grid_saliency(inp, model, scoring.device, scored, probs, grid, saliency)
    corrected = _score_corrections(inp, model, scoring, notes)
    if corrected is not None:
        entry["corrections"], entry["corrected_items"] = corrected
    frame = _prediction_frame(inp.name, probs, scored)
    pool_frame = None
    if pool is not None:
        entry["pool"], pool_frame = _score_pool(inp, model, scoring, pool, notes)
    return entry, frame, pool_frame


CORRECTED_SHOWN = 36  # corrected images drawn per run (the latest decisions)
CORRECTED_GRID = ("corrected", "Corrected images",
                  "The images a review decided (the run's data.corrections, made in ssl/app.py), latest first, scored "
                  "by the model trained on them. Caption: the decision and the person's score · the model's percent "
                  "now; red = the model is still 2 or more brackets from the person's score, or a rejected image "
                  "scores 50% or more.")


def _score_corrections(inp: RunInput, model, scoring: _Scoring, notes: list[str]):
    """(summary for metrics.json, grid items) of the images the run's data.corrections decided,
    scored by this run's model; None when the run trained on no corrections. The summary
    says whether training took them in: the model's MAE and within-one-bracket share against
    the person's scores, and how the rejected images score now."""
    applied = (inp.run_json or {}).get("corrections")
    if not applied:
        return None
    files = list(applied.get("files") or [])
    try:
        corr = corrections.read_corrections(files)
    except corrections.CorrectionsError as exc:
        notes.append(f"{inp.name} trained on data.corrections, which cannot be read now ({exc}): not shown")
        return None
    if corr.digest != applied.get("sha256"):
        notes.append(f"{inp.name}: {', '.join(files)} changed after the run trained on it; the corrected images are "
                     "shown as the file is now")
    import datasets

    rows = list(corr.last.values())
    table = datasets.Dataset.from_dict({"path": [r["path"] for r in rows]})
    probs, ok, reasons = scoring.probs(model, inp.info, table, f"corrections {inp.name}")
    score = expected_score(probs)
    labels = np.asarray([ok[i] and rows[i]["decision"] != "reject" for i in range(len(rows))], dtype=bool)
    rejects = np.asarray([ok[i] and rows[i]["decision"] == "reject" for i in range(len(rows))], dtype=bool)
    person = np.asarray([r["score"] if r["score"] is not None else np.nan for r in rows], dtype=np.float64)
    err = np.abs(score - person)
    summary = {**{k: applied.get(k) for k in ("files", "sha256", "accept", "rescore", "reject", "labels_added",
                                               "labels_replaced", "labels_removed", "test_images_left_out")},
               "images": len(rows), "unreadable": int((~ok).sum()),
               "unreadable_examples": [{"path": rows[i]["path"], "reason": reasons[i]} for i in np.flatnonzero(~ok)[:20]],
               "labels_mae": float(err[labels].mean()) if labels.any() else None,
               "labels_within_1": float((err[labels] <= 1.0).mean()) if labels.any() else None,
               "rejected_mean_percent": float(10 * score[rejects].mean()) if rejects.any() else None,
               "rejected_at_50_percent": int((10 * score[rejects] >= 50).sum()) if rejects.any() else None}
    items = []
    for i in reversed(range(len(rows))):
        if not ok[i] or len(items) >= CORRECTED_SHOWN:
            continue
        r, pct = rows[i], 10 * score[i]
        said = "reject" if r["decision"] == "reject" else f"{r['decision']} {r['score']:.1f}"
        items.append({"path": r["path"], "row": i, "true": None, "percent": pct,
                      "caption": f"{said} · pred {math.floor(pct)}%",
                      "alert": bool(pct >= 50 if r["decision"] == "reject" else err[i] >= 2.0)})
    log.info("corrections of %s: %d image(s); model vs person MAE %s, %d rejected", inp.name, len(rows),
             "-" if summary["labels_mae"] is None else f"{summary['labels_mae']:.3f}", int(rejects.sum()))
    return summary, items


def _grid_saliency(inp: RunInput, model, device, scored: _ScoredSet, probs: np.ndarray, grid: int,
                   options: SaliencyOptions) -> tuple[dict, dict]:
    """Saliency maps of every image the run's grids show: (the pass's figures for
    metrics.json, {row of the scored set: overlay tile or None})."""
    rows = sorted({it["row"] for kind, _, _ in GRIDS
                   for it in grid_items(kind, scored.paths, scored.true_bracket, probs, grid)})
    log.info("saliency of %d grid images with %s (%s, %d steps, %s baseline)", len(rows), inp.name, SALIENCY_METHOD,
             options.steps, options.baseline)
    sources = [row_source(scored.table[r]) for r in rows]
    try:
        result = saliency_maps(model, inp.info, sources, device, options)
    except torch.cuda.OutOfMemoryError:
        raise ReportError(f"{inp.name}: out of GPU memory while computing saliency maps; lower --saliency-batch-size "
                          f"(now {options.batch_size})") from None
    overlays = {r: overlay_tile(v, h, THUMB_PX) for r, v, h in zip(rows, result.views, result.heat)}
    summary = result.summary()
    log.info("saliency of %s: %d images in %.1fs, largest |convergence delta| %s", inp.name, summary["images"],
             summary["seconds"], summary["max_abs_convergence_delta"])
    return summary, overlays


def _raters_of(table) -> list[str] | None:
    if "rater" not in table.column_names:
        return None
    return ["" if r is None else str(r) for r in table["rater"]]


def per_rater_metrics(probs: np.ndarray, scored: _ScoredSet) -> dict[str, dict] | None:
    """QWK, MAE, FPR and mean scores of one run against each rater's own scores (a scored
    set with a rater column: one row per image and rater); None without raters."""
    if not scored.raters:
        return None
    out = {}
    raters = np.asarray(scored.raters, dtype=object)
    pred = expected_score(probs)
    for name in sorted(set(scored.raters)):
        sel = np.flatnonzero(raters == name)
        m = compute_metrics(probs[sel], scored.true_score[sel])
        out[name or "(none)"] = {"num_images": int(len(sel)), "qwk": m["qwk"], "mae": m["mae"],
                                 "false_positive_rate": m["false_positive_rate"],
                                 "mean_true": float(scored.true_score[sel].mean()), "mean_pred": float(pred[sel].mean())}
    return out


def _run_entry(inp: RunInput, probs: np.ndarray, scored: _ScoredSet) -> dict:
    """Metrics, calibration and what the run's folder says, for one run."""
    metrics = compute_metrics(probs, scored.true_score, top_k=scored.top_k)
    cal = calibration(probs, scored.true_bracket)
    metrics["ece"] = cal["ece"]
    last = inp.history[-1] if inp.history else {}
    metrics["skipped_images"] = last.get("skipped_images") if inp.history else None
    return {
        "source": str(inp.given), "model_dir": str(inp.model_dir),
        "run_dir": str(inp.run_dir) if inp.run_dir else None,
        "architecture": inp.info.get("architecture"), "image_size": inp.info.get("image_size"),
        "algorithm": inp.info.get("algorithm"), "trained_steps": inp.info.get("trained_steps"),
        "target": target_of(inp.info).name, "thresholds": inp.thresholds.tolist(), "model_thresholds": list(inp.info.get("thresholds") or []),
        "metrics": metrics, "calibration": cal, "per_rater": per_rater_metrics(probs, scored),
        "last_training_eval": {k: last.get(k) for k in ("step", "mae", "qwk", "false_positive_rate")} if last else None,
        "probs": probs,
    }


def _prediction_frame(name: str, probs: np.ndarray, scored: _ScoredSet):
    """predictions.parquet rows of one run: one per scored image."""
    score = expected_score(probs)
    frame = pd.DataFrame({"run": name, "path": scored.paths, "score": scored.true_score, "bracket": scored.true_bracket,
                          "expected_score": score, "percent": 10 * score, "pred_bracket": probs.argmax(1),
                          "confidence": probs.max(1)})
    if scored.raters:
        frame.insert(2, "rater", scored.raters)
    for b in BRACKETS:
        frame[f"p_{b}"] = probs[:, b]
    return frame


def _score_pool(inp: RunInput, model, scoring: _Scoring, pool: _Pool, notes: list[str]):
    """(the run's pool entry in the report, its pool_predictions.parquet rows)."""


    pprobs, pok, preasons = scoring.probs(model, inp.info, pool.table, f"pool {inp.name}")
    if pool.paths is None:
        pool.paths = [str(p) for p in pool.table["path"]] if "path" in pool.table.column_names else \
            [n if n != "<bytes>" else f"{pool.source}[row {i}]" for i, n in
             ((i, row_name(pool.table[i])) for i in range(len(pool.table)))]
    for i in np.flatnonzero(~pok):
        pool.skipped.setdefault(int(i), (pool.paths[i], preasons[i]))
    if not pok.any():  # a wrong folder or a format nobody can read: no pool part to show
        name, why = pool.skipped[min(pool.skipped)]
        raise ReportError(f"--pool {pool.source}: none of its {len(pok)} image(s) could be read (e.g. {name}: {why})")
    pprobs = pprobs[pok]
    kept = [p for p, g in zip(pool.paths, pok) if g]
    pscore = expected_score(pprobs)
    radius = int(inp.info.get("confidence_radius", 0))
    accepted = accepted_by_threshold(pprobs, inp.thresholds, radius)
    entry = {
        "images_scored": int(pok.sum()), "mean_percent": float(np.mean(10 * pscore)) if len(pscore) else None,
        "share_at_least_50": float(np.mean(pscore >= HIGH_SCORE_MIN)) if len(pscore) else None,
        "accepted_share": float(np.mean(accepted)) if len(pscore) else None,
        "percent": 10 * pscore, "truth": None, "pseudo_label_quality": None,
    }
    tb = _pool_truth(inp, pool, kept, pprobs, accepted, entry, notes)
    frame = pd.DataFrame({"run": inp.name, "path": kept, "expected_score": pscore, "percent": 10 * pscore,
                          "pred_bracket": pprobs.argmax(1), "confidence": confidence(pprobs, radius), "accepted": accepted,
                          "true_bracket": pd.Series(tb, dtype="Int64").mask(tb < 0)})
    for b in BRACKETS:
        frame[f"p_{b}"] = pprobs[:, b]
    return entry, frame


def _pool_truth(inp: RunInput, pool: _Pool, kept: list[str], pprobs, accepted, entry: dict, notes: list[str]) -> np.ndarray:
    """True bracket of each scored pool image (-1: unknown) from --truth or the run's own
    truth file; fills the entry's truth figures (pseudo-label quality) where any is known."""
    tfile = pool.truth_file or _run_truth(inp)
    tb = np.full(len(kept), -1, dtype=np.int64)
    if tfile is None:
        return tb
    key = str(tfile.resolve())
    if key not in pool.truths:
        pool.truths[key] = load_truth(tfile)
    table = pool.truths[key]
    tb = np.array([table.get(os.path.realpath(p), -1) for p in kept], dtype=np.int64)
    known = tb >= 0
    entry["truth"] = str(tfile)
    entry["truth_matched"] = int(known.sum())
    if known.any():
        entry["pseudo_label_quality"] = pseudo_label_quality(pprobs[known], tb[known], accepted[known])
        entry["truth_counts"] = np.bincount(tb[known], minlength=NUM_BRACKETS).tolist()
    else:
        notes.append(f"{inp.name}: none of the {len(kept)} pool images is listed in the truth file {tfile}; "
                     "no pseudo-label accuracy")
    return tb


def _draw_figures(results: dict[str, dict], histories: dict[str, list[dict]], scored: _ScoredSet, grid: int,
                  with_pool: bool) -> dict[str, Png]:
    """Every plot of the report, keyed as render_html finds them ('confusion/<run>', 'curves', ...)."""
    images: dict[str, Png] = {}

    def keep(key: str, file: str, fig):
        if fig is not None:
            images[key] = Png(file, figure_png(fig))

    true_bracket = scored.true_bracket
    slugs = unique_slugs(list(results))
    for name, r in results.items():
        s = slugs[name]
        probs = r["probs"]
        keep(f"confusion/{name}", f"confusion_{s}.png", plot_confusion(true_bracket, probs.argmax(1)))
        keep(f"hist/{name}", f"score_hist_{s}.png", plot_score_histogram(scored.true_score, probs))
        keep(f"reliability/{name}", f"reliability_{s}.png", plot_reliability(r["calibration"]))
        keep(f"recall/{name}", f"recall_{s}.png", plot_recall(r["metrics"], true_bracket))
        for kind, _, _ in GRIDS:
            items = grid_items(kind, scored.paths, true_bracket, probs, grid)
            overlays = [r["overlays"].get(it["row"]) for it in items] if "overlays" in r else None
            # a thumbnail and its map side by side: 3 pairs a row keep the page as wide as 6 thumbnails
            keep(f"grid_{kind}/{name}", f"grid_{kind}_{s}.png",
                 plot_image_grid(items, cols=6 if overlays is None else 3, overlays=overlays))
        if r.get("corrected_items"):
            keep(f"grid_corrected/{name}", f"grid_corrected_{s}.png", plot_image_grid(r["corrected_items"]))
        pq = (r.get("pool") or {}).get("pseudo_label_quality")
        if pq:
            keep(f"pseudo/{name}", f"pseudo_quality_{s}.png", plot_pseudo_quality(pq, r["pool"]["truth_counts"]))
    if histories:
        keep("curves", "training_curves.png", plot_curves(histories))
    if with_pool:
        keep("pool", "pool_histogram.png", plot_pool_histogram({n: r["pool"]["percent"] for n, r in results.items()}))
    return images


def _report_dict(data, scored: _ScoredSet, results: dict[str, dict], pool: _Pool | None, notes: list[str],
                 saliency: SaliencyOptions | None = None) -> dict:
    """What metrics.json holds (JSON-safe): the runs' entries without their probabilities
    (or overlay images), the best run of each table row, the pool's summary, the saliency
    settings (None: no maps)."""
    names = list(results)
    best = {key: sorted(best_runs({n: results[n]["metrics"].get(key) for n in names}, better))
            for key, _, better in TABLE_ROWS}
    pool_summary = None
    if pool is not None:
        pool_summary = {"source": str(pool.source), "num_images": len(pool.table), "skipped": len(pool.skipped),
                        "skipped_examples": [{"path": p, "reason": why} for p, why in list(pool.skipped.values())[:100]]}
    report = {
        "data": str(data), "num_images": len(scored.paths), "top_k": scored.top_k,
        "true_histogram": np.bincount(scored.true_bracket, minlength=NUM_BRACKETS).tolist(),
        "run_names": names, "pool": pool_summary, "notes": notes, "best": best,
        "disagreements": disagreements(scored, {n: results[n]["probs"] for n in names}),
        "generated": datetime.now().isoformat(timespec="seconds"),
        "saliency": None if saliency is None else {"method": SALIENCY_METHOD, "baseline": saliency.baseline,
                                                   "steps": saliency.steps, "target": "expected score"},
        "runs": {n: {k: v for k, v in r.items() if k not in ("probs", "calibration", "overlays", "corrected_items")} | {
            "calibration_bins": {kk: r["calibration"][kk] for kk in ("count", "accuracy", "confidence")}}
            for n, r in results.items()},
    }
    for r in report["runs"].values():
        if r.get("pool"):
            r["pool"] = {kk: v for kk, v in r["pool"].items() if kk != "percent"}
    return _clean(report)


DISAGREEMENTS = 10  # rows of the report's "where the runs disagree" table


def disagreements(scored: _ScoredSet, probs: dict[str, np.ndarray], n: int = DISAGREEMENTS) -> list[dict]:
    """The `n` scored images whose expected scores differ most between runs (max - min),
    largest first, ties by path: where choosing one model over another changes the answer.
    [] with fewer than two runs."""
    if len(probs) < 2:
        return []
    scores = np.stack([expected_score(p) for p in probs.values()])  # [runs, images]
    spread = np.nan_to_num(scores.max(0) - scores.min(0), nan=-1.0)  # an image a run could not read: last
    order = sorted(range(len(spread)), key=lambda i: (-spread[i], scored.paths[i]))[:n]
    return [{"path": scored.paths[i], "true_score": float(scored.true_score[i]), "spread": float(spread[i]),
             "scores": {name: float(scores[k, i]) for k, name in enumerate(probs)}} for i in order]


def _write_predictions(out: Path, pred_frames: list, pool_frames: list) -> None:
    write_bytes_atomic(out / "predictions.parquet", _parquet_bytes(pd.concat(pred_frames, ignore_index=True)))
    if pool_frames:
        write_bytes_atomic(out / "pool_predictions.parquet", _parquet_bytes(pd.concat(pool_frames, ignore_index=True)))


def _run_truth(inp: RunInput) -> Path | None:
    t = run_sources(inp).get("truth")
    return Path(t) if t and Path(t).is_file() else None


def _data_notes(inputs: list[RunInput], data, paths: list[str]) -> list[str]:
    """Where runs and the scored set disagree about data, in sentences for the report."""
    notes = []
    real = {os.path.realpath(p) for p in paths}
    for inp in inputs:
        seen = training_paths(inp)
        if seen:
            leak = len(real & seen)
            if leak:
                notes.append(f"{inp.name}: {leak} of the {len(real)} scored images were in its training data; "
                             "its figures here are optimistic.")
        if inp.run_dir is None:
            notes.append(f"{inp.name}: a bare model folder (no run folder beside it): no training curves, "
                         "no training data to compare with.")
    ids = {inp.name: test_set_identity(inp) for inp in inputs}
    known = {n: i for n, i in ids.items() if i}
    if len(set(known.values())) > 1:
        notes.append("the runs were evaluated during training on different test sets ("
                     + ", ".join(f"{n}: {_describe_test(i, inp)}" for (n, i), inp in zip(known.items(), [x for x in inputs if x.name in known]))
                     + "): their training curves do not compare directly. The table below scores every run on the same "
                     f"set, {data}.")
    for inp in inputs:
        test = run_sources(inp).get("test")
        if test and os.path.realpath(test) != os.path.realpath(str(data)):
            notes.append(f"{inp.name}: evaluated during training on {test}; this report scores {data}.")
        elif not test and (ids.get(inp.name) or "").startswith("split:"):
            split = runfolder.read_split(inp.run_dir)
            if split is not None and {os.path.realpath(p) for p in runfolder.split_paths(split, "test")} != real:
                notes.append(f"{inp.name}: evaluated during training on the test split carved from its labeled set "
                             f"(split.csv); this report scores {data}.")
    sizes = {inp.info.get("image_size") for inp in inputs}
    if len(sizes) > 1:
        notes.append("the models see different image sizes (" + ", ".join(f"{i.name}: {i.info.get('image_size')} px" for i in inputs) + ").")
    return notes


def _describe_test(identity: str, inp: RunInput) -> str:
    if identity.startswith("source:"):
        return identity[len("source:"):]
    return f"split carved from its labeled set ({identity[6:14]})"


def _parquet_bytes(frame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- HTML
# The page is templates/report.html.j2 (Jinja2, autoescaped); the functions below turn
# metrics.json's content into what the template shows, one part of the page each.

PLOT_SECTIONS = (  # (image key, title, caption) of the plots shown side by side per run
    ("confusion", "Confusion matrix", "Rows: true bracket; columns: predicted bracket (argmax). Numbers are counts; "
                                      "the shade is the share of the row, so the diagonal shade is the recall."),
    ("hist", "Predicted vs true scores", "Images per bracket: the truth, the argmax and the expected score rounded."),
    ("reliability", "Reliability", "Confidence of the argmax against how often it is right, in 10 bins; "
                                   "bars under the diagonal: over-confident."),
    ("recall", "Recall per bracket", "Red: brackets 0–1, the images a filter must catch."),
)
POOL_ROWS = (("mean_percent", "mean predicted percent"), ("share_at_least_50", "share scored ≥ 50%"),
             ("accepted_share", "share a threshold accepts"))
POOL_TRUTH_ROWS = (("pseudo_accuracy", "pseudo-label accuracy (truth)"),
                   ("pseudo_coverage", "pseudo-label coverage (truth)"))


@lru_cache(maxsize=1)
def _template():
    env = jinja2.Environment(loader=jinja2.PackageLoader(__package__, "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=False)
    return env.get_template("report.html.j2")


def _uri(img: Png) -> str:
    return grids.data_uri(img.data)


def _fmt(v, key: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, (int, np.integer)) or key == "skipped_images":
        return str(int(v))
    return f"{v:.3f}"


def render_html(report: dict, images: dict[str, Png], grids: dict) -> str:
    """The report page from what metrics.json holds, the plots (embedded as data: URIs) and
    the grids' {kind: (kind, title, caption)}."""
    names = report["run_names"]
    return _template().render(
        report=report, names=names, pool=report["pool"],
        table=_metric_table(report),
        rater_table=_rater_table(report),
        plot_sections=_plot_sections(report, images),
        grid_sections=_grid_sections(names, images, grids),
        saliency=_saliency_view(report),
        curves=_uri(images["curves"]) if "curves" in images else None,
        pool_histogram=_uri(images["pool"]) if "pool" in images else None,
        pseudo=_pseudo_figures(report, images),
        details=[{"name": n, "fields": _run_fields(report["runs"][n])} for n in names],
    )


def _metric_table(report: dict) -> list[dict]:
    """Rows of the metrics table: {'group': heading} or {'label', 'cells': [{'text', 'best'}]}."""
    names, runs = report["run_names"], report["runs"]
    hist = report["true_histogram"]
    rows = []
    for key, label, better in TABLE_ROWS:
        if key == "recall_0":
            rows.append(_group_row("per-bracket recall"))
        if key == "skipped_images":
            rows.append(_group_row("data"))
        if key == "top_k_precision":
            label = f"top-K precision (K = {report['top_k']})"
        if key.startswith("recall_"):
            label = f"{label} (n = {hist[int(key.split('_')[1])]})"
        arrow = {"low": " ↓", "high": " ↑"}.get(better, "")
        best = report["best"].get(key, [])
        rows.append(_row(label + arrow, [(_fmt(runs[n]["metrics"].get(key), key), n in best) for n in names]))
    if report["pool"]:
        rows.append(_group_row(f"unlabeled pool ({report['pool']['source']})"))
        pools = [runs[n].get("pool") or {} for n in names]
        for key, label in POOL_ROWS:
            rows.append(_row(label, [(_fmt(p.get(key)), False) for p in pools]))
        for key, label in POOL_TRUTH_ROWS:
            vals = [(p.get("pseudo_label_quality") or {}).get(key) for p in pools]
            if any(v is not None for v in vals):
                rows.append(_row(label, [(_fmt(v), False) for v in vals]))
    return rows


def _rater_table(report: dict) -> list[dict]:
    """Rows of the per-rater table ({'rater', 'n', 'mean_true', 'cells': [{'text', 'best'}]}):
    each run's QWK / MAE against that rater's scores, the best QWK in bold; [] without raters."""
    names, runs = report["run_names"], report["runs"]
    first = runs[names[0]].get("per_rater") if names else None
    if not first:
        return []
    rows = []
    for rater, base in first.items():
        vals = {n: (runs[n].get("per_rater") or {}).get(rater) or {} for n in names}
        best = best_runs({n: v.get("qwk") for n, v in vals.items()}, "high")
        cells = [{"text": f"{_fmt(v.get('qwk'))} / {_fmt(v.get('mae'))} / {_fmt(v.get('mean_pred'))}", "best": n in best}
                 for n, v in vals.items()]
        rows.append({"rater": rater, "n": base["num_images"], "mean_true": _fmt(base["mean_true"]), "cells": cells})
    return rows


def _group_row(heading: str) -> dict:
    return {"group": heading, "label": None, "cells": []}


def _row(label: str, cells: list[tuple[str, bool]]) -> dict:
    return {"group": None, "label": label, "cells": [{"text": t, "best": b} for t, b in cells]}


def _plot_sections(report: dict, images: dict[str, Png]) -> list[dict]:
    """The per-run plots: one section per kind, one figure per run ({'head', 'alt', 'uri' or None})."""
    runs = report["runs"]
    sections = []
    for key, title, caption in PLOT_SECTIONS:
        figures = []
        for n in report["run_names"]:
            img = images.get(f"{key}/{n}")
            ece = runs[n]["metrics"].get("ece")
            extra = f" · ECE {ece:.3f}" if key == "reliability" and ece is not None else ""
            figures.append({"head": n + extra, "alt": f"{key} {n}", "uri": _uri(img) if img else None})
        sections.append({"title": title, "caption": caption, "figures": figures})
    return sections


def _grid_sections(names: list[str], images: dict[str, Png], grids: dict) -> list[dict]:
    """The image grids: one section per kind, one grid per run ({'name', 'alt', 'uri' or None})."""
    sections = []
    for kind, (_, title, caption) in grids.items():
        items = []
        for n in names:
            img = images.get(f"grid_{kind}/{n}")
            items.append({"name": n, "alt": f"{title} {n}", "uri": _uri(img) if img else None,
                          "empty": "this run trained on no corrections" if kind == "corrected" else
                          "no such images in the scored set"})
        sections.append({"title": title, "caption": caption, "grids": items})
    return sections


def _saliency_view(report: dict) -> dict | None:
    """What the grids' saliency caption says: settings, the model's view size and each
    run's largest convergence delta; None without --saliency."""
    settings = report.get("saliency")
    if not settings:
        return None
    runs = report["runs"]
    sizes = sorted({int(runs[n]["image_size"]) for n in report["run_names"] if runs[n].get("image_size")})
    deltas = [f"{n}: {_fmt((runs[n].get('saliency') or {}).get('max_abs_convergence_delta'))}" for n in report["run_names"]]
    baseline = {"black": "a black image", "blur": "the image blurred"}.get(settings["baseline"], settings["baseline"])
    return {"baseline": baseline, "steps": settings["steps"], "sizes": " / ".join(f"{s} px" for s in sizes),
            "deltas": ", ".join(deltas)}


def _pseudo_figures(report: dict, images: dict[str, Png]) -> list[dict]:
    """Pseudo-label quality per run ({'name', 'uri' or None, 'truth'}); [] when no run has one."""
    names = report["run_names"]
    if not report["pool"] or not any(f"pseudo/{n}" in images for n in names):
        return []
    out = []
    for n in names:
        img = images.get(f"pseudo/{n}")
        truth = (report["runs"][n].get("pool") or {}).get("truth")
        out.append({"name": n, "uri": _uri(img) if img else None, "truth": str(truth)})
    return out


def _thresholds_text(thr: list) -> str:
    if len(thr) != NUM_BRACKETS:
        return f"none in the model ({DEFAULT_THRESHOLD} assumed)"
    if max(thr) - min(thr) < 1e-9:
        return f"{thr[0]:.3f} (all brackets)"
    return ", ".join(f"{b}: {t:.2f}" for b, t in enumerate(thr))


def _percent(v) -> str:
    return "—" if v is None else f"{v:.0f}%"


def _run_fields(r: dict) -> list[tuple[str, object]]:
    """(label, value) pairs of one run's details."""
    fields = [("input", r["source"]), ("model folder", r["model_dir"]), ("run folder", r["run_dir"] or "—"),
              ("architecture", r["architecture"]), ("image size", f"{r['image_size']} px"),
              ("algorithm", r.get("algorithm") or "—"), ("target", r.get("target") or "classification"),
              ("trained steps", r.get("trained_steps") or "—"),
              ("pseudo-label thresholds", _thresholds_text(r.get("model_thresholds") or []))]
    tiles = r.get("tiles") or {"n": 1}
    if tiles.get("n", 1) > 1:
        fields.append(("tiled inference", TileSettings(tiles["n"], tiles["reduce"], tiles["scale"]).describe()))
    c = r.get("corrections")
    if c:
        fields.append(("corrections", f"{c['images']} image(s) decided in {', '.join(c.get('files') or [])} "
                                      f"({c.get('accept')} accepted, {c.get('rescore')} re-scored, {c.get('reject')} "
                                      f"rejected); the model now: MAE {_fmt(c.get('labels_mae'))} against the "
                                      f"person's scores, rejected images at {_percent(c.get('rejected_mean_percent'))} "
                                      "on average"))
    lt = r.get("last_training_eval")
    if lt:
        fields.append(("last training eval", f"step {lt.get('step')}: MAE {_fmt(lt.get('mae'))}, QWK {_fmt(lt.get('qwk'))}, "
                                             f"FPR {_fmt(lt.get('false_positive_rate'))}"))
    return fields
