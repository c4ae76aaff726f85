"""One leaderboard: every way the platform makes one network from K, on the same held-out ensembles.

    python jobs/compare.py                                   # configs/compare/digits.yaml: the main job's zoo
    python jobs/compare.py methods=[greedy_soup,kd,weightformer] compare.ensembles=20
    python jobs/compare.py --config configs/compare/digits_indep.yaml   # a zoo from independent inits

A config is a WeightFormer job's config (configs/meta/*.yaml) plus a ``compare`` section.
Ensures the zoo of that config and splits it as the WeightFormer job does, then
puts best member, uniform / greedy / learned soup, OT fusion (one-shot and finetuned),
KD, LatentBE, TDiv-SDiv and WeightFormer (zero-shot and finetuned) side by side on its
first compare.ensembles held-out ensembles, each row made by its own method's code.
Runs the WeightFormer job already finished (generator, KD students) are reused. Prints
the leaderboard; MLflow gets it as a table, a Pareto plot, reliability diagrams and one
child run per row, under <dataset>/meta_train.
"""

import _library  # noqa: F401 - this checkout's library first (jobs/_library.py)

from metaensemble.cli import config_parser, run_job, work_done


def main() -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/compare/digits.yaml")
    p.add_argument("--no-train-zoo", action="store_true", help="fail instead of training missing zoo teachers")
    args = p.parse_args()
    from metaensemble.validation import load_config

    overrides = [f"compare.{o}" if o.startswith("methods=") else o for o in args.overrides]
    cfg = load_config(args.config, overrides)  # validated before Ray or MLflow start
    from metaensemble import leaderboard as experiment
    from metaensemble import tracking

    out = experiment.run(cfg, train_missing=not args.no_train_zoo)  # validates first: bad input before any work
    work_done()
    print()
    print(experiment.format_board(cfg, out.summary))
    print(f"\nwall time: {out.seconds['total_s']:.0f}s (zoo {out.seconds['plan_s']:.0f}s, training "
          f"{out.seconds['train_s']:.0f}s, evaluation {out.seconds['eval_s']:.0f}s)")
    print(f"MLflow: {tracking.describe_store()}; experiment {cfg.experiment_name}, run {out.parent_run_id} "
          f"(one child run per row: compare them in the UI)")
    return 0


if __name__ == "__main__":
    run_job(main)
