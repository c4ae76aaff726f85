"""The contract between a method and the engine.

A method says *what* to train; the engine owns *how* (devices, DDP, AMP, checkpoints,
resume, metrics, MLflow). A method never touches Ray or ``torch.distributed``: where it
runs reaches it as ``self.context``. Every hook has a default, so the plain supervised
method below is the whole contract with nothing overridden:

    prepare_sweep(cfg)           static, on the driver before a sweep's trials: the config
                                 with its external inputs resolved (teachers from the zoo,
                                 trained first if missing); default: ``cfg`` unchanged
    validate()                   method-specific checks before any work (raise ConfigError)
    context                      a ``RunContext`` (rank, world_size, device, all_reduce) the
                                 engine sets on each worker before any hook below runs there;
                                 elsewhere (tests, ``engine.evaluate``) one process on the CPU
    build_model(info)            the module to train (built after ``load_state_dict`` on resume)
    param_groups(model)          optimiser parameter groups (default: no decay on norms/biases)
    configure_optimizer(model, steps_per_epoch)
                                 optimiser + per-step schedule (timm factories from ``cfg.optim``)
    training_step(model, batch)  loss and scalars; every scalar is averaged per epoch and
                                 logged as ``train_<name>`` ("correct" becomes train_acc)
    rebuild(model, epoch)        after every epoch, on every rank: return a new/changed
                                 module to re-wrap (the engine re-wraps DDP and rebuilds the
                                 optimiser) or None; also the place to note that an epoch ended
    carried_parameters(old, new) after a rebuild: which new parameters continue which old
                                 ones (they keep their optimiser state); default: the same objects
    state_dict() / load_state_dict(state)
                                 the method's own state, saved with every checkpoint
    export(model)                the network that is evaluated, saved and registered
    predict(model, loader, split)
                                 log-probabilities, or named ones ``{"ensemble": ..,
                                 "member/0": ..}``: the first name is the one selected on
    teachers(device)             frozen teachers of any registered architecture, loaded
                                 once per worker from ``teacher_uris()``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.config import Config
from metaensemble.data import DatasetInfo
from metaensemble.models import create_model

Predictions = torch.Tensor | dict[str, torch.Tensor]


@torch.no_grad()
def predict_logp(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode log-probabilities [N, C] (float32, cpu) and labels [N] over ``loader``."""
    model.eval()
    logps, ys = [], []
    for batch in loader:
        logps.append(F.log_softmax(model(batch["x"]).float(), dim=1).cpu())
        ys.append(batch["y"].cpu())
    if not logps:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logps), torch.cat(ys)


def named(pred: Predictions) -> dict[str, torch.Tensor]:
    """Predictions as a dict; a single tensor is the primary prediction ``""``."""
    return pred if isinstance(pred, dict) else {"": pred}


@dataclass(frozen=True)
class RunContext:
    """Where a method's code runs: this process is ``rank`` of ``world_size`` training
    processes (DDP ranks), computing on ``device``. ``reduce_sum`` is the in-place sum
    over ranks the engine supplies (needed when ``world_size > 1``); a method calls
    ``all_reduce`` instead of ``torch.distributed``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    reduce_sum: Callable[[torch.Tensor], Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.world_size > 1 and self.reduce_sum is None:
            raise ValueError(f"a RunContext of {self.world_size} processes needs the engine's reduce_sum")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank, in place, and returned. Every rank must call
        it, with tensors of the same shape and dtype in the same order. One process:
        ``tensor`` unchanged."""
        if self.world_size > 1:
            self.reduce_sum(tensor)
        return tensor


