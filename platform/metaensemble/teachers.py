"""Build a teacher zoo: N seeds of one (dataset, arch), trained by the engine, logged
and registered as versions of ``teacher.<dataset>.<arch>``. Idempotent: seeds already
registered with the same recipe (config hash) are skipped; an interrupted build resumes."""

from __future__ import annotations

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


def register_teacher(cfg: Config, outcome: engine.RunOutcome) -> None:
    zoo = TeacherZoo(cfg.data.name, cfg.model.name)
    if not missing_seeds(zoo.teachers(cfg.config_hash()), [cfg.seed], cfg.config_hash()):
        return
    metrics = dict(outcome.metrics)
    if "test_acc" not in metrics:  # finished in an earlier call: read what rank 0 logged
        metrics.update(tracking.client().get_run(outcome.run_id).data.metrics)
    zoo.register(outcome.run_id, cfg.seed, cfg.config_hash(), metrics)


def packs(missing: list[int], pack_size: int, n_conc: int) -> list[list[int]]:
    """The missing seeds in consecutive packs of ``pack_size``; 0: in as many packs as
    run at once (``n_conc``), sizes differing by at most one."""
    if pack_size:
        return [missing[i:i + pack_size] for i in range(0, len(missing), pack_size)]
    n = min(max(1, n_conc), len(missing))
    q, r = divmod(len(missing), n) if n else (0, 0)
    bounds = [i * q + min(i, r) for i in range(n + 1)]  # the first r packs take one more
    return [missing[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def train_zoo(cfg: Config) -> TeacherZoo:
    """Train and register the seeds ``zoo.first_seed .. + zoo.num_teachers`` that the
    registry lacks, as many runs at once as the cluster allows (``zoo.max_concurrent``),
    ``zoo.pack_size`` teachers per Ray Train run."""
    from metaensemble.sweep import concurrency, launch

    engine.validate(cfg)
    if cfg.zoo.pack_size != 1:
        engine.check_pack([cfg, cfg])  # packs of this recipe: refuses streamed data before any work
    uri = tracking.ensure_tracking()
    engine.ensure_ray()
    zoo = TeacherZoo(cfg.data.name, cfg.model.name, uri)
    wanted = list(range(cfg.zoo.first_seed, cfg.zoo.first_seed + cfg.zoo.num_teachers))
    entries = zoo.teachers(cfg.config_hash())
    missing = missing_seeds(entries, wanted, cfg.config_hash())
    other = sorted({e.seed for e in zoo.teachers() if e.seed in missing and e.config_hash != cfg.config_hash()})
    n_conc = concurrency(cfg, cfg.zoo.max_concurrent)
    groups = packs(missing, cfg.zoo.pack_size, n_conc)
    print(f"teacher zoo {zoo.name}: {len(wanted) - len(missing)} of {len(wanted)} seeds registered with this "
          f"recipe (config {cfg.config_hash()}); training {len(missing)}: {missing}"
          + (f" in {len(groups)} Ray Train run{'s' * (len(groups) > 1)} of up to {max(map(len, groups))}"
             if len(groups) < len(missing) else ""),
          flush=True)
    if other:
        print(f"  seeds {other} are also registered with another recipe; those versions stay as they are", flush=True)
    if not missing:
        return zoo
    if n_conc == 1 or len(groups) == 1:
        for group in groups:
            cs = [cfg.with_overrides({"seed": seed}) for seed in group]
            for c, outcome in zip(cs, engine.fit_pack(cs), strict=True):
                register_teacher(c, outcome)
        return zoo
    from ray import tune

    static = {"base": cfg.to_dict(), "experiment": cfg.experiment_name, "tracking_uri": uri, "name": "zoo",
              "run_name_fn": _teacher_run_name, "on_done": register_teacher}
    space = [{"pack": [{"seed": s} for s in g]} if len(g) > 1 else {"seed": g[0]} for g in groups]
    name = (f"zoo-{cfg.data.name}-{cfg.model.name}-{cfg.config_hash()}-seeds{'_'.join(map(str, missing))}"
            f"-packs{'_'.join(str(len(g)) for g in groups)}")
    grid = launch(static, {"params": tune.grid_search(space)}, name=name[:180],
                  storage=f"{cfg.resolved_storage_path()}/zoo", metric="val_acc", mode="max",
                  num_samples=1, max_concurrent=n_conc, verbose=0)
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} teacher run(s) failed; first: {errors[0]}")
    return zoo


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
