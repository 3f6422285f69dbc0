"""aessl.grids: tiles from awkward files, and sheets of the right size."""

import numpy as np
from PIL import Image

from aessl import grids

BG = (24, 24, 24)


def _files(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    files = {
        "bad": tmp_path / "bad.png",
        "p": tmp_path / "p.png",
        "la": tmp_path / "la.png",
        "i16": tmp_path / "i16.png",
        "wide": tmp_path / "wide.png",
    }
    files["bad"].write_bytes(b"not an image at all")
    Image.fromarray(np.stack([ramp] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE).save(files["p"])
    Image.merge("LA", (Image.fromarray(ramp), Image.new("L", (64, 64), 0))).save(files["la"])  # transparent
    Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)).save(files["i16"])  # 16-bit white
    Image.new("RGB", (3000, 20), (255, 0, 0)).save(files["wide"])
    return files


def test_tiles_from_odd_and_unreadable_files(tmp_path):
    f = _files(tmp_path)
    assert Image.open(f["p"]).mode == "P" and Image.open(f["la"]).mode == "LA" and Image.open(f["i16"]).mode.startswith("I")
    tiles = {k: grids.tile(p, 96, BG, pad=2) for k, p in f.items()}
    for t in tiles.values():
        assert t.size == (96, 96) and t.mode == "RGB"
    px = {k: np.asarray(t) for k, t in tiles.items()}
    # unreadable: the background with red text on it, not an exception
    assert tuple(px["bad"][0, 0]) == BG and (px["bad"][..., 0] > 150).any()
    assert tuple(px["la"][48, 48]) == (255, 255, 255)  # transparency on white
    assert tuple(px["i16"][48, 48]) == (255, 255, 255)  # scaled by bit depth, not clipped
    # very wide: shrunk to the inner 92 px, centred, a thin band with background above and below
    red = np.flatnonzero((px["wide"][..., 0] > 200).any(1))
    assert tuple(px["wide"][0, 48]) == BG and 0 < len(red) <= 2 and abs(red.mean() - 47.5) <= 1
    assert (px["wide"][red[0], 2:94, 0] > 200).all() and tuple(px["wide"][red[0], 1]) == BG


def test_whole_factor_upscale_keeps_pixels_sharp(tmp_path):
    Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)).save(tmp_path / "two.png")  # 2 x 1
    px = np.asarray(grids.tile(tmp_path / "two.png", 10, (1, 2, 3), whole=True))
    assert set(np.unique(px[..., 0])) == {0, 1, 255}  # black, white and the background only
    assert (px[2:7, 0:5, 0] == 0).all() and (px[2:7, 5:10, 0] == 255).all() and tuple(px[0, 0]) == (1, 2, 3)


def test_sheet_size_empty_cells_margins_and_captions(tmp_path):
    f = _files(tmp_path)
    tiles = [grids.tile(p, 64, BG) for p in f.values()]
    assert grids.sheet(tiles, 2, 64).size == (128, 192)  # 5 tiles, 2 columns: 3 rows
    assert grids.sheet(tiles, 10, 64, rows=4).size == (640, 256)
    s = grids.sheet(tiles[:1] + [None], 2, (70, 90), (255, 255, 255), margin=(28, 5))
    assert s.size == (28 + 2 * 70, 5 + 90)
    arr = np.asarray(s)
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[5, 28]) == BG  # margin, then the first tile
    assert (arr[:, 28 + 70:] == 255).all()  # the None cell is left empty
    plain = np.asarray(grids.sheet(tiles[:1], 1, 64))
    captioned = np.asarray(grids.sheet(tiles[:1], 1, 64, captions=["1. 99.9%"]))
    assert (captioned[-20:, :40] != plain[-20:, :40]).any() and (captioned[:20] == plain[:20]).all()
