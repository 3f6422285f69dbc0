"""Image mode and embedding mode: the two ways a run trains, behind the same methods.

    mode = training_mode(cfg)          chosen once, from model.mode
    mode.prepare(run, data)            embedding: every image's frozen-backbone features, cached
    mode.build_module(data)            the module the optimiser trains, and model/ config's info
    mode.loaders(run, data, ...)       labeled and unlabeled batch iterators, the test loader
    mode.final_model(ema_module)       what model/ holds at the end
    mode.skipped_pool_images()         pool images already found unreadable (embedding: by the cache)
    mode.cache_stats()                 what run.json records of the feature cache (image: None)

Image mode trains a whole timm network on decoded, augmented images. Embedding mode trains
a small head on a frozen backbone's cached features (aessl/embedding.py), and model/ gets
the backbone back at the end, so export and report load either the same way.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import embedding as emb
from .data import DrawBatchSampler, DrawDataset, EvalDataset, StreamingPool, collate, worker_init
from .heads import EmbeddingScoreModel, build_head, head_spec
from .metrics import NUM_BRACKETS
from .models import build_model
from .targets import get_target
from .transforms import eval_transform, train_transforms


class Batches(NamedTuple):
    """What the loop draws from: labeled batches, unlabeled batches (None: no pool is used)
    and the test loader over this process's share of the test set."""

    labeled: Iterator
    unlabeled: Iterator | None
    test: DataLoader


class ImageMode:
    """A timm network trained end to end on decoded images (aessl/data.py's datasets)."""

    name = "image"

    def __init__(self, cfg):
        self.cfg = cfg
        self.info = None

    def prepare(self, run, data) -> None:
        """Nothing to compute ahead of training."""

    def skipped_pool_images(self) -> dict:
        return {}

    def cache_stats(self) -> dict | None:
        return None

    def build_module(self, data):
        model, self.info = build_model(self.cfg.model, self.cfg.data.image_size, self.cfg.data.crop_pct)
        return model, self.info

    def loaders(self, run, data, progress, training, test_rows: np.ndarray) -> Batches:
        cfg, dcfg = self.cfg, self.cfg.data
        bsz, seed, start_micro = cfg.train.batch_size, cfg.seed, micro_batches_done(cfg, progress)
        ubsz = bsz * cfg.train.uratio
        weak, strong = train_transforms(self.info, cfg.augment)
        lb_table, lb_targets = (data.train_set, None) if data.pseudo is None else data.pseudo.image_stream(data.train_set)
        labeled = iter(self._loader(run, DrawDataset(lb_table, "labeled", weak, seed=seed, stream=0, targets=lb_targets,
                                                     balance=dcfg.balance_labeled),
                                    bsz, start_micro))
        unlabeled = None
        if training.uses_pool and hasattr(data.pool, "__len__"):
            unlabeled = iter(self._loader(run, DrawDataset(data.pool, "unlabeled", weak, strong, seed=seed, stream=1),
                                          ubsz, start_micro))
        elif training.uses_pool:
            stream = StreamingPool(data.pool, weak, strong, seed, run.rank, run.world, training.index_size,
                                   batch_size=ubsz, start_batch=progress.stream_batches)
            unlabeled = iter(self._loader(run, stream, ubsz))
        # Its own generator: a loader with workers draws a base seed each time it is iterated,
        # and from the global generator that would make dropout depend on the eval cadence.
        test = DataLoader(EvalDataset(data.test_set.select(test_rows), eval_transform(self.info), dcfg.image_size),
                          batch_size=cfg.eval.batch_size, num_workers=min(dcfg.num_workers, 2),
                          generator=torch.Generator().manual_seed(0))
        return Batches(labeled, unlabeled, test)

    def _loader(self, run, dataset, batch_size: int, stream_start: int | None = None) -> DataLoader:
        workers = self.cfg.data.num_workers
        kw = dict(num_workers=workers, collate_fn=collate, worker_init_fn=worker_init,
                  pin_memory=run.accelerator.device.type == "cuda", persistent_workers=workers > 0)
        if workers > 0:
            kw["prefetch_factor"] = 4
        if stream_start is None:  # iterable (streaming) dataset
            return DataLoader(dataset, batch_size=batch_size, **kw)
        return DataLoader(dataset, batch_sampler=DrawBatchSampler(batch_size, run.rank, run.world, stream_start), **kw)

    def final_model(self, trained):
        return trained


