"""The teacher zoo: registered models ``teacher.<dataset>.<arch>``, one version a seed.

    zoo = TeacherZoo("digits", "convnet")
    for t in zoo.teachers():            # TeacherEntry: version, seed, run_id, metrics, parent...
        model = zoo.load(t)             # rebuilt from safetensors, never unpickled
    zoo.teachers(role="parent")         # a soup-regime zoo's parents (not teachers)

A soup-regime zoo (``zoo.soup``) registers its parents as versions tagged
``role=parent``, which ``teachers()`` leaves out unless asked for, and tags each child
``soup_parent=<the parent's MLflow run id>`` (``TeacherEntry.parent``): weights from
different parents are not averageable, and a soup can refuse them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from metaensemble.errors import ZooError

METRIC_TAGS = ("val_acc", "val_nll", "test_acc", "test_nll", "test_ece", "test_cnll", "test_cece")


def registered_name(dataset: str, arch: str) -> str:
    return f"teacher.{dataset}.{arch}"


@dataclass(frozen=True)
class TeacherEntry:
    name: str
    version: int
    seed: int
    run_id: str
    source: str
    config_hash: str
    metrics: dict[str, float] = field(default_factory=dict)
    role: str = "teacher"
    """``teacher``, or ``parent``: a soup-regime zoo's parent, which its children start from."""
    parent: str = ""
    """A soup-regime child's parent (its MLflow run id); "" for a teacher trained from scratch."""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class TeacherZoo:
    def __init__(self, dataset: str, arch: str, tracking_uri: str | None = None) -> None:
        import mlflow

        self.dataset, self.arch = dataset, arch
        self.name = registered_name(dataset, arch)
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)

    def exists(self) -> bool:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            return False
        return True

    def teachers(self, config_hash: str | None = None, role: str = "teacher") -> list[TeacherEntry]:
        """Every registered teacher, one per seed (the newest version wins), by seed. With
        ``config_hash``, only the versions trained with that recipe: recipes of one
        (dataset, arch) (the main job's width-16 teachers, the distillation job's narrow
        ones) share the registered model without superseding each other. ``role``:
        ``teacher`` (versions without a role tag too) or ``parent`` (a soup-regime
        zoo's parents)."""
        if not self.exists():
            return []
        by_seed: dict[int, TeacherEntry] = {}
        for v in self.client.search_model_versions(f"name='{self.name}'"):
            if v.status != "READY" or "seed" not in v.tags:
                continue
            e = TeacherEntry(
                name=self.name, version=int(v.version), seed=int(v.tags["seed"]), run_id=v.run_id or "",
                source=v.source, config_hash=v.tags.get("config_hash", ""),
                metrics={k: float(v.tags[k]) for k in METRIC_TAGS if k in v.tags},
                role=v.tags.get("role", "teacher"), parent=v.tags.get("soup_parent", ""),
            )
            if e.role != role or (config_hash is not None and e.config_hash != config_hash):
                continue
            if e.seed not in by_seed or e.version > by_seed[e.seed].version:
                by_seed[e.seed] = e
        return [by_seed[s] for s in sorted(by_seed)]

    def seeds(self) -> set[int]:
        return {t.seed for t in self.teachers()}

    def require(self, n: int) -> list[TeacherEntry]:
        found = self.teachers()
        if len(found) < n:
            raise ZooError(f"zoo {self.name} has {len(found)} teachers, {n} needed; train more with jobs/train_teachers.py")
        return found

    def register(self, run_id: str, seed: int, config_hash: str, metrics: dict[str, Any],
                 artifact_path: str = "model", *, role: str = "teacher", parent: str = "") -> TeacherEntry:
        """Register ``runs:/<run_id>/<artifact_path>`` as the version for ``seed`` (a run
        registered before keeps its version); ``role="parent"`` for a soup-regime zoo's
        parent, ``parent`` the parent run id of a child fine-tuned from one."""
        from metaensemble.tracking.registry import register_model

        tags = {"seed": str(seed), "config_hash": config_hash, "dataset": self.dataset, "arch": self.arch}
        if role != "teacher":
            tags["role"] = role
        if parent:
            tags["soup_parent"] = parent
        tags.update({k: f"{float(metrics[k]):.6f}" for k in METRIC_TAGS if k in metrics})
        mv = register_model(self.client, self.name, run_id, artifact_path, tags=tags,
                            description=f"Teachers for {self.dataset} / {self.arch}, one version per seed.")
        return TeacherEntry(self.name, int(mv.version), seed, run_id, mv.source, config_hash,
                            {k: float(metrics[k]) for k in METRIC_TAGS if k in metrics}, role, parent)

    def download(self, entry: TeacherEntry, dst: str | Path | None = None) -> Path:
        """A local folder with the teacher's model.safetensors + model.json."""
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{entry.run_id}/model", dst_path=str(dst) if dst else None,
            tracking_uri=self.tracking_uri,
        ))

    def load(self, entry: TeacherEntry) -> nn.Module:
        from metaensemble.models import load

        return load(self.download(entry), expect_arch=self.arch)

    def table(self, config_hash: str | None = None) -> str:
        """The teachers (of one recipe with ``config_hash``), then any parents their
        children start from; a child's line ends with its parent's run id."""
        rows = self.teachers(config_hash)
        parent_ids = {t.parent for t in rows if t.parent}
        parents = [p for p in self.teachers(role="parent") if config_hash is None or p.run_id in parent_ids]
        head = f"{'seed':>5} {'version':>7} {'val_acc':>8} {'test_acc':>8} {'test_nll':>8} {'test_ece':>8}  run_id"
        lines = [f"teacher zoo {self.name}: {len(rows)} teachers", head]
        lines += [self._line(t) + (f"  (parent {t.parent})" if t.parent else "") for t in rows]
        if parents:
            lines += [f"parents (role=parent, not teachers): {len(parents)}", head]
            lines += [self._line(p) for p in parents]
        return "\n".join(lines)

    @staticmethod
    def _line(t: TeacherEntry) -> str:
        m = t.metrics
        return (f"{t.seed:>5} {t.version:>7} {m.get('val_acc', float('nan')):>8.4f} {m.get('test_acc', float('nan')):>8.4f} "
                f"{m.get('test_nll', float('nan')):>8.4f} {m.get('test_ece', float('nan')):>8.4f}  {t.run_id}")
