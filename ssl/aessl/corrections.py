"""The corrections manifest: what a person decided while reviewing an export or labeling
the queue of images to label next (ssl/app.py), and what training makes of it
(`data.corrections=FILE`).

One CSV, one line per decision, columns `path, score, source, time, decision`:

    accept   the person agrees with the model: score = the export's expected score
    rescore  the person gives the score (0-10, fractional allowed)
    reject   the image does not belong (not a picture of the kind scored, broken, a
             duplicate): score empty

`source` says where the decision was made (review, label_next, score), `time` is UTC ISO
8601. Every decision is appended, flushed and fsynced before `record` returns, so a
browser or a server closed mid-review loses nothing already decided; a line cut short by a
killed process is the file's last one and is skipped when read. The file is a log: the
last decision for a path wins, and an image can be decided again.

Training (`data.corrections=FILE`, or a list of files read in order): an accepted or
re-scored image joins the labels with that score (replacing its label when it already is
a labeled image); a rejected image is dropped from the labels, the pool and the
pseudo-labels. Corrected test images are left out of training and counted (a test image
must stay unseen). run.json records what was applied and the file's digest; a resumed run
whose corrections changed is refused (its training set would not be the one it started).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import NUM_BRACKETS

log = logging.getLogger(__name__)

COLUMNS = ("path", "score", "source", "time", "decision")
DECISIONS = ("accept", "rescore", "reject")


class CorrectionsError(ValueError):
    """A corrections file that cannot be used; the message names the file and its lines."""


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_score(decision: str, score) -> float | None:
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
    if decision == "reject":
        return None
    if score is None or isinstance(score, bool):
        raise ValueError(f"a {decision} decision needs a score 0-10")
    score = float(score)
    if math.isnan(score) or not 0.0 <= score <= NUM_BRACKETS - 1:
        raise ValueError(f"score {score} is out of range 0-10")
    return score


class CorrectionsLog:
    """Append decisions to a corrections CSV (created with its header when missing).

    Thread-safe within one process (a web server answers clicks on several threads); one
    writer per file is expected."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(h.strip() for h in header) != COLUMNS:
                raise CorrectionsError(f"{self.path}: not a corrections file (its header is {header!r}; "
                                       f"expected {','.join(COLUMNS)}); give another --corrections path")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append([COLUMNS])

    def _append(self, rows) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self._drop_cut_line()
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def _drop_cut_line(self) -> None:
        """A writer killed mid-line leaves a last line without its newline, a decision whose
        record() never returned: it is cut off before the next one is written."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            size = f.seek(0, os.SEEK_END)
            tail = f.seek(max(0, size - 65536))
            data = f.read()
            end = data.rfind(b"\n")
            if end < 0 and tail > 0:
                return  # a line longer than 64 KiB: not ours to cut
            log.warning("%s: its last line was cut short (a killed writer?) and is removed: %r", self.path,
                        data[end + 1:end + 201])
            f.truncate(tail + end + 1)
            f.flush()
            os.fsync(f.fileno())

    def record(self, path: str, decision: str, score: float | None = None, source: str = "review") -> dict:
        """Append one decision and return it as a row dict; ValueError for a bad decision or score."""
        if not path:
            raise ValueError("a decision needs the image's path")
        score = _check_score(decision, score)
        row = {"path": str(path), "score": "" if score is None else repr(round(score, 4)), "source": source,
               "time": utc_now(), "decision": decision}
        with self._lock:
            self._append([[row[c] for c in COLUMNS]])
        return row

    def decisions(self) -> dict[str, dict]:
        """The last decision per path, as read back from the file."""
        return read_corrections(self.path).last


@dataclass
class Corrections:
    """What one or more corrections files say, the last decision per image winning."""

    files: list[str]
    last: dict[str, dict] = field(default_factory=dict)  # path -> its last row (score as float or None)
    lines: int = 0
    skipped_cut_line: int = 0
    digest: str = ""

    @property
    def labels(self) -> dict[str, float]:
        """path -> score of every image whose last decision is accept or rescore."""
        return {p: r["score"] for p, r in self.last.items() if r["decision"] != "reject"}

    @property
    def rejected(self) -> set[str]:
        return {p for p, r in self.last.items() if r["decision"] == "reject"}

    def counts(self) -> dict:
        by = {d: 0 for d in DECISIONS}
        for r in self.last.values():
            by[r["decision"]] += 1
        return {"files": self.files, "sha256": self.digest, "lines": self.lines, "images": len(self.last), **by}


def _resolve(path: str, base: Path) -> str:
    return os.path.normpath(path if os.path.isabs(path) else str(base / path))


def read_corrections(files, into: Corrections | None = None) -> Corrections:
    """Read one corrections CSV or a list of them (later files win). Raises CorrectionsError
    naming the file and every bad line; relative paths are relative to the file's folder."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    out = into or Corrections(files=[str(f) for f in files])
    sha = hashlib.sha256()
    problems = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise CorrectionsError(f"corrections file not found: {path}")
        data = path.read_bytes()
        sha.update(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorrectionsError(f"{path}: not a UTF-8 CSV file ({exc})") from exc
        lines = text.splitlines(keepends=True)
        if not lines:
            raise CorrectionsError(f"{path}: empty file (expected the header {','.join(COLUMNS)})")
        header = next(csv.reader([lines[0]]))
        if tuple(h.strip() for h in header) != COLUMNS:
            raise CorrectionsError(f"{path}: not a corrections file: its header is {header!r}, "
                                   f"expected {','.join(COLUMNS)}")
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            cut = not line.endswith("\n")
            cells = next(csv.reader([line]))
            row = dict(zip(COLUMNS, (c.strip() for c in cells))) if len(cells) == len(COLUMNS) else None
            why = None
            if row is None:
                why = f"{len(cells)} fields, expected {len(COLUMNS)}"
            elif not row["path"]:
                why = "empty path"
            else:
                try:
                    row["score"] = _check_score(row["decision"], row["score"] or None)
                except ValueError as exc:
                    why = str(exc)
            if why:
                if cut and number == len(lines):  # a killed writer's last line
                    out.skipped_cut_line += 1
                    log.warning("%s: line %d was cut short (a killed writer?) and is skipped", path, number)
                    continue
                problems.append(f"{path}: line {number}: {why}")
                continue
            row["path"] = _resolve(row["path"], path.parent)
            out.last.pop(row["path"], None)  # re-decided: the latest decision goes last
            out.last[row["path"]] = row
            out.lines += 1
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CorrectionsError("bad corrections:\n  " + "\n  ".join(shown))
    out.digest = sha.hexdigest()
    return out


# --------------------------------------------------------------------------- train.py's hook


def files_of(setting) -> list[str]:
    """data.corrections as a list of file names (one name, a list, or an OmegaConf list)."""
    if isinstance(setting, (str, Path)):
        return [str(setting)]
    return [str(f) for f in setting]


def _key(path) -> str:
    return os.path.realpath(str(path))


def apply_to_labels(corr: Corrections, train_set, test_paths, check_images: bool = True):
    """(train set with the corrections applied, info for run.json).

    Accepted and re-scored images become labels (one row each, replacing every row of that
    image, raters' rows included); rejected images leave the labels; test images are left
    out and counted (by path, or by content: a byte copy of a test image). The images that join must be readable (LabeledSetError otherwise,
    naming the corrections file)."""
    import datasets

    from .data import LabeledSetError, validate_images
    from .metrics import bracket_of

    from .overlap import TestIndex

    test = {_key(p) for p in test_paths}
    index = TestIndex(list(test_paths)) if check_images and corr.labels else None  # copies too, as pseudo-labels
    labels = {}
    dropped_test = 0
    for path, score in corr.labels.items():
        if _key(path) in test or (index is not None and index.match(path) is not None):
            dropped_test += 1
        else:
            labels[_key(path)] = (path, score)
    rejected = {_key(p) for p in corr.rejected}
    if check_images:
        problems = validate_images([p for p, _ in labels.values()])
        if problems:
            raise LabeledSetError(", ".join(corr.files), problems)
    columns = train_set.column_names
    rows, replaced, removed = [], set(), set()
    for row in train_set:
        k = _key(row["path"])
        if k in labels:
            replaced.add(k)
        elif k in rejected:
            removed.add(k)
        else:
            rows.append(row)
    for path, score in labels.values():
        row = {c: None for c in columns}
        row.update(path=path, score=float(score), bracket=int(bracket_of([score])[0]))
        rows.append(row)
    table = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns}, features=train_set.features)
    info = {**corr.counts(), "labels_added": len(labels) - len(replaced), "labels_replaced": len(replaced),
            "labels_removed": len(removed), "test_images_left_out": dropped_test, "train_images": len(table)}
    return table, info


