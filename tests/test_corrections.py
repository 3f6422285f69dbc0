"""The corrections manifest (aessl/corrections.py): written one fsynced line per decision by
the app, read back with the last decision winning, and trained on with data.corrections=."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import make_pool, make_scored_set, train_in_process

from aessl import corrections as corr
from aessl import export as ex
from aessl import pseudo
from aessl.data import load_scored_set


def lines(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_log_round_trip_last_decision_wins(tmp_path):
    log = corr.CorrectionsLog(tmp_path / "sub" / "c.csv")  # the folder is created
    log.record("/pool/a.png", "accept", 5.4321, source="review")
    log.record("/pool/b.png", "reject")
    log.record("/pool/a.png", "rescore", 7.25, source="label_next")  # decided again: this one counts
    log.record("rel/c.png", "rescore", 0)
    rows = lines(tmp_path / "sub" / "c.csv")
    assert rows[0] == list(corr.COLUMNS) and len(rows) == 5
    assert rows[2][1] == "" and rows[2][4] == "reject"
    got = corr.read_corrections(tmp_path / "sub" / "c.csv")
    assert got.labels == {"/pool/a.png": 7.25, str(tmp_path / "sub" / "rel" / "c.png"): 0.0}
    assert got.rejected == {"/pool/b.png"}
    assert got.last["/pool/a.png"]["source"] == "label_next"
    c = got.counts()
    assert (c["lines"], c["images"], c["accept"], c["rescore"], c["reject"]) == (4, 3, 0, 2, 1)
    # a second log on the same file appends (a restarted app), and reads what the first wrote
    again = corr.CorrectionsLog(tmp_path / "sub" / "c.csv")
    assert again.decisions()["/pool/b.png"]["decision"] == "reject"


def test_bad_decisions_are_refused_before_writing(tmp_path):
    log = corr.CorrectionsLog(tmp_path / "c.csv")
    for args, what in ((("/a.png", "maybe", 3), "not one of"), (("/a.png", "rescore", None), "needs a score"),
                       (("/a.png", "rescore", 10.5), "out of range"), (("/a.png", "accept", float("nan")), "out of range"),
                       (("", "reject"), "path")):
        with pytest.raises(ValueError, match=what):
            log.record(*args)
    assert len(lines(tmp_path / "c.csv")) == 1  # the header only


def test_a_line_cut_by_a_killed_writer_is_skipped_and_the_next_decision_is_whole(tmp_path):
    path = tmp_path / "c.csv"
    log = corr.CorrectionsLog(path)
    log.record("/a.png", "rescore", 3)
    with open(path, "a") as f:
        f.write("/b.png,4,review,2026-12-0")  # killed mid-line: no newline, too few fields
    got = corr.read_corrections(path)
    assert got.labels == {"/a.png": 3.0} and got.skipped_cut_line == 1
    corr.CorrectionsLog(path).record("/c.png", "reject")  # the cut line goes; the new one is whole
    got = corr.read_corrections(path)
    assert got.rejected == {"/c.png"} and got.labels == {"/a.png": 3.0} and got.skipped_cut_line == 0
    assert [r[0] for r in lines(path)] == ["path", "/a.png", "/c.png"]


def test_bad_files_name_the_file_and_the_lines(tmp_path):
    with pytest.raises(corr.CorrectionsError, match="not found"):
        corr.read_corrections(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(corr.CorrectionsError, match="empty.csv: empty"):
        corr.read_corrections(tmp_path / "empty.csv")
    (tmp_path / "other.csv").write_text("path,score\na.png,3\n")
    with pytest.raises(corr.CorrectionsError, match="other.csv: not a corrections file"):
        corr.read_corrections(tmp_path / "other.csv")
    with pytest.raises(corr.CorrectionsError, match="not a corrections file"):
        corr.CorrectionsLog(tmp_path / "other.csv")  # the app never appends to a foreign CSV
    assert (tmp_path / "other.csv").read_text() == "path,score\na.png,3\n"
    (tmp_path / "bad.csv").write_text("path,score,source,time,decision\n"
                                      "a.png,3,review,t,accept\n"
                                      "b.png,eleven,review,t,rescore\n"
                                      "c.png,,review,t,rescore\n"
                                      "d.png,2,review,t,keep\n")
    with pytest.raises(corr.CorrectionsError) as info:
        corr.read_corrections(tmp_path / "bad.csv")
    text = str(info.value)
    assert "bad.csv: line 3" in text and "bad.csv: line 4" in text and "bad.csv: line 5" in text
    assert "line 2" not in text


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corrections")
    labeled = make_scored_set(root / "labeled", per_bracket=4)
    test = make_scored_set(root / "test", per_bracket=2, seed=5)
    pool = make_pool(root / "pool", n=24, seed=3)
    pool_images = sorted(pool.rglob("*.jpg"))
    lab = labeled / "03" / "img_3_0.png"
    log = corr.CorrectionsLog(root / "review-corrections.csv")
    log.record(str(pool_images[0]), "accept", 6.4)  # a pool image becomes a label (fractional score)
    log.record(str(pool_images[1]), "rescore", 9.5)
    log.record(str(pool_images[2]), "reject")  # leaves the pool
    log.record(str(lab), "rescore", 8.0)  # a labeled image re-scored: its label changes
    log.record(str(labeled / "05" / "img_5_1.png"), "reject")  # a labeled image rejected: it goes
    log.record(str(test / "02" / "img_2_0.png"), "rescore", 1.0)  # a test image: left out of training
    return {"root": root, "labeled": labeled, "test": test, "pool": pool, "pool_images": pool_images,
            "file": root / "review-corrections.csv", "relabeled": lab}


def test_apply_to_labels(world):
    train = load_scored_set(world["labeled"])
    got, info = corr.apply_to_labels(corr.read_corrections(world["file"]), train, load_scored_set(world["test"])["path"])
    scores = dict(zip(got["path"], got["score"]))
    brackets = dict(zip(got["path"], got["bracket"]))
    assert len(got) == len(train) + 2 - 1  # two pool images in, one labeled image out
    assert scores[str(world["pool_images"][0])] == pytest.approx(6.4) and brackets[str(world["pool_images"][0])] == 6
    assert scores[str(world["pool_images"][1])] == 9.5 and brackets[str(world["pool_images"][1])] == 10
    assert scores[str(world["relabeled"])] == 8.0 and brackets[str(world["relabeled"])] == 8
    assert str(world["labeled"] / "05" / "img_5_1.png") not in scores
    assert str(world["pool_images"][2]) not in scores and not any("/test/" in p for p in scores)
    assert (info["labels_added"], info["labels_replaced"], info["labels_removed"], info["test_images_left_out"]) == (2, 1, 1, 1)


def test_a_copy_of_a_test_image_is_left_out_like_the_test_image(world, tmp_path):
    """A re-scored byte copy of a test image (another name) would train on the test set: left out, counted."""
    copy = tmp_path / "testcopy.png"
    shutil.copy(world["test"] / "07" / "img_7_1.png", copy)
    log = corr.CorrectionsLog(tmp_path / "c.csv")
    log.record(str(copy), "rescore", 7.0)
    log.record(str(world["pool_images"][5]), "accept", 4.0)
    got, info = corr.apply_to_labels(corr.read_corrections(tmp_path / "c.csv"), load_scored_set(world["labeled"]),
                                     load_scored_set(world["test"])["path"])
    assert str(copy) not in set(got["path"]) and str(world["pool_images"][5]) in set(got["path"])
    assert (info["test_images_left_out"], info["labels_added"]) == (1, 1)


def test_unreadable_corrected_image_is_refused_naming_the_file(world, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    log = corr.CorrectionsLog(tmp_path / "c.csv")
    log.record(str(broken), "rescore", 4)
    from aessl.data import LabeledSetError
    with pytest.raises(LabeledSetError, match="broken.png"):
        corr.apply_to_labels(corr.read_corrections(tmp_path / "c.csv"), load_scored_set(world["labeled"]), [])


def test_rejected_pool_images_leave_pseudo_labels(world, tmp_path):
    """An export's row of a rejected image is not a pseudo-label."""
    import torch
    from aessl.models import build_model, save_model_folder

    torch.manual_seed(0)
    model, info = build_model({"name": "test_resnet", "pretrained": False}, 32)
    save_model_folder(model, info, tmp_path / "teacher" / "model", {"thresholds": [0.0] * 11})
    out = tmp_path / "exp"
    assert ex.main(["--model", str(tmp_path / "teacher"), "--images", str(world["pool"]), "--out", str(out),
                    "--workers", "0"]) == 0
    from omegaconf import OmegaConf
    dcfg = OmegaConf.create({"pseudo_labels": str(out), "pseudo_weight": 1.0, "pseudo_band": None,
                             "pseudo_accepted_only": False})
    rejected = sorted(corr.read_corrections(world["file"]).rejected)
    train = load_scored_set(world["labeled"])
    base = pseudo.load_pseudo_set(dcfg, "supervised", {}, train["path"], [])
    got = pseudo.load_pseudo_set(dcfg, "supervised", {}, train["path"], [], rejected)
    assert got.info["dropped"]["rejected"] == 1 and got.info["rows_resolved"] == base.info["rows_resolved"] - 1


