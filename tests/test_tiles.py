"""aessl/tiles.py and --tiles in export and report: boxes, views, reduces, and tiled exports
that keep the rows, match a direct computation, resume, refuse other tile settings and run
with workers (and through the ONNX backend)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import make_scored_set, report_main, script_in_process, toy_image
from conftest import random_model as conftest_random_model

from aessl import export as ex
from aessl.data import load_scored_set
from aessl.images import load_image
from aessl.models import load_model_folder
from aessl.report import predict_probs, predict_tile_probs
from aessl.targets import target_of
from aessl.tiles import TILE_REDUCES, TileSettings, check_tiles, reduce_tiles, tile_boxes, tile_views
from aessl.transforms import eval_transform

SIZE = 32  # the model's image size: tiles are cut from a 64 px (shorter side) resize
SHAPES = [(64, 48), (40, 90)]  # width x height of the pool's images: wider and taller than square
GOOD = 10


def random_model(folder: Path, seed: int) -> Path:
    """conftest's untrained model at this file's size; the model folder itself."""
    conftest_random_model(folder, seed, size=SIZE)
    return folder


def covered(w: int, h: int, boxes) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    for left, top, right, bottom in boxes:
        mask[top:bottom, left:right] = True
    return mask


# --------------------------------------------------------------------------- the library


def test_check_tiles_takes_one_five_and_squares_only():
    for n in (1, 4, 5, 9, 16, 25):
        check_tiles(n)
    for n in (0, 2, 3, 6, 8, 10, -4, 1.5, True):
        with pytest.raises(ValueError, match="tiles must be"):
            check_tiles(n)


@pytest.mark.parametrize("w,h", [(64, 64), (85, 64), (64, 144), (96, 70)])
def test_boxes_have_the_crop_size_and_cover_the_image(w, h):
    crop = 32
    for n in (5, 4, 9):
        boxes = tile_boxes(w, h, n, crop)
        assert len(boxes) == n
        for left, top, right, bottom in boxes:
            assert right - left == crop and bottom - top == crop
            assert 0 <= left and 0 <= top and right <= w and bottom <= h
        k = 2 if n == 5 else int(round(n ** 0.5))  # five crops: the corners alone cover up to 2 x the crop
        assert covered(w, h, boxes).all() == (max(w, h) <= k * crop), (w, h, n)
        # first box at the origin, last grid / corner box flush with the far edges
        assert boxes[0][:2] == (0, 0)
        assert boxes[n - 2 if n == 5 else -1][2:] == (w, h)
    # FiveCrop's order and centre
    tl, tr, bl, br, c = tile_boxes(w, h, 5, crop)
    assert (tr[0], bl[1]) == (w - crop, h - crop)
    assert c[:2] == (int(round((w - crop) / 2)), int(round((h - crop) / 2)))
    # a k x k grid, evenly spaced, row by row
    xs = sorted({b[0] for b in tile_boxes(w, h, 9, crop)})
    ys = sorted({b[1] for b in tile_boxes(w, h, 9, crop)})
    assert len(xs) == len(ys) == 3 or w == crop or h == crop
    assert abs((xs[1] - xs[0]) - (xs[2] - xs[1])) <= 1
    assert tile_boxes(w, h, 9, crop)[1][1] == 0 and tile_boxes(w, h, 9, crop)[3][0] == 0


def test_a_very_long_image_is_spanned_and_a_big_crop_refused():
    boxes = tile_boxes(64, 300, 9, 32)  # 3 x 32 < 300: sampled along its length, first and last flush
    assert boxes[0][1] == 0 and boxes[-1][3] == 300 and not covered(64, 300, boxes).all()
    with pytest.raises(ValueError, match="does not fit"):
        tile_boxes(30, 60, 5, 32)


def test_views_are_fivecrop_of_the_resize_normalised_like_the_eval_view():
    info = {"image_size": SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"}
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (90, 40, 3), dtype=np.uint8))
    views = tile_views(img, info, 5)
    assert views.shape == (5, 3, SIZE, SIZE)
    resized = img.resize((64, 144), Image.Resampling.BICUBIC)  # shorter side 2 x 32, aspect kept
    finish = T.Compose([T.ToTensor(), T.Normalize(info["mean"], info["std"])])
    want = torch.stack([finish(c) for c in T.FiveCrop(SIZE)(resized)])
    torch.testing.assert_close(views, want, atol=1e-5, rtol=0)
    # one centre view at scale 1 is the eval view, pixel for pixel: the same normalisation
    torch.testing.assert_close(tile_views(img, info, 1, scale=1.0)[0], eval_transform(info)(img), atol=1e-6, rtol=0)
    # a small, grey image is upscaled and converted
    small = tile_views(Image.new("L", (20, 12), 128), info, 9, scale=1.5)
    assert small.shape == (9, 3, SIZE, SIZE) and torch.isfinite(small).all()
    assert not torch.equal(views[0], views[1])
    with pytest.raises(ValueError, match="scale"):
        tile_views(img, info, 5, scale=0)


def test_reduce_rows_sum_to_one_and_pick_the_right_tile():
    rng = np.random.default_rng(3)
    # image 0: tiles peaked at brackets 7, 2, 9, 4, 5 -> min tile 1, max tile 2, median tile 4 (score ~5)
    peaks = [[7, 2, 9, 4, 5], [0, 10, 3, 3, 8]]
    probs = np.full((2, 5, 11), 0.02, dtype=np.float32)
    for b, row in enumerate(peaks):
        for t, k in enumerate(row):
            probs[b, t, k] += 0.78
    probs += rng.uniform(0, 0.005, probs.shape).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    want = {"min": [1, 0], "max": [2, 1], "median": [4, 2]}  # image 1: scores ~0, 10, 3, 3, 8 -> a 3 (tile 2, stable)
    for how in TILE_REDUCES:
        for arr in (probs, torch.from_numpy(probs)):
            out = reduce_tiles(arr, how)
            assert type(out) is type(arr) and tuple(out.shape) == (2, 11)
            np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, atol=1e-5)
            if how == "mean":
                np.testing.assert_allclose(np.asarray(out), probs.mean(1), atol=1e-6)
            else:
                np.testing.assert_array_equal(np.asarray(out), probs[[0, 1], want[how]])
    # an even count takes the lower median: scores ~7, 2, 9, 4 -> 4 (tile 3)
    np.testing.assert_array_equal(reduce_tiles(probs[:1, :4], "median"), probs[:1, 3])
    with pytest.raises(ValueError, match="reduce"):
        reduce_tiles(probs, "sum")
    with pytest.raises(ValueError, match="tiles"):
        reduce_tiles(probs[0], "mean")


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(7)
    pool = root / "pool"
    pool.mkdir()
    for i in range(GOOD):
        img = toy_image(int(rng.integers(0, 11)), rng, 24).resize(SHAPES[i % 2], Image.Resampling.BILINEAR)
        img.save(pool / f"u{i:03d}.jpg" if i % 3 else pool / f"u{i:03d}.png", quality=90)
    (pool / "zz_broken.png").write_text("not an image\n")
    model = random_model(root / "run" / "model", 0)
    plain = root / "plain"
    assert ex.main(["--model", str(model), "--images", str(pool), "--out", str(plain), "--shard-size", "4",
                    "--workers", "0", "--batch-size", "3"]) == 0
    tiled = root / "tiled"
    assert export(model, pool, tiled, "--tiles", "5") == 0
    return {"root": root, "pool": pool, "model": model, "plain": plain, "tiled": tiled}


def export(model, pool, out, *extra) -> int:
    return ex.main(["--model", str(model), "--images", str(pool), "--out", str(out), "--shard-size", "4",
                    "--workers", "0", "--batch-size", "3", *map(str, extra)])


def rows_of(out: Path) -> dict[str, dict]:
    rows = {}
    for f in sorted(out.glob("part-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            assert r["path"] not in rows
            rows[r["path"]] = r
    return rows


def probs_of(rows: dict[str, dict]) -> np.ndarray:
    return np.array([[rows[p][c] for c in ex.PROB_COLUMNS] for p in sorted(rows)])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_tiled_export_keeps_the_rows_with_other_probabilities(setup):
    plain, tiled = rows_of(setup["plain"]), rows_of(setup["tiled"])
    assert len(plain) == GOOD and sorted(plain) == sorted(tiled)
    assert {p: r["row"] for p, r in plain.items()} == {p: r["row"] for p, r in tiled.items()}
    pt = probs_of(tiled)
    np.testing.assert_allclose(pt.sum(1), 1.0, atol=1e-5)
    assert np.abs(pt - probs_of(plain)).max() > 1e-3  # the tiles are other views
    assert pq.read_schema(next(setup["tiled"].glob("part-*.parquet"))).names == \
        pq.read_schema(next(setup["plain"].glob("part-*.parquet"))).names
    m, mp = manifest(setup["tiled"]), manifest(setup["plain"])
    assert m["complete"] and m["tiles"] == {"n": 5, "reduce": "mean", "scale": 2.0}
    assert m["spec"]["tiles"] == m["tiles"] and "tiles" not in mp["spec"] and mp["tiles"] == {"n": 1}
    assert m["fingerprint"] != mp["fingerprint"]
    assert m["unreadable"] == mp["unreadable"] == 1 and m["rows_scored"] == GOOD
    errors = [json.loads(l) for l in (setup["tiled"] / "errors.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).name for e in errors] == ["zz_broken.png"]


def test_tiled_rows_match_tile_views_model_and_reduce(setup):
    model, info = load_model_folder(setup["model"], device="cpu")
    model.eval()
    tiled = rows_of(setup["tiled"])
    for name in ("u000.png", "u001.jpg"):  # a 64x48 PNG and a 40x90 JPEG
        path = str(setup["pool"] / name)
        views = tile_views(load_image(path, draft_size=2 * SIZE), info, 5)
        with torch.no_grad():
            per_tile = target_of(info).probs(model(views)["logits"])
        want = reduce_tiles(per_tile[None], "mean")[0].numpy()
        got = np.array([tiled[path][c] for c in ex.PROB_COLUMNS])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_resume_and_refusal_of_other_tile_settings(setup, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert export(setup["model"], setup["pool"], out, "--tiles", "5", "--tile-reduce", "max") == 0
    full = rows_of(out)
    (out / "part-00001.parquet").unlink()  # as if killed before that shard
    assert export(setup["model"], setup["pool"], out, "--tiles", "5", "--tile-reduce", "max") == 0
    m = manifest(out)
    assert m["this_run"]["resumed_shards"] == 2 and m["this_run"]["shards"] == 1
    again = rows_of(out)
    assert sorted(again) == sorted(full)
    np.testing.assert_allclose(probs_of(again), probs_of(full), atol=1e-6)
    capsys.readouterr()
    for other in (["--tiles", "9", "--tile-reduce", "max"], ["--tiles", "5"], ["--tiles", "5", "--tile-reduce", "max",
                                                                                 "--tile-scale", "3"], []):
        before = sorted(p.name for p in out.iterdir())
        assert export(setup["model"], setup["pool"], out, *other) == 2, other
        err = capsys.readouterr().err
        assert "different tiles" in err and "--overwrite" in err, err
        assert sorted(p.name for p in out.iterdir()) == before
    assert manifest(out)["complete"] and rows_of(out).keys() == full.keys()


def test_workers_give_the_same_tiled_rows(setup, tmp_path):
    out = tmp_path / "workers"
    assert ex.main(["--model", str(setup["model"]), "--images", str(setup["pool"]), "--out", str(out),
                    "--shard-size", "4", "--workers", "2", "--batch-size", "3", "--tiles", "5"]) == 0
    a, b = rows_of(out), rows_of(setup["tiled"])
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose(probs_of(a), probs_of(b), atol=1e-6)
    assert manifest(out)["unreadable"] == 1


def test_onnx_backend_scores_the_same_tiles(setup, tmp_path):
    onnx_file = tmp_path / "model.onnx"
    assert script_in_process("export_onnx.py", "--model", setup["model"], "--out", onnx_file, "--images", setup["pool"],
                             "--check-images", "3") == 0
    out = tmp_path / "onnx"
    assert ex.main(["--onnx", str(onnx_file), "--images", str(setup["pool"]), "--out", str(out), "--shard-size", "4",
                    "--workers", "0", "--batch-size", "3", "--tiles", "5"]) == 0
    a, b = rows_of(out), rows_of(setup["tiled"])
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose(probs_of(a), probs_of(b), atol=1e-4)
    assert manifest(out)["tiles"]["n"] == 5


@pytest.mark.parametrize("bad,word", [(["--tiles", "3"], "--tiles"), (["--tiles", "0"], "--tiles"),
                                      (["--tiles", "5", "--tile-scale", "0"], "--tile-scale"),
                                      (["--tiles", "5", "--tile-scale", "nan"], "--tile-scale"),
                                      (["--tile-reduce", "max"], "need --tiles")])
def test_bad_tile_arguments_exit_2(setup, tmp_path, capsys, bad, word):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        export(setup["model"], setup["pool"], out, *bad)
    assert exc.value.code == 2
    assert word in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        report_main()([str(setup["model"]), "--data", str(out), *bad])
    assert exc.value.code == 2


# --------------------------------------------------------------------------- report


def test_report_with_tiles_records_the_setting(setup, tmp_path):
    scored = make_scored_set(tmp_path / "scored", per_bracket=2, size=48)
    out = tmp_path / "report"
    assert report_main()([str(setup["model"]), "--data", str(scored), "--pool", str(setup["pool"]), "--out", str(out),
                          "--workers", "0", "--tiles", "5", "--tile-reduce", "median"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    record = {"n": 5, "reduce": "median", "scale": 2.0}
    assert metrics["tiles"] == record
    (run,) = metrics["runs"].values()
    assert run["tiles"] == record and run["pool"]["images_scored"] == GOOD
    assert metrics["pool"]["skipped"] == 1
    html = (out / "report.html").read_text()
    assert "tiled inference" in html and "median" in html
    # the report's probabilities are predict_probs with these tiles, and those reduce predict_tile_probs
    model, info = load_model_folder(setup["model"], device="cpu")
    table = load_scored_set(str(scored))
    got, ok, _ = predict_probs(model, info, table, batch_size=7, tiles=TileSettings(5, "median"))
    per_tile, ok2, _ = predict_tile_probs(model, info, table, 5, batch_size=7)
    assert ok.all() and ok2.all() and per_tile.shape == (len(table), 5, 11)
    np.testing.assert_allclose(got, reduce_tiles(per_tile, "median"), atol=1e-7)
    preds = pq.read_table(out / "predictions.parquet").to_pandas()
    np.testing.assert_allclose(preds[[f"p_{b}" for b in range(11)]].to_numpy(), got, atol=1e-6)
    plain, _, _ = predict_probs(model, info, table, batch_size=7)
    assert np.abs(plain - got).max() > 1e-3
