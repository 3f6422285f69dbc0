"""Pseudo-label export: score a huge unlabeled pool with a `model/` folder and keep the best.

    python ssl/export.py --model RUN/model --images POOL --out OUT [--top N] ...
    accelerate launch ssl/export.py ...            (one share of the pool per process)

The pool (a folder, a .csv/.jsonl/.parquet manifest with `path`, a `save_to_disk` folder or
`hub:<name>`, see `aessl.data.load_pool`) is cut into *shards*: shard k holds the source
rows [k*S, (k+1)*S) for `--shard-size` S. Each shard is scored by one process (the
remaining shards are dealt round-robin over the processes) and written atomically as
`OUT/part-<k>.parquet` (a `.tmp` file renamed into place): a shard file either exists
whole or not at all. Its parquet schema metadata (key `aessl.export`) records which rows it
covers, the export's fingerprint and the unreadable images it met. A killed export run again
with the same arguments therefore scores only the shards that are missing; arguments or a
model that would change the rows, and files in OUT that this tool did not write (a
`part-*.parquet` without that metadata, a `top/` in a folder holding no export), are refused
(exit 2) unless `--overwrite`. While an export runs it holds OUT's FolderLock (`OUT/.lock`):
a second export into the same OUT is refused, never interleaved.

Columns (one row per readable image inside the score band):
  path            the image file, or for a dataset row its image's name, else its row index
  row             the row's index in the source (resume and joins)
  expected_score  sum_b p_b * b, 0-10
  score_percent   expected_score * 10, the model card's percent
  bracket         argmax bracket 0-10
  confidence      the argmax probability (or, for a model whose config.json sets
                  confidence_radius r, the mass within +-r brackets of the argmax)
  prob_0..prob_10 the 11 bracket probabilities (flat float columns: easy to filter in
                  datasets, pandas, SQL engines; `np.stack` them for a matrix)
  accepted        confidence >= the threshold of the argmax bracket

`--onnx FILE` (a file of ssl/export_onnx.py; `--backend onnx`) scores with onnxruntime
instead of torch: the same loader and eval transform make the batches, the graph gives the
probabilities, and the rows are the torch backend's within float rounding. The file carries
its model's config (size, normalisation, thresholds), so `--model` is not needed; given
too, the file must have been exported from it. Its fingerprint differs from torch's, so a
resumed export never mixes the two backends' shards.

`--tiles N` (5: four corners and the centre; k*k: a k x k grid; 1, the default: off) scores
each image as N views of side S cut from the image resized so its shorter side is
`--tile-scale` x S (default 2.0; a smaller image is upscaled), and reduces their bracket
distributions with `--tile-reduce` (mean, the default: their average; median, min, max: the
distribution of the tile with the median (lower median for an even N), lowest or highest
expected score), see aessl/tiles.py. The batch of B images becomes B * N views through the
same scoring path (torch or ONNX), so the columns stay the same; --batch-size still counts
images. The settings are part of the fingerprint and the manifest (`tiles`): a resume with
other tile settings is refused like any other change.

When all shards exist the main process writes `errors.jsonl` (row, path, reason of every
unreadable image), `manifest.json` (`complete: true`) and, with `--top N`, `top.csv`,
`top_grid.jpg` and optionally `top/` (links or copies named `0001_<name>`, the name cut
to the file system's limit). A pool of which not one image could be read ends with exit 2
(the finished manifest and errors.jsonl say why).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate
from tqdm.auto import tqdm

from . import faults, grids
from .data import DataSourceError, EvalDataset, RangeBatches, load_pool, row_name, row_source, worker_init
from .fileio import write_atomic, write_text_atomic
from .locks import FolderLock, FolderLocked
from .logs import setup_logging
from .metrics import DEFAULT_THRESHOLD, NUM_BRACKETS, confidence, expected_score
from .models import files_sha256, load_model_folder, model_sha256, resolve_model_folder
from .onnx_backend import OnnxError, OnnxScorer, check_same_model
from .scoring import PRECISIONS, bracket_probs, resolve_precision
from .targets import target_of
from .tiles import (DEFAULT_TILE_SCALE, TILE_REDUCES, TileSettings, TileTransform, flatten_tiles, reduce_scored,
                    settings_from_flags, tile_item)
from .transforms import eval_transform

log = logging.getLogger("aessl.export")

EXPORT_FORMAT = "aessl-export"
EXPORT_FORMAT_VERSION = 1
META_KEY = b"aessl.export"
DEFAULT_SHARD_SIZE = 10_000
GRID_MAX = 100  # the contact sheet shows at most this many of the top N, like the model card's "top 100"
GRID_CELL = 192
MAX_LOGGED_ERRORS = 20
PROB_COLUMNS = [f"prob_{b}" for b in range(NUM_BRACKETS)]
SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")


class ExportError(Exception):
    """Bad input or an OUT folder that holds something else: message for the user, exit 2."""


# --------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="export.py",
        description="Score an unlabeled image pool with a trained model/ folder; write parquet shards, "
        "errors.jsonl and manifest.json to OUT, and optionally the top N.",
    )
    p.add_argument("--model", default=None,
                   help="a model/ folder (config.json + model.safetensors) or a run folder (optional with --onnx)")
    p.add_argument("--images", required=True,
                   help="folder (recursive), .csv/.jsonl/.parquet manifest with 'path', save_to_disk folder, or hub:<name>")
    p.add_argument("--out", required=True, help="output folder (created; resumed when it holds the same export)")
    p.add_argument("--top", type=int, default=0, metavar="N", help="write top.csv and top_grid.jpg for the N best images")
    p.add_argument("--top-copy", choices=("link", "copy"), default=None,
                   help="also put the top N under OUT/top/ as symlinks or copies named 0001_<name>")
    p.add_argument("--min-score", type=float, default=None, metavar="P", help="keep only rows with score_percent >= P (0-100)")
    p.add_argument("--max-score", type=float, default=None, metavar="P", help="keep only rows with score_percent <= P (0-100)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per process (default: min(8, CPU cores / processes on this machine))")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="source rows per output shard")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on CPU")
    p.add_argument("--device", default="auto",
                   help="auto (accelerate's choice: each process's GPU, else CPU), cpu, cuda, or cuda:N (one process)")
    p.add_argument("--streaming", action="store_true", help="stream the source instead of loading it (huge Hub datasets)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows of the source")
    p.add_argument("--backend", choices=("torch", "onnx"), default=None,
                   help="torch (default), or onnx: score with onnxruntime and the --onnx file (ssl/export_onnx.py)")
    p.add_argument("--onnx", default=None, metavar="FILE",
                   help="an .onnx file written by ssl/export_onnx.py (implies --backend onnx; needs no --model)")
    p.add_argument("--overwrite", action="store_true", help="replace an export of different settings in OUT")
    p.add_argument("--tiles", type=int, default=1, metavar="N",
                   help="tiled inference: score N views of each image and reduce them (5: four corners + centre; "
                        "k*k, e.g. 4, 9, 16: a k x k grid; default 1: off, the normal eval view)")
    p.add_argument("--tile-reduce", choices=TILE_REDUCES, default=None,
                   help="how the N tiles' distributions become one (default mean; median/min/max: the tile with the "
                        "median/lowest/highest expected score)")
    p.add_argument("--tile-scale", type=float, default=None, metavar="F",
                   help=f"resize the shorter side to F x the model's image size before cutting tiles "
                        f"(default {DEFAULT_TILE_SCALE:g}; >= 1)")
    args = p.parse_args(argv)
    problems = backend_problems(args)
    problems += tile_problems(args)
    if args.batch_size < 1:
        problems.append("--batch-size must be >= 1")
    if args.workers is None:  # 8 GPUs x 8 workers on a 16-core box would only thrash
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        args.workers = max(1, min(8, (os.cpu_count() or 1) // local))
    if args.workers < 0:
        problems.append("--workers must be >= 0")
    if args.shard_size < 1:
        problems.append("--shard-size must be >= 1")
    if args.top < 0:
        problems.append("--top must be >= 0")
    if args.top_copy and not args.top:
        problems.append("--top-copy needs --top N")
    for name in ("min_score", "max_score"):
        v = getattr(args, name)
        if v is not None and not 0.0 <= v <= 100.0:
            problems.append(f"--{name.replace('_', '-')} is a percent: 0-100, got {v}")
    if args.min_score is not None and args.max_score is not None and args.min_score > args.max_score:
        problems.append(f"--min-score {args.min_score} is above --max-score {args.max_score}")
    if args.limit is not None and args.limit < 1:
        problems.append("--limit must be >= 1")
    if problems:
        p.error("; ".join(problems))
    return args


def backend_problems(args) -> list[str]:
    """Settle --backend from --onnx and say what does not fit: onnx needs a file, torch a
    model folder, and the ONNX graph computes in float32 only."""
    args.backend = args.backend or ("onnx" if args.onnx else "torch")
    if args.backend == "onnx":
        if not args.onnx:
            return ["--backend onnx needs --onnx FILE (write one with: python ssl/export_onnx.py --model RUN --out FILE)"]
        if args.precision not in ("auto", "fp32"):
            return [f"--precision {args.precision}: the ONNX backend scores in float32 (use auto or fp32)"]
        return []
    if args.onnx:
        return ["--onnx is for --backend onnx"]
    return [] if args.model else ["--model is required (or --onnx FILE with --backend onnx)"]


def tile_problems(args) -> list[str]:
    """Settle args.tile_settings (aessl.tiles.TileSettings) from --tiles, --tile-reduce and
    --tile-scale, and say what does not fit."""
    args.tile_settings, problems = settings_from_flags(args.tiles, args.tile_reduce, args.tile_scale)
    return problems


def tiles_of(args) -> TileSettings:
    """The export's tiling (off for arguments made without parse_args)."""
    return getattr(args, "tile_settings", None) or TileSettings()


