"""The model card: `model/README.md`, written with the weights at the end of training, in the
Hugging Face model-card format (YAML front matter, then Markdown), so it travels with the
folder to the Hub (ssl/push.py) or anywhere else.

What it says is what a person deciding whether to use the model asks (DESIGN.md, and the
seed model card it grew from): how well it scores held-out images (MAE, QWK, Spearman,
accuracy, top-k precision) and how often it makes the error users mind most, a photo, meme
or manga panel (bracket <= 1) scored at 50% or more; the bracket histogram of the training
and test images beside the predicted one; which data and how much of it; the algorithm and
the settings that change what is learned; what it is for (sort a big pool, keep the top N)
and what it is not.

The front matter is built with huggingface_hub's ModelCardData (tags, library_name, metrics
and a model-index with the test results), so the Hub reads the numbers as it reads any
card's. Local paths of the data are not written (a card is meant to be published): only
their names; run.json in the run folder keeps the paths.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCardData

from . import runfolder
from .metrics import HIGH_SCORE_MIN, LOW_BRACKET_MAX, NUM_BRACKETS

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
MEANING = ["real-life photos, noise, excessive text (subtitles, memes)", "manga panels, no subject, non-human subjects",
           "sketches, oekaki, rough lineart", "sketches, oekaki, rough lineart",
           "flat shading, TV screenshots, average images"] + ["\"high quality\", increasingly so"] * 6
# (key in metrics.jsonl, Hub metric id, what the card calls it)
METRICS = [("mae", "mae", "MAE (brackets)"), ("qwk", "qwk", "quadratic-weighted kappa"),
           ("spearman", "spearmanr", "Spearman ρ"), ("accuracy", "accuracy", "exact bracket accuracy"),
           ("accuracy_within_1", "accuracy_within_1", "within ±1 bracket"),
           ("false_positive_rate", "false_positive_rate", "false-positive rate"),
           ("top_k_precision", "top_k_precision", "top-k precision")]
TARGET_TEXT = {"classification": "classification: a softmax over the 11 brackets",
               "regression": "regression: one score 0-10, its probabilities the two brackets around it",
               "ordinal": "ordinal (CORN): 10 cumulative 'bracket > k' logits, rank-consistent"}


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def front_matter(info: dict, metrics: dict, cfg: dict, name: str) -> str:
    """The YAML block: tags the Hub filters on, and the test results as a model-index."""
    algorithm = info.get("algorithm") or cfg.get("algorithm", {}).get("name", "")
    tags = ["aessl", "aesthetic-scoring", "anime", "image-classification", "semi-supervised", "timm",
            info.get("architecture", ""), algorithm, f"target-{info.get('target', 'classification')}",
            f"{info.get('mode', 'image')}-mode"]
    split = f"held-out test split ({metrics.get('num_images', '?')} images)"
    results = [EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=split,
                          dataset_split="test", metric_type=hub_id, metric_name=title, metric_value=round(metrics[k], 4))
               for k, hub_id, title in METRICS if _finite(metrics.get(k))]
    data = ModelCardData(library_name="aessl", pipeline_tag="image-classification",
                         tags=list(dict.fromkeys(t for t in tags if t)),
                         metrics=[hub_id for _, hub_id, _ in METRICS], model_name=name,
                         eval_results=results or None)
    return f"---\n{data.to_yaml()}\n---\n"


def summary(info: dict, cfg: dict, name: str) -> str:
    """Title, one paragraph and the table of what the model is."""
    size = info.get("image_size")
    mode = info.get("mode", "image")
    what = (f"`{info.get('architecture')}` (timm), fine-tuned end to end" if mode == "image" else
            f"`{info.get('architecture')}` (timm, frozen) + a `{info.get('head', {}).get('name')}` head on its features")
    pretrained = cfg.get("model", {}).get("pretrained")
    rows = [("network", what), ("pretrained from", f"`{pretrained}`" if pretrained not in (None, False, "false") else
                                "random init"),
            ("target", TARGET_TEXT.get(info.get("target", "classification"), info.get("target"))),
            ("input", f"{size} × {size} RGB, mean {info.get('mean')}, std {info.get('std')}, "
                      f"{info.get('interpolation')} resize, crop_pct {info.get('crop_pct')}"),
            ("trained with", f"`{info.get('algorithm', '?')}`, {info.get('trained_steps', '?')} steps, seed {info.get('seed')}"),
            ("files", "`model.safetensors` (weights), `config.json` (everything needed to load it), `README.md`")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"# {name}\n\nAn anime aesthetic scorer trained with aessl: for each image it gives 11 probabilities over "
            "the score brackets 0-10, their expected score (0-10) and that score in percent (× 10), the scale of "
            "the CityAesthetics model card. Sort a pool by it and keep the top N.\n\n"
            f"| | |\n|---|---|\n{table}\n")


def metrics_section(metrics: dict, info: dict) -> str:
    """The last evaluation of the EMA teacher on the held-out test split."""
    if not metrics:
        return "## Test metrics\n\nNo evaluation was recorded for this model.\n"
    k = metrics.get("top_k")
    rows = []
    for key, _, title in METRICS:
        label = f"{title} (k = {k})" if key == "top_k_precision" and k else title
        rows.append(f"| {label} | {_num(metrics.get(key))} |")
    return (f"## Test metrics\n\nThe EMA teacher after step {metrics.get('step', info.get('trained_steps', '?'))} on "
            f"the held-out test split ({metrics.get('num_images', '?')} images, never trained on). MAE is in "
            "brackets (0-10) of the expected score; top-k precision is the share of the k highest-scored test "
            "images that are truly among the k best.\n\n| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n")


def histogram_section(metrics: dict, train_hist, test_hist, pred_hist) -> str:
    """Per bracket: what it means, training and test images, predicted on test, test recall."""
    cols = [("train images", train_hist), ("test images", test_hist), ("predicted on test", pred_hist)]
    cols = [(title, h) for title, h in cols if h is not None and len(h) == NUM_BRACKETS]
    head = "| bracket | meaning | " + " | ".join(t for t, _ in cols) + " | test recall |"
    rule = "|---|---|" + "---:|" * (len(cols) + 1)
    rows = [f"| {b} | {MEANING[b]} | " + " | ".join(str(int(h[b])) for _, h in cols)
            + f" | {_num((metrics or {}).get(f'recall_{b}'), 2)} |" for b in range(NUM_BRACKETS)]
    return "### Brackets\n\n" + "\n".join([head, rule, *rows]) + "\n"


def false_positive_section(metrics: dict, test_hist) -> str:
    """The error users mind most, said in images as well as a rate."""
    rate = (metrics or {}).get("false_positive_rate")
    low = int(sum(test_hist[: LOW_BRACKET_MAX + 1])) if test_hist is not None else None
    text = (f"## False positives\n\nThe error that costs most when filtering: an image of bracket ≤ {LOW_BRACKET_MAX} "
            f"(a photo, noise, a meme, a manga panel) scored {HIGH_SCORE_MIN:.0f} or more ({HIGH_SCORE_MIN * 10:.0f}%). "
            f"On the test split the false-positive rate is **{_num(rate)}**")
    if low is not None and _finite(rate):
        text += f": {round(rate * low)} of its {low} images of bracket ≤ {LOW_BRACKET_MAX}"
    text += "."
    if low is not None and low < 30:
        text += (f" With {low} such images this is a rough estimate: score a larger set of photos, memes and "
                 "panels before trusting the model as a filter (`python ssl/report.py`).")
    return text + "\n"


def _source_name(path) -> str:
    """A data source by name only (a card is meant to be published; run.json keeps paths)."""
    if not path:
        return ""
    text = str(path)
    return text if text.startswith("hub:") else f"`{Path(text).name}`"


def data_section(run_info: dict | None, cfg: dict) -> str:
    """Where the images came from and how many were used."""
    if not run_info:
        return "## Data\n\nNot recorded (no run.json beside this model folder).\n"
    src = runfolder.run_sources(run_info)
    split_seed = run_info.get("split_seed")
    test_from = (f"from {_source_name(src['test'])}" if src.get("test") else
                 f"carved from the labeled set, stratified by bracket (split seed {split_seed}; the run's split.csv)")
    rows = [("scored images for training", f"{run_info.get('train_images', '?')} from {_source_name(src.get('labeled'))}"),
            ("held-out test images", f"{run_info.get('test_images', '?')} {test_from}"),
            ("unlabeled pool", f"{run_info.get('pool_images')} from {_source_name(src.get('unlabeled'))}"
             if src.get("unlabeled") else "none")]
    pseudo = run_info.get("pseudo_labels")
    if pseudo:
        used = pseudo.get("rows_used", pseudo.get("rows_resolved", "?"))
        rows.append(("pseudo-labels", f"{used} exported pool rows joined the labels as soft targets, weight "
                                      f"{pseudo.get('weight')} ({len(pseudo.get('exports') or [])} export(s))"))
    leak = (run_info.get("leakage") or {})
    hits = {k: v.get("test_images_hit", 0) for k, v in leak.items() if isinstance(v, dict)}
    if hits:  # keys like test_vs_train: the same file or the same bytes on both sides
        found = [f"{n} test image(s) also in {k.split('_vs_')[-1]}" for k, n in hits.items() if n]
        checked = " and ".join(k.split("_vs_")[-1] for k in hits)
        rows.append(("test-set leakage check", "; ".join(found) if found else f"no test image found in {checked}"))
    if src.get("origin") == "synthetic":
        rows.append(("note", "the built-in **synthetic** demo set: these numbers say nothing about real images"))
    return "## Data\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def training_section(info: dict, cfg: dict, run_info: dict | None) -> str:
    """The settings that change what is learned (the run's config.yaml has them all)."""
    a, t, d, m = (cfg.get(k, {}) for k in ("algorithm", "train", "data", "model"))
    thresholds = info.get("thresholds") or []
    thr = ("none recorded (export uses 0.95 for every bracket)" if not thresholds else
           f"{thresholds[0]:.3g} for every bracket" if len(set(thresholds)) == 1 else
           ", ".join(f"{v:.3g}" for v in thresholds))
    rows = [("algorithm", f"`{a.get('name', info.get('algorithm'))}`, λ_u {a.get('lambda_u')}, "
                          f"arguments {a.get('args') or '{}'}"),
            ("steps", f"{info.get('trained_steps', t.get('steps'))} × batch {t.get('batch_size')} labeled "
                      f"(+ {t.get('uratio')} × unlabeled), grad_accum {t.get('grad_accum')}"),
            ("optimiser", f"{t.get('optimizer')}, lr {t.get('lr')}, weight decay {t.get('weight_decay')}, "
                          f"warmup {t.get('warmup_steps')} steps, cosine schedule"),
            ("EMA teacher", f"decay {t.get('ema_decay')} (the saved weights are the teacher's)"),
            ("image size", f"{d.get('image_size', info.get('image_size'))} px, crop_pct {d.get('crop_pct')}"),
            ("model", f"`{m.get('name', info.get('architecture'))}`, mode {m.get('mode', 'image')}, "
                      f"target {m.get('target', 'classification')}, drop_rate {m.get('drop_rate')}"),
            ("pseudo-label thresholds", f"{thr}; confidence radius {info.get('confidence_radius', 0)}"),
            ("precision, processes", f"{ {'no': 'fp32'}.get(t.get('mixed_precision'), t.get('mixed_precision'))}, "
                                     f"{(run_info or {}).get('num_processes', '?')} process(es) on "
                                     f"{(run_info or {}).get('device', '?')}"),
            ("seed", str(cfg.get("seed", info.get("seed"))))]
    return "## Training\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def use_section() -> str:
    """What the model is for, and the commands that use it."""
    return """## Intended use

Baseline filtering and ranking of large anime image sets: score a pool, **sort by score and
keep the top N** rather than cutting at a fixed percent; the scores above 50% are the vaguest
part of the scale, the order at the top is what the metrics above measure (top-k precision,
Spearman). Below 10% sits what should go first: photos, noise, text.

```bash
python ssl/export.py --model MODEL_DIR --images POOL --out OUT --top 100   # parquet, top.csv, a contact sheet
python ssl/export_onnx.py --model MODEL_DIR --out model.onnx               # then export.py --onnx model.onnx
python ssl/report.py MODEL_DIR --data SCORED_SET --out REPORT              # metrics, plots, image grids
```

```python
from aessl.models import load_model_folder   # model(x)["logits"]; aessl.targets turns them into probabilities
model, info = load_model_folder("MODEL_DIR")
```
"""


def limits_section(metrics: dict, train_hist, algorithm: str | None) -> str:
    """What the numbers do not promise."""
    thin = [b for b in range(NUM_BRACKETS) if train_hist is not None and len(train_hist) == NUM_BRACKETS
            and train_hist[b] < 20]
    lines = ["- It learns the taste of whoever scored the training images, biases included (subjects, styles "
             "and media that set under- or over-represents); it is not a general measure of quality.",
             "- Out of scope: moderation or live filtering, and images unlike the scored set (a model trained on "
             "anime scores photos, 3D renders or western cartoons only as well as its scored examples of them).",
             f"- The test split has {metrics.get('num_images', '?') if metrics else '?'} images: every figure above "
             "carries that sampling error, and per-bracket recall much more of it."]
    if thin:
        lines.append(f"- Brackets with fewer than 20 training images ({', '.join(map(str, thin))}) are the least "
                     "reliable: their probabilities lean toward the crowded brackets.")
    if algorithm and algorithm != "supervised":
        lines.append(f"- `{algorithm}` also learns from its own confident guesses on the unlabeled pool: a pool "
                     "unlike the images it will score can pull it off course. Compare with a supervised run "
                     "(`algorithm.name=supervised`) on the same split before relying on the pool's gain.")
    return "## Known limits\n\n" + "\n".join(lines) + "\n"


def render_card(info: dict, metrics: dict | None, cfg: dict | None, run_info: dict | None, name: str,
                test_hist=None, pred_hist=None) -> str:
    """The whole README.md text from what a run folder knows (any part may be missing)."""
    metrics, cfg = metrics or {}, cfg or {}
    train_hist = (run_info or {}).get("train_histogram")
    parts = [front_matter(info, metrics, cfg, name), summary(info, cfg, name), metrics_section(metrics, info),
             histogram_section(metrics, train_hist, test_hist, pred_hist), false_positive_section(metrics, test_hist),
             data_section(run_info, cfg), training_section(info, cfg, run_info), use_section(),
             limits_section(metrics, train_hist, info.get("algorithm")),
             "---\n\n*Written by aessl at the end of training (aessl/modelcard.py); edit it freely before publishing "
             "(a license, what the labels are, who scored them).*\n"]
    return "\n".join(parts)


def card_for_run(run_dir: str | Path | None, info: dict, metrics: dict | None = None, test_hist=None,
                 pred_hist=None, name: str | None = None) -> str:
    """render_card with the run folder's config.yaml, run.json and last metrics line (what a
    finished run wrote); works for a bare model folder too, saying less."""
    run_dir = Path(run_dir) if run_dir is not None else None
    cfg = None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        except yaml.YAMLError as exc:
            log.warning("%s: not YAML (%s); the card leaves the training settings out", run_dir / "config.yaml", exc)
    if metrics is None and run_dir is not None:
        lines = runfolder.read_metrics(run_dir)
        metrics = lines[-1] if lines else None
    name = name or (run_dir.name if run_dir is not None else "aessl model")
    return render_card(info, metrics, cfg if isinstance(cfg, dict) else None, runfolder.read_run_info(run_dir), name,
                       test_hist, pred_hist)
