"""The MLflow side: store, runs, registry, teacher zoo."""

from metaensemble.tracking.registry import ensure_registered_model, find_version, register_model
from metaensemble.tracking.runs import (
    RunHandle,
    child_runs,
    client,
    experiment_id,
    find_run,
    job_run,
    log_config,
    log_metrics,
    open_run,
    set_tags,
)
from metaensemble.tracking.store import (
    LocalTrackingServer,
    describe_store,
    ensure_tracking,
    local_store_dir,
)
from metaensemble.tracking.zoo import TeacherEntry, TeacherZoo, registered_name

__all__ = [
    "LocalTrackingServer", "RunHandle", "TeacherEntry", "TeacherZoo", "child_runs", "client", "describe_store",
    "ensure_registered_model", "ensure_tracking", "experiment_id", "find_run", "find_version",
    "local_store_dir", "job_run", "log_config", "log_metrics", "open_run", "register_model", "registered_name",
    "set_tags",
]
