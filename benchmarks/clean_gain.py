"""Does cleaning the labels help training? Raw vs ssl/clean.py's drop and relabel, with a floor
and a ceiling, on synthetic sets whose moved labels are known.

    python benchmarks/clean_gain.py                                  # noise 5/10/20%, data seeds 2 3 4: ~35 min
    python benchmarks/clean_gain.py --data-seeds 2 --noise 0.1       # one cell: ~5 min
    python benchmarks/clean_gain.py --flag-by ordinal                # only clean.py's default flags

The research agenda's question: "does removing outliers/bad labels improve the model or make
it more brittle with a limited dataset?". For each noise level P (--noise) and data seed D
(--data-seeds), `ssl/synth.py --labeled 3080 --test 1000 --label-noise P --seed D` (the
images do not depend on P: only the labels move, each by one bracket; truth.parquet records
them). On every such set, arms trained with the same recipe and scored on the same clean
test images:

  raw (floor)       the noisy labels as generated (the labeled folder);
  <flag>-drop       `ssl/clean.py --action drop --flag-by <flag>`'s cleaned.csv, flagged labels removed;
  <flag>-relabel    `ssl/clean.py --action relabel --flag-by <flag>`'s cleaned.csv, flagged labels set
                    to the out-of-fold median bracket;
  truth (ceiling)   the same images with their true brackets (truth.parquet's `bracket` as a
                    path,score manifest): what a perfect cleaner gives. One run per data seed
                    serves every noise level (same images, same brackets: checked).

--flag-by (default: ordinal cleanlab): `ordinal` is clean.py's default, the one a user runs
as documented; it is built to ignore one-bracket disagreements and flags ~5% of the set,
mostly correct rare-bracket labels (docs/data_quality.md). `cleanlab` is clean.py's other
flag (find_label_issues' default filter), the one that does see one-bracket moves but flags
40-49% of the set. Both are what the command line offers; a cut of one's own on scores.csv
is not measured here.

Training: `ssl/train.py --config configs/embed_demo.yaml algorithm.name=supervised`, a head on
the frozen features of the backbone that clean.py also uses (trained here, or reused, exactly
as benchmarks/clean_recall.py does: supervised image mode on synthetic seed --backbone-seed,
which is none of the data seeds), at the backbone's image size, --steps steps, one run per
data seed x --train-seeds value (a replicate).

Figures per noise level and arm, over replicates: test QWK, MAE, false-positive rate and
rare-bracket recall (brackets 0, 8, 9, 10) and the recall of brackets 0-1, mean +- the 95%
t interval; the paired difference arm - raw (same data seed and training seed) with its t
interval; the share of the gap closed, mean(arm - raw) / mean(truth - raw); and what the
action did to the labels: rows dropped or changed, how many of those were truly moved, and
the wrong labels left in the training set. Writes OUT/clean_gain.md and OUT/clean_gain.json
(OUT: benchmarks/work/clean_gain). Resumable: finished clean passes and runs are reused when
their recorded command is the same.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ssl"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import clean_recall as cr  # noqa: E402
import ssl_gain_lib as lib  # noqa: E402
from aessl.sweep import run_is_finished  # noqa: E402
from aessl.sweep_report import bootstrap_ci, mean_ci  # noqa: E402

FLOOR, CEILING = "raw", "truth"
ACTIONS = ("drop", "relabel")
# (key in a run's figures, title, higher is better)
SHOWN = (("qwk", "QWK", True), ("mae", "MAE", False), ("false_positive_rate", "FPR", False),
         ("rare_recall", "rare recall", True), ("low_recall", "recall 0-1", True))
RECORD = "clean_gain_command.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "work" / "clean_gain"), help="work and result folder")
    p.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="--label-noise levels")
    p.add_argument("--data-seeds", type=int, nargs="+", default=[2, 3, 4], help="synthetic seeds of the noisy sets")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0], help="training seeds per data seed")
    p.add_argument("--far", type=float, default=0.03, help="share moved >= 3 brackets on top of --far-on (0: none)")
    p.add_argument("--far-on", type=float, default=0.1, help="the --noise level the far moves are added to")
    p.add_argument("--labeled", type=int, default=3080, help="labeled images per set")
    p.add_argument("--test", type=int, default=1000, help="clean test images per set")
    p.add_argument("--size", type=int, default=64, help="synthetic image size (the backbone's, 64, by default)")
    p.add_argument("--steps", type=int, default=1200, help="training steps of every arm (embed_demo's 1200)")
    p.add_argument("--flag-by", nargs="+", choices=("ordinal", "cleanlab", "both", "either"),
                   default=["ordinal", "cleanlab"], help="clean.py --flag-by values, each with drop and relabel")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, help="an image-mode run whose backbone clean.py and the heads use")
    g.add_argument("--random-init", action="store_true", help="random-init test_convnext3 (weak; for tests)")
    p.add_argument("--backbone-dir", default=str(ROOT / "benchmarks" / "work" / "clean_recall"),
                   help="where the default backbone is trained or found (clean_recall's, shared)")
    p.add_argument("--backbone-seed", type=int, default=0, help="synthetic seed the default backbone trains on")
    p.add_argument("--backbone-steps", type=int, default=600, help="training steps of the default backbone")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (synth, clean, train)")
    args = p.parse_args(argv)
    if args.backbone_seed in args.data_seeds and not (args.model or args.random_init):
        p.error("--data-seeds must not include --backbone-seed: the backbone must not have seen the images")
    return args


# --------------------------------------------------------------------------- running scripts


def subprocess_runner(work: Path):
    """Runs ssl/<script> as a user would, its stderr in work/<script>.log (clean_recall.run)."""
    def runner(script: str, args: list[str]) -> None:
        cr.run([sys.executable, f"ssl/{script}", *map(str, args)], work / f"{Path(script).stem}.log")
    return runner


def up_to_date(folder: Path, command: list[str], done: bool) -> bool:
    """Whether `folder` already holds the finished result of `command`. A folder made by another
    command is refused (delete it or use another --out) rather than silently reused or mixed."""
    record = folder / RECORD
    if record.exists() and json.loads(record.read_text()) != command:
        raise SystemExit(f"{folder} was made by another command than {command} (see {record}); delete it")
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(command))
    return done


# --------------------------------------------------------------------------- backbone and data


def backbone(args) -> SimpleNamespace:
    """clean.py's backbone arguments and train.py's matching overrides (same weights, same
    image size, so both read the same embedding cache)."""
    if args.random_init:
        return SimpleNamespace(clean=["--backbone", "test_convnext3", "--image-size", str(args.size)],
                               train=["model.pretrained=false", f"data.image_size={args.size}"],
                               text="random-init test_convnext3")
    ns = SimpleNamespace(random_init=False, model=args.model, backbone_seed=args.backbone_seed,
                         steps=args.backbone_steps, workers=args.workers)
    work = Path(args.backbone_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clean_args = cr.backbone(ns, work)
    folder = Path(clean_args[1]) / "model" if (Path(clean_args[1]) / "model").is_dir() else Path(clean_args[1])
    info = json.loads((folder / "config.json").read_text())
    if info.get("mode", "image") != "image":
        raise SystemExit(f"--model {args.model}: an embedding-mode run; give an image-mode run (its backbone)")
    train = [f"model.name={info['architecture']}", f"model.pretrained={folder / 'model.safetensors'}",
             f"data.image_size={info['image_size']}", f"data.crop_pct={info.get('crop_pct', 1.0)}"]
    return SimpleNamespace(clean=clean_args, text=cr._rel(str(folder)), train=train)


def make_set(args, work: Path, seed: int, noise: float) -> Path:
    """The noisy set (labeled + clean test), generated once (synth reuses an identical one)."""
    from aessl.synth import generate

    folder = work / "sets" / f"s{seed}-n{noise:g}"
    generate(folder, labeled=args.labeled, unlabeled=0, test=args.test, size=args.size, seed=seed,
             label_noise=noise, workers=max(1, args.workers), progress=False)
    return folder


def write_manifest(path: Path, labels: dict[str, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score"])
        w.writerows(sorted(labels.items()))
    return path


def read_manifest(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {str(Path(r["path"]).resolve()): float(r["score"]) for r in csv.DictReader(f)}


def same_images(truths: list[dict]) -> None:
    """The ceiling is trained once per data seed: every noise level must hold the same images
    with the same true brackets (file names index the images; the folder is the label)."""
    keyed = [{Path(p).name: b for p, (_, b) in t.items()} for t in truths]
    if any(k != keyed[0] for k in keyed[1:]):
        raise SystemExit("the noise levels of one data seed hold different images: the generator changed")


# --------------------------------------------------------------------------- arms


def clean_arms(args, cond, work: Path, bb, runner) -> dict[str, Path]:
    """{arm: cleaned.csv} from ssl/clean.py on a condition's labels, one pass per --flag-by
    value and action."""
    arms = {}
    for flag in args.flag_by:
        for action in ACTIONS:
            out = work / "clean" / f"{cond.tag}-{flag}-{action}"
            cmd = ["--labeled", cond.source, "--out", out, *bb.clean, "--cache-dir", work / "embed",
                   "--workers", args.workers, "--action", action, "--flag-by", flag]
            if not up_to_date(out, [str(c) for c in cmd], (out / "cleaned.csv").is_file()):
                print(f"  clean.py --action {action} --flag-by {flag} on {cond.tag}", flush=True)
                runner("clean.py", cmd)
            arms[f"{flag}-{action}"] = out / "cleaned.csv"
    return arms


def label_counts(truth: dict[str, tuple[int, int]], labels: dict[str, float]) -> dict:
    """What an arm's manifest did to the raw labels, against the truth: rows dropped and
    changed, how many of those were truly moved, what relabelling fixed and broke, and the
    wrong labels left (and those two or more brackets off: relabelling can make them)."""
    moved = {p for p, (lab, b) in truth.items() if lab != b}
    dropped = set(truth) - set(labels)
    changed = {p for p, s in labels.items() if round(s) != truth[p][0]}
    wrong = [p for p, s in labels.items() if round(s) != truth[p][1]]
    return {"rows": len(labels), "moved_raw": len(moved), "dropped": len(dropped),
            "dropped_moved": len(dropped & moved), "changed": len(changed), "changed_moved": len(changed & moved),
            "fixed": sum(round(labels[p]) == truth[p][1] for p in changed),
            "broken": sum(1 for p in changed - moved), "wrong_left": len(wrong),
            "far_wrong_left": sum(abs(round(labels[p]) - truth[p][1]) >= 2 for p in wrong)}


def train_arm(args, work: Path, name: str, manifest: Path, test: Path, seed: int, bb, runner) -> dict:
    """One supervised embedding-mode run (reused when finished with the same command); its
    last metrics line plus rare-bracket and low-bracket recall."""
    run = work / "runs" / f"{name}-t{seed}"
    over = ["--config", str(ROOT / "configs" / "embed_demo.yaml"), "algorithm.name=supervised", *bb.train,
            f"data.labeled={manifest}", f"data.test={test}", f"embed.cache_dir={work / 'embed'}",
            f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"train.save_every={args.steps}",
            f"data.num_workers={args.workers}", "train.tracker=none", f"seed={seed}", f"output_dir={run}"]
    if not up_to_date(run, over, run_is_finished(run)):
        print(f"  train {run.name}", flush=True)
        runner("train.py", over + (["resume=true"] if (run / "checkpoints").exists() else []))
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    loop_s = json.loads((run / "timing.json").read_text())["loop_seconds"] if (run / "timing.json").exists() else None
    return {**last, "rare_recall": lib.rare_recall(last), "loop_seconds": loop_s,
            "low_recall": float(np.nanmean([last.get("recall_0", np.nan), last.get("recall_1", np.nan)]))}


def conditions(args, work: Path, seed: int) -> list[SimpleNamespace]:
    """Data seed `seed`'s noisy sets: one per --noise level, plus (--far) the --far-on level's
    labels with a share of the unmoved ones moved three or more brackets (clean_recall's far
    condition: real mistakes are not all one bracket, and the ordinal flags are built for them)."""
    out = []
    for p in args.noise:
        folder = make_set(args, work, seed, p)
        out.append(SimpleNamespace(name=f"{p:.0%}", tag=folder.name, source=folder / "labeled", test=folder / "test",
                                   truth=cr.truth_of(folder)))
        if args.far > 0 and p == args.far_on:
            tag = f"{folder.name}-far{args.far:g}"
            manifest, truth, _ = cr.add_far_moves(folder, args.far, seed, work / "sets" / tag)
            out.append(SimpleNamespace(name=f"{p:.0%} + {args.far:.0%} far", tag=tag, source=manifest,
                                       test=folder / "test", truth=truth))
    same_images([c.truth for c in out])
    return out


def one_seed(args, work: Path, seed: int, bb, runner) -> list[dict]:
    """Every arm's runs on data seed `seed`, all conditions: one record per run."""
    conds = conditions(args, work, seed)
    ceiling_manifest = write_manifest(work / "sets" / f"s{seed}-truth.csv",
                                      {p: b for p, (_, b) in conds[0].truth.items()})
    records = []
    for tseed in args.train_seeds:
        ceiling = train_arm(args, work, f"s{seed}-truth", ceiling_manifest, conds[0].test, tseed, bb, runner)
        for c in conds:
            arms = {FLOOR: c.source, **clean_arms(args, c, work, bb, runner)}
            for arm, manifest in arms.items():
                labels = {q: lab for q, (lab, _) in c.truth.items()} if arm == FLOOR else read_manifest(manifest)
                metrics = train_arm(args, work, f"{c.tag}-{arm}", manifest, c.test, tseed, bb, runner)
                records.append({"noise": c.name, "data_seed": seed, "train_seed": tseed, "arm": arm,
                                "metrics": metrics, "labels": label_counts(c.truth, labels)})
            truth_labels = {q: float(b) for q, (_, b) in c.truth.items()}
            records.append({"noise": c.name, "data_seed": seed, "train_seed": tseed, "arm": CEILING,
                            "metrics": ceiling, "labels": label_counts(c.truth, truth_labels)})
    return records


