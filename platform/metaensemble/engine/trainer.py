"""The driver side of the engine: ``fit(cfg)`` runs one Ray Train (DDP) run.

    outcome = fit(cfg)                  # validates, opens/reuses the MLflow run, trains
    outcome.run_id, outcome.metrics     # the MLflow run and its final metrics
    outcome.skipped                     # True if this exact run had already finished
    outcomes = fit_pack([cfg_a, cfg_b]) # several small runs, one after another, in one worker group

The run's name is deterministic (``cfg.run_key()``): the same command after a crash
resumes from the latest Ray checkpoint under ``storage_path/<run_key>`` with the same
MLflow run id, and the same command after success trains nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from metaensemble import data, methods, models, tracking
from metaensemble.config import Config
from metaensemble.errors import ConfigError

LOCAL_CPUS_MIN = 4  # logical CPUs for a local instance: trials' drivers + workers fit on 2 cores
REPORT_POLL_S = "0.2"
"""Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s
by default) and a report waits for that poll, so a per-epoch report costs up to 2 s: on
a small dataset most of a run. A local instance inherits this process's environment."""


@dataclass
class RunOutcome:
    run_id: str
    run_key: str
    experiment_id: str
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    checkpoint_path: str | None = None

    @property
    def model_uri(self) -> str:
        return f"runs:/{self.run_id}/model"


def validate(cfg: Config, method: methods.Method | None = None) -> None:
    """Everything that can be checked before any work: names, files, model kwargs."""
    data.check(cfg.data)
    if method is None:
        methods.check_name(cfg.method)
    (method or methods.build(cfg)).validate()
    accepted = set(models.model_kwargs(cfg.model.name))
    unknown = sorted(set(cfg.model.kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"model.kwargs: {cfg.model.name!r} does not take {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or '(nothing)'}"
        )
    if cfg.data.train_fraction < 1.0:  # a small subset: each worker's shard must still hold a batch
        n = len(data.load(cfg.data).train)
        share = n // cfg.scaling.num_workers
        if share < cfg.data.batch_size:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} exceeds each worker's share of the training subset "
                f"(data.train_fraction={cfg.data.train_fraction}: {n} examples over scaling.num_workers="
                f"{cfg.scaling.num_workers} = {share}); valid: data.batch_size <= {share}, or fewer workers"
            )
    if cfg.train.select_metric not in ("val_acc", "val_nll", "val_ece"):
        raise ConfigError(f"train.select_metric must be one of val_acc, val_nll, val_ece; got {cfg.train.select_metric!r}")
    if cfg.scaling.use_gpu:
        import torch

        if not torch.cuda.is_available() and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError("scaling.use_gpu=true but no GPU is visible here (and no RAY_ADDRESS cluster)")


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (``ray job submit`` sets it), or start a
    local instance with at least LOCAL_CPUS_MIN logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)
        ray.init(num_cpus=max(LOCAL_CPUS_MIN, os.cpu_count() or 1), log_to_driver=True)


def scaling_config(cfg: Config):
    import ray.train

    s = cfg.scaling
    res = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        res["GPU"] = s.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=res)


def fit(cfg: Config, *, method: methods.Method | None = None, run_name: str | None = None,
        parent_run_id: str | None = None, tags: dict[str, str] | None = None,
        in_tune: bool = False) -> RunOutcome:
    """Train ``cfg`` through Ray Train; see the module docstring."""
    return _fit([cfg], [run_name or cfg.run_key()], method=method, parent_run_id=parent_run_id, tags=tags,
                in_tune=in_tune)[0]


def fit_pack(cfgs: list[Config], *, run_names: list[str] | None = None, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None, in_tune: bool = False) -> list[RunOutcome]:
    """Train several configs one after another in ONE Ray Train run (one worker group).

    Each config is still its own MLflow run under its own run key, trained exactly as
    ``fit`` would train it (same seeds, same data order, same weights); only the
    workers' start-up (Ray actors, torch import, process group: seconds) is paid once
    per pack instead of once per run, which dominates for small models such as a digits
    zoo. Members already FINISHED in MLflow are skipped; a member is marked FINISHED as
    soon as it is done, so an interrupted pack resumes at its interrupted member (from
    that member's latest checkpoint when the same pack is run again).
    """
    if not cfgs:
        return []
    check_pack(cfgs)
    names = run_names or [c.run_key() for c in cfgs]
    if len(set(names)) != len(names):
        raise ConfigError(f"a pack needs distinct runs; got run keys {names}")
    return _fit(cfgs, names, parent_run_id=parent_run_id, tags=tags, in_tune=in_tune)


