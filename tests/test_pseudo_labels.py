"""Soft labelling from an export (data.pseudo_labels): teacher -> ssl/export.py -> student.

One tiny teacher is trained and its pool exported once for the module; the students then
train a few steps each. Most checks of the export reader call aessl.pseudo directly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (EMB, ROOT, TINY, make_pool, make_scored_set, read_metrics, toy_image, train_in_process,
                      train_until_killed)

from aessl import export as ex
from aessl import pseudo
from aessl.data import DrawDataset, load_scored_set
from aessl.metrics import NUM_BRACKETS, bracket_of

STUDENT = ["algorithm.name=supervised", "train.steps=4", "train.eval_every=4", "train.save_every=4"]


def export(model: Path, images: Path, out: Path, *extra) -> None:
    assert ex.main(["--model", str(model), "--images", str(images), "--out", str(out), "--workers", "0",
                    "--shard-size", "16", *map(str, extra)]) == 0


def export_rows(out: Path) -> list[dict]:
    return [r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Scored and test sets, a pool holding copies of 3 test images, a link to a fourth and
    copies of 2 labeled images, a teacher, and its exports (all rows; about half accepted)."""
    root = tmp_path_factory.mktemp("pseudo")
    labeled = make_scored_set(root / "labeled", per_bracket=6)
    test = make_scored_set(root / "test", per_bracket=2, seed=5)
    pool = make_pool(root / "pool", n=30, seed=3)
    dup = pool / "dup"
    dup.mkdir()
    tests = sorted(test.rglob("*.png"))
    for i, p in enumerate(tests[:3]):
        shutil.copy(p, dup / f"test_copy_{i}.png")  # same bytes, another name
    (dup / "test_link.png").symlink_to(tests[3])  # same file
    for i, p in enumerate(sorted(labeled.rglob("*.png"))[:2]):
        shutil.copy(p, dup / f"lab_copy_{i}.png")
    data = [f"data.labeled={labeled}", f"data.test={test}"]
    teacher = root / "teacher"
    assert train_in_process(*data, "algorithm.name=supervised", "train.ema_decay=0", "train.lr=0.01", "train.steps=20",
                            "train.eval_every=20", "train.save_every=20", f"output_dir={teacher}") == 0
    export(teacher, pool, root / "exp_all")  # no thresholds recorded: 0.95, nothing accepted
    # a teacher whose thresholds accept the more confident half (as FixMatch's p_cutoff would)
    median = float(np.median([r["confidence"] for r in export_rows(root / "exp_all")]))
    cfg_file = teacher / "model" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "thresholds": [median] * NUM_BRACKETS}))
    export(teacher, pool, root / "exp")
    return {"root": root, "labeled": labeled, "test": test, "pool": pool, "data": data, "teacher": teacher,
            "exp": root / "exp", "exp_all": root / "exp_all"}


def overlap_kind(path: str) -> str | None:
    name = Path(path).name
    return "test" if name.startswith("test_") else "labeled" if name.startswith("lab_copy") else None


def settings(folders, weight=1.0, band=None, accepted_only=True):
    return SimpleNamespace(pseudo_labels=folders, pseudo_weight=weight, pseudo_band=band,
                           pseudo_accepted_only=accepted_only)


def load(world, folders, algorithm="supervised", args=None, **kw):
    return pseudo.load_pseudo_set(settings(folders, **kw), algorithm, args or {},
                                  load_scored_set(world["labeled"])["path"], load_scored_set(world["test"])["path"])


