"""The CUDA path end to end: train (image and embedding mode, bf16), kill and resume, export
and report on the GPU. Skipped where CUDA is absent (CI, the CPU development machines); run
it whenever a GPU is at hand:  .venv/bin/python -m pytest -q tests/test_gpu.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, data_args, kill_then_resume, read_metrics, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = [a for a in TINY if not a.startswith("data.num_workers")] + ["data.num_workers=2", "train.mixed_precision=bf16"]


@pytest.mark.parametrize("algorithm", ["fixmatch", "flexmatch", "ordinal", "meanteacher"])
def test_image_mode_trains_and_resumes_on_cuda_bf16(algorithm, toy_data, tmp_path):
    common = ["--config", ROOT / "configs/demo.yaml", *GPU, *data_args(toy_data), "train.steps=6", "train.eval_every=3",
              "train.save_every=3", f"algorithm.name={algorithm}"]
    run_script("train.py", *common, f"output_dir={tmp_path / 'whole'}")
    run_json = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert run_json["device"].startswith("cuda") and run_json["mixed_precision"] == "bf16"
    assert kill_then_resume(common, tmp_path / "broken", kill_at=4, in_process=False).returncode == 137
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "broken")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [3, 6]
    # cuDNN/cuBLAS kernels are not bitwise deterministic: close, not equal
    assert all(np.isfinite(m["mae"]) for m in a + b)
    assert abs(a[-1]["mae"] - b[-1]["mae"]) < 0.5


def test_embedding_mode_on_cuda_bf16(toy_data, tmp_path):
    run = tmp_path / "emb"
    run_script("train.py", "--config", ROOT / "configs/embed_demo.yaml", *GPU, *data_args(toy_data), "train.steps=6",
               "train.eval_every=3", "train.save_every=3", "embed.views=1", "model.head_hidden=32",
               f"embed.cache_dir={tmp_path / 'cache'}", f"output_dir={run}")
    m = read_metrics(run)
    assert [x["step"] for x in m] == [3, 6] and np.isfinite(m[-1]["mae"])
    assert json.loads((run / "run.json").read_text())["device"].startswith("cuda")


def test_export_and_report_on_cuda(toy_data, tmp_path):
    run = tmp_path / "run"
    run_script("train.py", "--config", ROOT / "configs/demo.yaml", *GPU, *data_args(toy_data), "train.steps=3",
               "train.eval_every=3", f"output_dir={run}")
    out = tmp_path / "export"
    run_script("export.py", "--model", run, "--images", toy_data["unlabeled"], "--out", out, "--top", "5",
               "--device", "cuda", "--precision", "bf16", "--workers", "2")
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / "part-*.parquet"), split="train")
    probs = np.array([[r[f"prob_{b}"] for b in range(11)] for r in ds])
    assert len(ds) == 48 and np.allclose(probs.sum(1), 1, atol=1e-3)
    rep = tmp_path / "report"
    run_script("report.py", run, "--data", toy_data["test"], "--pool", toy_data["unlabeled"], "--out", rep,
               "--device", "cuda", "--precision", "bf16")
    metrics = json.loads((rep / "metrics.json").read_text())
    assert (rep / "report.html").stat().st_size > 10_000 and metrics
