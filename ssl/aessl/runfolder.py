"""The run folder's small files: metrics.jsonl, run.json, split.csv, the model's
config.json, the run name, and what a resume may change. This module owns their format:
other code reads and writes them through the functions here.

metrics.jsonl is one flat JSON object per evaluation, strict JSON (NaN is written as
null) so any tool reads it. A run killed while appending can leave a truncated last
line; readers skip it with a warning instead of refusing the run.

run.json is what the run was given and found (sources, image counts, histogram, ...), one
JSON object; split.csv (path, score, split) is the train/test split carved from the
labeled set, present only when no test set was given.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import write_text_atomic
from .models import MODEL_FORMAT

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
RUN_INFO = "run.json"
SPLIT = "split.csv"
MODEL_CONFIG = "config.json"  # inside model/: written by models.save_model_folder

# Keys a resumed run may change: they decide how often it reports, saves and reads, not
# what it learns. Every other difference from the stored config.yaml is refused.
RESUME_HARMLESS = (
    "resume",
    "output_dir",
    "train.eval_every",
    "train.save_every",
    "train.log_every",
    "train.keep_checkpoints",
    "train.tracker",
    "data.num_workers",
    "eval.batch_size",
    "embed.batch_size",
    "embed.cache_dir",
)


def null_if_not_finite(value):
    """A float NaN or inf as None (JSON null: strict JSON has no NaN), anything else as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_metrics(run_dir: str | Path, metrics: dict) -> None:
    line = json.dumps({k: null_if_not_finite(v) for k, v in metrics.items()}, allow_nan=False)
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every whole line of metrics.jsonl; a line that does not parse (a kill mid-write) or
    is not a JSON object is skipped with a warning. [] when the file is absent."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: line %d is not whole JSON (a run killed mid-write?): ignored", path, n)
            continue
        if isinstance(row, dict):
            out.append(row)
        else:
            log.warning("%s: line %d is not a JSON object: ignored", path, n)
    return out


def keep_metrics_up_to(run_dir: str | Path, step: int) -> None:
    """A resumed run forgets evaluations made after its checkpoint (they will be redone),
    and any broken line, rewriting the file atomically."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    kept = [m for m in read_metrics(run_dir) if int(m.get("step", 0)) <= step]
    write_text_atomic(path, "".join(json.dumps(m, allow_nan=False) + "\n" for m in kept))


class RunFolderError(ValueError):
    """A file of a run or model folder that cannot be used, said in one line that names it."""


def write_run_info(run_dir: str | Path, info: dict) -> None:
    """run.json: `info` as indented JSON (one space), replacing any earlier one."""
    (Path(run_dir) / RUN_INFO).write_text(json.dumps(info, indent=1))


def read_run_info(run_dir: str | Path | None) -> dict | None:
    """run.json as a dict; None when absent, unreadable or not a JSON object (warned): a
    hand-edited run.json must not stop a reader."""
    path = Path(run_dir) / RUN_INFO if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s: run.json is not JSON; ignored", path.parent)
        return None
    return info if isinstance(info, dict) else None


def run_sources(info: dict | None) -> dict[str, str]:
    """run.json's `sources` (labeled, unlabeled, test, truth, ...), only the non-empty
    string values."""
    sources = (info or {}).get("sources")
    return {k: v for k, v in sources.items() if isinstance(v, str) and v} if isinstance(sources, dict) else {}


def write_split(run_dir: str | Path, paths, scores, is_test) -> None:
    """split.csv: one row per labeled image, columns path, score, split ('train'/'test')."""
    pd.DataFrame({"path": paths, "score": scores,
                  "split": np.where(is_test, "test", "train")}).to_csv(Path(run_dir) / SPLIT, index=False)


def read_split(run_dir: str | Path | None):
    """split.csv as a DataFrame with str columns path and split (score as written); None
    when absent, unreadable or without those columns (warned)."""
    path = Path(run_dir) / SPLIT if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # cut short, not csv: the reader goes on without it
        log.warning("%s: unreadable (%s); ignored", path, exc)
        return None
    if not {"path", "split"} <= set(df.columns):
        log.warning("%s: needs columns 'path' and 'split'; ignored", path)
        return None
    return df.astype({"path": str, "split": str})


def split_paths(split, which: str) -> list[str]:
    """The paths of one side ('train' or 'test') of a split read by read_split, as written."""
    return list(split.loc[split["split"] == which, "path"])


def is_run_folder(path: str | Path) -> bool:
    """Whether a folder is a run folder: it holds metrics.jsonl or run.json."""
    return (Path(path) / METRICS).is_file() or (Path(path) / RUN_INFO).is_file()


def run_folder_of(model_dir: str | Path) -> Path | None:
    """The run folder a model/ folder sits in; None for a bare model folder."""
    parent = Path(model_dir).parent
    return parent if is_run_folder(parent) else None


def read_model_info(model_dir: str | Path) -> dict:
    """model/config.json, checked to be an aessl model config. Raises RunFolderError naming
    the file when it cannot be read or is something else."""
    path = Path(model_dir) / MODEL_CONFIG
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path}: cannot read model config: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != MODEL_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise RunFolderError(f"{path}: not an {MODEL_FORMAT} config (format={found!r})")
    return info


def new_run_name(root: str | Path = "runs") -> str:
    """runs/<date-time>, with a suffix when that folder exists already (two runs started
    within one second must not share a folder)."""
    base = Path(root) / f"{datetime.now():%Y%m%d-%H%M%S}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(stored: dict, current: dict, defaults: dict) -> list[str]:
    """Keys whose value differs between the stored config and this one, harmless ones left
    out. A key the stored config lacks (written by an older version) counts as its default."""
    old, new, base = flat(stored), flat(current), flat(defaults)
    changed = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_HARMLESS or key.startswith(tuple(h + "." for h in RESUME_HARMLESS)):
            continue
        before = old.get(key, base.get(key))
        after = new.get(key, base.get(key))
        if before != after and not _same_file(before, after):
            changed.append(f"{key}: {before!r} -> {after!r}")
    return changed


def _same_file(a, b) -> bool:
    """Two spellings of one existing file or folder (synth/labeled and /abs/synth/labeled)."""
    if not (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)):
        return False
    return os.path.realpath(a) == os.path.realpath(b)
