"""Experiment sweeps on Optuna: a sweep file -> one study -> one `ssl/train.py` run per cell and seed.

A sweep file (YAML; configs/sweeps/ holds ready-made ones):

    name: resolution                    # the study's name (default: the file's stem)
    base: configs/demo.yaml             # the training config every run starts from
    overrides: [train.steps=300]        # applied to every run, before the axes
    data:                               # optional: where the runs' data comes from
      synth: {seed: 7, labeled: 600, unlabeled: 2000, test: 300, size: 128}
      #   generated once into OUT/data/ by ssl/synth.py (any of its options), or give paths:
      more: {other: {seed: 99, size: 128}}   # more synthetic sets, as {data.other}
      # labeled: /data/labeled
      # test: /data/test
      # unlabeled: /data/pool
    axes:                               # any config keys, each with its values
      data.image_size: [32, 64, 128]
      model.name: [test_convnext3, test_resnet]
    combine: grid                       # grid: every combination; zip: the i-th value of each
    seeds: [0, 1, 2]                    # every cell trains once per seed (seed=N)
    objective: {metric: qwk, direction: maximize}
    search:                             # optional: a search instead of a grid (TPE)
      trials: 20
      space: {train.lr: {low: 1e-4, high: 1e-2, log: true}, model.name: [test_convnext3, test_vit]}
    before:                             # optional: runs trained once before any cell (e.g. a
      weak: [data.labeled={data}/weak_signal.csv, model.target=regression]   # pre-training),
                                        # with `overrides` then these; {before.weak} is its folder

Strings in `overrides`, axis values and `before` may use `{out}` (the sweep's folder),
`{data}` (the generated or given data folder), `{data.NAME}` (a data.more set) and
`{before.NAME}` (a before-run's folder).

How it runs. One Optuna study per sweep (per version of its grid: `study_name`), in an RDB storage: by default the SQLite file
OUT/study.db, or a database URL (--storage) that several machines share, each running the
same command with its own --out. A grid is Optuna's GridSampler over (cell, seed); a search
is its TPESampler, one trial per sampled point, training every seed. Each run is a folder
OUT/runs/<cell>/s<seed> trained by ssl/train.py (a subprocess; its output goes to
train.log): a finished folder is reused, a killed one resumes from its checkpoint, a folder
trained with other overrides is refused. A trial whose process died is found at the next
start (same host, dead pid: at once; another host: after Optuna's heartbeat grace period)
and retried through Optuna's RetryHeartbeatStaleTrialCallback; a run that failed is retried
at the next start. Completed trials hold their runs' metrics, so `results.parquet` and
`report.html` (aessl/sweep_report.py) are built from the study: every worker sees every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("qwk", "mae", "spearman", "accuracy", "accuracy_within_1", "false_positive_rate", "top_k_precision")
#: lower is better for these; the rest are higher-is-better
LOWER_IS_BETTER = {"mae", "false_positive_rate"}
KEYS = {"name", "base", "overrides", "data", "axes", "combine", "seeds", "objective", "search", "before", "launcher",
        "gpu"}
RECORD = "sweep_overrides.json"
HEARTBEAT_S, GRACE_S = 60, 180


class SweepError(ValueError):
    """A bad sweep file or a sweep that cannot go on; the message names the key or the run."""


@dataclass
class Cell:
    tag: str                      # folder name under runs/, stable while the cell's values are
    values: dict                  # axis key -> value
    overrides: list[str]


@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    overrides: list[str]
    data: dict
    axes: dict
    combine: str
    seeds: list[int]
    metric: str
    direction: str
    search: dict | None
    before: dict = field(default_factory=dict)
    launcher: list[str] = field(default_factory=list)

    @property
    def is_search(self) -> bool:
        return self.search is not None


# --------------------------------------------------------------------------------------
# The sweep file


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the top level must be a mapping of keys")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")

    def need(key, kind, default):
        value = raw.get(key, default)
        if not isinstance(value, kind):
            raise SweepError(f"{path}: {key} must be a {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    base = resolve_path(need("base", str, "configs/demo.yaml"), path)
    if not base.is_file():
        raise SweepError(f"{path}: base config not found: {base}")
    axes = need("axes", dict, {})
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: axes.{key} must be a non-empty list of values")
    combine = need("combine", str, "grid")
    if combine not in ("grid", "zip"):
        raise SweepError(f"{path}: combine must be grid or zip, got {combine!r}")
    if combine == "zip" and len({len(v) for v in axes.values()}) > 1:
        raise SweepError(f"{path}: combine: zip needs every axis to have as many values "
                         f"({', '.join(f'{k}: {len(v)}' for k, v in axes.items())})")
    seeds = need("seeds", list, [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
        raise SweepError(f"{path}: seeds must be a list of distinct integers, got {seeds!r}")
    objective = need("objective", dict, {})
    metric, direction = objective.get("metric", "qwk"), objective.get("direction")
    if metric not in METRICS:
        raise SweepError(f"{path}: objective.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    direction = direction or ("minimize" if metric in LOWER_IS_BETTER else "maximize")
    if direction not in ("minimize", "maximize"):
        raise SweepError(f"{path}: objective.direction must be minimize or maximize, got {direction!r}")
    search = raw.get("search")
    if search is not None:
        search = _check_search(search, path)
        if axes:
            raise SweepError(f"{path}: give either axes (a grid) or search (a TPE search), not both")
    elif not axes:
        raise SweepError(f"{path}: no axes and no search: nothing to sweep")
    before = need("before", dict, {})
    for key, value in before.items():
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SweepError(f"{path}: before.{key} must be a list of key=value overrides")
    launcher = need("launcher", list, [])
    data = need("data", dict, {})
    unknown = sorted(set(data) - {"synth", "more", "labeled", "test", "unlabeled"})
    if unknown:
        raise SweepError(f"{path}: data: unknown key(s) {', '.join(unknown)} (synth, more, labeled, test, unlabeled)")
    if not isinstance(data.get("more", {}), dict):
        raise SweepError(f"{path}: data.more must map names to synthetic sets ({{NAME: {{seed: ..., ...}}}})")
    overrides = need("overrides", list, [])
    if not all(isinstance(o, str) and "=" in o for o in overrides):
        raise SweepError(f"{path}: overrides must be a list of key=value strings")
    return Sweep(path=path, name=str(raw.get("name") or path.stem), base=base, overrides=overrides, data=data,
                 axes=axes, combine=combine, seeds=seeds, metric=metric, direction=direction, search=search,
                 before=before, launcher=[str(x) for x in launcher])


def _check_search(search, path) -> dict:
    if not isinstance(search, dict) or not isinstance(search.get("space"), dict) or not search["space"]:
        raise SweepError(f"{path}: search needs a space: a mapping of config keys to a list of choices "
                         "or {low, high[, log, step]}")
    trials = search.get("trials", 20)
    if not isinstance(trials, int) or trials < 1:
        raise SweepError(f"{path}: search.trials must be a positive integer, got {trials!r}")
    for key, dist in search["space"].items():
        if isinstance(dist, list) and dist:
            continue
        if not (isinstance(dist, dict) and "low" in dist and "high" in dist and set(dist) <= {"low", "high", "log", "step"}):
            raise SweepError(f"{path}: search.space.{key} must be a list of choices or {{low, high[, log, step]}}")
        if not float(dist["low"]) < float(dist["high"]):
            raise SweepError(f"{path}: search.space.{key}: low must be below high")
        if dist.get("log") and not float(dist["low"]) > 0:
            raise SweepError(f"{path}: search.space.{key}: log: true needs low > 0 (got {dist['low']})")
    return {"trials": trials, "space": search["space"]}


def resolve_path(value: str, sweep_file: Path) -> Path:
    """A path in a sweep file: absolute, else relative to the repository root if it exists
    there (configs/...), else to the sweep file's folder."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return ROOT / p if (ROOT / p).exists() else (sweep_file.parent / p).resolve()


