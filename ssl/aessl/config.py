"""YAML configs with dotted `key=value` overrides (OmegaConf), strict about unknown keys.

The dataclasses below are the schema: every key a config may set, its type, its default, and
(in field metadata) the choices or range it must keep to. A YAML file and the command line
may only set keys that exist there (an unknown key is an error naming it), except under
`algorithm.args`, which holds the chosen algorithm's own arguments and is checked against
that algorithm's argument list when the algorithm is built, and `model.kwargs`.

`load_config` merges defaults <- YAML file <- overrides in OmegaConf's struct mode, checks
the values (choices, types, ranges, the target), and returns `OmegaConf.structured(Config)`
holding them, so code reading a config gets the schema's types without casting.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Optional, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


def _one_of(*allowed: str, default: str):
    """A string key that must be one of `allowed` (OmegaConf has no Literal types)."""
    return field(default=default, metadata={"choices": allowed})


def _num(default, *, ge=None, gt=None, le=None, lt=None):
    """A number key with bounds; a bound left out is open."""
    low, high = (ge if gt is None else gt), (le if lt is None else lt)
    return field(default=default, metadata={"range": (low, high, gt is None, lt is None)})


@dataclass
class SyntheticConfig:  # the built-in demo data, generated once into cache_dir
    labeled: int = 3080
    unlabeled: int = 20000
    test: int = 1000
    size: int = 64
    seed: int = 0
    cache_dir: str = ".cache/synth"


@dataclass
class DataConfig:
    labeled: Optional[str] = None  # folder of <score>/ subfolders or a manifest; null = synthetic demo set
    unlabeled: Optional[str] = None  # folder, manifest, saved dataset, or hub:<name>; null = none / demo pool
    test: Optional[str] = None  # scored test set; null = carve `test_fraction` out of the labeled set
    test_fraction: float = _num(0.1, gt=0.0, lt=1.0)
    # Seeds the held-out split alone: the split is a property of the data, so runs with
    # different `seed` are scored on the same test images.
    split_seed: int = 0
    # Overlap between the test set and the training data or the pool is detected at start
    # (by path and content) and recorded in run.json; a test set inside the training set
    # is refused unless this is true.
    allow_test_overlap: bool = False
    streaming: bool = False  # stream the unlabeled pool (huge pools, Hub datasets)
    image_size: int = _num(64, ge=8)
    crop_pct: float = _num(1.0, gt=0.0, le=1.0)  # eval view keeps the whole image: composition is part of aesthetics
    num_workers: int = _num(2, ge=0)
    max_unlabeled: Optional[int] = _num(None, ge=1)  # use at most this many pool images (quick experiments)
    # Draw labeled images with weight (their bracket's count)^-balance_labeled: 0 = each once an
    # epoch (uniform), 1 = every bracket equally often, 0.5 = between (rare brackets 0-1, 8-10)
    balance_labeled: float = _num(0.0, ge=0.0, le=1.0)
    # Slots for per-image algorithm state (FlexMatch) when a streamed pool has no known
    # length: images are placed by a hash of their name.
    stream_index_size: int = _num(1048576, ge=1)
    # Soft labelling from an export (ssl/aessl/pseudo.py): the labeled stream draws from the
    # labels plus the rows of an export folder written by ssl/export.py (or a list of them),
    # each with the export's bracket probabilities as its soft target. null = labels only.
    # (null, a folder or a list of folders: checked in _check_pseudo_keys)
    pseudo_labels: Any = None
    pseudo_weight: float = _num(1.0, ge=0.0)  # loss weight of a pseudo row relative to a labeled one (0: labels only)
    # [low, high] in score percent (the export's score_percent); null = all (checked in _check_pseudo_keys)
    pseudo_band: Any = None
    pseudo_accepted_only: bool = True  # only rows the export's per-bracket thresholds accepted
    # Decisions made in ssl/app.py (aessl/corrections.py): a corrections CSV, or a list of
    # them read in order; accepted and re-scored images join the labels, rejected ones leave
    # the labels, the pool and the pseudo-labels. null = none.
    corrections: Any = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class AugmentConfig:
    weak_scale_min: float = _num(0.8, gt=0.0, le=1.0)  # random-resized-crop lower bound for the weak view
    # The strong view (aessl/transforms.py): USB's RandAugment with its fixed choices made settings
    strong_n: int = _num(3, ge=0)  # operations per image
    strong_m: int = _num(5, ge=0, le=10)  # not read: USB's RandAugment ignores its magnitude; use strong_scale
    strong_exclude_color: bool = False  # drop USB's colour operations (autocontrast, colour, contrast, posterize, solarize)
    strong_ops: Any = None  # null: USB's operations; or a list of their names (aessl.transforms.OPS)
    strong_scale: float = _num(1.0, gt=0.0, le=1.0)  # share of each operation's range from its mildest end (1: USB's)
    strong_cutout: float = _num(0.5, ge=0.0, le=0.5)  # largest cutout side, a share of the image's (USB: 0.5; 0: none)


@dataclass
class ModelConfig:
    name: str = "test_convnext3"  # any timm name or hf-hub:<id>
    pretrained: Any = False  # false, true (timm/Hub weights), or a path to a local .safetensors/.pth
    drop_rate: float = _num(0.0, ge=0.0, lt=1.0)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model keyword arguments
    # image: train the whole network on images. embedding: freeze the backbone, cache its
    # features once (embed.*) and train only a head on them (fast iteration).
    mode: str = _one_of("image", "embedding", default="image")
    # what the last layer's outputs mean (aessl/targets.py, TARGETS): classification = 11
    # bracket logits (every algorithm); regression = one score 0-10, ordinal = 10 CORN
    # conditional logits (both algorithm.name=supervised; not to be confused with the
    # algorithm.name=ordinal SSL algorithm, which trains classification logits)
    target: str = "classification"
    head: str = _one_of("linear", "mlp", "residual_mlp", default="residual_mlp")  # embedding mode (the model card's)
    head_hidden: int = _num(1024, ge=1)
    head_dropout: float = _num(0.1, ge=0.0, lt=1.0)


@dataclass
class EmbedConfig:  # embedding mode's feature cache (ssl/embed.py fills it; train.py fills what is missing)
    views: int = _num(2, ge=1)  # K weak and K strong augmented views cached per image, besides the eval view
    # the strong side of each unlabeled pair: strong = a cached RandAugment view; weak =
    # another cached weak view (a frozen backbone's features of RandAugment views lose the
    # bracket: docs/embedding_ssl_diagnosis.md); strong_noise adds Gaussian noise of that
    # many feature stds to it
    strong_view: str = _one_of("strong", "weak", default="weak")
    strong_noise: float = _num(0.0, ge=0.0)
    seed: int = 0  # seeds the views and a random-init backbone; not the run's seed, so runs share a cache
    batch_size: int = _num(64, ge=1)  # images per forward pass (each brings 1 + 2K views)
    shard_size: int = _num(2048, ge=1)  # images per cache shard: the unit a killed pass loses
    dtype: str = _one_of("float16", "float32", default="float16")  # how features are stored
    cache_dir: str = ".cache/embed"


@dataclass
class AlgorithmConfig:
    name: str = "rankmatch"  # supervised | fixmatch | rankmatch | flexmatch | freematch | softmatch | ... | ordinal
    lambda_u: float = _num(1.0, ge=0.0)  # weight of the unlabeled loss
    args: Dict[str, Any] = field(default_factory=dict)  # algorithm-specific arguments (T, p_cutoff, ...), USB names
    # who makes the pseudo-labels: model = the student being trained (USB's way); ema = the EMA
    # teacher the loop evaluates and exports (train.ema_decay), for fixmatch, flexmatch,
    # freematch, softmatch, uda, adamatch, rankmatch, rankflexmatch and ordinal
    teacher: str = _one_of("model", "ema", default="model")


@dataclass
class TrainConfig:
    steps: int = _num(800, ge=1)
    batch_size: int = _num(32, ge=1)  # labeled images per step per process
    uratio: int = _num(2, ge=1)  # unlabeled images per labeled image
    optimizer: str = _one_of("adamw", "sgd", default="adamw")
    lr: float = _num(2e-3, gt=0.0)
    weight_decay: float = _num(5e-4, ge=0.0)
    momentum: float = _num(0.9, ge=0.0, lt=1.0)
    warmup_steps: int = _num(20, ge=0)
    grad_accum: int = _num(1, ge=1)
    clip_grad: float = _num(0.0, ge=0.0)
    mixed_precision: str = _one_of("no", "fp16", "bf16", default="no")
    ema_decay: float = _num(0.99, ge=0.0, lt=1.0)
    eval_every: int = _num(400, ge=1)
    save_every: int = _num(400, ge=1)
    keep_checkpoints: int = _num(2, ge=1)
    log_every: int = _num(10, ge=1)
    tracker: Optional[str] = "tensorboard"  # tensorboard | none | any Accelerate tracker name


@dataclass
class EvalConfig:
    batch_size: int = _num(128, ge=1)
    top_k_fraction: float = _num(0.1, gt=0.0, le=1.0)


@dataclass
class Config:
    seed: int = 0
    output_dir: Optional[str] = None  # null: runs/<date-time>
    resume: bool = False  # true: continue from the newest whole checkpoint in output_dir
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


OPEN_SECTIONS = ("algorithm.args", "model.kwargs")  # free-form: any key


def _schema(cls: type = Config, prefix: str = ""):
    """(dotted key, type, field metadata) of every leaf of the schema, in order."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind):
            yield from _schema(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind, f.metadata


DEFAULTS = OmegaConf.to_container(OmegaConf.structured(Config))  # the schema's defaults as a plain dict
TYPES = {key: kind for key, kind, _ in _schema()}
CHOICES = {key: meta["choices"] for key, _, meta in _schema() if "choices" in meta}
# Allowed ranges of numeric keys: (low, high, low inclusive, high inclusive); None = open.
RANGES = {key: meta["range"] for key, _, meta in _schema() if "range" in meta}


class ConfigError(ValueError):
    pass


def load_cli_config(argv, description: str, default_config: str, example: str):
    """An entry script's command line, `[--config FILE] [key=value ...]`, as a checked config
    (configs/<default_config> when no --config is given); None, with the error printed to
    stderr, for a bad one (the script then exits 2)."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"YAML config (default: configs/{default_config})")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    args = p.parse_args(argv)
    try:
        return load_config(args.config or Path(__file__).resolve().parents[2] / "configs" / default_config,
                           args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _parse_override(text: str):
    """(key, value). A path or name (a str key of the schema) is taken as typed: YAML would
    read output_dir=0123 as 83, yes as true and data.unlabeled={000..099}.tar as a mapping.
    Every other value is YAML (numbers, booleans, lists, algorithm.args)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (example: train.steps=200)")
    key, value = text.split("=", 1)
    key, value = key.strip().lstrip("-"), value.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    if TYPES.get(key) in (str, Optional[str]):
        return key, None if value in ("", "null", "~") else value
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                          f"quote it for YAML, e.g. {key}='\"{value}\"'") from exc
    _check_not_section(key, parsed, f"override {text!r}")
    return key, parsed


