"""Soft labelling from an export: a student trains on the labels plus a teacher's scored pool.

    ssl/train.py ... data.pseudo_labels=exports/pool [data.pseudo_weight=0.5] [data.pseudo_band=[50,100]]

An export folder written by ssl/export.py (manifest.json + part-*.parquet, see aessl.export)
holds, per pool image, the teacher's 11 bracket probabilities, its expected score and
whether the teacher's per-bracket thresholds accept it. Here its rows join the labeled set:

- Reading: the folder must be a finished export (manifest.json says `complete`, every shard
  it lists is there, is parquet, carries the export's fingerprint and the probability
  columns, and every row's probabilities are a distribution). Then the filters:
  `data.pseudo_accepted_only` (default true: rows the thresholds accepted) and
  `data.pseudo_band` ([low, high] on score_percent). A list of folders is read in order.
- Resolving rows to images: an export of files (a folder or a manifest, streamed or not)
  names each image by its absolute path; that path is used (a file gone since is dropped
  and counted). An export of a saved dataset names rows by index: the dataset the export
  recorded is loaded again and must be the one it scored (same row count and `datasets`
  fingerprint, `export.source_identity`), else the rows would point at other images. A
  streamed dataset or Hub source cannot be read back by row and is refused. An export of
  .tar shards (aessl/shards.py, streamed or not) names members `<shard>/<member>`: they are
  found by name in the shards' listing (all must still be there) and read from the shards.
- Dropped: rows whose image is a test image (never trained on), a labeled image (its
  label wins) or rejected in data.corrections, by real path or by identical bytes
  (aessl.overlap); and a second row of the same image (a list of exports that overlap).
- Training: one permutation over labels + pseudo rows (`DrawDataset` / `FeatureDraws` with
  the joined table), so the draw-number determinism and exact resume hold. Every labeled
  batch carries a soft target per row in `y_lb` ([B, 11] float): the one-hot bracket for a
  label (the bracket `bracket_of(score)`, today's hard target, also for fractional scores)
  and `data.pseudo_weight` x the export's probabilities for a pseudo row; `y_score` is the
  export's expected score. A cross-entropy against a scaled distribution is the weighted
  cross-entropy, so every algorithm whose supervised loss is linear in a soft target (USB's
  `ce_loss`, our ordinal's `F.cross_entropy`) trains on it unchanged.
  `data.pseudo_weight=0` reads and checks the export, records it, and trains on the labels
  alone: the run is the labels-only run (an A/B switch).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .data import DataSourceError, TableSources, _is_saved_dataset, load_pool
from .embedding import FeatureTable
from .export import EXPORT_FORMAT, EXPORT_FORMAT_VERSION, META_KEY, PROB_COLUMNS, source_identity
from .metrics import NUM_BRACKETS, bracket_of
from .overlap import TestIndex
from .runfolder import read_run_info
from . import shards

log = logging.getLogger(__name__)

NEEDED = ["path", "row", "expected_score", "score_percent", "accepted", *PROB_COLUMNS]
PROB_TOLERANCE = 1e-3  # float32 probabilities of 11 brackets sum to 1 within ~1e-6; anything far off is not a distribution

# Algorithms whose supervised loss takes y_lb as [B, 11] probabilities and is linear in it
# (USB's ce_loss: sum(-target * log_softmax); ordinal: F.cross_entropy with probability targets).
SOFT_TARGET_ALGORITHMS = ("supervised", "fixmatch", "flexmatch", "freematch", "softmatch", "uda", "pseudolabel",
                          "adamatch", "pimodel", "meanteacher", "ordinal")
HARD_TARGET_ONLY = {
    "mixmatch": "its MixUp mixes the labeled targets as F.one_hot(y_lb), which takes bracket indices, not probabilities",
}


class PseudoLabelError(ValueError):
    """A bad export folder or setting: the message names it (train.py exits 2)."""


# --------------------------------------------------------------------------- settings


def folders_of(setting) -> list[str]:
    """data.pseudo_labels as a list of folders ([] when unset)."""
    if setting is None:
        return []
    if isinstance(setting, str):
        return [setting]
    return [str(f) for f in setting]


def algorithm_refusal(name: str, user_args: dict, weight: float) -> str | None:
    """Why algorithm `name` cannot train on pseudo rows' soft targets, or None."""
    if weight == 0:
        return None  # nothing reaches the loss
    others = ", ".join(SOFT_TARGET_ALGORITHMS)
    if name in HARD_TARGET_ONLY:
        return (f"data.pseudo_labels: algorithm {name!r} cannot train on soft targets: {HARD_TARGET_ONLY[name]}. "
                f"Use one of {others} (supervised is the usual student)")
    if name not in SOFT_TARGET_ALGORITHMS:
        return (f"data.pseudo_labels: algorithm {name!r} is not known to take soft targets in its supervised loss; "
                f"use one of {others}")
    if name == "ordinal" and weight != 1.0 and _ordinal_score_weight(user_args) > 0:
        # ordinal's L1 score term averages |expected - y_score| over the batch with no per-row
        # weight: a pseudo row would count fully there whatever data.pseudo_weight says
        return ("data.pseudo_labels: algorithm 'ordinal' has an expected-score L1 term with no per-row weight, so "
                f"data.pseudo_weight={weight:g} would weight only its cross-entropy; use data.pseudo_weight=1 or "
                "algorithm.args.score_loss_weight=0")
    return None


