"""Pools of .tar shards (webdataset layout, img2dataset output): listing, streaming splits,
unreadable members skipped and counted by name, training and export on them."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import read_metrics, toy_image, train_in_process

from aessl import export as ex
from aessl import shards
from aessl.data import DataSourceError, load_pool, row_name, row_source
from aessl.images import UnreadableImage, load_image
from aessl.models import build_model, save_model_folder

SHARDS, PER_SHARD = 3, 5
BAD = {"00001.tar/010002.jpg": "truncated", "00002.tar/020001.png": "empty"}  # member -> word of its reason


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _image_bytes(rng, fmt: str) -> bytes:
    buf = io.BytesIO()
    toy_image(int(rng.integers(0, 11)), rng, 24).save(buf, fmt)
    return buf.getvalue()


def write_shard(path: Path, s: int, rng) -> list[str]:
    """A webdataset shard: samples <key>.<jpg|png> + .json (+ .txt); returns its image members."""
    members = []
    with tarfile.open(path, "w") as tar:
        for k in range(PER_SHARD):
            key, ext = f"{s:02d}{k:04d}", "jpg" if k % 2 == 0 else "png"
            data = _image_bytes(rng, "JPEG" if ext == "jpg" else "PNG")
            name = f"{key}.{ext}"
            if f"{path.name}/{name}" in BAD:
                data = b"" if BAD[f"{path.name}/{name}"] == "empty" else data[: len(data) // 2]
            _add(tar, f"{key}.json", json.dumps({"key": key, "url": f"https://example.org/{key}"}).encode())
            _add(tar, name, data)
            _add(tar, f"{key}.txt", b"a caption")
            members.append(name)
    return members


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(7)
    folder = root / "shards"
    folder.mkdir()
    names = []
    for s in range(SHARDS):
        tar = folder / f"{s:05d}.tar"
        names += [f"{tar}/{m}" for m in write_shard(tar, s, rng)]
    # img2dataset's webdataset output: NNNNN.tar + NNNNN.parquet (key/url/status) + NNNNN_stats.json
    i2d = root / "img2dataset"
    i2d.mkdir()
    for s in range(2):
        shutil.copy(folder / f"{s:05d}.tar", i2d / f"{s:05d}.tar")
        keys = [f"{s:02d}{k:04d}" for k in range(PER_SHARD + 1)]
        pq.write_table(pa.table({"key": keys, "url": [f"https://example.org/{k}" for k in keys],
                                 "status": ["success"] * PER_SHARD + ["failed_to_download"]}), i2d / f"{s:05d}.parquet")
        (i2d / f"{s:05d}_stats.json").write_text(json.dumps({"count": PER_SHARD + 1, "successes": PER_SHARD}))
    bad = {str(folder / m) for m in BAD}
    return {"root": root, "folder": folder, "pattern": str(folder / "{00000..00002}.tar"), "names": names,
            "bad": bad, "good": [n for n in names if n not in bad], "i2d": i2d}


def _readable(row) -> tuple[bool, str]:
    try:
        load_image(row_source(row))
        return True, ""
    except UnreadableImage as exc:
        return False, exc.reason


def test_pattern_glob_folder_and_stream_list_the_same_members(pool):
    table = load_pool(pool["pattern"])
    assert table["path"] == pool["names"]  # brace order, then tar order; sidecars are not rows
    assert load_pool(str(pool["folder"] / "*.tar"))["path"] == pool["names"]
    assert load_pool(str(pool["folder"]))["path"] == pool["names"]  # a folder of shards only
    assert load_pool(str(pool["folder"] / "00001.tar"))["path"] == pool["names"][PER_SHARD:2 * PER_SHARD]
    assert [r["path"] for r in load_pool(pool["pattern"], streaming=True)] == pool["names"]
    assert load_pool(pool["pattern"], limit=4)["path"] == pool["names"][:4]

    results = {row_name(r): _readable(r) for r in table}
    assert sorted(n for n, (ok, _) in results.items() if ok) == sorted(pool["good"])
    for member, word in BAD.items():
        ok, reason = results[str(pool["folder"] / member)]
        assert not ok and word in reason.lower(), (member, reason)

    i2d = load_pool(str(pool["i2d"]))  # img2dataset's output folder: its .parquet/.json are not images
    assert [Path(p).relative_to(pool["i2d"]).as_posix() for p in i2d["path"]] == \
        [Path(p).relative_to(pool["folder"]).as_posix() for p in pool["names"][:2 * PER_SHARD]]


def test_patterns_that_match_no_shard_are_clear_errors(pool, tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "{00000..00009}.tar")
    with pytest.raises(DataSourceError, match=r"no \.tar shard matches") as err:
        load_pool(missing, streaming=True)
    assert missing in str(err.value)
    gap = str(pool["folder"] / "{00000..00004}.tar")
    with pytest.raises(DataSourceError, match="2 of the 5 shards") as err:
        load_pool(gap)
    assert "00003.tar" in str(err.value)
    with pytest.raises(DataSourceError, match="not found"):
        load_pool(str(tmp_path / "pics" / "*.jpg"))
    mixed = tmp_path / "mixed"  # shards beside a subfolder: not taken for img2dataset's folder, but said so
    (mixed / "logs").mkdir(parents=True)
    shutil.copy(pool["folder"] / "00000.tar", mixed / "00000.tar")
    with pytest.raises(DataSourceError, match=r"no images found .*mixed/\*\.tar"):
        load_pool(str(mixed))
    assert len(load_pool(str(mixed / "*.tar"))) == PER_SHARD
    model = _model(tmp_path / "model")
    assert ex.main(["--model", str(model), "--images", missing, "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert missing in capsys.readouterr().err


def test_streamed_parts_cover_the_pool_once(pool):
    from datasets.distributed import split_dataset_by_node

    stream = load_pool(pool["pattern"], streaming=True)
    for world in (2, 3, 4):  # 3 shards: whole shards for 3, every n-th row otherwise
        parts = [[r["path"] for r in split_dataset_by_node(stream, rank=i, world_size=world).iter(batch_size=4)
                  for r in _rows(r)] for i in range(world)]
        seen = [p for part in parts for p in part]
        assert sorted(seen) == sorted(pool["names"]), world


def _rows(batch: dict):
    keys = list(batch)
    return [dict(zip(keys, v)) for v in zip(*(batch[k] for k in keys))]


def test_broken_shards_are_warned_and_what_can_be_read_is_kept(pool, tmp_path, caplog):
    cut = tmp_path / "cut.tar"
    data = (pool["folder"] / "00000.tar").read_bytes()
    first = list(shards.scan_shard(str(pool["folder"] / "00000.tar")))
    bad_header = first[2]["tar_offset"] - 512  # the third image's header
    cut.write_bytes(data[:bad_header] + b"\x7f" * 512 + data[bad_header + 512:])
    (tmp_path / "empty.tar").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="aessl.shards"):
        got = load_pool(str(tmp_path / "{cut,empty}.tar"))["path"]
    assert got == [f"{cut}/{Path(r['path']).name}" for r in first[:2]]
    text = caplog.text
    assert f"{cut}: unreadable tar header at byte" in text and f"cannot read shard {tmp_path / 'empty.tar'}" in text
    # a member whose shard went away is one unreadable image, and an OSError for the embedding cache's retry
    row = dict(load_pool(str(pool["folder"] / "00000.tar"))[0], tar_shard=str(tmp_path / "gone.tar"))
    with pytest.raises(shards.ShardReadError) as err:
        row_source(row)
    assert isinstance(err.value, OSError) and "gone.tar" in err.value.reason


def test_train_on_streamed_shards_with_two_workers(toy_data, pool, tmp_path):
    run = tmp_path / "run"
    # 4 steps x 16 unlabeled draws > 15 members: every member is met
    assert train_in_process(f"data.labeled={toy_data['labeled']}", f"data.test={toy_data['test']}",
                            f"data.unlabeled={pool['pattern']}", "data.streaming=true", "data.num_workers=2",
                            "train.steps=4", "train.eval_every=4", f"output_dir={run}") == 0
    assert read_metrics(run)[-1]["skipped_images"] == len(BAD)
    progress = json.loads(next((run / "checkpoints").glob("*/progress.json")).read_text())
    assert set(progress["skipped"]) == pool["bad"]


def test_embedding_mode_trains_on_a_shard_folder(toy_data, pool, tmp_path):
    from conftest import EMB

    run = tmp_path / "run"
    assert train_in_process(f"data.labeled={toy_data['labeled']}", f"data.test={toy_data['test']}",
                            f"data.unlabeled={pool['i2d']}", *EMB, f"embed.cache_dir={tmp_path / 'cache'}",
                            "train.steps=2", "train.eval_every=2", f"output_dir={run}") == 0
    assert read_metrics(run)[-1]["skipped_images"] == 1  # 00001.tar/010002.jpg


def _model(folder: Path) -> Path:
    torch.manual_seed(0)
    model, info = build_model({"name": "test_resnet", "pretrained": False}, 32)
    save_model_folder(model, info, folder, {"thresholds": [0.2] * 11})
    return folder


def _export(model, images, out, *extra) -> int:
    return ex.main(["--model", str(model), "--images", str(images), "--out", str(out), "--shard-size", "4",
                    "--batch-size", "4", *map(str, extra)])


def _scored(out: Path) -> list[str]:
    return [r["path"] for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_export_scores_every_good_member_once_and_resumes(pool, tmp_path):
    model = _model(tmp_path / "model")
    for mode in ([], ["--streaming"]):
        out = tmp_path / f"out{len(mode)}"
        assert _export(model, pool["pattern"], out, "--workers", "2", *mode) == 0
        assert sorted(_scored(out)) == sorted(pool["good"])  # once each
        errors = {e["path"]: e["reason"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
        assert set(errors) == pool["bad"]
        assert json.loads((out / "manifest.json").read_text())["source"]["streaming"] is bool(mode)
        for member, word in BAD.items():
            assert word in errors[str(pool["folder"] / member)].lower()
    # resume: a lost part is scored again, the others are kept as they are
    out, before = tmp_path / "out0", _scored(tmp_path / "out0")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    (out / "part-00001.parquet").unlink()
    assert _export(model, pool["pattern"], out, "--workers", "0") == 0
    assert _scored(out) == before
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert {k for k in kept if now[k] != kept[k]} == {"part-00001.parquet"}


def test_an_export_of_shards_gives_pseudo_labels(toy_data, pool, tmp_path):
    """data.pseudo_labels from an export of a .tar pool (streamed or not): its rows are found by
    member name in the shards and read from them, with worker processes and in embedding mode."""
    from conftest import EMB as EMB_ARGS

    from aessl import pseudo

    model = _model(tmp_path / "model")  # thresholds 0.2: most rows accepted
    outs = {}
    for mode in ([], ["--streaming"]):
        outs[bool(mode)] = tmp_path / f"exp{len(mode)}"
        assert _export(model, pool["pattern"], outs[bool(mode)], "--workers", "0", *mode) == 0
    from omegaconf import OmegaConf

    dcfg = OmegaConf.create({"pseudo_labels": [str(outs[False])], "pseudo_weight": 1.0, "pseudo_band": None,
                             "pseudo_accepted_only": False})
    got = pseudo.load_pseudo_set(dcfg, "supervised", {}, [], [])
    assert got.info["rows_resolved"] == len(pool["good"]) and got.info["exports"][0]["resolved_by"] == "tar"
    row = got.table[0]
    assert row["tar_shard"].endswith(".tar") and row["image"] is None
    assert load_image(row_source(row)).size[0] > 0  # its bytes come from the shard
    # both exports together name each member twice: the second copy is a duplicate
    dcfg.pseudo_labels = [str(outs[False]), str(outs[True])]
    both = pseudo.load_pseudo_set(dcfg, "supervised", {}, [], [])
    assert both.info["rows_resolved"] == len(pool["good"]) and both.info["dropped"]["duplicate"] == len(pool["good"])
    common = [f"data.labeled={toy_data['labeled']}", f"data.test={toy_data['test']}", "algorithm.name=supervised",
              f"data.pseudo_labels={outs[True]}", "data.pseudo_accepted_only=false", "train.steps=3",
              "train.eval_every=3"]
    for name, extra in (("image", ["data.num_workers=2"]),
                        ("embedding", [*EMB_ARGS, f"embed.cache_dir={tmp_path / 'cache'}"])):
        run = tmp_path / name
        assert train_in_process(*common, *extra, f"output_dir={run}") == 0
        info = json.loads((run / "run.json").read_text())["pseudo_labels"]
        assert info["rows_resolved"] == len(pool["good"]) and info["rows_used"] == len(pool["good"])
