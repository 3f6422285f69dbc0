"""The paths the other tests configure away: streamed pools with workers, several processes,
leakage, the split's own seed, guarded resume, locks, typed config and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (ROOT, TINY, data_args, kill_then_resume, make_pool, make_scored_set, read_metrics,
                      script_in_process, train_in_process)


# --------------------------------------------------------------------------- streamed pools


def _streamed(n: int, shards: int):
    import datasets

    return datasets.Dataset.from_dict({"path": [f"/pool/img{i:04d}.png" for i in range(n)]}).to_iterable_dataset(
        num_shards=shards)


class _Names:
    """Stands in for image decoding: a streamed row's 'image' is its name, its view the name's slot."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        return torch.tensor([img])


def _loader_items(pool, workers, batches, start_batch=0, batch_size=8, monkeypatch=None):
    from torch.utils.data import DataLoader

    from aessl import data

    names = {}

    def fake_load(src, **_):
        names.setdefault(src, len(names))
        return data.stable_index({"path": src}, 2**31)

    monkeypatch.setattr(data, "load_image", fake_load)
    stream = data.StreamingPool(pool, _Names(0), _Names(0), seed=3, rank=0, world=1, index_size=2**31,
                                batch_size=batch_size, start_batch=start_batch)
    dl = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=data.collate)
    out, it = [], iter(dl)
    for _ in range(batches):
        b = next(it)
        out.append(b["x_ulb_w"].flatten().tolist())
        assert b["idx_ulb"].tolist() == out[-1]  # idx_ulb is the image's stable slot
    return out


