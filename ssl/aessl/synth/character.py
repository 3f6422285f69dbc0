"""The stylised character: its parts, palette and face, drawn as a flat or shaded
illustration (brackets 4-10) or as a rough sketch (brackets 2-3).

Local coordinates: the figure is about 1 unit tall, centred at 0, y down; `to_canvas`
places it on the canvas.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .draw import background, darker, ellipse, hsv, part, px, shade_parts, u8
from . import scores  # the difficulty knobs, defined once there
from .scores import shown

HAIR_STYLES = ("short", "long", "twintails", "ponytail", "bob")

_HEAD = (0.0, -0.22, 0.15, 0.165)  # centre x, y and radii of the face


def _hair_behind(style: str, flip: bool) -> list[dict]:
    hcx, hcy = _HEAD[:2]
    if style == "long":
        poly = np.concatenate([ellipse(hcx, hcy, 0.2, 0.2, 24, math.pi, 2 * math.pi),
                               [[0.24, 0.05], [0.26, 0.32], [0.1, 0.36], [-0.1, 0.36], [-0.26, 0.32], [-0.24, 0.05]]])
        parts = [part("hair_back", "hair", poly, (0, 0.0, 0.26, 0.4))]
    elif style == "bob":
        poly = np.concatenate([ellipse(hcx, hcy, 0.21, 0.2, 24, math.pi, 2 * math.pi),
                               [[0.22, -0.05], [0.18, -0.02], [-0.18, -0.02], [-0.22, -0.05]]])
        parts = [part("hair_back", "hair", poly, (0, -0.15, 0.22, 0.2))]
    else:
        parts = [part("hair_back", "hair", ellipse(hcx, hcy - 0.01, 0.185, 0.19, 32), (0, -0.22, 0.19, 0.19))]
    if style == "twintails":
        for sx in (-1, 1):
            a0 = -math.pi / 2 if sx > 0 else math.pi / 2  # the outer half of the tail's ellipse
            poly = np.concatenate([[[sx * 0.15, -0.32]], ellipse(sx * 0.27, 0.0, 0.075, 0.26, 20, a0, a0 + math.pi)])
            parts.append(part("tail", "hair", poly, (sx * 0.27, 0.0, 0.09, 0.28)))
    elif style == "ponytail":
        sx = -1 if flip else 1
        parts.append(part("tail", "hair", ellipse(sx * 0.2, -0.08, 0.07, 0.22, 24), (sx * 0.2, -0.08, 0.08, 0.22)))
    return parts


def _animal_ears() -> list[dict]:
    return [part("ear", "hair", [[sx * 0.06, -0.35], [sx * 0.17, -0.53], [sx * 0.17, -0.3]],
                  (sx * 0.13, -0.4, 0.07, 0.1)) for sx in (-1, 1)]


def _body(arm_pose: float) -> list[dict]:
    """Torso (dress), skirt band, arms (a sleeve and a hand each), neck and collar."""
    torso = [[-0.05, -0.03], [0.05, -0.03], [0.17, 0.03], [0.19, 0.12], [0.13, 0.3], [0.22, 0.5],
             [-0.22, 0.5], [-0.13, 0.3], [-0.19, 0.12], [-0.17, 0.03]]
    parts = [part("torso", "cloth", torso, (0, 0.2, 0.22, 0.32)),
             part("skirt", "cloth2", [[0.13, 0.3], [0.22, 0.5], [-0.22, 0.5], [-0.13, 0.3]], (0, 0.4, 0.22, 0.15))]
    for sx in (-1, 1):
        ang = arm_pose * (0.6 if sx > 0 else 1.0)
        sx0, sy0 = sx * 0.165, 0.06
        ex, ey = sx0 + sx * 0.36 * math.sin(ang), sy0 + 0.36 * math.cos(ang)
        d = np.array([ex - sx0, ey - sy0])
        nrm = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9)
        w0, w1 = 0.045, 0.035
        poly = [[sx0 + nrm[0] * w0, sy0 + nrm[1] * w0], [ex + nrm[0] * w1, ey + nrm[1] * w1],
                [ex - nrm[0] * w1, ey - nrm[1] * w1], [sx0 - nrm[0] * w0, sy0 - nrm[1] * w0]]
        parts.append(part("arm", "cloth", poly, ((sx0 + ex) / 2, (sy0 + ey) / 2, 0.06, 0.2)))
        parts.append(part("hand", "skin", ellipse(ex + d[0] * 0.08, ey + d[1] * 0.08, 0.038, 0.042, 16),
                           (ex, ey, 0.04, 0.045)))
    parts.append(part("neck", "skin", [[-0.038, -0.1], [0.038, -0.1], [0.038, -0.02], [-0.038, -0.02]],
                       (0, -0.06, 0.05, 0.06)))
    parts.append(part("collar", "cloth2", [[-0.07, -0.03], [0.07, -0.03], [0.0, 0.06]], (0, 0.0, 0.07, 0.05)))
    return parts


def _face_and_bangs(rng) -> list[dict]:
    """The face, then the top of the head with a zigzag fringe over it."""
    hcx, hcy, hrx, hry = _HEAD
    face = part("face", "skin", ellipse(hcx, hcy, hrx, hry, 40), (hcx, hcy, hrx, hry))
    top = ellipse(hcx, hcy - 0.005, 0.172, 0.18, 24, math.pi * 1.0, math.pi * 2.0)
    n_sp = int(rng.integers(4, 7))
    xs = np.linspace(0.17, -0.17, 2 * n_sp + 1)
    fringe = [[x, hcy - (0.02 if i % 2 else 0.085) + rng.uniform(-0.01, 0.01)] for i, x in enumerate(xs)]
    fringe[0][1] = hcy + 0.06
    fringe[-1][1] = hcy + 0.06
    return [face, part("bangs", "hair", np.concatenate([top, fringe]), (hcx, hcy - 0.06, 0.19, 0.16))]


def character_parts(rng, flip: bool, style: str, ears: bool, arm_pose: float) -> list[dict]:
    """Polygons of a stylised character, back to front, each with a colour key and an
    ellipse (cx, cy, rx, ry) used as its pseudo-normal for shading."""
    parts = _hair_behind(style, flip) + (_animal_ears() if ears else []) + _body(arm_pose) + _face_and_bangs(rng)
    if flip:
        for p in parts:
            p["poly"] = p["poly"] * [-1, 1]
            cx, cy, rx, ry = p["ell"]
            p["ell"] = (-cx, cy, rx, ry)
    return parts


def to_canvas(parts, cx, cy, scale, tilt):
    c, s = math.cos(tilt), math.sin(tilt)
    rot = np.array([[c, -s], [s, c]])
    for p in parts:
        p["poly"] = p["poly"] @ rot.T * scale + [cx, cy]
        ex, ey, rx, ry = p["ell"]
        ex, ey = np.array([ex, ey]) @ rot.T * scale + [cx, cy]
        p["ell"] = (ex, ey, rx * scale, ry * scale)
    return parts


def _palette(rng, hue, harmony: float):
    """Colours of hair, clothes, eyes, skin. harmony 1: an analogous/complementary/triadic
    scheme with consistent saturation and value; 0: clashing random hues, saturations and
    values."""
    d = (1.0 - harmony)
    scheme = [0.08, -0.08, 0.5, 0.33, -0.33][rng.integers(5)]
    s0, v0 = rng.uniform(0.4, 0.7), rng.uniform(0.7, 0.92)

    def col(h, s, v):
        return hsv(h + d * rng.uniform(-0.5, 0.5), s + d * rng.uniform(-0.45, 0.35), v + d * rng.uniform(-0.5, 0.1))

    skin = hsv(0.06 + rng.uniform(-0.01, 0.01) + d * rng.uniform(-0.12, 0.12), 0.22 + d * rng.uniform(-0.1, 0.35),
               0.98 - d * rng.uniform(0, 0.25))
    return {
        "hair": col(hue, s0, v0 * rng.uniform(0.75, 1.0)),
        "cloth": col(hue + scheme, s0, v0),
        "cloth2": col(hue + scheme * rng.choice([0.0, 2.0]), s0 * 0.8, min(1.0, v0 * 1.1)),
        "eye": col(hue + rng.choice([0.0, scheme]), min(1.0, s0 + 0.2), v0 * 0.8),
        "skin": skin,
    }


def _eyes(draw, R, colors, detail: float, line_color, cx, cy, scale, tilt):
    """Eyes and mouth, in canvas coordinates; detail adds an iris ring, extra highlights
    and lashes (1-2 detail pixels wide: only visible at high resolution)."""
    c, s = math.cos(tilt), math.sin(tilt)
    u = R / 256.0

    def tc(x, y):
        return (cx + (x * c - y * s) * scale) * R, (cy + (x * s + y * c) * scale) * R

    er_x, er_y = 0.036 * scale * R, 0.05 * scale * R
    eye = colors["eye"]
    for sx in (-1, 1):
        ex, ey = tc(sx * 0.068, -0.195)
        draw.ellipse([ex - er_x, ey - er_y, ex + er_x, ey + er_y], fill=u8(eye))
        draw.ellipse([ex - er_x * 0.5, ey - er_y * 0.35, ex + er_x * 0.5, ey + er_y * 0.55], fill=u8(darker(eye, 0.3)))
        hx, hy = ex - er_x * 0.3, ey - er_y * 0.4
        hr = er_x * 0.28
        draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=(255, 255, 255))
        # upper lid
        draw.line([ex - er_x * 1.2, ey - er_y * 0.9, ex, ey - er_y * 1.15, ex + er_x * 1.2, ey - er_y * 0.9],
                  fill=line_color, width=max(1, int(round(2.5 * u))))
        if detail > 0.25:  # iris ring
            w = max(1, int(round(u)))
            draw.ellipse([ex - er_x * 0.85, ey - er_y * 0.85, ex + er_x * 0.85, ey + er_y * 0.85],
                         outline=u8(np.minimum(eye * 1.4, 1)), width=w)
        if detail > 0.45:  # second highlight
            hr2 = max(1.0, 1.5 * u)
            hx2, hy2 = ex + er_x * 0.35, ey + er_y * 0.45
            draw.ellipse([hx2 - hr2, hy2 - hr2, hx2 + hr2, hy2 + hr2], fill=(255, 255, 255))
        if detail > 0.6:  # lashes
            for k in range(3):
                x0 = ex + sx * er_x * (0.6 + 0.3 * k)
                y0 = ey - er_y * (1.0 - 0.1 * k)
                draw.line([x0, y0, x0 + sx * 3 * u, y0 - 3 * u], fill=line_color, width=max(1, int(round(u))))
    mx, my = tc(0.0, -0.105)
    draw.line([mx - 0.02 * scale * R, my, mx + 0.02 * scale * R, my], fill=u8(darker(colors["skin"], 0.5)),
              width=max(1, int(round(1.5 * u))))


def _detail_marks(draw, rng, R, parts, colors, detail: float):
    """Hair strands and small accessories: the high-resolution-only attribute."""
    u = R / 256.0
    bangs = next(p for p in parts if p["name"] == "bangs")
    poly = bangs["poly"]
    n_strands = int(round(detail * 14))
    hair_line = u8(darker(colors["hair"], 0.55))
    top = poly[:24]
    fringe = poly[24:]
    for k in range(n_strands):
        a = top[int(rng.integers(3, 21))]
        b = fringe[int(rng.integers(0, len(fringe)))]
        m = (a + b) / 2 + rng.normal(0, 0.006, 2)
        draw.line(px([a, m, b * 0.9 + a * 0.1], R), fill=hair_line, width=max(1, int(round(u))))
    torso = next(p for p in parts if p["name"] == "torso")["poly"]
    n_acc = int(round(detail * 4))
    for k in range(n_acc):
        if k < 3:  # buttons down the front
            y0 = (torso[0] + torso[1]) / 2
            y1 = (torso[4] + torso[7]) / 2
            pnt = y0 + (y1 - y0) * (0.3 + 0.22 * k)
            r = 2.2 * u
            draw.ellipse([pnt[0] * R - r, pnt[1] * R - r, pnt[0] * R + r, pnt[1] * R + r],
                         fill=u8(colors["cloth2"]), outline=hair_line)
        else:  # a small hair clip
            a = top[int(rng.integers(4, 20))]
            r = 3 * u
            draw.rectangle([a[0] * R - r, a[1] * R - r / 2, a[0] * R + r, a[1] * R + r / 2], fill=u8(colors["cloth2"]))


def _pose(rng, row: dict) -> tuple[str, bool, bool, float]:
    """Nuisance choices of a figure: hair style, animal ears, mirror flip, arm pose."""
    style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    ears = bool(rng.random() < 0.3)
    flip = bool(rng.random() < 0.5)
    arm_pose = float(rng.uniform(-0.25, 0.9))
    row.update(hair_style=style, ears=ears, flip=flip, arm_pose=arm_pose)
    return style, ears, flip, arm_pose


# --------------------------------------------------------------------------------------
# Flat and shaded illustrations (brackets 4-10)


def _placement(rng, composition: float):
    """Where the figure goes: well placed = centred, figure ~0.85 of the frame, upright;
    bad composition moves it off-centre, makes it tiny or cropped, and tilts it."""
    bad = 1.0 - composition
    ang = rng.uniform(0, 2 * math.pi)
    off = bad * 0.3 * rng.uniform(0.5, 1.0)
    nj = 0.03 * scores.NUISANCE_STRENGTH
    cx = 0.5 + off * math.cos(ang) + rng.normal(0, nj)
    cy = 0.52 + off * math.sin(ang) + rng.normal(0, nj)
    size_bad = rng.choice([0.5, 1.55]) if rng.random() < 0.7 else 1.0
    scale = 0.85 * (1 + (size_bad - 1) * bad) * (1 + rng.normal(0, 0.05 * scores.NUISANCE_STRENGTH))
    tilt = bad * rng.uniform(-0.45, 0.45) + rng.normal(0, 0.03 * scores.NUISANCE_STRENGTH)
    return cx, cy, scale, tilt


def _lighting(rng, shaded: bool, shading: float, letterbox: bool):
    """(depth, tone steps, highlight, variant name) of the fill."""
    if shaded:
        s = shading
        depth = 0.14 + 0.4 * s
        steps = 0 if s > 0.8 else 2 + int(s * 5)
        highlight = max(0.0, (s - 0.45) / 0.55)
        return depth, steps, highlight, "shaded"
    cel = rng.random() < 0.25
    depth = rng.uniform(0.04, 0.1) if cel else 0.0
    return depth, 2, 0.0, ("cel" if cel else "flat") + ("_letterbox" if letterbox else "")


def render_character(rng, tex_rng, R, attrs, row, shaded: bool):
    hue = float(rng.random())
    row["hue"] = hue
    style, ears, flip, arm_pose = _pose(rng, row)
    v = {k: shown(rng, attrs[k]) for k in ("palette", "line_clean", "composition", "detail")}
    v["shading"] = shown(rng, attrs["shading"]) if shaded else 0.0

    base, row["background"] = background(rng, tex_rng, R, hue)
    letterbox = (not shaded) and rng.random() < 0.3
    cx, cy, scale, tilt = _placement(rng, v["composition"])
    row.update(center_x=cx, center_y=cy, scale=scale, tilt=tilt)

    parts = to_canvas(character_parts(rng, flip, style, ears, arm_pose), cx, cy, scale, tilt)
    colors = _palette(rng, hue, v["palette"])
    la = rng.uniform(math.pi * 1.05, math.pi * 1.95)  # light from above, any side
    row["light_angle"] = la
    light = np.array([math.cos(la) * 0.8, math.sin(la) * 0.8, 0.6])
    light /= np.linalg.norm(light)
    depth, steps, highlight, row["variant"] = _lighting(rng, shaded, v["shading"], letterbox)
    u = 1.0 / 256.0
    pattern = (v["detail"] * 0.25, max(1, int(round(2 * R / 256))), int(rng.integers(3))) if v["detail"] > 0.3 else None
    lc_mode = rng.integers(3)
    lw = rng.uniform(1.2, 2.2) * u
    line_colors = [(darker(colors[p["key"]], 0.35) if lc_mode == 0 else np.array([0.12, 0.09, 0.11])
                    if lc_mode == 1 else darker(colors[p["key"]], 0.2)) for p in parts]
    parts[[p["name"] for p in parts].index("neck")]["outline"] = False
    img = shade_parts(R, base, parts, colors, depth, steps, light, highlight, pattern,
                      outline=(rng, line_colors, lw, v["line_clean"]))
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    line_color = (40, 28, 36)
    _eyes(draw, R, colors, v["detail"], line_color, cx, cy, scale, tilt)
    _detail_marks(draw, rng, R, parts, colors, v["detail"])
    # stray marks for messy lines
    for _ in range(int(round((1 - v["line_clean"]) ** 2 * 8))):
        a = np.array([cx, cy]) + rng.normal(0, 0.2 * scale, 2)
        b = a + rng.normal(0, 0.04, 2)
        draw.line(px([a, b], R), fill=line_color, width=max(1, int(round(lw * R))))
    if letterbox:
        bh = int(R * 0.12)
        draw.rectangle([0, 0, R, bh], fill=(0, 0, 0))
        draw.rectangle([0, R - bh, R, R], fill=(0, 0, 0))
    return pil


# --------------------------------------------------------------------------------------
# Sketches (brackets 2-3)


def _oekaki(rng, img, R, parts, hue):
    """Rough, misregistered flat colour blobs under the lines."""
    colors = {"hair": hsv(hue, 0.5, 0.85), "cloth": hsv(hue + 0.4, 0.45, 0.9),
              "cloth2": hsv(hue + 0.2, 0.4, 0.9), "skin": hsv(0.07, 0.2, 0.98), "eye": hsv(hue, 0.6, 0.6)}
    im = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    off = rng.normal(0, 0.012, 2)
    for p in parts:
        if rng.random() < 0.8:
            d.polygon(px(p["poly"] + off, R), fill=u8(colors[p["key"]]))
    return np.asarray(im, np.float32) / 255.0


def _ink_coverage(rng, R, parts, smooth, cont, weight, base_w):
    """Strokes go into an ink-coverage mask (0..1, (R, R, 1)); each part first erases what
    it hides (the fill), so lines behind the face or the arms do not show through."""
    cover = Image.new("L", (R, R), 0)
    dc = ImageDraw.Draw(cover)
    for p in parts:
        if p["name"] != "neck":
            dc.polygon(px(p["poly"], R), fill=0)
        pts = np.concatenate([p["poly"], p["poly"][:1]])
        # strokes: pieces of the contour, each jittered on its own
        n = len(pts)
        k = max(3, n // int(rng.integers(2, 5)))
        for s in range(0, n - 1, k):
            seg = pts[s:min(n, s + k + 1 + int(rng.integers(0, 2)))]
            if len(seg) < 2:
                continue
            if rng.random() < (1 - cont) * 0.45:
                continue  # broken stroke
            amp = (1 - smooth) * 0.014 + 0.0008
            for rep in range(1 + int(rng.random() < (1 - smooth) * 0.8)):  # hairy doubled strokes
                j = seg + rng.normal(0, amp * 0.45, seg.shape) + rng.normal(0, amp, 2)
                w = base_w * max(0.3, 1 + (1 - weight) * rng.normal(0, 0.7))
                pressure = min(1.0, max(0.3, 1 + (1 - weight) * rng.normal(0, 0.35)))
                dc.line(px(j, R), fill=int(255 * pressure), width=max(1, int(round(w * R))))
    return np.asarray(cover, np.float32)[..., None] / 255.0


def render_sketch(rng, tex_rng, R, attrs, row):
    smooth, cont, weight = (shown(rng, attrs[k]) for k in ("line_smooth", "line_continuity", "line_weight"))
    style, ears, flip, arm_pose = _pose(rng, row)
    row["hue"] = float(rng.random())
    cx = 0.5 + rng.normal(0, 0.05 * scores.NUISANCE_STRENGTH)
    cy = 0.52 + rng.normal(0, 0.04 * scores.NUISANCE_STRENGTH)
    scale = 0.85 * (1 + rng.normal(0, 0.08 * scores.NUISANCE_STRENGTH))
    tilt = rng.normal(0, 0.06 * scores.NUISANCE_STRENGTH)
    row.update(center_x=cx, center_y=cy, scale=scale, tilt=tilt)
    parts = to_canvas(character_parts(rng, flip, style, ears, arm_pose), cx, cy, scale, tilt)

    paper = hsv(rng.uniform(0.08, 0.16), rng.uniform(0.0, 0.12), rng.uniform(0.9, 1.0))
    img = np.empty((R, R, 3), np.float32)
    img[:] = paper
    grain = tex_rng.standard_normal((R, R)).astype(np.float32) * 0.03 * rng.random()
    img += grain[..., None]
    ink_kind = int(rng.integers(3))
    ink = [hsv(0, 0, rng.uniform(0.15, 0.45)), hsv(0.6, 0.6, 0.6), hsv(0, 0, 0.08)][ink_kind]
    colored = rng.random() < 0.3
    row["variant"] = ["pencil", "bluepencil", "ink"][ink_kind] + ("_oekaki" if colored else "")
    row["background"] = "paper"
    if colored:
        img = _oekaki(rng, img, R, parts, row["hue"])
    pil = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    u = 1.0 / 256.0
    base_w = rng.uniform(1.5, 3.0) * u
    # construction lines: faint guides, more in rough sketches
    q = (smooth + cont + weight) / 3
    faint = u8(paper * 0.75 + ink * 0.25)
    for _ in range(int(round((1 - q) * 5))):
        c = np.array([cx, cy]) + rng.normal(0, 0.15 * scale, 2)
        draw.ellipse([(c[0] - 0.12 * scale) * R, (c[1] - 0.12 * scale) * R, (c[0] + 0.12 * scale) * R,
                      (c[1] + 0.12 * scale) * R], outline=faint, width=max(1, int(round(u * R))))
    m = _ink_coverage(rng, R, parts, smooth, cont, weight, base_w)
    arr = np.asarray(pil, np.float32)
    pil = Image.fromarray((arr * (1 - m) + (ink * 255) * m + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    # face
    _eyes(draw, R, {"eye": ink * 0.8, "skin": paper}, 0.0, u8(ink), cx, cy, scale, tilt)
    return pil
