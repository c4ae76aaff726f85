"""A config as a job takes it: the schema's checks (``config.read_config``: YAML and
overrides, keys, types, ranges, method sections) and then every name against its
registry: the method's, the datasets' and the models'. The schema imports none of the
registries; this is where they meet.

    cfg = load_config("configs/meta/digits.yaml", ["meta.zoo_size=8"])   # or ConfigError, before any work
"""

from __future__ import annotations

from pathlib import Path

from metaensemble.config import Config, read_config
from metaensemble.methods import registry


def check_names(cfg: Config) -> Config:
    """The method, dataset and model names against their registries; an unknown one
    raises a ConfigError that lists the known ones. (Imports torch, through the dataset
    and model registries: importing this module does not.)"""
    from metaensemble import data, models

    registry.check_name(cfg.method)
    data.check_name(cfg.data.name)
    data.check_keys(cfg.data)
    models.check_name(cfg.model.name)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply dotted overrides, validate it whole."""
    return check_names(read_config(path, overrides))
