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


def window_mass(probs: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, predicted bracket): the mass within +-radius of the argmax bracket
    (radius 0: the argmax probability, FixMatch's confidence)."""
    top = probs.argmax(dim=-1)
    if radius <= 0:
        return probs.gather(-1, top[:, None]).squeeze(-1), top
    return (probs * near_mask(top, radius, probs.shape[-1]).to(probs.dtype)).sum(-1).clamp(max=1.0), top


def near_mask(centre: torch.Tensor, radius: int, n: int = NUM_BRACKETS) -> torch.Tensor:
    """Boolean (len(centre), n): True for brackets within +-radius of each row's centre."""
    b = torch.arange(n, device=centre.device)
    return (b[None, :] - centre[:, None]).abs() <= radius
