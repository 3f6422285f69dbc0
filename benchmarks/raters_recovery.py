"""Does ssl/raters.py find the rater groups, and does the stratified ensemble beat the pooled
head? Measured on synthetic sets drawn with --raters K --rater-groups G, where the groups and
the consensus are known.

    python benchmarks/raters_recovery.py                     # seeds 5 6 7, 12 raters in 3 groups
    python benchmarks/raters_recovery.py --seeds 5 --raters 20 --groups 4

Per seed: the set (3,080 labeled images rated by 3 raters each, 1,000 test images with their
consensus score), then aessl.raters.analyse on two kinds of features:

- backbone: the frozen backbone of --model (default: clean_recall's supervised run on seed 0,
  which never saw these images), what a user has;
- attributes (the ceiling): the generator's own hidden attributes and category, which are
  what the raters' tastes are functions of; no backbone can do better than seeing them.

Each with the number of clusters chosen by silhouette and with the true G. Reports the
adjusted Rand index, the stratified ensemble's and the pooled head's QWK against the consensus
(and their paired bootstrap difference) and each rater's own head against the pooled one on
their test ratings. Writes OUT/raters_recovery.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ssl"))

MIN_IMAGES = 20  # raters.py's default --min-images
ATTRS = ("shading", "palette", "line_clean", "composition", "detail", "line_smooth", "line_continuity", "line_weight")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "work" / "raters"))
    p.add_argument("--seeds", type=int, nargs="+", default=[5, 6, 7])
    p.add_argument("--raters", type=int, default=12)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--labeled", type=int, default=3080)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default=str(ROOT / "benchmarks" / "work" / "clean_recall" / "backbone-seed0"),
                   help="run whose backbone gives the features (benchmarks/clean_recall.py trains it)")
    return p.parse_args(argv)


def attribute_features(set_dir: Path, paths: list[str]) -> np.ndarray:
    """The truth's attributes, category one-hot and attribute x category products, per path."""
    import pyarrow.parquet as pq

    t = {os.path.abspath(set_dir / r["path"]): r for r in pq.read_table(set_dir / "truth.parquet").to_pylist()}
    cats = sorted({r["category"] for r in t.values()})
    rows = []
    for p in paths:
        r = t[os.path.abspath(p)]
        a = np.array([0.0 if r[k] is None or r[k] != r[k] else r[k] for k in ATTRS])
        c = np.array([float(r["category"] == k) for k in cats])
        rows.append(np.concatenate([a, c, np.outer(c, a).ravel()]))
    return np.array(rows)


def one_seed(args, seed: int, accelerator) -> dict:
    from aessl import raters as R
    from aessl.clean import backbone_from
    from aessl.synth import generate

    d = Path(args.out) / f"set-s{seed}"
    generate(d, labeled=args.labeled, unlabeled=0, test=args.test, size=args.size, seed=seed, workers=2,
             raters=args.raters, rater_groups=args.groups, progress=False)
    known = R.true_groups(d / "synth.json")
    try:
        r = R.load_ratings(d / "ratings.csv", "--labeled", MIN_IMAGES)
    except R.RatersError:  # what raters.py's error tells a user to do: leave the rarest raters out
        few = R.load_ratings(d / "ratings.csv", "--labeled", 0)
        exclude = [n for n in few.raters if len(np.unique(few.image[few.of(n)])) < MIN_IMAGES]
        print(f"seed {seed}: leaving out {exclude} (fewer than {MIN_IMAGES} images)", file=sys.stderr)
        r = R.load_ratings(d / "ratings.csv", "--labeled", MIN_IMAGES, exclude)
    t = R.load_ratings(d / "ratings_test.csv", "--test", need_raters=False)
    c = R.load_ratings(d / "consensus_test.csv", "--test", need_raters=False)
    bb = backbone_from(args.model, None, None, None)
    X, r, _ = R.features(r, d / "ratings.csv", "--labeled", bb, accelerator, None, 2, 64)
    Xc, c, _ = R.features(c, d / "consensus_test.csv", "--test", bb, accelerator, None, 2, 64)
    Xt, t, _ = R.features(t, d / "ratings_test.csv", "--test", bb, accelerator, None, 2, 64)
    feats = {"backbone": (X, Xc, Xt),
             "attributes": tuple(attribute_features(d, s.paths) for s in (r, c, t))}
    out = {}
    for name, (F, Fc, Ft) in feats.items():
        for k in (None, args.groups):
            res = R.analyse(F, r, Fc, c, clusters=k, known=known, seed=seed)
            per = R.analyse(F, r, Ft, t, clusters=k, known=known, seed=seed)["summary"]["evaluation"]["per_rater"]
            s, ev = res["summary"], res["summary"]["evaluation"]
            out[f"{name}/{'silhouette' if k is None else 'k=' + str(k)}"] = {
                "clusters": s["clusters"], "ari": s["adjusted_rand_index"],
                "stratified_qwk": ev["consensus"]["stratified"]["qwk"], "pooled_qwk": ev["consensus"]["pooled"]["qwk"],
                "diff": ev["stratified_minus_pooled"]["diff"], "diff_ci95": ev["stratified_minus_pooled"]["ci95"],
                "own_minus_pooled_per_rater": float(np.mean([p["own"]["qwk"] - p["pooled"]["qwk"] for p in per]))}
    return out


def markdown(results: dict, args) -> str:
    lines = [f"# Rater groups: {args.raters} raters in {args.groups} groups, seeds {args.seeds}", "",
             "| features / clusters | seed | k | ARI | stratified QWK | pooled QWK | strat − pooled (95% CI) | "
             "own − pooled, per rater |", "|---|---|---|---|---|---|---|---|"]
    for seed, res in results.items():
        for key, v in res.items():
            lines.append(f"| {key} | {seed} | {v['clusters']} | {v['ari']:.3f} | {v['stratified_qwk']:.3f} | "
                         f"{v['pooled_qwk']:.3f} | {v['diff']:+.3f} ({v['diff_ci95'][0]:+.3f}, "
                         f"{v['diff_ci95'][1]:+.3f}) | {v['own_minus_pooled_per_rater']:+.3f} |")
    keys = list(next(iter(results.values())))
    lines += ["", "Means over seeds:", "", "| features / clusters | ARI | strat − pooled | own − pooled |",
              "|---|---|---|---|"]
    for key in keys:
        vals = [res[key] for res in results.values()]
        lines.append(f"| {key} | {np.mean([v['ari'] for v in vals]):.3f} ± {np.std([v['ari'] for v in vals]):.3f} | "
                     f"{np.mean([v['diff'] for v in vals]):+.3f} | "
                     f"{np.mean([v['own_minus_pooled_per_rater'] for v in vals]):+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="no")
    results = {seed: one_seed(args, seed, acc) for seed in args.seeds}
    out = Path(args.out)
    (out / "raters_recovery.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    md = markdown(results, args)
    (out / "raters_recovery.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
