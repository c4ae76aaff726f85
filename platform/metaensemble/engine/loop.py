"""The training loop every method runs in, one copy per Ray Train worker.

Every rank trains on its shard and evaluates its shard of val/test (predictions are
gathered to rank 0); rank 0 checkpoints (``engine.checkpoint``) and writes to MLflow.
``ray.train.report`` is also the per-epoch barrier. One member's run, step by step::

    run = start_member(member, config, ckpt)   # context, data, model, optimiser, resume
    for epoch in remaining epochs:
        train_epoch(run, epoch)                 # optimisation over this rank's shard
        rebuild_point(run, epoch, ...)          # the method's rebuild, the same on every rank
        validate_and_checkpoint(run, epoch, ...)
    finish_member(run, packed)                  # best weights, export, final report, model/

A worker prints little: a line when a run resumes, an epoch line only when
``PROGRESS_EVERY_S`` has passed since the run's last line, and one line per finished run.
Every epoch's metrics are in MLflow.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from metaensemble import data, methods
from metaensemble.config import Config, build_config
from metaensemble.engine.checkpoint import (
    checkpoint_owner,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from metaensemble.engine.optim import carry_state, clip_after_transforms
from metaensemble.engine.report import (
    concat_predictions,
    final_report,
    predict_named,
    split_metrics,
)
from metaensemble.methods.base import Method, RunContext
from metaensemble.models import check_state_dict, local_dir, read_weights, save_model, unwrap

PROGRESS_EVERY_S = 60.0
"""A run's rank 0 prints an epoch line only when this long has passed since its last
line: a small run prints its final line alone, a long one a line a minute or so."""


# ---- the pieces every rank builds the same way ---------------------------------------------
def configure_optimizer(method, model: torch.nn.Module, cfg: Config, steps_per_epoch: int):
    """The method's optimiser and schedule for ``model``, with ``train.grad_clip`` clipping
    the gradient after every transform the method registered on the optimiser."""
    optimizer, scheduler = method.configure_optimizer(model, steps_per_epoch)
    if cfg.train.grad_clip:
        clip_after_transforms(optimizer, model.parameters(), cfg.train.grad_clip)
    return optimizer, scheduler


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


def run_context(rank: int, world: int, device: torch.device) -> RunContext:
    """The context the engine hands a method on this worker: its all-reduce is
    ``torch.distributed``'s (DDP's process group) when there is more than one rank."""
    return RunContext(rank=rank, world_size=world, device=torch.device(device),
                      reduce_sum=dist.all_reduce if world > 1 else None)


# ---- the worker's entry point ----------------------------------------------------------------
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
            owner = checkpoint_owner(Path(d))
        ids = [m["run_id"] for m in members]
        start, ckpt = (ids.index(owner), ckpt) if owner in ids else (0, None)
    for i in range(start, len(members)):
        train_member(members[i], config, ckpt if i == start else None)


def quiet_worker() -> None:
    """What a worker prints is the loop's own lines: not Ray Train's dump of every report,
    MLflow's run links and artifact bars, urllib3's notes of retried requests, or DDP's
    stride notice on small convnets."""
    import logging
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # a request to the tracking server that urllib3 retried and then sent is not news (a
    # busy server resets a connection now and then); one that fails for good raises
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: the reports stay visible, nothing breaks
        pass


# ---- one member, step by step ----------------------------------------------------------------
@dataclass
class MemberRun:
    """One member's training on this worker: what its steps share. ``base`` is the
    unwrapped module, ``model`` its DDP wrapper; ``state`` is what ``state.json`` holds."""

    member: dict[str, Any]
    cfg: Config
    method: methods.Method
    ctx: RunContext
    loaders: dict[str, Any]
    info: data.DatasetInfo
    steps_per_epoch: int
    state: dict[str, Any]
    base: torch.nn.Module | None = None
    model: torch.nn.Module | None = None
    optimizer: Any = None
    scheduler: Any = None
    best_weights: dict[str, torch.Tensor] | None = None
    tracker: _Tracker | None = None
    nodes: list[str] | None = None
    started: float = field(default_factory=time.perf_counter)
    last_line: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        on = self.cfg.train.amp and self.on_gpu
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    @property
    def key(self) -> str:
        return self.member["run_key"]

    @property
    def on_gpu(self) -> bool:
        return self.ctx.device.type == "cuda"

    def wrap(self, model: torch.nn.Module) -> None:
        """Train ``model`` from here on: DDP-wrapped, with a fresh optimiser and the
        schedule at the current global step."""
        import ray.train.torch

        if self.cfg.train.channels_last and self.on_gpu:
            model = model.to(memory_format=torch.channels_last)
        self.model = ray.train.torch.prepare_model(model)
        self.base = unwrap(self.model)
        self.optimizer, self.scheduler = configure_optimizer(self.method, self.base, self.cfg, self.steps_per_epoch)
        self.scheduler.set_step(self.state["global_step"])

    def say(self, msg: str) -> None:
        _say(f"[{self.key}] {msg}")
        self.last_line = time.perf_counter()


def train_member(member: dict[str, Any], config: dict[str, Any], ckpt) -> None:
    """Train one member to its last epoch, resuming from ``ckpt`` (its checkpoint) if given."""
    run = start_member(member, config, ckpt)
    for epoch in range(run.state["epochs_done"], run.cfg.train.epochs):
        t0 = time.perf_counter()
        epoch_metrics = train_epoch(run, epoch)
        rebuild_point(run, epoch, epoch_metrics)
        validate_and_checkpoint(run, epoch, epoch_metrics, t0)
    finish_member(run, packed=bool(config.get("packed")))


def start_member(member: dict[str, Any], config: dict[str, Any], ckpt) -> MemberRun:
    """Everything before the first epoch: the method and its run context, this rank's
    data, the model (initial weights, or the checkpoint's), optimiser and schedule, and
    the MLflow writer on rank 0."""
    import ray.train
    import ray.train.torch

    cfg = build_config(member["cfg"])
    method = config.get("method") or methods.build(cfg)
    tctx = ray.train.get_context()
    ctx = run_context(tctx.get_world_rank(), tctx.get_world_size(), ray.train.torch.get_device())
    method.context = ctx  # before any other hook on this worker
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))

    loaders, info, n_train = build_loaders(cfg, ctx.rank, ctx.world_size, ctx.device)
    state = {"epochs_done": 0, "global_step": 0, "best_score": None, "best_epoch": -1, "run_id": member["run_id"]}
    restored: dict[str, Any] | None = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = read_checkpoint(Path(d), ctx.rank, ctx.device)
        state = restored["state"]
        method.load_state_dict(restored["method"])  # before build_model: it may shape the model
    model = build_initial_model(method, info, cfg) if restored is None else method.build_model(info)
    seed_rank(cfg.seed, ctx.rank)
    steps_per_epoch = cfg.train.steps_per_epoch or max(1, n_train // ctx.world_size // cfg.data.batch_size)
    if restored is not None:
        # checkpoints are per epoch: the schedule's position in this worker group's steps
        # (an elastic run that resumed with fewer workers takes more steps per epoch)
        state["global_step"] = state["epochs_done"] * steps_per_epoch
    run = MemberRun(member, cfg, method, ctx, loaders, info, steps_per_epoch, state)
    run.wrap(model)
    _check_exportable(method, method.export(run.base))  # before any epoch, not after the last
    if restored is not None:
        _restore(run, restored)
    _open_tracking(run, config["tracking_uri"], resumed=ckpt is not None)
    return run


def _restore(run: MemberRun, restored: dict[str, Any]) -> None:
    """The checkpoint's weights, best weights, optimiser, schedule step and this rank's RNG."""
    check_state_dict(run.base, restored["weights"], "checkpoint")
    run.base.load_state_dict(restored["weights"])
    run.best_weights = restored["best"]
    run.optimizer.load_state_dict(restored["optimizer"])
    run.scheduler.set_step(run.state["global_step"])
    if restored["rng"] is not None:
        set_rng_state(restored["rng"])
    if run.ctx.rank == 0:
        run.say(f"resumed from checkpoint after epoch {run.state['epochs_done']}")


def _open_tracking(run: MemberRun, tracking_uri: str, resumed: bool) -> None:
    """Rank 0's MLflow writer, and where this worker group runs (tagged: it changes when
    an elastic run resumes on fewer nodes). Every rank takes part in the gather."""
    import ray

    run.tracker = _Tracker(tracking_uri, run.member["run_id"]) if run.ctx.rank == 0 else None
    if run.tracker and resumed:
        run.tracker.tags({"metaensemble.resumed_from_epoch": run.state["epochs_done"]})
    run.nodes = gather(ray.get_runtime_context().get_node_id(), run.ctx)
    if run.tracker:
        run.tracker.tags({"metaensemble.worker_nodes": ",".join(sorted(set(run.nodes)))})


def train_epoch(run: MemberRun, epoch: int) -> dict[str, Any]:
    """One epoch of optimisation on this rank's shard; the epoch's training metrics,
    reduced over ranks."""
    cfg, ctx, train = run.cfg, run.ctx, run.loaders["train"]
    run.model.train()
    totals = EpochTotals(ctx.device)
    skipped_before = getattr(train, "skipped", None)
    t0 = time.perf_counter()
    for step, batch in enumerate(_epoch_batches(train, epoch, cfg.train.steps_per_epoch)):
        loss, logs = _optimisation_step(run, batch)
        totals.add(loss, logs, len(batch["y"]))
        if cfg.train.log_every and ctx.rank == 0 and step % cfg.train.log_every == 0:
            run.say(f"epoch {epoch + 1} step {step} loss {float(loss):.4f}")
    if run.on_gpu:
        torch.cuda.synchronize()
    train_time = time.perf_counter() - t0
    # streamed data: training images that did not decode this epoch (dropped), all ranks
    skipped = None if skipped_before is None else {"data_skipped": train.skipped - skipped_before}
    m: dict[str, Any] = {"epoch": epoch + 1, **totals.reduce(ctx, skipped), "lr": run.optimizer.param_groups[0]["lr"]}
    m["train_images_per_s"] = totals.n * ctx.world_size / max(train_time, 1e-9)
    m["workers"] = ctx.world_size
    if run.nodes is not None:
        m["nodes"] = len(set(run.nodes))
    m["train_time_s"] = train_time
    return m


def _optimisation_step(run: MemberRun, batch: dict[str, torch.Tensor]):
    """The method's loss on ``batch``, one optimiser and schedule step; (loss, scalars)."""
    with run.amp:
        loss, logs = run.method.training_step(run.model, batch)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()  # clips to train.grad_clip first (a step pre-hook: configure_optimizer)
    run.scheduler.step()
    run.state["global_step"] += 1
    return loss, logs


