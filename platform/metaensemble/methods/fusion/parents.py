"""The fusion job's parents, read by both ``method.prepare_sweep`` (the engine's sweeps)
and ``experiment`` (``jobs/fuse.py``): the checks before any work and the parent networks,
``fusion.models`` or one network from the zoo of each recipe in ``fusion.parent_configs``
(trained first if missing). Imports neither ``method`` nor ``experiment``.
"""

from __future__ import annotations

from dataclasses import dataclass

from metaensemble import engine
from metaensemble.config import Config
from metaensemble.errors import ConfigError
from metaensemble.teachers import zoo_teachers
from metaensemble.validation import load_config

SPLIT_KEYS = ("name", "val_fraction", "test_fraction", "split_seed")


@dataclass
class Parent:
    uri: str
    label: str
    """What tags and tables call it: ``teacher.digits.mlp v3`` or its URI."""


def parent_recipes(cfg: Config) -> list[Config]:
    """The teacher recipes the parents come from (``fusion.models`` empty): one per entry
    of ``fusion.parent_configs``; for skill transfer, the first recipe's two label parts."""
    f = cfg.fusion
    store = [f"storage_path={cfg.storage_path}"]
    if f.experiment == "skill_transfer":
        base = load_config(f.parent_configs[0], store)
        split = cfg.data.label_split
        if split is None:
            raise ConfigError("fusion.experiment=skill_transfer needs data.label_split (special label, fraction): "
                              "the two parents train on its parts a and b")
        return [base.with_overrides({"data.label_split": split.model_copy(update={"part": p}).model_dump(),
                                     "zoo.first_seed": f.parent_seed + i}) for i, p in enumerate("ab")]
    if len(f.parent_configs) < 2:
        raise ConfigError(f"fusion.parent_configs names {len(f.parent_configs)} recipe(s); fusion needs two or more "
                          f"parents (or set fusion.models)")
    seen: dict[str, int] = {}
    out = []
    for p in f.parent_configs:  # a recipe named again gives its next seed
        out.append(load_config(p, store).with_overrides({"zoo.first_seed": f.parent_seed + seen.get(p, 0)}))
        seen[p] = seen.get(p, 0) + 1
    return out


def validate(cfg: Config) -> list[Config]:
    """Everything checkable before any work; returns the parents' recipes (none when the
    parents are given as ``fusion.models``)."""
    f = cfg.fusion
    if cfg.method not in ("supervised", "kd", "fusion"):
        raise ConfigError(f"jobs/fuse.py finetunes with the supervised or kd method; got method={cfg.method!r}")
    if cfg.model.init_from:
        raise ConfigError("jobs/fuse.py builds the fused network itself; model.init_from must be unset")
    if f.experiment != "skill_transfer" and cfg.data.label_split is not None:
        raise ConfigError("data.label_split is for fusion.experiment=skill_transfer (the parents' data); the "
                          f"{f.experiment} experiment trains and scores on every label")
    engine.validate(cfg.with_overrides({"method": "supervised"}))  # data, model, optimiser
    if f.models:
        if len(f.models) < 2:
            raise ConfigError(f"fusion.models has {len(f.models)} parent(s); {f.experiment} needs two or more")
        return []
    recipes = parent_recipes(cfg)
    ours = {k: getattr(cfg.data, k) for k in SPLIT_KEYS}
    paths = f.parent_configs[:1] * 2 if f.experiment == "skill_transfer" else f.parent_configs  # one per recipe
    for path, r in zip(paths, recipes, strict=True):
        theirs = {k: getattr(r.data, k) for k in SPLIT_KEYS}
        if theirs != ours:
            raise ConfigError(f"fusion.parent_configs {path} splits the data as {theirs}, this job as {ours}: set "
                              f"data.* to the parents' values, so that the fused network is selected and tested on "
                              f"data no parent trained on")
        engine.validate(r)
        from metaensemble.methods.fusion.structure import family

        family(r.model.name)  # a family fusion supports, before any training
    return recipes


def resolve_parents(cfg: Config, *, train_missing: bool = True) -> list[Parent]:
    """Validate, then the parents: ``fusion.models``, or one network of each recipe's zoo
    (its seed ``fusion.parent_seed``, trained first if missing)."""
    recipes = validate(cfg)
    if cfg.fusion.models:
        return [Parent(u, u) for u in cfg.fusion.models]
    return [Parent(*zoo_teachers(r, 1, train_missing)[0]) for r in recipes]
