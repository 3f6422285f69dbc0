"""aessl.active and ssl/label_next.py: ordinal uncertainty, disagreement, the diverse
selection and the queue built from real exports of a small pool."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_pool, random_model, script_in_process

from aessl import active
from aessl import export as ex


def one_hot(*brackets_and_mass) -> np.ndarray:
    p = np.zeros(11)
    for b, m in brackets_and_mass:
        p[b] = m
    return p


# --------------------------------------------------------------------------- pure functions


def test_uncertainty_orders_by_distance_between_brackets():
    peaked = one_hot((5, 1.0))
    adjacent = one_hot((4, 0.5), (5, 0.5))
    extremes = one_hot((0, 0.5), (10, 0.5))
    spread3 = one_hot((3, 0.2), (5, 0.6), (7, 0.2))
    u = active.uncertainty(np.stack([peaked, adjacent, extremes, spread3]))
    assert u[0] == pytest.approx(0.0, abs=1e-9)
    assert u[1] == pytest.approx(0.5)
    assert u[2] == pytest.approx(5.0)
    assert u[0] < u[1] < u[3] < u[2]
    # entropy would call "4 or 5" and "0 or 10" equally uncertain; the ordinal measure does not
    entropy = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))  # noqa: E731
    assert entropy(adjacent) == pytest.approx(entropy(extremes))
    # rows are renormalised (float32 exports sum to 1 only within rounding); shape is checked
    assert active.uncertainty((adjacent * 1.001)[None])[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\[N, 11\]"):
        active.uncertainty(np.ones((2, 10)) / 10)


def test_disagreement_is_the_expected_score_gap():
    a = np.stack([one_hot((2, 1.0)), one_hot((4, 0.5), (6, 0.5)), one_hot((10, 1.0))])
    b = np.stack([one_hot((7, 1.0)), one_hot((5, 1.0)), one_hot((0, 0.5), (10, 0.5))])
    np.testing.assert_allclose(active.disagreement(a, b), [5.0, 0.0, 5.0])
    np.testing.assert_allclose(active.disagreement(b, a), active.disagreement(a, b))
    with pytest.raises(ValueError, match="same images"):
        active.disagreement(a, b[:2])


def clustered(seed: int = 0):
    """Three clusters of five near-identical 16-d vectors; the five highest priorities are
    all in cluster 0, so the plain top 3 is three near-copies."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16))
    cluster = np.repeat(np.arange(3), 5)
    feats = centres[cluster] + 1e-3 * rng.normal(size=(15, 16))
    priority = np.where(cluster == 0, 3.0, np.where(cluster == 1, 2.0, 1.0)) + 0.01 * rng.random(15)
    perm = rng.permutation(15)  # rows in no particular order
    return priority[perm], feats[perm], cluster[perm]


def test_select_without_features_is_the_top_n():
    pr = np.array([0.1, 0.9, 0.5, 0.9, 0.3])
    np.testing.assert_array_equal(active.select(pr, 3), [1, 3, 2])  # ties by index
    np.testing.assert_array_equal(active.select(pr, 10), [1, 3, 2, 4, 0])  # at most N
    with pytest.raises(ValueError, match="positive"):
        active.select(pr, 0)
    with pytest.raises(ValueError, match="one row per priority"):
        active.select(pr, 2, np.ones((4, 3)))


def test_select_with_features_covers_every_cluster_and_is_deterministic():
    priority, feats, cluster = clustered()
    plain = active.select(priority, 3)
    assert set(cluster[plain]) == {0}  # the near-copies the diversity step must avoid
    picked = active.select(priority, 3, feats)
    assert sorted(cluster[picked]) == [0, 1, 2]
    assert picked[0] == plain[0]  # the first pick is the highest priority
    np.testing.assert_array_equal(active.select(priority, 3, feats), picked)  # deterministic
    for seed in range(1, 6):  # whatever the centres, the noise and the row order
        p, f, c = clustered(seed)
        assert sorted(c[active.select(p, 3, f)]) == [0, 1, 2], seed
        assert len(set(c[active.select(p, 6, f)])) == 3
    # cosine distance: scaling a row does not make it "far"
    scaled = feats * np.where(cluster == 0, 100.0, 1.0)[:, None]
    assert sorted(cluster[active.select(priority, 3, scaled)]) == [0, 1, 2]
    # candidates bound the choice to the top by priority: 3 candidates are all cluster 0
    assert set(cluster[active.select(priority, 3, feats, candidates=3)]) == {0}
    # the default candidates (5n = 15) reach every cluster; 10 candidates reach clusters 0 and 1
    assert sorted(cluster[active.select(priority, 2, feats, candidates=10)]) == [0, 1]