def resolve_thresholds(info: dict, where: str) -> tuple[list[float], str]:
    """(11 thresholds, 'model' | 'default'): the model's per-bracket thresholds when
    config.json records them, else DEFAULT_THRESHOLD for every bracket."""
    raw = info.get("thresholds")
    if not raw:
        return [DEFAULT_THRESHOLD] * NUM_BRACKETS, "default"
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError):
        raise ExportError(f"{where}: 'thresholds' must be a list of {NUM_BRACKETS} numbers, got {raw!r}") from None
    if len(values) != NUM_BRACKETS or not all(0.0 <= v <= 1.0 for v in values):
        raise ExportError(f"{where}: 'thresholds' must be {NUM_BRACKETS} numbers in 0-1 (or empty), got {raw!r}")
    return values, "model"


def resolve_device(text: str | None) -> torch.device:
    """A `--device` value as a torch.device: auto (CUDA when there is one, else CPU), cpu,
    cuda or cuda:N. Raises ValueError naming the value, before any model is moved."""
    text = (text or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def source_identity(pool, source: str, streaming: bool) -> dict:
    """What the rows are: kind, row count and a digest of their order, so that a resumed
    export can tell the same pool from a changed one (row ranges would no longer match)."""
    if streaming or not hasattr(pool, "__len__"):
        return {"source": source, "kind": "stream", "rows": None, "digest": hashlib.sha256(source.encode()).hexdigest()}
    cols = set(pool.column_names)
    if "path" in cols and "image" not in cols:
        # Batch by batch (a 10M-row pool is never one Python list); the digest is that of
        # the whole newline-joined column, as before.
        h, first = hashlib.sha256(), True
        for batch in pool.select_columns(["path"]).with_format("arrow").iter(batch_size=65536):
            text = "\n".join(map(str, batch.column("path").to_pylist()))
            h.update((text if first else "\n" + text).encode())
            first = False
        digest, kind = h.hexdigest(), "files"
    else:
        # A saved/Hub dataset: its `datasets` fingerprint changes whenever its content does.
        digest = hashlib.sha256(f"{pool._fingerprint}:{len(pool)}".encode()).hexdigest()
        kind = "dataset"
    return {"source": source, "kind": kind, "rows": len(pool), "digest": digest}


# --------------------------------------------------------------------------- reading the pool


class _LastRow:
    """A table whose last row read is kept, so the name of a row costs no second read."""

    def __init__(self, table):
        self.table, self._i, self._row = table, None, None

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        if i != self._i:
            self._row, self._i = self.table[i], i
        return self._row


class ExportDataset(EvalDataset):
    """EvalDataset plus each row's name; any failure on one row is that row's skip, never a crash.
    With a TileTransform (--tiles N) `x` is the image's [N, 3, S, S] views (aessl/tiles.py)."""

    def __init__(self, table, transform, image_size: int):
        super().__init__(_LastRow(table), transform, image_size)
        self.tiles = transform if isinstance(transform, TileTransform) else None

    def __getitem__(self, i):
        i = int(i)
        try:
            row = self.table[i]
            if "image" in row and row["image"] is None and not row.get("path"):
                item = self._failed(i, "no image in this row")
            elif self.tiles is not None:
                item = tile_item(self.table, i, self.tiles)
            else:
                item = super().__getitem__(i)
            item["name"] = row_name(row) if (row.get("image") is not None or row.get("path")) else ""
        except Exception as exc:  # a broken row (odd dict, transform error) is one skip, not a dead export
            item = self._failed(i, f"{type(exc).__name__}: {exc}")
            item["name"] = ""
        return item

    def _failed(self, i: int, reason: str) -> dict:
        x = self.tiles.blank() if self.tiles is not None else torch.zeros(3, self.image_size, self.image_size)
        return {"index": i, "x": x, "ok": False, "reason": reason}


def stream_rows(pool, chunk: int = 256):
    """Rows of an iterable `datasets` source, in order. `.iter()` rather than `iter(pool)`:
    inside a DataLoader worker the latter hands each worker only some of the source's files,
    and every reader here must see the whole row order."""
    for batch in pool.iter(batch_size=chunk):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


class StreamShards(IterableDataset):
    """A streamed pool read shard by shard: yields whole collated batches tagged with their
    shard. Shard k belongs to process k % world and, inside it, to DataLoader worker
    (k // world) % workers; every reader walks the stream but decodes only its own rows."""

    def __init__(self, pool, transform, image_size, shard_size, batch_size, rank, world, done):
        self.pool, self.transform, self.image_size = pool, transform, image_size
        self.shard_size, self.batch_size, self.rank, self.world = shard_size, batch_size, rank, world
        self.done = set(done)

    def _batch(self, rows: list[tuple[int, dict]], shard: int, last: bool, end: int) -> dict:
        ds = ExportDataset([r for _, r in rows], self.transform, self.image_size)
        items = [ds[j] for j in range(len(rows))]
        for (i, _), item in zip(rows, items):
            item["index"] = i
        batch = default_collate(items)
        batch.update(shard=shard, last=last, end=end)
        return batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        S = self.shard_size
        rows, shard, last_i = [], None, -1
        for i, row in enumerate(stream_rows(self.pool)):
            last_i = i
            k = i // S
            if k % self.world != self.rank or (k // self.world) % nworkers != wid or k in self.done:
                continue
            rows.append((i, row))
            shard = k
            end_of_shard = i == (k + 1) * S - 1
            if end_of_shard or len(rows) == self.batch_size:
                yield self._batch(rows, k, end_of_shard, i + 1)
                rows = []
        if rows:  # the stream ended inside this reader's last shard
            yield self._batch(rows, shard, True, last_i + 1)


# --------------------------------------------------------------------------- shards on disk


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def output_schema(meta: dict | None = None):
    fields = [
        pa.field("path", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("expected_score", pa.float32()),
        pa.field("score_percent", pa.float32()),
        pa.field("bracket", pa.int64()),
        pa.field("confidence", pa.float32()),
        *[pa.field(c, pa.float32()) for c in PROB_COLUMNS],
        pa.field("accepted", pa.bool_()),
    ]
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta).encode()} if meta is not None else None)


