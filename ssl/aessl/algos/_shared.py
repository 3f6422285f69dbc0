"""Pieces several of our algorithms use."""

from __future__ import annotations

import torch

from ..metrics import NUM_BRACKETS


def three_views(model, x_lb: torch.Tensor, x_ulb_w: torch.Tensor, x_ulb_s: torch.Tensor):
    """(labeled, weak, strong) logits from one forward pass over the three batches, as USB's
    `use_cat` does (batch-norm statistics then cover all three)."""
    logits = model(torch.cat((x_lb, x_ulb_w, x_ulb_s)))["logits"]
    logits_w, logits_s = logits[len(x_lb):].chunk(2)
    return logits[:len(x_lb)], logits_w, logits_s


def expected(probs: torch.Tensor) -> torch.Tensor:
    """Expected bracket 0-10 of each row of bracket probabilities."""
    return probs @ torch.arange(NUM_BRACKETS, device=probs.device, dtype=probs.dtype)
