"""The three views: eval (timm, from the model's data config), weak and strong.

Weak = timm's training crop + flip; strong = the same crop + flip followed by USB's
RandAugment (the FixMatch reference, cutout included). USB's posterize clamps to >= 1 bit;
timm 1.0.31's RandAugment can ask Pillow 13 for 0 bits and crash mid-training, which is
why the strong view's operations are USB's and not timm's.

`StrongAugment` is USB's RandAugment policy with its three fixed choices made settings:
which operations (`augment.strong_ops`; USB: all 14, or 9 without the colour ones with
`strong_exclude_color`), how far each may go (`augment.strong_scale`: the share of each
operation's range, measured from its mildest end: 1 = USB's ranges) and the largest cutout
(`augment.strong_cutout`, a share of the side; USB: 0.5). Aesthetic scores are not
invariant to everything RandAugment does: USB's brightness, colour, contrast and sharpness
only ever lower theirs (to 5%), solarize inverts tones, cutout can hide half the subject,
translation re-frames it; the consistency loss then teaches the model that those changes
do not change the score. With the defaults it draws exactly what USB's RandAugment draws
(the same random calls in the same order), so earlier runs reproduce. USB's RandAugment
takes a magnitude `m` and never reads it: `augment.strong_m` is therefore not read either
(config.py warns when it is set); `strong_scale` is the magnitude that works.
"""

from __future__ import annotations

import random

from timm.data import create_transform
from torchvision import transforms as T

# USB's RandAugment operations (semilearn.datasets.augmentation.randaugment), each with
# USB's range and its mildest value: strong_scale shrinks the range toward it. USB's
# brightness/colour/contrast/sharpness ranges (0.05-0.95) stop short of identity (1.0): the
# mildest value is their top. The order is USB's (its random draws index into it).
OPS = {  # name: (low, high, mildest)
    "AutoContrast": (0, 1, None), "Brightness": (0.05, 0.95, 0.95), "Color": (0.05, 0.95, 0.95),
    "Contrast": (0.05, 0.95, 0.95), "Equalize": (0, 1, None), "Identity": (0, 1, None),
    "Posterize": (4, 8, 8), "Rotate": (-30, 30, 0), "Sharpness": (0.05, 0.95, 0.95),
    "ShearX": (-0.3, 0.3, 0), "ShearY": (-0.3, 0.3, 0), "Solarize": (0, 256, 256),
    "TranslateX": (-0.3, 0.3, 0), "TranslateY": (-0.3, 0.3, 0),
}
COLOR_OPS = ("AutoContrast", "Color", "Contrast", "Posterize", "Solarize")  # USB's exclude_color_aug list


def eval_transform(info: dict):
    return create_transform(
        input_size=(3, info["image_size"], info["image_size"]),
        is_training=False,
        mean=tuple(info["mean"]),
        std=tuple(info["std"]),
        interpolation=info.get("interpolation", "bicubic"),
        crop_pct=info.get("crop_pct", 1.0),
    )


def train_transforms(info: dict, augment_cfg) -> tuple:
    """(weak, strong) transforms: PIL RGB image -> normalised tensor."""
    primary, _secondary, final = create_transform(
        input_size=(3, info["image_size"], info["image_size"]),
        is_training=True,
        scale=(augment_cfg["weak_scale_min"], 1.0),
        ratio=(3 / 4, 4 / 3),
        hflip=0.5,
        vflip=0.0,
        color_jitter=None,
        auto_augment=None,
        re_prob=0.0,
        mean=tuple(info["mean"]),
        std=tuple(info["std"]),
        interpolation=info.get("interpolation", "bicubic"),
        separate=True,
    )
    rand_augment = StrongAugment(
        augment_cfg["strong_n"], ops=strong_op_names(augment_cfg),
        scale=augment_cfg.get("strong_scale", 1.0), cutout=augment_cfg.get("strong_cutout", 0.5),
    )
    weak = T.Compose([primary, final])
    strong = T.Compose([primary, rand_augment, final])
    return weak, strong


def strong_op_names(augment_cfg) -> list[str]:
    """The strong view's operations: augment.strong_ops, else USB's list (without the colour
    ones when strong_exclude_color), in USB's order."""
    chosen = augment_cfg.get("strong_ops")
    if chosen is not None:
        return [name for name in OPS if name in set(chosen)]
    skip = COLOR_OPS if augment_cfg["strong_exclude_color"] else ()
    return [name for name in OPS if name not in skip]


class StrongAugment:
    """n operations drawn with replacement from `ops`, each at a uniform magnitude over
    `scale` of its range from its mildest end, then a cutout square of side up to `cutout`
    x the image's (USB's RandAugment: scale 1, cutout 0.5, the same draws)."""

    def __init__(self, n: int, ops: list[str], scale: float = 1.0, cutout: float = 0.5):
        from semilearn.datasets.augmentation import randaugment as usb

        unknown = [name for name in ops if name not in OPS]
        if unknown or not ops:
            raise ValueError(f"augment.strong_ops: {unknown or ops} (known: {', '.join(OPS)})")
        self.n, self.scale, self.cutout = int(n), float(scale), float(cutout)
        self.ops = [(getattr(usb, name), *OPS[name]) for name in ops]
        self._cutout = usb.Cutout

    def __call__(self, img):
        for op, low, high, mildest in random.choices(self.ops, k=self.n):
            value = low + float(high - low) * random.random()
            if mildest is not None and self.scale != 1.0:
                value = mildest + (value - mildest) * self.scale
            img = op(img, value)
        size = random.random() * self.cutout
        return self._cutout(img, size) if size > 0 else img
