"""Every dataset in the registry, on files the tests write in the real formats."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import write_cifar, write_imagefolder

from metaensemble import data
from metaensemble.config import DataConfig
from metaensemble.data.parquet import load_parquet_arrays, write_parquet
from metaensemble.errors import DataError


def _disjoint(s: data.DataSplits) -> bool:
    return not (set(s.train.index.tolist()) & set(s.val.index.tolist()))


def test_digits_splits_are_deterministic_disjoint_and_complete():
    a, b = data.load(DataConfig()), data.load(DataConfig())
    assert a.sizes() == b.sizes() and sum(a.sizes().values()) == 1797
    assert torch.equal(a.train.index, b.train.index) and torch.equal(a.val.images, b.val.images)
    ids = [set(x.index.tolist()) for x in (a.train, a.val, a.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert a.info.num_classes == 10 and a.train.images.shape[1:] == (1, 8, 8)
    assert a.train.images.max() == 255  # digit value 16 maps to 255
    c = data.load(DataConfig(split_seed=1))
    assert not torch.equal(c.val.index, a.val.index)


def test_digits_are_scikit_learns_digits_read_without_importing_it():
    """The bundled file read directly holds exactly what ``sklearn.datasets.load_digits``
    returns (images and labels in order), and a fresh process that loads the digits and
    builds a convnet imports neither scikit-learn nor POT (each over a second of CPU in
    every Ray Train worker of a digits run)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    s, d = data.load(DataConfig()), load_digits()
    by_index = {}
    for part in (s.train, s.val, s.test):
        for i, img, y in zip(part.index.tolist(), part.images, part.labels.tolist(), strict=True):
            by_index[i] = (img, y)
    assert sorted(by_index) == list(range(len(d.target)))
    want = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype("uint8"))
    assert all(torch.equal(by_index[i][0][0], want[i]) and by_index[i][1] == d.target[i] for i in by_index)
    code = ("import sys; from metaensemble import data, models; from metaensemble.config import DataConfig; "
            "s = data.load(DataConfig()); m = models.create_model('convnet', num_classes=10, in_chans=1, img_size=8); "
            "heavy = [k for k in ('sklearn', 'scipy', 'ot', 'metaensemble.methods.weightformer.generator') "
            "if k in sys.modules]; assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_changing_val_fraction_never_moves_test_examples():
    a, b = data.load(DataConfig(val_fraction=0.1)), data.load(DataConfig(val_fraction=0.3))
    assert torch.equal(a.test.index, b.test.index)


def test_synthetic_any_size_and_classes():
    s = data.load(DataConfig(name="synthetic", image_size=24, num_classes=7, num_samples=140, channels=2))
    assert s.info.num_classes == 7 and s.train.images.shape[1:] == (2, 24, 24)
    assert set(s.train.labels.tolist()) <= set(range(7))
    again = data.load(DataConfig(name="synthetic", image_size=24, num_classes=7, num_samples=140, channels=2))
    assert torch.equal(s.test.images, again.test.images)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_python_format_and_holds_out_last_val(tmp_path, name):
    blobs = write_cifar(tmp_path, name)
    s = data.load(DataConfig(name=name, root=str(tmp_path), val_fraction=0.2))
    n_train = 100 if name == "cifar10" else 20
    assert s.sizes() == {"train": int(n_train * 0.8), "val": int(n_train * 0.2), "test": 30}
    first = next(iter(blobs.values()))
    img0 = torch.from_numpy(first[b"data"][0].reshape(3, 32, 32))
    assert torch.equal(s.train.images[0], img0)
    # val is the *last* part of the official train split
    assert s.val.index.min() == s.train.index.max() + 1
    assert s.info.num_classes == (10 if name == "cifar10" else 100)


def test_cifar_missing_root_names_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*data_batch_1"):
        data.check(DataConfig(name="cifar10", root=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="needs data.root"):
        data.check(DataConfig(name="cifar100"))


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    write_cifar(tmp_path)
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="not allowed"):
        data.load(DataConfig(name="cifar10", root=str(tmp_path)))


def test_imagefolder_layout_transforms_and_held_out_val(tmp_path):
    write_imagefolder(tmp_path)
    s = data.load(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.2))
    assert s.info.num_classes == 3 and s.info.family == "imagenet"
    assert s.sizes() == {"train": 14, "val": 4, "test": 6}
    x, y, idx = s.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert set(s.train.indices).isdisjoint(s.val.indices)
    batch = next(iter(data.DatasetLoader(s.val, 4)))
    assert batch["x"].shape == (4, 3, 16, 16)


