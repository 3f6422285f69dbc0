"""Score an unlabeled image pool with a trained model and keep the best (pseudo-label export).

    python ssl/export.py --model runs/demo/model --images unlabeled/ --out exports/pool --top 100
    accelerate launch ssl/export.py --model runs/demo --images pool.parquet --out exports/pool

Writes OUT/part-*.parquet (one row per readable image: path, expected_score, score_percent,
bracket, confidence, prob_0..prob_10, accepted), errors.jsonl, manifest.json and, with
--top N, top.csv, top_grid.jpg and top/. A killed export resumes when run again with the same
arguments. The library part is aessl/export.py.
"""

import sys

from aessl.export import main

if __name__ == "__main__":
    sys.exit(main())
