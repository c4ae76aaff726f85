"""One run trained in this process, without Ray, MLflow or checkpoints: for benchmarks
that train many tiny networks and must train them exactly as the engine does.

    out = train_local(cfg)              # LocalRun: .model (selected weights, eval mode), .metrics
    out.metrics["val_acc"], out.best_epoch

It is ``loop.train_member`` for one worker with the Ray, checkpoint and MLflow parts left
out, built from the same pieces in the same order: ``build_initial_model``
(``model.init_seed``, ``model.init_from``), ``seed_rank``, ``build_loaders``, the
method's ``configure_optimizer`` (timm's optimiser and schedule from ``cfg.optim``),
``train_epoch`` (the engine's per-step code: ``training_step``, backward, clipping, the
optimiser and schedule steps), ``rebuild_point``, ``evaluate_split`` and the same model
selection on ``train.select_metric``. A one-worker engine run on the CPU has no DDP
wrapper either, so the weights are the ones ``engine.fit`` would select (up to float
reduction order under another thread count).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from metaensemble import methods
from metaensemble.config import Config
from metaensemble.engine.loop import (
    MemberRun,
    build_initial_model,
    build_loaders,
    configure_optimizer,
    evaluate_split,
    extra_epoch_metrics,
    rebuild_point,
    run_context,
    seed_rank,
    train_epoch,
)


@dataclass
class LocalRun:
    model: torch.nn.Module
    """The exported selected (best) weights, in eval mode."""
    metrics: dict[str, Any]
    """The selected epoch's training and val metrics (``val_acc``, ``train_loss``, ...)."""
    best_epoch: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every epoch's metrics."""


def train_local(cfg: Config, method: methods.Method | None = None) -> LocalRun:
    """Train ``cfg`` for ``train.epochs`` epochs on the CPU in this process; the selected
    epoch's weights, exported. The caller sets torch's thread count."""
    t0 = time.perf_counter()
    method = method or methods.build(cfg)
    ctx = run_context(0, 1, torch.device("cpu"))
    method.context = ctx
    loaders, info, n_train = build_loaders(cfg, 0, 1, ctx.device)
    model = build_initial_model(method, info, cfg)
    seed_rank(cfg.seed, 0)
    steps = cfg.train.steps_per_epoch or max(1, n_train // cfg.data.batch_size)
    state = {"epochs_done": 0, "global_step": 0, "best_score": None, "best_epoch": -1, "run_id": ""}
    run = _InProcess({"run_key": cfg.run_key(), "run_id": ""}, cfg, method, ctx, loaders, info, steps, state)
    run.wrap(model)
    sign = 1.0 if cfg.train.select_mode == "max" else -1.0
    history, best_metrics = [], {}
    for epoch in range(cfg.train.epochs):
        m = train_epoch(run, epoch)
        rebuild_point(run, epoch, m)  # a rebuilt module is wrapped by _InProcess.wrap
        m.update(evaluate_split(method, run.base, loaders["val"], "val", ctx))
        extra_epoch_metrics(method, run.base, m)
        score = sign * m[cfg.train.select_metric]
        if state["best_score"] is None or score > state["best_score"]:
            state["best_score"], state["best_epoch"] = score, epoch + 1
            run.best_weights = {k: v.detach().clone() for k, v in run.base.state_dict().items()}
            best_metrics = dict(m)
        state["epochs_done"] = epoch + 1
        history.append(m)
    run.base.load_state_dict(run.best_weights)
    exported = method.export(run.base).eval()
    return LocalRun(exported, best_metrics, state["best_epoch"], time.perf_counter() - t0, history)


class _InProcess(MemberRun):
    def wrap(self, model: torch.nn.Module) -> None:
        """``MemberRun.wrap`` for one CPU process: no DDP (Ray's ``prepare_model`` adds
        none for one worker), a fresh optimiser (clipping to ``train.grad_clip`` as the
        engine's does) and the schedule at the current step."""
        self.model = self.base = model
        self.optimizer, self.scheduler = configure_optimizer(self.method, model, self.cfg, self.steps_per_epoch)
        self.scheduler.set_step(self.state["global_step"])
