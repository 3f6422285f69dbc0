"""Config overrides and the held-out split."""

from __future__ import annotations

import numpy as np
import pytest

from aessl.config import ConfigError, load_config
from aessl.data import stratified_split
from conftest import ROOT


def test_overrides_types_and_unknown_keys(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.steps=7", "model.pretrained=/w/x.safetensors",
                                                        "algorithm.args.p_cutoff=0.8", "resume=true"])
    assert cfg.train.steps == 7 and cfg.model.pretrained == "/w/x.safetensors" and cfg.resume is True
    assert cfg.algorithm.args.p_cutoff == 0.8
    for bad in ("train.stepz=1", "nope=1", "data.synthetic.sizes=3"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, [bad])
    (tmp_path / "c.yaml").write_text("train:\n  stepss: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*train\.stepss"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_schema_types_need_no_casts_and_yaml_quirks_are_read_as_meant(tmp_path):
    cfg = load_config(None, ["train.steps=1e3", "train.lr=2e-3", "train.mixed_precision=no", "data.max_unlabeled=5"])
    assert type(cfg.train.steps) is int and cfg.train.steps == 1000
    assert type(cfg.train.lr) is float and cfg.train.lr == 0.002
    assert cfg.train.mixed_precision == "no" and cfg.data.max_unlabeled == 5  # YAML 1.1 reads `no` as false
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "c.yaml").train.mixed_precision == "no"
    for bad, key in (("train.steps=2.5", "train.steps"), ("resume=1", "resume"), ("train.lr=nan", "train.lr"),
                     ("train.mixed_precision=true", "train.mixed_precision")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])


def test_paths_and_names_are_taken_as_typed_and_bad_yaml_names_its_file_or_override(tmp_path):
    """A str key's value is its text (YAML 1.1 would make 0123 octal 83, yes true, {a..b} a mapping);
    unparsable YAML, a refused tag and a section given a value are ConfigErrors naming where."""
    cfg = load_config(None, ["output_dir=0123", "data.labeled=*scored", "data.unlabeled={00000..00099}.tar",
                             "model.name=yes", "data.test=null", "embed.cache_dir=@cache"])
    assert (cfg.output_dir, cfg.data.labeled, cfg.data.unlabeled) == ("0123", "*scored", "{00000..00099}.tar")
    assert (cfg.model.name, cfg.data.test, cfg.embed.cache_dir) == ("yes", None, "@cache")
    for bad, where in (("train.steps=[1", r"train\.steps=\[1.*not valid YAML"), ("train=5", "train is a section"),
                       ("data.synthetic=3", r"data\.synthetic is a section.*data\.synthetic\.labeled=")):
        with pytest.raises(ConfigError, match=where):
            load_config(None, [bad])
    for text, where in ((": bad yaml [", "not a YAML file"), ("x: !!python/object/apply:os.system [ls]", "python/object"),
                        ("train: [1, 2]", "train is a section")):
        (tmp_path / "c.yaml").write_text(text + "\n")
        with pytest.raises(ConfigError, match=rf"c\.yaml: .*{where}"):
            load_config(tmp_path / "c.yaml")


def test_defaults_are_the_demo_config():
    """configs/demo.yaml states the demo explicitly; with no config file the defaults are the same run."""
    from aessl.config import to_dict

    assert to_dict(load_config(None)) == to_dict(load_config(ROOT / "configs" / "demo.yaml"))


def test_stratified_split_is_fixed_and_stratified():
    brackets = np.repeat(np.arange(11), [31, 162, 533, 675, 690, 576, 228, 95, 54, 29, 7])
    a = stratified_split(brackets, 0.1, seed=0)
    assert np.array_equal(a, stratified_split(brackets, 0.1, seed=0))
    assert not np.array_equal(a, stratified_split(brackets, 0.1, seed=1))
    for b, n in enumerate([31, 162, 533, 675, 690, 576, 228, 95, 54, 29, 7]):
        got = int(a[brackets == b].sum())
        assert got == min(int(np.floor(n * 0.1 + 0.5)), n - 1)
    # a bracket with a single image stays in training
    assert not stratified_split(np.array([0, 1, 1, 1]), 0.5, seed=0)[0]
