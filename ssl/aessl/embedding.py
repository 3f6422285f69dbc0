"""Embedding mode: a frozen backbone's features computed once, cached, and small heads trained on them.

With the backbone frozen, every experiment after the first (algorithm, thresholds, head,
seed) reads features from disk instead of decoding and augmenting images, and costs
seconds. FixMatch-style algorithms still compare a weak and a strong view of the same
image: the cache holds, per image, the eval view plus K weak and K strong augmented views.

Cache layout, one folder per (backbone weights, views) spec:

    <cache_dir>/<key>/manifest.json            what the key stands for, and what the cache holds
    <cache_dir>/<key>/shard-<id>/keys.npy      content hashes of the shard's images   [N]
    <cache_dir>/<key>/shard-<id>/feats.npy     features [N, 1 + 2K, D]: eval, K weak, K strong
    <cache_dir>/<key>/shard-<id>/skipped.json  {hash: reason} for images that could not be read
    <cache_dir>/files.sqlite                   (path, size, mtime) -> content hash memo

`key` hashes the backbone's weights (not its name: a different checkpoint of the same
architecture is a different backbone) and every setting of the views. Images are keyed by
the hash of their bytes, so a renamed or moved file is still a hit and a changed file is a
miss. A shard folder is written under a temp name and renamed into place: a killed pass
leaves only whole shards, and the next pass computes only the images no shard holds.
The view of image h numbered v is seeded from (embed.seed, h, v) alone, so the cache does
not depend on the order, the worker count or the number of processes that filled it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .data import row_source, seed_everything_for
from .images import UnreadableImage, describe, load_image
from .metrics import NUM_BRACKETS, bracket_of

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
HASH_CHARS = 32


class EmbeddingError(ValueError):
    pass


# --------------------------------------------------------------------------- heads


class Head(nn.Module):
    """body (features -> head features) then fc (-> 11 bracket logits), answering like ScoreModel:
    forward(x) -> {'logits', 'feat'}; forward(feat, only_fc=True) -> logits; only_feat -> feat."""

    def __init__(self, body: nn.Module, width: int):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(width, NUM_BRACKETS)
        self.num_features = width

    def forward(self, x, only_fc: bool = False, only_feat: bool = False, **_):
        if only_fc:
            return self.fc(x)
        feat = self.body(x)
        if only_feat:
            return feat
        return {"logits": self.fc(feat), "feat": feat}


class ResidualBlock(nn.Module):
    """x + f(x) through three linear layers, as in the model card's predictor."""

    def __init__(self, width: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Linear(width, width), nn.LeakyReLU(0.1),
            nn.Linear(width, width), nn.LeakyReLU(0.1),
            nn.Linear(width, width),
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.branch(x))


def _linear(dim: int, hidden: int, dropout: float) -> tuple[nn.Module, int]:
    return nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout)), dim


def _mlp(dim: int, hidden: int, dropout: float) -> tuple[nn.Module, int]:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout)), hidden


def _residual_mlp(dim: int, hidden: int, dropout: float) -> tuple[nn.Module, int]:
    # The model card's shape: widen, one residual block, then narrow in steps to a small
    # feature that the bracket classifier reads.
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, hidden), ResidualBlock(hidden),
        nn.Linear(hidden, 128), nn.Linear(128, 64), nn.Dropout(dropout), nn.LeakyReLU(0.1),
    ), 64


HEADS = {"linear": _linear, "mlp": _mlp, "residual_mlp": _residual_mlp}


def build_head(spec: dict) -> Head:
    """spec: {'name', 'in_features', 'hidden', 'dropout'} (what model/config.json records)."""
    name = spec["name"]
    if name not in HEADS:
        raise EmbeddingError(f"model.head: unknown head {name!r}; choose one of {sorted(HEADS)}")
    body, width = HEADS[name](int(spec["in_features"]), int(spec["hidden"]), float(spec["dropout"]))
    return Head(body, width)


