"""Write a registered dataset's train/val/test splits as parquet shards for Ray Data.

    python jobs/prepare_data.py --out data/digits-parquet                  # digits
    python jobs/prepare_data.py --out data/c10 data.name=cifar10 data.root=/data/cifar
    python jobs/prepare_data.py --out data/syn data.name=synthetic data.num_samples=50000

Train with it: data.name=parquet data.root=<out>.
"""

import argparse

from metaensemble.cli import run_job


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="new folder for the shards")
    p.add_argument("--rows-per-shard", type=int, default=50_000)
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    args = p.parse_args()
    from metaensemble import data
    from metaensemble.config import load_config, resolve_path
    from metaensemble.data.parquet import write_parquet

    cfg = load_config(None, args.overrides)
    data.check(cfg.data)
    splits = data.load(cfg.data)
    out = write_parquet(splits, resolve_path(args.out), rows_per_shard=args.rows_per_shard)
    print(f"wrote {cfg.data.name} {splits.sizes()} to {out}")
    return 0


if __name__ == "__main__":
    run_job(main)
