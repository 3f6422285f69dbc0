"""benchmarks/clean_gain.py end to end on a tiny generated set: clean.py and train.py run in
this process (a few steps), and the arms' manifests differ from the raw labels as they should."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from conftest import read_csv_rows, script_in_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import clean_gain  # noqa: E402


def in_process(script: str, args: list) -> None:
    assert script_in_process(script, *args) == 0, f"{script} failed"


def test_arms_manifests_counts_and_table(tmp_path):
    out = tmp_path / "bench"
    rc = clean_gain.main(["--out", str(out), "--data-seeds", "5", "--noise", "0.2", "--labeled", "60", "--test", "20",
                          "--size", "32", "--steps", "3", "--random-init", "--flag-by", "cleanlab", "--far", "0",
                          "--workers", "0"], runner=in_process)
    assert rc == 0
    res = json.loads((out / "clean_gain.json").read_text())
    arms = res["summary"]["20%"]
    assert set(arms) == {"raw", "cleanlab-drop", "cleanlab-relabel", "truth"}
    md = (out / "clean_gain.md").read_text()
    assert all(f"| 20% | {a} |" in md for a in arms)

    truth = pq.read_table(out / "sets" / "s5-n0.2" / "truth.parquet").to_pylist()
    labeled = {str((out / "sets" / "s5-n0.2" / r["path"]).resolve()): r for r in truth if r["split"] == "labeled"}
    moved = sum(r["label"] != r["bracket"] for r in labeled.values())
    assert moved == 12  # 20% of 60, each by one bracket
    flags = {r["path"]: r["cleanlab_flag"] == "1"
             for r in read_csv_rows(out / "clean" / "s5-n0.2-cleanlab-drop" / "scores.csv")}
    drop = clean_gain.read_manifest(out / "clean" / "s5-n0.2-cleanlab-drop" / "cleaned.csv")
    relabel = clean_gain.read_manifest(out / "clean" / "s5-n0.2-cleanlab-relabel" / "cleaned.csv")
    ceiling = clean_gain.read_manifest(out / "sets" / "s5-truth.csv")
    # drop: exactly the flagged rows gone, the rest as given; relabel: every row, only flagged ones changed
    assert 0 < sum(flags.values()) < 60 and set(drop) == {p for p, f in flags.items() if not f}
    assert all(drop[p] == labeled[p]["label"] for p in drop)
    assert set(relabel) == set(labeled)
    assert all(flags[p] for p in relabel if relabel[p] != labeled[p]["label"])
    assert ceiling == {p: r["bracket"] for p, r in labeled.items()}
    # the counts the table prints agree with the manifests
    c = {a: arms[a]["labels"] for a in arms}
    assert c["raw"]["wrong_left"] == c["raw"]["moved_raw"] == moved and c["truth"]["wrong_left"] == 0
    assert c["cleanlab-drop"]["dropped"] == 60 - len(drop) and c["cleanlab-drop"]["changed"] == 0
    assert c["cleanlab-relabel"]["changed"] == sum(relabel[p] != labeled[p]["label"] for p in relabel)
    assert c["cleanlab-drop"]["wrong_left"] == sum(drop[p] != labeled[p]["bracket"] for p in drop)
    # every arm trained and was scored on the test images
    assert all(arms[a]["qwk"]["n"] == 1 and 0 <= arms[a]["mae"]["mean"] <= 10 for a in arms)
