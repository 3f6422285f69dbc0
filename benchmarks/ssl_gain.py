"""How much does the unlabeled pool help? Every algorithm, several seeds, one step budget.

    python benchmarks/ssl_gain.py --scale cpu-small [--seeds 0 1 2] [--label-efficiency]
    python benchmarks/ssl_gain.py --scale real --seeds 0 1 2          # on a GPU

Generates the synthetic benchmark (ssl/synth.py), trains supervised, fixmatch, flexmatch,
freematch, softmatch and ordinal through ssl/train.py with identical data, model and step
budget per seed, then scores the unlabeled pool with each final model and measures its
pseudo-labels against the truth file: coverage = share of pool images of a true bracket
that the model's own acceptance rule takes (USB: argmax probability >= the algorithm's
final per-bracket threshold, 0.95 where the algorithm has none; ordinal: mass within +-1
bracket of the argmax >= its per-bracket threshold), accuracy = share of those whose argmax
is the true bracket. `--label-efficiency` also trains supervised-only on 2x and 4x the
labeled images (same test set) to express the gain as labeled images saved.

Resumable: a run whose model/ exists is not trained again. Writes a Markdown table
(`--md`, default docs/results.md) and JSON (`--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ssl"))

SCALES = {
    "cpu-small": dict(labeled=3080, unlabeled=6000, test=1000, size=32, model="test_convnext3", steps=500,
                      batch=32, uratio=2, workers=2, extra=[]),
    "real": dict(labeled=3080, unlabeled=50000, test=1000, size=128, model="convnextv2_atto", steps=20000,
                 batch=64, uratio=4, workers=12, extra=["train.mixed_precision=bf16", "train.eval_every=2000",
                                                        "train.save_every=2000", "train.warmup_steps=500"]),
}
ALGORITHMS = ["supervised", "fixmatch", "flexmatch", "freematch", "softmatch", "ordinal"]
REPORTED = ["mae", "qwk", "spearman", "false_positive_rate", "top_k_precision"]


ABLATIONS = {  # ordinal with one part switched off
    "no ordinal confidence": ["algorithm.args.ordinal_conf=false"],
    "no ordinal smoothing": ["algorithm.args.ordinal_smoothing=false"],
    "no per-bracket thresholds": ["algorithm.args.per_bracket_threshold=false"],
    "no distribution alignment": ["algorithm.args.dist_align=false"],
    "no score loss": ["algorithm.args.score_loss_weight=0"],
}


def train(run: Path, data: Path, labeled: Path, algo: str, seed: int, sc: dict, extra=()) -> dict:
    metrics = run / "metrics.jsonl"
    if not (run / "model" / "config.json").exists():
        cmd = [sys.executable, str(ROOT / "ssl" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               f"data.labeled={labeled}", f"data.test={data / 'test'}", f"data.unlabeled={data / 'unlabeled'}",
               f"algorithm.name={algo}", f"seed={seed}", f"model.name={sc['model']}", f"data.image_size={sc['size']}",
               f"train.steps={sc['steps']}", f"train.batch_size={sc['batch']}", f"train.uratio={sc['uratio']}",
               f"train.eval_every={sc['steps']}", f"train.save_every={sc['steps']}", f"data.num_workers={sc['workers']}",
               "train.tracker=none", f"output_dir={run}", *sc["extra"], *extra]
        if metrics.exists():
            cmd.append("resume=true")
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{run}: train.py exited {proc.returncode}\n{proc.stderr[-3000:]}")
        print(f"  trained {run.name} in {time.time() - t:.0f}s", flush=True)
    return json.loads(metrics.read_text().splitlines()[-1])


def pseudo_labels(run: Path, data: Path, truth, workers: int) -> dict:
    """Score the pool with the final model; coverage/accuracy per true bracket."""
    import datasets
    import torch
    from torch.utils.data import DataLoader

    from aessl.data import EvalDataset
    from aessl.metrics import accepted_by_threshold, pseudo_label_quality
    from aessl.models import load_model_folder
    from aessl.transforms import eval_transform

    cache = run / "pool_quality.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, info = load_model_folder(run / "model")
    pool = truth[truth["split"] == "unlabeled"]
    table = datasets.Dataset.from_dict({"path": [str(data / p) for p in pool["path"]]})
    loader = DataLoader(EvalDataset(table, eval_transform(info), info["image_size"]), batch_size=256,
                        num_workers=workers)
    probs = []
    with torch.no_grad():
        for b in loader:
            probs.append(model(b["x"])["logits"].softmax(-1).numpy())
    probs = np.concatenate(probs)
    thr = info.get("thresholds") or [0.95] * 11
    accepted = accepted_by_threshold(probs, thr, int(info.get("confidence_radius", 0)))
    q = pseudo_label_quality(probs, pool["bracket"].to_numpy(), accepted)
    cache.write_text(json.dumps(q))
    return q


def mean_std(values) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return "–"
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu-small")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    p.add_argument("--label-efficiency", action="store_true")
    p.add_argument("--ablation", action="store_true", help="ordinal with each part switched off")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=None)
    p.add_argument("--out", default=None, help="work folder (default benchmarks/work/ssl_gain-<scale>)")
    p.add_argument("--md", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import pandas as pd

    from aessl.synth import generate

    sc = SCALES[args.scale]
    work = Path(args.out or ROOT / "benchmarks" / "work" / f"ssl_gain-{args.scale}")
    data = work / "data"
    t0 = time.time()
    generate(data, labeled=sc["labeled"], unlabeled=sc["unlabeled"], test=sc["test"], size=sc["size"], seed=1234)
    truth = pd.read_parquet(data / "truth.parquet")

    results = {}
    for algo in args.algorithms:
        for seed in args.seeds:
            run = work / "runs" / f"{algo}-s{seed}"
            print(f"{algo} seed {seed}", flush=True)
            m = train(run, data, data / "labeled", algo, seed, sc)
            q = pseudo_labels(run, data, truth, sc["workers"])
            results.setdefault(algo, []).append({**{k: m[k] for k in REPORTED}, **q, "seed": seed})

    efficiency = {}
    if args.label_efficiency:
        for mult in (2, 4):
            d = work / f"data_x{mult}"
            generate(d, labeled=sc["labeled"] * mult, unlabeled=0, test=sc["test"], size=sc["size"], seed=1234)
            for seed in args.seeds:
                run = work / "runs" / f"supervised_x{mult}-s{seed}"
                print(f"supervised x{mult} seed {seed}", flush=True)
                m = train(run, data, d / "labeled", "supervised", seed, sc)
                efficiency.setdefault(mult, []).append({k: m[k] for k in REPORTED})
    ablation = {}
    if args.ablation:
        for label, extra in ABLATIONS.items():
            for seed in args.ablation_seeds or args.seeds:
                run = work / "runs" / f"ordinal-{label.replace(' ', '_')}-s{seed}"
                print(f"ordinal, {label}, seed {seed}", flush=True)
                m = train(run, data, data / "labeled", "ordinal", seed, sc, extra)
                q = pseudo_labels(run, data, truth, sc["workers"])
                ablation.setdefault(label, []).append({**{k: m[k] for k in REPORTED}, **q, "seed": seed})
    elapsed = time.time() - t0

    lines = [f"# SSL gain on the synthetic benchmark ({args.scale})", "",
             f"Command: `python benchmarks/ssl_gain.py --scale {args.scale} --seeds {' '.join(map(str, args.seeds))}"
             f"{' --label-efficiency' if args.label_efficiency else ''}`  ",
             f"Data: {sc['labeled']} labeled (model-card histogram), {sc['unlabeled']} unlabeled (crawl-like), "
             f"{sc['test']} test, {sc['size']} px, synth seed 1234. Model {sc['model']}, {sc['steps']} steps, "
             f"batch {sc['batch']} labeled + {sc['batch'] * sc['uratio']} unlabeled, same for every algorithm. "
             f"Mean ± std over seeds {args.seeds}. Wall time {elapsed / 60:.0f} min.", "",
             "| algorithm | MAE ↓ | QWK ↑ | Spearman ↑ | false-positive rate ↓ | top-K precision ↑ | pseudo-label accuracy | pseudo-label coverage |",
             "|---|---|---|---|---|---|---|---|"]
    for algo, rs in results.items():
        lines.append(f"| {algo} | " + " | ".join(mean_std([r[k] for r in rs]) for k in REPORTED + ["pseudo_accuracy", "pseudo_coverage"]) + " |")
    lines += ["", "Pseudo-label coverage per true bracket (share of the pool's images of that bracket accepted, mean over seeds):", "",
              "| algorithm | " + " | ".join(str(b) for b in range(11)) + " |", "|---|" + "---|" * 11]
    for algo, rs in results.items():
        lines.append(f"| {algo} | " + " | ".join(
            f"{np.nanmean([r.get(f'pseudo_coverage_{b}', np.nan) for r in rs]):.2f}" for b in range(11)) + " |")
    lines += ["", "Pseudo-label accuracy per true bracket (mean over seeds; – where nothing was accepted):", "",
              "| algorithm | " + " | ".join(str(b) for b in range(11)) + " |", "|---|" + "---|" * 11]
    for algo, rs in results.items():
        cells = []
        for b in range(11):
            v = [r.get(f"pseudo_accuracy_{b}") for r in rs]
            v = [x for x in v if x is not None and np.isfinite(x)]
            cells.append(f"{np.mean(v):.2f}" if v else "–")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    if efficiency:
        lines += ["", "Label efficiency: supervised-only with more labeled images (same test set):", "",
                  "| labeled images | MAE ↓ | QWK ↑ | false-positive rate ↓ |", "|---|---|---|---|"]
        lines.append(f"| {sc['labeled']} | " + " | ".join(mean_std([r[k] for r in results['supervised']]) for k in ("mae", "qwk", "false_positive_rate")) + " |")
        for mult, rs in efficiency.items():
            lines.append(f"| {sc['labeled'] * mult} | " + " | ".join(mean_std([r[k] for r in rs]) for k in ("mae", "qwk", "false_positive_rate")) + " |")
    if ablation:
        seeds = args.ablation_seeds or args.seeds
        full = [r for r in results.get("ordinal", []) if r["seed"] in seeds]
        lines += ["", f"Ablation: ordinal with one part switched off (seeds {seeds}):", "",
                  "| variant | MAE ↓ | QWK ↑ | Spearman ↑ | false-positive rate ↓ | top-K precision ↑ | pseudo-label accuracy | pseudo-label coverage |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, rs in [("ordinal (all parts)", full), *ablation.items()]:
            lines.append(f"| {label} | " + " | ".join(mean_std([r[k] for r in rs]) for k in REPORTED + ["pseudo_accuracy", "pseudo_coverage"]) + " |")
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    out = {"scale": args.scale, "settings": {k: v for k, v in sc.items() if k != "extra"}, "seeds": args.seeds,
           "results": results, "label_efficiency": {str(k): v for k, v in efficiency.items()}, "ablation": ablation, "seconds": elapsed}
    (Path(args.json) if args.json else work / "results.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