def check_pack(cfgs: list[Config]) -> None:
    """Members of a pack share one worker group and its (in-memory) data loading."""
    if len(cfgs) < 2:
        return
    first = cfgs[0]
    for c in cfgs:
        if data.is_streaming(c.data):
            raise ConfigError(f"data {c.data.name!r} streams through Ray Data: its runs cannot be packed "
                              "(zoo.pack_size must be 1)")
        if c.scaling != first.scaling:
            raise ConfigError("runs packed into one Ray Train run need the same scaling section; "
                              f"got {first.scaling} and {c.scaling}")


def _fit(cfgs: list[Config], names: list[str], *, method: methods.Method | None = None,
         parent_run_id: str | None = None, tags: dict[str, str] | None = None,
         in_tune: bool = False) -> list[RunOutcome]:
    import ray.train
    from ray.train.torch import TorchTrainer

    for c in cfgs:
        validate(c, method)
    uri = tracking.ensure_tracking()
    ensure_ray()
    client = tracking.client(uri)
    outcomes: list[RunOutcome | None] = [None] * len(cfgs)
    members = []
    for i, (c, key) in enumerate(zip(cfgs, names, strict=True)):
        handle = tracking.open_run(client, c, key, parent_run_id=parent_run_id, tags=tags)
        if handle.status == "FINISHED":
            run = client.get_run(handle.run_id)
            print(f"[{key}] already finished in MLflow run {handle.run_id}; nothing to train", flush=True)
            outcomes[i] = RunOutcome(handle.run_id, key, handle.experiment_id, dict(run.data.metrics), skipped=True)
            continue
        if handle.resumed:
            client.update_run(handle.run_id, status="RUNNING")
        members.append((i, handle, {"cfg": c.to_dict(), "run_id": handle.run_id, "run_key": key}))
    if not members:
        return outcomes
    cfg = cfgs[members[0][0]]
    packed = len(cfgs) > 1
    # A pack's Ray run is named after all its members, so the same pack run again finds
    # its checkpoints whichever members have finished since.
    ray_name = names[0] if not packed else f"pack-{names[0]}-n{len(names)}-{_digest(names)}"

    datasets, dataset_config = None, None
    if data.is_streaming(cfg.data):
        from metaensemble.data.parquet import ray_datasets

        datasets, _, _ = ray_datasets(cfg.data)
        dataset_config = ray.train.DataConfig(datasets_to_split=["train"])

    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"members": [m for _, _, m in members], "tracking_uri": uri, "method": method,
                           "packed": packed},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=ray_name,
            storage_path=cfg.resolved_storage_path(),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )
    try:
        result = trainer.fit()
    except BaseException:
        # Inside a sweep the trial's process is also torn down when the scheduler stops
        # it early, possibly after the sweep has closed; the sweep, which knows which
        # trials were stopped and which broke, sets those runs' final status instead.
        if not in_tune:
            for _, handle, _ in members:
                if client.get_run(handle.run_id).info.status != "FINISHED":
                    client.set_terminated(handle.run_id, status="FAILED")
        raise
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    for i, handle, m in members:
        client.set_terminated(handle.run_id, status="FINISHED")
        if packed:
            tracking.set_tags(client, handle.run_id, {"metaensemble.ray_run": ray_name})
            outcomes[i] = RunOutcome(handle.run_id, m["run_key"], handle.experiment_id,
                                     dict(client.get_run(handle.run_id).data.metrics))
        else:
            if ckpt:
                tracking.set_tags(client, handle.run_id, {"metaensemble.ray_checkpoint": ckpt})
            outcomes[i] = RunOutcome(handle.run_id, m["run_key"], handle.experiment_id, dict(result.metrics or {}),
                                     False, ckpt)
    return outcomes


def _digest(names: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:10]


def _train_loop(config: dict[str, Any]) -> None:
    # A module-level function so Ray pickles it by reference (metaensemble is installed).
    from metaensemble.engine.loop import train_loop_per_worker

    train_loop_per_worker(config)
