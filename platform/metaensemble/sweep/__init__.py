"""The Ray Tune side: search-space files -> Tuner of engine runs."""

from metaensemble.sweep.runner import (
    SweepOutcome,
    concurrency,
    format_trials,
    launch,
    run_sweep,
    train_configs,
)
from metaensemble.sweep.space import SearchSpace, load_space

__all__ = ["SearchSpace", "SweepOutcome", "concurrency", "format_trials", "launch", "load_space", "run_sweep", "train_configs"]