def rebuild_point(run: MemberRun, epoch: int, epoch_metrics: dict[str, Any]) -> None:
    """The method's ``rebuild`` after ``epoch`` (0-based), with the global RNGs seeded
    alike on every rank and restored afterwards. A new module gets DDP, a fresh optimiser
    at the current step holding the old one's state for the parameters that persist
    (``Method.carried_parameters``), and model selection restarts (earlier best weights
    have another structure)."""
    seed, old, old_optimizer = run.cfg.seed, run.base, run.optimizer
    with torch.random.fork_rng(devices=[]):  # the same draws on every rank
        torch.manual_seed(seed * 1_000_003 + epoch + 1)
        np_state, py_state = np.random.get_state(), random.getstate()
        np.random.seed((seed * 7_919 + epoch + 1) % 2**32)
        random.seed(seed * 7_919 + epoch + 1)
        rebuilt = run.method.rebuild(run.base, epoch + 1)
        np.random.set_state(np_state)
        random.setstate(py_state)
    if rebuilt is not None:
        run.wrap(rebuilt)
        carry_state(old_optimizer, run.optimizer, run.method.carried_parameters(old, run.base))
        run.state["best_score"], run.state["best_epoch"], run.best_weights = None, -1, None
        epoch_metrics["rebuilt"] = 1


