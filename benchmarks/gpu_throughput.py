"""GPU training throughput through the engine (Ray Train, 1 worker, use_gpu) against plain
PyTorch loops on the same model, data, batch, optimiser, loss, bf16 autocast and
channels_last, in one run:

1. ResNet-50 (``model.name=resnet50``, ImageNet stem) at ImageNet shape (224 px, 1000
   classes), supervised cross-entropy, Nesterov SGD (the engine's default optimiser).
   Goal (issue 17): >= 3,000 images/s through the engine on one H200, within 5% of plain.
2. The Learngene DeiT-S-width aux-net (``configs/learngene/imagenet_aux_s.yaml``: aux_vit
   L16_33433, embed 384, 12 heads, drop path 0.1, AdamW, Mixup 0.8 / CutMix 1.0, KD with
   alpha 1) trained by ``method=learngene``, i.e. distilled from a frozen teacher: a
   randomly initialised LeViT-384 (the recipe's teacher architecture) built here and
   saved as a checkpoint folder (weights do not change the cost). The plain side runs the
   same aux-net step (same teacher, Mixup/CutMix and KD loss); a plain timm DeiT-S
   (``deit_small_patch16_224``, supervised soft-target CE under the same Mixup/CutMix,
   AdamW, no teacher) is measured as the reference architecture the issue names.

    python benchmarks/gpu_throughput.py                          # both comparisons, ~3-4 min on an H200
    python benchmarks/gpu_throughput.py --steps 60 --batch-size 256
    python benchmarks/gpu_throughput.py --only resnet50          # one comparison
    python benchmarks/gpu_throughput.py --cpu-smoke              # CODE-PATH SMOKE TEST ON CPU, NOT A MEASUREMENT

It refuses to run without a GPU (one line, exit status 2) before any work.

Timing. Engine: ``train.epochs = 1 + --repeats`` epochs of ``train.steps_per_epoch =
--steps`` steps; the engine's own ``train_images_per_s`` per epoch (read back from MLflow:
optimisation phase only, from the first batch to a CUDA synchronise after the last step;
validation, checkpoints and MLflow are outside it) with the first epoch dropped as
warm-up, median of the rest. Plain: ``--warmup-steps`` untimed steps, then ``--repeats``
windows of ``--steps`` steps each, timed the same way (batch fetch included, CUDA
synchronise at the end), median. Both keep cuDNN's default (``cudnn.benchmark`` off, as the
engine leaves it); a ResNet-50 plain row with ``cudnn.benchmark=True`` is reported as a
reference only.

Data path. ``data.name=synthetic`` images are generated in host memory once, as uint8;
the engine's ArrayLoader keeps them on the GPU and each batch is a GPU gather + normalise
(the plain loops do the same from a device tensor): no decoding, no augmentation, no
image host-to-device copies, so the data path is not the bottleneck and this measures
model + optimiser + engine loop only. A small sync probe (GPU only, in this process, not
through Ray) counts the host-device synchronisations the engine's per-step code makes.

Writes benchmarks/results/gpu_throughput.{json,md}. ``--cpu-smoke`` runs tiny shapes on
the CPU (ResNet-50 at 64 px, batch 4, 3 steps; a 4-layer aux-net with a DeiT-Tiny teacher
and reference) to prove the code path end to end; it writes to a temporary folder only.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
AUX_RECIPE = "configs/learngene/imagenet_aux_s.yaml"
GOAL_IMAGES_PER_S = 3000.0
GOAL_RATIO = 0.95
SMOKE_BANNER = "CPU SMOKE TEST: code path only, NOT A MEASUREMENT"


@dataclass
class Settings:
    """Shapes and counts of one run (the GPU defaults; ``smoke_settings`` shrinks them)."""

    batch_size: int = 256
    steps: int = 50
    repeats: int = 2
    warmup_steps: int = 15
    image_size: int = 224
    num_classes: int = 1000
    samples: int = 0
    """Synthetic examples (train ~90%); 0: max(2048, 2 x batch)."""
    threads: int = 4
    """CPUs per engine worker and torch threads on both sides."""
    teacher: str = "levit_384"
    reference_vit: str = "deit_small_patch16_224"
    aux_kwargs: dict[str, Any] = field(default_factory=dict)
    """Overrides of the recipe's model.kwargs ({}: the recipe's Aux-S)."""
    only: str = "all"
    smoke: bool = False
    device: str = "cuda"

    def n_samples(self) -> int:
        return self.samples or max(2048, 2 * self.batch_size)


def smoke_settings() -> Settings:
    return Settings(batch_size=4, steps=3, repeats=1, warmup_steps=1, image_size=64, num_classes=10, samples=64,
                    threads=1, teacher="deit_tiny", reference_vit="deit_tiny_patch16_224",
                    aux_kwargs={"embed_dim": 64, "num_heads": 2, "stages": "L4_22", "patch_size": 16},
                    smoke=True, device="cpu")


def say(msg: str) -> None:
    print(f"[gpu_throughput] {msg}", flush=True)


# ---- configs ------------------------------------------------------------------------------

def _common_overrides(s: Settings, work: Path, name: str) -> list[str]:
    on_gpu = str(s.device == "cuda").lower()
    return [
        "data.name=synthetic", "data.root=null", f"data.image_size={s.image_size}", f"data.num_classes={s.num_classes}",
        f"data.num_samples={s.n_samples()}", "data.val_fraction=0.05", "data.test_fraction=0.05",
        f"data.batch_size={s.batch_size}", "data.eval_batch_size=256", "data.augment=false",
        "data.transform=standard", "data.loader_workers=0",
        f"train.epochs={1 + s.repeats}", f"train.steps_per_epoch={s.steps}", "train.amp=true",
        "train.channels_last=true", "train.log_every=0", "optim.warmup_epochs=0",
        "scaling.num_workers=1", f"scaling.use_gpu={on_gpu}", f"scaling.cpus_per_worker={s.threads}",
        f"scaling.torch_threads={s.threads}", "scaling.max_failures=0",
        f"storage_path={work / 'ray'}", f"experiment=bench/gpu_throughput/{name}",
    ]


def resnet_config(s: Settings, work: Path):
    """Supervised ResNet-50 (ImageNet stem at every size, so the smoke runs the same net)."""
    from metaensemble.validation import load_config

    return load_config(None, [*_common_overrides(s, work, "resnet50"), "model.name=resnet50",
                              "model.kwargs.stem=imagenet"])


def aux_config(s: Settings, work: Path, teacher_file: Path):
    """The recipe's aux-net stage (method learngene), on synthetic data, one worker."""
    from metaensemble.validation import load_config

    over = [*_common_overrides(s, work, "aux_vit"), f"learngene.teacher={teacher_file}",
            "learngene.teacher_arch=null", "learngene.teacher_kwargs={}"]
    over += [f"model.kwargs.{k}={v}" for k, v in s.aux_kwargs.items()]
    return load_config(AUX_RECIPE, over)


