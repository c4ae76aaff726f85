"""Shared, real components: one local MLflow server and one local Ray instance per
test session (starting either takes seconds, so tests share them)."""

from __future__ import annotations

import os
import uuid

import pytest

from metaensemble.config import load_config


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    from metaensemble.tracking import LocalTrackingServer

    server = LocalTrackingServer(store=tmp_path_factory.mktemp("mlflow")).start()
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    import mlflow

    mlflow.set_tracking_uri(server.url)
    yield server.url
    server.stop()
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def ray_local(mlflow_uri):
    """A real local Ray instance with 4 logical CPUs (2-worker gloo DDP + trial drivers)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    ray.init(num_cpus=4, log_to_driver=True, include_dashboard=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def digits_cfg(tmp_path):
    """A fast digits config with its own Ray storage and MLflow experiment."""

    def make(*overrides: str):
        return load_config(
            "configs/teachers/digits.yaml",
            [f"storage_path={tmp_path / 'ray'}", f"experiment=test/{uuid.uuid4().hex[:8]}",
             "train.epochs=2", "model.kwargs.width=8", *overrides],
        )

    return make
