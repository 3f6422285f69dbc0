"""Publishing a model/ folder with its card (ssl/push.py): to the Hugging Face Hub, or to a
local folder that receives exactly the files the Hub would.

    stage(model, repo, onnx=None, license=None) -> a temp folder: config.json,
        model.safetensors, README.md (the card, named after the repo), model.onnx (optional)
    to_local(staged, dest)   copy them into dest (each file whole: temp name, then rename)
    to_hub(staged, repo)     HfApi.create_repo(exist_ok) + HfApi.upload_folder: one commit

Both destinations get the same staged folder, so what the local one holds is what an upload
sends. The Hub is not reachable from where this was written and tested: `to_hub` is
huggingface_hub's documented two calls, with its errors turned into one message.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard

from .modelcard import CARD_FILE, card_for_run
from .models import MODEL_FORMAT, model_sha256, resolve_model_folder

MODEL_FILES = ("config.json", "model.safetensors")


class PushError(Exception):
    """Input or a destination that cannot be used; the message names it."""


def card_text(folder: Path, info: dict, repo: str, license: str | None) -> str:
    """model/README.md with the repo as its name (model-index and title) and the license;
    a folder trained before cards existed gets one written from its run folder now."""
    path = folder / CARD_FILE
    if path.is_file():
        text = path.read_text()
    else:
        run_dir = folder.parent if folder.name == "model" and (folder.parent / "run.json").is_file() else None
        text = card_for_run(run_dir, info)
    card = ModelCard(text)
    old = card.data.model_name
    card.data.model_name = repo
    if license:
        card.data.license = license
    if old and card.text.lstrip("\n").startswith(f"# {old}\n"):
        card.text = card.text.replace(f"# {old}\n", f"# {repo}\n", 1)
    return card.content


def check_onnx(onnx: Path, folder: Path, info: dict) -> None:
    """An .onnx file shipped beside the weights must be this model's."""
    from .onnx_backend import OnnxError, OnnxScorer, check_same_model

    try:
        check_same_model(onnx, OnnxScorer(onnx), folder, info, model_sha256(folder))
    except OnnxError as exc:
        raise PushError(f"--onnx: {exc}") from None


def stage(model: str | Path, repo: str, onnx: str | Path | None = None, license: str | None = None) -> Path:
    """A temp folder with exactly what is published (the caller removes it)."""
    try:
        folder = resolve_model_folder(model)
    except FileNotFoundError as exc:
        raise PushError(f"--model: {exc}") from None
    try:
        info = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PushError(f"{folder / 'config.json'}: unreadable ({exc})") from None
    if info.get("format") != MODEL_FORMAT or not (folder / "model.safetensors").is_file():
        raise PushError(f"{folder}: not a model folder of this tool (config.json format {info.get('format')!r}, "
                        "model.safetensors needed)")
    if onnx is not None:
        check_onnx(Path(onnx), folder, info)
    staged = Path(tempfile.mkdtemp(prefix="aessl-push-"))
    for name in MODEL_FILES:
        shutil.copy2(folder / name, staged / name)
    (staged / CARD_FILE).write_text(card_text(folder, info, repo, license))
    if onnx is not None:
        shutil.copy2(onnx, staged / "model.onnx")
    return staged


def to_local(staged: Path, dest: str | Path) -> list[str]:
    """Copy the staged files into `dest` (created); files of the same name are replaced, each
    whole (temp name, then rename), others left as they are, as an upload leaves them."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in staged.iterdir())
        for name in names:
            tmp = dest / f".{name}.tmp"
            shutil.copy2(staged / name, tmp)
            os.replace(tmp, dest / name)
    except OSError as exc:
        raise PushError(f"--local-dir {dest}: {exc}") from None
    return names


def to_hub(staged: Path, repo: str, private: bool = False, revision: str | None = None,
           message: str | None = None) -> str:
    """Create the model repo if needed and upload the staged folder as one commit; its URL."""
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(staged), repo_type="model", revision=revision,
                                 commit_message=message or "Upload aessl model")
    except Exception as exc:  # offline, no token, no rights, a bad name: huggingface_hub's many error types
        raise PushError(f"--repo {repo}: the upload failed ({type(exc).__name__}: {exc}). Log in with `hf auth login` "
                        "(or set HF_TOKEN); --local-dir DIR writes the same files locally") from None
    return str(getattr(info, "commit_url", info))
