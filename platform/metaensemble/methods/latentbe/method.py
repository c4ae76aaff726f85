"""LatentBE and TDiv-SDiv as engine methods (``method: latentbe`` / ``tdiv_sdiv``).

LatentBE: the student is the teachers' architecture with every conv and linear made a
BatchEnsemble layer of M members (``batchensemble``). The batch is tiled M times
(member-major) and student member m is distilled from teacher m alone with the KD loss of
``methods.distill``; the loss is the mean over members. The factors r and s decay toward 1
(not 0) and their gradients are multiplied by M, so each member's factors follow its own
loss: the effective gradient of r_m is dL_m/dr_m + wd * (r_m - 1). This is done by the
optimiser (``configure_optimizer`` adds a step pre-hook for the factors' group; the
engine's gradient clipping, a later pre-hook, clips the scaled gradient). Every
epoch the engine evaluates ``export(model)``: the plain network with the mean factors
folded in (or, with ``latentbe.fold=exact``, each layer the mean of the members' own
weights), which is what is selected on val, saved and registered; the other fold is
evaluated beside it.

TDiv-SDiv: before each LatentBE step, one step of input perturbation on the augmented
batch in pixel space [0, 1] (``diversifying_perturbation``): for a pair of members
i != j, shared by the teachers and the student,

    tdiv = -mean_b sum_c stopgrad(p_t^j) log p_t^i     (teachers i and j, T = 1)
    sdiv = the same for student members i and j (eval-mode BatchNorm: no statistics move)
    delta = g / ||g|| * sqrt(D) / 255 per example,  g = d(tdiv - sdiv)/dx
    x' = clip(x + delta, 0, 1)

and the teachers are re-run on x', on which alone the LatentBE loss is computed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.data import DatasetInfo
from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.methods.base import predict_logp, without
from metaensemble.methods.distill import EnsembleKD, teacher_logits
from metaensemble.methods.latentbe.batchensemble import (
    check_convertible,
    factor_parameters,
    fold,
    tile,
    to_batchensemble,
)

SPEC_ARGS = ("num_classes", "in_chans", "img_size")
"""Constructor arguments a checkpoint's spec has and ``model.kwargs`` does not."""


def member_kd_loss(student_logits: torch.Tensor, teacher_logits_: torch.Tensor, labels: torch.Tensor | None,
                   alpha: float, temperature: float) -> torch.Tensor:
    """The LatentBE loss: student member m [M, B, C] against teacher m [M, B, C] alone,
    each the KD loss of ``methods.distill.ensemble_kd_loss`` with one teacher, averaged over
    members. With ``alpha`` = 1 the labels do not enter."""
    t = temperature
    p_t = F.softmax(teacher_logits_.float() / t, dim=-1)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    kl = (p_t * (p_t.clamp_min(1e-12).log() - log_s)).sum(-1).mean(-1)  # [M]
    loss = alpha * t * t * kl.mean()
    if alpha < 1.0:
        m, b, c = student_logits.shape
        ce = F.cross_entropy(student_logits.float().reshape(m * b, c), labels.repeat(m))
        loss = loss + (1.0 - alpha) * ce
    return loss


def cross_entropy_div(logits_i: torch.Tensor, logits_j: torch.Tensor) -> torch.Tensor:
    """-mean_b sum_c stopgrad(softmax(z_j)) * log_softmax(z_i): the divergence TDiv-SDiv
    ascends, at temperature 1."""
    return -(F.softmax(logits_j.float(), -1).detach() * F.log_softmax(logits_i.float(), -1)).sum(-1).mean()


