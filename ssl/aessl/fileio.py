"""Atomic file writes: the final name holds the old whole file or the new whole file, never
a partial one. The data goes to `<name>.tmp` beside it, is flushed to disk, and is renamed
into place (one rename on one file system). A kill mid-write leaves only `<name>.tmp`,
which the next writer overwrites (and export's resume removes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def temp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """write(tmp_path) then rename into place."""
    path = Path(path)
    tmp = temp_path(path)
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
