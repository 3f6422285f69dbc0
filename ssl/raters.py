"""Model each rater: python ssl/raters.py --labeled RATINGS --out DIR [--model RUN] [--test SET]

RATINGS is a manifest with one row per (image, rater): path, score, rater. On one frozen
backbone's cached features (--model RUN: a trained run's backbone; or --backbone NAME
--pretrained FILE):

- agreement between every two raters on the images both scored (quadratic-weighted kappa,
  mean difference);
- a ridge head per rater (and how predictable each rater is, by cross-validation);
- raters clustered by preference (hierarchical; the distance between two raters is how far
  apart their heads score the same images, or 1 - kappa with --cluster-on agreement), the
  number of clusters by silhouette or --clusters;
- a head per cluster, one pooled over every rating, and the stratified ensemble: the
  cluster heads averaged with each cluster weighted by its share of the raters, so a few
  busy raters do not speak for everyone.

--test SET (e.g. a synthetic set's consensus_test.csv) scores the pooled head and the
stratified ensemble against it (and each rater's own head where SET has raters);
--true-groups synth.json gives the adjusted Rand index of the clusters.

Writes DIR/summary.md, raters.json, raters.csv, agreement.csv, raters.png and heads.npz.
Library: aessl/raters.py; measurements: docs/data_quality.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    from aessl.clean import add_backbone_arguments, check_backbone_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labeled", required=True, help="manifest (.csv/.jsonl/.parquet) with path, score, rater columns")
    p.add_argument("--out", required=True, help="output folder (created)")
    add_backbone_arguments(p)
    p.add_argument("--test", default=None, help="a scored set to evaluate the pooled head and the stratified ensemble "
                                                "on (its score is the consensus; with a rater column, also per rater)")
    p.add_argument("--clusters", type=int, default=None, help="number of rater clusters (default: by silhouette)")
    p.add_argument("--max-clusters", type=int, default=8, help="largest number of clusters tried (default 8)")
    p.add_argument("--cluster-on", choices=("heads", "agreement"), default="heads",
                   help="distance between raters: their heads' score difference over all images (default; needs no "
                        "shared images) or 1 - kappa on shared images")
    p.add_argument("--min-images", type=int, default=20, help="each rater needs this many scored images (default 20)")
    p.add_argument("--min-shared", type=int, default=10, help="shared images for a pair's kappa (default 10)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="RATER", help="raters to leave out")
    p.add_argument("--true-groups", default=None, help="synth.json of a set drawn with --rater-groups, or a "
                                                       "rater,group CSV: reports the adjusted Rand index")
    p.add_argument("--seed", type=int, default=0, help="seeds the cross-validation folds and the bootstrap")
    return check_backbone_arguments(p, p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    from aessl.clean import CleanError
    from aessl.config import ConfigError
    from aessl.data import DataSourceError, LabeledSetError
    from aessl.embedding import EmbeddingError
    from aessl.logs import setup_logging
    from aessl.models import WeightsUnavailable
    from aessl.raters import RatersError, run_raters

    setup_logging()
    try:
        res = run_raters(args.labeled, args.out, Accelerator(mixed_precision="no"), model=args.model,
                         backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
                         test=args.test, clusters=args.clusters, cluster_on=args.cluster_on,
                         max_clusters=args.max_clusters, min_images=args.min_images, min_shared=args.min_shared,
                         exclude=args.exclude, groups=args.true_groups, cache_dir=args.cache_dir,
                         workers=args.workers, batch_size=args.batch_size, seed=args.seed)
    except (RatersError, CleanError, LabeledSetError, DataSourceError, EmbeddingError, WeightsUnavailable,
            ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((res.out / "summary.md").read_text())
    print(f"{res.raters} raters, {res.images} images, {res.ratings} ratings -> {res.clusters} cluster(s) in "
          f"{res.seconds} s; written to {res.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