# --------------------------------------------------------------------------- statistics


def summarise(records: list[dict]) -> dict:
    """Per noise level and arm: each figure's mean +- t CI over replicates, the paired
    difference arm - raw (t CI and bootstrap CI), the gap closed and the mean label counts."""
    out = {}
    for p in dict.fromkeys(r["noise"] for r in records):
        rows = [r for r in records if r["noise"] == p]
        by_arm = {}
        for r in rows:
            by_arm.setdefault(r["arm"], {})[(r["data_seed"], r["train_seed"])] = r
        reps = sorted(by_arm[FLOOR])
        out[p] = {arm: arm_stats(runs, by_arm[FLOOR], by_arm.get(CEILING), reps) for arm, runs in by_arm.items()}
    return out


def arm_stats(runs: dict, floor: dict, ceiling: dict | None, reps: list) -> dict:
    stats = {"replicates": len(runs), "labels": {k: float(np.mean([runs[r]["labels"][k] for r in reps]))
                                                 for k in runs[reps[0]]["labels"]}}
    for key, _, higher in SHOWN:
        vals = [runs[r]["metrics"][key] for r in reps]
        diff = [runs[r]["metrics"][key] - floor[r]["metrics"][key] for r in reps]
        m, ci, n = mean_ci(vals)
        dm, dci, _ = mean_ci(diff)
        entry = {"mean": m, "ci": ci, "n": n, "values": vals, "diff_mean": dm, "diff_ci": dci,
                 "diff_bootstrap_ci": bootstrap_ci(diff)}
        if ceiling is not None:
            gap = [ceiling[r]["metrics"][key] - floor[r]["metrics"][key] for r in reps]
            entry["gap_mean"], entry["gap_ci"], _ = mean_ci(gap)
            entry["gap_closed"] = lib.gap_closed(float(np.mean([runs[r]["metrics"][key] for r in reps])),
                                                 float(np.mean([floor[r]["metrics"][key] for r in reps])),
                                                 float(np.mean([ceiling[r]["metrics"][key] for r in reps])), higher)
        stats[key] = entry
    return stats


