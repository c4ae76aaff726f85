"""Parquet shards: the format a cluster streams through Ray Data into training workers.

Layout written by ``jobs/prepare_data.py``::

    ROOT/meta.json                 format, DatasetInfo, split sizes, dataset id, source
    ROOT/{train,val,test}/part-00000.parquet ...

Two row formats, named by ``meta.json``'s ``format``:

- ``encoded`` (image folders, ImageNet): ``image`` is the source file's bytes (JPEG,
  PNG...), as they were on disk. Shards are bounded in bytes, written one row group at a
  time (``write_image_folder`` never holds the set in memory), and train rows are in a
  seeded random order, so every shard mixes the classes. Ray Data decodes and augments on
  its own CPU workers (RandomResizedCrop + flip for training; resize to size/0.875 and
  centre crop for evaluation: the ImageFolder path's transforms) and streams fixed-size
  uint8 batches to the training workers.
- ``uint8-chw`` (in-memory datasets: digits, synthetic, CIFAR): ``image`` is the uint8
  [C, H, W] pixels; the training loop applies the family's batch augmentation.

Every row also has ``label`` (int64) and ``index`` (int64, the position in the source
split, the same as the in-memory and ImageFolder paths). Every shard carries the dataset
id of its ``meta.json`` in its parquet metadata: a shard from another dataset is refused
by name before any work starts.

Training reads the train split with a real shuffle: the shard files in a new seeded order
every epoch (Ray Data's file shuffle, the block order of a parquet read), then a local
buffer of ``data.shuffle_buffer`` rows (four batches by default) in each training worker.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from metaensemble.config import DataConfig, resolve_path
from metaensemble.data.core import ArraySplit, DatasetInfo, DataSplits, split_indices
from metaensemble.errors import DataError

SPLITS = ("train", "val", "test")
FORMATS = ("encoded", "uint8-chw")
ID_KEY = b"metaensemble.dataset_id"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])
EVAL_RESIZE = 0.875  # eval: resize the short side to size / 0.875, then centre-crop ``size``


# ---- writing ------------------------------------------------------------------------------
class _ShardWriter:
    """Rows of one split into part-NNNNN.parquet files, a new file once the current one
    holds ``shard_bytes`` of image data; rows are written in row groups of ``group_rows``."""

    def __init__(self, folder: Path, dataset_id: str, shard_bytes: int, group_rows: int) -> None:
        self.folder, self.shard_bytes, self.group_rows = folder, shard_bytes, group_rows
        self.schema = SCHEMA.with_metadata({ID_KEY: dataset_id.encode()})
        self.folder.mkdir(parents=True)
        self.writer: pq.ParquetWriter | None = None
        self.shards = 0
        self.rows = 0
        self._bytes = 0
        self._pending: list[tuple[bytes, int, int]] = []

    def add(self, image: bytes, label: int, index: int) -> None:
        self._pending.append((image, label, index))
        self._bytes += len(image)
        self.rows += 1
        if len(self._pending) >= self.group_rows or self._bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.folder / f"part-{self.shards:05d}.parquet", self.schema)
            self.shards += 1
        images, labels, index = zip(*self._pending, strict=True)
        self.writer.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64()),
                                          "index": pa.array(index, pa.int64())}, schema=self.schema))
        self._pending.clear()
        if self._bytes >= self.shard_bytes:
            self.writer.close()
            self.writer, self._bytes = None, 0

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _fresh(root: Path) -> Path:
    """The temporary folder a dataset is written into (renamed to ``root`` when whole)."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} already exists and is not empty; choose a new folder")
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _finish(tmp: Path, root: Path, meta: dict[str, Any]) -> Path:
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()
    tmp.rename(root)
    return root


