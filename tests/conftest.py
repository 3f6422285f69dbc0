"""Shared fixtures and helpers: tiny generated data sets that train in seconds on a CPU,
and the ways the tests run the scripts (in this process, as a subprocess, on two processes,
killed and resumed)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import socket
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


def random_model(folder: Path, seed: int, thresholds=(), size: int = 32) -> Path:
    """A test_resnet model folder written without training, its logits spread so scores and
    brackets differ between images; returns the folder above it (a run folder: --model takes
    either). thresholds: the per-bracket acceptance thresholds recorded (none: the default)."""
    import torch

    from aessl.models import build_model, save_model_folder

    torch.manual_seed(seed)
    model, info = build_model({"name": "test_resnet", "pretrained": False}, size)
    with torch.no_grad():  # random logits are near zero: spread them
        model.backbone.get_classifier().weight.mul_(40)
    save_model_folder(model, info, folder, {"thresholds": list(thresholds)})
    return folder.parent


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

EMB = ["model.mode=embedding", "model.head=mlp", "model.head_hidden=32", "embed.shard_size=16", "embed.batch_size=32"]


def data_args(toy) -> list[str]:
    """The data.labeled / data.test / data.unlabeled overrides for a toy_data-like dict."""
    return [f"data.labeled={toy['labeled']}", f"data.test={toy['test']}", f"data.unlabeled={toy['unlabeled']}"]


def read_metrics(run: Path) -> list[dict]:
    """A run folder's metrics.jsonl, one dict per evaluation."""
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def run_script(script: str, *args, env=None, check=True, timeout=600, launcher=None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(ROOT / "ssl" / script), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def _load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_in_process(*overrides) -> int:
    """ssl/train.py's main() on configs/demo.yaml + TINY + overrides, in this process; its exit code."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return _load_script("aessl_train_script", ROOT / "ssl" / "train.py").main(
            ["--config", str(ROOT / "configs" / "demo.yaml"), *TINY, *overrides])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def script_in_process(script: str, *args) -> int:
    """ssl/<script>'s main(argv) in this process (its Accelerator's state reset afterwards)."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return _load_script(f"aessl_{Path(script).stem}_script", ROOT / "ssl" / script).main([str(a) for a in args])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def report_main():
    """ssl/report.py's main(), called in this process (saves a Python start per test)."""
    return _load_script("report_script", ROOT / "ssl" / "report.py").main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_launcher(port: bool = True) -> list[str]:
    """`accelerate launch` of two processes on one machine (run them on the CPU with
    ACCELERATE_USE_CPU=1); with port, on a free --main_process_port, else on accelerate's default."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launcher + ["--main_process_port", str(free_port())] if port else launcher


def train_until_killed(script_args, output_dir, kill_at, env=None, launcher=None) -> subprocess.CompletedProcess:
    """train.py with script_args into output_dir, killed by AESSL_KILL_AT_STEP at step kill_at
    (not checked: the caller asserts the return code)."""
    return run_script("train.py", *script_args, f"output_dir={output_dir}",
                      env={**(env or {}), "AESSL_KILL_AT_STEP": str(kill_at)}, check=False, launcher=launcher)


KILLED = 137  # the exit code of the AESSL_KILL_AT_STEP hook (os._exit(137), as SIGKILL)


def kill_then_resume(script_args, output_dir, kill_at, env=None, launcher=None,
                     in_process=None) -> subprocess.CompletedProcess:
    """train_until_killed, then the same arguments with resume=true (which must succeed).
    Returns the killed run's process for the caller to assert on; where it did not exit
    KILLED, it returns without resuming, so that assertion reports the kill, not the resume.
    The kill is always a real process dying; the resume runs in this process (a Python start
    saved) unless it needs its own environment or launcher, or in_process=False."""
    killed = train_until_killed(script_args, output_dir, kill_at, env=env, launcher=launcher)
    if killed.returncode == KILLED:
        if in_process is None:
            in_process = env is None and launcher is None
        if in_process:
            assert script_in_process("train.py", *script_args, f"output_dir={output_dir}", "resume=true") == 0
        else:
            run_script("train.py", *script_args, f"output_dir={output_dir}", "resume=true", env=env, launcher=launcher)
    return killed
