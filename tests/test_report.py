"""ssl/report.py: evaluation reports built from two tiny trained runs.

The runs are trained once for the module (in parallel: one supervised, one FixMatch); each
test then builds a report and checks it as a user and as a script would: every part is
there, the numbers agree with scikit-learn/scipy recomputed here from the report's own
predictions, and the HTML opens with nothing fetched from anywhere.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score, cohen_kappa_score, mean_absolute_error

from conftest import TINY, data_args, read_metrics, report_main, run_script, toy_image

PLOTS_PER_RUN = ("confusion", "score_hist", "reliability", "recall", "grid_top", "grid_false_positives", "grid_misses")


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("report_runs")
    common = [*TINY, "train.steps=4", "train.eval_every=2", "train.save_every=4", *data_args(toy_data)]
    spec = {"sup": ["algorithm.name=supervised", "seed=0"], "fix": ["algorithm.name=fixmatch", "seed=1"]}
    with ThreadPoolExecutor(2) as pool:  # two processes: the machine has two cores
        jobs = [pool.submit(run_script, "train.py", *common, *extra, f"output_dir={root / name}") for name, extra in spec.items()]
        for job in jobs:
            job.result()
    return {name: root / name for name in spec}


@pytest.fixture(scope="module")
def pool_with_truth(tmp_path_factory) -> dict:
    """A small pool whose true brackets are known, plus one file that is not an image."""
    root = tmp_path_factory.mktemp("truth_pool")
    rng = np.random.default_rng(7)
    rows = []
    for i in range(22):
        b = i % 11
        rel = f"pool/p{i:02d}.png"
        (root / "pool").mkdir(exist_ok=True)
        toy_image(b, rng).save(root / rel)
        rows.append({"path": rel, "split": "unlabeled", "bracket": b, "score": float(b)})
    (root / "pool" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    pd.DataFrame(rows).to_parquet(root / "truth.parquet")
    return {"pool": root / "pool", "truth": root / "truth.parquet"}


def external_references(text: str) -> list[str]:
    found = re.findall(r"https?://[^\s'\"<>]*", text)
    found += [s for s in re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]*)""", text) if not s.startswith("data:")]
    found += [u for u in re.findall(r"""url\(\s*["']?([^)"']*)""", text) if not u.startswith("data:")]
    found += re.findall(r"<link\b[^>]*>", text, re.I)
    found += re.findall(r"<script\b[^>]*\bsrc\b[^>]*>", text, re.I)
    found += re.findall(r"""\bhref\s*=\s*["']?(?!#)([^"'\s>]+)""", text)
    return found


def ece(probs: np.ndarray, true_bracket: np.ndarray, bins: int = 10) -> float:
    conf, right = probs.max(1), probs.argmax(1) == true_bracket
    total = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(right[sel].mean() - conf[sel].mean())
    return total


