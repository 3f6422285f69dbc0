"""Embedding mode against image mode: time per epoch and accuracy at the same budget, same data and backbone.

    python benchmarks/embedding_speed.py                         # CPU: test_convnext3 and convnext_atto, 64 px
    python benchmarks/embedding_speed.py --models convnextv2_tiny --size 224 --steps 2000 --workers 12   # a GPU

For each backbone:
1. "pretrain": the backbone is first trained supervised on a *different* synthetic set
   (data.synthetic.seed=1), standing in for pretrained weights (no model hub is reachable
   here; give --pretrained FILE to use real ones). Both modes then start from these weights.
2. image mode: FixMatch fine-tunes the whole network on images (ssl/train.py).
3. the embedding pass (ssl/embed.py) into a fresh cache: the one-off cost.
4. embedding mode: FixMatch trains only the head on the cached features, same steps, batch
   sizes and data; then once more with `--long` times the steps (what the speed buys).

Time per epoch = the training loop's own seconds per step (timing.json: evaluation and
checkpoints excluded) x steps for one pass over the unlabeled pool. The ratio is taken side
by side in one run. Writes a Markdown table (--md) and JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, args: list, log: Path) -> float:
    t = time.time()
    cmd = [sys.executable, str(ROOT / "ssl" / script), "--config", str(ROOT / "configs" / "demo.yaml"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} exited {proc.returncode}; log in {log}\n{proc.stderr[-3000:]}")
    return time.time() - t


def last_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["test_convnext3", "convnext_atto"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--long", type=int, default=10, help="embedding mode also runs long x steps")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--pretrained", default=None, help="a real weights file instead of the synthetic pretraining")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--uratio", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--head", default="residual_mlp")
    p.add_argument("--head-hidden", type=int, default=256)
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run, e.g. train.mixed_precision=bf16")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "embedding_speed"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "embedding_speed.json"))
    p.add_argument("--md", default=str(ROOT / "docs" / "embedding_speed.md"))
    args = p.parse_args(argv)

    work = Path(args.work)
    common = [f"data.image_size={args.size}", f"data.synthetic.size={args.size}", f"data.num_workers={args.workers}",
              f"train.batch_size={args.batch}", f"train.uratio={args.uratio}", "train.tracker=none",
              "train.warmup_steps=20", *args.extra]
    results = []
    for model in args.models:
        print(f"== {model}", flush=True)
        w = work / f"{model}_{args.size}"
        row = {"model": model, "image_size": args.size, "steps": args.steps, "batch": args.batch, "uratio": args.uratio}

        weights = args.pretrained
        if weights is None:
            pre = w / "pretrain"
            if not (pre / "model").exists():
                s = run("train.py", [*common, f"model.name={model}", "algorithm.name=supervised",
                                     "data.synthetic.seed=1", "data.synthetic.unlabeled=100",
                                     f"train.steps={args.pretrain_steps}", f"train.eval_every={args.pretrain_steps}",
                                     f"train.save_every={args.pretrain_steps}", f"output_dir={pre}"], w / "pretrain.log")
                print(f"  pretrained on synthetic seed 1 in {s:.0f}s", flush=True)
            weights = pre / "model" / "model.safetensors"
            row["pretrain_qwk_on_its_own_set"] = last_metrics(pre)["qwk"]
        shared = [*common, f"model.name={model}", f"model.pretrained={weights}", "algorithm.name=fixmatch",
                  f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"train.save_every={args.steps}"]

        img = w / "image"
        if not (img / "model").exists():
            run("train.py", [*shared, f"output_dir={img}"], w / "image.log")
        emb_args = ["model.mode=embedding", f"model.head={args.head}", f"model.head_hidden={args.head_hidden}",
                    f"embed.cache_dir={w / 'cache'}"]
        cache_log = w / "embed.log"
        if not cache_log.exists():
            run("embed.py", [*shared, *emb_args], cache_log)
        embed_out = json.loads(cache_log.read_text()[cache_log.read_text().index("{"):cache_log.read_text().rindex("}") + 1])
        emb = w / "embedding"
        if not (emb / "model").exists():
            run("train.py", [*shared, *emb_args, f"output_dir={emb}"], w / "embedding.log")
        long_steps = args.steps * args.long
        emb_long = w / "embedding_long"
        if not (emb_long / "model").exists():
            run("train.py", [*shared, *emb_args, f"train.steps={long_steps}", f"train.eval_every={long_steps}",
                             f"train.save_every={long_steps}", f"output_dir={emb_long}"], w / "embedding_long.log")

        pool = json.loads((img / "run.json").read_text())["pool_images"]
        steps_per_epoch = math.ceil(pool / (args.batch * args.uratio))
        for name, d in (("image", img), ("embedding", emb), ("embedding_long", emb_long)):
            t = json.loads((d / "timing.json").read_text())
            m = last_metrics(d)
            row[name] = {"steps": t["steps"], "seconds_per_step": t["loop_seconds"] / t["steps"],
                         "seconds_per_epoch": t["loop_seconds"] / t["steps"] * steps_per_epoch,
                         **{k: m[k] for k in ("qwk", "mae", "spearman", "false_positive_rate", "top_k_precision")}}
        row["pool_images"], row["steps_per_epoch"] = pool, steps_per_epoch
        row["cache_seconds"], row["cache_images"] = embed_out["seconds"], embed_out["computed"]
        row["feature_dim"], row["views_per_image"] = embed_out["dim"], embed_out["views"]
        row["speedup_per_epoch"] = row["image"]["seconds_per_epoch"] / row["embedding"]["seconds_per_epoch"]
        results.append(row)
        print(f"  image {row['image']['seconds_per_epoch']:.1f} s/epoch, embedding "
              f"{row['embedding']['seconds_per_epoch']:.3f} s/epoch: {row['speedup_per_epoch']:.0f}x; "
              f"qwk {row['image']['qwk']:.3f} vs {row['embedding']['qwk']:.3f} "
              f"({long_steps} steps: {row['embedding_long']['qwk']:.3f})", flush=True)

    import torch

    out = {"device": "cuda" if torch.cuda.is_available() else "cpu", "args": vars(args), "results": results}
    Path(args.json).write_text(json.dumps(out, indent=1))
    lines = [
        f"Embedding mode vs image mode ({out['device']}, {args.size} px, FixMatch, batch {args.batch} + "
        f"{args.batch * args.uratio} unlabeled, head {args.head} {args.head_hidden}). "
        "Epoch = one pass over the unlabeled pool; loop time only (no evaluation, no checkpoints).",
        "",
        "| backbone | mode | steps | s/epoch | speed-up | qwk | MAE | FPR | top-K prec. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, label in (("image", "image (whole net)"), ("embedding", "embedding (head)"),
                            ("embedding_long", f"embedding, {args.long}x steps")):
            x = r[name]
            speed = "1x" if name == "image" else f"{r['image']['seconds_per_epoch'] / x['seconds_per_epoch']:.0f}x"
            lines.append(f"| {r['model']} | {label} | {x['steps']} | {x['seconds_per_epoch']:.2f} | {speed} | "
                         f"{x['qwk']:.3f} | {x['mae']:.3f} | {x['false_positive_rate']:.3f} | {x['top_k_precision']:.2f} |")
        lines.append(f"| {r['model']} | one-off cache: {r['cache_images']} images x {r['views_per_image']} views, "
                     f"dim {r['feature_dim']} | | {r['cache_seconds']:.0f} s | | | | | |")
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
