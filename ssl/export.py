"""Score an unlabeled image pool with a trained model and keep the best (pseudo-label export).

    python ssl/export.py --model runs/demo/model --images unlabeled/ --out exports/pool --top 100
    accelerate launch ssl/export.py --model runs/demo --images pool.parquet --out exports/pool
    python ssl/export.py --onnx model.onnx --images unlabeled/ --out exports/pool-onnx
    python ssl/export.py --model runs/demo --images big_images/ --out exports/tiled --tiles 5 --tile-reduce median

Writes OUT/part-*.parquet (one row per readable image: path, expected_score, score_percent,
bracket, confidence, prob_0..prob_10, accepted), errors.jsonl, manifest.json and, with
--top N, top.csv, top_grid.jpg and top/. A killed export resumes when run again with the same
arguments. An OUT that another live export is writing (it holds OUT/.lock), or that holds files
this tool did not write, is refused with exit 2 (--overwrite replaces the latter). --device
auto|cpu|cuda|cuda:N picks where one process scores (under accelerate launch each process uses
its own GPU). --onnx FILE (from ssl/export_onnx.py) scores with onnxruntime instead of torch:
the same rows, no model weights or timm model needed. --tiles 5 (or 4, 9, 16, ...) scores each
image as that many crops of the image resized to --tile-scale (default 2) x the model's size and
reduces them with --tile-reduce mean|median|min|max (aessl/tiles.py); the columns stay the same
and the settings go into manifest.json. The library part is aessl/export.py.
"""

import sys

from aessl.export import main

if __name__ == "__main__":
    sys.exit(main())
