"""Ray Tune sweeps whose trials are engine runs (the Train V2 pattern).

The Tuner runs a light driver function per trial; each builds its own TorchTrainer via
``engine.fit`` (named after the trial id, with ``TuneReportCallback`` so ASHA sees its
per-epoch metrics). MLflow: one parent run for the sweep, one child run per trial.
An interrupted sweep is restored from its storage folder by running the same command.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Param

from metaensemble import engine, tracking
from metaensemble.config import Config, build_config, save_config
from metaensemble.errors import ConfigError, SearchSpaceError
from metaensemble.sweep.space import SearchSpace

TRIAL_DRIVER_CPU = 0.5  # the trial's own process only waits on its TorchTrainer


@dataclass
class SweepOutcome:
    parent_run_id: str
    experiment_id: str
    best_params: dict[str, Any]
    best_metric: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    storage: str = ""


def _domain(dist: dict[str, Any]):
    from ray import tune

    kind, arg = next(iter(dist.items()))
    return {
        "uniform": lambda: tune.uniform(*arg),
        "loguniform": lambda: tune.loguniform(*arg),
        "choice": lambda: tune.choice(arg),
        "randint": lambda: tune.randint(*arg),
        "grid": lambda: tune.grid_search(arg),
    }[kind]()


def concurrency(cfg: Config, requested: int = 0) -> int:
    """How many trials fit at once: each needs its driver plus all its workers."""
    import ray

    if requested:
        return requested
    res = ray.cluster_resources()
    s = cfg.scaling
    n = (res.get("CPU", 1) - 0.01) // (TRIAL_DRIVER_CPU + s.num_workers * s.cpus_per_worker)
    if s.use_gpu:
        n = min(n, res.get("GPU", 0) // (s.num_workers * s.gpus_per_worker))
    return max(1, int(n))


def _max_epochs(space: SearchSpace, base: Config) -> int:
    dist = space.params.get("train.epochs")
    if dist is None:
        return base.train.epochs
    kind, arg = next(iter(dist.items()))
    return int(max(arg))


def trial_driver(params: dict[str, Any], static: dict[str, Any]) -> None:
    """One trial: the base config + this trial's sampled params, trained by the engine.
    ``{"pack": [overrides, ...]}`` makes the trial a pack: one config per entry, trained
    one after another in one Ray Train run (``engine.fit_pack``). An int picks entry i of
    ``static["grid"]`` (see ``grid_of``)."""
    from ray import tune
    from ray.train import TrainingFailedError

    os.environ["MLFLOW_TRACKING_URI"] = static["tracking_uri"]
    from metaensemble.engine.loop import quiet_worker

    quiet_worker()  # on a cluster, trial processes do not inherit the driver's settings
    ctx = tune.get_context()
    base = build_config(static["base"])
    chosen = params["params"]
    if isinstance(chosen, int):  # a grid of fixed runs: the trial's entry of static["grid"]
        chosen = static["grid"][chosen]
    entries = chosen.get("pack") or [chosen]
    cfgs = [base.with_overrides({**e, "experiment": static["experiment"]}) for e in entries]
    name_fn = static.get("run_name_fn", lambda c, t: f"{static['name']}-{t}")
    names = [name_fn(c, ctx.get_trial_id()) for c in cfgs]
    kw = {"parent_run_id": static.get("parent_run_id"), "in_tune": True,
          "tags": {"metaensemble.trial_id": ctx.get_trial_id()}}
    try:
        outcomes = engine.fit_pack(cfgs, run_names=names, **kw)  # a single config is exactly engine.fit
    except TrainingFailedError:
        fail_unfinished(cfgs, names, static["tracking_uri"])
        raise
    if all(o.skipped for o in outcomes):
        # Finished before (e.g. the sweep was interrupted after this trial ended but before
        # Tune saved that): nothing was trained, so hand Tune the run's final metrics.
        tune.report({**outcomes[-1].metrics, "epoch": cfgs[-1].train.epochs, "final": 1})
    on_done = static.get("on_done")
    if on_done is not None:
        for c, o in zip(cfgs, outcomes, strict=True):
            on_done(c, o)


def grid_of(space: list[dict[str, Any]]) -> dict[str, Any]:
    """A Tune grid over fixed runs by index: the runs' configs go once into the trainable's
    parameters (``static["grid"]``), not into each trial's config, which Tune copies into
    every result row it writes (whole configs per row made a zoo's result.json 26 MB)."""
    from ray import tune

    return {"params": tune.grid_search(list(range(len(space))))}


def fail_unfinished(cfgs: list[Config], names: list[str], tracking_uri: str) -> list[str]:
    """Mark FAILED the runs of a trial whose training raised; returns their run ids.

    Inside Tune the engine leaves a broken run RUNNING, because a trial stopped by the
    scheduler is torn down too and only the sweep knows which was which. A stop ends the
    trial's process rather than raising in it; a TrainingFailedError is a worker or the
    controller that raised. So the trial closes its own runs at once, which also covers
    callers of ``launch`` with no sweep to close them (the meta-train job, the teacher
    zoo). Only RUNNING runs move: one the sweep already closed keeps its status."""
    client = tracking.client(tracking_uri)
    failed = []
    for c, name in zip(cfgs, names, strict=True):
        run = tracking.find_run(client, tracking.experiment_id(client, c.experiment_name), name)
        if run is not None and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FAILED")
            failed.append(run.info.run_id)
    return failed


def launch(static: dict[str, Any], param_space: dict[str, Any], *, name: str, storage: str,
           metric: str, mode: str, num_samples: int, max_concurrent: int, scheduler=None, search_alg=None,
           verbose: int = 2):
    """Run (or restore) a Tuner over ``trial_driver``; returns the ResultGrid. Tune's
    status tables only go to a terminal: in a log file or a pipe the runs' own lines
    and the sweep's summary say what happened."""
    import sys

    from ray import tune

    if not sys.stdout.isatty():
        verbose = 0

    trainable = tune.with_resources(tune.with_parameters(trial_driver, static=static), {"cpu": TRIAL_DRIVER_CPU})
    path = os.path.join(storage, name)
    if tune.Tuner.can_restore(path):
        print(f"restoring interrupted sweep from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, scheduler=scheduler,
                                        search_alg=search_alg,
                                        max_concurrent_trials=None if search_alg else max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=verbose),
        )
    return tuner.fit()


