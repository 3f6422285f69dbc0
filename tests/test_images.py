"""Image decoding over odd modes and files, and the strong view over many seeds."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from aessl.images import MAX_IMAGE_PIXELS, UnreadableImage, load_image


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.fixture
def odd_images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    files = {
        "rgba": _save(rgb.convert("RGBA"), tmp_path / "a.png"),
        "p": _save(rgb.convert("P"), tmp_path / "p.png"),
        "la": _save(rgb.convert("LA"), tmp_path / "la.png"),
        "l": _save(rgb.convert("L"), tmp_path / "l.jpg"),
        "cmyk": _save(rgb.convert("CMYK"), tmp_path / "c.jpg"),
        "i16": _save(Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)), tmp_path / "i16.png"),
        "webp": _save(rgb, tmp_path / "w.webp"),
        "bmp": _save(rgb, tmp_path / "b.bmp"),
    }
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    files["gif"] = tmp_path / "anim.gif"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb.save(tmp_path / "rot.jpg", exif=exif)
    files["exif"] = tmp_path / "rot.jpg"
    return files


def test_odd_modes_decode_to_rgb(odd_images):
    for name, path in odd_images.items():
        img = load_image(path)
        assert img.mode == "RGB", name
    assert load_image(odd_images["exif"]).size == (20, 30)  # EXIF orientation applied
    r, g, _ = load_image(odd_images["gif"]).getpixel((0, 0))
    assert r > 200 and g < 50  # the first frame (red), not the second (green)
    # 16-bit greyscale is scaled, not clipped to white
    assert np.asarray(load_image(odd_images["i16"])).mean() < 200
    # transparent pixels become white, not black
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buf = io.BytesIO()
    clear.save(buf, format="PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_bad_files_raise_with_reason(tmp_path):
    good = tmp_path / "g.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good)
    cases = {
        "zero.png": b"",
        "text.png": b"not an image at all",
        "trunc.png": good.read_bytes()[:60],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnreadableImage) as exc:
            load_image(tmp_path / name)
        assert exc.value.path.endswith(name) and exc.value.reason
    with pytest.raises(UnreadableImage, match="file not found|cannot read"):
        load_image(tmp_path / "missing.png")


def test_decompression_bomb_is_refused_not_decoded(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 100
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")
    with pytest.raises(UnreadableImage, match="decompression-bomb"):
        load_image(tmp_path / "bomb.png")


def test_strong_and_weak_views_survive_many_seeds_and_modes(odd_images):
    """USB RandAugment over many seeds and every image mode: no crash (Pillow 13 posterize)."""
    from aessl.data import seed_everything_for
    from aessl.transforms import eval_transform, train_transforms

    info = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 1.0}
    weak, strong = train_transforms(info, {"weak_scale_min": 0.8, "strong_n": 3, "strong_m": 10,
                                           "strong_exclude_color": False})
    ev = eval_transform(info)
    images = [load_image(p) for p in odd_images.values()]
    for seed in range(150):
        seed_everything_for(seed)
        img = images[seed % len(images)]
        for tf in (weak, strong, ev):
            x = tf(img)
            assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


def test_views_are_deterministic_per_draw(odd_images):
    from aessl.data import seed_everything_for
    from aessl.transforms import train_transforms

    info = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 1.0}
    _, strong = train_transforms(info, {"weak_scale_min": 0.8, "strong_n": 3, "strong_m": 5,
                                        "strong_exclude_color": False})
    img = load_image(odd_images["webp"])
    seed_everything_for(1, 2, 3)
    a = strong(img)
    seed_everything_for(1, 2, 3)
    assert torch.equal(a, strong(img))


def test_view_seeding_leaves_gpu_generators_alone(monkeypatch):
    """A sample's augmentation seed reaches only the CPU generators the views draw from: not
    the CUDA ones (dropout on the GPU with data.num_workers=0 would follow the data seeds),
    and not torch.cuda's lazy seeding, which costs a traceback per call before CUDA starts."""
    from aessl.data import augmentation_rng, seed_everything_for

    def forbidden(*_a, **_k):
        raise AssertionError("augmentation seeding touched the CUDA generators")

    torch.manual_seed(123)  # the caller's own stream, which augmentation_rng puts back
    before = torch.rand(2)
    torch.manual_seed(123)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    seed_everything_for(4, 5)
    a = torch.rand(3)
    with augmentation_rng(4, 5):
        assert torch.equal(torch.rand(3), a)  # the same key gives the same views
    monkeypatch.undo()
    torch.manual_seed(123)
    with augmentation_rng(4, 5):
        torch.rand(3)
    assert torch.equal(torch.rand(2), before)


