"""The training loop every method runs in, one copy per Ray Train worker.

Rank 0 evaluates, checkpoints and writes to MLflow; every rank trains on a disjoint
shard and reports (``ray.train.report`` is also the per-epoch barrier).

A checkpoint (one per epoch) is a folder::

    model.safetensors, model.json      latest weights (a loadable model checkpoint)
    best/model.safetensors, model.json best weights so far by ``train.select_metric``
    optimizer.pt                       optimiser + scheduler + RNG state (tensors only)
    state.json                         epochs done, best score/epoch, MLflow run id
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metaensemble import data, methods, metrics
from metaensemble.config import build_config
from metaensemble.engine.optim import build_optimizer, build_scheduler
from metaensemble.models import check_state_dict, read_weights, save_model, unwrap


def build_initial_model(method, info, cfg) -> torch.nn.Module:
    """The method's model with its initial weights drawn from ``model.init_seed`` when set;
    the global RNG then continues from ``seed`` either way (data order, augmentation and
    dropout follow the run's seed)."""
    if cfg.model.init_seed is None:
        return method.build_model(info)
    torch.manual_seed(cfg.model.init_seed)
    model = method.build_model(info)
    torch.manual_seed(cfg.seed)
    return model


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train the run's members one after another (one member unless ``fit_pack`` packed
    several); a restored checkpoint belongs to the member whose MLflow run id it records,
    and the members before that one are done."""
    import ray.train

    os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]  # methods may fetch teachers from MLflow
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    members = config["members"]
    start, ckpt = 0, ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            owner = json.loads((Path(d) / "state.json").read_text()).get("run_id")
        ids = [m["run_id"] for m in members]
        start, ckpt = (ids.index(owner), ckpt) if owner in ids else (0, None)
    for i in range(start, len(members)):
        _train_member(members[i], config, ckpt if i == start else None)


def _train_member(member: dict[str, Any], config: dict[str, Any], ckpt) -> None:
    import ray.train
    import ray.train.torch

    cfg = build_config(member["cfg"])
    method = config.get("method") or methods.build(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed)

    loaders, info, n_train = _build_loaders(cfg, rank, world, device)
    model = build_initial_model(method, info, cfg)
    if cfg.train.channels_last and on_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    base = unwrap(model)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    steps_per_epoch = cfg.train.steps_per_epoch or max(1, n_train // world // cfg.data.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)

    state = {"epochs_done": 0, "best_score": None, "best_epoch": -1, "run_id": member["run_id"]}
    best_weights: dict[str, torch.Tensor] | None = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, best_weights = _restore(Path(d), base, optimizer, scheduler, device)
        if rank == 0:
            _say(f"[{member['run_key']}] resumed from checkpoint after epoch {state['epochs_done']}")

    tracker = _Tracker(config["tracking_uri"], member["run_id"]) if rank == 0 else None
    if tracker and ckpt is not None:
        tracker.tags({"metaensemble.resumed_from_epoch": state["epochs_done"]})
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.train.amp and on_gpu) else contextlib.nullcontext()
    sign = 1.0 if cfg.train.select_mode == "max" else -1.0

    for epoch in range(state["epochs_done"], cfg.train.epochs):
        model.train()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, examples
        t0 = time.perf_counter()
        for step, batch in enumerate(_epoch_batches(loaders["train"], epoch, cfg.train.steps_per_epoch)):
            with amp:
                loss, logs = method.training_step(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            b = len(batch["y"])
            totals += torch.tensor([float(logs.get("loss", loss)) * b, float(logs.get("correct", 0)), b], dtype=torch.float64)
            if cfg.train.log_every and rank == 0 and step % cfg.train.log_every == 0:
                _say(f"[{member['run_key']}] epoch {epoch + 1} step {step} loss {float(loss):.4f}")
        if on_gpu:
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t0
        if world > 1 and dist.is_initialized():
            dist.all_reduce(totals)  # gloo/nccl both reduce float64 on their device
        method.on_epoch_end(model, epoch, rank)

        epoch_metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": float(totals[0] / max(totals[2], 1)),
            "train_acc": float(totals[1] / max(totals[2], 1)),
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": float(totals[2]) / max(train_time, 1e-9),
            "train_time_s": train_time,
        }
        ckpt_dir = None
        if rank == 0:
            logp, y = method.predict(base, loaders["val"], split="val")
            epoch_metrics.update(metrics.classification_metrics(logp, y, "val_"))
            score = sign * epoch_metrics[cfg.train.select_metric]
            if state["best_score"] is None or score > state["best_score"]:
                state["best_score"], state["best_epoch"] = score, epoch + 1
                best_weights = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
            epoch_metrics["best_epoch"] = state["best_epoch"]
            state["epochs_done"] = epoch + 1
            ckpt_dir = _write_checkpoint(base, best_weights, optimizer, scheduler, state, info)
            epoch_metrics["epoch_time_s"] = time.perf_counter() - t0
            tracker.metrics(epoch_metrics, step=epoch + 1)
            _say(_progress_line(member["run_key"], cfg.train.epochs, epoch_metrics))
        _report(epoch_metrics, ckpt_dir)

    final: dict[str, Any] = {"epoch": cfg.train.epochs, "final": 1}  # not "done": Tune reads that as "stop the trial"
    ckpt_dir = None
    if rank == 0:
        if best_weights is not None:
            base.load_state_dict(best_weights)
        val_logp, val_y = method.predict(base, loaders["val"], split="val")
        test_logp, test_y = method.predict(base, loaders["test"], split="test")
        final.update(metrics.calibrated_report(val_logp, val_y, test_logp, test_y))
        final["best_epoch"] = state["best_epoch"]
        with tempfile.TemporaryDirectory() as d:
            save_model(base, d, dataset=info.name, dataset_info=info.to_dict(), seed=cfg.seed,
                       run_id=member["run_id"], run_key=member["run_key"], config_hash=cfg.config_hash(),
                       metrics={k: v for k, v in final.items() if isinstance(v, float)})
            tracker.artifacts(d, "model")
        tracker.metrics({k: v for k, v in final.items() if k not in ("epoch", "final")}, step=cfg.train.epochs)
        # The last report carries a checkpoint too, so Result.metrics/.checkpoint are the
        # final ones; its weights are the selected (best) model.
        ckpt_dir = _write_checkpoint(base, best_weights, optimizer, scheduler, state, info)
        _say(f"[{member['run_key']}] done: best epoch {state['best_epoch']}, val_acc {final['val_acc']:.4f}, "
              f"test_acc {final['test_acc']:.4f}, test_nll {final['test_nll']:.4f}, test_ece {final['test_ece']:.4f}")
    _report(final, ckpt_dir)
    if rank == 0 and config.get("packed"):
        tracker.finished()  # a later member's failure must not cost this one


def _epoch_batches(loader, epoch: int, steps: int | None):
    """One epoch of batches: a pass over the loader, or exactly ``steps`` batches, taking
    further reshuffled passes when the (sub)set is smaller than that."""
    if not steps:
        loader.set_epoch(epoch)
        yield from loader
        return
    done, rep = 0, 0
    while done < steps:
        loader.set_epoch(epoch * 100_003 + rep)
        empty = True
        for batch in loader:
            empty = False
            yield batch
            done += 1
            if done == steps:
                return
        if empty:
            raise RuntimeError("the train loader yields no batch: data.batch_size exceeds the worker's shard")
        rep += 1


def _write_checkpoint(*state) -> Path:
    """Rank 0: a temporary checkpoint folder (see the module docstring); ``_report``
    hands it to Ray and deletes it."""
    d = Path(tempfile.mkdtemp(prefix="me-ckpt-"))
    _save(d, *state)
    return d


def _report(metrics_: dict[str, Any], ckpt_dir: Path | None) -> None:
    """``ray.train.report`` from every rank (it is also the barrier); rank 0 passes the
    checkpoint folder, which Ray persists during the call."""
    import ray.train

    try:
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(metrics_, checkpoint=ckpt)
    finally:
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def _say(msg: str) -> None:
    # The process's real stdout: Ray Train patches print() and MLflow wraps sys.stdout,
    # which together would print every line twice.
    print(msg, file=sys.__stdout__, flush=True)


def _progress_line(run_key: str, epochs: int, m: dict[str, Any]) -> str:
    return (f"[{run_key}] epoch {m['epoch']}/{epochs} train_loss {m['train_loss']:.4f} "
            f"train_acc {m['train_acc']:.4f} val_acc {m['val_acc']:.4f} val_nll {m['val_nll']:.4f} "
            f"lr {m['lr']:.4g} {m['train_images_per_s']:.0f} img/s {m['epoch_time_s']:.1f}s")


def _build_loaders(cfg, rank: int, world: int, device: torch.device):
    """Train loader sharded over ranks; val/test loaders (used on rank 0 only)."""
    d = cfg.data
    if data.is_streaming(d):
        import ray.train

        from metaensemble.data.parquet import read_meta

        meta = read_meta(d)
        info = meta["info"]
        mk = lambda split, **kw: data.RayShardLoader(ray.train.get_dataset_shard(split), info, device=device, rank=rank, seed=cfg.seed, **kw)  # noqa: E731
        loaders = {
            "train": mk("train", batch_size=d.batch_size, shuffle=True, augment=d.augment,
                        length=meta["sizes"]["train"] // world // d.batch_size),
            "val": mk("val", batch_size=d.eval_batch_size),
            "test": mk("test", batch_size=d.eval_batch_size),
        }
        return loaders, info, meta["sizes"]["train"]
    splits = data.load(d)
    info = splits.info
    if isinstance(splits.train, data.ArraySplit):
        train = data.ArrayLoader(splits.train, info, d.batch_size, rank=rank, world_size=world, shuffle=True,
                                 augment=d.augment, seed=cfg.seed, device=device, drop_last=True)
        ev = lambda s: data.ArrayLoader(s, info, d.eval_batch_size, device=device)  # noqa: E731
    else:
        train = data.DatasetLoader(splits.train, d.batch_size, rank=rank, world_size=world, shuffle=True,
                                   seed=cfg.seed, device=device, num_workers=d.loader_workers, drop_last=True)
        ev = lambda s: data.DatasetLoader(s, d.eval_batch_size, device=device, num_workers=d.loader_workers)  # noqa: E731
    return {"train": train, "val": ev(splits.val), "test": ev(splits.test)}, info, len(splits.train)


def _save(d: Path, base, best_weights, optimizer, scheduler, state, info) -> None:
    save_model(base, d, dataset=info.name, dataset_info=info.to_dict())
    if best_weights is not None:
        from safetensors.torch import save_file

        (d / "best").mkdir()
        save_file({k: v.contiguous() for k, v in best_weights.items()}, str(d / "best" / "model.safetensors"))
        (d / "best" / "model.json").write_text((d / "model.json").read_text())
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, d / "optimizer.pt")
    (d / "state.json").write_text(json.dumps(state))


def _restore(d: Path, base, optimizer, scheduler, device):
    weights = read_weights(d)
    check_state_dict(base, weights, str(d))
    base.load_state_dict(weights)
    best = read_weights(d / "best") if (d / "best").is_dir() else None
    extra = torch.load(d / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"].cpu())
    return json.loads((d / "state.json").read_text()), best


class _Tracker:
    """Rank-0 MLflow writer for one run id (kept across restarts)."""

    def __init__(self, uri: str, run_id: str) -> None:
        from metaensemble import tracking

        os.environ["MLFLOW_TRACKING_URI"] = uri
        self._t = tracking
        self.client, self.run_id = tracking.client(uri), run_id

    def metrics(self, m: dict[str, Any], step: int) -> None:
        self._t.log_metrics(self.client, self.run_id, m, step=step)

    def tags(self, t: dict[str, Any]) -> None:
        self._t.set_tags(self.client, self.run_id, t)

    def finished(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")

    def artifacts(self, local_dir: str, path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path=path)
