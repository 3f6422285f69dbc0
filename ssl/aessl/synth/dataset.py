"""generate(): the data set folder, drawn in parallel and deterministically, written so
that a half-written set is never mistaken for a whole one."""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ..fileio import write_atomic, write_text_atomic
from . import scores  # the difficulty knobs, recorded in synth.json
from .preview import make_preview
from .render import NUISANCE_COLUMNS, render_image
from .scores import (
    ATTRIBUTE_COLUMNS, NUM_BRACKETS, SPLITS, UNLABELED_DISTRIBUTIONS, noisy_labels, percentile_scores, rater_params,
    rater_scores, ratings, split_brackets, weak_signal_raw,
)

#: Bump when the images or the truth columns change: part of the cache key in synth.json.
GENERATOR_VERSION = 1

_ID_PREFIX = {"labeled": "l", "test": "t", "unlabeled": "u"}
_OWNED = ("labeled", "test", "unlabeled", "preview", "truth.parquet", "truth.parquet.tmp", "synth.json.tmp",
          "weak_signal.csv", "weak_signal.csv.tmp", "ratings.csv", "ratings_test.csv", "consensus_test.csv")
WEAK_MANIFEST = "weak_signal.csv"
#: --rater-groups: every labeled / test image rated by several raters (path, score, rater), and
#: the test images' consensus score (path, score), all paths relative to the set folder
RATINGS_MANIFESTS = {"labeled": "ratings.csv", "test": "ratings_test.csv"}
CONSENSUS_MANIFEST = "consensus_test.csv"
_MARKER = ".synth-incomplete"
_CHUNK = 32  # images per task handed to a worker

# --------------------------------------------------------------------------------------
# Workers: each renders chunks of (split, index, bracket, path) and writes the PNGs

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


def _render_all(tasks: list, cfg: dict, workers: int, progress: bool) -> list[dict]:
    """Truth rows of all tasks, in task order whatever the number of workers."""
    chunks = [tasks[i:i + _CHUNK] for i in range(0, len(tasks), _CHUNK)]
    rows: list[dict] = []
    with tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress, file=sys.stderr) as bar:
        if workers == 1 or len(chunks) <= 1:
            _init_worker(cfg)
            for c in chunks:
                rows += _render_chunk(c)
                bar.update(len(c))
        else:
            with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
                for part in pool.imap(_render_chunk, chunks):
                    rows += part
                    bar.update(len(part))
    return rows


# --------------------------------------------------------------------------------------
# The folder: what is ours, the plan of files, truth.parquet, synth.json


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


def _plan(out: Path, seed: int, sizes: dict, label_noise: float, unlabeled_dist: str):
    """Tasks (split, index, bracket, relative path) and each image's label, with the
    folders they go to created."""
    tasks, labels = [], {}
    for split in ("labeled", "test", "unlabeled"):
        n = sizes[split]
        br = split_brackets(seed, split, n, unlabeled_dist)
        lab = noisy_labels(seed, br, label_noise) if split == "labeled" else br
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
    return tasks, labels


def _columns(raters: int, weak: bool = False, groups: bool = False):
    cols = [("path", "str"), ("split", "str"), ("index", "int"), ("bracket", "int"), ("score", "float"),
            ("label", "int"), ("category", "str")]
    cols += [(k, "float") for k in ATTRIBUTE_COLUMNS]
    cols += list(NUISANCE_COLUMNS)
    if raters:
        cols += [("rater", "int")] + [(f"rater_{k}", "float") for k in range(raters)]
    if groups:
        cols += [("consensus", "float")]
    if weak:
        cols += [("weak_signal", "float")]
    return cols


def _write_truth(path: Path, rows: list[dict], raters: int, weak: bool = False, groups: bool = False) -> None:
    types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
    arrays, fields = [], []
    for name, typ in _columns(raters, weak, groups):
        vals = [r.get(name) for r in rows]
        if typ == "float":
            vals = [None if v is None else float(v) for v in vals]
        arrays.append(pa.array(vals, type=types[typ]))
        fields.append(pa.field(name, types[typ]))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _read_manifest(out: Path):
    try:
        return json.loads((out / "synth.json").read_text())
    except (OSError, ValueError):
        return None


def _checked_args(labeled, unlabeled, test, size, seed, label_noise, raters, unlabeled_dist,
                  weak: bool = False, rater_groups: int = 0, ratings_per_image: int = 3) -> dict:
    """The arguments as recorded in synth.json (the cache key: keep its keys and order, or
    every set already generated stops counting as up to date). Optional features add a key
    only when on (--weak-signal: "weak_signal", its parameters), so a set drawn without them
    keeps its key."""
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
            "knobs": {"attribute_visibility": scores.ATTRIBUTE_VISIBILITY, "render_jitter": scores.RENDER_JITTER,
                      "nuisance_strength": scores.NUISANCE_STRENGTH, "attribute_spread": scores.ATTRIBUTE_SPREAD}}
    if weak:
        args["weak_signal"] = dict(scores.WEAK_SIGNAL)
    if rater_groups:
        if not 1 <= int(rater_groups) <= int(raters):
            raise ValueError(f"rater_groups must be between 1 and raters ({raters}), got {rater_groups!r}")
        if not 1 <= int(ratings_per_image) <= int(raters):
            raise ValueError(f"ratings_per_image must be between 1 and raters ({raters}), got {ratings_per_image!r}")
        args["rater_groups"] = {"groups": int(rater_groups), "ratings_per_image": int(ratings_per_image),
                                **scores.RATER_GROUPS}
    return args