def validate_and_checkpoint(run: MemberRun, epoch: int, epoch_metrics: dict[str, Any], t0: float) -> None:
    """Validation on every rank's shard; on rank 0 model selection, the checkpoint, the
    epoch's metrics to MLflow; then the report (every rank: it is the barrier)."""
    cfg, ctx, state = run.cfg, run.ctx, run.state
    sync_buffers(run.base, ctx)
    val = evaluate_split(run.method, run.base, run.loaders["val"], "val", ctx)
    ranks = gather((rng_state(), _to_cpu(run.method.state_dict())), ctx)
    ckpt_dir = None
    if ctx.rank == 0:
        epoch_metrics.update(val)
        hook_s = extra_epoch_metrics(run.method, run.base, epoch_metrics)
        score = (1.0 if cfg.train.select_mode == "max" else -1.0) * epoch_metrics[cfg.train.select_metric]
        if state["best_score"] is None or score > state["best_score"]:
            state["best_score"], state["best_epoch"] = score, epoch + 1
            run.best_weights = {k: v.detach().cpu().clone() for k, v in run.base.state_dict().items()}
        epoch_metrics["best_epoch"] = state["best_epoch"]
        state["epochs_done"] = epoch + 1
        ckpt_dir = write_checkpoint(run.base, run.best_weights, run.optimizer, run.scheduler, state, run.info, ranks)
        epoch_metrics["epoch_time_s"] = time.perf_counter() - t0 - hook_s  # the epoch's own work
        run.tracker.metrics(epoch_metrics, step=epoch + 1)
        if time.perf_counter() - run.last_line >= PROGRESS_EVERY_S:
            run.say(_progress_line(cfg.train.epochs, epoch_metrics))
    report(epoch_metrics if ctx.rank == 0 else {"epoch": epoch + 1}, ckpt_dir)


