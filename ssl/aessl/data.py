"""Data: scored sets, unlabeled pools, the held-out split, and the torch datasets that feed the loop.

Sources all become Hugging Face `datasets` tables with a `path` column (files) or an
`image` column (saved / Hub datasets, decoded by us so that a bad image is a skip, not a
crash):

- scored set: `labeled/<score>[_anything]/<image>` at any depth, or a manifest
  (.csv/.jsonl/.json/.parquet) with `path`, `score` and optional `rater` columns;
- unlabeled pool: a folder (recursive), a manifest with `path`, a `save_to_disk` folder,
  or `hub:<name>` (a Hub dataset, optionally streamed).

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

import logging
import os
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from .images import UnreadableImage, describe, is_image_file, load_image
from .metrics import NUM_BRACKETS, bracket_of

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BRACKET_DIR = re.compile(r"^(\d+)(?:_.*)?$")


class LabeledSetError(ValueError):
    """Every problem found in a scored set, one per line."""

    def __init__(self, source, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:200])
        more = f"\n  ... and {len(self.problems) - 200} more" if len(self.problems) > 200 else ""
        super().__init__(f"scored set {self.source} has {len(self.problems)} problem(s):\n{shown}{more}")


class DataSourceError(ValueError):
    pass


# --------------------------------------------------------------------------- scored sets


def _walk_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def scan_labeled_folder(root: str | Path) -> tuple[list[dict], list[str]]:
    """Records {path, score} from `root/<score>[_anything]/...`, and the problems found."""
    root = Path(root)
    records, problems = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name.lower() in ("readme.md", "readme.txt"):
            continue
        if not entry.is_dir():
            if is_image_file(entry):
                problems.append(f"{entry}: image outside a bracket folder (put it in {root}/<score>/)")
            continue
        m = BRACKET_DIR.match(entry.name)
        if not m:
            problems.append(
                f"{entry}: folder name must start with the integer bracket 0-10 (e.g. '03', '7', '10_extra')"
            )
            continue
        score = int(m.group(1))
        if not 0 <= score < NUM_BRACKETS:
            problems.append(f"{entry}: bracket {score} is out of range 0-10")
            continue
        for f in _walk_files(entry):
            if is_image_file(f):
                records.append({"path": str(f), "score": float(score)})
    return records, problems


def read_manifest(path: str | Path, need_score: bool) -> tuple[list[dict], list[str]]:
    """Records from a csv/jsonl/parquet manifest; paths are relative to the manifest."""
    import datasets

    path = Path(path)
    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise DataSourceError(f"{path}: cannot read manifest: {exc}") from exc
    cols = set(table.column_names)
    need = {"path", "score"} if need_score else {"path"}
    if not need <= cols:
        raise DataSourceError(f"{path}: manifest needs column(s) {sorted(need - cols)}; it has {sorted(cols)}")
    base = path.parent
    records, problems = [], []
    for i, row in enumerate(table):
        p = row["path"]
        if not p:
            problems.append(f"{path}: row {i + 1}: empty path")
            continue
        full = Path(p) if os.path.isabs(p) else base / p
        rec = {"path": str(full)}
        if need_score:
            s = row["score"]
            try:
                s = float(s)
            except (TypeError, ValueError):
                problems.append(f"{path}: row {i + 1} ({p}): score {s!r} is not a number")
                continue
            if not (0.0 <= s <= NUM_BRACKETS - 1) or s != s:
                problems.append(f"{path}: row {i + 1} ({p}): score {s} is out of range 0-10")
                continue
            rec["score"] = s
        if "rater" in cols and row["rater"] is not None:
            rec["rater"] = str(row["rater"])
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
    """Boolean mask of test rows: `fraction` of every bracket (rounded), at least one image
    left for training in every bracket, fixed by `seed`."""
    brackets = np.asarray(brackets)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(brackets), dtype=bool)
    for b in np.unique(brackets):
        idx = np.flatnonzero(brackets == b)
        n_test = int(np.floor(len(idx) * fraction + 0.5))
        n_test = min(n_test, len(idx) - 1)
        if n_test > 0:
            is_test[rng.choice(idx, size=n_test, replace=False)] = True
    return is_test


def bracket_histogram(brackets) -> list[int]:
    counts = Counter(int(b) for b in brackets)
    return [counts.get(b, 0) for b in range(NUM_BRACKETS)]


# --------------------------------------------------------------------------- unlabeled pools


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists())


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
            paths = [str(f) for f in _walk_files(path) if is_image_file(f)]
            if not paths:
                raise DataSourceError(f"{path}: no images found in the unlabeled pool")
            ds = datasets.Dataset.from_dict({"path": paths})
            if streaming:
                ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 1000 or 1)))
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            records, problems = read_manifest(path, need_score=False)
            if problems:
                raise DataSourceError(f"{path}: " + "; ".join(problems[:20]))
            ds = datasets.Dataset.from_dict({"path": [r["path"] for r in records]})
            if streaming:
                ds = ds.to_iterable_dataset()
        else:
            raise DataSourceError(f"{path}: unlabeled pool must be a folder, a manifest, a saved dataset or hub:<name>")
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
    return row.get("path")


def row_name(row: dict) -> str:
    return describe(row_source(row))


# --------------------------------------------------------------------------- torch datasets


def seed_everything_for(*key: int) -> None:
    """Seed python, numpy and torch RNGs from a tuple of ints (one sample's augmentation)."""
    s = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))


