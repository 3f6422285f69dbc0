"""Targets: what a model's raw outputs mean, in one place.

A target turns the outputs of the network's last layer ('logits' of ScoreModel, Head and
EmbeddingScoreModel) into

    probs(outputs)                 11 bracket probabilities [B, 11], float32, rows sum to 1
    loss(outputs, score, bracket)  the supervised loss against the labels
    outputs                        how many numbers the last layer gives per image

Everything downstream reads probabilities: evaluation, export, report and metrics take
the expected score (sum_b p_b * b), the argmax bracket and the confidence from them, so a
new target plugs in here and nowhere else (docs/CONTRIBUTING.md). model/config.json
records the target's name (`target`; absent = classification, as in every model folder
written before targets existed).

classification  11 logits; softmax; cross-entropy against the bracket (USB's algorithms
                compute their own losses from the same logits; every algorithm runs).
regression      one number; score = 10 * sigmoid(output), bounded to 0-10; smooth-L1
                against the (possibly fractional) score. Its bracket probabilities are the
                two brackets around the score, weighted so that their expectation is the
                score itself: 6.3 -> 0.7 on bracket 6 and 0.3 on bracket 7. Trained with
                algorithm.name=supervised (the SSL algorithms' consistency losses are
                written for class probabilities).
ordinal         10 conditional logits, CORN (Shi, Cao and Raschka, coral-pytorch):
                sigmoid(logit k) = P(bracket > k | bracket > k - 1), so P(bracket > k) is
                their running product, rank-consistent by construction; the bracket
                probabilities are the differences of those cumulative ones. corn_loss
                against the integer bracket (a fractional score trains as its bracket:
                6.7 as 7, metrics.bracket_of's rounding).
                algorithm.name=supervised, as regression (not algorithm.name=ordinal,
                OrdinalMatch, which is an SSL algorithm on classification logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import NUM_BRACKETS


class Classification:
    name = "classification"
    outputs = NUM_BRACKETS

    def probs(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(outputs.float(), dim=-1)

    def loss(self, outputs: torch.Tensor, score: torch.Tensor, bracket: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), bracket.long())


class Regression:
    name = "regression"
    outputs = 1
    MAX_SCORE = NUM_BRACKETS - 1

    def score(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.MAX_SCORE * torch.sigmoid(outputs.float()[:, 0])

    def probs(self, outputs: torch.Tensor) -> torch.Tensor:
        return two_hot(self.score(outputs))

    def loss(self, outputs: torch.Tensor, score: torch.Tensor, bracket: torch.Tensor) -> torch.Tensor:
        # on the 0-1 scale: smooth-L1's quadratic zone is then within a tenth of the range
        return F.smooth_l1_loss(self.score(outputs) / self.MAX_SCORE, score.float() / self.MAX_SCORE, beta=0.1)


class Ordinal:
    """CORN: output k (0-9) is the logit of P(bracket > k | bracket > k - 1)."""

    name = "ordinal"
    outputs = NUM_BRACKETS - 1

    def probs(self, outputs: torch.Tensor) -> torch.Tensor:
        """P(bracket = k) = P(> k - 1) - P(> k), where P(> k) = prod_{j<=k} sigmoid(logit j)
        (P(> -1) = 1, P(> 10) = 0). Computed as P(> k - 1) * sigmoid(-logit k), the same
        number without the cancellation of a difference of two near-equal ones: each entry
        is a product of numbers in [0, 1] (so never negative) and the row telescopes to 1."""
        logits = outputs.float()
        above = torch.cumprod(torch.sigmoid(logits), dim=1)  # [B, 10]: P(bracket > k)
        reach = torch.cat([torch.ones_like(above[:, :1]), above[:, :-1]], dim=1)  # P(bracket > k - 1)
        return torch.cat([reach * torch.sigmoid(-logits), above[:, -1:]], dim=1)

    def loss(self, outputs: torch.Tensor, score: torch.Tensor, bracket: torch.Tensor) -> torch.Tensor:
        """coral_pytorch's corn_loss against the integer bracket: CORN's binary tasks are
        'bracket > k', so a fractional score trains as its bracket (6.7 as 7: the rounding of
        metrics.bracket_of, done by the data); the loop passes both and this reads only
        `bracket`."""
        from coral_pytorch.losses import corn_loss  # (only training needs it; probs do not)

        return corn_loss(outputs.float(), bracket.long(), num_classes=NUM_BRACKETS)


def two_hot(score: torch.Tensor) -> torch.Tensor:
    """[B] scores in 0-10 -> [B, 11]: mass 1 - f on floor(score) and f on floor + 1, where f
    is the fractional part; the expectation is the score."""
    score = score.clamp(0, NUM_BRACKETS - 1)
    low = score.floor().clamp(max=NUM_BRACKETS - 2)
    frac = (score - low).unsqueeze(1)
    out = torch.zeros(score.shape[0], NUM_BRACKETS, dtype=score.dtype, device=score.device)
    idx = low.long().unsqueeze(1)
    out.scatter_(1, idx, 1 - frac)
    out.scatter_add_(1, idx + 1, frac)
    return out


TARGETS = {t.name: t for t in (Classification(), Regression(), Ordinal())}


def get_target(name: str | None):
    """The target called `name` (None: classification)."""
    name = name or Classification.name
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}")
    return TARGETS[name]


def target_of(info: dict):
    """The target a model/config.json records (none recorded: classification)."""
    return get_target(info.get("target"))


class SupervisedTarget:
    """The supervised baseline of a non-classification target, in the shape the loop drives
    (train_step with the batch keys it names, `it`); USB's algorithms compute
    cross-entropy on class logits and are not used for these targets."""

    algorithm = "supervised"

    def __init__(self, model: torch.nn.Module, target):
        self.model, self.target, self.it = model, target, 0

    def train_step(self, x_lb, y_lb, y_score):
        outputs = self.model(x_lb)["logits"]
        sup_loss = self.target.loss(outputs, y_score, y_lb)
        return {"loss": sup_loss}, {"train/sup_loss": sup_loss.item(), "train/total_loss": sup_loss.item()}