def extra_epoch_metrics(method, base, into: dict[str, Any]) -> float:
    """The method's ``epoch_metrics`` of the export, added to ``into`` with the seconds
    they took (``epoch_metrics_s``); returns those seconds (0 and nothing added for a
    method without the hook: its export is not even built)."""
    if type(method).epoch_metrics is Method.epoch_metrics:
        return 0.0
    t0 = time.perf_counter()
    into.update(method.epoch_metrics(method.export(base)))
    into["epoch_metrics_s"] = time.perf_counter() - t0
    return into["epoch_metrics_s"]


def finish_member(run: MemberRun, packed: bool) -> None:
    """After the last epoch: the selected (best) weights on every rank, exported and
    evaluated on val and test; rank 0 logs the final report and saves the export as the
    run's ``model/``. The last report carries a checkpoint too, so Ray's
    ``Result.metrics``/``.checkpoint`` are the final ones."""
    cfg, ctx, method = run.cfg, run.ctx, run.method
    final: dict[str, Any] = {"epoch": cfg.train.epochs, "final": 1}  # not "done": Tune reads that as "stop the trial"
    if run.best_weights is not None:
        run.best_weights = broadcast(run.best_weights, ctx)
        run.base.load_state_dict(run.best_weights)
    elif ctx.world_size > 1:
        broadcast(None, ctx)
    exported = method.export(run.base)
    _check_exportable(method, exported)
    before = {s: skipped_rows(run.loaders[s]) for s in ("val", "test")}
    val = gather(predict_named(method, exported, run.loaders["val"], "val"), ctx)
    test = gather(predict_named(method, exported, run.loaders["test"], "test"), ctx)
    ranks = gather((rng_state(), _to_cpu(method.state_dict())), ctx)
    ckpt_dir = None
    if ctx.rank == 0:
        final.update(final_report(concat_predictions(val), concat_predictions(test)))
        final.update({f"{s}_skipped": skipped_rows(run.loaders[s]) - n for s, n in before.items() if n is not None})
        final["best_epoch"] = run.state["best_epoch"]
        _save_model(run, exported, final)
        run.tracker.metrics({k: v for k, v in final.items() if k not in ("epoch", "final")}, step=cfg.train.epochs)
        ckpt_dir = write_checkpoint(run.base, run.best_weights, run.optimizer, run.scheduler, run.state, run.info,
                                    ranks)
        run.say(_done_line(cfg.train.epochs, time.perf_counter() - run.started, final))
    report(final if ctx.rank == 0 else {"epoch": cfg.train.epochs, "final": 1}, ckpt_dir)
    if ctx.rank == 0 and packed:
        run.tracker.finished()  # a later member's failure must not cost this one


