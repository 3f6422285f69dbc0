"""Everything that is not a character: bracket 0 (photos, static noise, text) and bracket 1
(manga pages, scenery with no subject, animals, objects). Within a bracket the image's
quality ("quality" in attrs) shows only weakly.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .character import HAIR_STYLES, character_parts, to_canvas
from .draw import background, blend, darker, ellipse, fractal, grid, hsv, part, px, shade_parts, u8

# --------------------------------------------------------------------------------------
# Bracket 0: photos, noise, text


def render_photo(rng, tex_rng, R, attrs, row):
    """Photo-like: soft natural colour fields, a horizon, blurred bokeh, sensor grain.
    The smooth part is computed at <= 128 px and upscaled; only the grain is full size."""
    Rs = min(R, 128)
    _, Y = grid(Rs)
    horizon = rng.uniform(0.3, 0.7)
    sky = hsv(rng.uniform(0.5, 0.65), rng.uniform(0.1, 0.5), rng.uniform(0.6, 0.95))
    ground = hsv(rng.uniform(0.05, 0.35), rng.uniform(0.2, 0.6), rng.uniform(0.25, 0.6))
    f = fractal(rng, Rs, base=3, octaves=5, persistence=0.6)
    edge = np.clip((Y - horizon + 0.15 * f) / 0.04, 0, 1)[..., None]
    img = sky * (1 - edge) + ground * edge
    img = img * (1 + 0.35 * fractal(rng, Rs, base=4, octaves=5, persistence=0.65)[..., None])
    blobs = Image.new("L", (Rs, Rs), 0)
    d = ImageDraw.Draw(blobs)
    for _ in range(int(rng.integers(2, 8))):
        x, y, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.15)
        d.ellipse([(x - r) * Rs, (y - r) * Rs, (x + r) * Rs, (y + r) * Rs], fill=int(rng.integers(80, 255)))
    b = np.asarray(blobs.filter(ImageFilter.GaussianBlur(Rs * 0.02)), np.float32)[..., None] / 255.0
    img = img * (1 - 0.5 * b) + hsv(rng.random(), 0.3, 0.95) * 0.5 * b
    small = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    arr = np.asarray(small.resize((R, R), Image.Resampling.BICUBIC), np.float32)
    arr = arr + tex_rng.standard_normal((R, R, 1), dtype=np.float32) * 10.0  # sensor grain
    row.update(variant="photo", background="photo")
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def render_noise(rng, tex_rng, R, attrs, row):
    g = int(rng.choice([8, 16, 32, 48]))
    cells = rng.random((g, g, 3)).astype(np.float32)
    if rng.random() < 0.5:
        cells = cells.mean(axis=2, keepdims=True).repeat(3, 2)
    img = np.asarray(Image.fromarray((cells * 255).astype(np.uint8)).resize((R, R), Image.Resampling.NEAREST),
                     np.float32) / 255.0
    img = img * 0.7 + 0.3 * tex_rng.random((R, R, 1)).astype(np.float32)
    row.update(variant=f"noise{g}", background="noise")
    return Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))


def _glyph_row(rng, n_glyphs):
    """Bitmap (7, 6 * n) of random blocky glyphs with strokes, spaces between words."""
    g = np.zeros((7, 6 * n_glyphs), np.uint8)
    for i in range(n_glyphs):
        if rng.random() < 0.15:
            continue  # space
        cell = np.zeros((7, 5), np.uint8)
        for _ in range(int(rng.integers(2, 4))):
            if rng.random() < 0.5:
                r = int(rng.integers(0, 7))
                a, b = sorted(rng.integers(0, 6, 2))
                cell[r, a:b + 1] = 1
            else:
                c = int(rng.integers(0, 5))
                a, b = sorted(rng.integers(0, 8, 2))
                cell[a:b + 1, c] = 1
        g[:, 6 * i:6 * i + 5] = cell
    return g


def _paste_text(img, rng, R, y0, h, n_glyphs, x0, color, outline=None):
    """Paint a row of glyphs of height h (canvas units) at (x0, y0) onto float img."""
    bm = _glyph_row(rng, n_glyphs)
    H = max(2, int(round(h * R)))
    W = max(2, int(round(H * bm.shape[1] / 7)))
    m = np.asarray(Image.fromarray(bm * 255).resize((W, H), Image.Resampling.NEAREST), np.float32) / 255.0
    X0, Y0 = int(round(x0 * R)), int(round(y0 * R))
    x1, y1 = min(R, X0 + W), min(R, Y0 + H)
    if x1 <= X0 or y1 <= Y0 or X0 < 0 or Y0 < 0:
        return img
    m = m[: y1 - Y0, : x1 - X0]
    if outline is not None:
        pad = max(1, H // 8)
        mo = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(2 * pad + 1)),
                        np.float32) / 255.0
        blend(img[Y0:y1, X0:x1], mo, outline)
    blend(img[Y0:y1, X0:x1], m, color)
    return img


def _text_page(rng, R, q, style):
    """A page of text lines, or a chat of bubbles, on a plain background."""
    bg = hsv(rng.random(), rng.uniform(0, 0.15), rng.uniform(0.85, 1.0))
    ink = hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0, 0.3))
    if rng.random() < 0.3:
        bg, ink = ink, bg
    img = np.empty((R, R, 3), np.float32)
    img[:] = bg
    h = rng.uniform(0.04, 0.08)
    y = rng.uniform(0.03, 0.08)
    fill = 1.0 - 0.4 * q  # higher in-bracket quality: a bit less text
    while y + h < 0.97:
        if rng.random() < fill:
            x0 = rng.uniform(0.03, 0.1) if style == "page" else rng.choice([0.05, rng.uniform(0.3, 0.5)])
            n = int((0.95 - x0) / (h * 6 / 7)) if style == "page" else int(rng.integers(4, 12))
            if style == "chat":
                bubble = hsv(rng.random(), 0.3, 0.9)
                x1 = min(0.97, x0 + n * h * 6 / 7 + 0.02)
                img[int((y - 0.01) * R):int((y + h + 0.01) * R), int((x0 - 0.01) * R):int(x1 * R)] = bubble
            img = _paste_text(img, rng, R, y, h, max(1, n), x0, ink)
        y += h * rng.uniform(1.4, 1.9)
    return img


def _text_over_picture(rng, tex_rng, R, attrs, style, row):
    """A picture (photo or drawn) with big outlined text over it: a meme or subtitles."""
    sub = {}
    if rng.random() < 0.5:
        pic = render_photo(rng, tex_rng, R, attrs, sub)
    else:
        pic = render_scenery(rng, tex_rng, R, attrs, sub)
    img = np.asarray(pic, np.float32) / 255.0
    img = img.copy()
    if style == "meme":
        h = rng.uniform(0.09, 0.14)
        for y in (0.04, 0.96 - h):
            n = int(rng.integers(5, 10))
            x0 = max(0.02, 0.5 - n * h * 6 / 7 / 2)
            img = _paste_text(img, rng, R, y, h, n, x0, (1, 1, 1), outline=(0, 0, 0))
    else:
        h = rng.uniform(0.06, 0.09)
        col = (1, 1, 1) if rng.random() < 0.6 else (1, 0.95, 0.3)
        for k in range(2):
            n = int(rng.integers(8, 15))
            x0 = max(0.02, 0.5 - n * h * 6 / 7 / 2)
            img = _paste_text(img, rng, R, 0.95 - (2 - k) * h * 1.3, h, n, x0, col, outline=(0.05, 0.05, 0.05))
    row["background"] = sub.get("variant", "picture")
    return img


def render_text(rng, tex_rng, R, attrs, row):
    style = ["page", "meme", "subtitle", "chat"][int(rng.integers(4))]
    row["variant"] = "text_" + style
    if style in ("page", "chat"):
        img = _text_page(rng, R, attrs["quality"], style)
        row["background"] = "plain"
    else:
        img = _text_over_picture(rng, tex_rng, R, attrs, style, row)
    return Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------
# Bracket 1: manga pages, scenery, animals, objects

_TONE_PERIOD = 4.0 / 256  # fine screentone dots: a grey at 64 px, dots at 256 px


def _screentone(R, x0, y0, x1, y1, period, radius_fn):
    X, Y = grid(R)
    cx = (X % period) - period / 2
    cy = (Y % period) - period / 2
    rad = radius_fn(X, Y)
    m = (cx * cx + cy * cy) < (rad * period) ** 2
    box = (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)
    return m & box


def _manga_panels(rng):
    """Split the page into 2-4 rectangles (x0, y0, x1, y1) with gutters."""
    panels = [(0.04, 0.04, 0.96, 0.96)]
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(len(panels)))
        x0, y0, x1, y1 = panels.pop(i)
        g = 0.025
        if (x1 - x0) > (y1 - y0) * rng.uniform(0.6, 1.6):
            xm = rng.uniform(x0 + 0.3 * (x1 - x0), x0 + 0.7 * (x1 - x0))
            panels += [(x0, y0, xm - g / 2, y1), (xm + g / 2, y0, x1, y1)]
        else:
            ym = rng.uniform(y0 + 0.3 * (y1 - y0), y0 + 0.7 * (y1 - y0))
            panels += [(x0, y0, x1, ym - g / 2), (x0, ym + g / 2, x1, y1)]
    return panels


def _inside_panel(arr, sub, panel, R):
    """arr with sub pasted inside the panel's box."""
    x0, y0, x1, y1 = panel
    box = np.zeros((R, R), bool)
    box[int(y0 * R):int(y1 * R), int(x0 * R):int(x1 * R)] = True
    return np.where(box, sub, arr)


