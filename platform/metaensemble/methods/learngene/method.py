"""Learngene SWS as engine methods: stage 1 (``method: learngene``), the aux-net
(``model: aux_vit``) distilled from a teacher of any architecture; stage 2
(``method: learngene_descendant``), a descendant finetuned (``LearngeneDescendant``).
Both take DeiT's Mixup/CutMix and model EMA from ``DeitRecipe``.

    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y~)

with the teacher in eval mode under no_grad on the same augmented (mixed) images, and
y~ the Mixup/CutMix soft targets with label smoothing (timm's ``Mixup``) when those are
on. With alpha = 1 (the paper's) no label enters. The DeiT learning rate is scaled by
global batch / ``learngene.lr_batch_reference`` (the base lr only, as DeiT does).

The teacher is ``learngene.teacher``: a checkpoint folder or MLflow URI of any
registered architecture, or a foreign state-dict file (``.pth``/``.pt``, e.g. timm's
LeViT-384) read with ``torch.load(weights_only=True)``, built as ``learngene.teacher_arch``
with ``learngene.teacher_kwargs`` and loaded with strict keys (every difference named).
The exported network is the aux-net itself: its checkpoint is the learngene.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.data import DatasetInfo
from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.methods.base import Method, freeze, predict_logp

FOREIGN_SUFFIXES = (".pth", ".pt", ".bin")


def soft_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, -1)
    log_t = F.log_softmax(teacher_logits.float() / t, -1)
    return t * t * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def is_foreign(uri: str) -> bool:
    return "://" not in uri and Path(uri).suffix in FOREIGN_SUFFIXES


def load_foreign_teacher(path: str, arch: str, kwargs: dict[str, Any], info: DatasetInfo, *,
                         check_only: bool = False) -> nn.Module:
    """A registered ``arch`` built for ``info`` and loaded, strictly, from a state-dict file
    (``{"model": state}`` or the state itself) read without unpickling code. With
    ``check_only`` the names and shapes are checked and nothing is loaded (the model may
    live on the meta device)."""
    from metaensemble.models import check_state_dict, create_model

    model = create_model(arch, num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size, **kwargs)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        raise CheckpointError(f"teacher file {path} cannot be read as a state dict with weights_only=True: "
                              f"{str(e).splitlines()[0]}") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"teacher file {path} holds no state dict (a mapping of tensor names to tensors, "
                              f"at the top level or under 'model')")
    check_state_dict(model, state, f"teacher file {path} (as {arch} {kwargs})")
    if check_only:
        return model
    model.load_state_dict(state, strict=True)
    return model


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets [B, C] (Mixup/CutMix's, label smoothing included)."""
    return torch.sum(-target * F.log_softmax(logits.float(), -1), -1).mean()


