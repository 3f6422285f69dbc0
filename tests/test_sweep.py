"""ssl/sweep.py: sweep files, the Optuna study that remembers finished runs, the statistics
and the report. One test trains for real (and is killed mid-sweep); the others replace
train.py with a stand-in so the scheduling logic runs in seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, TINY, data_args

from aessl import sweep as sw
from aessl.sweep_report import bootstrap_ci, mean_ci, paired_table, wilcoxon_p

SWEEP = [sys.executable, str(ROOT / "ssl" / "sweep.py")]


def write_sweep(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tiny_sweep(tmp_path, toy, **extra) -> Path:
    spec = {"name": "t", "base": "configs/demo.yaml",
            "overrides": [*TINY, *data_args(toy), "algorithm.name=supervised", "train.steps=6", "train.eval_every=6",
                          "train.save_every=3"],
            "axes": {"train.lr": [0.001, 0.003, 0.01]}, "seeds": [0], **extra}
    return write_sweep(tmp_path / "t.yaml", **spec)


# ------------------------------------------------------------------ the sweep file


@pytest.mark.parametrize("spec, message", [
    ({"axes": {"train.lr": [0.1]}, "colour": 1}, "unknown key"),
    ({"axes": {"train.lr": []}}, "axes.train.lr must be a non-empty list"),
    ({"axes": {"train.lr": [1, 2], "seed": [1]}, "combine": "zip"}, "zip needs every axis"),
    ({"axes": {"train.lr": [0.1]}, "seeds": [0, 0]}, "seeds must be a list of distinct integers"),
    ({}, "nothing to sweep"),
    ({"axes": {"train.lr": [0.1]}, "objective": {"metric": "loss"}}, "objective.metric"),
    ({"axes": {"train.lr": [0.1]}, "base": "configs/nope.yaml"}, "base config not found"),
    ({"search": {"space": {"train.lr": {"low": 1, "high": 0.1}}}}, "low must be below high"),
    ({"axes": {"train.lr": [0.1]}, "data": {"pool": "x"}}, "data: unknown key"),
])
def test_a_bad_sweep_file_is_refused_naming_the_key(tmp_path, spec, message):
    path = write_sweep(tmp_path / "bad.yaml", **spec)
    with pytest.raises(sw.SweepError, match=message):
        sw.load_sweep(path)


def test_a_cell_with_a_bad_config_value_is_refused_before_anything_trains(tmp_path, toy_data):
    path = tiny_sweep(tmp_path, toy_data, axes={"train.lr": [0.001, -1.0]})
    proc = subprocess.run([*SWEEP, str(path), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "out of range" in proc.stderr
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("extra, message", [
    ({"axes": {"algorithm.name": ["supervised", "fixmach"]}}, "unknown algorithm 'fixmach'"),
    ({"axes": {"algorithm.args.p_cutof": [0.9]}}, "algorithm.args.p_cutof"),
    ({"axes": {"data.test": ["/nowhere/test"]}}, "not found: data.test=/nowhere/test"),
    ({"axes": None, "search": {"space": {"model.nmae": ["test_resnet"]}, "trials": 1}}, "model.nmae"),
    ({"axes": None, "search": {"space": {"train.lr": {"low": -1, "high": 0.01, "log": True}}}}, "log: true needs low > 0"),
])
def test_what_a_run_would_refuse_is_refused_before_anything_trains(tmp_path, toy_data, capsys, extra, message):
    """--dry-run and a real start both check every cell (a search: the ends of its space) as train.py would."""
    from conftest import script_in_process

    spec = {k: v for k, v in {"axes": {"train.lr": [0.001]}, **extra}.items() if v is not None}
    path = tiny_sweep(tmp_path, toy_data, **spec)
    if "axes" not in spec:
        spec_text = yaml.safe_load(path.read_text())
        spec_text.pop("axes")
        write_sweep(path, **spec_text)
    for dry in (["--dry-run"], []):
        assert script_in_process("sweep.py", path, "--out", tmp_path / "out", *dry) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


def test_dry_run_prints_the_commands_the_runs_get(tmp_path, toy_data, capsys):
    """Data given as paths in the sweep file reach --dry-run's commands as they reach the runs."""
    from conftest import script_in_process

    path = write_sweep(tmp_path / "t.yaml", name="t", base="configs/demo.yaml", overrides=[*TINY],
                       axes={"train.lr": [0.001, 0.003, 0.01]}, seeds=[0],
                       data={k: str(toy_data[k]) for k in ("labeled", "test")})
    assert script_in_process("sweep.py", path, "--out", tmp_path / "out", "--dry-run") == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("lr-")]
    assert len(lines) == 3 and all(f"data.labeled={toy_data['labeled']} data.test={toy_data['test']} " in x
                                   for x in lines), lines


