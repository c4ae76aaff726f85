"""The ``fusion`` engine method: the run's network is the fusion of ``fusion.models``
(built on every worker from the same activation sample, so every rank holds the same
network), then trained by cross-entropy or by distillation from the parents
(``fusion.finetune``). One run is one fusion setting: Tune sweeps over the ground
metric, solver, alignment cost, pins, fusion weight and finetune lr score each trial on
its val accuracy.

jobs/fuse.py fuses once on the driver instead and finetunes the saved result with
``model.init_from``; both paths call ``pipeline.fuse_parents``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble import data
from metaensemble.data import DatasetInfo
from metaensemble.errors import ConfigError
from metaensemble.methods.distill import EnsembleKD


class FusionMethod(EnsembleKD):
    name = "fusion"

    def validate(self) -> None:
        f = self.cfg.fusion
        if len(f.models) < 2:
            raise ConfigError(f"method fusion needs two or more parents in fusion.models (checkpoint folders or "
                              f"MLflow URIs), got {len(f.models)}")
        if self.cfg.model.init_from:
            raise ConfigError("method fusion builds its network by fusing fusion.models; model.init_from must be unset")

    @staticmethod
    def prepare_sweep(cfg):
        """Before a sweep's trials: with no ``fusion.models``, one parent from each zoo
        of ``fusion.parent_configs`` (trained first if missing)."""
        from metaensemble.methods.fusion.parents import resolve_parents

        parents = resolve_parents(cfg)
        return cfg.with_overrides({"fusion.models": [p.uri for p in parents]})

    def teacher_uris(self) -> list[str]:
        return list(self.cfg.fusion.models) if self.cfg.fusion.finetune == "kd" else []

    def build_model(self, info: DatasetInfo) -> nn.Module:
        from metaensemble.methods.fusion.pipeline import check_fits, fuse_parents
        from metaensemble.models import load

        parents = [load(u) for u in self.cfg.fusion.models]
        check_fits(parents, info, list(self.cfg.fusion.models))
        splits = data.load(self.cfg.data)
        return fuse_parents(parents, self.cfg.fusion, splits.train, splits.info).model.train()

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        if self.cfg.fusion.finetune == "kd":
            return super().training_step(model, batch)
        logits = model(batch["x"])
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.cfg.train.label_smoothing)
        return loss, {"loss": loss.detach(), "correct": (logits.argmax(1) == batch["y"]).sum()}
