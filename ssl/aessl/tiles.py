"""Tiled inference for large images: score n crops of a bigger resize and reduce them to one row.

The model card's sibling classifiers score a large image by resizing it to twice the model's
resolution, cutting five crops at the model's resolution (four corners and the centre, like
torchvision's FiveCrop) and reducing the five scores with mean, median, min or max. This
module is that, for a `model/` folder's config (`info`: image_size, mean, std,
interpolation):

    check_tiles(9)                                    # 1 (off), 5, or k*k with k >= 2
    tile_boxes(width, height, n, crop)                # [(left, top, right, bottom), ...]
    x = tile_views(image, info, n=5, scale=2.0)       # [n, 3, S, S], normalised like the eval view
    probs = reduce_tiles(per_tile_probs, "median")    # [B, n, 11] -> [B, 11], rows still sum to 1

Views: the RGB image is resized (the model's interpolation, bicubic unless its config.json
says otherwise; aspect kept) so that its *shorter* side is round(scale * S), S the model's
image size, then n boxes of S x S are cut and each goes through ToTensor + Normalize with
the model's mean/std, exactly the last two steps of the eval view (aessl/transforms.py). The
eval view's centre crop (`crop_pct`) is replaced by the tiles. An image smaller than that is
*upscaled* to it: tiles of a small image are crops of an enlarged copy, not extra detail.

Boxes: n == 5 gives the four corners and the centre (FiveCrop's order: top-left, top-right,
bottom-left, bottom-right, centre; the centre rounded as torchvision's center_crop does);
n == k*k gives a k x k grid of S x S boxes, evenly spaced with the first at 0 and the last
flush with the far edge, row by row. A grid covers the resized image whenever k * S reaches
its longer side; a more elongated image is only sampled along its length, with gaps. Five
crops cover it only when its longer side is at most 2 * S (the corners then meet): at the
default scale 2 a square image is covered exactly, a wider or taller one keeps the middle of
its long side's edges out of every tile but the centre's band (as FiveCrop does).
n == 1 is a single centre box: tiling off (callers use the normal eval view then).

Reduce: `mean` averages the n bracket distributions; `median`, `min`, `max` pick the
distribution of the tile whose expected score (sum_k k * p_k) is the median (the lower one
for an even n), the lowest or the highest, so every output row is a distribution one tile
actually gave.

Export (`ssl/export.py --tiles N --tile-reduce R --tile-scale F`) and report
(`ssl/report.py`, same flags) flatten a batch of B images into B * n views through the one
scoring path (aessl/scoring.py) and reduce them here before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms as T

from .data import EvalDataset, row_source
from .images import UnreadableImage, load_image
from .metrics import NUM_BRACKETS

TILE_REDUCES = ("mean", "median", "min", "max")
DEFAULT_TILE_SCALE = 2.0


def check_tiles(n: int) -> None:
    """ValueError unless n is 1 (off), 5 (corners + centre) or a square k*k with k >= 2."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"tiles must be a whole number (1, 5, or a square such as 4, 9, 16), got {n!r}")
    n = int(n)
    if n == 1 or n == 5:
        return
    k = math.isqrt(n) if n > 0 else 0
    if k >= 2 and k * k == n:
        return
    raise ValueError(f"tiles must be 1 (off), 5 (four corners and the centre) or a square k*k with k >= 2 "
                     f"(4, 9, 16, ...), got {n}")


