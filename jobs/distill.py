"""Distil a deep ensemble into one network: KD, LatentBE and TDiv-SDiv, with the paper's table.

    python jobs/distill.py                                   # the embedded default (digits)
    python jobs/distill.py methods=[kd,latentbe] distill.seeds=[0,1,2,3]
    python jobs/distill.py --config configs/distill/cifar100_wrn28x4_tdiv_sdiv.yaml

Takes M teachers from the zoo of distill.teacher_config (training the missing ones
first) or from distill.teachers, trains every student of distill.methods once per seed
of distill.seeds, and prints and logs under one parent MLflow run the table: DE-M, KD,
+ LatentBE, + TDiv-SDiv with ACC, NLL, ECE, cNLL, cECE (mean +- std over seeds), plus
reliability diagrams. Students are registered as student.<dataset>.<arch>.<method>.
"""

import _library  # noqa: F401 - this checkout's library first (jobs/_library.py)

from metaensemble.cli import config_parser, run_job, work_done


def main() -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/distill/digits.yaml")
    p.add_argument("--no-train-zoo", action="store_true", help="fail instead of training missing zoo teachers")
    args = p.parse_args()
    from metaensemble.validation import load_config

    overrides = [f"distill.{o}" if o.startswith("methods=") else o for o in args.overrides]
    cfg = load_config(args.config, overrides)  # validated before Ray or MLflow start
    from metaensemble import tracking
    from metaensemble.evaluation import format_seed_table
    from metaensemble.methods.latentbe import experiment

    experiment.validate(cfg)
    out = experiment.run(cfg, train_missing=not args.no_train_zoo)
    work_done()
    print()
    print(f"{cfg.data.name}, test split; students over seeds {list(cfg.distill.seeds)}; cNLL/cECE after a "
          f"temperature fitted on val; train s = optimisation seconds per student")
    print(format_seed_table(out.rows))
    print("the paper's claims (holds: the paired 95% interval over seeds excludes 0):")
    for claim, v in out.directions.items():
        print(f"  {claim}: {v}")
    print(f"\nwall time: {out.seconds['total_s']:.0f}s (teachers {out.seconds['plan_s']:.0f}s, students "
          f"{out.seconds['train_s']:.0f}s)")
    names = sorted({k.split('/')[0] for k in out.versions})
    print(f"MLflow: {tracking.describe_store()}; experiment {cfg.experiment_name}, run {out.parent_run_id}; "
          f"students registered as {', '.join(f'student.{cfg.data.name}.{cfg.model.name}.{n}' for n in names)}")
    return 0


if __name__ == "__main__":
    run_job(main)