def as_override(key: str, value) -> str:
    """`key=value` as the config's dotted-override syntax reads it back as the same value."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"{key}={text}"


def _slug(values: dict) -> str:
    parts = [f"{k.split('.')[-1]}-{v}" for k, v in values.items()]
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)).strip("_.")[:80]
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{text}-{digest}" if text else digest


def cells(sweep: Sweep) -> list[Cell]:
    """The grid's cells, in the file's order: every combination (grid) or the i-th values (zip)."""
    keys = list(sweep.axes)
    combos = (product(*sweep.axes.values()) if sweep.combine == "grid" else zip(*sweep.axes.values()))
    out = []
    for combo in combos:
        values = dict(zip(keys, combo))
        out.append(Cell(_slug(values), values, [as_override(k, v) for k, v in values.items()]))
    if len({c.tag for c in out}) < len(out):
        raise SweepError(f"{sweep.path}: two cells have the same values")
    return out


def substitute(text: str, where: dict) -> str:
    """{out}, {data}, {before.NAME} in an override."""
    def repl(m):
        key = m.group(1)
        if key not in where:
            raise SweepError(f"unknown placeholder {{{key}}} in {text!r} (known: {', '.join(sorted(where))})")
        return str(where[key])

    return re.sub(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}", repl, text)


# --------------------------------------------------------------------------------------
# Data, runs


def prepare_data(sweep: Sweep, out: Path) -> tuple[list[str], dict]:
    """The data overrides every run gets, and the placeholders they define: {data} (the data
    folder) and {data.NAME} for each extra synthetic set under data.more. Synthetic sets are
    generated once (ssl/synth.py skips a set whose arguments have not changed)."""
    data = dict(sweep.data)
    folder = None
    overrides = []
    where = {f"data.{name}": _synth(sweep, out, spec, f"data.more.{name}", name)
             for name, spec in (data.pop("more", None) or {}).items()}
    if "synth" in data:
        folder = _synth(sweep, out, data.pop("synth"), "data.synth", "synth")
        overrides += [f"data.labeled={folder / 'labeled'}", f"data.test={folder / 'test'}",
                      f"data.unlabeled={folder / 'unlabeled'}"]
    for key in ("labeled", "test", "unlabeled"):
        if key in data:
            path = resolve_path(str(data[key]), sweep.path)
            if not path.exists():
                raise SweepError(f"{sweep.path}: data.{key} not found: {path}")
            overrides = [o for o in overrides if not o.startswith(f"data.{key}=")] + [f"data.{key}={path}"]
            folder = folder or path.parent
    where["data"] = folder if folder is not None else out / "data"
    return overrides, where


def _synth(sweep: Sweep, out: Path, spec, key: str, stem: str) -> Path:
    """A synthetic set from ssl/synth.py's options (`weak_signal: true` -> --weak-signal, ...)."""
    if not isinstance(spec, dict):
        raise SweepError(f"{sweep.path}: {key} must be a mapping of ssl/synth.py options")
    from .synth.dataset import generate

    folder = out / "data" / f"{stem}-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]}"
    try:
        generate(folder, **spec, progress=False)
    except (TypeError, ValueError) as exc:
        raise SweepError(f"{sweep.path}: {key}: {exc}") from None
    return folder


