"""The contract between a method and the engine.

A method says *what* to train: how to build the model, the loss of one batch, and how
to turn a model into predictions. The engine owns *how*: devices, DDP, AMP, checkpoints,
resume, metrics and MLflow. A method never touches Ray.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.config import Config
from metaensemble.data import DatasetInfo
from metaensemble.models import create_model


@torch.no_grad()
def predict_logp(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode log-probabilities [N, C] (float32, cpu) and labels [N] over ``loader``."""
    model.eval()
    logps, ys = [], []
    for batch in loader:
        logps.append(F.log_softmax(model(batch["x"]).float(), dim=1).cpu())
        ys.append(batch["y"].cpu())
    return torch.cat(logps), torch.cat(ys)


class Method:
    """Plain supervised training with cross-entropy; the base of every method."""

    name = "supervised"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def validate(self) -> None:
        """Method-specific checks of ``cfg`` before any work starts (raise ConfigError)."""

    def build_model(self, info: DatasetInfo) -> nn.Module:
        """The model to train, built from ``cfg.model`` for ``info``'s input shape."""
        return create_model(
            self.cfg.model.name, num_classes=info.num_classes, in_chans=info.in_chans,
            img_size=info.img_size, **self.cfg.model.kwargs,
        )

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss of one batch (``x`` [B,C,H,W], ``y`` [B]) and scalars to log."""
        logits = model(batch["x"])
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.cfg.train.label_smoothing)
        return loss, {"loss": loss.detach(), "correct": (logits.argmax(1) == batch["y"]).sum()}

    @torch.no_grad()
    def predict(self, model: nn.Module, loader, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities [N, C] (float32, cpu) and labels [N] over ``loader``.

        ``split`` ("val" or "test") names the data split; methods that evaluate several
        derived models (the meta-learners) use it to pick which ones."""
        return predict_logp(model, loader)

    def on_epoch_end(self, model: nn.Module, epoch: int, rank: int) -> None:
        """Hook after each epoch's optimisation, before validation (e.g. folding)."""
