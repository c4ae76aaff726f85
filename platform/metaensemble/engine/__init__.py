"""The Ray Train side: one engine for every method (DDP, AMP, checkpoints, resume, MLflow)."""

from metaensemble.engine.trainer import RunOutcome, ensure_ray, fit, scaling_config, validate

__all__ = ["RunOutcome", "ensure_ray", "fit", "scaling_config", "validate"]
