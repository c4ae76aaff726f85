"""MLflow runs for engine runs: find-or-create by a deterministic key, params, config.

Everything goes through an explicit ``MlflowClient`` and run id (no global "active
run"), so a Ray worker, a Tune trial and the driver can all write to the same run.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import LifecycleStage, Metric, Param, Run, RunTag, ViewType
from mlflow.tracking import MlflowClient

from metaensemble.config import Config, save_config

TAG_KEY = "metaensemble.run_key"
TAG_HASH = "metaensemble.config_hash"
TAG_SEED = "metaensemble.seed"
TAG_TASK = "metaensemble.task"
TAG_PARENT = "mlflow.parentRunId"
TAG_TICKET = "metaensemble.ticket"
TAG_INVOCATION = "metaensemble.invocation"
INVOCATION_ENV = "METAENSEMBLE_INVOCATION"
"""Set by ``cli.run_job`` for one command (Ray's processes inherit it): every run that
command opens or reopens carries it as TAG_INVOCATION, so an interrupted command can
close exactly its own runs (``close_interrupted``)."""
PENDING = "pending"
MAX_PARAM_LEN = 6000
SEARCH_MAX = 1000
SETTLE_POLL_S = 0.1
# A pending run older than this is a creator that died before taking its ticket.
ABANDON_S = 120.0


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


# MLflow's experiment type, "Machine learning" (runs, models) rather than "GenAI apps &
# agents" (traces). MLflow 3.17's UI takes its view from a per-browser switch instead
# (jobs/mlflow_ui.py sets its default); the tag still labels the experiment's type.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
KIND_TRAINING = "custom_model_development"


# The runs table's saved view: MLflow's UI opens an experiment's runs table with the
# columns of the experiment tag ``mlflow.sharedViewState.<key>`` (JSON of the page's state)
# when the page's address carries ``?viewStateShareKey=<key>`` (the UI's own "share view"
# link; jobs/mlflow_ui.py opens it the first time a browser visits the experiment).
# The UI leaves out a selected column that no run of the experiment has, so one list
# serves every experiment: the engine's runs show val/test accuracy, NLL and ECE and
# their training time; the leaderboard's rows their means, paired gap and time.
VIEW_KEY = "metaensemble"
TAG_VIEW = f"mlflow.sharedViewState.{VIEW_KEY}"
KEY_METRICS = ("val_acc", "test_acc", "test_nll", "test_ece", "train_time_s",
               "acc", "acc_minus_kd", "nll", "ece", "time_s")
KEY_PARAMS = ("model.name",)


def runs_view() -> str:
    """The saved view's JSON: the key metrics and params as the runs table's columns."""
    columns = [f"params.`{k}`" for k in KEY_PARAMS] + [f"metrics.`{k}`" for k in KEY_METRICS]
    return json.dumps({"selectedColumns": columns})


def experiment_id(c: MlflowClient, name: str) -> str:
    """The experiment's id, creating (or restoring) it, tagged as a model-training
    experiment (``TAG_EXPERIMENT_KIND``) with the runs table's saved view (``TAG_VIEW``)
    where those tags are missing or out of date."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if TAG_EXPERIMENT_KIND not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, KIND_TRAINING)
        if exp.tags.get(TAG_VIEW) != runs_view():
            c.set_experiment_tag(exp.experiment_id, TAG_VIEW, runs_view())
        return exp.experiment_id
    try:
        return c.create_experiment(name, tags={TAG_EXPERIMENT_KIND: KIND_TRAINING, TAG_VIEW: runs_view()})
    except Exception:  # noqa: BLE001 - another process created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(c: MlflowClient, exp_id: str, run_key: str):
    """The run for ``run_key`` in the experiment, or None: the winner of the race that
    created it (see ``open_run``), or for runs made before that protocol, the newest."""
    return _winner(_key_runs(c, exp_id, run_key))


def child_runs(c: MlflowClient, exp_id: str, parent_run_id: str):
    return c.search_runs([exp_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=10_000)


@dataclass
class RunHandle:
    run_id: str
    experiment_id: str
    status: str
    resumed: bool


def open_run(c: MlflowClient, cfg: Config, run_key: str, *, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None) -> RunHandle:
    """Reopen the run for ``run_key`` if one exists, else create it and log the config.

    Atomic per key, also for processes on several machines sharing one MLflow server
    (no local lock covers those). Search-then-create would let two processes opening the
    same key at once each create a run, so every creator races instead:

    1. create its run, tagged with the key and ``ticket=pending``;
    2. take a ticket: 1 + the highest ticket of any run with the key, deleted ones
       included, and tag its run with it;
    3. wait until no run with the key is pending and two searches in a row agree, then
       the active run with the smallest (ticket, run id) wins;
    4. a loser deletes its own run and returns the winner's handle (``resumed=True``);
       only the winner logs the config, so a losing run never shows params or a config.

    Why tickets and not "earliest start_time": a run's start_time is the creator's clock
    *before* its request reached the server, so a creator stalled in between could land a
    run that sorts first after another creator already decided it had won. A ticket is
    taken after the run is visible, so a run created after someone decided always draws a
    higher ticket (a Lamport bakery). Reopening (and ``find_run``) apply the same rule.
    A creator that crashed between steps 1 and 2 leaves a pending run; after
    ``ABANDON_S`` it is ignored, so it cannot block the key.
    """
    exp_id = experiment_id(c, cfg.experiment_name)
    existing = _winner(_settled_runs(c, exp_id, run_key))
    if existing is not None:
        claim(c, existing.info.run_id)
        return _handle(existing, resumed=True)
    all_tags = {TAG_KEY: run_key, TAG_HASH: cfg.config_hash(), TAG_SEED: str(cfg.seed),
                TAG_TASK: cfg.task, **(tags or {}), **invocation_tags(), TAG_TICKET: PENDING}
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    run = c.create_run(exp_id, run_name=run_key, tags=all_tags)
    run_id = run.info.run_id
    winner = join_race(c, exp_id, run_key, run_id)
    if winner.info.run_id != run_id:
        c.delete_run(run_id)
        claim(c, winner.info.run_id)
        return _handle(winner, resumed=True)
    log_config(c, run_id, cfg)
    return RunHandle(run_id, exp_id, run.info.status, False)


@contextmanager
def job_run(c: MlflowClient, cfg: Config, run_key: str, job: str) -> Iterator[str]:
    """The parent run of a job that trains child runs: opened (or reopened, RUNNING again,
    when the same config ran before) under ``run_key`` with tag ``metaensemble.job``;
    yields its id; FINISHED when the block ends, FAILED when it raises."""
    handle = open_run(c, cfg, run_key, tags={"metaensemble.job": job})
    if handle.resumed:
        c.update_run(handle.run_id, status="RUNNING")
    try:
        yield handle.run_id
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM (cli.run_job): stopped, not broken
        c.set_terminated(handle.run_id, status="KILLED")
        raise
    except BaseException:
        c.set_terminated(handle.run_id, status="FAILED")
        raise
    c.set_terminated(handle.run_id, status="FINISHED")


def invocation_tags() -> dict[str, str]:
    """TAG_INVOCATION for this command's runs (nothing outside ``cli.run_job``)."""
    import os

    invocation = os.environ.get(INVOCATION_ENV)
    return {TAG_INVOCATION: invocation} if invocation else {}


def claim(c: MlflowClient, run_id: str) -> None:
    """Tag a reopened run as this command's (see INVOCATION_ENV)."""
    for k, v in invocation_tags().items():
        c.set_tag(run_id, k, v)


def close_interrupted(c: MlflowClient, invocation: str) -> list[str]:
    """End every run command ``invocation`` left RUNNING as KILLED (with an end time);
    returns their ids. A rerun of the command reopens and resumes them."""
    ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=SEARCH_MAX)]
    killed = []
    for i in range(0, len(ids), 100):
        for run in c.search_runs(ids[i:i + 100], f"tags.`{TAG_INVOCATION}` = '{invocation}' and "
                                                 "attributes.status = 'RUNNING'", max_results=SEARCH_MAX):
            c.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run.info.run_id)
    return killed