def test_training_on_corrections(world, capsys):
    """A supervised run and a FixMatch run with worker processes train on the corrected
    labels, drop the rejected pool image, and say so in run.json; a changed file refuses a
    resume; a bad file is refused naming its line."""
    root = world["root"]
    data = [f"data.labeled={world['labeled']}", f"data.test={world['test']}", f"data.unlabeled={world['pool']}",
            f"data.corrections={world['file']}"]
    run = root / "fix"
    assert train_in_process(*data, "algorithm.name=fixmatch", "data.num_workers=2", "train.steps=4",
                            "train.eval_every=4", "train.save_every=2", f"output_dir={run}") == 0
    info = json.loads((run / "run.json").read_text())
    c = info["corrections"]
    n_labeled = 11 * 4
    assert info["train_images"] == n_labeled + 2 - 1 == c["train_images"]
    assert info["pool_images"] == 24 - 1 and c["pool_images_removed"] == 1
    assert (c["accept"], c["rescore"], c["reject"], c["test_images_left_out"]) == (1, 3, 2, 1)
    assert c["sha256"] and c["files"] == [str(world["file"])]
    assert sum(info["train_histogram"]) == info["train_images"]
    assert info["train_histogram"][10] == 4 + 1 and info["train_histogram"][8] == 4 + 1

    # the report shows the corrected images, scored by the model trained on them
    from aessl.report import build_report
    rep = build_report([run], world["test"], root / "report", workers=0)
    c = rep["runs"]["fix"]["corrections"]
    assert (c["images"], c["accept"], c["rescore"], c["reject"], c["unreadable"]) == (6, 1, 3, 2, 0)
    assert 0 <= c["labels_mae"] <= 10 and 0 <= c["rejected_mean_percent"] <= 100 and c["sha256"] == info["corrections"]["sha256"]
    assert (root / "report" / "grid_corrected_fix.png").is_file()
    html = (root / "report" / "report.html").read_text()
    assert "Corrected images" in html and "6 image(s) decided" in html

    # the file changes (a review goes on) and the run is resumed: refused, nothing lost
    changed = root / "changed.csv"
    shutil.copy(world["file"], changed)
    corr.CorrectionsLog(changed).record(str(world["pool_images"][5]), "rescore", 2)
    run2 = root / "sup"
    args = [f"data.labeled={world['labeled']}", f"data.test={world['test']}", f"data.corrections={changed}",
            "algorithm.name=supervised", "train.steps=4", "train.eval_every=4", "train.save_every=2",
            f"output_dir={run2}"]
    assert train_in_process(*args) == 0
    corr.CorrectionsLog(changed).record(str(world["pool_images"][6]), "rescore", 3)
    checkpoints = sorted(p.name for p in (run2 / "checkpoints").iterdir()) if (run2 / "checkpoints").is_dir() else None
    capsys.readouterr()
    assert train_in_process(*args, "resume=true") == 2
    err = capsys.readouterr().err
    assert "data.corrections changed" in err, err[-2000:]
    if checkpoints is not None:
        assert sorted(p.name for p in (run2 / "checkpoints").iterdir()) == checkpoints

    bad = root / "bad.csv"
    bad.write_text("path,score,source,time,decision\n" f"{world['pool_images'][3]},12,review,t,rescore\n")
    assert train_in_process(*args[:2], f"data.corrections={bad}", "algorithm.name=supervised", "train.steps=2",
                            f"output_dir={root / 'bad'}") == 2
    err = capsys.readouterr().err
    assert "bad.csv: line 2" in err and "out of range" in err, err[-2000:]
    assert not (root / "bad").exists()  # the refused run leaves no folder behind
