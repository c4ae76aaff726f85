"""Knowledge distillation from a deep ensemble (DE-M KD): the loss, the teachers, and
``EnsembleKD`` (``method: kd``). Shared by every method that distils (LatentBE and
TDiv-SDiv build on ``EnsembleKD``, fusion finetunes with it, WeightFormer's loss is
``ensemble_kd_loss``), so it lives beside ``base`` rather than in one method's folder.

    loss = alpha * T^2 * KL(p_bar || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)
    p_bar = mean_m softmax(z_m / T)      (the average of tempered probabilities,
                                          not the softmax of averaged logits)

KL and CE against p_bar differ by p_bar's entropy, a constant for the student, so the
gradients are those of the paper's CE form.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.data import DatasetInfo
from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.methods.base import Method


def ensemble_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                     alpha: float, temperature: float) -> torch.Tensor:
    """``student_logits`` [B, C], ``teacher_logits`` [M, B, C] -> scalar loss (see module)."""
    t = temperature
    p_bar = F.softmax(teacher_logits.float() / t, dim=-1).mean(0)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    kl = (p_bar * (p_bar.clamp_min(1e-12).log() - log_s)).sum(-1).mean()
    loss = alpha * t * t * kl
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits.float(), labels)
    return loss


@dataclass
class LoadedTeacher:
    uri: str
    model: nn.Module
    sha256: str
    """SHA-256 of the checkpoint's model.safetensors: a teacher's identity."""
    meta: dict[str, Any]


def checkpoint_sha256(directory: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(directory) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def same_architecture(spec: dict[str, Any], meta: dict[str, Any]) -> bool:
    return spec["arch"] == meta["arch"] and spec["kwargs"] == meta["kwargs"]


def load_teachers(uris: list[str], student_spec: dict[str, Any]) -> list[LoadedTeacher]:
    """Load teacher checkpoints (folders or MLflow URIs) in eval mode, frozen, after
    checking each has exactly the student's architecture (name and constructor args)."""
    from metaensemble.models import load, local_dir, read_meta

    out = []
    for uri in uris:
        d = local_dir(uri)
        meta = read_meta(d)
        if not same_architecture(student_spec, meta):
            raise CheckpointError(
                f"teacher {uri} is {meta['arch']!r} with {meta['kwargs']}, but the student is "
                f"{student_spec['arch']!r} with {student_spec['kwargs']}: teachers must have the student's architecture"
            )
        model = load(d)
        for p in model.parameters():
            p.requires_grad_(False)
        out.append(LoadedTeacher(str(uri), model, checkpoint_sha256(d), meta))
    return out


@torch.no_grad()
def teacher_logits(teachers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """[M, B, C] logits of eval-mode teachers."""
    return torch.stack([t(x).float() for t in teachers])


class EnsembleKD(Method):
    """A student of ``cfg.model`` trained on the ensemble ``distill.teachers``: teachers
    of any registered architecture (a ResNet-34 ensemble for a ResNet-18 student), as
    long as they predict the student's classes. ``model.init_from`` starts the student
    from a checkpoint instead of from scratch (finetuning a generated or fused network)."""

    name = "kd"

    def validate(self) -> None:
        if len(self.cfg.distill.teachers) < 1:
            raise ConfigError(f"method {self.name} needs teachers: set distill.teachers to checkpoint folders or MLflow URIs")

    def teacher_uris(self) -> list[str]:
        return list(self.cfg.distill.teachers)

    def build_model(self, info: DatasetInfo) -> nn.Module:
        from metaensemble.models import local_dir, read_meta

        for uri in self.teacher_uris():
            k = read_meta(local_dir(uri))["kwargs"].get("num_classes")
            if k != info.num_classes:
                raise CheckpointError(f"teacher {uri} predicts {k} classes, but {info.name} has {info.num_classes}: "
                                      f"a teacher must predict the student's classes")
        return super().build_model(info)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        x, y = batch["x"], batch["y"]
        logits = model(x)
        d = self.cfg.distill
        loss = ensemble_kd_loss(logits, teacher_logits(self.teachers(x.device), x), y, d.alpha, d.temperature)
        return loss, {"loss": loss.detach(), "correct": (logits.argmax(1) == y).sum()}
