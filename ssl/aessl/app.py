"""The review app (ssl/app.py): score images, review an export and label what the model
should learn next, in a browser, with every decision written to a corrections CSV at once.

    state = AppState.load("runs/demo", export="exports/pool")      # AppError on bad input
    demo = make_blocks(state)                                       # a gr.Blocks
    demo = build_app("runs/demo", export="exports/pool")            # the two in one call

Three tabs, each a thin layer over plain functions (tested without a browser in
tests/test_app.py):

Score       `Scorer.score(paths)` / `Scorer.score_folder(folder)`: each image through the
            model's eval view (aessl/transforms.py; or `--tiles N` views reduced by
            aessl/tiles.py), aessl/scoring.py's bracket_probs, and export's own
            `score_table` for the numbers, so percent, bracket, confidence and the
            accepted/uncertain verdict are exactly those ssl/export.py writes for the same
            image. Unreadable files become one message each, never an exception. Optional
            integrated-gradients overlay (aessl/saliency.py, as report.py --saliency).
Review      `ExportView`: the rows of an export folder (part-*.parquet, read after
            aessl.pseudo checked its manifest), `ExportView.filter(...)` by bracket, score band,
            confidence, "accepted but uncertain", decision state and top N;
            `ExportView.decide(path, decision, score)` appends to the corrections CSV
            (aessl/corrections.py: accept = the export's expected score, rescore = the
            person's score, reject = no score) before it returns.
Label next  `label_queue(...)`: aessl.active.build_queue over the export, leaving out images
            already decided and the labeled set; `ExportView.decide(..., "rescore",
            source="label_next")` saves a score.

The corrections file defaults to `<export folder>-corrections.csv` next to the export folder
(never inside it: ssl/export.py keeps that folder to itself). Training reads it with
`data.corrections=FILE`.
"""

# (No `from __future__ import annotations`: Gradio reads the handlers' `evt: gr.SelectData`
# annotation at runtime to pass the clicked row, and a string annotation hides it.)
import argparse
import csv
import html
import logging
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from .corrections import CorrectionsError, CorrectionsLog, read_corrections
from .data import DataSourceError, EvalDataset, load_pool
from .images import UnreadableImage, load_image
from .metrics import NUM_BRACKETS
from .scoring import bracket_probs, resolve_precision
from .targets import target_of
from .transforms import eval_transform

log = logging.getLogger("aessl.app")

PROB_COLUMNS = [f"prob_{b}" for b in range(NUM_BRACKETS)]
EXPORT_COLUMNS = ["path", "row", "expected_score", "score_percent", "bracket", "confidence", "accepted", *PROB_COLUMNS]
SORTS = {
    "score, high first": ("score_percent", False),
    "score, low first": ("score_percent", True),
    "confidence, low first": ("confidence", True),
    "confidence, high first": ("confidence", False),
}
DECIDED_FILTERS = ("all", "undecided", "decided")
SCORE_BATCH = 16  # images per forward in the Score tab
THUMB = 192  # gallery thumbnails (px, longest side)
BIG = 1024  # the selected image in Review (px, longest side)
SALIENCY_MAX = 12  # overlays drawn per scoring request (integrated gradients cost ~steps forwards each)
CARDS_MAX = 12  # distributions drawn per scoring request (the table lists every image)
GALLERY_MAX = 48  # images shown per folder scoring (the CSV holds all)
TABLE_MAX = 2000  # rows of the Score tab's table (the CSV holds all)


class AppError(ValueError):
    """Bad input to the app (a model, export, corrections or labeled path): the message names it."""


# --------------------------------------------------------------------------- formatting


def verdict(accepted: bool) -> str:
    return "accepted" if accepted else "uncertain"


def fmt_score(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.2f}"