class EmbeddingScoreModel(nn.Module):
    """Frozen backbone + head: images in, ScoreModel's answers out (export and report use this)."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.num_features = head.num_features

    def forward(self, x, only_fc: bool = False, only_feat: bool = False, **_):
        if only_fc:
            return self.head(x, only_fc=True)
        return self.head(self.backbone(x), only_feat=only_feat)

    def export_state_dict(self) -> dict:
        return {**{f"backbone.{k}": v for k, v in self.backbone.state_dict().items()},
                **{f"head.{k}": v for k, v in self.head.state_dict().items()}}


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
    """Every setting that changes a cached feature, besides the backbone weights."""
    return {
        "image_size": int(info["image_size"]), "mean": info["mean"], "std": info["std"],
        "interpolation": info["interpolation"], "crop_pct": float(info["crop_pct"]),
        "weak_scale_min": float(augment_cfg["weak_scale_min"]), "strong_n": int(augment_cfg["strong_n"]),
        "strong_m": int(augment_cfg["strong_m"]), "strong_exclude_color": bool(augment_cfg["strong_exclude_color"]),
        "views": int(embed_cfg["views"]), "seed": int(embed_cfg["seed"]),
    }


def cache_key(backbone_digest: str, spec: dict) -> str:
    text = json.dumps({"format": CACHE_FORMAT_VERSION, "backbone": backbone_digest, "views": spec}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- content hashes


def _hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=HASH_CHARS // 2).hexdigest()


class ContentHasher:
    """Content hash of each image source; for files, memoised by (path, size, mtime_ns) in
    sqlite so an unchanged pool of a million files is not read again on every run."""

    def __init__(self, cache_dir: Path, workers: int = 8):
        self.db_path = Path(cache_dir) / "files.sqlite"
        self.workers = workers

    def _connect(self):
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.db_path, timeout=60)
        con.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, hash TEXT)")
        return con

    def hash_sources(self, sources: list, desc: str = "hash", show: bool = True) -> list[tuple[str | None, str]]:
        """[(hash or None, reason when None)] in order."""
        from tqdm.auto import tqdm

        con = self._connect()
        try:
            memo = {}
            paths = [s for s in sources if isinstance(s, (str, os.PathLike))]
            for i in range(0, len(paths), 900):  # sqlite's limit on bound parameters
                chunk = [os.path.abspath(p) for p in paths[i:i + 900]]
                q = f"SELECT path, size, mtime_ns, hash FROM files WHERE path IN ({','.join('?' * len(chunk))})"
                memo.update({p: (s, m, h) for p, s, m, h in con.execute(q, chunk)})

            def one(src):
                if isinstance(src, dict):
                    if src.get("bytes"):
                        return _hash_bytes(src["bytes"]), "", None
                    src = src.get("path")
                if src is None:
                    return None, "the row holds no image (no bytes and no path)", None
                full = os.path.abspath(src)
                try:
                    st = os.stat(full)
                except OSError as exc:
                    return None, f"cannot read file: {exc.strerror or exc}", None
                known = memo.get(full)
                if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
                    return known[2], "", None
                try:
                    with open(full, "rb") as f:
                        h = _hash_bytes(f.read())
                except OSError as exc:
                    return None, f"cannot read file: {exc.strerror or exc}", None
                return h, "", (full, st.st_size, st.st_mtime_ns, h)

            out, new = [], []
            with ThreadPoolExecutor(self.workers) as pool:
                for h, reason, row in tqdm(pool.map(one, sources, chunksize=64), total=len(sources), desc=desc,
                                           disable=not show or len(sources) < 5000, leave=False, dynamic_ncols=True):
                    out.append((h, reason))
                    if row:
                        new.append(row)
            if new:
                con.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", new)
                con.commit()
            return out
        finally:
            con.close()


def table_sources(table) -> list:
    """What load_image takes for every row of a datasets table, in order."""
    cols = set(table.column_names)
    if "image" not in cols:
        return list(table["path"])
    out = []
    for batch in table.iter(batch_size=512):
        n = len(next(iter(batch.values())))
        for i in range(n):
            out.append(row_source({k: v[i] for k, v in batch.items()}))
    return out


# --------------------------------------------------------------------------- the cache


class FeatureCache:
    """The shards of one cache key: lookup by content hash, memory-mapped features."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.refresh()

    @staticmethod
    def shard_dirs(root: Path) -> list[Path]:
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.name.startswith("shard-") and (p / "feats.npy").is_file())

    def refresh(self) -> None:
        self.feats, self.lookup, self.skipped = [], {}, {}
        for k, d in enumerate(self.shard_dirs(self.root)):
            keys = np.load(d / "keys.npy", allow_pickle=False)
            self.feats.append(np.load(d / "feats.npy", mmap_mode="r", allow_pickle=False))
            for r, h in enumerate(keys.tolist()):
                self.lookup[h] = (k, r)
            sk = d / "skipped.json"
            if sk.is_file():
                self.skipped.update(json.loads(sk.read_text()))

    @property
    def dim(self) -> int:
        return max((int(f.shape[-1]) for f in self.feats if len(f)), default=0)

    def has(self, h: str) -> bool:
        return h in self.lookup or h in self.skipped


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
        if same_host and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    """Every cached view of one image, stacked: [1 + 2K, 3, S, S] (eval, K weak, K strong)."""

    def __init__(self, items: list[tuple[str, object]], eval_tf, weak, strong, views: int, seed: int, size: int):
        self.items, self.eval_tf, self.weak, self.strong = items, eval_tf, weak, strong
        self.views, self.seed, self.size = int(views), int(seed), int(size)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        h, src = self.items[i]
        n = 1 + 2 * self.views
        try:
            # The eval view is decoded exactly as export and report decode it (JPEG draft
            # scale), so cached eval features are what the exported model computes.
            img = load_image(src, draft_size=self.size * 2)
            xs = [self.eval_tf(img)]
            for v in range(2 * self.views):
                seed_everything_for(self.seed, int(h[:8], 16), int(h[8:16], 16), v)
                xs.append((self.weak if v < self.views else self.strong)(img))
            return {"i": i, "ok": True, "reason": "", "x": torch.stack(xs)}
        except UnreadableImage as exc:
            reason = exc.reason
        except Exception as exc:  # a transform failing on one odd image is that image's skip
            reason = f"{type(exc).__name__}: {exc}"
        return {"i": i, "ok": False, "reason": reason, "x": torch.zeros(n, 3, self.size, self.size)}


