"""ImageNet-scale data: an image folder streamed into byte-bounded parquet shards of
encoded images (jobs/prepare_data.py), read back through Ray Data with decoding and
augmentation on Ray Data's workers; and the bad inputs, each one clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_script, write_imagefolder

from metaensemble import data
from metaensemble.config import DataConfig
from metaensemble.data.parquet import (
    load_parquet_arrays,
    ray_datasets,
    read_meta,
    write_image_folder,
    write_parquet,
)
from metaensemble.errors import DataError

CLASSES = ("ant", "bee", "cat", "dog")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageNet-layout folder of small real images, one of them not an image."""
    root = tmp_path_factory.mktemp("imagenet")
    write_imagefolder(root, classes=CLASSES, per_class=12, size=40)
    (root / "train" / "bee" / "broken.png").write_bytes(b"\x89PNG this is no image")
    return root


def _pq_cfg(root, **kw) -> DataConfig:
    return DataConfig(name="parquet", root=str(root), **kw)


def _corrupt_one_row(shards_dir: Path) -> int:
    """Overwrite one train row's image bytes in its shard (bit rot after writing); the
    shard keeps its dataset id. Returns the row's index."""
    f = sorted(shards_dir.glob("*.parquet"))[0]
    t = pq.read_table(f)
    images = t.column("image").to_pylist()
    images[0] = images[0][:20] + b"\x00" * 64
    t = t.set_column(0, pa.field("image", pa.binary()), pa.array(images, pa.binary()))
    pq.write_table(t.replace_schema_metadata(pq.read_schema(f).metadata), f)
    return int(t.column("index")[0].as_py())


def test_prepare_data_streams_a_folder_into_bounded_class_mixed_shards(folder, tmp_path):
    out = tmp_path / "pq"
    res = run_script(["jobs/prepare_data.py", "--out", str(out), "data.name=imagefolder", f"data.root={folder}",
                     "data.image_size=32", "--shard-mb", "0.02"])
    assert res.returncode == 0, res.stderr
    assert "img/s" in res.stderr and "100%" in res.stderr, "a progress bar on stderr"
    assert "skipped 1 unreadable file" in res.stdout
    meta = read_meta(_pq_cfg(out))
    assert meta["format"] == "encoded" and meta["skipped"] == ["train/bee/broken.png"]
    # the same splits, examples and indices as the ImageFolder path (the broken file aside)
    ref = data.load(DataConfig(name="imagefolder", root=str(folder), image_size=32))
    broken = next(i for i, (p, _) in enumerate(ref.train.base.samples) if p.endswith("broken.png"))
    want = {"train": set(ref.train.indices) - {broken}, "val": set(ref.val.indices) - {broken},
            "test": set(range(len(ref.test)))}
    shard_bytes = 0.02 * 2**20
    for s in ("train", "val", "test"):
        tables = [pq.read_table(f) for f in meta["shards"][s]]
        assert set(np.concatenate([t.column("index").to_numpy() for t in tables]).tolist()) == want[s]
        biggest = max(len(b) for t in tables for b in t.column("image").to_pylist())
        for t in tables:  # bounded: a shard closes once it holds shard_mb
            assert sum(len(b) for b in t.column("image").to_pylist()) < shard_bytes + biggest
    train_shards = [pq.read_table(f) for f in meta["shards"]["train"]]
    assert len(train_shards) >= 4
    mixed = [len(set(t.column("label").to_pylist())) > 1 for t in train_shards]
    assert sum(mixed) > len(mixed) / 2, "train rows are in random order: most shards mix the classes"
    # the bytes are the files' own (encoded, not decoded pixels)
    t0 = train_shards[0]
    i0 = int(t0.column("index")[0].as_py())
    assert t0.column("image")[0].as_py() == Path(ref.train.base.samples[i0][0]).read_bytes()
    # evaluation decoding matches the ImageFolder path's eval transform (resize + centre crop)
    back = load_parquet_arrays(_pq_cfg(out))
    pos = {int(i): k for k, i in enumerate(back.val.index)}
    for k, i in enumerate(ref.val.indices):
        if i == broken:
            continue
        x_ref = ref.val[k][0]
        x = data.normalise(back.val.images[pos[i]][None], back.info)[0]
        assert torch.allclose(x, x_ref, atol=1e-5)
    assert back.info.family == "imagenet" and back.info.num_classes == len(CLASSES) and back.info.img_size == 32


