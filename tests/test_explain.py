"""ssl/explain.py: measurements, importance for the human labels and the model's scores, and
the check against the synthetic generator's known weights, on tiny generated data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aessl import explain as E
from aessl.synth import SHADED_WEIGHTS, generate
from conftest import EMB, read_csv_rows, script_in_process, train_in_process


def explain_in_process(*args) -> int:
    return script_in_process("explain.py", *args)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny synthetic set with label noise, an image-mode run and an embedding-mode run on it."""
    root = tmp_path_factory.mktemp("explain")
    generate(root / "set", labeled=120, unlabeled=0, test=24, size=24, seed=5, label_noise=0.1, workers=1,
             progress=False)
    common = [f"data.labeled={root / 'set' / 'labeled'}", f"data.test={root / 'set' / 'test'}",
              "algorithm.name=supervised", "train.steps=4", "train.eval_every=4", "train.save_every=4"]
    assert train_in_process(*common, f"output_dir={root / 'image'}") == 0
    assert train_in_process(*common, *EMB, "model.head=linear", "embed.views=1", f"embed.cache_dir={root / 'cache'}",
                            f"output_dir={root / 'embedding'}") == 0
    return root


def test_end_to_end_with_truth(synth, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x"
    capsys.readouterr()
    rc = explain_in_process("--model", synth / "image", "--data", synth / "set" / "labeled", "--out", out, "--truth",
                            synth / "set" / "truth.parquet", "--bootstrap", 3, "--no-progress", "--batch-size", 8)
    assert rc == 0
    assert "score " not in capsys.readouterr().err  # --no-progress: not the scoring bar either
    rows = read_csv_rows(out / "importance.csv")
    got = {(r["feature_set"], r["target"]) for r in rows}
    assert got == {("measurements", "human"), ("measurements", "model"), ("truth", "generator"), ("truth", "human"),
                   ("truth", "model")}
    meas = [r for r in rows if r["feature_set"] == "measurements" and r["target"] == "model"]
    assert sorted(r["feature"] for r in meas) == sorted(E.MEASURES)
    assert sorted(int(r["rank"]) for r in meas) == list(range(1, len(E.MEASURES) + 1))
    for r in rows:
        assert float(r["ci_low"]) <= float(r["importance"]) + 1e-9 <= float(r["ci_high"]) + 2e-9
    s = json.loads((out / "explain.json").read_text())
    assert s["images"] == 120 and s["model"]["mode"] == "image"
    t = s["truth"]
    assert t["attributes"] == list(SHADED_WEIGHTS) and {"hue", "background", "flip"} <= set(t["nuisances"])
    assert 20 <= t["images"] < 120  # the shaded images only
    for target in E.TRUTH_TARGETS:
        rk = t["targets"][target]["ranking"]
        assert -1 <= rk["spearman"] <= 1 and abs(rk["spearman_max"] - 0.8944) < 1e-3
    images = pd.read_csv(out / "images.csv")
    assert len(images) == 120 and images["model_score"].between(0, 10).all()
    assert images[list(E.MEASURES)].notna().all().all()
    assert images["human_score"].isin(range(11)).all()
    md = (out / "summary.md").read_text()
    assert "Spearman" in md and "Check against the generator" in md
    for png in ("importance.png", "partial_dependence.png", "truth_importance.png", "truth_partial_dependence.png"):
        assert (out / png).stat().st_size > 5000
    # the cache: a second pass measures nothing
    monkeypatch.setattr(E, "measure_array", lambda rgb: pytest.fail("measured an image the cache holds"))
    cached = E.measure_images(list(images["path"]), out / "measurements.parquet", progress=False)
    assert np.allclose(cached[list(E.MEASURES)].to_numpy(float), images[list(E.MEASURES)].to_numpy(float), atol=1e-6)


def test_embedding_run_with_workers(synth, tmp_path):
    """An embedding-mode run's model/ folder scores through a DataLoader with workers, and
    measuring with workers gives what measuring in this process gives."""
    out = tmp_path / "emb"
    assert explain_in_process("--model", synth / "embedding" / "model", "--data", synth / "set" / "test", "--out",
                              out, "--workers", 2, "--bootstrap", 2, "--no-progress") == 0
    s = json.loads((out / "explain.json").read_text())
    assert s["model"]["mode"] == "embedding" and "truth" not in s and s["images"] == 24
    images = pd.read_csv(out / "images.csv")
    direct = [E.measure_array(np.asarray(Image.open(p).convert("RGB"), float) / 255.0) for p in images["path"][:5]]
    assert np.allclose(pd.DataFrame(direct)[list(E.MEASURES)].to_numpy(), images[list(E.MEASURES)][:5].to_numpy(),
                       rtol=1e-5, atol=1e-6)
    assert images["model_score"].between(0, 10).all() and images["model_score"].std() > 0


def test_importance_recovers_known_weights():
    """Where the score is a known function of the features, the ranking comes back and
    features the score ignores get ~0 (what --truth checks on the generator)."""
    rng = np.random.default_rng(0)
    n = 600
    X = pd.DataFrame({a: rng.uniform(size=n) for a in SHADED_WEIGHTS})
    X["hue"] = rng.uniform(size=n)
    X["background"] = pd.Categorical(rng.choice(["plain", "stripes", "dots"], n))
    y = 4.5 + 5.5 * sum(w * X[a] for a, w in SHADED_WEIGHTS.items()).to_numpy() + rng.normal(0, 0.05, n)
    for kind in E.SURROGATES:
        res = E.explain_targets(X, {"t": (y, np.arange(n))}, n, kind, bootstrap=4, seed=1)["t"]
        rk = E.ranking_check(res["rows"], res["boot"], list(SHADED_WEIGHTS))
        assert rk["spearman"] >= 0.85 and rk["order"][0] == "shading" and rk["order"][-1] == "composition", (kind, rk)
        assert E.nuisance_check(res["rows"], ["hue", "background"])["near_zero"], kind
        assert res["r2"][0] > 0.8


def test_measurements_mean_what_they_say():
    flat = np.full((64, 64, 3), 0.5)
    busy = flat.copy()
    busy[8:56, 20:44] = [0.9, 0.1, 0.1]  # a red block on grey
    text = np.ones((64, 64, 3))
    for r in range(6, 60, 10):
        for c in range(4, 60, 6):
            text[r:r + 5, c:c + 3] = 0.0  # rows of small dark glyphs
    m0, m1, m2 = (E.measure_array(a) for a in (flat, busy, text))
    assert m0["contrast"] < 1e-9 and m0["saturation"] < 1e-9 and m0["edge_density"] == 0
    assert m1["saturation"] > m0["saturation"] and m1["colourfulness"] > 20 and m1["edge_density"] > 0
    assert 0.2 < m1["foreground_size"] < 0.4  # 48 x 24 of 64 x 64 = 0.28
    assert m2["text_structure"] > 0.1 and m1["text_structure"] < 0.05
    assert m1["sharpness"] > m0["sharpness"]


def test_bad_inputs_say_what_is_wrong(synth, tmp_path, capsys):
    data = synth / "set" / "labeled"
    assert explain_in_process("--model", tmp_path / "nope", "--data", data, "--out", tmp_path / "o") == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "truth.parquet"
    pd.DataFrame({"path": ["a.png"], "bracket": [5]}).to_parquet(bad)
    assert explain_in_process("--model", synth / "image", "--data", data, "--out", tmp_path / "o", "--truth", bad) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "shading" in err and "Traceback" not in err
    other = tmp_path / "other.parquet"
    cols = {"path": ["x/a.png"], "bracket": [5], "score": [5.0], **{a: [0.5] for a in SHADED_WEIGHTS}}
    pd.DataFrame(cols).to_parquet(other)
    assert explain_in_process("--model", synth / "image", "--data", data, "--out", tmp_path / "o", "--truth",
                              other, "--bootstrap", 2, "--no-progress") == 2
    assert "none of the scored set's images" in capsys.readouterr().err
    assert not (tmp_path / "o" / "summary.md").exists()
