"""Shared fixtures: tiny generated data sets that train in seconds on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def toy_image(bracket: int, rng: np.random.Generator, size: int = 24) -> Image.Image:
    """An image whose brightness and stripe count encode the bracket, with noise."""
    base = 20 + bracket * 22
    arr = np.full((size, size, 3), base, dtype=np.int16)
    arr[:, : (bracket + 1) * size // 12, 0] += 60
    arr += rng.integers(-15, 16, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_scored_set(root: Path, per_bracket: int = 6, seed: int = 0, brackets=range(11), size: int = 24) -> Path:
    rng = np.random.default_rng(seed)
    for b in brackets:
        d = root / f"{b:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_bracket):
            toy_image(b, rng, size).save(d / f"img_{b}_{i}.png")
    return root


def make_pool(root: Path, n: int = 40, seed: int = 1, size: int = 24) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        toy_image(int(rng.integers(0, 11)), rng, size).save(sub / f"u{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("toy")
    return {
        "labeled": make_scored_set(root / "labeled", per_bracket=8),
        "test": make_scored_set(root / "test", per_bracket=3, seed=5),
        "unlabeled": make_pool(root / "unlabeled", n=48),
    }


TINY = [
    "model.name=test_resnet",
    "data.image_size=32",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.uratio=2",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.tracker=none",
    "eval.batch_size=64",
]


def run_script(script: str, *args, env=None, check=True, timeout=600, launcher=None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(ROOT / "ssl" / script), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc
