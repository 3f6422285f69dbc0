"""How many of the moved labels does ssl/clean.py find? Measured on the synthetic set, whose
truth.parquet records every label that --label-noise moved.

    python benchmarks/clean_recall.py                      # backbone trained here (or reused), seed-2 sets
    python benchmarks/clean_recall.py --model RUN          # any trained run's backbone
    python benchmarks/clean_recall.py --random-init        # the random-init backbone (weak, for contrast)

Conditions, each on `--labeled` images of synthetic seed `--seed` (test and pool empty):

- `near P` for P in --noise: `ssl/synth.py --label-noise P` moves a share P of the labels by
  exactly one bracket (truth.parquet: label != bracket);
- `near P0 + far F` (--far F, on the --far-on level P0): the same set plus a share F
  of the unmoved labels moved three or more brackets (uniformly among those brackets), written
  as a path,score manifest. The synthetic noise is all one bracket; real mistakes (a file in
  the wrong folder, a slip of the keyboard) are not, and the ordinal ranking is built for them.

The backbone must not have seen these images: by default it is trained here, supervised, on
synthetic seed --backbone-seed (configs/demo.yaml, algorithm.name=supervised,
train.steps=600; reused when its model/ folder exists). Each condition runs `ssl/clean.py`
(default cuts) and reads its scores.csv. Per ranking (cleanlab's label quality; the ordinal
score P(|k - given| <= 1)): precision and recall of the default cut (and of both / either
flag), average precision, precision at k = the number of moved labels, and the
precision-recall curve. Writes OUT/clean_recall<tag>.json, .md (the table) and .png (the
curves; dots: the default cuts).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RANKINGS = (("cleanlab", "quality_score", "cleanlab_flag"), ("ordinal", "ordinal_score", "ordinal_flag"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "work" / "clean_recall"), help="work and result folder")
    p.add_argument("--seed", type=int, default=2, help="synthetic seed of the noisy sets (default 2)")
    p.add_argument("--labeled", type=int, default=3080, help="labeled images per set (default 3080)")
    p.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="--label-noise levels")
    p.add_argument("--far", type=float, default=0.03, help="share moved >= 3 brackets on top of --far-on "
                                                           "(0: no such condition)")
    p.add_argument("--far-on", type=float, default=0.1, help="the --noise level the far moves are added to")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, help="a trained run whose backbone clean.py uses")
    g.add_argument("--random-init", action="store_true", help="clean.py's random-init test_convnext3")
    p.add_argument("--backbone-seed", type=int, default=0, help="synthetic seed the default backbone trains on")
    p.add_argument("--steps", type=int, default=600, help="training steps of the default backbone")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. -random)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.seed == args.backbone_seed and not args.model and not args.random_init:
        p.error("--seed must differ from --backbone-seed: the backbone must not have seen the images it checks")
    return args


def run(cmd: list[str], log: Path) -> str:
    """A command with its stderr appended to `log`; its stdout. Exits naming the log on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as err:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return proc.stdout


def synth(out: Path, seed: int, n: int, noise: float, test: int, workers: int):
    from aessl.synth import generate

    generate(out, labeled=n, unlabeled=0, test=test, seed=seed, label_noise=noise, workers=workers, progress=False)
    return out


def backbone(args, work: Path) -> list[str]:
    """clean.py's backbone arguments: --model, the random init, or the default backbone
    (trained here on synthetic seed --backbone-seed unless its model/ exists)."""
    if args.random_init:
        return ["--backbone", "test_convnext3"]
    if args.model:
        return ["--model", args.model]
    run_dir = work / f"backbone-seed{args.backbone_seed}"
    if not (run_dir / "model" / "config.json").is_file():
        data = synth(work / f"synth-seed{args.backbone_seed}", args.backbone_seed, 3080, 0.0, 1000, args.workers)
        print(f"training the backbone on synthetic seed {args.backbone_seed} into {run_dir}", flush=True)
        run([sys.executable, "ssl/train.py", "--config", "configs/demo.yaml", "algorithm.name=supervised",
             f"train.steps={args.steps}", f"data.labeled={data / 'labeled'}", f"data.test={data / 'test'}",
             "data.num_workers=1", "train.tracker=none", f"output_dir={run_dir}"], work / "train.log")
    return ["--model", str(run_dir)]


def truth_of(folder: Path) -> dict[str, tuple[int, int]]:
    """{absolute path: (given label, true bracket)} of a synthetic set's labeled images."""
    import pyarrow.parquet as pq

    t = pq.read_table(folder / "truth.parquet", columns=["path", "split", "label", "bracket"]).to_pylist()
    return {str((folder / r["path"]).resolve()): (r["label"], r["bracket"]) for r in t if r["split"] == "labeled"}


def add_far_moves(folder: Path, share: float, seed: int, out: Path) -> tuple[Path, dict, set]:
    """A manifest of `folder`'s labeled set with `share` of the unmoved labels moved >= 3
    brackets; returns it, the truth ({path: (label, bracket)}) and the far-moved paths."""
    truth = truth_of(folder)
    paths = sorted(truth)
    rng = np.random.default_rng([seed, 7331])
    clean = [p for p in paths if truth[p][0] == truth[p][1]]
    far = set(rng.choice(clean, size=int(round(share * len(paths))), replace=False).tolist())
    rows, new = [], {}
    for p in paths:
        label, bracket = truth[p]
        if p in far:
            label = int(rng.choice([b for b in range(11) if abs(b - label) >= 3]))
        new[p] = (label, bracket)
        rows.append({"path": p, "score": label})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labeled.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "score"])
        w.writeheader()
        w.writerows(rows)
    return out / "labeled.csv", new, far


