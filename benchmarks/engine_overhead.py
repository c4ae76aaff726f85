"""Engine overhead: training images/s of the Ray Train engine (1 worker) against a plain
PyTorch loop on the same model, data, optimiser and thread count, in one run.

    python benchmarks/engine_overhead.py                   # CPU, 1 thread, convnet, synthetic 32x32
    python benchmarks/engine_overhead.py --threads 2 --epochs 6 --model resnet18
    python benchmarks/engine_overhead.py --gpu             # on a GPU machine

Both sides skip the first epoch (warm-up) and time the rest. Two ratios are reported:
- train: the optimisation phase only (data + forward/backward/step), engine / plain;
- epoch: whole epochs, where the engine also validates, checkpoints and logs to MLflow
  and the plain loop also validates (it has no checkpointing or tracking).
Ray and MLflow start-up is reported separately: it is paid once per run, not per epoch.
Writes benchmarks/results/engine_overhead.{json,md}. Target: train ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _stdlib_platform  # noqa: F401  (proves the stdlib module is not shadowed)
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.95


def plain_loop(cfg, device: torch.device) -> dict:
    """A straightforward PyTorch loop: shuffled index slices of in-memory tensors."""
    from metaensemble import data
    from metaensemble.methods.base import Method
    from metaensemble.models import create_model

    torch.manual_seed(cfg.seed)
    splits = data.load(cfg.data)
    info = splits.info
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    x_all = splits.train.images.to(device)
    y_all = splits.train.labels.to(device)
    x_val = ((splits.val.images.to(device).float() / 255) - mean) / std
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_chans=info.in_chans,
                         img_size=info.img_size, **cfg.model.kwargs).to(device)
    bs = cfg.data.batch_size
    steps = len(y_all) // bs
    opt, sched = Method(cfg).configure_optimizer(model, steps)  # the engine's optimiser and schedule
    train_rates, epoch_rates = [], []
    for epoch in range(cfg.train.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(y_all), device=device)
        for s in range(steps):
            idx = perm[s * bs : (s + 1) * bs]
            x = ((x_all[idx].float() / 255) - mean) / std
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            for s in range(0, len(x_val), cfg.data.eval_batch_size):
                model(x_val[s : s + cfg.data.eval_batch_size])
        t_epoch = time.perf_counter() - t0
        if epoch > 0:
            train_rates.append(steps * bs / t_train)
            epoch_rates.append(steps * bs / t_epoch)
    return {"train_images_per_s": statistics.median(train_rates), "epoch_images_per_s": statistics.median(epoch_rates)}


def engine_run(cfg) -> dict:
    from metaensemble import tracking
    from metaensemble.engine import fit

    t0 = time.perf_counter()
    outcome = fit(cfg)
    wall = time.perf_counter() - t0
    c = tracking.client()
    hist = {k: sorted(c.get_metric_history(outcome.run_id, k), key=lambda m: m.step)
            for k in ("train_images_per_s", "epoch_time_s", "train_time_s")}
    n_imgs = [m.value * t.value for m, t in zip(hist["train_images_per_s"], hist["train_time_s"], strict=True)]
    steady = slice(1, cfg.train.epochs)
    epoch_rates = [n / e.value for n, e in zip(n_imgs, hist["epoch_time_s"], strict=True)][steady]
    return {
        "train_images_per_s": statistics.median(m.value for m in hist["train_images_per_s"][steady]),
        "epoch_images_per_s": statistics.median(epoch_rates),
        "fit_wall_s": wall,
        "startup_and_final_eval_s": wall - sum(e.value for e in hist["epoch_time_s"]),
        "run_id": outcome.run_id,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnet")
    p.add_argument("--width", type=int, default=32, help="convnet width")
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--amp", action="store_true")
    args = p.parse_args()

    from metaensemble.validation import load_config

    work = Path(tempfile.mkdtemp(prefix="me-bench-"))
    os.environ.setdefault("METAENSEMBLE_MLFLOW_HOME", str(work / "mlflow"))
    overrides = [
        "data.name=synthetic", f"data.num_samples={args.samples}", f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}", "data.augment=false", f"model.name={args.model}",
        f"train.epochs={args.epochs}", "optim.warmup_epochs=0", f"scaling.torch_threads={args.threads}",
        f"scaling.cpus_per_worker={args.threads}", f"scaling.use_gpu={str(args.gpu).lower()}",
        f"train.amp={str(args.amp).lower()}", f"storage_path={work / 'ray'}", "experiment=bench/engine_overhead",
    ]
    if args.model == "convnet":
        overrides.append(f"model.kwargs.width={args.width}")
    cfg = load_config(None, overrides)
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(args.threads)

    plain = plain_loop(cfg, device)
    eng = engine_run(cfg)
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": args.model, "samples": args.samples, "image_size": args.image_size, "batch_size": args.batch_size,
        "epochs": args.epochs, "threads": args.threads, "device": str(device), "torch": torch.__version__,
        "plain": plain, "engine": eng,
        "ratio_train": eng["train_images_per_s"] / plain["train_images_per_s"],
        "ratio_epoch": eng["epoch_images_per_s"] / plain["epoch_images_per_s"],
        "target_ratio_train": TARGET,
    }
    result["target_met"] = result["ratio_train"] >= TARGET
    RESULTS.mkdir(exist_ok=True)
    tag = "" if not args.gpu else "_gpu"
    (RESULTS / f"engine_overhead{tag}.json").write_text(json.dumps(result, indent=2))
    md = (
        f"# Engine overhead ({device}, {args.threads} thread(s), {args.model}, batch {args.batch_size})\n\n"
        f"Command: `{result['command']}`\n\n"
        "| | plain PyTorch | engine (Ray Train, 1 worker) | ratio |\n|---|---|---|---|\n"
        f"| train phase images/s | {plain['train_images_per_s']:.0f} | {eng['train_images_per_s']:.0f} | {result['ratio_train']:.3f} |\n"
        f"| whole epoch images/s | {plain['epoch_images_per_s']:.0f} | {eng['epoch_images_per_s']:.0f} | {result['ratio_epoch']:.3f} |\n\n"
        f"Engine start-up + final evaluation (once per run): {eng['startup_and_final_eval_s']:.1f} s of "
        f"{eng['fit_wall_s']:.1f} s wall. Target train ratio >= {TARGET}: {'met' if result['target_met'] else 'NOT met'}.\n"
    )
    (RESULTS / f"engine_overhead{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