# --------------------------------------------------------------------------- real exports


@pytest.fixture(scope="module")
def pool_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("active")
    pool = make_pool(root / "pool", n=30, size=24)
    runs = {name: random_model(root / name / "model", seed) for name, seed in (("run", 0), ("other", 1))}
    exports = {}
    for name, run in runs.items():
        exports[name] = root / f"export-{name}"
        assert ex.main(["--model", str(run), "--images", str(pool), "--out", str(exports[name]),
                        "--workers", "0", "--batch-size", "16"]) == 0
    small = make_pool(root / "small", n=6, seed=9, size=24)  # another pool: shares no path
    exports["foreign"] = root / "export-foreign"
    assert ex.main(["--model", str(runs["run"]), "--images", str(small), "--out", str(exports["foreign"]),
                    "--workers", "0"]) == 0
    return {"root": root, "pool": pool, **{f"run_{k}": v for k, v in runs.items()}, **exports}


def export_table(folder: Path) -> dict:
    t = pq.read_table(sorted(folder.glob("part-*.parquet")))
    probs = np.stack([t.column(f"prob_{b}").to_numpy() for b in range(11)], 1)
    return {"paths": t.column("path").to_pylist(), "probs": probs, "score": t.column("expected_score").to_numpy()}


def test_build_queue_ranks_the_export_by_uncertainty(pool_exports):
    ref = export_table(pool_exports["run"])
    u = dict(zip(ref["paths"], active.uncertainty(ref["probs"])))
    rows = active.build_queue(pool_exports["run"], 8)
    assert [r["rank"] for r in rows] == list(range(1, 9))
    assert set(rows[0]) == {"path", "expected_score", "bracket", "uncertainty", "disagreement", "priority", "rank"}
    assert len({r["path"] for r in rows}) == 8
    expect = sorted(u.values(), reverse=True)[:8]
    np.testing.assert_allclose([r["uncertainty"] for r in rows], expect, rtol=1e-5)
    assert all(r["priority"] == r["uncertainty"] and r["disagreement"] is None for r in rows)
    assert all(r["uncertainty"] == pytest.approx(u[r["path"]], rel=1e-5) for r in rows)
    assert len(set(np.round(expect, 4))) > 1  # the random model's exports are not all alike


def test_build_queue_adds_disagreement_between_exports(pool_exports):
    a, b = export_table(pool_exports["run"]), export_table(pool_exports["other"])
    score_b = dict(zip(b["paths"], b["score"]))
    gap = {p: abs(s - score_b[p]) for p, s in zip(a["paths"], a["score"])}
    scale = np.sqrt(np.pi) / 2  # a mean gap between two draws, as a standard deviation
    rows = active.build_queue(pool_exports["run"], 30, other_exports=[pool_exports["other"]])
    assert len(rows) == 30
    for r in rows:
        assert r["disagreement"] == pytest.approx(gap[r["path"]], abs=1e-4)
        assert r["priority"] == pytest.approx(r["uncertainty"] + scale * r["disagreement"], rel=1e-5)
    assert [r["priority"] for r in rows] == sorted((r["priority"] for r in rows), reverse=True)
    alone = [r["path"] for r in active.build_queue(pool_exports["run"], 30)]
    assert [r["path"] for r in rows] != alone  # disagreement changes the order
    with pytest.raises(active.ActiveLearningError, match="shares no image path"):
        active.build_queue(pool_exports["run"], 5, other_exports=[pool_exports["foreign"]])


def test_build_queue_drops_labeled_images_by_path_and_by_bytes(pool_exports, tmp_path):
    first = active.build_queue(pool_exports["run"], 6)
    top = [r["path"] for r in first]
    labeled = tmp_path / "labeled" / "07"
    labeled.mkdir(parents=True)
    shutil.copy(top[1], labeled / "renamed_copy.jpg")  # the same bytes under another name
    rows = active.build_queue(pool_exports["run"], 4, exclude=[top[0], str(labeled / "renamed_copy.jpg")])
    assert [r["path"] for r in rows] == top[2:6]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert active.exclude_paths(tmp_path / "labeled") == [str(labeled / "renamed_copy.jpg")]
    manifest = tmp_path / "done.csv"
    manifest.write_text(f"path,score\n{top[0]},3\n")
    assert active.exclude_paths(manifest) == [top[0]]
    with pytest.raises(active.ActiveLearningError, match="not found"):
        active.exclude_paths(tmp_path / "nope")


