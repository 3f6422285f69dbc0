"""Embedding mode: the feature cache (hits, invalidation, a killed pass, open files, streamed
sources, failed reads, one writer), heads on cached features through train.py, and the
resulting model/ folder scoring images in export and report."""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from conftest import (EMB, ROOT, TINY, data_args, kill_then_resume, make_pool, make_scored_set, read_metrics,
                      report_main, run_script, script_in_process, train_in_process, two_process_launcher)

from aessl import data as data_module
from aessl import embedding as emb
from aessl import heads
from aessl.config import load_config
from aessl.data import load_pool, load_scored_set
from aessl.locks import FolderLock

@pytest.fixture(scope="module")
def data(toy_data, tmp_path_factory):
    """The toy sets plus a pool with unreadable files in it."""
    root = tmp_path_factory.mktemp("embpool")
    pool = make_pool(root / "pool", n=30, seed=7)
    (pool / "zero.png").write_bytes(b"")
    (pool / "text.jpg").write_text("not an image")
    return {**toy_data, "unlabeled": pool, "root": root}


def config(d, cache: Path, *more):
    return load_config(ROOT / "configs" / "demo.yaml", [*TINY, *EMB, *data_args(d), f"embed.cache_dir={cache}", *more])


def fill(cfg, d):
    """prepare_features on the scored set, test set and pool, in this process."""
    return fill_tables(cfg, {"scored": load_scored_set(d["labeled"]), "test": load_scored_set(d["test"]),
                             "pool": load_pool(str(d["unlabeled"]))})


def fill_tables(cfg, tables: dict):
    """prepare_features on the given tables ({name: datasets table}), in this process."""
    try:
        return emb.prepare_features(cfg, Accelerator(cpu=True), tables, workers=0)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def all_features(root: Path) -> dict[str, np.ndarray]:
    cache = emb.FeatureCache(root)
    return {h: cache.features(h) for h in cache.lookup}


@pytest.fixture
def small_pool(tmp_path):
    """Six readable images and nothing else: for checks of the cache that need no scored set."""
    return make_pool(tmp_path / "small", n=6, seed=3)


def pool_config(cache: Path, *more):
    return load_config(ROOT / "configs" / "demo.yaml", [*TINY, *EMB, f"embed.cache_dir={cache}", *more])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


N_READABLE = 11 * 8 + 11 * 3 + 30  # scored + test + readable pool images


def test_second_pass_is_all_hits_and_reads_the_same_features(data, tmp_path):
    cache = tmp_path / "cache"
    first = fill(config(data, cache), data)
    assert first["stats"]["computed"] == N_READABLE and first["stats"]["cached_before"] == 0
    assert first["stats"]["unreadable"] == 2
    assert {n for n, _ in first["skipped"]["pool"]} == {str(data["unlabeled"] / "zero.png"), str(data["unlabeled"] / "text.jpg")}
    assert [len(first["tables"][k]) for k in ("scored", "test", "pool")] == [88, 33, 30]
    shards = sorted(p.name for p in first["root"].glob("shard-*"))
    before = all_features(first["root"])
    v = next(iter(before.values()))
    assert v.shape == (1 + 2 * 2, first["stats"]["dim"])  # eval + 2 weak + 2 strong views
    assert not np.allclose(v[1], v[3])  # weak and strong views differ
    manifest = json.loads((first["root"] / "manifest.json").read_text())
    assert manifest["images"] == N_READABLE and manifest["unreadable"] == 2 and manifest["views"]["views"] == 2

    # A run with different training settings (seed, algorithm, head) shares the cache whole.
    second = fill(config(data, cache, "seed=5", "algorithm.name=supervised", "model.head=linear"), data)
    assert second["root"] == first["root"]
    assert second["stats"]["computed"] == 0 and second["stats"]["cached_before"] == N_READABLE + 2
    assert sorted(p.name for p in first["root"].glob("shard-*")) == shards
    assert second["skipped"]["pool"] == first["skipped"]["pool"]  # unreadable files are remembered, not retried
    # ...and reads back the very same numbers for the same rows
    t1, t2 = first["tables"]["pool"], second["tables"]["pool"]
    assert np.array_equal(t1.gather(np.arange(len(t1)), 0), t2.gather(np.arange(len(t2)), 0))

    # Images are keyed by content: a copy under a new name is a hit, a changed file a miss.
    extra = tmp_path / "pool2"
    shutil.copytree(data["unlabeled"], extra)
    Path(extra / "zero.png").unlink()
    Path(extra / "text.jpg").unlink()
    Image.new("RGB", (24, 24), (200, 10, 10)).save(extra / "new.png")
    third = fill(config(data, cache), {**data, "unlabeled": extra})
    assert third["stats"]["computed"] == 1 and third["root"] == first["root"]