def _ordinal_score_weight(user_args: dict) -> float:
    if "score_loss_weight" in user_args:
        return float(user_args["score_loss_weight"])
    from .algos.ordinal import OrdinalMatch

    return float(next(a.default for a in OrdinalMatch.get_argument() if a.name.lstrip("-") == "score_loss_weight"))


# --------------------------------------------------------------------------- reading an export


def _fail(folder, what: str) -> PseudoLabelError:
    return PseudoLabelError(f"data.pseudo_labels: {folder}: {what}")


def read_manifest(folder: Path) -> dict:
    """The finished export's manifest.json, or PseudoLabelError saying what the folder is not."""
    if not folder.exists():
        raise _fail(folder, "not found (give the --out folder of ssl/export.py)")
    if not folder.is_dir():
        raise _fail(folder, "not a folder (give the --out folder of ssl/export.py, not a file in it)")
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise _fail(folder, "no manifest.json: not an export written by ssl/export.py (give its --out folder)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(mpath, f"unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise _fail(mpath, f"not a manifest of ssl/export.py (format is not {EXPORT_FORMAT!r})")
    if int(manifest.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
        raise _fail(mpath, f"written by a newer export (format version {manifest.get('format_version')}); "
                           "update this checkout")
    if manifest.get("complete") is not True:
        raise _fail(folder, "an unfinished export (manifest.json says complete: false): run the same "
                            "ssl/export.py command again to finish it")
    if not isinstance(manifest.get("shards"), list) or not all(isinstance(s, dict) and "file" in s
                                                               for s in manifest["shards"]):
        raise _fail(mpath, "lists no shards")
    return manifest


def read_shard(path: Path, fingerprint: str):
    """One shard's needed columns as an arrow table, checked: parquet, ours, the columns there."""
    if not path.is_file():
        raise _fail(path, "missing (manifest.json lists it); export again into this folder to rewrite it")
    size = path.stat().st_size
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        why = "an empty file (0 bytes)" if size == 0 else f"not a parquet file ({type(exc).__name__}: {exc})"
        raise _fail(path, f"{why}; export again into this folder to rewrite it") from None
    try:
        meta = json.loads((schema.metadata or {})[META_KEY])
    except Exception:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise _fail(path, "not a shard written by ssl/export.py (no export metadata)")
    if meta.get("fingerprint") != fingerprint:
        raise _fail(path, "comes from another export than manifest.json records (a folder mixed by hand?)")
    missing = [c for c in NEEDED if c not in schema.names]
    if missing:
        raise _fail(path, f"lacks column(s) {', '.join(missing)}; an export has {', '.join(NEEDED)}")
    try:
        return pq.read_table(path, columns=NEEDED)
    except Exception as exc:
        raise _fail(path, f"cannot read its rows ({type(exc).__name__}: {exc})") from None


def check_distributions(path: Path, table) -> np.ndarray:
    """The [n, 11] probabilities of a shard, renormalised; PseudoLabelError naming the first
    row whose probabilities are not a distribution (or whose expected score disagrees)."""
    probs = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in PROB_COLUMNS], 1)
    exp = table.column("expected_score").to_numpy(zero_copy_only=False).astype(np.float64)
    total = probs.sum(axis=1)
    bad = ~np.isfinite(probs).all(axis=1) | (probs < -1e-6).any(axis=1) | (np.abs(total - 1.0) > PROB_TOLERANCE)
    with np.errstate(invalid="ignore"):
        bad |= ~np.isfinite(exp) | (np.abs(probs @ np.arange(NUM_BRACKETS) - exp) > 1e-2)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row, name = table.column("row")[i].as_py(), table.column("path")[i].as_py()
        raise _fail(path, f"row {row} ({name}): prob_0..prob_10 are not a probability distribution (sum "
                          f"{total[i]:.6g}, min {np.nanmin(probs[i]):.3g}) or do not give its expected_score "
                          f"{exp[i]:.4g}; {int(bad.sum())} such row(s)")
    return (np.clip(probs, 0.0, None) / np.clip(probs, 0.0, None).sum(axis=1, keepdims=True)).astype(np.float32)


