"""Data: scored sets, unlabeled pools, the held-out split, and the torch datasets that feed the loop.

Sources all become Hugging Face `datasets` tables with a `path` column (files) or an
`image` column (saved / Hub datasets, decoded by us so that a bad image is a skip, not a
crash):

- scored set: `labeled/<score>[_anything]/<image>` at any depth, or a manifest
  (.csv/.jsonl/.json/.parquet) with `path`, `score` and optional `rater` columns;
- unlabeled pool: a folder (recursive), a manifest with `path`, a `save_to_disk` folder,
  `hub:<name>` (a Hub dataset, optionally streamed), or .tar shards (a brace pattern or glob
  of webdataset shards, or img2dataset's output folder: see shards.py; rows carry `path`,
  the member's name, and where its bytes lie in the shard).

A scored set is validated whole before training: every problem (bad folder names,
scores out of range, missing, empty or undecodable files) is collected and raised
together as `LabeledSetError`.

Training batches are drawn by a global *draw number* d: epoch = d // n and the image is
`perm(seed, epoch)[d % n]`. Each process takes its own slice of every step's draws, so
processes never see the same image within an epoch, and the augmentation of draw d is
seeded from (seed, d) alone. A resumed run therefore sees exactly the batches an
uninterrupted run would, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
import tempfile
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from . import shards
from .images import UnreadableImage, describe, is_image_file, load_image
from .metrics import NUM_BRACKETS, bracket_of

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BRACKET_DIR = re.compile(r"^([0-9]+)(?:_.*)?$")  # ASCII digits: \d would read '٣' (Arabic-Indic 3) as 3


SHOWN_PROBLEMS = 200


class LabeledSetError(ValueError):
    """Every problem found in a scored set, one per line."""

    def __init__(self, source, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:SHOWN_PROBLEMS])
        more = ""
        if len(self.problems) > SHOWN_PROBLEMS:  # the whole list, where the terminal would drown in it
            with tempfile.NamedTemporaryFile("w", prefix="scored_set_problems_", suffix=".txt", delete=False) as f:
                f.write("".join(p + "\n" for p in self.problems))
            more = f"\n  ... and {len(self.problems) - SHOWN_PROBLEMS} more: all {len(self.problems)} are in {f.name}"
        super().__init__(f"scored set {self.source} has {len(self.problems)} problem(s):\n{shown}{more}")


class DataSourceError(ValueError):
    pass


# --------------------------------------------------------------------------- scored sets


def _dir_key(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _in_plain_tree(real: str, real_root: str) -> bool:
    """Whether walking `real_root` without links (and without hidden names) reaches `real`."""
    prefix = real_root.rstrip(os.sep) + os.sep
    if real != real_root and not real.startswith(prefix):
        return False
    return not any(part.startswith(".") for part in real[len(prefix):].split(os.sep))


def _list_folder(folder: Path, onerror) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        if onerror is not None:
            onerror(folder, exc)
        return []


def _walk_files(root: Path, onerror=None):
    """Every file below `root` once, in a fixed order (names sorted, a folder's files before
    its subfolders'); dot-entries below `root` are skipped, whatever the root's own path holds.

    Symlinks are followed (a bracket folder may live elsewhere), but each real folder is
    entered once and each real file yielded once: a link back to an ancestor used to walk
    forever or count the same images dozens of times, duplicates landing in train and test.
    A link into the root's own tree is not followed (the walk meets the target under its own
    name), so only files reached through links outside it are remembered: the memory of a
    walk over millions of plain files stays small. Broken links are yielded, for the reader
    to report as missing. `onerror(folder, exc)` hears of folders that cannot be listed."""
    root = Path(root)
    real_root = os.path.realpath(root)
    entered = {_dir_key(root)}
    linked_files: set[tuple[str, str]] = set()  # (real path, suffix it was reached under)
    stack = [(root, None)]  # (folder, its real path if reached through a link, else None)
    while stack:
        folder, real_folder = stack.pop()
        subfolders = []
        for entry in _list_folder(folder, onerror):
            if entry.name.startswith("."):
                continue  # hidden below the root: .git, .cache, editors' temp files
            linked = real_folder is not None or entry.is_symlink()
            if _is_dir(entry):
                real = os.path.realpath(entry.path) if linked else None
                if real is not None and _in_plain_tree(real, real_root):
                    continue
                key = _dir_key(entry.path)
                if key not in entered:
                    entered.add(key)
                    subfolders.append((Path(entry.path), real))
                continue
            if linked and os.path.exists(entry.path):
                real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real_folder, entry.name)
                # the same file under a name with another suffix is another thing to the
                # reader (x.png -> store/ab12 is an image, store/ab12 is not): keep both
                suffix = os.path.splitext(entry.name)[1].lower()
                if _in_plain_tree(real, real_root) and suffix == os.path.splitext(real)[1].lower():
                    continue
                if (real, suffix) in linked_files:
                    continue
                linked_files.add((real, suffix))
            yield Path(entry.path)
        stack.extend(reversed(subfolders))


def _bracket_folder_problem(entry: Path) -> str | None:
    m = BRACKET_DIR.match(entry.name)
    if not m:
        return (f"{entry}: folder name must be the integer bracket 0-10, alone or followed by '_' and anything "
                "(e.g. '03', '7', '10_extra'; not '5abc' or '3.5')")
    if not 0 <= int(m.group(1)) < NUM_BRACKETS:
        return f"{entry}: bracket {int(m.group(1))} is out of range 0-10"
    return None


def scan_labeled_folder(root: str | Path) -> tuple[list[dict], list[str]]:
    """Records {path, score} from `root/<score>[_anything]/...`, and the problems found.

    Each real image counts once: the same file linked into one bracket twice is one record,
    linked into two brackets a problem (which score is right is the user's call)."""
    root = Path(root)
    records, problems = [], []
    first_seen: dict[str, tuple[str, int]] = {}  # real path -> (path, bracket)

    def unlisted(folder, exc):
        problems.append(f"{folder}: cannot list folder ({exc.strerror or exc})")

    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        unlisted(root, exc)
        return records, problems
    for entry in entries:
        if entry.name.startswith(".") or entry.name.lower() in ("readme.md", "readme.txt"):
            continue
        if not entry.is_dir():
            if entry.is_symlink() and not entry.exists():
                problems.append(f"{entry}: broken link (points to {os.readlink(entry)})")
            elif is_image_file(entry):
                problems.append(f"{entry}: image outside a bracket folder (put it in {root}/<score>/)")
            continue
        why = _bracket_folder_problem(entry)
        if why:
            problems.append(why)
            continue
        bracket = int(BRACKET_DIR.match(entry.name).group(1))
        for f in _walk_files(entry, onerror=unlisted):
            if not is_image_file(f):
                continue
            real = os.path.realpath(f)
            if real in first_seen:
                other, other_bracket = first_seen[real]
                if other_bracket != bracket:
                    problems.append(f"{f}: same file as {other} (bracket {other_bracket} there, {bracket} here): "
                                    "score each image once")
                continue
            first_seen[real] = (str(f), bracket)
            records.append({"path": str(f), "score": float(bracket)})
    return records, problems


def _manifest_has_no_rows(path: Path, kind: str) -> bool:
    """A header-only or empty manifest; `datasets` fails on those with 'Instruction "train"
    corresponds to no data' or a bare StopIteration, which say nothing to a user."""
    if kind == "parquet":
        try:
            return pq.read_metadata(path).num_rows == 0
        except Exception:  # not a parquet file: let the loader say why
            return False
    with open(path, "rb") as f:
        if kind == "csv":
            non_blank = 0
            for line in f:
                non_blank += bool(line.strip())
                if non_blank == 2:  # a header and one row: enough
                    return False
            return True
        head = f.read(1 << 16)
    return not head.strip() or (len(head) < 1 << 16 and re.fullmatch(rb"\s*\[\s*\]\s*", head) is not None)


def _root_cause(exc: BaseException) -> str:
    """The loader's message plus its innermost cause: `datasets` wraps a JSON parse error
    ('... in row 3') in a bare 'An error occurred while generating the dataset'."""
    root = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    text = str(exc) or type(exc).__name__
    return text if root is exc else f"{text} ({type(root).__name__}: {root})"


def _first_bad_json_line(path: Path) -> str | None:
    """'line N is not a JSON object (...)' for the first such line of a JSONL file: the
    loader's own message gives a character position at best."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                return f"line {n} is not JSON ({exc})"
            if not isinstance(value, dict):
                return f"line {n} is not a JSON object: {line.strip()[:80]}"
    return None


def _load_manifest(path: Path, need: tuple[str, ...], streaming: bool = False):
    """A manifest as a `datasets` table (Arrow-backed, or a stream), with the columns checked."""
    import datasets

    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    if _manifest_has_no_rows(path, kind):
        raise DataSourceError(f"{path}: the manifest has no rows (only a header, or nothing); "
                              f"it needs one row per image with column(s) {', '.join(need)}")
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=streaming)
        # a streamed csv knows its columns only once read: peek at the first row
        cols = table.column_names or list(next(iter(table)).keys())
    except Exception as exc:
        where = _first_bad_json_line(path) if path.suffix.lower() == ".jsonl" else None
        raise DataSourceError(f"{path}: cannot read manifest: {where or _root_cause(exc)}") from exc
    if not set(need) <= set(cols):
        raise DataSourceError(f"{path}: manifest needs column(s) {sorted(set(need) - set(cols))}; it has {sorted(cols)}")
    if not streaming and len(table) == 0:
        raise DataSourceError(f"{path}: the manifest has no rows")
    return table


def _path_problem(p) -> str | None:
    if p is None or p == "" or (isinstance(p, float) and math.isnan(p)):
        return "empty path"
    if not isinstance(p, str):
        return f"path {p!r} is not a string (a file name, relative to the manifest or absolute)"
    return None


def _score_value(s) -> tuple[float | None, str | None]:
    """(score, None) or (None, why not). Booleans are refused: JSON `true` is not a score."""
    if isinstance(s, str):
        text = s.strip()
        if not text:
            return None, "no score (empty)"
        try:
            s = float(text)
        except ValueError:
            return None, f"score {s!r} is not a number"
    elif isinstance(s, bool) or (s is not None and not isinstance(s, (int, float))):
        return None, f"score {s!r} is not a number"
    if s is None or math.isnan(s):
        return None, "no score (empty or NaN)"
    if not 0.0 <= s <= NUM_BRACKETS - 1:
        return None, f"score {s} is out of range 0-10"
    return float(s), None


def _rater_name(r) -> str | None:
    if r is None or (isinstance(r, float) and math.isnan(r)):
        return None  # a csv cell left empty
    if isinstance(r, float) and r.is_integer():
        return str(int(r))  # pandas reads a column of rater ids with a gap as floats: 3.0 is rater 3
    return str(r)


def read_manifest(path: str | Path, need_score: bool) -> tuple[list[dict], list[str]]:
    """Records from a csv/jsonl/parquet scored-set manifest (a few thousand rows, read as
    Python rows), paths relative to the manifest, and every bad row as a problem naming it.

    Raises DataSourceError when the manifest itself cannot be read or has no rows."""
    path = Path(path)
    table = _load_manifest(path, ("path", "score") if need_score else ("path",))
    has_rater = "rater" in table.column_names
    base = path.parent
    records, problems = [], []
    for i, row in enumerate(table):
        p = row["path"]
        why = _path_problem(p)
        if why:
            problems.append(f"{path}: row {i + 1}: {why}")
            continue
        rec = {"path": str(Path(p) if os.path.isabs(p) else base / p)}
        if need_score:
            rec["score"], why = _score_value(row["score"])
            if why:
                problems.append(f"{path}: row {i + 1} ({p}): {why}")
                continue
        rater = _rater_name(row["rater"]) if has_rater else None
        if rater is not None:
            rec["rater"] = rater
        records.append(rec)
    return records, problems


def _check_image(path: str) -> str | None:
    if not os.path.exists(path):
        return f"{path}: file not found"
    try:
        load_image(path)
    except UnreadableImage as exc:
        return f"{path}: {exc.reason}"
    return None


def validate_images(paths: list[str], workers: int | None = None) -> list[str]:
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        return [p for p in pool.map(_check_image, paths, chunksize=32) if p]


def load_scored_set(source: str | Path, check_images: bool = True):
    """A validated scored set as a `datasets.Dataset` (path, score, bracket[, rater]).

    Raises LabeledSetError listing every problem found, or DataSourceError when the
    source itself is missing or of an unknown kind."""
    import datasets

    source = Path(source)
    if not source.exists():
        raise DataSourceError(f"scored set not found: {source}")
    if source.is_dir():
        records, problems = scan_labeled_folder(source)
    elif source.suffix.lower() in MANIFEST_SUFFIXES:
        records, problems = read_manifest(source, need_score=True)
    else:
        raise DataSourceError(f"{source}: a scored set is a folder of <score>/ subfolders or a .csv/.jsonl/.parquet manifest")
    if check_images:
        problems += validate_images([r["path"] for r in records])
    if not records and not problems:
        problems.append(f"{source}: no images found (expected {source}/<score>/<image>.png|jpg|webp|...)")
    if problems:
        raise LabeledSetError(source, problems)
    columns = {
        "path": [r["path"] for r in records],
        "score": [r["score"] for r in records],
        "bracket": bracket_of([r["score"] for r in records]).tolist(),
    }
    if any("rater" in r for r in records):
        columns["rater"] = [r.get("rater") for r in records]
    return datasets.Dataset.from_dict(columns)


def stratified_split(brackets, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of test rows: `fraction` of every bracket (rounded), fixed by `seed`.

    Every bracket with two or more images holds out at least one (a tiny set still gets a
    test image of each bracket it has) and keeps at least one for training."""
    brackets = np.asarray(brackets)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(brackets), dtype=bool)
    for b in np.unique(brackets):
        idx = np.flatnonzero(brackets == b)
        if len(idx) < 2:
            continue
        n_test = min(max(1, int(np.floor(len(idx) * fraction + 0.5))), len(idx) - 1)
        is_test[rng.choice(idx, size=n_test, replace=False)] = True
    return is_test


