"""Build a teacher zoo: N seeds of one (dataset, arch), trained by the engine, logged
and registered as versions of ``teacher.<dataset>.<arch>``. Idempotent: seeds already
registered with the same recipe (config hash) are skipped; an interrupted build resumes.

A soup-regime recipe (``zoo.soup``, ``config.SoupRecipe``) trains its parents from
scratch first (registered with ``role=parent``, not teachers), then each seed as a child
fine-tuned from one of them (``parent_configs``, ``child_config``)."""

from __future__ import annotations

import functools

from metaensemble import engine, tracking
from metaensemble.config import Config
from metaensemble.errors import ZooError
from metaensemble.tracking import TeacherEntry, TeacherZoo


def _teacher_run_name(cfg: Config, trial_id: str) -> str:
    return cfg.run_key()  # by seed and config: a rerun reuses the same run


def missing_seeds(entries: list[TeacherEntry], wanted: list[int], config_hash: str) -> list[int]:
    """Seeds of ``wanted`` without a registered teacher trained with this exact recipe
    (a seed registered only under another config hash is missing: it gets a new version,
    and the other recipe's versions stay)."""
    have = {e.seed for e in entries if e.config_hash == config_hash}
    return [s for s in wanted if s not in have]


def register_teacher(cfg: Config, outcome: engine.RunOutcome, recipe_hash: str | None = None,
                     role: str = "teacher") -> None:
    """Register a finished run as seed ``cfg.seed`` of the zoo, tagged with the recipe
    (``recipe_hash``: a soup-regime zoo's, for its children; else the run's own config
    hash) and its role; a child (``model.init_from`` a parent's ``runs:/``) also gets its
    parent's run id, on the version and on the run (``metaensemble.soup_parent``)."""
    zoo = TeacherZoo(cfg.data.name, cfg.model.name)
    recipe = recipe_hash or cfg.config_hash()
    if not missing_seeds(zoo.teachers(recipe, role=role), [cfg.seed], recipe):
        return
    metrics = dict(outcome.metrics)
    client = tracking.client()
    if "test_acc" not in metrics:  # finished in an earlier call: read what rank 0 logged
        metrics.update(client.get_run(outcome.run_id).data.metrics)
    parent = parent_run_of(cfg) if recipe_hash else ""
    tags = {"metaensemble.zoo_role": role, **({"metaensemble.soup_parent": parent} if parent else {})}
    tracking.set_tags(client, outcome.run_id, tags)
    zoo.register(outcome.run_id, cfg.seed, recipe, metrics, role=role, parent=parent)


def parent_run_of(cfg: Config) -> str:
    """The MLflow run id a soup-regime child starts from (its ``model.init_from``,
    ``runs:/<id>/model``); "" for a run that starts from no run."""
    uri = cfg.model.init_from or ""
    return uri.split("/")[1] if uri.startswith("runs:/") and uri.count("/") >= 2 else ""


