"""Fill the embedding cache: a frozen backbone's features of the scored set, the test set and the pool.

    accelerate launch ssl/embed.py --config configs/embed_demo.yaml [key=value ...]

Takes the same config and overrides as train.py (model.*, data.*, augment.*, embed.*) and
computes, for every image not yet cached, the eval view plus embed.views weak and strong
views. Train with the same config and model.mode=embedding afterwards; train.py runs this
same pass itself, so running embed.py first is only needed to fill the cache on other
machines or ahead of time. A killed pass loses at most one shard per process: run it again.
One job at a time writes into a cache key folder: a second one exits with an error naming
the folder and its holder (jobs that find everything cached only read, and run side by side).
Files that could not be read (permissions, I/O errors) are skipped and retried on the next pass.
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    from aessl.config import load_cli_config

    cfg = load_cli_config(argv, __doc__, "embed_demo.yaml", "model.name=vit_base_patch16_clip_224 embed.views=4")
    if cfg is None:
        return 2

    from accelerate import Accelerator

    from aessl.data import DataSourceError, LabeledSetError, load_pool, load_scored_set
    from aessl.embedding import EmbeddingError, prepare_features
    from aessl.logs import setup_logging
    from aessl.models import WeightsUnavailable
    from aessl.sources import resolve_sources

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    setup_logging(accelerator.is_main_process)
    dcfg = cfg.data
    try:
        src = resolve_sources(dcfg, accelerator.is_main_process, accelerator.wait_for_everyone)
        tables = {"scored": load_scored_set(src["labeled"])}
        if src["test"]:
            tables["test"] = load_scored_set(src["test"])
        if src["unlabeled"]:
            tables["pool"] = load_pool(src["unlabeled"], streaming=dcfg.streaming, limit=dcfg.max_unlabeled)
        feats = prepare_features(cfg, accelerator, tables, dcfg.num_workers)
    except (LabeledSetError, DataSourceError, EmbeddingError, WeightsUnavailable) as exc:
        if accelerator.is_main_process:
            print(f"error: {exc}", file=sys.stderr)
        # the process group is closed here, not by the interpreter's teardown, where a gloo peer
        # that already left has been seen to abort this process (SIGABRT) instead of exit 2
        accelerator.end_training()
        return 2
    if accelerator.is_main_process:
        counts = {name: {"images": len(t), "skipped": len(feats["skipped"][name])} for name, t in feats["tables"].items()}
        print(json.dumps({"cache": str(feats["root"]), "backbone": cfg.model.name, "dim": feats["stats"]["dim"],
                          "views": 1 + 2 * cfg.embed.views, "computed": feats["stats"]["computed"],
                          "already_cached": feats["stats"]["cached_before"],
                          "retry_next_pass": feats["stats"]["read_errors"], "seconds": feats["stats"]["seconds"],
                          "sets": counts}, indent=1))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
