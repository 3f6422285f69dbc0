"""Saliency maps for the report's image grids (`ssl/report.py --saliency`): which pixels move a
model's expected score, drawn over the image.

The method is integrated gradients (Sundararajan, Taly & Yan 2017; Captum's
`IntegratedGradients`). It integrates the gradient of the expected score (sum_b p_b * b over
the target's 11 bracket probabilities, so it works for every target) along the straight path
from a baseline image to the image, and multiplies by the difference between the two. The
attributions of one image add up to score(image) - score(baseline) (completeness); what the
numerical integral leaves over is that image's convergence delta, which the report records.
Baselines: `blur` (the image blurred, the default: what its detail, edges and texture add to
the score) or `black` (a black image: what makes it score above an empty frame). On the
synthetic demo the blurred baseline marks eyes, line art and text; the black one credits
every bright pixel, so flat light backgrounds light up too, and says less about aesthetics.
Neither credits what a blur keeps (overall colour and brightness) or what black shares.

Gradients reach the pixels through the whole model: the timm network in image mode, the frozen
backbone and then the head in embedding mode (its cache is not used here). Everything runs on
the model's own view of each image, the eval transform of aessl/transforms.py (resize, centre
crop, normalisation), so a map lines up with what the model saw; the overlay draws the map
over that view, un-normalised. The pass runs in float32 (no autocast: bf16 gradients are
too coarse for a path integral), in eval mode, with gradients enabled only inside it.

    options = SaliencyOptions(steps=50, baseline="blur")
    result = saliency_maps(model, info, sources, device, options)
    tiles = [overlay_tile(v, h, 192) for v, h in zip(result.views, result.heat)]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from .images import UnreadableImage, load_image
from .targets import target_of
from .transforms import eval_transform

BASELINES = ("blur", "black")
METHOD = "integrated_gradients"
COLORMAP = "inferno"  # dark (little effect) to bright yellow (most); perceptually ordered
OVERLAY_ALPHA = 0.75  # opacity of the map where it is strongest; it fades with the magnitude
HEAT_PERCENTILE = 99.0  # a map is scaled so that this percentile is full colour (a few hot pixels would wash out the rest)


@dataclass(frozen=True)
class SaliencyOptions:
    """How the report computes its saliency maps."""

    steps: int = 50  # integration points (Gauss-Legendre; Captum's default): the delta says whether enough
    baseline: str = "blur"  # one of BASELINES
    batch_size: int = 16  # images x steps per forward-and-backward pass: bounds memory, not results

    def __post_init__(self):
        if self.baseline not in BASELINES:
            raise ValueError(f"saliency baseline {self.baseline!r}: use one of {', '.join(BASELINES)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("saliency steps and batch size must be at least 1")


@dataclass
class SaliencyResult:
    """Per image (in the order given; None where it could not be read): the model's view as
    H x W x 3 floats in 0-1, the attributions (3 x H x W, float32), the heat map (H x W in 0-1),
    the expected score and the convergence delta."""

    views: list
    attributions: list
    heat: list
    scores: list
    deltas: list
    seconds: float

    def summary(self) -> dict:
        """JSON-safe figures of the pass for metrics.json."""
        ok = [i for i, v in enumerate(self.views) if v is not None]
        gaps = np.abs([self.deltas[i] for i in ok]) if ok else np.zeros(0)
        return {"images": len(ok), "unreadable": len(self.views) - len(ok), "seconds": round(self.seconds, 2),
                "max_abs_convergence_delta": float(gaps.max()) if len(gaps) else None,
                "mean_abs_convergence_delta": float(gaps.mean()) if len(gaps) else None}


class ExpectedScore(nn.Module):
    """model + target -> the expected score [B] (sum_b p_b * b), differentiable in the input."""

    def __init__(self, model: nn.Module, target):
        super().__init__()
        self.model, self.target = model, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.target.probs(self.model(x)["logits"])
        return probs @ torch.arange(probs.shape[1], dtype=probs.dtype, device=probs.device)


def baseline_for(x: torch.Tensor, kind: str, mean, std) -> torch.Tensor:
    """The baseline images of a normalised batch x: `black` (pixel value 0 in every channel,
    normalised as the model's inputs are) or `blur` (x under a Gaussian of sigma = size/16)."""
    if kind == "black":
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((0.0 - m) / s).expand_as(x).contiguous()
    if kind == "blur":
        return _gaussian(x, max(1.0, min(x.shape[-2:]) / 16))
    raise ValueError(f"saliency baseline {kind!r}: use one of {', '.join(BASELINES)}")


def integrated_gradients(model: nn.Module, target, x: torch.Tensor, baselines: torch.Tensor, steps: int,
                         batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attributions like x, convergence delta [B], expected score [B]), float32 on the host.
    x and baselines must be on the model's device. The model is put in eval mode (and left
    as it was found); gradients are enabled here only, even under the caller's no_grad or
    inference mode."""
    from captum.attr import IntegratedGradients  # optional heavy import: only --saliency needs it

    was_training = model.training
    model.eval()
    scorer = ExpectedScore(model, target)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x, baselines = x.detach().float().clone(), baselines.detach().float().clone()
            attr, delta = IntegratedGradients(scorer).attribute(
                x, baselines=baselines, n_steps=int(steps), internal_batch_size=max(int(batch_size), len(x)),
                return_convergence_delta=True)
            with torch.no_grad():
                score = scorer(x)
    finally:
        model.train(was_training)
    return attr.detach().float().cpu(), delta.detach().float().cpu(), score.detach().float().cpu()


def heat_map(attr: np.ndarray, smooth: float | None = None) -> np.ndarray:
    """Attribution magnitude of one image (3 x H x W -> H x W in 0-1): |a| summed over the
    colour channels, lightly smoothed (sigma = `smooth`, default size/64, at least 0.5 px:
    integrated gradients are speckled pixel by pixel) and scaled so that its HEAT_PERCENTILE
    is 1. All zeros when the score does not depend on the pixels."""
    heat = torch.as_tensor(np.abs(np.asarray(attr, dtype=np.float32)).sum(0))[None, None]
    heat = _gaussian(heat, smooth if smooth is not None else max(0.5, min(heat.shape[-2:]) / 64))[0, 0].numpy()
    top = float(np.percentile(heat, HEAT_PERCENTILE))
    if not math.isfinite(top) or top <= 0:
        top = float(heat.max())
    if not math.isfinite(top) or top <= 0:
        return np.zeros_like(heat)
    return np.clip(heat / top, 0.0, 1.0)


def model_views(sources: list, info: dict) -> tuple[list[torch.Tensor | None], list[np.ndarray | None]]:
    """Each source (a path, bytes, {'bytes', 'path'} or a PIL image) through the model's eval
    transform: (normalised 3 x S x S tensors, the same views as S x S x 3 floats in 0-1);
    None for an unreadable one."""
    transform = eval_transform(info)
    size = int(info["image_size"])
    mean = np.asarray(info["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(info["std"], dtype=np.float32)[:, None, None]
    tensors, views = [], []
    for src in sources:
        try:
            x = transform(load_image(src, draft_size=size * 2))
        except UnreadableImage:
            tensors.append(None)
            views.append(None)
            continue
        tensors.append(x)
        views.append(np.clip(x.numpy() * std + mean, 0.0, 1.0).transpose(1, 2, 0))
    return tensors, views


def saliency_maps(model: nn.Module, info: dict, sources: list, device, options: SaliencyOptions) -> SaliencyResult:
    """Integrated-gradients maps of the expected score for every source, in chunks of
    `options.batch_size` images on `device` (where the model already is)."""
    start = time.perf_counter()
    device = torch.device(device)
    tensors, views = model_views(sources, info)
    n = len(sources)
    attributions, heat, scores, deltas = [None] * n, [None] * n, [None] * n, [None] * n
    ok = [i for i, t in enumerate(tensors) if t is not None]
    target = target_of(info)
    for c in range(0, len(ok), options.batch_size):
        rows = ok[c: c + options.batch_size]
        x = torch.stack([tensors[i] for i in rows]).to(device)
        base = baseline_for(x, options.baseline, info["mean"], info["std"])
        attr, delta, score = integrated_gradients(model, target, x, base, options.steps, options.batch_size)
        for j, i in enumerate(rows):
            attributions[i] = attr[j].numpy()
            heat[i] = heat_map(attributions[i])
            scores[i], deltas[i] = float(score[j]), float(delta[j])
    return SaliencyResult(views, attributions, heat, scores, deltas, time.perf_counter() - start)


def overlay(view: np.ndarray, heat: np.ndarray, size: int, alpha: float = OVERLAY_ALPHA,
            cmap: str = COLORMAP) -> Image.Image:
    """The view (H x W x 3 in 0-1) with the heat map (H x W in 0-1) blended over it, fitted to
    `size` px: a view that fits is enlarged by a whole factor with nearest-neighbour (the
    report's thumbnails do the same), the map bilinearly. The image is shown in grey so
    that every colour on the tile is the map's; the map's opacity grows with its value."""
    h, w = heat.shape
    factor = size // max(h, w)
    out_wh = (w * factor, h * factor) if factor >= 1 else _contain(w, h, size)
    method = Image.Resampling.NEAREST if factor >= 1 else Image.Resampling.LANCZOS
    base = Image.fromarray((view * 255).round().astype(np.uint8)).convert("L").resize(out_wh, method)
    grey = np.asarray(base, dtype=np.float32)[..., None].repeat(3, axis=2) / 255.0
    hot = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(out_wh, Image.Resampling.BILINEAR))
    hot = np.clip(hot, 0.0, 1.0)
    colours = matplotlib.colormaps[cmap](hot)[..., :3]
    a = (alpha * np.sqrt(hot))[..., None]  # sqrt: the moderate part of a map stays visible
    blend = grey * 0.85 * (1 - a) + colours * a
    return Image.fromarray((np.clip(blend, 0, 1) * 255).round().astype(np.uint8))


def overlay_tile(view, heat, size: int, background=(235, 235, 235)) -> Image.Image | None:
    """`overlay` centred on a size x size tile (the report's grid cell); None for an
    unreadable image (view None)."""
    if view is None or heat is None:
        return None
    img = overlay(view, heat, size)
    tile = Image.new("RGB", (size, size), background)
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile


def _gaussian(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """t (N x C x H x W) under a Gaussian of `sigma` px, reflected at the borders; the kernel
    spans 3 sigma each way, or the largest odd size the image allows (unchanged below 3)."""
    k = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(t.shape[-2:]) - 1) // 2) + 1)
    return t if sigma <= 0 or k < 3 else gaussian_blur(t, [k, k], [sigma, sigma])


def _contain(w: int, h: int, box: int) -> tuple[int, int]:
    scale = box / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))