def run_key_name(cfg: Config, trial_id: str) -> str:
    """A trial's run is named by its config (``cfg.run_key()``): a rerun reuses it."""
    return cfg.run_key()


def train_configs(runs: dict[str, Config], groups: list[list[str]], *, experiment: str, parent_run_id: str,
                  storage: str, name: str) -> dict[str, str]:
    """Train every config of ``runs`` as child runs of ``parent_run_id`` in ``experiment``,
    side by side as the cluster allows: each group of keys in ``groups`` is one Tune trial
    (a group of several is a pack: one Ray Train run trained one after another, for runs
    of seconds whose start-up would dominate), started in the order given. More groups than
    fit at once are first merged into as many packs as fit (``merge_groups``). Runs finished
    before are not retrained. Returns key -> MLflow run id; raises if any run failed."""
    listed = [k for g in groups for k in g]
    if sorted(listed) != sorted(runs) or len(set(listed)) != len(listed):
        raise ValueError(f"groups must hold every run key exactly once; runs {sorted(runs)}, groups {groups}")
    uri = tracking.ensure_tracking()
    engine.ensure_ray()
    first = next(iter(runs.values()))
    named = {k: c.with_overrides({"experiment": experiment}) for k, c in runs.items()}
    groups = merge_groups([g for g in groups if g], concurrency(first, 0), runs)
    if len(groups) == 1 or concurrency(first, 0) == 1:
        # One trial at a time: Tune would add a trial process per group and nothing else;
        # each group is one engine run (a pack) from here, resumed by its run keys as a trial is.
        ids = {}
        for g in groups:
            outs = engine.fit_pack([named[k] for k in g], parent_run_id=parent_run_id)
            ids.update({k: o.run_id for k, o in zip(g, outs, strict=True)})
        return ids
    static = {"base": first.to_dict(), "experiment": experiment, "tracking_uri": uri, "name": name,
              "parent_run_id": parent_run_id, "run_name_fn": run_key_name}

    def flat(c: Config) -> dict[str, Any]:  # a whole config as top-level overrides
        return {k: v for k, v in c.to_dict().items() if k != "experiment"}

    space = [{"pack": [flat(runs[k]) for k in g]} if len(g) > 1 else flat(runs[g[0]]) for g in groups if g]
    # The Tune folder is restored by a rerun of the same runs in the same MLflow store
    # (same parent run), never by another store's or another set of runs.
    # the grouping too: it depends on the cluster's size, and a restored grid must be this one
    digest = hashlib.sha256(json.dumps([sorted(c.run_key() for c in runs.values()), groups]).encode()).hexdigest()[:8]
    name = f"{name[:120]}-{parent_run_id[:8]}-{digest}"
    results = launch({**static, "grid": space}, grid_of(space), name=name, storage=storage, metric="val_acc",
                     mode="max", num_samples=1, max_concurrent=concurrency(first, 0),
                     verbose=0)  # the runs print their own epoch lines
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(space)} trials failed; first: {errors[0]}")
    client = tracking.client(uri)
    exp_id = tracking.experiment_id(client, experiment)
    ids = {}
    for key, c in named.items():
        run = tracking.find_run(client, exp_id, c.run_key())
        if run is None or run.info.status != "FINISHED":
            raise RuntimeError(f"run {key} ({c.run_key()}) did not finish")
        ids[key] = run.info.run_id
    return ids


