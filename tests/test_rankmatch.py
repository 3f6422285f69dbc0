"""RankMatch (aessl/algos/rankmatch.py): the pairwise ranking term, and the algorithm in the loop."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import data_args, read_metrics, train_in_process

from aessl.algos.rankmatch import pairwise_rank_loss


def test_rank_loss_uses_only_pairs_ordered_by_more_than_the_margin():
    t = torch.tensor([0.0, 1.5, 3.0, 3.2])
    s = torch.zeros(4, requires_grad=True)
    loss, n = pairwise_rank_loss(s, t, margin=1.0, tau=1.0)
    # ordered pairs with t_i - t_j > 1: (1,0), (2,0), (3,0), (2,1), (3,1); not (3,2) (0.2 apart)
    assert n == 5
    assert loss.item() == pytest.approx(math.log(2))  # every score equal: softplus(0)
    loss.backward()
    # each score is pushed toward the order of t: the highest target up, the lowest down
    assert s.grad[0] > 0 and s.grad[2] < 0 and s.grad[3] < 0
    ordered = torch.tensor([0.0, 3.0, 6.0, 9.0])
    assert pairwise_rank_loss(ordered, t, 1.0, 1.0)[0] < pairwise_rank_loss(ordered.flip(0), t, 1.0, 1.0)[0]


def test_rank_loss_without_pairs_is_zero_and_keeps_the_graph():
    s = torch.ones(3, requires_grad=True)
    loss, n = pairwise_rank_loss(s, torch.tensor([2.0, 2.1, 2.2]), margin=1.0, tau=1.0)
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # no error: the loss is part of the graph
    assert torch.equal(s.grad, torch.zeros(3))


def test_rankmatch_trains_and_its_ranking_term_changes_the_model(toy_data, tmp_path):
    common = [*data_args(toy_data), "algorithm.name=rankmatch", "train.steps=4", "train.eval_every=4",
              "train.save_every=4", "algorithm.args.p_cutoff=0.0"]
    runs = {w: tmp_path / f"w{w}" for w in (0, 1)}
    for w, run in runs.items():
        assert train_in_process(*common, f"algorithm.args.rank_weight={w}", f"output_dir={run}") == 0
    m = read_metrics(runs[1])[-1]
    assert m["step"] == 4 and math.isfinite(m["mae"]) and m["rank_loss"] > 0 and 0 < m["rank_pair_rate"] <= 1
    info = json.loads((runs[1] / "model" / "config.json").read_text())
    assert info["algorithm"] == "rankmatch" and info["thresholds"] == [0.0] * 11  # FixMatch's p_cutoff, exported
    a, b = (load_file(str(runs[w] / "model" / "model.safetensors")) for w in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same seed and batches: only the ranking term differs


def test_labels_only_ablation_never_reads_the_pool(toy_data, tmp_path):
    """benchmarks/ssl_gain.py's rankmatch-labels_only row (lambda_u=0, no unlabeled pair can
    be 1,000 brackets apart) is the labels with a ranking term: with a LayerNorm model (the
    benchmark's test_convnext3) the pool it is given changes nothing, while RankMatch's
    pool ranking does change the model when the pool changes."""
    from conftest import make_pool

    other_pool = make_pool(tmp_path / "other_pool", n=48, seed=7)
    common = [*data_args(toy_data), "model.name=test_convnext3", "algorithm.name=rankmatch", "train.steps=3",
              "train.eval_every=3", "train.save_every=3", "algorithm.args.p_cutoff=0.0"]

    def weights(pool, *extra):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert train_in_process(*common, f"data.unlabeled={pool}", *extra, f"output_dir={run}") == 0
        return load_file(str(run / "model" / "model.safetensors"))

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    labels_only = ["algorithm.lambda_u=0", "algorithm.args.rank_margin=1000"]
    assert same(weights(toy_data["unlabeled"], *labels_only), weights(other_pool, *labels_only))
    ranked = ["algorithm.lambda_u=0", "algorithm.args.rank_margin=0.1"]
    assert not same(weights(toy_data["unlabeled"], *ranked), weights(other_pool, *ranked))


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_rankflexmatch_exports_flexmatchs_per_bracket_thresholds(floor, toy_data, tmp_path):
    """RankMatch on FlexMatch: the ranking term trains, and the thresholds exported are
    FlexMatch's per-bracket ones (p_cutoff x each bracket's learning effect, in [0, p_cutoff]),
    not FixMatch's p_cutoff for every bracket; with thresh_min, none below it. (Resuming
    FlexMatch's hooks: test_train.py.)"""
    run = tmp_path / "run"
    assert train_in_process(*data_args(toy_data), "algorithm.name=rankflexmatch", "train.steps=4", "train.eval_every=4",
                            "train.save_every=4", "algorithm.args.p_cutoff=0.5", f"algorithm.args.thresh_min={floor}",
                            f"output_dir={run}") == 0
    m = read_metrics(run)[-1]
    assert m["step"] == 4 and m["rank_loss"] > 0 and 0 <= m["pseudo_label_rate"] <= 1
    info = json.loads((run / "model" / "config.json").read_text())
    thr = info["thresholds"]
    assert info["algorithm"] == "rankflexmatch" and len(thr) == 11
    assert all(floor <= t <= 0.5 for t in thr) and thr != [0.5] * 11
    assert min(thr) == floor  # a bracket no pool image reached p_cutoff in: FlexMatch's 0, or the floor
    assert thr == [round(m[f"threshold_{b}"], 6) for b in range(11)]  # the last evaluation's, as logged