def test_bad_inputs_are_one_clear_message_and_nothing_is_written(folder, tmp_path):
    # a data root without the ImageNet layout: the job exits with one line, writes nothing
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((folder / "train" / "ant").iterdir()), flat / "a.png")
    out = tmp_path / "out"
    res = run_script(["jobs/prepare_data.py", "--out", str(out), "data.name=imagefolder", f"data.root={flat}"])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "ImageNet layout" in lines[0] and "train/<class>/<image>" in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    # class folders that differ between train/ and val/
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    (odd / "val" / "dog").rename(odd / "val" / "wolf")
    with pytest.raises(DataError, match="different class folders.*dog, wolf"):
        write_image_folder(odd, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.partial").exists()

    # a shard from another dataset dropped into a shard folder is refused by name
    a = write_parquet(data.load(DataConfig()), tmp_path / "a", rows_per_shard=600)
    b = write_image_folder(folder, tmp_path / "b", image_size=32, progress=False)
    stray = b / "train" / "part-09999.parquet"
    shutil.copy(sorted((a / "train").glob("*.parquet"))[0], stray)
    with pytest.raises(DataError, match=r"part-09999.parquet belongs to another dataset"):
        data.check(_pq_cfg(b))
    stray.unlink()
    # a parquet file without the dataset id (another tool's output) is refused the same way
    pq.write_table(pa.table({"x": [1, 2]}), stray)
    with pytest.raises(DataError, match=r"part-09999.parquet belongs to another dataset \(its dataset id is None"):
        data.check(_pq_cfg(b))
    stray.unlink()
    # the DeiT transform on shards of arrays (digits), which augment as arrays
    with pytest.raises(DataError, match=r"data.transform='deit' augments images decoded from files; .* holds "
                                        r"uint8-chw arrays \(written from data.name=digits\)"):
        data.check(_pq_cfg(a, transform="deit"))
    data.check(_pq_cfg(b, transform="deit"))  # encoded images take it
    # data.root as a URI of a pyarrow filesystem (file:// here; s3://, gs://, hdfs:// the same
    # way): the same shards through the same reader
    by_uri, by_path = load_parquet_arrays(_pq_cfg(f"file://{b}")), load_parquet_arrays(_pq_cfg(b))
    assert all(torch.equal(getattr(by_uri, s).images, getattr(by_path, s).images) for s in ("train", "val", "test"))
    assert read_meta(_pq_cfg(f"file://{b}"))["shards"] == read_meta(_pq_cfg(b))["shards"]
    with pytest.raises(DataError, match=r"data.root=nosuch://x/y is not a filesystem pyarrow can open"):
        data.check(_pq_cfg("nosuch://x/y"))
    with pytest.raises(DataError, match=r"/nowhere/meta.json not found"):
        data.check(_pq_cfg("file:///nowhere"))
    # a meta.json that is not ours
    (a / "meta.json").write_text(json.dumps({"info": {}}))
    with pytest.raises(DataError, match="malformed"):
        data.check(_pq_cfg(a))
    # a corrupt image read in memory (no place to count it) is an error naming the split
    bad = _corrupt_one_row(b / "val")
    with pytest.raises(DataError, match=rf"1 image\(s\) in .*val do not decode \(indices \[{bad}\]\)"):
        load_parquet_arrays(_pq_cfg(b))


def test_ray_data_decodes_and_augments_on_its_workers_with_a_new_file_order_each_epoch(ray_local, folder, tmp_path):
    from ray.data import DataContext

    root = write_image_folder(folder, tmp_path / "pq", image_size=24, shard_mb=0.01, progress=False)
    bad = _corrupt_one_row(root / "train")
    ctx = DataContext.get_current()
    keep, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:  # rows in the order read: only the file shuffle changes the order between epochs
        datasets, info, sizes = ray_datasets(_pq_cfg(root), seed=3)
    finally:
        ctx.execution_options.preserve_order = keep
    assert (info.img_size, info.in_chans) == (24, 3)

    def epoch(ds):
        rows = {}
        order = []
        for b in ds.iter_batches(batch_size=16, batch_format="numpy"):
            assert b["image"].shape[1:] == (3, 24, 24) and b["image"].dtype == np.uint8
            for img, i, ok in zip(b["image"], b["index"], b["ok"], strict=True):
                rows[int(i)] = (img, bool(ok))
                order.append(int(i))
        return order, rows

    o1, r1 = epoch(datasets["train"])
    o2, r2 = epoch(datasets["train"])
    assert sorted(o1) == sorted(o2) and len(o1) == sizes["train"]
    assert o1 != o2, "shard files are read in a new order every epoch"
    # a run resumed after one epoch (its latest checkpoint says so) reads epoch 1's order
    # first, as the uninterrupted run did, not epoch 0's again
    from metaensemble.engine.trainer import _ray_datasets
    from metaensemble.validation import load_config

    ckpt = tmp_path / "ray" / "run-a" / "checkpoint_2026-01-01_00-00-01.000000"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"epochs_done": 1, "run_id": "a"}))
    run_cfg = load_config("configs/teachers/digits.yaml", ["data.name=parquet", f"data.root={root}", "seed=3",
                                                           "data.image_size=24"])
    ctx.execution_options.preserve_order = True
    try:
        resumed, _ = _ray_datasets(run_cfg, str(tmp_path / "ray" / "run-a"))
        fresh, _ = _ray_datasets(run_cfg, str(tmp_path / "ray" / "run-b"))  # no checkpoint: epoch 0
        # the train split is built when Ray Train starts (or restarts) the worker group
        resumed_train, fresh_train = resumed["train"](), fresh["train"]()
    finally:
        ctx.execution_options.preserve_order = keep
    assert epoch(resumed_train)[0] == o2 and epoch(resumed_train)[0] != o2
    assert epoch(fresh_train)[0] == o1
    assert not r1[bad][1] and all(ok for i, (_, ok) in r1.items() if i != bad), "only the corrupt row is flagged"
    same = [np.array_equal(r1[i][0], r2[i][0]) for i in r1 if i != bad]
    assert sum(same) < len(same) / 4, "random crops and flips differ between epochs"
    v1, v2 = epoch(datasets["val"])[1], epoch(datasets["val"])[1]
    assert all(np.array_equal(v1[i][0], v2[i][0]) for i in v1), "evaluation decoding is deterministic"
    # the same shards named by a pyarrow filesystem URI: Ray Data reads them through it
    by_uri = epoch(ray_datasets(_pq_cfg(f"file://{root}"), seed=3)[0]["val"])[1]
    assert sorted(by_uri) == sorted(v1) and all(np.array_equal(by_uri[i][0], v1[i][0]) for i in v1)

    # data.transform=deit: the DeiT recipe's PIL stages (RandAugment among them) on Ray Data's
    # workers, its random erasing on the training worker's normalised batch
    deit, _, _ = ray_datasets(_pq_cfg(root, transform="deit", re_prob=1.0), seed=3)
    d1 = epoch(deit["train"])[1]
    assert sorted(d1) == sorted(r1) and not d1[bad][1]
    ev = epoch(deit["val"])[1]
    assert all(np.array_equal(ev[i][0], v1[i][0]) for i in v1), "evaluation decoding is the standard one"
    grid = ((torch.arange(256) / 255.0).view(1, -1) - torch.tensor(info.mean).view(-1, 1)) / torch.tensor(info.std).view(-1, 1)

    def off_grid(erase: float) -> list[int]:
        """Per image, the pixels that no uint8 value normalises to: the erased box's noise."""
        loader = data.RayShardLoader(deit["train"].iterator(), info, 8, shuffle=True, augment=True, erase=erase)
        counts = []
        for b in loader:
            x = b["x"]  # [B, 3, H, W]
            near = (x.unsqueeze(-1) - grid.view(1, 3, 1, 1, 256)).abs().min(-1).values < 1e-4
            counts += (~near).flatten(1).sum(1).tolist()
        return counts

    assert all(c > 0 for c in off_grid(1.0)), "every image has its erased box at re_prob=1"
    assert not any(off_grid(0.0)), "no erasing: every pixel is a normalised uint8"


