"""ssl/export.py: scoring an unlabeled pool into resumable parquet shards, and the top N.

Most exports run in-process (aessl.export.main) to keep the file fast; the kill/resume
and the two-process export run as real subprocesses."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import make_pool, random_model, run_script, toy_image, two_process_launcher

from aessl import export as ex
from aessl import faults
from aessl.locks import FolderLock

THRESHOLDS = [0.3, 0.25, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.25, 0.3]
GOOD = 18  # readable images in the pool
BAD = {  # unreadable files mixed in, and a word their reason must contain
    "broken/truncated.jpg": "truncated",
    "broken/zero.png": "empty",
    "notes.png": "not an image",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    pool = make_pool(root / "pool", n=GOOD, size=24)
    jpg = (pool / "part0" / "u0000.jpg").read_bytes()
    (pool / "broken").mkdir()
    (pool / "broken" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (pool / "broken" / "zero.png").write_bytes(b"")
    (pool / "notes.png").write_text("this is a text file renamed .png\n")
    run = random_model(root / "run" / "model", 0, THRESHOLDS)  # a run folder: --model accepts either
    other = random_model(root / "other" / "model", 1, [])  # no thresholds: the default is used
    ref = root / "ref"
    assert ex.main(["--model", str(run), "--images", str(pool), "--out", str(ref), "--shard-size", "5",
                    "--workers", "2", "--batch-size", "4"]) == 0
    return {"root": root, "pool": pool, "run": run, "other": other, "ref": ref}


def export(setup, out, *extra) -> int:
    return ex.main(["--model", str(setup["run"]), "--images", str(setup["pool"]), "--out", str(out),
                    "--shard-size", "5", "--workers", "0", "--batch-size", "4", *map(str, extra)])


def rows_of(out: Path) -> dict[int, dict]:
    """All written rows keyed by source row; fails on a duplicate."""
    rows = {}
    for f in sorted(out.glob("part-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            assert r["row"] not in rows, f"row {r['row']} written twice"
            rows[r["row"]] = r
    return rows


def same_rows(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k]["path"] == b[k]["path"]
        pa_ = np.array([a[k][c] for c in ex.PROB_COLUMNS])
        pb_ = np.array([b[k][c] for c in ex.PROB_COLUMNS])
        np.testing.assert_allclose(pa_, pb_, atol=1e-5)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def listing(out: Path) -> list[tuple[str, int]]:
    """Names and mtimes in OUT, but the lock file (each run takes the lock, rewriting it)."""
    return sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir() if p.name != ".lock")


def test_rows_errors_schema_and_load_dataset(setup, tmp_path):
    ref = setup["ref"]
    rows = rows_of(ref)
    assert len(rows) == GOOD
    assert len({r["path"] for r in rows.values()}) == GOOD
    errors = [json.loads(l) for l in (ref / "errors.jsonl").read_text().splitlines()]
    by_name = {str(Path(e["path"]).relative_to(setup["pool"])): e["reason"] for e in errors}
    assert set(by_name) == set(BAD)
    for name, word in BAD.items():
        assert word in by_name[name].lower(), (name, by_name[name])
    assert not set(e["row"] for e in errors) & set(rows)

    probs = np.array([[r[c] for c in ex.PROB_COLUMNS] for r in rows.values()])
    exp = np.array([r["expected_score"] for r in rows.values()])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(exp, probs @ np.arange(11), atol=1e-4)
    np.testing.assert_allclose([r["score_percent"] for r in rows.values()], exp * 10, atol=1e-3)
    assert [r["bracket"] for r in rows.values()] == probs.argmax(1).tolist()
    np.testing.assert_allclose([r["confidence"] for r in rows.values()], probs.max(1), atol=1e-6)
    assert [r["accepted"] for r in rows.values()] == [
        bool(r["confidence"] >= THRESHOLDS[r["bracket"]]) for r in rows.values()]
    assert len({r["bracket"] for r in rows.values()}) > 1  # the scaled random head spreads them

    schema = pq.read_schema(ref / "part-00000.parquet")
    assert schema.names == ["path", "row", "expected_score", "score_percent", "bracket", "confidence",
                            *ex.PROB_COLUMNS, "accepted"]
    meta = json.loads(schema.metadata[ex.META_KEY])
    assert meta["architecture"] == "test_resnet"
    assert meta["model_folder"] == str((setup["run"] / "model").resolve())
    assert meta["thresholds"] == THRESHOLDS and meta["thresholds_source"] == "model"
    assert (meta["row_start"], meta["row_end"]) == (0, 5)

    m = manifest(ref)
    assert m["complete"] and m["rows_written"] == GOOD and m["unreadable"] == len(BAD)
    assert m["source_rows"] == GOOD + len(BAD) and len(m["shards"]) == 5
    assert m["model"]["architecture"] == "test_resnet" and m["model"]["thresholds"] == THRESHOLDS
    assert not list(ref.glob("*.tmp"))

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(ref / m["data_files"]), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == GOOD and ds.column_names == schema.names
    assert ds.features["accepted"].dtype == "bool" and ds.features["prob_10"].dtype == "float32"


def test_resume_after_lost_manifest_shard_and_stale_tmp(setup, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(setup["ref"], out)
    (out / "manifest.json").unlink()
    (out / "part-00001.parquet").unlink()
    (out / "part-00003.parquet").unlink()
    (out / "part-00002.parquet.tmp").write_bytes(b"half a shard")  # a write killed mid-way
    assert export(setup, out) == 0
    same_rows(rows_of(out), rows_of(setup["ref"]))
    assert not list(out.glob("*.tmp"))
    m = manifest(out)
    assert m["complete"] and m["this_run"]["shards"] == 2 and m["this_run"]["resumed_shards"] == 3
    assert m["unreadable"] == len(BAD)
    assert "3 of 5 shard(s) already done" in capsys.readouterr().out


class Killed(BaseException):
    pass


def test_killed_export_resumes_to_the_same_rows(setup, tmp_path, monkeypatch):
    """The kill hook (AESSL_EXPORT_KILL_AFTER_SHARDS) fires in-process: os._exit is swapped
    for an exception so the test needs no second interpreter."""
    out = tmp_path / "out"

    def fake_exit(code):
        raise Killed(code)

    monkeypatch.setenv(faults.KILL_AFTER_EXPORT_SHARDS, "2")
    monkeypatch.setattr(ex.os, "_exit", fake_exit)
    with pytest.raises(Killed):
        export(setup, out)
    monkeypatch.delenv(faults.KILL_AFTER_EXPORT_SHARDS)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert manifest(out)["complete"] is False and not (out / "errors.jsonl").exists()
    (out / "part-00002.parquet.tmp").write_bytes(b"PAR1 half")  # what a kill during a write leaves
    assert export(setup, out) == 0
    same_rows(rows_of(out), rows_of(setup["ref"]))
    m = manifest(out)
    assert m["this_run"]["shards"] == 3 and m["this_run"]["resumed_shards"] == 2 and m["unreadable"] == len(BAD)
    assert not list(out.glob("*.tmp"))


def test_other_settings_or_model_refused_unless_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(setup["ref"], out)
    before = listing(out)
    assert export(setup, out, "--shard-size", "7") == 2
    err = capsys.readouterr().err
    assert "shard_size" in err and "--overwrite" in err and str(out) in err
    assert ex.main(["--model", str(setup["other"]), "--images", str(setup["pool"]), "--out", str(out),
                    "--shard-size", "5", "--workers", "0"]) == 2
    assert "model_sha256" in capsys.readouterr().err
    (out / "manifest.json").unlink()  # the shards alone still tell
    assert export(setup, out, "--shard-size", "7") == 2
    assert "different export" in capsys.readouterr().err
    assert listing(out) == [b for b in before if b[0] != "manifest.json"]

    assert ex.main(["--model", str(setup["other"]), "--images", str(setup["pool"]), "--out", str(out),
                    "--shard-size", "7", "--workers", "0", "--overwrite"]) == 0
    m = manifest(out)
    assert m["shard_size"] == 7 and len(m["shards"]) == 3 and len(rows_of(out)) == GOOD
    assert m["model"]["thresholds_source"] == "default" and m["model"]["thresholds"] == [ex.DEFAULT_THRESHOLD] * 11


def test_bad_inputs_exit_2_and_write_nothing(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert ex.main(["--model", str(tmp_path / "nope"), "--images", str(setup["pool"]), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    broken = tmp_path / "broken_model"
    shutil.copytree(setup["run"] / "model", broken)
    (broken / "config.json").write_text("{not json")
    assert ex.main(["--model", str(broken), "--images", str(setup["pool"]), "--out", str(out)]) == 2
    assert str(broken) in capsys.readouterr().err
    assert ex.main(["--model", str(setup["run"]), "--images", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert ex.main(["--model", str(setup["run"]), "--images", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no images" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        ex.main(["--model", "m", "--images", "i", "--out", "o", "--top-copy", "link"])
    assert exc.value.code == 2


def test_files_not_written_by_export_are_refused_unless_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(setup["ref"], out)
    (out / "part-00003.parquet").write_bytes(b"PAR1 someone else's")  # over one of ours: still not ours
    (out / "part-00042.parquet").write_bytes(b"a file the user keeps here")
    before = listing(out)
    assert export(setup, out) == 2
    err = capsys.readouterr().err
    assert "part-00003.parquet" in err and "part-00042.parquet" in err and "--overwrite" in err and str(out) in err
    assert listing(out) == before  # nothing deleted, nothing written

    mine = tmp_path / "mine"  # a folder holding no export: a top/ there is the user's
    (mine / "top").mkdir(parents=True)
    (mine / "top" / "keep.png").write_bytes(b"mine")
    assert export(setup, mine, "--top", "2", "--top-copy", "copy") == 2
    assert "top: would be replaced" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "top"] and (mine / "top" / "keep.png").exists()

    assert export(setup, out, "--overwrite") == 0
    assert not (out / "part-00042.parquet").exists()
    same_rows(rows_of(out), rows_of(setup["ref"]))


def test_top_copy_shortens_names_past_the_file_system_limit(setup, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    # 252 bytes, legal; "0001_" + it is not. Same first 248 bytes, so the shortened stems
    # collide and only the rank keeps the names apart; the cut falls inside an "é".
    names = ["x" + "é" * 123 + "y.png", "x" + "é" * 123 + "z.png", "short.png"]
    assert [len(os.fsencode(n)) for n in names[:2]] == [252, 252]
    rng = np.random.default_rng(4)
    for b, name in zip((9, 5, 1), names):
        toy_image(b, rng, 24).save(pool / name)
    out = tmp_path / "out"
    for mode in ("link", "copy"):  # the second run only redoes the top N of the finished export
        assert ex.main(["--model", str(setup["run"]), "--images", str(pool), "--out", str(out), "--workers", "0",
                        "--top", "3", "--top-copy", mode]) == 0
        with open(out / "top.csv") as f:
            ranked = [row["path"] for row in csv.DictReader(f)]
        files = sorted((out / "top").iterdir())
        assert len(files) == 3 and [f.name[:5] for f in files] == ["0001_", "0002_", "0003_"]
        for f, src in zip(files, ranked):
            assert len(os.fsencode(f.name)) <= 255 and f.suffix == ".png"
            f.name.encode("utf-8")  # whole characters only: no broken UTF-8 sequence
            assert Path(src).name.startswith(f.name[5:-4])
            assert f.is_symlink() == (mode == "link") and f.read_bytes() == Path(src).read_bytes()


def test_second_export_into_a_locked_out_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "out"
    live = FolderLock(out, "export folder").acquire()  # what a live export in another process holds
    try:
        assert export(setup, out) == 2
    finally:
        live.release()
    err = capsys.readouterr().err
    assert str(out) in err and "in use" in err and f"pid {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert export(setup, out) == 0  # free again: it runs, and lets go of the lock when done
    FolderLock(out).acquire().release()


def _bad_case(name: str, setup, tmp: Path) -> tuple[list[str], str]:
    """(arguments after --out, words the error must hold) for one bad input."""
    run, pool = str(setup["run"]), str(setup["pool"])
    if name == "pool_all_unreadable":
        (tmp / "bad").mkdir()
        (tmp / "bad" / "zero.png").write_bytes(b"")
        (tmp / "bad" / "text.jpg").write_text("not an image")
        return ["--model", run, "--images", str(tmp / "bad")], "none of the 2 image(s)"
    if name == "manifest_paths_are_numbers":
        (tmp / "pool.csv").write_text("path\n1\n2\n")
        return ["--model", run, "--images", str(tmp / "pool.csv")], "pool.csv"
    if name == "manifest_header_only":
        (tmp / "pool.csv").write_text("path\n")
        return ["--model", run, "--images", str(tmp / "pool.csv")], "pool.csv"
    if name == "weights_zero_bytes":
        shutil.copytree(setup["run"] / "model", tmp / "model")
        (tmp / "model" / "model.safetensors").write_bytes(b"")
        return ["--model", str(tmp / "model"), "--images", pool], str(tmp / "model")
    if name == "device_typo":
        return ["--model", run, "--images", pool, "--device", "cdua"], "'cdua'"
    if name == "device_cuda_without_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        return ["--model", run, "--images", pool, "--device", "cuda"], "CUDA is not available"
    if name == "out_is_a_file":
        return ["--model", run, "--images", pool], "not a folder"
    raise ValueError(name)


@pytest.mark.parametrize("case", ["pool_all_unreadable", "manifest_paths_are_numbers", "manifest_header_only",
                                  "weights_zero_bytes", "device_typo", "device_cuda_without_cuda", "out_is_a_file"])
def test_bad_input_is_a_clear_exit_2(case, setup, tmp_path, capsys):
    args, words = _bad_case(case, setup, tmp_path)
    out = tmp_path / "out"
    if case == "out_is_a_file":
        out.write_text("a file")
    assert ex.main([*args, "--out", str(out), "--workers", "0"]) == 2  # not a traceback
    err = capsys.readouterr().err
    assert "error: " in err and words in err and "Traceback" not in err, err
    if case == "pool_all_unreadable":  # scored to the end: a finished, consistent export of nothing
        assert manifest(out)["complete"] and manifest(out)["unreadable"] == 2 and not rows_of(out)
        assert len((out / "errors.jsonl").read_text().splitlines()) == 2
    elif case == "out_is_a_file":
        assert out.read_text() == "a file"
    else:
        assert not out.exists()


def test_top_n_ordering_files_and_grid(setup, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(setup["ref"], out)  # finished: only the top N is added, nothing is scored again
    assert export(setup, out, "--top", "5", "--top-copy", "copy") == 0
    assert manifest(out)["this_run"]["images"] == 0
    ranked = sorted(rows_of(setup["ref"]).values(), key=lambda r: (-r["expected_score"], r["path"]))[:5]
    with open(out / "top.csv") as f:
        top = list(csv.DictReader(f))
    assert [t["rank"] for t in top] == ["1", "2", "3", "4", "5"]
    assert [t["path"] for t in top] == [r["path"] for r in ranked]
    scores = [float(t["score_percent"]) for t in top]
    assert scores == sorted(scores, reverse=True)
    assert list(top[0]) == ["rank", "path", "score_percent", "bracket", "confidence"]
    files = sorted(p.name for p in (out / "top").iterdir())
    assert files == [f"{i:04d}_{Path(r['path']).name}" for i, r in enumerate(ranked, 1)]
    assert (out / "top" / files[0]).read_bytes() == Path(ranked[0]["path"]).read_bytes()
    with Image.open(out / "top_grid.jpg") as grid:
        assert grid.size == (3 * ex.GRID_CELL, 2 * ex.GRID_CELL)
    assert manifest(out)["top"]["rows"] == 5

    assert export(setup, out, "--top", "3") == 0  # a new --top replaces the old one
    assert len((out / "top.csv").read_text().splitlines()) == 4 and not (out / "top").exists()


def test_score_band_keeps_only_rows_inside(setup, tmp_path):
    ref = rows_of(setup["ref"])
    pct = np.unique([r["score_percent"] for r in ref.values()])
    lo, hi = (pct[3] + pct[4]) / 2, (pct[-4] + pct[-5]) / 2  # midpoints: no row sits on an edge
    out = tmp_path / "out"
    assert export(setup, out, "--min-score", f"{lo:.6f}", "--max-score", f"{hi:.6f}") == 0
    got = rows_of(out)
    assert sorted(got) == sorted(k for k, r in ref.items() if lo <= r["score_percent"] <= hi)
    assert 0 < len(got) < GOOD
    m = manifest(out)
    assert m["score_band_percent"] == [float(f"{lo:.6f}"), float(f"{hi:.6f}")]
    assert m["rows_scored"] == GOOD and m["rows_written"] == len(got) and m["unreadable"] == len(BAD)


def test_streaming_source_gives_the_same_rows(setup, tmp_path):
    out = tmp_path / "out"
    assert export(setup, out, "--streaming", "--workers", "2") == 0
    same_rows(rows_of(out), rows_of(setup["ref"]))
    assert manifest(out)["source"]["streaming"] is True


def test_saved_dataset_exports(setup, tmp_path):
    import datasets

    rng = np.random.default_rng(3)
    images = [toy_image(b, rng, 24) for b in (0, 4, 7, 10)]
    images.insert(2, {"bytes": b"garbage, not an image", "path": None})
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    assert ex.main(["--model", str(setup["run"]), "--images", str(tmp_path / "saved"), "--out", str(out),
                    "--workers", "0", "--top", "2", "--top-copy", "link"]) == 0
    rows = rows_of(out)
    assert sorted(rows) == [0, 1, 3, 4] and [rows[k]["path"] for k in sorted(rows)] == ["0", "1", "3", "4"]
    errors = [json.loads(l) for l in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["path"]) for e in errors] == [(2, "2")] and "not an image" in errors[0]["reason"]
    files = sorted((out / "top").iterdir())  # dataset bytes are written out, whatever the mode
    assert len(files) == 2 and all(f.suffix == ".png" and not f.is_symlink() for f in files)
    assert manifest(out)["source"]["kind"] == "dataset"


def test_two_cpu_processes_no_duplicates_no_gaps(setup, tmp_path):
    out = tmp_path / "out"
    proc = run_script("export.py", "--model", setup["run"], "--images", setup["pool"], "--out", out,
                      "--shard-size", "3", "--workers", "0", "--batch-size", "4", "--top", "4",
                      env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, launcher=two_process_launcher())
    assert "2 process(es)" in proc.stdout
    same_rows(rows_of(out), rows_of(setup["ref"]))  # rows_of fails on a duplicate; same_rows on a gap
    m = manifest(out)
    assert m["num_processes"] == 2 and {s["rank"] for s in m["shards"]} == {0, 1}
    assert [s["rows"] for s in m["shards"]] == [[k, min(k + 3, GOOD + len(BAD))] for k in range(0, GOOD + len(BAD), 3)]
    assert m["unreadable"] == len(BAD) and len((out / "top.csv").read_text().splitlines()) == 5