def score_table(rows, names, probs, thresholds, band, meta, radius: int = 0):
    """The rows of one shard as an arrow table (band applied), with `meta` in the schema."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, NUM_BRACKETS)
    exp = expected_score(probs)
    pct = exp * 10.0
    bracket = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    # the model's own confidence rule (config.json `confidence_radius`; 0 = argmax probability)
    conf = confidence(probs, radius) if len(probs) else np.zeros(0)
    keep = np.ones(len(probs), dtype=bool)
    if band[0] is not None:
        keep &= pct >= band[0]
    if band[1] is not None:
        keep &= pct <= band[1]
    thr = np.asarray(thresholds, dtype=np.float64)
    cols = {
        "path": [n for n, k in zip(names, keep) if k],
        "row": np.asarray(rows, dtype=np.int64)[keep],
        "expected_score": exp[keep].astype(np.float32),
        "score_percent": pct[keep].astype(np.float32),
        "bracket": bracket[keep].astype(np.int64),
        "confidence": conf[keep].astype(np.float32),
        **{c: probs[keep, b].astype(np.float32) for b, c in enumerate(PROB_COLUMNS)},
        "accepted": (conf >= thr[bracket])[keep] if len(probs) else np.zeros(0, dtype=bool),
    }
    schema = output_schema(meta)
    return pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in schema], schema=schema)


def read_shard_meta(path: Path) -> dict | None:
    """The `aessl.export` metadata of a shard file, or None when it is not one of ours or unreadable."""
    try:
        meta = json.loads((pq.read_schema(path).metadata or {})[META_KEY])
    except Exception:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT else None


def scan_shards(out: Path) -> dict[int, tuple[Path, dict | None]]:
    found = {}
    if out.is_dir():
        for f in out.iterdir():
            m = SHARD_RE.match(f.name)
            if m:
                found[int(m.group(1))] = (f, read_shard_meta(f))
    return found


OUR_FILES = ("manifest.json", "errors.jsonl", "top.csv", "top_grid.jpg")


def _is_our_temp(name: str) -> bool:
    """A temp file write_atomic leaves when killed mid-write (`<one of our names>.tmp`)."""
    return name.endswith(".tmp") and (SHARD_RE.match(name[:-4]) is not None or name[:-4] in OUR_FILES)


def clear_export(out: Path) -> None:
    """Remove what an export writes into OUT (and nothing else a user may keep there)."""
    for f in out.iterdir():
        if f.is_file() and (SHARD_RE.match(f.name) or f.name in OUR_FILES or _is_our_temp(f.name)):
            f.unlink()
    if (out / "top.tmp").is_dir():
        shutil.rmtree(out / "top.tmp")
    if (out / "top").is_dir():
        shutil.rmtree(out / "top")


# --------------------------------------------------------------------------- top N


def _sort_keys():
    return [("expected_score", "descending"), ("path", "ascending"), ("row", "ascending")]


def select_top(files: list[Path], n: int):
    """The n rows with the highest expected score over all shards (ties: by path)."""
    cols = ["path", "row", "expected_score", "score_percent", "bracket", "confidence", "accepted"]
    parts = []
    for f in files:  # keep at most n per shard: memory stays O(n * shards), not O(pool)
        t = pq.read_table(f, columns=cols)
        if t.num_rows > n:
            t = t.take(pc.sort_indices(t, sort_keys=_sort_keys())[:n])
        parts.append(t)
    if not parts:
        return pa.table({c: [] for c in cols})
    t = pa.concat_tables(parts)
    return t.take(pc.sort_indices(t, sort_keys=_sort_keys())[:n])


def fetch_sources(pool, rows: list[int]) -> dict[int, object]:
    """load_image-able sources (paths or image dicts) for the given source rows."""
    wanted = set(rows)
    if hasattr(pool, "__len__"):
        return {r: row_source(pool[int(r)]) for r in wanted}
    found = {}
    for i, row in enumerate(stream_rows(pool)):
        if i in wanted:
            found[i] = row_source(row)
            if len(found) == len(wanted):
                break
    return found


def _image_ext(data: bytes) -> str:
    try:
        fmt = (Image.open(io.BytesIO(data)).format or "bin").lower()
    except Exception:
        return "bin"
    return {"jpeg": "jpg"}.get(fmt, fmt)


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of `folder` takes; 255 where it won't say."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def top_file_name(rank: int, width: int, name: str, limit: int = 255) -> str:
    """`0001_<name>`, cut to `limit` bytes: a legal 252-byte name plus the prefix would not
    fit. The stem is shortened a whole character at a time (never a broken UTF-8 sequence),
    the extension kept; the rank prefix alone keeps the names unique."""
    prefix = f"{rank:0{width}d}_"
    if len(os.fsencode(prefix + name)) <= limit:
        return prefix + name
    stem, ext = os.path.splitext(name)
    if len(os.fsencode(prefix + ext)) >= limit:  # an absurd "extension": it goes, the stem stays
        stem, ext = name, ""
    budget = limit - len(os.fsencode(prefix + ext))
    stem = stem[:budget]  # every character is at least one byte
    while len(os.fsencode(stem)) > budget:
        stem = stem[:-1]
    return prefix + stem + ext


def place_top_files(top_dir: Path, ranked: list[tuple[int, str, object]], mode: str) -> None:
    """ranked: (rank, name, source). Files become top_dir/0001_<name> (links or copies)."""
    if top_dir.exists():
        shutil.rmtree(top_dir)
    tmp = top_dir.with_name(top_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    width = max(4, len(str(len(ranked))))
    limit = name_max(tmp)
    for rank, name, src in ranked:
        data = None
        if isinstance(src, dict):
            data = src.get("bytes")
            src = src.get("path") if not data else None
        if data is not None:
            base = Path(name).name if name and not name.isdigit() else f"row{name}.{_image_ext(data)}"
            (tmp / top_file_name(rank, width, base, limit)).write_bytes(data)
            continue
        target = tmp / top_file_name(rank, width, Path(src).name, limit)
        if mode == "link":
            os.symlink(os.path.abspath(src), target)
        else:
            shutil.copy2(src, target)
    os.replace(tmp, top_dir)


def contact_sheet(items: list[tuple[int, float, object]], path: Path, cell: int = GRID_CELL) -> None:
    """A grid of thumbnails with their rank and percent written on them (model card's top-100 sheet)."""
    cols = min(10, max(1, math.ceil(math.sqrt(len(items)))))
    bg = (24, 24, 24)
    tiles = [grids.tile(src, cell, bg, pad=2, resample=Image.Resampling.BICUBIC) for _, _, src in items]
    # floor: 99.96 is not "100.0%"
    captions = [f"{rank}. {math.floor(percent * 10) / 10:.1f}%" for rank, percent, _ in items]
    sheet = grids.sheet(tiles, cols, cell, bg, captions=captions)
    write_atomic(path, lambda tmp: sheet.save(tmp, format="JPEG", quality=88))


def write_top(out: Path, files: list[Path], pool, n: int, copy_mode: str | None) -> dict:
    top = select_top(files, n)
    ranked = top.to_pylist()

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "path", "score_percent", "bracket", "confidence"])
            for i, r in enumerate(ranked, 1):
                w.writerow([i, r["path"], f"{r['score_percent']:.3f}", r["bracket"], f"{r['confidence']:.4f}"])

    write_atomic(out / "top.csv", write_csv)
    need = ranked if copy_mode else ranked[:GRID_MAX]
    sources = fetch_sources(pool, [r["row"] for r in need])
    if copy_mode:
        place_top_files(out / "top", [(i, r["path"], sources[r["row"]]) for i, r in enumerate(ranked, 1)], copy_mode)
    elif (out / "top").is_dir():
        shutil.rmtree(out / "top")  # a folder left by an earlier --top-copy would contradict top.csv
    grid = [(i, r["score_percent"], sources[r["row"]]) for i, r in enumerate(ranked[:GRID_MAX], 1)]
    if grid:
        contact_sheet(grid, out / "top_grid.jpg")
    else:
        (out / "top_grid.jpg").unlink(missing_ok=True)  # an older sheet would contradict an empty top.csv
    return {"n": n, "rows": len(ranked), "csv": "top.csv", "grid": "top_grid.jpg" if grid else None,
            "grid_images": len(grid), "copy": copy_mode, "folder": "top" if copy_mode else None}