def distribution_figure(probs_list: list, titles: list[str], expected: list[float] | None = None):
    """A matplotlib Figure of one bar chart per image (11 bracket probabilities, the argmax
    bar darker, a line at the expected score). Figure objects (not pyplot): safe on the
    server's threads."""
    from matplotlib.figure import Figure

    n = max(1, len(probs_list))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 2.4 * rows), layout="constrained")
    for i, probs in enumerate(probs_list):
        ax = fig.add_subplot(rows, cols, i + 1)
        p = np.asarray(probs, dtype=float)
        colours = ["#4c72b0"] * NUM_BRACKETS
        colours[int(p.argmax())] = "#c44e52"
        ax.bar(range(NUM_BRACKETS), p, color=colours)
        if expected is not None and expected[i] is not None:
            ax.axvline(expected[i], color="black", lw=1, ls="--")
        ax.set_xticks(range(NUM_BRACKETS))
        ax.set_ylim(0, max(0.05, float(p.max()) * 1.15))
        ax.set_title(titles[i], fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("bracket", fontsize=8)
    if not probs_list:
        fig.add_subplot(1, 1, 1).set_axis_off()
    return fig


def placeholder(text: str, size: int = THUMB) -> Image.Image:
    """A grey tile saying why there is no image."""
    img = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(img)
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > 22:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    for i, ln in enumerate(lines[:8]):
        draw.text((8, 8 + 14 * i), ln, fill=(60, 60, 60))
    return img


def shrunk(source, size: int) -> Image.Image:
    """The image of `source` fitted into size x size (RGB; any mode load_image reads);
    raises UnreadableImage."""
    img = load_image(source, draft_size=size)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    return img


# --------------------------------------------------------------------------- scoring


def _as_path(item) -> str:
    """A file path from what a Gradio file input gives (a path, a dict, a file object)."""
    if isinstance(item, dict):
        return str(item.get("path") or item.get("name") or "")
    return str(getattr(item, "name", item) if not isinstance(item, (str, os.PathLike)) else item)


def display_name(path: str, original: str | None = None) -> str:
    return original or os.path.basename(path) or path


class Scorer:
    """A model/ folder ready to score single images the way ssl/export.py does.

    `score(paths)` returns one dict per path, in order: {path, name, ok, error, probs (11
    floats), expected_score, score_percent, bracket, confidence, accepted, verdict}; an
    unreadable file has ok False and `error` the reason. The numbers come from
    aessl.export.score_table (the export's own rule for bracket, confidence and accepted)."""

    def __init__(self, model, info: dict, folder: Path, device: torch.device, thresholds: list[float],
                 tiles=None):
        self.model, self.info, self.folder, self.device = model, info, Path(folder), torch.device(device)
        self.thresholds = list(thresholds)
        self.radius = int(info.get("confidence_radius", 0))
        self.dtype = resolve_precision("auto", self.device)
        self.target = target_of(info)
        self.tiles = tiles  # aessl.tiles.TileSettings with n > 1, or None
        self._lock = threading.Lock()  # one forward at a time: Gradio answers on several threads

    @classmethod
    def load(cls, model: str | Path, device: str = "auto", tiles: int = 1, tile_reduce: str | None = None,
             tile_scale: float | None = None) -> "Scorer":
        """Load a model/ folder or run folder with export's loader; AppError naming the
        problem. tiles > 1: score that many crops (aessl/tiles.py; reduce default mean,
        scale default 2), as export.py --tiles does."""
        from . import export as ex
        from .tiles import settings_from_flags

        try:
            dev = ex.resolve_device(device)
            net, info, folder, where = ex.load_scorer(argparse.Namespace(model=str(model), backend="torch", onnx=None),
                                                      dev)
            thresholds, _ = ex.resolve_thresholds(info, where)
        except (ex.ExportError, ValueError) as exc:
            raise AppError(str(exc)) from None
        tiling, problems = settings_from_flags(tiles, tile_reduce, tile_scale)
        if problems:
            raise AppError("; ".join(problems))
        return cls(net, info, folder, dev, thresholds, tiling if tiling.on else None)

    def describe(self) -> str:
        tiles = f"; {self.tiles.describe()}" if self.tiles is not None else ""
        return (f"model `{self.folder}` ({self.info.get('architecture')}, {self.info.get('image_size')} px, "
                f"{self.device.type}{tiles})")

    def _dataset(self, table):
        if self.tiles is not None:
            from .tiles import TiledEvalDataset

            return TiledEvalDataset(table, self.info, self.tiles.n, self.tiles.scale)
        return EvalDataset(table, eval_transform(self.info), int(self.info["image_size"]))

    def _probs(self, loader):
        """(probs [B, 11] numpy, batch) per batch of the loader, through the one scoring path."""
        if self.tiles is not None:
            from .tiles import flatten_tiles, reduce_scored

            scored = reduce_scored(bracket_probs(self.model, flatten_tiles(loader), self.device, self.dtype,
                                                 channels_last=True, target=self.target), self.tiles.reduce)
        else:  # (export's settings: channels_last matters on CUDA only)
            scored = bracket_probs(self.model, loader, self.device, self.dtype, channels_last=True, target=self.target)
        for probs, batch in scored:
            yield np.asarray(probs, dtype=np.float64), batch

    def rows(self, names: list[str], probs: np.ndarray) -> list[dict]:
        """Export's row dicts (path, expected_score, score_percent, bracket, confidence,
        prob_*, accepted) for these probabilities: aessl.export.score_table does the maths."""
        from .export import score_table

        if not len(names):
            return []
        table = score_table(np.arange(len(names)), list(names), probs, self.thresholds, (None, None), {},
                            radius=self.radius)
        return table.to_pylist()

    def score(self, paths: list[str], progress: Callable[[int, int], None] | None = None,
              names: list[str] | None = None, batch_size: int = SCORE_BATCH) -> list[dict]:
        """Score image files (or other load_image sources); one result dict per source, in order."""
        paths = [str(p) for p in paths]
        names = names or [display_name(p) for p in paths]
        results: list[dict | None] = [None] * len(paths)
        data = self._dataset([{"path": p} for p in paths])
        batches = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
        done = 0
        if progress:
            progress(0, len(paths))
        with self._lock:
            for probs, batch in self._probs(batches):
                idx = batch["index"].tolist()
                ok = batch["ok"].tolist()
                good = [j for j, k in enumerate(ok) if k]
                rows = self.rows([paths[idx[j]] for j in good], probs[good])
                for j, row in zip(good, rows):
                    i = idx[j]
                    p = [row[c] for c in PROB_COLUMNS]
                    results[i] = {"path": paths[i], "name": names[i], "ok": True, "error": "", "probs": p,
                                  "expected_score": row["expected_score"], "score_percent": row["score_percent"],
                                  "bracket": row["bracket"], "confidence": row["confidence"],
                                  "accepted": bool(row["accepted"]), "verdict": verdict(row["accepted"]),
                                  "threshold": self.thresholds[row["bracket"]]}
                for j, k in enumerate(ok):
                    if not k:
                        i = idx[j]
                        results[i] = {"path": paths[i], "name": names[i], "ok": False,
                                      "error": batch["reason"][j] or "cannot read the image"}
                done += len(idx)
                if progress:
                    progress(done, len(paths))
        return results

    def score_folder(self, folder: str, progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """Every image of a folder on the server (recursive) or of a manifest with `path`,
        scored; AppError when it is not there or holds no image."""
        folder = (folder or "").strip()
        if not folder:
            raise AppError("give a folder (or a .csv/.jsonl/.parquet manifest) on the server")
        if not os.path.exists(folder):
            raise AppError(f"{folder}: not found on the server")
        try:
            pool = load_pool(os.path.abspath(folder))
        except DataSourceError as exc:
            raise AppError(str(exc)) from None
        except Exception as exc:
            raise AppError(f"{folder}: cannot read it ({type(exc).__name__}: {exc})") from None
        if "path" not in pool.column_names or len(pool) == 0:
            raise AppError(f"{folder}: no image files found")
        paths = [str(p) for p in pool["path"]]
        return self.score(paths, progress=progress, names=[os.path.relpath(p, folder) if os.path.isdir(folder)
                                                           else os.path.basename(p) for p in paths])

    def saliency(self, paths: list[str], steps: int = 50, size: int = 384) -> list[Image.Image | None]:
        """The integrated-gradients overlay of each path (aessl/saliency.py; None where unreadable)."""
        from .saliency import SaliencyOptions, overlay, saliency_maps

        with self._lock:
            res = saliency_maps(self.model, self.info, list(paths), self.device, SaliencyOptions(steps=int(steps)))
        return [None if v is None else overlay(v, h, size) for v, h in zip(res.views, res.heat)]


def score_summary(results: list[dict]) -> str:
    """Markdown: one line per image (percent, expected score, bracket, confidence, verdict),
    one per unreadable file with its reason."""
    if not results:
        return "No images given."
    lines = []
    ok = [r for r in results if r["ok"]]
    bad = [r for r in results if not r["ok"]]
    for r in ok[:200]:
        lines.append(f"- **{html.escape(r['name'])}**: **{r['score_percent']:.1f}%** (expected score "
                     f"{r['expected_score']:.2f}, bracket {r['bracket']}, confidence {r['confidence']:.2f}) "
                     f"**{r['verdict']}**")
    if len(ok) > 200:
        lines.append(f"- ... and {len(ok) - 200} more in the table and the CSV")
    for r in bad[:50]:
        lines.append(f"- **{html.escape(r['name'])}**: could not be read: {html.escape(r['error'])}")
    if len(bad) > 50:
        lines.append(f"- ... and {len(bad) - 50} more unreadable files")
    head = f"{len(ok)} image(s) scored" + (f", {len(bad)} unreadable" if bad else "") + "."
    return head + "\n\n" + "\n".join(lines)


def score_table_frame(results: list[dict], limit: int = TABLE_MAX):
    """The Score tab's table (pandas), best first, unreadable files last with their reason;
    at most `limit` rows (the CSV download holds them all)."""
    import pandas as pd

    rows = [{"image": r["name"], "score %": round(r["score_percent"], 2), "expected": round(r["expected_score"], 3),
             "bracket": r["bracket"], "confidence": round(r["confidence"], 3), "verdict": r["verdict"], "error": ""}
            for r in results if r["ok"]]
    rows.sort(key=lambda r: -r["score %"])
    rows += [{"image": r["name"], "score %": None, "expected": None, "bracket": None, "confidence": None,
              "verdict": "unreadable", "error": r["error"]} for r in results if not r["ok"]]
    return pd.DataFrame(rows[:limit], columns=["image", "score %", "expected", "bracket", "confidence", "verdict",
                                               "error"])


def write_results_csv(results: list[dict], folder: str | Path) -> Path:
    """All results as a CSV (for the download button)."""
    path = Path(folder) / f"scores-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score_percent", "expected_score", "bracket", "confidence", "accepted", *PROB_COLUMNS,
                    "error"])
        for r in results:
            if r["ok"]:
                w.writerow([r["path"], f"{r['score_percent']:.3f}", f"{r['expected_score']:.4f}", r["bracket"],
                            f"{r['confidence']:.4f}", r["accepted"], *(f"{p:.6f}" for p in r["probs"]), ""])
            else:
                w.writerow([r["path"], "", "", "", "", "", *([""] * NUM_BRACKETS), r["error"]])
    return path


