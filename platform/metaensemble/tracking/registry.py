"""The MLflow model registry: one way to register a run's model as a version.

    mv = register_model(client, "teacher.digits.convnet", run_id, tags={"seed": "3"})
    mv.version                          # "7": load it with models.load("models:/<name>/7")

Teachers (the zoo), generators (WeightFormer) and later the distilled, fused and
Learngene networks are all registered the same way, so a later job finds any of them
by name and version, with the run that produced it one click away.
"""

from __future__ import annotations

from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


def model_source(run_id: str, artifact_path: str = "model") -> str:
    """The ``runs:/`` URI a version points to (where the engine logs a run's model)."""
    return f"runs:/{run_id}/{artifact_path.strip('/')}"


def ensure_registered_model(
    client: MlflowClient, name: str, description: str | None = None
) -> None:
    """Create the registered model ``name`` unless it exists. Concurrent trials may race
    to create it; the loser's "already exists" is not an error."""
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            try:  # some stores report the clash with another code: check it is there
                client.get_registered_model(name)
            except MlflowException:
                raise e from None


def find_version(
    client: MlflowClient, name: str, run_id: str, artifact_path: str = "model"
) -> ModelVersion | None:
    """The newest version of ``name`` registered from this run's ``artifact_path``, if any."""
    found = [
        v
        for v in client.search_model_versions(f"name='{name}'")
        if v.run_id == run_id and _same_path(v, run_id, artifact_path)
    ]
    return max(found, key=lambda v: int(v.version)) if found else None


def _same_path(v: ModelVersion, run_id: str, artifact_path: str) -> bool:
    # Some stores keep the source resolved to the run's artifact location
    # (.../<run_id>/artifacts/<path>) rather than the runs:/ URI it was created with.
    src, path = (v.source or "").rstrip("/"), artifact_path.strip("/")
    return src == model_source(run_id, path) or src.endswith(f"/{run_id}/artifacts/{path}")


def register_model(
    client: MlflowClient,
    name: str,
    run_id: str,
    artifact_path: str = "model",
    *,
    tags: dict[str, Any] | None = None,
    description: str | None = None,
    reuse: bool = True,
) -> ModelVersion:
    """Register ``runs:/<run_id>/<artifact_path>`` as a version of ``name`` (created
    first if needed, with ``description``); returns the ModelVersion (``.version``).

    ``reuse``: a version already registered from this run and path is returned instead
    of adding a duplicate, so a job that is run again (or resumed after registering)
    leaves one version per run. Tag values are stored as strings."""
    ensure_registered_model(client, name, description)
    if reuse:
        existing = find_version(client, name, run_id, artifact_path)
        if existing is not None:
            return existing
    return client.create_model_version(
        name,
        model_source(run_id, artifact_path),
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
