"""Batch iterators for the engine. Every batch is a dict:
``x`` float32 [B, C, H, W] normalised on the target device, ``y`` int64 [B],
``index`` int64 [B] (position of each example in its source split).

Sharding: rank r of w sees a disjoint 1/w of each epoch's permutation, all ranks the
same number of steps (a remainder of fewer than w examples is dropped), so DDP never
waits on a rank with an extra batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from metaensemble.data.core import ArraySplit, DatasetInfo
from metaensemble.errors import DataError

_STATS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def normalise(x_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    key = (info.mean, info.std, str(x_uint8.device))
    if key not in _STATS:  # once per device: no host-to-device copy per batch
        _STATS[key] = (torch.tensor(info.mean, device=x_uint8.device).view(1, -1, 1, 1),
                       torch.tensor(info.std, device=x_uint8.device).view(1, -1, 1, 1))
    mean, std = _STATS[key]
    # in place on the one float copy: the same operations in the same order (bit for bit
    # the out-of-place result), half the CPU time or less on a CPU (0.46 against 0.99 ms per
    # 224 x 224 image in benchmarks/data_throughput.py's per-image figure)
    return x_uint8.float().div_(255.0).sub_(mean).div_(std)


def augment_batch(x: torch.Tensor, family: str, gen: torch.Generator) -> torch.Tensor:
    """Standard per-family augmentation on a uint8 batch [B, C, H, W].

    cifar: 4-pixel zero-padded random crop + horizontal flip; digits: 1-pixel random
    shift (no flip: a mirrored digit is another symbol); synthetic: none.
    """
    if family not in ("cifar", "digits"):
        return x
    pad = 4 if family == "cifar" else 1
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(x.device)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)
    if family == "cifar":
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        out = torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)
    return out.contiguous()


def random_erasing(prob: float, device: torch.device):
    """The DeiT recipe's random erasing (timm's, one box of per-pixel normal noise with
    probability ``prob``) for normalised batches, as timm's transform applies it per image."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=prob, mode="pixel", max_count=1, device=str(device))


def cutout_batch(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Cutout on a normalised batch [B, C, H, W]: per example a ``size`` x ``size`` square
    centred on a uniformly drawn pixel (clipped at the border) set to 0, the mean."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), generator=gen)
    cx = torch.randint(0, w, (b, 1), generator=gen)
    rows, cols = torch.arange(h).view(1, h), torch.arange(w).view(1, w)
    lo = size // 2
    in_y = (rows >= cy - lo) & (rows < cy - lo + size)  # [B, H]
    in_x = (cols >= cx - lo) & (cols < cx - lo + size)  # [B, W]
    keep = ~(in_y.view(b, 1, h, 1) & in_x.view(b, 1, 1, w))
    return x * keep.to(x.device, x.dtype)


class ArrayLoader:
    """Shuffled, sharded mini-batches over an in-memory ArraySplit."""

    def __init__(
        self,
        split: ArraySplit,
        info: DatasetInfo,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        cutout: int = 0,
    ) -> None:
        self.split, self.info, self.batch_size = split, info, batch_size
        self.cutout = cutout
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.epoch = 0
        self._images = split.images.to(self.device)
        self._labels = split.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_indices(self) -> np.ndarray:
        n = len(self.split)
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        )
        if not (self.shuffle or self.drop_last):  # evaluation: every example on exactly one rank
            return order[self.rank :: self.world_size]
        per_rank = n // self.world_size if self.world_size > 1 else n
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        n = len(self.shard_indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        idx = torch.from_numpy(self.shard_indices())
        idx_dev = idx.to(self.device)  # once per epoch: no host-to-device copy per batch
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 31 + self.rank)
        for start in range(0, len(idx), self.batch_size):
            b = idx[start : start + self.batch_size]
            if self.drop_last and len(b) < self.batch_size:
                break
            on_device = idx_dev[start : start + self.batch_size]
            x = self._images[on_device]
            if self.augment:
                x = augment_batch(x, self.info.family, gen)
            x = normalise(x, self.info)
            if self.augment and self.cutout:
                x = cutout_batch(x, self.cutout, gen)
            yield {
                "x": x,
                "y": self._labels[on_device],
                "index": self.split.index[b],
            }


