"""Does the pool pay in the demo? configs/demo.yaml as it is, beside the same config with
other algorithms (supervised: the labels alone), same data, same budget, per training seed.

    python benchmarks/demo_gain.py                                    # demo's algorithm vs supervised, seed 0
    python benchmarks/demo_gain.py --algorithms supervised fixmatch rankmatch --seeds 0 1 2

Each run is `ssl/train.py --config configs/demo.yaml algorithm.name=<alg> seed=<s>` in
runs/demo_gain/<alg>-s<s>/ (a finished run is reused, a killed one resumes; the demo's
synthetic set is generated on first use, as ./train.sh does). The figures are
benchmarks/ssl_gain.py's: the test set's QWK, MAE and false-positive rate (true bracket <= 1
scored >= 5) from the run's last metrics line, and on the demo pool, whose true scores the
synthetic set knows, the precision of the pool's top 1% and its false-positive rate.
Prints a Markdown table (mean ± std over seeds) and writes it with the per-run figures as
JSON (--json, default benchmarks/work/demo_gain.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ssl_gain  # noqa: E402
import ssl_gain_lib as lib  # noqa: E402

COLUMNS = [("qwk", "QWK ↑"), ("mae", "MAE ↓"), ("false_positive_rate", "test FPR ↓"),
           ("pool_top1_precision", "pool top-1% ↑"), ("pool_false_positive_rate", "pool FPR ↓")]


def demo_config(overrides: list[str]):
    from aessl.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", overrides)


def run_figures(run: Path, metrics: dict, workers: int) -> dict:
    sources = json.loads((run / "run.json").read_text())["sources"]
    if not sources.get("truth"):
        raise SystemExit(f"{run}: trained on data without known truth (not the synthetic demo set)")
    main = Path(sources["truth"]).parent
    pool = ssl_gain.pool_truth(main)
    return ssl_gain.figures(run, metrics, pool, [str(main / p) for p in pool["path"]], workers, {})


def table(results: dict[str, list[dict]]) -> list[str]:
    lines = ["| algorithm | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for alg, reps in results.items():
        lines.append(f"| {alg} | " + " | ".join(lib.format_mean_std([r[k] for r in reps]) for k, _ in COLUMNS) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", nargs="+", default=None,
                   help="algorithms or benchmarks/ssl_gain.py ablations (default: supervised and the demo's own algorithm)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "demo_gain"), help="run folders go here")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "work" / "demo_gain.json"))
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. train.steps=300)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = demo_config(args.overrides)
    algorithms = args.algorithms or ["supervised", cfg.algorithm.name]
    out, results = Path(args.out).resolve(), {}
    for alg in algorithms:
        for seed in args.seeds:
            run = out / f"{alg}-s{seed}"
            print(f"{alg}, seed {seed}: {run}", flush=True)
            overrides = [f"seed={seed}", "train.tracker=none", *ssl_gain.algorithm_overrides(alg, cfg.train.steps),
                         *args.overrides]
            metrics = ssl_gain.train(run, "demo.yaml", overrides)
            results.setdefault(alg, []).append({**run_figures(run, metrics, 2), "seed": seed})
    text = "\n".join([f"configs/demo.yaml, seeds {' '.join(map(str, args.seeds))}"
                      + (f", overrides {' '.join(args.overrides)}" if args.overrides else ""), "", *table(results)])
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(ssl_gain.finite_or_none({"markdown": text, "runs": results}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
