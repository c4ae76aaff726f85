"""The training loop every method runs in, one copy per Ray Train worker.

Every rank trains on its shard and evaluates its shard of val/test (predictions are
gathered to rank 0); rank 0 checkpoints and writes to MLflow. ``ray.train.report`` is
also the per-epoch barrier.

A checkpoint (one per epoch) is a folder::

    model.safetensors, model.json      latest weights of the trained module (loadable)
    best/model.safetensors, model.json best weights so far by ``train.select_metric``
    optimizer.pt                       optimiser state and the schedule's step (tensors only)
    ranks.pt                           every rank's RNG (torch CPU/CUDA, numpy, python) and
                                       the method's ``state_dict()``, one entry per rank
    state.json                         epochs done, global step, best score/epoch, MLflow run id
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from metaensemble import data, methods, metrics
from metaensemble.config import build_config
from metaensemble.methods.base import named
from metaensemble.models import (
    check_state_dict,
    local_dir,
    read_weights,
    save_model,
    save_weights,
    unwrap,
)


def build_initial_model(method, info, cfg) -> torch.nn.Module:
    """The method's model with its initial weights drawn from ``model.init_seed`` when set
    (else from ``seed``), then overwritten by ``model.init_from`` when set. Every rank
    builds the same weights."""
    torch.manual_seed(cfg.seed if cfg.model.init_seed is None else cfg.model.init_seed)
    model = method.build_model(info)
    if cfg.model.init_from:
        load_init_weights(model, cfg.model.init_from)
    return model


def load_init_weights(model: torch.nn.Module, uri: str) -> None:
    """Load ``uri``'s weights (folder or MLflow URI) into ``model``; a mismatch raises
    CheckpointError naming every tensor that differs."""
    weights = read_weights(local_dir(uri))
    check_state_dict(model, weights, f"model.init_from {uri}")
    model.load_state_dict(weights)


def seed_rank(seed: int, rank: int) -> None:
    """This rank's own stream for augmentation, dropout and loader workers (rank 0 keeps
    ``seed``, so a one-worker run is unchanged)."""
    s = seed if rank == 0 else (seed * 1_000_003 + rank * 7_919) % (2**31 - 1)
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                     *np_state[2:]],
           "python": _tuples_to_lists(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_lists_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train the run's members one after another (one member unless ``fit_pack`` packed
    several); a restored checkpoint belongs to the member whose MLflow run id it records,
    and the members before that one are done."""
    import ray.train

    os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]  # methods may fetch teachers from MLflow
    quiet_worker()
    members = config["members"]
    start, ckpt = 0, ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            owner = json.loads((Path(d) / "state.json").read_text()).get("run_id")
        ids = [m["run_id"] for m in members]
        start, ckpt = (ids.index(owner), ckpt) if owner in ids else (0, None)
    for i in range(start, len(members)):
        _train_member(members[i], config, ckpt if i == start else None)


def quiet_worker() -> None:
    """One progress line per epoch is what a worker prints: not Ray Train's dump of every
    report, MLflow's run links and artifact bars, or DDP's stride notice on small convnets."""
    import logging
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: the reports stay visible, nothing breaks
        pass


