"""timm backbones for bracket scoring, and the `model/` folder that outlives the training run.

A model is fully described by its timm name, the number of brackets and a few keyword
arguments; `model/config.json` records exactly that plus the image size and normalisation,
so `load_model_folder` needs no training config. `model.safetensors` holds the timm
backbone's own state dict: the same file loads with plain
`timm.create_model(name, num_classes=11, pretrained=True, pretrained_cfg_overlay={"file": ...})`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .heads import EmbeddingScoreModel, build_head
from .metrics import NUM_BRACKETS
from .targets import get_target, target_of

log = logging.getLogger(__name__)

MODEL_FORMAT = "aessl-model"
MODEL_FORMAT_VERSION = 1


class WeightsUnavailable(RuntimeError):
    pass


class ImageSizeTooSmall(WeightsUnavailable):
    """The model cannot take images this small (its downsampling runs out of pixels). A
    WeightsUnavailable, so every script that reports a model it cannot build reports it."""


def check_image_size(backbone: nn.Module, name: str, image_size: int) -> None:
    """ImageSizeTooSmall when `backbone` fails on image_size x image_size images. Only sizes
    below the network's total stride are tried (one forward of a zero image on the CPU):
    a padded network (ResNet) takes them, an unpadded one (ConvNeXt's 2x2 downsampling)
    does not."""
    info = getattr(backbone, "feature_info", None)
    try:
        reduction = int(info[-1]["reduction"]) if info else None
    except (KeyError, TypeError, ValueError, IndexError):
        reduction = None
    if reduction is None or image_size >= reduction:
        return
    was_training = backbone.training
    try:
        with torch.no_grad():
            backbone.eval()(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as exc:
        raise ImageSizeTooSmall(f"model {name!r} cannot take {image_size} px images (it downsamples {reduction}x: "
                                f"{str(exc).splitlines()[0]}); use an image size of at least {reduction} "
                                "(data.image_size= / --image-size)") from None
    finally:
        backbone.train(was_training)


class ScoreModel(nn.Module):
    """A timm backbone that answers the way USB's algorithms expect.

    forward(x) -> {'logits': N x 11, 'feat': N x D}; forward(feat, only_fc=True) -> logits;
    forward(x, only_feat=True) -> feat."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.num_features = backbone.num_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x, only_fc: bool = False, only_feat: bool = False, **_):
        if only_fc:
            return self.backbone.get_classifier()(x)
        feat = self.features(x)
        if only_feat:
            return feat
        return {"logits": self.backbone.get_classifier()(feat), "feat": feat}


def _offline_hint(name: str) -> str:
    return (
        f"pretrained weights for {name!r} could not be loaded (no model hub is reachable from here, "
        "or the name is unknown). Point at a local weights file instead: "
        "model.pretrained=/path/to/model.safetensors (or .pth/.bin), or train from scratch with "
        "model.pretrained=false."
    )


def create_backbone(name: str, pretrained=False, num_classes: int = NUM_BRACKETS, **kwargs) -> nn.Module:
    """timm.create_model with our three kinds of `pretrained`: False, True, or a local file."""
    if isinstance(pretrained, (str, os.PathLike)) and str(pretrained).lower() not in ("true", "false"):
        path = Path(pretrained).expanduser()
        if path.is_dir():  # a run folder or its model/ folder, as every other tool takes them
            inside = [p for p in (path / "model.safetensors", path / "model" / "model.safetensors") if p.is_file()]
            if not inside:
                raise WeightsUnavailable(f"model.pretrained: {path} is a folder with no model.safetensors (nor "
                                         "model/model.safetensors): name the weights file, or a finished run")
            path = inside[0]
        if not path.is_file():
            raise WeightsUnavailable(f"model.pretrained: weights file not found: {path}")
        before = torch.get_rng_state()
        try:
            # timm loads the file (safetensors, or torch.load with weights_only) and adapts
            # the classifier to `num_classes` as it does for Hub weights.
            model = timm.create_model(
                name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
        except (RuntimeError, KeyError) as exc:  # KeyError: timm drops a classifier the file does not have
            raise WeightsUnavailable(f"model.pretrained: {path} does not fit {name!r}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        _check_loaded(model, name, path, num_classes, kwargs, before)
        return model
    want = str(pretrained).lower() == "true" if isinstance(pretrained, str) else bool(pretrained)
    if name.startswith("hf-hub:") or want:
        try:
            return timm.create_model(name, pretrained=want, num_classes=num_classes, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise WeightsUnavailable(f"unknown timm model {name!r}") from exc
            raise WeightsUnavailable(_offline_hint(name) + f" [{type(exc).__name__}: {exc}]") from exc
        except Exception as exc:  # hub / network errors come in many types
            raise WeightsUnavailable(_offline_hint(name) + f" [{type(exc).__name__}: {exc}]") from exc
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        raise WeightsUnavailable(f"unknown timm model {name!r}: {exc}") from exc


def _check_loaded(model: nn.Module, name: str, path: Path, num_classes: int, kwargs: dict, rng_before) -> None:
    """timm loads a file non-strictly whenever the class count differs, so a file made for
    another architecture "loads" without loading anything. Compare with the same random init:
    every parameter still at its initial value means the file did not fit."""
    after = torch.get_rng_state()
    torch.set_rng_state(rng_before)
    fresh = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    torch.set_rng_state(after)  # the caller's random stream goes on as if checked nothing
    classifier = set(_classifier_names(model))  # re-initialised by timm whatever the file holds
    init = dict(fresh.named_parameters())
    untouched = [n for n, p in model.named_parameters()
                 if n not in classifier and n in init and torch.equal(p.detach(), init[n].detach())]
    total = sum(1 for n, _ in model.named_parameters() if n not in classifier)
    if total and len(untouched) == total:
        raise WeightsUnavailable(f"model.pretrained: none of the weights in {path} fit {name!r} (its parameter "
                                 "names do not match); is the file made for another architecture?")
    if untouched:
        log.warning("model.pretrained: %d of %d parameters of %s are not in %s and stay at "
                                            "random init (first: %s)", len(untouched), total, name, path, untouched[:3])


def _classifier_names(model: nn.Module) -> list[str]:
    names = model.pretrained_cfg.get("classifier", "") if hasattr(model, "pretrained_cfg") else ""
    names = [names] if isinstance(names, str) else list(names)
    return [f"{n}.weight" for n in names if n] + [f"{n}.bias" for n in names if n]


def data_config(backbone: nn.Module, image_size: int, crop_pct: float = 1.0) -> dict:
    """Normalisation and interpolation from the backbone's pretrained config, at our size."""
    cfg = timm.data.resolve_data_config({}, model=backbone)
    return {
        "image_size": int(image_size),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": float(crop_pct),
    }


def build_model(model_cfg, image_size: int, crop_pct: float = 1.0) -> tuple[ScoreModel, dict]:
    kwargs = dict(model_cfg.get("kwargs") or {})
    if model_cfg.get("drop_rate"):
        kwargs["drop_rate"] = model_cfg["drop_rate"]
    target = get_target(model_cfg.get("target"))
    backbone = create_backbone(model_cfg["name"], model_cfg.get("pretrained", False), num_classes=target.outputs,
                               **kwargs)
    check_image_size(backbone, model_cfg["name"], image_size)
    info = {
        "architecture": model_cfg["name"],
        "num_classes": NUM_BRACKETS,
        "target": target.name,
        "model_kwargs": kwargs,
        **data_config(backbone, image_size, crop_pct),
    }
    return ScoreModel(backbone), info


def save_model_folder(model: ScoreModel, info: dict, folder: str | Path, extra: dict | None = None,
                      files: dict[str, str] | None = None) -> Path:
    """Write model.safetensors + config.json (+ `files`, name -> text, e.g. the model card
    README.md) into a temp folder, then swap it into place: at every moment `folder` holds
    either the whole old model or the whole new one, its card included."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # Image mode: the timm backbone's own state dict. Embedding mode: backbone.* and head.*.
    raw = model.export_state_dict() if hasattr(model, "export_state_dict") else model.backbone.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in raw.items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **info, **(extra or {})}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    _recover_interrupted_swap(folder)
    if not folder.exists():
        tmp.rename(folder)
    elif _exchange(tmp, folder):  # atomic: tmp now holds the old model
        shutil.rmtree(tmp)
    else:  # no RENAME_EXCHANGE here: two renames, and _recover_interrupted_swap covers the gap
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    return folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where the
    system or file system does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _recover_interrupted_swap(folder: Path) -> None:
    """A kill between the two renames of the fallback leaves only `<folder>.old`: put it back."""
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and (old / "config.json").is_file():
        old.rename(folder)


def resolve_model_folder(path: str | Path) -> Path:
    """Accept a model/ folder or a run folder that contains one."""
    path = Path(path)
    for candidate in (path, path / "model"):
        _recover_interrupted_swap(candidate)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():  # a run that has not finished
        raise FileNotFoundError(f"{path}: a run folder with no model/ yet (the run has not finished): finish it with "
                                f"ssl/train.py ... output_dir={path} resume=true, which continues from its last "
                                "checkpoint and writes model/")
    raise FileNotFoundError(f"{path}: not a model folder (needs config.json and model.safetensors) or a run folder with model/")


def files_sha256(*paths: str | Path) -> str:
    """One sha256 over the files' bytes, in order, read in 4 MiB chunks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def model_sha256(folder: str | Path) -> str:
    """sha256 over a model folder's config.json and model.safetensors: what export's
    fingerprint and an ONNX file's provenance record (the card may change, the model not)."""
    return files_sha256(Path(folder) / "config.json", Path(folder) / "model.safetensors")


def load_model_folder(path: str | Path, device="cpu") -> tuple[ScoreModel, dict]:
    folder = resolve_model_folder(path)
    info = json.loads((folder / "config.json").read_text())
    if info.get("format") != MODEL_FORMAT:
        raise ValueError(f"{folder / 'config.json'}: not an {MODEL_FORMAT} config (format={info.get('format')!r})")
    state = load_file(str(folder / "model.safetensors"), device="cpu")
    if info.get("mode", "image") == "embedding":
        backbone = timm.create_model(info["architecture"], pretrained=False, num_classes=0, **info.get("model_kwargs", {}))
        head = build_head(info["head"])
        backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
        head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        return EmbeddingScoreModel(backbone, head).to(device).eval(), info
    backbone = timm.create_model(
        info["architecture"], pretrained=False, num_classes=target_of(info).outputs, **info.get("model_kwargs", {})
    )
    backbone.load_state_dict(state)
    model = ScoreModel(backbone).to(device).eval()
    return model, info
