"""OrdinalMatch on hand-made predictions, its checkpointed state, and a resumed run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aessl import algorithms as algos
from aessl.metrics import accepted_by_threshold
from aessl.models import build_model
from aessl.algos.ordinal import soft_targets, window_mass
from conftest import ROOT, TINY, data_args, kill_then_resume, read_metrics, script_in_process

PRIOR = np.array([31, 162, 533, 675, 690, 576, 228, 95, 54, 29, 7], dtype=float)
PRIOR = PRIOR / PRIOR.sum()


def make(**args):
    model, _ = build_model({"name": "test_resnet", "pretrained": False}, 32)
    return algos.build_algorithm("ordinal", model, user_args=args, num_train_iter=100, lambda_u=1.0,
                                 ulb_dest_len=100, lb_dest_len=100, lb_prior=PRIOR)


def split_67(n=8):
    p = torch.full((n, 11), 0.05 / 9)
    p[:, 6], p[:, 7] = 0.48, 0.47
    return p


def test_a_6_vs_7_split_is_confident():
    probs = split_67()
    conf, bracket = window_mass(probs, radius=1)
    assert torch.allclose(conf, torch.full_like(conf, 0.95 + 0.05 / 9), atol=1e-6) and (bracket == 6).all()
    # FixMatch's rule (max prob >= 0.95) throws every one of them away; ours keeps them at 0.9
    assert not accepted_by_threshold(probs.numpy(), [0.95] * 11).any()
    assert accepted_by_threshold(probs.numpy(), [0.9] * 11, radius=1).all()
    algo = make(dist_align=False)
    algo.global_level = torch.tensor(0.9)
    mask, _, _ = algo.select(probs)
    assert mask.all()
    assert not make(dist_align=False, ordinal_conf=False).select(probs)[0].any()  # ablation: max prob


def test_soft_targets_are_ordinal_and_sharpen_with_T():
    p = torch.zeros(1, 11)
    p[0, 4], p[0, 5], p[0, 9] = 0.5, 0.3, 0.2
    t = soft_targets(p, T=0.5, sigma=0.6)
    assert torch.allclose(t.sum(-1), torch.ones(1))
    assert t[0, 3] > t[0, 0] and t[0, 6] > t[0, 8]  # mass flows to neighbours, not far brackets
    sharper = soft_targets(p, T=0.25, sigma=0.6)
    assert sharper[0, 4] > t[0, 4] and sharper[0, 9] < t[0, 9]
    plain = soft_targets(p, T=0.5, sigma=None)
    assert plain[0, 3] < 1e-12 and torch.allclose(plain.sum(-1), torch.ones(1))


def test_rare_bracket_keeps_its_share_of_pseudo_labels():
    """Bracket 9 is rare in the pool and predicted less confidently; the per-bracket
    thresholds must give it pseudo-labels near its share of the accepted ones."""
    g = torch.Generator().manual_seed(0)

    def batch(n=256):
        b = torch.multinomial(torch.tensor(PRIOR, dtype=torch.float32), n, replacement=True, generator=g)
        sharp = torch.where(b == 9, 1.2, 4.0)  # the rare bracket is less confident
        logits = -sharp[:, None] * (torch.arange(11)[None, :] - b[:, None]).abs().float()
        logits += 0.6 * torch.randn(n, 11, generator=g)
        return logits.softmax(-1), b

    def share_of_9(algo, steps=400):
        got = []
        for i in range(steps):
            probs, b = batch()
            mask, _, bracket = algo.select(probs)
            if i >= steps - 100 and mask.sum() > 0:
                got.append(float((bracket[mask.bool()] == 9).float().mean()))
        return float(np.mean(got))

    ours = share_of_9(make(dist_align=False, thresh_min=0.3))
    single = share_of_9(make(dist_align=False, thresh_min=0.3, per_bracket_threshold=False))
    assert single < 0.3 * PRIOR[9]  # one threshold starves it
    assert 0.5 * PRIOR[9] < ours < 2.0 * PRIOR[9]  # per-bracket thresholds restore its share


def test_distribution_alignment_pulls_toward_the_prior():
    algo = make(da_momentum=0.9)
    skewed = torch.full((64, 11), 0.01)
    skewed[:, 5] = 0.9  # the model says "5" for everything
    for _ in range(60):
        aligned = algo.align(skewed / skewed.sum(-1, keepdim=True))
    before = skewed[0] / skewed[0].sum()
    prior = torch.tensor(PRIOR, dtype=torch.float32)
    assert (aligned.mean(0) - prior).abs().sum() < (before - prior).abs().sum()


def calibrated_posteriors(mix, n, seed):
    """Posteriors of a classifier calibrated to PRIOR (1-D features x ~ N(bracket, 1)) for n
    images whose brackets are drawn from `mix`."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.as_tensor(mix, dtype=torch.float32), n, replacement=True, generator=g)
    x = y.float() + torch.randn(n, generator=g)
    b = torch.arange(11, dtype=torch.float32)
    logits = -((x[:, None] - b[None, :]) ** 2) / 2 + torch.log(torch.tensor(PRIOR, dtype=torch.float32))
    return logits.softmax(-1)


