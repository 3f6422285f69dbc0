"""RankMatch: FixMatch plus a pairwise ranking term on the expected score.

RankUp (NeurIPS 2024, pm25/Semi-Supervised-Regression) adds to FixMatch an auxiliary
ranking classifier trained on pairs: labeled pairs by their true order, unlabeled pairs
by the order the weak view predicts, applied to the strong view; its ablation credits
most of its gain to that term. Here the ranking reads the bracket head's own expected
score (sum_b p_b * b) instead of an extra head, so model/, export and report are unchanged:

    rank(s, t) = mean over pairs (i, j) with t_i - t_j > margin of softplus(-(s_i - s_j) / tau)

    loss = CE(labeled) + lambda_u * FixMatch(unlabeled)
         + rank_weight * (rank(s_lb, true scores, 0) + rank(s_strong, s_weak, rank_margin))

The unlabeled pairs need no confidence threshold of their own: a pair is used when the
weak view's expected scores are at least `rank_margin` brackets apart, which a pool image
of any bracket can reach, the rare ones included (FixMatch's 0.95 cutoff rarely accepts
them). FixMatch's part is USB's, hooks and all (`p_cutoff`, `T`, `hard_label`).

`rankflexmatch` is the same ranking term on FlexMatch instead (`rank_weight=0`: FlexMatch
itself; `thresh_min`: a floor under its thresholds, which are 0 for a bracket no pool image
has yet reached p_cutoff in): per-bracket thresholds that
follow how often each bracket is confidently predicted (curriculum pseudo-labelling), so the
rare high brackets are not held to FixMatch's 0.95, which in image mode with `test_resnet`
accepted only the commonest shaded bracket, 5, for pool images of brackets 6-10
(docs/results.md). Its `thresh_warmup` defaults to false for the reason benchmarks/ssl_gain.py
gives for FlexMatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from semilearn.algorithms.fixmatch import FixMatch
from semilearn.algorithms.flexmatch import FlexMatch
from semilearn.algorithms.utils import SSL_Argument, str2bool
from semilearn.core.utils import ALGORITHMS

from ..algorithms import AlgorithmArgumentError

from ._shared import expected, near_mask, three_views, window_mass


def pairwise_rank_loss(s: torch.Tensor, t: torch.Tensor, margin: float, tau: float) -> tuple[torch.Tensor, int]:
    """(mean softplus(-(s_i - s_j) / tau) over pairs with t_i - t_j > margin, number of such
    pairs): 0 when no pair qualifies. `t` is the order to learn, `s` the scores that learn it."""
    t = t.detach().float()
    chosen = (t[:, None] - t[None, :]) > margin
    n = int(chosen.sum())
    if n == 0:
        return s.sum() * 0.0, 0
    diff = (s[:, None] - s[None, :]) / tau
    return F.softplus(-diff[chosen]).mean(), n


def window_nll(logits: torch.Tensor, centre: torch.Tensor, radius: int, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -log P(bracket within +-radius of centre) under `logits`, times
    `mask` (0 for a row not accepted): a partial-label loss that does not say which bracket
    of the window is right, so an off-by-one teacher costs nothing and a far-off view costs much."""
    logp = logits.float().log_softmax(-1).masked_fill(~near_mask(centre, radius, logits.shape[-1]), float("-inf"))
    return -(logp.logsumexp(-1) * mask.float()).mean()