def _save_model(run: MemberRun, exported, final: dict[str, Any]) -> None:
    """The exported model as the MLflow run's ``model/`` (loadable, with its metrics)."""
    import tempfile

    cfg, member = run.cfg, run.member
    with tempfile.TemporaryDirectory() as d:
        save_model(exported, d, dataset=run.info.name, dataset_info=run.info.to_dict(), seed=cfg.seed,
                   run_id=member["run_id"], run_key=member["run_key"], config_hash=cfg.config_hash(),
                   metrics={k: v for k, v in final.items() if isinstance(v, float)})
        run.tracker.artifacts(d, "model")


# ---- what the steps share ----------------------------------------------------------------
class EpochTotals:
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

    def reduce(self, ctx: RunContext, counts: dict[str, float] | None = None) -> dict[str, float]:
        """Per-example means of the sums over every rank, and ``counts`` summed over ranks."""
        keys, counts = sorted(self.sums), counts or {}
        vec = torch.stack([self.sums[k].reshape(()) for k in keys]
                          + [torch.tensor(float(counts[k]), dtype=torch.float64, device=self.device) for k in counts]
                          + [torch.tensor(float(self.n), dtype=torch.float64, device=self.device)])
        vals = ctx.all_reduce(vec).cpu().tolist()
        n = max(vals[-1], 1.0)
        out = {}
        for k, v in zip(keys, vals[: len(keys)], strict=True):
            out["train_acc" if k == "correct" else f"train_{k}"] = v / n
        out.update(zip(counts, vals[len(keys):-1], strict=True))
        return out


def evaluate_split(method, base, loader, split: str, ctx: RunContext) -> dict[str, float]:
    """Metrics of every named prediction of the export of ``base`` on the whole split
    (on rank 0; {} elsewhere): ``<split>_acc`` etc., the others ``<name>/<split>_acc``;
    for a streamed split also ``<split>_skipped``, its rows that did not decode."""
    before = skipped_rows(loader)
    parts = gather(predict_named(method, method.export(base), loader, split), ctx)
    if parts is None:
        return {}
    out = split_metrics(concat_predictions(parts), split)
    if before is not None:
        out[f"{split}_skipped"] = skipped_rows(loader) - before
    return out


def skipped_rows(loader) -> int | None:
    """Rows a streamed loader has dropped so far because their image did not decode
    (``data.RayShardLoader.skipped``); None for a loader of decoded arrays."""
    return getattr(loader, "skipped", None)


def sync_buffers(base, ctx: RunContext) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics) before evaluating its
    shard: under DDP each rank's last forward updated them with its own batch."""
    if ctx.world_size > 1 and dist.is_initialized():
        for b in base.buffers():
            dist.broadcast(b, 0)


