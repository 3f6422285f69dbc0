"""Image grids (contact sheets): the part that export's top-N sheet, the report's image grids
and the synthetic set's preview share.

- `tile(source, size, ...)`: one image, loaded with `images.load_image`, scaled to fit a
  size x size square (aspect kept) and centred on a background; an unreadable image
  becomes a placeholder tile that says so, never an exception.
- `sheet(tiles, cols, cell, ...)`: tiles pasted row-major into a rows x cols sheet on a
  background, with an optional caption written on each tile.
- `data_uri(png)`: PNG bytes inlined for a self-contained HTML page (report, sweep, review).

Callers keep their own layout: cell size, colours, columns, captions.
"""

from __future__ import annotations

import base64
import math
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from .images import UnreadableImage, load_image

UNREADABLE_TEXT = "unreadable"
UNREADABLE_RGB = (200, 80, 80)


def data_uri(png: bytes) -> str:
    """PNG bytes as a data: URI, how every self-contained page here inlines its images."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@lru_cache(maxsize=16)
def font(px: int) -> ImageFont.ImageFont:
    """Pillow's default font at `px` pixels; the small bitmap font where Pillow has no FreeType."""
    try:
        return ImageFont.load_default(size=px)
    except Exception:
        return ImageFont.load_default()


def font_for(cell: int) -> ImageFont.ImageFont:
    """The caption and placeholder font of a `cell`-pixel tile."""
    return font(max(10, cell // 9))


def load(source, draft_size: int | None = None) -> Image.Image | None:
    """`load_image(source)` (a path, bytes, {'bytes', 'path'} or a PIL image), or None where unreadable."""
    try:
        return load_image(source, draft_size=draft_size)
    except UnreadableImage:
        return None


def fit(img: Image.Image, box: int, resample=Image.Resampling.LANCZOS, whole: bool = False) -> Image.Image:
    """`img` scaled to fit a box x box square, aspect kept, with `resample`. whole=True: an
    image that fits is instead enlarged by the largest whole factor with nearest-neighbour
    (pixel art stays sharp; a border may be left)."""
    factor = box // max(img.size)
    if whole and factor >= 1:
        return img if factor == 1 else img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    # (not ImageOps.contain: Pillow < 13 rounds a 3000 x 20 strip's side to 0 pixels and raises)
    scale = box / max(img.size)
    return img.resize((max(1, min(box, round(img.width * scale))), max(1, min(box, round(img.height * scale)))), resample)


def tile(source, size: int, background=(0, 0, 0), pad: int = 0, resample=Image.Resampling.LANCZOS,
         whole: bool = False) -> Image.Image:
    """A size x size RGB tile: the image (see `load`) fitted into size - 2*pad (see `fit`) and
    centred on `background`; an unreadable image gives the tile with 'unreadable' written on it."""
    out = Image.new("RGB", (size, size), background)
    img = load(source, draft_size=size * 2)
    if img is None:
        ImageDraw.Draw(out).text((6, size // 2), UNREADABLE_TEXT, fill=UNREADABLE_RGB, font=font_for(size))
        return out
    img = fit(img, size - 2 * pad, resample, whole)
    out.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return out


def sheet(tiles: list[Image.Image | None], cols: int, cell: int | tuple[int, int], background=(0, 0, 0),
          rows: int | None = None, margin: int | tuple[int, int] = 0, captions: list[str] | None = None,
          caption_font=None) -> Image.Image:
    """Tiles pasted row-major at the top-left of cells of cell = w or (w, h) pixels, on a sheet
    of margin + cols x rows cells (rows: as many as the tiles need unless given; margin: the
    left and top border, an int or (left, top)). A None tile leaves its cell empty.
    captions: white text on a black box in each tile's bottom-left corner (`caption_font`,
    by default `font_for` the tile's width)."""
    cw, ch = (cell, cell) if isinstance(cell, int) else cell
    left, top = (margin, margin) if isinstance(margin, int) else margin
    rows = max(1, math.ceil(len(tiles) / cols)) if rows is None else rows
    out = Image.new("RGB", (left + cols * cw, top + rows * ch), background)
    draw = ImageDraw.Draw(out)
    for j, t in enumerate(tiles):
        if t is None:
            continue
        x0, y0 = left + (j % cols) * cw, top + (j // cols) * ch
        out.paste(t, (x0, y0))
        if captions:
            f = caption_font or font_for(t.width)
            xy = (x0 + 4, y0 + t.height - 4)
            box = draw.textbbox(xy, captions[j], font=f, anchor="lb")
            draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
            draw.text(xy, captions[j], fill=(255, 255, 255), font=f, anchor="lb")
    return out
