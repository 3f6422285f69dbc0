"""A trained scorer as an .onnx file, checked against torch on real images (ssl/export_onnx.py).

    export_onnx(model, out, images=None) -> {"out", "images", "max_abs_diff", ...}

The graph is `ProbabilityModel`: the model of `load_model_folder` (image mode: the timm
backbone; embedding mode: backbone + head) followed by its target's probabilities, so the
file answers the 11 bracket probabilities whatever the head (aessl/onnx_backend.py says what
the file holds). torch 2.11's own exporter (`dynamo=True`, torch.export underneath; the
TorchScript one is deprecated) writes it with a dynamic batch axis. The file is written in
a temporary folder beside `out`, checked there with onnxruntime against the torch model on
the same normalised images, and moved into place only when every probability agrees within
`tolerance`: a file at `out` is always a checked one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import EvalDataset, load_pool
from .models import load_model_folder, model_sha256, resolve_model_folder
from .onnx_backend import (INPUT_NAME, INSTALL_HINT, META_CONFIG, META_FORMAT, META_SHA, ONNX_FORMAT, OUTPUT_NAME,
                           OnnxError, OnnxScorer)
from .runfolder import read_run_info, read_split, run_sources
from .scoring import bracket_probs
from .targets import Ordinal, target_of
from .transforms import eval_transform

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
DEFAULT_CHECK_IMAGES = 64


def corn_probs_unrolled(outputs: torch.Tensor) -> torch.Tensor:
    """targets.Ordinal.probs with its cumprod written as running products: neither of torch
    2.11's ONNX exporters translates aten::cumprod, and nine multiplications give the same
    numbers to float32 rounding (tests/test_onnx.py checks it)."""
    logits = outputs.float()
    up = torch.sigmoid(logits)
    columns = [up[:, :1]]
    for k in range(1, logits.shape[1]):
        columns.append(columns[-1] * up[:, k:k + 1])
    above = torch.cat(columns, dim=1)  # P(bracket > k)
    reach = torch.cat([torch.ones_like(above[:, :1]), above[:, :-1]], dim=1)
    return torch.cat([reach * torch.sigmoid(-logits), above[:, -1:]], dim=1)


class ProbabilityModel(nn.Module):
    """A loaded scorer plus its target's probability rule: normalised images -> [B, 11]."""

    def __init__(self, model: nn.Module, target):
        super().__init__()
        self.model, self.target = model, target

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        outputs = self.model(image)["logits"]
        if self.target.name == Ordinal.name:
            return corn_probs_unrolled(outputs)
        return self.target.probs(outputs)


@contextmanager
def quiet_loggers(*names: str):
    """The exporter's optimiser logs every rewrite at INFO (dozens of lines per model): only
    its warnings reach the user."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def write_graph(wrapper: ProbabilityModel, info: dict, sha: str, dest: Path, opset: int | None) -> None:
    """torch.onnx.export (dynamo) of `wrapper` to `dest`, dynamic batch, our metadata inside."""
    size = int(info["image_size"])
    example = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would be specialised away
    try:
        with warnings.catch_warnings(), quiet_loggers("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
            warnings.simplefilter("ignore")  # torch.export's deprecation chatter, not the user's business
            program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset, verbose=False,
                                        dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    except ImportError as exc:  # onnx / onnxscript missing
        raise OnnxError(f"torch.onnx needs {exc.name or exc}: {INSTALL_HINT}") from None
    except Exception as exc:
        raise OnnxError(f"{info['architecture']} could not be exported to ONNX "
                        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    program.model.metadata_props.update({META_FORMAT: ONNX_FORMAT, META_CONFIG: json.dumps(info), META_SHA: sha})
    program.save(str(dest))  # weights inline, or beside it as <name>.data past ONNX's 2 GB limit


def check_batches(folder: Path, info: dict, images: str | None, count: int, batch_size: int = 16):
    """(DataLoader of eval views, where they come from): --images, else the run's test set
    (run.json's test source or split.csv's test rows); (None, why) when there is none."""
    table, source = None, None
    if images:
        table, source = load_pool(images, limit=count), images
    else:
        run_dir = folder.parent if folder.name == "model" else None
        test = run_sources(read_run_info(run_dir)).get("test")
        split = read_split(run_dir)
        if test:
            table, source = load_pool(test, limit=count), f"{test} (the run's test set)"
        elif split is not None and (split["split"] == "test").any():
            rows = split[split["split"] == "test"].head(count)
            table, source = [{"path": p} for p in rows["path"]], f"{run_dir / 'split.csv'} (the run's test rows)"
    if table is None:
        return None, "no images: pass --images (a bare model/ folder has no test set)"
    data = EvalDataset(table, eval_transform(info), int(info["image_size"]))
    return DataLoader(data, batch_size=batch_size, num_workers=0), source


def compare(model: nn.Module, info: dict, scorer: OnnxScorer, loader) -> tuple[int, float]:
    """(images compared, max |p_onnx - p_torch|): torch through scoring.bracket_probs at
    float32 (export's own loop), onnxruntime on the very same tensors; unreadable rows skipped."""
    n, worst = 0, 0.0
    for probs, batch in bracket_probs(model, loader, "cpu", torch.float32, target=target_of(info)):
        ok = batch["ok"].numpy().astype(bool)
        if not ok.any():
            continue
        got = scorer.probs(batch["x"].numpy()[ok])
        worst = max(worst, float(np.abs(got - probs.numpy()[ok]).max()))
        n += int(ok.sum())
    return n, worst


def random_batches(info: dict, count: int, seed: int = 0):
    """Normalised-range noise, for a model folder with no image to check on."""
    g = torch.Generator().manual_seed(seed)
    size = int(info["image_size"])
    x = torch.randn(count, 3, size, size, generator=g)
    return [{"x": x[i:i + 16], "ok": torch.ones(len(x[i:i + 16]), dtype=torch.bool)} for i in range(0, count, 16)]


def export_onnx(model_path: str | Path, out: str | Path, images: str | None = None,
                count: int = DEFAULT_CHECK_IMAGES, tolerance: float = DEFAULT_TOLERANCE,
                opset: int | None = None) -> dict:
    """Export, check, then publish `out`; raises OnnxError (file not written) when the check fails."""
    out = Path(out)
    if out.is_dir():
        raise OnnxError(f"--out {out}: a folder; give the path of the .onnx file to write")
    folder = resolve_model_folder(model_path)
    model, info = load_model_folder(folder, device="cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        write_graph(ProbabilityModel(model, target_of(info)).eval(), info, model_sha256(folder), staged, opset)
        scorer = OnnxScorer(staged)
        loader, source = check_batches(folder, info, images, count)
        if loader is None:
            log.warning("ONNX check on %d random tensors only: %s", count, source)
            loader, source = random_batches(info, count), f"random tensors ({source})"
        n, worst = compare(model, info, scorer, loader)
        if n == 0:
            raise OnnxError(f"none of the check images of {source} could be read; pass --images")
        if not worst <= tolerance:
            raise OnnxError(f"ONNX and torch disagree on {source}: max |p_onnx - p_torch| = {worst:.3g} > "
                            f"tolerance {tolerance:g} over {n} images; {out} was not written")
        for f in sorted(Path(tmp).iterdir(), key=lambda p: p.name == out.name):  # the .onnx last: whole when seen
            shutil.move(str(f), out.parent / f.name)
    return {"out": str(out), "model": str(folder), "target": target_of(info).name, "mode": info.get("mode", "image"),
            "image_size": int(info["image_size"]), "check_source": source, "images": n, "max_abs_diff": worst,
            "tolerance": tolerance, "bytes": out.stat().st_size}
