"""report.py --saliency: integrated-gradients maps beside the report's grid images.

Two tiny runs (image mode and embedding mode, a few supervised steps each) are reported on
with --saliency: every grid of both runs carries a map beside each thumbnail and the page
stays self-contained. The maps themselves are checked on the loaded models (shape,
finite, not constant, completeness, the gradient reaching the pixels through a frozen
backbone) and on a hand-made model whose score reads one corner of the image only.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from aessl import report as report_module
from aessl.models import load_model_folder
from aessl.saliency import (BASELINES, SaliencyOptions, baseline_for, heat_map, integrated_gradients, overlay_tile,
                            saliency_maps)
from aessl.targets import get_target
from conftest import EMB, data_args, report_main, toy_image, train_in_process
from test_report import external_references

GRID_TITLES = ("Top images by predicted score", "Worst false positives", "Worst misses")
SIZE = 192  # report.THUMB_PX: one tile of a grid
CELL_W, CELL_H, PAD = 2 * SIZE + 4 + 12, SIZE + 40, 12  # a (thumbnail, map) pair and its caption, in the grid PNG


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("saliency_runs")
    common = [*data_args(toy_data), "algorithm.name=supervised", "train.steps=3", "train.eval_every=3",
              "train.save_every=3"]
    assert train_in_process(*common, f"output_dir={root / 'img'}") == 0
    assert train_in_process(*common, *EMB, f"embed.cache_dir={root / 'cache'}", f"output_dir={root / 'emb'}") == 0
    return {"img": root / "img", "emb": root / "emb"}


def _grid_png(page: str, title: str, run: str) -> Image.Image:
    uri = re.search(rf"<img alt='{re.escape(title)} {run}' src='data:image/png;base64,([^']+)'>", page).group(1)
    return Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB")


def _warmth(region: np.ndarray) -> float:
    """How far the most orange pixel of a region is from grey (red minus blue, 0-255)."""
    return float((region[..., 0].astype(int) - region[..., 2].astype(int)).max())


def test_report_with_saliency_shows_a_map_beside_every_grid_image(runs, toy_data, tmp_path):
    out = tmp_path / "rep"
    assert report_main()([str(runs["img"]), str(runs["emb"]), "--data", str(toy_data["test"]), "--out", str(out),
                          "--workers", "0", "--grid", "4", "--saliency", "--saliency-steps", "8"]) == 0
    page = (out / "report.html").read_text()
    assert external_references(page) == []
    assert "Right of each thumbnail: its saliency map" in page and "the image blurred" in page

    for run in ("img", "emb"):
        for title in GRID_TITLES:
            grid = np.asarray(_grid_png(page, title, run))
            assert grid.shape[1] == PAD + 3 * CELL_W  # three (thumbnail, map) pairs a row
            for i in range(4):
                r, c = divmod(i, 3)
                x0, y0 = PAD + c * CELL_W, PAD + r * CELL_H
                thumb = grid[y0 + 4: y0 + SIZE - 4, x0 + 4: x0 + SIZE - 4]
                heat = grid[y0 + 4: y0 + SIZE - 4, x0 + SIZE + 8: x0 + 2 * SIZE]
                # toy images are grey plus a red stripe (red - blue <= 90); the map is orange-yellow on grey
                assert _warmth(thumb) <= 95 and _warmth(heat) > 110, (run, title, i)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["saliency"] == {"method": "integrated_gradients", "baseline": "blur", "steps": 8,
                                   "target": "expected score"}
    for run in ("img", "emb"):
        s = metrics["runs"][run]["saliency"]
        assert s["images"] >= 4 and s["unreadable"] == 0 and np.isfinite(s["max_abs_convergence_delta"])


def test_without_saliency_nothing_is_computed(runs, toy_data, tmp_path, monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("saliency computed without --saliency")

    monkeypatch.setattr(report_module, "saliency_maps", refuse)
    out = tmp_path / "plain"
    assert report_main()([str(runs["emb"]), "--data", str(toy_data["test"]), "--out", str(out), "--workers", "0",
                          "--grid", "2"]) == 0
    page = (out / "report.html").read_text()
    assert "saliency map" not in page and json.loads((out / "metrics.json").read_text())["saliency"] is None
    assert np.asarray(_grid_png(page, GRID_TITLES[0], "emb")).shape[1] == PAD + 2 * (SIZE + PAD)  # thumbnails only


@pytest.mark.parametrize("mode", ["img", "emb"])
def test_maps_of_trained_models_reach_the_pixels(runs, mode):
    """Image mode and embedding mode (through the frozen backbone): one attribution per pixel
    and channel, finite, not constant, adding up to score(image) - score(baseline)."""
    model, info = load_model_folder(runs[mode])
    rng = np.random.default_rng(3)
    images = [toy_image(b, rng) for b in (0, 5, 10)] + ["/no/such/file.png"]
    with torch.inference_mode():  # a caller in inference mode does not stop the gradients
        result = saliency_maps(model, info, images, "cpu", SaliencyOptions(steps=24, baseline="black", batch_size=16))
    assert result.views[-1] is None and result.heat[-1] is None and result.summary()["unreadable"] == 1
    size = info["image_size"]
    for attr, heat, view in zip(result.attributions[:3], result.heat[:3], result.views[:3]):
        assert attr.shape == (3, size, size) and view.shape == (size, size, 3) and heat.shape == (size, size)
        assert np.isfinite(attr).all() and attr.std() > 0 and np.abs(attr).max() > 0
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0) and heat.std() > 0
        assert overlay_tile(view, heat, SIZE).size == (SIZE, SIZE)
    x = torch.stack([torch.as_tensor((v - np.array(info["mean"])) / np.array(info["std"]), dtype=torch.float32)
                     .permute(2, 0, 1) for v in result.views[:3]])
    gain = _score(model, info, x) - _score(model, info, baseline_for(x, "black", info["mean"], info["std"]))
    sums = np.array([a.sum() for a in result.attributions[:3]])
    # completeness, up to the integral's error, which is what the report records as the delta
    np.testing.assert_allclose(sums - gain, result.deltas[:3], atol=1e-3 * max(1.0, float(np.abs(gain).max())))
    assert np.abs(result.deltas[:3]).max() < 0.5 * max(1.0, float(np.abs(gain).max()))
    assert not model.training and all(p.grad is None for p in model.parameters())


def _score(model, info, x) -> np.ndarray:
    with torch.no_grad():
        probs = get_target(info.get("target")).probs(model(x)["logits"])
    return (probs @ torch.arange(11.0)).numpy()


class CornerModel(nn.Module):
    """Classification logits whose expected score depends only on the mean of the top-left
    8 x 8 pixels: a model that looks at one place."""

    def forward(self, x):
        m = x[:, :, :8, :8].mean((1, 2, 3))
        return {"logits": torch.stack([-(3 * m - b / 2.5 + 2) ** 2 for b in range(11)], dim=1)}


@pytest.mark.parametrize("baseline", BASELINES)
def test_attributions_sit_where_the_score_looks(baseline):
    info = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    result = saliency_maps(CornerModel(), info, images, "cpu", SaliencyOptions(steps=16, baseline=baseline, batch_size=2))
    for attr, heat in zip(result.attributions, result.heat):
        assert np.abs(attr[:, :8, :8]).sum() / np.abs(attr).sum() > 0.999
        assert heat[:7, :7].mean() > 0.5 and heat[10:, 10:].max() < 0.01
    assert result.summary()["max_abs_convergence_delta"] < 1e-3


def test_a_constant_model_gives_an_empty_map_and_the_model_mode_is_restored():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.linspace(-1, 1, 11))

        def forward(self, x):
            return {"logits": self.bias.expand(len(x), 11) + 0 * x.mean((1, 2, 3))[:, None]}

    model = Constant().train()
    x = torch.zeros(2, 3, 16, 16)
    attr, delta, score = integrated_gradients(model, get_target(None), x, baseline_for(x, "blur", [0.5] * 3, [0.5] * 3),
                                              steps=4, batch_size=8)
    assert model.training and attr.shape == x.shape and float(attr.abs().max()) == 0
    assert np.all(heat_map(attr[0].numpy()) == 0)
    with pytest.raises(ValueError, match="baseline"):
        SaliencyOptions(baseline="white")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_maps_on_cuda_match_the_cpu(runs):
    rng = np.random.default_rng(4)
    images = [toy_image(b, rng) for b in (1, 9)]
    for mode in ("img", "emb"):
        maps = {}
        for device in ("cpu", "cuda"):
            model, info = load_model_folder(runs[mode], device=device)
            maps[device] = saliency_maps(model, info, images, device, SaliencyOptions(steps=8))
        for a, b in zip(maps["cpu"].attributions, maps["cuda"].attributions):
            # TF32 convolutions on the GPU: close, not equal
            np.testing.assert_allclose(a, b, atol=0.02 * np.abs(a).max() + 1e-5)
