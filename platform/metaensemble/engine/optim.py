"""Optimiser and per-step learning-rate schedule from an OptimConfig, through timm's
factories (``create_optimizer_v2``, ``create_scheduler_v2``).

The schedule is stepped per optimiser update: ``StepSchedule.step()`` after every step
(the engine also sets the step directly after a resume or a rebuild). After a rebuild
``carry_state`` hands the parameters that persist their optimiser state.
"""

from __future__ import annotations

from typing import Any

import torch

from metaensemble.config import OptimConfig


def timm_opt_name(cfg: OptimConfig) -> str:
    """timm's name for ``cfg``: its ``sgd`` is Nesterov SGD, ``momentum`` plain SGD."""
    if cfg.name == "sgd":
        return "sgd" if cfg.nesterov and cfg.momentum > 0 else "momentum"
    return cfg.name


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """``params``: a module, parameters, or parameter groups (``Method.param_groups``)."""
    from timm.optim import create_optimizer_v2

    if isinstance(params, torch.nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    params = list(params)
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    if cfg.name == "sgd":
        kwargs["momentum"] = cfg.momentum
    return create_optimizer_v2(params, opt=timm_opt_name(cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                               **kwargs)


def clip_after_transforms(optimizer: torch.optim.Optimizer, params, max_norm: float):
    """Clip the gradient norm of ``params`` to ``max_norm`` in a step pre-hook registered
    now, after the ones the method's ``configure_optimizer`` registered: the clip sees the
    gradient the update will use (LatentBE's factor gradients x M and decay toward 1
    included), not the raw one. Returns the hook's handle."""
    params = list(params)

    def clip(opt, args, kwargs) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    return optimizer.register_step_pre_hook(clip)


def carry_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer,
                carried: dict[torch.nn.Parameter, torch.nn.Parameter]) -> int:
    """Give each parameter of ``new`` in ``carried`` (new parameter -> the old one it
    continues) the state ``old`` holds for that one (momentum, Adam's moments and step),
    copied; a state tensor of the old parameter's shape is cut to the new one's leading
    block (a parameter that shrank: SuperWeight's coefficient slot whose widest user got
    its own). Returns how many parameters took state."""
    in_new = {id(p) for g in new.param_groups for p in g["params"]}
    n = 0
    for p, q in carried.items():
        if id(p) not in in_new or not old.state.get(q):
            continue
        if any(a > b for a, b in zip(p.shape, q.shape, strict=True)):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} cannot continue one of shape {tuple(q.shape)}")
        block = tuple(slice(0, a) for a in p.shape)
        new.state[p] = {k: (v[block] if v.shape == q.shape else v).clone() if torch.is_tensor(v) else v
                        for k, v in old.state[q].items()}
        n += 1
    return n


class StepSchedule:
    """A timm scheduler stepped once per optimiser update. ``offset``: the update at
    which this schedule starts (a method that restarts its schedule at a rebuild, as
    SuperWeight after its search phase); ``num_updates`` stays the run's count."""

    def __init__(self, scheduler, step: int = 0, offset: int = 0) -> None:
        self.scheduler, self.num_updates, self.offset = scheduler, step, offset
        self.set_step(step)

    def step(self) -> None:
        self.set_step(self.num_updates + 1)

    def set_step(self, step: int) -> None:
        self.num_updates = step
        if self.scheduler is not None:
            self.scheduler.step_update(max(0, step - self.offset))

    def state_dict(self) -> dict[str, int]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_step(int(state["num_updates"]))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int,
                    step: int = 0, offset: int = 0) -> StepSchedule:
    """timm schedule over ``epochs * steps_per_epoch`` updates: linear warm-up from
    ``warmup_lr`` over ``warmup_epochs``, then cosine to ``min_lr``, step decay every
    ``decay_epochs``, decay at ``decay_milestones``, or constant; starting at update
    ``offset`` of the run (its epochs and milestones count from there)."""
    from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2

    spe = max(1, steps_per_epoch)
    warmup_lr = cfg.warmup_lr or cfg.lr / max(1, cfg.warmup_epochs * spe)
    if cfg.schedule == "multistep":
        # Built directly: timm's factory makes milestone m take effect one update early
        # (at m * steps - 1); here the first update of epoch m + 1 has the decayed lr.
        return StepSchedule(MultiStepLRScheduler(
            opt, decay_t=[m * spe + 1 for m in sorted(cfg.decay_milestones)], decay_rate=cfg.decay_rate,
            warmup_t=cfg.warmup_epochs * spe, warmup_lr_init=warmup_lr, warmup_prefix=False, t_in_epochs=False), step,
            offset)
    sched = {"constant": "step"}.get(cfg.schedule, cfg.schedule)
    kw: dict[str, Any] = {}
    if cfg.schedule == "constant":  # a step schedule that never decays (keeps lr_scale working)
        kw = {"decay_epochs": 10 * epochs + 1, "decay_rate": 1.0}
    elif cfg.schedule == "step":
        kw = {"decay_epochs": cfg.decay_epochs or max(1, epochs // 3), "decay_rate": cfg.decay_rate}
    # cosine: the decay spans the epochs after the warm-up and ends at min_lr with the run;
    # step/multistep: milestones count from the run's start, warm-up included.
    prefix = cfg.schedule == "cosine"
    scheduler, _ = create_scheduler_v2(
        opt, sched=sched, num_epochs=max(1, epochs - cfg.warmup_epochs) if prefix else epochs, min_lr=cfg.min_lr,
        warmup_lr=warmup_lr, warmup_epochs=cfg.warmup_epochs, warmup_prefix=prefix, step_on_epochs=False,
        updates_per_epoch=spe, **kw)
    return StepSchedule(scheduler, step, offset)
