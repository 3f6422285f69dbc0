"""OrdinalMatch: confident soft pseudo-labels per score bracket (`algorithm.name=ordinal`).

USB's algorithms treat the 11 brackets as unrelated classes. Aesthetic scores are ordered,
rare at both ends, and read as a number (users sort by the expected score). Each part
below answers one of those facts and can be switched off for an ablation:

- ordinal_conf: the confidence of a weak-view prediction is the probability mass within
  +-conf_radius brackets of the predicted (argmax) bracket, not the top class alone. A
  teacher torn 0.48/0.47 between brackets 6 and 7 knows the score is 6-7: confident.
  Off: max probability (FixMatch's rule).
- ordinal_smoothing: the soft target is the sharpened distribution (temperature T)
  smoothed with a Gaussian over bracket distance (smooth_sigma), so a near miss costs
  less than a far one. Off: sharpened only.
- per_bracket_threshold: acceptance threshold = a global, self-adaptive level (EMA of the
  mean confidence, FreeMatch's idea) plus a per-bracket offset that a small controller
  moves until the share of accepted pseudo-labels in each bracket matches that bracket's
  share of the labeled prior: rare brackets (0, 8-10) keep getting pseudo-labels. Off: one
  threshold for all brackets, the global level.
- dist_align: weak-view probabilities are multiplied by target / EMA(model's mean
  prediction on the pool) and renormalised (ReMixMatch/AdaMatch), pulling pseudo-labels
  toward the target bracket histogram. Off: raw probabilities.
- pool_prior: that target, and the per-bracket controller's: `labeled` (the labeled
  histogram) or `estimated`, the pool's own bracket mix estimated as it trains. A crawled
  pool is not the labeled set's mix (the synthetic pool has 4x its share of brackets 0-1),
  and aligning it to the labeled histogram relabels its junk as middling. The estimate is
  EM for label shift (Saerens et al. 2002) run online: the model's posteriors are
  re-weighted by estimate / labeled prior, and the estimate follows their mean (an EMA,
  prior_momentum). Its fixed point is the EM solution for a model calibrated to the
  labeled histogram. That model is not: it trains on the pseudo-labels aligned to the
  estimate, so the two feed each other, and uncapped (data seed 1, test_resnet) the estimate
  ran away to 70% of the pool in bracket 10 (0.2% of the labels) and QWK fell from 0.67 to
  0.34. Each bracket's estimate is therefore held within prior_max_ratio of its labeled
  share (4: the synthetic crawl's bracket-0-1 excess).
- score_loss_weight: an L1 term on the expected score (normalised to 0-1, as the model
  card's predictor was trained), on labeled images and on accepted pseudo-labels, besides
  the bracket cross-entropy. 0: bracket losses only.

All running statistics are tensor attributes, so `AlgorithmState` checkpoints them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from semilearn.algorithms.utils import SSL_Argument, str2bool
from semilearn.core.algorithmbase import AlgorithmBase
from semilearn.core.utils import ALGORITHMS

from ..algorithms import AlgorithmArgumentError
from ..metrics import NUM_BRACKETS
from ._shared import expected, three_views, window_mass


def ordinal_kernel(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    b = torch.arange(NUM_BRACKETS, device=device, dtype=dtype)
    k = torch.exp(-((b[:, None] - b[None, :]) ** 2) / (2 * sigma**2))
    return k / k.sum(dim=1, keepdim=True)


def soft_targets(probs: torch.Tensor, T: float, sigma: float | None) -> torch.Tensor:
    sharp = probs.clamp_min(1e-12) ** (1.0 / T)
    sharp = sharp / sharp.sum(dim=-1, keepdim=True)
    if sigma:
        sharp = sharp @ ordinal_kernel(sigma, sharp.device, sharp.dtype)
    return sharp


@ALGORITHMS.register("ordinal")
class OrdinalMatch(AlgorithmBase):
    def __init__(self, args, net_builder, tb_log=None, logger=None):
        super().__init__(args, net_builder, tb_log, logger)
        prior = getattr(args, "lb_prior", None)
        prior = torch.full((NUM_BRACKETS,), 1.0 / NUM_BRACKETS) if prior is None else torch.as_tensor(prior, dtype=torch.float32)
        self.prior = prior / prior.sum()
        self.init(**{k: getattr(args, k) for k in (
            "T", "smooth_sigma", "ordinal_smoothing", "ordinal_conf", "conf_radius", "per_bracket_threshold",
            "thresh_min", "thresh_max", "thresh_momentum", "controller_rate", "dist_align", "da_momentum",
            "score_loss_weight", "pool_prior", "prior_momentum", "prior_max_ratio")})

    def init(self, T, smooth_sigma, ordinal_smoothing, ordinal_conf, conf_radius, per_bracket_threshold,
             thresh_min, thresh_max, thresh_momentum, controller_rate, dist_align, da_momentum, score_loss_weight,
             pool_prior="labeled", prior_momentum=0.9, prior_max_ratio=4.0):
        if pool_prior not in ("labeled", "estimated"):
            raise AlgorithmArgumentError(f"algorithm.args.pool_prior: {pool_prior!r} is neither 'labeled' nor 'estimated'")
        self.estimate_prior, self.prior_momentum = pool_prior == "estimated", float(prior_momentum)
        self.prior_max_ratio = float(prior_max_ratio)
        self.T, self.smooth_sigma = float(T), float(smooth_sigma)
        self.use_smoothing, self.use_ordinal_conf = bool(ordinal_smoothing), bool(ordinal_conf)
        self.conf_radius = int(conf_radius) if ordinal_conf else 0
        self.use_per_bracket = bool(per_bracket_threshold)
        self.thresh_min, self.thresh_max = float(thresh_min), float(thresh_max)
        self.thresh_momentum, self.controller_rate = float(thresh_momentum), float(controller_rate)
        self.use_dist_align, self.da_momentum = bool(dist_align), float(da_momentum)
        self.score_loss_weight = float(score_loss_weight)
        # running state (tensors: checkpointed by AlgorithmState)
        self.global_level = torch.tensor(-1.0)  # < 0: not seen a batch yet
        self.offset = torch.zeros(NUM_BRACKETS)
        self.accepted_share = self.prior.clone()
        self.p_model = torch.full((NUM_BRACKETS,), 1.0 / NUM_BRACKETS)
        self.pool_estimate = self.prior.clone()  # the pool's bracket mix (pool_prior=estimated)

    # ------------------------------------------------------------------ pieces
    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every process (as USB's hooks gather before updating statistics), so
        that the running statistics, and the thresholds, are the same on every process and
        equal to a one-process run's on the same global batch."""
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def global_mean_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Mean over the rows of every process's batch (batches may differ in size)."""
        flat = rows.reshape(len(rows), -1)
        total = self.global_sum(torch.cat([flat.sum(0), flat.new_tensor([len(rows)])]))
        return (total[:-1] / total[-1].clamp_min(1)).reshape(rows.shape[1:])

    def target_prior(self) -> torch.Tensor:
        """The bracket mix pseudo-labels are aligned and shared out to."""
        return self.pool_estimate if self.estimate_prior else self.prior

    def update_pool_estimate(self, probs: torch.Tensor) -> None:
        """One online EM step for the pool's bracket mix from this batch's posteriors."""
        if not self.estimate_prior:
            return
        est, prior = self.pool_estimate.to(probs.device), self.prior.to(probs.device)
        shifted = probs.detach().float() * (est / prior)
        shifted = shifted / shifted.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        est = self.prior_momentum * est + (1 - self.prior_momentum) * self.global_mean_rows(shifted)
        self.pool_estimate = self.bounded(est / est.sum(), prior)

    def bounded(self, est: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """`est` with every bracket within [prior / r, prior * r] (r = prior_max_ratio), still
        summing to 1: clipping and renormalising alternate until both hold."""
        lo, hi = prior / self.prior_max_ratio, prior * self.prior_max_ratio
        for _ in range(50):
            est = est.clamp(lo, hi)
            est = est / est.sum()
            if bool(((est >= lo * (1 - 1e-4)) & (est <= hi * (1 + 1e-4))).all()):
                break
        return est

    def align(self, probs: torch.Tensor) -> torch.Tensor:
        self.update_pool_estimate(probs)
        if not self.use_dist_align:
            return probs
        self.p_model = self.p_model.to(probs.device)
        mean = self.global_mean_rows(probs.detach())
        self.p_model = self.da_momentum * self.p_model + (1 - self.da_momentum) * mean
        aligned = probs * (self.target_prior().to(probs.device) / self.p_model.clamp_min(1e-6))
        return aligned / aligned.sum(dim=-1, keepdim=True)

    def current_thresholds(self) -> torch.Tensor:
        level = self.global_level.clamp(min=0.0)
        thr = level + (self.offset if self.use_per_bracket else torch.zeros_like(self.offset))
        return thr.clamp(self.thresh_min, self.thresh_max)

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask, confidence, bracket) for aligned weak-view probabilities; updates thresholds."""
        conf, centre = window_mass(probs, self.conf_radius)
        mean_conf = self.global_mean_rows(conf.detach()[:, None]).squeeze(0).cpu()
        if self.global_level < 0:
            self.global_level = mean_conf.clone()
        else:
            self.global_level = self.thresh_momentum * self.global_level + (1 - self.thresh_momentum) * mean_conf
        thr = self.current_thresholds().to(probs.device)
        mask = (conf >= thr[centre]).float()
        counts = self.global_sum(torch.bincount(centre[mask.bool()], minlength=NUM_BRACKETS).float()).cpu()
        if self.use_per_bracket and counts.sum() > 0:
            share = counts / counts.sum()
            self.accepted_share = self.thresh_momentum * self.accepted_share + (1 - self.thresh_momentum) * share
            # over-represented brackets get stricter, under-represented ones more lenient
            step = self.controller_rate * (self.accepted_share - self.target_prior().cpu())
            self.offset = (self.offset + step).clamp(-0.5, 0.5)
        return mask, conf, centre

    # ------------------------------------------------------------------ the head's outputs
    # `target` (aessl/targets.py) is set by the loop for a non-classification head (model.target
    # = ordinal or regression): its loss and its bracket probabilities replace the softmax's;
    # everything above works on bracket probabilities and is unchanged.
    target = None

    def sup_loss(self, logits, y_lb, y_score):
        if self.target is None:
            return F.cross_entropy(logits, y_lb)
        return self.target.loss(logits, y_lb.float() if y_score is None else y_score, y_lb)

    def probs(self, logits):
        return logits.float().softmax(-1) if self.target is None else self.target.probs(logits)

    def log_probs(self, logits):
        return logits.float().log_softmax(-1) if self.target is None else self.target.probs(logits).clamp_min(1e-12).log()

    # ------------------------------------------------------------------ the step
    def train_step(self, x_lb, y_lb, x_ulb_w, x_ulb_s, y_score=None):
        with self.amp_cm():
            logits_lb, logits_w, logits_s = three_views(self.model, x_lb, x_ulb_w, x_ulb_s)
            sup_loss = self.sup_loss(logits_lb, y_lb, y_score)
            score_loss = torch.zeros((), device=logits_lb.device)
            if self.score_loss_weight > 0:
                target = (y_score if y_score is not None else y_lb).float()
                score_loss = (expected(self.probs(logits_lb)) - target).abs().mean() / (NUM_BRACKETS - 1)

            probs_w = self.align(self.probs(logits_w.detach()))
            mask, conf, centre = self.select(probs_w)
            targets = soft_targets(probs_w, self.T, self.smooth_sigma if self.use_smoothing else None)
            log_s = self.log_probs(logits_s)
            unsup_loss = (-(targets * log_s).sum(-1) * mask).mean()
            if self.score_loss_weight > 0:
                unsup_score = (expected(log_s.exp()) - expected(targets)).abs() / (NUM_BRACKETS - 1)
                unsup_loss = unsup_loss + self.score_loss_weight * (unsup_score * mask).mean()

            total = sup_loss + self.score_loss_weight * score_loss + self.lambda_u * unsup_loss

        out_dict = self.process_out_dict(loss=total)
        rates = {f"pseudo_rate_{b}": float((mask * (centre == b).float()).sum() / max(1, len(mask)))
                 for b in range(NUM_BRACKETS)}
        log_dict = self.process_log_dict(sup_loss=sup_loss.item(), score_loss=score_loss.item(),
                                         unsup_loss=unsup_loss.item(), total_loss=total.item(),
                                         util_ratio=mask.mean().item(), mean_confidence=conf.mean().item(), **rates)
        return out_dict, log_dict

    @staticmethod
    def get_argument():
        return [
            SSL_Argument("--T", float, 0.5, "sharpening temperature of the soft targets"),
            SSL_Argument("--ordinal_smoothing", str2bool, True, "smooth targets over neighbouring brackets"),
            SSL_Argument("--smooth_sigma", float, 0.6, "Gaussian width of that smoothing, in brackets"),
            SSL_Argument("--ordinal_conf", str2bool, True, "confidence = mass in the best window of brackets"),
            SSL_Argument("--conf_radius", int, 1, "window half-width: 1 = predicted bracket +-1"),
            SSL_Argument("--per_bracket_threshold", str2bool, True, "adapt one threshold per bracket"),
            SSL_Argument("--thresh_min", float, 0.8, "floor of every threshold (0.8 over 0.6: docs/results.md)"),
            SSL_Argument("--thresh_max", float, 0.98, "ceiling of every threshold"),
            SSL_Argument("--thresh_momentum", float, 0.99, "EMA momentum of the threshold statistics"),
            SSL_Argument("--controller_rate", float, 0.05, "how fast per-bracket offsets follow the prior"),
            SSL_Argument("--dist_align", str2bool, True, "align pseudo-labels to the target mix (pool_prior)"),
            SSL_Argument("--da_momentum", float, 0.999, "EMA momentum of the model's pool distribution"),
            SSL_Argument("--score_loss_weight", float, 0.5, "weight of the expected-score L1 terms"),
            SSL_Argument("--pool_prior", str, "labeled", "align to the 'labeled' histogram or the pool's 'estimated' mix"),
            SSL_Argument("--prior_momentum", float, 0.9, "EMA momentum of the pool's estimated mix (each step is one EM step)"),
            SSL_Argument("--prior_max_ratio", float, 4.0, "each bracket's estimate stays within this factor of its labeled share"),
        ]