class _Totals:
    """Per-epoch sums of what ``training_step`` returns, kept on the device (no host
    synchronisation per step) and reduced over ranks once per epoch."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.sums, self.n = device, {}, 0

    def add(self, loss: torch.Tensor, logs: dict[str, Any], batch_size: int) -> None:
        self.n += batch_size
        for k, v in {"loss": loss, **logs}.items():
            v = v.detach().to(self.device, torch.float64) if torch.is_tensor(v) else torch.tensor(
                float(v), dtype=torch.float64, device=self.device)
            w = v if k == "correct" else v * batch_size
            self.sums[k] = self.sums[k] + w if k in self.sums else w

    def reduce(self, world: int, counts: dict[str, float] | None = None) -> dict[str, float]:
        """Per-example means of the sums over every rank, and ``counts`` summed over ranks."""
        keys, counts = sorted(self.sums), counts or {}
        vec = torch.stack([self.sums[k].reshape(()) for k in keys]
                          + [torch.tensor(float(counts[k]), dtype=torch.float64, device=self.device) for k in counts]
                          + [torch.tensor(float(self.n), dtype=torch.float64, device=self.device)])
        if world > 1 and dist.is_initialized():
            dist.all_reduce(vec)
        vals = vec.cpu().tolist()
        n = max(vals[-1], 1.0)
        out = {}
        for k, v in zip(keys, vals[: len(keys)], strict=True):
            out["train_acc" if k == "correct" else f"train_{k}"] = v / n
        out.update(zip(counts, vals[len(keys):-1], strict=True))
        return out


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

    loaders, info, n_train = _build_loaders(cfg, rank, world, device)
    state = {"epochs_done": 0, "global_step": 0, "best_score": None, "best_epoch": -1, "run_id": member["run_id"]}
    restored: dict[str, Any] | None = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = _read_checkpoint(Path(d), rank, device)
        state = restored["state"]
        method.load_state_dict(restored["method"])  # before build_model: it may shape the model
    model = build_initial_model(method, info, cfg) if restored is None else method.build_model(info)
    seed_rank(cfg.seed, rank)
    steps_per_epoch = cfg.train.steps_per_epoch or max(1, n_train // world // cfg.data.batch_size)
    if restored is not None:
        # checkpoints are per epoch: the schedule's position in this worker group's steps
        # (an elastic run that resumed with fewer workers takes more steps per epoch)
        state["global_step"] = state["epochs_done"] * steps_per_epoch
    base, model, optimizer, scheduler = _wrap(method, model, cfg, on_gpu, steps_per_epoch, state["global_step"])
    _check_exportable(method, method.export(base))  # before any epoch, not after the last
    best_weights: dict[str, torch.Tensor] | None = None
    if restored is not None:
        check_state_dict(base, restored["weights"], "checkpoint")
        base.load_state_dict(restored["weights"])
        best_weights = restored["best"]
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.set_step(state["global_step"])
        if restored["rng"] is not None:
            set_rng_state(restored["rng"])
        if rank == 0:
            _say(f"[{member['run_key']}] resumed from checkpoint after epoch {state['epochs_done']}")

    tracker = _Tracker(config["tracking_uri"], member["run_id"]) if rank == 0 else None
    if tracker and ckpt is not None:
        tracker.tags({"metaensemble.resumed_from_epoch": state["epochs_done"]})
    # where this worker group runs (it changes when an elastic run resumes on fewer nodes)
    nodes = _gather(ray.get_runtime_context().get_node_id(), world)
    if tracker:
        tracker.tags({"metaensemble.worker_nodes": ",".join(sorted(set(nodes)))})
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.train.amp and on_gpu) else contextlib.nullcontext()
    sign = 1.0 if cfg.train.select_mode == "max" else -1.0

    for epoch in range(state["epochs_done"], cfg.train.epochs):
        model.train()
        totals = _Totals(device)
        skipped_before = getattr(loaders["train"], "skipped", None)
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
            state["global_step"] += 1
            totals.add(loss, logs, len(batch["y"]))
            if cfg.train.log_every and rank == 0 and step % cfg.train.log_every == 0:
                _say(f"[{member['run_key']}] epoch {epoch + 1} step {step} loss {float(loss):.4f}")
        if on_gpu:
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t0
        # streamed data: training images that did not decode this epoch (dropped), all ranks
        skipped = None if skipped_before is None else {"data_skipped": loaders["train"].skipped - skipped_before}
        epoch_metrics: dict[str, Any] = {"epoch": epoch + 1, **totals.reduce(world, skipped),
                                         "lr": optimizer.param_groups[0]["lr"]}
        epoch_metrics["train_images_per_s"] = totals.n * world / max(train_time, 1e-9)
        epoch_metrics["workers"] = world
        if nodes is not None:
            epoch_metrics["nodes"] = len(set(nodes))
        epoch_metrics["train_time_s"] = train_time
        method.on_epoch_end(model, epoch, rank)
        with torch.random.fork_rng(devices=[]):  # the same draws on every rank
            torch.manual_seed(cfg.seed * 1_000_003 + epoch + 1)
            np_state, py_state = np.random.get_state(), random.getstate()
            np.random.seed((cfg.seed * 7_919 + epoch + 1) % 2**32)
            random.seed(cfg.seed * 7_919 + epoch + 1)
            rebuilt = method.rebuild(base, epoch + 1)
            np.random.set_state(np_state)
            random.setstate(py_state)
        if rebuilt is not None:
            # New parameters: re-wrap for DDP, a fresh optimiser at the current step, and
            # selection restarts (earlier best weights have another structure).
            base, model, optimizer, scheduler = _wrap(method, rebuilt, cfg, on_gpu, steps_per_epoch,
                                                      state["global_step"])
            state["best_score"], state["best_epoch"], best_weights = None, -1, None
            epoch_metrics["rebuilt"] = 1

        _sync_buffers(base, world)
        val = _evaluate(method, base, loaders["val"], "val", world)
        ranks = _gather((rng_state(), _to_cpu(method.state_dict())), world)
        ckpt_dir = None
        if rank == 0:
            epoch_metrics.update(val)
            score = sign * epoch_metrics[cfg.train.select_metric]
            if state["best_score"] is None or score > state["best_score"]:
                state["best_score"], state["best_epoch"] = score, epoch + 1
                best_weights = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
            epoch_metrics["best_epoch"] = state["best_epoch"]
            state["epochs_done"] = epoch + 1
            ckpt_dir = _write_checkpoint(base, best_weights, optimizer, scheduler, state, info, ranks)
            epoch_metrics["epoch_time_s"] = time.perf_counter() - t0
            tracker.metrics(epoch_metrics, step=epoch + 1)
            _say(_progress_line(member["run_key"], cfg.train.epochs, epoch_metrics))
        _report(epoch_metrics if rank == 0 else {"epoch": epoch + 1}, ckpt_dir)

    final: dict[str, Any] = {"epoch": cfg.train.epochs, "final": 1}  # not "done": Tune reads that as "stop the trial"
    if best_weights is not None:
        best_weights = _broadcast(best_weights, world)
        base.load_state_dict(best_weights)
    elif world > 1:
        _broadcast(None, world)
    exported = method.export(base)
    _check_exportable(method, exported)
    val = _gather(_predict(method, exported, loaders["val"], "val"), world)
    test = _gather(_predict(method, exported, loaders["test"], "test"), world)
    ranks = _gather((rng_state(), _to_cpu(method.state_dict())), world)
    ckpt_dir = None
    if rank == 0:
        (val_p, val_y), (test_p, test_y) = _concat(val), _concat(test)
        first = next(iter(val_p))
        final.update(metrics.calibrated_report(val_p[first], val_y, test_p[first], test_y))
        for name in list(val_p)[1:]:
            final.update({f"{name}/{k}": v for k, v in metrics.calibrated_report(
                val_p[name], val_y, test_p[name], test_y).items()})
        final["best_epoch"] = state["best_epoch"]
        with tempfile.TemporaryDirectory() as d:
            save_model(exported, d, dataset=info.name, dataset_info=info.to_dict(), seed=cfg.seed,
                       run_id=member["run_id"], run_key=member["run_key"], config_hash=cfg.config_hash(),
                       metrics={k: v for k, v in final.items() if isinstance(v, float)})
            tracker.artifacts(d, "model")
        tracker.metrics({k: v for k, v in final.items() if k not in ("epoch", "final")}, step=cfg.train.epochs)
        # The last report carries a checkpoint too, so Result.metrics/.checkpoint are the
        # final ones; its weights are the selected (best) model.
        ckpt_dir = _write_checkpoint(base, best_weights, optimizer, scheduler, state, info, ranks)
        _say(f"[{member['run_key']}] done: best epoch {state['best_epoch']}, val_acc {final['val_acc']:.4f}, "
             f"test_acc {final['test_acc']:.4f}, test_nll {final['test_nll']:.4f}, test_ece {final['test_ece']:.4f}")
    _report(final if rank == 0 else {"epoch": cfg.train.epochs, "final": 1}, ckpt_dir)
    if rank == 0 and config.get("packed"):
        tracker.finished()  # a later member's failure must not cost this one


def _sync_buffers(base, world: int) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics) before evaluating its
    shard: under DDP each rank's last forward updated them with its own batch."""
    if world > 1 and dist.is_initialized():
        for b in base.buffers():
            dist.broadcast(b, 0)


