"""ssl/raters.py and the generator's rater groups: agreement, clusters, per-rater and per-cluster
heads, the stratified ensemble, on tiny generated data; and the errors a user can hit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from aessl import raters as R
from aessl.synth import generate
from conftest import read_csv_rows, script_in_process


def raters_in_process(*args) -> int:
    return script_in_process("raters.py", *args)


read_csv = read_csv_rows


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    out = tmp_path_factory.mktemp("raters") / "set"
    info = generate(out, labeled=120, unlabeled=0, test=40, size=16, seed=4, raters=6, rater_groups=2,
                    ratings_per_image=3, workers=1, progress=False)
    return out, info


def test_generator_writes_rater_groups_ratings_and_consensus(rated):
    out, info = rated
    groups = {r["rater"]: r["group"] for r in info["raters"]}
    assert set(groups.values()) == {0, 1} and all(list(groups.values()).count(g) >= 2 for g in (0, 1))
    rows = read_csv(out / "ratings.csv")
    assert len(rows) == 120 * 3
    per_image: dict[str, list[str]] = {}
    for r in rows:
        assert (out / r["path"]).is_file() and r["path"].startswith("labeled/")
        assert float(r["score"]).is_integer() and 0 <= float(r["score"]) <= 10  # people give whole scores
        per_image.setdefault(r["path"], []).append(r["rater"])
    assert len(per_image) == 120 and all(len(set(v)) == 3 for v in per_image.values())
    assert len(read_csv(out / "ratings_test.csv")) == 40 * 3
    consensus = read_csv(out / "consensus_test.csv")
    assert len(consensus) == 40 and all(r["path"].startswith("test/") for r in consensus)
    # the consensus is the mean of the raters' noise-free scores: inside the raters' range per image
    import pyarrow.parquet as pq

    t = pq.read_table(out / "truth.parquet").to_pandas().set_index("path")
    cols = [f"rater_{k}" for k in range(6)]
    for r in consensus[:10]:
        row = t.loc[r["path"]]
        assert row[cols].min() - 1.5 <= float(r["score"]) <= row[cols].max() + 1.5
    assert info["args"]["rater_groups"]["groups"] == 2


def test_without_groups_the_set_is_unchanged(tmp_path):
    """--raters alone keeps its old output: no consensus column, no rating manifests, same args."""
    info = generate(tmp_path / "s", labeled=20, unlabeled=0, test=11, size=16, seed=2, raters=3, workers=1,
                    progress=False)
    assert "rater_groups" not in info["args"] and "group" not in info["raters"][0]
    assert not (tmp_path / "s" / "ratings.csv").exists()
    import pyarrow.parquet as pq

    assert "consensus" not in pq.read_table(tmp_path / "s" / "truth.parquet").column_names


def test_raters_cli_end_to_end(rated, tmp_path):
    out_set, info = rated
    out = tmp_path / "r"
    rc = raters_in_process("--labeled", out_set / "ratings.csv", "--test", out_set / "ratings_test.csv",
                           "--true-groups", out_set / "synth.json", "--out", out, "--image-size", 32,
                           "--clusters", 2, "--min-images", 3, "--cache-dir", tmp_path / "cache", "--workers", 2)
    assert rc == 0
    table = read_csv(out / "raters.csv")
    assert sorted(r["rater"] for r in table) == [f"r{k:02d}" for k in range(6)]
    assert {r["cluster"] for r in table} == {"0", "1"}
    summary = json.loads((out / "raters.json").read_text())
    assert summary["clusters"] == 2 and -1 <= summary["adjusted_rand_index"] <= 1
    assert abs(sum(summary["shares"].values()) - 1) < 1e-6
    ev = summary["evaluation"]
    assert {"stratified", "pooled", "cluster_0", "cluster_1"} <= set(ev["consensus"])
    assert {p["rater"] for p in ev["per_rater"]} == {r["rater"] for r in table}  # the test set has raters too
    pairs = read_csv(out / "agreement.csv")
    assert len(pairs) == 15 and all(int(p["shared"]) >= 0 for p in pairs)
    heads = np.load(out / "heads.npz")
    assert heads["cluster_coef"].shape[0] == 2 and heads["rater_coef"].shape[0] == 6
    assert (out / "raters.png").stat().st_size > 1000 and "Adjusted Rand" in (out / "summary.md").read_text()


def _taste_set(rng, n_img=600, per=3):
    """Features with a known taste structure: raters 0-3 score 5 + 2 x0 (busy), raters 4-5
    score 4 + 2 x1 (rarely rate); the population's consensus counts each rater once."""
    X = rng.normal(size=(n_img, 6))
    taste = [lambda x: 5 + 2 * x[:, 0]] * 4 + [lambda x: 4 + 2 * x[:, 1]] * 2
    activity = np.array([4, 4, 4, 4, 1, 1], float)
    img, who, score = [], [], []
    for i in range(n_img):
        for k in rng.choice(6, per, replace=False, p=activity / activity.sum()):
            img.append(i)
            who.append(f"r{k}")
            score.append(float(np.clip(taste[k](X[i:i + 1])[0] + rng.normal(0, 0.3), 0, 10)))
    r = R.Ratings([f"img{i}" for i in range(n_img)], np.array(img), np.array(who, dtype=object), np.array(score),
                  [f"r{k}" for k in range(6)])
    consensus = np.mean([t(X) for t in taste], axis=0)
    return X, r, consensus