# --------------------------------------------------------------------------- the export


def _is_inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def load_scorer(args, device):
    """(model, info, folder, where info comes from): the torch model of --model, or the
    onnxruntime scorer of --onnx (its `folder` is the .onnx file; with --model too, the file
    must have been exported from that folder)."""
    folder = None
    if args.model:
        try:
            folder = resolve_model_folder(args.model)
        except FileNotFoundError as exc:
            raise ExportError(f"--model: {exc}") from None
    if args.backend == "onnx":
        try:
            scorer = OnnxScorer(args.onnx, device=str(device))
            if folder is not None:
                check_same_model(Path(args.onnx), scorer, folder, json.loads((folder / "config.json").read_text()),
                                 model_sha256(folder))
        except (OnnxError, OSError, ValueError) as exc:
            raise ExportError(f"--onnx: {exc}") from None
        return scorer, scorer.info, Path(args.onnx), f"{args.onnx} (its config metadata)"
    try:
        model, info = load_model_folder(folder, device="cpu")
    except Exception as exc:  # bad JSON, wrong format, missing keys, weights that do not fit
        raise ExportError(f"--model {folder}: cannot load the model ({type(exc).__name__}: {exc})") from None
    return model.to(device), info, folder, str(folder / "config.json")


def load_inputs(args, device):
    """(model, info, thresholds, threshold_source, folder, pool, source): every input
    checked before OUT is touched; problems raise ExportError naming the path."""
    model, info, folder, where = load_scorer(args, device)
    thresholds, thr_source = resolve_thresholds(info, where)

    source = str(args.images)
    if not source.startswith("hub:"):
        if not os.path.exists(source) and not source.lower().endswith(".tar"):  # a .tar pattern: load_pool says
            raise ExportError(f"--images: image source not found: {source}")
        source = os.path.abspath(source)
        if os.path.isdir(source) and _is_inside(Path(args.out), Path(source)):
            raise ExportError(f"--out {args.out} is inside --images {source}: its top/ images would join the pool; "
                              "choose an output folder outside the source")
    try:
        pool = load_pool(source, streaming=args.streaming, limit=args.limit)
    except DataSourceError as exc:
        raise ExportError(f"--images: {exc}") from None
    except Exception as exc:
        raise ExportError(f"--images {source}: cannot read the source ({type(exc).__name__}: {exc})") from None
    if hasattr(pool, "__len__") and len(pool) == 0:
        raise ExportError(f"--images {source}: the source has no rows")
    return model, info, thresholds, thr_source, folder, pool, source


