"""One image: its score and attributes, then the renderer of its category, from a registry."""

from __future__ import annotations

from functools import partial

import numpy as np
from PIL import Image

from .character import render_character, render_sketch
from .scenes import render_creature, render_manga, render_noise, render_photo, render_scenery, render_text
from .scores import ATTRIBUTE_COLUMNS, SPLIT_CODE, sample_score_and_attributes

#: Category (as drawn by the score model) -> renderer. A renderer is called as
#: fn(rng, tex_rng, R, attrs, row): it draws an R x R image from `rng` (scene) and
#: `tex_rng` (resolution-dependent texture), reads attrs (always with "quality"), fills the
#: nuisance columns it knows in `row` and returns a PIL image.
RENDERERS = {
    "photo": render_photo,
    "noise": render_noise,
    "text": render_text,
    "manga": render_manga,
    "scenery": render_scenery,
    "animal": partial(render_creature, kind="animal"),
    "object": partial(render_creature, kind="object"),
    "sketch": render_sketch,
    "flat": partial(render_character, shaded=False),
    "shaded": partial(render_character, shaded=True),
}

#: How each image was drawn, independent of its score (nuisance), plus the realised
#: geometry (centre/scale/tilt come partly from composition, partly from nuisance jitter).
#: Renderers fill the ones that apply; the rest stay empty in truth.parquet.
NUISANCE_COLUMNS = (
    ("hue", "float"), ("background", "str"), ("hair_style", "str"), ("ears", "bool"),
    ("arm_pose", "float"), ("light_angle", "float"), ("flip", "bool"),
    ("center_x", "float"), ("center_y", "float"), ("scale", "float"), ("tilt", "float"),
    ("variant", "str"),
)


def supersample_for(size: int) -> int:
    """Render at size * supersample: 4x up to 64 px, 2x above (256 px renders at 512)."""
    return 4 if size <= 64 else 2


def render_image(seed: int, split: str, index: int, bracket: int, size: int) -> tuple[Image.Image, dict]:
    """Draw one image and return it with its truth row (without path/label)."""
    key = [int(seed), SPLIT_CODE[split], int(index)]
    rng = np.random.default_rng(key + [0])
    tex_rng = np.random.default_rng(key + [1])  # resolution-dependent noise lives here
    R = size * supersample_for(size)
    score, category, attrs = sample_score_and_attributes(rng, int(bracket))
    row = {"split": split, "index": int(index), "bracket": int(bracket), "score": score, "category": category}
    for k in ATTRIBUTE_COLUMNS:
        row[k] = float(attrs[k]) if k in attrs else float("nan")
    pil = RENDERERS[category](rng, tex_rng, R, attrs, row)
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    pil = pil.reduce(R // size)
    return pil, row