def _pm(m: float, ci: float, digits: int = 3, sign: bool = False) -> str:
    if m is None or not math.isfinite(m):
        return "—"
    text = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return text if not math.isfinite(ci) else f"{text} ± {ci:.{digits}f}"


def arm_order(arms) -> list[str]:
    rest = sorted(a for a in arms if a not in (FLOOR, CEILING))
    return [a for a in (FLOOR, *rest, CEILING) if a in arms]


def table(summary: dict) -> list[str]:
    """Two tables: the figures per arm (mean ± CI) and the differences from raw with the gap closed."""
    head = ["| noise | arm | rows | dropped (moved) | changed (moved → fixed) | wrong left (≥2 off) | "
            + " | ".join(t for _, t, _ in SHOWN) + " |", "|---" * (6 + len(SHOWN)) + "|"]
    diff = ["| noise | arm | " + " | ".join(f"Δ {t}" for _, t, _ in SHOWN) + " | gap closed QWK | gap closed MAE |",
            "|---" * (4 + len(SHOWN)) + "|"]
    for p, arms in summary.items():
        for arm in arm_order(arms):
            s, c = arms[arm], arms[arm]["labels"]
            head.append(f"| {p} | {arm} | {c['rows']:.0f} | {c['dropped']:.0f} ({c['dropped_moved']:.0f}) | "
                        f"{c['changed']:.0f} ({c['changed_moved']:.0f} → {c['fixed']:.0f}) | "
                        f"{c['wrong_left']:.0f} ({c['far_wrong_left']:.0f}) | "
                        + " | ".join(_pm(s[k]["mean"], s[k]["ci"]) for k, _, _ in SHOWN) + " |")
            if arm == FLOOR:
                continue
            gaps = [_pct(s[k]) for k in ("qwk", "mae")]
            deltas = " | ".join(_pm(s[k]["diff_mean"], s[k]["diff_ci"], sign=True) for k, _, _ in SHOWN)
            diff.append(f"| {p} | {arm} | {deltas} | {gaps[0]} | {gaps[1]} |")
    return head + [""] + diff


