"""Contact sheets of a generated set: one per bracket and an overview, for a person to look at."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

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
    (one row per bracket). Labeled images first, then test, then unlabeled."""
    out = Path(out)
    by = _paths_by_bracket(out, rows)
    pdir = out / "preview"
    pdir.mkdir(exist_ok=True)
    need = max(cols * per_bracket_rows, overview_cols)
    imgs = {b: [Image.open(out / p).convert("RGB") for p in by[b][:need]] for b in by}
    size = next((im.width for v in imgs.values() for im in v), 64)
    tile = max(128, size)
    for b, ims in imgs.items():
        sheet = Image.new("RGB", (cols * tile, per_bracket_rows * tile), (40, 40, 40))
        for k, im in enumerate(ims[: cols * per_bracket_rows]):
            sheet.paste(im.resize((tile, tile), Image.Resampling.NEAREST), ((k % cols) * tile, (k // cols) * tile))
        sheet.save(pdir / f"bracket_{b:02d}.png", optimize=True)
    otile = max(64, size)
    margin = 28
    ov = Image.new("RGB", (margin + overview_cols * otile, NUM_BRACKETS * otile), (255, 255, 255))
    d = ImageDraw.Draw(ov)
    for b, ims in imgs.items():
        d.text((4, b * otile + otile // 2 - 6), str(b), fill=(0, 0, 0))
        for k, im in enumerate(ims[:overview_cols]):
            ov.paste(im.resize((otile, otile), Image.Resampling.NEAREST), (margin + k * otile, b * otile))
    ov.save(pdir / "overview.png", optimize=True)
    return pdir / "overview.png"
