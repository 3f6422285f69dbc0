"""One scoring loop: a model and batches of images (or cached features) in, bracket
probabilities out. Training's evaluation, export and report all score through
`bracket_probs`, so precision, device placement and the float32 softmax are decided once.

    for probs, batch in bracket_probs(model, loader, device, dtype):
        ...   # probs: [B, 11] float32 on the host, rows in the batch's order

On CUDA each batch's copy to the host is non-blocking into pinned memory, and a batch is
handed back only after the next batch's forward is queued, so the GPU keeps working while
the caller writes results; an event says when the copy has landed.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .targets import get_target

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a precision name; auto: bf16 on a GPU that has it (fp16 on
    one that does not), fp32 on a CPU."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def mixed_precision_dtype(mixed_precision: str | None) -> torch.dtype:
    """The autocast dtype of Accelerate's train.mixed_precision setting ('no', 'bf16', 'fp16')."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mixed_precision), torch.float32)


def bracket_probs(model: torch.nn.Module, batches: Iterable[dict], device, dtype: torch.dtype = torch.float32,
                  channels_last: bool = False, target=None) -> Iterator[tuple[torch.Tensor, dict]]:
    """(11 bracket probabilities as float32 on the host, the batch) for every batch, in order.

    `model` must already be on `device` and answer like ScoreModel ({'logits': ...}); it is
    put in eval mode. `batch['x']` is moved to the device here. Autocast runs at `dtype`
    unless it is float32. `target` (aessl/targets.py; None: classification, a softmax)
    turns the outputs into probabilities, always in float32 (bf16 probabilities would not
    sum to 1, and numpy has no bfloat16)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    target = target or get_target(None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.eval()
    pending = None
    for batch in batches:
        # (inference mode per batch, not around the loop: a generator suspended inside it
        # would leave the caller's thread in inference mode)
        with torch.inference_mode():
            x = batch["x"].to(device, non_blocking=True)
            if channels_last and cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(x)["logits"]
            probs = target.probs(logits)
            ready = None
            if cuda:  # copy into pinned host memory without waiting; the event says when it is there
                probs = probs.to("cpu", non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(device))  # the device's own stream: cuda:1 may not be current
            else:
                probs = probs.cpu()
        # Hand back the previous batch only now, so the GPU runs this forward meanwhile.
        if pending is not None:
            yield _landed(*pending)
        pending = (probs, ready, batch)
    if pending is not None:
        yield _landed(*pending)


def _landed(probs: torch.Tensor, ready, batch: dict) -> tuple[torch.Tensor, dict]:
    if ready is not None:
        ready.synchronize()  # the non-blocking copy to the host has landed
    return probs, batch
