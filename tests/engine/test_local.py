"""engine.local.train_local: one run in this process from the engine's own pieces (the
benchmarks that train hundreds of tiny networks use it)."""

from __future__ import annotations

import torch

from metaensemble import models
from metaensemble.engine.local import train_local
from metaensemble.validation import load_config


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_local_is_deterministic_selects_on_val_and_starts_from_init_from(tmp_path):
    cfg = load_config("configs/teachers/digits_meta.yaml", ["train.epochs=3"])
    a, b = train_local(cfg), train_local(cfg)
    assert torch.equal(_params(a.model), _params(b.model))  # the same config trains the same weights
    accs = [m["val_acc"] for m in a.history]
    assert len(accs) == 3 and a.best_epoch == 1 + accs.index(max(accs))  # the first best val epoch
    assert a.metrics["val_acc"] == max(accs) and {"train_loss", "train_acc", "lr", "val_nll"} <= set(a.metrics)
    assert not a.model.training

    models.save_model(a.model, tmp_path / "parent", dataset="digits")
    parent = _params(a.model)
    # a child at a negligible learning rate stays at its parent's weights; from scratch it does not
    child = train_local(cfg.with_overrides({"model.init_from": str(tmp_path / "parent"), "optim.lr": 1e-9,
                                            "optim.warmup_epochs": 0, "train.epochs": 1, "seed": 5}))
    assert torch.allclose(_params(child.model), parent, atol=1e-6)
    scratch = train_local(cfg.with_overrides({"optim.lr": 1e-9, "optim.warmup_epochs": 0, "train.epochs": 1}))
    assert (_params(scratch.model) - parent).norm() > 0.1 * parent.norm()


def test_train_local_clips_as_the_engine_does():
    """``train.grad_clip`` reaches the in-process run too: at a tiny bound each step moves
    the weights by at most lr x the bound (plain SGD, no momentum), unclipped it moves more."""
    cfg = load_config("configs/teachers/digits_meta.yaml", [
        "train.epochs=1", "train.steps_per_epoch=1", "optim.name=sgd", "optim.momentum=0", "optim.lr=0.5",
        "optim.weight_decay=0", "optim.warmup_epochs=0", "optim.schedule=constant"])
    start = _params(train_local(cfg.with_overrides({"optim.lr": 1e-12})).model)
    clipped = _params(train_local(cfg.with_overrides({"train.grad_clip": 1e-3})).model)
    free = _params(train_local(cfg).model)
    assert (clipped - start).norm() <= 0.5 * 1e-3 * 1.01
    assert (free - start).norm() > 10 * 0.5 * 1e-3