class EmbeddingMode:
    """A head trained on a frozen backbone's cached features (aessl/embedding.py). The
    features of every image (eval view, K weak, K strong) come from the cache; what is
    missing is computed in prepare() (ssl/embed.py does the same pass on its own)."""

    name = "embedding"

    def __init__(self, cfg):
        self.cfg = cfg
        self.feats = self.labeled = self.info = None

    def prepare(self, run, data) -> None:
        tables = {"train": data.train_set, "test": data.test_set, "pool": data.pool,
                  **({"pseudo": data.pseudo.table} if data.pseudo is not None else {})}
        self.feats = emb.prepare_features(self.cfg, run.accelerator, tables, self.cfg.data.num_workers)
        lost = self.feats["skipped"]["train"] + self.feats["skipped"]["test"]
        if lost:  # scored images were validated as readable; losing one silently would shift the split
            raise emb.EmbeddingError("scored images missing from the embedding cache:\n"
                                     + "\n".join(f"  - {n}: {r}" for n, r in lost))
        if data.pool is not None:
            data.pool_size = len(self.feats["tables"]["pool"])
        # (table, scores, soft targets) of the labeled draws; with an export, its rows join the
        # labels here, before run.json records how many were used
        self.labeled = (self.feats["tables"]["train"], data.train_set["score"], None)
        if data.pseudo is not None:
            self.labeled = data.pseudo.feature_stream(self.feats, data.train_set["score"])

    def skipped_pool_images(self) -> dict:
        return dict(self.feats["skipped"].get("pool", []))

    def cache_stats(self) -> dict:
        """What run.json records of the feature cache."""
        return self.feats["stats"]

    def build_module(self, data):
        """The trained module is the head alone; final_model() puts the backbone back."""
        head = head_spec(self.cfg.model, self.feats["stats"]["dim"])
        self.info = {**self.feats["info"], "mode": "embedding", "head": head, "num_classes": NUM_BRACKETS,
                     "target": get_target(self.cfg.model.target).name}
        return build_head(head), self.info

    def loaders(self, run, data, progress, training, test_rows: np.ndarray) -> Batches:
        cfg, tables = self.cfg, self.feats["tables"]
        bsz, seed, views = cfg.train.batch_size, cfg.seed, cfg.embed.views
        start_micro = micro_batches_done(cfg, progress)
        table, scores, targets = self.labeled
        labeled = iter(self._loader(run, emb.FeatureDraws(table, "labeled", views, scores=scores, targets=targets,
                                                          seed=seed, stream=0, balance=cfg.data.balance_labeled),
                                     bsz, start_micro))
        unlabeled = None
        if training.uses_pool:
            draws = emb.FeatureDraws(tables["pool"], "unlabeled", views, seed=seed, stream=1,
                                     strong_view=cfg.embed.strong_view, strong_noise=cfg.embed.strong_noise)
            unlabeled = iter(self._loader(run, draws, bsz * cfg.train.uratio, start_micro))
        test = self._loader(run, emb.FeatureEval(tables["test"], test_rows), cfg.eval.batch_size)
        return Batches(labeled, unlabeled, test)

    @staticmethod
    def _loader(run, dataset, batch_size: int, start: int | None = None) -> DataLoader:
        """Whole batches gathered in-process (features are a read, not a decode)."""
        kw = dict(collate_fn=emb.identity_collate, pin_memory=run.accelerator.device.type == "cuda")
        if start is None:  # the test set, in order
            return DataLoader(dataset, batch_size=batch_size, **kw)
        return DataLoader(dataset, batch_sampler=DrawBatchSampler(batch_size, run.rank, run.world, start), **kw)

    def final_model(self, trained):
        return EmbeddingScoreModel(self.feats["backbone"], trained)


def micro_batches_done(cfg, progress) -> int:
    """Batches each loader has already handed out: a resumed run's loaders start there."""
    return progress.start_step * cfg.train.grad_accum


def training_mode(cfg) -> ImageMode | EmbeddingMode:
    return EmbeddingMode(cfg) if cfg.model.mode == "embedding" else ImageMode(cfg)