def test_imagefolder_missing_val_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"val not found; expected the ImageNet layout"):
        data.check(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_parquet_round_trip_is_exact_and_atomic(tmp_path):
    src = data.load(DataConfig())
    out = write_parquet(src, tmp_path / "pq", rows_per_shard=500)
    assert not (tmp_path / "pq.partial").exists()
    assert len(list((out / "train").glob("*.parquet"))) == 3  # 1294 rows / 500 per shard
    back = load_parquet_arrays(DataConfig(name="parquet", root=str(out)))
    assert back.info == src.info
    for split in ("train", "val", "test"):
        a, b = getattr(src, split), getattr(back, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.index, b.index)
    with pytest.raises(DataError, match="not empty"):
        write_parquet(src, out)


def test_parquet_missing_meta(tmp_path):
    with pytest.raises(DataError, match=r"meta.json not found.*prepare_data"):
        data.check(DataConfig(name="parquet", root=str(tmp_path)))


def test_array_loader_shards_are_disjoint_and_equal_length():
    s = data.load(DataConfig())
    loaders = [data.ArrayLoader(s.train, s.info, 32, rank=r, world_size=2, shuffle=True, seed=3, drop_last=True)
               for r in range(2)]
    seen = [torch.cat([b["index"] for b in ld]) for ld in loaders]
    assert len(seen[0]) == len(seen[1]) == (len(s.train) // 2 // 32) * 32
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    loaders[0].set_epoch(1)
    assert not torch.equal(torch.cat([b["index"] for b in loaders[0]]), seen[0])  # reshuffled per epoch


def test_augmentation_keeps_shape_and_changes_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = data.augment_batch(x, "cifar", g)
    assert y.shape == x.shape and y.dtype == torch.uint8 and not torch.equal(x, y)
    assert torch.equal(data.augment_batch(x, "synthetic", g), x)


def test_the_deit_transform_is_timms_factory_with_randaugment_and_random_erasing(tmp_path):
    write_imagefolder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, transform="deit", re_prob=0.5)
    data.check(cfg)
    splits = data.load(cfg)
    ops = [type(t).__name__ for t in splits.train.base.transform.transforms]
    assert "RandAugment" in ops and "RandomErasing" in ops and "RandomResizedCropAndInterpolation" in ops
    assert [type(t).__name__ for t in splits.val.base.transform.transforms][:2] == ["Resize", "CenterCrop"]
    x, y, _ = splits.train[0]
    assert tuple(x.shape) == (3, 16, 16)
    with pytest.raises(Exception, match="data.transform='deit' applies to images read from files"):
        data.check(DataConfig(name="digits", transform="deit"))


class _Indexed(torch.utils.data.Dataset):
    """Example i is (a 1x1x1 image of value i, label i % 3, index i)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((1, 1, 1), float(i)), i % 3, i


def test_repeated_augmentation_draws_each_image_on_several_ranks():
    """data.repeated_aug=3 (DeiT's): an epoch has the steps of a plain one, and every image
    it draws appears 3 times, each copy on another rank (so about n / 3 distinct images an
    epoch); another seed or epoch draws others; 1 leaves the plain sharded sampler."""
    n, world, batch = 24, 3, 2

    def epoch(seed: int, e: int, repeats: int = 3) -> list[list[int]]:
        out = []
        for rank in range(world):
            loader = data.DatasetLoader(_Indexed(n), batch, rank=rank, world_size=world, shuffle=True, seed=seed,
                                        drop_last=True, repeats=repeats)
            loader.set_epoch(e)
            out.append([int(i) for b in loader for i in b["index"]])
        return out

    ranks = epoch(0, 0)
    seen = [i for r in ranks for i in r]
    assert all(len(r) == n // world for r in ranks)  # the steps of a plain epoch
    drawn = sorted(set(seen))
    assert len(drawn) == n // 3 and sorted(seen) == sorted(drawn * 3)
    assert all(sum(i in r for r in ranks) == 3 for i in drawn)  # each copy on another rank
    assert epoch(0, 1) != ranks and epoch(1, 0) != ranks
    plain = epoch(0, 0, repeats=1)
    assert sorted(i for r in plain for i in r) == list(range(n))


def test_repeated_augmentation_is_refused_for_array_datasets():
    from metaensemble.errors import ConfigError

    with pytest.raises(ConfigError, match="data.repeated_aug=3 applies to images read from files"):
        data.check(DataConfig(name="digits", repeated_aug=3))


def test_normalise_is_bit_for_bit_the_textbook_formula():
    """The in-place normalise (one float copy) gives exactly (x / 255 - mean) / std."""
    from metaensemble.data.core import DatasetInfo
    from metaensemble.data.loaders import normalise

    info = DatasetInfo("imagefolder", "imagenet", 10, 3, 8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
    assert torch.equal(normalise(x, info), (x.float() / 255.0 - mean) / std)
