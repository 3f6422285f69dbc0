"""Embedding mode: a frozen backbone's features computed once, cached, and small heads trained on them.

With the backbone frozen, every experiment after the first (algorithm, thresholds, head,
seed) reads features from disk instead of decoding and augmenting images, and costs
seconds. FixMatch-style algorithms still compare a weak and a strong view of the same
image: the cache holds, per image, the eval view plus K weak and K strong augmented views.

Cache layout, one folder per (backbone, views, storage dtype) spec:

    <cache_dir>/<key>/manifest.json            what the key stands for, and what the cache holds
    <cache_dir>/<key>/.lock                    held by the one process that writes into the key folder
    <cache_dir>/<key>/shard-<id>/keys.npy      content hashes of the shard's images   [N]
    <cache_dir>/<key>/shard-<id>/feats.npy     features [N, 1 + 2K, D]: eval, K weak, K strong
    <cache_dir>/<key>/shard-<id>/skipped.json  {hash: reason} for images that could not be read
    <cache_dir>/files.sqlite                   (path, size, mtime) -> content hash memo

`key` hashes the backbone's weights (a different checkpoint of the same architecture is a
different backbone), its timm name and keyword arguments (the same weights pooled another
way give other features), every setting of the views and the storage dtype. Images are keyed by
the hash of their bytes, so a renamed or moved file is still a hit and a changed file is a
miss. A shard folder is written under a temp name and renamed into place: a killed pass
leaves only whole shards, and the next pass computes only the images no shard holds.
The view of image h numbered v is seeded from (embed.seed, h, v) alone, so the cache does
not depend on the order, the worker count or the number of processes that filled it.

Only images whose bytes were read and failed to decode are remembered as skips; a read that
failed (permissions, I/O error, a file briefly missing) is skipped for this pass and retried
on the next one. Shard files are opened on demand, a few at a time: a cache of a million
images has hundreds of shards, more than a process may hold open.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import socket
import sqlite3
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import faults
from .data import (SOURCE_CHUNK, RangeBatches, TableSources, balance_weights, draw_order, seed_everything_for,
                   worker_init)
from .heads import EmbeddingError
from .images import UnreadableImage, describe, load_image
from .locks import FolderLock, FolderLocked, pid_alive
from .metrics import bracket_of
from .models import check_image_size, create_backbone, data_config
from .sources import REPO_ROOT
from .transforms import eval_transform, train_transforms

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: the key also covers the architecture, its kwargs and the storage dtype
HASH_CHARS = 32
MAX_OPEN_SHARDS = 32  # shard files kept open while training: open files must not grow with the cache


# --------------------------------------------------------------------------- keys


def weights_digest(module: nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def view_spec(info: dict, augment_cfg, embed_cfg) -> dict:
    """Every setting of the views that changes a cached feature (feature_spec adds the rest)."""
    return {
        "image_size": int(info["image_size"]), "mean": info["mean"], "std": info["std"],
        "interpolation": info["interpolation"], "crop_pct": float(info["crop_pct"]),
        "weak_scale_min": augment_cfg["weak_scale_min"], "strong_n": augment_cfg["strong_n"],
        "strong_m": augment_cfg["strong_m"], "strong_exclude_color": augment_cfg["strong_exclude_color"],
        "views": embed_cfg["views"], "seed": embed_cfg["seed"],
        # newer settings, only when changed: caches written before they existed stay valid
        **{k: (list(augment_cfg[k]) if k == "strong_ops" else augment_cfg[k])
           for k, default in (("strong_ops", None), ("strong_scale", 1.0), ("strong_cutout", 0.5))
           if augment_cfg.get(k, default) != default},
    }


def feature_spec(info: dict, backbone_digest: str, augment_cfg, embed_cfg) -> dict:
    """Everything a cached feature depends on; the cache key is its hash, the manifest records it.

    The weights alone do not pin the features: timm names that share a state dict, or
    model.kwargs such as global_pool, compute other features from the same weights."""
    return {"format": CACHE_FORMAT_VERSION, "architecture": info["architecture"],
            "model_kwargs": info["model_kwargs"], "backbone_sha256": backbone_digest,
            "dtype": embed_cfg["dtype"], "views": view_spec(info, augment_cfg, embed_cfg)}


def cache_key(spec: dict) -> str:
    # default=str: a kwarg YAML cannot hold as JSON (a tuple made in code) still keys by its text
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- content hashes


def _hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=HASH_CHARS // 2).hexdigest()


def read_image_bytes(source) -> bytes | None:
    """The bytes of one image source (a path, or a datasets {'bytes', 'path'} dict); None when
    it names no image. OSError means the storage failed, not the image: the caller retries."""
    if isinstance(source, dict):
        if source.get("bytes"):
            return source["bytes"]
        source = source.get("path")
    if source is None:
        return None
    with open(source, "rb") as f:
        return f.read()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class ContentHasher:
    """Content hash of each image source; for files, memoised by (path, size, mtime_ns) in
    sqlite so an unchanged pool of a million files is not read again on every run."""

    COMMIT_EVERY = 4096  # memo rows per sqlite commit (a commit is an fsync)

    def __init__(self, cache_dir: Path, workers: int = 8):
        self.db_path = Path(cache_dir) / "files.sqlite"
        self.workers = workers

    def _connect(self):
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.db_path, timeout=60)
        con.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, hash TEXT)")
        return con

    @staticmethod
    def _memo(con, sources: list) -> dict:
        paths = sorted({os.path.abspath(s) for s in sources if isinstance(s, (str, os.PathLike))})
        memo = {}
        for i in range(0, len(paths), 900):  # sqlite's limit on bound parameters
            chunk = paths[i:i + 900]
            q = f"SELECT path, size, mtime_ns, hash FROM files WHERE path IN ({','.join('?' * len(chunk))})"
            memo.update({p: (s, m, h) for p, s, m, h in con.execute(q, chunk)})
        return memo

    @staticmethod
    def _hash_one(memo: dict, src):
        """(hash or None, reason when None, new memo row or None)."""
        if isinstance(src, dict) and src.get("bytes"):
            return _hash_bytes(src["bytes"]), "", None
        if isinstance(src, dict) and src.get("bytes") == b"":  # an empty tar member: its "path" is only a name
            return None, "empty file (0 bytes)", None
        path = src.get("path") if isinstance(src, dict) else src
        if path is None:
            return None, "the row holds no image (no bytes and no path)", None
        full = os.path.abspath(path)
        try:
            st = os.stat(full)
            known = memo.get(full)
            if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
                return known[2], "", None
            h = _hash_bytes(read_image_bytes(full))
        except OSError as exc:
            return None, f"cannot read file: {exc.strerror or exc}", None
        return h, "", (full, st.st_size, st.st_mtime_ns, h)

    def hash_sources(self, sources: Iterable, total: int | None = None, desc: str = "hash",
                     show: bool = True) -> list[tuple[str | None, str]]:
        """[(hash or None, reason when None)] in order. `sources` is consumed SOURCE_CHUNK at a
        time (a generator over a table's rows keeps only one chunk of image bytes alive)."""

        total = len(sources) if total is None and hasattr(sources, "__len__") else total
        con = self._connect()
        out, new = [], []
        try:
            with ThreadPoolExecutor(self.workers) as pool, \
                    tqdm(total=total, desc=desc, disable=not show or (total or 0) < 5000, leave=False,
                         dynamic_ncols=True) as bar:
                for chunk in _chunks(sources, SOURCE_CHUNK):
                    memo = self._memo(con, chunk)
                    for h, reason, row in pool.map(lambda src: self._hash_one(memo, src), chunk):
                        out.append((h, reason))
                        if row:
                            new.append(row)
                    if len(new) >= self.COMMIT_EVERY:  # a killed pass keeps what it hashed
                        self._remember(con, new)
                        new = []
                    bar.update(len(chunk))
            self._remember(con, new)
            return out
        finally:
            con.close()

    @staticmethod
    def _remember(con, rows: list) -> None:
        if rows:
            con.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", rows)
            con.commit()


# --------------------------------------------------------------------------- the cache


class ShardFile(NamedTuple):
    """Where one shard's feature rows lie in its .npy file."""
    path: Path
    offset: int  # bytes before row 0 (the .npy header)
    shape: tuple  # [N, 1 + 2K, D]
    dtype: np.dtype


def read_shard_header(path: Path) -> ShardFile:
    """The .npy header of a feats file, checked against the file's size (a torn copy of a
    cache would otherwise read as zeros or fail deep inside a training step)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran_order, dtype = readers[version](f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"embedding cache shard {path} cannot be read ({exc}); delete its shard folder "
                             "and run again to recompute it") from exc
    want = offset + int(np.prod(shape)) * dtype.itemsize
    if fortran_order or len(shape) != 3 or dtype not in (np.float16, np.float32) or size < want:
        raise EmbeddingError(f"embedding cache shard {path} is damaged (shape {shape}, {dtype}, {size} of {want} "
                             "bytes); delete its shard folder and run again to recompute it")
    return ShardFile(Path(path), offset, tuple(shape), dtype)


class FeatureCache:
    """The shards of one cache key: lookup by content hash, feature rows read on demand.

    Rows are read with pread from shard files kept open in a small LRU (MAX_OPEN_SHARDS):
    a memory map per shard would hold one file descriptor each, and a pool of two million
    images (1,000 shards) would pass the usual limit of 1,024 open files."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._open: OrderedDict[int, int] = OrderedDict()  # shard number -> fd, least recently used first
        self.refresh()

    @staticmethod
    def shard_dirs(root: Path) -> list[Path]:
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.name.startswith("shard-") and (p / "feats.npy").is_file())

    def refresh(self) -> None:
        self.close()  # shard numbers change when new shards land between old ones
        self.shards, self.lookup, self.skipped = [], {}, {}
        for k, d in enumerate(self.shard_dirs(self.root)):
            keys = np.load(d / "keys.npy", allow_pickle=False)
            self.shards.append(read_shard_header(d / "feats.npy"))
            for r, h in enumerate(keys.tolist()):
                self.lookup[h] = (k, r)
            sk = d / "skipped.json"
            if sk.is_file():
                self.skipped.update(json.loads(sk.read_text()))
        widths = {s.shape[2] for s in self.shards if s.shape[0]}
        if len(widths) > 1:
            raise EmbeddingError(f"embedding cache {self.root} mixes feature widths {sorted(widths)}; delete the "
                                 "folder and run again")
        self.dim = widths.pop() if widths else 0
        # per shard, for offsets computed for a whole batch at once
        self._base = np.array([s.offset for s in self.shards], dtype=np.int64)
        self._views = np.array([s.shape[1] for s in self.shards], dtype=np.int64)
        self._half = np.array([s.dtype == np.float16 for s in self.shards], dtype=bool)

    def has(self, h: str) -> bool:
        return h in self.lookup or h in self.skipped

    def _fd(self, k: int) -> int:
        fd = self._open.pop(k, None)
        if fd is None:
            if len(self._open) >= MAX_OPEN_SHARDS:
                os.close(self._open.popitem(last=False)[1])
            fd = os.open(self.shards[k].path, os.O_RDONLY)
        self._open[k] = fd
        return fd

    def read(self, shards: np.ndarray, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Float32 features [n, D]: view views[i] of row rows[i] of shard shards[i].

        One pread per row, shard after shard and in file order within one (the caller's
        order is restored), so each shard file is looked up once per batch."""
        shards, rows, views = (np.asarray(a, dtype=np.int64) for a in (shards, rows, views))
        order = np.lexsort((rows, shards))
        k_sorted = shards[order]
        half = self._half[k_sorted]
        width = np.where(half, 2, 4) * self.dim  # bytes of one stored row
        offsets = self._base[k_sorted] + (rows[order] * self._views[k_sorted] + views[order]) * width
        buf = np.empty((len(order), 4 * self.dim), dtype=np.uint8)  # room for a float32 row
        flat, step, last = memoryview(buf).cast("B"), 4 * self.dim, -1
        for j, (k, off, nbytes) in enumerate(zip(k_sorted.tolist(), offsets.tolist(), width.tolist())):
            if k != last:
                fd, last = self._fd(k), k
            if os.preadv(fd, [flat[j * step:j * step + nbytes]], off) != nbytes:
                raise EmbeddingError(f"embedding cache shard {self.shards[k].path} ended early (was it truncated?); "
                                     "delete its shard folder and run again to recompute it")
        out = np.empty((len(order), self.dim), dtype=np.float32)
        if half.any():
            out[order[half]] = buf[half, :2 * self.dim].view(np.float16)
        if not half.all():  # shards stored as float32 (features too large for float16)
            out[order[~half]] = buf[~half].view(np.float32)
        return out

    def features(self, h: str) -> np.ndarray:
        """Every cached view of one image, [1 + 2K, D] float32."""
        k, r = self.lookup[h]
        n_views = self.shards[k].shape[1]
        return self.read(np.full(n_views, k), np.full(n_views, r), np.arange(n_views))

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])

    def __del__(self):
        if getattr(self, "_open", None):
            try:
                self.close()
            except (AttributeError, TypeError, OSError):  # at interpreter exit `os` may be gone already
                pass

    def __getstate__(self):  # a copy in another process opens its own files
        return {**self.__dict__, "_open": OrderedDict()}


def clean_stale_temps(root: Path) -> None:
    """Remove temp shard folders left by dead processes of this host (a killed pass)."""
    if not root.is_dir():
        return
    host = socket.gethostname()
    for p in root.glob(".tmp-*"):
        parts = p.name.split("-")
        try:
            same_host, pid = parts[1] == host.replace("-", "_"), int(parts[2])
        except (IndexError, ValueError):
            continue
        if same_host and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def write_shard(root: Path, keys: list[str], feats: np.ndarray, skipped: dict[str, str]) -> Path:
    """Write one shard folder atomically; its name is derived from its contents."""
    ident = hashlib.sha256("".join(keys + sorted(skipped)).encode()).hexdigest()[:16]
    final = root / f"shard-{ident}"
    tmp = root / f".tmp-{socket.gethostname().replace('-', '_')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    np.save(tmp / "keys.npy", np.asarray(keys, dtype=f"<U{HASH_CHARS}"), allow_pickle=False)
    np.save(tmp / "feats.npy", feats, allow_pickle=False)
    (tmp / "skipped.json").write_text(json.dumps(skipped))
    if final.exists():  # the same images computed twice (two runs at once): keep the first
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    return final


class ViewsDataset(Dataset):
    """Every cached view of one image, stacked: [1 + 2K, 3, S, S] (eval, K weak, K strong).

    items are (hash, table name, row); the row's image is read from `sources` when needed."""

    def __init__(self, items: list[tuple[str, str, int]], sources: dict, eval_tf, weak, strong, views: int, seed: int,
                 size: int):
        self.items, self.sources, self.eval_tf, self.weak, self.strong = items, sources, eval_tf, weak, strong
        self.views, self.seed, self.size = int(views), int(seed), int(size)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        h, name, row = self.items[i]
        src = None
        try:
            src = self.sources[name][row]
            data = read_image_bytes(src)
        except OSError as exc:  # the storage failed, not the image: skipped now, retried next pass
            return self._skipped(i, src, f"cannot read file: {exc.strerror or exc}", retry=True)
        try:
            if data == b"":
                raise UnreadableImage(describe(src), "empty file (0 bytes)")
            # Decoded from the bytes read above, so any failure from here on is the image's own.
            # The eval view is decoded exactly as export and report decode it (JPEG draft
            # scale), so cached eval features are what the exported model computes.
            img = load_image(data, draft_size=self.size * 2)
            xs = [self.eval_tf(img)]
            for v in range(2 * self.views):
                seed_everything_for(self.seed, int(h[:8], 16), int(h[8:16], 16), v)
                xs.append((self.weak if v < self.views else self.strong)(img))
            return {"i": i, "ok": True, "retry": False, "reason": "", "name": describe(src), "x": torch.stack(xs)}
        except UnreadableImage as exc:
            reason = exc.reason
        except Exception as exc:  # a transform failing on one odd image is that image's skip
            reason = f"{type(exc).__name__}: {exc}"
        return self._skipped(i, src, reason, retry=False)

    def _skipped(self, i: int, src, reason: str, retry: bool) -> dict:
        n = 1 + 2 * self.views
        return {"i": i, "ok": False, "retry": retry, "reason": reason, "name": describe(src),
                "x": torch.zeros(n, 3, self.size, self.size)}


def fill_cache(root: Path, todo: list[tuple[str, str, int]], sources: dict, backbone: nn.Module, transforms: tuple,
               embed_cfg, accelerator, workers: int) -> tuple[dict, dict]:
    """Compute the views of every (hash, table name, row) in `todo` and write them as shards.

    `todo` is the same list on every process; process r takes chunks r, r+W, ...
    Returns (stats, {hash: reason} of the images whose read failed this pass: not in any shard)."""

    eval_tf, weak, strong, size = transforms
    S = embed_cfg["shard_size"]
    rank, world = accelerator.process_index, accelerator.num_processes
    chunk_ids = list(range(rank, -(-len(todo) // S), world))
    mine = [todo[k * S:(k + 1) * S] for k in chunk_ids]
    items = [it for chunk in mine for it in chunk]
    bounds, pos = [], 0
    for chunk in mine:
        bounds.append((pos, pos + len(chunk)))
        pos += len(chunk)
    stats, retry = {"computed": 0, "unreadable": 0, "read_errors": 0, "shards": 0}, {}
    if not items:
        return stats, retry
    ds = ViewsDataset(items, sources, eval_tf, weak, strong, embed_cfg["views"], embed_cfg["seed"], size)
    on_cuda = accelerator.device.type == "cuda"
    kw = dict(num_workers=workers, worker_init_fn=worker_init, pin_memory=on_cuda)
    if workers > 0:
        kw["prefetch_factor"] = 4
    loader = DataLoader(ds, batch_sampler=RangeBatches(bounds, embed_cfg["batch_size"]), **kw)
    dtype = np.float16 if embed_cfg["dtype"] == "float16" else np.float32
    backbone = backbone.to(accelerator.device).eval()
    bar = tqdm(total=len(items) * world, desc="embed", disable=not accelerator.is_main_process, dynamic_ncols=True)
    chunk_i, got = 0, {}
    with torch.inference_mode():
        for batch in loader:
            ok = batch["ok"].numpy()
            B, V = batch["x"].shape[:2]
            f = None
            if ok.any():
                # Indexing makes an unpinned copy; the usual all-readable batch goes over as it came.
                x = batch["x"] if ok.all() else batch["x"][torch.from_numpy(ok)]
                with accelerator.autocast():
                    f = backbone(x.flatten(0, 1).to(accelerator.device, non_blocking=True))
                # float32 before leaving the device: numpy has no bfloat16
                f = iter(f.float().reshape(int(ok.sum()), V, -1).cpu().numpy())
            for j, i in enumerate(batch["i"].tolist()):
                got[i] = (bool(ok[j]), next(f) if ok[j] else None, batch["reason"][j], bool(batch["retry"][j]),
                          batch["name"][j])
            bar.update(B * world)
            s, e = bounds[chunk_i]
            if len(got) == e - s:  # the chunk is whole: write it as one shard
                stats_i = _write_chunk(root, [items[i][0] for i in range(s, e)], [got[i] for i in range(s, e)], dtype,
                                       V, retry)
                for k, v in stats_i.items():
                    stats[k] += v
                got, chunk_i = {}, chunk_i + 1
                faults.kill_point(faults.KILL_AFTER_CACHE_CHUNKS, chunk_i)  # the resume test
    bar.close()
    return stats, retry


def _write_chunk(root: Path, hashes: list[str], results: list[tuple], dtype, V: int, retry: dict) -> dict:
    """One shard from a whole chunk's results. Decode failures are stored (never tried again);
    failed reads go to `retry` instead, so the next pass reads them again."""
    keys, rows, skipped = [], [], {}
    for h, (good, f, reason, again, name) in zip(hashes, results):
        if good:
            keys.append(h)
            rows.append(f)
        elif again:
            retry[h] = reason
            log.warning("cannot read image %s (skipped now, retried on the next pass): %s", name, reason)
        else:
            skipped[h] = reason
            log.warning("skipping unreadable image %s: %s", name, reason)
    stats = {"computed": len(keys), "unreadable": len(skipped), "read_errors": len(hashes) - len(keys) - len(skipped),
             "shards": 0}
    if not keys and not skipped:  # every read failed: nothing to remember
        return stats
    arr = np.stack(rows).astype(dtype) if rows else np.zeros((0, V, 0), dtype=dtype)
    if dtype == np.float16 and rows and not np.isfinite(arr).all():
        arr = np.stack(rows).astype(np.float32)  # features too large for float16: keep them whole
    write_shard(root, keys, arr, skipped)
    stats["shards"] = 1
    return stats


# --------------------------------------------------------------------------- from config to features


def build_frozen_backbone(model_cfg, embed_cfg, image_size: int, crop_pct: float):
    """The frozen feature extractor (timm, no classifier) and its data config."""
    kwargs = dict(model_cfg.get("kwargs") or {})
    # A random-init backbone is drawn from embed.seed, not the run's seed: changing the
    # training seed must not change the features (nor invalidate the cache).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(embed_cfg["seed"])
        backbone = create_backbone(model_cfg["name"], model_cfg.get("pretrained", False), num_classes=0, **kwargs)
    backbone.eval().requires_grad_(False)
    check_image_size(backbone, model_cfg["name"], image_size)
    info = {"architecture": model_cfg["name"], "model_kwargs": kwargs, **data_config(backbone, image_size, crop_pct)}
    return backbone, info


def cache_root_for(cfg, backbone, info) -> tuple[Path, dict]:
    base = Path(cfg.embed.cache_dir)
    if not base.is_absolute():
        base = REPO_ROOT / base
    spec = feature_spec(info, weights_digest(backbone), cfg.augment, cfg.embed)
    return base / cache_key(spec), spec


class FeatureTable:
    """The cached features of one table's readable rows, in the table's order."""

    def __init__(self, cache: FeatureCache, hashes: list[str], rows: np.ndarray):
        self.cache = cache
        self.rows = rows  # positions in the source table
        loc = np.array([cache.lookup[h] for h in hashes], dtype=np.int64).reshape(-1, 2)
        self.shard_of, self.row_of = loc[:, 0], loc[:, 1]

    def __len__(self):
        return len(self.rows)

    @classmethod
    def join(cls, *tables: "FeatureTable") -> "FeatureTable":
        """One table of several tables' rows, in order (the labeled set then pseudo rows:
        pseudo.py); all read from the same cache. `rows` are then positions in the join."""
        out = cls(tables[0].cache, [], np.zeros(0, dtype=np.int64))
        out.shard_of = np.concatenate([t.shard_of for t in tables])
        out.row_of = np.concatenate([t.row_of for t in tables])
        out.rows = np.arange(len(out.shard_of), dtype=np.int64)
        return out

    def gather(self, idx: np.ndarray, view: np.ndarray | int) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        view = np.broadcast_to(np.asarray(view, dtype=np.int64), idx.shape)
        return self.cache.read(self.shard_of[idx], self.row_of[idx], view)


def prepare_features(cfg, accelerator, tables: dict, workers: int) -> dict:
    """Make sure every image of `tables` ({name: datasets table}) is in the cache, then open it.

    Returns {'backbone', 'info', 'root', 'tables': {name: FeatureTable}, 'skipped':
    {name: [(image name, reason)]}, 'stats'}. Leaves every random generator as it found it:
    a run that fills the cache and one that finds it full must train identically."""
    py_state, np_state = random.getstate(), np.random.get_state()
    # With data.num_workers=0 the views are drawn in this process, and torch.manual_seed
    # reseeds the GPU generators too: the device's generator is restored as well.
    device = accelerator.device
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            return _prepare_features(cfg, accelerator, tables, workers)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _prepare_features(cfg, accelerator, tables: dict, workers: int) -> dict:
    t0 = time.time()
    backbone, info = build_frozen_backbone(cfg.model, cfg.embed, cfg.data.image_size, cfg.data.crop_pct)
    root, spec = cache_root_for(cfg, backbone, info)
    hasher = ContentHasher(root.parent)
    hashed, sources = {}, {}
    for name, table in tables.items():
        if table is None:
            continue
        if not hasattr(table, "__len__"):
            raise EmbeddingError("embedding mode needs an unlabeled pool of known length; set data.streaming=false "
                                 "(a saved dataset or a folder; use data.max_unlabeled= to take part of a huge pool)")
        sources[name] = TableSources(table)
        hashed[name] = _hash_share(hasher, sources[name], accelerator, desc=f"hash {name}")
    cache = FeatureCache(root)
    n_cached = sum(1 for name in hashed for h, _ in hashed[name] if h is not None and cache.has(h))
    stats, retry = {"computed": 0, "unreadable": 0, "read_errors": 0, "shards": 0}, {}
    if _any_process(accelerator, bool(_missing(hashed, cache)) or not (root / "manifest.json").is_file()):
        lock = _lock_cache(root, accelerator)
        try:
            cache.refresh()  # what a writer that finished before we took the lock computed is not redone
            todo = _missing(hashed, cache)
            if accelerator.is_main_process:
                clean_stale_temps(root)
                if todo:
                    log.info("embedding %d new images with frozen %s (%d views each) into %s; %d already cached",
                             len(todo), info["architecture"], 1 + 2 * cfg.embed.views, root, n_cached)
            accelerator.wait_for_everyone()
            if todo:
                weak, strong = train_transforms(info, cfg.augment)
                stats, retry = fill_cache(root, todo, sources, backbone,
                                          (eval_transform(info), weak, strong, int(info["image_size"])),
                                          cfg.embed, accelerator, workers)
                stats, retry = _merge_from_all(stats, retry, accelerator)
            accelerator.wait_for_everyone()
            cache.refresh()
            if accelerator.is_main_process:
                _write_manifest(root, spec, cache)
        finally:
            if lock is not None:
                lock.release()
    elif accelerator.is_main_process:
        log.info("embedding cache %s holds all %d images: nothing to compute", root, n_cached)
    backbone.cpu()
    out_tables, skipped = {}, {}
    for name in hashed:
        keep, hashes, bad = [], [], []
        for i, (h, reason) in enumerate(hashed[name]):
            if h is not None and h in cache.lookup:
                keep.append(i)
                hashes.append(h)
            else:
                bad.append((i, reason or retry.get(h) or cache.skipped.get(h, "not in the cache")))
        out_tables[name] = FeatureTable(cache, hashes, np.asarray(keep, dtype=np.int64))
        skipped[name] = [(describe(sources[name][i]), reason) for i, reason in bad]
    stats.update({"cached_before": n_cached, "seconds": round(time.time() - t0, 2), "cache": str(root),
                  "dim": cache.dim})
    return {"backbone": backbone, "info": info, "root": root, "tables": out_tables, "skipped": skipped,
            "stats": stats, "spec": spec}


def _missing(hashed: dict, cache: FeatureCache) -> list[tuple[str, str, int]]:
    """(hash, table name, row) of every image the cache lacks, once each, in table order (a saved
    pool is then read front to back); the same list on every process."""
    todo = {}
    for name, rows in hashed.items():
        for i, (h, _) in enumerate(rows):
            if h is not None and h not in todo and not cache.has(h):
                todo[h] = (h, name, i)
    return list(todo.values())


def _lock_cache(root: Path, accelerator) -> FolderLock | None:
    """One writer per cache key folder: the main process locks it for the job while it writes
    (runs that find everything cached only read, and never wait)."""
    broadcast = broadcast_object_list if accelerator.num_processes > 1 else None
    try:
        return FolderLock.acquire_for(root, "embedding cache", accelerator.is_main_process, broadcast)
    except FolderLocked as exc:
        raise EmbeddingError(str(exc)) from None


def _any_process(accelerator, flag: bool) -> bool:
    return any(gather_object([flag])) if accelerator.num_processes > 1 else flag


def _merge_from_all(stats: dict, retry: dict, accelerator) -> tuple[dict, dict]:
    """Every process's counts summed and failed reads joined: each filled only its own chunks."""
    if accelerator.num_processes == 1:
        return stats, retry
    parts = gather_object([(stats, retry)])
    return ({k: sum(s[k] for s, _ in parts) for k in stats}, {h: why for _, r in parts for h, why in r.items()})


def _write_manifest(root: Path, spec: dict, cache: FeatureCache) -> None:
    manifest = {**spec, "shards": len(cache.shards), "images": len(cache.lookup), "unreadable": len(cache.skipped),
                "dim": cache.dim, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = root / f".manifest-{os.getpid()}.json"
    tmp.write_text(json.dumps(manifest, indent=1, default=str))
    tmp.replace(root / "manifest.json")


def _hash_share(hasher, sources: TableSources, accelerator, desc: str):
    """Every process hashes its own share (reads are the cost) and all get the whole list."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = range(rank, len(sources), world)
    part = hasher.hash_sources(sources.iter(mine), total=len(mine), desc=desc, show=accelerator.is_main_process)
    if world == 1:
        return part
    by_rank = dict(gather_object([(rank, part)]))
    out = [None] * len(sources)
    for r in range(world):
        out[r::world] = by_rank[r]
    return out


# --------------------------------------------------------------------------- training views


class FeatureDraws(Dataset):
    """The embedding-mode twin of data.DrawDataset: indexed by global draw number, the same
    epoch permutation, and a view chosen per draw; batched with __getitems__ (no per-row
    Python), so the DataLoader's collate is the identity."""

    def __init__(self, feats: FeatureTable, kind: str, views: int, scores=None, seed: int = 0, stream: int = 0,
                 strong_view: str = "weak", strong_noise: float = 0.0, targets=None, balance: float = 0.0):
        self.feats, self.kind, self.views = feats, kind, int(views)
        self.seed, self.stream = int(seed), int(stream)
        self.strong_view, self.strong_noise = strong_view, float(strong_noise)
        self.n = len(feats)
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float32)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)  # [n, 11], labeled only
        self.weights = None if self.scores is None else balance_weights(self.scores, balance)
        self._perms = {}

    def __len__(self):
        return self.n

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: draw_order(self.n, self.seed, self.stream, epoch, self.weights)}
        return self._perms[epoch]

    def __getitems__(self, draws: list[int]) -> dict:
        draws = np.asarray(draws, dtype=np.int64)
        epoch, pos = np.divmod(draws, self.n)
        idx = np.empty(len(draws), dtype=np.int64)
        for e in np.unique(epoch):
            m = epoch == e
            idx[m] = self._permutation(int(e))[pos[m]]
        rng = np.random.default_rng([self.seed, self.stream, 17, int(draws[0]), len(draws)])
        K = self.views
        if self.kind == "labeled":
            score = self.scores[idx]
            # soft targets per row where given (pseudo.py), else the bracket, as data.DrawDataset
            y_lb = bracket_of(score).astype(np.int64) if self.targets is None else self.targets[idx]
            return {"idx_lb": torch.from_numpy(idx),
                    "x_lb": torch.from_numpy(self.feats.gather(idx, 1 + rng.integers(0, K, len(idx)))),
                    "y_lb": torch.from_numpy(y_lb),
                    "y_score": torch.from_numpy(score), "skipped": []}
        weak = rng.integers(0, K, len(idx))
        return {"idx_ulb": torch.from_numpy(idx),
                "x_ulb_w": torch.from_numpy(self.feats.gather(idx, 1 + weak)),
                "x_ulb_s": torch.from_numpy(self.strong(idx, weak, rng)),
                "skipped": []}

    def strong(self, idx: np.ndarray, weak: np.ndarray, rng) -> np.ndarray:
        """The "strong" side of each unlabeled pair (embed.strong_view):
        strong  a cached RandAugment view (USB's recipe, made for a backbone that trains);
        weak    another cached weak view (the other one when K >= 2): a frozen backbone
                cannot make its features invariant to RandAugment + cutout, and those views
                lose the bracket (docs/embedding_ssl_diagnosis.md);
        plus, for any choice, Gaussian noise of embed.strong_noise x each row's feature std."""
        K = self.views
        if self.strong_view == "weak":
            other = (weak + rng.integers(1, K, len(idx))) % K if K > 1 else weak
            x = self.feats.gather(idx, 1 + other)
        else:
            x = self.feats.gather(idx, 1 + K + rng.integers(0, K, len(idx)))
        if self.strong_noise > 0:
            scale = self.strong_noise * x.std(axis=1, keepdims=True)
            x = x + scale * rng.standard_normal(x.shape, dtype=np.float32)
        return x.astype(np.float32, copy=False)


class FeatureEval(Dataset):
    """Eval-view features in table order (batched), shaped like EvalDataset's batches."""

    def __init__(self, feats: FeatureTable, positions: np.ndarray):
        self.feats, self.positions = feats, np.asarray(positions, dtype=np.int64)

    def __len__(self):
        return len(self.positions)

    def __getitems__(self, i: list[int]) -> dict:
        i = np.asarray(i, dtype=np.int64)
        return {"index": torch.from_numpy(i), "x": torch.from_numpy(self.feats.gather(self.positions[i], 0))}


def identity_collate(batch):
    return batch
