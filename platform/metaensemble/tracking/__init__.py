"""The MLflow side: store, runs, registry, teacher zoo."""

from metaensemble.tracking.runs import (
    RunHandle,
    child_runs,
    client,
    experiment_id,
    find_run,
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
    "ensure_tracking", "experiment_id", "find_run", "local_store_dir", "log_config", "log_metrics",
    "open_run", "registered_name", "set_tags",
]
