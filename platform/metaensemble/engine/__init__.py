"""The Ray Train side: one engine for every method (DDP, AMP, checkpoints, resume, MLflow)."""

from metaensemble.engine.trainer import (
    RunOutcome,
    check_pack,
    ensure_ray,
    evaluate,
    fit,
    fit_pack,
    scaling_config,
    validate,
)

__all__ = ["RunOutcome", "check_pack", "ensure_ray", "evaluate", "fit", "fit_pack", "scaling_config", "validate"]
