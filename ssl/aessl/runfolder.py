"""The run folder's small files: metrics.jsonl, the run name, and what a resume may change.

metrics.jsonl is one flat JSON object per evaluation, strict JSON (NaN is written as
null) so any tool reads it. A run killed while appending can leave a truncated last
line; readers skip it with a warning instead of refusing the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"

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


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_metrics(run_dir: str | Path, metrics: dict) -> None:
    line = json.dumps({k: _finite(v) for k, v in metrics.items()}, allow_nan=False)
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every whole line of metrics.jsonl; a line that does not parse (a kill mid-write) is
    skipped with a warning."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: line %d is not whole JSON (a run killed mid-write?): ignored", path, n)
    return out


def keep_metrics_up_to(run_dir: str | Path, step: int) -> None:
    """A resumed run forgets evaluations made after its checkpoint (they will be redone),
    and any broken line, rewriting the file atomically."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    kept = [m for m in read_metrics(run_dir) if int(m.get("step", 0)) <= step]
    tmp = path.with_name(METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(m, allow_nan=False) + "\n" for m in kept))
    os.replace(tmp, path)


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
        if before != after:
            changed.append(f"{key}: {before!r} -> {after!r}")
    return changed
