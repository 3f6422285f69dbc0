"""Evaluation report for trained models: python ssl/report.py RUN [RUN ...] --data SCORED_SET [options]

Each RUN is a run folder (from ssl/train.py) or a bare model/ folder. Every model scores the
same scored set (a <score>/ folder tree or a manifest); the report folder then holds
report.html (self-contained: open it anywhere, nothing is fetched), metrics.json,
predictions.parquet and every plot as PNG. With --pool it also scores an unlabeled pool
(score distribution; pseudo-label accuracy and coverage where a truth file knows the answers).
With --saliency every image of the grids (top-scored, false positives, worst misses) gets an
integrated-gradients map of its expected score beside it, through the whole model (the frozen
backbone and the head of an embedding-mode model too). With --tiles N (5: corners + centre, or a
square such as 9) every image is scored as N crops of the image resized to --tile-scale (default 2)
x the model's size, reduced with --tile-reduce mean|median|min|max (aessl/tiles.py); the page and
metrics.json record the setting.

    python ssl/report.py runs/demo --data data/synth/test --tiles 5 --tile-reduce median
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) or model/ folder(s), compared side by side")
    p.add_argument("--data", required=True, help="scored set: folder of <score>/ subfolders or a .csv/.jsonl/.parquet manifest")
    p.add_argument("--pool", default=None, help="unlabeled pool (folder, manifest or saved dataset): score distribution, pseudo-labels")
    p.add_argument("--pool-limit", type=int, default=None, help="score at most this many pool images")
    p.add_argument("--truth", default=None, help="truth.parquet (path, split, bracket, score) for the pool; default: the run's own "
                                                 "(run.json sources.truth), if any")
    p.add_argument("--out", default=None, help="report folder (default: reports/<date-time>)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=None, help="K of top-K precision (default: 10%% of the scored set)")
    p.add_argument("--grid", type=int, default=12, help="images per grid (top, false positives, misses)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: up to 4)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on CPU; softmax always fp32")
    p.add_argument("--saliency", action="store_true",
                   help="draw a saliency map (integrated gradients of the expected score) beside every grid image")
    p.add_argument("--saliency-steps", type=int, default=50,
                   help="integration steps per image (default 50; the report shows the error left, the convergence delta)")
    p.add_argument("--saliency-baseline", choices=("blur", "black"), default="blur",
                   help="what the image is compared with: the image blurred (default: what its detail adds) or a black image")
    p.add_argument("--saliency-batch-size", type=int, default=16,
                   help="images x steps per forward-and-backward pass (memory, not results; default 16)")
    p.add_argument("--tiles", type=int, default=1, metavar="N",
                   help="tiled inference: score N crops of each image and reduce them (5: four corners + centre; "
                        "k*k, e.g. 4, 9: a k x k grid; default 1: off, the normal eval view)")
    p.add_argument("--tile-reduce", choices=("mean", "median", "min", "max"), default=None,
                   help="how the N tiles' distributions become one (default mean; median/min/max: the tile with the "
                        "median/lowest/highest expected score)")
    p.add_argument("--tile-scale", type=float, default=None, metavar="F",
                   help="resize the shorter side to F x the model's image size before cutting tiles (default 2; >= 1)")
    args = p.parse_args(argv)
    from aessl.tiles import settings_from_flags

    args.tile_settings, problems = settings_from_flags(args.tiles, args.tile_reduce, args.tile_scale)
    if problems:
        p.error("; ".join(problems))
    for name in ("batch_size", "grid", "pool_limit", "saliency_steps", "saliency_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be 0 or more")
    if args.top_k is not None and args.top_k < 1:
        p.error("--top-k must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from aessl.data import DataSourceError, LabeledSetError
    from aessl.logs import setup_logging

    setup_logging()
    from aessl.report import TABLE_ROWS, ReportError, build_report
    from aessl.saliency import SaliencyOptions

    out = Path(args.out or f"reports/{datetime.now():%Y%m%d-%H%M%S}")
    saliency = SaliencyOptions(steps=args.saliency_steps, baseline=args.saliency_baseline,
                               batch_size=args.saliency_batch_size) if args.saliency else None
    try:
        report = build_report(args.runs, args.data, out, pool=args.pool, truth=args.truth, batch_size=args.batch_size,
                              top_k=args.top_k, grid=args.grid, workers=args.workers, device=args.device,
                              pool_limit=args.pool_limit, precision=args.precision, saliency=saliency,
                              tiles=args.tile_settings)
    except (ReportError, LabeledSetError, DataSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    names = report["run_names"]
    width = max(12, *(len(n) for n in names))
    print(f"\n{report['num_images']} images from {report['data']}")
    if args.tile_settings.on:
        print(f"tiles: {args.tile_settings.describe()}")
    print(f"{'metric':<24}" + "".join(f"{n:>{width + 2}}" for n in names))
    for key, _, better in TABLE_ROWS:
        if key.startswith("recall_"):
            continue
        cells = []
        for n in names:
            v = report["runs"][n]["metrics"].get(key)
            text = "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else (
                str(int(v)) if key == "skipped_images" else f"{v:.4f}")
            cells.append(f"{text + (' *' if n in report['best'].get(key, []) else ''):>{width + 2}}")
        print(f"{key:<24}" + "".join(cells))
    if len(names) > 1:
        print("(* best)")
    if report["pool"]:
        print(f"pool: {report['pool']['num_images']} images, {report['pool']['skipped']} unreadable skipped")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"\nreport: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
