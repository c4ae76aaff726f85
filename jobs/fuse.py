"""Fuse trained networks of the same or different depths: OT fusion and CLAFusion, with the paper's table.

    python jobs/fuse.py                                        # the embedded default: digits MLPs of 6 and 4 hidden layers
    python jobs/fuse.py --config configs/fusion/digits_vgg.yaml
    python jobs/fuse.py models=[models:/teacher.digits.mlp/1,models:/teacher.digits.mlp/2] fusion.solver=sinkhorn
    python jobs/fuse.py --config configs/fusion/digits_skill_transfer.yaml     # two label splits into one network
    python jobs/fuse.py --config configs/fusion/digits_transfer.yaml           # a deep net initialised from a shallow one

Takes two or more parents (fusion.models: zoo versions as models:/ URIs, runs:/ URIs or
folders; or one network from each zoo of fusion.parent_configs, trained first if
missing), aligns them across layers where their depths differ, fuses them by optimal
transport against the anchor, and scores under one parent MLflow run: every parent,
their ensemble, the naive average, the one-shot fused network, it finetuned, and KD
from the parents into the fused shape for the same epochs. The fused network is
registered as fused.<dataset>.<arch>; the layer alignment is a PNG in the run.
"""

import _library  # noqa: F401 - this checkout's library first (jobs/_library.py)

from metaensemble.cli import config_parser, run_job, work_done


def main() -> int:
    p = config_parser(__doc__.splitlines()[0], "configs/fusion/digits_mlp.yaml")
    p.add_argument("--no-train-zoo", action="store_true", help="fail instead of training missing zoo parents")
    args = p.parse_args()
    from metaensemble.validation import load_config

    overrides = [f"fusion.{o}" if o.startswith("models=") else o for o in args.overrides]
    cfg = load_config(args.config, overrides)  # validated before Ray or MLflow start
    from metaensemble import tracking
    from metaensemble.methods.fusion import experiment

    experiment.validate(cfg)
    out = experiment.run(cfg, train_missing=not args.no_train_zoo)
    work_done()
    print()
    print(f"{cfg.data.name}, test split; cNLL/cECE after a temperature fitted on val; train s = optimisation "
          f"seconds; one-shot rows: BatchNorm statistics recomputed on the train split")
    print(experiment.format_outcome(out))
    for i, a in out.extra.get("alignment", {}).items():
        if isinstance(a, dict) and "mapping" in a:
            print(f"  alignment of parent {i}: {a['mapping']} (inserted {a['inserted']})")
        elif i == "mapping":
            print(f"  alignment: {a}")
    s = out.extra["seconds"]
    print(f"\nwall time: {s['total_s']:.0f}s (parents {s['parents_s']:.0f}s"
          + (f", fusion {s['fusion_s']:.1f}s" if "fusion_s" in s else "") + ")")
    reg = f"; fused networks registered: {out.versions}" if out.versions else ""
    print(f"MLflow: {tracking.describe_store()}; experiment {cfg.experiment_name}, run {out.parent_run_id}{reg}")
    return 0


if __name__ == "__main__":
    run_job(main)