def _to_cpu(obj):
    """A method's state with every tensor on the CPU (it is loaded on any device layout)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _check_exportable(method, exported) -> None:
    if not hasattr(exported, "me_spec"):
        raise TypeError(f"method {method.name!r}: export() must return a model of a registered architecture "
                        f"(built by metaensemble.models.create_model), got a {type(exported).__name__}")


def _wrap(method, model, cfg, on_gpu: bool, steps_per_epoch: int, step: int):
    """(base, DDP-wrapped model, optimiser, schedule at ``step``) for ``model``."""
    import ray.train.torch

    if cfg.train.channels_last and on_gpu:
        model = model.to(memory_format=torch.channels_last)
    wrapped = ray.train.torch.prepare_model(model)
    base = unwrap(wrapped)
    optimizer, scheduler = method.configure_optimizer(base, steps_per_epoch)
    scheduler.set_step(step)
    return base, wrapped, optimizer, scheduler


def _predict(method, net, loader, split: str):
    """This rank's (named predictions, labels) of ``net`` (an exported model); ranks
    without a loader (streamed splits are read by rank 0 alone) contribute nothing."""
    if loader is None:
        return None
    pred, y = method.predict(net, loader, split=split)
    return named(pred), y


def _evaluate(method, base, loader, split: str, world: int) -> dict[str, float]:
    """Metrics of every named prediction on the whole split (on rank 0; {} elsewhere).
    The first name's metrics are ``<split>_acc`` etc., the others ``<name>/<split>_acc``."""
    parts = _gather(_predict(method, method.export(base), loader, split), world)
    if parts is None:
        return {}
    preds, y = _concat(parts)
    out: dict[str, float] = {}
    for i, (name, logp) in enumerate(preds.items()):
        m = metrics.classification_metrics(logp, y, f"{split}_")
        out.update(m if i == 0 else {f"{name}/{k}": v for k, v in m.items()})
    return out


