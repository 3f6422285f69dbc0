"""Heads trained on a frozen backbone's features, and the backbone + head model that export,
report and model/ loading use (embedding mode). Kept apart from the feature cache
(embedding.py) so that models.py can load an embedding-mode model/ folder without
importing the cache, and the cache can build backbones through models.py: no import cycle.
"""

from __future__ import annotations

from torch import nn

from .metrics import NUM_BRACKETS
from .targets import get_target


class EmbeddingError(ValueError):
    """A setting or input of embedding mode that cannot work; the message names it."""


class Head(nn.Module):
    """body (features -> head features) then fc (-> 11 bracket logits), answering like ScoreModel:
    forward(x) -> {'logits', 'feat'}; forward(feat, only_fc=True) -> logits; only_feat -> feat."""

    def __init__(self, body: nn.Module, width: int, outputs: int = NUM_BRACKETS):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(width, outputs)
        self.num_features = width

    def forward(self, x, only_fc: bool = False, only_feat: bool = False, **_):
        if only_fc:
            return self.fc(x)
        feat = self.body(x)
        if only_feat:
            return feat
        return {"logits": self.fc(feat), "feat": feat}


class ResidualBlock(nn.Module):
    """x + f(x) through three linear layers, as in the model card's predictor."""

    def __init__(self, width: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Linear(width, width), nn.LeakyReLU(0.1),
            nn.Linear(width, width), nn.LeakyReLU(0.1),
            nn.Linear(width, width),
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.branch(x))


def _linear(dim: int, hidden: int, dropout: float) -> tuple[nn.Module, int]:
    return nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout)), dim


def _mlp(dim: int, hidden: int, dropout: float) -> tuple[nn.Module, int]:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout)), hidden


def _residual_mlp(dim: int, hidden: int, dropout: float) -> tuple[nn.Module, int]:
    # The model card's shape: widen, one residual block, then narrow in steps to a small
    # feature that the bracket classifier reads.
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, hidden), ResidualBlock(hidden),
        nn.Linear(hidden, 128), nn.Linear(128, 64), nn.Dropout(dropout), nn.LeakyReLU(0.1),
    ), 64


HEADS = {"linear": _linear, "mlp": _mlp, "residual_mlp": _residual_mlp}


def build_head(spec: dict) -> Head:
    """spec: {'name', 'in_features', 'hidden', 'dropout', 'outputs'} (what model/config.json
    records; no 'outputs': 11 bracket logits, as in folders written before targets existed)."""
    name = spec["name"]
    if name not in HEADS:
        raise EmbeddingError(f"model.head: unknown head {name!r}; choose one of {sorted(HEADS)}")
    body, width = HEADS[name](int(spec["in_features"]), int(spec["hidden"]), float(spec["dropout"]))
    return Head(body, width, int(spec.get("outputs", NUM_BRACKETS)))


class EmbeddingScoreModel(nn.Module):
    """Frozen backbone + head: images in, ScoreModel's answers out (export and report use this)."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.num_features = head.num_features

    def forward(self, x, only_fc: bool = False, only_feat: bool = False, **_):
        if only_fc:
            return self.head(x, only_fc=True)
        return self.head(self.backbone(x), only_feat=only_feat)

    def export_state_dict(self) -> dict:
        return {**{f"backbone.{k}": v for k, v in self.backbone.state_dict().items()},
                **{f"head.{k}": v for k, v in self.head.state_dict().items()}}



def head_spec(model_cfg, in_features: int) -> dict:
    return {"name": model_cfg["head"], "in_features": int(in_features), "hidden": model_cfg["head_hidden"],
            "dropout": model_cfg["head_dropout"], "outputs": get_target(model_cfg.get("target")).outputs}