class DrawDataset(Dataset):
    """Indexed by global draw number (see module docstring); returns the training views.

    kind='labeled' returns x_lb (weak), y_lb (bracket), y_score; kind='unlabeled' returns
    x_ulb_w, x_ulb_s. An unreadable image is replaced by the next image of the same
    epoch's order and reported in `skipped` as (name, reason)."""

    MAX_RETRIES = 64

    def __init__(self, table, kind: str, weak, strong=None, seed: int = 0, stream: int = 0):
        self.table = table
        self.kind = kind
        self.weak, self.strong = weak, strong
        self.seed, self.stream = int(seed), int(stream)
        self.n = len(table)
        self._perm_epoch, self._perm = None, None
        if kind == "labeled":
            self.scores = np.asarray(table["score"], dtype=np.float32)

    def __len__(self):
        return self.n

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
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
            raise RuntimeError(f"{self.MAX_RETRIES} unreadable images in a row in the {self.kind} set; last: {skipped[-1]}")
        seed_everything_for(self.seed, self.stream, draw)
        if self.kind == "labeled":
            score = float(self.scores[idx])
            return {
                "idx_lb": idx,
                "x_lb": self.weak(img),
                "y_lb": int(bracket_of(score)),
                "y_score": score,
                "skipped": skipped,
            }
        return {"idx_ulb": idx, "x_ulb_w": self.weak(img), "x_ulb_s": self.strong(img), "skipped": skipped}


class StreamingPool(IterableDataset):
    """An unlabeled pool streamed from an iterable `datasets` source (no length needed).

    Each process reads its own shard (`split_dataset_by_node`); each epoch reshuffles with
    a buffer. `idx_ulb` is the position in this process's stream modulo `index_size`
    (algorithms such as FlexMatch keep one slot per pool image)."""

    def __init__(self, table, weak, strong, seed: int, rank: int, world: int, index_size: int, skip: int = 0):
        from datasets.distributed import split_dataset_by_node

        self.table = split_dataset_by_node(table, rank=rank, world_size=world)
        self.weak, self.strong = weak, strong
        self.seed, self.rank, self.index_size = seed, rank, max(1, int(index_size))
        self.skip = int(skip)

    def __iter__(self):
        epoch, count = 0, 0
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        while True:
            stream = self.table.shuffle(seed=self.seed + epoch, buffer_size=1000)
            stream.set_epoch(epoch)
            produced = False
            for i, row in enumerate(stream):
                if i % nworkers != wid:
                    continue
                produced = True
                count += 1
                if count <= self.skip:
                    continue
                try:
                    img = load_image(row_source(row))
                except UnreadableImage as exc:
                    yield {"skip_only": True, "skipped": [(row_name(row), exc.reason)]}
                    continue
                seed_everything_for(self.seed, 1, self.rank, wid, count)
                yield {
                    "idx_ulb": (count - 1) % self.index_size,
                    "x_ulb_w": self.weak(img),
                    "x_ulb_s": self.strong(img),
                    "skipped": [],
                }
            if not produced:
                raise DataSourceError("the streamed unlabeled pool is empty")
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


def worker_init(_worker_id: int) -> None:
    # Each sample reseeds from its draw number; torch's per-worker seeding is not used.
    torch.set_num_threads(1)
