"""Ensemble knowledge distillation (``method: kd``).

    config   the ``distill`` section (torch-free, read by the schema)
    method   the loss and the engine method
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # Lazily, so that the schema can import kd.config without importing torch.
    return getattr(importlib.import_module("metaensemble.methods.kd.method"), name)
