"""Meta-train WeightFormer on a teacher zoo from MLflow and evaluate it on held-out ensembles.

    python jobs/meta_train.py                                # the embedded default (digits)
    python jobs/meta_train.py meta.ensemble_size=3 train.epochs=8
    ray job submit --working-dir . -- python jobs/meta_train.py

Trains the zoo's missing teachers first, then WeightFormer, its ablations, the MLP
generator and the KD baselines (side by side through Ray Tune), and prints the
evaluation table; everything is logged to MLflow under <dataset>/meta_train.
"""

import _library  # noqa: F401 - this checkout's library first (jobs/_library.py)

from metaensemble.cli import config_parser, run_job, work_done


def main() -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/meta/digits.yaml")
    p.add_argument("--no-train-zoo", action="store_true", help="fail instead of training missing zoo teachers")
    args = p.parse_args()
    from metaensemble.validation import load_config

    cfg = load_config(args.config, args.overrides)  # validated before Ray or MLflow start
    from metaensemble import tracking
    from metaensemble.methods.weightformer import experiment, plan

    plan.validate(cfg)
    out = experiment.run(cfg, train_missing=not args.no_train_zoo)
    work_done()
    print()
    print(experiment.format_evaluation(cfg, out.evaluation))
    print(f"\nwall time: {out.seconds['total_s']:.0f}s (zoo {out.seconds['plan_s']:.0f}s, training "
          f"{out.seconds['train_s']:.0f}s, evaluation {out.seconds['eval_s']:.0f}s)")
    print(f"MLflow: {tracking.describe_store()}; experiment {cfg.experiment_name}, run {out.parent_run_id}; "
          f"generator registered as version {out.generator_version}")
    return 0


if __name__ == "__main__":
    run_job(main)
