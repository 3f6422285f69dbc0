"""data.balance_labeled: labeled images drawn with weight (bracket count)^-power."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_scored_set, train_in_process

from aessl import data as data_module
from aessl import modes
from aessl.metrics import bracket_of


def test_weights_follow_brackets_of_fractional_scores():
    scores = [0.4, 0.6, 1.2, 9.5, 9.6, 9.7, 10.0]  # brackets 0, 1, 1, 10, 10, 10, 10
    assert data_module.balance_weights(scores, 0.0) is None
    w = data_module.balance_weights(scores, 1.0)
    b = bracket_of(scores)
    mass = {k: w[b == k].sum() for k in (0, 1, 10)}
    assert mass == pytest.approx({0: 1 / 3, 1: 1 / 3, 10: 1 / 3})
    half = data_module.balance_weights(scores, 0.5)  # 4x the rows -> 2x the draws
    assert half[b == 10].sum() / half[b == 0].sum() == pytest.approx(2.0)


def test_uniform_order_is_the_plain_permutation_and_weighted_order_is_reproducible():
    legacy = np.random.default_rng([3, 0, 7]).permutation(50)  # what every run drew before the option
    assert np.array_equal(data_module.draw_order(50, 3, 0, 7), legacy)
    w = data_module.balance_weights(np.r_[np.zeros(45), np.full(5, 9.0)], 1.0)
    a, b = data_module.draw_order(50, 3, 0, 7, w), data_module.draw_order(50, 3, 0, 7, w)
    assert np.array_equal(a, b) and not np.array_equal(a, data_module.draw_order(50, 3, 0, 8, w))


def test_a_training_run_draws_rare_brackets_as_often_as_common_ones(tmp_path, monkeypatch):
    labeled = make_scored_set(tmp_path / "labeled", per_bracket=12, brackets=range(3, 8))
    make_scored_set(tmp_path / "labeled", per_bracket=2, brackets=(0, 1, 2, 8, 9, 10), seed=1)
    test = make_scored_set(tmp_path / "test", per_bracket=1, seed=5)
    made = []

    class Recorded(modes.DrawDataset):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(modes, "DrawDataset", Recorded)
    assert train_in_process(f"data.labeled={labeled}", f"data.test={test}", "algorithm.name=supervised",
                            "train.steps=2", "train.eval_every=2", "data.balance_labeled=1.0",
                            f"output_dir={tmp_path / 'run'}") == 0
    (lab,) = [d for d in made if d.kind == "labeled"]
    drawn = bracket_of(lab.scores[np.concatenate([lab._permutation(e) for e in range(200)])])
    share = np.bincount(drawn, minlength=11) / len(drawn)
    assert share == pytest.approx(np.full(11, 1 / 11), abs=0.01)  # uniform draws would give 2/72 to bracket 0