def split_by_image(paths, scores, fraction: float, seed: int) -> np.ndarray:
    """Test mask over manifest rows, made per *image*: rows that name the same file (several
    raters scoring one image) all land on the same side, stratified by the image's mean
    score. A per-row split would put most multi-rated images in both train and test."""
    keys = [os.path.realpath(p) for p in paths]
    uniq, inverse = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    mean = np.bincount(inverse, weights=np.asarray(scores, dtype=np.float64)) / np.bincount(inverse)
    return stratified_split(bracket_of(mean), fraction, seed)[inverse]


def bracket_histogram(brackets) -> list[int]:
    counts = Counter(int(b) for b in brackets)
    return [counts.get(b, 0) for b in range(NUM_BRACKETS)]


# --------------------------------------------------------------------------- unlabeled pools


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _is_text(arrow_type) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _pool_path_problems(table, shown: int = 20) -> list[str]:
    """Rows of a pool manifest with no usable path, found without a Python list of rows:
    a string column is checked chunk by chunk in Arrow; anything else (numbers, mixed JSON
    values) is wrong somewhere, so its rows are read to name the bad ones."""
    problems, bad = [], 0
    if not _is_text(table.data.column("path").type):
        for i, p in enumerate(table["path"]):
            why = _path_problem(p)
            if why:
                bad += 1
                if len(problems) < shown:
                    problems.append(f"row {i + 1}: {why}")
    else:
        offset = 0
        for chunk in table.data.column("path").chunks:
            empty = pc.or_kleene(pc.is_null(chunk), pc.equal(chunk, "")).to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(empty)[: max(0, shown - len(problems))]:
                problems.append(f"row {offset + i + 1}: empty path")
            bad += int(empty.sum())
            offset += len(chunk)
    if bad > len(problems):
        problems.append(f"... {bad - len(problems)} more")
    return problems


