"""ssl/export_onnx.py and export.py --onnx: a trained scorer (image and embedding mode, every
target) as an .onnx file whose probabilities are torch's on real images, and a pool scored
with onnxruntime into the same export rows.

onnxruntime, onnx and onnxscript come with the test extra (pip install -e '.[test]'): a
missing one fails this file, it is never skipped."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx  # the test extra installs the onnx extra: a missing package is an error here, not a skip
import onnxruntime  # noqa: F401
import pyarrow.parquet as pq
import pytest
import torch

from conftest import EMB, data_args, script_in_process, train_in_process

from aessl import export as ex
from aessl.models import build_model, save_model_folder
from aessl.onnx_backend import META_CONFIG, OnnxError, OnnxScorer
from aessl.onnx_export import corn_probs_unrolled, export_onnx
from aessl.targets import get_target

TOL = 1e-4


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory):
    """A tiny image-mode run (classification, FixMatch) and an embedding-mode one (ordinal CORN head)."""
    root = tmp_path_factory.mktemp("onnx")
    common = [*data_args(toy_data), "train.steps=20", "train.eval_every=20", "train.save_every=20"]
    assert train_in_process(*common, "algorithm.name=fixmatch", f"output_dir={root / 'image'}") == 0
    assert train_in_process(*common, *EMB, "model.target=ordinal", "algorithm.name=supervised", "train.lr=0.01",
                            f"embed.cache_dir={root / 'cache'}", f"output_dir={root / 'embedding'}") == 0
    return {"root": root, "image": root / "image", "embedding": root / "embedding"}


def export_file(model, out, *extra) -> int:
    """ssl/export_onnx.py in this process; its exit code."""
    return script_in_process("export_onnx.py", "--model", model, "--out", out, *extra)


@pytest.fixture(scope="module")
def exported(runs) -> dict:
    """Each run exported once by ssl/export_onnx.py, checked on its test set: {mode: (file, what it printed)}."""
    files = {}
    for mode in ("image", "embedding"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert export_file(runs[mode], runs["root"] / f"{mode}.onnx") == 0
        files[mode] = (runs["root"] / f"{mode}.onnx", printed.getvalue())
    return files


def test_corn_probabilities_without_cumprod_are_the_targets_own():
    logits = torch.randn(64, 10) * 4
    torch.testing.assert_close(corn_probs_unrolled(logits), get_target("ordinal").probs(logits), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["image", "embedding"])
def test_onnx_file_gives_torchs_probabilities_on_the_runs_test_images(mode, runs, exported):
    out, printed = exported[mode]
    diff = float(re.search(r"max \|p_onnx - p_torch\| = (\S+)", printed).group(1))
    assert "33 images from" in printed and "the run's test set" in printed and diff < TOL

    scorer = OnnxScorer(out)
    info = json.loads((runs[mode] / "model" / "config.json").read_text())
    assert scorer.info == info  # the model's config travels inside the file
    assert scorer.session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    # any batch size (the dynamic axis), the same numbers as the torch model
    from aessl.models import load_model_folder

    model, _ = load_model_folder(runs[mode])
    target = get_target(info.get("target"))
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            ref = target.probs(model(x)["logits"]).numpy()
        got = scorer.probs(x.numpy())
        assert got.shape == (n, 11) and np.abs(got - ref).max() < TOL
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_regression_target_exports_and_a_failed_check_writes_no_file(toy_data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, info = build_model({"name": "test_resnet", "target": "regression"}, 32)
    save_model_folder(model, info, tmp_path / "reg")
    out = tmp_path / "reg.onnx"
    r = export_onnx(tmp_path / "reg", out, images=str(toy_data["unlabeled"]), count=20)
    assert r["images"] == 20 and r["max_abs_diff"] < TOL and r["target"] == "regression"
    got = OnnxScorer(out).probs(np.random.default_rng(0).normal(size=(4, 3, 32, 32)))
    assert ((got > 1e-6).sum(1) <= 2).all()  # two brackets around the score, as in torch

    # a file that disagrees with torch is never put in place
    real = OnnxScorer.probs
    monkeypatch.setattr(OnnxScorer, "probs", lambda self, x: real(self, x) + 1e-3)
    with pytest.raises(OnnxError, match=r"disagree.* = 0\.001 > tolerance 0\.0001 over 8 images; .*reg2.onnx was not"):
        export_onnx(tmp_path / "reg", tmp_path / "reg2.onnx", images=str(toy_data["unlabeled"]), count=8)
    assert not (tmp_path / "reg2.onnx").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def pool_rows(out: Path) -> dict[int, dict]:
    return {r["row"]: r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()}


def test_export_with_the_onnx_backend_writes_the_torch_rows(runs, exported, toy_data, tmp_path, capsys):
    pool = tmp_path / "pool"
    shutil.copytree(toy_data["unlabeled"], pool)
    (pool / "broken.jpg").write_bytes(b"not a jpeg")  # an unreadable file: skipped and listed by both backends
    onnx_file = exported["embedding"][0]
    common = ["--images", pool, "--shard-size", "20", "--workers", "0", "--batch-size", "16"]
    assert ex.main([str(a) for a in ["--model", runs["embedding"], "--out", tmp_path / "t", *common]]) == 0
    assert ex.main([str(a) for a in ["--onnx", onnx_file, "--out", tmp_path / "o", *common]]) == 0
    t, o = pool_rows(tmp_path / "t"), pool_rows(tmp_path / "o")
    assert sorted(t) == sorted(o) and len(o) == 48
    probs = lambda rows: np.array([[rows[k][c] for c in ex.PROB_COLUMNS] for k in sorted(rows)])
    assert np.abs(probs(t) - probs(o)).max() < TOL
    for k in t:
        assert (t[k]["path"], t[k]["bracket"], t[k]["accepted"]) == (o[k]["path"], o[k]["bracket"], o[k]["accepted"])
    m, mt = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("o", "t"))
    assert m["complete"] and m["unreadable"] == 1 and m["model"]["backend"] == "onnx"
    assert m["model"]["folder"] == str(onnx_file.resolve()) and m["spec"]["backend"] == "onnx"
    assert (m["model"]["thresholds"], m["model"]["thresholds_source"]) == (mt["model"]["thresholds"],
                                                                           mt["model"]["thresholds_source"])
    capsys.readouterr()

    # the two backends never share an OUT by accident: their fingerprints differ
    assert ex.main([str(a) for a in ["--onnx", onnx_file, "--out", tmp_path / "t", *common]]) == 2
    assert "different" in capsys.readouterr().err
    # --model with the ONNX file of another model is refused, naming what differs
    assert ex.main([str(a) for a in ["--onnx", onnx_file, "--model", runs["image"], "--out", tmp_path / "x",
                                     *common]]) == 2
    err = capsys.readouterr().err
    assert f"{onnx_file} was not exported from" in err and "target: 'classification'" in err
    assert not (tmp_path / "x").exists()


def test_bad_onnx_inputs_are_clear_errors(runs, exported, tmp_path, capsys):
    pool = runs["root"] / "image"  # any existing folder: the model fails first
    onnx_file = exported["image"][0]

    def export_err(*args) -> str:
        assert ex.main([str(a) for a in ["--images", pool, "--out", tmp_path / "out", "--workers", "0", *args]]) == 2
        return capsys.readouterr().err

    assert f"{tmp_path / 'missing.onnx'}: ONNX file not found" in export_err("--onnx", tmp_path / "missing.onnx")
    (tmp_path / "text.onnx").write_text("not a model\n")
    assert f"{tmp_path / 'text.onnx'}: not a usable ONNX model" in export_err("--onnx", tmp_path / "text.onnx")

    proto = onnx.load(str(onnx_file))  # an ONNX model of someone else: no metadata of ours
    plain = onnx.ModelProto()
    plain.CopyFrom(proto)
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    assert "not one written by ssl/export_onnx.py" in export_err("--onnx", tmp_path / "plain.onnx")

    for p in proto.metadata_props:  # a config that says 48 px for a 32 px graph
        if p.key == META_CONFIG:
            p.value = json.dumps({**json.loads(p.value), "image_size": 48})
    onnx.save(proto, str(tmp_path / "size.onnx"))
    err = export_err("--onnx", tmp_path / "size.onnx")
    assert f"{tmp_path / 'size.onnx'}: its input is ['batch', 3, 32, 32], but its config says 48 px" in err

    assert "--backend onnx needs --onnx FILE" in _usage_error(["--backend", "onnx", "--model", runs["image"]], capsys)
    assert "float32" in _usage_error(["--onnx", onnx_file, "--precision", "bf16"], capsys)
    assert not (tmp_path / "out").exists()

    assert export_file(tmp_path / "nothing", tmp_path / "x.onnx") == 2
    assert f"{tmp_path / 'nothing'}: not a model folder" in capsys.readouterr().err


def _usage_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        ex.parse_args([str(a) for a in ["--images", ".", "--out", "o", *args]])
    assert e.value.code == 2
    return capsys.readouterr().err
