"""Export a trained scorer to ONNX and check it against torch with onnxruntime.

    python ssl/export_onnx.py --model runs/demo --out model.onnx
    python ssl/export_onnx.py --model runs/demo/model --out model.onnx --images unlabeled/ --check-images 256

--model is a run folder or a model/ folder, image or embedding mode, any target. The file
takes `image`, the normalised eval view [batch, 3, S, S] at the model's image size (batch
dynamic), and gives `probs`, the 11 bracket probabilities; the model's config.json rides in
its metadata, so `python ssl/export.py --onnx model.onnx --images POOL --out OUT` scores a
pool with onnxruntime alone. Before the file is put in place it is checked: torch and
onnxruntime score the same images (--images, else the run's test set; random tensors when
there is none), and a max |probability difference| above --tolerance is an error (exit 1,
no file written). Needs the onnx extra: pip install -e '.[onnx]'. The library part is
aessl/onnx_export.py.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="export_onnx.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a run folder or a model/ folder (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--images", default=None,
                   help="images to check on (folder, manifest, saved dataset); default: the run's test set")
    p.add_argument("--check-images", type=int, default=64, metavar="N", help="check on the first N images (default 64)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |p_onnx - p_torch| (default 1e-4)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's exporter's own)")
    args = p.parse_args(argv)
    if args.check_images < 1:
        p.error("--check-images must be >= 1")
    if not args.tolerance > 0:
        p.error("--tolerance must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from aessl.logs import setup_logging
    from aessl.onnx_backend import OnnxError
    from aessl.onnx_export import export_onnx

    setup_logging()
    try:
        r = export_onnx(args.model, args.out, args.images, args.check_images, args.tolerance, args.opset)
    except FileNotFoundError as exc:
        print(f"error: --model: {exc}", file=sys.stderr)
        return 2
    except OnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if "disagree" in str(exc) else 2
    print(f"wrote {r['out']} ({r['bytes'] / 1e6:.2f} MB; {r['mode']} mode, {r['target']} target, "
          f"{r['image_size']} px, dynamic batch)")
    print(f"onnx check: {r['images']} images from {r['check_source']}: max |p_onnx - p_torch| = "
          f"{r['max_abs_diff']:.2e} (tolerance {r['tolerance']:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