class DeitRecipe(Method):
    """What both stages take from DeiT's training recipe: timm's Mixup/CutMix (the soft
    targets carry the label smoothing) and, with ``learngene.model_ema``, an EMA of the
    weights (timm's ``ModelEmaV3``) updated after every optimiser step, evaluated beside
    the network as ``ema`` and kept in the checkpoints; selection and export stay with the
    network, as in DeiT."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.info: DatasetInfo | None = None
        self._mixup = None
        self._ema = None
        self._ema_state: dict[str, torch.Tensor] | None = None  # restored on resume, until track_ema

    def check_mixup_batch(self) -> None:
        lg = self.cfg.learngene
        if (lg.mixup or lg.cutmix) and self.cfg.data.batch_size % 2:
            raise ConfigError(f"Mixup/CutMix pairs examples within a batch: data.batch_size must be even, "
                              f"got {self.cfg.data.batch_size}")

    def build_model(self, info: DatasetInfo) -> nn.Module:
        self.info = info
        lg = self.cfg.learngene
        if lg.mixup or lg.cutmix:
            from timm.data import Mixup

            self._mixup = Mixup(mixup_alpha=lg.mixup, cutmix_alpha=lg.cutmix, prob=lg.mixup_prob,
                                label_smoothing=lg.label_smoothing, num_classes=info.num_classes)
        return super().build_model(info)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mixed images, soft targets [B, C]), or (x, None) without Mixup/CutMix."""
        if self._mixup is None:
            return x, None
        return self._mixup(x.clone(), y)  # timm mixes in place: leave the caller's batch alone

    def track_ema(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """With ``learngene.model_ema``: an EMA of ``model`` (the restored one on resume;
        rank 0's on every rank, as only rank 0 saves it), updated after every step of
        ``optimizer``."""
        lg = self.cfg.learngene
        if not lg.model_ema:
            return
        from timm.utils import ModelEmaV3

        ema = self._ema = ModelEmaV3(model, decay=lg.model_ema_decay)
        if self._ema_state is not None:
            ema.module.load_state_dict(self._ema_state)
            self._ema_state = None
        if self.context.world_size > 1:
            for t in ema.module.state_dict().values():
                self.context.all_reduce(t.mul_(int(self.context.rank == 0)))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: ema.update(model))

    def state_dict(self) -> dict[str, Any]:
        if self._ema is None or self.context.rank != 0:  # the same on every rank: saved once
            return {}
        return {"ema": {k: v.detach() for k, v in self._ema.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ema_state = state.get("ema")

    @torch.no_grad()
    def predict(self, model: nn.Module, loader, split: str = "val"):
        """The network's log-probabilities, and the EMA's as ``ema`` when there is one."""
        logp, y = predict_logp(model, loader)
        if self._ema is None:
            return logp, y
        return {"model": logp, "ema": predict_logp(self._ema.module, loader)[0]}, y


class LearngeneAux(DeitRecipe):
    """The aux-net distilled from ``learngene.teacher`` (see the module docstring)."""

    name = "learngene"

    # ---- before any work -------------------------------------------------------------
    def validate(self) -> None:
        from metaensemble.methods.learngene.model import parse_stages

        cfg, lg = self.cfg, self.cfg.learngene
        if cfg.model.name != "aux_vit":
            raise ConfigError(f"method learngene trains an aux-net: set model.name=aux_vit (got {cfg.model.name!r})")
        depth_stages = cfg.model.kwargs.get("stages", "L16_33433")
        parse_stages(depth_stages)
        if not lg.teacher:
            raise ConfigError("method learngene needs a teacher: set learngene.teacher to a checkpoint folder, an "
                              "MLflow URI (models:/teacher.<dataset>.<arch>/N) or a state-dict file with teacher_arch")
        self.check_mixup_batch()
        if is_foreign(lg.teacher):
            if not Path(lg.teacher).is_file():
                raise ConfigError(f"learngene.teacher file {lg.teacher} does not exist")
            if not lg.teacher_arch:
                raise ConfigError(f"learngene.teacher {lg.teacher} is a state-dict file: set learngene.teacher_arch "
                                  f"to its registered architecture (e.g. levit_384)")
            from metaensemble import data, models

            models.check_name(lg.teacher_arch)
            if not data.is_streaming(cfg.data):  # the file against the architecture, before any run
                info = data.load(cfg.data).info  # real tensors: the data is not built on the meta device
                with torch.device("meta"):
                    load_foreign_teacher(lg.teacher, lg.teacher_arch, lg.teacher_kwargs, info, check_only=True)
        else:
            self._check_teacher_classes()

    def _check_teacher_classes(self) -> None:
        from metaensemble import data
        from metaensemble.models import local_dir, read_meta

        meta = read_meta(local_dir(self.cfg.learngene.teacher))
        k = meta["kwargs"].get("num_classes")
        if not data.is_streaming(self.cfg.data):
            n = data.info(self.cfg.data).num_classes
            if k != n:
                raise CheckpointError(f"teacher {self.cfg.learngene.teacher} predicts {k} classes, but "
                                      f"{self.cfg.data.name} has {n}: the teacher must predict the aux-net's classes")

    @staticmethod
    def prepare_sweep(cfg):
        """Before a sweep's trials: with no ``learngene.teacher``, the first teacher of
        ``learngene.teacher_config``'s zoo (trained first if missing)."""
        from metaensemble.methods.learngene.teacher import resolve_teacher

        return resolve_teacher(cfg)[0]

    # ---- teacher -------------------------------------------------------------------------
    def teacher_uris(self) -> list[str]:
        t = self.cfg.learngene.teacher
        return [] if t is None or is_foreign(t) else [t]

    def teachers(self, device) -> list[nn.Module]:
        lg = self.cfg.learngene
        if self._teachers is None and lg.teacher and is_foreign(lg.teacher):
            self._teachers = [freeze(load_foreign_teacher(lg.teacher, lg.teacher_arch, lg.teacher_kwargs, self.info))]
        return super().teachers(device)

    # ---- the optimiser ---------------------------------------------------------------------
    def lr_scale(self) -> float:
        ref = self.cfg.learngene.lr_batch_reference
        return 1.0 if not ref else self.cfg.data.batch_size * self.cfg.scaling.num_workers / ref

    def configure_optimizer(self, model: nn.Module, steps_per_epoch: int):
        """DeiT's rule: the base lr times global batch / ``lr_batch_reference``; the
        warm-up start and ``min_lr`` stay as configured (as in DeiT)."""
        from metaensemble.engine.optim import build_optimizer, build_scheduler

        o = self.cfg.optim.model_copy(update={"lr": self.cfg.optim.lr * self.lr_scale()})
        optimizer = build_optimizer(o, self.param_groups(model))
        self.track_ema(model, optimizer)
        return optimizer, build_scheduler(optimizer, o, steps_per_epoch, self.cfg.train.epochs)

    # ---- training --------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        lg = self.cfg.learngene
        x, target = self.mix(batch["x"], batch["y"])
        y = batch["y"]
        logits = model(x)
        with torch.no_grad():
            t_logits = self.teachers(x.device)[0](x).float()
        loss = lg.alpha * soft_kd_loss(logits, t_logits, lg.temperature)
        if lg.alpha < 1.0:
            if target is None:
                ce = F.cross_entropy(logits.float(), y, label_smoothing=lg.label_smoothing)
            else:
                ce = soft_target_cross_entropy(logits, target)
            loss = loss + (1.0 - lg.alpha) * ce
        return loss, {"loss": loss.detach(), "correct": (logits.detach().argmax(1) == y).sum(),
                      "teacher_agree": (logits.detach().argmax(1) == t_logits.argmax(1)).float().mean()}


class LearngeneDescendant(DeitRecipe):
    """Stage 2: a descendant (``model: descendant_vit``, from the learngene through
    ``model.init_from`` or from random init) finetuned with cross-entropy on DeiT's targets
    (Mixup/CutMix with label smoothing when on, else ``train.label_smoothing``), and the EMA
    with ``learngene.model_ema``: the same recipe for both inits
    (``experiment.finetune_config``)."""

    name = "learngene_descendant"

    def validate(self) -> None:
        if self.cfg.model.name != "descendant_vit":
            raise ConfigError(f"method learngene_descendant finetunes a descendant: set model.name=descendant_vit "
                              f"(got {self.cfg.model.name!r})")
        self.check_mixup_batch()

    def configure_optimizer(self, model: nn.Module, steps_per_epoch: int):
        optimizer, scheduler = super().configure_optimizer(model, steps_per_epoch)
        self.track_ema(model, optimizer)
        return optimizer, scheduler

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        x, target = self.mix(batch["x"], batch["y"])
        logits = model(x)
        if target is None:
            loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.cfg.train.label_smoothing)
        else:
            loss = soft_target_cross_entropy(logits, target)
        return loss, {"loss": loss.detach(), "correct": (logits.argmax(1) == batch["y"]).sum()}