SECTIONS = {key.rsplit(".", i)[0] for key in TYPES for i in range(1, key.count(".") + 1)}


def _check_sections(data: dict, path, prefix: str = "") -> None:
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key in SECTIONS:
            _check_not_section(key, value, str(path))
            _check_sections(value, path, key + ".")


def _check_not_section(key: str, value, where: str) -> None:
    """A whole section (train, data.synthetic, ...) set to something other than a mapping."""
    if key in SECTIONS and not isinstance(value, dict):
        first = next(k for k in TYPES if k.startswith(key + "."))
        raise ConfigError(f"{where}: {key} is a section, not a value: set its keys, e.g. {first}=... "
                          f"(or, in a config file, {first.rsplit('.', 1)[1]}: ... under {key}:)")


def _defaults():
    """The defaults as an untyped config in struct mode (unknown keys fail), its free-form
    sections open. Values are merged into it as given and checked afterwards (check_values),
    so a later layer may still correct an earlier one, before they go into the typed schema."""
    cfg = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(cfg, True)
    for path in OPEN_SECTIONS:
        OmegaConf.set_struct(OmegaConf.select(cfg, path), False)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> "OmegaConf":
    """Defaults <- YAML file <- overrides, as `OmegaConf.structured(Config)`. Unknown keys and
    bad values raise ConfigError naming them."""
    cfg = _defaults()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:  # a syntax error, or a tag safe_load refuses (!!python/...)
            raise ConfigError(f"{path}: not a YAML file this tool can read: {' '.join(str(exc).split())}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot be read: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
        _check_sections(data, path)
        try:
            cfg.merge_with(data)
        except (ConfigAttributeError, ConfigKeyError) as exc:
            raise ConfigError(f"{path}: unknown config key {exc.full_key!r}") from exc
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{path}: bad value for {exc.full_key!r}: {exc}") from exc
    for text in overrides:
        key, value = _parse_override(text)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except (ConfigAttributeError, ConfigKeyError, IndexError, ValueError) as exc:
            # (IndexError, ValueError: a list indexed past its end or by a name)
            raise ConfigError(f"unknown config key {key!r} (from override {text!r})") from exc
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad value for {key!r}: {exc}") from exc
    check_values(cfg)
    return _typed(cfg)


def _typed(cfg):
    """The checked values in the schema's typed nodes, in struct mode. OmegaConf's own
    validation catches what check_values leaves to it (a string key given a list or null, an
    open section given something other than a mapping)."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except OmegaConfBaseException as exc:
        where = f"for {exc.full_key!r}" if exc.full_key else "in the config"
        raise ConfigError(f"bad value {where}: {str(exc).splitlines()[0]}") from exc
    OmegaConf.set_struct(typed, True)
    for path in OPEN_SECTIONS:
        OmegaConf.set_struct(OmegaConf.select(typed, path), False)
    return typed


def check_values(cfg) -> None:
    """Choices, types (numbers coerced where unambiguous), ranges and the target, in that
    order, each error naming its key."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is False and "no" in allowed:  # YAML 1.1 reads `no` as false: train.mixed_precision=no
            value = "no"
            OmegaConf.update(cfg, key, value)
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
    """A target other than classification trains its own supervised loss (aessl/targets.py),
    alone (supervised) or inside our ordinal algorithm, which reads the head through the
    target's probabilities; USB's algorithms (and RankMatch, FixMatch's loss) compute
    cross-entropy on 11 class logits, and soft labels are 11 class probabilities."""
    from .targets import TARGETS  # (torch: imported only here, once a config is read)

    target = OmegaConf.select(cfg, "model.target")
    if target not in TARGETS:
        raise ConfigError(f"model.target={target!r} is not one of {', '.join(TARGETS)}")
    if target == "classification":
        return
    algorithm = OmegaConf.select(cfg, "algorithm.name")
    if algorithm not in ("supervised", "ordinal"):
        raise ConfigError(f"model.target={target} trains with algorithm.name=supervised or ordinal only, not "
                          f"algorithm.name={algorithm}: {algorithm}'s losses are cross-entropy on 11 class logits "
                          "(use model.target=classification for it)")
    if OmegaConf.select(cfg, "data.pseudo_labels"):
        raise ConfigError(f"model.target={target} cannot train on data.pseudo_labels (soft targets are 11 bracket "
                          "probabilities); leave data.pseudo_labels=null")


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
    """Every bool key holds a bool (OmegaConf would take 1 or "yes"), every number key a finite
    number of its type, coerced where that is unambiguous (OmegaConf's int nodes refuse "1e3"
    and 2.0, its float nodes take nan). Strings, `Any` and the open sections are left to
    OmegaConf's typed nodes and the explicit checks."""
    for key, kind in TYPES.items():
        value = OmegaConf.select(cfg, key)
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r} must be true or false")
        elif kind in (int, float) or (kind == Optional[int] and value is not None):
            coerced = _as_number(key, value, float if kind is float else int)
            if coerced != value or type(coerced) is not type(value):
                OmegaConf.update(cfg, key, coerced)
    _check_pseudo_keys(cfg)
    _check_strong_ops(cfg)


