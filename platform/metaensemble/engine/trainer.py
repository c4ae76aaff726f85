"""The driver side of the engine: ``fit(cfg)`` runs one Ray Train (DDP) run.

    outcome = fit(cfg)                  # validates, opens/reuses the MLflow run, trains
    outcome.run_id, outcome.metrics     # the MLflow run and its final metrics
    outcome.skipped                     # True if this exact run had already finished
    outcomes = fit_pack([cfg_a, cfg_b]) # several small runs, one after another, in one worker group
    outcome = evaluate(model, cfg)      # the same val/test report for a model no training produced

The run's name is deterministic (``cfg.run_key()``): the same command after a crash
resumes from the latest Ray checkpoint under ``storage_path/<run_key>`` with the same
MLflow run id, and the same command after success trains nothing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaensemble import data, methods, models, tracking
from metaensemble.config import REPO_ROOT, Config
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
    """Everything that can be checked before any work: names, files, model kwargs, where
    checkpoints go."""
    cfg.resolved_storage_path()
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
    _check_optim(cfg)
    if cfg.model.init_from:
        _check_init_from(cfg)
    if cfg.scaling.use_gpu:
        import torch

        if not torch.cuda.is_available() and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError("scaling.use_gpu=true but no GPU is visible here (and no RAY_ADDRESS cluster)")


def _check_optim(cfg: Config) -> None:
    from timm.optim import list_optimizers

    from metaensemble.engine.optim import timm_opt_name

    known = list_optimizers()
    if timm_opt_name(cfg.optim) not in known:
        raise ConfigError(f"optim.name={cfg.optim.name!r} is not a timm optimiser; valid: {', '.join(known)}")
    if cfg.optim.schedule == "multistep" and max(cfg.optim.decay_milestones) > cfg.train.epochs:
        raise ConfigError(f"optim.decay_milestones={cfg.optim.decay_milestones} lie beyond train.epochs="
                          f"{cfg.train.epochs}; valid milestones: 1..{cfg.train.epochs}")


def _check_init_from(cfg: Config) -> None:
    """The checkpoint exists and was built as ``cfg.model`` (every tensor is compared
    again on the workers, against the model the method builds)."""
    meta = models.read_meta(models.local_dir(cfg.model.init_from))
    want = {k: v for k, v in cfg.model.kwargs.items()}
    have = {k: v for k, v in meta.get("kwargs", {}).items() if k not in ("num_classes", "in_chans", "img_size")}
    if meta.get("arch") != cfg.model.name or any(have.get(k) != v for k, v in want.items()):
        raise ConfigError(f"model.init_from {cfg.model.init_from} is {meta.get('arch')!r} with {have}, but model is "
                          f"{cfg.model.name!r} with {want}: start from a checkpoint of the model being trained")


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (``ray job submit`` sets it), or start a
    local instance with at least LOCAL_CPUS_MIN logical CPUs."""
    import logging

    quiet_console()
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, logging_level=logging.WARNING, runtime_env=shipped_library())
    else:
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)
        for k, v in {**RAY_DATA_ENV, **LOCAL_RAY_ENV}.items():
            os.environ.setdefault(k, v)
        # the local instance's processes inherit this environment: the library this driver
        # runs comes first for its workers too (a second checkout next to an installed one)
        lib = str(Path(__file__).resolve().parents[2])
        if lib not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (lib, os.environ.get("PYTHONPATH")) if p)
        _start_local_instance()


def _start_local_instance() -> None:
    """A new Ray instance on this machine, private to this job. Ray's own processes find
    their instance by RAY_ADDRESS, else by scanning the machine, which fails when another
    instance runs here too (another job, a test session): Ray Train's placement-group
    cleaner then dies with a traceback and leaks the placement groups of a crashed run.
    So the instance gets a port chosen here and its address in its processes' environment
    (not in this driver's, where RAY_ADDRESS means "a cluster to join")."""
    import logging
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    own = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}
    saved = {k: os.environ.get(k) for k in own}
    # Ray turns token authentication on for a new local instance and warns that it did
    # on every start: the job's own private instance, secured as Ray secures it, is not
    # news. (Stating RAY_AUTH_MODE=token instead breaks the start once ray is imported.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ.update(own)
    try:
        ray.init(address="local", num_cpus=max(LOCAL_CPUS_MIN, os.cpu_count() or 1), log_to_driver=True,
                 logging_level=logging.WARNING)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# What a job's console shows: each run's own lines (engine.loop: one per finished run, an
