"""Reading images the way a pool of a million crawled files needs: never crash, say why.

Every image in the project goes through `load_image`, which returns an RGB PIL image or
raises `UnreadableImage` with a one-line reason. Callers decide whether that is fatal
(the labeled set: yes, listed with every other problem) or a skip (the unlabeled pool).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

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


# EXIF orientation -> the transpose that shows the image upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. Not `ImageOps.exif_transpose`: it also rewrites the EXIF
    block, and a corrupt block (a string where a number belongs) makes that raise TypeError
    or struct.error on pixels that decode fine. A block we cannot parse is ignored."""
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # Pillow's EXIF parser raises many types on crawled files
        return img
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(method) if method is not None else img


def _bit_depth(img: Image.Image, arr: np.ndarray) -> int:
    """Bits per sample of a greyscale integer image, from what the file says it is.

    `I;16*` is 16-bit by its mode. Mode `I` is what Pillow gives 16-bit PPM/PGM and older
    Pillow 16-bit PNG; TIFF records its own depth. The pixel values cannot decide: a dark
    16-bit image (every value <= 255) would be taken for an 8-bit one, 257x too bright."""
    if img.mode.startswith("I;16"):
        return 16
    tiff_bits = getattr(img, "tag_v2", {}).get(258) if img.format == "TIFF" else None
    if tiff_bits:
        return int(tiff_bits[0] if isinstance(tiff_bits, tuple) else tiff_bits)
    # PNG, PPM and in-memory images: 16 bits unless the values cannot fit in 16
    return 16 if arr.max(initial=0) <= 65535 else 32


def _grey_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit greyscale scaled to 8 bits by its bit depth (not clipped to white)."""
    arr = np.asarray(img).astype(np.float64)
    peak = float(2 ** _bit_depth(img, arr) - 1)
    grey = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    key = img.info.get("transparency")  # a 16-bit PNG's tRNS: one grey value is transparent
    if isinstance(key, int):
        alpha = Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8), mode="L")
        return _on_white(Image.merge("LA", (grey, alpha)))
    return grey.convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels are composited on white, the usual
    background of the drawings users score (black would read as a dark image)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _grey_to_rgb(img)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    # A palette, grey or RGB file can mark one colour transparent (PNG tRNS, GIF): honour it.
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        return _on_white(img)
    if img.mode == "RGB":
        return img
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
    if isinstance(source, dict) and source.get("bytes") == b"":  # an empty tar member: never open its "path"
        raise UnreadableImage(name, "empty file (0 bytes)")
    if isinstance(source, (str, os.PathLike)):
        try:
            info = os.stat(source)
        except OSError as exc:
            raise UnreadableImage(name, f"cannot read file: {exc.strerror or exc}") from None
        if not stat.S_ISREG(info.st_mode):  # a pipe named x.png would block Image.open forever
            raise UnreadableImage(name, "not a regular file (a folder, pipe or device)")
        if info.st_size == 0:
            raise UnreadableImage(name, "empty file (0 bytes)")
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
            img = _upright(img)
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
    except Exception as exc:  # Pillow's decoders raise other types on crafted files; a pool must not crash
        raise UnreadableImage(name, f"cannot decode ({type(exc).__name__}: {exc})") from exc


Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
