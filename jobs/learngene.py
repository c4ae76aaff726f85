"""Learngene SWS: train the stage-wise weight-shared aux-net, or grow descendants of any depth from it.

    python jobs/learngene.py aux                          # stage 1 on the embedded default (digits)
    python jobs/learngene.py descendants                  # stage 2: depths 4, 6, 8 vs random init
    python jobs/learngene.py descendants depths=[12] layers_source=[0,0,0,1,1,1,2,2,3,3,4,4]
    python jobs/learngene.py descendants depths=[6,12] "layers_source={12: [0,0,0,1,1,1,2,2,3,3,4,4]}" head=auto
    python jobs/learngene.py descendants learngene=models:/learngene.digits.aux_vit/2    # or an original checkpoint.pth
    python jobs/learngene.py aux --config configs/learngene/imagenet_aux_s.yaml data.root=/data/imagenet

aux: distils the aux-net from learngene.teacher (or the first teacher of
learngene.teacher_config's zoo, trained first if missing) through the engine and
registers it as learngene.<dataset>.<aux arch>. descendants: initialises a descendant of
every depth in learngene.depths from the learngene (learngene.learngene: a registered
version, a folder, or a checkpoint.pth of the original code; default the newest
registered one), finetunes it against a random-init one with the same budget, and prints
and logs the per-depth table and the storage ratio.
"""

import _library  # noqa: F401 - this checkout's library first (jobs/_library.py)

from metaensemble.cli import config_parser, run_job, work_done


def main() -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/learngene/digits.yaml",
                      {"aux": "stage 1, the aux-net", "descendants": "stage 2, descendants vs random init"})
    p.add_argument("--no-train-zoo", action="store_true", help="fail instead of training a missing zoo teacher")
    args = p.parse_args()
    from metaensemble.validation import load_config

    short = ("depths=", "layers_source=", "learngene=", "teacher=", "style=", "head=")  # learngene.<key> shorthands
    overrides = [f"learngene.{o}" if o.startswith(short) else o for o in args.overrides]
    cfg = load_config(args.config, overrides)  # validated before Ray or MLflow start
    from metaensemble import tracking
    from metaensemble.methods.learngene import experiment

    experiment.check_aux(cfg)
    if args.command == "aux":
        out = experiment.run_aux(cfg, train_missing=not args.no_train_zoo)
        work_done()
        m = out.metrics
        print(f"\naux-net {cfg.model.name} {cfg.model.kwargs}: {out.parameters:,} parameters, distilled from "
              f"{out.teacher}")
        print(f"test acc {100 * m['test_acc']:.2f}, NLL {m['test_nll']:.4f}, ECE {m['test_ece']:.4f} "
              f"(best epoch {int(m['best_epoch'])} on val)")
        print(f"MLflow: {tracking.describe_store()}; run {out.run_id}; learngene registered as "
              f"{experiment.registered_name(cfg)} version {out.version}")
        return 0
    out = experiment.run_descendants(cfg)
    work_done()
    print()
    print(experiment.format_table(out.rows, out.learngene_parameters, out.storage_ratio,
                                  cfg.learngene.finetune_epochs))
    print(f"\nwall time {out.seconds['total_s']:.0f}s; MLflow: {tracking.describe_store()}; experiment "
          f"{cfg.experiment_name}, run {out.parent_run_id}")
    return 0


if __name__ == "__main__":
    run_job(main)
