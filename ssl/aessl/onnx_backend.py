"""Scoring with an exported .onnx file through onnxruntime: export's `--backend onnx`.

The file is written by aessl/onnx_export.py (`ssl/export_onnx.py`). Its graph takes the
normalised eval view, `image` [B, 3, S, S] float32 with a dynamic batch B, and gives
`probs` [B, 11], the bracket probabilities with the target's own rule (softmax, CORN,
two-hot) inside the graph, so a reader needs to know nothing of the head. What export
needs besides the graph travels in the file's metadata:

    aessl.format        "aessl-onnx" (a file without it was not written by this tool)
    aessl.config        the model's config.json: image size, normalisation, interpolation,
                        crop, target, thresholds, confidence radius
    aessl.model_sha256  the model folder's config.json + model.safetensors it came from

so `export.py --onnx FILE` scores a pool with neither the weights nor timm's model code.
This module imports neither torch nor timm: `OnnxScorer.probs` maps a numpy batch to
probabilities. (The export *pipeline* still uses torch: its DataLoader and timm's eval
transform make the batches, so that the pixels are the very ones the torch backend sees.)

onnxruntime is the optional `onnx` extra, imported when a file is opened.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .metrics import NUM_BRACKETS

log = logging.getLogger(__name__)

ONNX_FORMAT = "aessl-onnx"
META_FORMAT, META_CONFIG, META_SHA = "aessl.format", "aessl.config", "aessl.model_sha256"
INPUT_NAME, OUTPUT_NAME = "image", "probs"
INSTALL_HINT = "install the onnx extra: pip install -e '.[onnx]' (onnx, onnxruntime, onnxscript)"
# config.json keys that change what the graph's input or output means
MEANING_KEYS = ("architecture", "target", "image_size", "mean", "std", "interpolation", "crop_pct", "mode")


class OnnxError(ValueError):
    """An ONNX file (or the runtime) that cannot be used; the message names the file."""


def import_onnxruntime():
    """onnxruntime, or an OnnxError that says how to install it (it is an optional extra)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxError(f"onnxruntime is not installed ({exc}); {INSTALL_HINT}") from None
    return onnxruntime


def providers_for(device: str, available: list[str]) -> list:
    """onnxruntime execution providers for a torch-style device name (cpu, cuda, cuda:N):
    CUDA on that GPU first where the installed runtime has it and a GPU was asked for, the
    CPU always as the fallback."""
    device = str(device)
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device.startswith("cuda"):
        log.warning("onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu); scoring on the CPU")
    return ["CPUExecutionProvider"]


class OnnxScorer:
    """An opened .onnx file of this tool: `info` (its model config) and `probs(x)`."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        ort = import_onnxruntime()
        if not self.path.is_file():
            raise OnnxError(f"{self.path}: ONNX file not found")
        opts = ort.SessionOptions()
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)  # the knob torch obeys, for a shared machine
        if threads > 0:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=providers_for(device, ort.get_available_providers()))
        except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile...: one message naming the file
            raise OnnxError(f"{self.path}: not a usable ONNX model ({type(exc).__name__}: {exc})") from None
        self.info, self.model_sha256 = read_metadata(self.path, self.session)
        check_signature(self.path, self.session, int(self.info["image_size"]))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def probs(self, x) -> np.ndarray:
        """[B, 3, S, S] normalised images (numpy or a CPU tensor) -> [B, 11] float32."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def bracket_probs(self, batches: Iterable[dict]) -> Iterator[tuple[np.ndarray, dict]]:
        """scoring.bracket_probs's contract for export: (probabilities, the batch), in order."""
        for batch in batches:
            yield self.probs(batch["x"]), batch


def read_metadata(path: Path, session) -> tuple[dict, str | None]:
    """(the model config, the source model's sha256) from the file's metadata; OnnxError
    when the file was not written by ssl/export_onnx.py."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get(META_FORMAT) != ONNX_FORMAT or META_CONFIG not in meta:
        raise OnnxError(f"{path}: an ONNX model, but not one written by ssl/export_onnx.py (no {META_CONFIG} "
                        "metadata: image size, normalisation and thresholds are unknown); export it with "
                        "python ssl/export_onnx.py --model RUN --out FILE")
    try:
        info = json.loads(meta[META_CONFIG])
        int(info["image_size"]), list(info["mean"]), list(info["std"])
    except (ValueError, KeyError, TypeError) as exc:
        raise OnnxError(f"{path}: its {META_CONFIG} metadata is damaged ({type(exc).__name__}: {exc})") from None
    return info, meta.get(META_SHA)


def check_signature(path: Path, session, image_size: int) -> None:
    """The graph takes `image` [B, 3, S, S] at the recorded size and gives `probs` [B, 11]."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
        raise OnnxError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found inputs "
                        f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2:] != [image_size, image_size]:
        raise OnnxError(f"{path}: its input is {shape}, but its config says {image_size} px images "
                        f"([batch, 3, {image_size}, {image_size}])")
    out_shape = list(next(o for o in outputs if o.name == OUTPUT_NAME).shape)
    if len(out_shape) != 2 or out_shape[1] != NUM_BRACKETS:
        raise OnnxError(f"{path}: its output is {out_shape}, not [batch, {NUM_BRACKETS}] bracket probabilities")


def meaning(info: dict) -> dict:
    """The config keys that decide what the graph's input and output mean, with the defaults
    a config.json written before a key existed implies (image mode, classification)."""
    defaults = {"mode": "image", "target": "classification"}
    return {k: info.get(k, defaults.get(k)) for k in MEANING_KEYS}


def check_same_model(path: Path, scorer: OnnxScorer, folder: Path, folder_info: dict, folder_sha: str) -> None:
    """An ONNX file scored beside a model folder must come from that folder: else thresholds,
    fingerprints and the manifest would describe one model and the scores another."""
    if scorer.model_sha256 == folder_sha:
        return
    mine, theirs = meaning(folder_info), meaning(scorer.info)
    diff = [f"{k}: {mine[k]!r} in {folder / 'config.json'}, {theirs[k]!r} in {path}"
            for k in MEANING_KEYS if mine[k] != theirs[k]]
    raise OnnxError(f"{path} was not exported from {folder} (" + ("; ".join(diff) or "different weights")
                    + "); export it again with python ssl/export_onnx.py, or pass only one of them")
