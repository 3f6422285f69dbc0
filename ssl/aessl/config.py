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
        # Seeds the held-out split alone: the split is a property of the data, so runs with
        # different `seed` are scored on the same test images.
        "split_seed": 0,
        # Overlap between the test set and the training data or the pool is detected at start
        # (by path and content) and recorded in run.json; a test set inside the training set
        # is refused unless this is true.
        "allow_test_overlap": False,
        "streaming": False,  # stream the unlabeled pool (huge pools, Hub datasets)
        "image_size": 64,
        "crop_pct": 1.0,  # eval view keeps the whole image: composition is part of aesthetics
        "num_workers": 2,
        "max_unlabeled": None,  # use at most this many pool images (quick experiments)
        # Slots for per-image algorithm state (FlexMatch) when a streamed pool has no known
        # length: images are placed by a hash of their name.
        "stream_index_size": 1048576,
        # Soft labelling from an export (ssl/aessl/pseudo.py): the labeled stream draws from the
        # labels plus the rows of an export folder written by ssl/export.py (or a list of them),
        # each with the export's bracket probabilities as its soft target. null = labels only.
        "pseudo_labels": None,
        "pseudo_weight": 1.0,  # loss weight of a pseudo row relative to a labeled one (0: labels only)
        "pseudo_band": None,  # [low, high] in score percent (the export's score_percent); null = all
        "pseudo_accepted_only": True,  # only rows the export's per-bracket thresholds accepted
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
        # what the last layer's outputs mean (aessl/targets.py, TARGETS): classification = 11
        # bracket logits (every algorithm); regression = one score 0-10 (algorithm.name=supervised)
        "target": "classification",
        "head": "residual_mlp",  # embedding mode: linear | mlp | residual_mlp (the model card's)
        "head_hidden": 1024,
        "head_dropout": 0.1,
    },
    "embed": {  # embedding mode's feature cache (ssl/embed.py fills it; train.py fills what is missing)
        "views": 2,  # K weak and K strong augmented views cached per image, besides the eval view
        # the strong side of each unlabeled pair: strong = a cached RandAugment view; weak =
        # another cached weak view (a frozen backbone's features of RandAugment views lose the
        # bracket: docs/embedding_ssl_diagnosis.md); strong_noise adds Gaussian noise of that
        # many feature stds to it
        "strong_view": "weak",
        "strong_noise": 0.0,
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
    "embed.strong_view": ("strong", "weak"),
    "train.optimizer": ("adamw", "sgd"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
}


# Allowed ranges of numeric keys: (low, high, low inclusive, high inclusive); None = open.
RANGES = {
    "data.test_fraction": (0.0, 1.0, False, False),
    "data.image_size": (8, None, True, True),
    "data.crop_pct": (0.0, 1.0, False, True),
    "data.num_workers": (0, None, True, True),
    "data.max_unlabeled": (1, None, True, True),
    "data.stream_index_size": (1, None, True, True),
    "data.pseudo_weight": (0.0, None, True, True),
    "augment.weak_scale_min": (0.0, 1.0, False, True),
    "augment.strong_n": (0, None, True, True),
    "augment.strong_m": (0, 10, True, True),
    "model.drop_rate": (0.0, 1.0, True, False),
    "model.head_dropout": (0.0, 1.0, True, False),
    "model.head_hidden": (1, None, True, True),
    "embed.views": (1, None, True, True),
    "embed.batch_size": (1, None, True, True),
    "embed.shard_size": (1, None, True, True),
    "embed.strong_noise": (0.0, None, True, True),
    "algorithm.lambda_u": (0.0, None, True, True),
    "train.steps": (1, None, True, True),
    "train.batch_size": (1, None, True, True),
    "train.uratio": (1, None, True, True),
    "train.lr": (0.0, None, False, True),
    "train.weight_decay": (0.0, None, True, True),
    "train.momentum": (0.0, 1.0, True, False),
    "train.warmup_steps": (0, None, True, True),
    "train.grad_accum": (1, None, True, True),
    "train.clip_grad": (0.0, None, True, True),
    "train.ema_decay": (0.0, 1.0, True, False),
    "train.eval_every": (1, None, True, True),
    "train.save_every": (1, None, True, True),
    "train.keep_checkpoints": (1, None, True, True),
    "train.log_every": (1, None, True, True),
    "eval.batch_size": (1, None, True, True),
    "eval.top_k_fraction": (0.0, 1.0, False, True),
}


def check_choices(cfg) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    check_types(cfg)
    for key, (low, high, low_in, high_in) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        too_low = low is not None and (value < low if low_in else value <= low)
        too_high = high is not None and (value > high if high_in else value >= high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>=' if low_in else '>'} {low}"
            hi = "" if high is None else f"{'<=' if high_in else '<'} {high}"
            raise ConfigError(f"{key}={value!r} is out of range: it must be {' and '.join(x for x in (lo, hi) if x)}")
    check_target(cfg)


def check_target(cfg) -> None:
    """A target other than classification trains its own supervised loss (aessl/targets.py):
    the SSL algorithms and soft labels are written for 11 class probabilities."""
    from .targets import TARGETS  # (torch: imported only here, once a config is read)

    target = OmegaConf.select(cfg, "model.target")
    if target not in TARGETS:
        raise ConfigError(f"model.target={target!r} is not one of {', '.join(TARGETS)}")
    if target == "classification":
        return
    if OmegaConf.select(cfg, "algorithm.name") != "supervised":
        raise ConfigError(f"model.target={target} trains with algorithm.name=supervised only (got "
                          f"{OmegaConf.select(cfg, 'algorithm.name')!r}): the semi-supervised algorithms' "
                          "losses compare 11 bracket probabilities")
    if OmegaConf.select(cfg, "data.pseudo_labels"):
        raise ConfigError(f"model.target={target} cannot train on data.pseudo_labels (soft targets are 11 bracket "
                          "probabilities); leave data.pseudo_labels=null")


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            if f"{prefix}{k}" not in ("algorithm.args", "model.kwargs"):
                yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _as_number(key: str, value, kind: type):
    """`value` as `kind` (int or float), or ConfigError. YAML reads `1e3` and `2e-3` as
    strings (YAML 1.1 wants a dot), so numeric strings are accepted; an int key takes a
    float only when it is whole (`train.steps=1e3` is 1000, `2.5` is an error)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a number, not true/false")
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be a number") from None
    if not isinstance(number, (int, float)) or number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if kind is int:
        if float(number) != int(number):
            raise ConfigError(f"{key}={value!r} must be a whole number")
        return int(number)
    return float(number)


def check_types(cfg) -> None:
    """Every key whose default is a number or a bool holds one of that type (coerced where
    that is unambiguous), so `int(...)`/`float(...)` later can neither fail nor mislead."""
    for key, default in _leaves(DEFAULTS):
        value = OmegaConf.select(cfg, key)
        if key == "model.pretrained":  # false, true or a weights file
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r} must be true or false")
        elif isinstance(default, (int, float)):
            coerced = _as_number(key, value, type(default))
            if coerced != value or type(coerced) is not type(value):
                OmegaConf.update(cfg, key, coerced)
        elif key == "data.max_unlabeled" and value is not None:
            OmegaConf.update(cfg, key, _as_number(key, value, int))
    _check_pseudo_keys(cfg)


def _check_pseudo_keys(cfg) -> None:
    """data.pseudo_labels: null, a folder, or a non-empty list of folders; data.pseudo_band:
    null or [low, high] percents with 0 <= low <= high <= 100."""
    folders = OmegaConf.select(cfg, "data.pseudo_labels")
    if folders is not None:
        items = list(folders) if OmegaConf.is_list(folders) or isinstance(folders, (list, tuple)) else [folders]
        if not items or not all(isinstance(f, str) and f.strip() for f in items):
            raise ConfigError(f"data.pseudo_labels={_plain(folders)!r} must be null, an export folder written by "
                              "ssl/export.py, or a list of them")
    band = OmegaConf.select(cfg, "data.pseudo_band")
    if band is not None:
        if not (OmegaConf.is_list(band) or isinstance(band, (list, tuple))) or len(band) != 2:
            raise ConfigError(f"data.pseudo_band={_plain(band)!r} must be null or [low, high] in score percent "
                              "(e.g. [50, 100])")
        low, high = (_as_number("data.pseudo_band", v, float) for v in band)
        if not 0.0 <= low <= high <= 100.0:
            raise ConfigError(f"data.pseudo_band={[low, high]!r} must satisfy 0 <= low <= high <= 100 (percents)")
        OmegaConf.update(cfg, "data.pseudo_band", [low, high], merge=False)


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


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