def _absolute_paths(batch: pa.Table, base: str) -> pa.Table:
    """One Arrow batch of manifest paths made absolute (relative ones join the manifest's
    folder) and tidied as pathlib writes them ('a/./b', 'a//b' -> 'a/b'), all in Arrow.
    POSIX paths: an absolute path starts with '/'. A streamed batch is not checked first:
    what is not a non-empty string becomes null, an unreadable row the loop skips."""
    col = batch.column("path")
    if _is_text(col.type):
        col = col.cast(pa.string())  # one type for every batch (csv gives large_string)
    else:
        values = (_json_text(v) if isinstance(col.type, pa.ExtensionType) else v for v in col.to_pylist())
        col = pa.array([v if isinstance(v, str) else None for v in values], pa.string())
    col = pc.if_else(pc.equal(col, ""), pa.scalar(None, col.type), col)
    joined = pc.if_else(pc.starts_with(col, "/"), col, pc.binary_join_element_wise(base, col, "/"))
    tidy = pc.replace_substring_regex(joined, r"/(?:\.?/)+", "/")
    tidy = pc.replace_substring_regex(tidy, r"(.)/\.?$", r"\1")
    return pa.table({"path": tidy})


def _json_text(value):
    """A value of a `datasets` Json column (JSON text: mixed types in one JSONL column)."""
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return None