def test_cells_cross_or_zip_the_axes_with_stable_folder_names():
    spec = sw.Sweep(path=Path("x.yaml"), name="x", base=Path("b"), overrides=[], data={},
                    axes={"data.image_size": [32, 64], "model.name": ["a", "b"]}, combine="grid", seeds=[0],
                    metric="qwk", direction="maximize", search=None)
    grid = sw.cells(spec)
    assert [c.values for c in grid] == [{"data.image_size": 32, "model.name": "a"}, {"data.image_size": 32, "model.name": "b"},
                                        {"data.image_size": 64, "model.name": "a"}, {"data.image_size": 64, "model.name": "b"}]
    assert grid[0].overrides == ["data.image_size=32", "model.name=a"]
    spec.combine = "zip"
    zipped = sw.cells(spec)
    assert [c.values for c in zipped] == [grid[0].values, grid[3].values]
    assert zipped[0].tag == grid[0].tag  # a cell's folder depends on its values only
    assert sw.as_override("algorithm.args", {"p_cutoff": 0.9}) == 'algorithm.args={"p_cutoff": 0.9}'
    assert sw.as_override("x", True) == "x=true" and sw.as_override("x", None) == "x=null"


def test_a_run_record_names_its_config_by_place_in_the_checkout_and_content(tmp_path):
    demo = sw.config_id(ROOT / "configs" / "demo.yaml")
    assert demo.startswith("configs/demo.yaml sha256:")  # a copy of the checkout elsewhere reuses its runs
    mine = tmp_path / "my.yaml"
    mine.write_text("seed: 1\n")
    first = sw.config_id(mine)
    mine.write_text("seed: 2\n")
    assert sw.config_id(mine) != first and first.startswith(str(mine))  # an edited config is another config


# ------------------------------------------------------------------ statistics


def test_confidence_intervals_and_paired_tests_on_known_numbers():
    from scipy import stats

    m, ci, n = mean_ci([0.5, 0.6, 0.7])
    assert (m, n) == (pytest.approx(0.6), 3)
    assert ci == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))
    assert np.isnan(mean_ci([0.5])[1])
    # b beats a by 0.05 +- a little on six paired seeds: the CI excludes zero; the sign test is exact
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 0.7, size=6)
    rows = [{"cell": f"a{i}", "arch": "a", "res": 32, "seed": i, "qwk": a[i]} for i in range(6)]
    rows += [{"cell": f"b{i}", "arch": "b", "res": 32, "seed": i, "qwk": a[i] + 0.05 + 0.01 * (i % 2)} for i in range(6)]
    pairs = paired_table(pd.DataFrame(rows), "arch", ["arch", "res"], "qwk")
    row = pairs.iloc[0]
    assert (row["a"], row["b"], row["pairs"]) == ("a", "b", 6)
    assert row["mean_diff"] == pytest.approx(0.055)
    assert 0.05 <= row["ci_low"] < row["ci_high"] <= 0.06
    assert row["wilcoxon_p"] == pytest.approx(2 / 2 ** 6)  # all six the same sign: the smallest two-sided p
    assert (row["b_better"], row["a_better"]) == (6, 0)
    # no difference: p = 1, CI around zero; lower-is-better metrics count wins the other way
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert bootstrap_ci([0.1])[0] != bootstrap_ci([0.1])[0]  # NaN: no interval from one pair
    mae = paired_table(pd.DataFrame([{**r, "mae": r["qwk"]} for r in rows]), "arch", ["arch", "res"], "mae")
    assert (mae.iloc[0]["b_better"], mae.iloc[0]["a_better"]) == (0, 6)


def test_zipped_axes_are_compared_as_one_paired_on_the_seed():
    from aessl.sweep_report import report_data

    rows = [{"cell": f"{n}", "model.name": n, "model.kwargs": k, "seed": s, "qwk": q + 0.01 * s, "mae": 1 - q,
             "spearman": q, "false_positive_rate": 0.1, "top_k_precision": 0.5, "wall_s": 1.0, "params": 5}
            for n, k, q in (("cnn", "{}", 0.6), ("vit", '{"img_size": 64}', 0.5)) for s in range(3)]
    data = report_data(pd.DataFrame(rows), ["model.name", "model.kwargs"], "qwk", zipped=True)
    [axis] = data["per_axis"]
    assert axis["axis"] == "model.name + model.kwargs"
    [pair] = axis["pairs"]
    assert (pair["a"], pair["b"], pair["n"], pair["diff"], pair["wins"]) == ("cnn, {}", 'vit, {"img_size": 64}', 3, "-0.100", "0–3")


# ------------------------------------------------------------------ scheduling (train.py replaced)


