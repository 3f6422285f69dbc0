"""What to label next: a queue of pool images whose labels would teach the model most.

    from aessl.active import ModelFeatures, build_queue
    rows = build_queue("exports/pool", 100, other_exports=["exports/pool-seed1"],
                       features=ModelFeatures("runs/demo"),     # or {path: vector}, or None
                       exclude=already_labeled_paths)
    # [{'path', 'expected_score', 'bracket', 'uncertainty', 'disagreement', 'priority', 'rank'}, ...]

The CLI is ssl/label_next.py; the measurement against random picks is
benchmarks/active_learning.py (docs/active_learning.md). Three steps, each a small function:

1. Priority, per pool image of an export (ssl/export.py's folder):
   `uncertainty` = the standard deviation of the bracket under the model's 11 bracket
   probabilities, in brackets. Why not entropy: entropy ignores that brackets are ordered.
   Half the mass on 4 and half on 5 is a model that knows the image is "about 4.5"; half on
   0 and half on 10 is a model that cannot tell a meme from a masterpiece. Both have the same
   entropy (log 2), their standard deviations are 0.5 and 5. A label of the second kind moves
   the expected score (the number a user sorts by) ten times as far, and a photo scored 50%
   is the model card's worst error: that is the label worth asking for.
   With other exports of the same pool (another run, or the EMA model vs the student),
   `disagreement` = |expected score a - expected score b| (mean over the other exports) is
   added, normalised to a standard deviation: x sqrt(pi)/2, since two draws of a score of
   standard deviation s differ by 2s/sqrt(pi) on average. Both terms are then standard
   deviations in brackets (the model's own doubt about the bracket, and how much the runs'
   scores vary), and an image's priority does not depend on the rest of the pool: a
   normalisation by pool statistics (e.g. equal means) would blow up the noise of two runs
   that agree almost everywhere.
2. Exclusion: images already labeled or corrected (`exclude`: paths) are dropped, matched as
   aessl.overlap matches test images: the same file (any spelling or symlink of the path) or
   identical bytes (a copy under another name). Pool rows are checked in priority order
   only until enough candidates are kept, so a huge pool costs a few thousand `stat`s.
3. Selection (`select`): the top `candidates` (default 5n) by priority, then a
   *priority-weighted k-center greedy* on cosine distance between feature vectors: the first
   pick is the highest priority; each next pick maximises
       (cosine distance to the nearest image already picked) x w,
       w = 0.5 + 0.5 x (priority - lowest candidate priority) / (priority range)  in [0.5, 1].
   A near-copy of a picked image has distance ~0 and is not picked while any candidate
   unlike everything picked is left (a factor of at most 2 from the priority cannot lift a
   distance of ~0 above a real one); between candidates equally far from the queue the more
   uncertain one wins. Deterministic: ties go to the higher priority, then the lower index.
   Features: a mapping path -> vector (e.g. an embedding cache read into memory), or a
   callable on a list of paths (`model_features`: the pooled backbone features of the
   run's own model, so "alike" means alike to the model being improved). Only the candidates'
   features are ever asked for. Without features the queue is the top n by priority.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import MANIFEST_SUFFIXES, DataSourceError, EvalDataset, _walk_files, read_manifest
from .fileio import write_text_atomic
from .images import is_image_file
from .metrics import BRACKETS, NUM_BRACKETS, expected_score
from .models import load_model_folder
from .overlap import TestIndex
from .pseudo import PseudoLabelError, read_export
from .transforms import eval_transform

log = logging.getLogger(__name__)

DEFAULT_CANDIDATE_FACTOR = 5  # candidates = 5 x n: room to skip near-copies, still the uncertain end of the pool
QUEUE_COLUMNS = ("rank", "path", "expected_score", "bracket", "uncertainty", "disagreement", "priority")


class ActiveLearningError(ValueError):
    """Bad input (an export folder that is not one, pools that do not match, missing
    features): the message names the folder or path; ssl/label_next.py exits 2."""


# --------------------------------------------------------------------------- priority


def _as_probs(probs, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != NUM_BRACKETS:
        raise ValueError(f"{name}: expected [N, {NUM_BRACKETS}] bracket probabilities, got shape {p.shape}")
    return p


def uncertainty(probs: np.ndarray) -> np.ndarray:
    """Ordinal uncertainty of [N, 11] bracket distributions: the standard deviation of the
    bracket under each distribution, in brackets (0 when all mass is on one bracket, 5 when
    it is split between brackets 0 and 10). Rows are renormalised (export's float32
    probabilities sum to 1 only within rounding)."""
    p = np.clip(_as_probs(probs), 0.0, None)
    total = p.sum(axis=1, keepdims=True)
    p = p / np.where(total > 0, total, 1.0)
    mean = p @ BRACKETS
    var = p @ (BRACKETS.astype(np.float64) ** 2) - mean**2
    return np.sqrt(np.clip(var, 0.0, None))


def disagreement(probs_a: np.ndarray, probs_b: np.ndarray) -> np.ndarray:
    """|expected score of a - expected score of b| per row, in brackets: two runs, or the
    EMA model vs the student, scoring the same images (rows aligned)."""
    a, b = _as_probs(probs_a, "probs_a"), _as_probs(probs_b, "probs_b")
    if len(a) != len(b):
        raise ValueError(f"disagreement: {len(a)} rows against {len(b)}; the rows must be the same images")
    return np.abs(expected_score(a) - expected_score(b))


# --------------------------------------------------------------------------- selection


def _unit_rows(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.where(norms > 0, norms, 1.0)  # a zero vector stays zero: distance 1 to everything


def _by_priority(priority: np.ndarray) -> np.ndarray:
    """Indices by priority, highest first; ties by index (a stable sort of -priority)."""
    return np.argsort(-priority, kind="stable")


def select(priority: np.ndarray, n: int, features: np.ndarray | None = None,
           candidates: int | None = None) -> np.ndarray:
    """Indices of n rows (fewer when there are fewer rows), in pick order.

    Without features: the n highest priorities. With features ([N, D], one row per priority):
    the top `candidates` (default 5n) by priority, then the priority-weighted k-center greedy
    on cosine distance described in the module docstring."""
    pr = np.asarray(priority, dtype=np.float64).reshape(-1)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not np.isfinite(pr).all():
        raise ValueError(f"priority: {int((~np.isfinite(pr)).sum())} value(s) are not finite")
    n = min(int(n), len(pr))
    order = _by_priority(pr)
    if features is None or n == 0:
        return order[:n]
    feats = np.asarray(features)
    if feats.ndim != 2 or len(feats) != len(pr):
        raise ValueError(f"features: expected [{len(pr)}, D] (one row per priority), got shape {feats.shape}")
    c = DEFAULT_CANDIDATE_FACTOR * n if candidates is None else int(candidates)
    cand = order[:min(len(pr), max(n, c))]
    return cand[_k_center_greedy(pr[cand], _unit_rows(feats[cand]), n)]


def _k_center_greedy(priority: np.ndarray, unit: np.ndarray, n: int) -> np.ndarray:
    """Positions (into the candidates, which come sorted by priority) of n picks."""
    spread = priority.max() - priority.min()
    weight = 0.5 + 0.5 * ((priority - priority.min()) / spread if spread > 0 else np.ones_like(priority))
    picked = [0]  # the highest priority (candidates are sorted, ties by index)
    nearest = 1.0 - unit @ unit[0]  # cosine distance to the nearest picked candidate
    nearest[0] = -np.inf
    for _ in range(n - 1):
        # argmax returns the first maximum: among equal scores the higher priority (sorted order)
        j = int(np.argmax(np.where(np.isfinite(nearest), np.clip(nearest, 0.0, None) * weight, -np.inf)))
        picked.append(j)
        nearest = np.minimum(nearest, 1.0 - unit @ unit[j])
        nearest[picked] = -np.inf
    return np.asarray(picked, dtype=np.int64)


# --------------------------------------------------------------------------- exports -> queue


def read_pool_export(folder: str | Path) -> dict:
    """{'paths', 'probs', 'scores', 'manifest'} of a finished ssl/export.py folder (every
    shard and row checked by aessl.pseudo's reader); a path scored twice keeps its first row."""
    folder = Path(folder)
    try:
        exp = read_export(folder, accepted_only=False, band=None)
    except PseudoLabelError as exc:
        raise ActiveLearningError(str(exc).removeprefix("data.pseudo_labels: ")) from None
    paths = [str(p) for p in exp["paths"]]
    first = {}
    for i, p in enumerate(paths):
        first.setdefault(p, i)
    keep = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    return {"paths": [paths[i] for i in keep], "probs": exp["probs"][keep].astype(np.float64),
            "scores": exp["scores"][keep].astype(np.float64), "manifest": exp["manifest"], "folder": folder}


def _disagreement_with(main: dict, others: list[dict]) -> tuple[np.ndarray, list[int]]:
    """Mean |expected score difference| against the other exports, per main row (NaN where no
    other export scored the row), and how many rows each other export shares."""
    where = {p: i for i, p in enumerate(main["paths"])}
    total, count, shared = np.zeros(len(where)), np.zeros(len(where)), []
    for other in others:
        idx = np.array([where.get(p, -1) for p in other["paths"]], dtype=np.int64)
        hit = idx >= 0
        if not hit.any():
            raise ActiveLearningError(f"{other['folder']}: shares no image path with {main['folder']}; other "
                                      "exports must score the same pool")
        total[idx[hit]] += np.abs(main["scores"][idx[hit]] - other["scores"][hit])
        count[idx[hit]] += 1
        shared.append(int(hit.sum()))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.where(count > 0, count, 1), np.nan), shared