def merge_groups(groups: list[list[str]], at_once: int, runs: dict[str, Config]) -> list[list[str]]:
    """``groups`` as at most ``at_once`` packs when more are given than run at once, dealt
    in snake order (0, 1, .., n-1, n-1, .., 0, ...), so that the groups' order (the slowest
    first, by the callers' convention) spreads evenly over the packs. A trial waiting for a
    free slot would start a Ray Train run (seconds of start-up: a trial process, a
    controller, the workers' imports) that a running pack already has; every run is still
    trained as ``engine.fit`` would train it. The price: a run that fails stops the rest of
    its pack (a rerun trains them). Left as given when the runs cannot share one Ray Train
    run (``engine.check_pack``: streamed data, or another scaling section)."""
    if len(groups) <= at_once:
        return groups
    try:
        engine.check_pack([runs[k] for g in groups for k in g])
    except ConfigError:
        return groups
    n = max(1, at_once)
    packs: list[list[str]] = [[] for _ in range(n)]
    for i, g in enumerate(groups):
        turn, pos = divmod(i, n)
        packs[pos if turn % 2 == 0 else n - 1 - pos].extend(g)
    return packs


def prepare(base: Config) -> Config:
    """Resolve a base config's external inputs once, before any trial, through the
    method contract's ``prepare_sweep(cfg) -> cfg`` (e.g. a meta-learner's teachers come
    from the zoo, trained first if missing; the default changes nothing): every trial then
    trains from the same resolved inputs, and the sweep layer knows no method by name."""
    from metaensemble import methods

    return methods.method_class(base.method).prepare_sweep(base)


def run_sweep(space: SearchSpace, extra_overrides: list[str] | None = None) -> SweepOutcome:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base = space.base_config(extra_overrides)
    max_t = space.scheduler.max_t or _max_epochs(space, base)
    if space.scheduler.name == "asha" and space.scheduler.grace_period > max_t:
        raise SearchSpaceError(
            f"{space.source}: scheduler.grace_period={space.scheduler.grace_period} is more than the {max_t} "
            f"epochs a trial trains (train.epochs or scheduler.max_t): lower grace_period or train longer")
    base = prepare(base)
    engine.validate(base)
    if space.search.name == "optuna" and any("grid" in d for d in space.params.values()):
        raise SearchSpaceError(f"{space.source}: optuna search cannot take grid params; use choice")
    uri = tracking.ensure_tracking()
    engine.ensure_ray()
    client = tracking.client(uri)
    experiment = f"{base.data.name}/sweep-{space.name}"
    parent_key = f"sweep-{space.name}-{space.spec_hash()}-{base.config_hash()}"
    exp_id = tracking.experiment_id(client, experiment)
    parent = tracking.find_run(client, exp_id, parent_key)
    if parent is None:
        parent = client.create_run(exp_id, run_name=parent_key, tags={tracking.runs.TAG_KEY: parent_key,
                                                                      "metaensemble.sweep": space.name,
                                                                      **tracking.runs.invocation_tags()})
        with tempfile.TemporaryDirectory() as d:
            save_config(base, Path(d) / "base_config.yaml")
            client.log_artifact(parent.info.run_id, str(Path(d) / "base_config.yaml"))
        if space.source:
            client.log_artifact(parent.info.run_id, space.source)
        client.log_batch(parent.info.run_id, params=[
            Param(k, str(v)[:6000]) for k, v in
            {"metric": space.metric, "mode": space.mode, "num_samples": space.num_samples,
             "scheduler": space.scheduler.name, "search": space.search.name,
             **{f"space.{k}": v for k, v in space.params.items()}}.items()
        ])
    parent_id = parent.info.run_id
    client.update_run(parent_id, status="RUNNING")
    tracking.runs.claim(client, parent_id)

    # ASHA stops every trial that reaches max_t; one past the last epoch keeps it from
    # cutting a trial between its last epoch and its final evaluation (model + test metrics).
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max_t + 1, grace_period=space.scheduler.grace_period,
                               reduction_factor=space.scheduler.reduction_factor)
                 if space.scheduler.name == "asha" else FIFOScheduler())
    n_conc = concurrency(base, space.max_concurrent_trials)
    search_alg = None
    if space.search.name == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = ConcurrencyLimiter(OptunaSearch(seed=space.search.seed), max_concurrent=n_conc)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=space.search.seed, max_concurrent=n_conc)
    static = {"base": base.to_dict(), "experiment": experiment, "tracking_uri": uri, "parent_run_id": parent_id,
              "name": space.name}
    storage = os.path.join(base.resolved_storage_path(), "sweeps")
    print(f"sweep {space.name}: {space.num_samples} trials, up to {n_conc} at once, "
          f"{space.scheduler.name} on {space.metric} ({space.mode}); MLflow parent run {parent_id}", flush=True)
    try:
        grid = launch(static, {"params": {k: _domain(d) for k, d in space.params.items()}}, name=parent_key,
                      storage=storage, metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                      max_concurrent=n_conc, scheduler=scheduler, search_alg=search_alg)
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    return _close(client, exp_id, parent_id, space, grid, storage)


