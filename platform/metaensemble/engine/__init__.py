"""The Ray Train side: one engine for every method (DDP, AMP, checkpoints, resume, MLflow).

The driver-side names load on first use: a Ray Train worker imports ``engine.loop``,
which brings this package in first, and must not pay for the driver's MLflow client."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RunOutcome", "check_pack", "ensure_ray", "evaluate", "fit", "fit_pack", "scaling_config", "validate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("metaensemble.engine.trainer"), name)
    raise AttributeError(f"module 'metaensemble.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