def draw_pair(members: int, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Two distinct members i != j, uniformly."""
    i = int(torch.randint(members, (1,), generator=generator))
    j = int(torch.randint(members - 1, (1,), generator=generator))
    return i, j + (j >= i)


def diversifying_perturbation(student: nn.Module, teacher_i: nn.Module, teacher_j: nn.Module, x: torch.Tensor,
                              pair: tuple[int, int], members: int, mean: torch.Tensor, std: torch.Tensor,
                              scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One TDiv-SDiv step on the normalised batch ``x`` [B, C, H, W] (pixels = x * std +
    mean, in [0, 1]). ``student`` is the unwrapped BatchEnsemble model: it runs in eval
    mode here (its BatchNorm neither uses nor updates batch statistics) and every
    submodule's mode is restored. Returns (x' normalised, delta in pixel units [B, C, H, W])."""
    i, j = pair
    mean, std = mean.view(1, -1, 1, 1).to(x), std.view(1, -1, 1, 1).to(x)
    pixels = (x.detach() * std + mean).clamp(0.0, 1.0).requires_grad_(True)
    modes = [(m, m.training) for m in student.modules()]
    with torch.enable_grad():
        xn = (pixels - mean) / std
        tdiv = cross_entropy_div(teacher_i(xn), teacher_j(xn))
        student.eval()
        try:
            out = student(tile(xn, members)).view(members, x.shape[0], -1)
        finally:
            for m, training in modes:  # each submodule's own mode, not the root's for all
                m.training = training
        sdiv = cross_entropy_div(out[i], out[j])
        (g,) = torch.autograd.grad(tdiv - sdiv, pixels)
    d = g[0].numel()
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    delta = g / norm * (math.sqrt(d) / 255.0 * scale)
    return (((pixels.detach() + delta).clamp(0.0, 1.0) - mean) / std), delta


def factor_step_hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimiser step pre-hook: in groups marked ``be_factors``, grad <- grad * M +
    wd * (p - 1) (the group's own ``weight_decay`` is 0)."""
    for group in optimizer.param_groups:
        if not group.get("be_factors"):
            continue
        scale, wd = group["be_grad_scale"], group["be_weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            p.grad.mul_(scale)
            if wd:
                p.grad.add_(p.detach() - 1.0, alpha=wd)


class LatentBE(EnsembleKD):
    """Member m of a BatchEnsemble student distilled from teacher m; the fold is the
    network that is selected, saved and registered (see the module docstring)."""

    name = "latentbe"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.info: DatasetInfo | None = None
        self._other_fold: tuple[nn.Module, nn.Module] | None = None

    @property
    def members(self) -> int:
        return self.cfg.latentbe.members or len(self.cfg.distill.teachers)

    # ---- before any work ---------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        d, m = self.cfg.distill, self.members
        if m < 2:
            raise ConfigError(f"method {self.name} needs at least 2 members (one per teacher); distill.teachers "
                              f"has {len(d.teachers)}")
        if len(d.teachers) < m:
            raise ConfigError(
                f"latentbe.members={m} but distill.teachers has only {len(d.teachers)}: student member m is "
                f"distilled from teacher m, so give at least {m} teachers or set latentbe.members <= {len(d.teachers)}"
            )
        self.check_teachers()

    def check_teachers(self) -> None:
        """Every teacher used must be the student's architecture (name and constructor
        arguments): member m starts as, and folds back into, that architecture."""
        from metaensemble.models import create_model, local_dir, read_meta

        arch, kwargs = self.cfg.model.name, dict(self.cfg.model.kwargs)
        spec = None
        for uri in self.teacher_uris():
            meta = read_meta(local_dir(uri))
            theirs = {k: v for k, v in meta["kwargs"].items() if k not in SPEC_ARGS}
            if meta["arch"] != arch or theirs != kwargs:
                raise CheckpointError(
                    f"teacher {uri} is {meta['arch']!r} {theirs}, but the {self.name} student is {arch!r} {kwargs}: "
                    f"LatentBE's teachers must have the student's architecture (use method kd for other teachers)"
                )
            spec = meta["kwargs"]
        if spec is not None:
            check_convertible(create_model(arch, **{**spec, **kwargs}))

    def teacher_uris(self) -> list[str]:
        return list(self.cfg.distill.teachers)[: self.members]

    @staticmethod
    def prepare_sweep(cfg):
        """Before a sweep's trials: with no ``distill.teachers``, the first M teachers of
        ``distill.teacher_config``'s zoo (trained first if missing)."""
        from metaensemble.methods.latentbe.teachers import resolve_teachers

        return resolve_teachers(cfg)[0]

    # ---- the model and its optimiser -------------------------------------------------
    def build_model(self, info: DatasetInfo) -> nn.Module:
        self.info = info
        return to_batchensemble(super().build_model(info), self.members)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The default groups without the factors, plus one group for every r and s:
        no plain weight decay, but decay toward 1 and gradients x M (``factor_step_hook``)."""
        factors = factor_parameters(model)
        groups = without(super().param_groups(model), factors)
        groups.append({"params": factors, "weight_decay": 0.0, "be_factors": True,
                       "be_grad_scale": float(self.members), "be_weight_decay": self.cfg.optim.weight_decay})
        return groups

    def configure_optimizer(self, model: nn.Module, steps_per_epoch: int):
        optimizer, scheduler = super().configure_optimizer(model, steps_per_epoch)
        optimizer.register_step_pre_hook(factor_step_hook)
        return optimizer, scheduler

    # ---- training ------------------------------------------------------------------------
    def distill_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        m, b = self.members, x.shape[0]
        d = self.cfg.distill
        logits = model(tile(x, m)).view(m, b, -1)
        t_logits = teacher_logits(self.teachers(x.device), x)  # [M, B, C]
        loss = member_kd_loss(logits, t_logits, y, d.alpha, d.temperature)
        probs = F.softmax(logits.detach().float(), -1).mean(0)
        return loss, {"loss": loss.detach(), "correct": (probs.argmax(1) == y).sum()}

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        return self.distill_step(model, batch["x"], batch["y"])

    # ---- what is evaluated, saved and registered -----------------------------------------
    def export(self, model: nn.Module) -> nn.Module:
        """The plain network of ``latentbe.fold`` (``batchensemble.fold``); the other fold is
        kept for ``predict``, which evaluates it beside this one."""
        exact = self.cfg.latentbe.fold == "exact"
        net = fold(model, exact=exact)
        self._other_fold = (net, fold(model, exact=not exact))
        return net

    @torch.no_grad()
    def predict(self, model: nn.Module, loader, split: str = "val"):
        """The exported fold's log-probabilities, and the other fold's as
        ``fold_<mean_factors|exact>`` (its metrics are logged beside the selected ones)."""
        logp, y = predict_logp(model, loader)
        net, other = self._other_fold or (None, None)
        if net is not model:  # not an export of this method (engine.evaluate of a saved fold)
            return logp, y
        name = "fold_exact" if self.cfg.latentbe.fold == "mean_factors" else "fold_mean_factors"
        return {"fold": logp, name: predict_logp(other, loader)[0]}, y


class TDivSDiv(LatentBE):
    """LatentBE on inputs perturbed toward the teachers' diversity the student lacks."""

    name = "tdiv_sdiv"

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        from metaensemble.models import unwrap

        x, y = batch["x"], batch["y"]
        teachers = self.teachers(x.device)
        i, j = draw_pair(self.members)
        x_adv, delta = diversifying_perturbation(
            unwrap(model), teachers[i], teachers[j], x, (i, j), self.members,
            torch.tensor(self.info.mean), torch.tensor(self.info.std), self.cfg.latentbe.perturb_scale,
        )
        loss, logs = self.distill_step(model, x_adv, y)
        logs["delta_norm"] = delta.flatten(1).norm(dim=1).mean().detach()
        return loss, logs