def _check_path_list(cfg, key: str, what: str) -> None:
    """`key`: null, one path, or a non-empty list of paths (`what` says what a path names)."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    items = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(f, str) and f.strip() for f in items):
        raise ConfigError(f"{key}={_plain(value)!r} must be null, {what}, or a list of them")


def _check_pseudo_keys(cfg) -> None:
    """data.pseudo_labels: null, a folder, or a non-empty list of folders; data.corrections:
    likewise with files; data.pseudo_band: null or [low, high] percents with
    0 <= low <= high <= 100."""
    _check_path_list(cfg, "data.pseudo_labels", "an export folder written by ssl/export.py")
    _check_path_list(cfg, "data.corrections", "a corrections .csv written by ssl/app.py")
    band = OmegaConf.select(cfg, "data.pseudo_band")
    if band is not None:
        if not (OmegaConf.is_list(band) or isinstance(band, (list, tuple))) or len(band) != 2:
            raise ConfigError(f"data.pseudo_band={_plain(band)!r} must be null or [low, high] in score percent "
                              "(e.g. [50, 100])")
        low, high = (_as_number("data.pseudo_band", v, float) for v in band)
        if not 0.0 <= low <= high <= 100.0:
            raise ConfigError(f"data.pseudo_band={[low, high]!r} must satisfy 0 <= low <= high <= 100 (percents)")
        OmegaConf.update(cfg, "data.pseudo_band", [low, high], merge=False)


def _check_strong_ops(cfg) -> None:
    """augment.strong_ops: null or a non-empty list of USB RandAugment operation names; and a
    warning for augment.strong_m, which nothing reads."""
    from .transforms import OPS

    ops = OmegaConf.select(cfg, "augment.strong_ops")
    if ops is not None:
        items = list(ops) if OmegaConf.is_list(ops) or isinstance(ops, (list, tuple)) else None
        bad = None if items is None else [o for o in items if o not in OPS]
        if not items or bad:
            raise ConfigError(f"augment.strong_ops={_plain(ops)!r} must be null or a list of operation names from: "
                              f"{', '.join(OPS)}" + (f" (unknown: {', '.join(map(str, bad))})" if bad else ""))
    if OmegaConf.select(cfg, "augment.strong_m") != 5:
        logging.getLogger(__name__).warning(
            "augment.strong_m is not read (USB's RandAugment ignores its magnitude): augment.strong_scale sets how far "
            "each strong-view operation goes")


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