def read_export(folder: Path, accepted_only: bool, band) -> dict:
    """The export's rows after the filters: {'manifest', 'paths', 'rows', 'scores', 'probs',
    'counts'}; every shard and row checked."""
    manifest = read_manifest(folder)
    parts, probs = [], []
    for s in manifest["shards"]:
        path = folder / str(s["file"])
        t = read_shard(path, manifest.get("fingerprint"))
        probs.append(check_distributions(path, t))
        parts.append(t)
    table = pa.concat_tables(parts) if parts else None
    probs = np.concatenate(probs) if probs else np.zeros((0, NUM_BRACKETS), np.float32)
    n = 0 if table is None else table.num_rows
    accepted = np.zeros(0, bool) if table is None else table.column("accepted").to_numpy(zero_copy_only=False)
    accepted = np.asarray(accepted, dtype=bool)
    keep = accepted.copy() if accepted_only else np.ones(n, bool)
    if band is not None and n:
        pct = table.column("score_percent").to_numpy(zero_copy_only=False)
        keep &= (pct >= band[0]) & (pct <= band[1])
    idx = np.flatnonzero(keep)
    col = (lambda c: table.column(c).take(pa.array(idx)).to_pylist()) if n else (lambda c: [])
    return {"manifest": manifest, "paths": col("path"), "rows": col("row"),
            "scores": np.asarray(col("expected_score"), dtype=np.float32), "probs": probs[idx],
            "counts": {"rows": n, "accepted": int(accepted.sum()), "after_filters": len(idx)}}


# --------------------------------------------------------------------------- rows -> images


def _shard_rows(folder: Path, export: dict, images: str):
    """The shard rows (path + tar columns) of an export of a .tar shard pool, found by member
    name in the shards' listing; None when `images` names no shards."""
    try:
        found = shards.find_shards(images)
    except shards.ShardSourceError as exc:
        raise _fail(folder, f"the export scored the shards {images}, which cannot be found now ({exc})") from None
    if found is None:
        return None
    try:
        pool = load_pool(images, streaming=False)
    except (DataSourceError, OSError) as exc:
        raise _fail(folder, f"the export scored the shards {images}, which cannot be listed now ({exc})") from None
    index = {name: i for i, name in enumerate(pool["path"])}
    rows = [index.get(name) for name in export["paths"]]
    gone = [name for name, i in zip(export["paths"], rows) if i is None]
    if gone:
        raise _fail(folder, f"{len(gone)} of its rows name shard members that are not in {images} now, e.g. "
                            f"{'; '.join(gone[:3])}: the shards changed since the export; export them again")
    return pool.select(rows).select_columns(["path", *shards.TAR_COLUMNS])