def score_gallery(results: list[dict], overlays: list | None = None, limit: int = GALLERY_MAX) -> list[tuple]:
    """(image, caption) pairs for the Score tab's gallery, best first; with overlays, each
    image is followed by its saliency overlay."""
    order = sorted(range(len(results)), key=lambda i: (not results[i]["ok"], -(results[i].get("score_percent") or 0)))
    items = []
    for i in order[:limit]:
        r = results[i]
        if r["ok"]:
            try:
                img = shrunk(r["path"], 2 * THUMB)
            except UnreadableImage as exc:  # changed on disk since it was scored
                img = placeholder(f"unreadable: {exc.reason}")
            items.append((img, f"{r['name']}: {r['score_percent']:.1f}% ({r['verdict']})"))
            if overlays is not None and overlays[i] is not None:
                items.append((overlays[i], f"{r['name']}: saliency (integrated gradients)"))
        else:
            items.append((placeholder(f"unreadable: {r['error']}"), f"{r['name']}: unreadable"))
    return items


def score_cards_figure(results: list[dict], limit: int = CARDS_MAX):
    """The bracket distributions of the first `limit` readable results (in the given order)."""
    ok = [r for r in results if r["ok"]][:limit]
    return distribution_figure([r["probs"] for r in ok],
                               [f"{r['name'][:28]}: {r['score_percent']:.1f}% {r['verdict']}" for r in ok],
                               [r["expected_score"] for r in ok])


# --------------------------------------------------------------------------- review


def default_corrections_path(export_dir: str | Path) -> Path:
    """`<export folder>-corrections.csv`, next to the export folder (not inside it)."""
    folder = Path(os.path.abspath(export_dir))
    return folder.parent / f"{folder.name}-corrections.csv"


