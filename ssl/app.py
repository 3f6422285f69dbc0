"""The review app: score images, review an export, label what the model needs next (Gradio).

    python ssl/app.py --model runs/demo
    python ssl/app.py --model runs/demo --export exports/pool [--corrections FILE] [--labeled labeled/]
    python ssl/app.py --model runs/demo --export exports/pool --port 7861 --host 0.0.0.0

Tabs (docs/app.md):
  Score       drop images (or name a folder on the server): bracket distribution, percent score,
              expected score, accepted/uncertain verdict as ssl/export.py decides it, optional
              saliency overlay. --tiles N --tile-reduce R scores N crops of a larger resize.
  Review      (--export) filter the export's rows (bracket, score band, confidence, accepted but
              uncertain, top N), look at one, Accept / Reject / Re-score it (keys a, r, s).
  Label next  (--export) the images whose labels would teach the model most (aessl/active.py),
              minus those already decided and the --labeled set; type a score, Save.

Every decision is appended (fsynced) to the corrections CSV at once: by default
<export folder>-corrections.csv next to the export folder. Train on it with
`python ssl/train.py ... data.corrections=FILE`. Bad input exits 2 with a message naming it.
The app listens on 127.0.0.1 unless --host says otherwise: it shows the server's files to
whoever reaches it. The library part is aessl/app.py.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run folder (holding model/) or a model/ folder")
    p.add_argument("--export", default=None, metavar="DIR", help="an export folder of ssl/export.py (Review, Label next)")
    p.add_argument("--corrections", default=None, metavar="FILE",
                   help="the corrections CSV (default: <export folder>-corrections.csv beside the export folder)")
    p.add_argument("--labeled", default=None, metavar="SET",
                   help="the labeled set (folder or manifest with path): left out of the Label next queue")
    p.add_argument("--other-export", action="append", default=[], metavar="DIR",
                   help="another export of the same pool (another run, the EMA model): Label next adds their "
                        "disagreement to the priority; repeatable")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--tiles", type=int, default=1, metavar="N",
                   help="Score tab: score N crops (5: corners + centre, or k*k) of the image resized to "
                        "--tile-scale x the model's size, reduced by --tile-reduce (default 1: off)")
    p.add_argument("--tile-reduce", default=None, metavar="R", help="mean (default), median, min or max")
    p.add_argument("--tile-scale", type=float, default=None, metavar="F", help="resize factor for --tiles (default 2)")
    p.add_argument("--saliency-steps", type=int, default=50, help="integration steps of the saliency overlay (default 50)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:  # 0 would bind a random port the launcher then cannot find
        p.error(f"--port {args.port}: use a port from 1 to 65535")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a review box
    from aessl.app import SHORTCUTS, AppError, AppState, make_blocks
    from aessl.logs import setup_logging

    setup_logging()
    try:
        state = AppState.load(args.model, args.export, args.corrections, args.labeled, device=args.device,
                              tiles=args.tiles, tile_reduce=args.tile_reduce, tile_scale=args.tile_scale,
                              other_exports=args.other_export, saliency_steps=args.saliency_steps)
    except AppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    demo = make_blocks(state)
    if state.view is not None:
        print(f"corrections are written to {state.view.corrections_path}", flush=True)
    try:
        demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                       inbrowser=False, show_error=True, head=SHORTCUTS)
    except OSError as exc:  # the port is taken
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
