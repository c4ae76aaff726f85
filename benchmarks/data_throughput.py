"""Data throughput: images/s delivered to a training loop by the Ray Data parquet path
against torchvision's ImageFolder DataLoader, at the same CPU count, on an ImageNet-layout
folder of generated JPEGs.

    python benchmarks/data_throughput.py                       # 3000 train JPEGs, 2 data CPUs, 4 epochs
    python benchmarks/data_throughput.py --images 20000 --no-variant   # the steady-state figure
    python benchmarks/data_throughput.py --images 10000 --data-cpus 8 --epochs 5

Both sides deliver the same thing to a loop that only consumes it: float32 [B, 3, 224, 224]
batches, normalised, on the CPU, of RandomResizedCrop(224) + horizontal-flip augmented
training images.

- ImageFolder: ``data.load`` (load_imagefolder: torchvision ImageFolder, RandomResizedCrop +
  flip + ToTensor + Normalize) through the engine's ``DatasetLoader`` (a DataLoader with
  ``num_workers = --data-cpus``, shuffled), consumed in this process (1 torch thread).
- Ray Data: ``write_image_folder`` -> ``ray_datasets`` (parquet read with a new file order
  every epoch, decode + RandomResizedCrop + flip on Ray Data workers) -> a TorchTrainer with
  one training worker (1 CPU), the train set split through ``ray.train.DataConfig`` with an
  ``ExecutionResources(cpu=--data-cpus)`` budget exactly as the engine does for
  ``data.data_cpus``; in the worker the engine's ``RayShardLoader`` (local shuffle buffer,
  normalise). Ray is started with ``1 + --data-cpus`` CPUs.

Each side runs ``--epochs`` epochs; the first is warm-up, the median of the rest is reported,
with the CPU time each side's whole process tree used per delivered image (from /proc: less
sensitive than images/s to other work on a shared machine). Unless ``--no-variant``, the Ray
side runs as the engine sets up Ray (``engine.trainer.RAY_DATA_ENV``: one parquet
footer-reading actor), then a second time with Ray Data 2.60's default of 32, which it
starts to list the parquet files at the start of every epoch (a diagnostic).
Also timed: ``write_image_folder`` (prepare), and the bytes of the folder, the shards and
the decoded uint8 arrays. Writes benchmarks/results/data_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform as _stdlib_platform  # noqa: F401  (proves the stdlib module is not shadowed)
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 224
CLASSES = 10
IDLE_S = 4.0


# ---- the folder ---------------------------------------------------------------------------
def _protos(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 1]).integers(0, 256, (CLASSES, 6, 6, 3), dtype=np.uint8)


def _make_jpeg(job: tuple[str, int, int, int]) -> int:
    """One ImageNet-like JPEG (300-500 px a side, quality 90): the class's smooth colour
    pattern, a random colour gradient, a coarse random texture and pixel noise."""
    from PIL import Image

    path, label, seed, i = job
    rng = np.random.default_rng([seed, label, i])
    w, h = (int(v) for v in rng.integers(300, 501, 2))
    base = np.asarray(Image.fromarray(_protos(seed)[label]).resize((w, h), Image.BICUBIC), np.float32)
    tex = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    tex = np.asarray(Image.fromarray(tex).resize((w, h), Image.BILINEAR), np.float32)
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None]
    arr = 0.7 * base + 0.3 * tex + rng.uniform(-50, 50, 3).astype(np.float32) * gx \
        + rng.uniform(-50, 50, 3).astype(np.float32) * gy
    arr += 9 * rng.standard_normal((h, w, 3), dtype=np.float32)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def make_folder(root: Path, n_train: int, n_val: int, procs: int, seed: int = 0) -> dict:
    jobs = []
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(CLASSES):
            (root / split / f"n{c:08d}").mkdir(parents=True)
        for i in range(n):
            c = i % CLASSES
            jobs.append((str(root / split / f"n{c:08d}" / f"{split}_{i:07d}.JPEG"), c, seed, i + (split == "val") * 10**7))
    t0 = time.perf_counter()
    with Pool(procs) as pool:
        sizes = pool.map(_make_jpeg, jobs, chunksize=32)
    return {"train_images": n_train, "val_images": n_val, "classes": CLASSES, "bytes": int(sum(sizes)),
            "mean_kb": sum(sizes) / len(sizes) / 1e3, "generate_s": time.perf_counter() - t0}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- prepare ------------------------------------------------------------------------------
def prepare(src: Path, dst: Path, shard_mb: float, folder_bytes: int) -> dict:
    from metaensemble.data.parquet import SPLITS, write_image_folder

    t0 = time.perf_counter()
    write_image_folder(src, dst, image_size=SIZE, shard_mb=shard_mb, progress=False)
    dt = time.perf_counter() - t0
    meta = json.loads((dst / "meta.json").read_text())
    rows = sum(meta["sizes"].values())
    shards = {s: [f.stat().st_size for f in sorted((dst / s).glob("*.parquet"))] for s in SPLITS}
    total = sum(sum(v) for v in shards.values())
    decoded = rows * 3 * SIZE * SIZE
    return {
        "seconds": dt, "images": rows, "images_per_s": rows / dt, "mb_per_s": folder_bytes / 2**20 / dt,
        "shard_mb": shard_mb, "sizes": meta["sizes"],
        "shards": {s: {"count": len(v), "mb": [round(b / 2**20, 2) for b in v]} for s, v in shards.items()},
        "folder_bytes": folder_bytes, "parquet_bytes": total, "parquet_over_folder": total / folder_bytes,
        "decoded_uint8_bytes": decoded, "decoded_over_parquet": decoded / total,
        "decoded_bytes_per_image": 3 * SIZE * SIZE, "encoded_bytes_per_image": total / rows,
    }


# ---- per-image CPU cost, one process ------------------------------------------------------
def per_image_cost(src: Path, pq_root: Path, n: int = 128) -> dict:
    """CPU milliseconds per training image, in this process with 1 torch thread (CPU time,
    so a busy machine does not inflate it): the Ray path's decode_images UDF (parquet bytes
    -> RandomResizedCrop + flip -> uint8) plus its training worker's normalise, against one
    ImageFolder item (open + decode + RandomResizedCrop + flip + ToTensor + Normalize)."""
    from torchvision import datasets, transforms

    from metaensemble.data.core import DatasetInfo
    from metaensemble.data.loaders import normalise
    from metaensemble.data.parquet import decode_images, iter_rows
    from metaensemble.data.sources import IMAGENET_MEAN, IMAGENET_STD

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = next(iter_rows(sorted(str(f) for f in (pq_root / "train").glob("*.parquet"))))
        batch = {k: v[:n] for k, v in rows.items()}
        got = len(batch["label"])
        decode_images({k: v[:8] for k, v in batch.items()}, SIZE, True)  # warm-up
        t0 = time.process_time()
        for s in range(0, got, 64):
            decode_images({k: v[s:s + 64] for k, v in batch.items()}, SIZE, True)
        ray_ms = (time.process_time() - t0) / got * 1e3
        info = DatasetInfo("imagefolder", "imagenet", CLASSES, 3, SIZE, IMAGENET_MEAN, IMAGENET_STD)
        x = torch.randint(0, 256, (64, 3, SIZE, SIZE), dtype=torch.uint8)
        normalise(x, info)
        t0 = time.process_time()
        for _ in range(4):
            normalise(x, info)
        norm_ms = (time.process_time() - t0) / (4 * 64) * 1e3
        tf = transforms.Compose([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        ds = datasets.ImageFolder(str(src / "train"), transform=tf)
        step = max(1, len(ds) // n)
        for i in range(8):  # warm-up
            ds[i * step]
        t0 = time.process_time()
        for i in range(n):
            ds[i * step]
        folder_ms = (time.process_time() - t0) / n * 1e3
    finally:
        torch.set_num_threads(threads)
    return {"images": got, "ray_decode_udf_ms": ray_ms, "ray_worker_normalise_ms": norm_ms,
            "ray_total_ms": ray_ms + norm_ms, "imagefolder_item_ms": folder_ms}


# ---- CPU time of a process tree (Linux /proc) ----------------------------------------------
def tree_cpu_s(root_pid: int) -> float | None:
    """CPU seconds (user + system) used so far by ``root_pid`` and every live descendant,
    plus the reaped children each of them has waited for; None without /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    try:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                # after "pid (comm)": state ppid ... utime(12) stime(13) cutime(14) cstime(15)
                stats[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    except OSError:
        return None
    if root_pid not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total / tick


# ---- the two sides ------------------------------------------------------------------------
def steady_rate(marks: list[tuple[float, int]]) -> float:
    """Images/s over the middle half of an epoch: from the batch that brings the count past
    a quarter of the epoch's images to the one past three quarters. With at least four
    times the shuffle buffer's rows in an epoch this leaves out the buffer's filling (no
    batch until it holds ``shuffle_buffer`` rows) and its draining at the end."""
    if not marks:
        return float("nan")
    n = marks[-1][1]
    t1, n1 = next(m for m in marks if m[1] >= n / 4)
    t2, n2 = next(m for m in marks if m[1] >= 3 * n / 4)
    return (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")  # nan: no middle half to time


def summarise(times: list[float], counts: list[int], first: list[float], cpu: list[float | None],
              marks: list[list[tuple[float, int]]]) -> dict:
    rates = [c / t for c, t in zip(counts, times, strict=True)]
    steady = [steady_rate(m) for m in marks]
    out = {"epoch_s": times, "images_per_epoch": counts, "first_batch_s": first, "images_per_s_all": rates,
           "images_per_s": statistics.median(rates[1:]), "steady_images_per_s_all": steady,
           "steady_images_per_s": statistics.median([r for r in steady[1:] if math.isfinite(r)] or [math.nan])}
    if all(c is not None for c in cpu):
        ms = [1e3 * c / n for c, n in zip(cpu, counts, strict=True)]
        out.update({"cpu_s": cpu, "cpu_ms_per_image_all": ms, "cpu_ms_per_image": statistics.median(ms[1:]),
                    "busy_cpus_all": [c / t for c, t in zip(cpu, times, strict=True)],
                    "busy_cpus": statistics.median(c / t for c, t in zip(cpu[1:], times[1:], strict=True))})
    return out


def imagefolder_side(src: Path, args) -> dict:
    from metaensemble import data
    from metaensemble.config import DataConfig

    torch.set_num_threads(1)
    cfg = DataConfig(name="imagefolder", root=str(src), image_size=SIZE, augment=True, batch_size=args.batch_size)
    splits = data.load(cfg)
    loader = data.DatasetLoader(splits.train, args.batch_size, shuffle=True, seed=0,
                                num_workers=args.data_cpus, drop_last=True)
    times, counts, first, cpu, marks = [], [], [], [], []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        c0 = tree_cpu_s(os.getpid())
        t0 = time.perf_counter()
        n, t_first = 0, None
        marks.append([])
        for b in loader:
            n += b["x"].shape[0]
            marks[-1].append((time.perf_counter() - t0, n))
            if t_first is None:
                t_first = time.perf_counter() - t0
        times.append(time.perf_counter() - t0)
        c1 = tree_cpu_s(os.getpid())
        cpu.append(None if c0 is None or c1 is None else c1 - c0)
        counts.append(n)
        first.append(t_first)
        print(f"  imagefolder epoch {epoch}: {n} images {times[-1]:.2f}s {n / times[-1]:.0f} img/s "
              f"(first batch {t_first:.2f}s)", flush=True)
    return {"train_images": len(splits.train), **summarise(times, counts, first, cpu, marks)}


def _ray_train_loop(config: dict) -> None:
    import ray.train

    from metaensemble.data.core import DatasetInfo
    from metaensemble.data.loaders import RayShardLoader

    torch.set_num_threads(1)
    info = DatasetInfo.from_dict(config["info"])
    shard = ray.train.get_dataset_shard("train")
    loader = RayShardLoader(shard, info, batch_size=config["batch_size"], shuffle=True, augment=True,
                            shuffle_buffer=config["shuffle_buffer"], length=config["length"])
    times, counts, first, cpu, marks = [], [], [], [], []
    stats = ""
    for epoch in range(config["epochs"]):
        loader.set_epoch(epoch)
        c0 = tree_cpu_s(config["driver_pid"])  # the driver started every Ray process of this run
        t0 = time.perf_counter()
        n, t_first = 0, None
        marks.append([])
        for b in loader:
            n += b["x"].shape[0]
            marks[-1].append((time.perf_counter() - t0, n))
            if t_first is None:
                t_first = time.perf_counter() - t0
        times.append(time.perf_counter() - t0)
        c1 = tree_cpu_s(config["driver_pid"])
        cpu.append(None if c0 is None or c1 is None else c1 - c0)
        counts.append(n)
        first.append(t_first)
        print(f"  ray data epoch {epoch}: {n} images {times[-1]:.2f}s {n / times[-1]:.0f} img/s "
              f"(first batch {t_first:.2f}s)", file=sys.__stdout__, flush=True)
        if epoch == config["epochs"] - 1:
            try:
                stats = shard.stats()
            except Exception as e:  # noqa: BLE001 - stats are a diagnostic only
                stats = f"unavailable: {e}"
    # Train V2 keeps no metrics reported without a checkpoint in its Result: a file instead
    Path(config["out"]).write_text(json.dumps({"times": times, "counts": counts, "first": first, "cpu": cpu,
                                               "marks": marks, "skipped": loader.skipped, "stats": stats}))


def parse_ops(stats: str) -> dict:
    """{operator: {tasks, blocks, seconds}} from a Ray Data stats text (the last epoch)."""
    import re

    ops = {}
    for name, tasks, blocks, secs in re.findall(
            r"Operator \d+ (.+?): (\d+) tasks executed, (\d+) blocks produced in ([\d.]+)s", stats):
        ops[name] = {"tasks": int(tasks), "blocks": int(blocks), "seconds": float(secs)}
    return ops


def ray_side(pq_root: Path, work: Path, args, env: dict[str, str] | None = None) -> dict:
    """The Ray Data side; ``env``: variables set for this Ray instance only (its processes
    inherit them from the driver)."""
    import ray
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchTrainer

    from metaensemble.config import DataConfig
    from metaensemble.data.parquet import ray_datasets, read_meta

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    out_file = work / f"ray_side_{len(list(work.glob('ray_side_*.json')))}.json"
    t0 = time.perf_counter()
    ray.init(num_cpus=1 + args.data_cpus, logging_level=logging.WARNING, log_to_driver=True)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        t_init = time.perf_counter() - t0
        time.sleep(2)  # let start-up settle, then measure what an idle local Ray instance costs
        c0 = tree_cpu_s(os.getpid())
        time.sleep(IDLE_S)
        c1 = tree_cpu_s(os.getpid())
        idle = None if c0 is None or c1 is None else (c1 - c0) / IDLE_S
        cfg = DataConfig(name="parquet", root=str(pq_root), image_size=SIZE, augment=True, batch_size=args.batch_size,
                         shuffle_buffer=args.shuffle_buffer, data_cpus=args.data_cpus)
        datasets, info, sizes = ray_datasets(cfg, seed=0)
        assert read_meta(cfg)["format"] == "encoded"
        # as engine.trainer._fit does for data.data_cpus
        options = {"train": ExecutionOptions(resource_limits=ExecutionResources(cpu=cfg.data_cpus))}
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"info": info.to_dict(), "batch_size": args.batch_size, "epochs": args.epochs,
                               "shuffle_buffer": args.shuffle_buffer, "length": sizes["train"] // args.batch_size,
                               "out": str(out_file), "driver_pid": os.getpid()},
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="data_throughput", storage_path=str(work / "ray"),
                                           logging_config=ray.train.LoggingConfig(log_level="WARNING")),
            datasets=datasets,
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=options),
        )
        t1 = time.perf_counter()
        trainer.fit()
        fit_s = time.perf_counter() - t1
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    m = json.loads(out_file.read_text())
    out = {"env": env or {}, "train_images": sizes["train"], "shuffle_buffer": args.shuffle_buffer,
           "skipped": m["skipped"], "idle_busy_cpus": idle,
           **summarise(m["times"], m["counts"], m["first"], m["cpu"], m["marks"]), "ray_init_s": t_init, "fit_wall_s": fit_s,
           "fit_outside_epochs_s": fit_s - sum(m["times"]), "ray_data_ops_last_epoch": parse_ops(m["stats"]),
           "ray_data_stats_last_epoch": m["stats"]}
    return out


