"""Why this score? python ssl/explain.py --model RUN --data SET --out DIR [--truth truth.parquet]

For every image of the scored set SET: nine interpretable measurements (brightness, contrast,
saturation, colourfulness, hue diversity, sharpness, edge density, text-like structure,
foreground size; scikit-image, cached), the human score (SET's scores) and the model's
expected score (RUN: a run folder or a model/ folder, image or embedding mode). A surrogate
(gradient boosting or ridge) is fitted from the measurements to each; permutation importance
on out-of-bag images with 95% bootstrap intervals, and partial dependence, say what each
score leans on and where the two differ.

--truth truth.parquet (a synthetic set from ssl/synth.py): the same for the generator's five
hidden attributes and its nuisance variables on the shaded images (true bracket 5-10), for
the generator's own score, the human labels and the model; the attributes' ranking is
compared with the generator's true weights (Spearman) and the nuisances should come out
near zero.

Writes DIR/summary.md, explain.json, importance.csv, images.csv and PNGs.
Library: aessl/explain.py; measurements: docs/explain.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run folder (holding model/) or a model/ folder")
    p.add_argument("--data", required=True, help="a scored set: <score>/ folders or a manifest with path, score "
                                                 "(and rater: one row per rating)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--truth", default=None, help="a synthetic set's truth.parquet: check against the generator")
    p.add_argument("--cache", default=None, help="measurement cache (parquet; default OUT/measurements.parquet)")
    p.add_argument("--surrogate", choices=("hgb", "ridge"), default="hgb",
                   help="hgb: HistGradientBoostingRegressor (default); ridge: standardised RidgeCV")
    p.add_argument("--bootstrap", type=int, default=30, help="bootstrap resamples of the images (default 30)")
    p.add_argument("--measure-size", type=int, default=256,
                   help="measure images with their longest side shrunk to this (default 256)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for scoring and measuring (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="scoring batch size (default 64)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seeds the resamples and the permutations")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from aessl.explain import USER_ERRORS, run_explain
    from aessl.logs import setup_logging

    setup_logging()
    try:
        res = run_explain(args.model, args.data, args.out, truth=args.truth, cache=args.cache, workers=args.workers,
                          batch_size=args.batch_size, device=args.device, bootstrap=args.bootstrap,
                          surrogate=args.surrogate, measure_size=args.measure_size, seed=args.seed,
                          progress=not args.no_progress)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((res.out / "summary.md").read_text())
    print(f"{res.summary['images']} images explained in {res.seconds} s; written to {res.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