class DatasetLoader:
    """Sharded DataLoader over a map-style Dataset yielding (x, y, index)."""

    def __init__(self, dataset, batch_size, *, rank=0, world_size=1, shuffle=False, seed=0,
                 device="cpu", num_workers=0, drop_last=False, repeats: int = 1) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        self.device = torch.device(device)
        self.epoch_offset = 0
        if shuffle and repeats > 1:  # repeated augmentation: each image ``repeats`` times, across ranks
            from timm.data.distributed_sampler import RepeatAugSampler

            self.sampler = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                            num_repeats=repeats, selected_round=0)  # ceil(N / world) per rank
            self.epoch_offset = seed * 1_000_003  # timm seeds its shuffle with the epoch alone
        elif shuffle:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                              drop_last=True)
        elif world_size > 1:  # evaluation: every example on exactly one rank
            self.sampler = list(range(rank, len(dataset), world_size))
        else:
            self.sampler = None
        # Loader workers draw their seeds from this generator when an epoch starts:
        # seeded from (seed, rank, epoch), so every rank has its own stream and a resumed
        # run gives its workers the seeds an uninterrupted one would (hence no persistent
        # workers: those keep the seeds of the epoch they were started in).
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", drop_last=drop_last, generator=self.generator,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch_offset + epoch)
        self.generator.manual_seed((self.seed * 1_000_003 + self.rank * 7_919 + epoch) % 2**63)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y, index in self.loader:
            yield {
                "x": x.to(self.device, non_blocking=True),
                "y": y.to(self.device, non_blocking=True),
                "index": index,
            }


class RayShardLoader:
    """Batches from a Ray Data shard (``ray.train.get_dataset_shard``) whose rows are
    ``image`` uint8 [C, H, W], ``label``, ``index`` and ``ok`` (see ``data.parquet``).

    Training batches pass through a local shuffle buffer of ``shuffle_buffer`` rows
    (seeded per epoch and rank). Rows whose image did not decode (``ok`` False) are
    dropped and counted in ``skipped``."""

    def __init__(self, shard, info: DatasetInfo, batch_size: int, *, shuffle=False, augment=False,
                 seed=0, rank=0, device="cpu", length: int | None = None, cutout: int = 0,
                 shuffle_buffer: int = 0, erase: float = 0.0) -> None:
        self.shard, self.info, self.batch_size = shard, info, batch_size
        self.cutout, self.erase = cutout, erase
        self.shuffle, self.augment, self.seed, self.rank = shuffle, augment, seed, rank
        self.shuffle_buffer = shuffle_buffer
        self.device = torch.device(device)
        self.epoch = 0
        self.skipped = 0
        self._length = length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length or 0

    def _batches(self):
        """(x uint8, y, index) per batch, unreadable rows dropped and counted. Training
        (``shuffle``) takes full batches only and keeps every rank at the same number of
        steps, which DDP needs: a batch left with no readable image repeats a readable
        one (the previous, or the next when it comes first)."""
        kwargs = {}
        if self.shuffle:
            kwargs["drop_last"] = True  # equal rows per rank (streaming_split): equal full batches
            if self.shuffle_buffer:
                kwargs.update(local_shuffle_buffer_size=max(self.shuffle_buffer, self.batch_size),
                              local_shuffle_seed=(self.seed * 1_000_003 + self.epoch * 7_919 + self.rank) % 2**32)
        last, owed = None, 0
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, **kwargs):
            x, y, index = batch["image"], batch["label"], batch["index"]
            if "ok" in batch and not bool(batch["ok"].all()):
                ok = batch["ok"].bool()
                self.skipped += int((~ok).sum())
                x, y, index = x[ok], y[ok], index[ok]
                if not len(y):
                    if not self.shuffle:
                        continue
                    if last is None:
                        owed += 1
                        continue
                    x, y, index = last
            last = (x, y, index)
            for _ in range(owed + 1):
                yield last
            owed = 0
        if owed:
            raise DataError(f"no readable image in this worker's share of the epoch (rank {self.rank}); "
                            f"see data_skipped, and rewrite the shards with jobs/prepare_data.py")

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 31 + self.rank)
        erase = random_erasing(self.erase, self.device) if self.augment and self.erase else None
        for x, y, index in self._batches():
            x = x.to(self.device)
            if self.augment:
                x = augment_batch(x, self.info.family, gen)
            x = normalise(x, self.info)
            if self.augment and self.cutout:
                x = cutout_batch(x, self.cutout, gen)
            if erase is not None:
                x = erase(x)
            yield {
                "x": x,
                "y": y.long().to(self.device),
                "index": index.long(),
            }
