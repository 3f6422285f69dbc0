"""Checkpoints that are whole or absent.

A checkpoint is written into `checkpoints/.tmp-step_XXXXXXX`, then renamed to
`checkpoints/step_XXXXXXX` (an atomic rename on one file system). Only folders with the
final name and a `progress.json` inside count, so a run killed mid-write leaves a temp
folder that is ignored and cleaned up, never a checkpoint that looks whole.

Accelerate's `save_state` holds the model, optimiser and RNG states; our own state (EMA
weights, the algorithm's thresholds and statistics, the schedule) goes beside it as
safetensors and JSON, so nothing is ever read back with pickle.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "progress.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def temp_dir_for(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f".tmp-step_{step:07d}"


def final_dir_for(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def write_extras(folder: Path, tensors: dict[str, dict], progress: dict) -> None:
    """tensors: {file stem: {name: tensor}}; progress: JSON, written last."""
    for stem, state in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / f"{stem}.safetensors"))
    (folder / "progress.json").write_text(json.dumps(progress, indent=1))


def rank_file(stem: str, rank: int) -> str:
    return f"{stem}_rank{rank}.safetensors"


def write_rank_state(folder: Path, stem: str, rank: int, state: dict) -> None:
    """State that may differ between processes (an algorithm's per-image memory of the
    images this process saw, e.g. FlexMatch's selected labels): one file per process."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / rank_file(stem, rank)))


def read_rank_state(folder: Path, stem: str, rank: int) -> dict:
    path = folder / rank_file(stem, rank)
    if not path.is_file() and (folder / f"{stem}.safetensors").is_file():  # checkpoints before per-rank files
        path = folder / f"{stem}.safetensors"
    return load_file(str(path))


def read_extras(folder: Path, stems: list[str]) -> tuple[dict, dict]:
    tensors = {stem: load_file(str(folder / f"{stem}.safetensors")) for stem in stems}
    progress = json.loads((folder / "progress.json").read_text())
    return tensors, progress


def publish(run_dir: Path, step: int, keep: int) -> Path:
    """Rename the finished temp folder into place and rotate old checkpoints."""
    tmp, final = temp_dir_for(run_dir, step), final_dir_for(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    dirs = checkpoint_dirs(run_dir)
    for old in dirs[: max(0, len(dirs) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temp(run_dir: Path) -> None:
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