class Method:
    """Plain supervised training with cross-entropy; the base of every method."""

    name = "supervised"
    context = RunContext()  # one process on the CPU until the engine sets the worker's own

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._teachers: list[nn.Module] | None = None

    # ---- before any work -------------------------------------------------------------
    @staticmethod
    def prepare_sweep(cfg: Config) -> Config:
        """Called once on the driver before a sweep's trials (``sweep.runner.prepare``):
        ``cfg`` with the method's external inputs resolved (e.g. its teachers taken from
        the zoo, trained first if missing), so every trial trains from the same inputs.
        Default: ``cfg`` unchanged."""
        return cfg

    def validate(self) -> None:
        """Method-specific checks of ``cfg`` before any work starts (raise ConfigError)."""

    # ---- the model and its optimiser ---------------------------------------------------
    def build_model(self, info: DatasetInfo) -> nn.Module:
        """The model to train, built from ``cfg.model`` for ``info``'s input shape. On
        resume it is called after ``load_state_dict``, so it can build the structure the
        method had reached (e.g. after a rebuild)."""
        return create_model(
            self.cfg.model.name, num_classes=info.num_classes, in_chans=info.in_chans,
            img_size=info.img_size, **self.cfg.model.kwargs,
        )

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimiser parameter groups. Default: ``optim.weight_decay`` on weights, none on
        norms, biases (1-d tensors) and what the model lists in ``no_weight_decay()``
        (timm's ViTs: position embedding, class token) unless ``optim.decay_norm_bias``.
        A group may set its own ``weight_decay`` and ``lr_scale`` (multiplies the
        schedule's lr, warm-up included; prefer it to a group ``lr``, from which timm's
        warm-up would start at the one absolute ``optim.warmup_lr``)."""
        from timm.optim import param_groups_weight_decay

        o = self.cfg.optim
        if o.decay_norm_bias or not o.weight_decay:
            return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": o.weight_decay}]
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        return param_groups_weight_decay(model, o.weight_decay, no_weight_decay_list=skip)

    def configure_optimizer(self, model: nn.Module, steps_per_epoch: int):
        """(optimizer, scheduler) for ``model``; the scheduler is timm's, stepped by the
        engine with ``step_update(global_step)`` after every optimiser step."""
        from metaensemble.engine.optim import build_optimizer, build_scheduler

        optimizer = build_optimizer(self.cfg.optim, self.param_groups(model))
        return optimizer, build_scheduler(optimizer, self.cfg.optim, steps_per_epoch, self.cfg.train.epochs)

    # ---- training ----------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss of one batch (``x`` [B,C,H,W], ``y`` [B]) and scalars to log (tensors are
        fine and preferred: the engine never moves them to the host per step). Return the
        same names at every step and on every rank: they are reduced over ranks by position."""
        logits = model(batch["x"])
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.cfg.train.label_smoothing)
        return loss, {"loss": loss.detach(), "correct": (logits.argmax(1) == batch["y"]).sum()}

    def rebuild(self, model: nn.Module, epoch: int) -> nn.Module | None:
        """Called on every rank after each epoch's optimisation, before validation, with
        ``epoch`` epochs done (1-based count), on the unwrapped model. Return a module (the
        same one with new parameters, or a new one) and the engine re-wraps it for DDP and
        builds a fresh optimiser and schedule (continuing at the current step), with the
        state of the parameters ``carried_parameters`` names; return
        None to change nothing. Must be deterministic (it runs on every rank; the global
        RNGs are seeded alike on every rank for the call) and recorded in ``state_dict``
        so a resume rebuilds it."""
        return None

    def carried_parameters(self, old: nn.Module, new: nn.Module) -> dict[nn.Parameter, nn.Parameter]:
        """After ``rebuild`` returned ``new`` in place of ``old`` (both unwrapped): each
        parameter of ``new`` that continues a parameter of ``old`` -> that parameter. The
        engine gives it the old one's optimiser state (momentum, Adam's moments), cut to
        its leading block where it is smaller; the rest start with none. Default: the
        parameters that are the same object in both."""
        olds = {id(q) for q in old.parameters()}
        return {p: p for p in new.parameters() if id(p) in olds}

    def state_dict(self) -> dict[str, Any]:
        """The method's own state (JSON-like values and tensors), saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; called before ``build_model`` on resume."""

    # ---- what is evaluated, saved and registered ---------------------------------------
    def export(self, model: nn.Module) -> nn.Module:
        """The network that is evaluated every epoch, saved as the run's ``model/`` and
        registered (a fold of the trained module, a part of it, ...). Default: itself."""
        return model

    @torch.no_grad()
    def predict(self, model: nn.Module, loader, split: str = "val") -> tuple[Predictions, torch.Tensor]:
        """Log-probabilities [N, C] (float32, cpu) of the exported ``model`` over ``loader``
        (this rank's shard), or named ones ``{"ensemble": [N, C], "member/0": [N, C]}``
        whose first entry is selected on, and labels [N].

        ``split`` ("val" or "test") names the data split; methods that evaluate several
        derived models (the meta-learners) use it to pick which ones."""
        return predict_logp(model, loader)

    @torch.no_grad()
    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        """Extra scalars of the exported ``model`` after each epoch's validation, logged to
        MLflow with the epoch's own (called on rank 0 only; the other ranks wait at the
        epoch's report). For what the split predictions cannot show, e.g. a meta-learner's
        students on seen against unseen inputs. Default: none."""
        return {}

    # ---- teachers ----------------------------------------------------------------------
    def teacher_uris(self) -> list[str]:
        """Checkpoints this method distils from (folders, ``runs:/``, ``models:/``)."""
        return []

    def teachers(self, device: torch.device | str) -> list[nn.Module]:
        """The teachers of ``teacher_uris()``: any registered architecture, loaded once per
        worker, in eval mode, frozen, on ``device``."""
        dev = torch.device(device)
        if self._teachers is None:
            from metaensemble.models import load

            self._teachers = [freeze(load(u)) for u in self.teacher_uris()]
        if self._teachers and next(self._teachers[0].parameters()).device != dev:
            self._teachers = [t.to(dev) for t in self._teachers]
        return self._teachers


def without(groups: list[dict[str, Any]], params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """Optimiser groups with ``params`` taken out (empty groups dropped): a method that
    gives some parameters a group of their own removes them from the default ones."""
    ids = {id(p) for p in params}
    out = []
    for g in groups:
        kept = [p for p in g["params"] if id(p) not in ids]
        if kept:
            out.append({**g, "params": kept})
    return out


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
