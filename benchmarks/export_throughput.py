"""What the export costs on top of the model: images/s of ssl/export.py vs a bare forward loop.

    python benchmarks/export_throughput.py [--images 384] [--size 64] [--model resnet10t]
                                           [--batch-size 64] [--workers W] [--device cpu|cuda]
                                           [--precision auto] [--repeats 2] [--json out.json]

Same generated JPEGs, same random-weight model (saved as a model/ folder), same batch size
and precision, measured side by side in one run (the two alternate, best of --repeats):
- bare: every image decoded and eval-transformed into memory first, then only
  `model(x)` + softmax over those tensors (channels_last on CUDA), synchronised at the end;
- export, end to end: `aessl.export.main` on the image folder into a fresh OUT, timed around
  the whole call: model load, pool scan, DataLoader workers decoding and transforming,
  forward, parquet shards, errors.jsonl and manifest.json;
- export, scoring loop: the export's own figure (manifest `this_run`), i.e. from the first
  batch requested to the last shard written, without start-up.
The ratio export/bare says how much of the model's speed the export delivers. On a CPU the
loader's workers and the model share the same cores, so the ratio is a lower bound of what
a GPU box (where decoding runs on otherwise idle cores) sees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ssl"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def generate_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """JPEGs with blocks and noise (decode cost like a real small JPEG, not a flat colour)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / f"d{i % 8}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = np.repeat(np.repeat(rng.integers(0, 256, (size // 8, size // 8, 3)), 8, 0), 8, 1)
        arr = np.clip(arr + rng.integers(-20, 21, arr.shape), 0, 255).astype(np.uint8)
        path = sub / f"img{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def bare_forward(model, x_all: torch.Tensor, batch_size: int, device, dtype) -> float:
    """Seconds for model(x) + softmax over all in-memory tensors, batch by batch."""
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:  # warm-up batch (cuDNN autotune, allocator)
        model(x_all[:batch_size].to(device))["logits"].float().softmax(-1).cpu()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = []
    with torch.inference_mode():
        for b in range(0, len(x_all), batch_size):
            x = x_all[b:b + batch_size].to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(x)["logits"]
            outs.append(torch.softmax(logits.float(), -1))
        probs = torch.cat(outs).cpu()
    if cuda:
        torch.cuda.synchronize()
    assert probs.shape == (len(x_all), 11)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the export's Accelerator() then stays on the CPU too

    from aessl import export as ex
    from aessl.data import worker_init  # noqa: F401  (same import path as the export)
    from aessl.images import load_image
    from aessl.models import build_model, load_model_folder, save_model_folder
    from aessl.scoring import resolve_precision
    from aessl.transforms import eval_transform

    device = torch.device(args.device)
    dtype = resolve_precision(args.precision, device)
    with tempfile.TemporaryDirectory(prefix="export_bench_") as tmp:
        tmp = Path(tmp)
        paths = generate_images(tmp / "pool", args.images, args.size)
        torch.manual_seed(0)
        model, info = build_model({"name": args.model, "pretrained": False}, args.size)
        save_model_folder(model, info, tmp / "model", {"thresholds": []})

        model, info = load_model_folder(tmp / "model", device=device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            model = model.to(memory_format=torch.channels_last)
        tf = eval_transform(info)
        t0 = time.perf_counter()
        x_all = torch.stack([tf(load_image(p, draft_size=args.size * 2)) for p in paths])
        decode_s = time.perf_counter() - t0
        if device.type == "cuda":
            x_all = x_all.pin_memory()

        bare, e2e, loop = [], [], []
        for r in range(args.repeats):
            bare.append(bare_forward(model, x_all, args.batch_size, device, dtype))
            out = tmp / f"out{r}"
            t0 = time.perf_counter()
            rc = ex.main(["--model", str(tmp / "model"), "--images", str(tmp / "pool"), "--out", str(out),
                          "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                          "--precision", args.precision])
            e2e.append(time.perf_counter() - t0)
            if rc != 0:
                raise SystemExit(f"export failed with exit status {rc}")
            m = json.loads((out / "manifest.json").read_text())
            assert m["rows_written"] == args.images, m["rows_written"]
            loop.append(m["this_run"]["seconds"])

    n = args.images
    rows = [
        ("bare forward (tensors in memory)", min(bare)),
        ("export, scoring loop", min(loop)),
        ("export, end to end", min(e2e)),
    ]
    bare_ips = n / min(bare)
    results = {name: {"seconds": round(s, 4), "images_per_second": round(n / s, 1), "vs_bare": round((n / s) / bare_ips, 3)}
               for name, s in rows}
    results["decode+transform only (1 process)"] = {"seconds": round(decode_s, 4),
                                                    "images_per_second": round(n / decode_s, 1), "vs_bare": None}
    print(f"\nexport throughput: {n} images of {args.size} px, {args.model}, batch {args.batch_size}, "
          f"{args.workers} workers, {device} ({str(dtype).replace('torch.', '')}), best of {args.repeats}")
    print(f"| {'path':<34} | {'seconds':>8} | {'images/s':>9} | {'vs bare':>7} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|{'-' * 9}|")
    for name, r in results.items():
        vs = f"{r['vs_bare']:.2f}" if r["vs_bare"] is not None else "-"
        print(f"| {name:<34} | {r['seconds']:>8.3f} | {r['images_per_second']:>9.1f} | {vs:>7} |")
    report = {
        "benchmark": "export_throughput",
        "images": n, "size": args.size, "model": args.model, "batch_size": args.batch_size, "workers": args.workers,
        "device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "precision": str(dtype).replace("torch.", ""), "repeats": args.repeats,
        "torch": torch.__version__, "results": results,
        "ratio_export_loop_vs_bare": results["export, scoring loop"]["vs_bare"],
        "ratio_export_end_to_end_vs_bare": results["export, end to end"]["vs_bare"],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
