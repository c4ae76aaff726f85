"""MLflow runs for engine runs: find-or-create by a deterministic key, params, config.

Everything goes through an explicit ``MlflowClient`` and run id (no global "active
run"), so a Ray worker, a Tune trial and the driver can all write to the same run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from metaensemble.config import Config, save_config

TAG_KEY = "metaensemble.run_key"
TAG_HASH = "metaensemble.config_hash"
TAG_SEED = "metaensemble.seed"
TAG_TASK = "metaensemble.task"
TAG_PARENT = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # noqa: BLE001 - another process created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(c: MlflowClient, exp_id: str, run_key: str):
    """The newest run tagged with ``run_key`` in the experiment, or None."""
    runs = c.search_runs([exp_id], filter_string=f"tags.`{TAG_KEY}` = '{run_key}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


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
    """Reopen the run for ``run_key`` if one exists, else create it and log the config."""
    exp_id = experiment_id(c, cfg.experiment_name)
    existing = find_run(c, exp_id, run_key)
    if existing is not None:
        return RunHandle(existing.info.run_id, exp_id, existing.info.status, True)
    all_tags = {TAG_KEY: run_key, TAG_HASH: cfg.config_hash(), TAG_SEED: str(cfg.seed), TAG_TASK: cfg.task,
                **(tags or {})}
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    run = c.create_run(exp_id, run_name=run_key, tags=all_tags)
    run_id = run.info.run_id
    log_config(c, run_id, cfg)
    return RunHandle(run_id, exp_id, run.info.status, False)


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
    import time

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
