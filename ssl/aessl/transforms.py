"""The three views: eval (timm, from the model's data config), weak and strong.

Weak = timm's training crop + flip; strong = the same crop + flip followed by USB's
RandAugment (the FixMatch reference, cutout included). USB's posterize clamps to >= 1 bit;
timm 1.0.31's RandAugment can ask Pillow 13 for 0 bits and crash mid-training, which is
why the strong view is USB's and not timm's.
"""

from __future__ import annotations

from timm.data import create_transform
from torchvision import transforms as T


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
    from semilearn.datasets.augmentation import RandAugment

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
    rand_augment = RandAugment(
        augment_cfg["strong_n"], augment_cfg["strong_m"], exclude_color_aug=augment_cfg["strong_exclude_color"]
    )
    weak = T.Compose([primary, final])
    strong = T.Compose([primary, rand_augment, final])
    return weak, strong
