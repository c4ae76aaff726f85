"""The distillation job's teachers, read by both ``method.prepare_sweep`` (the engine's
sweeps) and ``experiment`` (``jobs/distill.py``): the checks before any work and the M
teachers, ``distill.teachers`` or the zoo of ``distill.teacher_config`` (its missing seeds
trained first). Imports neither ``method`` nor ``experiment``.
"""

from __future__ import annotations

from dataclasses import dataclass

from metaensemble import engine
from metaensemble.config import Config
from metaensemble.errors import ConfigError
from metaensemble.teachers import zoo_teachers
from metaensemble.validation import load_config

METHODS = ("kd", "latentbe", "tdiv_sdiv")
"""The students the job compares (``distill.methods`` picks among them), by method name."""


@dataclass
class Teacher:
    uri: str
    label: str
    """What a student's tags name it by: ``teacher.digits.convnet v3`` or its URI."""


def members(cfg: Config, tcfg: Config | None) -> int:
    if cfg.latentbe.members:
        return cfg.latentbe.members
    if cfg.distill.teachers:
        return len(cfg.distill.teachers)
    return tcfg.zoo.num_teachers


def validate(cfg: Config) -> Config | None:
    """Everything checkable before any work; returns the teacher recipe (None when the
    teachers are given as ``distill.teachers``)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"jobs/distill.py trains students with {', '.join(METHODS)}; got method={cfg.method!r}")
    for i, name in enumerate(cfg.distill.methods or ()):
        if name not in METHODS:
            valid = ", ".join(map(repr, METHODS[:-1])) + f" or {METHODS[-1]!r}"
            raise ConfigError(f"distill.methods.{i}: Input should be {valid} (the students jobs/distill.py "
                              f"trains); got {name!r}")
    if len(set(cfg.distill.seeds)) != len(cfg.distill.seeds):
        raise ConfigError(f"distill.seeds has repeats: {cfg.distill.seeds}")
    if len(cfg.distill.seeds) < 2:
        raise ConfigError(f"distill.seeds={cfg.distill.seeds}: the table's +- std needs at least 2 seeds")
    engine.validate(cfg.with_overrides({"method": "supervised"}))  # data, model, optimiser
    tcfg = None
    if not cfg.distill.teachers:
        tcfg = load_config(cfg.distill.teacher_config, [f"storage_path={cfg.storage_path}"])
        m = members(cfg, tcfg)
        if tcfg.zoo.num_teachers < m:
            tcfg = tcfg.with_overrides({"zoo.num_teachers": m})
        theirs = (tcfg.model.name, dict(tcfg.model.kwargs), tcfg.data.name)
        ours = (cfg.model.name, dict(cfg.model.kwargs), cfg.data.name)
        if theirs != ours:
            raise ConfigError(
                f"distill.teacher_config {cfg.distill.teacher_config} trains {theirs[0]!r} {theirs[1]} on "
                f"{theirs[2]!r}, but the student is {ours[0]!r} {ours[1]} on {ours[2]!r}: LatentBE's teachers "
                f"must have the student's architecture and data"
            )
        split = ("val_fraction", "test_fraction", "split_seed")
        if {k: getattr(tcfg.data, k) for k in split} != {k: getattr(cfg.data, k) for k in split}:
            raise ConfigError(
                f"distill.teacher_config {cfg.distill.teacher_config} splits {cfg.data.name} as "
                f"{ {k: getattr(tcfg.data, k) for k in split} }, this job as { {k: getattr(cfg.data, k) for k in split} }: "
                f"set data.val_fraction/test_fraction/split_seed to the teachers' values, so that the students are "
                f"selected and tested on data no teacher trained on"
            )
        engine.validate(tcfg)
    elif len(cfg.distill.teachers) < members(cfg, None):
        raise ConfigError(f"latentbe.members={cfg.latentbe.members} but distill.teachers has "
                          f"{len(cfg.distill.teachers)}: member m is distilled from teacher m")
    return tcfg


def resolve_teachers(cfg: Config, *, train_missing: bool = True) -> tuple[Config, list[Teacher]]:
    """Validate and take the M teachers (training the zoo's missing ones); returns ``cfg``
    with ``distill.teachers``, ``latentbe.members`` and ``distill.methods`` filled in, and
    the teachers."""
    tcfg = validate(cfg)
    m = members(cfg, tcfg)
    if tcfg is None:
        teachers = [Teacher(u, u) for u in cfg.distill.teachers[:m]]
    else:
        teachers = [Teacher(uri, label) for uri, label in zoo_teachers(tcfg, m, train_missing)]
    resolved = {"distill.teachers": [t.uri for t in teachers], "latentbe.members": m,
                "distill.methods": list(cfg.distill.methods or METHODS)}
    return cfg.with_overrides(resolved), teachers