# E|a - b| = 2 s / sqrt(pi) for two independent normal draws of standard deviation s
DISAGREEMENT_TO_STD = float(np.sqrt(np.pi) / 2)


def priority_of(unc: np.ndarray, dis: np.ndarray | None) -> np.ndarray:
    """uncertainty + disagreement x sqrt(pi)/2 (the score's standard deviation across runs
    that the mean gap implies; 0 where no other export scored the row)."""
    if dis is None:
        return unc.copy()
    return unc + DISAGREEMENT_TO_STD * np.nan_to_num(dis, nan=0.0)


def _features_for(features, paths: list[str]) -> np.ndarray:
    if callable(features):
        out = np.asarray(features(list(paths)), dtype=np.float64)
        if out.ndim != 2 or len(out) != len(paths):
            raise ActiveLearningError(f"features: the callable returned shape {out.shape} for {len(paths)} paths; "
                                      "expected one row per path")
        return out
    if isinstance(features, Mapping):
        missing = [p for p in paths if p not in features]
        if missing:
            raise ActiveLearningError(f"features: no vector for {len(missing)} candidate image(s), e.g. {missing[0]}")
        return np.stack([np.asarray(features[p], dtype=np.float64).reshape(-1) for p in paths])
    raise TypeError(f"features must be a mapping path -> vector or a callable on a list of paths, "
                    f"not {type(features).__name__}")