class FakeTrainer:
    """Stands in for sw.train_run: writes the run folder's files the sweep reads, fails the
    runs named in `fail` once, and counts calls per run."""

    def __init__(self, fail=()):
        self.calls: dict[str, int] = {}
        self.overrides: dict[str, list[str]] = {}
        self.fail = set(fail)

    def __call__(self, run, base, overrides, launcher=(), keep_checkpoints=False, **kw):
        key = f"{run.parent.name}/{run.name}"
        self.calls[key] = self.calls.get(key, 0) + 1
        if run.parent.name.startswith(tuple(self.fail)) and self.calls[key] == 1:
            raise sw.RunFailed(f"{run}: train.py exited 1")
        self.overrides[key] = list(overrides)
        lr = float(next((o for o in overrides if o.startswith("train.lr=")), "train.lr=0").split("=")[1])
        seed = int(next((o for o in overrides if o.startswith("seed=")), "seed=0").split("=")[1])
        return {"qwk": 0.5 + lr + 0.01 * seed, "mae": 1.0 - lr, "false_positive_rate": 0.1, "wall_s": 1.0,
                "params": 10, "step": 6}


def test_a_grid_trains_each_run_once_and_a_failed_run_again_at_the_next_start(tmp_path, toy_data, monkeypatch):
    path = tiny_sweep(tmp_path, toy_data, seeds=[0, 1])
    spec, out = sw.load_sweep(path), tmp_path / "out"
    fake = FakeTrainer(fail=["lr-0.003"])
    monkeypatch.setattr(sw, "train_run", fake)
    study, errors = sw.run_sweep(spec, out, progress=False)
    assert len(errors) == 2 and all("exited 1" in e for e in errors)  # that cell, both seeds
    assert len(sw.missing(study, spec)) == 2
    assert sum(fake.calls.values()) == 6 and all(v == 1 for v in fake.calls.values())

    study, errors = sw.run_sweep(spec, out, progress=False)  # the next start: only the failed runs again
    assert errors == [] and sw.missing(study, spec) == []
    assert sum(fake.calls.values()) == 8 and sorted(fake.calls.values()) == [1, 1, 1, 1, 2, 2]
    table = sw.results_table(study, spec)
    assert len(table) == 6 and sorted(set(table["train.lr"])) == [0.001, 0.003, 0.01]
    assert table.loc[(table["train.lr"] == 0.01) & (table["seed"] == 1), "qwk"].item() == pytest.approx(0.52)

    study, errors = sw.run_sweep(spec, out, progress=False)  # nothing left: nothing trains
    assert sum(fake.calls.values()) == 8


def test_an_edited_grid_is_a_new_study_in_the_same_folder(tmp_path, toy_data, monkeypatch):
    monkeypatch.setattr(sw, "train_run", FakeTrainer())
    out = tmp_path / "out"
    first = sw.load_sweep(tiny_sweep(tmp_path, toy_data, axes={"train.lr": [0.001, 0.003]}))
    sw.run_sweep(first, out, progress=False)
    edited = sw.load_sweep(tiny_sweep(tmp_path, toy_data, axes={"train.lr": [0.001, 0.003, 0.01]}))
    assert sw.study_name(edited) != sw.study_name(first)  # Optuna cannot widen a parameter's choices
    study, errors = sw.run_sweep(edited, out, progress=False)
    assert errors == [] and sorted(sw.results_table(study, edited)["train.lr"]) == [0.001, 0.003, 0.01]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # (study.ask: how the test fakes a killed trial)
def test_a_trial_left_running_by_a_dead_sweep_is_retried(tmp_path, toy_data, monkeypatch):
    from optuna.trial import TrialState

    spec, out = sw.load_sweep(tiny_sweep(tmp_path, toy_data)), tmp_path / "out"
    fake = FakeTrainer()
    monkeypatch.setattr(sw, "train_run", fake)
    study = sw.open_study(spec, f"sqlite:///{tmp_path / 'study.db'}")
    # what a SIGKILLed sweep leaves: a RUNNING trial whose worker (this host, a dead pid) is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    trial.suggest_categorical("cell", [c.tag for c in sw.cells(spec)])
    trial.suggest_categorical("seed", [0])
    import socket

    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid})
    study, errors = sw.run_sweep(spec, out, storage_url=f"sqlite:///{tmp_path / 'study.db'}", progress=False)
    assert errors == [] and sw.missing(study, spec) == []
    assert sum(fake.calls.values()) == 3
    assert study.trials[0].state == TrialState.FAIL  # the dead one, retried as a new trial