def check_scale(scale: float) -> None:
    """ValueError unless scale is a finite number >= 1 (S x S tiles must fit in the resize)."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"tile scale must be a number >= 1, got {scale!r}") from None
    if not math.isfinite(value) or value < 1.0:
        raise ValueError(f"tile scale must be a finite number >= 1 (the shorter side is resized to scale x the "
                         f"model's image size, and the tiles are that image size), got {scale}")


def check_reduce(how: str) -> None:
    if how not in TILE_REDUCES:
        raise ValueError(f"tile reduce must be one of {', '.join(TILE_REDUCES)}, got {how!r}")


def _spaced(length: int, crop: int, k: int) -> list[int]:
    """k offsets from 0 to length - crop, evenly spaced (rounded)."""
    last = length - crop
    return [round(i * last / (k - 1)) for i in range(k)]


def tile_boxes(width: int, height: int, n: int, crop: int) -> list[tuple[int, int, int, int]]:
    """The n (left, top, right, bottom) boxes of side `crop` in a width x height image:
    5 = corners + centre (FiveCrop's order), k*k = an evenly spaced grid row by row,
    1 = the centre. ValueError when the crop does not fit or n is not a tile count."""
    check_tiles(n)
    width, height, crop = int(width), int(height), int(crop)
    if crop < 1 or crop > width or crop > height:
        raise ValueError(f"a {crop} px tile does not fit in a {width}x{height} image")
    if n == 1 or n == 5:
        # torchvision's center_crop rounding, so the centre box is FiveCrop's
        left, top = int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))
        centre = (left, top, left + crop, top + crop)
        if n == 1:
            return [centre]
        return [(0, 0, crop, crop), (width - crop, 0, width, crop), (0, height - crop, crop, height),
                (width - crop, height - crop, width, height), centre]
    k = math.isqrt(n)
    return [(x, y, x + crop, y + crop) for y in _spaced(height, crop, k) for x in _spaced(width, crop, k)]


def _finish(info: dict):
    """ToTensor + Normalize with the model's mean/std: the eval view's last two steps."""
    return T.Compose([T.ToTensor(), T.Normalize(mean=tuple(info["mean"]), std=tuple(info["std"]))])


def tile_views(image: Image.Image, info: dict, n: int, scale: float = DEFAULT_TILE_SCALE) -> torch.Tensor:
    """[n, 3, S, S] normalised views of `image`: resized so its shorter side is
    round(scale * S) (aspect kept; a smaller image is upscaled), then the n tile_boxes cut."""
    check_tiles(n)
    check_scale(scale)
    return TileTransform(info, n, scale)(image)


class TileTransform:
    """tile_views as a transform object (picklable for DataLoader workers): PIL image ->
    [n, 3, S, S]. `shape` is that shape, `draft_size` what a JPEG may be decoded down to."""

    def __init__(self, info: dict, n: int, scale: float = DEFAULT_TILE_SCALE):
        check_tiles(n)
        check_scale(scale)
        self.n, self.scale = int(n), float(scale)
        self.size = int(info["image_size"])
        self.short = round(self.scale * self.size)
        self.resize = T.Resize(self.short, interpolation=str_to_interp_mode(info.get("interpolation", "bicubic")))
        self.finish = _finish(info)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, 3, self.size, self.size)

    @property
    def draft_size(self) -> int:
        # the eval view's draft (2 S) or more: JPEG draft keeps both sides >= it
        return max(2 * self.size, self.short)

    def blank(self) -> torch.Tensor:
        """The views of an unreadable row (zeros; scored with the batch, then dropped)."""
        return torch.zeros(self.shape)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = self.resize(image)
        boxes = tile_boxes(image.width, image.height, self.n, self.size)
        return torch.stack([self.finish(image.crop(box)) for box in boxes])

    def __repr__(self) -> str:
        return f"TileTransform(n={self.n}, scale={self.scale}, size={self.size})"


def tile_item(table, i: int, transform: TileTransform) -> dict:
    """EvalDataset's item of row i with the n tile views as `x` (the blank views and the
    reason when the image cannot be read)."""
    i = int(i)
    try:
        img = load_image(row_source(table[i]), draft_size=transform.draft_size)
        x, ok, reason = transform(img), True, ""
    except UnreadableImage as exc:
        x, ok, reason = transform.blank(), False, exc.reason
    return {"index": i, "x": x, "ok": ok, "reason": reason}


class TiledEvalDataset(EvalDataset):
    """EvalDataset whose `x` is [n, 3, S, S] (tile_views); unreadable rows come back with
    ok=False and zero views, as in EvalDataset."""

    def __init__(self, table, info: dict, n: int, scale: float = DEFAULT_TILE_SCALE):
        transform = TileTransform(info, n, scale)
        super().__init__(table, transform, transform.size)

    def __getitem__(self, i):
        return tile_item(self.table, i, self.transform)


def reduce_tiles(probs, how: str):
    """[B, n, 11] per-tile bracket probabilities (torch or numpy) -> [B, 11] of the same
    kind. mean: the average distribution; median/min/max: the distribution of the tile whose
    expected score is the (lower) median / lowest / highest."""
    check_reduce(how)
    is_torch = isinstance(probs, torch.Tensor)
    if probs.ndim != 3 or probs.shape[-1] != NUM_BRACKETS:
        raise ValueError(f"reduce_tiles wants [batch, tiles, {NUM_BRACKETS}] probabilities, got {tuple(probs.shape)}")
    n = probs.shape[1]
    if n < 1:
        raise ValueError("reduce_tiles: no tiles")
    if how == "mean":
        return probs.mean(1) if is_torch else probs.mean(axis=1, dtype=np.float64).astype(probs.dtype)
    position = {"min": 0, "median": (n - 1) // 2, "max": n - 1}[how]
    if is_torch:
        score = (probs.double() * torch.arange(NUM_BRACKETS, dtype=torch.float64, device=probs.device)).sum(-1)
        pick = torch.sort(score, dim=1, stable=True).indices[:, position]
        return probs[torch.arange(probs.shape[0], device=probs.device), pick]
    probs = np.asarray(probs)
    score = (probs.astype(np.float64) * np.arange(NUM_BRACKETS)).sum(-1)
    pick = np.argsort(score, axis=1, kind="stable")[:, position]
    return probs[np.arange(probs.shape[0]), pick]


@dataclass(frozen=True)
class TileSettings:
    """One run's tiling: n views per image (1 = off), how they reduce, and the resize scale."""

    n: int = 1
    reduce: str = "mean"
    scale: float = DEFAULT_TILE_SCALE

    def __post_init__(self):
        check_tiles(self.n)
        check_reduce(self.reduce)
        check_scale(self.scale)

    @property
    def on(self) -> bool:
        return self.n > 1

    def record(self) -> dict:
        """What a manifest / report records: {"n", "reduce", "scale"} ({"n": 1} when off)."""
        return {"n": self.n, "reduce": self.reduce, "scale": self.scale} if self.on else {"n": 1}

    def describe(self) -> str:
        if not self.on:
            return "off (one eval view per image)"
        kind = "four corners + centre" if self.n == 5 else f"{math.isqrt(self.n)}x{math.isqrt(self.n)} grid"
        return f"{self.n} tiles ({kind}) of the image resized to {self.scale:g}x the model's size, {self.reduce}"

    def transform(self, info: dict) -> TileTransform:
        return TileTransform(info, self.n, self.scale)


