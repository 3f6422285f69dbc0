"""The training foundation end to end: train, checkpoint, kill, resume, bad data, processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (EMB, ROOT, TINY, data_args, make_pool, make_scored_set, read_metrics, run_script,
                      script_in_process, train_in_process, train_until_killed, two_process_launcher)


REQUIRED_KEYS = {"step", "mae", "qwk", "spearman", "accuracy", "accuracy_within_1", "false_positive_rate",
                 "top_k_precision", "skipped_images"}


def test_kill_and_resume_ends_like_uninterrupted_run(toy_data, tmp_path):
    common = ["--config", ROOT / "configs/demo.yaml", *TINY, *data_args(toy_data), "train.steps=6",
              "train.eval_every=3", "train.save_every=3", "algorithm.name=flexmatch", "data.num_workers=2",
              "model.drop_rate=0.3",  # dropout: the random generators must resume too
              "data.balance_labeled=0.5"]  # weighted labeled draws resume like the plain permutation
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert script_in_process("train.py", *common, f"output_dir={whole}") == 0  # the reference: no Python start
    killed = train_until_killed(common, broken, kill_at=5)
    assert killed.returncode == 137
    assert not (broken / "model").exists()
    from aessl.models import resolve_model_folder

    with pytest.raises(FileNotFoundError, match="has not finished.*resume=true"):  # export, report, app ... say so
        resolve_model_folder(broken)
    # a checkpoint write interrupted half-way leaves a temp folder: it must be ignored
    (broken / "checkpoints" / ".tmp-step_0000006").mkdir()
    assert [p.name for p in (broken / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_0000003"]
    # run again without resume=true: refused, also where the kill came before the first
    # evaluation (a checkpoint, no metrics.jsonl), and nothing in the folder changes
    metrics = (broken / "metrics.jsonl").rename(tmp_path / "metrics.jsonl")
    config = (broken / "config.yaml").read_bytes()
    assert script_in_process("train.py", *common, "train.lr=0.5", f"output_dir={broken}") == 2
    assert (broken / "config.yaml").read_bytes() == config and not (broken / "metrics.jsonl").exists()
    metrics.rename(broken / "metrics.jsonl")
    assert script_in_process("train.py", *common, f"output_dir={broken}", "resume=true") == 0
    a, b = read_metrics(whole), read_metrics(broken)
    assert [m["step"] for m in b] == [3, 6]
    assert a == b  # every figure, algorithm thresholds included, identical
    assert REQUIRED_KEYS <= set(a[-1]) and "threshold_0" in a[-1]
    assert (broken / "model" / "model.safetensors").is_file()
    assert not (broken / "checkpoints" / ".tmp-step_0000006").exists()
    from aessl.models import load_model_folder

    model, info = load_model_folder(broken / "model")
    assert info["architecture"] == "test_resnet" and info["image_size"] == 32 and len(info["mean"]) == 3


def test_worker_count_does_not_change_a_run_with_dropout(toy_data, tmp_path):
    # data.num_workers may change on resume, so it must not change training: in-process
    # augmentation (num_workers=0) once reseeded the global torch generator that dropout uses
    common = [*data_args(toy_data), "train.steps=4", "train.eval_every=4", "algorithm.name=fixmatch",
              "model.drop_rate=0.5"]
    for workers in (0, 2):
        assert train_in_process(*common, f"data.num_workers={workers}", f"output_dir={tmp_path / str(workers)}") == 0
    assert read_metrics(tmp_path / "0") == read_metrics(tmp_path / "2")


def test_refuses_to_overwrite_a_run(toy_data, tmp_path):
    run = tmp_path / "run"
    assert train_in_process(*data_args(toy_data), "train.steps=2", "train.eval_every=2", f"output_dir={run}",
                            "algorithm.name=supervised", "train.tracker=tensorboard") == 0
    assert list((run / "tb").rglob("events.out.tfevents.*"))  # TensorBoard, the default tracker
    assert train_in_process(*data_args(toy_data), "train.steps=2", f"output_dir={run}",
                            "algorithm.name=supervised") == 2


def test_every_algorithm_is_trained_below():
    """Each algorithm train.py offers (USB's supported ones and ours) trains in
    test_every_algorithms_unlabeled_loss_changes_the_model; supervised in every other test."""
    from aessl.algorithms import available

    assert set(available()) == set(ACCEPT_ALL) | {"supervised"}


# Arguments that make each algorithm's unlabeled loss non-zero from the first steps of a
# random-init model: no confidence cut-off, no ramp-up (2 steps of 2).
ACCEPT_ALL = {"fixmatch": ["p_cutoff=0.0"], "flexmatch": ["p_cutoff=0.0"], "uda": ["p_cutoff=0.0", "tsa_schedule=none"],
              "pseudolabel": ["p_cutoff=0.0", "unsup_warm_up=0.01"], "adamatch": ["p_cutoff=0.0"],
              "mixmatch": ["unsup_warm_up=0.01"], "pimodel": ["unsup_warm_up=0.01"], "meanteacher": ["unsup_warm_up=0.01"],
              "freematch": [], "softmatch": [], "ordinal": ["thresh_min=0.0", "thresh_max=0.0"], "rankmatch": ["p_cutoff=0.0"],
              "rankflexmatch": ["p_cutoff=0.0"]}


@pytest.mark.parametrize("name", sorted(ACCEPT_ALL))
def test_every_algorithms_unlabeled_loss_changes_the_model(name, toy_data, tmp_path):
    """lambda_u=0 against lambda_u=1, same seed and batches: the weights must differ, or the
    pool is drawn but never taught anything."""
    from safetensors.torch import load_file

    args = [f"algorithm.args.{a}" for a in ACCEPT_ALL[name]]
    weights = {}
    for lam in (0, 1):
        run = tmp_path / f"lambda{lam}"
        assert train_in_process(*data_args(toy_data), "train.steps=2", "train.eval_every=2", "train.save_every=2",
                                f"algorithm.name={name}", f"algorithm.lambda_u={lam}", *args, f"output_dir={run}") == 0
        weights[lam] = load_file(str(run / "model" / "model.safetensors"))
        m = read_metrics(run)[-1]
        assert REQUIRED_KEYS <= set(m) and m["step"] == 2 and np.isfinite(m["mae"]), name
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), name


def test_two_cpu_processes_really_are_two(toy_data, tmp_path):
    run = tmp_path / "ddp"
    launcher = two_process_launcher(port=False)  # accelerate's default port
    args = ["--config", ROOT / "configs/demo.yaml", *TINY, *data_args(toy_data), "train.steps=6", "train.eval_every=2",
            "train.save_every=2", f"output_dir={run}", "algorithm.name=flexmatch"]
    killed = run_script("train.py", *args, launcher=launcher, env={"ACCELERATE_USE_CPU": "1", "AESSL_KILL_AT_STEP": "4"},
                        check=False)
    assert killed.returncode != 0 and not (run / "model").exists()
    assert json.loads((run / "run.json").read_text())["num_processes"] == 2
    m = read_metrics(run)
    assert [x["num_processes"] for x in m] == [2, 2]
    assert m[-1]["num_images"] == 33  # the gathered evaluation covers the whole test set once
    # every process keeps its own algorithm state (FlexMatch remembers the images it saw)
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert {p.name for p in last.glob("algorithm_rank*.safetensors")} == {"algorithm_rank0.safetensors",
                                                                           "algorithm_rank1.safetensors"}
    # and resumes on two processes, but not on one
    run_script("train.py", *args, "resume=true", launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
    assert [x["step"] for x in read_metrics(run)] == [2, 4, 6]
    proc = run_script("train.py", *args, "resume=true", check=False)
    assert proc.returncode == 2 and "same number of processes" in proc.stderr


def test_draws_shard_without_duplicates():
    """Two processes take disjoint draws; one epoch of draws covers every image once."""
    from aessl.data import DrawBatchSampler, DrawDataset

    n, bsz = 37, 4
    table = {"score": [0.0] * n}

    class Table(dict):
        def __len__(self):
            return n

    ds = DrawDataset(Table(table), "labeled", weak=None, seed=3)
    draws = {r: [] for r in range(2)}
    for r in range(2):
        it = iter(DrawBatchSampler(bsz, r, 2))
        for _ in range(5):
            draws[r] += next(it)
    assert not set(draws[0]) & set(draws[1])
    all_draws = sorted(draws[0] + draws[1])
    assert all_draws == list(range(40))
    images = [int(ds._permutation(d // n)[d % n]) for d in all_draws[:n]]
    assert sorted(images) == list(range(n))


def _broken_set(root: Path) -> dict:
    make_scored_set(root, per_bracket=2, brackets=[0, 5])
    (root / "abc").mkdir()
    Image.new("RGB", (8, 8)).save(root / "abc" / "x.png")
    (root / "12_too_high").mkdir()
    Image.new("RGB", (8, 8)).save(root / "12_too_high" / "y.png")
    (root / "05" / "empty.png").write_bytes(b"")
    good = (root / "05" / "img_5_0.png").read_bytes()
    (root / "05" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "00" / "notes.jpg").write_text("this is not an image")
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    for name in ("5abc", "\u0663"):  # not '<bracket>[_anything]'; an Arabic-Indic 3 is not an ASCII digit
        (root / name).mkdir()
        Image.new("RGB", (8, 8)).save(root / name / "z.png")
    return {"abc": "folder name", "12_too_high": "out of range", "empty.png": "empty", "truncated.png": "",
            "notes.jpg": "not an image", "loose.png": "outside a bracket folder", "5abc": "folder name",
            "\u0663": "folder name"}


def test_broken_labeled_set_one_error_exit_2_nothing_written(tmp_path):
    expected = _broken_set(tmp_path / "bad")
    run = tmp_path / "run"
    proc = run_script("train.py", *TINY, f"data.labeled={tmp_path / 'bad'}", "algorithm.name=supervised",
                      f"output_dir={run}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "8 problem(s)" in err
    for name, why in expected.items():
        line = next(l for l in err.splitlines() if name in l)
        assert why in line, line
    assert "Traceback" not in err
    assert not run.exists()


def test_broken_manifest_lists_every_row(tmp_path):
    make_scored_set(tmp_path / "imgs", per_bracket=1, brackets=[2, 3])
    rows = [("imgs/02/img_2_0.png", "2"), ("imgs/03/img_3_0.png", "11"), ("imgs/missing.png", "4"),
            ("imgs/03/img_3_0.png", "abc")]
    (tmp_path / "m.csv").write_text("path,score\n" + "".join(f"{p},{s}\n" for p, s in rows))
    from aessl.data import LabeledSetError, load_scored_set

    with pytest.raises(LabeledSetError) as exc:
        load_scored_set(tmp_path / "m.csv")
    text = str(exc.value)
    assert "3 problem(s)" in text and "out of range" in text and "missing.png: file not found" in text
    assert "'abc' is not a number" in text


def test_fractional_manifest_scores_load(tmp_path):
    make_scored_set(tmp_path / "imgs", per_bracket=1, brackets=[2, 7])
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "imgs/02/img_2_0.png", "score": 2.4, "rater": "a"}) + "\n"
        + json.dumps({"path": "imgs/07/img_7_0.png", "score": 6.6, "rater": "b"}) + "\n")
    from aessl.data import load_scored_set

    ds = load_scored_set(tmp_path / "m.jsonl")
    assert ds["bracket"] == [2, 7] and ds["score"] == [2.4, 6.6] and ds["rater"] == ["a", "b"]


def test_unreadable_pool_images_are_skipped_and_counted(toy_data, tmp_path):
    pool = make_pool(tmp_path / "pool", n=12)
    (pool / "zero.png").write_bytes(b"")
    (pool / "text.jpg").write_text("hello")
    good = next(pool.rglob("*.jpg")).read_bytes()
    (pool / "cut.jpg").write_bytes(good[:200])
    run = tmp_path / "run"
    # 3 steps x 16 unlabeled draws > 15 pool images: every file is met at least once
    assert train_in_process(f"data.labeled={toy_data['labeled']}", f"data.test={toy_data['test']}",
                            f"data.unlabeled={pool}", "train.steps=3", "train.eval_every=3",
                            f"output_dir={run}") == 0
    assert read_metrics(run)[-1]["skipped_images"] == 3


def test_streaming_pool_from_saved_dataset(toy_data, tmp_path):
    import datasets

    paths = sorted(str(p) for p in Path(toy_data["unlabeled"]).rglob("*.jpg"))
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    run = tmp_path / "run"
    assert train_in_process(f"data.labeled={toy_data['labeled']}", f"data.test={toy_data['test']}",
                            f"data.unlabeled={tmp_path / 'saved'}", "data.streaming=true", "train.steps=2",
                            "train.eval_every=2", f"output_dir={run}") == 0
    assert read_metrics(run)[-1]["step"] == 2


def test_unknown_key_and_bad_algorithm_are_clear_errors(toy_data, tmp_path):
    proc = run_script("train.py", "train.stepz=3", check=False)
    assert proc.returncode == 2 and "train.stepz" in proc.stderr and "Traceback" not in proc.stderr
    assert train_in_process(*data_args(toy_data), "algorithm.name=comatch", f"output_dir={tmp_path / 'a'}") == 2
    assert train_in_process(*data_args(toy_data), "algorithm.args.p_cutof=0.9", f"output_dir={tmp_path / 'b'}") == 2
    assert train_in_process(*data_args(toy_data), "model.pretrained=/nowhere/w.safetensors",
                            f"output_dir={tmp_path / 'c'}") == 2


def test_local_pretrained_weights_load(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from aessl.models import build_model

    src = timm.create_model("test_resnet", num_classes=5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model, _ = build_model({"name": "test_resnet", "pretrained": str(tmp_path / "w.safetensors")}, 32)
    got = model.backbone.state_dict()
    key = next(k for k in got if k.endswith("conv1.weight") or "conv" in k)
    assert torch.equal(got[key], src.state_dict()[key])
    # a run folder (or its model/) names its model/model.safetensors; a folder without one is an error
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "w.safetensors").rename(tmp_path / "run" / "model" / "model.safetensors")
    for folder in (tmp_path / "run", tmp_path / "run" / "model"):
        again, _ = build_model({"name": "test_resnet", "pretrained": str(folder)}, 32)
        assert torch.equal(again.backbone.state_dict()[key], src.state_dict()[key])
    (tmp_path / "run" / "model" / "model.safetensors").rename(tmp_path / "w.safetensors")
    from aessl.models import WeightsUnavailable, create_backbone

    with pytest.raises(WeightsUnavailable, match="is a folder with no model.safetensors"):
        create_backbone("test_resnet", str(tmp_path / "run"))
    # timm loads non-strictly when the class count differs: a file for another architecture
    # must still be an error, not a silent random init (embedding mode freezes that backbone)
    with pytest.raises(WeightsUnavailable, match="none of the weights|does not fit"):  # embedding mode's featureless backbone
        create_backbone("test_convnext3", str(tmp_path / "w.safetensors"), num_classes=0)
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        build_model({"name": "test_convnext3", "pretrained": str(tmp_path / "w.safetensors")}, 32)
    assert model(torch.zeros(2, 3, 32, 32))["logits"].shape == (2, 11)


def test_too_small_an_image_for_the_model_is_a_clear_error(toy_data, tmp_path, capsys):
    """ConvNeXt's unpadded 2x2 downsampling runs out of pixels below 32 px; a padded ResNet
    does not, and must not be refused."""
    from aessl.models import ImageSizeTooSmall, build_model

    with pytest.raises(ImageSizeTooSmall, match="cannot take 16 px images.*at least 32"):
        build_model({"name": "test_convnext3", "pretrained": False}, 16)
    model, _ = build_model({"name": "test_resnet", "pretrained": False}, 16)
    assert model.training  # the probe leaves the model as it was built
    for mode in ([], EMB):
        assert train_in_process(*data_args(toy_data), "model.name=test_convnext3", "data.image_size=16", *mode,
                                "train.steps=2", f"output_dir={tmp_path / 'run'}") == 2
        err = capsys.readouterr().err
        assert "cannot take 16 px images" in err and "at least 32" in err, err[-2000:]
        assert not (tmp_path / "run").exists()


def test_import_ssl_gets_the_standard_library():
    assert not (ROOT / "ssl" / "__init__.py").exists() and not (ROOT / "ssl" / "ssl.py").exists()
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    for prelude in ("", "import sys; sys.path.insert(0, 'ssl'); "):
        out = subprocess.run([sys.executable, "-c", prelude + "import ssl, urllib.request; print(ssl.__file__); "
                              "print(type(ssl.create_default_context()).__name__)"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out == [str(Path(stdlib) / "ssl.py"), "SSLContext"]


def test_a_diverging_run_stops_with_one_clear_error_and_final_metrics_are_strict_json(toy_data, tmp_path, capsys,
                                                                                        caplog):
    """A non-finite loss is an `error:` line saying what to change (exit 2), not a traceback; a run
    whose test set is one bracket (Spearman undefined) warns so and prints its final metrics as
    strict JSON (null)."""
    common = [f"data.labeled={toy_data['labeled']}", "algorithm.name=supervised", "train.steps=2",
              "train.eval_every=2", "train.save_every=2"]
    diverging = ["train.lr=1e30", "train.warmup_steps=0", "train.clip_grad=0", f"data.test={toy_data['test']}"]
    assert train_in_process(*common, *diverging, f"output_dir={tmp_path / 'nan'}") == 2
    assert "error: loss is nan" in capsys.readouterr().err
    one = make_scored_set(tmp_path / "one_bracket", per_bracket=4, brackets=[5])
    assert train_in_process(*common, f"data.test={one}", f"output_dir={tmp_path / 'one'}") == 0
    out = capsys.readouterr()
    warned = caplog.text
    assert "the test set holds one bracket only (5)" in warned and "training set holds one" not in warned
    line = next(x for x in out.out.splitlines() if x.startswith("final metrics: "))
    final = json.loads(line.split(": ", 1)[1], parse_constant=lambda c: pytest.fail(f"{c} in {line}"))
    assert final["spearman"] is None and final["qwk"] is not None
