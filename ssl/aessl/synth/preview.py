"""Contact sheets of a generated set: one per bracket and an overview, for a person to look at."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from .. import grids
from .scores import NUM_BRACKETS


def _paths_by_bracket(out: Path, rows) -> dict[int, list[str]]:
    """Image paths per bracket: labeled images first, then test, then unlabeled."""
    if rows is None:
        rows = pq.read_table(out / "truth.parquet", columns=["path", "split", "bracket", "index"]).to_pylist()
    order = {"labeled": 0, "test": 1, "unlabeled": 2}
    by = {b: [] for b in range(NUM_BRACKETS)}
    for r in sorted(rows, key=lambda r: (order[r["split"]], r["index"])):
        by[r["bracket"]].append(r["path"])
    return by


def make_preview(out, rows=None, cols: int = 8, per_bracket_rows: int = 4, overview_cols: int = 10) -> Path:
    """Contact sheets: preview/bracket_XX.png (cols x rows, upscaled) and preview/overview.png
    (one row per bracket). Labeled images first, then test, then unlabeled; an unreadable
    image is a placeholder tile."""
    out = Path(out)
    by = _paths_by_bracket(out, rows)
    pdir = out / "preview"
    pdir.mkdir(exist_ok=True)
    need = max(cols * per_bracket_rows, overview_cols)
    imgs = {b: [grids.load(out / p) for p in by[b][:need]] for b in by}
    size = next((im.width for v in imgs.values() for im in v if im is not None), 64)
    nearest = Image.Resampling.NEAREST
    tile, grey = max(128, size), (40, 40, 40)
    for b, ims in imgs.items():
        tiles = [grids.tile(im, tile, grey, resample=nearest) for im in ims[: cols * per_bracket_rows]]
        grids.sheet(tiles, cols, tile, grey, rows=per_bracket_rows).save(pdir / f"bracket_{b:02d}.png", optimize=True)
    otile, white = max(64, size), (255, 255, 255)
    tiles = [grids.tile(ims[k], otile, white, resample=nearest) if k < len(ims) else None
             for ims in imgs.values() for k in range(overview_cols)]
    ov = grids.sheet(tiles, overview_cols, otile, white, rows=NUM_BRACKETS, margin=(28, 0))
    d = ImageDraw.Draw(ov)
    for b in imgs:
        d.text((4, b * otile + otile // 2 - 6), str(b), fill=(0, 0, 0))
    ov.save(pdir / "overview.png", optimize=True)
    return pdir / "overview.png"