def join_race(c: MlflowClient, exp_id: str, run_key: str, run_id: str):
    """Steps 2 and 3 of ``open_run`` for the just-created pending run ``run_id``: the
    winning run (maybe ``run_id`` itself). Deleting a losing run is the caller's job."""
    tickets = [t for r in _key_runs(c, exp_id, run_key) if isinstance(t := _ticket(r), int)]
    c.set_tag(run_id, TAG_TICKET, str(1 + max(tickets, default=0)))
    winner = _winner(_settled_runs(c, exp_id, run_key))
    if winner is None:  # only if someone deleted our run meanwhile
        raise RuntimeError(f"run {run_id} for key {run_key!r} was deleted while being opened")
    return winner


def _key_runs(c: MlflowClient, exp_id: str, run_key: str) -> list[Run]:
    """Every run tagged with the key, deleted ones too: their tickets still count."""
    return c.search_runs([exp_id], filter_string=f"tags.`{TAG_KEY}` = '{run_key}'",
                         run_view_type=ViewType.ALL, max_results=SEARCH_MAX)


def _ticket(run: Run) -> int | str | None:
    """The run's ticket, ``PENDING`` while its creator is taking one, None for a run
    created before tickets existed."""
    value = run.data.tags.get(TAG_TICKET)
    if value is None:
        return None
    return int(value) if value.isdigit() else PENDING