@pytest.mark.parametrize("change", [
    "model.name=test_efficientnet",  # another backbone
    "embed.seed=1",  # the same architecture with other (random) weights
    "data.image_size=40",  # the eval and training transforms
    "augment.strong_scale=0.5",  # the strong view (milder operations)
    "embed.views=1",  # how many views are cached
])
def test_backbone_or_transform_change_computes_a_new_cache(data, tmp_path, change):
    cache = tmp_path / "cache"
    a = fill(config(data, cache), data)
    b = fill(config(data, cache, change), data)
    assert b["root"] != a["root"] and b["stats"]["computed"] == N_READABLE
    spec = json.loads((b["root"] / "manifest.json").read_text())
    assert spec["backbone_sha256"] != json.loads((a["root"] / "manifest.json").read_text())["backbone_sha256"] \
        or spec["views"] != json.loads((a["root"] / "manifest.json").read_text())["views"]


@pytest.mark.parametrize("change", [
    "model.kwargs.global_pool=max",  # the same weights, pooled another way
    "model.name=test_resnet.r160_in1k",  # another timm name with the very same weights and transforms
    "embed.dtype=float32",  # how the features are stored
])
def test_model_kwargs_name_and_dtype_are_in_the_cache_key(small_pool, tmp_path, change):
    cache, pool = tmp_path / "cache", {"pool": load_pool(str(small_pool))}
    size = "data.image_size=64"  # test_resnet's last feature map is 2x2 here: max and mean pooling differ
    a = fill_tables(pool_config(cache, size), pool)
    b = fill_tables(pool_config(cache, size, change), pool)
    assert b["root"] != a["root"] and b["stats"]["computed"] == 6
    # weights and views are the same: only the new parts of the key tell the two apart
    assert b["spec"]["backbone_sha256"] == a["spec"]["backbone_sha256"] and b["spec"]["views"] == a["spec"]["views"]
    if change.startswith("model.kwargs"):  # and reusing the first cache would have served stale features
        assert not np.allclose(a["tables"]["pool"].gather(np.arange(6), 0), b["tables"]["pool"].gather(np.arange(6), 0))


def test_open_files_do_not_grow_with_the_number_of_shards(tmp_path):
    rng = np.random.default_rng(0)
    root, n_shards, rows, views, dim = tmp_path / "key", 3 * emb.MAX_OPEN_SHARDS, 3, 5, 8
    written = {}
    for k in range(n_shards):
        keys = [f"{k:04d}{r:028d}" for r in range(rows)]  # 32 characters, like content hashes
        # float16 as usual, and now and then float32 (features too large for float16)
        feats = rng.standard_normal((rows, views, dim)).astype(np.float32 if k % 10 == 3 else np.float16)
        emb.write_shard(root, keys, feats, {})
        written.update(zip(keys, feats))
    before = open_fds()
    cache = emb.FeatureCache(root)
    hashes = sorted(written)
    table = emb.FeatureTable(cache, hashes, np.arange(len(hashes)))
    idx = rng.permutation(len(hashes))  # a training batch touches every shard, in any order
    view = rng.integers(0, views, len(idx))
    got = table.gather(idx, view)
    assert open_fds() - before <= emb.MAX_OPEN_SHARDS < n_shards
    assert np.array_equal(got, np.stack([written[hashes[i]][v] for i, v in zip(idx, view)]).astype(np.float32))
    cache.close()
    assert open_fds() == before


