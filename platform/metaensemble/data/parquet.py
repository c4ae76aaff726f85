"""Parquet shards: the format a cluster streams through Ray Data into training workers.

Layout written by ``jobs/prepare_data.py``::

    ROOT/meta.json                 DatasetInfo + split sizes + source
    ROOT/{train,val,test}/part-00000.parquet ...

Each row: ``image`` (binary: the uint8 [C, H, W] pixels, C-order), ``label`` (int64),
``index`` (int64, position in the source split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from metaensemble.config import DataConfig, resolve_path
from metaensemble.data.core import ArraySplit, DatasetInfo, DataSplits
from metaensemble.errors import DataError

SPLITS = ("train", "val", "test")


def _chunks(split, rows: int):
    """(images uint8 [b,C,H,W], labels, index) chunks of at most ``rows`` examples."""
    if not isinstance(split, ArraySplit):
        raise DataError("parquet export needs an in-memory dataset (digits, synthetic, cifar10, cifar100)")
    for s in range(0, len(split), rows):
        yield (split.images[s : s + rows].numpy(), split.labels[s : s + rows].numpy(),
               split.index[s : s + rows].numpy())


def write_parquet(splits: DataSplits, root: str | Path, rows_per_shard: int = 50_000) -> Path:
    """Write ``splits`` as parquet shards under ``root`` (atomically: a temp folder is
    renamed into place only once complete)."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} already exists and is not empty; choose a new folder")
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    counts = {}
    for name in SPLITS:
        (tmp / name).mkdir(parents=True)
        rows = 0
        for shard_id, (images, labels, index) in enumerate(_chunks(getattr(splits, name), rows_per_shard)):
            table = pa.table({
                "image": pa.array([r.tobytes() for r in images.reshape(len(images), -1)], type=pa.binary()),
                "label": pa.array(labels, type=pa.int64()),
                "index": pa.array(index, type=pa.int64()),
            })
            pq.write_table(table, tmp / name / f"part-{shard_id:05d}.parquet")
            rows += len(labels)
        counts[name] = rows
    meta = {"info": splits.info.to_dict(), "sizes": counts, "format": "uint8-chw"}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()
    tmp.rename(root)
    return root


def read_meta(cfg: DataConfig) -> dict[str, Any]:
    if cfg.root is None:
        raise DataError("parquet needs data.root: a folder written by jobs/prepare_data.py")
    root = resolve_path(cfg.root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"parquet: {meta_path} not found; data.root must be a folder written by "
            f"jobs/prepare_data.py (meta.json + train/ val/ test/ shards)"
        )
    try:
        meta = json.loads(meta_path.read_text())
        meta["info"] = DatasetInfo.from_dict(meta["info"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"parquet: {meta_path} is malformed: {e}") from None
    for s in SPLITS:
        if not list((root / s).glob("*.parquet")):
            raise DataError(f"parquet: no shards in {root / s}")
    meta["root"] = root
    return meta


def _decode(batch: dict[str, np.ndarray], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    raw = b"".join(bytes(b) for b in batch["image"])
    images = np.frombuffer(raw, dtype=np.uint8).reshape((len(batch["label"]), *shape))
    return {"image": images, "label": batch["label"], "index": batch["index"]}


def ray_datasets(cfg: DataConfig) -> tuple[dict[str, Any], DatasetInfo, dict[str, int]]:
    """Ray Data datasets for each split, decoded to uint8 image tensors (lazy)."""
    import ray.data

    meta = read_meta(cfg)
    info: DatasetInfo = meta["info"]
    shape = (info.in_chans, info.img_size, info.img_size)
    out = {}
    for s in SPLITS:
        ds = ray.data.read_parquet(str(meta["root"] / s))
        out[s] = ds.map_batches(_decode, fn_kwargs={"shape": shape}, batch_format="numpy")
    return out, info, meta["sizes"]


def load_parquet_arrays(cfg: DataConfig) -> DataSplits:
    """Read the shards into memory (pyarrow, no Ray) - for small data and tests."""
    meta = read_meta(cfg)
    info: DatasetInfo = meta["info"]
    shape = (info.in_chans, info.img_size, info.img_size)
    parts = {}
    for s in SPLITS:
        t = pq.read_table(meta["root"] / s)
        d = _decode({k: t.column(k).to_numpy(zero_copy_only=False) for k in ("image", "label", "index")}, shape)
        parts[s] = ArraySplit(*(torch.from_numpy(d[k].copy()) for k in ("image", "label", "index")))
    return DataSplits(info, parts["train"], parts["val"], parts["test"])