def _active(run: Run) -> bool:
    return run.info.lifecycle_stage == LifecycleStage.ACTIVE


def _pending(run: Run, now_ms: float) -> bool:
    """A racer between create and ticket; past ``ABANDON_S`` it is taken as crashed."""
    return (_active(run) and _ticket(run) == PENDING
            and now_ms - (run.info.start_time or 0) < ABANDON_S * 1000)


def _settled_runs(c: MlflowClient, exp_id: str, run_key: str) -> list[Run]:
    """The key's runs once none is pending and two searches in a row read the same.

    Twice, because a search reads the run list and the runs' tags in separate queries:
    a ticket read in the second query may be newer than the list of the first. After
    two equal reads, every run missing from them was created after the tickets they
    show, so it draws a higher ticket than all of them.
    """
    previous = None
    while True:
        runs = _key_runs(c, exp_id, run_key)
        if any(_pending(r, time.time() * 1000) for r in runs):
            previous = None
            time.sleep(SETTLE_POLL_S)
            continue
        view = sorted((r.info.run_id, r.info.lifecycle_stage, r.data.tags.get(TAG_TICKET))
                      for r in runs)
        if view == previous:
            return runs
        previous = view


def _winner(runs: list[Run]) -> Run | None:
    """The active run with the smallest (ticket, run id); with no ticketed run, the
    newest run from before tickets; None if neither exists (pending runs never win)."""
    active = [r for r in runs if _active(r)]
    ticketed = [r for r in active if isinstance(_ticket(r), int)]
    if ticketed:
        return min(ticketed, key=lambda r: (_ticket(r), r.info.run_id))
    legacy = [r for r in active if _ticket(r) is None]
    return max(legacy, key=lambda r: r.info.start_time or 0) if legacy else None


def _handle(run: Run, resumed: bool) -> RunHandle:
    return RunHandle(run.info.run_id, run.info.experiment_id, run.info.status, resumed)


def log_config(c: MlflowClient, run_id: str, cfg: Config) -> None:
    """Log the resolved config as ``config.yaml`` and every key flattened as a param."""
    params = [Param(k, _param_value(v)) for k, v in sorted(cfg.flat().items())]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as d:
        save_config(cfg, Path(d) / "config.yaml")
        c.log_artifact(run_id, str(Path(d) / "config.yaml"))


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s[:MAX_PARAM_LEN]


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if _is_number(v)]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i : i + 500])


def set_tags(c: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, bool | str)
