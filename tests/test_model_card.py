"""model/README.md, the model card written at the end of training (aessl/modelcard.py), and
ssl/push.py, which publishes model/ with it: to a local folder here (the Hub is not
reachable), and through huggingface_hub's upload calls with the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from torch.utils.data import DataLoader

from conftest import data_args, read_metrics, script_in_process, train_in_process

from aessl.data import EvalDataset, bracket_histogram, load_pool
from aessl.models import load_model_folder
from aessl.scoring import bracket_probs
from aessl.transforms import eval_transform


@pytest.fixture(scope="module")
def run(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    assert train_in_process(*data_args(toy_data), "train.steps=20", "train.eval_every=10", "train.save_every=20",
                            "algorithm.name=fixmatch", f"output_dir={out}") == 0
    return out


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def predicted_histogram(run, test_folder) -> list[int]:
    """The argmax brackets of the saved model on the test images, recomputed here."""
    model, info = load_model_folder(run)
    pool = load_pool(str(test_folder))
    loader = DataLoader(EvalDataset(pool, eval_transform(info), info["image_size"]), batch_size=64)
    probs = np.concatenate([p.numpy() for p, _ in bracket_probs(model, loader, "cpu", torch.float32)])
    return bracket_histogram(probs.argmax(1))


def row(card: str, first_cell: str) -> list[str]:
    line = next(l for l in card.splitlines() if l.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_training_writes_a_card_with_the_runs_real_numbers(run, toy_data):
    card = (run / "model" / "README.md").read_text()
    last = read_metrics(run)[-1]
    meta = front_matter(card)
    assert meta["library_name"] == "aessl" and meta["pipeline_tag"] == "image-classification"
    assert {"aessl", "fixmatch", "test_resnet", "image-mode"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == "run" and results["dataset"]["split"] == "test"
    got = {m["type"]: m["value"] for m in results["metrics"]}
    for key, hub in [("mae", "mae"), ("qwk", "qwk"), ("spearman", "spearmanr"), ("false_positive_rate",
                                                                                 "false_positive_rate")]:
        assert got[hub] == pytest.approx(last[key], abs=1e-4)
        assert f"| {last[key]:.3f} |" in card
    assert f"after step {last['step']} on the held-out test split ({last['num_images']} images" in card

    # the bracket table: train counts from run.json, test counts from the test set, predicted
    # counts of the saved model recomputed here, recall from metrics.jsonl
    run_info = json.loads((run / "run.json").read_text())
    test_hist = [len(list((toy_data["test"] / f"{b:02d}").iterdir())) for b in range(11)]  # conftest's bracket folders
    pred = predicted_histogram(run, toy_data["test"])
    for b in range(11):
        cells = row(card, str(b))
        assert cells[2:5] == [str(run_info["train_histogram"][b]), str(test_hist[b]), str(pred[b])]
        assert cells[5] == f"{last[f'recall_{b}']:.2f}"
    low = test_hist[0] + test_hist[1]
    assert f"**{last['false_positive_rate']:.3f}**: {round(last['false_positive_rate'] * low)} of its {low} images" in card

    # data sizes by name, never the local paths; the key settings
    assert row(card, "scored images for training")[1] == f"{run_info['train_images']} from `labeled`"
    assert row(card, "unlabeled pool")[1] == f"{run_info['pool_images']} from `unlabeled`"
    assert str(toy_data["labeled"]) not in card and str(run) not in card
    assert row(card, "algorithm")[1].startswith("`fixmatch`") and "## Intended use" in card and "## Known limits" in card
    assert ModelCard(card).data.eval_results[0].metric_value == pytest.approx(last["mae"], abs=1e-4)  # the Hub parses it


def push(*args) -> int:
    return script_in_process("push.py", *args)


def test_push_to_a_local_folder_copies_model_and_card(run, tmp_path, capsys):
    dest = tmp_path / "hub"
    assert push("--model", run, "--repo", "me/anime-aes", "--local-dir", dest, "--license", "apache-2.0") == 0
    assert "what --repo me/anime-aes would receive" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (dest / name).read_bytes() == (run / "model" / name).read_bytes()
    card = ModelCard.load(dest / "README.md")
    original = ModelCard.load(run / "model" / "README.md")
    assert card.data.model_name == "me/anime-aes" and card.data.license == "apache-2.0"
    assert card.text.lstrip().startswith("# me/anime-aes\n")
    assert [r.metric_value for r in card.data.eval_results] == [r.metric_value for r in original.data.eval_results]
    assert card.text.split("\n", 2)[2] == original.text.split("\n", 2)[2]  # the body is the training card's

    # a model folder trained before cards existed: the card is written from its run folder
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("checkpoints"))
    (old / "model" / "README.md").unlink()
    assert push("--model", old, "--repo", "me/old", "--local-dir", tmp_path / "hub2") == 0
    regenerated = ModelCard.load(tmp_path / "hub2" / "README.md")
    assert regenerated.data.model_name == "me/old" and len(regenerated.data.eval_results) == 7
    assert not (old / "model" / "README.md").exists()  # the model folder is not touched


def test_push_to_the_hub_uploads_the_same_files_in_one_commit(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls.append(("upload_folder", repo_id, files, kw))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message="",
                                          commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert push("--model", run / "model", "--repo", "me/anime-aes", "--private") == 0
    assert "https://huggingface.co/me/anime-aes/commit/abc" in capsys.readouterr().out
    (op1, repo1, kw1), (op2, repo2, files, kw2) = calls
    assert (op1, repo1, kw1["private"], kw1["exist_ok"]) == ("create_repo", "me/anime-aes", True, True)
    assert op2 == "upload_folder" and repo2 == "me/anime-aes" and kw2["repo_type"] == "model"
    local = tmp_path / "local"
    assert push("--model", run, "--repo", "me/anime-aes", "--local-dir", local) == 0
    assert files == {p.name: p.read_bytes() for p in local.iterdir()}  # what the local folder gets is what is sent


def test_push_errors_name_the_input(run, tmp_path, monkeypatch, capsys):
    assert push("--model", tmp_path / "nope", "--repo", "me/x", "--local-dir", tmp_path / "d") == 2
    assert f"{tmp_path / 'nope'}: not a model folder" in capsys.readouterr().err
    (tmp_path / "fake.onnx").write_text("not onnx")
    assert push("--model", run, "--repo", "me/x", "--onnx", tmp_path / "fake.onnx", "--local-dir", tmp_path / "d") == 2
    assert f"{tmp_path / 'fake.onnx'}: not a usable ONNX model" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here either way: fail fast
    assert push("--model", run, "--repo", "me/x") == 2
    err = capsys.readouterr().err
    assert "--repo me/x: the upload failed" in err and "--local-dir DIR writes the same files locally" in err