def plan_queue(export_dir, n: int, other_exports: Iterable = (), features=None, exclude: Iterable = (),
               candidates: int | None = None) -> tuple[list[dict], dict]:
    """build_queue's rows and what it did: {'pool', 'excluded', 'candidates', 'other_exports'
    ([(folder, shared rows)]), 'diversity' (bool)}."""
    if int(n) != n or n < 1:
        raise ActiveLearningError(f"n must be a positive integer, got {n!r}")
    n = int(n)
    main = read_pool_export(export_dir)
    others = [read_pool_export(o) for o in other_exports]
    unc = uncertainty(main["probs"])
    dis, shared = _disagreement_with(main, others) if others else (None, [])
    pr = priority_of(unc, dis)

    want = len(main["paths"]) if features is None else max(n, DEFAULT_CANDIDATE_FACTOR * n if candidates is None
                                                            else int(candidates))
    exclude = [str(p) for p in exclude]
    index = TestIndex(exclude) if exclude else None
    kept, excluded = [], 0
    for i in _by_priority(pr).tolist():  # only as far down the pool as the candidates reach
        if len(kept) >= (want if features is not None else n):
            break
        if index is not None and index.match(main["paths"][i]) is not None:
            excluded += 1
            continue
        kept.append(i)
    kept = np.asarray(kept, dtype=np.int64)
    if features is not None and len(kept):
        feats = _features_for(features, [main["paths"][i] for i in kept])
        picks = kept[select(pr[kept], n, feats, candidates=len(kept))]
    else:
        picks = kept[:n]
    rows = [{"path": main["paths"][i],
             "expected_score": float(main["scores"][i]),
             "bracket": int(np.argmax(main["probs"][i])),
             "uncertainty": float(unc[i]),
             "disagreement": None if dis is None or np.isnan(dis[i]) else float(dis[i]),
             "priority": float(pr[i]),
             "rank": r + 1} for r, i in enumerate(picks.tolist())]
    info = {"pool": len(main["paths"]), "excluded": excluded, "candidates": int(len(kept)),
            "other_exports": [(str(o["folder"]), s) for o, s in zip(others, shared)],
            "diversity": features is not None}
    return rows, info