def settings_from_flags(tiles: int | None, reduce: str | None, scale: float | None) -> tuple[TileSettings | None, list[str]]:
    """(TileSettings, []) from the --tiles / --tile-reduce / --tile-scale of export, report and
    the app, or (None, what does not fit, each naming its flag)."""
    tiles = 1 if tiles is None else tiles
    problems = []
    for flag, check, value in (("--tiles", check_tiles, tiles), ("--tile-reduce", check_reduce, reduce),
                               ("--tile-scale", check_scale, scale)):
        if value is not None:
            try:
                check(value)
            except ValueError as exc:
                problems.append(f"{flag}: {exc}")
    if tiles == 1 and (reduce is not None or scale is not None):
        problems.append("--tile-reduce and --tile-scale need --tiles N (5, or a square such as 4, 9, 16)")
    if problems:
        return None, problems
    return TileSettings(tiles, reduce or "mean", DEFAULT_TILE_SCALE if scale is None else float(scale)), []


def flatten_tiles(batches: Iterable[dict]) -> Iterator[dict]:
    """Batches whose `x` is [B, n, 3, S, S] as batches of [B * n, 3, S, S] (image-major), the
    shape every scorer takes; the other keys are left as they are."""
    for batch in batches:
        x = batch["x"]
        if x.ndim != 5:
            raise ValueError(f"tiled batches hold [batch, tiles, 3, S, S] views, got {tuple(x.shape)}")
        batch["tiles"] = int(x.shape[1])
        batch["x"] = x.flatten(0, 1)
        yield batch


def per_image(probs, batch: dict):
    """A flattened batch's [B * n, 11] probabilities as [B, n, 11]."""
    n = int(batch["tiles"])
    return probs.reshape(-1, n, NUM_BRACKETS)


def reduce_scored(scored: Iterable[tuple[object, dict]], how: str) -> Iterator[tuple[object, dict]]:
    """(probs [B * n, 11], batch) pairs of flatten_tiles batches -> (probs [B, 11], batch)."""
    for probs, batch in scored:
        yield reduce_tiles(per_image(probs, batch), how), batch