def resolve_images(folder: Path, export: dict) -> tuple[list, str]:
    """(an image source per filtered row, 'path' | 'dataset' | 'tar'): file paths where the
    export names files, the shard rows (path + tar columns) of an export of .tar shards,
    else the rows of the dataset it scored (checked to be that dataset)."""
    manifest = export["manifest"]
    ident = (manifest.get("spec") or {}).get("source") or {}
    images = str((manifest.get("source") or {}).get("images", ident.get("source", "")))
    kind = ident.get("kind")
    if kind in ("files", "stream") and not images.startswith("hub:"):
        tar = _shard_rows(folder, export, images)
        if tar is not None:
            return tar, "tar"
    local_files = not images.startswith("hub:") and not _is_saved_dataset(Path(images))
    if kind == "files" or (kind == "stream" and local_files):
        paths = [p if os.path.isabs(p) else os.path.abspath(p) for p in export["paths"]]
        _refuse_changed_images(folder, manifest, paths)
        return paths, "path"
    if kind != "dataset":
        raise _fail(folder, f"exported from a streamed dataset ({images}): its rows cannot be read back by index. "
                            "Supported: exports of a folder or a manifest of files (streamed or not), and of a "
                            "saved dataset without --streaming")
    limit = (manifest.get("spec") or {}).get("limit")
    try:
        pool = load_pool(images, streaming=False, limit=limit)
    except (DataSourceError, OSError) as exc:
        raise _fail(folder, f"the export scored the dataset {images}, which cannot be loaded now ({exc}); its rows "
                            "are found by index in that dataset") from None
    now = source_identity(pool, images, False)
    if now["digest"] != ident.get("digest") or now["rows"] != ident.get("rows"):
        raise _fail(folder, f"the dataset {images} is not the one the export scored ({now['rows']} rows now, "
                            f"{ident.get('rows')} then, or its content changed): its rows would point at other "
                            "images; export it again")
    if "image" not in pool.column_names:
        raise _fail(folder, f"the dataset {images} has no 'image' column")
    sub = pool.select(export["rows"]).select_columns(["image"])
    return sub, "dataset"


def _refuse_changed_images(folder: Path, manifest: dict, paths: list[str]) -> None:
    """An image modified after the export finished holds other pixels than the ones its
    probabilities describe (a re-crawl that overwrote the pool under the same names): refused,
    naming how many. (A file missing now is skipped at training like any unreadable one.)"""
    finished = manifest.get("finished")
    try:
        cut = datetime.fromisoformat(finished).timestamp() + 1.0  # the manifest keeps whole seconds
    except (TypeError, ValueError):
        return  # an export without a finish time (hand-made): nothing to compare with
    changed = []
    for p in paths:
        try:
            if os.stat(p).st_mtime > cut:
                changed.append(p)
        except OSError:
            continue
    if changed:
        raise _fail(folder, f"{len(changed)} of its images were modified after the export finished ({finished}), "
                            f"e.g. {changed[0]}: its scores describe the old pictures; export the pool again")


def _image_key(src) -> str | None:
    """What makes two pseudo rows the same image: the real path, or the bytes' digest."""
    if isinstance(src, dict):
        if src.get("bytes"):
            return "b:" + hashlib.blake2b(src["bytes"], digest_size=16).hexdigest()
        src = src.get("path")
    return None if src is None else "p:" + os.path.realpath(src)


