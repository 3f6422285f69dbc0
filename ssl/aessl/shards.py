"""Unlabeled pools stored as .tar shards: the webdataset layout, and img2dataset's output.

A source is a shard pool when it is

- one `.tar` file, or a pattern of them: braces (`/data/shards/{00000..00099}.tar`, as
  webdataset and img2dataset write them) and/or a glob (`/data/shards/*.tar`);
- a folder whose top level holds `.tar` files and no images or subfolders (img2dataset's
  `--output_format webdataset` folder: `00000.tar`, `00000.parquet`, `00000_stats.json`, ...).

A shard groups its members by *key* (the member name up to the first dot of its base name:
`000001.jpg`, `000001.json` and `000001.txt` are one sample). Each sample gives one pool row,
its first image member (the extensions of `images.IMAGE_EXTENSIONS`); sidecars (.json, .txt,
img2dataset's per-shard .parquet) are not read. A row holds the member's name
`<shard path>/<member name>` (export's `path` column) and where its bytes lie in the shard
(`tar_shard`, `tar_offset`, `tar_size`): only tar headers are read to list a pool, and an
image's bytes are read when that image is decoded (`member_source`). A streamed pool lists
its shards lazily, one `datasets` shard per .tar, so `split_dataset_by_node` gives each
process and DataLoader worker whole .tar files where they divide evenly.

Unreadable members (corrupt, truncated or empty images) are rows like any other: decoding
them raises `UnreadableImage`, so every reader skips and counts them by name. A shard that
cannot be opened, or whose tar headers break off, is warned about once per process and
what cannot be listed is left out, like a folder that cannot be listed.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from braceexpand import UnbalancedBracesError, braceexpand

from .images import UnreadableImage, is_image_file

log = logging.getLogger(__name__)

TAR_COLUMNS = ("tar_shard", "tar_offset", "tar_size")
SCHEMA = pa.schema([("path", pa.string()), ("tar_shard", pa.string()), ("tar_offset", pa.int64()),
                    ("tar_size", pa.int64())])
_GLOB = re.compile(r"[*?\[]")
_warned: set[str] = set()  # shards already warned about in this process (a stream re-reads them every epoch)


class ShardSourceError(ValueError):
    """A shard pattern that names no shard, or shards that do not exist (data.py re-raises it
    as DataSourceError)."""


class ShardReadError(UnreadableImage, OSError):
    """A member whose shard cannot be read now: unreadable for the loaders that skip
    UnreadableImage, a storage failure (retried) for the embedding cache, which reads OSError so."""


def _expand(pattern: str) -> list[str]:
    try:
        return list(braceexpand(pattern))
    except UnbalancedBracesError:
        return [pattern]


def _folder_shards(folder: Path) -> list[str] | None:
    """img2dataset's webdataset output: top-level .tar files, no images and no subfolders."""
    tars, other = [], False
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.lower().endswith(".tar") and e.is_file():
                tars.append(e.path)
            elif e.is_dir() or is_image_file(e.name):
                other = True
    return sorted(os.path.abspath(t) for t in tars) if tars and not other else None


def find_shards(source: str) -> list[str] | None:
    """The .tar shards a pool source names, in order (braces as written, a glob's matches
    sorted), as absolute paths; None when the source is not a shard pool. A pattern that
    matches nothing, or names shards that do not exist, raises ShardSourceError."""
    path = Path(source)
    if path.is_dir():
        return _folder_shards(path)
    if path.exists():
        return [os.path.abspath(source)] if path.suffix.lower() == ".tar" else None
    names = _expand(source)
    if not all(n.lower().endswith(".tar") for n in names):
        return None
    found, missing = [], []
    for name in names:
        if _GLOB.search(name):
            found += sorted(p for p in glob.glob(name) if os.path.isfile(p))
        elif os.path.isfile(name):
            found.append(name)
        else:
            missing.append(name)
    if not found:
        raise ShardSourceError(f"{source}: no .tar shard matches this pattern (brace ranges like "
                               "{00000..00099} and globs like *.tar are expanded; check the folder and the range)")
    if missing:
        raise ShardSourceError(f"{source}: {len(missing)} of the {len(names)} shards it names do not exist, e.g. "
                               f"{'; '.join(missing[:3])} (narrow the range, or use a glob such as *.tar)")
    return list(dict.fromkeys(os.path.abspath(p) for p in found))


def _warn_once(shard: str, message: str) -> None:
    if shard not in _warned:
        _warned.add(shard)
        log.warning("unlabeled pool: %s", message)


def _sample_key(name: str) -> str:
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}"


def _clean_name(name: str) -> str:
    """A member name as text that Arrow takes (tar names may hold bytes that are not UTF-8)."""
    name = name[2:] if name.startswith("./") else name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def scan_shard(shard: str) -> Iterator[dict]:
    """One row per sample of one shard (its first image member), from the tar headers alone."""
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            last_key = None
            for member in tar:  # header by header: member data is seeked over, not read
                if not member.isfile() or not is_image_file(member.name):
                    continue
                name = _clean_name(member.name)
                key = _sample_key(name)
                if key == last_key:  # a second image of one sample (000001.seg.png): not a pool image
                    continue
                last_key = key
                yield {"path": f"{shard}/{name}", "tar_shard": shard, "tar_offset": member.offset_data,
                       "tar_size": member.size}
            listed = tar.offset
        _check_tail(shard, listed)
    except (OSError, tarfile.TarError) as exc:
        _warn_once(shard, f"cannot read shard {shard} ({getattr(exc, 'strerror', None) or exc}); its images are left out")


def _check_tail(shard: str, listed: int) -> None:
    """tarfile stops quietly at a corrupt header after the first: what follows the last
    member it listed must be the archive's zero padding, else the rest of the shard is lost."""
    with open(shard, "rb") as f:
        f.seek(listed)
        while block := f.read(1 << 20):
            if block.strip(b"\0"):
                size = os.fstat(f.fileno()).st_size
                _warn_once(shard, f"shard {shard}: unreadable tar header at byte {listed}; the rest of the shard "
                                  f"({size - listed} bytes) is left out")
                return


def shard_table(shards: list[str]) -> pa.Table:
    """Every shard's rows, in order, as one Arrow table (the non-streamed pool)."""
    parts = [pa.Table.from_pylist(list(scan_shard(s)), schema=SCHEMA) for s in shards]
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def stream_shards(shards: list[str]) -> Iterator[dict]:
    """The rows of `shards` in order; `datasets` hands each reader its own list of shards."""
    for shard in shards:
        yield from scan_shard(shard)


def member_source(row: dict) -> dict:
    """What load_image takes for one shard row: the member's bytes and its name."""
    size = int(row["tar_size"])
    if size == 0:
        return {"bytes": b"", "path": row["path"]}
    try:
        with open(row["tar_shard"], "rb") as f:
            f.seek(int(row["tar_offset"]))
            data = f.read(size)  # short when the shard is cut inside this member: the decoder says truncated
    except OSError as exc:
        raise ShardReadError(row["path"], f"cannot read shard {row['tar_shard']}: {exc.strerror or exc}") from None
    return {"bytes": data, "path": row["path"]}