def _pct(entry: dict) -> str:
    """Gap closed as a percentage; 'no gap' where the ceiling's mean is not better than the
    floor's, and a '*' where the gap's own CI includes 0 (the ratio then divides by noise)."""
    v = entry.get("gap_closed")
    if v is None or not math.isfinite(v):
        return "no gap" if "gap_mean" in entry else "—"
    return f"{v:.0%}" + ("*" if abs(entry["gap_mean"]) <= entry["gap_ci"] else "")


# --------------------------------------------------------------------------- main


def main(argv=None, runner=None) -> int:
    args = parse_args(argv)
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    runner = runner or subprocess_runner(work)
    t0 = time.time()
    bb = backbone(args)
    records = []
    for seed in args.data_seeds:
        print(f"data seed {seed}", flush=True)
        records += one_seed(args, work, seed, bb, runner)
    summary = summarise(records)
    seconds = round(time.time() - t0, 1)
    title = (f"Raw vs cleaned labels: {args.labeled} labeled + {args.test} test synthetic images, data seeds "
             f"{' '.join(map(str, args.data_seeds))} x training seeds {' '.join(map(str, args.train_seeds))}, "
             f"supervised head ({args.steps} steps) on {bb.text}; mean ± 95% t CI over replicates; {seconds:.0f} s")
    text = "\n".join([title, "", *table(summary)])
    print(text)
    (work / "clean_gain.md").write_text(text + "\n")
    (work / "clean_gain.json").write_text(json.dumps({"args": vars(args), "backbone": bb.text, "seconds": seconds,
                                                      "summary": summary, "records": records}, indent=1))
    print(f"wrote {work}/clean_gain.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