class PseudoSet:
    """Pseudo rows resolved to images: `table` (datasets: 'path' or 'image', and 'score' =
    expected score), `probs` [n, 11] (sum 1), `weight`, and `info` for run.json."""

    def __init__(self, table, probs: np.ndarray, weight: float, info: dict):
        self.table, self.probs, self.weight, self.info = table, probs, float(weight), info

    def __len__(self):
        return len(self.table)

    def targets(self, train_scores, keep: np.ndarray | None = None) -> np.ndarray:
        """[n_train + n_pseudo, 11]: one-hot brackets of the labels, then weight x probabilities."""
        hard = np.eye(NUM_BRACKETS, dtype=np.float32)[bracket_of(np.asarray(train_scores, dtype=np.float64))]
        probs = self.probs if keep is None else self.probs[keep]
        return np.concatenate([hard, self.weight * probs]).astype(np.float32)

    def image_stream(self, train_set) -> tuple["RowsUnion", np.ndarray]:
        """(table, targets) for data.DrawDataset: the labeled rows, then the pseudo rows."""
        return RowsUnion(train_set, self.table), self.targets(train_set["score"])

    def feature_stream(self, feats: dict, train_scores):
        """(FeatureTable, scores, targets) for embedding.FeatureDraws: the labeled rows, then the
        pseudo rows found in the feature cache (one that is not, unreadable now, is dropped)."""
        found = feats["tables"]["pseudo"]
        lost = feats["skipped"].get("pseudo", [])
        if lost:
            log.warning("%d pseudo-labelled image(s) could not be read now and are left out, e.g. %s", len(lost),
                        "; ".join(f"{n}: {r}" for n, r in lost[:3]))
        self.info["dropped"]["unreadable"] = len(lost)
        self.info["rows_used"] = len(found)
        scores = np.concatenate([np.asarray(train_scores, dtype=np.float32),
                                 np.asarray(self.table["score"], dtype=np.float32)[found.rows]])
        return FeatureTable.join(feats["tables"]["train"], found), scores, self.targets(train_scores, found.rows)


class RowsUnion:
    """Several `datasets` tables read as one (rows in order; `union['score']` concatenates a
    column): the labeled set and the pseudo rows for DrawDataset, without copying either."""

    def __init__(self, *tables):
        self.tables = tables
        self.starts = np.cumsum([0] + [len(t) for t in tables]).tolist()

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, key):
        if isinstance(key, str):
            return [v for t in self.tables for v in t[key]]
        i = int(key)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        return self.tables[k][i - self.starts[k]]


def _table(parts: list) -> "datasets.Dataset":  # noqa: F821
    """One datasets table ('path' or 'image', plus 'score'; with shard rows also the tar
    columns, read by data.row_source) from (kind, sources, scores) parts."""
    import datasets

    scores = [float(s) for _, _, sc in parts for s in sc]
    if all(kind == "path" for kind, _, _ in parts):
        return datasets.Dataset.from_dict({"path": [p for _, src, _ in parts for p in src], "score": scores})
    if any(kind == "tar" for kind, _, _ in parts):
        return _table_with_shards(parts).add_column("score", scores)
    feature = datasets.Features({"image": datasets.Image(decode=False)})
    tables = []
    for kind, src, _ in parts:
        if kind == "path":
            tables.append(datasets.Dataset.from_dict({"image": [{"bytes": None, "path": p} for p in src]},
                                                     features=feature))
        else:
            tables.append(src.cast_column("image", datasets.Image(decode=False)))
    return datasets.concatenate_datasets(tables).add_column("score", scores)