def gather(obj, ctx: RunContext):
    """Every rank's ``obj`` as a list on rank 0 (None on the others); [obj] alone."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out if dist.get_rank() == 0 else None


def broadcast(obj, ctx: RunContext):
    """Rank 0's ``obj`` on every rank."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def report(metrics_: dict[str, Any], ckpt_dir: Path | None) -> None:
    """``ray.train.report`` from every rank (it is also the barrier); rank 0 passes the
    checkpoint folder, which Ray persists during the call, and it is deleted after."""
    import ray.train

    try:
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(metrics_, checkpoint=ckpt)
    finally:
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


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


def _say(msg: str) -> None:
    # The process's real stdout: Ray Train patches print() and MLflow wraps sys.stdout,
    # which together would print every line twice.
    print(msg, file=sys.__stdout__, flush=True)


def _progress_line(epochs: int, m: dict[str, Any]) -> str:
    return (f"epoch {m['epoch']}/{epochs} train_loss {m['train_loss']:.4f} "
            f"train_acc {m['train_acc']:.4f} val_acc {m['val_acc']:.4f} val_nll {m['val_nll']:.4f} "
            f"lr {m['lr']:.4g} {m['train_images_per_s']:.0f} img/s {m['epoch_time_s']:.1f}s")


def _done_line(epochs: int, seconds: float, final: dict[str, Any]) -> str:
    return (f"done: {epochs} epochs in {seconds:.0f}s, best epoch {final['best_epoch']}, "
            f"val_acc {final['val_acc']:.4f}, test_acc {final['test_acc']:.4f}, "
            f"test_nll {final['test_nll']:.4f}, test_ece {final['test_ece']:.4f}")


def build_loaders(cfg, rank: int, world: int, device: torch.device):
    """Loaders sharded over ranks: train (drops the remainder), val/test (every example on
    exactly one rank; streamed val/test on rank 0 alone). Returns (loaders, dataset info,
    number of training examples)."""
    d = cfg.data
    if data.is_streaming(d):
        return _streamed_loaders(cfg, rank, world, device)
    splits = data.load(d)
    info = splits.info
    if isinstance(splits.train, data.ArraySplit):
        train = data.ArrayLoader(splits.train, info, d.batch_size, rank=rank, world_size=world, shuffle=True,
                                 augment=d.augment, seed=cfg.seed, device=device, drop_last=True, cutout=d.cutout)
        ev = lambda s: data.ArrayLoader(s, info, d.eval_batch_size, rank=rank, world_size=world, device=device)  # noqa: E731
    else:
        train = data.DatasetLoader(splits.train, d.batch_size, rank=rank, world_size=world, shuffle=True,
                                   seed=cfg.seed, device=device, num_workers=d.loader_workers, drop_last=True,
                                   repeats=d.repeated_aug)
        ev = lambda s: data.DatasetLoader(s, d.eval_batch_size, rank=rank, world_size=world, device=device,  # noqa: E731
                                          num_workers=d.loader_workers)
    return {"train": train, "val": ev(splits.val), "test": ev(splits.test)}, info, len(splits.train)


def _streamed_loaders(cfg, rank: int, world: int, device: torch.device):
    """Ray Data shards: train split over ranks by Ray Data; val/test read whole by rank 0."""
    import ray.train

    from metaensemble.data.parquet import read_meta

    d = cfg.data
    meta = read_meta(d)
    info = meta["info"]
    mk = lambda split, **kw: data.RayShardLoader(ray.train.get_dataset_shard(split), info, device=device, rank=rank, seed=cfg.seed, **kw)  # noqa: E731
    loaders = {
        "train": mk("train", batch_size=d.batch_size, shuffle=True, augment=d.augment, cutout=d.cutout,
                    length=meta["sizes"]["train"] // world // d.batch_size, shuffle_buffer=d.train_shuffle_buffer(),
                    erase=d.re_prob if d.transform == "deit" else 0.0),
        "val": mk("val", batch_size=d.eval_batch_size) if rank == 0 else None,
        "test": mk("test", batch_size=d.eval_batch_size) if rank == 0 else None,
    }
    return loaders, info, meta["sizes"]["train"]


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