def _pool_from_manifest(path: Path, streaming: bool):
    """A pool manifest's `path` column as absolute paths, built by `datasets` in Arrow
    batches, never as Python rows: 10M rows as Python dicts cost ~6 GB per process. With
    `streaming` the manifest is read lazily as the loop consumes it."""
    table = _load_manifest(path, ("path",), streaming).select_columns(["path"])
    if streaming:
        # nothing is read ahead; the first row at least shows a manifest of wrong kind at once
        why = _path_problem(next(iter(table), {}).get("path"))
        if why:
            raise DataSourceError(f"{path}: row 1: {why}")
    else:
        problems = _pool_path_problems(table)
        if problems:
            raise DataSourceError(f"{path}: rows without a usable path: " + "; ".join(problems))
    absolute = functools.partial(_absolute_paths, base=str(path.parent.absolute()))
    return table.with_format("arrow").map(absolute, batched=True, batch_size=10_000).with_format(None)


def _pool_from_folder(path: Path):
    import datasets

    def unlisted(folder, exc):
        log.warning("unlabeled pool: cannot list %s (%s); its images are left out", folder, exc.strerror or exc)

    paths = [str(f) for f in _walk_files(path, onerror=unlisted) if is_image_file(f)]
    if not paths:
        hint = f" (it holds .tar shards: name them, e.g. {path}/*.tar)" if any(path.glob("*.tar")) else ""
        raise DataSourceError(f"{path}: no images found in the unlabeled pool{hint}")
    return datasets.Dataset.from_dict({"path": paths})