def _table_with_shards(parts: list) -> "datasets.Dataset":  # noqa: F821
    """Parts of any kind as one table: image (None but for dataset rows), path, tar columns
    (None but for shard rows); data.row_source picks whichever a row has."""
    import datasets

    features = datasets.Features({"image": datasets.Image(decode=False), "path": datasets.Value("string"),
                                  "tar_shard": datasets.Value("string"), "tar_offset": datasets.Value("int64"),
                                  "tar_size": datasets.Value("int64")})
    tables = []
    for kind, src, _ in parts:
        n = len(src)
        if kind == "path":
            cols = {"image": [None] * n, "path": list(src), **{c: [None] * n for c in shards.TAR_COLUMNS}}
        elif kind == "tar":
            cols = {"image": [None] * n, "path": src["path"], **{c: src[c] for c in shards.TAR_COLUMNS}}
        else:
            cols = {"image": src["image"], "path": [None] * n, **{c: [None] * n for c in shards.TAR_COLUMNS}}
        tables.append(datasets.Dataset.from_dict(cols, features=features))
    return datasets.concatenate_datasets(tables)


def load_pseudo_set(dcfg, algorithm_name: str, algorithm_args: dict, train_paths, test_paths,
                    rejected=()) -> PseudoSet:
    """Read, check, filter and resolve every export of data.pseudo_labels; drop rows whose
    image is a test or labeled image, rejected in data.corrections (`rejected`: paths) or
    already taken. PseudoLabelError on anything wrong."""
    weight = dcfg.pseudo_weight
    refusal = algorithm_refusal(algorithm_name, dict(algorithm_args or {}), weight)
    if refusal:
        raise PseudoLabelError(refusal)
    band = None if dcfg.pseudo_band is None else list(dcfg.pseudo_band)  # (a ListConfig: plain for run.json)
    accepted_only = dcfg.pseudo_accepted_only
    test_index, labeled_index = TestIndex(list(test_paths)), TestIndex(list(dict.fromkeys(train_paths)))
    rejected_index = TestIndex(sorted(rejected)) if rejected else None
    seen, parts, records, probs = set(), [], [], []
    dropped = {"test": 0, "labeled": 0, "rejected": 0, "missing": 0, "duplicate": 0, "unreadable": 0}
    for text in folders_of(dcfg.pseudo_labels):
        folder = Path(text).absolute()
        export = read_export(folder, accepted_only, band)
        sources, kind = resolve_images(folder, export)
        found = _classify(sources, kind, test_index, labeled_index, seen, rejected_index)
        keep = np.flatnonzero(np.asarray([f == "keep" for f in found], dtype=bool))
        for f in found:
            if f != "keep":
                dropped[f] += 1
        parts.append((kind, [sources[int(i)] for i in keep] if kind == "path" else sources.select(keep),
                      export["scores"][keep]))
        probs.append(export["probs"][keep])
        m = export["manifest"]
        records.append({"folder": str(folder), "fingerprint": m.get("fingerprint"),
                        "model": (m.get("model") or {}).get("folder"),
                        "source": (m.get("source") or {}).get("images"), "resolved_by": kind,
                        **export["counts"], "kept": len(keep)})
    total = sum(r["kept"] for r in records)
    filters = ("accepted rows" if accepted_only else "all rows") + (f" with score_percent in {band}" if band else "")
    if total == 0:
        detail = "; ".join(f"{r['folder']}: {r['rows']} rows, {r['accepted']} accepted, {r['after_filters']} "
                           f"after filters" for r in records)
        raise PseudoLabelError(f"data.pseudo_labels: no pseudo row left ({filters}; dropped {_dropped_text(dropped)}): "
                               f"{detail}. Set data.pseudo_accepted_only=false, widen data.pseudo_band, or check the "
                               "export")
    for r in records:
        if r["kept"] == 0:
            log.warning("pseudo-labels: %s gives no row (%d rows, %d accepted, %d after filters)", r["folder"],
                        r["rows"], r["accepted"], r["after_filters"])
    info = {"exports": records, "weight": weight, "band_percent": band, "accepted_only": accepted_only,
            "rows_resolved": total, "rows_used": total if weight > 0 else 0, "dropped": dropped}
    return PseudoSet(_table(parts), np.concatenate(probs), weight, info)


