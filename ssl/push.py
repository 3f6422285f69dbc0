"""Publish a trained model/ folder with its model card: to the Hugging Face Hub, or to a local folder.

    python ssl/push.py --model runs/demo --repo you/anime-aesthetics
    python ssl/push.py --model runs/demo --repo you/anime-aesthetics --local-dir hub/anime-aesthetics
    python ssl/push.py --model runs/demo --repo you/anime-aesthetics --onnx model.onnx --license apache-2.0

Publishes config.json, model.safetensors and README.md (the card written at the end of
training, named after --repo; a folder trained before cards existed gets one from its run
folder), plus model.onnx with --onnx (checked to be this model's export). To the Hub:
create the repo if needed (huggingface_hub's login or HF_TOKEN), then one commit with every
file. --local-dir DIR instead copies exactly those files into DIR (e.g. a clone of the
repo, to commit and push with git yourself). The library part is aessl/hub.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="push.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a run folder or a model/ folder")
    p.add_argument("--repo", required=True, help="the Hub repo id, owner/name (also the card's model name)")
    p.add_argument("--local-dir", default=None, metavar="DIR", help="write the files into DIR instead of uploading")
    p.add_argument("--onnx", default=None, metavar="FILE", help="also publish this .onnx export (ssl/export_onnx.py)")
    p.add_argument("--license", default=None, help="the card's license id (e.g. apache-2.0, cc-by-nc-4.0)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--revision", default=None, help="the Hub branch to commit to (default: main)")
    p.add_argument("--message", default=None, help="the Hub commit message")
    args = p.parse_args(argv)
    if args.repo.count("/") > 1 or not args.repo.strip("/"):
        p.error(f"--repo {args.repo!r}: use owner/name or name")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from aessl.hub import PushError, stage, to_hub, to_local

    try:
        staged = stage(args.model, args.repo, args.onnx, args.license)
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.local_dir:
            names = to_local(staged, args.local_dir)
            print(f"wrote {', '.join(names)} to {args.local_dir} (what --repo {args.repo} would receive)")
        else:
            url = to_hub(staged, args.repo, args.private, args.revision, args.message)
            print(f"pushed {', '.join(sorted(p.name for p in staged.iterdir()))} to {args.repo}: {url}")
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
