"""The target seam (aessl/targets.py): regression and ordinal (CORN) targets train and
resume, and export and report read their models through the same code as a classifier's,
unchanged."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, data_args, read_metrics, report_main, run_script, train_in_process, train_until_killed

from aessl import export as ex
from aessl.config import ConfigError, load_config
from aessl.metrics import expected_score
from aessl.models import load_model_folder
from aessl.targets import Ordinal, Regression, get_target, two_hot


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


def test_ordinal_probabilities_are_the_differences_of_corns_cumulative_ones():
    target = Ordinal()
    assert target.outputs == 10
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(64, 10) * 4, torch.full((2, 10), 80.0), torch.full((2, 10), -80.0)])
    p = target.probs(logits.to(torch.bfloat16))  # (a bf16 autocast's output comes back float32)
    assert p.dtype == torch.float32 and p.shape == (68, 11) and (p >= 0).all()
    assert torch.allclose(p.sum(1), torch.ones(68), atol=1e-6)
    above = torch.cumprod(torch.sigmoid(logits.to(torch.bfloat16).double()), dim=1)  # P(bracket > k), k = 0..9
    diff = torch.cat([1 - above[:, :1], above[:, :-1] - above[:, 1:], above[:, -1:]], dim=1)
    assert torch.allclose(p.double(), diff, atol=1e-6)
    assert torch.allclose(p.double().flip(1).cumsum(1).flip(1)[:, 1:], above, atol=1e-6)  # tail mass = P(> k)
    assert p[64:66, 10].min() == 1 and p[66:, 0].min() == 1  # all 'above' / all 'not above'


def test_ordinal_loss_trains_each_row_toward_its_bracket():
    target = Ordinal()
    bracket = torch.tensor([0, 1, 4, 7, 10])
    out = torch.zeros(5, 10, requires_grad=True)
    target.loss(out, bracket.float() + 0.3, bracket).backward()  # (reads the bracket, not the score)
    k = torch.arange(10)
    below, at, past = k < bracket[:, None], k == bracket[:, None], k > bracket[:, None]
    # CORN's tasks 'bracket > k': pushed up below the bracket, down at it, untouched past it
    assert (out.grad[below] < 0).all() and (out.grad[at] > 0).all() and (out.grad[past] == 0).all()
    opt = torch.optim.Adam([out], lr=0.3)
    for _ in range(100):
        opt.zero_grad()
        target.loss(out, bracket.float(), bracket).backward()
        opt.step()
    p = target.probs(out.detach())
    assert torch.equal(p.argmax(1), bracket) and (p.max(1).values > 0.9).all()
    assert torch.allclose(expected_score_t(p), bracket.float(), atol=0.3)


def test_regression_and_ordinal_targets_refuse_what_they_cannot_train(toy_data, tmp_path):
    with pytest.raises(ConfigError, match="algorithm.name=supervised or ordinal only"):
        load_config(None, ["model.target=regression", "algorithm.name=fixmatch"])
    with pytest.raises(ConfigError, match="model.target=ordinal trains with algorithm.name=supervised or ordinal only, not algorithm.name=fixmatch"):
        load_config(None, ["model.target=ordinal", "algorithm.name=fixmatch"])
    # the ordinal *target* (CORN head) inside the ordinal *algorithm* (OrdinalMatch) is allowed
    assert load_config(None, ["model.target=ordinal", "algorithm.name=ordinal"]).algorithm.name == "ordinal"
    with pytest.raises(ConfigError, match="algorithm.name=rankmatch: rankmatch's losses"):
        load_config(None, ["model.target=regression", "algorithm.name=rankmatch"])
    with pytest.raises(ConfigError, match="data.pseudo_labels"):
        load_config(None, ["model.target=ordinal", "algorithm.name=supervised", "data.pseudo_labels=/some/export"])
    assert load_config(None, ["model.target=ordinal", "algorithm.name=supervised"]).model.target == "ordinal"
    with pytest.raises(ConfigError, match="model.target"):
        load_config(None, ["model.target=ordinal_corn"])
    proc = run_script("train.py", "model.target=regression", "algorithm.name=fixmatch", *data_args(toy_data),
                      f"output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "supervised or ordinal only" in proc.stderr
    assert not (tmp_path / "run").exists()


# CORN's loss is a mean over each image's binary tasks ('bracket > k', about five of them),
# so each logit moves slower than regression's one output: at 0.003 its 40 image-mode steps
# reach a QWK of 0.68, at 0.01 0.96
LR = {"classification": 0.003, "regression": 0.003, "ordinal": 0.01}


# (classification in image mode is every other test's run: test_train.py kills, resumes, exports it)
@pytest.mark.parametrize("target,mode", [("regression", "image"), ("ordinal", "image"), ("classification", "embedding"),
                                         ("regression", "embedding"), ("ordinal", "embedding")])
def test_a_target_trains_resumes_and_export_and_report_read_it_unchanged(target, mode, toy_data, tmp_path):
    run = tmp_path / "run"
    extra = [f"model.target={target}", "algorithm.name=supervised", *data_args(toy_data), "train.steps=40",
             "train.eval_every=20", "train.save_every=20", f"train.lr={LR[target]}"]
    if mode == "embedding":
        extra += ["model.mode=embedding", "model.head=mlp", "model.head_hidden=32", f"embed.cache_dir={tmp_path / 'c'}"]
    assert train_in_process(*extra, f"output_dir={run}") == 0
    m = read_metrics(run)
    assert [x["step"] for x in m] == [20, 40]
    assert m[-1]["qwk"] > 0.5  # the toy brackets are easy; a model that learns nothing scores ~0
    info = json.loads((run / "model" / "config.json").read_text())
    assert info["target"] == target and info["thresholds"] == []

    # killed after step 20's checkpoint and resumed, the run ends where the whole one did
    broken = tmp_path / "broken"
    killed = train_until_killed(["--config", ROOT / "configs" / "demo.yaml", *TINY, *extra], broken, kill_at=20)
    assert killed.returncode == 137
    assert train_in_process(*extra, f"output_dir={broken}", "resume=true") == 0
    assert read_metrics(broken) == m

    # the loaded model gives the target's outputs, which export turns into probabilities
    model, info = load_model_folder(run)
    outputs = get_target(info["target"]).outputs
    assert outputs == {"classification": 11, "regression": 1, "ordinal": 10}[target]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32))["logits"].shape == (2, outputs)
    out = tmp_path / "export"
    assert ex.main(["--model", str(run), "--images", str(toy_data["unlabeled"]), "--out", str(out),
                    "--workers", "0"]) == 0
    rows = datasets.load_dataset("parquet", data_files=str(out / "part-*.parquet"), split="train")
    probs = np.stack([rows[f"prob_{b}"] for b in range(11)], axis=1)
    assert len(rows) == 48 and np.allclose(probs.sum(1), 1, atol=1e-5) and (probs >= 0).all()
    if target == "regression":
        assert ((probs > 1e-6).sum(1) <= 2).all()  # two brackets around each score
    assert np.allclose(expected_score(probs), rows["expected_score"], atol=1e-4)
    assert np.ptp(rows["expected_score"]) > 1.0  # scores spread over the range, not one constant

    # report scores the test set as training's evaluation did
    rep = tmp_path / "report"
    assert report_main()([str(run), "--data", str(toy_data["test"]), "--out", str(rep), "--workers", "0"]) == 0
    got = json.loads((rep / "metrics.json").read_text())["runs"]["run"]["metrics"]
    assert got["qwk"] == pytest.approx(m[-1]["qwk"], abs=0.02)
    assert got["mae"] == pytest.approx(m[-1]["mae"], abs=0.02)


@pytest.mark.parametrize("target", ["ordinal", "regression"])
def test_the_ordinal_algorithm_trains_a_non_classification_head_on_the_pool(target, toy_data, tmp_path):
    """OrdinalMatch reads the head through the target's probabilities: its pseudo-labels,
    thresholds and losses work on a CORN or a regression head, with worker processes."""
    run = tmp_path / "run"
    assert train_in_process(f"model.target={target}", "algorithm.name=ordinal", *data_args(toy_data), "train.steps=40",
                            "train.eval_every=40", f"train.lr={LR[target]}", "data.num_workers=2",
                            "algorithm.args.thresh_min=0.5", f"output_dir={run}") == 0
    m = read_metrics(run)[-1]
    assert m["qwk"] > 0.5
    assert m["pseudo_label_rate"] > 0 and "threshold_5" in m  # the pool reached the loss
    info = json.loads((run / "model" / "config.json").read_text())
    assert info["target"] == target and len(info["thresholds"]) == 11