def _classify(sources, kind: str, test_index: TestIndex, labeled_index: TestIndex, seen: set,
              rejected_index: TestIndex | None = None) -> list[str]:
    """'keep' | 'test' | 'labeled' | 'rejected' | 'missing' | 'duplicate' per source, in order."""
    it = sources if kind == "path" else TableSources(sources).iter()

    def one(src):
        if kind == "path" and not os.path.isfile(src):
            return "missing", None
        if test_index.match(src):
            return "test", None
        if labeled_index.match(src):
            return "labeled", None
        if rejected_index is not None and rejected_index.match(src):
            return "rejected", None
        return "keep", _image_key(src)

    out = []
    with ThreadPoolExecutor(8) as ex:
        for verdict, key in ex.map(one, it, chunksize=256):
            if verdict == "keep":
                if key in seen:
                    verdict = "duplicate"
                seen.add(key)
            out.append(verdict)
    return out


def _dropped_text(dropped: dict) -> str:
    what = {"test": "same image as a test image", "labeled": "same image as a labeled image",
            "rejected": "rejected in data.corrections", "missing": "image file gone", "duplicate": "image already taken", "unreadable": "unreadable now"}
    parts = [f"{n} {what[k]}" for k, n in dropped.items() if n]
    return ", ".join(parts) or "none"


# --------------------------------------------------------------------------- train.py's hook


def prepare(cfg, train_set, test_set, run_dir: Path | None, is_main: bool, broadcast, rejected=()):
    """(PseudoSet or None, info for run.json, refusal or None) on every process: the main
    process reads the exports and `broadcast` hands its answer to the others. The set is None
    when data.pseudo_weight=0 (read and checked, not trained on). With `run_dir` (a resumed
    run) the exports must be the ones the run started with."""
    answer = None
    if is_main:
        try:
            pseudo = load_pseudo_set(cfg.data, cfg.algorithm.name, cfg.algorithm.args,
                                     train_set["path"], test_set["path"], rejected)
            refusal = resume_refusal(run_dir, pseudo.info) if run_dir is not None else None
            answer = (pseudo, None) if not refusal else (None, refusal)
        except PseudoLabelError as exc:
            answer = (None, str(exc))
        if answer[1] is None:
            i = answer[0].info
            log.info("pseudo-labels: %d row(s) from %s at weight %g (%s%s; of %d exported rows, %d accepted, %d after "
                     "filters; dropped %s)%s", i["rows_resolved"], ", ".join(r["folder"] for r in i["exports"]),
                     i["weight"], "accepted only" if i["accepted_only"] else "accepted or not",
                     f", score percent {i['band_percent']}" if i["band_percent"] else "",
                     sum(r["rows"] for r in i["exports"]), sum(r["accepted"] for r in i["exports"]),
                     sum(r["after_filters"] for r in i["exports"]), _dropped_text(i["dropped"]),
                     "" if i["weight"] > 0 else " | data.pseudo_weight=0: checked, not trained on")
    pseudo, refusal = broadcast(answer)
    if refusal:
        return None, None, refusal
    return (pseudo if pseudo.weight > 0 else None), pseudo.info, None


def resume_refusal(run_dir: Path, info: dict) -> str | None:
    """A resumed run must draw from the same pseudo rows: the same exports (fingerprints)
    giving the same number of rows as when it started."""
    # no readable record: nothing to compare with (config.yaml already matched)
    before = (read_run_info(run_dir) or {}).get("pseudo_labels")
    if not before:
        return None
    then = [(r.get("folder"), r.get("fingerprint"), r.get("kept")) for r in before.get("exports", [])]
    now = [(r["folder"], r["fingerprint"], r["kept"]) for r in info["exports"]]
    if then != now:
        return (f"{run_dir} was trained on other pseudo-labels (the export folder was rewritten, or its images or the "
                f"labeled set changed): then {then}, now {now}; a resumed run must draw the same rows, so start a new "
                "output_dir=")
    return None
