"""The aux-net's teacher, read by both ``method.prepare_sweep`` (the engine's sweeps) and
``experiment`` (``jobs/learngene.py aux``): ``learngene.teacher``, or the first teacher of
``learngene.teacher_config``'s zoo (trained first if missing). Imports neither ``method``
nor ``experiment``.
"""

from __future__ import annotations

from metaensemble import engine
from metaensemble.config import Config
from metaensemble.errors import ConfigError
from metaensemble.validation import load_config


def resolve_teacher(cfg: Config, *, train_missing: bool = True) -> tuple[Config, str]:
    """``cfg`` with ``learngene.teacher`` set (the zoo's first teacher of
    ``learngene.teacher_config`` when none is given) and the teacher's label."""
    if cfg.learngene.teacher:
        return cfg, cfg.learngene.teacher
    from metaensemble.teachers import zoo_teachers

    tcfg = load_config(cfg.learngene.teacher_config, [f"storage_path={cfg.storage_path}"])
    if tcfg.data.name != cfg.data.name:
        raise ConfigError(f"learngene.teacher_config {cfg.learngene.teacher_config} trains on {tcfg.data.name!r}, "
                          f"the aux-net on {cfg.data.name!r}: the teacher must know the aux-net's classes")
    split = ("val_fraction", "test_fraction", "split_seed")
    theirs, ours = ({k: getattr(c.data, k) for k in split} for c in (tcfg, cfg))
    if theirs != ours:
        raise ConfigError(f"learngene.teacher_config {cfg.learngene.teacher_config} splits {cfg.data.name} as "
                          f"{theirs}, the aux-net as {ours}: use the teacher's split, so that the aux-net is "
                          f"selected and tested on data its teacher never trained on")
    engine.validate(tcfg)
    (uri, label), = zoo_teachers(tcfg, 1, train_missing)
    return cfg.with_overrides({"learngene.teacher": uri}), label
