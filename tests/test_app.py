"""ssl/app.py's functions, without a browser: scoring as export scores, the Review filters,
decisions written to the corrections CSV at once, the Label next queue, bad input."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_pool, random_model, script_in_process

from aessl import app as A
from aessl import export as ex
from aessl.corrections import read_corrections

THRESHOLDS = [0.25] * 11  # with seed 4 below: brackets 1, 5 and 7, both verdicts
GOOD = 14


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    pool = make_pool(root / "pool", n=GOOD, size=24)
    jpg = (pool / "part0" / "u0000.jpg").read_bytes()
    (pool / "broken.jpg").write_bytes(jpg[: len(jpg) // 2])
    run = random_model(root / "run" / "model", 4, THRESHOLDS)
    out = root / "exports" / "pool"
    assert ex.main(["--model", str(run), "--images", str(pool), "--out", str(out), "--workers", "0",
                    "--batch-size", "8", "--device", "cpu"]) == 0
    rows = {r["path"]: r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()}
    assert len(rows) == GOOD
    return {"root": root, "pool": pool, "run": run, "export": out, "rows": rows,
            "scorer": A.Scorer.load(run, device="cpu")}


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- Score


def test_score_matches_export_and_bad_images_give_a_message(setup, tmp_path):
    scorer, rows = setup["scorer"], setup["rows"]
    paths = sorted(rows)[:5]
    not_image = tmp_path / "notes.png"
    not_image.write_text("a text file renamed .png\n")
    given = [paths[0], str(setup["pool"] / "broken.jpg"), *paths[1:], str(not_image), str(tmp_path / "gone.png")]
    seen = []
    res = scorer.score(given, progress=lambda d, t: seen.append((d, t)))
    assert [r["path"] for r in res] == given
    assert seen[-1] == (len(given), len(given))
    ok = [r for r in res if r["ok"]]
    assert [r["path"] for r in ok] == paths
    for r in ok:
        want = rows[r["path"]]
        p = np.array(r["probs"])
        assert p.shape == (11,) and abs(p.sum() - 1) < 1e-5 and (p >= 0).all()
        assert r["expected_score"] == pytest.approx(want["expected_score"], abs=1e-5)
        assert r["score_percent"] == pytest.approx(want["score_percent"], abs=1e-4)
        assert r["expected_score"] == pytest.approx(float(p @ np.arange(11)), abs=1e-4)
        assert (r["bracket"], r["accepted"]) == (want["bracket"], want["accepted"])
        assert r["verdict"] == ("accepted" if want["accepted"] else "uncertain")
        np.testing.assert_allclose(p, [want[c] for c in ex.PROB_COLUMNS], atol=1e-5)
    assert len({r["accepted"] for r in rows.values()}) == 2  # the data covers both verdicts
    bad = {Path(r["path"]).name: r["error"] for r in res if not r["ok"]}
    assert set(bad) == {"broken.jpg", "notes.png", "gone.png"}
    assert "truncated" in bad["broken.jpg"] and "not an image" in bad["notes.png"]
    text = A.score_summary(res)
    assert "5 image(s) scored, 3 unreadable" in text and "could not be read" in text and "%" in text
    frame = A.score_table_frame(res)
    assert list(frame["verdict"])[-3:] == ["unreadable"] * 3 and frame["score %"].iloc[0] == pytest.approx(max(
        r["score_percent"] for r in ok), abs=0.01)
    gallery = A.score_gallery(res)
    assert len(gallery) == len(given) and "unreadable" in gallery[-1][1]
    fig = A.score_cards_figure(res)
    assert len(fig.axes) == len(ok)
    written = A.write_results_csv(res, tmp_path)
    assert len(csv_rows(written)) == len(given)


def test_score_folder_with_progress_and_errors(setup):
    scorer = setup["scorer"]
    seen = []
    res = scorer.score_folder(str(setup["pool"]), progress=lambda d, t: seen.append((d, t)))
    assert len(res) == GOOD + 1 and seen[-1] == (GOOD + 1, GOOD + 1)
    assert sum(not r["ok"] for r in res) == 1
    by_path = {r["path"]: r for r in res if r["ok"]}
    assert set(by_path) == set(setup["rows"])
    for p, r in by_path.items():
        assert r["expected_score"] == pytest.approx(setup["rows"][p]["expected_score"], abs=1e-5)
    for bad in ("", str(setup["root"] / "nowhere")):
        with pytest.raises(A.AppError):
            scorer.score_folder(bad)


def test_tiles_and_saliency(setup, tmp_path):
    from aessl.images import load_image
    from aessl.tiles import reduce_tiles, tile_views

    path = sorted(setup["rows"])[0]
    tiled = A.Scorer.load(setup["run"], device="cpu", tiles=5, tile_reduce="max")
    assert tiled.tiles is not None and "5 tiles" in tiled.describe()
    r = tiled.score([path])[0]
    model, info = tiled.model, tiled.info
    with torch.no_grad():
        per_tile = torch.softmax(model(tile_views(load_image(path), info, 5))["logits"].float(), -1)
    want = reduce_tiles(per_tile[None].numpy().astype(np.float64), "max")[0]
    np.testing.assert_allclose(r["probs"], want, atol=1e-5)
    with pytest.raises(A.AppError, match="tile"):
        A.Scorer.load(setup["run"], device="cpu", tiles=3)
    with pytest.raises(A.AppError, match="need --tiles"):
        A.Scorer.load(setup["run"], device="cpu", tile_reduce="max")

    broken = str(setup["pool"] / "broken.jpg")
    overlays = setup["scorer"].saliency([path, broken], steps=4, size=64)
    assert overlays[0].size[0] == 64 and overlays[1] is None
    res = setup["scorer"].score([path])
    assert len(A.score_gallery(res, overlays=[overlays[0]])) == 2


# --------------------------------------------------------------------------- Review


def test_filters_return_the_right_rows(setup, tmp_path):
    view = A.ExportView(setup["export"], tmp_path / "c.csv")
    rows = list(setup["rows"].values())
    assert len(view) == GOOD

    got, total = view.filter(top=None)
    assert total == GOOD and [r["path"] for r in got] == [
        r["path"] for r in sorted(rows, key=lambda r: (-r["score_percent"], r["path"]))]

    brackets = sorted({r["bracket"] for r in rows})[:2]
    got, total = view.filter(brackets=[str(b) for b in brackets], top=None)
    assert {r["path"] for r in got} == {r["path"] for r in rows if r["bracket"] in brackets} and total == len(got)

    pcts = sorted(r["score_percent"] for r in rows)
    lo, hi = pcts[3], pcts[-4]
    got, _ = view.filter(min_percent=lo, max_percent=hi, sort="score, low first", top=None)
    assert [r["path"] for r in got] == [r["path"] for r in sorted(rows, key=lambda r: (r["score_percent"], r["path"]))
                                        if lo <= r["score_percent"] <= hi]
    assert len(got) == GOOD - 6

    confs = sorted(r["confidence"] for r in rows)
    got, _ = view.filter(min_confidence=confs[2], max_confidence=confs[-3], top=None)
    assert {r["path"] for r in got} == {r["path"] for r in rows if confs[2] <= r["confidence"] <= confs[-3]}

    got, total = view.filter(accepted_uncertain=True, top=2)
    accepted = sorted((r for r in rows if r["accepted"]), key=lambda r: (r["confidence"], r["path"]))
    assert total == len(accepted) > 2 and [r["path"] for r in got] == [r["path"] for r in accepted[:2]]
    assert all(r["accepted"] for r in got)

    got, total = view.filter(top=3)
    assert len(got) == 3 and total == GOOD
    for bad in (dict(decided="maybe"), dict(sort="by name")):
        with pytest.raises(A.AppError):
            view.filter(**bad)
    assert "decision" in A.review_frame(got).columns and len(A.review_frame(got)) == 3
    text = A.row_details(got[0], view.thresholds)
    assert f"{got[0]['score_percent']:.1f}%" in text and "threshold" in text and "not decided yet" in text


def test_decisions_land_in_the_csv_at_once(setup):
    export = setup["export"]
    default = export.parent / "pool-corrections.csv"
    assert A.default_corrections_path(export) == default
    view = A.ExportView(export)  # the default file, next to the export folder
    assert view.corrections_path == default and default.is_file() and not (export / default.name).exists()
    first, second, third = [r["path"] for r in view.filter(top=3)[0]]

    view.decide(first, "accept")
    lines = csv_rows(default)
    assert len(lines) == 1 and lines[0]["path"] == first and lines[0]["decision"] == "accept"
    assert float(lines[0]["score"]) == pytest.approx(setup["rows"][first]["expected_score"], abs=1e-4)
    assert lines[0]["source"] == "review"

    view.decide(second, "reject")
    view.decide(third, "rescore", 3.5)
    lines = csv_rows(default)
    assert [(l["path"], l["decision"], l["score"]) for l in lines[1:]] == [(second, "reject", ""),
                                                                             (third, "rescore", "3.5")]
    for bad in ((third, "rescore", 11), (third, "rescore", None), (third, "maybe", 1.0), ("/not/in/export.jpg",
                                                                                          "reject", None)):
        with pytest.raises(A.AppError):
            view.decide(*bad)
    assert len(csv_rows(default)) == 3  # nothing written by a refused decision

    decided, _ = view.filter(decided="decided", top=None)
    assert {r["path"] for r in decided} == {first, second, third}
    assert {r["path"]: A.decision_text(r) for r in decided}[second] == "rejected"
    assert view.filter(decided="undecided", top=None)[1] == GOOD - 3

    again = A.ExportView(export)  # a restarted app shows the decisions already made
    assert again.row(third)["decision"] == "rescore" and again.row(third)["decided_score"] == 3.5
    again.decide(third, "accept")  # re-decided: the last decision wins
    assert read_corrections(default).last[os.path.normpath(third)]["decision"] == "accept"
    default.unlink()


def test_bad_export_and_corrections_paths(setup, tmp_path):
    with pytest.raises(A.AppError, match="inside the export folder"):
        A.ExportView(setup["export"], setup["export"] / "c.csv")
    with pytest.raises(A.AppError, match="manifest.json"):
        A.ExportView(setup["pool"], tmp_path / "c.csv")
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(A.AppError, match="not a corrections file"):
        A.ExportView(setup["export"], foreign)
    with pytest.raises(A.AppError, match="--export"):
        A.AppState.load(setup["run"], corrections=tmp_path / "c.csv", device="cpu")
    with pytest.raises(A.AppError, match="not a model folder"):
        A.Scorer.load(tmp_path, device="cpu")
    # a broken --other-export stops the app at start, not at the first Label next click
    view = A.ExportView(setup["export"], tmp_path / "c.csv")
    with pytest.raises(A.AppError, match=r"--other-export .*nope"):
        A.check_other_exports(view, [str(tmp_path / "nope")])
    A.check_other_exports(view, [str(setup["export"])])  # itself: a finished export of the same pool


def test_cli_refuses_bad_input(setup, tmp_path):
    assert script_in_process("app.py", "--model", tmp_path / "nowhere") == 2
    assert script_in_process("app.py", "--model", setup["run"], "--labeled", tmp_path) == 2
    for port in ("0", "70000"):  # a usage error (exit 2), not a traceback from the server
        with pytest.raises(SystemExit, match="2"):
            script_in_process("app.py", "--model", setup["run"], "--port", port)


# --------------------------------------------------------------------------- Label next


def test_label_queue_leaves_out_decided_and_labeled(setup, tmp_path):
    from aessl.active import build_queue

    view = A.ExportView(setup["export"], tmp_path / "c.csv")
    full = build_queue(setup["export"], GOOD)
    assert len(A.label_queue(view, GOOD)) == GOOD
    decided, labeled = full[0]["path"], full[1]["path"]
    view.decide(decided, "reject")
    queue = A.label_queue(view, 4, labeled=[labeled])
    assert [q["path"] for q in queue] == [q["path"] for q in full[2:6]]
    view.decide(queue[0]["path"], "rescore", 7.0, source="label_next")
    last = csv_rows(tmp_path / "c.csv")[-1]
    assert (last["path"], last["decision"], last["score"], last["source"]) == (queue[0]["path"], "rescore", "7.0",
                                                                               "label_next")
    for bad in (0, "x"):
        with pytest.raises(A.AppError):
            A.label_queue(view, bad)
    assert [A.parse_score(t) for t in ("6", " 6.5 ", "6,5", 0, "10")] == [6.0, 6.5, 6.5, 0.0, 10.0]
    for bad in ("", None, "  ", "abc", "11", "-1", "nan"):
        with pytest.raises(A.AppError):
            A.parse_score(bad)  # an empty box is never a score of 0