def prepare_out(out: Path, spec: dict, fingerprint: str, overwrite: bool, manifest_head: dict) -> set[int]:
    """Main process, OUT locked: make OUT hold this export (or refuse), drop our own stale
    temp files, and return the shards already finished. A file this tool did not write is
    never removed without --overwrite: shards are renamed into place whole, so a shard-named
    file without our metadata is someone else's (or damaged), not a write of ours cut short."""
    problems, ours = [], False
    mpath = out / "manifest.json"
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{mpath}: unreadable ({exc})")
        else:
            ours = isinstance(old, dict) and old.get("format") == EXPORT_FORMAT
            if not ours:
                problems.append(f"{mpath} is not a manifest of this tool")
            elif old.get("fingerprint") != fingerprint:
                old_spec = old.get("spec", {})
                diff = [k for k in sorted(set(spec) | set(old_spec)) if spec.get(k) != old_spec.get(k)]
                problems.append(f"{mpath} records an export with different {', '.join(diff) or 'settings'}")
    shards = scan_shards(out)
    strangers = sorted(path.name for path, meta in shards.values() if meta is None)
    if strangers:
        problems.append(", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
                        + ": named like shards, but not written by this tool (or damaged)")
    foreign = sorted(k for k, (_, meta) in shards.items() if meta is not None and meta.get("fingerprint") != fingerprint)
    if foreign:
        problems.append(f"{len(foreign)} shard(s) (e.g. {shard_name(foreign[0])}) come from a different export")
    ours = ours or any(meta is not None for _, meta in shards.values())
    if not ours:  # our other outputs would be replaced: only when an export of ours says they are ours
        strays = [name for name in ("errors.jsonl", "top.csv", "top_grid.jpg", "top") if (out / name).exists()]
        if strays:
            problems.append(f"{', '.join(strays)}: would be replaced, but no export of this tool is there")
    if problems and not overwrite:
        raise ExportError(f"--out {out} holds files this export would replace: " + "; ".join(problems)
                          + ". Pass --overwrite to replace them, or choose another --out.")
    if problems:
        log.warning("--overwrite: clearing the previous export in %s", out)
        clear_export(out)
        shards = {}
    for f in out.iterdir():
        if f.is_file() and _is_our_temp(f.name):
            f.unlink()  # a write cut short by a kill: never a finished file
    if (out / "top.tmp").is_dir():
        shutil.rmtree(out / "top.tmp")
    write_text_atomic(mpath, json.dumps({**manifest_head, "complete": False}, indent=1))
    return set(shards)


