"""Train a teacher zoo (N seeds of one dataset/arch) and register it in MLflow.

    python jobs/train_teachers.py                                   # digits convnet zoo
    python jobs/train_teachers.py --config configs/teachers/cifar100_wrn28_4.yaml
    python jobs/train_teachers.py zoo.num_teachers=8 train.epochs=20
"""

import _library  # noqa: F401 - this checkout's library first (jobs/_library.py)

from metaensemble.cli import config_parser, run_job, work_done


def main() -> int:
    args = config_parser(__doc__.splitlines()[0], "configs/teachers/digits.yaml").parse_args()
    from metaensemble.validation import load_config

    cfg = load_config(args.config, args.overrides)  # validated before Ray or MLflow start
    from metaensemble import tracking
    from metaensemble.teachers import train_zoo

    zoo = train_zoo(cfg)
    work_done()
    print()
    print(zoo.table())
    print(f"\nMLflow: {tracking.describe_store()}; experiment {cfg.experiment_name}, registered model {zoo.name}")
    return 0


if __name__ == "__main__":
    run_job(main)
