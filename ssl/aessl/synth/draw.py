"""Drawing primitives shared by the renderers: colours, contours, noise, backgrounds, shading.

Coordinates are canvas-relative (0..1) and converted to pixels late, so a scene is the same
at every resolution; only the rasterisation changes.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from . import scores  # the difficulty knobs, defined once there

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def grid(R: int):
    """Pixel-centre coordinates (X, Y) of an R x R canvas, cached per R."""
    if R not in _GRIDS:
        c = (np.arange(R, dtype=np.float32) + 0.5) / R
        _GRIDS[R] = (c[None, :].repeat(R, 0), c[:, None].repeat(R, 1))
    return _GRIDS[R]


def hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(1.0, max(0.0, s)), min(1.0, max(0.0, v))), dtype=np.float32)


def u8(c) -> tuple:
    c = np.clip(np.asarray(c, dtype=np.float32), 0, 1)
    return tuple(int(round(float(x) * 255)) for x in c)


def darker(c, f=0.45):
    return np.asarray(c, np.float32) * f


def ellipse(cx, cy, rx, ry, n=40, a0=0.0, a1=2 * math.pi):
    t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * math.pi - 1e-9)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def px(pts, R) -> list:
    return (np.asarray(pts) * R).ravel().tolist()


_JITTER_K = np.array([2, 3, 5, 8, 13], np.float64)


def _jitter_closed(rng, pts, amp):
    """Offset a closed contour along its normals by smooth periodic noise of amplitude amp."""
    n = len(pts)
    if amp <= 0 or n < 3:
        return pts
    i = np.arange(n) / n
    a = rng.normal(0, 1.0, 5) / np.sqrt(_JITTER_K)
    ph = rng.random(5)
    off = a @ np.sin(2 * math.pi * (_JITTER_K[:, None] * i[None, :] + ph[:, None]))
    off = (off + rng.normal(0, 0.35, n)) * (amp / 1.5)
    d = np.empty_like(pts)
    d[1:-1] = pts[2:] - pts[:-2]
    d[0] = pts[1] - pts[-1]
    d[-1] = pts[0] - pts[-2]
    ln = np.hypot(d[:, 0], d[:, 1]) + 1e-9
    out = pts.copy()
    out[:, 0] += d[:, 1] / ln * off
    out[:, 1] -= d[:, 0] / ln * off
    return out


def fractal(rng, R, base=3, octaves=5, persistence=0.55):
    """Smooth multi-octave noise in about [-1, 1]; grid sizes do not depend on R, so the
    same seed gives the same picture at every resolution."""
    acc = np.zeros((R, R), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        g = base * 2**o + 1
        cells = rng.standard_normal((g, g)).astype(np.float32)
        if g >= R:
            break
        up = np.asarray(Image.fromarray(cells).resize((R, R), Image.Resampling.BICUBIC))
        acc += amp * up
        total += amp
        amp *= persistence
    return acc / max(total, 1e-6)


def blend(img, mask, color, alpha=1.0):
    """img (R,R,3) float; mask (R,R) in [0,1] or bool; paint color over it."""
    m = (mask.astype(np.float32) * alpha)[..., None]
    img *= 1 - m
    img += m * np.asarray(color, np.float32)
    return img


# --------------------------------------------------------------------------------------
# Backgrounds (a nuisance: never changes the score)


def _field_image(fn, R, colors, n=48):
    """Smooth background from t = fn(X, Y) in [0, 1] evaluated on an n x n grid, mixed
    between two colours and upscaled bilinearly (cheap, and smooth at any R)."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    t = np.clip(fn(c[None, :], c[:, None]), 0, 1)[..., None]
    small = colors[0] + (colors[1] - colors[0]) * t
    small = (np.clip(small, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(small).resize((R, R), Image.Resampling.BILINEAR)


def _stripes(rng, d, R, c2):
    p = rng.uniform(0.06, 0.2)
    ang = rng.uniform(0, math.pi)
    u = np.array([math.cos(ang), math.sin(ang)])
    w = np.array([-u[1], u[0]])
    k0 = int(-1.5 / p) - 1
    for k in range(k0, -k0 + 1):
        a = np.array([0.5, 0.5]) + u * (k * p)
        poly = [a - w * 1.5, a + w * 1.5, a + u * (p / 2) + w * 1.5, a + u * (p / 2) - w * 1.5]
        d.polygon(px(poly, R), fill=u8(c2))


def _dots(rng, d, R, c2):
    p = rng.uniform(0.08, 0.18)
    r = p * rng.uniform(0.15, 0.35)
    ox, oy = rng.random(2) * p
    for x in np.arange(-ox, 1 + p, p):
        for y in np.arange(-oy, 1 + p, p):
            d.ellipse([(x - r) * R, (y - r) * R, (x + r) * R, (y + r) * R], fill=u8(c2))


def _sky(rng, R):
    top = hsv(0.58 + rng.uniform(-0.05, 0.05), 0.45, 0.95)
    im = _field_image(lambda X, Y: Y + 0 * X, R, (top, hsv(0.58, 0.15, 1.0)))
    d = ImageDraw.Draw(im)
    for _ in range(rng.integers(1, 4)):
        cx, cy, w = rng.uniform(0, 1), rng.uniform(0.05, 0.5), rng.uniform(0.08, 0.2)
        for j in range(4):
            e = (cx + (j - 1.5) * w * 0.5, cy + rng.uniform(-0.02, 0.02), w * 0.45, w * 0.3)
            d.ellipse([(e[0] - e[2]) * R, (e[1] - e[3]) * R, (e[0] + e[2]) * R, (e[1] + e[3]) * R],
                      fill=(245, 248, 252))
    return im


def _texture(rng, tex_rng, R, arr):
    # Mid-scale mottling plus full-resolution grain: looks like "detail" to a careless model.
    m = fractal(rng, min(R, 128), base=6, octaves=3) * (0.08 * 255 * scores.NUISANCE_STRENGTH)
    m = np.asarray(Image.fromarray(m.astype(np.float32)).resize((R, R), Image.Resampling.BILINEAR))
    g = tex_rng.standard_normal((R, R), dtype=np.float32) * (0.08 * 255 * scores.NUISANCE_STRENGTH)
    return np.clip(arr + (m + g)[..., None], 0, 255).astype(np.uint8)


def background(rng, tex_rng, R, hue, kind=None):
    """Nuisance background as a uint8 (R, R, 3) array. Returns (array, kind)."""
    kinds = ["solid", "gradient", "stripes", "dots", "glow", "room", "sky", "texture"]
    kind = kind or kinds[rng.integers(len(kinds))]
    h = hue + rng.uniform(-0.5, 0.5)
    s = rng.uniform(0.05, 0.45)
    v = rng.uniform(0.55, 0.98)
    c1 = hsv(h, s, v)
    c2 = hsv(h + rng.uniform(-0.15, 0.15), s * rng.uniform(0.5, 1.5), v * rng.uniform(0.6, 1.0))
    c2 = c1 + (c2 - c1) * min(1.0, scores.NUISANCE_STRENGTH)  # pattern contrast is a nuisance
    im = Image.new("RGB", (R, R), u8(c1))
    d = ImageDraw.Draw(im)
    if kind == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        ca, sa = math.cos(ang), math.sin(ang)
        im = _field_image(lambda X, Y: 0.5 + (X - 0.5) * ca + (Y - 0.5) * sa, R, (c1, c2))
    elif kind == "stripes":
        _stripes(rng, d, R, c2)
    elif kind == "dots":
        _dots(rng, d, R, c2)
    elif kind == "glow":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        im = _field_image(lambda X, Y: np.sqrt((X - cx) ** 2 + (Y - cy) ** 2) / 0.8, R, (c1, c2))
    elif kind == "room":
        fy = rng.uniform(0.62, 0.82)
        d.rectangle([0, fy * R, R, R], fill=u8(c2))
        wx, wy = rng.uniform(0.05, 0.6), rng.uniform(0.08, 0.3)
        d.rectangle([wx * R, wy * R, (wx + 0.3) * R, (wy + 0.25) * R], fill=u8(c1 * 0.1 + hsv(0.58, 0.25, 0.97) * 0.9))
    elif kind == "sky":
        im = _sky(rng, R)
    arr = np.asarray(im)
    if kind == "texture":
        arr = _texture(rng, tex_rng, R, arr)
    return arr, kind


# --------------------------------------------------------------------------------------
# Outlines and pseudo-3D shading of a list of parts (character, animal, object)

_LINE = 128  # id-map values >= _LINE are outline pixels of part (value - _LINE)


def part(name, key, poly, ell, outline=True) -> dict:
    """A polygon with a colour key and an ellipse (cx, cy, rx, ry) used as its pseudo-normal
    for shading; `outline` False leaves it without a drawn outline."""
    return {"name": name, "key": key, "poly": np.asarray(poly, np.float64), "ell": ell, "outline": outline}


def draw_outline(draw, rng, R, pts, color, width, clean: float, closed=True):
    """Outline of a polygon. clean 1: one smooth stroke; lower: jitter, doubled strokes,
    gaps."""
    jit = (1.0 - clean) * 0.012
    p = _jitter_closed(rng, pts, jit) if jit > 0 else pts
    if closed:
        p = np.concatenate([p, p[:1]])
    w = max(1, int(round(width * R)))
    if clean > 0.75 or len(p) < 6:
        draw.line(px(p, R), fill=color, width=w, joint="curve" if w > 2 else None)
    else:
        # broken into pieces; some pieces skipped
        k = max(3, len(p) // 6)
        for s in range(0, len(p) - 1, k):
            if rng.random() < (0.75 - clean) * 0.5:
                continue
            seg = p[s:s + k + 1]
            ww = max(1, int(round(w * rng.uniform(0.7, 1.0 + 1.2 * (1 - clean)))))
            draw.line(px(seg, R), fill=color, width=ww)
    if rng.random() < (0.8 - clean):
        q = _jitter_closed(rng, pts, jit * 1.5 + 0.003)
        if closed:
            q = np.concatenate([q, q[:1]])
        draw.line(px(q, R), fill=color, width=max(1, w // 2))


def _paint_ids(R, parts, colors, outline):
    """Id map of the parts (part i's fill is i, its outline _LINE + i) with per-id tables:
    colour, shading ellipse, is-cloth and is-hair. Each outline is drawn right after its
    part's fill, so parts in front hide the lines behind them."""
    idm = Image.new("L", (R, R), 0)
    d = ImageDraw.Draw(idm)
    col = np.zeros((256, 3), np.float32)
    ell = np.zeros((256, 4), np.float32)
    ell[:] = (0.5, 0.5, 1, 1)
    is_cloth = np.zeros(256, np.float32)
    is_hair = np.zeros(256, np.float32)
    for i, p in enumerate(parts, start=1):
        d.polygon(px(p["poly"], R), fill=i)
        col[i] = colors[p["key"]]
        ell[i] = p["ell"]
        ell[i, 2:] = np.maximum(ell[i, 2:], 1e-4)
        is_cloth[i] = p["key"].startswith("cloth")
        is_hair[i] = p["key"] == "hair"
        if outline is not None and p["outline"]:
            orng, line_colors, width, clean = outline
            col[_LINE + i] = line_colors[i - 1]
            ell[_LINE + i] = ell[i]
            draw_outline(d, orng, R, p["poly"], _LINE + i, width, clean)
    return np.asarray(idm), col, ell, is_cloth, is_hair


def _cloth_pattern(xi, yi, period, kind):
    if kind == 0:
        return ((xi + yi) // period) % 2
    if kind == 1:
        return (xi // period + yi // period) % 2
    return (yi // period) % 2


def shade_parts(R, base, parts, colors, depth, steps, light, highlight, pattern, outline=None):
    """Fill the parts over `base` with pseudo-3D lighting. depth 0 = flat fills; steps =
    number of tone bands (0 = smooth gradient); highlight adds specular sheen and rim light;
    pattern = (contrast, period_px, kind) for a zero-mean fine pattern on the clothes.
    outline = (rng, line_colors, width, clean): each part's outline is drawn right after its
    fill, into the same id map, so parts in front hide the lines behind them.
    Only covered pixels are computed."""
    idm, col, ell, is_cloth, is_hair = _paint_ids(R, parts, colors, outline)
    ids = idm.ravel()
    nzi = np.flatnonzero(ids)
    pid = ids[nzi]
    yi, xi = np.divmod(nzi, R)
    e = ell[pid]
    dx = ((xi.astype(np.float32) + 0.5) / R - e[:, 0]) / e[:, 2]
    dy = ((yi.astype(np.float32) + 0.5) / R - e[:, 1]) / e[:, 3]
    r2 = np.minimum(dx * dx + dy * dy, 1.0)
    nz = np.sqrt(1.0 - r2)
    lx, ly, lz = (float(c) for c in light)
    lam_raw = dx * lx + dy * ly + nz * lz
    lam = np.clip(lam_raw, 0, 1)
    if steps > 0:
        lam = np.floor(lam * (steps * 0.999)) / max(steps - 1, 1)
    shade = 1.0 - depth * (1.0 - lam)
    if pattern is not None and pattern[0] > 0:
        contrast, period, kind = pattern
        pat = _cloth_pattern(xi, yi, period, kind)
        shade = shade * (1 + (pat.astype(np.float32) * 2 - 1) * (contrast * is_cloth[pid]))
    if highlight > 0:
        spec = np.clip(lam_raw - 0.82, 0, 1) * (highlight * 0.35 / 0.18) * is_hair[pid]
        rim = np.clip(r2 - 0.8, 0, 0.2) * np.clip(-(dx * lx + dy * ly), 0, 1) * (highlight * 0.25 / 0.2)
    line = pid >= _LINE
    if line.any():
        shade[line] = 1.0
        if highlight > 0:
            spec[line] = 0.0
            rim[line] = 0.0
    out = col[pid] * shade[:, None]
    if highlight > 0:
        out += (spec + rim)[:, None]
    img = np.array(base, dtype=np.uint8).reshape(-1, 3)
    img[nzi] = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    return img.reshape(R, R, 3)