def export_device(choice: str, accelerator) -> torch.device:
    """The device this process scores on. One process goes where --device says; with
    several, each keeps accelerate's (its own GPU, or the CPU), so --device may only name
    the kind."""
    if choice.strip().lower() == "auto":
        return accelerator.device
    try:
        device = resolve_device(choice)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if accelerator.num_processes == 1:
        return device
    if device.index is not None or device.type != accelerator.device.type:
        raise ExportError(f"--device {choice}: with {accelerator.num_processes} processes each scores on the device "
                          f"accelerate gives it ({accelerator.device.type} here); pass --device auto or "
                          f"--device {accelerator.device.type}")
    return accelerator.device


def lock_out(out: Path, is_main: bool, broadcast=None) -> FolderLock | None:
    """OUT exists and is this export's alone until it ends: the main process takes its
    FolderLock and every process learns the same answer. Raises ExportError when OUT cannot
    be used or another live export is writing it."""
    problem = [None]
    if is_main:
        if out.exists() and not out.is_dir():
            problem = [f"--out {out}: exists and is not a folder"]
        else:
            try:
                out.mkdir(parents=True, exist_ok=True)
                if not os.access(out, os.W_OK | os.X_OK):
                    problem = [f"--out {out}: the folder is not writable"]
            except OSError as exc:
                problem = [f"--out {out}: cannot create the folder ({exc})"]
    if broadcast is not None:
        broadcast(problem)
    if problem[0]:
        raise ExportError(problem[0])
    try:
        return FolderLock.acquire_for(out, "export folder", is_main, broadcast)
    except FolderLocked as exc:
        raise ExportError(f"--out: {exc}") from None


def model_identity(folder: Path) -> str:
    """sha256 of what scores: a model folder's config.json + weights, or the .onnx file."""
    return files_sha256(folder) if folder.is_file() else model_sha256(folder)


