"""Probe run configs: shipped with the package, named when wrong."""

import pytest

from memlens.core.errors import ConfigError
from memlens.steps.probe import load_config


def test_configs_ship_with_the_package_and_a_wrong_name_lists_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found through the package, from any working directory
    cfg = load_config("organism")
    assert cfg.model.organism == "small" and "blocks.*.hook_resid_post" in cfg.capture.sites
    assert cfg.source.endswith("memlens/configs/organism.toml")
    assert load_config(cfg) is cfg
    with pytest.raises(ConfigError, match=r"organsim.*\['organism'\]"):
        load_config("organsim")
