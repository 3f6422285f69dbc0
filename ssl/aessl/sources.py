"""Where the data comes from when the config does not say: the user's folders or the demo set.

`data.labeled: null` means: use `labeled/` (and `unlabeled/`) beside the scripts when they
hold images, otherwise generate the synthetic demo set once into
`data.synthetic.cache_dir` (never into labeled/ or unlabeled/) and train on that.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .data import DataSourceError, _walk_files
from .images import is_image_file

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _has_images(folder: Path) -> bool:
    """Whether `folder` holds an image, walked as the data loaders walk it: through symlinked
    bracket folders, skipping hidden entries below `folder` only (a checkout under
    ~/.src/ must not look empty and fall back to the synthetic demo)."""
    if not folder.is_dir():
        return False
    return any(is_image_file(p) and p.is_file() for p in _walk_files(folder))


def resolve_sources(data_cfg, is_main: bool = True, wait=lambda: None) -> dict:
    """{'labeled', 'unlabeled', 'test', 'truth', 'origin'} for this run.

    `wait` is called between generation (main process) and use (all processes)."""
    if data_cfg.get("labeled"):
        wait()
        return {
            "labeled": data_cfg["labeled"],
            "unlabeled": data_cfg["unlabeled"] or None,
            "test": data_cfg["test"] or None,
            "truth": None,
            "origin": "config",
        }
    user_labeled, user_unlabeled = REPO_ROOT / "labeled", REPO_ROOT / "unlabeled"
    if _has_images(user_labeled):
        wait()
        return {
            "labeled": str(user_labeled),
            "unlabeled": data_cfg["unlabeled"] or (str(user_unlabeled) if _has_images(user_unlabeled) else None),
            "test": data_cfg["test"] or None,
            "truth": None,
            "origin": "labeled/",
        }
    given = [f"data.{k}={data_cfg[k]}" for k in ("unlabeled", "test") if data_cfg[k]]
    if given:  # e.g. data.labeled=$UNSET_VARIABLE: the demo's labels must not meet the user's images
        raise DataSourceError(
            f"data.labeled is not set and {user_labeled} holds no scored images, so this run would train on the "
            f"synthetic demo labels against your {' and '.join(given)}; set data.labeled= to your scored images "
            "(a folder of <score>/ subfolders or a manifest)")
    syn = data_cfg["synthetic"]
    out = Path(syn["cache_dir"])
    if not out.is_absolute():
        out = REPO_ROOT / out
    out = out / f"l{syn['labeled']}_u{syn['unlabeled']}_t{syn['test']}_s{syn['size']}_seed{syn['seed']}"
    if is_main:
        from .synth import generate

        log.info("no scored images in %s: using the synthetic demo set in %s", user_labeled, out)
        generate(out, labeled=syn["labeled"], unlabeled=syn["unlabeled"], test=syn["test"], size=syn["size"],
                 seed=syn["seed"])
    wait()
    return {
        "labeled": str(out / "labeled"),
        "unlabeled": data_cfg["unlabeled"] or str(out / "unlabeled"),
        "test": data_cfg["test"] or str(out / "test"),
        "truth": str(out / "truth.parquet"),
        "origin": "synthetic",
    }
