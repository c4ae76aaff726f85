"""Ray Data's file shuffle, continued across a resumed run (imports Ray: only the
streaming path loads this module)."""

from __future__ import annotations

from dataclasses import dataclass

from ray.data import FileShuffleConfig


@dataclass
class EpochFileShuffle(FileShuffleConfig):
    """A file shuffle whose order for the dataset's k-th read is epoch ``first_epoch + k``'s.

    Ray counts a dataset's reads from 0 in every new dataset, so a run resumed after
    ``first_epoch`` epochs would read its shards in epoch 0's order again; with this it
    reads them in the order the uninterrupted run would have. ``first_epoch=0`` is Ray's
    own ``FileShuffleConfig(seed, reseed_after_execution=True)``."""

    first_epoch: int = 0

    def get_seed(self, execution_idx: int = 0) -> int | None:
        return super().get_seed(self.first_epoch + execution_idx)