def _speed_lines(rng, arr, panel, R):
    x0, y0, x1, y1 = panel
    u = 1.0 / 256
    fx, fy = rng.uniform(x0, x1), rng.uniform(y0, y1)
    pil = Image.fromarray((arr * 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(20, 45))):
        ang = rng.uniform(0, 2 * math.pi)
        r0 = rng.uniform(0.08, 0.2)
        d.line(px([[fx + r0 * math.cos(ang), fy + r0 * math.sin(ang)],
                   [fx + math.cos(ang), fy + math.sin(ang)]], R), fill=20, width=max(1, int(round(u * R))))
    return _inside_panel(arr, np.asarray(pil, np.float32) / 255.0, panel, R)


def _manga_head(rng, arr, panel, R):
    """A greyscale head (ink lines, tone in the hair)."""
    x0, y0, x1, y1 = panel
    u = 1.0 / 256
    cx, cy = (x0 + x1) / 2 + rng.uniform(-0.05, 0.05), (y0 + y1) / 2 + 0.1
    sc = min(x1 - x0, y1 - y0) * 1.1
    parts = to_canvas(character_parts(rng, bool(rng.random() < 0.5), HAIR_STYLES[int(rng.integers(5))],
                                      bool(rng.random() < 0.2), 0.2), cx, cy, sc, 0.0)
    pil = Image.fromarray((arr * 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    grey = {"hair": 60, "skin": 250, "cloth": 200, "cloth2": 120, "eye": 30}
    for p in parts:
        d.polygon(px(p["poly"], R), fill=grey[p["key"]], outline=0, width=max(1, int(round(2 * u * R))))
    return _inside_panel(arr, np.asarray(pil, np.float32) / 255.0, panel, R)


def _speech_bubble(rng, arr, panel, R):
    """A speech bubble with glyph rows."""
    x0, y0, x1, y1 = panel
    u = 1.0 / 256
    bx, by = rng.uniform(x0, x1), rng.uniform(y0, y1)
    w, h = min(0.2, (x1 - x0) / 2), min(0.12, (y1 - y0) / 2)
    pil = Image.fromarray((arr * 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    d.ellipse([(bx - w) * R, (by - h) * R, (bx + w) * R, (by + h) * R], fill=255, outline=0,
              width=max(1, int(round(1.5 * u * R))))
    sub = np.asarray(pil, np.float32)[..., None].repeat(3, 2) / 255.0
    for k in range(2):
        sub = _paste_text(sub, rng, R, by - h * 0.45 + k * h * 0.5, h * 0.3, 5, bx - w * 0.6, (0, 0, 0))
    return _inside_panel(arr, sub[..., 0], panel, R)


def _manga_panel(rng, arr, panel, R):
    """One panel's content: gradient screentone, speed lines, a head, or flat tone; then,
    half the time, a speech bubble."""
    x0, y0, x1, y1 = panel
    kind = int(rng.integers(4))
    if kind == 0:  # gradient screentone
        a, b = rng.uniform(0.1, 0.45, 2)
        m = _screentone(R, x0, y0, x1, y1, _TONE_PERIOD, lambda X, Y: a + (b - a) * np.clip((Y - y0) / (y1 - y0), 0, 1))
        arr = np.where(m, 0.1, arr)
    elif kind == 1:
        arr = _speed_lines(rng, arr, panel, R)
    elif kind == 2:
        arr = _manga_head(rng, arr, panel, R)
    else:  # flat tone background
        m = _screentone(R, x0, y0, x1, y1, _TONE_PERIOD, lambda X, Y: np.float32(rng.uniform(0.15, 0.3)))
        arr = np.where(m, 0.15, arr)
    if rng.random() < 0.5:
        arr = _speech_bubble(rng, arr, panel, R)
    return arr


def render_manga(rng, tex_rng, R, attrs, row):
    img = np.ones((R, R), np.float32) * rng.uniform(0.92, 1.0)
    panels = _manga_panels(rng)
    arr = np.asarray(Image.fromarray((img * 255).astype(np.uint8)), np.float32) / 255.0
    for panel in panels:
        arr = _manga_panel(rng, arr, panel, R)
    pil = Image.fromarray(np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    u = 1.0 / 256
    bw = max(1, int(round(rng.uniform(2.5, 4.5) * u * R)))
    for (x0, y0, x1, y1) in panels:
        draw.rectangle([x0 * R, y0 * R, x1 * R, y1 * R], outline=0, width=bw)
    row.update(variant="manga", background="page")
    return pil.convert("RGB")


def render_scenery(rng, tex_rng, R, attrs, row):
    q = attrs["quality"]
    _, Y = grid(R)
    hue = rng.random()
    top, bot = hsv(hue, rng.uniform(0.3, 0.7), rng.uniform(0.6, 0.95)), hsv(hue + rng.uniform(-0.15, 0.15), 0.25, 0.98)
    img = (top + (bot - top) * Y[..., None]).astype(np.float32)
    pil = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    sx, sy, sr = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.35), rng.uniform(0.04, 0.09)
    d.ellipse([(sx - sr) * R, (sy - sr) * R, (sx + sr) * R, (sy + sr) * R], fill=u8(hsv(0.12, 0.4, 1.0)))
    n_layers = int(rng.integers(2, 4))
    ghue = rng.uniform(0.2, 0.45) if rng.random() < 0.7 else rng.random()
    for k in range(n_layers):
        base = 0.45 + 0.15 * k + rng.uniform(-0.05, 0.05)
        xs = np.linspace(-0.05, 1.05, 24)
        ys = base + np.cumsum(rng.normal(0, 0.025, 24))
        poly = np.concatenate([np.stack([xs, ys], 1), [[1.05, 1.05], [-0.05, 1.05]]])
        c = hsv(ghue + 0.03 * k, 0.35 + 0.1 * k, 0.75 - 0.15 * k + 0.2 * q)
        d.polygon(px(poly, R), fill=u8(c))
        for _ in range(int(rng.integers(0, 5))):  # trees
            tx = rng.uniform(0, 1)
            ty = np.interp(tx, xs, ys) + 0.01
            th = rng.uniform(0.05, 0.14) * (0.6 + 0.3 * k)
            d.polygon(px([[tx, ty - th], [tx - th * 0.35, ty], [tx + th * 0.35, ty]], R), fill=u8(darker(c, 0.6)))
    row.update(variant="scenery", background="landscape")
    return pil


def _animal(rng, row):
    """Parts, colours and eye positions of a cat, dog or bunny seen from the side."""
    parts = []
    sx = -1 if rng.random() < 0.5 else 1
    parts.append(part("body", "body", ellipse(0, 0.1, 0.3, 0.17, 40), (0, 0.1, 0.3, 0.17)))
    for lx in (-0.2, -0.1, 0.1, 0.2):
        parts.append(part("body", "body", [[lx - 0.03, 0.15], [lx + 0.03, 0.15], [lx + 0.03, 0.36], [lx - 0.03, 0.36]],
                          (lx, 0.26, 0.04, 0.12)))
    parts.append(part("body", "body", [[-sx * 0.27, 0.05], [-sx * 0.45, -0.15], [-sx * 0.42, -0.18], [-sx * 0.24, 0.0]],
                      (-sx * 0.35, -0.07, 0.1, 0.1)))
    ear = rng.choice(["cat", "dog", "bunny"])
    hx, hy = sx * 0.3, -0.1
    if ear == "bunny":
        for e in (-0.05, 0.05):
            parts.append(part("ear", "ear", ellipse(hx + e, hy - 0.2, 0.035, 0.12, 16), (hx + e, hy - 0.2, 0.04, 0.12)))
    elif ear == "cat":
        for e in (-1, 1):
            parts.append(part("ear", "ear", [[hx + e * 0.02, hy - 0.1], [hx + e * 0.11, hy - 0.22],
                                             [hx + e * 0.13, hy - 0.04]], (hx + e * 0.08, hy - 0.12, 0.06, 0.08)))
    else:
        for e in (-1, 1):
            parts.append(part("ear", "ear", ellipse(hx + e * 0.12, hy + 0.02, 0.04, 0.09, 16),
                              (hx + e * 0.12, hy, 0.05, 0.09)))
    parts.append(part("head", "head", ellipse(hx, hy, 0.14, 0.13, 32), (hx, hy, 0.14, 0.13)))
    row["variant"] = "animal_" + str(ear)
    colors = {"body": hsv(rng.uniform(0.02, 0.12), rng.uniform(0.1, 0.6), rng.uniform(0.4, 0.95))}
    colors["head"] = colors["ear"] = colors["body"]
    eyes = [(hx + sx * 0.05, hy - 0.02), (hx + sx * 0.11, hy - 0.02)]
    return parts, colors, eyes


def _object(rng, row):
    """Parts and colours of a mug, bottle, fruit or box (no eyes)."""
    parts = []
    obj = rng.choice(["mug", "bottle", "fruit", "box"])
    c = hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.5, 0.95))
    if obj == "mug":
        parts.append(part("ring", "ring", ellipse(0.22, 0.05, 0.11, 0.12, 24), (0.22, 0.05, 0.11, 0.12)))
        parts.append(part("main", "main", [[-0.2, -0.2], [0.2, -0.2], [0.18, 0.28], [-0.18, 0.28]], (0, 0.04, 0.22, 0.3)))
    elif obj == "bottle":
        parts.append(part("main", "main", [[-0.05, -0.4], [0.05, -0.4], [0.05, -0.22], [0.14, -0.12], [0.14, 0.35],
                                           [-0.14, 0.35], [-0.14, -0.12], [-0.05, -0.22]], (0, 0.0, 0.16, 0.4)))
        parts.append(part("ring", "ring", [[-0.14, 0.0], [0.14, 0.0], [0.14, 0.15], [-0.14, 0.15]], (0, 0.07, 0.16, 0.1)))
    elif obj == "fruit":
        parts.append(part("ring", "ring", [[0.0, -0.22], [0.15, -0.33], [0.05, -0.2]], (0.07, -0.26, 0.08, 0.06)))
        parts.append(part("main", "main", ellipse(0, 0.02, 0.25, 0.23, 40), (0, 0.02, 0.25, 0.23)))
    else:
        parts.append(part("main", "main", [[-0.25, -0.1], [0.25, -0.1], [0.25, 0.3], [-0.25, 0.3]], (0, 0.1, 0.3, 0.25)))
        parts.append(part("ring", "ring", [[-0.25, -0.1], [-0.1, -0.25], [0.35, -0.25], [0.25, -0.1]],
                          (0.05, -0.17, 0.3, 0.1)))
    colors = {"main": c, "ring": hsv(rng.random(), 0.4, 0.8)}
    row["variant"] = "object_" + str(obj)
    return parts, colors, []


def render_creature(rng, tex_rng, R, attrs, row, kind):
    """An animal or an object on a nuisance background, shaded like a character."""
    q = attrs["quality"]
    hue = float(rng.random())
    base, row["background"] = background(rng, tex_rng, R, hue)
    cx, cy = 0.5 + rng.normal(0, 0.06), 0.55 + rng.normal(0, 0.05)
    sc = rng.uniform(0.55, 0.9)
    parts, colors, eyes = (_animal if kind == "animal" else _object)(rng, row)
    parts = to_canvas(parts, cx, cy, sc, rng.normal(0, 0.05))
    la = rng.uniform(math.pi * 1.05, math.pi * 1.95)
    light = np.array([math.cos(la) * 0.8, math.sin(la) * 0.8, 0.6])
    light /= np.linalg.norm(light)
    img = shade_parts(R, base, parts, colors, 0.1 + 0.35 * q, 0 if q > 0.5 else 3, light, 0.0, None,
                      outline=(rng, [darker(colors[p["key"]], 0.3) for p in parts], 1.6 / 256, 0.6 + 0.4 * q))
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for ex, ey in eyes:
        x, y = (cx + ex * sc) * R, (cy + ey * sc) * R
        r = 0.018 * sc * R
        d.ellipse([x - r, y - r, x + r, y + r], fill=(20, 20, 20))
    row.update(center_x=cx, center_y=cy, scale=sc)
    return pil
