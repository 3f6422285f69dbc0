"""Train/test leakage: test images that are also training images or pool images.

An image counts as the same when it resolves to the same file (symlinks, `..`, another
spelling of the path) or when its bytes are identical (a copy under another name). Bytes
are hashed only for files whose size equals a test image's size, so a large pool costs
one `stat` per file, not one read.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

from .data import TableSources

EXAMPLES = 5


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return _digest(f.read())
    except OSError:
        return None


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


class TestIndex:
    """The test set's real paths, sizes and content hashes (or any set of images': the
    pseudo-label reader indexes the labeled set with it too)."""

    def __init__(self, paths: list[str], workers: int = 8):
        self.paths = list(paths)
        self.real = {os.path.realpath(p): p for p in self.paths}
        with ThreadPoolExecutor(workers) as ex:
            digests = list(ex.map(_file_digest, self.paths))
            sizes = list(ex.map(_size, self.paths))
        self.by_digest = {d: p for d, p in zip(digests, self.paths) if d}
        self.sizes = {s for s in sizes if s is not None}

    def match(self, src):
        """('file' | 'content', indexed path, src's name) when the image source `src` (a path,
        or a datasets {'bytes', 'path'} dict) is one of the indexed images, else None."""
        if isinstance(src, dict):
            data, path = src.get("bytes"), src.get("path")
            if data:
                if len(data) in self.sizes:
                    t = self.by_digest.get(_digest(data))
                    if t:
                        return "content", t, path or "<bytes>"
                return None
            src = path
        if not src:
            return None
        path = str(src)
        t = self.real.get(os.path.realpath(path))
        if t:
            return "file", t, path
        if _size(path) in self.sizes:
            t = self.by_digest.get(_file_digest(path) or "")
            if t:
                return "content", t, path
        return None

    def matches(self, sources, workers: int = 8) -> dict:
        """{'same_file', 'same_content', 'test_images_hit', 'examples'} for an iterable of
        image sources (paths, or datasets {'bytes', 'path'} dicts)."""
        same_file = same_content = 0
        hit, examples = set(), []
        with ThreadPoolExecutor(workers) as ex:
            for found in ex.map(self.match, sources, chunksize=256):
                if found is None:
                    continue
                kind, test_path, other = found
                same_file += kind == "file"
                same_content += kind == "content"
                hit.add(test_path)
                if len(examples) < EXAMPLES:
                    examples.append(f"{other} = test {test_path}" if other != test_path else other)
        return {"same_file": same_file, "same_content": same_content, "test_images_hit": len(hit),
                "test_images": len(self.paths), "examples": examples}


def check_leakage(test_paths: list[str], train_paths: list[str] | None, pool) -> dict:
    """Overlap of the test set with the training set and with the pool (None where there is
    nothing to compare; a streamed pool is not read twice and is reported as unchecked)."""
    index = TestIndex(test_paths)
    out = {"test_vs_train": None, "test_vs_pool": None}
    if train_paths is not None:
        out["test_vs_train"] = index.matches(train_paths)
    if pool is not None:
        if hasattr(pool, "__len__"):
            out["test_vs_pool"] = index.matches(TableSources(pool).iter())
        else:
            out["test_vs_pool"] = {"checked": False, "why": "streamed pool: not read ahead of training"}
    return out
