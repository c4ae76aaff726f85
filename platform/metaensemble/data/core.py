"""Shared data types: dataset info, in-memory splits, deterministic split indices."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

FAMILIES = ("digits", "synthetic", "cifar", "imagenet")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model builder and a loader need to know about a dataset.

    ``mean``/``std`` are per channel, for images scaled to [0, 1].
    """

    name: str
    family: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass
class ArraySplit:
    """An in-memory split: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N].

    ``index`` [N] is each example's position in the source split, so a run can tell
    which examples a worker saw.
    """

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be [N] matching images")
        self.labels = self.labels.long()
        if self.index is None:
            self.index = torch.arange(len(self.labels))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray | torch.Tensor) -> ArraySplit:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ArraySplit(self.images[idx], self.labels[idx], self.index[idx])


@dataclass
class DataSplits:
    """train/val/test of one dataset. A split is an ArraySplit (in memory) or a
    map-style torch Dataset yielding (image tensor normalised, label)."""

    info: DatasetInfo
    train: Any
    val: Any
    test: Any

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "val", "test")}


def split_indices(n: int, val_fraction: float, test_fraction: float | None, seed: int):
    """Deterministic disjoint (train, val, test) index arrays over ``range(n)``.

    Test is carved first (when ``test_fraction`` is given), then val from what is left,
    so changing val_fraction never moves an example into or out of test.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction)) if test_fraction else 0
    test, rest = perm[:n_test], perm[n_test:]
    n_val = max(1, int(round(len(rest) * val_fraction)))
    val, train = rest[:n_val], rest[n_val:]
    return np.sort(train), np.sort(val), np.sort(test)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images scaled to [0, 1]."""
    x = images.float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