def _gather(obj, world: int):
    """Every rank's ``obj`` as a list on rank 0 (None on the others); [obj] alone."""
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out if dist.get_rank() == 0 else None


def _broadcast(obj, world: int):
    if world == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _concat(parts) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    parts = [p for p in parts if p is not None and len(p[1])]
    names = list(parts[0][0])
    return ({n: torch.cat([p[0][n] for p in parts]) for n in names}, torch.cat([p[1] for p in parts]))


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
    """Loaders sharded over ranks: train (drops the remainder), val/test (every example on
    exactly one rank; streamed val/test on rank 0 alone)."""
    d = cfg.data
    if data.is_streaming(d):
        import ray.train

        from metaensemble.data.parquet import read_meta

        meta = read_meta(d)
        info = meta["info"]
        mk = lambda split, **kw: data.RayShardLoader(ray.train.get_dataset_shard(split), info, device=device, rank=rank, seed=cfg.seed, **kw)  # noqa: E731
        loaders = {
            "train": mk("train", batch_size=d.batch_size, shuffle=True, augment=d.augment, cutout=d.cutout,
                        length=meta["sizes"]["train"] // world // d.batch_size, shuffle_buffer=d.shuffle_buffer),
            # val/test are not split over ranks by Ray Data: rank 0 reads them whole
            "val": mk("val", batch_size=d.eval_batch_size) if rank == 0 else None,
            "test": mk("test", batch_size=d.eval_batch_size) if rank == 0 else None,
        }
        return loaders, info, meta["sizes"]["train"]
    splits = data.load(d)
    info = splits.info
    if isinstance(splits.train, data.ArraySplit):
        train = data.ArrayLoader(splits.train, info, d.batch_size, rank=rank, world_size=world, shuffle=True,
                                 augment=d.augment, seed=cfg.seed, device=device, drop_last=True, cutout=d.cutout)
        ev = lambda s: data.ArrayLoader(s, info, d.eval_batch_size, rank=rank, world_size=world, device=device)  # noqa: E731
    else:
        train = data.DatasetLoader(splits.train, d.batch_size, rank=rank, world_size=world, shuffle=True,
                                   seed=cfg.seed, device=device, num_workers=d.loader_workers, drop_last=True)
        ev = lambda s: data.DatasetLoader(s, d.eval_batch_size, rank=rank, world_size=world, device=device,  # noqa: E731
                                          num_workers=d.loader_workers)
    return {"train": train, "val": ev(splits.val), "test": ev(splits.test)}, info, len(splits.train)


def _save(d: Path, base, best_weights, optimizer, scheduler, state, info, ranks) -> None:
    if hasattr(base, "me_spec"):  # a loadable model; a method's composite module: weights alone
        save_model(base, d, dataset=info.name, dataset_info=info.to_dict())
    else:
        save_weights(base, d)
    if best_weights is not None:
        from safetensors.torch import save_file

        (d / "best").mkdir()
        save_file({k: v.contiguous() for k, v in best_weights.items()}, str(d / "best" / "model.safetensors"))
        if (d / "model.json").is_file():
            (d / "best" / "model.json").write_text((d / "model.json").read_text())
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, d / "optimizer.pt")
    torch.save([{"rng": r, "method": m} for r, m in ranks], d / "ranks.pt")
    (d / "state.json").write_text(json.dumps(state))


def _read_checkpoint(d: Path, rank: int, device) -> dict[str, Any]:
    """Everything this rank needs to resume (loaded without unpickling arbitrary objects).
    A checkpoint from a different number of workers restores rank 0's method state and
    leaves the other ranks' RNG freshly seeded."""
    extra = torch.load(d / "optimizer.pt", map_location=device, weights_only=True)
    ranks = torch.load(d / "ranks.pt", map_location="cpu", weights_only=True)
    mine = ranks[rank] if rank < len(ranks) else None
    return {
        "state": json.loads((d / "state.json").read_text()),
        "weights": read_weights(d),
        "best": read_weights(d / "best") if (d / "best").is_dir() else None,
        "optimizer": extra["optimizer"],
        "rng": mine["rng"] if mine else None,
        "method": (mine or ranks[0])["method"],
    }


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