def packs(missing: list[int], pack_size: int, n_conc: int) -> list[list[int]]:
    """The missing seeds in consecutive packs of ``pack_size``; 0: in as many packs as
    run at once (``n_conc``), sizes differing by at most one."""
    if pack_size:
        return [missing[i:i + pack_size] for i in range(0, len(missing), pack_size)]
    n = min(max(1, n_conc), len(missing))
    q, r = divmod(len(missing), n) if n else (0, 0)
    bounds = [i * q + min(i, r) for i in range(n + 1)]  # the first r packs take one more
    return [missing[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ---- a soup-regime zoo's runs (``zoo.soup``) ---------------------------------------------
def parent_configs(cfg: Config) -> list[Config]:
    """The parents of the soup-regime recipe ``cfg``: trained from scratch, in order."""
    soup = _soup(cfg)
    return [cfg.with_overrides(soup.parent_overrides(p)) for p in range(soup.parents)]


def child_config(cfg: Config, seed: int, parent_uris: list[str]) -> Config:
    """The child of zoo seed ``seed`` of the soup-regime recipe ``cfg``, fine-tuned from
    its parent among ``parent_uris`` (a ``runs:/`` URI, a ``models:/`` URI or a folder,
    one per parent in order; ``model.init_from``), with its own training subset."""
    soup = _soup(cfg)
    child = cfg.with_overrides(soup.child_overrides(seed - cfg.zoo.first_seed, seed, parent_uris))
    if child.data.train_fraction < 1.0:
        child = child.with_overrides({"data.subset_seed": seed})
    return child


def _soup(cfg: Config):
    if cfg.zoo.soup is None:
        raise ValueError("the recipe has no zoo.soup section: its seeds train from scratch")
    return cfg.zoo.soup


# ---- training --------------------------------------------------------------------------------
def validate_recipe(cfg: Config) -> None:
    """Everything checkable before any work about the runs a zoo recipe trains: the
    recipe, and for a soup-regime recipe its parent and a child of every grid
    combination (without its parent's weights, which do not exist yet)."""
    engine.validate(cfg)
    if cfg.zoo.pack_size != 1:
        engine.check_pack([cfg, cfg])  # packs of this recipe: refuses streamed data before any work
    if cfg.zoo.soup is None:
        return
    soup = cfg.zoo.soup
    engine.validate(parent_configs(cfg)[0])
    placeholder = ["<parent>"] * soup.parents
    for c in range(len(soup.combinations())):
        child = child_config(cfg, cfg.zoo.first_seed + c * soup.parents, placeholder)
        engine.validate(child.with_overrides({"model.init_from": None}))


def train_zoo(cfg: Config) -> TeacherZoo:
    """Train and register the seeds ``zoo.first_seed .. + zoo.num_teachers`` that the
    registry lacks, as many runs at once as the cluster allows (``zoo.max_concurrent``),
    ``zoo.pack_size`` teachers per Ray Train run. A soup-regime recipe (``zoo.soup``)
    trains its missing parents first (registered with ``role=parent``), then the
    missing seeds as children fine-tuned from them."""
    from metaensemble.sweep import concurrency

    validate_recipe(cfg)
    uri = tracking.ensure_tracking()
    engine.ensure_ray()
    zoo = TeacherZoo(cfg.data.name, cfg.model.name, uri)
    wanted = list(range(cfg.zoo.first_seed, cfg.zoo.first_seed + cfg.zoo.num_teachers))
    entries = zoo.teachers(cfg.config_hash())
    missing = missing_seeds(entries, wanted, cfg.config_hash())
    other = sorted({e.seed for e in zoo.teachers() if e.seed in missing and e.config_hash != cfg.config_hash()})
    if cfg.zoo.soup is not None and missing:
        parents = ensure_parents(cfg, zoo)
        uris = [f"runs:/{p.run_id}/model" for p in parents]
        runs = {s: child_config(cfg, s, uris) for s in missing}
        on_done = functools.partial(register_teacher, recipe_hash=cfg.config_hash())
        what = (f"training {len(missing)} child{'ren' * (len(missing) > 1)} of {len(parents)} "
                f"parent{'s' * (len(parents) > 1)}")
    else:
        runs = {s: cfg.with_overrides({"seed": s}) for s in missing}
        on_done, what = register_teacher, f"training {len(missing)}"
    groups = packs(missing, cfg.zoo.pack_size, concurrency(cfg, cfg.zoo.max_concurrent))
    print(f"teacher zoo {zoo.name}: {len(wanted) - len(missing)} of {len(wanted)} seeds registered with this "
          f"recipe (config {cfg.config_hash()}); {what}: {missing}" + _in_runs(groups, len(missing)), flush=True)
    if other:
        print(f"  seeds {other} are also registered with another recipe; those versions stay as they are", flush=True)
    _train_runs(cfg, runs, groups, on_done, f"zoo-{cfg.data.name}-{cfg.model.name}-{cfg.config_hash()}")
    return zoo


def ensure_parents(cfg: Config, zoo: TeacherZoo) -> list[TeacherEntry]:
    """The soup-regime recipe's parents as registered versions (``role=parent``), in
    order; the missing ones are trained first."""
    from metaensemble.sweep import concurrency

    pcfgs = parent_configs(cfg)
    recipe = pcfgs[0].config_hash()  # the parents differ only in their seed
    seeds = [c.seed for c in pcfgs]
    missing = missing_seeds(zoo.teachers(recipe, role="parent"), seeds, recipe)
    if missing:
        groups = packs(missing, cfg.zoo.pack_size, concurrency(cfg, cfg.zoo.max_concurrent))
        print(f"soup-regime zoo {zoo.name}: training {len(missing)} of {len(seeds)} parent(s) from scratch "
              f"(config {recipe}, seeds {missing}); they are registered with role=parent, not as teachers",
              flush=True)
        runs = {c.seed: c for c in pcfgs if c.seed in missing}
        _train_runs(cfg, runs, groups, functools.partial(register_teacher, role="parent"),
                    f"parents-{cfg.data.name}-{cfg.model.name}-{recipe}")
    found = {e.seed: e for e in zoo.teachers(recipe, role="parent")}
    return [found[s] for s in seeds]


def _in_runs(groups: list[list[int]], n: int) -> str:
    if len(groups) >= n:
        return ""
    return f" in {len(groups)} Ray Train run{'s' * (len(groups) > 1)} of up to {max(map(len, groups))}"


def _train_runs(cfg: Config, runs: dict[int, Config], groups: list[list[int]], on_done, label: str) -> None:
    """Train ``runs`` (seed -> config), each group of seeds one Ray Train run (a pack), as
    many at once as the cluster allows; ``on_done(config, outcome)`` after each run."""
    from metaensemble.sweep import concurrency, launch
    from metaensemble.sweep.runner import grid_of

    if not runs:
        return
    n_conc = concurrency(cfg, cfg.zoo.max_concurrent)
    if n_conc == 1 or len(groups) == 1:
        for group in groups:
            cs = [runs[s] for s in group]
            for c, outcome in zip(cs, engine.fit_pack(cs), strict=True):
                on_done(c, outcome)
        return
    uri = tracking.ensure_tracking()
    static = {"base": cfg.to_dict(), "experiment": cfg.experiment_name, "tracking_uri": uri, "name": "zoo",
              "run_name_fn": _teacher_run_name, "on_done": on_done}

    def overrides(s: int) -> dict:  # a whole config as top-level overrides of the base
        return {k: v for k, v in runs[s].to_dict().items() if k != "experiment"}

    space = [{"pack": [overrides(s) for s in g]} if len(g) > 1 else overrides(g[0]) for g in groups]
    seeds = sorted(runs)
    name = f"{label}-seeds{'_'.join(map(str, seeds))}-packs{'_'.join(str(len(g)) for g in groups)}"
    grid = launch({**static, "grid": space}, grid_of(space), name=name[:180],
                  storage=f"{cfg.resolved_storage_path()}/zoo", metric="val_acc", mode="max",
                  num_samples=1, max_concurrent=n_conc, verbose=0)
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} teacher run(s) failed; first: {errors[0]}")


def zoo_teachers(tcfg: Config, m: int, train_missing: bool = True) -> list[tuple[str, str]]:
    """(URI, label such as ``teacher.digits.convnet v3``) of the first ``m`` seeds of the
    recipe ``tcfg``'s zoo, trained first if missing (``train_missing``; else ZooError)."""
    tracking.ensure_tracking()
    zoo = TeacherZoo(tcfg.data.name, tcfg.model.name)
    wanted = list(range(tcfg.zoo.first_seed, tcfg.zoo.first_seed + m))

    def have():
        return {e.seed: e for e in zoo.teachers(tcfg.config_hash()) if e.seed in wanted}

    found = have()
    if len(found) < m:
        if not train_missing:
            raise ZooError(f"zoo {zoo.name} has {len(found)} of the {m} teachers of recipe {tcfg.config_hash()}; "
                           f"train them with jobs/train_teachers.py --config <teacher_config> zoo.num_teachers={m}")
        print(f"zoo {zoo.name} holds {len(found)} of the {m} teachers needed; training the rest", flush=True)
        train_zoo(tcfg.with_overrides({"zoo.num_teachers": m}))
        found = have()
    return [(found[s].uri, f"{zoo.name} v{found[s].version}") for s in wanted]