def write_parquet(splits: DataSplits, root: str | Path, rows_per_shard: int = 50_000) -> Path:
    """Write in-memory ``splits`` as ``uint8-chw`` shards under ``root`` (atomically: a
    temp folder is renamed into place only once complete)."""
    root = Path(root)
    for name in SPLITS:
        if not isinstance(getattr(splits, name), ArraySplit):
            raise DataError("write_parquet needs an in-memory dataset (digits, synthetic, cifar10, cifar100); "
                            "image folders go through write_image_folder")
    tmp = _fresh(root)
    dataset_id = uuid.uuid4().hex
    try:
        counts = {}
        for name in SPLITS:
            split: ArraySplit = getattr(splits, name)
            row_bytes = int(np.prod(split.images.shape[1:]))
            w = _ShardWriter(tmp / name, dataset_id, shard_bytes=rows_per_shard * row_bytes,
                             group_rows=min(rows_per_shard, 4096))
            images = split.images.numpy().reshape(len(split), -1)
            for img, y, i in zip(images, split.labels.tolist(), split.index.tolist(), strict=True):
                w.add(img.tobytes(), y, i)
            w.close()
            counts[name] = w.rows
        meta = {"format": "uint8-chw", "dataset_id": dataset_id, "info": splits.info.to_dict(), "sizes": counts}
        return _finish(tmp, root, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def image_folder_layout(root: str | Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(classes, train samples, val samples) of an ImageNet-layout folder
    ``root/{train,val}/<class>/<image>``, listed (not opened) in torchvision's
    ImageFolder order; one clear error when the layout is not there."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    layout = f"{root}/train/<class>/<image> and {root}/val/<class>/<image> ({', '.join(IMG_EXTENSIONS)})"
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected the ImageNet layout {layout}")
    found = {}
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DataError(f"{root / sub} not found; expected the ImageNet layout {layout}")
        try:
            classes, to_idx = find_classes(str(root / sub))
            found[sub] = (classes, make_dataset(str(root / sub), to_idx, extensions=IMG_EXTENSIONS))
        except FileNotFoundError as e:
            raise DataError(f"{root / sub}: {e}; expected the ImageNet layout {layout}") from None
    if found["train"][0] != found["val"][0]:
        only = sorted(set(found["train"][0]) ^ set(found["val"][0]))
        raise DataError(f"{root}: train/ and val/ have different class folders (in one only: {', '.join(only[:5])}"
                        f"{'...' if len(only) > 5 else ''})")
    return found["train"][0], found["train"][1], found["val"][1]


def _readable(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any failure to parse is a corrupt image
        return False


def write_image_folder(src: str | Path, root: str | Path, *, image_size: int = 224, val_fraction: float = 0.1,
                       split_seed: int = 0, shard_mb: float = 256.0, group_rows: int = 512,
                       progress: bool = True) -> Path:
    """Stream an ImageNet-layout folder into ``encoded`` shards under ``root``.

    The splits are the ImageFolder path's (``data.name=imagefolder``): val is held out from
    train/ with ``split_seed`` (``val_fraction``), test is val/; ``index`` is the position
    in ImageFolder's listing. Files are read one at a time and written one row group at a
    time. A file that cannot be read, or is not a readable image, is skipped and listed in
    meta.json."""
    from tqdm import tqdm

    src = Path(src)
    classes, train, val = image_folder_layout(src)
    if shard_mb <= 0:
        raise DataError(f"shard_mb must be positive; got {shard_mb}")
    root = Path(root)
    tmp = _fresh(root)
    dataset_id = uuid.uuid4().hex
    tr, va, _ = split_indices(len(train), val_fraction, None, split_seed)
    order = {
        "train": np.random.default_rng([split_seed, 13]).permutation(tr),  # class-mixed shards
        "val": va,
        "test": np.arange(len(val)),
    }
    sources = {"train": train, "val": train, "test": val}
    skipped: list[str] = []
    counts: dict[str, int] = {}
    bar = tqdm(total=sum(len(o) for o in order.values()), unit="img", desc="prepare", disable=not progress,
               file=sys.stderr, mininterval=1.0)
    try:
        for name in SPLITS:
            w = _ShardWriter(tmp / name, dataset_id, shard_bytes=int(shard_mb * 2**20), group_rows=group_rows)
            for i in order[name].tolist():
                path, label = sources[name][i]
                try:
                    data = Path(path).read_bytes()
                except OSError:  # permissions, a flaky network mount: skipped and listed, like bad bytes
                    data = b""
                if data and _readable(data):
                    w.add(data, label, i)
                else:
                    skipped.append(str(Path(path).relative_to(src)))
                bar.update(1)
            w.close()
            counts[name] = w.rows
        bar.close()
        if any(counts[s] == 0 for s in SPLITS):
            raise DataError(f"{src}: no readable image in split(s) {[s for s in SPLITS if counts[s] == 0]}")
        from metaensemble.data.sources import IMAGENET_MEAN, IMAGENET_STD

        info = DatasetInfo("imagefolder", "imagenet", len(classes), 3, image_size, IMAGENET_MEAN, IMAGENET_STD)
        meta = {"format": "encoded", "dataset_id": dataset_id, "info": info.to_dict(), "sizes": counts,
                "classes": classes, "source": str(src.resolve()), "split_seed": split_seed,
                "val_fraction": val_fraction, "skipped": skipped}
        return _finish(tmp, root, meta)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reading ------------------------------------------------------------------------------
def filesystem(root: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of ``data.root``: a local folder (relative to the
    repository root), or a URI of any filesystem pyarrow has (``s3://bucket/prefix``,
    ``gs://``, ``hdfs://``, ``file://``), with its credentials from the environment as
    pyarrow reads them. Ray Data reads the shards through the same filesystem."""
    from pyarrow import fs

    if "://" not in root:
        return fs.LocalFileSystem(), str(resolve_path(root))
    try:
        filesystem_, path = fs.FileSystem.from_uri(root)
        return filesystem_, path.rstrip("/")
    except (pa.ArrowException, ValueError, OSError) as e:
        raise DataError(f"parquet: data.root={root} is not a filesystem pyarrow can open ({e}); use a local "
                        f"folder or a URI such as s3://bucket/prefix") from None


def _listing(filesystem, folder: str) -> list[str]:
    """The parquet files directly in ``folder``, sorted; [] when it does not exist."""
    from pyarrow import fs

    infos = filesystem.get_file_info(fs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == fs.FileType.File and i.path.endswith(".parquet"))


def read_meta(cfg: DataConfig) -> dict[str, Any]:
    """meta.json of ``cfg.root``, checked against every shard (schema and dataset id), with
    ``info`` a DatasetInfo (its img_size set to ``data.image_size`` for encoded shards)."""
    from pyarrow import fs

    if cfg.root is None:
        raise DataError("parquet needs data.root: a folder written by jobs/prepare_data.py")
    filesystem_, root = filesystem(cfg.root)
    meta_path = f"{root}/meta.json"
    try:
        found = filesystem_.get_file_info(meta_path).type == fs.FileType.File
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"parquet: cannot read {cfg.root}: {e}") from None
    if not found:
        raise DataError(
            f"parquet: {meta_path} not found; data.root must be a folder written by "
            f"jobs/prepare_data.py (meta.json + train/ val/ test/ shards)"
        )
    try:
        with filesystem_.open_input_stream(meta_path) as f:
            meta = json.loads(f.read().decode())
        meta["info"] = DatasetInfo.from_dict(meta["info"])
        fmt, dataset_id = meta["format"], meta["dataset_id"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"parquet: {meta_path} is malformed ({type(e).__name__}: {e}); write the folder again "
                        f"with jobs/prepare_data.py") from None
    if fmt not in FORMATS:
        raise DataError(f"parquet: {meta_path} has format {fmt!r}; this version reads {', '.join(FORMATS)}")
    shards = {s: _listing(filesystem_, f"{root}/{s}") for s in SPLITS}
    for s in SPLITS:
        if not shards[s]:
            raise DataError(f"parquet: no shards in {root}/{s}")
        for f in shards[s]:
            try:
                schema = pq.read_schema(f, filesystem=filesystem_)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"parquet: {f} is not a readable parquet file: {e}") from None
            got = (schema.metadata or {}).get(ID_KEY, b"").decode() or None
            if got != dataset_id:
                raise DataError(
                    f"parquet: {f} belongs to another dataset (its dataset id is {got}, {meta_path} says "
                    f"{dataset_id}); a shard folder holds the shards of one jobs/prepare_data.py run only")
            if not schema.remove_metadata().equals(SCHEMA):
                raise DataError(f"parquet: {f} has columns {schema.names}; expected image, label, index")
    if cfg.transform != "standard" and fmt != "encoded":
        raise DataError(f"data.transform={cfg.transform!r} augments images decoded from files; {root} holds {fmt} "
                        f"arrays (written from data.name={meta['info'].name}), augmented as arrays: use "
                        f"data.transform=standard")
    meta["shards"], meta["filesystem"] = shards, filesystem_
    if fmt == "encoded" and cfg.image_size and cfg.image_size != meta["info"].img_size:
        meta["info"] = DatasetInfo.from_dict({**meta["info"].to_dict(), "img_size": cfg.image_size})
    meta["root"] = root
    return meta


def _image_transform(size: int, train: bool, auto_augment: str | None = None):
    """PIL image -> uint8 [3, size, size]: evaluation's resize + centre crop; for training
    RandomResizedCrop + flip (the PIL twin of ``_tensor_train_transform``, for images
    torchvision does not decode), or with ``auto_augment`` the DeiT recipe's PIL stages
    (timm's bicubic RandomResizedCrop, flip, RandAugment), whose random erasing works on
    normalised pixels, so the training worker applies it to the batch
    (``data.RayShardLoader``'s ``erase``)."""
    from torchvision import transforms

    if train and auto_augment:
        from timm.data import create_transform

        crop_flip, rand_augment, _ = create_transform(size, is_training=True, auto_augment=auto_augment,
                                                      interpolation="bicubic", separate=True)
        return transforms.Compose([*crop_flip.transforms, *rand_augment.transforms, transforms.PILToTensor()])
    if train:
        return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.PILToTensor()])
    return transforms.Compose([transforms.Resize(int(size / EVAL_RESIZE)), transforms.CenterCrop(size),
                               transforms.PILToTensor()])


def _tensor_train_transform(size: int):
    """The standard training augmentation on a decoded uint8 [3, H, W] tensor:
    RandomResizedCrop (antialiased bilinear, as PIL's) + horizontal flip."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def decode_images(batch: dict[str, np.ndarray], size: int, train: bool,
                  auto_augment: str | None = None) -> dict[str, np.ndarray]:
    """Ray Data UDF: encoded image bytes -> uint8 [3, size, size] (augmented for training;
    ``auto_augment``: the DeiT recipe's, see ``_image_transform``).

    Standard training images are decoded by torchvision (libjpeg-turbo, libpng) and
    cropped and resized as uint8 tensors: 1.3-1.4 ms of CPU per ImageNet-sized JPEG
    against 2.4 ms through PIL (docs/cluster.md); an image torchvision cannot decode into
    8-bit RGB (BMP, TIFF, 16-bit PNG) goes through PIL instead. Evaluation images go
    through PIL, pixel for pixel the ImageFolder path's; the DeiT recipe's RandAugment is
    timm's PIL transform.

    A row whose bytes do not decode keeps its place with ``ok`` False and a black image:
    the training worker drops it and counts it (``data_skipped`` in the run's metrics), so
    a corrupt image never kills a data worker or the run."""
    n = len(batch["label"])
    out = np.zeros((n, 3, size, size), np.uint8)
    ok = np.ones(n, bool)
    from PIL import Image

    pil_tf = _image_transform(size, train, auto_augment)
    tensor_tf = _tensor_train_transform(size) if train and not auto_augment else None
    for k, data in enumerate(batch["image"]):
        if tensor_tf is not None and (img := _decode_uint8(data)) is not None:
            out[k] = tensor_tf(img).numpy()
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                out[k] = pil_tf(im.convert("RGB")).numpy()
        except Exception:  # noqa: BLE001 - any decoding failure is one corrupt image
            ok[k] = False
    return {"image": out, "label": batch["label"], "index": batch["index"], "ok": ok}


def _decode_uint8(data: bytes) -> torch.Tensor | None:
    """torchvision's decode of ``data`` as uint8 RGB [3, H, W]; None where it cannot
    (another format, a bit depth above 8, corrupt bytes): PIL then decodes or refuses it."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - PIL has the last word
        return None
    return img if img.dtype == torch.uint8 and img.shape[0] == 3 else None


def _unpack(batch: dict[str, np.ndarray], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    n, size = len(batch["label"]), int(np.prod(shape))
    raw = b"".join(bytes(b) for b in batch["image"])
    if len(raw) != n * size:
        raise DataError(f"parquet: uint8-chw rows are not {shape} images ({len(raw)} bytes for {n} rows)")
    images = np.frombuffer(raw, dtype=np.uint8).reshape((n, *shape))
    return {"image": images, "label": batch["label"], "index": batch["index"], "ok": np.ones(n, bool)}


def ray_datasets(cfg: DataConfig, seed: int = 0, first_epoch: int = 0,
                 splits: tuple[str, ...] = SPLITS) -> tuple[dict[str, Any], DatasetInfo, dict[str, int]]:
    """Lazy Ray Data datasets for each of ``splits``, yielding ``image`` uint8 [C, H, W],
    ``label``, ``index``, ``ok``. Train reads its shard files in a new order each epoch
    (seeded by ``seed`` and the epoch; the first read is epoch ``first_epoch``'s)."""
    import ray.data

    from metaensemble.data.shuffle import EpochFileShuffle

    meta = read_meta(cfg)
    info: DatasetInfo = meta["info"]
    out = {}
    for s in splits:
        shuffle = EpochFileShuffle(seed=seed, first_epoch=first_epoch) if s == "train" else None
        context = ray.data.DataContext.get_current()
        saved = context.target_max_block_size
        if meta["format"] == "encoded":
            # Blocks of one shard file: Ray Data 2.60 merges files into read tasks of up to
            # target_max_block_size (128 MiB), and emits decoded blocks of that size, so a
            # 2,700-image epoch was 2 read tasks and its first batch waited for 670 decoded
            # images. A block of one shard's bytes (16 MiB shards: ~100 decoded images) is
            # a read task per file; never above Ray's own size (prepare_data's default
            # shards are 256 MiB). The dataset keeps the setting (its own context copy).
            context.target_max_block_size = min(_largest_file(meta["filesystem"], meta["shards"][s]),
                                                saved or _RAY_BLOCK_BYTES)
        try:
            ds = ray.data.read_parquet(meta["shards"][s], filesystem=meta["filesystem"], shuffle=shuffle,
                                       override_num_blocks=len(meta["shards"][s]))
        finally:
            context.target_max_block_size = saved
        if meta["format"] == "encoded":
            train = s == "train" and cfg.augment
            deit = cfg.auto_augment if train and cfg.transform == "deit" else None
            out[s] = ds.map_batches(decode_images, fn_kwargs={"size": info.img_size, "train": train,
                                                              "auto_augment": deit},
                                    batch_size=64, batch_format="numpy")
        else:
            shape = (info.in_chans, info.img_size, info.img_size)
            out[s] = ds.map_batches(_unpack, fn_kwargs={"shape": shape}, batch_format="numpy")
    return out, info, meta["sizes"]


_RAY_BLOCK_BYTES = 128 * 2**20  # Ray Data's default target_max_block_size


def _largest_file(filesystem_, paths: list[str]) -> int:
    return max(i.size for i in filesystem_.get_file_info(paths))


def iter_rows(files: list[str], columns: list[str] | None = None,
              filesystem_=None) -> Iterator[dict[str, np.ndarray]]:
    """Row groups of ``files`` as numpy columns, one at a time (pyarrow, no Ray)."""
    for f in files:
        pf = pq.ParquetFile(f, filesystem=filesystem_)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=columns)
            yield {k: t.column(k).to_numpy(zero_copy_only=False) for k in t.column_names}


def load_parquet_arrays(cfg: DataConfig) -> DataSplits:
    """Read the shards into memory (pyarrow, no Ray) - for small data and tests. Encoded
    images are decoded with the evaluation transform (resize + centre crop); corrupt ones
    are an error here (the in-memory path has no place to count them)."""
    meta = read_meta(cfg)
    info: DatasetInfo = meta["info"]
    shape = (info.in_chans, info.img_size, info.img_size)
    encoded = meta["format"] == "encoded"
    parts = {}
    for s in SPLITS:
        chunks = []
        for batch in iter_rows(meta["shards"][s], filesystem_=meta["filesystem"]):
            d = decode_images(batch, info.img_size, False) if encoded else _unpack(batch, shape)
            if not d["ok"].all():
                raise DataError(f"parquet: {int((~d['ok']).sum())} image(s) in {meta['root']}/{s} do not decode "
                                f"(indices {d['index'][~d['ok']][:5].tolist()})")
            chunks.append(d)
        parts[s] = ArraySplit(*(torch.from_numpy(np.concatenate([c[k] for c in chunks]).copy())
                                for k in ("image", "label", "index")))
    return DataSplits(info, parts["train"], parts["val"], parts["test"])