def test_build_queue_with_model_features_is_diverse(pool_exports):
    pool = export_table(pool_exports["run"])["paths"]
    feats = active.model_features(pool_exports["run_run"], pool[:5], batch_size=2, progress=False)
    assert feats.shape[0] == 5 and feats.shape[1] > 1 and np.isfinite(feats).all()
    np.testing.assert_allclose(active.model_features(pool_exports["run_run"], pool[:5], progress=False), feats,
                               rtol=1e-4, atol=1e-5)  # batch size does not change the features
    asked = []

    def features(paths):
        asked.append(list(paths))
        return active.model_features(pool_exports["run_run"], paths, progress=False)

    rows = active.build_queue(pool_exports["run"], 3, features=features)
    assert len(asked) == 1 and len(asked[0]) == 15  # only the 5n candidates are embedded
    top15 = [r["path"] for r in active.build_queue(pool_exports["run"], 15)]
    assert asked[0] == top15
    assert rows[0]["path"] == top15[0] and {r["path"] for r in rows} <= set(top15)
    # a mapping works the same; near-copies (the same vector) are skipped while others are left
    mapping = {p: np.eye(3)[0] for p in top15[:10]} | {p: np.eye(3)[i % 2 + 1] for i, p in enumerate(top15[10:])}
    rows = active.build_queue(pool_exports["run"], 3, features=mapping)
    assert [r["path"] for r in rows] == [top15[0], top15[10], top15[11]]
    with pytest.raises(active.ActiveLearningError, match="no vector"):
        active.build_queue(pool_exports["run"], 3, features={top15[0]: np.ones(3)})


def test_build_queue_refuses_what_is_not_an_export(pool_exports, tmp_path):
    with pytest.raises(active.ActiveLearningError, match="not found"):
        active.build_queue(tmp_path / "missing", 3)
    with pytest.raises(active.ActiveLearningError, match="no manifest.json"):
        active.build_queue(pool_exports["pool"], 3)
    with pytest.raises(active.ActiveLearningError, match="positive"):
        active.build_queue(pool_exports["run"], 0)


# --------------------------------------------------------------------------- the CLI


def read_queue(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_label_next_writes_the_queue(pool_exports, tmp_path, capsys):
    out = tmp_path / "q" / "queue.csv"
    top = active.build_queue(pool_exports["run"], 1)[0]["path"]
    code = script_in_process("label_next.py", "--export", pool_exports["run"], "--export", pool_exports["other"],
                             "--n", 5, "--out", out, "--model", pool_exports["run_run"], "--exclude", top)
    assert code == 0
    captured = capsys.readouterr()
    assert "features" in captured.err  # the progress bar of the feature pass
    assert f"5 of 30 pool images queued to {out}" in captured.out
    rows = read_queue(out)
    assert list(rows[0]) == list(active.QUEUE_COLUMNS)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert top not in {r["path"] for r in rows}
    assert all(r["disagreement"] != "" for r in rows)
    expect = active.build_queue(pool_exports["run"], 5, [pool_exports["other"]],
                                features=active.ModelFeatures(pool_exports["run_run"], progress=False), exclude=[top])
    assert [r["path"] for r in rows] == [r["path"] for r in expect]

    plain = tmp_path / "plain.csv"
    assert script_in_process("label_next.py", "--export", pool_exports["run"], "--n", 3, "--out", plain) == 0
    assert [r["disagreement"] for r in read_queue(plain)] == ["", "", ""]


@pytest.mark.parametrize("case", ["missing_export", "foreign_export", "n_zero", "bad_model", "missing_exclude",
                                  "bad_device", "out_is_folder"])
def test_label_next_bad_input_exits_2(pool_exports, tmp_path, capsys, case):
    out = tmp_path / "queue.csv"
    if case == "out_is_folder":
        out.mkdir()
    args = {"bad_device": ["--export", pool_exports["run"], "--n", 3, "--device", "gpu"],
            "out_is_folder": ["--export", pool_exports["run"], "--n", 3],
            "missing_export": ["--export", tmp_path / "nope", "--n", 3],
            "foreign_export": ["--export", pool_exports["pool"], "--n", 3],
            "n_zero": ["--export", pool_exports["run"], "--n", 0],
            "bad_model": ["--export", pool_exports["run"], "--n", 3, "--model", pool_exports["pool"]],
            "missing_exclude": ["--export", pool_exports["run"], "--n", 3, "--exclude", tmp_path / "gone.csv"]}[case]
    try:
        code = script_in_process("label_next.py", *args, "--out", out)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    word = {"missing_export": "not found", "foreign_export": "no manifest.json", "n_zero": "--n must be >= 1",
            "bad_model": "not a model folder", "missing_exclude": "gone.csv", "bad_device": "--device 'gpu'",
            "out_is_folder": "is a folder"}[case]
    assert word in err
    assert not out.is_file() and not out.with_name(out.name + ".tmp").exists()