def test_the_pools_bracket_mix_is_estimated_not_assumed():
    # a crawl-like pool: 4x the labeled share of brackets 0-1, fewer middling ones
    pool = PRIOR.copy()
    pool[:2] *= 4
    pool[3:5] *= 0.6
    pool /= pool.sum()
    algo = make(pool_prior="estimated", prior_momentum=0.9, dist_align=False)
    for step in range(500):  # EM moves slowly where brackets overlap: 500 batches of 128
        algo.align(calibrated_posteriors(pool, 128, step))
    est = algo.pool_estimate.numpy()
    # EM's estimate is close to the pool's mix, far closer than the labeled histogram is
    assert np.abs(est - pool).sum() < 0.25 * np.abs(PRIOR - pool).sum(), (est.round(3), pool.round(3))
    assert est[:2].sum() > 2.5 * PRIOR[:2].sum()
    # and that is what the thresholds share pseudo-labels out to; the default keeps the labeled prior
    assert torch.equal(algo.target_prior(), algo.pool_estimate)
    with pytest.raises(algos.AlgorithmArgumentError, match="pool_prior"):
        make(pool_prior="crawl")
    plain = make()
    plain.align(calibrated_posteriors(pool, 256, 0))
    assert torch.allclose(plain.target_prior(), torch.tensor(PRIOR, dtype=torch.float32))


def test_the_estimate_cannot_run_away_to_a_rare_bracket():
    # a model that over-predicts bracket 10 (0.2% of the labels) makes EM see a pool full of
    # it; on a real run, where the model then trains toward that estimate, it reached 70%
    def biased(n, seed):
        logp = calibrated_posteriors(PRIOR, n, seed).log()
        logp[:, 10] += 3.0
        return logp.softmax(-1)

    free = make(pool_prior="estimated", prior_max_ratio=1e9, dist_align=False)
    held = make(pool_prior="estimated", dist_align=False)
    for step in range(300):
        free.align(biased(128, step))
        held.align(biased(128, step))
    assert free.pool_estimate[10] > 10 * PRIOR[10]  # EM alone takes it to ~20x its labeled share
    assert held.pool_estimate[10] <= 4 * PRIOR[10] * 1.001 and (held.pool_estimate.numpy() >= PRIOR / 4 * 0.999).all()
    assert abs(float(held.pool_estimate.sum()) - 1) < 1e-5


def test_state_survives_state_dict_round_trip():
    a = make(pool_prior="estimated")
    for _ in range(5):
        a.select(split_67(16))
        a.align(split_67(16))
    state = algos.AlgorithmState(a).state_dict()
    b = make(pool_prior="estimated")
    algos.AlgorithmState(b).load_state_dict(state)
    for name in ("global_level", "offset", "accepted_share", "p_model", "pool_estimate"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.current_thresholds(), b.current_thresholds())


def test_ordinal_run_resumes_to_the_same_metrics(toy_data, tmp_path):
    common = ["--config", ROOT / "configs/demo.yaml", *TINY, *data_args(toy_data), "train.steps=4",
              "train.eval_every=2", "train.save_every=2", "algorithm.name=ordinal", "algorithm.args.thresh_min=0.2",
              "algorithm.args.pool_prior=estimated"]  # its running estimate is checkpointed state too
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert script_in_process("train.py", *common, f"output_dir={whole}") == 0
    assert kill_then_resume(common, broken, kill_at=3).returncode == 137
    assert read_metrics(whole) == read_metrics(broken)
    m = read_metrics(whole)[-1]
    assert "threshold_9" in m and "pseudo_rate_9" in m and m["pseudo_label_rate"] > 0
    cfg = json.loads((whole / "model" / "config.json").read_text())
    assert cfg["confidence_radius"] == 1 and len(cfg["thresholds"]) == 11
