"""What our loop costs on top of the model: step time vs a bare PyTorch loop, and data images/s.

    python benchmarks/loop_overhead.py [--model resnet10t] [--size 64] [--batch 32] [--uratio 2]
                                       [--steps 20] [--device cpu|cuda] [--json out.json]

Both loops do the same forward and backward on the same in-memory batches (FixMatch:
labeled + weak + strong views in one forward, CE on labeled, masked CE on strong):
- ours: Accelerate-prepared model/optimiser, USB's FixMatch.train_step with its hooks,
  accelerator.backward, EMA update, the algorithm's bookkeeping and log figures;
- bare: model(x) -> the same two losses written by hand -> backward -> step.
They alternate step by step so drift in the machine's speed hits both alike. The data
part times DrawDataset (decode + weak + strong view, the unlabeled pool's work) in one
process, i.e. images/s per DataLoader worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ssl"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--uratio", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-images", type=int, default=300)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import timm.utils
    from accelerate import Accelerator

    from aessl import algorithms as algos
    from aessl.config import DEFAULTS
    from aessl.models import build_model

    accelerator = Accelerator(cpu=args.device == "cpu")
    torch.manual_seed(0)
    ours_model, info = build_model({"name": args.model, "pretrained": False}, args.size)
    bare_model, _ = build_model({"name": args.model, "pretrained": False}, args.size)
    bare_model.load_state_dict(ours_model.state_dict())
    dev = accelerator.device
    ours_opt = torch.optim.AdamW(ours_model.parameters(), lr=1e-3)
    bare_model = bare_model.to(dev)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-3)
    ema = timm.utils.ModelEmaV3(ours_model, decay=0.99)
    algo = algos.build_algorithm("fixmatch", ours_model, user_args={}, num_train_iter=args.steps, lambda_u=1.0,
                                 ulb_dest_len=1000, lb_dest_len=1000)
    ours_model, ours_opt = accelerator.prepare(ours_model, ours_opt)
    algo.model = ours_model
    ema.to(dev)

    g = torch.Generator().manual_seed(0)
    ub = args.batch * args.uratio
    batches = [{
        "x_lb": torch.randn(args.batch, 3, args.size, args.size, generator=g),
        "y_lb": torch.randint(0, 11, (args.batch,), generator=g),
        "idx_ulb": torch.arange(ub),
        "x_ulb_w": torch.randn(ub, 3, args.size, args.size, generator=g),
        "x_ulb_s": torch.randn(ub, 3, args.size, args.size, generator=g),
    } for _ in range(4)]
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def ours_step(b):
        with accelerator.accumulate(ours_model):
            out, log_dict = algo.train_step(**algos.step_inputs(algo, b))
            accelerator.backward(out["loss"])
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)
        ema.update(accelerator.unwrap_model(ours_model))
        algos.after_optimizer_step(algo)
        algos.log_figures(algo, log_dict)

    def bare_step(b):
        x = torch.cat([b["x_lb"], b["x_ulb_w"], b["x_ulb_s"]])
        logits = bare_model(x)["logits"]
        lb, w, s = logits[: args.batch], logits[args.batch: args.batch + ub], logits[args.batch + ub:]
        probs = torch.softmax(w.detach(), dim=-1)
        conf, pseudo = probs.max(dim=-1)
        mask = (conf >= 0.95).float()
        loss = F.cross_entropy(lb, b["y_lb"]) + (F.cross_entropy(s, pseudo, reduction="none") * mask).mean()
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    for i in range(3):  # warm-up both
        ours_step(batches[i % 4])
        bare_step(batches[i % 4])
    t_ours, t_bare = [], []
    for i in range(args.steps):
        b = batches[i % 4]
        sync(); t = time.perf_counter(); ours_step(b); sync(); t_ours.append(time.perf_counter() - t)
        sync(); t = time.perf_counter(); bare_step(b); sync(); t_bare.append(time.perf_counter() - t)

    # data pipeline: decode + weak + strong per unlabeled image, one process
    from aessl.data import DrawDataset
    from aessl.transforms import train_transforms
    import datasets
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.data_images):
            arr = rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
            path = f"{tmp}/{i}.jpg"
            Image.fromarray(arr).save(path, quality=90)
            paths.append(path)
        weak, strong = train_transforms(info, DEFAULTS["augment"])
        ds = DrawDataset(datasets.Dataset.from_dict({"path": paths}), "unlabeled", weak, strong, seed=0)
        torch.set_num_threads(1)
        t = time.perf_counter()
        for d in range(len(paths)):
            ds[d]
        data_rate = len(paths) / (time.perf_counter() - t)

    ours_ms, bare_ms = 1000 * float(np.median(t_ours)), 1000 * float(np.median(t_bare))
    result = {
        "device": str(dev), "model": args.model, "image_size": args.size, "batch": args.batch, "uratio": args.uratio,
        "images_per_step": args.batch * (1 + 2 * args.uratio), "steps": args.steps,
        "ours_step_ms_median": ours_ms, "bare_step_ms_median": bare_ms, "overhead_ratio": ours_ms / bare_ms,
        "data_images_per_s_per_worker": data_rate,
        "steps_per_s_one_worker_can_feed": data_rate / (args.batch * args.uratio + args.batch),
    }
    print(f"| measure | value |\n|---|---|")
    print(f"| device / model / size | {dev} / {args.model} / {args.size}px |")
    print(f"| images per step (lb + 2 x ulb) | {result['images_per_step']} |")
    print(f"| our loop step, median | {ours_ms:.1f} ms |")
    print(f"| bare PyTorch step, median | {bare_ms:.1f} ms |")
    print(f"| overhead ratio (ours / bare) | {result['overhead_ratio']:.3f} |")
    print(f"| data pipeline per worker | {data_rate:.0f} unlabeled images/s (decode + weak + strong) |")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