def info_of(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["pseudo_labels"]


def test_student_trains_on_accepted_rows_less_test_and_labeled_images(world, tmp_path):
    rows = export_rows(world["exp"])
    accepted = [r for r in rows if r["accepted"]]
    assert 0 < len(accepted) < len(rows)
    run = tmp_path / "student"
    assert train_in_process(*world["data"], *STUDENT, f"data.pseudo_labels={world['exp']}", f"output_dir={run}") == 0
    info = info_of(run)
    expect = {k: sum(overlap_kind(r["path"]) == k for r in accepted) for k in ("test", "labeled")}
    assert info["rows_used"] == info["rows_resolved"] == len(accepted) - expect["test"] - expect["labeled"]
    assert info["dropped"]["test"] == expect["test"] and info["dropped"]["labeled"] == expect["labeled"]
    assert info["weight"] == 1.0 and info["accepted_only"] is True and info["band_percent"] is None
    (record,) = info["exports"]
    assert record["folder"] == str(world["exp"]) and record["rows"] == len(rows) and record["accepted"] == len(accepted)
    assert record["fingerprint"] == json.loads((world["exp"] / "manifest.json").read_text())["fingerprint"]
    assert read_metrics(run)[-1]["num_images"] == 22  # evaluation is the test set alone, as before
    # every test image placed in the pool (3 copies, 1 link) and both labeled copies are dropped
    every = load(world, str(world["exp_all"]), accepted_only=False)
    assert every.info["dropped"] == {"test": 4, "labeled": 2, "rejected": 0, "missing": 0, "duplicate": 0, "unreadable": 0}
    assert len(every) == len(rows) - 6 and not any(overlap_kind(p) for p in every.table["path"])
    # the next round: the student's model exported again, and a second student trained on that
    export(run, world["pool"], tmp_path / "exp2")
    run2 = tmp_path / "student2"
    assert train_in_process(*world["data"], *STUDENT, f"data.pseudo_labels={tmp_path / 'exp2'}",
                            "data.pseudo_accepted_only=false", f"output_dir={run2}") == 0
    assert info_of(run2)["rows_used"] == len(rows) - 6
    assert info_of(run2)["exports"][0]["model"] == str(run / "model")


def test_soft_targets_reach_the_labeled_batches(world):
    ps = load(world, str(world["exp_all"]), weight=0.25, accepted_only=False)
    train = load_scored_set(world["labeled"])
    table, targets = ps.image_stream(train)
    assert len(table) == len(train) + len(ps) == len(targets)
    np.testing.assert_allclose(ps.probs.sum(1), 1.0, atol=1e-5)
    ds = DrawDataset(table, "labeled", lambda img: np.asarray(img, dtype=np.float32).mean(), seed=0, targets=targets)
    seen = {"label": 0, "pseudo": 0}
    for draw in range(len(ds)):  # one epoch: every row once, labels and pseudo rows in one permutation
        item = ds[draw]
        i = item["idx_lb"]
        if i < len(train):  # a label: its one-hot bracket, weight 1
            np.testing.assert_array_equal(item["y_lb"].numpy(), np.eye(NUM_BRACKETS)[bracket_of(train[i]["score"])])
            seen["label"] += 1
        else:  # a pseudo row: 0.25 x the export's probabilities, y_score its expected score
            j = i - len(train)
            np.testing.assert_allclose(item["y_lb"].numpy(), 0.25 * ps.probs[j], rtol=1e-6)
            assert item["y_score"] == pytest.approx(float(ps.table[j]["score"]), abs=1e-5)
            seen["pseudo"] += 1
    assert seen == {"label": len(train), "pseudo": len(ps)}


def test_weight_zero_is_the_labels_only_run_and_workers_do_not_change_it(world, tmp_path):
    base = [*world["data"], *STUDENT, "model.drop_rate=0.2"]
    assert train_in_process(*base, f"output_dir={tmp_path / 'labels'}") == 0
    assert train_in_process(*base, f"data.pseudo_labels={world['exp']}", "data.pseudo_weight=0",
                            f"output_dir={tmp_path / 'w0'}") == 0
    strip = lambda ms: [{k: v for k, v in m.items() if k != "lr"} for m in ms]  # noqa: E731
    assert strip(read_metrics(tmp_path / "labels")) == strip(read_metrics(tmp_path / "w0"))
    info = info_of(tmp_path / "w0")
    assert info["rows_used"] == 0 and info["rows_resolved"] > 0 and info["weight"] == 0.0
    for workers in (0, 2):  # draws are seeded by draw number: DataLoader workers change nothing
        assert train_in_process(*world["data"], *STUDENT, f"data.pseudo_labels={world['exp']}", "data.pseudo_weight=0.5",
                                f"data.num_workers={workers}", f"output_dir={tmp_path / f'half_{workers}'}") == 0
    assert read_metrics(tmp_path / "half_0") == read_metrics(tmp_path / "half_2")
    assert read_metrics(tmp_path / "half_0")[-1]["mae"] != read_metrics(tmp_path / "labels")[-1]["mae"]  # they train

def test_band_filter_and_a_list_of_exports(world):
    rows = export_rows(world["exp_all"])
    band = [40.0, 60.0]
    ps = load(world, str(world["exp_all"]), band=band, accepted_only=False)
    inside = [r for r in rows if band[0] <= r["score_percent"] <= band[1] and not overlap_kind(r["path"])]
    assert 0 < len(ps) == len(inside) < len(rows) - 6
    assert all(band[0] <= 10 * s <= band[1] + 1e-4 for s in ps.table["score"])
    assert sorted(ps.table["path"]) == sorted(r["path"] for r in inside)
    # the same export twice: its rows once, the second copy counted as duplicates
    twice = load(world, [str(world["exp_all"])] * 2, band=band, accepted_only=False)
    assert len(twice) == len(ps) and twice.info["dropped"]["duplicate"] == len(ps)
    with pytest.raises(pseudo.PseudoLabelError, match="no pseudo row left"):
        load(world, str(world["exp_all"]))  # nothing accepted at the default 0.95


def _rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard's table through `change`, keeping its export metadata."""
    t = pq.read_table(path)
    pq.write_table(change(t).replace_schema_metadata(t.schema.metadata), path)


@pytest.mark.parametrize("case", ["not_export", "zero_byte_shard", "unfinished", "missing_column", "not_distribution",
                                  "missing_folder", "image_changed_since"])
def test_bad_export_folders_are_clear_errors(case, world, tmp_path):
    bad = tmp_path / "exp"
    shutil.copytree(world["exp_all"], bad)
    shard = sorted(bad.glob("part-*.parquet"))[0]
    expect = {"not_export": "no manifest.json", "zero_byte_shard": f"{shard}: an empty file (0 bytes)",
              "unfinished": "unfinished export", "missing_column": f"{shard}: lacks column(s) prob_3",
              "not_distribution": f"{shard}: row 0", "missing_folder": "not found",
              "image_changed_since": "1 of its images were modified after the export finished"}[case]
    changed = None
    if case == "image_changed_since":  # a pool image rewritten under its name after the export
        changed = Path(pq.read_table(shard, columns=["path"]).column("path")[0].as_py())
        before = changed.stat()
        os.utime(changed, (before.st_atime + 3600, before.st_mtime + 3600))
    if case == "not_export":
        bad = world["pool"]
    elif case == "zero_byte_shard":
        shard.write_bytes(b"")
    elif case == "unfinished":
        m = json.loads((bad / "manifest.json").read_text())
        (bad / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    elif case == "missing_column":
        _rewrite_shard(shard, lambda t: t.drop_columns(["prob_3"]))
    elif case == "not_distribution":
        _rewrite_shard(shard, lambda t: t.set_column(t.schema.get_field_index("prob_0"), "prob_0",
                                                    pa.array(t.column("prob_0").to_numpy() + 0.5)))
    elif case == "missing_folder":
        bad = tmp_path / "nowhere"
    try:
        with pytest.raises(pseudo.PseudoLabelError) as err:
            load(world, str(bad), accepted_only=False)
    finally:
        if changed is not None:
            os.utime(changed, (before.st_atime, before.st_mtime))
    assert expect in str(err.value) and str(bad) in str(err.value)


def test_errors_through_train_exit_2(world, tmp_path, capsys):
    run = tmp_path / "run"
    for extra, words in [([f"data.pseudo_labels={world['pool']}"], "not an export written by ssl/export.py"),
                         ([f"data.pseudo_labels={world['exp_all']}"], "no pseudo row left"),
                         ([f"data.pseudo_labels={world['exp']}", "algorithm.name=mixmatch"], "F.one_hot"),
                         ([f"data.pseudo_labels={world['exp']}", "algorithm.name=ordinal", "data.pseudo_weight=0.5"],
                          "score_loss_weight=0"),
                         (["data.pseudo_band=[60,40]"], "data.pseudo_band"),
                         (["data.pseudo_weight=-1"], "data.pseudo_weight")]:
        capsys.readouterr()
        assert train_in_process(*world["data"], *STUDENT, *extra, f"output_dir={run}") == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
        assert not run.exists()  # nothing written
    # ordinal takes soft targets (weight 1, or weighted with its score term off)
    assert pseudo.algorithm_refusal("ordinal", {"score_loss_weight": 0}, 0.5) is None
    assert pseudo.algorithm_refusal("fixmatch", {}, 0.5) is None


def test_fractional_scores_in_a_labeled_manifest(world, tmp_path):
    paths = sorted(world["labeled"].rglob("*.png"))
    scores = [min(10.0, max(0.0, int(p.parent.name) + (0.4 if i % 2 else -0.3))) for i, p in enumerate(paths)]
    (tmp_path / "scores.csv").write_text("path,score\n" + "".join(f"{p},{s}\n" for p, s in zip(paths, scores)))
    run = tmp_path / "run"
    assert train_in_process(f"data.labeled={tmp_path / 'scores.csv'}", f"data.test={world['test']}", *STUDENT,
                            f"data.pseudo_labels={world['exp']}", "data.pseudo_accepted_only=false",
                            f"output_dir={run}") == 0
    assert info_of(run)["dropped"]["labeled"] == 2 and np.isfinite(read_metrics(run)[-1]["mae"])
    targets = load(world, str(world["exp_all"]), accepted_only=False).targets(scores)[: len(scores)]
    np.testing.assert_array_equal(targets, np.eye(NUM_BRACKETS)[bracket_of(scores)])  # today's bracket, one-hot


def test_embedding_mode_student(world, tmp_path):
    run = tmp_path / "emb"
    assert train_in_process(*world["data"], *STUDENT, *EMB, f"embed.cache_dir={tmp_path / 'cache'}",
                            f"data.pseudo_labels={world['exp']}", f"output_dir={run}") == 0
    facts = json.loads((run / "run.json").read_text())
    image_mode = load(world, str(world["exp"]))
    assert facts["pseudo_labels"]["rows_used"] == len(image_mode) > 0
    assert facts["embedding"]["computed"] == 66 + 22 + len(image_mode)  # pseudo images joined the cache
    assert np.isfinite(read_metrics(run)[-1]["mae"])
    # an SSL run on the whole pool afterwards finds the pseudo rows' images cached (keyed by content)
    again = tmp_path / "again"
    assert train_in_process(*world["data"], *EMB, f"embed.cache_dir={tmp_path / 'cache'}", "algorithm.name=fixmatch",
                            f"data.unlabeled={world['pool']}", "train.steps=2", "train.eval_every=2",
                            f"output_dir={again}") == 0
    stats = json.loads((again / "run.json").read_text())["embedding"]
    # found: labels, tests, the pseudo rows and the pool's 6 copies of test and labeled images (same bytes)
    assert stats["cached_before"] == 66 + 22 + len(image_mode) + 6 and stats["computed"] == 36 - 6 - len(image_mode)


def test_killed_student_resumes_like_an_uninterrupted_one(world, tmp_path, capsys):
    common = ["--config", ROOT / "configs" / "demo.yaml", *TINY, *world["data"], "algorithm.name=supervised",
              "train.steps=6", "train.eval_every=3", "train.save_every=3", f"data.pseudo_labels={world['exp']}",
              "data.pseudo_weight=0.5", "model.drop_rate=0.2"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train_in_process(*common[2:], f"output_dir={whole}") == 0
    killed = train_until_killed(common, broken, kill_at=4)
    assert killed.returncode == 137
    assert train_in_process(*common[2:], f"output_dir={broken}", "resume=true", "data.pseudo_weight=1") == 2
    assert "data.pseudo_weight: 0.5 -> 1" in capsys.readouterr().err  # a changed setting is refused, as any other
    assert train_in_process(*common[2:], f"output_dir={broken}", "resume=true") == 0
    assert read_metrics(whole) == read_metrics(broken)
    # a resume must draw the same pseudo rows: a rewritten export is refused
    info = info_of(broken)
    info["exports"][0]["fingerprint"] = "another export"
    assert "other pseudo-labels" in pseudo.resume_refusal(broken, info)
    assert pseudo.resume_refusal(broken, info_of(broken)) is None


def test_saved_dataset_export_is_read_back_by_row(world, tmp_path):
    import datasets

    rng = np.random.default_rng(4)
    test_png = sorted(world["test"].rglob("*.png"))[0].read_bytes()
    images = [toy_image(b, rng, 24) for b in (1, 3, 5, 7, 9)] + [{"bytes": test_png, "path": None}]
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "saved"))
    export(world["teacher"], tmp_path / "saved", tmp_path / "exp_ds")
    ps = load(world, [str(tmp_path / "exp_ds"), str(world["exp"])], accepted_only=False)
    assert ps.info["exports"][0]["resolved_by"] == "dataset" and ps.info["exports"][0]["kept"] == 5
    # the dataset's copy of a test image (by its bytes) and the folder export's overlaps are dropped
    assert ps.info["dropped"]["test"] == 5 and ps.info["dropped"]["labeled"] == 2 and "image" in ps.table.column_names
    run = tmp_path / "run"
    assert train_in_process(*world["data"], *STUDENT, f"data.pseudo_labels=[{tmp_path / 'exp_ds'},{world['exp']}]",
                            "data.pseudo_accepted_only=false", f"output_dir={run}") == 0
    assert info_of(run)["rows_used"] == len(ps)
    # the dataset changed since the export: its rows would point at other images
    datasets.Dataset.from_dict({"image": images[:4]}, features=ds.features).save_to_disk(str(tmp_path / "saved2"))
    shutil.rmtree(tmp_path / "saved")
    shutil.move(tmp_path / "saved2", tmp_path / "saved")
    with pytest.raises(pseudo.PseudoLabelError, match="not the one the export scored"):
        load(world, str(tmp_path / "exp_ds"), accepted_only=False)


def test_every_soft_target_algorithm_trains_on_pseudo_rows(world, tmp_path):
    for name in pseudo.SOFT_TARGET_ALGORITHMS:
        run = tmp_path / name
        assert train_in_process(*world["data"], f"data.unlabeled={world['pool']}", f"algorithm.name={name}",
                                "train.steps=2", "train.eval_every=2", "train.save_every=2", "algorithm.args={}",
                                f"data.pseudo_labels={world['exp']}", f"output_dir={run}") == 0, name
        assert info_of(run)["rows_used"] > 0 and np.isfinite(read_metrics(run)[-1]["sup_loss"]), name
