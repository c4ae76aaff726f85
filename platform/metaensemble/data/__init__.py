"""Dataset registry.

``load(cfg)`` returns in-memory/map-style splits; ``check(cfg)`` validates the name and
the files (cheaply) before any work starts; ``is_streaming(cfg)`` says whether the
engine should stream the train split through Ray Data (parquet).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from metaensemble.data.core import ArraySplit, DatasetInfo, DataSplits, split_indices
from metaensemble.data.loaders import (
    ArrayLoader,
    DatasetLoader,
    RayShardLoader,
    augment_batch,
    normalise,
)
from metaensemble.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable
    check: Callable
    streaming: bool = False
    reads_root: bool = True
    """False for the built-in datasets (digits, synthetic): they read no files."""


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _register():
    from metaensemble.data import parquet, sources

    DATASETS.add("digits", DatasetSpec(sources.load_digits, lambda cfg: None, reads_root=False))
    DATASETS.add("synthetic", DatasetSpec(sources.load_synthetic, lambda cfg: None, reads_root=False))
    for name in ("cifar10", "cifar100"):
        DATASETS.add(
            name,
            DatasetSpec(
                lambda cfg, n=name: sources.load_cifar(n, cfg), lambda cfg, n=name: sources.cifar_dir(n, cfg)
            ),
        )
    DATASETS.add("imagefolder", DatasetSpec(sources.load_imagefolder, sources.imagefolder_dir))
    DATASETS.add("parquet", DatasetSpec(parquet.load_parquet_arrays, parquet.read_meta, streaming=True))


_register()


def check_name(name: str) -> None:
    DATASETS.check(name)


def check_keys(cfg) -> None:
    """Refuse a key the dataset ``cfg.name`` does not read (a DataConfig): it would change
    the run identity, and so retrain, without changing the data."""
    if cfg.root is not None and not DATASETS.get(cfg.name).reads_root:
        from metaensemble.errors import ConfigError

        readers = ", ".join(n for n in DATASETS.names() if DATASETS.get(n).reads_root)
        raise ConfigError(f"data.root={cfg.root}: dataset {cfg.name!r} is built in and reads no files; leave "
                          f"data.root unset (datasets that read it: {readers})")


def check(cfg) -> None:
    """Raise DataError/ConfigError if ``cfg`` (a DataConfig) cannot be loaded."""
    spec = DATASETS.get(cfg.name)
    if spec.streaming and cfg.train_fraction < 1.0:
        from metaensemble.errors import ConfigError

        raise ConfigError(f"data.train_fraction={cfg.train_fraction} is not supported for the streaming "
                          f"dataset {cfg.name!r}; write the subset you want with jobs/prepare_data.py")
    if spec.streaming and cfg.label_split is not None:
        from metaensemble.errors import ConfigError

        raise ConfigError(f"data.label_split is not supported for the streaming dataset {cfg.name!r}; write each "
                          f"part with jobs/prepare_data.py")
    if cfg.transform != "standard" and cfg.name not in ("imagefolder", "parquet"):
        from metaensemble.errors import ConfigError

        raise ConfigError(f"data.transform={cfg.transform!r} applies to images read from files (data.name="
                          f"imagefolder, or parquet shards of encoded images); {cfg.name!r} augments its arrays "
                          f"itself: use data.transform=standard")
    if cfg.repeated_aug > 1 and cfg.name != "imagefolder":
        from metaensemble.errors import ConfigError

        raise ConfigError(f"data.repeated_aug={cfg.repeated_aug} applies to images read from files (data.name="
                          f"imagefolder), whose sampler it replaces; {cfg.name!r} has its own: use data.repeated_aug=1")
    if cfg.cutout and cfg.name == "imagefolder":
        from metaensemble.errors import ConfigError

        raise ConfigError(f"data.cutout={cfg.cutout} applies to array and parquet datasets; for imagefolder use "
                          f"data.transform=deit, whose random erasing (data.re_prob) plays its part")
    spec.check(cfg)


def load(cfg) -> DataSplits:
    splits = DATASETS.get(cfg.name).load(cfg)
    if cfg.train_fraction < 1.0:
        seed = cfg.split_seed if cfg.subset_seed is None else cfg.subset_seed
        splits.train = train_subset(splits.train, cfg.train_fraction, seed)
    if cfg.label_split is not None:
        splits.train = label_part(splits.train, cfg.label_split, splits.info.num_classes)
    return splits


def _labels(split):
    import torch

    if isinstance(split, ArraySplit):
        return split.labels
    return torch.as_tensor([int(split[i][1]) for i in range(len(split))])


def label_part(split, ls, num_classes: int):
    """Part ``ls.part`` of ``split`` under the label split ``ls`` (a ``LabelSplit``):
    part a is every example of ``ls.special`` plus ``ls.fraction`` of each other label's
    examples (chosen by ``ls.seed``), part b the remaining examples of the other labels."""
    import numpy as np

    from metaensemble.errors import ConfigError

    if ls.special >= num_classes:
        raise ConfigError(f"data.label_split.special={ls.special}, but the dataset has labels 0..{num_classes - 1}")
    y = _labels(split).numpy()
    rng = np.random.default_rng([ls.seed, 11])
    in_a = y == ls.special
    for c in range(num_classes):
        if c == ls.special:
            continue
        idx = np.flatnonzero(y == c)
        in_a[rng.permutation(idx)[: int(round(len(idx) * ls.fraction))]] = True
    keep = np.flatnonzero(in_a if ls.part == "a" else ~in_a)
    if isinstance(split, ArraySplit):
        return split.subset(keep)
    import torch.utils.data

    return torch.utils.data.Subset(split, keep.tolist())


def train_subset(split, fraction: float, seed: int):
    """A fixed ``fraction`` of ``split`` (at least one example), chosen by ``seed``."""
    import numpy as np

    n = len(split)
    keep = np.sort(np.random.default_rng([seed, 7]).permutation(n)[: max(1, int(round(n * fraction)))])
    if isinstance(split, ArraySplit):
        return split.subset(keep)
    import torch.utils.data

    return torch.utils.data.Subset(split, keep.tolist())


def eval_loader(split, info, batch_size: int, device="cpu"):
    """An unaugmented, unshuffled loader over ``split`` (in-memory arrays or a dataset)."""
    if isinstance(split, ArraySplit):
        return ArrayLoader(split, info, batch_size, device=device)
    return DatasetLoader(split, batch_size, device=device)


def eval_splits(cfg):
    """``cfg`` (a DataConfig) loaded whole for scoring: every training example (no
    ``train_fraction``, no ``label_split``), and val and test loaders."""
    splits = load(cfg.model_copy(update={"train_fraction": 1.0, "label_split": None}))
    return splits, eval_loader(splits.val, splits.info, cfg.eval_batch_size), \
        eval_loader(splits.test, splits.info, cfg.eval_batch_size)


def info(cfg) -> DatasetInfo:
    """``cfg``'s DatasetInfo; for parquet shards read from their meta.json, without
    loading (let alone decoding) the images."""
    if cfg.name == "parquet":
        from metaensemble.data.parquet import read_meta

        return read_meta(cfg)["info"]
    return load(cfg).info


def is_streaming(cfg) -> bool:
    return DATASETS.get(cfg.name).streaming


def names() -> list[str]:
    return DATASETS.names()


__all__ = [
    "ArrayLoader", "ArraySplit", "DATASETS", "DatasetInfo", "DatasetLoader", "DataSplits",
    "RayShardLoader", "augment_batch", "check", "check_name", "eval_loader", "eval_splits", "info", "is_streaming", "load",
    "names",
    "normalise", "split_indices",
]