def _pool_from_shards(source: str, streaming: bool):
    """A pool of .tar shards (shards.py), or None when `source` names none."""
    import datasets

    try:
        found = shards.find_shards(source)
    except shards.ShardSourceError as exc:
        raise DataSourceError(str(exc)) from None
    if found is None:
        return None
    if streaming:
        features = datasets.Features.from_arrow_schema(shards.SCHEMA)
        return datasets.IterableDataset.from_generator(shards.stream_shards, features=features,
                                                       gen_kwargs={"shards": found})
    log.info("unlabeled pool: listing the images of %d .tar shards", len(found))
    table = shards.shard_table(found)
    if len(table) == 0:
        raise DataSourceError(f"{source}: no images in its {len(found)} .tar shard(s)")
    return datasets.Dataset(table)


def load_pool(source: str, streaming: bool = False, limit: int | None = None):
    """An unlabeled pool as a datasets.Dataset (or IterableDataset when streaming) with a
    `path` column, or an `image` column left undecoded."""
    import datasets

    text = str(source)
    if text.startswith("hub:"):
        try:
            ds = datasets.load_dataset(text[4:], split="train", streaming=streaming)
        except Exception as exc:
            raise DataSourceError(f"{text}: cannot load Hub dataset ({type(exc).__name__}: {exc})") from exc
    elif (tars := _pool_from_shards(text, streaming)) is not None:
        ds = tars
    else:
        path = Path(text)
        if not path.exists():
            raise DataSourceError(f"unlabeled pool not found: {path}")
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            if streaming:
                ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 1000 or 1)))
        elif path.is_dir():
            ds = _pool_from_folder(path)
            if streaming:
                ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 1000 or 1)))
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            ds = _pool_from_manifest(path, streaming)
        else:
            raise DataSourceError(f"{path}: unlabeled pool must be a folder, a manifest, a saved dataset, .tar "
                                  "shards or hub:<name>")
    cols = set(ds.column_names or [])
    if "image" in cols:
        ds = ds.cast_column("image", datasets.Image(decode=False))
    elif "path" not in cols and ds.column_names is not None:
        raise DataSourceError(f"{source}: the pool needs an 'image' or a 'path' column; it has {sorted(cols)}")
    if limit and not streaming and len(ds) > limit:
        ds = ds.select(range(int(limit)))
    elif limit and streaming:
        ds = ds.take(int(limit))
    return ds


