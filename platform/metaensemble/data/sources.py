"""Dataset sources: digits, synthetic, CIFAR-10/100 (python format), ImageFolder.

Nothing here downloads: every loader reads local files (or scikit-learn's bundled
digits), and a missing root is one clear error naming the expected layout.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metaensemble.config import DataConfig, resolve_path
from metaensemble.data.core import ArraySplit, DatasetInfo, DataSplits, channel_stats, split_indices
from metaensemble.errors import DataError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _array_splits(name, family, num_classes, images, labels, cfg: DataConfig, mean=None, std=None):
    tr, va, te = split_indices(len(labels), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    full = ArraySplit(images, labels)
    train = full.subset(tr)
    if mean is None:
        mean, std = channel_stats(train.images)
    info = DatasetInfo(name, family, num_classes, images.shape[1], images.shape[2], mean, std)
    return DataSplits(info, train, full.subset(va), full.subset(te))


# ---------------------------------------------------------------------------------------
def _digits_rows() -> np.ndarray:
    """scikit-learn's bundled digits as ``sklearn.datasets.load_digits`` reads them (one
    row per image: 64 pixels, then the label), from its file found without importing
    scikit-learn: the import (SciPy and the rest) costs about 1 s of CPU in every process
    that loads the digits, and every Ray Train worker of a digits run does. A release that
    moved the file is read through scikit-learn itself."""
    from importlib.util import find_spec

    spec = find_spec("sklearn")
    if spec is None:
        raise DataError("dataset 'digits' is scikit-learn's bundled copy, and scikit-learn is not installed here "
                        "(pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return np.concatenate([d.data, d.target[:, None]], axis=1)


def load_digits(cfg: DataConfig) -> DataSplits:
    """scikit-learn's 1797 bundled 8x8 handwritten digits (values 0..16), no download."""
    rows = _digits_rows()
    images = torch.from_numpy(np.rint(rows[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(rows[:, -1].astype(np.int64))
    return _array_splits("digits", "digits", 10, images, labels, cfg)


def load_synthetic(cfg: DataConfig) -> DataSplits:
    """Procedural class-conditional images of any size and class count.

    Each class has a smooth random prototype; an example is its prototype, randomly
    shifted, scaled in contrast and with pixel noise, so the task is learnable but not
    trivial. Deterministic in ``split_seed``.
    """
    size = cfg.image_size or 32
    g = torch.Generator().manual_seed(10_000 + cfg.split_seed)
    protos = torch.rand(cfg.num_classes, cfg.channels, 6, 6, generator=g)
    protos = F.interpolate(protos, size=(size, size), mode="bicubic", align_corners=False)
    labels = torch.arange(cfg.num_samples) % cfg.num_classes
    labels = labels[torch.randperm(cfg.num_samples, generator=g)]
    x = protos[labels]
    shifts = torch.randint(-size // 8, size // 8 + 1, (cfg.num_samples, 2), generator=g)
    x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts, strict=True)])
    contrast = 0.6 + 0.8 * torch.rand(cfg.num_samples, 1, 1, 1, generator=g)
    x = (x - 0.5) * contrast + 0.5 + 0.25 * torch.randn(x.shape, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return _array_splits("synthetic", "synthetic", cfg.num_classes, images, labels.long(), cfg)


# ---------------------------------------------------------------------------------------
class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python format (dicts, lists, bytes, numpy arrays) and
    refuses any other global, so a tampered file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR file refers to {module}.{name}, which is not allowed")


def _read_cifar_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any decoding failure is a corrupt file
        raise DataError(f"{path} is not a readable CIFAR python-format file: {e}") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def cifar_dir(name: str, cfg: DataConfig) -> Path:
    sub, train_files, test_files, _, _ = CIFAR_LAYOUT[name]
    if cfg.root is None:
        raise DataError(f"{name} needs data.root: a folder holding {sub}/ (the python version)")
    root = resolve_path(cfg.root)
    d = root / sub if (root / sub).is_dir() else root
    missing = [f for f in train_files + test_files if not (d / f).is_file()]
    if missing:
        raise DataError(
            f"{name}: {root} does not hold the python-format files; expected "
            f"{root}/{sub}/{{{', '.join(train_files + test_files)}}}, missing {', '.join(missing)}"
        )
    return d


def load_cifar(name: str, cfg: DataConfig) -> DataSplits:
    """CIFAR in the standard python-pickle layout. Val is the last ``val_fraction`` of
    the official train split (45k/5k for the paper recipe); test is the official test."""
    sub, train_files, test_files, label_key, num_classes = CIFAR_LAYOUT[name]
    d = cifar_dir(name, cfg)

    def read(files):
        xs, ys = [], []
        for f in files:
            blob = _read_cifar_file(d / f)
            if "data" not in blob or label_key not in blob:
                raise DataError(f"{d / f} lacks 'data' or '{label_key}'")
            xs.append(np.asarray(blob["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(blob[label_key], dtype=np.int64))
        return ArraySplit(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    train_full, test = read(train_files), read(test_files)
    n_val = max(1, int(round(len(train_full) * cfg.val_fraction)))
    n_tr = len(train_full) - n_val
    info = DatasetInfo(name, "cifar", num_classes, 3, 32, CIFAR_MEAN, CIFAR_STD)
    return DataSplits(
        info, train_full.subset(np.arange(n_tr)), train_full.subset(np.arange(n_tr, len(train_full))), test
    )


# ---------------------------------------------------------------------------------------
def imagefolder_dir(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise DataError("imagefolder needs data.root: a folder with train/<class>/*.jpg and val/<class>/*.jpg")
    root = resolve_path(cfg.root)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DataError(
                f"imagefolder: {root / sub} not found; expected the ImageNet layout "
                f"{root}/train/<class>/* and {root}/val/<class>/*"
            )
    return root


class _IndexedSubset(torch.utils.data.Dataset):
    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        x, y = self.base[self.indices[i]]
        return x, y, self.indices[i]


def load_imagefolder(cfg: DataConfig) -> DataSplits:
    """ImageNet layout. Val is held out from train/ with ``split_seed``; test is val/."""
    from torchvision import datasets, transforms

    root = imagefolder_dir(cfg)
    size = cfg.image_size or 224
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]
        if cfg.augment
        else [transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size), transforms.ToTensor(), norm]
    )
    if cfg.augment and cfg.transform == "deit":
        from timm.data import create_transform

        train_tf = create_transform(size, is_training=True, auto_augment=cfg.auto_augment, re_prob=cfg.re_prob,
                                    re_mode="pixel", re_count=1, interpolation="bicubic", mean=IMAGENET_MEAN,
                                    std=IMAGENET_STD)
    eval_tf = transforms.Compose(
        [transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size), transforms.ToTensor(), norm]
    )
    train_aug = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    train_eval = datasets.ImageFolder(str(root / "train"), transform=eval_tf)
    test = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    if train_aug.classes != test.classes:
        raise DataError(f"imagefolder: train/ and val/ class folders differ under {root}")
    tr, va, _ = split_indices(len(train_aug), cfg.val_fraction, None, cfg.split_seed)
    info = DatasetInfo("imagefolder", "imagenet", len(train_aug.classes), 3, size, IMAGENET_MEAN, IMAGENET_STD)
    return DataSplits(
        info,
        _IndexedSubset(train_aug, tr),
        _IndexedSubset(train_eval, va),
        _IndexedSubset(test, range(len(test))),
    )