def write_teacher(s: Settings, info, work: Path) -> Path:
    """A randomly initialised teacher of ``s.teacher`` saved as a checkpoint folder
    (model.safetensors + model.json), which the method loads with ``models.load`` in
    ``Method.teachers``; its values do not change the cost of a step. (The recipe's other
    form, a state-dict file + ``teacher_arch``, builds the same module but cannot be
    validated on synthetic data: LearngeneAux.validate loads the dataset under
    ``torch.device("meta")``, where the synthetic generator fails.)"""
    import torch

    from metaensemble.models import create_model, save_model

    torch.manual_seed(1234)
    t = create_model(s.teacher, num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size)
    return save_model(t, work / f"teacher_{s.teacher}", dataset=info.name, dataset_info=info.to_dict())


# ---- the plain side -----------------------------------------------------------------------

class PlainData:
    """The synthetic train split as uint8 on the device, batches gathered and normalised
    on the device with a device permutation (what ArrayLoader computes, without its
    per-batch host-to-device copies)."""

    def __init__(self, splits, device) -> None:
        import torch

        info = splits.info
        self.info, self.device = info, device
        self.images = splits.train.images.to(device)
        self.labels = splits.train.labels.to(device)
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)

    def batches(self, batch_size: int, seed: int = 0):
        import torch

        g = torch.Generator(device=self.device).manual_seed(seed)
        n = len(self.labels)
        if n < batch_size:
            raise ValueError(f"the train split holds {n} examples, fewer than one batch of {batch_size}")
        while True:
            perm = torch.randperm(n, device=self.device, generator=g)
            for i in range(n // batch_size):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                yield (self.images[idx].float().div_(255.0) - self.mean) / self.std, self.labels[idx]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, batches, s: Settings, device) -> dict[str, Any]:
    """``s.warmup_steps`` untimed steps, then ``s.repeats`` windows of ``s.steps`` steps
    (batch fetch included, a device synchronise closing each); images/s is the median."""
    import torch

    for _ in range(s.warmup_steps):
        step(*next(batches))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for _ in range(s.repeats):
        t0 = time.perf_counter()
        for _ in range(s.steps):
            step(*next(batches))
        _sync(device)
        rates.append(s.steps * s.batch_size / (time.perf_counter() - t0))
    out: dict[str, Any] = {"images_per_s": statistics.median(rates), "window_images_per_s": rates}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _amp(cfg, device):
    """The engine's autocast: bf16 on the GPU when train.amp, nothing otherwise (loop.py)."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.train.amp and device.type == "cuda") \
        else contextlib.nullcontext()


def _channels_last(model, cfg, device):
    """The engine's conversion: the trained module only, on the GPU only (loop._wrap)."""
    import torch

    if cfg.train.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def isolated(device, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, then its models, optimisers and batches released (they die
    with its frame) and the CUDA cache emptied: the engine's worker shares the GPU."""
    try:
        return fn(*args, **kwargs)
    finally:
        _free(device)


def plain_supervised(cfg, data: PlainData, s: Settings, device, *, cudnn_benchmark: bool = False) -> dict[str, Any]:
    """Plain loop of ``cfg.model``: cross-entropy (train.label_smoothing), the engine's
    optimiser and per-step schedule (Method.configure_optimizer: timm -> torch.optim)."""
    import torch
    import torch.nn.functional as F

    from metaensemble.methods.base import Method
    from metaensemble.models import create_model

    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        info = data.info
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model.name, num_classes=info.num_classes, in_chans=info.in_chans,
                             img_size=info.img_size, **cfg.model.kwargs)
        model = _channels_last(model, cfg, device).train()
        opt, sched = Method(cfg).configure_optimizer(model, s.steps)
        amp, ls = _amp(cfg, device), cfg.train.label_smoothing

        def step(x, y):
            with amp:
                loss = F.cross_entropy(model(x), y, label_smoothing=ls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

        out = timed_steps(step, data.batches(s.batch_size, cfg.seed), s, device)
        out["optimizer"] = type(opt).__name__
        return out
    finally:
        torch.backends.cudnn.benchmark = prev


def _mixup(lg, num_classes: int):
    if not (lg.mixup or lg.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=lg.mixup, cutmix_alpha=lg.cutmix, prob=lg.mixup_prob,
                 label_smoothing=lg.label_smoothing, num_classes=num_classes)


def plain_aux(cfg, data: PlainData, teacher_file: Path, s: Settings, device) -> dict[str, Any]:
    """Plain loop of the learngene method's step: the aux-net, the frozen teacher (eval,
    no_grad, fp32 weights under the same autocast, not channels_last: as the engine runs
    it), timm Mixup/CutMix, alpha * T^2 KL + (1 - alpha) CE, the method's optimiser."""
    import torch
    import torch.nn.functional as F

    from metaensemble.methods.base import freeze
    from metaensemble.methods.learngene.method import LearngeneAux, soft_kd_loss
    from metaensemble.models import create_model, load

    info, lg = data.info, cfg.learngene
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_chans=info.in_chans,
                         img_size=info.img_size, **cfg.model.kwargs)
    model = _channels_last(model, cfg, device).train()
    teacher = freeze(load(str(teacher_file))).to(device)  # as Method.teachers loads it
    opt, sched = LearngeneAux(cfg).configure_optimizer(model, s.steps)
    mix, amp = _mixup(lg, info.num_classes), _amp(cfg, device)

    def step(x, y):
        with amp:
            target = None
            if mix is not None:
                x, target = mix(x, y)  # the batch is this step's own tensor: mixed in place
            logits = model(x)
            with torch.no_grad():
                t_logits = teacher(x).float()
            loss = lg.alpha * soft_kd_loss(logits, t_logits, lg.temperature)
            if lg.alpha < 1.0:
                ce = (F.cross_entropy(logits.float(), y, label_smoothing=lg.label_smoothing) if target is None
                      else torch.sum(-target * F.log_softmax(logits.float(), -1), -1).mean())
                loss = loss + (1.0 - lg.alpha) * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    out = timed_steps(step, data.batches(s.batch_size, cfg.seed), s, device)
    out["optimizer"] = type(opt).__name__
    return out


def plain_timm_vit(cfg, data: PlainData, s: Settings, device) -> dict[str, Any]:
    """Reference: a plain timm ViT (``s.reference_vit``, DeiT-S by default) trained
    supervised (soft-target CE under the same Mixup/CutMix, else CE with label
    smoothing), the same drop path, AdamW groups, autocast and channels_last; no teacher."""
    import timm
    import torch
    import torch.nn.functional as F

    from metaensemble.methods.learngene.method import LearngeneAux

    info, lg = data.info, cfg.learngene
    torch.manual_seed(cfg.seed)
    model = timm.create_model(s.reference_vit, pretrained=False, num_classes=info.num_classes,
                              in_chans=info.in_chans, img_size=info.img_size,
                              drop_path_rate=cfg.model.kwargs.get("drop_path_rate", 0.0))
    model = _channels_last(model, cfg, device).train()
    opt, sched = LearngeneAux(cfg).configure_optimizer(model, s.steps)
    mix, amp = _mixup(lg, info.num_classes), _amp(cfg, device)

    def step(x, y):
        with amp:
            if mix is not None:
                x, target = mix(x, y)
                loss = torch.sum(-target * F.log_softmax(model(x).float(), -1), -1).mean()
            else:
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=lg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    out = timed_steps(step, data.batches(s.batch_size, cfg.seed), s, device)
    out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return out


# ---- the engine side ----------------------------------------------------------------------

def engine_run(cfg, warmup_epochs: int = 1) -> dict[str, Any]:
    """``engine.fit(cfg)`` (Ray Train, the config's workers and devices) and the engine's
    own per-epoch ``train_images_per_s``, first ``warmup_epochs`` dropped, median."""
    from metaensemble import tracking
    from metaensemble.engine import fit

    t0 = time.perf_counter()
    outcome = fit(cfg)
    wall = time.perf_counter() - t0
    if outcome.skipped:
        raise RuntimeError(f"run {outcome.run_key} was already finished in this MLflow store: nothing was measured")
    c = tracking.client()
    hist = {k: [m.value for m in sorted(c.get_metric_history(outcome.run_id, k), key=lambda m: m.step)]
            for k in ("train_images_per_s", "train_time_s", "epoch_time_s")}
    rates = hist["train_images_per_s"]
    if len(rates) <= warmup_epochs:
        raise RuntimeError(f"the engine logged {len(rates)} epoch(s); need more than {warmup_epochs} warm-up epoch(s)")
    return {
        "images_per_s": statistics.median(rates[warmup_epochs:]),
        "epoch_images_per_s": rates,
        "warmup_epochs_dropped": warmup_epochs,
        "train_time_s": hist["train_time_s"],
        "epoch_time_s": hist["epoch_time_s"],
        "fit_wall_s": wall,
        "run_id": outcome.run_id,
    }


# ---- diagnostics --------------------------------------------------------------------------

def sync_probe(cfg, splits, s: Settings, device, steps: int = 3) -> dict[str, Any]:
    """Host-device synchronisations per step in the engine's per-step code, counted with
    ``torch.cuda.set_sync_debug_mode("warn")`` in this process (not through Ray): the
    ArrayLoader batch, Method.training_step, backward + optimiser + schedule, and the
    loop's per-step bookkeeping (``EpochTotals.add``). GPU only; one unprobed step first."""
    import warnings

    import torch

    from metaensemble import data
    from metaensemble.engine.loop import EpochTotals
    from metaensemble.methods.base import Method
    from metaensemble.models import create_model

    if device.type != "cuda":
        return {"skipped": "no CUDA device (sync debug mode is CUDA only)"}
    info = splits.info
    loader = data.ArrayLoader(splits.train, info, min(s.batch_size, 64), shuffle=True, device=device, drop_last=True)
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_chans=info.in_chans,
                         img_size=info.img_size, **cfg.model.kwargs)
    model = _channels_last(model, cfg, device).train()
    method = Method(cfg)
    opt, sched = method.configure_optimizer(model, s.steps)
    totals, amp = EpochTotals(device), _amp(cfg, device)
    counts = {"loader_batch": 0, "training_step": 0, "backward_step_schedule": 0, "totals_add": 0}
    sites: dict[str, int] = {}
    it = iter(loader)

    def one(rec):
        marks = []

        def mark():
            marks.append(len(rec) if rec is not None else 0)

        mark()
        batch = next(it)
        mark()
        with amp:
            loss, logs = method.training_step(model, batch)
        mark()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        mark()
        totals.add(loss, logs, len(batch["y"]))
        mark()
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    try:
        one(None)
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    for k, d in zip(counts, one(rec), strict=True):
                        counts[k] += d
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in rec:
            if "synchroniz" in str(w.message):
                site = f"{Path(w.filename).relative_to(REPO) if str(w.filename).startswith(str(REPO)) else w.filename}:{w.lineno}"
                sites[site] = sites.get(site, 0) + 1
        return {"syncs_per_step": {k: v / steps for k, v in counts.items()},
                "sites_per_step": {k: v / steps for k, v in sorted(sites.items())}}
    except Exception as e:  # noqa: BLE001 - a diagnostic must not cost the measurement
        return {"error": f"{type(e).__name__}: {e}"}


