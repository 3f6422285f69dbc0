"""The target seam (aessl/targets.py): a regression target trains, and export and report
read its model through the same code as a classifier's, unchanged."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from conftest import data_args, read_metrics, report_main, run_script, train_in_process

from aessl import export as ex
from aessl.config import ConfigError, load_config
from aessl.metrics import expected_score
from aessl.models import load_model_folder
from aessl.targets import Regression, get_target, two_hot


def test_two_hot_is_a_distribution_whose_expectation_is_the_score():
    score = torch.tensor([0.0, 0.3, 4.5, 6.3, 9.99, 10.0, 12.0, -1.0])
    p = two_hot(score)
    assert p.shape == (8, 11) and (p >= 0).all()
    assert torch.allclose(p.sum(1), torch.ones(8))
    assert torch.allclose(p @ torch.arange(11.0), score.clamp(0, 10), atol=1e-6)
    assert p[3, 6] == pytest.approx(0.7) and p[3, 7] == pytest.approx(0.3)
    assert (p > 0).sum(1).max() <= 2  # at most the two brackets around the score


def test_regression_probabilities_give_back_its_score_and_its_loss_trains_it():
    target = Regression()
    out = torch.zeros(4, 1, requires_grad=True)
    score = torch.tensor([1.0, 4.0, 7.5, 9.0])
    loss = target.loss(out, score, score.round())
    loss.backward()
    assert torch.allclose(expected_score_t(target.probs(out)), target.score(out))
    assert torch.allclose(target.score(out), torch.full((4,), 5.0))
    # the gradient pushes each output toward its score: down below 5, up above it
    assert (out.grad[:, 0] * (score - 5.0).sign() < 0).all()


def expected_score_t(p: torch.Tensor) -> torch.Tensor:
    return p @ torch.arange(11.0)


def test_a_regression_target_refuses_what_it_cannot_train(toy_data, tmp_path):
    with pytest.raises(ConfigError, match="algorithm.name=supervised only"):
        load_config(None, ["model.target=regression", "algorithm.name=fixmatch"])
    with pytest.raises(ConfigError, match="model.target"):
        load_config(None, ["model.target=ordinal_corn"])
    proc = run_script("train.py", "model.target=regression", "algorithm.name=fixmatch", *data_args(toy_data),
                      f"output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "supervised only" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["image", "embedding"])
def test_regression_trains_and_export_and_report_read_it_unchanged(mode, toy_data, tmp_path):
    run = tmp_path / "run"
    extra = ["train.steps=40", "train.eval_every=20", "train.lr=0.003"]
    if mode == "embedding":
        extra += ["model.mode=embedding", "model.head=mlp", "model.head_hidden=32", f"embed.cache_dir={tmp_path / 'c'}"]
    assert train_in_process("model.target=regression", "algorithm.name=supervised", *data_args(toy_data), *extra,
                            f"output_dir={run}") == 0
    m = read_metrics(run)
    assert [x["step"] for x in m] == [20, 40]
    assert m[-1]["qwk"] > 0.5  # the toy brackets are easy; a model that learns nothing scores ~0
    info = json.loads((run / "model" / "config.json").read_text())
    assert info["target"] == "regression" and info["thresholds"] == []

    # the loaded model's one output, through the target, is what export writes
    model, info = load_model_folder(run)
    assert get_target(info["target"]).outputs == 1
    out = tmp_path / "export"
    assert ex.main(["--model", str(run), "--images", str(toy_data["unlabeled"]), "--out", str(out),
                    "--workers", "0"]) == 0
    rows = datasets.load_dataset("parquet", data_files=str(out / "part-*.parquet"), split="train")
    probs = np.stack([rows[f"prob_{b}"] for b in range(11)], axis=1)
    assert len(rows) == 48 and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert ((probs > 1e-6).sum(1) <= 2).all()  # two brackets around each score
    assert np.allclose(expected_score(probs), rows["expected_score"], atol=1e-4)
    assert np.ptp(rows["expected_score"]) > 1.0  # scores spread over the range, not one constant

    # report scores the test set as training's evaluation did
    rep = tmp_path / "report"
    assert report_main()([str(run), "--data", str(toy_data["test"]), "--out", str(rep), "--workers", "0"]) == 0
    got = json.loads((rep / "metrics.json").read_text())["runs"]["run"]["metrics"]
    assert got["qwk"] == pytest.approx(m[-1]["qwk"], abs=0.02)
    assert got["mae"] == pytest.approx(m[-1]["mae"], abs=0.02)