@pytest.mark.parametrize("shards", [1, 3, 4])
def test_streamed_pool_draws_every_image_once_per_pass_with_two_workers(shards, monkeypatch):
    """datasets already gives each worker its own shards: every image once per pass, and a
    one-shard stream (every streamed manifest) still produces with num_workers=2."""
    from aessl.data import stable_index

    n = 48
    batches = _loader_items(_streamed(n, shards), workers=2, batches=n // 8, monkeypatch=monkeypatch)
    drawn = [i for b in batches for i in b]
    assert sorted(drawn) == sorted(stable_index({"path": f"/pool/img{i:04d}.png"}, 2**31) for i in range(n))


def test_streamed_pool_resumes_exactly_with_two_workers(monkeypatch):
    pool = _streamed(40, 4)
    whole = _loader_items(pool, workers=2, batches=9, monkeypatch=monkeypatch)
    resumed = _loader_items(pool, workers=2, batches=4, start_batch=5, monkeypatch=monkeypatch)
    assert resumed == whole[5:]


def test_streamed_run_with_flexmatch_resumes_exactly(toy_data, tmp_path):
    """A streamed pool of unknown length, FlexMatch (per-image state), two workers, killed and
    resumed: the same metrics as the uninterrupted run."""
    import datasets

    paths = sorted(str(p) for p in Path(toy_data["unlabeled"]).rglob("*.jpg"))
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    common = ["--config", ROOT / "configs/demo.yaml", *TINY, f"data.labeled={toy_data['labeled']}",
              f"data.test={toy_data['test']}", f"data.unlabeled={tmp_path / 'saved'}", "data.streaming=true",
              "data.num_workers=2", "data.stream_index_size=4096", "algorithm.name=flexmatch", "train.steps=6",
              "train.eval_every=3", "train.save_every=3"]
    assert script_in_process("train.py", *common, f"output_dir={tmp_path / 'whole'}") == 0
    assert kill_then_resume(common, tmp_path / "broken", kill_at=4).returncode == 137
    assert read_metrics(tmp_path / "whole") == read_metrics(tmp_path / "broken")


# --------------------------------------------------------------------------- several processes


def _ordinal_thresholds(rank, world, batches, store_path, out_q):
    import torch.distributed as dist

    from aessl import algorithms as algos
    from aessl.models import build_model

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    model, _ = build_model({"name": "test_resnet", "pretrained": False}, 32)
    algo = algos.build_algorithm("ordinal", model, user_args={}, num_train_iter=100, lambda_u=1.0,
                                 ulb_dest_len=100, lb_dest_len=100, lb_prior=np.full(11, 1 / 11), rank=rank,
                                 world_size=world)
    for probs in batches:
        part = probs.chunk(world)[rank]
        algo.select(algo.align(part))
    out_q.put((rank, algo.current_thresholds().tolist(), algo.p_model.tolist()))
    if world > 1:
        dist.destroy_process_group()


def test_ordinal_statistics_of_two_processes_equal_one(tmp_path):
    """The ordinal algorithm reduces its statistics across processes as USB's hooks do: two
    processes on halves of the same global batches end with one process's thresholds."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    batches = [torch.softmax(torch.randn(16, 11, generator=g) * 3, -1) for _ in range(30)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    _ordinal_thresholds(0, 1, batches, None, q)
    _, one_thr, one_pm = q.get()
    procs = [ctx.Process(target=_ordinal_thresholds, args=(r, 2, batches, tmp_path / "store", q)) for r in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    for _, thr, pm in got:
        assert np.allclose(thr, one_thr, atol=1e-5) and np.allclose(pm, one_pm, atol=1e-6)
    assert len(set(map(tuple, [np.round(g_[1], 8) for g_ in got]))) == 1


# --------------------------------------------------------------------------- split and leakage


def test_split_has_its_own_seed_and_keeps_raters_of_one_image_together(tmp_path):
    from aessl.data import split_by_image, stratified_split

    make_scored_set(tmp_path / "imgs", per_bracket=3, brackets=range(11))
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    rows = [(str(f), float(f.parent.name) + d) for f in files for d in (-0.4, 0.0, 0.4) if 0 <= float(f.parent.name) + d <= 10]
    paths, scores = [r[0] for r in rows], [r[1] for r in rows]
    is_test = split_by_image(paths, scores, 0.1, seed=0)
    test_imgs = {p for p, t in zip(paths, is_test) if t}
    train_imgs = {p for p, t in zip(paths, is_test) if not t}
    assert test_imgs and not test_imgs & train_imgs
    # fewer than 5 images a bracket: every bracket with >= 2 images still holds one out
    assert len(test_imgs) == 11
    assert stratified_split(np.array([3, 3]), 0.1, seed=0).sum() == 1


def test_runs_with_different_seeds_share_the_test_split(tmp_path):
    make_scored_set(tmp_path / "lab", per_bracket=6)
    splits = []
    for seed in (0, 1):
        run = tmp_path / f"s{seed}"
        assert train_in_process(f"data.labeled={tmp_path / 'lab'}", "algorithm.name=supervised", "train.steps=1",
                                f"seed={seed}", f"output_dir={run}") == 0
        splits.append((run / "split.csv").read_text())
    assert splits[0] == splits[1]


def test_test_set_inside_training_set_is_refused_and_overlap_recorded(toy_data, tmp_path):
    same = [f"data.labeled={toy_data['labeled']}", f"data.test={toy_data['labeled']}", "algorithm.name=supervised",
            "train.steps=1"]
    assert train_in_process(*same, f"output_dir={tmp_path / 'a'}") == 2
    assert not (tmp_path / "a").exists()
    # a pool holding copies of two test images (other names): warned and recorded, not refused
    pool = make_pool(tmp_path / "pool", n=6)
    tests = sorted(Path(toy_data["test"]).rglob("*.png"))[:2]
    for i, t in enumerate(tests):
        shutil.copy(t, pool / f"copy{i}.png")
    run = tmp_path / "b"
    assert train_in_process(f"data.labeled={toy_data['labeled']}", f"data.test={toy_data['test']}",
                            f"data.unlabeled={pool}", "train.steps=1", f"output_dir={run}") == 0
    leak = json.loads((run / "run.json").read_text())["leakage"]
    assert leak["test_vs_pool"]["same_content"] == 2 and leak["test_vs_pool"]["test_images_hit"] == 2
    assert leak["test_vs_train"]["test_images_hit"] == 0
    assert train_in_process(*same, "data.allow_test_overlap=true", f"output_dir={tmp_path / 'c'}") == 0
    leak = json.loads((tmp_path / "c" / "run.json").read_text())["leakage"]
    assert leak["test_vs_train"]["same_file"] == leak["test_vs_train"]["test_images"] > 0


# --------------------------------------------------------------------------- resume guard


def test_resume_refuses_changes_that_alter_training(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    base = [*data_args(toy_data), "train.steps=4", "train.eval_every=2", "train.save_every=2", f"output_dir={run}"]
    assert train_in_process(*base) == 0
    stored = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert train_in_process(*base, "resume=true", "train.lr=0.5", "algorithm.name=ordinal") == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "algorithm.name" in err and "Traceback" not in err
    assert train_in_process(*base, "resume=true", "model.name=test_convnext3") == 2
    assert "model.name" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == stored  # a refused resume records nothing
    # a kill mid-append leaves half a line: a resume with harmless changes (another spelling of the
    # same labeled folder among them) still works
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "mae"')
    same_folder = f"data.labeled={toy_data['labeled']}/../{toy_data['labeled'].name}"
    assert train_in_process(*base, "resume=true", "train.eval_every=1", "train.log_every=1", same_folder) == 0
    assert [m["step"] for m in read_metrics(run)] == [2, 4]


def test_metrics_jsonl_is_strict_json(toy_data, tmp_path):
    """NaN (a bracket missing from the test set) is written as null."""
    lab = make_scored_set(tmp_path / "lab", per_bracket=6, brackets=[2, 3, 4])
    run = tmp_path / "run"
    assert train_in_process(f"data.labeled={lab}", "algorithm.name=supervised", "train.steps=1",
                            f"output_dir={run}") == 0

    def no_constants(name):
        raise AssertionError(f"{name} in metrics.jsonl")

    lines = (run / "metrics.jsonl").read_text().splitlines()
    m = json.loads(lines[-1], parse_constant=no_constants)
    assert m["recall_0"] is None and m["recall_3"] is not None


# --------------------------------------------------------------------------- locks, names, model/


def test_a_live_run_folder_is_not_shared(toy_data, tmp_path, capsys):
    from aessl.locks import FolderLock

    run = tmp_path / "run"
    with FolderLock(run, "run folder"):
        assert train_in_process(*data_args(toy_data), "train.steps=1", f"output_dir={run}") == 2
        assert "in use by another live process" in capsys.readouterr().err
    assert not (run / "metrics.jsonl").exists()
    assert train_in_process(*data_args(toy_data), "train.steps=1", "algorithm.name=supervised",
                            f"output_dir={run}") == 0  # released: the folder is usable again


def test_default_run_names_never_collide(tmp_path):
    from aessl.runfolder import new_run_name

    names = {new_run_name(tmp_path) for _ in range(5)}
    assert len(names) == 5 and all(Path(n).is_dir() for n in names)


def test_model_folder_replacement_always_leaves_a_model(tmp_path, monkeypatch):
    from aessl import models

    model, info = models.build_model({"name": "test_resnet", "pretrained": False}, 32)
    folder = tmp_path / "model"
    models.save_model_folder(model, info, folder, {"v": 1})
    models.save_model_folder(model, info, folder, {"v": 2})  # atomic exchange where the system has it
    assert json.loads((folder / "config.json").read_text())["v"] == 2 and not list(tmp_path.glob("model.*"))
    # without it, a kill between the two renames leaves model.old only: loaders put it back
    folder.rename(tmp_path / "model.old")
    assert models.resolve_model_folder(tmp_path) == folder
    monkeypatch.setattr(models, "_exchange", lambda a, b: False)
    models.save_model_folder(model, info, folder, {"v": 3})
    assert json.loads((folder / "config.json").read_text())["v"] == 3


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override, says", [("train.eval_every=0", "train.eval_every"),
                                            ("train.steps=0", "train.steps"),
                                            ("train.steps=abc", "train.steps"),
                                            ("train.lr=fast", "train.lr"),
                                            ("train.batch_size=2.5", "whole number")])
def test_bad_numbers_in_config_are_clear_errors(override, says, toy_data, tmp_path, capsys):
    assert train_in_process(*data_args(toy_data), override, f"output_dir={tmp_path / 'r'}") == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_entirely_unreadable_pool_is_a_clear_error(toy_data, tmp_path, capsys):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "a.png").write_bytes(b"")
    (pool / "b.jpg").write_text("not an image")
    (pool / "c.webp").write_bytes(b"RIFF\x00\x00")
    run = tmp_path / "run"
    assert train_in_process(f"data.labeled={toy_data['labeled']}", f"data.test={toy_data['test']}",
                            f"data.unlabeled={pool}", "train.steps=2", f"output_dir={run}") == 2
    err = capsys.readouterr().err
    assert "every image in the unlabeled set is unreadable (3 of 3)" in err and "Traceback" not in err
    assert not run.exists()


def test_eval_cadence_does_not_change_training(toy_data, tmp_path):
    """Evaluation draws no random numbers from the training's generators, so a resumed run
    may change train.eval_every (it is a harmless key) and still learn the same model."""
    common = [*data_args(toy_data), "data.num_workers=2", "model.drop_rate=0.3", "train.steps=4", "train.save_every=4"]
    assert train_in_process(*common, "train.eval_every=1", f"output_dir={tmp_path / 'often'}") == 0
    assert train_in_process(*common, "train.eval_every=4", f"output_dir={tmp_path / 'once'}") == 0
    a, b = read_metrics(tmp_path / "often")[-1], read_metrics(tmp_path / "once")[-1]
    evaluated = [k for k in a if k in ("mae", "qwk", "spearman", "accuracy", "false_positive_rate") or
                 k.startswith("recall_")]  # the rest are training figures averaged since the last evaluation
    assert len(evaluated) > 10 and {k: a[k] for k in evaluated} == {k: b[k] for k in evaluated}