# ---- the run ------------------------------------------------------------------------------

def environment(device) -> dict[str, Any]:
    import ray
    import timm
    import torch

    env = {"device": str(device), "torch": torch.__version__, "timm": timm.__version__, "ray": ray.__version__,
           "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
    return env


def measure_resnet(s: Settings, work: Path, splits, pdata: PlainData, device) -> dict[str, Any]:
    """ResNet-50: plain, plain + cudnn.benchmark (reference), the sync probe, the engine."""
    rcfg = resnet_config(s, work)
    r: dict[str, Any] = {"model": "resnet50 (metaensemble registry, torchvision-style v1.5, ImageNet stem)",
                         "loss": "cross-entropy", "optimizer": f"{rcfg.optim.name} (nesterov={rcfg.optim.nesterov})"}
    say(f"resnet50 plain: {s.warmup_steps} warm-up + {s.repeats} x {s.steps} timed steps, batch {s.batch_size}")
    r["plain"] = isolated(device, plain_supervised, rcfg, pdata, s, device)
    say(f"  plain {r['plain']['images_per_s']:.0f} img/s")
    say("resnet50 plain with cudnn.benchmark=True (reference only; the engine leaves it off)")
    r["plain_cudnn_benchmark"] = isolated(device, plain_supervised, rcfg, pdata, s, device, cudnn_benchmark=True)
    say(f"  plain + cudnn.benchmark {r['plain_cudnn_benchmark']['images_per_s']:.0f} img/s")
    say("sync probe of the engine's per-step code (GPU only)")
    r["sync_probe"] = isolated(device, sync_probe, rcfg, splits, s, device)
    say(f"  {r['sync_probe']}")
    say(f"resnet50 engine: Ray Train, 1 worker, use_gpu={rcfg.scaling.use_gpu}, {rcfg.train.epochs} epochs "
        f"of {s.steps} steps (epoch 1 = warm-up)")
    r["engine"] = engine_run(rcfg)
    say(f"  engine {r['engine']['images_per_s']:.0f} img/s")
    r["ratio_engine_plain"] = r["engine"]["images_per_s"] / r["plain"]["images_per_s"]
    r["goal_images_per_s"], r["goal_ratio"] = GOAL_IMAGES_PER_S, GOAL_RATIO
    r["images_per_s_goal_met"] = r["engine"]["images_per_s"] >= GOAL_IMAGES_PER_S
    r["ratio_goal_met"] = r["ratio_engine_plain"] >= GOAL_RATIO
    return r


def measure_aux(s: Settings, work: Path, splits, pdata: PlainData, device) -> dict[str, Any]:
    """The learngene aux-net: plain (same step), the timm reference ViT (plain), the engine."""
    info = splits.info
    say(f"writing a random {s.teacher} teacher ({info.img_size}px, {info.num_classes} classes)")
    tfile = write_teacher(s, info, work)
    acfg = aux_config(s, work, tfile)
    lg = acfg.learngene
    a: dict[str, Any] = {
        "model": f"aux_vit {acfg.model.kwargs}", "method": "learngene (stage 1: KD from a frozen teacher)",
        "teacher": f"{s.teacher} (random init, frozen, eval, no_grad)", "optimizer": acfg.optim.name,
        "mixup": lg.mixup, "cutmix": lg.cutmix, "alpha": lg.alpha, "temperature": lg.temperature,
        "reference": f"{s.reference_vit} (timm, supervised, same Mixup/CutMix, AdamW, no teacher)",
    }
    say(f"aux-net plain (same step: aux-net + {s.teacher} teacher + KD)")
    a["plain_same"] = isolated(device, plain_aux, acfg, pdata, tfile, s, device)
    say(f"  plain {a['plain_same']['images_per_s']:.0f} img/s")
    say(f"{s.reference_vit} plain (reference architecture)")
    a["plain_reference_vit"] = isolated(device, plain_timm_vit, acfg, pdata, s, device)
    say(f"  {s.reference_vit} {a['plain_reference_vit']['images_per_s']:.0f} img/s")
    say(f"aux-net engine: method learngene, {acfg.train.epochs} epochs of {s.steps} steps (epoch 1 = warm-up)")
    a["engine"] = engine_run(acfg)
    say(f"  engine {a['engine']['images_per_s']:.0f} img/s")
    a["ratio_engine_plain"] = a["engine"]["images_per_s"] / a["plain_same"]["images_per_s"]
    a["ratio_engine_vs_reference_vit"] = a["engine"]["images_per_s"] / a["plain_reference_vit"]["images_per_s"]
    a["ratio_goal_met"] = a["ratio_engine_plain"] >= GOAL_RATIO
    return a


def measure(s: Settings, work: Path, save=None) -> dict[str, Any]:
    """Both comparisons (or ``s.only``); every number this run reports. A comparison that
    fails is recorded as ``{"error": ...}`` and the next one still runs; ``save(result)``
    is called after each, so a late failure keeps the earlier figures."""
    import traceback

    import torch

    from metaensemble import data

    device = torch.device(s.device)
    torch.set_num_threads(s.threads)
    result: dict[str, Any] = {"environment": environment(device)}
    say(f"generating {s.n_samples()} synthetic {s.image_size}px images, {s.num_classes} classes (host memory) ...")
    t0 = time.perf_counter()
    splits = data.load(resnet_config(s, work).data)  # the aux-net's data section is the same
    say(f"  done in {time.perf_counter() - t0:.1f}s; train split {len(splits.train)} images")
    pdata = PlainData(splits, device)
    parts = [("resnet50", measure_resnet), ("aux", measure_aux)]
    for name, fn in parts:
        if s.only not in ("all", name):
            continue
        try:
            result[name] = fn(s, work, splits, pdata, device)
        except Exception as e:  # noqa: BLE001 - recorded; the other comparison still runs
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            say(f"{name} FAILED: {result[name]['error']}")
        if save is not None:
            save(result)
    del pdata
    _free(device)
    return result


def report(result: dict[str, Any]) -> str:
    s, env = result["settings"], result["environment"]
    smoke = result["smoke"]
    cuda = f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else ""
    amp_text = ("bf16 autocast + channels_last on both sides" if "cuda" in env else
                "bf16 autocast + channels_last configured but OFF on both sides (the engine applies them on GPU only)")
    title = f"# {SMOKE_BANNER}\n\n" if smoke else ""
    md = [title + f"# GPU training throughput: engine vs plain PyTorch ({env.get('gpu', env['device'])})", "",
          f"Command: `{result['command']}`", "",
          f"torch {env['torch']}, timm {env['timm']}, ray {env['ray']}{cuda}; batch {s['batch_size']}, "
          f"{s['image_size']}px, {s['num_classes']} classes, {amp_text}; "
          f"{s['repeats']} timed window(s) of {s['steps']} steps (median), engine epoch 1 and {s['warmup_steps']} "
          f"plain steps dropped as warm-up; synthetic data held on the device (not the bottleneck). Total wall "
          f"{result['wall_s']:.0f} s.", "",
          "| | plain PyTorch img/s | engine (Ray Train, 1 worker) img/s | engine / plain |", "|---|---|---|---|"]
    r, a = result.get("resnet50"), result.get("aux")
    for name, part in (("ResNet-50", r), ("aux-net", a)):
        if part and "error" in part:
            md.append(f"| {name} | FAILED: {part['error']} | | |")
    r, a = (None if (x is None or "error" in x) else x for x in (r, a))
    if r:
        md.append(f"| ResNet-50, CE, SGD | {r['plain']['images_per_s']:.0f} | {r['engine']['images_per_s']:.0f} | "
                  f"{r['ratio_engine_plain']:.3f} |")
    if a:
        md.append(f"| aux-net ({s['teacher']} teacher, KD, Mixup/CutMix, AdamW) | "
                  f"{a['plain_same']['images_per_s']:.0f} | {a['engine']['images_per_s']:.0f} | "
                  f"{a['ratio_engine_plain']:.3f} |")
    md += ["", "References (plain only):", ""]
    if r:
        md.append(f"- ResNet-50 plain with `cudnn.benchmark=True`: {r['plain_cudnn_benchmark']['images_per_s']:.0f} "
                  "img/s (the engine leaves it off; so does the plain row above)")
    if a:
        md.append(f"- {s['reference_vit']} plain (supervised, same Mixup/CutMix, AdamW, no teacher): "
                  f"{a['plain_reference_vit']['images_per_s']:.0f} img/s; aux-net engine / it = "
                  f"{a['ratio_engine_vs_reference_vit']:.3f}")
    if r:
        md += ["", f"Goals (ResNet-50 through the engine): >= {GOAL_IMAGES_PER_S:.0f} img/s: "
               f"{'met' if r['images_per_s_goal_met'] else 'NOT met'}; within {100 * (1 - GOAL_RATIO):.0f}% of plain "
               f"(ratio >= {GOAL_RATIO}): {'met' if r['ratio_goal_met'] else 'NOT met'}."]
    if a:
        md += ["", f"aux-net engine / plain >= {GOAL_RATIO} (same bar, informational): "
               f"{'met' if a['ratio_goal_met'] else 'NOT met'}."]
    md += ["", "Engine images/s is its own per-epoch `train_images_per_s` (optimisation phase only: per-epoch "
           "validation, checkpointing and MLflow logging are outside it; Ray/MLflow start-up is paid once per run)."]
    if r:
        probe = r.get("sync_probe", {})
        if "syncs_per_step" in probe:
            md += ["", f"Host-device syncs per step in the engine's per-step code (sync debug mode): "
                   f"{probe['syncs_per_step']}; sites: {probe['sites_per_step']}"]
    if smoke:
        md += ["", f"**{SMOKE_BANNER}.**"]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per window / engine epoch (default 50)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size, both sides (default 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows = engine epochs after the warm-up (default 2)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed plain steps first (default 15)")
    p.add_argument("--threads", type=int, default=None, help="CPUs per engine worker, torch threads (default 4)")
    p.add_argument("--samples", type=int, default=None, help="synthetic examples (default max(2048, 2 x batch))")
    p.add_argument("--teacher", default=None, help="registered teacher architecture (default levit_384)")
    p.add_argument("--only", choices=("all", "resnet50", "aux"), default="all")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary MLflow store and Ray storage")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # code-path test, not a measurement
    args = p.parse_args(argv)

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU is visible (torch.cuda.is_available() is False); this benchmark "
              "measures GPU training and does not run without one", file=sys.stderr)
        return 2
    s = smoke_settings() if args.cpu_smoke else Settings()
    for name in ("steps", "batch_size", "repeats", "warmup_steps", "threads", "samples", "teacher"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.only = args.only
    if s.steps < 1 or s.repeats < 1 or s.batch_size < 2 or s.warmup_steps < 0:
        p.error("--steps and --repeats must be >= 1, --batch-size >= 2, --warmup-steps >= 0")
    if s.only != "resnet50" and s.batch_size % 2:
        p.error(f"--batch-size must be even: the aux-net recipe's Mixup/CutMix pairs examples (got {s.batch_size})")
    if s.smoke:
        say(SMOKE_BANNER)

    work = Path(tempfile.mkdtemp(prefix="me-gpu-throughput-"))
    if not args.keep_work:  # registered first, so it runs last: after MLflow's and Ray's own exit handlers
        atexit.register(shutil.rmtree, work, True)
    # A private MLflow store: the runs always train (a store holding a finished run of the
    # same config would skip it) and the user's store gets no benchmark runs.
    os.environ["METAENSEMBLE_MLFLOW_HOME"] = str(work / "mlflow")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # The smoke's two small files stay in a folder of their own (the work folder goes at exit).
    out_dir = Path(tempfile.mkdtemp(prefix="gpu-throughput-smoke-")) if s.smoke else RESULTS

    t0 = time.perf_counter()
    result: dict[str, Any] = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                              "smoke": s.smoke, "note": SMOKE_BANNER if s.smoke else "measurement",
                              "settings": {**asdict(s), "samples": s.n_samples()}}

    def save(partial: dict[str, Any]) -> str:
        result.update(partial)
        result["wall_s"] = time.perf_counter() - t0
        md = report(result)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_throughput.json").write_text(json.dumps(result, indent=2))
        (out_dir / "gpu_throughput.md").write_text(md)
        return md

    md = save(measure(s, work, save))
    print(md)
    say(f"wrote {out_dir / 'gpu_throughput.json'} and .md" + (f" ({SMOKE_BANNER})" if s.smoke else ""))
    failed = [k for k in ("resnet50", "aux") if "error" in result.get(k, {})]
    if failed:
        say(f"FAILED: {', '.join(failed)} (see the traceback above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
