"""Write a dataset as parquet shards for Ray Data (train with data.name=parquet data.root=OUT).

    # an ImageNet-layout folder (train/<class>/*, val/<class>/*), streamed file by file
    # into shards of encoded images of at most --shard-mb each, with a progress bar:
    python jobs/prepare_data.py --out /data/imagenet-pq data.name=imagefolder data.root=/data/imagenet

    # an in-memory dataset as uint8 arrays:
    python jobs/prepare_data.py --out data/digits-parquet
    python jobs/prepare_data.py --out data/c10 data.name=cifar10 data.root=/data/cifar

The splits are the ones training on the source would use (val held out from train with
data.split_seed and data.val_fraction; for image folders test is val/). A file that is
not a readable image is skipped and listed in OUT/meta.json.
"""

import _library  # noqa: F401  # isort: skip - this checkout's library first (jobs/_library.py)
import argparse

from metaensemble.cli import run_job


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="new folder for the shards")
    p.add_argument("--rows-per-shard", type=int, default=50_000, help="in-memory datasets: rows per shard")
    p.add_argument("--shard-mb", type=float, default=256.0, help="image folders: MB of images per shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    args = p.parse_args()
    from metaensemble import data
    from metaensemble.config import resolve_path
    from metaensemble.data.parquet import (
        image_folder_layout,
        read_meta,
        write_image_folder,
        write_parquet,
    )
    from metaensemble.errors import ConfigError, DataError
    from metaensemble.validation import load_config

    cfg = load_config(None, args.overrides)
    d = cfg.data
    if d.name == "parquet":
        raise ConfigError("data.name=parquet is already shards; name the source dataset (imagefolder, digits, "
                          "synthetic, cifar10, cifar100) with data.root where it lives")
    if args.rows_per_shard <= 0 or args.shard_mb <= 0:
        raise ConfigError("--rows-per-shard and --shard-mb must be positive")
    out = resolve_path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} already exists and is not empty; choose a new folder")
    if d.name == "imagefolder":
        if d.root is None:
            raise DataError("data.root: the ImageNet-layout folder to read (train/<class>/*, val/<class>/*)")
        image_folder_layout(resolve_path(d.root))
        out = write_image_folder(resolve_path(d.root), out, image_size=d.image_size or 224,
                                 val_fraction=d.val_fraction, split_seed=d.split_seed, shard_mb=args.shard_mb,
                                 progress=not args.no_progress)
    else:
        data.check(d)
        out = write_parquet(data.load(d), out, rows_per_shard=args.rows_per_shard)
    meta = read_meta(d.model_copy(update={"name": "parquet", "root": str(out)}))
    shards = {s: len(v) for s, v in meta["shards"].items()}
    skipped = meta.get("skipped") or []
    print(f"wrote {d.name} {meta['sizes']} in {shards} shards to {out}"
          + (f"; skipped {len(skipped)} unreadable file(s), listed in meta.json" if skipped else ""))
    return 0


if __name__ == "__main__":
    run_job(main)
