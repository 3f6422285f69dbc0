"""YAML configs with dotted `key=value` overrides (OmegaConf), strict about unknown keys.

`DEFAULTS` is the schema: every key a config may set, with its default. A YAML file and the
command line may only set keys that exist here (an unknown key is an error naming it),
except under `algorithm.args`, which holds the chosen algorithm's own arguments and is
checked against that algorithm's argument list when the algorithm is built.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

DEFAULTS = {
    "seed": 0,
    "output_dir": "runs/demo",
    "resume": False,  # true: continue from the newest whole checkpoint in output_dir
    "data": {
        "labeled": None,  # folder of <score>/ subfolders or a manifest; null = synthetic demo set
        "unlabeled": None,  # folder, manifest, saved dataset, or hub:<name>; null = none / demo pool
        "test": None,  # scored test set; null = carve `test_fraction` out of the labeled set
        "test_fraction": 0.1,
        "streaming": False,  # stream the unlabeled pool (huge pools, Hub datasets)
        "image_size": 64,
        "crop_pct": 1.0,  # eval view keeps the whole image: composition is part of aesthetics
        "num_workers": 2,
        "max_unlabeled": None,  # use at most this many pool images (quick experiments)
        "synthetic": {  # the built-in demo data, generated once into cache_dir
            "labeled": 3080,
            "unlabeled": 20000,
            "test": 1000,
            "size": 64,
            "seed": 0,
            "cache_dir": ".cache/synth",
        },
    },
    "augment": {
        "weak_scale_min": 0.8,  # random-resized-crop lower bound for the weak view
        "strong_n": 3,  # USB RandAugment: number of ops
        "strong_m": 5,  # USB RandAugment: magnitude (cutout included, as in FixMatch)
        "strong_exclude_color": False,
    },
    "model": {
        "name": "test_convnext3",  # any timm name or hf-hub:<id>
        "pretrained": False,  # false, true (timm/Hub weights), or a path to a local .safetensors/.pth
        "drop_rate": 0.0,
        "kwargs": {},  # extra timm.create_model keyword arguments
        # image: train the whole network on images. embedding: freeze the backbone, cache its
        # features once (embed.*) and train only a head on them (fast iteration).
        "mode": "image",
        "head": "residual_mlp",  # embedding mode: linear | mlp | residual_mlp (the model card's)
        "head_hidden": 1024,
        "head_dropout": 0.1,
    },
    "embed": {  # embedding mode's feature cache (ssl/embed.py fills it; train.py fills what is missing)
        "views": 2,  # K weak and K strong augmented views cached per image, besides the eval view
        "seed": 0,  # seeds the views and a random-init backbone; not the run's seed, so runs share a cache
        "batch_size": 64,  # images per forward pass (each brings 1 + 2K views)
        "shard_size": 2048,  # images per cache shard: the unit a killed pass loses
        "dtype": "float16",  # float16 | float32: how features are stored
        "cache_dir": ".cache/embed",
    },
    "algorithm": {
        "name": "fixmatch",  # supervised | fixmatch | flexmatch | freematch | softmatch | ... | ordinal
        "lambda_u": 1.0,  # weight of the unlabeled loss
        "args": {},  # algorithm-specific arguments (T, p_cutoff, ...), USB names
    },
    "train": {
        "steps": 300,
        "batch_size": 32,  # labeled images per step per process
        "uratio": 2,  # unlabeled images per labeled image
        "optimizer": "adamw",  # adamw | sgd
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "warmup_steps": 20,
        "grad_accum": 1,
        "clip_grad": 0.0,
        "mixed_precision": "no",  # no | fp16 | bf16
        "ema_decay": 0.99,
        "eval_every": 100,
        "save_every": 100,
        "keep_checkpoints": 2,
        "log_every": 10,
        "tracker": "tensorboard",  # tensorboard | none | any Accelerate tracker name
    },
    "eval": {
        "batch_size": 128,
        "top_k_fraction": 0.1,
    },
}


class ConfigError(ValueError):
    pass


def _open_keys(cfg) -> None:
    """Mark the free-form sections as open so they accept any key."""
    OmegaConf.set_struct(cfg, True)
    for path in ("algorithm.args", "model.kwargs"):
        node = OmegaConf.select(cfg, path)
        if node is not None:
            OmegaConf.set_struct(node, False)


def _parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (example: train.steps=200)")
    key, value = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    return key, yaml.safe_load(value) if value.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> "OmegaConf":
    """DEFAULTS <- YAML file <- overrides. Unknown keys raise ConfigError naming them."""
    cfg = OmegaConf.create(DEFAULTS)
    _open_keys(cfg)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
        _merge(cfg, data, str(path))
    for text in overrides:
        key, value = _parse_override(text)
        try:
            node_parent, _, leaf = key.rpartition(".")
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__" and not _is_open(cfg, node_parent):
                raise ConfigError(f"unknown config key {key!r} (from override {text!r})")
            OmegaConf.update(cfg, key, value, merge=True)
        except (ConfigAttributeError, ConfigKeyError) as exc:
            raise ConfigError(f"unknown config key {key!r} (from override {text!r})") from exc
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad value for {key!r}: {exc}") from exc
    check_choices(cfg)
    return cfg


CHOICES = {
    "model.mode": ("image", "embedding"),
    "model.head": ("linear", "mlp", "residual_mlp"),
    "embed.dtype": ("float16", "float32"),
    "train.optimizer": ("adamw", "sgd"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
}


def check_choices(cfg) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key in ("embed.views", "embed.batch_size", "embed.shard_size", "model.head_hidden"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a whole number >= 1")


def _is_open(cfg, parent: str) -> bool:
    return parent in ("algorithm.args", "model.kwargs") or parent.startswith(("algorithm.args.", "model.kwargs."))


def _merge(cfg, data: dict, origin: str, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if _is_open(cfg, prefix.rstrip(".")):
            OmegaConf.update(cfg, dotted, value, merge=True)
            continue
        current = OmegaConf.select(cfg, dotted, default="__missing__")
        if current == "__missing__":
            raise ConfigError(f"{origin}: unknown config key {dotted!r}")
        if isinstance(value, dict) and (OmegaConf.is_dict(current) or current is None):
            if OmegaConf.is_dict(current):
                _merge(cfg, value, origin, dotted + ".")
                continue
        try:
            OmegaConf.update(cfg, dotted, value, merge=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{origin}: bad value for {dotted!r}: {exc}") from exc


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