def test_before_runs_and_placeholders_reach_the_cells(tmp_path, toy_data, monkeypatch):
    path = tiny_sweep(tmp_path, toy_data, axes={"model.pretrained": [False, "{before.pre}/model/model.safetensors"]},
                      before={"pre": ["train.steps=3", "data.labeled={data.other}/labeled"]},
                      data={"more": {"other": {"seed": 5, "labeled": 22, "unlabeled": 0, "test": 11, "size": 16}}})
    spec, out = sw.load_sweep(path), tmp_path / "out"
    fake = FakeTrainer()
    monkeypatch.setattr(sw, "train_run", fake)
    study, errors = sw.run_sweep(spec, out, progress=False)
    assert errors == [] and sw.missing(study, spec) == []
    other = next((out / "data").glob("other-*"))
    assert (other / "labeled").is_dir()  # data.more: generated by ssl/synth.py
    pre = fake.overrides["before/pre"]
    assert f"data.labeled={other}/labeled" in pre and "train.steps=3" in pre
    assert pre.index("train.steps=3") > pre.index("train.steps=6")  # the sweep's overrides first, its own last
    cell = [v for k, v in fake.overrides.items() if k.startswith("pretrained-") and "False" not in k]
    assert f"model.pretrained={out}/before/pre/model/model.safetensors" in cell[0]
    assert sum(fake.calls.values()) == 3  # the before-run once, then two cells


def test_a_search_runs_its_trials_over_every_seed(tmp_path, toy_data, monkeypatch):
    path = tiny_sweep(tmp_path, toy_data, axes={}, seeds=[0, 1],
                      search={"trials": 4, "space": {"train.lr": {"low": 0.001, "high": 0.1, "log": True}}})
    spec, out = sw.load_sweep(path), tmp_path / "out"
    fake = FakeTrainer()
    monkeypatch.setattr(sw, "train_run", fake)
    study, errors = sw.run_sweep(spec, out, progress=False)
    assert errors == [] and len(study.trials) == 4
    table = sw.results_table(study, spec)
    assert len(table) == 8 and set(table["seed"]) == {0, 1}
    assert all(0.001 <= lr <= 0.1 for lr in table["train.lr"])
    assert study.best_value == pytest.approx(max(0.5 + lr + 0.005 for lr in table["train.lr"]))
    more = sw.load_sweep(tiny_sweep(tmp_path, toy_data, axes={}, seeds=[0, 1], search={
        "trials": 6, "space": {"train.lr": {"low": 0.001, "high": 0.1, "log": True}}}))
    assert sw.study_name(more) == sw.study_name(spec)  # more trials: the same search goes on
    study, errors = sw.run_sweep(more, out, progress=False)
    assert errors == [] and len(study.trials) == 6 and sum(fake.calls.values()) == 12


# ------------------------------------------------------------------ for real: killed, run again


def test_a_killed_sweep_run_again_finishes_only_the_missing_runs(tmp_path, toy_data):
    path = tiny_sweep(tmp_path, toy_data, axes={"train.lr": [0.001, 0.01]})
    out = tmp_path / "out"
    proc = subprocess.Popen([*SWEEP, str(path), "--out", str(out), "--no-progress"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    first = None
    while time.time() < deadline and first is None:
        done = sorted(out.glob("runs/*/s0/model/config.json"))
        first = done[0] if done else None
        time.sleep(0.2)
    assert first is not None, "no run finished within 300 s"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the train.py it was running
    proc.wait()
    finished_before = {p.parent.parent.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/s0/model/config.json")}
    assert len(finished_before) == 1

    again = subprocess.run([*SWEEP, str(path), "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    for cell, mtime in finished_before.items():  # finished runs were not trained again
        assert (out / "runs" / cell / "s0" / "model" / "config.json").stat().st_mtime_ns == mtime
        assert (out / "runs" / cell / "s0" / "train.log").read_text().count("\n$ ") == 1
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["train.lr"]) == [0.001, 0.01] and table["qwk"].notna().all()
    assert set(table.columns) >= {"cell", "seed", "qwk", "mae", "false_positive_rate", "wall_s", "params"}
    assert (table["params"] > 0).all()
    html = (out / "report.html").read_text()
    assert html.count("<tr class='cell'>") == 2 and "95% CI" in html
    assert "<img alt='QWK vs train.lr' src='data:image/png;base64," in html  # numeric axis: a plot, inlined
    summary = (out / "summary.md").read_text()
    assert all(f"\n| {lr} | 1 | " in summary for lr in ("0.001", "0.01"))  # a cell row each (1 seed)
    assert "\n| 0.001 | 0.01 | 1 |" in summary  # the pair of cells, paired on seed 0
    # the report alone, from the study
    rep = subprocess.run([*SWEEP, str(path), "--out", str(out), "--report-only"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0 and "2 runs" in rep.stdout
    assert json.loads((out / "runs" / first.parents[2].name / "s0" / sw.RECORD).read_text())["overrides"]