def test_16_bit_images_scale_by_their_depth_not_their_values(tmp_path):
    """A dark 16-bit PNG (every value <= 255) is dark, not taken for 8-bit and 257x too bright."""
    for name, value, lo, hi in (("dark", 200, 0, 5), ("mid", 32768, 120, 135), ("bright", 65000, 250, 256)):
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(tmp_path / f"{name}.png")
        assert Image.open(tmp_path / f"{name}.png").mode.startswith("I")  # what Pillow gives a 16-bit PNG
        mean = np.asarray(load_image(tmp_path / f"{name}.png")).mean()
        assert lo <= mean < hi, (name, mean)
    # a 16-bit PNG's transparent grey value (tRNS) is composited on white like any other alpha
    arr = np.full((4, 4), 100, dtype=np.uint16)
    arr[0, 0] = 7
    Image.fromarray(arr).save(tmp_path / "key.png", transparency=7)
    img = np.asarray(load_image(tmp_path / "key.png"))
    assert img[0, 0].tolist() == [255, 255, 255] and img[1, 1].max() < 5


def test_transparent_colour_key_becomes_white(tmp_path):
    for mode, key in (("L", 0), ("RGB", (0, 0, 0))):
        img = Image.new(mode, (4, 4), key)
        img.putpixel((1, 1), 200 if mode == "L" else (200, 10, 10))
        img.save(tmp_path / f"{mode}.png", transparency=key)
        out = load_image(tmp_path / f"{mode}.png")
        assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1))[0] == 200


def test_corrupt_exif_keeps_the_image_and_its_orientation(tmp_path):
    """An EXIF block with a string where a number belongs made ImageOps.exif_transpose raise
    TypeError (it rewrites the block); the pixels are fine and the orientation still applies."""
    import struct

    entries = struct.pack("<HHI4s", 0x0112, 3, 1, struct.pack("<HH", 6, 0))  # orientation 6
    entries += struct.pack("<HHI4s", 0x011A, 2, 4, b"abc\0")  # XResolution as text
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + struct.pack("<I", 0)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "odd.jpg", exif=exif)
    img = load_image(tmp_path / "odd.jpg")
    assert img.size == (20, 30) and img.getpixel((5, 5))[0] > 150


def test_any_decoder_failure_is_an_unreadable_image(tmp_path, monkeypatch):
    """Pillow's plugins raise more than OSError/ValueError on crafted files; a pool must not crash."""
    import aessl.images as images

    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")

    def broken(img):
        raise IndexError("tile index out of range")

    monkeypatch.setattr(images, "_to_rgb", broken)
    with pytest.raises(UnreadableImage, match="IndexError: tile index"):
        load_image(tmp_path / "x.png")


def test_strong_view_defaults_draw_what_usb_draws_and_settings_narrow_it():
    """augment.strong_*: the defaults reproduce USB's RandAugment draw for draw (earlier runs
    reproduce); strong_ops, strong_scale and strong_cutout change what the view does."""
    import random

    from semilearn.datasets.augmentation import RandAugment

    from aessl.config import ConfigError, load_config
    from aessl.transforms import StrongAugment, strong_op_names

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))

    def draw(aug, seed):
        random.seed(seed)
        np.random.seed(seed)
        return np.asarray(aug(img))

    for exclude in (False, True):
        usb = RandAugment(3, 5, exclude_color_aug=exclude)
        ours = StrongAugment(3, strong_op_names({"strong_exclude_color": exclude}))
        assert all(np.array_equal(draw(usb, s), draw(ours, s)) for s in range(60))
    # identity only, no cutout: the image itself
    plain = StrongAugment(3, ["Identity"], cutout=0.0)
    assert all(np.array_equal(draw(plain, s), np.asarray(img)) for s in range(10))
    # brightness at a tenth of its range: 0.86-0.95 of the image's (USB's mildest is 0.95); USB's goes to 0.05
    mild, full = StrongAugment(1, ["Brightness"], scale=0.1, cutout=0.0), StrongAugment(1, ["Brightness"], cutout=0.0)
    base = np.asarray(img).astype(float).mean()
    assert all(0.84 * base < draw(mild, s).mean() < 0.96 * base for s in range(20))
    assert min(draw(full, s).mean() for s in range(20)) < 0.5 * base
    cfg = load_config(None, ["augment.strong_ops=[Rotate,TranslateX]", "augment.strong_scale=0.3"])
    assert strong_op_names(cfg.augment) == ["Rotate", "TranslateX"]
    with pytest.raises(ConfigError, match=r"augment.strong_ops.*unknown: Hue"):
        load_config(None, ["augment.strong_ops=[Rotate,Hue]"])
    with pytest.raises(ConfigError, match="augment.strong_cutout"):
        load_config(None, ["augment.strong_cutout=0.7"])
