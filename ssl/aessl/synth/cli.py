"""Command line of the generator: `python ssl/synth.py --out data/synth --preview`."""

from __future__ import annotations

import argparse
import sys

from .dataset import generate
from .scores import UNLABELED_DISTRIBUTIONS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate the synthetic anime-aesthetics benchmark (labeled/test folders by bracket, an "
                    "unlabeled pool, truth.parquet and synth.json).")
    p.add_argument("--out", required=True, help="output folder (created; a previous synthetic set there is replaced)")
    p.add_argument("--labeled", type=int, default=3080, help="labeled images, model-card histogram (default 3080)")
    p.add_argument("--unlabeled", type=int, default=20000, help="unlabeled pool size (default 20000)")
    p.add_argument("--test", type=int, default=1000, help="test images, model-card histogram (default 1000)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs); output does not depend on it")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="fraction of labeled (not test) labels moved by +-1 bracket (default 0)")
    p.add_argument("--raters", type=int, default=0, help="simulate K raters: per-rater score columns in truth.parquet")
    p.add_argument("--rater-groups", type=int, default=0,
                   help="draw the --raters in G taste groups (shared attribute weights and harshness) and write "
                        "ratings.csv / ratings_test.csv (path,score,rater: --ratings-per-image raters per image, the "
                        "busiest raters rating most) and consensus_test.csv (the test images' mean-over-raters score)")
    p.add_argument("--ratings-per-image", type=int, default=3, help="with --rater-groups: raters per image (default 3)")
    p.add_argument("--unlabeled-dist", choices=UNLABELED_DISTRIBUTIONS, default="crawl",
                   help="bracket distribution of the unlabeled pool (default crawl: more photos/text/manga/flat)")
    p.add_argument("--weak-signal", action="store_true",
                   help="add a booru-favourite-like weak signal for every pool image: a truth.parquet column "
                        "weak_signal and OUT/weak_signal.csv (path,score: 10 x its pool percentile), trainable as "
                        "data.labeled; noisy, heavy-tailed, biased towards animal ears and memes")
    p.add_argument("--preview", action="store_true", help="write contact sheets to OUT/preview/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        generate(a.out, labeled=a.labeled, unlabeled=a.unlabeled, test=a.test, size=a.size, seed=a.seed,
                 workers=a.workers, label_noise=a.label_noise, raters=a.raters, unlabeled_dist=a.unlabeled_dist,
                 preview=a.preview, progress=not a.no_progress, weak_signal=a.weak_signal,
                 rater_groups=a.rater_groups, ratings_per_image=a.ratings_per_image)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
