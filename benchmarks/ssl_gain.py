"""Does the unlabeled pool pay? Floor, two ceilings and every algorithm, per setting, over seeds.

    python benchmarks/ssl_gain.py --scale smoke                                    # 1 seed, 2 algorithms: ~10 min
    python benchmarks/ssl_gain.py --scale cpu-small --data-seeds 1 --seeds 0 1 2   # image mode, CPU
    python benchmarks/ssl_gain.py --scale cpu-embed --data-seeds 1 --seeds 0 1 2   # embedding mode, CPU
    python benchmarks/ssl_gain.py --scale real --data-seeds 11 12 --seeds 0 1 2    # both modes, one GPU
    python benchmarks/ssl_gain.py --scale real --dry-run                           # check every command, train nothing

A *setting* is a mode (image: the whole network trains on images; embedding: a head trains
on a frozen backbone's cached features) and a share of the labels (100%, or 10% per bracket
with at least one image per bracket, a fixed subset of the labeled folder chosen by
--subset-seed). In each setting, with the same model, steps and batch sizes, every row is a
`ssl/train.py` run scored on the same test images:

  floor        supervised on the setting's labels alone (the `supervised` algorithm);
  pool oracle  supervised on those labels plus the whole pool with its TRUE (continuous)
               scores from truth.parquet (a path,score manifest; no test image in it): what
               a perfect pseudo-labeller could give;
  labels x4    supervised on a labeled set 4x as large drawn from the same bracket histogram
               (at 10%: 10% per bracket of it): what four times the labeling effort gives;
  algorithms   supervised (= the floor), fixmatch, flexmatch, freematch, softmatch, ordinal
               (--algorithms), each with the arguments algorithm_args() gives it (printed
               with the results: USB's adaptive thresholds need budget-sized EMAs and
               warm-ups); --ablation adds ordinal and RankMatch with each of their parts
               switched off (RankMatch on the labels alone: does the pool pay?).

Data. The synthetic set (ssl/synth.py) for data seed D: labeled (model-card histogram),
test (same histogram), pool (crawl-like: more low brackets). Its images are drawn from
default_rng([D, split, index]) with each split's brackets from (D, split, its count), so the
labels x4 set, generated with the same seed D and 4x the labeled count, has the very same
test images (checked: its truth rows for the test split must equal the main set's); runs
use the main set's test folder. Its labeled images are a new draw (an index whose bracket
happens to be the same in both draws gives the same picture). The data seed is separate
from the training seed (--seeds): tune on some --data-seeds, report on others.
Embedding mode's backbone is trained supervised, image mode, on a set generated with
--pretrain-seed (a seed not among --data-seeds), once per scale; every embedding run then
sets model.pretrained=<that run>/model/model.safetensors.

Figures, per run, then mean ± sample std over replicates (every data seed x training seed):

  QWK, MAE         on the test set (metrics.jsonl's last line, the EMA model);
  gap closed       per replicate, against that replicate's floor and the better ceiling
                   (the one with the better mean in this setting, chosen per metric):
                   QWK (alg - floor) / (ceiling - floor), MAE (floor - alg) / (floor - ceiling);
                   0 = no better than supervised, 1 = as good as the ceiling; NaN where that
                   replicate's ceiling is not better than its floor; the table says "no gap"
                   where the better ceiling's mean is < 0.05 (QWK, or MAE brackets) better
                   than the floor's (the JSON keeps the ratios);
  test FPR         share of test images of true bracket <= 1 with expected score >= 5;
  rare recall      test recall of brackets 0, 8, 9, 10, each and their mean (the test set has
                   few of them: counts are printed; read these as coarse);
  pool top-1/5%    the model scores the whole pool and it is sorted by expected score; share
                   of its top 1% (top 5%) whose true score is >= the score of the pool's
                   ceil(5% n)-th best image (the pool's true top 5%, ties included);
  pool FPR         share of the pool's true bracket <= 1 images with expected score >= 5;
  pseudo-labels    on the pool, with the final model's own acceptance rule (USB: argmax
                   probability >= the algorithm's final per-bracket threshold, 0.95 where it
                   has none, as for SoftMatch's soft weights and for supervised; ordinal: mass
                   within +-1 bracket >= its threshold): coverage = share of the pool's images
                   of a true bracket that are accepted, accuracy = share of those accepted
                   whose argmax is the true bracket; overall and per true bracket.
  The oracle was trained on the pool: its pool figures (marked †) are training-set figures.

Each setting says whether its better ceiling beats the floor by >= 0.05 QWK; where it does
not, something other than the labels (model, resolution, steps) limits it and no SSL gain can
show there.

Resumable: a run whose model/ exists is not trained again (its recorded overrides and labeled
manifest must match, or the benchmark stops and says which run to delete), a killed run resumes
from its last checkpoint (finished runs drop theirs unless --keep-checkpoints), the pool's
scores are cached per run; train.py's output goes to each run's train.log as it runs.
Writes Markdown (--md, default benchmarks/work/ssl_gain-<scale>.md) and JSON (--json, default
benchmarks/work/ssl_gain-<scale>.json); the work folder is benchmarks/work/ssl_gain-<scale>/ (--out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ssl"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ssl_gain_lib as lib  # noqa: E402
from aessl.sweep import run_is_finished, train_run  # noqa: E402

# Every scale: the data, the image-mode recipe, the embedding-mode recipe (head on the frozen
# backbone of a supervised image-mode run on --pretrain-seed's set) and which modes it runs.
SCALES = {
    # Seconds per run: proves the pipeline end to end, says nothing about SSL.
    "smoke": dict(
        data=dict(labeled=300, unlabeled=1000, test=200, size=32),
        image=dict(model="test_convnext3", steps=60, batch=16, uratio=1, workers=0, extra=["train.warmup_steps=5"]),
        pretrain=dict(steps=60),
        embedding=dict(steps=60, batch=32, uratio=2, head="residual_mlp", head_hidden=64, lr=1e-3,
                       extra=["train.warmup_steps=5"]),
        modes=("image", "embedding"),
        defaults=dict(seeds=[0], algorithms=["supervised", "flexmatch"]),
    ),
    # Issue 12's measured image-mode scale: at 10% labels labels x4 is +0.10 QWK above
    # supervised over data seeds 2-4 (docs/results.md); at 100% the oracle was not above it
    # (0.657 vs 0.658, one seed, the measurement).
    "cpu-small": dict(
        data=dict(labeled=3080, unlabeled=20000, test=1000, size=32),
        image=dict(model="test_convnext3", steps=1000, batch=32, uratio=2, workers=2),
        pretrain=dict(steps=1000),
        embedding=dict(steps=3000, batch=64, uratio=4, head="residual_mlp", head_hidden=256, lr=1e-3),
        modes=("image",),
    ),
    # The GPU recipe (one GPU, bf16): 128 px shows the fine "detail" attribute, a 3.7M-parameter
    # ConvNeXt V2 has capacity to spare; 20,000 steps x 256 unlabeled = ~100 passes over the pool.
    "real": dict(
        data=dict(labeled=3080, unlabeled=50000, test=1000, size=128),
        image=dict(model="convnextv2_atto", steps=20000, batch=64, uratio=4, workers=12, save_every=2000,
                   extra=["train.mixed_precision=bf16", "train.warmup_steps=500"]),
        pretrain=dict(steps=20000),
        embedding=dict(steps=20000, batch=64, uratio=4, head="residual_mlp", head_hidden=1024, lr=1e-3,
                       save_every=5000, extra=["train.mixed_precision=bf16", "embed.batch_size=256"]),
        modes=("image", "embedding"),
    ),
}
# cpu-small with the ResNet that won the architecture sweep at demo scale (docs/experiments.md:
# test_resnet 0.736 QWK against test_convnext3's 0.562, supervised, 600 steps at 64 px): does
# the pool still pay when the network under it is stronger?
SCALES["cpu-small-resnet"] = {**SCALES["cpu-small"], "image": {**SCALES["cpu-small"]["image"], "model": "test_resnet"}}
# The same with 3x the steps (~10 passes over the pool instead of ~3): does the pool pay once
# the unlabeled loss has time to act, and the labels alone time to overfit?
SCALES["cpu-small-resnet-3k"] = {**SCALES["cpu-small-resnet"],
                                 "image": {**SCALES["cpu-small-resnet"]["image"], "steps": 3000}}
# Embedding mode on cpu-small's data: long schedules are cheap once the features are cached.
# The backbone is pretrained for 150 steps only (its own test QWK ~0.56), the stand-in for
# general-purpose weights that were not trained on these brackets. With the 1,000-step
# backbone (test QWK 0.63) a head on 309 labels already reached what 12,320 labels give
# (ceiling - floor +0.007 QWK, docs/results_cpu_embed.md), so labels did not limit it and
# no gain could show; at 150 steps the labels x4 ceiling is ~0.07 QWK above the floor at 10%.
SCALES["cpu-embed"] = {**SCALES["cpu-small"], "pretrain": dict(steps=150), "modes": ("embedding",)}
FLOOR, ORACLE, X4, SOFT = "supervised", "oracle", "labels_x4", "softlabel"
# softlabel: the research agenda's simpler path. The floor run of the same seed is the teacher;
# ssl/export.py scores the pool with it, and a supervised student trains on the labels plus the
# export's accepted rows with their bracket probabilities as soft targets (data.pseudo_labels).
# Every exported pool row at half a label's weight, its soft target the teacher's probabilities
# (README's round): a supervised teacher has no thresholds of its own, and export's default 0.95
# accepts few rows, and those mostly of one bracket.
SOFT_ARGS = ["data.pseudo_accepted_only=false", "data.pseudo_weight=0.5"]
ALGORITHMS = ["supervised", "fixmatch", "flexmatch", "freematch", "softmatch", "ordinal", "rankmatch", "rankflexmatch",
              SOFT]
CEILINGS = (ORACLE, X4)
ROW_TITLES = {FLOOR: "floor: supervised", ORACLE: "ceiling: pool oracle", X4: "ceiling: labels x4",
              SOFT: "softlabel (teacher: floor)"}
ABLATIONS = {  # an algorithm with one part switched off (--ablation [ordinal rankmatch]): row -> (algorithm, args, overrides)
    "ordinal-no_confidence": ("ordinal", {"ordinal_conf": False}, []),
    "ordinal-no_smoothing": ("ordinal", {"ordinal_smoothing": False}, []),
    "ordinal-no_per_bracket": ("ordinal", {"per_bracket_threshold": False}, []),
    "ordinal-no_dist_align": ("ordinal", {"dist_align": False}, []),
    "ordinal-no_score_loss": ("ordinal", {"score_loss_weight": 0}, []),
    # no unlabeled pair is ever 1,000 brackets apart: FixMatch + ranking on the labels only
    "rankmatch-no_pool_ranking": ("rankmatch", {"rank_margin": 1000}, []),
    # and without FixMatch's term either: the labels alone with a ranking term (does the pool pay?)
    "rankmatch-labels_only": ("rankmatch", {"rank_margin": 1000}, ["algorithm.lambda_u=0"]),
    # the ranking terms alone, on labeled and pool pairs, without FixMatch's pseudo-labels
    "rankmatch-no_fixmatch": ("rankmatch", {}, ["algorithm.lambda_u=0"]),
    # RankMatch on FlexMatch without pool pairs: FlexMatch + the ranking term on labeled pairs
    "rankflexmatch-no_pool_ranking": ("rankflexmatch", {"rank_margin": 1000}, []),
}
VARIANTS: dict[str, tuple[str, dict, list]] = {}  # --variant rows: row -> (algorithm, its args on top of the defaults, overrides)
# Soft-labelling rows: row -> the row whose runs are its teachers (same data seed and training
# seed). `softlabel` is taught by the floor; --variant NAME=softlabel:teacher=ROW[,student=ALGO]
# by any row listed before it (e.g. FlexMatch: a second round on the best SSL model's export),
# its student supervised unless `student` names an algorithm (which then also draws the pool).
TEACHERS: dict[str, str] = {SOFT: FLOOR}
METRICS = ["qwk", "mae", "spearman", "false_positive_rate", "top_k_precision"] + [f"recall_{b}" for b in range(11)]


def algorithm_args(name: str, steps: int) -> dict:
    """What each algorithm runs with beyond USB's defaults, and why (issue 12, item 3).

    fixmatch   USB defaults (fixed 0.95 threshold: nothing to warm up).
    flexmatch  thresh_warmup=false: with warm-up, every class's "learning effect" is
               divided by the count of pool images never yet confidently predicted, which at
               short budgets stays the largest count, so every threshold stays ~0 and every
               argmax is accepted (what made FlexMatch and SoftMatch identical at 500 steps).
               Without it the effect is divided by the most-selected bracket's count; but a
               bracket that no pool image has yet reached 0.95 in still has threshold 0
               (FlexMatch's design), and until some image reaches 0.95 they all do.
    freematch  ema_p = budget_ema(steps): the self-adaptive threshold starts at 1/11 and
               follows the mean confidence with momentum 0.999 (a 1,000-step memory, set for
               ~1M-step runs): after 500 steps it has moved only 39% of the way from 1/11.
    softmatch  ema_p = budget_ema(steps) for the same reason (its Gaussian's mean starts at
               1/11, its variance at 1.0: every weight ~1); dist_uniform=false aligns the
               pool's predictions to the model's labeled predictions instead of to a uniform
               bracket histogram, which the model card's histogram is far from.
    adamatch   ema_p = budget_ema(steps): its distribution alignment's two running means
               (labeled and pool predictions) have the same 1,000-step memory as FreeMatch's.
    uda, meanteacher  USB defaults (UDA: soft targets at T 0.4 above 0.8 confidence;
               Mean Teacher: MSE to the EMA model's probabilities, ramped over 40% of the run).
    ordinal    its own defaults (aessl/algos/ordinal.py).
    rankmatch  its own defaults (aessl/algos/rankmatch.py: FixMatch's, rank_weight 0.3).
    rankflexmatch  its own defaults (FlexMatch's with thresh_warmup=false, rank_weight 0.3).
    budget_ema(steps) = clip(1 - 20/steps, 0.9, 0.999): a memory of 5% of the run.
    """
    ema = round(lib.budget_ema(steps), 4)
    if name in VARIANTS:
        algo, extra, _ = VARIANTS[name]
        return {**algorithm_args(algo, steps), **extra}
    if name in ABLATIONS:
        return dict(ABLATIONS[name][1])
    return {"flexmatch": {"thresh_warmup": False},
            "freematch": {"ema_p": ema},
            "softmatch": {"ema_p": ema, "dist_uniform": False},
            "adamatch": {"ema_p": ema}}.get(name, {})


def algorithm_of(row: str) -> str:
    if row in VARIANTS:
        return VARIANTS[row][0]
    return ABLATIONS[row][0] if row in ABLATIONS else (FLOOR if row in (*CEILINGS, SOFT) else row)


# --------------------------------------------------------------------------- data


def generate_data(work: Path, data_seed: int, scale: dict, pretrain_seed: int, modes) -> dict:
    """Main set, labels x4 set (same seed: same test images) and, for embedding mode, the
    pretraining set. Each generate() is a no-op when its folder is already whole."""
    from aessl.synth import generate

    d = scale["data"]
    main = work / "data" / f"ds{data_seed}"
    x4 = work / "data" / f"ds{data_seed}-labels_x4"
    generate(main, labeled=d["labeled"], unlabeled=d["unlabeled"], test=d["test"], size=d["size"], seed=data_seed,
             progress=False)
    generate(x4, labeled=4 * d["labeled"], unlabeled=0, test=d["test"], size=d["size"], seed=data_seed, progress=False)
    check_same_test(main, x4)
    out = {"main": main, "x4": x4}
    if "embedding" in modes:
        out["pretrain"] = work / "data" / f"pretrain-ds{pretrain_seed}"
        generate(out["pretrain"], labeled=d["labeled"], unlabeled=0, test=d["test"], size=d["size"], seed=pretrain_seed,
                 progress=False)
    return out


def check_same_test(a: Path, b: Path) -> None:
    import pandas as pd

    cols = ["path", "bracket", "score"]
    ta = pd.read_parquet(a / "truth.parquet").query("split == 'test'")[cols].reset_index(drop=True)
    tb = pd.read_parquet(b / "truth.parquet").query("split == 'test'")[cols].reset_index(drop=True)
    if not ta.equals(tb):
        raise RuntimeError(f"{a} and {b} were generated with the same seed but their test sets differ")


def fraction_tag(fraction: float) -> str:
    return f"f{round(fraction * 100):03d}"


def setting_tag(data_seed: int, fraction: float, subset_seed: int) -> str:
    """Names a setting's manifests and run folders: data seed, label share and, below 100%,
    the subset seed, so that another subset never reuses these runs."""
    return f"ds{data_seed}-{fraction_tag(fraction)}" + (f"-sub{subset_seed}" if fraction < 1 else "")


def write_manifests(work: Path, data: dict, data_seed: int, fraction: float, subset_seed: int) -> dict:
    """path,score manifests (paths relative to the manifest) for the floor and algorithms
    (`labeled`), the oracle (those + the pool with true scores) and labels x4."""
    import pandas as pd

    folder = work / "manifests"
    folder.mkdir(parents=True, exist_ok=True)

    def scored(root: Path) -> pd.DataFrame:
        truth = pd.read_parquet(root / "truth.parquet").query("split == 'labeled'").sort_values("path")
        keep = lib.per_bracket_subset(truth["label"].to_numpy(), fraction, subset_seed)
        rows = truth.iloc[keep]
        return pd.DataFrame({"path": [os.path.relpath(root / p, folder) for p in rows["path"]],
                             "score": rows["label"].astype(float).to_numpy()})

    labeled = scored(data["main"])
    pool = pd.read_parquet(data["main"] / "truth.parquet").query("split == 'unlabeled'")
    pool = pd.DataFrame({"path": [os.path.relpath(data["main"] / p, folder) for p in pool["path"]],
                         "score": pool["score"].to_numpy()})
    tables = {FLOOR: labeled, ORACLE: pd.concat([labeled, pool], ignore_index=True), X4: scored(data["x4"])}
    paths = {}
    for row, table in tables.items():
        paths[row] = folder / f"{setting_tag(data_seed, fraction, subset_seed)}-{row}.csv"
        write_if_changed(paths[row], table.to_csv(index=False))
    return paths


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# --------------------------------------------------------------------------- training


def recipe_overrides(mode: str, scale: dict, backbone: Path | None, work: Path) -> list[str]:
    """Overrides shared by every run of a mode: model, budget, batch sizes, workers."""
    img, size = scale["image"], scale["data"]["size"]
    r = img if mode == "image" else scale["embedding"]
    steps = r["steps"]
    common = [f"model.name={img['model']}", f"data.image_size={size}", f"train.steps={steps}",
              f"train.batch_size={r['batch']}", f"train.uratio={r['uratio']}", f"train.eval_every={steps}",
              f"train.save_every={r.get('save_every', steps)}", f"data.num_workers={img['workers']}",
              "train.tracker=none", *r.get("extra", [])]
    if mode == "image":
        return common
    return common + [f"model.pretrained={backbone}", "model.mode=embedding", f"model.head={r['head']}",
                     f"model.head_hidden={r['head_hidden']}", f"train.lr={r['lr']}",
                     f"embed.cache_dir={work / 'embed_cache'}"]


def algorithm_overrides(row: str, steps: int) -> list[str]:
    """A row's algorithm as overrides: algorithm.name first, then its arguments for a run of
    `steps` steps (algorithm_args) and an ablation's own overrides. benchmarks/demo_gain.py
    trains its rows through this too."""
    args = [f"algorithm.args.{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in algorithm_args(row, steps).items()]
    return [f"algorithm.name={algorithm_of(row)}", *args, *row_overrides(row)]


def row_overrides(row: str) -> list[str]:
    """An ablation's or a variant's own config overrides beyond algorithm.args (e.g.
    algorithm.lambda_u=0, algorithm.teacher=ema)."""
    return list((ABLATIONS.get(row) or VARIANTS.get(row) or ("", {}, []))[2])


def run_overrides(row: str, manifests: dict, data: dict, seed: int, steps: int) -> list[str]:
    """What one row trains on: its labels, the pool for algorithms, the algorithm and its args."""
    labeled = manifests.get(row, manifests[FLOOR])
    name, *rest = algorithm_overrides(row, steps)
    pool = [f"data.unlabeled={data['main'] / 'unlabeled'}"] if algorithm_of(row) != FLOOR else []
    return [f"data.labeled={labeled}", f"data.test={data['main'] / 'test'}", f"seed={seed}", name, *pool, *rest]


def train(run: Path, config: str, overrides: list[str], dry_run: bool = False,
          keep_checkpoints: bool = False) -> dict | None:
    """Train through ssl/train.py unless `run` already holds a finished model; return the last
    metrics line. A run started with other overrides, or on a labeled manifest whose content
    has changed since, is refused rather than reused. A finished run's checkpoints/ (4x the
    model's size; only a killed run needs them) are removed unless keep_checkpoints."""
    cmd = [sys.executable, str(ROOT / "ssl" / "train.py"), "--config", str(ROOT / "configs" / config),
           *overrides, f"output_dir={run}"]
    if dry_run:  # the overrides must still make a valid config: unknown keys and bad values fail here
        from aessl.config import load_config

        load_config(ROOT / "configs" / config, overrides + [f"output_dir={run}"])
        print("  " + shlex.join(cmd))
        return None
    t, finished = time.time(), run_is_finished(run)
    # the run's record keeps this benchmark's format ("config" is the file's name), so runs
    # trained before the sweep runner existed are still recognised and reused
    train_run(run, ROOT / "configs" / config, overrides, keep_checkpoints=keep_checkpoints,
              record_name="benchmark_overrides.json",
              record_extra={"config": config, "labeled_sha256": labeled_digest(overrides)})
    if not finished:
        print(f"  trained {run.parent.name}/{run.name} in {time.time() - t:.0f}s", flush=True)
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def labeled_digest(overrides: list[str]) -> str | None:
    """sha256 of the labeled manifest a run trains on (None for a folder or the demo set)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("data.labeled=")]
    if not given:
        return None
    path = Path(given[-1])
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def pretrain_backbone(work: Path, data: dict, scale: dict, pretrain_seed: int, dry_run: bool) -> Path:
    """Supervised image-mode run on the pretraining set, done once per scale; its weights are
    embedding mode's frozen backbone (the stand-in for CLIP/SigLIP/tagger weights)."""
    img = scale["image"]
    run = work / "runs" / "pretrain" / f"ds{pretrain_seed}-{img['model']}-{scale['pretrain']['steps']}steps"
    pre = {**img, "steps": scale["pretrain"]["steps"]}
    overrides = recipe_overrides("image", {**scale, "image": pre}, None, work) + [
        f"data.labeled={data['pretrain'] / 'labeled'}", f"data.test={data['pretrain'] / 'test'}",
        "algorithm.name=supervised", "seed=0"]
    print(f"pretraining the embedding backbone ({img['model']}, data seed {pretrain_seed})", flush=True)
    train(run, "demo.yaml", overrides, dry_run, keep_checkpoints=True)
    return run / "model" / "model.safetensors"


def export_pool(teacher: Path, data: dict, dry_run: bool) -> Path:
    """The teacher's export of the pool (ssl/export.py; resumes or is a no-op when done)."""
    out = teacher / "pool_export"
    cmd = [sys.executable, str(ROOT / "ssl" / "export.py"), "--model", str(teacher / "model"),
           "--images", str(data["main"] / "unlabeled"), "--out", str(out), "--batch-size", "256"]
    if dry_run:
        print("  " + shlex.join(cmd))
        return out
    if not (out / "manifest.json").exists() or json.loads((out / "manifest.json").read_text()).get("complete") is not True:
        with open(teacher / "export.log", "a") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if code != 0:
            raise RuntimeError(f"{teacher}: export.py exited {code}; see {teacher / 'export.log'}")
    return out


def check_configs(rows, steps_by_mode: dict) -> None:
    """Fail before any training if an algorithm argument is unknown to its algorithm."""
    from aessl import algorithms as algos

    reg = algos._registry()
    common = dict(num_classes=11, num_train_iter=1)
    for mode, steps in steps_by_mode.items():
        for row in rows:
            name = algorithm_of(row)
            try:
                algos.algorithm_args(reg[name], name, algorithm_args(row, steps), common)
            except algos.AlgorithmArgumentError as exc:
                raise SystemExit(f"error: row {row!r} ({mode}): {exc}") from exc


# --------------------------------------------------------------------------- scoring the pool


def pool_probabilities(run: Path, paths: list[str], workers: int, features: dict) -> np.ndarray:
    """The final model's bracket probabilities for every pool image (cached in the run folder).
    Embedding-mode models share one frozen backbone: its features of each pool are computed once."""
    import datasets
    import torch
    from torch.utils.data import DataLoader

    from aessl.data import EvalDataset
    from aessl.embedding import weights_digest
    from aessl.models import load_model_folder
    from aessl.scoring import bracket_probs
    from aessl.targets import target_of
    from aessl.transforms import eval_transform

    cache, key_file = run / "pool_probs.npy", run / "pool_probs.json"
    key = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    if cache.exists() and key_file.exists() and json.loads(key_file.read_text()).get("paths") == key:
        return np.load(cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, info = load_model_folder(run / "model", device=device)
    table = datasets.Dataset.from_dict({"path": paths})
    loader = DataLoader(EvalDataset(table, eval_transform(info), info["image_size"]), batch_size=256,
                        num_workers=workers)
    target = target_of(info)  # classification's softmax, regression's two-hot, ... (aessl/targets.py)

    if info.get("mode") == "embedding":  # one pass of the backbone per (backbone, size, pool)
        fkey = (weights_digest(model.backbone), info["image_size"], key)
        if fkey not in features:
            model.backbone.eval()
            with torch.inference_mode():
                features[fkey] = torch.cat([model.backbone(b["x"].to(device)).float().cpu() for b in loader])
        batches = ({"x": f} for f in features[fkey].split(256))
        model = model.head
    else:
        batches = loader
    probs = torch.cat([p for p, _ in bracket_probs(model, batches, device, target=target)]).numpy()
    np.save(cache, probs)
    key_file.write_text(json.dumps({"paths": key}))
    return probs


def pool_quality(run: Path, probs: np.ndarray, truth_pool) -> dict:
    """Pool top-N precision, pool FPR and pseudo-label coverage/accuracy per true bracket."""
    from aessl.metrics import accepted_by_threshold, pseudo_label_quality

    info = json.loads((run / "model" / "config.json").read_text())
    thresholds = info.get("thresholds") or [0.95] * 11
    accepted = accepted_by_threshold(probs, thresholds, int(info.get("confidence_radius", 0)))
    return {**lib.pool_figures(probs, truth_pool["score"].to_numpy()),
            **pseudo_label_quality(probs, truth_pool["bracket"].to_numpy(), accepted)}


def figures(run: Path, metrics: dict, truth_pool, pool_paths, workers: int, features: dict) -> dict:
    probs = pool_probabilities(run, pool_paths, workers, features)
    out = {k: metrics.get(k, float("nan")) for k in METRICS}
    out["rare_recall"] = lib.rare_recall(metrics)
    return {**out, **pool_quality(run, probs, truth_pool)}


# --------------------------------------------------------------------------- summaries


def summarize_setting(rows: dict[str, list[dict]]) -> dict:
    """Better ceiling per metric, the gap it leaves, and every row's gap closed per replicate.
    Every row's replicates are in the same (data seed, seed) order."""
    out = {"ceiling": {}, "gap": {}, "gap_closed": {}}
    for metric, higher in (("qwk", True), ("mae", False)):
        best = lib.better_ceiling({c: [r[metric] for r in rows[c]] for c in CEILINGS if c in rows}, higher)
        out["ceiling"][metric] = best
        if best is None:
            continue
        floor = [r[metric] for r in rows[FLOOR]]
        ceiling = [r[metric] for r in rows[best]]
        improvement = lib.mean_std(ceiling)[0] - lib.mean_std(floor)[0]
        out["gap"][metric] = improvement if higher else -improvement  # > 0: the ceiling is better
        for row, reps in rows.items():
            gc = lib.gaps_closed([r[metric] for r in reps], floor, ceiling, higher)
            out["gap_closed"].setdefault(row, {})[metric] = gc
    out["shown"] = {m: bool(g >= lib.MIN_USEFUL_GAP) for m, g in out["gap"].items()}
    out["useful"] = out["shown"].get("qwk", False)
    return out


def gap_line(setting: str, summary: dict) -> str:
    """One sentence: which ceiling counts, by how much it beats the floor, and whether the
    setting can show the pool's value (the better ceiling >= 0.05 QWK above the floor)."""
    best = summary["ceiling"]
    if best.get("qwk") is None:
        return f"{setting}: no ceiling was run, so no gap is known."
    gap = summary["gap"]
    which = (f"better ceiling for QWK: {ROW_TITLES[best['qwk']].split(': ')[1]}, {gap['qwk']:+.3f} over the floor; "
             f"for MAE: {ROW_TITLES[best['mae']].split(': ')[1]}, {gap['mae']:+.3f} brackets better than the floor")
    if summary["useful"]:
        return f"{setting}: {which}. QWK gap >= {lib.MIN_USEFUL_GAP}: this setting can show whether the pool pays."
    return (f"**NO USEFUL GAP** in {setting} ({which}): the better ceiling is less than {lib.MIN_USEFUL_GAP} QWK above "
            f"supervised on the labels, so this setting cannot show whether the pool pays (labels are not what "
            f"limits it at this scale); gap closed is left out where its gap is < {lib.MIN_USEFUL_GAP}.")


def gap_cell(row: str, metric: str, summary: dict) -> str:
    """Gap closed, mean ± std in percent; 'no gap' where the better ceiling is < 0.05 better than
    the floor (a ratio of two noises; the JSON keeps it)."""
    if row == FLOOR:
        return "–"
    if not summary["shown"].get(metric, False):
        return "no gap"
    return lib.format_mean_std(summary["gap_closed"].get(row, {}).get(metric, []), percent=True)


def title(row: str) -> str:
    return ROW_TITLES.get(row, row)


def main_table(rows: dict, summary: dict) -> list[str]:
    head = ("| row | QWK ↑ | MAE ↓ | gap closed, QWK | gap closed, MAE | test FPR ↓ | rare recall ↑ | "
            "pool top-1% ↑ | pool top-5% ↑ | pool FPR ↓ | pseudo-label acc. | pseudo-label cov. |")
    lines = [head, "|---" * 12 + "|"]
    for row, reps in rows.items():
        pool_mark = " †" if row == ORACLE else ""
        cells = [lib.format_mean_std([r["qwk"] for r in reps]), lib.format_mean_std([r["mae"] for r in reps]),
                 gap_cell(row, "qwk", summary), gap_cell(row, "mae", summary),
                 *(lib.format_mean_std([r[k] for r in reps]) for k in ("false_positive_rate", "rare_recall")),
                 *(lib.format_mean_std([r[k] for r in reps]) + pool_mark
                   for k in ("pool_top1_precision", "pool_top5_precision", "pool_false_positive_rate",
                             "pseudo_accuracy", "pseudo_coverage"))]
        lines.append(f"| {title(row)} | " + " | ".join(cells) + " |")
    return lines


def bracket_tables(rows: dict, test_counts: list[int]) -> list[str]:
    rare = lib.RARE_BRACKETS
    lines = ["Test recall of the rare brackets (n = test images of that bracket):", "",
             "| row | " + " | ".join(f"{b} (n={test_counts[b]})" for b in rare) + " |", "|---" * (len(rare) + 1) + "|"]
    for row, reps in rows.items():
        lines.append(f"| {title(row)} | " + " | ".join(lib.format_mean_std([r[f'recall_{b}'] for r in reps], 2)
                                                        for b in rare) + " |")
    lines += ["", "Pseudo-labels on the pool per true bracket, coverage / accuracy (means; – where none accepted):", "",
              "| row | " + " | ".join(str(b) for b in range(11)) + " |", "|---" * 12 + "|"]
    for row, reps in rows.items():
        cells = []
        for b in range(11):
            cov = lib.mean_std([r.get(f"pseudo_coverage_{b}") for r in reps])
            acc = lib.mean_std([r.get(f"pseudo_accuracy_{b}") for r in reps])
            cells.append("–" if not cov[2] else f"{cov[0]:.2f} / " + (f"{acc[0]:.2f}" if acc[2] else "–"))
        lines.append(f"| {title(row)} | " + " | ".join(cells) + " |")
    return lines


def args_table(rows, scale: dict, modes) -> list[str]:
    lines = ["| algorithm | " + " | ".join(f"arguments ({m}, {recipe(scale, m)['steps']} steps)" for m in modes) + " |",
             "|---" * (len(modes) + 1) + "|"]
    for row in rows:
        if row in CEILINGS:
            continue
        extra = row_overrides(row)  # e.g. algorithm.lambda_u=0
        teacher = [f"teacher={TEACHERS[row]}", f"student={algorithm_of(row)}"] if row in TEACHERS else []
        cells = [", ".join(teacher + [f"{k}={v}" for k, v in algorithm_args(row, recipe(scale, m)["steps"]).items()]
                           + extra)
                 or "USB/our defaults" for m in modes]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def recipe(scale: dict, mode: str) -> dict:
    return scale["image"] if mode == "image" else scale["embedding"]


def describe(args, scale: dict, modes, elapsed: float, pool_hist, test_hist) -> list[str]:
    d = scale["data"]
    lines = [f"# Does the pool pay? Synthetic benchmark, scale {args.scale}", "",
             f"Command: `python benchmarks/ssl_gain.py {' '.join(args.argv)}`  ",
             f"Data seeds {args.data_seeds} (embedding backbone pretrained on data seed {args.pretrain_seed}), "
             f"training seeds {args.seeds}, 10% subsets from subset seed {args.subset_seed}; "
             f"mean ± sample std over {len(args.data_seeds) * len(args.seeds)} replicate(s). "
             f"Wall time {elapsed / 60:.0f} min.  ",
             f"Data per seed: {d['labeled']} labeled (model-card histogram), {d['unlabeled']} pool (crawl-like, "
             f"brackets {pool_hist}), {d['test']} test (brackets {test_hist}), {d['size']} px; labels x4: "
             f"{4 * d['labeled']} labeled, same seed, same test images."]
    for m in modes:
        r = recipe(scale, m)
        what = (f"image mode: {scale['image']['model']} trained whole" if m == "image" else
                f"embedding mode: {r['head']} head (hidden {r['head_hidden']}, lr {r['lr']}) on the frozen "
                f"{scale['image']['model']} backbone pretrained supervised for {scale['pretrain']['steps']} steps")
        lines.append(f"- {what}; {r['steps']} steps, batch {r['batch']} labeled + {r['batch'] * r['uratio']} "
                     f"unlabeled, the same for every row; {' '.join(r.get('extra', []))}".rstrip("; "))
    lines += ["", "Gap closed: per replicate, (row − floor) / (better ceiling − floor), better ceiling chosen per "
              "metric by its mean (MAE: lower is better). Pool top-N: precision of the pool's predicted top 1% / 5% "
              "against its true top 5% by score. FPR: true bracket ≤ 1 scored ≥ 50%. † the oracle trained on the "
              "pool's true scores: its pool figures are training-set figures.", "",
              "What each algorithm ran with (beyond USB's defaults; see `algorithm_args` in the script for why):", ""]
    return lines + args_table(args.rows, scale, modes)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    p.add_argument("--modes", nargs="+", choices=("image", "embedding"), default=None,
                   help="default: the scale's own modes")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1], help="share of the labels, per bracket")
    p.add_argument("--data-seeds", type=int, nargs="+", default=[1], help="synthetic set seeds (tune on some, report on others)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; smoke: 0)")
    p.add_argument("--pretrain-seed", type=int, default=1000, help="data seed of the embedding backbone's pretraining set")
    p.add_argument("--subset-seed", type=int, default=0, help="chooses the 10%% label subset")
    p.add_argument("--algorithms", nargs="+", default=None,
                   help=f"default: {' '.join(ALGORITHMS)} (smoke: supervised flexmatch)")
    p.add_argument("--ablation", nargs="*", choices=("ordinal", "rankmatch", "rankflexmatch"), default=None,
                   help="add these algorithms (none named: both) with each part switched off")
    p.add_argument("--variant", nargs="+", default=[], metavar="ROW=ALGO[:key=value,...]",
                   help="extra rows to tune with: an algorithm with its algorithm.args, e.g. "
                        "rankflexmatch-w1=rankflexmatch:rank_weight=1.0; a dotted key is a config override, "
                        "e.g. flexmatch-ema=flexmatch:algorithm.teacher=ema; softlabel with another teacher row "
                        "(listed before it) and student: soft-flex=softlabel:teacher=flexmatch[,student=ALGO]")
    p.add_argument("--out", default=None, help="work folder (default benchmarks/work/ssl_gain-<scale>)")
    p.add_argument("--md", default=None, help="Markdown (default benchmarks/work/ssl_gain-<scale>.md)")
    p.add_argument("--json", default=None, help="JSON (default benchmarks/work/ssl_gain-<scale>.json)")
    p.add_argument("--dry-run", action="store_true", help="check the configs and print every train.py command")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints/ (removed by default)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    defaults = SCALES[args.scale].get("defaults", {})
    args.seeds = args.seeds or defaults.get("seeds", [0, 1, 2])
    args.algorithms = args.algorithms or defaults.get("algorithms", ALGORITHMS)
    if args.pretrain_seed in args.data_seeds:
        p.error("--pretrain-seed must differ from every --data-seeds value")
    ablated = [] if args.ablation is None else (args.ablation or ["ordinal", "rankmatch"])
    variants = [parse_variant(p, v) for v in args.variant]
    args.rows = ([FLOOR, *CEILINGS] + [a for a in args.algorithms if a != FLOOR]
                 + [row for row, (algo, _, _) in ABLATIONS.items() if algo in ablated] + variants)
    check_teachers(p, args.rows)
    return args


def parse_variant(p, text: str) -> str:
    """--variant ROW=ALGO[:key=value,...] into VARIANTS (its args go on top of the algorithm's
    benchmark defaults); returns ROW."""
    row, sep, rest = text.partition("=")
    algo, _, kv = rest.partition(":")
    if not sep or not row or not algo or row in ALGORITHMS or row in (*CEILINGS, FLOOR):
        p.error(f"--variant {text!r}: expected NEW_ROW=ALGORITHM[:key=value,...]")
    args, overrides = {}, []
    for item in filter(None, kv.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            p.error(f"--variant {text!r}: {item!r} is not key=value")
        if "." in key:
            overrides.append(item)
        else:
            args[key] = yaml.safe_load(value)
    if algo == SOFT:  # a student on the labels + a teacher row's export (its own overrides after SOFT_ARGS)
        TEACHERS[row] = str(args.pop("teacher", FLOOR))
        algo, overrides = str(args.pop("student", FLOOR)), [*SOFT_ARGS, *overrides]
    VARIANTS[row] = (algo, args, overrides)
    return row


def check_teachers(p, rows: list[str]) -> None:
    """A soft-labelling row's teacher must be a row trained before it (rows run in order)."""
    for i, row in enumerate(rows):
        teacher = TEACHERS.get(row)
        if teacher is not None and teacher not in rows[:i]:
            p.error(f"row {row!r}: its teacher {teacher!r} must be a row listed before it "
                    f"(rows in order: {' '.join(rows)})")


def run_setting(args, work, mode, fraction, data_by_seed, backbone, features) -> dict:
    """Train (or find) every row's runs of one setting; figures per row, per replicate."""
    scale = SCALES[args.scale]
    base = recipe_overrides(mode, scale, backbone, work)
    config = "demo.yaml" if mode == "image" else "embed_demo.yaml"
    steps = recipe(scale, mode)["steps"]
    rows = {}
    for ds, data in data_by_seed.items():
        manifests = None if args.dry_run else write_manifests(work, data, ds, fraction, args.subset_seed)
        manifests = manifests or {r: Path(f"<{setting_tag(ds, fraction, args.subset_seed)}-{r}.csv>")
                                  for r in (FLOOR, *CEILINGS)}
        truth_pool = None if args.dry_run else pool_truth(data["main"])
        pool_paths = None if args.dry_run else [str(data["main"] / p) for p in truth_pool["path"]]
        for row in args.rows:
            for seed in args.seeds:
                run = work / "runs" / mode / setting_tag(ds, fraction, args.subset_seed) / f"{row}-s{seed}"
                if not args.dry_run:
                    print(f"{mode}, {fraction:.0%} labels, data seed {ds}: {row}, seed {seed}", flush=True)
                extra = []
                if row in TEACHERS:  # variants carry SOFT_ARGS in their overrides, before their own
                    teacher = run.parent / f"{TEACHERS[row]}-s{seed}"
                    extra = [f"data.pseudo_labels={export_pool(teacher, data, args.dry_run)}",
                             *(SOFT_ARGS if row == SOFT else [])]
                m = train(run, config, base + run_overrides(row, manifests, data, seed, steps) + extra, args.dry_run,
                          args.keep_checkpoints)
                if m is None:
                    continue
                r = figures(run, m, truth_pool, pool_paths, scale["image"]["workers"], features)
                rows.setdefault(row, []).append({**r, "data_seed": ds, "seed": seed})
    return rows


def pool_truth(main: Path):
    import pandas as pd

    return pd.read_parquet(main / "truth.parquet").query("split == 'unlabeled'").sort_values("path").reset_index(drop=True)


def histogram(main: Path, split: str) -> list[int]:
    import pandas as pd

    b = pd.read_parquet(main / "truth.parquet").query("split == @split")["bracket"].to_numpy()
    return np.bincount(b, minlength=11).tolist()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # SIGTERM unwinds like Ctrl-C, so subprocess.run kills the train.py it is waiting on
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scale = SCALES[args.scale]
    modes = args.modes or list(scale["modes"])
    work = Path(args.out or ROOT / "benchmarks" / "work" / f"ssl_gain-{args.scale}").resolve()
    check_configs(args.rows, {m: recipe(scale, m)["steps"] for m in modes})
    t0 = time.time()
    data_by_seed = {ds: (placeholder_data(work, ds, args.pretrain_seed) if args.dry_run else
                         generate_data(work, ds, scale, args.pretrain_seed, modes)) for ds in args.data_seeds}
    backbone = None
    if "embedding" in modes:
        backbone = pretrain_backbone(work, next(iter(data_by_seed.values())), scale, args.pretrain_seed, args.dry_run)
    features: dict = {}
    results, summaries, body = {}, {}, []
    for mode in modes:
        for fraction in args.fractions:
            setting = f"{mode} mode, {fraction:.0%} labels"
            if args.dry_run:
                print(f"{setting}:")
            rows = run_setting(args, work, mode, fraction, data_by_seed, backbone, features)
            if args.dry_run:
                continue
            summary = summarize_setting(rows)
            results.setdefault(mode, {})[fraction_tag(fraction)] = rows
            summaries.setdefault(mode, {})[fraction_tag(fraction)] = summary
            first = next(iter(data_by_seed.values()))["main"]
            body += ["", f"## {setting}", "", gap_line(setting, summary), "", *main_table(rows, summary), "",
                     *bracket_tables(rows, histogram(first, "test"))]
    if args.dry_run:
        return 0
    write_reports(args, scale, modes, time.time() - t0, data_by_seed, body, results, summaries)
    return 0


def write_reports(args, scale, modes, elapsed, data_by_seed, body, results, summaries) -> None:
    """Markdown (printed too) and JSON: description, per-setting tables, the gap of every setting."""
    first = next(iter(data_by_seed.values()))["main"]
    lines = describe(args, scale, modes, elapsed, histogram(first, "unlabeled"), histogram(first, "test"))
    lines += body + ["", "## Gaps", ""] + [
        "- " + gap_line(f"{m} mode, {int(f[1:])}% labels", s) for m, by in summaries.items() for f, s in by.items()]
    text = "\n".join(lines) + "\n"
    md = Path(args.md or ROOT / "benchmarks" / "work" / f"ssl_gain-{args.scale}.md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(text)
    out = {"scale": args.scale, "recipe": scale, "modes": modes, "fractions": args.fractions,
           "data_seeds": args.data_seeds, "seeds": args.seeds, "pretrain_seed": args.pretrain_seed,
           "subset_seed": args.subset_seed,
           "algorithm_args": {m: {r: algorithm_args(r, recipe(scale, m)["steps"]) for r in args.rows} for m in modes},
           "results": results, "summary": summaries, "seconds": elapsed}
    js = Path(args.json or ROOT / "benchmarks" / "work" / f"ssl_gain-{args.scale}.json")
    js.write_text(json.dumps(finite_or_none(out), indent=1, default=float))
    print(f"wrote {md} and {js}")


def finite_or_none(x):
    """NaN and infinities become null: strict JSON."""
    if isinstance(x, dict):
        return {str(k): finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def placeholder_data(work: Path, ds: int, pretrain_seed: int) -> dict:
    """Where --dry-run's commands point (nothing is generated)."""
    d = work / "data"
    return {"main": d / f"ds{ds}", "x4": d / f"ds{ds}-labels_x4", "pretrain": d / f"pretrain-ds{pretrain_seed}"}


if __name__ == "__main__":
    sys.exit(main())