def agree_on_out(args, out: Path, folder: Path, info: dict, thresholds, thr_source: str, ident: dict, source: str,
                 dtype: torch.dtype, is_main: bool, broadcast) -> dict:
    """Main process: the export's fingerprint and manifest head, and OUT made ready for it
    (new, resumed or refused); every process gets {fingerprint, head, done} or {error}."""
    payload = [None]
    if is_main:
        band = [args.min_score, args.max_score]
        spec = {
            "model_sha256": model_identity(folder),
            "thresholds": thresholds,
            "source": ident,
            "limit": args.limit,
            "shard_size": args.shard_size,
            "score_band_percent": band,
            "precision": str(dtype).replace("torch.", ""),
        }
        if args.backend == "onnx":  # (absent for torch: the fingerprints of earlier exports stay valid)
            spec["backend"] = "onnx"
        if tiles_of(args).on:  # (absent when off, likewise)
            spec["tiles"] = tiles_of(args).record()
        fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
        head = {
            "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "fingerprint": fingerprint, "spec": spec,
            "model": {"folder": str(folder.resolve()), "architecture": info["architecture"],
                      "image_size": info["image_size"], "thresholds": thresholds, "thresholds_source": thr_source,
                      "default_threshold": DEFAULT_THRESHOLD, "backend": args.backend},
            "source": {"images": source, "kind": ident["kind"], "rows": ident["rows"], "streaming": bool(args.streaming)},
            "shard_size": args.shard_size, "score_band_percent": band, "precision": spec["precision"],
            "tiles": tiles_of(args).record(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            done = prepare_out(out, spec, fingerprint, args.overwrite, head)
            payload = [{"fingerprint": fingerprint, "head": head, "done": sorted(done)}]
        except ExportError as exc:
            payload = [{"error": str(exc)}]
        except OSError as exc:
            payload = [{"error": f"--out {out}: {exc}"}]
    if broadcast is not None:
        broadcast(payload)
    return payload[0]


def main(argv=None) -> int:
    args = parse_args(argv)

    accelerator = Accelerator(cpu=args.device.strip().lower() == "cpu")
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    broadcast = broadcast_object_list if world > 1 else None
    setup_logging(is_main)
    out = Path(args.out)

    def fail(msg: str) -> int:
        if is_main:
            print(f"error: {msg}", file=sys.stderr)
        return 2

    # ---------------------------------------------------------------- inputs (before OUT is touched)
    try:
        device = export_device(args.device, accelerator)
        inputs = load_inputs(args, device)
    except ExportError as exc:
        return fail(str(exc))
    dtype = resolve_precision(args.precision, device) if args.backend == "torch" else torch.float32
    if args.backend == "onnx" and "CUDAExecutionProvider" not in inputs[0].providers:
        device = torch.device("cpu")  # where the scoring runs (the manifest says so; no pinned pages)
    pool, source = inputs[-2:]
    ident = source_identity(pool, source, args.streaming)
    if len(set(gather_object([ident["digest"]]))) > 1:
        return fail(f"--images {source}: the processes see different rows (is the folder changing?)")

    # ---------------------------------------------------------------- OUT: ours alone, then new, resumed, or refused
    try:
        lock = lock_out(out, is_main, broadcast)
    except ExportError as exc:
        return fail(str(exc))
    try:
        return run_export(args, accelerator, device, dtype, inputs, ident, out, broadcast, fail)
    finally:
        if lock is not None:  # also when a kill hook or an error ends the export: the next run may start
            lock.release()


def run_export(args, accelerator, device, dtype, inputs, ident, out: Path, broadcast, fail) -> int:
    """Everything after OUT is locked: agree on OUT, score this process's shards, and (main
    process) check the whole, write errors, top N and the manifest."""
    model, info, thresholds, thr_source, folder, pool, source = inputs
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    state = agree_on_out(args, out, folder, info, thresholds, thr_source, ident, source, dtype, is_main, broadcast)
    if "error" in state:
        return fail(state["error"])
    fingerprint, head, done = state["fingerprint"], state["head"], set(state["done"])
    meta_base = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "fingerprint": fingerprint,
                 "model_folder": head["model"]["folder"], "architecture": info["architecture"],
                 "thresholds": thresholds, "thresholds_source": thr_source, "score_band_percent": head["score_band_percent"],
                 "tiles": head["tiles"]}
    t0 = time.time()
    counts = score_shards(args, model, info, pool, ident, done, device, dtype, out, meta_base, rank, world, is_main)
    all_counts = gather_object([counts])
    accelerator.wait_for_everyone()
    if not is_main:
        return 0
    session = {k: sum(c[k] for c in all_counts) for k in counts}
    return finish_export(args, out, pool, ident, head, done, session, time.time() - t0, device, world)


def score_shards(args, model, info, pool, ident, done, device, dtype, out, meta_base, rank, world, is_main) -> dict:
    """Score and write this process's shards; returns its counts (scored, unreadable,
    written, shards)."""
    loader, bounds, my_rows = shard_loader(args, info, pool, ident, done, device, rank, world)
    if device.type == "cuda" and isinstance(model, torch.nn.Module):  # fixed-size batches: let cuDNN pick its
        torch.backends.cudnn.benchmark = True  # fastest kernels; NHWC suits bf16 convolutions
        model = model.to(memory_format=torch.channels_last)
    desc = "export" if world == 1 else f"export [{rank + 1}/{world}]"
    bar = tqdm(total=my_rows, disable=not is_main, desc=desc, unit="img", dynamic_ncols=True, mininterval=1.0)
    writer = ShardWriter(args.shard_size, bounds, out, meta_base, int(info.get("confidence_radius", 0)), rank, world,
                         bar)
    for probs, batch in scored_batches(model, loader, device, dtype, info, tiles_of(args)):
        writer.add(probs, batch)
    bar.close()
    if writer.buffers:
        raise RuntimeError(f"shards {sorted(writer.buffers)} were left unfinished")  # a bug in the readers
    return writer.counts


def scored_batches(model, loader, device, dtype, info, tiles: TileSettings | None = None):
    """The backend seam: (probabilities on the host, batch) from torch's scoring loop, or
    from onnxruntime for an ONNX scorer; the same loader (eval transform) feeds both. With
    tiles on, each batch's [B, n, 3, S, S] views are scored as B * n images and reduced back
    to B rows here, whichever backend scores them."""
    tiled = tiles is not None and tiles.on
    if tiled:
        loader = flatten_tiles(loader)
    if isinstance(model, OnnxScorer):
        scored = model.bracket_probs(loader)
    else:
        scored = bracket_probs(model, loader, device, dtype, channels_last=True, target=target_of(info))
    return reduce_scored(scored, tiles.reduce) if tiled else scored


def shard_loader(args, info, pool, ident, done, device, rank: int, world: int):
    """(loader, {shard: (start, end)} or None when streamed, this process's row count or
    None): batches of this process's unfinished shards, a batch never spanning two."""
    S, B, W = args.shard_size, args.batch_size, args.workers
    tiles = tiles_of(args)
    tf = tiles.transform(info) if tiles.on else eval_transform(info)
    size = int(info["image_size"])
    # pinned pages: async host-to-GPU copies
    kw = dict(num_workers=W, pin_memory=device.type == "cuda", worker_init_fn=worker_init)
    if W > 0:
        kw["prefetch_factor"] = 4
    if ident["rows"] is None:  # streamed: shards are cut as the rows arrive
        return DataLoader(StreamShards(pool, tf, size, S, B, rank, world, done), batch_size=None, **kw), None, None
    n = ident["rows"]
    todo = [k for k in range(math.ceil(n / S)) if k not in done]
    mine = todo[rank::world]
    bounds = {k: (k * S, min((k + 1) * S, n)) for k in mine}
    loader = DataLoader(ExportDataset(pool, tf, size), batch_sampler=RangeBatches([bounds[k] for k in mine], B), **kw)
    return loader, bounds, sum(e - s for s, e in bounds.values())


class ShardWriter:
    """Collects scored batches per shard and writes a shard's parquet file (atomically) as
    soon as its last row is in. `bounds` None: a streamed pool, whose batches say where
    their shard ends."""

    def __init__(self, shard_size: int, bounds: dict | None, out: Path, meta_base: dict, radius: int, rank: int,
                 world: int, bar):
        self.S, self.bounds, self.out, self.meta_base, self.radius = shard_size, bounds, out, meta_base, radius
        self.rank, self.world, self.bar = rank, world, bar
        self.buffers: dict[int, dict] = {}
        self.counts = {"scored": 0, "unreadable": 0, "written": 0, "shards": 0}
        self.logged = 0

    def add(self, host_probs, batch: dict) -> None:
        rows = batch["index"].tolist()
        streaming = self.bounds is None
        k = batch["shard"] if streaming else rows[0] // self.S
        buf = self.buffers.setdefault(k, {"rows": [], "names": [], "ok": [], "reasons": [], "probs": []})
        buf["rows"] += rows
        buf["names"] += list(batch["name"])
        buf["ok"] += batch["ok"].tolist()
        buf["reasons"] += list(batch["reason"])
        buf["probs"].append(np.asarray(host_probs))  # a CPU tensor (torch) or an array (onnx)
        self.bar.update(len(rows))
        if streaming:
            if batch["last"]:
                self.finish(k, batch["end"])
        elif rows[-1] + 1 == self.bounds[k][1]:
            self.finish(k, self.bounds[k][1])

    def finish(self, k: int, end: int) -> None:
        buf = self.buffers.pop(k)
        start = k * self.S
        if len(buf["rows"]) != end - start or buf["rows"][0] != start:
            raise RuntimeError(f"shard {k}: got {len(buf['rows'])} rows for range [{start}, {end})")  # a bug, not bad data
        ok = np.asarray(buf["ok"], dtype=bool)
        rows = np.asarray(buf["rows"], dtype=np.int64)
        names = [nm if nm and nm != "<bytes>" else str(r) for nm, r in zip(buf["names"], rows)]
        errors = [{"row": int(r), "path": nm, "reason": why}
                  for r, nm, good, why in zip(rows, names, ok, buf["reasons"]) if not good]
        self.log_errors(errors)
        probs = np.concatenate(buf["probs"])[ok] if buf["probs"] else np.zeros((0, NUM_BRACKETS))
        meta = {**self.meta_base, "shard": k, "row_start": start, "row_end": end, "rows_scored": int(ok.sum()),
                "unreadable": len(errors), "errors": errors, "rank": self.rank, "num_processes": self.world}
        table = score_table(rows[ok], [nm for nm, g in zip(names, ok) if g], probs, self.meta_base["thresholds"],
                            self.meta_base["score_band_percent"], meta, radius=self.radius)
        meta["rows_written"] = table.num_rows
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        write_atomic(self.out / shard_name(k), lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        for key, n in (("scored", int(ok.sum())), ("unreadable", len(errors)), ("written", table.num_rows), ("shards", 1)):
            self.counts[key] += n
        faults.kill_point(faults.KILL_AFTER_EXPORT_SHARDS, self.counts["shards"], at_least=True)  # the resume tests

    def log_errors(self, errors: list[dict]) -> None:
        for e in errors:
            if self.logged < MAX_LOGGED_ERRORS:
                self.bar.write(f"skipping unreadable image {e['path']}: {e['reason']}", file=sys.stderr)
                self.logged += 1
                if self.logged == MAX_LOGGED_ERRORS:
                    self.bar.write("(further unreadable images are listed only in errors.jsonl)", file=sys.stderr)


def finish_export(args, out: Path, pool, ident: dict, head: dict, done: set, session: dict, elapsed: float,
                  device, world: int) -> int:
    """Main process, after every process is done: check that every shard is there, then
    write errors.jsonl, the top N and the complete manifest."""
    S = args.shard_size
    fingerprint = head["fingerprint"]
    streaming = ident["rows"] is None
    shards = scan_shards(out)
    metas = {k: m for k, (_, m) in shards.items() if m is not None and m.get("fingerprint") == fingerprint}
    expected = math.ceil(ident["rows"] / S) if not streaming else (max(metas) + 1 if metas else 0)
    missing = sorted(set(range(expected)) - set(metas))
    if missing or (streaming and metas and any(metas[k]["row_end"] - metas[k]["row_start"] != S for k in range(expected - 1))):
        print(f"error: {out}: shard(s) {missing[:10]} missing after scoring; run the same command again to finish",
              file=sys.stderr)
        return 1
    files = [out / shard_name(k) for k in range(expected)]
    errors = [e for k in range(expected) for e in metas[k]["errors"]]
    write_text_atomic(out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
    total_rows = metas[expected - 1]["row_end"] if expected else 0
    top = None
    if args.top:
        top = write_top(out, files, pool, args.top, args.top_copy)
    else:
        for f in ("top.csv", "top_grid.jpg"):
            (out / f).unlink(missing_ok=True)
    seen = session["scored"] + session["unreadable"]
    manifest = {
        **head,
        "complete": True,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_files": "part-*.parquet",
        "columns": [f.name for f in output_schema()],
        "shards": [{"file": shard_name(k), "rows": [metas[k]["row_start"], metas[k]["row_end"]],
                    "scored": metas[k]["rows_scored"], "written": metas[k]["rows_written"],
                    "unreadable": metas[k]["unreadable"], "rank": metas[k]["rank"]} for k in range(expected)],
        "source_rows": total_rows,
        "rows_scored": sum(m["rows_scored"] for m in metas.values()),
        "rows_written": sum(m["rows_written"] for m in metas.values()),
        "unreadable": len(errors),
        "errors_file": "errors.jsonl",
        "num_processes": world,
        "device": str(device),
        "this_run": {"shards": session["shards"], "images": seen, "seconds": round(elapsed, 3),
                     "images_per_second": round(seen / elapsed, 2) if elapsed > 0 else None,
                     "resumed_shards": len(done)},
        "top": top,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    rate = f"{seen / elapsed:.1f}" if elapsed > 0 and seen else "-"
    resumed = f", {len(done)} of {expected} shard(s) already done" if done else ""
    print(f"export: {manifest['rows_written']} rows written ({manifest['rows_scored']} scored, "
          f"{manifest['unreadable']} unreadable) to {out} | this run: {seen} images in {elapsed:.1f}s, "
          f"{rate} images/s, {world} process(es) on {device.type}{resumed}"
          + (f" | tiles: {tiles_of(args).describe()}" if tiles_of(args).on else ""))
    if top:
        print(f"top {top['rows']}: {out / 'top.csv'}"
              + (f", {out / top['grid']}" if top["grid"] else "")
              + (f", {out / 'top'}/ ({top['copy']})" if top["copy"] else ""))
    if errors and not manifest["rows_scored"]:
        # A finished export of nothing: the pool is the problem (wrong folder, a format Pillow
        # cannot read); say so rather than exit 0 on an empty result.
        print(f"error: none of the {len(errors)} image(s) of --images {head['source']['images']} could be read "
              f"(e.g. {errors[0]['path']}: {errors[0]['reason']}); all are listed in {out / 'errors.jsonl'}",
              file=sys.stderr)
        return 2
    return 0