def _add_weak_signal(out: Path, seed: int, rows: list[dict]) -> dict:
    """Set every row's "weak_signal" (raw; None off the pool), write weak_signal.csv (path,
    score: 10 x the pool percentile of the raw signal, paths relative to the set folder, as
    data.py reads a manifest) and return the summary recorded in synth.json."""
    from scipy.stats import spearmanr

    raw = weak_signal_raw(seed, rows)
    pool = [r for r in rows if r["split"] == "unlabeled"]
    for r in rows:
        r["weak_signal"] = raw.get(r["index"]) if r["split"] == "unlabeled" else None
    values = [r["weak_signal"] for r in pool]
    pct = percentile_scores(values)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "score"])
    for r, p in zip(pool, pct):
        w.writerow([r["path"], f"{p:.6f}"])
    write_text_atomic(out / WEAK_MANIFEST, buf.getvalue())
    rho = float(spearmanr(values, [r["score"] for r in pool]).statistic) if len(pool) > 2 else float("nan")
    return {"manifest": WEAK_MANIFEST, "truth_column": "weak_signal", "params": dict(scores.WEAK_SIGNAL),
            "formula": scores.WEAK_SIGNAL_FORMULA,
            "manifest_score": "10 * (rank - 0.5) / n over the pool, ties averaged",
            "spearman_vs_score": None if math.isnan(rho) else round(rho, 4)}


def _write_ratings(out: Path, seed: int, rows: list[dict], params: list[dict], per_image: int) -> dict:
    """ratings.csv / ratings_test.csv (path, score, rater: `per_image` raters per image) and
    consensus_test.csv (path, score: the test images' consensus); returns their names."""
    files = {}
    for split, name in RATINGS_MANIFESTS.items():
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "score", "rater"])
        for path, rater, rating in ratings(seed, rows, params, per_image, split):
            w.writerow([path, rating, f"r{rater:02d}"])
        write_text_atomic(out / name, buf.getvalue())
        files[f"ratings_{split}"] = name
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "score"])
    for r in rows:
        if r["split"] == "test":
            w.writerow([r["path"], f"{r['consensus']:.4f}"])
    write_text_atomic(out / CONSENSUS_MANIFEST, buf.getvalue())
    files["consensus_test"] = CONSENSUS_MANIFEST
    return files


def _manifest(args: dict, rows: list[dict], params: list[dict], weak: dict | None = None,
              rating_files: dict | None = None) -> dict:
    counts = {}
    for split in SPLITS:
        c = [0] * NUM_BRACKETS
        for r in rows:
            if r["split"] == split:
                c[r["bracket"]] += 1
        counts[split] = c
    noisy = sum(1 for r in rows if r["split"] == "labeled" and r["label"] != r["bracket"])
    files = {"truth": "truth.parquet", "labeled": "labeled/<label>/", "test": "test/<bracket>/",
             "unlabeled": "unlabeled/"}
    extra = {}
    if weak is not None:
        files["weak_signal"] = WEAK_MANIFEST
        extra["weak_signal"] = weak
    files.update(rating_files or {})
    return {
        "args": args,
        "counts": {s: {"total": sum(c), "per_bracket": c} for s, c in counts.items()},
        "label_noise_moved": noisy,
        "bracket_rule": "bracket = clip(floor(score + 0.5), 0, 10)",
        "raters": params,
        "files": files,
        **extra,
    }


def generate(out_dir, labeled: int = 3080, unlabeled: int = 20000, test: int = 1000, size: int = 64, seed: int = 0,
             workers: int | None = None, label_noise: float = 0.0, raters: int = 0, unlabeled_dist: str = "crawl",
             preview: bool = False, progress: bool = True, weak_signal: bool = False, rater_groups: int = 0,
             ratings_per_image: int = 3) -> dict:
    """Write the synthetic benchmark into out_dir and return the content of synth.json.

    If out_dir/synth.json already records the same arguments, nothing is regenerated (a
    preview is still drawn if asked for and missing). Output is byte-identical for a given
    seed whatever `workers` is. `weak_signal` adds the pool's weak signal (a truth column
    and weak_signal.csv; see the package docstring) and changes nothing else. `rater_groups`
    (with `raters`) draws the raters in taste groups and writes ratings.csv, ratings_test.csv
    (`ratings_per_image` raters per image) and consensus_test.csv; without it the set is as
    before, byte for byte.
    """
    t0 = time.time()
    weak_on = bool(weak_signal)
    args = _checked_args(labeled, unlabeled, test, size, seed, label_noise, raters, unlabeled_dist, weak_on,
                         rater_groups, ratings_per_image)
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
    sizes = {"labeled": labeled, "test": test, "unlabeled": unlabeled}
    tasks, labels = _plan(out, seed, sizes, label_noise, unlabeled_dist)

    cfg = {"out": str(out), "seed": int(seed), "size": int(size)}
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    rows = _render_all(tasks, cfg, workers, progress)
    for r in rows:
        r["label"] = labels[(r["split"], r["index"])]
    params = rater_params(seed, raters, rater_groups)
    rater_scores(seed, rows, params)
    weak = _add_weak_signal(out, seed, rows) if weak_on else None
    rating_files = _write_ratings(out, seed, rows, params, ratings_per_image) if rater_groups else None
    _write_truth(out / "truth.parquet", rows, raters, weak_on, bool(rater_groups))
    manifest = _manifest(args, rows, params, weak, rating_files)
    if preview:
        make_preview(out, rows)
    elapsed = time.time() - t0
    write_text_atomic(out / "synth.json", json.dumps(manifest, indent=2, sort_keys=False) + "\n")  # last: its presence means the set is whole
    (out / _MARKER).unlink(missing_ok=True)
    print(f"wrote {len(tasks)} images ({labeled} labeled, {test} test, {unlabeled} unlabeled) at {size} px "
          f"to {out} in {elapsed:.1f} s with {workers} worker(s)", file=sys.stderr)
    return manifest