def test_saved_dataset_pool_is_read_in_chunks_and_matches_the_same_images_as_a_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "noise"
    folder.mkdir()
    for i in range(40):  # noise does not compress: ~200 kB of bytes each, 8 MB in all
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"n{i:02d}.png")
    (folder / "text.png").write_text("not an image")
    as_folder = load_pool(str(folder))
    saved = tmp_path / "saved"
    as_images = datasets.Dataset.from_dict({"image": as_folder["path"]}).cast_column("image", datasets.Image())
    as_images.save_to_disk(str(saved))  # the bytes go into the saved table
    as_saved = load_pool(str(saved))

    # the image bytes stored in the table give the same content hashes and features as the files
    a = fill_tables(pool_config(tmp_path / "a"), {"pool": as_saved})
    b = fill_tables(pool_config(tmp_path / "b"), {"pool": as_folder})
    assert a["stats"]["computed"] == b["stats"]["computed"] == 40
    fa, fb = all_features(a["root"]), all_features(b["root"])
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[h], fb[h]) for h in fa)
    ta, tb = a["tables"]["pool"], b["tables"]["pool"]
    assert np.array_equal(ta.rows, tb.rows) and np.array_equal(ta.gather(np.arange(40), 0), tb.gather(np.arange(40), 0))
    reasons = [[r for _, r in t["skipped"]["pool"]] for t in (a, b)]
    assert reasons == [["not an image (unrecognised format)"]] * 2

    # a pass over the saved pool holds a couple of rows' bytes at a time, never the whole pool's
    monkeypatch.setattr(emb, "SOURCE_CHUNK", 2)  # hashing chunks
    monkeypatch.setattr(data_module, "SOURCE_CHUNK", 2)  # table reads
    total = sum(os.path.getsize(p) for p in as_folder["path"])
    tracemalloc.start()
    try:
        again = fill_tables(pool_config(tmp_path / "b"), {"pool": as_saved})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert again["stats"]["computed"] == 0 and len(again["tables"]["pool"]) == 40
    assert peak < total / 3, f"{peak} bytes at peak for {total} bytes of images: the pool was read whole"


def test_a_failed_read_is_skipped_now_and_retried_on_the_next_pass(small_pool, tmp_path, monkeypatch):
    cache, table = tmp_path / "cache", load_pool(str(small_pool))
    victim = table["path"][2]
    emb.ContentHasher(cache).hash_sources(table["path"])  # an earlier run hashed it: size and mtime are known
    real_open = builtins.open

    def open_failing_for_victim(file, *args, **kwargs):  # EACCES / EIO on one file, while stat still works
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == victim:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_failing_for_victim)
    first = fill_tables(pool_config(cache), {"pool": table})
    monkeypatch.undo()
    assert first["stats"]["computed"] == 5 and first["stats"]["read_errors"] == 1
    assert first["skipped"]["pool"] == [(victim, "cannot read file: Permission denied")]  # counted as skipped...
    assert not emb.FeatureCache(first["root"]).skipped  # ...but not remembered as unreadable

    second = fill_tables(pool_config(cache), {"pool": table})
    assert second["stats"]["computed"] == 1 and second["skipped"]["pool"] == []
    assert len(second["tables"]["pool"]) == 6


