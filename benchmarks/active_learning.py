"""Does the label_next queue pick better labels than random? Start, queue, uncertainty, random.

    OMP_NUM_THREADS=1 python benchmarks/active_learning.py                 # 5 seeds, ~11 min on a 2-core CPU
    python benchmarks/active_learning.py --seeds 0 1 2 3 4 5 6 7 --budgets 150 300 600   # more seeds, a third budget

The protocol, in embedding mode so that every run is a head on cached features (seconds):

1. Data (ssl/synth.py, aessl.synth.generate): data seed --data-seed gives --labeled labeled
   images (the model card's histogram; 310 = ~10% of the reference 3,080), a crawl-like pool
   of --pool images and --test test images, at --size px. truth.parquet holds every image's
   true score. A second set (--pretrain-seed) trains the frozen backbone.
2. Backbone: test_convnext3 trained supervised, image mode, --pretrain-steps steps on the
   pretraining set (benchmarks/ssl_gain.py's cpu-embed recipe: a weak stand-in for general
   weights, so that labels, not the backbone, limit the head). Every embedding run sets
   model.pretrained=<that run>/model/model.safetensors and shares one feature cache
   (embed.cache_dir=<work>/embed_cache: keyed by backbone and image bytes, so an image is
   embedded once for all runs).
3. Per seed s (training seed and random-pick seed):
   start      supervised head on the labeled set alone (seed s), then ssl/export.py scores
              the pool with it;
   for each budget N, N pool images get their true score from truth.parquet (a path,score
   manifest: the start labels + the N picks) and a head is trained from scratch, same steps,
   seed s, on the same test images:
   queue        aessl.active.build_queue: ordinal uncertainty, then the priority-weighted
                k-center greedy over the top 5N on the frozen backbone's features (what
                label_next.py --model does for an embedding-mode run);
   uncertainty  the top N by uncertainty alone (label_next.py without --model);
   random       the first N of a permutation of the pool seeded by s (nested: the N=150
                picks are among the N=300 ones).
   The frozen backbone is the same for every seed, so the pool's features are computed once
   (aessl.active.model_features on the first start run) and passed as a mapping.
4. Figures: test QWK and MAE (metrics.jsonl's last line, the EMA model); mean ± sample std
   over seeds; and the paired difference to random (same seed, same N), mean ± std, with
   the count of seeds where the strategy beat random. Also the true-bracket histogram of
   each strategy's picks and the start model's mean |error| on them.

Resumable: a finished run (model/ + metrics.jsonl, same overrides recorded) is reused, an
unfinished one is trained again; exports resume. Runs train in this process (train.py's main,
the way tests/conftest.py runs it) to spare a Python start per run; each run's output goes to
its train.log. Writes Markdown (--md) and JSON (--json), defaults under the work folder --out
(benchmarks/work/active_learning/).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ssl"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pandas as pd  # noqa: E402

import ssl_gain_lib as lib  # noqa: E402
from aessl import active  # noqa: E402
from aessl import export as export_tool  # noqa: E402
from aessl.metrics import NUM_BRACKETS, bracket_of  # noqa: E402
from aessl.models import files_sha256  # noqa: E402
from aessl.synth import generate  # noqa: E402

STRATEGIES = ("queue", "uncertainty", "random")
START = "start"
RECORD = "benchmark_overrides.json"


# --------------------------------------------------------------------------- running tools in this process


def _load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = None


def in_process(fn, argv: list[str], log: Path) -> int:
    """fn(argv) with stdout/stderr (tqdm bars, summaries) appended to `log`, and Accelerate's
    singletons reset afterwards so the next run builds its own."""
    from accelerate.state import AcceleratorState, GradientState

    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print("$ " + " ".join(map(str, argv)), flush=True)
        try:
            return fn([str(a) for a in argv])
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()


def train(run: Path, overrides: list[str], config: str = "demo.yaml") -> dict:
    """Train `run` (train.py's main, in this process) unless it holds a finished run of the
    same overrides; return metrics.jsonl's last line."""
    global TRAIN
    settings = {"config": config, "overrides": overrides}
    record = run / RECORD
    finished = (run / "model" / "config.json").exists() and (run / "metrics.jsonl").exists()
    if not (finished and record.exists() and json.loads(record.read_text()) == settings):
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        record.write_text(json.dumps(settings, indent=1))
        TRAIN = TRAIN or _load_script("aessl_train_script", ROOT / "ssl" / "train.py")
        t = time.time()
        code = in_process(TRAIN.main, ["--config", ROOT / "configs" / config, *overrides, f"output_dir={run}"],
                          run / "train.log")
        if code != 0:
            raise RuntimeError(f"{run}: train.py exited {code}; see {run / 'train.log'}")
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        print(f"  trained {run.name} in {time.time() - t:.0f}s", flush=True)
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def export_pool(run: Path, pool: Path) -> Path:
    out = run / "pool_export"
    manifest = out / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete") is True):
        code = in_process(export_tool.main, ["--model", run / "model", "--images", pool, "--out", out,
                                             "--batch-size", 256, "--workers", 1, "--overwrite"], run / "export.log")
        if code != 0:
            raise RuntimeError(f"{run}: export exited {code}; see {run / 'export.log'}")
    return out


# --------------------------------------------------------------------------- data and runs


def make_data(work: Path, a) -> dict:
    main = work / "data" / f"ds{a.data_seed}"
    pre = work / "data" / f"pretrain-ds{a.pretrain_seed}"
    generate(main, labeled=a.labeled, unlabeled=a.pool, test=a.test, size=a.size, seed=a.data_seed, progress=False,
             workers=a.workers)
    generate(pre, labeled=1500, unlabeled=0, test=300, size=a.size, seed=a.pretrain_seed, progress=False,
             workers=a.workers)
    truth = pd.read_parquet(main / "truth.parquet")
    truth["abs_path"] = [str((main / p).resolve()) for p in truth["path"]]
    return {"main": main, "pretrain": pre, "truth": truth}


def write_manifest(path: Path, truth: pd.DataFrame, picks: list[str]) -> Path:
    """path,score: the labeled split (its label) plus the picked pool images with their true
    score; paths absolute."""
    labeled = truth[truth["split"] == "labeled"]
    pool = truth[truth["split"] == "unlabeled"].set_index("abs_path")
    rows = pd.concat([pd.DataFrame({"path": labeled["abs_path"], "score": labeled["label"].astype(float)}),
                      pd.DataFrame({"path": picks, "score": pool.loc[picks, "score"].to_numpy()})])
    path.parent.mkdir(parents=True, exist_ok=True)
    text = rows.to_csv(index=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def embed_overrides(a, backbone: Path, work: Path) -> list[str]:
    return ["model.name=test_convnext3", f"data.image_size={a.size}", f"train.steps={a.steps}",
            "train.batch_size=64", f"train.eval_every={a.steps}", f"train.save_every={a.steps}",
            "data.num_workers=0", "train.tracker=none", "algorithm.name=supervised",
            f"model.pretrained={backbone}", "model.mode=embedding", "model.head=residual_mlp",
            "model.head_hidden=256", "train.lr=0.001", f"embed.cache_dir={work / 'embed_cache'}"]


def pretrain(work: Path, data: dict, a) -> Path:
    run = work / "runs" / f"pretrain-ds{a.pretrain_seed}-{a.pretrain_steps}steps"
    print(f"pretraining the frozen backbone ({a.pretrain_steps} steps, image mode)", flush=True)
    train(run, ["model.name=test_convnext3", f"data.image_size={a.size}", f"train.steps={a.pretrain_steps}",
                "train.batch_size=32", f"train.eval_every={a.pretrain_steps}", f"train.save_every={a.pretrain_steps}",
                "data.num_workers=1", "train.tracker=none", "algorithm.name=supervised", "seed=0",
                f"data.labeled={data['pretrain'] / 'labeled'}", f"data.test={data['pretrain'] / 'test'}"])
    return run / "model" / "model.safetensors"


def picks_for(strategy: str, n: int, seed: int, export: Path, pool_paths: list[str], features: dict) -> list[str]:
    if strategy == "queue":
        return [r["path"] for r in active.build_queue(export, n, features=features)]
    if strategy == "uncertainty":
        return [r["path"] for r in active.build_queue(export, n)]
    order = np.random.default_rng([seed, 7]).permutation(len(pool_paths))
    return [pool_paths[i] for i in order[:n]]


def pool_features(work: Path, start_run: Path, pool_paths: list[str], backbone: Path) -> dict:
    """The frozen backbone's features of every pool image (the same backbone for every seed:
    computed once, kept in <work>/pool_features.npz with the backbone's digest)."""
    cache = work / "pool_features.npz"
    digest = files_sha256(backbone)
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if list(z["paths"]) == pool_paths and str(z["backbone"]) == digest:
            return dict(zip(pool_paths, z["feats"]))
    t = time.time()
    feats = active.model_features(start_run / "model", pool_paths, batch_size=256, progress=False)
    np.savez(cache, paths=np.asarray(pool_paths), feats=feats, backbone=np.asarray(digest))
    print(f"  pool features ({feats.shape[1]}-d) of {len(pool_paths)} images in {time.time() - t:.0f}s", flush=True)
    return dict(zip(pool_paths, feats))


# --------------------------------------------------------------------------- the benchmark


def run_seed(seed: int, a, work: Path, data: dict, backbone: Path, results: dict) -> None:
    truth = data["truth"]
    common = embed_overrides(a, backbone, work) + [f"data.test={data['main'] / 'test'}", f"seed={seed}"]
    man = work / "manifests"
    start = work / "runs" / f"s{seed}-{START}"
    m = train(start, common + [f"data.labeled={write_manifest(man / 'start.csv', truth, [])}"])
    results.setdefault(START, {}).setdefault(0, {})[seed] = {"qwk": m["qwk"], "mae": m["mae"]}
    export = export_pool(start, data["main"] / "unlabeled")
    scored = active.read_pool_export(export)
    pool_paths = sorted(scored["paths"])
    features = pool_features(work, start, pool_paths, backbone)
    start_score = dict(zip(scored["paths"], scored["scores"]))
    true = truth.set_index("abs_path")["score"]
    for n in a.budgets:
        for strategy in STRATEGIES:
            picks = picks_for(strategy, n, seed, export, pool_paths, features)
            manifest = write_manifest(man / f"s{seed}-{strategy}-n{n}.csv", truth, picks)
            m = train(work / "runs" / f"s{seed}-{strategy}-n{n}", common + [f"data.labeled={manifest}"])
            brackets = bracket_of(true.loc[picks].to_numpy())
            err = np.abs(np.array([start_score[p] for p in picks]) - true.loc[picks].to_numpy())
            results.setdefault(strategy, {}).setdefault(n, {})[seed] = {
                "qwk": m["qwk"], "mae": m["mae"],
                "picked_histogram": np.bincount(brackets, minlength=NUM_BRACKETS).tolist(),
                "start_model_mae_on_picks": float(err.mean())}


def paired(results: dict, strategy: str, n: int, key: str, seeds) -> list[float]:
    return [results[strategy][n][s][key] - results["random"][n][s][key] for s in seeds]


def table(results: dict, a, pool_hist: list[int]) -> str:
    seeds = a.seeds
    out = ["| labels | strategy | test QWK ↑ | test MAE ↓ | Δ QWK vs random | Δ MAE vs random | "
           "seeds beating random (QWK / MAE) | start model's MAE on the picks | picks per true bracket 0-10 (mean) |",
           "|---|---|---|---|---|---|---|---|---|"]
    start = results[START][0]
    out.append(f"| {a.labeled} | start (no picks) | {lib.format_mean_std([start[s]['qwk'] for s in seeds])} | "
               f"{lib.format_mean_std([start[s]['mae'] for s in seeds])} | – | – | – | – | – |")
    for n in a.budgets:
        for strategy in STRATEGIES:
            r = results[strategy][n]
            q, e = (lib.format_mean_std([r[s][k] for s in seeds]) for k in ("qwk", "mae"))
            if strategy == "random":
                dq = de = wins = "–"
            else:
                pq, pe = paired(results, strategy, n, "qwk", seeds), paired(results, strategy, n, "mae", seeds)
                dq, de = lib.format_mean_std(pq, digits=3), lib.format_mean_std(pe, digits=3)
                wins = f"{sum(v > 0 for v in pq)}/{len(seeds)} / {sum(v < 0 for v in pe)}/{len(seeds)}"
            hist = np.mean([r[s]["picked_histogram"] for s in seeds], axis=0)
            err = lib.format_mean_std([r[s]["start_model_mae_on_picks"] for s in seeds], digits=2)
            out.append(f"| {a.labeled} + {n} | {strategy} | {q} | {e} | {dq} | {de} | {wins} | {err} | "
                       f"{' '.join(f'{v:.0f}' for v in hist)} |")
    out.append(f"| | (the pool, {a.pool} images) | | | | | | | {' '.join(str(v) for v in pool_hist)} |")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training and random-pick seeds")
    p.add_argument("--budgets", type=int, nargs="+", default=[150, 300], help="labels added (N)")
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--pretrain-seed", type=int, default=1000)
    p.add_argument("--labeled", type=int, default=310, help="starting labeled set (model-card histogram)")
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000, help="head training steps of every embedding run")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--workers", type=int, default=2, help="processes generating the synthetic set")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "work" / "active_learning")
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if min(a.budgets) < 1 or len(a.seeds) < 1:
        p.error("--budgets must be >= 1 and --seeds non-empty")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.time()
    work = a.out
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, a)
    print(f"data ready in {time.time() - t0:.0f}s: {work / 'data'}", flush=True)
    backbone = pretrain(work, data, a)
    results: dict = {}
    for seed in a.seeds:
        print(f"seed {seed}", flush=True)
        run_seed(seed, a, work, data, backbone, results)
    pool = data["truth"][data["truth"]["split"] == "unlabeled"]
    pool_hist = np.bincount(bracket_of(pool["score"].to_numpy()), minlength=NUM_BRACKETS).tolist()
    minutes = (time.time() - t0) / 60
    cmd = "python benchmarks/active_learning.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        cmd += " " + " ".join(sys.argv[1:])
    md = (f"Command: `OMP_NUM_THREADS=1 {cmd}`  \n"
          f"Data seed {a.data_seed}: {a.labeled} labeled, {a.pool} pool, {a.test} test images at {a.size} px; "
          f"frozen test_convnext3 backbone pretrained {a.pretrain_steps} steps on data seed {a.pretrain_seed}; "
          f"residual_mlp head, {a.steps} steps, batch 64, supervised; seeds {a.seeds}; wall time {minutes:.1f} min.  \n"
          "Δ: paired by seed (strategy − random at the same seed and N), mean ± sample std.\n\n"
          + table(results, a, pool_hist) + "\n")
    md_path = a.md or work / "active_learning.md"
    json_path = a.json or work / "active_learning.json"
    md_path.write_text(md)
    json_path.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                                     "minutes": round(minutes, 2), "pool_histogram": pool_hist,
                                     "results": {k: {str(n): v for n, v in r.items()} for k, r in results.items()}},
                                    indent=1))
    print(md)
    print(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