def test_rankflexmatch_floor_masks_what_falls_below_it():
    """thresh_min masks a pool image FlexMatch's own threshold (0 for an unlearned bracket)
    would accept, in training as in the exported thresholds."""
    from types import SimpleNamespace

    from aessl.algos.rankmatch import rank_step

    probs = torch.tensor([[0.9] + [0.01] * 10, [0.2] + [0.08] * 10])  # confident, unconfident
    logits = probs.log()

    class Algo(SimpleNamespace):
        def amp_cm(self):
            return contextlib.nullcontext()

        def model(self, x):
            return {"logits": torch.cat([logits[:1], logits, logits])}

        def call_hook(self, fn, hook, **kw):
            if fn == "masking":
                return torch.ones(len(kw["logits_x_ulb"]))  # FlexMatch with every threshold 0
            return kw["logits"].argmax(-1)

        def ce_loss(self, logits, y, reduction="mean"):
            return torch.nn.functional.cross_entropy(logits, y)

        def compute_prob(self, logits):
            return logits.softmax(-1)

        def consistency_loss(self, logits, targets, name, mask):
            self.mask = mask
            return logits.sum() * 0.0

        def process_out_dict(self, **kw):
            return kw

        def process_log_dict(self, **kw):
            return kw

    for floor, want in ((0.0, [1.0, 1.0]), (0.5, [1.0, 0.0])):
        algo = Algo(lambda_u=1.0, rank_weight=0.0, rank_margin=1.0, rank_tau=1.0, thresh_min=floor,
                    use_hard_label=True, T=1.0)
        _, log = rank_step(algo, torch.zeros(1, 3), torch.tensor([0]), torch.zeros(2, 3), torch.zeros(2, 3), None, {})
        assert algo.mask.tolist() == want and log["util_ratio"] == sum(want) / 2


def test_flexmatch_with_many_labels_gets_a_warning():
    """FlexMatch and FreeMatch fell below the labels alone from 924 labels on (docs/results.md): a run with
    that many says so; one with a few hundred, or another algorithm, does not."""
    from aessl.algorithms import label_count_advice

    assert label_count_advice("flexmatch", 309) is None
    assert label_count_advice("rankmatch", 3080) is None and label_count_advice("supervised", 3080) is None
    for name in ("flexmatch", "rankflexmatch", "freematch"):
        advice = label_count_advice(name, 924)
        assert advice and f"algorithm.name={name} with 924 training labels" in advice and "rankmatch" in advice


def test_window_pseudo_labels_accept_a_torn_teacher_and_forgive_a_neighbour():
    """pseudo_radius=1: a weak view torn between two neighbouring brackets is accepted (its
    window mass reaches p_cutoff where its argmax does not), and the strong view's loss is
    -log of its mass in that window: low for a neighbour of the argmax, high far away."""
    from aessl.algos._shared import window_mass
    from aessl.algos.rankmatch import window_nll

    torn = torch.tensor([[0.0] * 5 + [0.49, 0.49] + [0.02 / 4] * 4])
    conf, centre = window_mass(torn, 1)
    assert conf.item() >= 0.95 > torn.max().item() and centre.item() in (5, 6)
    one = torch.ones(1)
    near, far = torch.full((1, 11), -9.0), torch.full((1, 11), -9.0)
    near[0, centre.item() + 1], far[0, 0] = 9.0, 9.0  # sure of the next bracket / of bracket 0
    assert window_nll(near, centre, 1, one).item() < 1e-6
    assert window_nll(far, centre, 1, one).item() > 10
    assert window_nll(far, centre, 1, torch.zeros(1)).item() == 0.0  # not accepted: no loss
    assert window_nll(far, centre, 0, one) > 0 and window_nll(near, centre, 0, one) > 10  # radius 0: the bracket itself