def embed_main():
    """ssl/embed.py's main(), called in this process."""
    spec = importlib.util.spec_from_file_location("embed_script", ROOT / "ssl" / "embed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_second_writer_of_a_cache_key_gets_a_clear_error(data, small_pool, tmp_path, capsys):
    cache = tmp_path / "cache"
    root = fill_tables(pool_config(cache), {"pool": load_pool(str(small_pool))})["root"]
    more = tmp_path / "more"
    shutil.copytree(small_pool, more)
    Image.new("RGB", (24, 24), (0, 90, 200)).save(more / "new.png")
    with FolderLock(root, "embedding cache"):  # another live process is filling this key
        # a run that finds everything cached only reads: it is not held up
        assert fill_tables(pool_config(cache), {"pool": load_pool(str(small_pool))})["stats"]["computed"] == 0
        with pytest.raises(emb.EmbeddingError, match="in use by another live process") as err:
            fill_tables(pool_config(cache), {"pool": load_pool(str(more))})
        assert str(root) in str(err.value)
        capsys.readouterr()
        try:  # embed.py must write too (the scored sets are not cached): it says why and exits 2
            code = embed_main()(["--config", str(ROOT / "configs" / "demo.yaml"), *TINY, *EMB, *data_args(data),
                                 f"embed.cache_dir={cache}"])
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        stderr = capsys.readouterr().err
        assert code == 2 and str(root) in stderr and "in use" in stderr and "Traceback" not in stderr
    assert fill_tables(pool_config(cache), {"pool": load_pool(str(more))})["stats"]["computed"] == 1
    assert not list(root.glob(".tmp-*"))


def test_a_held_cache_lock_stops_every_process_of_a_job(small_pool, tmp_path):
    """A 2-process gloo job: rank 0 alone tries the lock and tells rank 1, so both stop
    (neither hangs in a collective) and the error is printed once."""
    cache = tmp_path / "cache"
    root = fill_tables(pool_config(cache), {"pool": load_pool(str(small_pool))})["root"]
    labeled = make_scored_set(tmp_path / "lab", per_bracket=2)
    test = make_scored_set(tmp_path / "tst", per_bracket=1, seed=5)
    launcher = two_process_launcher()
    args = ["--config", ROOT / "configs" / "demo.yaml", *TINY, *EMB, f"data.labeled={labeled}", f"data.test={test}",
            f"data.unlabeled={small_pool}", f"embed.cache_dir={cache}"]
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with FolderLock(root, "embedding cache"):
        held = run_script("embed.py", *args, launcher=launcher, env=env, check=False, timeout=240)
    assert held.returncode != 0 and held.stderr.count(f"embedding cache {root} is in use") == 1
    assert re.search(r"exitcode\s*:\s*2\b", held.stderr) and len(emb.FeatureCache(root).lookup) == 6  # nothing written


def test_killed_embedding_pass_resumes_to_the_same_cache(data, tmp_path):
    args = ["--config", ROOT / "configs" / "demo.yaml", *TINY, *EMB, *data_args(data), "data.num_workers=2"]
    killed = run_script("embed.py", *args, f"embed.cache_dir={tmp_path / 'a'}", env={"AESSL_KILL_AFTER_SHARDS": "3"},
                        check=False)
    assert killed.returncode == 137, killed.stderr[-2000:]
    root = next(p for p in (tmp_path / "a").iterdir() if p.is_dir())
    assert len(emb.FeatureCache.shard_dirs(root)) == 3
    # a shard that was being written when the process died is a temp folder, never a shard
    assert len(emb.FeatureCache(root).lookup) + len(emb.FeatureCache(root).skipped) == 3 * 16
    resumed = run_script("embed.py", *args, f"embed.cache_dir={tmp_path / 'a'}")
    out = json.loads(resumed.stdout[resumed.stdout.index("{"):])
    assert out["already_cached"] == 3 * 16 and out["computed"] + out["already_cached"] == N_READABLE + 2 - 2
    assert not list(root.glob(".tmp-*"))

    whole = fill(config(data, tmp_path / "b", "data.num_workers=2"), data)
    got, ref = all_features(root), all_features(whole["root"])
    assert got.keys() == ref.keys() and len(ref) == N_READABLE
    # float16 storage; one batch's composition may differ between the two passes
    assert max(float(np.abs(got[h] - ref[h]).max()) for h in ref) < 1e-2


def test_embedding_model_trains_then_scores_images_in_export_and_report(data, tmp_path):
    run = tmp_path / "run"
    common = [*EMB, *data_args(data), f"embed.cache_dir={tmp_path / 'cache'}", "model.head=residual_mlp",
              "model.head_hidden=64", "train.steps=30", "train.eval_every=15", "train.lr=0.003"]
    assert train_in_process(*common, "algorithm.name=fixmatch", f"output_dir={run}") == 0
    m = read_metrics(run)
    assert [x["step"] for x in m] == [15, 30]
    assert m[-1]["skipped_images"] == 2  # the pool's unreadable files, counted as in image mode
    assert m[-1]["qwk"] > 0.5  # the toy brackets are easy; a head that learns nothing scores ~0
    info = json.loads((run / "model" / "config.json").read_text())
    assert info["mode"] == "embedding" and info["head"]["name"] == "residual_mlp"
    assert info["architecture"] == "test_resnet" and info["image_size"] == 32
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["embedding"]["computed"] == N_READABLE

    # export scores images end to end (backbone + head from model/): it must agree with the
    # head applied to the cached eval features of the same images
    from aessl import export as ex
    from aessl.models import load_model_folder

    out = tmp_path / "export"
    assert ex.main(["--model", str(run), "--images", str(data["unlabeled"]), "--out", str(out), "--workers", "0"]) == 0
    rows = datasets.load_dataset("parquet", data_files=str(out / "part-*.parquet"), split="train").sort("path")
    assert len(rows) == 30
    model, _ = load_model_folder(run)
    cfg = config(data, tmp_path / "cache", "model.head=residual_mlp", "model.head_hidden=64")
    feats = fill(cfg, data)
    assert feats["stats"]["computed"] == 0
    pool_t = feats["tables"]["pool"]
    names = [load_pool(str(data["unlabeled"]))["path"][i] for i in pool_t.rows]
    with torch.no_grad():
        cached = torch.softmax(model.head(torch.from_numpy(pool_t.gather(np.arange(len(pool_t)), 0)))["logits"], -1).numpy()
    order = np.argsort(names)
    exported = np.stack([rows[f"prob_{b}"] for b in range(11)], axis=1)
    assert sorted(names) == rows["path"]
    assert np.abs(exported - cached[order]).max() < 2e-2

    # report on the scored test images reproduces the training evaluation on cached features
    rep = tmp_path / "report"
    assert report_main()([str(run), "--data", str(data["test"]), "--out", str(rep), "--workers", "0"]) == 0
    got = json.loads((rep / "metrics.json").read_text())["runs"]["run"]["metrics"]
    assert got["mae"] == pytest.approx(m[-1]["mae"], abs=0.02)
    assert got["accuracy"] == pytest.approx(m[-1]["accuracy"], abs=0.05)


def test_killed_embedding_run_resumes_like_an_uninterrupted_one(data, tmp_path):
    common = ["--config", ROOT / "configs" / "demo.yaml", *TINY, *EMB, *data_args(data),
              f"embed.cache_dir={tmp_path / 'cache'}", "train.steps=8", "train.eval_every=4", "train.save_every=4",
              "algorithm.name=freematch", "data.balance_labeled=1.0"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert script_in_process("train.py", *common, f"output_dir={whole}") == 0
    assert kill_then_resume(common, broken, kill_at=6).returncode == 137
    assert read_metrics(whole) == read_metrics(broken)


@pytest.mark.parametrize("head", sorted(heads.HEADS))
def test_every_head_answers_like_a_score_model(head):
    torch.manual_seed(0)
    h = heads.build_head({"name": head, "in_features": 20, "hidden": 16, "dropout": 0.1})
    out = h(torch.randn(5, 20))
    assert out["logits"].shape == (5, 11) and out["feat"].shape == (5, h.num_features)
    assert torch.equal(h(out["feat"], only_fc=True), out["logits"])
    # it can fit: 40 Adam steps on a separable toy problem
    x = torch.randn(200, 20)
    y = (x[:, 0] > 0).long() * 5
    opt = torch.optim.Adam(h.parameters(), 1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(h(x)["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    h.eval()
    assert (h(x)["logits"].argmax(1) == y).float().mean() > 0.9


def test_supervised_head_needs_no_pool(data, tmp_path):
    run = tmp_path / "run"
    assert train_in_process(*EMB, *data_args(data), "algorithm.name=supervised", "model.head=linear", "train.steps=20",
                            "train.eval_every=20", f"embed.cache_dir={tmp_path / 'c'}", f"output_dir={run}") == 0
    assert json.loads((run / "run.json").read_text())["embedding"]["computed"] == 88 + 33  # the pool is not embedded
    assert read_metrics(run)[-1]["qwk"] > 0.5


def test_embedding_mode_errors_are_clear(data, tmp_path):
    proc = run_script("train.py", *TINY, *EMB, "model.head=transformer", check=False)
    assert proc.returncode == 2 and "model.head" in proc.stderr and "Traceback" not in proc.stderr
    assert train_in_process(*EMB, *data_args(data), "data.streaming=true", f"embed.cache_dir={tmp_path / 'c'}",
                            f"output_dir={tmp_path / 'r'}") == 2


@pytest.mark.parametrize("strong_view", ["weak", "strong"])
def test_strong_side_of_an_unlabeled_pair_is_the_view_asked_for(tmp_path, strong_view):
    # view v of row r is the vector r * 10 + v (+ a small ramp, so rows have a spread)
    rows, K, dim = 40, 2, 6
    ramp = np.linspace(0, 0.5, dim)
    feats = np.stack([[np.full(dim, r * 10 + v) + ramp for v in range(1 + 2 * K)] for r in range(rows)])
    keys = [f"{r:032d}" for r in range(rows)]
    emb.write_shard(tmp_path / "key", keys, feats.astype(np.float32), {})
    cache = emb.FeatureCache(tmp_path / "key")
    table = emb.FeatureTable(cache, keys, np.arange(rows))
    batch = emb.FeatureDraws(table, "unlabeled", K, seed=3, stream=1, strong_view=strong_view).__getitems__(
        list(range(rows)))
    idx = batch["idx_ulb"].numpy()
    weak_view = np.round(batch["x_ulb_w"][:, 0].numpy() - idx * 10).astype(int)
    strong_side = np.round(batch["x_ulb_s"][:, 0].numpy() - idx * 10).astype(int)
    assert set(weak_view) <= {1, 2}
    if strong_view == "weak":  # the *other* cached weak view of the same image
        assert np.all(strong_side + weak_view == 3)
    else:
        assert set(strong_side) <= {3, 4} and len(set(strong_side)) == 2
    noisy = emb.FeatureDraws(table, "unlabeled", K, seed=3, stream=1, strong_view=strong_view,
                             strong_noise=0.5).__getitems__(list(range(rows)))
    diff = (noisy["x_ulb_s"] - batch["x_ulb_s"]).numpy()
    assert np.array_equal(noisy["x_ulb_w"].numpy(), batch["x_ulb_w"].numpy())  # the weak side is untouched
    spread = ramp.std()
    assert 0.3 * spread < diff.std() < 0.7 * spread  # noise of 0.5 feature stds
    cache.close()