def pool_length(pool) -> int | None:
    """Number of images in a pool; for a stream, what its metadata says (or None)."""
    if hasattr(pool, "__len__"):
        return len(pool)
    split = (pool.info.splits or {}).get("train") if pool.info else None
    return getattr(split, "num_examples", None)


def row_source(row: dict):
    """What to hand to load_image for one table row (None when the row holds no image)."""
    if row.get("image") is not None:
        return row["image"]
    if row.get("tar_shard") is not None:
        return shards.member_source(row)
    return row.get("path")


def row_name(row: dict) -> str:
    if row.get("tar_shard") is not None:  # a shard member's name, without reading its bytes
        return row["path"]
    return describe(row_source(row))


SOURCE_CHUNK = 256  # table rows read at a time: bounds the image bytes held in memory


class TableSources:
    """What load_image takes for each row of a datasets table, read from the table on demand:
    a saved or Hub pool holds its image bytes in the table, and millions of them must never
    be in one Python list."""

    def __init__(self, table):
        self.table = table.select_columns([c for c in ("image", "path", *shards.TAR_COLUMNS)
                                           if c in table.column_names])

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, row: int):
        return row_source(self.table[int(row)])

    def iter(self, rows: range | None = None) -> Iterator:
        """Sources of `rows` (all rows by default) in order, read SOURCE_CHUNK rows at a time."""
        rows = range(len(self.table)) if rows is None else rows
        for s in range(0, len(rows), SOURCE_CHUNK):
            part = rows[s:s + SOURCE_CHUNK]
            # a step-1 range reads as one contiguous slice of the arrow table
            batch = self.table[part.start:part.stop] if part.step == 1 else self.table[list(part)]
            names = list(batch)
            for values in zip(*(batch[k] for k in names)):
                yield row_source(dict(zip(names, values)))


# --------------------------------------------------------------------------- torch datasets


def seed_everything_for(*key: int) -> None:
    """Seed python, numpy and torch's CPU RNGs from a tuple of ints (one sample's augmentation).

    Only torch's CPU generator: the views are drawn on the CPU. torch.manual_seed would also
    seed every CUDA generator, and before CUDA is initialised (a DataLoader worker, or any
    CPU run) it records a Python traceback for a lazy replay on every call: that was a
    third of a worker's time per image. In the training process (data.num_workers=0 on a
    GPU) it also re-seeded the CUDA generator that dropout and drop-path draw from, which
    augmentation_rng does not put back."""
    s = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.default_generator.manual_seed(int(s[0]) << 32 | int(s[1]))


class augmentation_rng:
    """`with augmentation_rng(*key):` seeds python, numpy and torch for one sample's views and
    puts the caller's random state back afterwards. With data.num_workers=0 the views are
    drawn in the training process, whose torch RNG also drives dropout and drop-path: without
    the restore those followed the data seeds, and a run gave other numbers with workers than
    without (while data.num_workers is a key a resume may change)."""

    def __init__(self, *key: int):
        self.key = key

    def __enter__(self):
        self.state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        seed_everything_for(*self.key)

    def __exit__(self, *exc):
        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        torch.set_rng_state(self.state[2])
        return False