def run_is_finished(run: Path) -> bool:
    return (run / "model" / "config.json").exists() and (run / "metrics.jsonl").exists()


def train_run(run: Path, base: Path, overrides: list[str], launcher: list[str] = (), keep_checkpoints: bool = False,
              record_name: str = RECORD, record_extra: dict | None = None) -> dict:
    """Train `run` through ssl/train.py unless it already holds a finished model; return the
    last metrics line. A run started with other overrides is refused rather than reused; a
    killed one resumes. The finished run's checkpoints/ are removed unless keep_checkpoints."""
    settings = {"config": config_id(base), "overrides": list(overrides), **(record_extra or {})}
    record = run / record_name
    if record.exists() and json.loads(record.read_text()) != settings:
        raise SweepError(f"{run} was trained with other settings than this sweep now gives it (see {record}); "
                         "delete that folder or use another --out")
    if not run_is_finished(run):
        run.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(settings, indent=1))
        cmd = [*(launcher or [sys.executable]), str(ROOT / "ssl" / "train.py"), "--config", str(base), *overrides,
               f"output_dir={run}"]
        if (run / "metrics.jsonl").exists() or (run / "checkpoints").exists():
            cmd.append("resume=true")
        log = run / "train.log"
        with open(log, "a") as f:  # appended as it runs: `tail -f` it during a long run
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if code != 0:
            raise RunFailed(f"{run}: train.py exited {code}; the end of {log}:\n{log.read_text()[-2000:]}")
        if not keep_checkpoints:
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return run_summary(run)


def config_id(base: Path) -> str:
    """How a run's record names its base config: the path inside the checkout (so a copy of
    the checkout elsewhere reuses the same runs) and a digest of its content (so an edited
    config is not mistaken for the one a finished run used)."""
    base = Path(base).resolve()
    try:
        name = str(base.relative_to(ROOT))
    except ValueError:
        name = str(base)
    return f"{name} sha256:{hashlib.sha256(base.read_bytes()).hexdigest()[:16]}"


