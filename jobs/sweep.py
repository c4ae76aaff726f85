"""Launch a Ray Tune sweep from a search-space file; each trial is one engine run.

    python jobs/sweep.py search_spaces/teacher.yaml
    python jobs/sweep.py search_spaces/teacher.yaml num_samples=16 train.epochs=20

``num_samples=`` and ``max_concurrent_trials=`` set the sweep's own settings; every other
override applies to the sweep's base config. Re-running the same command restores an
interrupted sweep.
"""

import _library  # noqa: F401  # isort: skip - this checkout's library first (jobs/_library.py)
import argparse

from metaensemble.cli import run_job, work_done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("space", help="search-space YAML (see search_spaces/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="num_samples=N / max_concurrent_trials=N, or overrides of the base config")
    args = p.parse_args()
    from metaensemble.sweep import format_trials, load_space, run_sweep

    space, overrides = load_space(args.space).split_overrides(args.overrides)
    space.base_config(overrides)  # validate overrides before anything starts
    outcome = run_sweep(space, overrides)
    work_done()
    print()
    print(format_trials(outcome, space.metric))
    print(f"\nbest {space.metric} {outcome.best_metric:.4f} with {outcome.best_params}")
    print(f"MLflow parent run {outcome.parent_run_id} (experiment id {outcome.experiment_id})")
    return 0


if __name__ == "__main__":
    run_job(main)