class ChunkBatches:
    """Batches of item positions, chunk after chunk; a batch never spans two chunks."""

    def __init__(self, chunks: list[tuple[int, int]], batch_size: int):
        self.chunks, self.batch_size = chunks, int(batch_size)

    def __iter__(self):
        for s, e in self.chunks:
            for b in range(s, e, self.batch_size):
                yield list(range(b, min(b + self.batch_size, e)))

    def __len__(self):
        return sum(-(-(e - s) // self.batch_size) for s, e in self.chunks)


def fill_cache(root: Path, todo: list[tuple[str, object]], backbone: nn.Module, transforms: tuple, embed_cfg,
               accelerator, workers: int) -> dict:
    """Compute the views of every (hash, source) in `todo` and write them as shards.

    `todo` is the same sorted list on every process; process r takes chunks r, r+W, ..."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data import worker_init

    eval_tf, weak, strong, size = transforms
    S = int(embed_cfg["shard_size"])
    rank, world = accelerator.process_index, accelerator.num_processes
    chunk_ids = list(range(rank, -(-len(todo) // S), world))
    mine = [todo[k * S:(k + 1) * S] for k in chunk_ids]
    items = [it for chunk in mine for it in chunk]
    bounds, pos = [], 0
    for chunk in mine:
        bounds.append((pos, pos + len(chunk)))
        pos += len(chunk)
    stats = {"computed": 0, "unreadable": 0, "shards": 0}
    if not items:
        return stats
    ds = ViewsDataset(items, eval_tf, weak, strong, int(embed_cfg["views"]), int(embed_cfg["seed"]), size)
    kw = dict(num_workers=workers, worker_init_fn=worker_init, pin_memory=accelerator.device.type == "cuda")
    if workers > 0:
        kw["prefetch_factor"] = 4
    loader = DataLoader(ds, batch_sampler=ChunkBatches(bounds, int(embed_cfg["batch_size"])), **kw)
    dtype = np.float16 if embed_cfg["dtype"] == "float16" else np.float32
    kill_after = int(os.environ.get("AESSL_KILL_AFTER_SHARDS", "0"))
    backbone = backbone.to(accelerator.device).eval()
    bar = tqdm(total=len(items) * world, desc="embed", disable=not accelerator.is_main_process, dynamic_ncols=True)
    chunk_i, got = 0, {}
    with torch.inference_mode():
        for batch in loader:
            ok = batch["ok"].numpy()
            x = batch["x"]
            B, V = x.shape[:2]
            f = None
            if ok.any():
                with accelerator.autocast():
                    f = backbone(x[ok].flatten(0, 1).to(accelerator.device, non_blocking=True))
                f = iter(f.float().reshape(int(ok.sum()), V, -1).cpu().numpy())
            for j, i in enumerate(batch["i"].tolist()):
                got[i] = (bool(ok[j]), next(f) if ok[j] else None, batch["reason"][j])
            bar.update(B * world)
            s, e = bounds[chunk_i]
            if len(got) == e - s:  # the chunk is whole: write it as one shard
                keys, rows, skipped = [], [], {}
                for i in range(s, e):
                    good, f, reason = got[i]
                    if good:
                        keys.append(items[i][0])
                        rows.append(f)
                    else:
                        skipped[items[i][0]] = reason
                        log.warning("skipping unreadable image %s: %s", describe(items[i][1]), reason)
                arr = np.stack(rows).astype(dtype) if rows else np.zeros((0, V, 0), dtype=dtype)
                if dtype == np.float16 and rows and not np.isfinite(arr).all():
                    arr = np.stack(rows).astype(np.float32)  # features too large for float16: keep them whole
                write_shard(root, keys, arr, skipped)
                stats["computed"] += len(keys)
                stats["unreadable"] += len(skipped)
                stats["shards"] += 1
                got, chunk_i = {}, chunk_i + 1
                if kill_after and stats["shards"] == kill_after:  # fault injection for the resume test
                    os._exit(137)
    bar.close()
    return stats


# --------------------------------------------------------------------------- from config to features


def build_frozen_backbone(model_cfg, embed_cfg, image_size: int, crop_pct: float):
    """The frozen feature extractor (timm, no classifier) and its data config."""
    from .models import create_backbone, data_config

    kwargs = dict(model_cfg.get("kwargs") or {})
    # A random-init backbone is drawn from embed.seed, not the run's seed: changing the
    # training seed must not change the features (nor invalidate the cache).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(embed_cfg["seed"]))
        backbone = create_backbone(model_cfg["name"], model_cfg.get("pretrained", False), num_classes=0, **kwargs)
    backbone.eval().requires_grad_(False)
    info = {"architecture": model_cfg["name"], "model_kwargs": kwargs, **data_config(backbone, image_size, crop_pct)}
    return backbone, info


def cache_root_for(cfg, backbone, info) -> tuple[Path, dict]:
    from .sources import REPO_ROOT

    base = Path(cfg.embed.cache_dir)
    if not base.is_absolute():
        base = REPO_ROOT / base
    spec = view_spec(info, cfg.augment, cfg.embed)
    digest = weights_digest(backbone)
    return base / cache_key(digest, spec), {"format": CACHE_FORMAT_VERSION, "architecture": info["architecture"],
                                            "backbone_sha256": digest, "views": spec}


class FeatureTable:
    """The cached features of one table's readable rows, in the table's order."""

    def __init__(self, cache: FeatureCache, hashes: list[str], rows: np.ndarray):
        self.cache = cache
        self.rows = rows  # positions in the source table
        loc = np.array([cache.lookup[h] for h in hashes], dtype=np.int64).reshape(-1, 2)
        self.shard_of, self.row_of = loc[:, 0], loc[:, 1]

    def __len__(self):
        return len(self.rows)

    def gather(self, idx: np.ndarray, view: np.ndarray | int) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        view = np.broadcast_to(np.asarray(view, dtype=np.int64), idx.shape)
        out = np.empty((len(idx), self.cache.dim), dtype=np.float32)
        shard, row = self.shard_of[idx], self.row_of[idx]
        for k in np.unique(shard):
            m = shard == k
            order = np.argsort(row[m], kind="stable")  # memmaps read fastest in file order
            picked = self.cache.feats[k][row[m][order], view[m][order]]
            sel = np.flatnonzero(m)[order]
            out[sel] = picked
        return out


def prepare_features(cfg, accelerator, tables: dict, workers: int) -> dict:
    """Make sure every image of `tables` ({name: datasets table}) is in the cache, then open it.

    Returns {'backbone', 'info', 'root', 'tables': {name: FeatureTable}, 'skipped':
    {name: [(image name, reason)]}, 'stats'}. Leaves every random generator as it found it:
    a run that fills the cache and one that finds it full must train identically."""
    import random

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            return _prepare_features(cfg, accelerator, tables, workers)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _prepare_features(cfg, accelerator, tables: dict, workers: int) -> dict:
    t0 = time.time()
    backbone, info = build_frozen_backbone(cfg.model, cfg.embed, int(cfg.data.image_size), float(cfg.data.crop_pct))
    root, spec = cache_root_for(cfg, backbone, info)
    from .transforms import eval_transform, train_transforms

    hasher = ContentHasher(root.parent)
    hashed, sources = {}, {}
    for name, table in tables.items():
        if table is None:
            continue
        if not hasattr(table, "__len__"):
            raise EmbeddingError("embedding mode needs an unlabeled pool of known length; set data.streaming=false "
                                 "(a saved dataset or a folder; use data.max_unlabeled= to take part of a huge pool)")
        sources[name] = table_sources(table)
        hashed[name] = _hash_share(hasher, sources[name], accelerator, desc=f"hash {name}")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(root)
    accelerator.wait_for_everyone()
    cache = FeatureCache(root)
    todo = {}
    for name in hashed:
        for (h, _), src in zip(hashed[name], sources[name]):
            if h is not None and not cache.has(h) and h not in todo:
                todo[h] = src
    n_cached = sum(1 for name in hashed for h, _ in hashed[name] if h is not None and cache.has(h))
    todo_list = sorted(todo.items())
    stats = {"computed": 0, "unreadable": 0, "shards": 0}
    if todo_list:
        if accelerator.is_main_process:
            log.info("embedding %d new images with frozen %s (%d views each) into %s; %d already cached",
                     len(todo_list), info["architecture"], 1 + 2 * int(cfg.embed.views), root, n_cached)
        weak, strong = train_transforms(info, cfg.augment)
        stats = fill_cache(root, todo_list, backbone, (eval_transform(info), weak, strong, int(info["image_size"])),
                           cfg.embed, accelerator, workers)
        accelerator.wait_for_everyone()
        cache.refresh()
    elif accelerator.is_main_process:
        log.info("embedding cache %s holds all %d images: nothing to compute", root, n_cached)
    if accelerator.is_main_process:
        manifest = {**spec, "shards": len(cache.feats), "images": len(cache.lookup), "unreadable": len(cache.skipped),
                    "dim": cache.dim, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = root / f".manifest-{os.getpid()}.json"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(root / "manifest.json")
    backbone.cpu()
    out_tables, skipped = {}, {}
    for name in hashed:
        keep, hashes, bad = [], [], []
        for i, ((h, reason), src) in enumerate(zip(hashed[name], sources[name])):
            if h is not None and h in cache.lookup:
                keep.append(i)
                hashes.append(h)
            else:
                bad.append((describe(src), reason or cache.skipped.get(h, "not in the cache")))
        out_tables[name] = FeatureTable(cache, hashes, np.asarray(keep, dtype=np.int64))
        skipped[name] = bad
    stats.update({"cached_before": n_cached, "seconds": round(time.time() - t0, 2), "cache": str(root),
                  "dim": cache.dim})
    return {"backbone": backbone, "info": info, "root": root, "tables": out_tables, "skipped": skipped,
            "stats": stats, "spec": spec}


def _hash_share(hasher, sources, accelerator, desc: str):
    """Every process hashes its own share (reads are the cost) and all get the whole list."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    part = hasher.hash_sources(sources[rank::world], desc=desc, show=accelerator.is_main_process)
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

    def __init__(self, feats: FeatureTable, kind: str, views: int, scores=None, seed: int = 0, stream: int = 0):
        self.feats, self.kind, self.views = feats, kind, int(views)
        self.seed, self.stream = int(seed), int(stream)
        self.n = len(feats)
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float32)
        self._perms = {}

    def __len__(self):
        return self.n

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)}
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
            return {"idx_lb": torch.from_numpy(idx),
                    "x_lb": torch.from_numpy(self.feats.gather(idx, 1 + rng.integers(0, K, len(idx)))),
                    "y_lb": torch.from_numpy(bracket_of(score).astype(np.int64)),
                    "y_score": torch.from_numpy(score), "skipped": []}
        return {"idx_ulb": torch.from_numpy(idx),
                "x_ulb_w": torch.from_numpy(self.feats.gather(idx, 1 + rng.integers(0, K, len(idx)))),
                "x_ulb_s": torch.from_numpy(self.feats.gather(idx, 1 + K + rng.integers(0, K, len(idx)))),
                "skipped": []}


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


def head_spec(model_cfg, in_features: int) -> dict:
    return {"name": str(model_cfg["head"]), "in_features": int(in_features), "hidden": int(model_cfg["head_hidden"]),
            "dropout": float(model_cfg["head_dropout"])}