# epoch line a minute on long runs), errors and their tracebacks from any process, the
# job's results last, and none of Ray's internal chatter. Run logs keep everything.
CONSOLE_ENV = {
    # Ray merges lines of different processes that differ only in numbers (seeds, hashes,
    # metrics): a run's lines ("[<run key>] ...") are never merged, each run is its own.
    "RAY_DEDUP_LOGS_ALLOW_REGEX": r"^\[[^\]\s]+\] ",
    # The raylet's warning that it started more Python workers than 4x the physical cores:
    # by design here (trial drivers, controllers and workers on a 2-core laptop).
    "RAY_DEDUP_LOGS_SKIP_REGEX": r"PYTHON worker processes have been started",
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune: the classic reporter, which honours verbose=0
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
LOCAL_RAY_ENV = {
    # Spot-instance preemption cannot happen on one machine; the watcher is one actor
    # less per run, and its constructor logs an internal error line on every run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def quiet_console() -> None:
    """Console settings for this process and the processes it starts (CONSOLE_ENV;
    a variable already set is kept). Ray reads its log filters when it is imported, so
    this runs before the job's first ``import ray`` (``ensure_ray`` calls it first); an
    earlier import keeps Ray's defaults, which only makes the console longer."""
    import logging
    import sys

    for k, v in CONSOLE_ENV.items():
        os.environ.setdefault(k, v)
    if not sys.stdout.isatty():  # a log file or a pipe: no colour codes around Ray's prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for name in ("ray.tune", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def shipped_library() -> dict[str, Any]:
    """The runtime env that gives every Ray worker of this driver the library the driver
    runs (``py_modules``), not a copy installed on the nodes, and the root its relative
    paths resolve against: the job's working directory when the driver runs from one
    (``ray job submit --working-dir``; each node has its own copy, pinned by a worker
    setup hook before Ray Train moves the worker elsewhere), else the driver's checkout
    (the same path on a shared filesystem). Ray merges it with the job's own runtime env;
    ``py_modules`` the job already ships are kept."""
    import json

    import metaensemble
    from metaensemble.config import in_ray_working_dir

    job_env: dict[str, Any] = {}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        job_env = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("runtime_env") or {}
    env: dict[str, Any] = {"py_modules": [*job_env.get("py_modules", []),
                                          str(Path(metaensemble.__file__).resolve().parent)]}
    if job_env.get("py_modules"):  # the same key on both sides: ours carries the job's too
        os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    job_vars = job_env.get("env_vars") or {}
    env["env_vars"] = {k: v for k, v in RAY_DATA_ENV.items() if k not in job_vars}
    if in_ray_working_dir():
        env["worker_process_setup_hook"] = "metaensemble._root.pin_working_dir"
    elif "METAENSEMBLE_ROOT" not in job_vars:
        env["env_vars"]["METAENSEMBLE_ROOT"] = str(REPO_ROOT)
    return env


# Ray Data 2.60 lists a parquet dataset's files at the start of every epoch with a pool of
# 32 fresh actors by default: measured, that pool cost a quarter of the images/s delivered
# on 2 data CPUs (benchmarks/results/data_throughput.md); one actor reads the footers.
RAY_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def scaling_config(cfg: Config):
    import ray.train

    s = cfg.scaling
    res = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        res["GPU"] = s.gpus_per_worker
    if s.min_workers is not None and s.min_workers < s.num_workers:
        return ray.train.ScalingConfig(num_workers=(s.min_workers, s.num_workers), use_gpu=s.use_gpu,
                                       resources_per_worker=res, elastic_resize_monitor_interval_s=s.elastic_resize_s)
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=res)


def fit(cfg: Config, *, method: methods.Method | None = None, run_name: str | None = None,
        parent_run_id: str | None = None, tags: dict[str, str] | None = None,
        in_tune: bool = False) -> RunOutcome:
    """Train ``cfg`` through Ray Train; see the module docstring."""
    return _fit([cfg], [run_name or cfg.run_key()], method=method, parent_run_id=parent_run_id, tags=tags,
                in_tune=in_tune)[0]


def fit_pack(cfgs: list[Config], *, run_names: list[str] | None = None, parent_run_id: str | None = None,
             tags: dict[str, str] | list[dict[str, str]] | None = None, in_tune: bool = False) -> list[RunOutcome]:
    """Train several configs one after another in ONE Ray Train run (one worker group).

    Each config is still its own MLflow run under its own run key, trained exactly as
    ``fit`` would train it (same seeds, same data order, same weights); only the
    workers' start-up (Ray actors, torch import, process group: seconds) is paid once
    per pack instead of once per run, which dominates for small models such as a digits
    zoo. ``tags`` go on every member's run, or one dict per member. Members already
    FINISHED in MLflow are skipped; a member is marked FINISHED as
    soon as it is done, so an interrupted pack resumes at its interrupted member (from
    that member's latest checkpoint when the same pack is run again).
    """
    if not cfgs:
        return []
    check_pack(cfgs)
    names = run_names or [c.run_key() for c in cfgs]
    if len(set(names)) != len(names):
        raise ConfigError(f"a pack needs distinct runs; got run keys {names}")
    if isinstance(tags, list) and len(tags) != len(cfgs):
        raise ValueError(f"fit_pack: {len(cfgs)} configs but {len(tags)} tag dicts")
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
         parent_run_id: str | None = None, tags: dict[str, str] | list[dict[str, str]] | None = None,
         in_tune: bool = False) -> list[RunOutcome]:
    for c in cfgs:
        validate(c, method)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    uri = tracking.ensure_tracking()
    ensure_ray()
    client = tracking.client(uri)
    outcomes, members, all_ids = _open_runs(client, cfgs, names, parent_run_id, tags)
    if not members:
        return outcomes
    cfg = cfgs[members[0][0]]
    packed = len(cfgs) > 1
    # The Ray run is named after the MLflow run(s) it trains: the same command again finds
    # its checkpoints (the same run key opens the same MLflow run), while the same config
    # in another experiment or store never shares a storage folder. A pack is named after
    # all its members, so it finds its checkpoints whichever members have finished since.
    ray_name = (f"{names[0]}-{all_ids[0][:8]}" if not packed
                else f"pack-{names[0]}-n{len(names)}-{_digest(names + all_ids)}")
    trainer = _torch_trainer(cfg, ray_name, {"members": [m for _, _, m in members], "tracking_uri": uri,
                                             "method": method, "packed": packed}, in_tune)
    try:
        result = trainer.fit()
    except BaseException:
        # Inside a sweep the trial's process is also torn down when the scheduler stops
        # it early, possibly after the sweep has closed; the sweep, which knows which
        # trials were stopped and which broke, sets those runs' final status instead.
        if not in_tune:
            # Ctrl-C / SIGTERM (Ray turns it into SystemExit inside ray.get): stopped, not failed
            stopped = isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit))
            for _, handle, _ in members:
                if client.get_run(handle.run_id).info.status != "FINISHED":
                    client.set_terminated(handle.run_id, status="KILLED" if stopped else "FAILED")
        raise
    _close_runs(client, result, ray_name, members, outcomes, packed)
    return outcomes