def drop_from_pool(pool, rejected) -> tuple[object, int | None]:
    """The pool without the rejected images (matched by path) and how many went (None for a
    stream: counted as it is read, not before)."""
    if not rejected or pool is None:
        return pool, 0
    keys = {_key(p) for p in rejected}
    names = {os.path.basename(p) for p in rejected}

    def keep(row) -> bool:
        p = row.get("path")
        # (the basename test first: a realpath per pool image is a syscall per image)
        return not (isinstance(p, str) and os.path.basename(p) in names and _key(p) in keys)

    if not hasattr(pool, "__len__"):
        return pool.filter(keep), None
    if "path" not in pool.column_names:
        return pool, 0
    mask = [keep({"path": p}) for p in pool["path"]]
    gone = len(mask) - sum(mask)
    return (pool.select([i for i, k in enumerate(mask) if k]) if gone else pool), gone


def resume_refusal(before: dict | None, now: dict | None) -> str | None:
    """A resumed run must train on the corrections it started with (that the run uses
    data.corrections at all is in config.yaml, which a resume already checks)."""
    if not before or not now or before.get("sha256") == now.get("sha256"):
        return None
    return (f"data.corrections changed since the run started ({', '.join(now['files'])}: sha256 "
            f"{str(before.get('sha256'))[:12]} then, {now['sha256'][:12]} now); a resumed run must train on the same "
            "labels: start a new output_dir= (or resume with the file as it was)")