# ---- report -------------------------------------------------------------------------------
def _row(label: str, fmt: str, key: str, sides: list[dict]) -> str:
    cells = [", ".join(format(x, fmt) for x in d[key]) if isinstance(d.get(key), list)
             else (format(d[key], fmt) if key in d else "n/a") for d in sides]
    return f"| {label} | " + " | ".join(cells) + " |"


def markdown(r: dict) -> str:
    f, p, c, mach = r["imagefolder"], r["prepare"], r["per_image_cost"], r["machine"]
    rays = [r["ray_data"]] + ([r["ray_data_variant"]] if r.get("ray_data_variant") else [])
    sides = [f, *rays]
    n, e = r["data_cpus"], r["epochs"]
    head = ["ImageFolder + DataLoader", "Ray Data parquet -> Ray Train worker (the engine's path)"]
    if len(rays) > 1:
        head.append("same, " + ", ".join(f"{k}={v}" for k, v in rays[1]["env"].items()) + " (diagnostic)")
    shards = ", ".join(f"{s} {v['count']}" for s, v in p["shards"].items())
    lines = [
        f"# Data throughput: Ray Data parquet path vs ImageFolder DataLoader ({n} data CPUs)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {mach['cpu_count']} CPUs (os.cpu_count); load average (1, 5, 15 min) at the start "
        f"{mach['loadavg_start']}, before the ImageFolder side {mach['loadavg_imagefolder']}, before the Ray side "
        f"{mach['loadavg_ray']}. Python {mach['python']}, Ray {mach['ray']}, torch {mach['torch']}, "
        f"torchvision {mach['torchvision']}, PIL {mach['pil']}, pyarrow {mach['pyarrow']}.",
        "",
        f"Data: {r['folder']['train_images']} train + {r['folder']['val_images']} val generated JPEGs "
        f"({CLASSES} classes, 300-500 px a side, quality 90, mean {r['folder']['mean_kb']:.0f} KB), "
        f"ImageNet layout; the train split is {f['train_images']} images (10% of train/ held out as val, the same "
        f"on both paths). Delivered: float32 [{r['batch_size']}, 3, {SIZE}, {SIZE}] normalised batches of "
        f"RandomResizedCrop({SIZE}) + flip, on the CPU, to a loop that only counts them. {e} epochs per side; "
        f"the first is warm-up, medians are over epochs 2..{e}.",
        "",
        "| | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(head),
        _row(f"**steady-state images/s** (middle half of an epoch, median, epochs 2..{e})", ".0f",
             "steady_images_per_s", sides),
        "| **steady state, Ray / ImageFolder** | 1 | " + " | ".join(
            f"{d['steady_images_per_s'] / f['steady_images_per_s']:.2f}" for d in rays) + " |",
        _row("steady-state images/s, every epoch", ".0f", "steady_images_per_s_all", sides),
        _row("**per-epoch start-up**: first batch of an epoch, s", ".1f", "first_batch_s", sides),
        _row(f"whole-epoch images/s (start-up included, median, epochs 2..{e})", ".0f", "images_per_s", sides),
        "| whole epoch, Ray / ImageFolder | 1 | " + " | ".join(
            f"{d['images_per_s'] / f['images_per_s']:.2f}" for d in rays) + " |",
        _row("whole-epoch images/s, every epoch", ".0f", "images_per_s_all", sides),
        _row("CPU ms per delivered image (whole process tree, median)", ".1f", "cpu_ms_per_image", sides),
        _row("CPU ms per image, every epoch", ".1f", "cpu_ms_per_image_all", sides),
        _row("busy CPUs (CPU s / wall s, median)", ".2f", "busy_cpus", sides),
        _row(f"busy CPUs of the idle Ray instance ({IDLE_S:g} s after start-up)", ".2f", "idle_busy_cpus", sides),
        "| CPUs given | " + f"{n} DataLoader workers + this process | "
        + " | ".join(f"{n} Ray Data CPUs (ExecutionResources budget) + 1 training worker; ray.init(num_cpus={n + 1})"
                     for _ in rays) + " |",
        "",
        "CPU time is read from /proc for the process tree of each side: this process and its DataLoader "
        "workers; the Ray driver and everything it started (GCS, raylet, dashboard, Ray Data tasks and actors, "
        "the training worker). The other user's processes on a shared machine are not in it.",
        "",
    ]
    for d, name in zip(rays, head[1:], strict=True):
        ops = d["ray_data_ops_last_epoch"]
        op_txt = "; ".join(f"{k} {v['tasks']} task(s), {v['blocks']} block(s), {v['seconds']:.1f} s"
                           for k, v in ops.items())
        lines += [f"{name}: local shuffle buffer {d['shuffle_buffer']} rows; Ray start-up {d['ray_init_s']:.1f} s and "
                  f"{d['fit_outside_epochs_s']:.1f} s of the {d['fit_wall_s']:.1f} s TorchTrainer.fit outside the "
                  f"timed epochs (once per run). Ray Data operators in the last epoch: {op_txt}.", ""]
    lines += [
        f"Per-image CPU cost, one process, 1 torch thread, CPU time ({c['images']} images): the Ray path's "
        f"decode_images UDF {c['ray_decode_udf_ms']:.2f} ms + the training worker's normalise "
        f"{c['ray_worker_normalise_ms']:.2f} ms = {c['ray_total_ms']:.2f} ms; an ImageFolder item (open + decode + "
        f"RandomResizedCrop + flip + ToTensor + Normalize) {c['imagefolder_item_ms']:.2f} ms. The Ray path "
        "decodes training images with torchvision (libjpeg-turbo) and crops and resizes them as uint8 tensors; "
        "the ImageFolder path does the same work through PIL.",
        "",
        f"Steady state is measured over the middle half of each epoch (from the batch that passes a quarter "
        f"of its images to the one that passes three quarters): the Ray path yields no batch until the "
        f"training worker's local shuffle buffer holds {rays[0]['shuffle_buffer']} rows, then drains it at "
        f"the end, which the whole-epoch rate mixes in; the first-batch row is that per-epoch start-up. "
        + ("" if f["train_images"] >= 4 * rays[0]["shuffle_buffer"] else
           f"With {f['train_images']} images, fewer than four shuffle buffers, the middle half still "
           f"overlaps the filling and draining: run with --images 20000 for a steady-state figure."),
        "",
        "## Prepare (write_image_folder)",
        "",
        f"{p['images']} images ({', '.join(f'{k} {v}' for k, v in p['sizes'].items())}) in {p['seconds']:.1f} s: "
        f"{p['images_per_s']:.0f} images/s, {p['mb_per_s']:.0f} MB/s of source files (each file read and "
        f"PIL-verified, not decoded). shard_mb={p['shard_mb']:g}: shards {shards}; train shard sizes (MiB) "
        f"{p['shards']['train']['mb']}.",
        "",
        "| bytes | total | per image |",
        "|---|---|---|",
        f"| JPEG folder | {p['folder_bytes'] / 2**20:.1f} MiB | {p['folder_bytes'] / p['images'] / 1e3:.1f} KB |",
        f"| parquet shards (encoded) | {p['parquet_bytes'] / 2**20:.1f} MiB ({p['parquet_over_folder']:.3f}x the "
        f"folder) | {p['encoded_bytes_per_image'] / 1e3:.1f} KB |",
        f"| decoded uint8 [3, {SIZE}, {SIZE}] | {p['decoded_uint8_bytes'] / 2**20:.1f} MiB "
        f"(**{p['decoded_over_parquet']:.2f}x** the shards) | {p['decoded_bytes_per_image'] / 1e3:.1f} KB |",
        "",
        "## Reading these numbers",
        "",
        f"On a {mach['cpu_count']}-core machine, {n} data CPUs plus a consuming process (plus Ray's own "
        "processes on the Ray side) oversubscribe the cores, and this machine is shared with other work (see "
        "the load averages): both images/s figures are a floor, and what the benchmark shows is the "
        "comparison at equal CPU count, not the absolute rate. CPU ms per image is the less "
        "load-sensitive of the two measures.",
        "",
    ]
    if len(rays) > 1:
        lines += [
            "The diagnostic column runs the same path with Ray Data's default for one setting the engine "
            "changes: Ray Data 2.60's parquet listing (ListFiles, run again at the start of every epoch) starts "
            "a pool of FooterReader actors, RAY_DATA_PARQUET_FOOTER_NUM_ACTORS of them (32 by default; the "
            "engine sets 1), to read the shards' footers, and kills them when listing ends; each actor is a new "
            "Python worker process.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000, help="train JPEGs (val/ gets a tenth)")
    p.add_argument("--epochs", type=int, default=4, help="per side; the first is warm-up")
    p.add_argument("--data-cpus", type=int, default=2, help="DataLoader workers = Ray Data CPU budget")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=None, help="RayShardLoader's (default: data.shuffle_buffer's: four batches)")
    p.add_argument("--shard-mb", type=float, default=16.0,
                   help="write_image_folder's shard size (its default, 256, would make one train shard of a few "
                        "thousand images)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the generated folder and shards")
    p.add_argument("--no-variant", action="store_true",
                   help="skip the diagnostic Ray run with Ray Data's default RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=32")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first is warm-up)")
    if args.shuffle_buffer is None:
        from metaensemble.config import DataConfig

        args.shuffle_buffer = DataConfig(batch_size=args.batch_size).train_shuffle_buffer()

    import PIL
    import pyarrow
    import ray
    import torchvision

    machine = {"cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
               "python": sys.version.split()[0], "ray": ray.__version__, "torch": torch.__version__,
               "torchvision": torchvision.__version__, "pil": PIL.__version__, "pyarrow": pyarrow.__version__}
    work = Path(tempfile.mkdtemp(prefix="me-data-bench-"))
    try:
        src, pq_root = work / "folder", work / "parquet"
        print(f"generating {args.images} + {args.images // 10} JPEGs under {src}", flush=True)
        folder = make_folder(src, args.images, args.images // 10, procs=max(1, args.data_cpus))
        folder_bytes = dir_bytes(src)
        print(f"  {folder_bytes / 2**20:.1f} MiB in {folder['generate_s']:.1f}s; preparing parquet", flush=True)
        prep = prepare(src, pq_root, args.shard_mb, folder_bytes)
        print(f"  {prep['images_per_s']:.0f} img/s, {prep['mb_per_s']:.1f} MB/s, shards "
              f"{ {s: v['count'] for s, v in prep['shards'].items()} }; per-image cost", flush=True)
        cost = per_image_cost(src, pq_root)
        print(f"  {cost}\nImageFolder + DataLoader ({args.data_cpus} workers)", flush=True)
        machine["loadavg_imagefolder"] = [round(x, 2) for x in os.getloadavg()]
        folder_side = imagefolder_side(src, args)
        print(f"Ray Data parquet -> TorchTrainer (data CPUs {args.data_cpus})", flush=True)
        machine["loadavg_ray"] = [round(x, 2) for x in os.getloadavg()]
        from metaensemble.engine.trainer import RAY_DATA_ENV

        ray_res = ray_side(pq_root, work, args, env=dict(RAY_DATA_ENV))  # as the engine starts Ray
        variant = None
        if not args.no_variant:
            print("Ray Data parquet -> TorchTrainer, Ray Data's default RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=32 "
                  "(diagnostic)", flush=True)
            machine["loadavg_ray_variant"] = [round(x, 2) for x in os.getloadavg()]
            variant = ray_side(pq_root, work, args, env={"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "32"})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python " + " ".join(sys.argv),
        "images": args.images, "epochs": args.epochs, "data_cpus": args.data_cpus, "batch_size": args.batch_size,
        "image_size": SIZE, "machine": machine, "folder": folder, "prepare": prep, "per_image_cost": cost,
        "imagefolder": folder_side, "ray_data": ray_res, "ray_data_variant": variant,
        "ratio": ray_res["images_per_s"] / folder_side["images_per_s"],
        "steady_ratio": ray_res["steady_images_per_s"] / folder_side["steady_images_per_s"],
        "ratio_variant": variant["images_per_s"] / folder_side["images_per_s"] if variant else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_throughput.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (args.out / "data_throughput.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