def _open_runs(client, cfgs: list[Config], names: list[str], parent_run_id: str | None,
               tags: dict[str, str] | list[dict[str, str]] | None):
    """Find or create each config's MLflow run: (outcomes, with those already FINISHED
    filled in; the members left to train as (index, run handle, loop entry); every run id)."""
    outcomes: list[RunOutcome | None] = [None] * len(cfgs)
    members, all_ids = [], []
    per_run = tags if isinstance(tags, list) else [tags] * len(cfgs)
    for i, (c, key, t) in enumerate(zip(cfgs, names, per_run, strict=True)):
        handle = tracking.open_run(client, c, key, parent_run_id=parent_run_id, tags=t)
        all_ids.append(handle.run_id)
        if handle.status == "FINISHED":
            run = client.get_run(handle.run_id)
            print(f"[{key}] already finished in MLflow run {handle.run_id}; nothing to train", flush=True)
            outcomes[i] = RunOutcome(handle.run_id, key, handle.experiment_id, dict(run.data.metrics), skipped=True)
            continue
        if handle.resumed:
            _refuse_if_driven_elsewhere(client, handle.run_id, key)
            client.update_run(handle.run_id, status="RUNNING")
        tracking.set_tags(client, handle.run_id, {TAG_DRIVER: _driver_id()})
        members.append((i, handle, {"cfg": c.to_dict(), "run_id": handle.run_id, "run_key": key}))
    return outcomes, members, all_ids


