"""ssl/clean.py: label issues, outliers and duplicates of a scored set, on tiny generated data."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aessl import clean
from aessl.synth import generate
from conftest import make_scored_set, read_csv_rows, script_in_process, toy_image, train_in_process


def clean_in_process(*args) -> int:
    return script_in_process("clean.py", *args)


read_csv = read_csv_rows


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """A tiny synthetic set (20% of its labels moved), plus: a byte copy of a labeled image
    under another bracket, a labeled image copied into the test set, an unreadable file."""
    root = tmp_path_factory.mktemp("clean")
    generate(root / "synth", labeled=150, unlabeled=0, test=20, size=16, seed=3, label_noise=0.2, workers=1,
             progress=False)
    lab = root / "synth" / "labeled"
    src = sorted((lab / "4").glob("*.png"))[0]
    shutil.copy(src, lab / "8" / "copy_of_a_4.png")
    leak = sorted((lab / "5").glob("*.png"))[0]
    shutil.copy(leak, root / "synth" / "test" / "5" / "leaked.png")
    (lab / "6" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {"root": root, "labeled": lab, "test": root / "synth" / "test", "copy": (src, lab / "8" / "copy_of_a_4.png"),
            "leak": leak}


def test_end_to_end_issues_review_cleaned_and_it_trains(noisy, tmp_path):
    out = tmp_path / "clean"
    rc = clean_in_process("--labeled", noisy["labeled"], "--out", out, "--test", noisy["test"], "--action", "drop",
                          "--cache-dir", tmp_path / "cache", "--workers", 0)
    assert rc == 0
    issues = read_csv(out / "issues.csv")
    assert list(issues[0]) == list(clean.ISSUE_COLUMNS)
    kinds = {r["kind"] for r in issues}
    assert {"label_issue", "near_duplicate", "unreadable"} <= kinds <= set(clean.KINDS)
    # the byte copy under another bracket: found, with both brackets
    src, copy = (str(p) for p in noisy["copy"])
    pair = [r for r in issues if r["kind"] == "near_duplicate" and {r["path"], r["other_path"]} == {src, copy}]
    assert len(pair) == 1 and "identical bytes" in pair[0]["detail"] and "different scores" in pair[0]["detail"]
    assert {pair[0]["given_bracket"], pair[0]["other_bracket"]} == {"4", "8"}
    leak = [r for r in issues if r["kind"] == "near_duplicate" and r["other_path"].endswith("leaked.png")]
    assert len(leak) == 1 and leak[0]["path"] == str(noisy["leak"]) and "test leak" in leak[0]["detail"]
    bad = [r for r in issues if r["kind"] == "unreadable"]
    assert [Path(r["path"]).name for r in bad] == ["broken.png"] and bad[0]["detail"]
    labels = [r for r in issues if r["kind"] == "label_issue"]
    assert all(r["flagged_by"] in ("ordinal", "cleanlab", "ordinal+cleanlab") for r in labels)
    ordinal = [float(r["ordinal_score"]) for r in labels if "ordinal" in r["flagged_by"]]
    assert ordinal == sorted(ordinal) and all(0 <= s < clean.ORDINAL_CUT for s in ordinal)  # worst first

    scores = read_csv(out / "scores.csv")
    assert len(scores) == 151  # 150 + the copy, without broken.png
    probs = np.array([[float(r[f"p{k}"]) for k in range(11)] for r in scores])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    dropped = sum(int(r["ordinal_flag"]) for r in scores)  # --flag-by ordinal (default)
    cleaned = read_csv(out / "cleaned.csv")
    assert list(cleaned[0]) == ["path", "score"] and len(cleaned) == 151 - dropped
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in cleaned)
    assert not any(r["path"].endswith("broken.png") for r in cleaned)

    html = (out / "review.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "Label issues" in html and "copy_of_a_4.png" in html

    run = tmp_path / "run"
    assert train_in_process(f"data.labeled={out / 'cleaned.csv'}", f"data.test={noisy['test']}",
                            "algorithm.name=supervised", "train.steps=2", "train.eval_every=2",
                            f"output_dir={run}") == 0
    assert (run / "model" / "model.safetensors").is_file()
    # the trained run's backbone (--model), on the manifest just written
    again = tmp_path / "again"
    assert clean_in_process("--labeled", out / "cleaned.csv", "--out", again, "--model", run,
                            "--cache-dir", tmp_path / "cache", "--workers", 0) == 0
    assert len(read_csv(again / "scores.csv")) == len(cleaned)
    assert "test_resnet" in (again / "review.html").read_text()


def test_relabel_and_none(noisy, tmp_path):
    out = tmp_path / "c"
    common = ["--labeled", noisy["labeled"], "--out", out, "--cache-dir", tmp_path / "cache", "--workers", 0]
    assert clean_in_process(*common, "--action", "relabel", "--flag-by", "either", "--folds", 3) == 0
    scores = {r["path"]: r for r in read_csv(out / "scores.csv")}
    for r in read_csv(out / "cleaned.csv"):
        s = scores[r["path"]]
        flagged = int(s["ordinal_flag"]) or int(s["cleanlab_flag"])
        assert float(r["score"]) == float(s["suggested_bracket"] if flagged else s["given_bracket"])
    assert clean_in_process(*common, "--action", "none") == 0
    assert len(read_csv(out / "cleaned.csv")) == 151


def test_ordinal_score_ranks_a_far_label_above_a_near_one():
    # the same out-of-fold distribution, peaked at 5; labels 7 (near) and 10 (far). cleanlab's
    # self-confidence gives both 0 (a tie); the ordinal score tells them apart.
    p = np.zeros(11)
    p[[4, 5, 6]] = [0.25, 0.5, 0.25]
    P = np.stack([p, p])
    given = np.array([7, 10])
    o = clean.ordinal_scores(P, given)
    assert o["within1"][1] < o["within1"][0] and o["within1"][0] == pytest.approx(0.25) and o["within1"][1] == 0
    assert o["expected_distance"].tolist() == pytest.approx([2.0, 5.0])
    assert o["suggested"].tolist() == [5, 5]
    flags = clean.flag_labels({"flagged": np.array([True, True])}, o, "ordinal")
    assert flags.tolist() == [False, True]  # a label one bracket from the bulk is not an ordinal issue
    assert clean.flag_labels({"flagged": np.array([True, False])}, o, "both").tolist() == [False, False]
    # median: the bracket of least expected absolute error, not the argmax
    q = np.zeros(11)
    q[[2, 8, 9]] = [0.4, 0.3, 0.3]
    assert clean.ordinal_scores(q[None], np.array([2]))["suggested"].tolist() == [8]


def test_outlier_far_from_the_rest_is_flagged():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(200, 8)), np.full((1, 8), 12.0)]).astype(np.float32)
    scores, flagged = clean.outlier_scores(X)
    assert flagged.tolist() == [False] * 200 + [True] and scores.argmin() == 200


def test_duplicates_identical_and_near_identical(tmp_path):
    rng = np.random.default_rng(0)
    a = tmp_path / "a.png"
    toy_image(3, rng, 48).save(a)
    shutil.copy(a, tmp_path / "b.png")
    buf = io.BytesIO()
    Image.open(a).resize((40, 40), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=85)
    (tmp_path / "c.jpg").write_bytes(buf.getvalue())
    toy_image(9, rng, 48).save(tmp_path / "d.png")
    paths = [str(tmp_path / n) for n in ("a.png", "b.png", "c.jpg", "d.png")]
    pairs = {(i, j): how for i, j, how in clean.duplicate_pairs(clean.fingerprints(paths), paths)}
    assert pairs[(0, 1)] == "identical bytes"
    assert pairs[(0, 2)].startswith("near-identical") and pairs[(1, 2)].startswith("near-identical")
    assert not any(3 in k for k in pairs)
    # the same file named twice: two raters' scores are not a duplicate, two rows with no rater (or one
    # rater twice) are, and a test image that is a labeled file is a pair between the sets
    twice = [paths[0], paths[0]]
    prints = clean.fingerprints(twice)
    assert clean.duplicate_pairs(prints, twice, raters=["ann", "bob"]) == []
    assert clean.duplicate_pairs(prints, twice) == [(0, 1, "the same file")]
    assert clean.duplicate_pairs(prints, twice, raters=["ann", "ann"]) == [(0, 1, "the same file")]
    between = clean.duplicate_pairs(clean.fingerprints(paths), paths, clean.fingerprints(paths[3:]), paths[3:])
    assert between == [(3, 0, "the same file")]


def test_folds_reduced_or_refused(caplog):
    paths = [f"img{i}.png" for i in range(12)]
    assert clean.choose_folds(np.array([0] * 6 + [1] * 6), 5, paths) == 5
    assert clean.choose_folds(np.array([0] * 9 + [1] * 3), 5, paths) == 3
    assert "bracket 1 has 3 images, fewer than --folds 5: using 3 folds" in caplog.text
    assert clean.choose_folds(np.array([0] * 6 + [1] * 5 + [2]), 5, paths) == 5
    assert "bracket(s) [2]" in caplog.text and "img11.png" in caplog.text
    with pytest.raises(clean.CleanError, match="--folds must be at least 2"):
        clean.choose_folds(np.array([0] * 6 + [1] * 6), 1, paths)
    with pytest.raises(clean.CleanError, match="at least two brackets with two or more images"):
        clean.choose_folds(np.array([0] * 11 + [1]), 5, paths)


def test_bad_inputs_name_the_file_or_option(tmp_path, capsys):
    cache = ["--cache-dir", tmp_path / "cache", "--workers", 0]

    def error(*args) -> str:
        assert clean_in_process(*args, *cache) == 2
        return capsys.readouterr().err

    missing = tmp_path / "nope"
    assert "--labeled" in (e := error("--labeled", missing, "--out", tmp_path / "o")) and str(missing) in e
    (tmp_path / "empty" / "3").mkdir(parents=True)
    assert "no images found" in error("--labeled", tmp_path / "empty", "--out", tmp_path / "o")
    bad = tmp_path / "bad"
    for b in (2, 7):
        (bad / str(b)).mkdir(parents=True)
        for i in range(3):
            (bad / str(b) / f"x{i}.png").write_bytes(b"garbage")
    e = error("--labeled", bad, "--out", tmp_path / "o")
    assert "none of its 6 images could be read" in e and "x0.png" in e
    good = make_scored_set(tmp_path / "good", per_bracket=3, brackets=range(3))
    assert "--model" in error("--labeled", good, "--out", tmp_path / "o", "--model", tmp_path / "no_run")
    assert "--pretrained" in error("--labeled", good, "--out", tmp_path / "o", "--pretrained", tmp_path / "w.pt")
    assert "--folds must be at least 2" in error("--labeled", good, "--out", tmp_path / "o", "--folds", 1)
    e = error("--labeled", good, "--out", tmp_path / "o", "--backbone", "no_such_net")
    assert "--backbone" in e and "no_such_net" in e
    one = make_scored_set(tmp_path / "one", per_bracket=4, brackets=[5])
    assert "at least two brackets" in error("--labeled", one, "--out", tmp_path / "o")
    assert not (tmp_path / "o" / "cleaned.csv").exists()
