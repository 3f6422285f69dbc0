"""What to label next: a queue of pool images whose labels would teach the model most.

    python ssl/label_next.py --export exports/pool --n 100 --out queue.csv
    python ssl/label_next.py --export exports/pool --export exports/pool-other --n 100 --out queue.csv \\
        --model runs/demo --exclude labeled/ --exclude corrections.csv

Reads an ssl/export.py folder (and other exports of the same pool, matched by path), ranks
its images by ordinal uncertainty (the standard deviation of the bracket under the model's
probabilities; with several exports, plus their disagreement as a standard deviation of the
expected score across runs), drops images already labeled (--exclude: a folder of images,
an image, or a manifest with a `path` column; the same file or the same bytes), and with
--model picks the queue for coverage among the top 5 x n: a priority-weighted k-center
greedy on the model's own pooled features, so the queue is not n near-copies. Without
--model the queue is the top n by priority.

Writes a CSV: rank, path, expected_score, bracket, uncertainty, disagreement, priority
(disagreement is empty with one export). A missing or foreign export folder, --n <= 0, an
--exclude that does not exist or a --model that does not load: exit 2 with the reason.
The library part is aessl/active.py.
"""

import argparse
import os
import sys

from aessl.active import ActiveLearningError, ModelFeatures, exclude_paths, plan_queue, write_queue_csv
from aessl.export import resolve_device
from aessl.logs import setup_logging
from aessl.models import resolve_model_folder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="label_next.py",
        description="Rank an exported pool by what a label would teach the model (ordinal uncertainty, "
                    "disagreement between exports, diversity) and write the queue as CSV.")
    p.add_argument("--export", action="append", required=True, metavar="DIR",
                   help="an ssl/export.py --out folder; repeat for other exports of the same pool (the first is "
                        "the main one: its scores are written; the others add disagreement)")
    p.add_argument("--n", type=int, required=True, help="how many images to queue")
    p.add_argument("--out", required=True, help="CSV file to write (rank, path, expected_score, bracket, "
                                                "uncertainty, disagreement, priority)")
    p.add_argument("--model", default=None, metavar="RUN",
                   help="run or model/ folder whose pooled features drive the diversity step (without it: the "
                        "top n by priority)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATH",
                   help="images already labeled or corrected: a folder (recursive), an image, or a "
                        ".csv/.jsonl/.parquet manifest with 'path'; repeatable")
    p.add_argument("--candidates", type=int, default=None,
                   help="with --model: how many of the highest priorities the diversity step chooses from "
                        "(default 5 x n)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the feature pass")
    p.add_argument("--device", default=None, help="where features are computed (default: cuda if there is one)")
    args = p.parse_args(argv)
    problems = []
    if args.n < 1:
        problems.append(f"--n must be >= 1, got {args.n}")
    if args.candidates is not None and args.candidates < args.n:
        problems.append(f"--candidates ({args.candidates}) must be >= --n ({args.n})")
    if args.candidates is not None and not args.model:
        problems.append("--candidates is for the diversity step: it needs --model")
    if args.batch_size < 1:
        problems.append("--batch-size must be >= 1")
    try:
        resolve_device(args.device)
    except ValueError as exc:
        problems.append(str(exc))
    if os.path.isdir(args.out):
        problems.append(f"--out {args.out} is a folder; name the CSV file to write, e.g. {os.path.join(args.out, 'queue.csv')}")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        features = None
        if args.model:
            try:
                folder = resolve_model_folder(args.model)
            except FileNotFoundError as exc:
                raise ActiveLearningError(f"--model: {exc}") from None
            features = ModelFeatures(folder, args.batch_size, args.device)
        exclude = []
        for source in args.exclude:
            exclude += exclude_paths(source)
        rows, info = plan_queue(args.export[0], args.n, args.export[1:], features, exclude, args.candidates)
    except ActiveLearningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_queue_csv(rows, args.out)
    print_summary(args, rows, info)
    return 0


def print_summary(args, rows: list[dict], info: dict) -> None:
    how = "uncertainty"
    if info["other_exports"]:
        shared = ", ".join(f"{f} ({n} shared)" for f, n in info["other_exports"])
        how += f" + disagreement with {shared}"
    pick = (f"k-center greedy over the top {info['candidates']} on {args.model}'s features" if info["diversity"]
            else "top n by priority (pass --model RUN for a diverse queue)")
    print(f"label_next: {len(rows)} of {info['pool']} pool images queued to {args.out} | priority: {how} | "
          f"pick: {pick} | excluded as already labeled: {info['excluded']}")
    for r in rows[:5]:
        dis = "" if r["disagreement"] is None else f" disagreement {r['disagreement']:.2f}"
        print(f"  {r['rank']:>4}  {r['path']}  score {r['expected_score']:.2f} (bracket {r['bracket']}) "
              f"uncertainty {r['uncertainty']:.2f}{dis} priority {r['priority']:.2f}")
    if len(rows) > 5:
        print(f"  ... {len(rows) - 5} more in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