def _torch_trainer(cfg: Config, ray_name: str, loop_config: dict[str, Any], in_tune: bool):
    """The TorchTrainer of one Ray Train run of the engine's loop (``cfg`` gives its
    scaling, storage, retries and, for streamed data, its Ray datasets)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    # pickled by reference: Ray's controller and workers import the loop's module, not this
    # driver-side one (no MLflow client in the processes that never write to MLflow)
    from metaensemble.engine.loop import train_loop_per_worker

    datasets, dataset_config = _ray_datasets(cfg, f"{cfg.resolved_storage_path()}/{ray_name}")
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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


def _ray_datasets(cfg: Config, run_dir: str):
    """(datasets, DataConfig) for streamed data (train split over the workers, with its
    ``data.data_cpus`` budget); (None, None) for in-memory data. The train split is a
    callable, which Ray Train calls at every start of the worker group: a run resumed from
    the checkpoints in ``run_dir`` (a rerun, or Ray's own restart after a worker failed)
    reads its shard files in the order its next epoch would have had (streamed runs are
    never packed: the checkpoint is this run's)."""
    if not data.is_streaming(cfg.data):
        return None, None
    import functools

    import ray.train

    from metaensemble.data.parquet import ray_datasets
    from metaensemble.engine.checkpoint import resumed_train_split

    datasets, _, _ = ray_datasets(cfg.data, seed=cfg.seed, splits=("val", "test"))
    datasets["train"] = functools.partial(resumed_train_split, cfg.data, cfg.seed, run_dir)
    options = None
    if cfg.data.data_cpus:
        from ray.data import ExecutionOptions, ExecutionResources

        # the train stream's budget; val/test (read by rank 0 between epochs) keep the default
        options = {"train": ExecutionOptions(resource_limits=ExecutionResources(cpu=cfg.data.data_cpus))}
    return datasets, ray.train.DataConfig(datasets_to_split=["train"], execution_options=options)


def _close_runs(client, result, ray_name: str, members, outcomes: list[RunOutcome | None], packed: bool) -> None:
    """Every trained member's MLflow run FINISHED and tagged with its Ray run; its outcome
    (a pack's from MLflow, a single run's from Ray's result and checkpoint)."""
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    for i, handle, m in members:
        client.set_terminated(handle.run_id, status="FINISHED")
        tracking.set_tags(client, handle.run_id, {"metaensemble.ray_run": ray_name})
        if packed:
            outcomes[i] = RunOutcome(handle.run_id, m["run_key"], handle.experiment_id,
                                     dict(client.get_run(handle.run_id).data.metrics))
        else:
            if ckpt:
                tracking.set_tags(client, handle.run_id, {"metaensemble.ray_checkpoint": ckpt})
            outcomes[i] = RunOutcome(handle.run_id, m["run_key"], handle.experiment_id, dict(result.metrics or {}),
                                     False, ckpt)


TAG_DRIVER = "metaensemble.driver"


def _driver_id() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _refuse_if_driven_elsewhere(client, run_id: str, key: str) -> None:
    """Two drivers never train one run at once: a RUNNING run whose driver is another
    live process on this machine is refused. (A crashed driver's run is resumed; a driver
    on another host cannot be checked from here.)"""
    run = client.get_run(run_id)
    host, _, pid = run.data.tags.get(TAG_DRIVER, "").rpartition(":")
    import socket

    if run.info.status != "RUNNING" or host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    raise ConfigError(f"run {key} (MLflow run {run_id}) is being trained right now by process {pid} on this "
                      f"machine; wait for it, or change the config or seed for a run of its own")


def _digest(names: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:10]


def evaluate(model, cfg: Config, *, method: methods.Method | None = None, run_name: str | None = None,
             parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> RunOutcome:
    """The report of a trained run (val/test ACC, NLL, ECE, val-fitted temperature, test
    cNLL and cECE) for ``model``, a network some job produced without training (a fused
    net, a generated student, a descendant), logged as an MLflow run of ``cfg``'s
    experiment with the model as its ``model/`` artifact. Runs in this process (no Ray).

    The run is named after the model's weights and ``cfg`` (``run_name`` overrides), so
    evaluating the same model again returns the finished run instead of a second one."""
    import torch

    from metaensemble.engine.loop import build_loaders
    from metaensemble.engine.report import concat_predictions, final_report, predict_named
    from metaensemble.methods.base import RunContext

    model = models.unwrap(model)
    spec = _check_evaluable(model, cfg)
    method = method or methods.build(cfg)
    device = next(model.parameters()).device
    method.context = RunContext(device=device)
    loaders, info, _ = build_loaders(cfg, 0, 1, device)  # before any run exists: bad data fails here
    if spec["kwargs"].get("num_classes", info.num_classes) != info.num_classes:
        raise ConfigError(f"the model predicts {spec['kwargs']['num_classes']} classes, but {info.name} has "
                          f"{info.num_classes}")
    key = run_name or f"eval-{spec.get('arch', 'model')}-{_weights_digest(model)}-{cfg.config_hash()}"
    client = tracking.client(tracking.ensure_tracking())
    handle = tracking.open_run(client, cfg, key, parent_run_id=parent_run_id, tags=tags)
    if handle.status == "FINISHED":
        return RunOutcome(handle.run_id, key, handle.experiment_id, dict(client.get_run(handle.run_id).data.metrics),
                          skipped=True)
    was_training = model.training
    try:
        with torch.no_grad():
            val, test = (concat_predictions([predict_named(method, model, loaders[s], s)]) for s in ("val", "test"))
        report = final_report(val, test)
        tracking.log_metrics(client, handle.run_id, report, step=0)
        _log_model(client, handle.run_id, model, info, key, cfg, report)
    except BaseException:
        client.set_terminated(handle.run_id, status="FAILED")
        raise
    finally:
        model.train(was_training)
    client.set_terminated(handle.run_id, status="FINISHED")
    return RunOutcome(handle.run_id, key, handle.experiment_id, report)


def _check_evaluable(model, cfg: Config) -> dict[str, Any]:
    """``model``'s registry spec; in-memory data only (no Ray here)."""
    data.check(cfg.data)
    if data.is_streaming(cfg.data):
        raise ConfigError(f"engine.evaluate reads in-memory datasets; {cfg.data.name!r} streams through Ray Data")
    spec = getattr(model, "me_spec", None)
    if spec is None:
        raise ConfigError("engine.evaluate saves the model it reports on: pass a model built by "
                          "metaensemble.models.create_model (or loaded with models.load)")
    return spec


def _log_model(client, run_id: str, model, info, key: str, cfg: Config, report: dict[str, float]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        models.save_model(model, d, dataset=info.name, dataset_info=info.to_dict(),
                          run_id=run_id, run_key=key, config_hash=cfg.config_hash(), metrics=report)
        client.log_artifacts(run_id, d, artifact_path="model")


def _weights_digest(model) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return h.hexdigest()[:12]