def read_scores(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    return {k: np.asarray(v) if k == "path" else np.asarray(v, dtype=np.float64) for k, v in cols.items()}


def ranking_figures(positive: np.ndarray, score: np.ndarray, flag: np.ndarray, tiebreak: np.ndarray) -> dict:
    """Precision/recall of a flag and of a ranking (low score = worse label) against `positive`."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    n_pos = int(positive.sum())
    order = np.lexsort((-tiebreak, score))
    top = order[:n_pos]
    prec, rec, _ = precision_recall_curve(positive, -score + 1e-9 * tiebreak)
    keep = np.unique(np.linspace(0, len(prec) - 1, 200).astype(int))
    flagged = flag.astype(bool)
    return {"flagged": int(flagged.sum()), "precision": _ratio(positive[flagged].sum(), flagged.sum()),
            "recall": _ratio(positive[flagged].sum(), n_pos),
            "average_precision": round(float(average_precision_score(positive, -score + 1e-9 * tiebreak)), 4),
            "precision_at_k": _ratio(positive[top].sum(), n_pos),
            "curve": {"precision": np.round(prec[keep], 4).tolist(), "recall": np.round(rec[keep], 4).tolist()}}


def _ratio(a, b) -> float | None:
    return None if b == 0 else round(float(a) / float(b), 4)


def evaluate(scores: dict, truth: dict, far: set | None) -> dict:
    paths = [str(Path(p).resolve()) for p in scores["path"]]
    label = np.array([truth[p][0] for p in paths])
    if not np.array_equal(label, scores["given_bracket"].astype(int)):
        raise SystemExit("clean.py's given brackets differ from truth.parquet's labels: wrong set?")
    moved = np.array([truth[p][0] != truth[p][1] for p in paths])
    out = {"images": len(paths), "moved": int(moved.sum()), "rankings": {}}
    for name, col, flag in RANKINGS:
        out["rankings"][name] = ranking_figures(moved, scores[col], scores[flag], scores["expected_distance"])
    for name, f in (("both", scores["cleanlab_flag"] * scores["ordinal_flag"]),
                    ("either", np.maximum(scores["cleanlab_flag"], scores["ordinal_flag"]))):
        f = f.astype(bool)
        out[f"flag_{name}"] = {"flagged": int(f.sum()), "precision": _ratio(moved[f].sum(), f.sum()),
                               "recall": _ratio(moved[f].sum(), moved.sum())}
    if far:
        is_far = np.array([p in far for p in paths])
        out["far"] = {"moved": int(is_far.sum()), "rankings": {
            name: ranking_figures(is_far, scores[col], scores[flag], scores["expected_distance"])
            for name, col, flag in RANKINGS}}
    return out


def conditions(args, work: Path):
    """(name, scored set for clean.py, truth, far-moved paths or None) per condition."""
    for p in args.noise:
        folder = synth(work / f"noisy-s{args.seed}-n{p:g}", args.seed, args.labeled, p, 0, args.workers)
        yield f"near {p:.0%}", folder / "labeled", truth_of(folder), None
        if p == args.far_on and args.far > 0:
            manifest, truth, far = add_far_moves(folder, args.far, args.seed,
                                                 work / f"far-s{args.seed}-n{p:g}-f{args.far:g}")
            yield f"near {p:.0%} + far {args.far:.0%}", manifest, truth, far


def table(results: dict) -> list[str]:
    lines = ["| condition | moved | ranking | flagged | precision | recall | AP | precision@k |",
             "|---|---|---|---|---|---|---|---|"]
    for cond, r in results.items():
        for name, f in r["rankings"].items():
            lines.append(f"| {cond} | {r['moved']} | {name} | {f['flagged']} | {_fmt(f['precision'])} | "
                         f"{_fmt(f['recall'])} | {_fmt(f['average_precision'])} | {_fmt(f['precision_at_k'])} |")
        for name in ("both", "either"):
            f = r[f"flag_{name}"]
            lines.append(f"| {cond} | {r['moved']} | flag {name} | {f['flagged']} | {_fmt(f['precision'])} | "
                         f"{_fmt(f['recall'])} | | |")
        if "far" in r:
            for name, f in r["far"]["rankings"].items():
                lines.append(f"| {cond}: far moves only | {r['far']['moved']} | {name} | {f['flagged']} | "
                             f"{_fmt(f['precision'])} | {_fmt(f['recall'])} | {_fmt(f['average_precision'])} | "
                             f"{_fmt(f['precision_at_k'])} |")
    return lines


def _rel(text: str) -> str:
    """A path under the checkout as a relative path (titles and tables stay short)."""
    p = Path(text)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else text


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, r, r) for c, r in results.items()] + [(f"{c}: far moves only", r["far"], r)
                                                       for c, r in results.items() if "far" in r]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (name, r, whole) in zip(axes[0], panels):
        for (rank, f), colour in zip(r["rankings"].items(), ("tab:blue", "tab:orange")):
            ax.plot(f["curve"]["recall"], f["curve"]["precision"], color=colour,
                    label=f"{rank} (AP {f['average_precision']:.2f})")
            if f["recall"] is not None and f["precision"] is not None:
                ax.plot([f["recall"]], [f["precision"]], "o", color=colour)
        ax.axhline(r["moved"] / whole["images"], color="grey", lw=0.8, ls=":")
        ax.set(title=name, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bb = backbone(args, work)
    results, t0 = {}, time.time()
    for name, source, truth, far in conditions(args, work):
        out = work / ("clean-" + name.replace(" ", "").replace("%", "").replace("+", "_") + args.tag)
        print(f"{name}: ssl/clean.py on {source}", flush=True)
        stdout = run([sys.executable, "ssl/clean.py", "--labeled", str(source), "--out", str(out), *bb,
                      "--cache-dir", str(work / "embed"), "--workers", str(args.workers)], work / "clean.log")
        info = json.loads(stdout[: stdout.rindex("}") + 1])
        results[name] = {**evaluate(read_scores(out / "scores.csv"), truth, far), "clean_seconds": info["seconds"],
                         "folds": info["folds"], "C": info["C"], "backbone": info["backbone"]}
    backbone_text = "random-init test_convnext3" if args.random_init else " ".join(_rel(a) for a in bb)
    title = (f"ssl/clean.py on synthetic seed {args.seed} ({args.labeled} labeled), backbone: {backbone_text}")
    text = "\n".join([title, "", *table(results)])
    print(text)
    (work / f"clean_recall{args.tag}.md").write_text(text + "\n")
    (work / f"clean_recall{args.tag}.json").write_text(json.dumps(
        {"args": vars(args), "backbone": backbone_text, "seconds": round(time.time() - t0, 1), "results": results},
        indent=1))
    plot(results, work / f"clean_recall{args.tag}.png", title)
    print(f"wrote {work}/clean_recall{args.tag}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