def test_clusters_recover_tastes_and_stratified_beats_pooled():
    """Two tastes, one of them under-represented in the ratings: the clusters find them
    (ARI 1) and the stratified ensemble is closer to the consensus than the pooled head."""
    rng = np.random.default_rng(0)
    X, r, _ = _taste_set(rng)
    Xt, _, consensus = _taste_set(np.random.default_rng(1), n_img=400)
    t = R.Ratings([f"t{i}" for i in range(400)], np.arange(400), np.array([""] * 400, dtype=object), consensus, [])
    known = {f"r{k}": str(int(k >= 4)) for k in range(6)}
    res = R.analyse(X, r, Xt, t, known=known)
    s = res["summary"]
    assert s["clusters"] == 2 and s["adjusted_rand_index"] == pytest.approx(1.0)
    assert s["shares"] == {"0": pytest.approx(4 / 6, abs=1e-3), "1": pytest.approx(2 / 6, abs=1e-3)}
    assert s["rating_shares"]["1"] < 0.2  # the rare taste has few ratings ...
    ev = s["evaluation"]["consensus"]
    assert ev["stratified"]["mae"] < ev["pooled"]["mae"] - 0.1  # ... and the pooled head under-weights it


def test_bad_inputs_name_the_file_and_the_raters(rated, tmp_path, caplog):
    out_set, _ = rated
    no_rater = tmp_path / "plain.csv"
    no_rater.write_text("path,score\n" + "".join(f"{out_set / r['path']},{r['score']}\n"
                                                 for r in read_csv(out_set / "ratings.csv")[:30]))
    with pytest.raises(R.RatersError, match=r"plain\.csv: no rater column"):
        R.load_ratings(no_rater, "--labeled")
    rows = read_csv(out_set / "ratings.csv")
    few = tmp_path / "few.csv"
    with open(few, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "rater"])
        for r in rows:
            w.writerow([out_set / r["path"], r["score"], r["rater"]])
        for r in (rows[0], rows[3]):  # two different images
            w.writerow([out_set / r["path"], r["score"], "newbie"])
    with pytest.raises(R.RatersError, match=r"few\.csv.*: newbie \(2 images\)\. .*--exclude newbie,"):
        R.load_ratings(few, "--labeled", min_images=3)
    assert "newbie" not in R.load_ratings(few, "--labeled", min_images=3, exclude=["newbie"]).raters
    with pytest.raises(R.RatersError, match="--exclude: no rater named ghost"):
        R.load_ratings(few, "--labeled", exclude=["ghost"])
    with open(few, "a", newline="") as f:  # one rater scoring one image twice is said, not silently counted
        csv.writer(f).writerow([out_set / rows[0]["path"], 9, rows[0]["rater"]])
    with caplog.at_level("WARNING"):
        R.load_ratings(few, "--labeled")
    assert "1 (image, rater) pair(s) are scored more than once" in caplog.text
    assert raters_in_process("--labeled", no_rater, "--out", tmp_path / "o") == 2