def test_one_run_report_has_every_part_and_sklearn_agrees(runs, toy_data, tmp_path):
    out = tmp_path / "one"
    assert report_main()([str(runs["sup"]), "--data", str(toy_data["test"]), "--out", str(out), "--workers", "0",
                          "--grid", "4", "--top-k", "5"]) == 0

    for part in ("report.html", "metrics.json", "predictions.parquet", "training_curves.png",
                 *(f"{p}_sup.png" for p in PLOTS_PER_RUN)):
        assert (out / part).is_file() and (out / part).stat().st_size > 0, part
    assert not (out / "pool_histogram.png").exists()

    report = json.loads((out / "metrics.json").read_text())
    assert report["run_names"] == ["sup"] and report["data"] == str(toy_data["test"])
    m = report["runs"]["sup"]["metrics"]
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == report["num_images"] == 33 and set(pred["run"]) == {"sup"}
    probs = pred[[f"p_{b}" for b in range(11)]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    true_b, pred_b = pred["bracket"].to_numpy(), probs.argmax(1)
    expected = probs @ np.arange(11)
    assert m["qwk"] == pytest.approx(cohen_kappa_score(true_b, pred_b, weights="quadratic", labels=np.arange(11)), abs=1e-9)
    assert m["accuracy"] == pytest.approx(accuracy_score(true_b, pred_b))
    assert m["mae"] == pytest.approx(mean_absolute_error(pred["score"], expected))
    assert m["spearman"] == pytest.approx(spearmanr(expected, pred["score"]).statistic)
    assert m["accuracy_within_1"] == pytest.approx(np.mean(np.abs(true_b - pred_b) <= 1))
    trained = read_metrics(runs["sup"])[-1]  # the same test set, scored as training's evaluation scored it
    assert m["qwk"] == pytest.approx(trained["qwk"], abs=0.02) and m["mae"] == pytest.approx(trained["mae"], abs=0.02)
    assert m["ece"] == pytest.approx(ece(probs, true_b))
    low = true_b <= 1
    assert m["false_positive_rate"] == pytest.approx(np.mean(expected[low] >= 5))
    assert m["top_k"] == 5 and report["top_k"] == 5
    for b in range(11):
        assert m[f"recall_{b}"] == pytest.approx(np.mean(pred_b[true_b == b] == b))
    assert m["skipped_images"] == 0  # known from the run's metrics.jsonl

    page = (out / "report.html").read_text()
    assert external_references(page) == []
    for text in ("Confusion matrix", "Reliability", "ECE", "Recall per bracket", "Worst false positives", "Worst misses",
                 "Top images", "Training curves", "quadratic-weighted kappa", "false-positive rate"):
        assert text in page, text
    assert page.count("src='data:image/png;base64,") == len(PLOTS_PER_RUN) + 1  # + training curves
    assert "class='best'" not in page  # nothing to compare with one run


def test_two_runs_side_by_side_with_pool_and_truth(runs, toy_data, pool_with_truth, tmp_path):
    out = tmp_path / "two"
    proc = run_script("report.py", runs["sup"], runs["fix"], "--data", toy_data["test"], "--pool", pool_with_truth["pool"],
                      "--truth", pool_with_truth["truth"], "--out", out, "--grid", "4", "--workers", "2")
    assert "report:" in proc.stdout and "1 unreadable skipped" in proc.stdout

    report = json.loads((out / "metrics.json").read_text())
    assert report["run_names"] == ["sup", "fix"]
    maes = {n: report["runs"][n]["metrics"]["mae"] for n in ("sup", "fix")}
    assert maes["sup"] != maes["fix"]
    assert report["best"]["mae"] == [min(maes, key=maes.get)]
    qwk = {n: report["runs"][n]["metrics"]["qwk"] for n in ("sup", "fix")}
    assert report["best"]["qwk"] == ([] if qwk["sup"] == qwk["fix"] else [max(qwk, key=qwk.get)])

    page = (out / "report.html").read_text()
    assert external_references(page) == []
    header = re.search(r"<table class='metrics'><thead>(.*?)</thead>", page).group(1)
    assert "<th>sup</th>" in header and "<th>fix</th>" in header
    mae_row = re.search(r"<tr><td>MAE \(brackets\)[^<]*</td>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td( class='best')?>", mae_row)
    assert cells == ([" class='best'", ""] if report["best"]["mae"] == ["sup"] else ["", " class='best'"])

    # where the runs disagree: the images with the largest spread of expected scores, from the
    # same predictions the parquet holds, largest first, one table row each
    pred = pd.read_parquet(out / "predictions.parquet")
    by_run = {n: pred[pred["run"] == n].set_index("path")[[f"p_{b}" for b in range(11)]] @ np.arange(11) for n in ("sup", "fix")}
    spread = (by_run["sup"] - by_run["fix"]).abs().sort_values(ascending=False)
    rows = report["disagreements"]
    assert len(rows) == 10 and [r["spread"] for r in rows] == sorted((r["spread"] for r in rows), reverse=True)
    assert rows[0]["spread"] == pytest.approx(spread.iloc[0], abs=1e-5)
    for r in rows:
        assert r["spread"] == pytest.approx(abs(r["scores"]["sup"] - r["scores"]["fix"]), abs=1e-9)
        assert r["scores"]["sup"] == pytest.approx(by_run["sup"][r["path"]], abs=1e-5)
    table = page.split("id='disagreements'", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr><td>") == 10 and "<th>spread</th>" in table

    # the pool: histogram in percent, one unreadable file skipped and counted, pseudo-labels vs truth
    assert (out / "pool_histogram.png").is_file() and "alt='pool histogram'" in page and "id='pool'" in page
    assert report["pool"]["num_images"] == 23 and report["pool"]["skipped"] == 1
    assert report["pool"]["skipped_examples"][0]["path"].endswith("broken.png")
    pool_pred = pd.read_parquet(out / "pool_predictions.parquet")
    assert len(pool_pred) == 2 * 22 and pool_pred["true_bracket"].notna().all()
    for name in ("sup", "fix"):
        p = report["runs"][name]["pool"]
        assert p["images_scored"] == 22 and p["truth_matched"] == 22
        q = p["pseudo_label_quality"]
        rows = pool_pred[pool_pred["run"] == name]
        assert q["pseudo_coverage"] == pytest.approx(rows["accepted"].mean())
        assert set(q) >= {f"pseudo_accuracy_{b}" for b in range(11)} | {f"pseudo_coverage_{b}" for b in range(11)}
        assert (out / f"pseudo_quality_{name}.png").is_file()
    # the supervised model has no thresholds: FixMatch's 0.95 stands in; FixMatch keeps its own
    assert report["runs"]["sup"]["thresholds"] == [0.95] * 11
    assert report["runs"]["fix"]["model_thresholds"] == pytest.approx([0.95] * 11)


def test_bare_model_folder_and_different_test_sets(runs, toy_data, tmp_path):
    bare = tmp_path / "exported" / "my_model"
    shutil.copytree(runs["fix"] / "model", bare)
    out = tmp_path / "bare"
    # a scored set the run trained on: the report must say so
    assert report_main()([str(bare), str(runs["sup"]), "--data", str(toy_data["labeled"]), "--out", str(out),
                          "--workers", "0", "--grid", "2"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["run_names"] == ["my_model", "sup"]
    assert report["runs"]["my_model"]["run_dir"] is None
    assert report["runs"]["my_model"]["metrics"]["skipped_images"] is None
    notes = " ".join(report["notes"])
    assert "my_model: a bare model folder" in notes
    assert "sup: 88 of the 88 scored images were in its training data" in notes
    assert f"evaluated during training on {toy_data['test']}" in notes
    page = (out / "report.html").read_text()
    assert external_references(page) == [] and "Notes on the data" in page
    assert (out / "confusion_my_model.png").is_file()


def test_bad_inputs_exit_2_with_the_file_named(runs, toy_data, tmp_path, capsys):
    bad_set = tmp_path / "scored"
    shutil.copytree(toy_data["test"], bad_set)
    (bad_set / "03" / "broken.png").write_bytes(b"garbage")
    main = report_main()
    assert main([str(runs["sup"]), "--data", str(bad_set), "--out", str(tmp_path / "r1"), "--workers", "0"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "r1" / "report.html").exists()
    assert main([str(tmp_path / "nowhere"), "--data", str(toy_data["test"]), "--out", str(tmp_path / "r2")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_dollar_signs_in_file_and_run_names_are_plain_text(runs, tmp_path):
    """matplotlib reads '$...$' as TeX: 'x$_a_b$' would stop the report (double subscript)."""
    scored = tmp_path / "scored"
    rng = np.random.default_rng(3)
    for b, name in ((0, "x$_a_b$.png"), (5, "plain.png"), (9, "y$.png")):
        (scored / f"{b:02d}").mkdir(parents=True)
        toy_image(b, rng).save(scored / f"{b:02d}" / name)
    dollar, twin = tmp_path / "sup$_x$", tmp_path / "sup__x"  # also one file-name slug: sup__x
    for run in (dollar, twin):
        shutil.copytree(runs["sup"], run, ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "out"
    assert report_main()([str(dollar), str(twin), "--data", str(scored), "--out", str(out), "--workers", "0",
                          "--top-k", "1"]) == 0
    page = (out / "report.html").read_text()
    assert "sup$_x$" in page and external_references(page) == []
    assert json.loads((out / "metrics.json").read_text())["run_names"] == ["sup$_x$", "sup__x"]
    assert "x$_a_b$.png" in " ".join(pd.read_parquet(out / "predictions.parquet")["path"])
    for slug in ("sup__x", "sup__x-2"):  # each run keeps its own PNGs
        assert all((out / f"{p}_{slug}.png").is_file() for p in PLOTS_PER_RUN), slug


def _bad_report_case(case: str, runs, toy_data, tmp: Path) -> tuple[list[str], str]:
    """(arguments but --out, words the error must hold) for one bad input."""
    model, data = str(runs["sup"] / "model"), str(toy_data["test"])
    rng = np.random.default_rng(0)
    if case == "pool_all_unreadable":
        (tmp / "pool").mkdir()
        (tmp / "pool" / "zero.png").write_bytes(b"")
        (tmp / "pool" / "text.jpg").write_text("not an image")
        return [model, "--data", data, "--pool", str(tmp / "pool")], "none of its 2 image(s)"
    if case == "truth_paths_are_numbers":
        (tmp / "pool").mkdir()
        toy_image(3, rng).save(tmp / "pool" / "a.png")
        pd.DataFrame({"path": [1, 2], "bracket": [3, 4]}).to_parquet(tmp / "truth.parquet")
        return [model, "--data", data, "--pool", str(tmp / "pool"), "--truth", str(tmp / "truth.parquet")], "truth.parquet"
    if case == "config_is_a_list":
        shutil.copytree(runs["sup"] / "model", tmp / "model")
        (tmp / "model" / "config.json").write_text("[]")
        return [str(tmp / "model"), "--data", data], "config.json"
    if case == "manifest_paths_are_numbers":
        (tmp / "scored.csv").write_text("path,score\n1,3\n2,4\n")
        return [model, "--data", str(tmp / "scored.csv")], "scored.csv"
    if case == "manifest_header_only":
        (tmp / "scored.csv").write_text("path,score\n")
        return [model, "--data", str(tmp / "scored.csv")], "scored.csv"
    if case == "device_typo":
        return [model, "--data", data, "--device", "cdua"], "'cdua'"
    if case == "device_cuda_without_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        return [model, "--data", data, "--device", "cuda"], "CUDA is not available"
    if case == "out_is_a_file":
        return [model, "--data", data], "not a folder"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["pool_all_unreadable", "truth_paths_are_numbers", "config_is_a_list",
                                  "manifest_paths_are_numbers", "manifest_header_only", "device_typo",
                                  "device_cuda_without_cuda", "out_is_a_file"])
def test_bad_input_is_a_clear_exit_2(case, runs, toy_data, tmp_path, capsys):
    args, words = _bad_report_case(case, runs, toy_data, tmp_path)
    out = tmp_path / "out"
    if case == "out_is_a_file":
        out.write_text("a file")
    assert report_main()([*args, "--out", str(out), "--workers", "0"]) == 2  # not a traceback
    err = capsys.readouterr().err
    assert "error: " in err and words in err and "Traceback" not in err, err
    assert out.read_text() == "a file" if case == "out_is_a_file" else not out.exists()  # nothing written


def test_per_rater_table_when_the_scored_set_has_raters(runs, toy_data, tmp_path):
    """A test set scored by two raters, one harsh (score - 2) on every image, one as the
    folders say on half of them: the report gets a per-rater table whose numbers are the
    run's own predictions measured against each rater's rows."""
    images = sorted(Path(toy_data["test"]).rglob("*.png"))
    rows = ["path,score,rater"]
    for i, img in enumerate(images):
        score = float(img.parent.name)
        rows.append(f"{img},{max(0.0, score - 2)},harsh")
        if i % 2 == 0:
            rows.append(f"{img},{score},kind")
    manifest = tmp_path / "rated.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "raters"
    assert report_main()([str(runs["sup"]), str(runs["fix"]), "--data", str(manifest), "--out", str(out),
                          "--workers", "0", "--grid", "2"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    per = report["runs"]["sup"]["per_rater"]
    assert set(per) == {"harsh", "kind"}
    assert per["harsh"]["num_images"] == len(images) and per["kind"]["num_images"] == (len(images) + 1) // 2
    pred = pd.read_parquet(out / "predictions.parquet")
    mine = pred[(pred.run == "sup") & (pred.rater == "harsh")]
    assert per["harsh"]["mae"] == pytest.approx(float(np.mean(np.abs(mine.expected_score - mine.score))), abs=1e-4)
    assert per["harsh"]["mean_true"] < per["kind"]["mean_true"] - 1.5
    page = (out / "report.html").read_text()
    assert "<h2 id='raters'>Per rater</h2>" in page
    assert re.search(r"<tr><td>harsh</td><td>%d</td>" % len(images), page)
    assert external_references(page) == []
