"""Reading images the way a pool of a million crawled files needs: never crash, say why.

Every image in the project goes through `load_image`, which returns an RGB PIL image or
raises `UnreadableImage` with a one-line reason. Callers decide whether that is fatal
(the labeled set: yes, listed with every other problem) or a skip (the unlabeled pool).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})

# A 40000x40000 scan would need ~5 GB as RGB; anything above this many pixels is refused
# as a decompression bomb instead of taking the machine down. Pillow's own default warns
# at 89M pixels and errors at twice that; we make the limit an error at a fixed size.
MAX_IMAGE_PIXELS = 120_000_000

# Truncated files must fail loudly, not decode into half-grey images that train silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(Exception):
    """An image that cannot be decoded; `str(exc)` is the reason, `exc.path` the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path = str(path)
        self.reason = reason


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels are composited on white, the usual
    background of the drawings users score (black would read as a dark image)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clipping everything to white.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0, 0, 255).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source) -> Image.Image:
    """Open a path, bytes, or a datasets-style {'bytes', 'path'} dict (no decoding yet)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        if source.get("bytes"):
            return Image.open(io.BytesIO(source["bytes"]))
        return Image.open(source["path"])
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def describe(source) -> str:
    if source is None:
        return "<no image>"
    if isinstance(source, dict):
        return str(source.get("path") or "<bytes>")
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    return str(source)


def load_image(source, draft_size: int | None = None) -> Image.Image:
    """Decode `source` fully into an RGB image.

    Handles EXIF orientation, palette/alpha/CMYK/16-bit modes and animated files (first
    frame). `draft_size` lets JPEG decode at a reduced scale when only a small image is
    needed (a large speed-up for huge photos). Raises `UnreadableImage` on anything else.
    """
    name = describe(source)
    if source is None or (isinstance(source, dict) and not source.get("bytes") and not source.get("path")):
        raise UnreadableImage(name, "the row holds no image (no bytes and no path)")
    if isinstance(source, (str, os.PathLike)):
        try:
            if os.path.getsize(source) == 0:
                raise UnreadableImage(name, "empty file (0 bytes)")
        except OSError as exc:
            raise UnreadableImage(name, f"cannot read file: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = open_image(source)
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UnreadableImage(
                    name, f"image too large ({w}x{h} pixels > {MAX_IMAGE_PIXELS}): decompression-bomb guard"
                )
            if getattr(img, "is_animated", False):
                img.seek(0)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except UnreadableImage:
        raise
    except (UnidentifiedImageError,) as exc:
        raise UnreadableImage(name, "not an image (unrecognised format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(name, f"decompression-bomb guard: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            msg = f"truncated or corrupt image data ({msg})"
        raise UnreadableImage(name, msg) from exc


Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