def build_queue(export_dir, n: int, other_exports: Iterable = (), features=None,
                exclude: Iterable = ()) -> list[dict]:
    """The n pool images of `export_dir` to label next, best first: rows {path,
    expected_score, bracket, uncertainty, disagreement (None without other exports),
    priority, rank (1-based)}. `other_exports`: export folders of the same pool (matched by
    path); `features`: a mapping path -> vector or a callable on a list of paths (diversity
    step, see the module docstring), None for the top n by priority; `exclude`: paths of
    images already labeled or corrected (same file or same bytes)."""
    return plan_queue(export_dir, n, other_exports, features, exclude)[0]


def exclude_paths(source: str | Path) -> list[str]:
    """Image paths of an --exclude source: every image file below a folder (a labeled/
    bracket tree, a corrections folder), one image file, or the `path` column of a .csv/.jsonl/.parquet
    manifest (relative to the manifest)."""
    source = Path(source)
    if source.is_dir():
        return [str(p) for p in _walk_files(source) if is_image_file(p)]
    if not source.exists():
        raise ActiveLearningError(f"{source}: not found (give a folder of images, an image or a manifest with a "
                                  "'path' column)")
    if is_image_file(source):
        return [str(source)]
    if source.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ActiveLearningError(f"{source}: not a folder, an image nor a .csv/.jsonl/.parquet manifest")
    try:
        records, problems = read_manifest(source, need_score=False)
    except DataSourceError as exc:
        raise ActiveLearningError(str(exc)) from None
    if problems:
        log.warning("%s: %d row(s) without a usable path are ignored (first: %s)", source, len(problems), problems[0])
    return [r["path"] for r in records]


# --------------------------------------------------------------------------- model features


class ModelFeatures:
    """The pooled backbone features of a run's model, as a `features` callable for
    build_queue: the model is loaded once, here (ActiveLearningError naming the folder when it
    does not load), and each call embeds a list of image paths (see model_features)."""

    def __init__(self, model_dir, batch_size: int = 64, device=None, workers: int = 0, progress: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.model, self.info = load_model_folder(model_dir, device=self.device)
        except Exception as exc:  # not a model folder, bad JSON, weights that do not fit the architecture
            raise ActiveLearningError(f"--model {model_dir}: cannot load the model "
                                      f"({type(exc).__name__}: {exc})") from None
        self.embedding = self.info.get("mode", "image") == "embedding"
        self.batch_size, self.workers, self.progress = int(batch_size), int(workers), progress

    def __call__(self, paths: list[str]) -> np.ndarray:
        data = EvalDataset([{"path": p} for p in paths], eval_transform(self.info), int(self.info["image_size"]))
        loader = DataLoader(data, batch_size=self.batch_size, shuffle=False, num_workers=self.workers)
        out, bad = [], 0
        with torch.inference_mode(), tqdm(total=len(paths), desc="features", unit="img", disable=not self.progress,
                                          dynamic_ncols=True, mininterval=1.0) as bar:
            for batch in loader:
                x, ok = batch["x"].to(self.device), batch["ok"]
                f = self.model.backbone(x) if self.embedding else self.model.features(x)
                f = f.float().reshape(len(x), -1) * ok.to(self.device).float()[:, None]
                out.append(f.cpu().numpy())
                bad += int((~ok).sum())
                bar.update(len(x))
        if bad:
            log.warning("model features: %d of %d image(s) could not be read; they get zero features", bad, len(paths))
        return np.concatenate(out) if out else np.zeros((0, int(self.model.num_features)), dtype=np.float32)


def model_features(model_dir, paths: list[str], batch_size: int = 64, device=None, workers: int = 0,
                   progress: bool = True) -> np.ndarray:
    """[len(paths), D] float32: the pooled backbone features (the classifier's input) of each
    image under the run's model (a model/ folder or a run folder), with export's eval
    transform. Image mode: timm's pre-logits features; embedding mode: the frozen backbone's
    features (what the head sees). An unreadable image gets a zero row (cosine distance 1 to
    everything: it never hides a readable one). A tqdm bar counts the images."""
    return ModelFeatures(model_dir, batch_size, device, workers, progress)(paths)


def write_queue_csv(rows: list[dict], path: str | Path) -> None:
    """The queue as CSV (QUEUE_COLUMNS), written atomically; disagreement is empty when
    there were no other exports."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(QUEUE_COLUMNS)
    for r in rows:
        w.writerow([r["rank"], r["path"], f"{r['expected_score']:.4f}", r["bracket"], f"{r['uncertainty']:.4f}",
                    "" if r["disagreement"] is None else f"{r['disagreement']:.4f}", f"{r['priority']:.4f}"])
    path = Path(path)
    if path.parent and not path.parent.exists():
        os.makedirs(path.parent, exist_ok=True)
    write_text_atomic(path, buf.getvalue())