def _close(client, exp_id: str, parent_id: str, space: SearchSpace, grid, storage: str) -> SweepOutcome:
    """Close every trial's run: one the scheduler stopped early ended as it should
    (FINISHED, tagged ``metaensemble.stopped_early=<scheduler>``), one that broke FAILED;
    log the summary on the parent."""
    trials = []
    for r in grid:
        m = r.metrics or {}
        trials.append({"trial_id": m.get("trial_id"), "params": (r.config or {}).get("params", {}),
                       "epochs": m.get("epoch"), space.metric: m.get(space.metric),
                       "done": bool(m.get("final")), "error": str(r.error) if r.error else None})
    stopped_ids = {t["trial_id"] for t in trials if not t["done"] and not t["error"]}
    for child in tracking.child_runs(client, exp_id, parent_id):
        # A trial that does not finish leaves its run RUNNING (inside Tune engine.fit
        # writes only FINISHED): stopped by the scheduler -> FINISHED and tagged (an early
        # stop is the sweep working, not a crash), anything else -> FAILED.
        if child.data.tags.get("metaensemble.trial_id") in stopped_ids:
            tracking.set_tags(client, child.info.run_id, {"metaensemble.stopped_early": space.scheduler.name})
            client.set_terminated(child.info.run_id, status="FINISHED")
        elif child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, status="FAILED")
    ok = [t for t in trials if t[space.metric] is not None]
    if not ok:
        client.set_terminated(parent_id, status="FAILED")
        raise RuntimeError(f"sweep {space.name}: no trial reported {space.metric}; errors: "
                           f"{[t['error'] for t in trials if t['error']]}")
    pick = max if space.mode == "max" else min
    best = pick(ok, key=lambda t: t[space.metric])
    tracking.log_metrics(client, parent_id, {f"best_{space.metric}": best[space.metric],
                                             "trials_stopped_early": sum(not t["done"] for t in trials)})
    tracking.set_tags(client, parent_id, {f"best.{k}": v for k, v in best["params"].items()})
    client.log_dict(parent_id, {"trials": trials, "best": best}, "sweep_results.json")
    client.set_terminated(parent_id, status="FINISHED")
    return SweepOutcome(parent_id, exp_id, best["params"], float(best[space.metric]), trials, storage)


def format_trials(outcome: SweepOutcome, metric: str) -> str:
    keys = sorted({k for t in outcome.trials for k in t["params"]})
    head = f"{'trial':<12} " + " ".join(f"{k:>22}" for k in keys) + f" {'epochs':>6} {metric:>9}  status"
    lines = [head]
    for t in sorted(outcome.trials, key=lambda t: -math.inf if t[metric] is None else t[metric], reverse=True):
        vals = " ".join(f"{_fmt(t['params'].get(k)):>22}" for k in keys)
        status = "done" if t["done"] else ("error" if t["error"] else "stopped early")
        lines.append(f"{str(t['trial_id']):<12} {vals} {str(t['epochs']):>6} {_fmt(t[metric]):>9}  {status}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
