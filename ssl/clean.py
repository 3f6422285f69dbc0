"""Find the bad labels of a scored set: python ssl/clean.py --labeled SET --out DIR [options]

Out-of-fold bracket probabilities for every image (a frozen backbone's cached features, a
logistic regression per fold), then:

- label issues, ranked two ways: cleanlab's find_label_issues / label quality (brackets as
  unordered classes) and an ordinal score, the out-of-fold probability that the label is
  within one bracket of the truth (flagged below 0.2);
- outliers in the backbone's feature space (cleanlab's OutOfDistribution);
- duplicates: identical bytes and near-identical images, scored differently or leaking into
  --test.

Writes DIR/issues.csv (one row per issue, worst first within each kind), DIR/review.html
(self-contained: image grids per kind), DIR/scores.csv (every image's scores, flags and
out-of-fold probabilities) and DIR/cleaned.csv, a path,score manifest (absolute paths) of
every readable image with the flagged label issues dropped, relabelled to the suggested
bracket or kept (--action, on the flags --flag-by names), which trains as
data.labeled=DIR/cleaned.csv. Unreadable images are skipped, counted and listed. Library: aessl/clean.py; measurements:
docs/data_quality.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    from aessl.clean import add_backbone_arguments, check_backbone_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labeled", required=True, help="scored set: folder of <score>/ subfolders or a "
                                                    ".csv/.jsonl/.parquet manifest (path, score)")
    p.add_argument("--out", required=True, help="output folder (created): issues.csv, review.html, cleaned.csv")
    add_backbone_arguments(p)
    p.add_argument("--folds", type=int, default=5, help="K of the K-fold (default 5; fewer where a bracket has "
                                                        "fewer images)")
    p.add_argument("--action", choices=("drop", "relabel", "none"), default="none",
                   help="what cleaned.csv does with flagged label issues: drop them, relabel them to the suggested "
                        "bracket, or keep them (default none: review first)")
    p.add_argument("--flag-by", choices=("ordinal", "cleanlab", "both", "either"), default="ordinal",
                   help="which flags --action acts on (default ordinal; both = flagged by both)")
    p.add_argument("--test", default=None, help="a test scored set: its images found among the labeled ones are "
                                                "reported (test leaks)")
    p.add_argument("--seed", type=int, default=0, help="seeds the folds and a random-init backbone")
    return check_backbone_arguments(p, p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    from aessl.clean import CleanError, run_clean
    from aessl.config import ConfigError
    from aessl.data import DataSourceError, LabeledSetError
    from aessl.embedding import EmbeddingError
    from aessl.logs import setup_logging
    from aessl.models import WeightsUnavailable

    setup_logging()
    try:
        res = run_clean(args.labeled, args.out, Accelerator(mixed_precision="no"), model=args.model,
                        backbone=args.backbone, pretrained=args.pretrained, folds=args.folds, action=args.action,
                        flag_by=args.flag_by, image_size=args.image_size, test=args.test, cache_dir=args.cache_dir,
                        workers=args.workers, batch_size=args.batch_size, seed=args.seed)
    except (CleanError, LabeledSetError, DataSourceError, EmbeddingError, WeightsUnavailable, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(res.out), "backbone": res.backbone, "images": res.images, "readable": res.readable,
                      "unreadable": res.unreadable, "folds": res.folds, "C": res.C, "issues": res.counts,
                      "cleaned_rows": res.cleaned_rows, "seconds": res.seconds}, indent=1))
    print(f"review: {res.out / 'review.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
