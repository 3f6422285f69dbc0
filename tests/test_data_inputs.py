"""Reading scored sets and pools: one rounding rule, symlinks, bad manifests, huge manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aessl import data as data_mod
from aessl.data import DataSourceError, LabeledSetError, load_pool, load_scored_set, scan_labeled_folder
from aessl.metrics import bracket_of
from aessl.sources import _has_images
from conftest import make_pool, make_scored_set, toy_image


def _pool_paths(pool) -> list[str]:
    return [row["path"] for row in pool]


# --------------------------------------------------------------------------- one rounding rule


def test_halves_round_up_everywhere(tmp_path):
    scores = [0.5, 1.5, 2.5, 6.5, 7.5, 9.5, 10.5, -0.5, 6.49, 0.49999999999999994]
    assert bracket_of(scores).tolist() == [1, 2, 3, 7, 8, 10, 10, 0, 6, 0]
    from aessl import synth

    assert synth.bracket_of is bracket_of  # the synthetic generator uses the same rule
    make_scored_set(tmp_path / "imgs", per_bracket=1, brackets=[6, 7])
    rows = [{"path": "imgs/06/img_6_0.png", "score": 6.5}, {"path": "imgs/07/img_7_0.png", "score": 7.5}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_scored_set(tmp_path / "m.jsonl")["bracket"] == [7, 8]


# --------------------------------------------------------------------------- symlinks


def test_self_link_counts_each_image_once(tmp_path):
    root = make_scored_set(tmp_path / "labeled", per_bracket=2, brackets=[3, 7])
    os.symlink(".", root / "07" / "self")
    os.symlink("../07", root / "07" / "again")
    ds = load_scored_set(root)
    assert sorted(zip(ds["bracket"], ds["path"])) == [(b, str(root / f"0{b}" / f"img_{b}_{i}.png"))
                                                      for b in (3, 7) for i in (0, 1)]
    # a link from one bracket up to the whole set puts bracket 7's images in bracket 3 too:
    # listed, not counted twice
    os.symlink("..", root / "03" / "up")
    records, problems = scan_labeled_folder(root)
    assert len(records) == 4 and len(problems) == 2
    assert all("same file as" in p and "(bracket 3 there, 7 here)" in p for p in problems)


def test_two_looping_links_end_and_count_once(tmp_path):
    pool = tmp_path / "pool"
    for name in ("a", "b"):
        (pool / name).mkdir(parents=True)
        toy_image(1, np.random.default_rng(0)).save(pool / name / f"{name}.png")
    os.symlink("../b", pool / "a" / "to_b")
    os.symlink("../a", pool / "b" / "to_a")
    assert sorted(_pool_paths(load_pool(str(pool)))) == [str(pool / "a" / "a.png"), str(pool / "b" / "b.png")]


def test_links_outside_the_tree_are_followed_once(tmp_path):
    """A pool folder linking to storage elsewhere, twice, and a loop inside that storage."""
    store = make_pool(tmp_path / "store", n=3)
    os.symlink("..", store / "part0" / "back")
    pool = tmp_path / "pool"
    pool.mkdir()
    os.symlink(store, pool / "first")
    os.symlink(store, pool / "second")
    (pool / "cas").mkdir()
    (pool / "cas" / "ab12").write_bytes((store / "part0" / "u0000.jpg").read_bytes())
    os.symlink("../cas/ab12", pool / "named.jpg")  # an image only under its linked name
    got = _pool_paths(load_pool(str(pool)))
    assert sorted(Path(p).name for p in got) == ["named.jpg", "u0000.jpg", "u0001.jpg", "u0002.jpg"]
    assert all("/second/" not in p and "/back/" not in p for p in got)


def test_symlinked_bracket_folders(tmp_path):
    elsewhere = make_scored_set(tmp_path / "elsewhere", per_bracket=2, brackets=[7, 2])
    root = tmp_path / "labeled"
    root.mkdir()
    os.symlink(elsewhere / "07", root / "07")
    os.symlink(elsewhere / "02", root / "2_sketches")
    assert _has_images(root)  # every bracket folder is a link: not "empty"
    ds = load_scored_set(root)
    assert sorted(zip(ds["bracket"], ds["path"])) == [
        (2, str(root / "2_sketches" / "img_2_0.png")), (2, str(root / "2_sketches" / "img_2_1.png")),
        (7, str(root / "07" / "img_7_0.png")), (7, str(root / "07" / "img_7_1.png"))]


def test_one_file_in_two_brackets_is_a_problem_in_one_bracket_once(tmp_path):
    root = make_scored_set(tmp_path / "labeled", per_bracket=1, brackets=[5, 8])
    os.symlink("../05/img_5_0.png", root / "08" / "again.png")
    os.symlink("img_5_0.png", root / "05" / "same.png")
    os.symlink("/nowhere/gone.png", root / "05" / "broken.png")
    with pytest.raises(LabeledSetError) as exc:
        load_scored_set(root)
    assert len(exc.value.problems) == 2, exc.value.problems
    conflict, broken = sorted(exc.value.problems, key=lambda p: "broken" in p)
    assert "08/again.png: same file as" in conflict and "bracket 5 there, 8 here" in conflict
    assert "broken.png: file not found" in broken


def test_a_checkout_under_a_hidden_folder_is_not_empty(tmp_path):
    root = make_scored_set(tmp_path / ".src" / "project" / "labeled", per_bracket=1, brackets=[4])
    hidden = root / "04" / ".thumbs"
    hidden.mkdir()
    toy_image(4, np.random.default_rng(0)).save(hidden / "thumb.png")  # hidden below the root: skipped
    assert _has_images(root)
    assert load_scored_set(root)["path"] == [str(root / "04" / "img_4_0.png")]
    assert not _has_images(tmp_path / ".src" / "project" / "unlabeled")


# --------------------------------------------------------------------------- manifests


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_manifest_rows_that_are_wrong_are_listed_by_row(tmp_path):
    make_scored_set(tmp_path / "imgs", per_bracket=1, brackets=[2])
    ok = "imgs/02/img_2_0.png"
    m = _write_jsonl(tmp_path / "m.jsonl", [
        {"path": ok, "score": 2}, {"path": 123, "score": 3}, {"path": ok, "score": True},
        {"path": ok, "score": ""}, {"path": ok, "score": "NaN"}, {"path": ok, "score": None},
        {"path": ok, "score": [2]}, {"path": "", "score": 2}])
    with pytest.raises(LabeledSetError) as exc:
        load_scored_set(m)
    text = str(exc.value)
    assert "7 problem(s)" in text
    for needle in ("row 2: path 123 is not a string", f"row 3 ({ok}): score True is not a number",
                   f"row 4 ({ok}): no score", f"row 5 ({ok}): no score", f"row 6 ({ok}): no score",
                   f"row 7 ({ok}): score [2] is not a number", "row 8: empty path"):
        assert needle in text, needle


def test_all_number_paths_and_boolean_scores(tmp_path):
    """A column of one wrong type loads as that type (int paths, bool scores): still listed."""
    m = _write_jsonl(tmp_path / "m.jsonl", [{"path": 1, "score": 3}, {"path": 2, "score": 4}])
    with pytest.raises(LabeledSetError, match=r"row 1: path 1 is not a string[\s\S]*row 2: path 2 is not"):
        load_scored_set(m)
    make_scored_set(tmp_path / "imgs", per_bracket=1, brackets=[1])
    (tmp_path / "b.csv").write_text("path,score\nimgs/01/img_1_0.png,true\nimgs/01/img_1_0.png,\n")
    with pytest.raises(LabeledSetError) as exc:
        load_scored_set(tmp_path / "b.csv")
    assert "row 1 (imgs/01/img_1_0.png): score True is not a number" in str(exc.value)
    assert "row 2 (imgs/01/img_1_0.png): no score" in str(exc.value)


def test_manifests_without_rows_are_a_clear_error(tmp_path):
    (tmp_path / "h.csv").write_text("path,score\n")
    (tmp_path / "e.jsonl").write_text("\n")
    (tmp_path / "p.csv").write_text("path\n\n")
    for bad in ("h.csv", "e.jsonl"):
        with pytest.raises(DataSourceError, match="no rows"):
            load_scored_set(tmp_path / bad)
    for bad in ("p.csv", "e.jsonl"):
        for streaming in (False, True):
            with pytest.raises(DataSourceError, match="no rows"):
                load_pool(str(tmp_path / bad), streaming=streaming)


def test_unparsable_manifest_names_the_cause(tmp_path):
    _write_jsonl(tmp_path / "m.jsonl", [{"path": "a.png", "score": 1}, "", "not json"])
    with pytest.raises(DataSourceError, match=r"m\.jsonl: cannot read manifest: line 3 is not JSON"):
        load_scored_set(tmp_path / "m.jsonl")
    (tmp_path / "m.csv").write_text('path,score\n"a.png,1\n')
    with pytest.raises(DataSourceError, match=r"m\.csv: cannot read manifest: .*EOF"):
        load_scored_set(tmp_path / "m.csv")


def test_pool_manifest_rows_without_a_path_are_named(tmp_path):
    _write_jsonl(tmp_path / "mixed.jsonl", [{"path": "a.png"}, {"path": 7}, {"path": None}])
    with pytest.raises(DataSourceError, match=r"row 2: path 7 is not a string .*; row 3: empty path"):
        load_pool(str(tmp_path / "mixed.jsonl"))
    (tmp_path / "gaps.csv").write_text("path,x\na.png,1\n,2\nb.png,3\n,4\n")
    with pytest.raises(DataSourceError, match=r"row 2: empty path; row 4: empty path"):
        load_pool(str(tmp_path / "gaps.csv"))
    with pytest.raises(DataSourceError, match="row 1: path 1 is not a string"):
        load_pool(str(_write_jsonl(tmp_path / "n.jsonl", [{"path": 1}])), streaming=True)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_pool_manifest_paths_in_arrow_both_modes(tmp_path, monkeypatch, suffix):
    import datasets
    import pandas as pd

    pool = make_pool(tmp_path / "data" / "pool", n=4)
    files = sorted(pool.rglob("*.jpg"))
    rel = [str(f.relative_to(tmp_path / "data")) for f in files]
    listed = [rel[0], "./" + rel[1], str(files[2]), "pool//" + rel[3][len("pool/"):]]
    manifest = tmp_path / "data" / f"m{suffix}"
    df = pd.DataFrame({"path": listed, "extra": range(4)})
    {".csv": lambda: df.to_csv(manifest, index=False),
     ".jsonl": lambda: df.to_json(manifest, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(manifest)}[suffix]()

    def no_python_rows(*a, **k):
        raise AssertionError("a pool manifest must not become Python rows")

    monkeypatch.setattr(datasets.Dataset, "from_dict", no_python_rows)
    monkeypatch.setattr(data_mod, "read_manifest", no_python_rows)
    want = [str(f) for f in files]
    monkeypatch.chdir(tmp_path / "data")  # a relative manifest path still gives absolute image paths
    table = load_pool(f"m{suffix}")
    assert isinstance(table, datasets.Dataset) and table.column_names == ["path"]
    assert table["path"] == want
    stream = load_pool(str(manifest), streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert _pool_paths(stream) == want
    assert _pool_paths(load_pool(str(manifest), streaming=True, limit=2)) == want[:2]
    assert load_pool(str(manifest), limit=3)["path"] == want[:3]


# --------------------------------------------------------------------------- bad images in a scored set


def test_every_unreadable_image_in_a_scored_set_is_listed(tmp_path):
    root = tmp_path / "labeled"
    (root / "03").mkdir(parents=True)
    (root / "09_best").mkdir()
    good = tmp_path / "good.png"
    toy_image(3, np.random.default_rng(0), size=64).save(good)
    (root / "03" / "zero.png").write_bytes(b"")
    (root / "03" / "text.jpg").write_text("not an image")
    (root / "09_best" / "cut.png").write_bytes(good.read_bytes()[:100])
    (root / "09_best" / "folder.webp").mkdir()  # a folder named like an image: walked, no images
    os.mkfifo(root / "09_best" / "pipe.png")  # would block a reader forever
    with pytest.raises(LabeledSetError) as exc:
        load_scored_set(root)
    assert len(exc.value.problems) == 4, exc.value.problems
    for name, why in (("zero.png", "empty"), ("text.jpg", "not an image"), ("cut.png", "truncated"),
                      ("pipe.png", "not a regular file")):
        assert any(name in p and why in p for p in exc.value.problems), (name, exc.value.problems)


def test_odd_but_valid_images_make_a_valid_scored_set(tmp_path):
    rng = np.random.default_rng(0)
    rgb = toy_image(5, rng, size=32)
    d = tmp_path / "labeled" / "05"
    d.mkdir(parents=True)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 0))
    rgba.convert("P").save(d / "p_alpha.png")
    rgb.convert("LA").save(d / "la.png")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    rgb.convert("1").save(d / "bits.png")
    rgb.convert("1").save(d / "bits.bmp")
    frames = [rgb, toy_image(6, rng, size=32)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(d / "anim.webp", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 8
    rgb.save(d / "rot.jpg", exif=exif)
    ds = load_scored_set(tmp_path / "labeled")
    assert len(ds) == 8 and set(ds["bracket"]) == {5}


def test_an_unset_labeled_set_never_meets_the_users_pool_or_test_set(tmp_path, monkeypatch):
    """data.labeled empty (e.g. data.labeled=$UNSET) with no labeled/ images falls back to the synthetic
    demo set only when nothing else of the user's is given: with their pool or test set it is an error
    naming the keys, raised before any demo image is generated."""
    from aessl import sources

    monkeypatch.setattr(sources, "REPO_ROOT", tmp_path)
    cfg = {"labeled": None, "unlabeled": str(tmp_path / "my_pool"), "test": None,
           "synthetic": {"cache_dir": "cache", "labeled": 11, "unlabeled": 0, "test": 11, "size": 8, "seed": 0}}
    for given in ({"unlabeled": str(tmp_path / "my_pool")}, {"unlabeled": None, "test": str(tmp_path / "t")}):
        with pytest.raises(DataSourceError, match=r"data\.labeled is not set.*data\.(unlabeled|test)="):
            sources.resolve_sources({**cfg, **given})
    assert not (tmp_path / "cache").exists()
    make_scored_set(tmp_path / "labeled", per_bracket=1, brackets=[3])  # the user's labeled/: theirs, with their pool
    assert sources.resolve_sources(cfg)["origin"] == "labeled/"


def test_a_long_problem_list_is_cut_on_screen_and_kept_whole_in_a_file():
    problems = [f"labeled/05/img_{i}.png: empty file" for i in range(250)]
    text = str(LabeledSetError("labeled", problems))
    assert text.count("\n  - ") == 200 and "... and 50 more: all 250 are in " in text
    path = Path(text.rsplit(" are in ", 1)[1])
    assert path.read_text().splitlines() == problems
    path.unlink()