def _key(path: str, base: Path) -> str:
    """The form read_corrections gives a path read from a file in `base` (normalised; a
    relative one, such as a dataset export's image name, relative to that folder)."""
    path = str(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def check_other_exports(view: "ExportView", others: list[str]) -> None:
    """Each --other-export is a finished export sharing images with --export: checked at start,
    as label_next.py does, not when Label next first builds a queue."""
    from .active import ActiveLearningError, read_pool_export

    main = set(view.frame["path"])
    for folder in others:
        try:
            other = read_pool_export(folder)
        except ActiveLearningError as exc:
            raise AppError(f"--other-export {exc}") from None
        if main.isdisjoint(other["paths"]):
            raise AppError(f"--other-export {folder}: shares no image path with --export {view.folder}; other "
                           "exports must score the same pool")


class ExportView:
    """The rows of one finished export, the corrections log beside it, and the decisions made.

    `frame` is a pandas DataFrame of the export's columns (one row per path: a path scored
    twice keeps its first row, as aessl.active does); `decisions` maps a path to its last
    decision row (read back from the corrections file at start, then kept up to date)."""

    def __init__(self, folder: str | Path, corrections: str | Path | None = None):
        import pandas as pd

        from .pseudo import PseudoLabelError, read_manifest

        self.folder = Path(folder)
        try:
            self.manifest = read_manifest(self.folder)
        except PseudoLabelError as exc:
            raise AppError(f"--export {str(exc).removeprefix('data.pseudo_labels: ')}") from None
        parts = []
        for s in self.manifest["shards"]:
            f = self.folder / str(s["file"])
            try:
                parts.append(pq.read_table(f, columns=EXPORT_COLUMNS))
            except Exception as exc:
                raise AppError(f"--export {f}: cannot read the shard ({type(exc).__name__}: {exc}); export again "
                               "into this folder to rewrite it") from None
        table = pa.concat_tables(parts) if parts else None
        frame = table.to_pandas() if table is not None else pd.DataFrame(columns=EXPORT_COLUMNS)
        frame = frame.drop_duplicates("path", keep="first").reset_index(drop=True)
        self.frame = frame
        self.thresholds = list((self.manifest.get("model") or {}).get("thresholds") or [])
        self.corrections_path = Path(corrections) if corrections else default_corrections_path(self.folder)
        self._base = Path(os.path.abspath(self.corrections_path)).parent
        self._keys = [self.key(p) for p in frame["path"]]
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._path_rank = np.empty(len(frame), dtype=np.int64)  # ties in a sort go by path, as export's top N
        self._path_rank[np.argsort(np.asarray(frame["path"], dtype=object).astype(str), kind="stable")] = \
            np.arange(len(frame))

        if _is_inside(self._base, self.folder):
            raise AppError(f"--corrections {self.corrections_path} is inside the export folder {self.folder}; "
                           f"keep it next to the folder (default: {default_corrections_path(self.folder)}): "
                           "ssl/export.py keeps its output folder to itself")
        try:
            self.corrections_log = CorrectionsLog(self.corrections_path)
            self.decisions = dict(read_corrections(self.corrections_path).last)
        except (CorrectionsError, OSError) as exc:
            raise AppError(f"--corrections {self.corrections_path}: {exc}") from None
        self._lock = threading.Lock()
        self._sources = None  # dataset rows of an export of a saved dataset (lazy)
        log.info("review: %d rows of %s, %d decided in %s", len(frame), self.folder, len(self.decisions),
                 self.corrections_path)

    # ---------------------------------------------------------------- rows

    def __len__(self) -> int:
        return len(self.frame)

    def key(self, path: str) -> str:
        """A path as the corrections file's reader keys it."""
        return _key(path, self._base)

    def decision_of(self, path: str) -> dict | None:
        return self.decisions.get(self.key(path))

    def decided_paths(self) -> list[str]:
        return list(self.decisions)

    def row(self, path: str) -> dict:
        i = self._index.get(self.key(path))
        if i is None:
            raise AppError(f"{path}: not a row of the export {self.folder}")
        return self._row_dict(i)

    def _row_dict(self, i: int) -> dict:
        r = self.frame.iloc[int(i)]
        d = self.decisions.get(self._keys[int(i)])
        return {"index": int(i), "path": str(r["path"]), "row": int(r["row"]),
                "expected_score": float(r["expected_score"]), "score_percent": float(r["score_percent"]),
                "bracket": int(r["bracket"]), "confidence": float(r["confidence"]), "accepted": bool(r["accepted"]),
                "probs": [float(r[c]) for c in PROB_COLUMNS],
                "decision": d["decision"] if d else "", "decided_score": d["score"] if d else None}

    def filter(self, brackets: Iterable | None = None, min_percent: float | None = None,
               max_percent: float | None = None, min_confidence: float | None = None,
               max_confidence: float | None = None, accepted_uncertain: bool = False, decided: str = "all",
               sort: str = "score, high first", top: int | None = 100) -> tuple[list[dict], int]:
        """(the first `top` matching rows as dicts, how many rows match in all).

        brackets: keep these argmax brackets (None or empty: all); min/max_percent: the
        score band in percent; min/max_confidence: 0-1; accepted_uncertain: accepted rows
        only, lowest confidence first (the sort is then ignored); decided: all, undecided
        or decided; top: at most this many rows (None or <= 0: all)."""
        f = self.frame
        keep = np.ones(len(f), dtype=bool)
        if brackets:
            keep &= f["bracket"].isin([int(b) for b in brackets]).to_numpy()
        for col, lo, hi in (("score_percent", min_percent, max_percent), ("confidence", min_confidence, max_confidence)):
            if lo is not None and not (isinstance(lo, float) and math.isnan(lo)):
                keep &= (f[col] >= float(lo) - 1e-9).to_numpy()
            if hi is not None and not (isinstance(hi, float) and math.isnan(hi)):
                keep &= (f[col] <= float(hi) + 1e-9).to_numpy()
        if decided not in DECIDED_FILTERS:
            raise AppError(f"decided filter {decided!r}: use one of {', '.join(DECIDED_FILTERS)}")
        if decided != "all":
            has = np.fromiter((k in self.decisions for k in self._keys), dtype=bool, count=len(self._keys)) \
                if self.decisions else np.zeros(len(f), dtype=bool)
            keep &= has if decided == "decided" else ~has
        if accepted_uncertain:
            keep &= f["accepted"].to_numpy(dtype=bool)
            col, ascending = "confidence", True
        else:
            if sort not in SORTS:
                raise AppError(f"sort {sort!r}: use one of {', '.join(SORTS)}")
            col, ascending = SORTS[sort]
        idx = np.flatnonzero(keep)
        values = f[col].to_numpy()[idx].astype(np.float64)
        order = np.lexsort((self._path_rank[idx], values if ascending else -values))
        idx = idx[order]
        total = len(idx)
        if top is not None and int(top) > 0:
            idx = idx[: int(top)]
        return [self._row_dict(i) for i in idx], total

    # ---------------------------------------------------------------- decisions

    def decide(self, path: str, decision: str, score: float | None = None, source: str = "review") -> dict:
        """Write one decision to the corrections CSV now (fsynced) and return its row.
        accept: score = the export's expected score; rescore: `score` (0-10); reject: none.
        AppError for a path that is not in the export or a bad score."""
        row = self.row(path)
        if decision == "accept":
            score = row["expected_score"]
        elif decision == "rescore":
            if score is None or (isinstance(score, float) and math.isnan(score)):
                raise AppError("re-score needs a score 0-10")
        elif decision == "reject":
            score = None
        else:
            raise AppError(f"decision {decision!r}: use accept, rescore or reject")
        with self._lock:
            try:
                written = self.corrections_log.record(row["path"], decision, score, source=source)
            except ValueError as exc:
                raise AppError(str(exc)) from None
            self.decisions.pop(self.key(row["path"]), None)
            self.decisions[self.key(row["path"])] = {**written, "score": None if score is None else float(score)}
        log.info("%s %s%s (%s) -> %s", decision, row["path"], "" if score is None else f" {float(score):.4g}", source,
                 self.corrections_path)
        return written

    # ---------------------------------------------------------------- images

    def source(self, row: dict):
        """What load_image takes for a row: its file, or for an export of a saved dataset the
        dataset's row (read lazily, checked by aessl.pseudo to be the dataset scored)."""
        path = row["path"]
        if os.path.isfile(path):
            return path
        kind = (((self.manifest.get("spec") or {}).get("source") or {}).get("kind"))
        if kind != "dataset":
            return path  # load_image says why it cannot be read
        with self._lock:
            if self._sources is None:
                from .pseudo import PseudoLabelError, resolve_images

                rows = [int(r) for r in self.frame["row"]]
                try:
                    sub, _ = resolve_images(self.folder, {"manifest": self.manifest, "paths": list(self.frame["path"]),
                                                          "rows": rows})
                except PseudoLabelError as exc:
                    raise UnreadableImage(path, str(exc).removeprefix("data.pseudo_labels: ")) from None
                self._sources = sub
        return self._sources[int(row["index"])]["image"]

    def image(self, row: dict, size: int, enlarge: bool = False) -> Image.Image:
        """The row's image fitted into size x size; `enlarge`: a small image is also scaled
        up by a whole factor (nearest neighbour: its pixels stay visible, as in the report)."""
        try:
            img = shrunk(self.source(row), size)
        except UnreadableImage as exc:
            return placeholder(f"cannot show {os.path.basename(row['path'])}: {exc.reason}", size=max(THUMB, size // 2))
        factor = min(8, size // 2 // max(img.size)) if enlarge else 0
        if factor >= 2:
            img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
        return img


def _is_inside(child: Path, parent: Path) -> bool:
    try:
        Path(os.path.abspath(child)).relative_to(os.path.abspath(parent))
        return True
    except ValueError:
        return False


class ThumbCache:
    """A small LRU of thumbnails (path, size) -> image, so paging a review costs no re-decode."""

    def __init__(self, limit: int = 512):
        self.limit, self._items, self._lock = limit, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return value


def decision_text(row: dict) -> str:
    if not row.get("decision"):
        return ""
    if row["decision"] == "reject":
        return "rejected"
    s = row.get("decided_score")
    return f"{'accepted' if row['decision'] == 'accept' else 're-scored'} {s:.2f}" if s is not None else row["decision"]


def review_frame(rows: list[dict]):
    """The Review tab's table (pandas)."""
    import pandas as pd

    return pd.DataFrame([{"#": i + 1, "image": os.path.basename(r["path"]) or r["path"],
                          "score %": round(r["score_percent"], 2), "bracket": r["bracket"],
                          "confidence": round(r["confidence"], 3), "verdict": verdict(r["accepted"]),
                          "decision": decision_text(r), "path": r["path"]} for i, r in enumerate(rows)],
                        columns=["#", "image", "score %", "bracket", "confidence", "verdict", "decision", "path"])


def row_details(row: dict, thresholds: list[float] | None = None) -> str:
    """Markdown of one export row: its numbers, verdict and decision."""
    thr = ""
    if thresholds and len(thresholds) == NUM_BRACKETS:
        t = thresholds[row["bracket"]]
        thr = f" ({'>=' if row['accepted'] else '<'} threshold {t:.2f} of bracket {row['bracket']})"
    d = decision_text(row) or "not decided yet"
    return (f"**{html.escape(os.path.basename(row['path']) or row['path'])}**  \n"
            f"`{html.escape(row['path'])}`  \n"
            f"score **{row['score_percent']:.1f}%** | expected score {row['expected_score']:.2f} | "
            f"bracket {row['bracket']} | confidence {row['confidence']:.3f}{thr} | **{verdict(row['accepted'])}**  \n"
            f"decision: **{d}**")


# --------------------------------------------------------------------------- label next


def parse_score(text) -> float:
    """A typed score (`6`, `6.5`, `6,5`) as a float in 0-10; AppError saying what is wrong."""
    raw = "" if text is None else str(text).strip().replace(",", ".")
    if not raw:
        raise AppError("type a score 0-10 first")
    try:
        score = float(raw)
    except ValueError:
        raise AppError(f"{text!r} is not a number: type a score 0-10") from None
    if not math.isfinite(score) or not 0.0 <= score <= NUM_BRACKETS - 1:
        raise AppError(f"score {raw} is out of range: type a score 0-10")
    return score


def labeled_paths(source: str | Path | None) -> list[str]:
    """Image paths of --labeled (a labeled folder or a manifest with `path`), via aessl.active."""
    if not source:
        return []
    try:
        from .active import ActiveLearningError, exclude_paths
    except ImportError as exc:
        raise AppError(f"--labeled needs aessl/active.py, which cannot be imported ({exc})") from None
    try:
        return exclude_paths(source)
    except ActiveLearningError as exc:
        raise AppError(f"--labeled {exc}") from None


def label_queue(view: ExportView, n: int, labeled: Iterable[str] = (), other_exports: Iterable = (),
                features=None) -> list[dict]:
    """aessl.active.build_queue over the export: the n images whose labels would teach the
    model most, leaving out images already decided in the corrections file and `labeled`."""
    try:
        from .active import ActiveLearningError, build_queue
    except ImportError as exc:
        raise AppError(f"Label next needs aessl/active.py, which cannot be imported ({exc})") from None
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise AppError(f"queue size must be a whole number, got {n!r}") from None
    if n < 1:
        raise AppError("queue size must be at least 1")
    exclude = [*view.decided_paths(), *labeled]
    try:
        return build_queue(view.folder, n, other_exports=tuple(other_exports), features=features, exclude=exclude)
    except ActiveLearningError as exc:
        raise AppError(str(exc)) from None


# --------------------------------------------------------------------------- state + UI


@dataclass
class AppState:
    """Everything the tabs share: the scorer, the export view (None without --export), the
    labeled paths to leave out of the queue, and options."""

    scorer: Scorer
    view: ExportView | None = None
    labeled: list[str] = field(default_factory=list)
    other_exports: list[str] = field(default_factory=list)
    saliency_steps: int = 50
    thumbs: ThumbCache = field(default_factory=ThumbCache)
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="aessl-app-")))

    @classmethod
    def load(cls, model, export=None, corrections=None, labeled=None, device: str = "auto", tiles: int = 1,
             tile_reduce: str | None = None, tile_scale: float | None = None, other_exports: Iterable = (),
             saliency_steps: int = 50) -> "AppState":
        if (corrections or labeled or list(other_exports)) and not export:
            raise AppError("--corrections, --labeled and --other-export belong to the Review and Label next tabs: "
                           "give --export DIR too")
        if saliency_steps < 1:
            raise AppError("--saliency-steps must be at least 1")
        scorer = Scorer.load(model, device, tiles, tile_reduce, tile_scale)
        view = ExportView(export, corrections) if export else None
        others = [str(o) for o in other_exports]
        if view is not None:
            check_other_exports(view, others)
        return cls(scorer, view, labeled_paths(labeled), others, int(saliency_steps))

    def thumb(self, row: dict, size: int = THUMB) -> Image.Image:
        return self.thumbs.get((row["path"], size), lambda: self.view.image(row, size))


# Keyboard shortcuts of the Review tab (pass as launch(head=SHORTCUTS)): a = Accept, r = Reject,
# s = Re-score with the number in the box; ignored while typing in a field or on another tab.
SHORTCUTS = """<script>
document.addEventListener("keydown", (e) => {
  const t = e.target;
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable)) return;
  const id = {a: "review-accept", r: "review-reject", s: "review-rescore"}[e.key];
  const button = id && document.getElementById(id);
  if (button && button.offsetParent !== null) { e.preventDefault(); button.click(); }
});
</script>"""


def build_app(model, export=None, corrections=None, labeled=None, **options):
    """The gr.Blocks of the app for a model/ folder (and optionally an export folder)."""
    return make_blocks(AppState.load(model, export, corrections, labeled, **options))


NO_EXPORT = ("Start the app with `--export DIR` (a folder written by `ssl/export.py`) to review its rows "
             "and label the images the model needs most.")


def make_blocks(state: AppState):
    """The three tabs over `state`. Handlers only call the functions above."""
    import gradio as gr

    view, scorer = state.view, state.scorer
    with gr.Blocks(title="aessl review", analytics_enabled=False) as demo:
        gr.Markdown(f"## Aesthetic scores: score, review, label next\n{scorer.describe()}"
                    + (f" | export `{view.folder}` ({len(view)} rows) | corrections `{view.corrections_path}`"
                       if view else ""))
        with gr.Tab("Score", id="score"):
            _score_tab(gr, state)
        with gr.Tab("Review", id="review"):
            if view is None:
                gr.Markdown(NO_EXPORT)
            else:
                _review_tab(gr, state, demo)
        with gr.Tab("Label next", id="label"):
            if view is None:
                gr.Markdown(NO_EXPORT)
            else:
                _label_tab(gr, state)
    return demo


def _score_tab(gr, state: AppState) -> None:
    """Score: uploaded images or a server folder, scored as export scores them."""
    scorer = state.scorer
    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(label="Images (drop one or more)", file_count="multiple", type="filepath",
                            elem_id="score-files")
            folder = gr.Textbox(label="…or a folder (or manifest) on the server", placeholder="/data/pool",
                                elem_id="score-folder")
            with gr.Row():
                score_btn = gr.Button("Score images", variant="primary", elem_id="score-button")
                folder_btn = gr.Button("Score folder", elem_id="score-folder-button")
            sal = gr.Checkbox(label=f"saliency overlay (integrated gradients, {state.saliency_steps} steps; "
                                    f"first {SALIENCY_MAX} images)", value=False, elem_id="score-saliency")
        with gr.Column(scale=2):
            summary = gr.Markdown("Drop images and press **Score images**.", elem_id="score-summary")
            dist = gr.Plot(label="bracket distributions", elem_id="score-plot")
    gallery = gr.Gallery(label="images (best first)", columns=6, height="auto", elem_id="score-gallery")
    table = gr.Dataframe(label="scores", interactive=False, elem_id="score-table")
    download = gr.File(label="all results (CSV)", visible=False, elem_id="score-csv")

    def _show(results, saliency, originals=None):
        overlays = None
        if saliency:
            ok = [i for i, r in enumerate(results) if r["ok"]][:SALIENCY_MAX]
            maps = scorer.saliency([results[i]["path"] for i in ok], steps=state.saliency_steps)
            overlays = [None] * len(results)
            for i, m in zip(ok, maps):
                overlays[i] = m
        csv_path = write_results_csv(results, state.scratch) if len(results) > 1 else None
        return (score_summary(results), score_cards_figure(sorted(
            results, key=lambda r: -(r.get("score_percent") or 0))), score_gallery(results, overlays),
                score_table_frame(results), gr.update(value=str(csv_path) if csv_path else None,
                                                      visible=csv_path is not None))

    def on_score(paths, saliency, progress=gr.Progress()):
        paths = [_as_path(p) for p in (paths or [])]
        if not paths:
            return ("Drop one or more images first.", None, [], score_table_frame([]),
                    gr.update(visible=False))
        results = scorer.score(paths, progress=lambda d, t: progress((d, t), desc="scoring", unit="images"),
                               names=[display_name(p) for p in paths])
        return _show(results, saliency)

    def on_folder(text, saliency, progress=gr.Progress()):
        try:
            results = scorer.score_folder(text, progress=lambda d, t: progress((d, t), desc="scoring",
                                                                             unit="images"))
        except AppError as exc:
            return f"**{html.escape(str(exc))}**", None, [], score_table_frame([]), gr.update(visible=False)
        return _show(results, saliency)

    outs = [summary, dist, gallery, table, download]
    score_btn.click(on_score, [files, sal], outs)
    folder_btn.click(on_folder, [folder, sal], outs)
    folder.submit(on_folder, [folder, sal], outs)


def review_gallery_items(state: AppState, rows: list[dict]) -> list[tuple]:
    """(thumbnail, 'rank. percent bracket [decision]') per row of the Review gallery."""
    out = []
    for i, r in enumerate(rows):
        d = decision_text(r)
        out.append((state.thumb(r), f"{i + 1}. {r['score_percent']:.1f}% b{r['bracket']}" + (f" [{d}]" if d else "")))
    return out


def review_detail(view: ExportView, rows: list[dict], i):
    """(index, big image, details text, distribution figure, score box default) of row i,
    read fresh (its decision may have changed); (-1, None, 'Click a row.', None, None) for none."""
    if not rows or i is None or not 0 <= int(i) < len(rows):
        return -1, None, "Click a row.", None, None
    i = int(i)
    r = view.row(rows[i]["path"])
    rows[i] = r
    fig = distribution_figure([r["probs"]], [f"{r['score_percent']:.1f}% ({verdict(r['accepted'])})"],
                              [r["expected_score"]])
    default = r["decided_score"] if r["decided_score"] is not None else round(r["expected_score"], 1)
    return i, view.image(r, BIG, enlarge=True), row_details(r, view.thresholds), fig, default


def review_decision_handler(gr, state: AppState, decision: str):
    """The click handler of one Review button: (rows, selected index, score box) -> (status,
    table, gallery update, rows, *review_detail of the next row). The decision is written
    (fsynced) before the page updates; the gallery's captions then show it."""
    view = state.view

    def handler(rows, i, score):
        if not rows or i is None or not 0 <= int(i) < len(rows):
            return ("**Click a row first.**", gr.update(), gr.update(), rows, *review_detail(view, rows, i))
        i = int(i)
        try:
            written = view.decide(rows[i]["path"], decision, None if decision != "rescore" else score, source="review")
        except AppError as exc:
            return (f"**{html.escape(str(exc))}**", gr.update(), gr.update(), rows, *review_detail(view, rows, i))
        rows[i] = view.row(rows[i]["path"])
        what = {"accept": "accepted", "reject": "rejected", "rescore": "re-scored"}[decision]
        msg = (f"{what} {html.escape(os.path.basename(written['path']))}"
               + (f" ({written['score']})" if written["score"] else "") + f", saved to `{view.corrections_path}`")
        nxt = i + 1 if i + 1 < len(rows) else i  # move on to the next row
        return (msg, review_frame(rows), gr.update(value=review_gallery_items(state, rows), selected_index=nxt), rows,
                *review_detail(view, rows, nxt))
    return handler


def _review_tab(gr, state: AppState, demo) -> None:
    """Review: filter the export's rows, look at one, accept / reject / re-score it."""
    view = state.view
    rows_state = gr.State([])
    selected = gr.State(-1)
    with gr.Row():
        brackets = gr.CheckboxGroup(choices=[str(b) for b in range(NUM_BRACKETS)], label="brackets (none: all)",
                                    elem_id="review-brackets")
    with gr.Row():
        min_pct = gr.Slider(0, 100, value=0, step=0.5, label="min score %", elem_id="review-min")
        max_pct = gr.Slider(0, 100, value=100, step=0.5, label="max score %", elem_id="review-max")
        min_conf = gr.Slider(0, 1, value=0, step=0.01, label="min confidence")
        max_conf = gr.Slider(0, 1, value=1, step=0.01, label="max confidence")
        top = gr.Number(label="top N", value=60, precision=0, minimum=1, elem_id="review-top")
    with gr.Row():
        uncertain = gr.Checkbox(label="accepted but uncertain (accepted rows, lowest confidence first)",
                                elem_id="review-uncertain")
        sort = gr.Dropdown(choices=list(SORTS), value="score, high first", label="order")
        decided = gr.Radio(choices=list(DECIDED_FILTERS), value="all", label="decisions")
        show = gr.Button("Show", variant="primary", elem_id="review-show")
    count = gr.Markdown(elem_id="review-count")
    with gr.Row():
        with gr.Column(scale=3):
            rgallery = gr.Gallery(label="matching rows (click one; keys: a accept, r reject, "
                                        "s re-score)", columns=6, height=420,
                                  allow_preview=False, elem_id="review-gallery")
            rtable = gr.Dataframe(label="matching rows", interactive=False, elem_id="review-table")
        with gr.Column(scale=2):
            big = gr.Image(label="selected", type="pil", interactive=False, height=360,
                           elem_id="review-image")
            details = gr.Markdown("Click a row.", elem_id="review-details")
            with gr.Row():
                accept_btn = gr.Button("Accept", variant="primary", elem_id="review-accept")
                reject_btn = gr.Button("Reject", variant="stop", elem_id="review-reject")
            with gr.Row(equal_height=True):
                rescore = gr.Number(label="score 0-10", value=None, minimum=0, maximum=10, step=0.5,
                                    placeholder="0-10", elem_id="review-score", scale=1)
                rescore_btn = gr.Button("Re-score", elem_id="review-rescore", scale=1)
            status = gr.Markdown(elem_id="review-status")
            rplot = gr.Plot(label="bracket distribution", elem_id="review-plot")

    def gallery_items(rows):
        return review_gallery_items(state, rows)

    def detail(rows, i):
        return review_detail(view, rows, i)

    def on_show(b, lo, hi, clo, chi, unc, srt, dec, n):
        try:
            rows, total = view.filter(b, lo, hi, clo, chi, unc, dec, srt, int(n) if n else None)
        except AppError as exc:
            return (f"**{html.escape(str(exc))}**", [], review_frame([]), [], -1, None, "", None, None, "")
        msg = f"{total} row(s) match; showing {len(rows)}."
        return (msg, gallery_items(rows), review_frame(rows), rows, -1, None, "Click a row.", None, None,
                "")

    show_outs = [count, rgallery, rtable, rows_state, selected, big, details, rplot, rescore, status]
    show.click(on_show, [brackets, min_pct, max_pct, min_conf, max_conf, uncertain, sort, decided, top],
               show_outs)
    detail_outs = [selected, big, details, rplot, rescore]

    def on_gallery(rows, evt: gr.SelectData):
        return detail(rows, evt.index)

    def on_table(rows, evt: gr.SelectData):
        i = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return detail(rows, i)

    rgallery.select(on_gallery, [rows_state], detail_outs)
    rtable.select(on_table, [rows_state], detail_outs)

    def decide(decision):
        return review_decision_handler(gr, state, decision)

    decide_outs = [status, rtable, rgallery, rows_state, *detail_outs]
    accept_btn.click(decide("accept"), [rows_state, selected, rescore], decide_outs)
    reject_btn.click(decide("reject"), [rows_state, selected, rescore], decide_outs)
    rescore_btn.click(decide("rescore"), [rows_state, selected, rescore], decide_outs)
    demo.load(on_show, [brackets, min_pct, max_pct, min_conf, max_conf, uncertain, sort, decided, top],
              show_outs)


def _label_tab(gr, state: AppState) -> None:
    """Label next: the active-learning queue, a score box per image."""
    view, scorer = state.view, state.scorer
    excluded = f"; {len(state.labeled)} labeled image(s) left out" if state.labeled else ""
    gr.Markdown("The images whose labels would teach the model most (aessl.active: bracket spread"
                + (", disagreement with the other exports" if state.other_exports else "")
                + f"), leaving out images already decided{excluded}. Saving writes a `rescore` "
                "decision (source `label_next`).")
    queue_state = gr.State([])
    with gr.Row():
        qn = gr.Number(label="how many", value=12, precision=0, minimum=1, elem_id="label-n")
        diverse = gr.Checkbox(label="diverse (k-center on the model's features; slower)", value=False)
        build = gr.Button("Build queue", variant="primary", elem_id="label-build")
    qmsg = gr.Markdown(elem_id="label-status")

    def on_build(n, div, progress=gr.Progress()):
        progress(None)
        features = None
        if div:
            from .active import ModelFeatures

            features = ModelFeatures(scorer.folder, device=scorer.device, progress=False)
        try:
            q = label_queue(view, n, state.labeled, state.other_exports, features)
        except AppError as exc:
            return f"**{html.escape(str(exc))}**", []
        return f"{len(q)} image(s) to label, most useful first.", q

    build.click(on_build, [qn, diverse], [qmsg, queue_state])

    @gr.render(inputs=[queue_state])
    def show_queue(queue):
        for item in queue:
            with gr.Row(variant="panel"):
                r = view.row(item["path"])
                gr.Image(value=state.thumb(r, 256), show_label=False, height=200, interactive=False,
                         scale=1)
                dis = (f" | disagreement {item['disagreement']:.2f}" if item.get("disagreement") is not None
                       else "")
                gr.Markdown(f"**{item['rank']}. {html.escape(os.path.basename(item['path']))}**  \n"
                            f"model: {item['expected_score'] * 10:.1f}% (bracket {item['bracket']}) | "
                            f"spread {item['uncertainty']:.2f} brackets{dis}  \n"
                            f"`{html.escape(item['path'])}`", scale=3)
                with gr.Column(scale=1):
                    # a text box, not gr.Number: an empty Number reads as 0, a real score
                    box = gr.Textbox(label="your score 0-10", value="", placeholder="0-10", max_lines=1,
                                     elem_classes=["label-score"])
                    save = gr.Button("Save", elem_classes=["label-save"])
                    saved = gr.Markdown(decision_text(r), elem_classes=["label-saved"])

                def on_save(text, path=item["path"]):
                    try:
                        score = parse_score(text)
                        view.decide(path, "rescore", score, source="label_next")
                    except AppError as exc:
                        return f"**{html.escape(str(exc))}**"
                    return f"saved {score:g}"

                save.click(on_save, [box], [saved])
                box.submit(on_save, [box], [saved])
