"""Train a SuperWeight ensemble against independent ensembles of the same WRNs and of the same parameter count.

    python jobs/superweight.py                                    # the embedded default (digits)
    python jobs/superweight.py superweight.max_params=260000 superweight.split_threshold=0.2
    python jobs/superweight.py --config configs/superweight/cifar100_wrn28_16.yaml   # the seed's command (GPU cluster)

Trains, as child runs of one parent MLflow run on the same data, recipe and epochs: the
SuperWeight ensemble (members of superweight.depths x superweight.widths composed from
template banks within superweight.max_params, the sharing learned from gradients), an
independent ensemble of the same WRNs, and an independent ensemble with every width
scaled so that it has the SuperWeight ensemble's unique trainable parameters. Prints and
logs the three side by side (test ACC, NLL, ECE, mean member, parameters, FLOPs), every
member, the learned sharing, and the anytime curve (every subset of members: accuracy
against FLOPs) as anytime.png. The ensemble is registered as ensemble.<dataset>.superweight.
"""

import _library  # noqa: F401 - this checkout's library first (jobs/_library.py)

from metaensemble.cli import config_parser, run_job, work_done


def main() -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/superweight/digits.yaml")
    args = p.parse_args()
    from metaensemble.validation import load_config

    cfg = load_config(args.config, args.overrides)  # validated before Ray or MLflow start
    from metaensemble import tracking
    from metaensemble.methods.superweight import experiment

    experiment.validate(cfg)
    out = experiment.run(cfg)
    work_done()
    print()
    print(f"{cfg.data.name}, test split; params = unique trainable parameters (every tensor once); MFLOPs = "
          f"the members' forward FLOPs per image; train s = optimisation seconds")
    print(experiment.format_outcome(out))
    print(f"\nwall time: {out.seconds['total_s']:.0f}s")
    print(f"MLflow: {tracking.describe_store()}; experiment {cfg.experiment_name}, run {out.parent_run_id} "
          f"(anytime.png, superweight_table.md); ensemble registered as ensemble.{cfg.data.name}.superweight "
          f"v{out.version}")
    return 0


if __name__ == "__main__":
    run_job(main)