def rank_step(algo, x_lb, y_lb, x_ulb_w, x_ulb_s, y_score, masking: dict):
    """One RankMatch step on `algo` (a FixMatch or FlexMatch): its own masking hook
    (`masking`: what that hook needs beyond the probabilities, e.g. FlexMatch's idx_ulb) and
    pseudo-labels, plus the ranking terms on labeled pairs and on pool pairs."""
    with algo.amp_cm():
        logits_lb, logits_w, logits_s = three_views(algo.model, x_lb, x_ulb_w, x_ulb_s)
        sup_loss = algo.ce_loss(logits_lb, y_lb, reduction="mean")

        probs_w = algo.compute_prob(logits_w.detach())
        mask = algo.call_hook("masking", "MaskingHook", logits_x_ulb=probs_w, softmax_x_ulb=False, **masking)
        floor = getattr(algo, "thresh_min", 0.0)
        if floor > 0:  # rankflexmatch: no bracket's threshold below thresh_min
            mask = mask * (probs_w.max(dim=-1).values >= floor).to(mask.dtype)
        radius = getattr(algo, "pseudo_radius", 0)
        if radius > 0:  # set-valued pseudo-labels: "within +-radius of this bracket"
            conf, centre = window_mass(probs_w.float(), radius)
            mask = (conf >= algo.p_cutoff).to(probs_w.dtype)
            unsup_loss = window_nll(logits_s, centre, radius, mask)
        else:
            pseudo = algo.call_hook("gen_ulb_targets", "PseudoLabelingHook", logits=probs_w,
                                    use_hard_label=algo.use_hard_label, T=algo.T, softmax=False)
            unsup_loss = algo.consistency_loss(logits_s, pseudo, "ce", mask=mask)

        # y_score: the (possibly fractional) score; y_lb alone when a caller gives no scores
        true = y_score if y_score is not None else y_lb.float()
        rank_lb, _ = pairwise_rank_loss(expected(logits_lb.float().softmax(-1)), true, 0.0, algo.rank_tau)
        rank_ulb, pairs = pairwise_rank_loss(expected(logits_s.float().softmax(-1)), expected(probs_w.float()),
                                             algo.rank_margin, algo.rank_tau)
        rank_loss = rank_lb + rank_ulb
        total = sup_loss + algo.lambda_u * unsup_loss + algo.rank_weight * rank_loss

    out_dict = algo.process_out_dict(loss=total)
    n = len(logits_w)
    log_dict = algo.process_log_dict(sup_loss=sup_loss.item(), unsup_loss=unsup_loss.item(),
                                     rank_loss=rank_loss.item(), total_loss=total.item(),
                                     util_ratio=mask.float().mean().item(),
                                     rank_pair_rate=pairs / max(1, n * (n - 1) // 2))
    return out_dict, log_dict


def rank_arguments() -> list:
    return [
        SSL_Argument("--rank_weight", float, 0.3, "weight of the pairwise ranking terms (tuned on data seed 1: docs/results.md)"),
        SSL_Argument("--rank_margin", float, 1.0, "unlabeled pairs: weak-view expected scores this many brackets apart"),
        SSL_Argument("--rank_tau", float, 1.0, "ranking temperature, in brackets"),
    ]


def _set_rank_args(algo, args) -> None:
    algo.rank_weight, algo.rank_margin, algo.rank_tau = float(args.rank_weight), float(args.rank_margin), float(args.rank_tau)


@ALGORITHMS.register("rankmatch")
class RankMatch(FixMatch):
    def __init__(self, args, net_builder, tb_log=None, logger=None):
        super().__init__(args, net_builder, tb_log, logger)
        _set_rank_args(self, args)
        self.pseudo_radius = int(args.pseudo_radius)
        if self.pseudo_radius < 0:
            raise AlgorithmArgumentError(f"algorithm.args.pseudo_radius: {args.pseudo_radius} is below 0")

    def train_step(self, x_lb, y_lb, x_ulb_w, x_ulb_s, y_score=None):
        return rank_step(self, x_lb, y_lb, x_ulb_w, x_ulb_s, y_score, {})

    @staticmethod
    def get_argument():
        return [*FixMatch.get_argument(), *rank_arguments(),
                SSL_Argument("--pseudo_radius", int, 0,
                             "0: FixMatch's pseudo-label (the weak view's bracket, argmax >= p_cutoff); r > 0: "
                             "accept when the mass within +-r of the argmax is >= p_cutoff and train the strong "
                             "view to put its mass in that window (-log of it), not on one bracket")]


@ALGORITHMS.register("rankflexmatch")
class RankFlexMatch(FlexMatch):
    def __init__(self, args, net_builder, tb_log=None, logger=None):
        super().__init__(args, net_builder, tb_log, logger)
        _set_rank_args(self, args)
        self.thresh_min = float(args.thresh_min)

    def train_step(self, x_lb, y_lb, idx_ulb, x_ulb_w, x_ulb_s, y_score=None):
        return rank_step(self, x_lb, y_lb, x_ulb_w, x_ulb_s, y_score, {"idx_ulb": idx_ulb})

    @staticmethod
    def get_argument():
        flex = [a for a in FlexMatch.get_argument() if a.name != "--thresh_warmup"]
        return [*flex, SSL_Argument("--thresh_warmup", str2bool, False,
                                    "FlexMatch's warm-up (off: benchmarks/ssl_gain.py algorithm_args says why)"),
                SSL_Argument("--thresh_min", float, 0.0,
                             "floor of every bracket's threshold (FlexMatch's is 0 for a bracket no pool image "
                             "has yet reached p_cutoff in); 0: FlexMatch's own"),
                *rank_arguments()]
