"""Run an experiment sweep: python ssl/sweep.py configs/sweeps/NAME.yaml [--out DIR] [--storage URL]

Trains one ssl/train.py run per cell and seed of the sweep file (aessl/sweep.py documents
the format), on an Optuna study that remembers what finished: run the same command again
after a kill or a failure and only the missing runs train. Writes OUT/results.parquet (one
row per run: axis values, seed, metrics, wall time, weight count) and OUT/report.html
(mean ± 95% CI per cell and per axis, paired differences with bootstrap CIs and Wilcoxon
p-values, metric-vs-axis plots). Default OUT: runs/sweeps/<sweep name>.

Several machines or GPUs on one sweep: give each the same --storage database URL (e.g.
postgresql://host/db; SQLite only for one machine) and its own --out; each runs cells no
other has taken, and every one's report covers all finished runs.

Exit status: 0 every run finished, 1 some run failed (its train.log is named; the next
start retries it), 2 a bad sweep file or command line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (YAML), e.g. configs/sweeps/resolution.yaml")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<name>)")
    p.add_argument("--storage", default=None, help="Optuna RDB URL (default sqlite:///OUT/study.db)")
    p.add_argument("--dry-run", action="store_true", help="check every cell's config and print the runs; train nothing")
    p.add_argument("--report-only", action="store_true", help="write results.parquet and report.html from what finished")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; name a folder for the sweep")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from aessl import sweep as sw
    from aessl.locks import FolderLock, FolderLocked

    try:
        spec = sw.load_sweep(args.sweep)
    except sw.SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or sw.ROOT / "runs" / "sweeps" / spec.name).resolve()
    try:
        if args.dry_run:
            return dry_run(spec, out)
        with FolderLock(out, "sweep folder"):
            if args.report_only:
                study = sw.open_study(spec, args.storage or f"sqlite:///{out / 'study.db'}")
                errors = []
            else:
                study, errors = sw.run_sweep(spec, out, args.storage, args.keep_checkpoints, not args.no_progress)
            return write_outputs(spec, out, study, errors)
    except (sw.SweepError, FolderLocked) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are kept in {out}; run the same command again to go on", file=sys.stderr)
        return 130


def dry_run(spec, out: Path) -> int:
    from aessl import sweep as sw

    shared = ["data.labeled=<generated>/labeled", "data.test=<generated>/test",
              "data.unlabeled=<generated>/unlabeled"] if "synth" in spec.data else []
    for key in ("labeled", "test", "unlabeled"):  # data given as paths: what the runs will get
        if key in spec.data:
            path = sw.resolve_path(str(spec.data[key]), spec.path)
            shared = [o for o in shared if not o.startswith(f"data.{key}=")] + [f"data.{key}={path}"]
    runner = sw.Runner(spec, out, shared, {"out": out, "data": out / "data",
                                            **{f"data.{n}": out / "data" / n for n in spec.data.get("more", {})},
                                            **{f"before.{n}": out / "before" / n for n in spec.before}})
    sw.check_cells(spec, runner)
    for name, overrides in spec.before.items():
        print(f"before {name}: " + shlex.join(overrides))
    if spec.is_search:
        print(f"search: {spec.search['trials']} trials x seeds {spec.seeds} over {', '.join(spec.search['space'])}")
        return 0
    for cell in sw.cells(spec):
        for seed in spec.seeds:
            print(f"{cell.tag}/s{seed}: " + shlex.join(runner.overrides(cell, seed)))
    return 0


def write_outputs(spec, out: Path, study, errors: list[str]) -> int:
    from aessl import sweep as sw
    from aessl.fileio import write_atomic
    from aessl.sweep_report import write_report

    frame = sw.results_table(study, spec)
    write_atomic(out / "results.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    left = len(sw.missing(study, spec)) * (len(spec.seeds) if spec.is_search else 1)
    axes = list(spec.axes or spec.search["space"])
    description = f"{spec.path} · base {spec.base.name} · " + " ".join(spec.overrides)
    report = write_report(frame, out, spec.name, axes, spec.metric, description, errors, left,
                          zipped=spec.combine == "zip")
    shown = [c for c in ("cell", "seed", spec.metric, "mae", "false_positive_rate", "wall_s") if c in frame.columns]
    print(frame[shown].to_string(index=False) if len(frame) else "(no finished runs)")
    print(f"wrote {out / 'results.parquet'} ({len(frame)} runs) and {report}")
    if errors:
        print(f"{len(errors)} run(s) failed (fix the cause, then run the same command again to retry them):",
              file=sys.stderr)
        for e in errors:
            lines = [x.strip() for x in e.splitlines() if x.strip()]
            why = [x for x in lines[1:] if x.startswith("error:")] or lines[-1:]  # train.py's own message, or the last line
            print("  " + lines[0] + ("" if why == lines[:1] else "\n    " + why[-1]), file=sys.stderr)
        return 1
    if left:
        print(f"{left} run(s) still missing; run the same command again to finish them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