class RunFailed(RuntimeError):
    """ssl/train.py exited non-zero for one run (its train.log says why)."""


def run_summary(run: Path) -> dict:
    """The last metrics line's headline figures, the loop's wall time and the saved weights' size."""
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    out = {m: float(last[m]) for m in METRICS if m in last}
    timing = run / "timing.json"
    out["wall_s"] = float(json.loads(timing.read_text()).get("loop_seconds", float("nan"))) if timing.exists() else float("nan")
    out["params"] = weight_count(run / "model" / "model.safetensors")
    out["step"] = int(last.get("step", 0))
    return out


def weight_count(path: Path) -> int:
    from safetensors import safe_open

    if not path.exists():
        return 0
    with safe_open(str(path), framework="np") as f:
        total = 0
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            total += math.prod(shape)
    return total


# --------------------------------------------------------------------------------------
# The study


def open_study(sweep: Sweep, storage_url: str):
    """The sweep's study in an RDB storage with heartbeats (a dead worker's trial is failed
    after GRACE_S and retried with the same parameters)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # (failed runs: reported by run_sweep)
    with warnings.catch_warnings():  # heartbeats and the retry callback are "experimental" since Optuna 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    if sweep.is_search:
        sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=min(10, max(2, sweep.search["trials"] // 3)))
    else:
        sampler = optuna.samplers.GridSampler({"cell": [c.tag for c in cells(sweep)], "seed": list(sweep.seeds)}, seed=0)
    return optuna.create_study(study_name=study_name(sweep), storage=storage, sampler=sampler,
                               direction=sweep.direction, load_if_exists=True)


def study_name(sweep: Sweep) -> str:
    """The sweep's name plus a digest of its grid (cells and seeds) or search space: Optuna
    cannot change a parameter's choices inside one study, so an edited grid is a new study.
    Its runs that already finished are found in their folders and not trained again."""
    # (a search's trial count is not part of it: asking for more trials goes on with the same study)
    what = {"space": sweep.search["space"]} if sweep.is_search else {"cells": [c.tag for c in cells(sweep)]}
    what["seeds"] = list(sweep.seeds)
    return f"{sweep.name}-{hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]}"


def recover(study, sweep: Sweep) -> int:
    """Trials of this sweep that will not finish on their own, put back in the queue through
    Optuna's retry callback: RUNNING ones whose worker was this host and is dead (a killed
    sweep), and grid cells whose last trial failed with no completed trial. Returns how many."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from .locks import pid_alive

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback()
    trials = study.get_trials(deepcopy=False)
    host, n = socket.gethostname(), 0
    for t in trials:
        w = t.user_attrs.get("worker", {})
        if t.state == TrialState.RUNNING and w.get("host") == host and not pid_alive(int(w.get("pid", -1))):
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry(study, study._storage.get_trial(t._trial_id))
                n += 1
    if sweep.is_search:
        return n
    trials = study.get_trials(deepcopy=False)
    done = {key_of(t) for t in trials if t.state == TrialState.COMPLETE}
    pending = {key_of(t) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
    grid = {(c.tag, s) for c in cells(sweep) for s in sweep.seeds}
    last_failed = {}
    for t in trials:
        if t.state == TrialState.FAIL and key_of(t) in grid:
            last_failed[key_of(t)] = t
    for key, t in last_failed.items():
        if key not in done and key not in pending:
            retry(study, t)
            n += 1
    return n


def key_of(trial) -> tuple:
    p = trial.params
    return (p.get("cell"), p.get("seed"))


def missing(study, sweep: Sweep) -> list[tuple]:
    """Grid: (cell, seed) pairs with no completed trial. Search: one entry per trial still to run."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if sweep.is_search:
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        return [("trial", i) for i in range(max(0, sweep.search["trials"] - done))]
    done = {key_of(t) for t in trials if t.state == TrialState.COMPLETE}
    return [(c.tag, s) for c in cells(sweep) for s in sweep.seeds if (c.tag, s) not in done]


class Runner:
    """The objective: one trial = one grid run (cell, seed), or one search point over every seed."""

    def __init__(self, sweep: Sweep, out: Path, shared: list[str], where: dict, keep_checkpoints: bool = False,
                 progress=None):
        self.sweep, self.out, self.shared, self.where = sweep, out, shared, where
        self.keep_checkpoints, self.progress = keep_checkpoints, progress
        self.errors: list[str] = []
        self.by_tag = {c.tag: c for c in cells(sweep)} if not sweep.is_search else {}

    def __call__(self, trial) -> float:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        if self.sweep.is_search:
            values = self._suggest(trial)
            cell = Cell(_slug(values), values, [as_override(k, v) for k, v in values.items()])
            seeds = self.sweep.seeds
        else:
            cell = self.by_tag[trial.suggest_categorical("cell", list(self.by_tag))]
            seeds = [trial.suggest_categorical("seed", list(self.sweep.seeds))]
        trial.set_user_attr("values", cell.values)
        runs = []
        for seed in seeds:
            run = self.out / "runs" / cell.tag / f"s{seed}"
            overrides = self.overrides(cell, seed)
            try:
                figures = train_run(run, self.sweep.base, overrides, self.sweep.launcher, self.keep_checkpoints)
            except (RunFailed, SweepError) as exc:
                self.errors.append(str(exc))
                trial.set_user_attr("error", str(exc)[-1000:])
                raise
            runs.append({"cell": cell.tag, "seed": seed, "run": str(run), **figures})
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix_str(f"{cell.tag} s{seed}: {self.sweep.metric} {figures.get(self.sweep.metric, float('nan')):.3f}")
        trial.set_user_attr("runs", runs)
        scores = [r[self.sweep.metric] for r in runs]
        return float(sum(scores) / len(scores))

    def overrides(self, cell: Cell, seed: int) -> list[str]:
        fixed = [substitute(o, self.where) for o in self.sweep.overrides]
        axis = [substitute(o, self.where) for o in cell.overrides]
        return [*self.shared, *fixed, *axis, f"seed={seed}"]

    def _suggest(self, trial) -> dict:
        values = {}
        for key, dist in self.sweep.search["space"].items():
            if isinstance(dist, list):
                values[key] = trial.suggest_categorical(key, dist)
            elif _is_int_range(dist):
                values[key] = trial.suggest_int(key, int(dist["low"]), int(dist["high"]), step=int(dist.get("step", 1)),
                                                log=bool(dist.get("log", False)))
            else:
                values[key] = trial.suggest_float(key, float(dist["low"]), float(dist["high"]),
                                                  log=bool(dist.get("log", False)), step=dist.get("step"))
        return values


def _is_int_range(dist: dict) -> bool:
    return all(isinstance(dist.get(k, 1), int) and not isinstance(dist.get(k, 1), bool) for k in ("low", "high", "step"))


def check_cells(sweep: Sweep, runner: Runner) -> None:
    """Every cell's config must load (unknown keys, bad values), name a known algorithm with
    arguments it takes, and name data paths that exist, before anything trains; a search
    checks the ends of its space (every low or first choice, every high or last choice)."""
    from .algorithms import AlgorithmArgumentError, check_algorithm
    from .config import ConfigError, load_config

    if sweep.is_search:
        space = sweep.search["space"]
        ends = [{k: d[0] if isinstance(d, list) else d["low"] for k, d in space.items()},
                {k: d[-1] if isinstance(d, list) else d["high"] for k, d in space.items()}]
        probes = [Cell("probe", v, [as_override(k, x) for k, x in v.items()]) for v in ends]
    else:
        probes = list(cells(sweep))
    for c in probes:
        overrides = runner.overrides(c, sweep.seeds[0])
        try:
            cfg = load_config(sweep.base, [*overrides, f"output_dir={runner.out / 'runs' / 'probe'}"])
            check_algorithm(cfg.algorithm.name, dict(cfg.algorithm.args))
            missing = [f"data.{k}={v}" for k, v in ((k, cfg.data[k]) for k in ("labeled", "test", "unlabeled"))
                       if _local_path(v) and _missing(Path(v) if os.path.isabs(v) else ROOT / v, runner.out)]
            if missing:
                raise ConfigError(f"not found: {', '.join(missing)}")
        except (ConfigError, AlgorithmArgumentError) as exc:
            raise SweepError(f"{sweep.path}: cell {c.values or '(base)'}: {exc}") from None


def _missing(path: Path, out: Path) -> bool:
    """Not there, and not something this sweep makes (a before-run's files appear as it trains)."""
    inside = os.path.realpath(path).startswith(os.path.realpath(out) + os.sep)
    return not inside and not path.exists()


def _local_path(value) -> bool:
    """A data source that names one file or folder here (not hub:, a URL or a shard pattern)."""
    return isinstance(value, str) and bool(value) and ":" not in value.split("/")[0] and not any(
        ch in value for ch in "{*?[")


def train_before(sweep: Sweep, out: Path, shared: list[str], where: dict, keep_checkpoints: bool) -> None:
    """The `before:` runs (trained once; `where` gains their folders as {before.NAME})."""
    for name, overrides in sweep.before.items():
        run = out / "before" / name
        where[f"before.{name}"] = run
        resolved = [*shared, *(substitute(o, where) for o in [*sweep.overrides, *overrides])]
        print(f"before: {name} ({run})", flush=True)
        train_run(run, sweep.base, resolved, sweep.launcher, keep_checkpoints)


# --------------------------------------------------------------------------------------
# Running a sweep, and its table


def run_sweep(sweep: Sweep, out: Path, storage_url: str | None = None, keep_checkpoints: bool = False,
              progress: bool = True) -> tuple[object, list[str]]:
    """Train every missing run; return the study and the errors of runs that failed this time."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    shared, where = prepare_data(sweep, out)
    where.update({"out": out, **{f"before.{n}": out / "before" / n for n in sweep.before}})
    runner = Runner(sweep, out, shared, where, keep_checkpoints)
    check_cells(sweep, runner)
    train_before(sweep, out, shared, where, keep_checkpoints)
    check_cells(sweep, runner)  # (again: a cell may name a before-run's files)
    study = open_study(sweep, storage_url or f"sqlite:///{out / 'study.db'}")
    recover(study, sweep)
    todo = missing(study, sweep)
    per_trial = len(sweep.seeds) if sweep.is_search else 1
    bar = tqdm(total=len(todo) * per_trial, desc=f"sweep {sweep.name}", unit="run", disable=not progress, dynamic_ncols=True)
    runner.progress = bar
    try:
        # GridSampler stops a pass as soon as every cell has been tried once, failed ones
        # included, so retries queued by recover() may need one pass each: go on while passes
        # make progress
        while todo and not runner.errors:
            before = len(todo)
            study.optimize(runner, n_trials=len(todo), catch=(RunFailed, SweepError))
            if runner.errors:
                break
            recover(study, sweep)
            todo = missing(study, sweep)
            if len(todo) >= before:
                break
    finally:
        bar.close()
    return study, runner.errors


def results_table(study, sweep: Sweep):
    """One row per finished run of this sweep: every axis value, seed, figures, wall time,
    saved parameter count (pandas DataFrame; the latest trial wins where a run was retried)."""
    import pandas as pd
    from optuna.trial import TrialState

    grid = {c.tag for c in cells(sweep)} if not sweep.is_search else None
    rows = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        for r in t.user_attrs.get("runs", []):
            if grid is not None and r["cell"] not in grid:
                continue  # a cell the sweep file no longer has
            values = t.user_attrs.get("values", {})
            rows[(r["cell"], r["seed"])] = {"sweep": sweep.name, "trial": t.number, **values,
                                            **{k: v for k, v in r.items()}}
    columns = ["sweep", "trial", "cell", *(sweep.axes or sweep.search["space"]), "seed", *METRICS, "wall_s", "params", "step", "run"]
    frame = pd.DataFrame(list(rows.values()))
    if frame.empty:
        return pd.DataFrame(columns=columns)
    # a parquet column holds one scalar type: lists, mappings and mixed types go in as override text
    for col in (sweep.axes or sweep.search["space"]):
        kinds = {type(v) for v in frame[col] if v is not None} if col in frame.columns else set()
        if kinds & {list, dict} or (len(kinds) > 1 and not kinds <= {int, float}):
            frame[col] = [as_override(col, v).split("=", 1)[1] for v in frame[col]]
    # the sweep file's order (a grid's cells as written, a search's trials as run), then seed
    order = {c.tag: i for i, c in enumerate(cells(sweep))} if grid is not None else {}
    frame["_order"] = [order.get(c, t) for c, t in zip(frame["cell"], frame["trial"])]
    frame = frame.sort_values(["_order", "seed"]).reset_index(drop=True)
    return frame[[c for c in columns if c in frame.columns]]

