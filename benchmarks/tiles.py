"""Does tiled inference help? Tiles off vs --tiles 5 and --tiles 9 with each reduce, on the
synthetic set at 256 px scored by 64 px models trained on CPU.

    OMP_NUM_THREADS=1 python benchmarks/tiles.py                       # 14 min measured on 2 shared CPU cores
    OMP_NUM_THREADS=1 python benchmarks/tiles.py --seeds 0 --steps 20 --recipes whole   # a smoke run: ~4 min

Data: `python ssl/synth.py --out OUT/synth --size 256 --labeled L --unlabeled 0 --test T
--seed 0` (reused when OUT/synth/synth.json records the same arguments).

Models (`--recipes`): `ssl/train.py --config configs/demo.yaml algorithm.name=supervised
model.name=test_convnext3 data.image_size=64 train.steps=--steps ...`, one per training seed
(`--seeds`, `seed=S`), trained in this process one after another:
  whole   the demo's weak view (augment.weak_scale_min=0.8): the model sees the whole image
          resized to 64 px, as the eval view does;
  crops   augment.weak_scale_min=--crop-scale-min (default 0.25): random-resized crops down
          to a quarter of the image's area, which is what a tile of the 2x resize shows.

Scoring: the report library (aessl.report.predict_probs / predict_tile_probs, the path of
`ssl/report.py --tiles N --tile-reduce R`) on the test set: the eval view (tiles off), then
every tile of --tiles 5 and of --tiles 9 once, reduced with mean, median, min and max
(aessl.tiles.reduce_tiles). For the first model the script also runs the report itself
(aessl.report.build_report, tiles 5 / mean) and checks that its QWK is the library's.

Figures: test QWK and MAE (aessl.metrics.compute_metrics) per setting, mean +- std over the
training seeds, and the paired difference to tiles off. Writes OUT/tiles.json and
OUT/tiles.md (OUT default benchmarks/work/tiles) and prints the table; the wall-clock time of
each part is in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ssl"))

from aessl.data import load_scored_set  # noqa: E402
from aessl.metrics import compute_metrics  # noqa: E402
from aessl.models import load_model_folder  # noqa: E402
from aessl.report import build_report, predict_probs, predict_tile_probs  # noqa: E402
from aessl.tiles import TILE_REDUCES, TileSettings, reduce_tiles  # noqa: E402

RECORD = "bench_tiles_command.json"
TILE_COUNTS = (5, 9)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "work" / "tiles"), help="work and result folder")
    p.add_argument("--size", type=int, default=256, help="synthetic image side (default 256)")
    p.add_argument("--labeled", type=int, default=1500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="the models' data.image_size (default 64)")
    p.add_argument("--steps", type=int, default=250,
                   help="training steps per model (default 250: the whole benchmark fits 20 min on 2 shared cores)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--recipes", nargs="+", choices=("whole", "crops"), default=["whole", "crops"])
    p.add_argument("--crop-scale-min", type=float, default=0.25, help="augment.weak_scale_min of the crops recipe")
    p.add_argument("--tile-scale", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=100, help="scoring batch (images)")
    p.add_argument("--no-report-check", action="store_true", help="skip the build_report cross-check")
    return p.parse_args(argv)


def synth(args, out: Path) -> Path:
    data = out / "synth"
    cmd = [sys.executable, str(ROOT / "ssl" / "synth.py"), "--out", str(data), "--size", str(args.size),
           "--labeled", str(args.labeled), "--unlabeled", "0", "--test", str(args.test), "--seed", str(args.data_seed),
           "--no-progress"]
    meta = data / "synth.json"
    if meta.exists():
        a = json.loads(meta.read_text()).get("args", {})
        if (a.get("size"), a.get("labeled"), a.get("test"), a.get("seed"), a.get("unlabeled")) == \
                (args.size, args.labeled, args.test, args.data_seed, 0):
            print(f"synthetic set reused: {data}")
            return data
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return data


def _train_main():
    spec = importlib.util.spec_from_file_location("aessl_train_script", ROOT / "ssl" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def overrides_of(args, data: Path, recipe: str, seed: int, run: Path) -> list[str]:
    o = ["algorithm.name=supervised", "model.name=test_convnext3", f"data.image_size={args.image_size}",
         f"data.labeled={data / 'labeled'}", f"data.test={data / 'test'}", "data.num_workers=1",
         f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"train.save_every={args.steps}",
         "train.tracker=none", f"seed={seed}", f"output_dir={run}"]
    if recipe == "crops":
        o.append(f"augment.weak_scale_min={args.crop_scale_min}")
    return o


def train(args, data: Path, out: Path, recipe: str, seed: int) -> Path:
    """Train one model in this process (an Accelerator's state reset afterwards), or reuse a
    finished run trained with the same overrides."""
    from accelerate.state import AcceleratorState, GradientState

    run = out / "runs" / f"{recipe}-s{seed}"
    overrides = overrides_of(args, data, recipe, seed, run)
    record = run / RECORD
    if (run / "model" / "config.json").exists() and record.exists() and json.loads(record.read_text()) == overrides:
        print(f"run reused: {run}")
        return run
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), *overrides]
    print("$ python ssl/train.py " + " ".join(argv), flush=True)
    try:
        rc = _train_main()(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    if rc != 0:
        raise SystemExit(f"training {run} failed with exit code {rc}")
    record.write_text(json.dumps(overrides))
    return run


def score(args, run: Path, table, true_score) -> dict[str, dict]:
    """{setting: {"qwk", "mae", "spearman"}} for tiles off and every tiles x reduce."""
    import torch

    model, info = load_model_folder(run / "model", device="cpu")
    figures = {}

    def keep(name, probs):
        m = compute_metrics(probs, true_score)
        figures[name] = {k: float(m[k]) for k in ("qwk", "mae", "spearman")}

    with torch.inference_mode():
        probs, ok, _ = predict_probs(model, info, table, batch_size=args.batch_size, workers=1)
        assert ok.all()
        keep("off", probs)
        for n in TILE_COUNTS:
            per_tile, ok, _ = predict_tile_probs(model, info, table, n, args.tile_scale, batch_size=args.batch_size,
                                                 workers=1)
            assert ok.all()
            for how in TILE_REDUCES:
                keep(f"{n}/{how}", reduce_tiles(per_tile, how))
    return figures


def report_check(args, run: Path, data: Path, out: Path, figures: dict) -> dict:
    """build_report (ssl/report.py's library) with tiles 5 / mean must give the library's QWK."""
    rep = build_report([run], data / "test", out / "report_tiles5", workers=1, batch_size=args.batch_size,
                       device="cpu", tiles=TileSettings(5, "mean", args.tile_scale))
    (entry,) = rep["runs"].values()
    got, want = entry["metrics"]["qwk"], figures["5/mean"]["qwk"]
    if abs(got - want) > 1e-9:
        raise SystemExit(f"report with --tiles 5 gives QWK {got}, the library {want}")
    return {"report": str(out / "report_tiles5"), "qwk": got, "tiles": rep["tiles"]}


def summarise(per_run: dict[str, dict[str, dict]], recipes: list[str], seeds: list[int]) -> dict:
    settings = ["off"] + [f"{n}/{how}" for n in TILE_COUNTS for how in TILE_REDUCES]
    table = {}
    for recipe in recipes:
        rows = {}
        for s in settings:
            row = {}
            for metric in ("qwk", "mae"):
                vals = np.array([per_run[f"{recipe}-s{seed}"][s][metric] for seed in seeds])
                base = np.array([per_run[f"{recipe}-s{seed}"]["off"][metric] for seed in seeds])
                row[metric] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                               "values": vals.tolist(), "diff_mean": float((vals - base).mean()),
                               "diff_std": float((vals - base).std(ddof=1)) if len(vals) > 1 else 0.0}
            rows[s] = row
        table[recipe] = rows
    return table


def markdown(summary: dict, args) -> str:
    lines = ["| recipe | tiles | reduce | QWK (mean ± std) | Δ QWK vs off | MAE (mean ± std) | Δ MAE vs off |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for recipe, rows in summary.items():
        for s, row in rows.items():
            n, how = ("off", "—") if s == "off" else s.split("/")
            q, m = row["qwk"], row["mae"]
            dq = "—" if s == "off" else f"{q['diff_mean']:+.3f} ± {q['diff_std']:.3f}"
            dm = "—" if s == "off" else f"{m['diff_mean']:+.3f} ± {m['diff_std']:.3f}"
            lines.append(f"| {recipe} | {n} | {how} | {q['mean']:.3f} ± {q['std']:.3f} | {dq} | "
                         f"{m['mean']:.3f} ± {m['std']:.3f} | {dm} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timing = {}
    data = synth(args, out)
    timing["synth_s"] = round(time.time() - t0, 1)
    table = load_scored_set(str(data / "test"))
    true_score = np.asarray(table["score"], dtype=np.float64)

    per_run, train_s, score_s, check = {}, {}, {}, None
    for recipe in args.recipes:
        for seed in args.seeds:
            name = f"{recipe}-s{seed}"
            t = time.time()
            run = train(args, data, out, recipe, seed)
            train_s[name] = round(time.time() - t, 1)
            t = time.time()
            per_run[name] = score(args, run, table, true_score)
            score_s[name] = round(time.time() - t, 1)
            print(f"{name}: off QWK {per_run[name]['off']['qwk']:.3f}, 5/mean {per_run[name]['5/mean']['qwk']:.3f}, "
                  f"9/mean {per_run[name]['9/mean']['qwk']:.3f} (train {train_s[name]}s, score {score_s[name]}s)",
                  flush=True)
            if check is None and not args.no_report_check:
                t = time.time()
                check = report_check(args, run, data, out, per_run[name])
                timing["report_check_s"] = round(time.time() - t, 1)
    summary = summarise(per_run, args.recipes, args.seeds)
    timing.update(train_s=train_s, score_s=score_s, total_s=round(time.time() - t0, 1))
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python benchmarks/tiles.py " + \
        " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "args": vars(args), "data": str(data), "test_images": len(true_score),
              "summary": summary, "per_run": per_run, "report_check": check, "timing": timing}
    (out / "tiles.json").write_text(json.dumps(result, indent=1))
    md = markdown(summary, args)
    (out / "tiles.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out / 'tiles.json'} and {out / 'tiles.md'} in {timing['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