def draw_order(n: int, seed: int, stream: int, epoch: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Which row each of one epoch's n draws reads, a pure function of (seed, stream, epoch),
    so that any process and a resumed run agree. Without weights a permutation (every row
    once an epoch); with weights (summing to 1) n rows drawn with replacement."""
    rng = np.random.default_rng([int(seed), int(stream), int(epoch)])
    if weights is None:
        return rng.permutation(n)
    return rng.choice(n, size=n, p=weights)


def balance_weights(scores, power: float) -> np.ndarray | None:
    """data.balance_labeled: each labeled row drawn with weight (its bracket's count)^-power,
    normalised. 0: uniform (None, the plain permutation); 1: every bracket drawn equally
    often; 0.5 in between (a bracket with 4x the rows is drawn 2x as often, not 4x)."""
    if not power:
        return None
    b = bracket_of(np.asarray(scores, dtype=np.float64))
    w = np.bincount(b, minlength=NUM_BRACKETS)[b].astype(np.float64) ** -float(power)
    return w / w.sum()


class DrawDataset(Dataset):
    """Indexed by global draw number (see module docstring); returns the training views.

    kind='labeled' returns x_lb (weak), y_lb (bracket), y_score; kind='unlabeled' returns
    x_ulb_w, x_ulb_s. An unreadable image is replaced by the next image of the same
    epoch's order and reported in `skipped` as (name, reason).

    `targets` ([n, 11] float, labeled only) replaces the bracket by a soft target per row
    (pseudo.py: one-hot brackets for labels, weighted export probabilities for pseudo rows)."""

    MAX_RETRIES = 64

    def __init__(self, table, kind: str, weak, strong=None, seed: int = 0, stream: int = 0, targets=None,
                 balance: float = 0.0):
        self.table = table
        self.kind = kind
        self.weak, self.strong = weak, strong
        self.seed, self.stream = int(seed), int(stream)
        self.n = len(table)
        self._perm_epoch, self._perm = None, None
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        self.weights = None
        if kind == "labeled":
            self.scores = np.asarray(table["score"], dtype=np.float32)
            self.weights = balance_weights(self.scores, balance)

    def __len__(self):
        return self.n

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = draw_order(self.n, self.seed, self.stream, epoch, self.weights)
            self._perm_epoch = epoch
        return self._perm

    def __getitem__(self, draw: int) -> dict:
        epoch, pos = divmod(int(draw), self.n)
        perm = self._permutation(epoch)
        skipped = []
        for attempt in range(min(self.MAX_RETRIES, self.n)):
            idx = int(perm[(pos + attempt) % self.n])
            row = self.table[idx]
            try:
                img = load_image(row_source(row))
                break
            except UnreadableImage as exc:
                skipped.append((row_name(row), exc.reason))
        else:
            raise DataSourceError(unreadable_run_message(self.kind, len(skipped), self.n, skipped))
        with augmentation_rng(self.seed, self.stream, draw):
            views = (self.weak(img),) if self.kind == "labeled" else (self.weak(img), self.strong(img))
        if self.kind == "labeled":
            score = float(self.scores[idx])
            return {
                "idx_lb": idx,
                "x_lb": views[0],
                "y_lb": int(bracket_of(score)) if self.targets is None else torch.tensor(self.targets[idx]),
                "y_score": score,
                "skipped": skipped,
            }
        return {"idx_ulb": idx, "x_ulb_w": views[0], "x_ulb_s": views[1], "skipped": skipped}


def unreadable_run_message(kind: str, tried: int, total: int | None, skipped: list) -> str:
    examples = "; ".join(f"{n}: {r}" for n, r in skipped[:3])
    if total is not None and tried >= total:
        return f"every image in the {kind} set is unreadable ({total} of {total}), e.g. {examples}"
    return f"{tried} unreadable images in a row in the {kind} set (is it the right folder?), e.g. {examples}"


def stable_index(row: dict, size: int) -> int:
    """A slot in [0, size) for one streamed image, from its name (or its bytes): the same image
    gets the same slot in every epoch and process, so per-image algorithm state (FlexMatch's
    selected labels) stays attached to the image on a stream of unknown length."""
    src = row["path"] if row.get("tar_shard") is not None else row_source(row)
    if isinstance(src, dict):
        src = src.get("path") or src.get("bytes") or b""
    data = src if isinstance(src, (bytes, bytearray)) else str(src).encode("utf-8", "surrogateescape")
    return zlib.crc32(data) % max(1, int(size))


class StreamingPool(IterableDataset):
    """An unlabeled pool streamed from an iterable `datasets` source (no length needed).

    The stream is cut into world x workers parts, one per (process, DataLoader worker), with
    `split_dataset_by_node` (whole shards where they divide evenly, else every n-th row), and
    each part is read with `.iter()`, which leaves the worker split to us (iterating the
    stream itself inside a worker would split it by worker a second time). Every epoch
    reshuffles the shard order and a buffer with the same seed everywhere, so the parts of
    one epoch together are one pass over the pool.

    The DataLoader takes batch k from worker k % W. A run resumed after S batches starts at
    worker 0 again, so loader worker i plays part (i + S) % W, and each part skips the rows
    (read, not decoded) of the len(range(part, S, W)) batches it made before: the resumed
    run draws exactly the batches the uninterrupted one would. `idx_ulb` is `stable_index`."""

    def __init__(self, table, weak, strong, seed: int, rank: int, world: int, index_size: int,
                 batch_size: int, start_batch: int = 0):
        self.table = table
        self.weak, self.strong = weak, strong
        self.seed, self.rank, self.world, self.index_size = int(seed), int(rank), int(world), max(1, int(index_size))
        self.batch_size, self.start_batch = int(batch_size), int(start_batch)

    def _part(self):
        from datasets.distributed import split_dataset_by_node

        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        part = (wid + self.start_batch) % workers
        table = split_dataset_by_node(self.table, rank=self.rank * workers + part, world_size=self.world * workers)
        return table, part, len(range(part, self.start_batch, workers)) * self.batch_size

    def _rows(self, table, epoch: int):
        stream = table.shuffle(seed=self.seed + epoch, buffer_size=1000)
        stream.set_epoch(epoch)
        for batch in stream.iter(batch_size=64):
            keys = list(batch)
            for i in range(len(batch[keys[0]]) if keys else 0):
                yield {k: batch[k][i] for k in keys}

    def __iter__(self):
        table, part, skip = self._part()
        epoch, count, unreadable = 0, 0, deque(maxlen=3)  # count: rows this part has read, skipped ones included
        while True:
            rows = tried = readable = 0
            for row in self._rows(table, epoch):
                rows += 1
                count += 1
                if count <= skip:
                    continue
                tried += 1
                try:
                    img = load_image(row_source(row))
                except UnreadableImage as exc:
                    unreadable.append((row_name(row), exc.reason))
                    yield {"skip_only": True, "skipped": [unreadable[-1]]}
                    continue
                readable += 1
                with augmentation_rng(self.seed, 1, self.rank, part, count):
                    weak, strong = self.weak(img), self.strong(img)
                yield {"idx_ulb": stable_index(row, self.index_size), "x_ulb_w": weak, "x_ulb_s": strong, "skipped": []}
            if rows == 0:
                raise DataSourceError("the streamed unlabeled pool is empty (or has fewer rows than processes x "
                                      "data.num_workers)")
            if readable == 0 and tried == rows:
                raise DataSourceError(unreadable_run_message("streamed unlabeled", rows, rows, list(unreadable)))
            epoch += 1


class EvalDataset(Dataset):
    """Eval view of every row, in order; unreadable rows come back with ok=False."""

    def __init__(self, table, transform, image_size: int):
        self.table = table
        self.transform = transform
        self.image_size = image_size

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        row = self.table[int(i)]
        try:
            img = load_image(row_source(row), draft_size=self.image_size * 2)
            x, ok, reason = self.transform(img), True, ""
        except UnreadableImage as exc:
            x, ok, reason = torch.zeros(3, self.image_size, self.image_size), False, exc.reason
        return {"index": int(i), "x": x, "ok": ok, "reason": reason}


def collate(batch: list[dict]) -> dict:
    """default_collate, except that `skipped` lists are concatenated and samples that carry
    only skips (streaming) are dropped."""
    skipped = [s for item in batch for s in item.pop("skipped", [])]
    batch = [item for item in batch if not item.get("skip_only")]
    out = default_collate(batch) if batch else {}
    out["skipped"] = skipped
    return out


class DrawBatchSampler:
    """Lists of draw numbers for one process: micro-batch m of this process holds draws
    m*B*W + rank*B + [0, B). Infinite; `start` is the first micro-batch to yield."""

    def __init__(self, batch_size: int, rank: int, world: int, start: int = 0):
        self.batch_size, self.rank, self.world, self.start = int(batch_size), int(rank), int(world), int(start)

    def __iter__(self):
        m = self.start
        per_step = self.batch_size * self.world
        while True:
            base = m * per_step + self.rank * self.batch_size
            yield list(range(base, base + self.batch_size))
            m += 1


class RangeBatches:
    """Batches of row positions, range after range ([start, end) pairs, e.g. one export shard
    or one cache chunk each); a batch never spans two ranges, so each range's rows arrive
    whole and in order."""

    def __init__(self, ranges: list[tuple[int, int]], batch_size: int):
        self.ranges, self.batch_size = [(int(s), int(e)) for s, e in ranges], int(batch_size)

    def __iter__(self):
        for s, e in self.ranges:
            for b in range(s, e, self.batch_size):
                yield list(range(b, min(b + self.batch_size, e)))

    def __len__(self):
        return sum(-(-(e - s) // self.batch_size) for s, e in self.ranges)


def worker_init(_worker_id: int) -> None:
    # Each sample reseeds from its draw number; torch's per-worker seeding is not used.
    torch.set_num_threads(1)