def test_the_deit_transform_of_encoded_shards_is_timms_pil_stages_then_uint8():
    from metaensemble.data.parquet import _image_transform, _tensor_train_transform

    ops = [type(t).__name__ for t in _image_transform(16, True, "rand-m9-mstd0.5-inc1").transforms]
    assert ops == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment", "PILToTensor"]
    assert [type(t).__name__ for t in _image_transform(16, False, "rand-m9-mstd0.5-inc1").transforms] == [
        "Resize", "CenterCrop", "PILToTensor"]  # evaluation never augments
    assert [type(t).__name__ for t in _tensor_train_transform(16).transforms] == [
        "RandomResizedCrop", "RandomHorizontalFlip"]  # the standard recipe, on decoded tensors


def test_standard_training_images_decode_through_torchvision_and_corrupt_ones_are_flagged(folder, tmp_path):
    """The standard training decode (torchvision, uint8 tensors) gives uint8 [3, size, size]
    crops of the image (a crop of a one-colour image is that colour) and flags bytes that
    are no image; evaluation decoding is PIL's, as the ImageFolder path's."""
    import io

    from PIL import Image

    from metaensemble.data.parquet import decode_images

    def jpeg(colour, size=(60, 40)):
        b = io.BytesIO()
        Image.new("RGB", size, colour).save(b, "JPEG", quality=95)
        return b.getvalue()

    def encoded(img, fmt):
        b = io.BytesIO()
        img.save(b, fmt)
        return b.getvalue()

    png = encoded(Image.new("L", (30, 50), 200), "PNG")  # greyscale: decoded to RGB
    bmp = encoded(Image.new("RGB", (30, 20), (10, 200, 10)), "BMP")  # a format torchvision does not read
    png16 = encoded(Image.new("I;16", (20, 20), 40000), "PNG")  # 16 bits: not torchvision's uint8
    from metaensemble.data.parquet import _decode_uint8

    assert _decode_uint8(jpeg((1, 2, 3))).shape == (3, 40, 60) and _decode_uint8(png).dtype == torch.uint8
    assert _decode_uint8(bmp) is None and _decode_uint8(png16) is None  # these go through PIL
    batch = {"image": np.array([jpeg((250, 10, 10)), b"\xff\xd8 not a jpeg", png, jpeg((0, 0, 255)), bmp, png16],
                               dtype=object), "label": np.arange(6), "index": np.arange(6)}
    for train in (True, False):
        out = decode_images(batch, 16, train)
        assert out["image"].shape == (6, 3, 16, 16) and out["image"].dtype == np.uint8
        assert out["ok"].tolist() == [True, False, True, True, True, True]
        px = out["image"].reshape(6, 3, -1).astype(int)
        assert (abs(px[0] - np.array([[250], [10], [10]])) <= 8).all() and (abs(px[3] - np.array([[0], [0], [255]])) <= 8).all()
        assert (abs(px[2] - 200) <= 1).all() and not out["image"][1].any()
        assert (abs(px[4] - np.array([[10], [200], [10]])) <= 1).all() and px[5].min() > 0


def test_a_rerun_resumes_at_the_epochs_its_latest_finished_checkpoint_records(tmp_path):
    from metaensemble.engine.checkpoint import epochs_done

    run = tmp_path / "run"
    assert epochs_done(str(run)) == 0  # no folder yet
    run.mkdir()
    assert epochs_done(str(run)) == 0
    for stamp, done in (("2026-01-01_00-00-01.000000", 1), ("2026-01-01_00-00-09.000000", 3),
                        ("2026-01-01_00-00-05.000000", 2)):
        (run / f"checkpoint_{stamp}").mkdir()
        (run / f"checkpoint_{stamp}" / "state.json").write_text(json.dumps({"epochs_done": done}))
    (run / "checkpoint_2026-01-01_00-00-10.000000").mkdir()  # Ray was still writing it: no state.json
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # no snapshot to go by: the newest whole folder
    assert epochs_done(str(run)) == 3
    assert epochs_done(f"file://{run}/") == 3  # storage_path as a URI
    # the snapshot names the checkpoint Ray restores: a newer folder it has not recorded
    # (uploaded by a worker just before the crash) is not the one the rerun resumes from
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-05.000000"}}))
    assert epochs_done(str(run)) == 2
