"""LatentBE and TDiv-SDiv (Nam et al., ICML 2022): ensemble distillation into a
BatchEnsemble student that is folded into one plain network, with a diversifying
input perturbation.

    config          the ``latentbe`` section and the two methods (torch-free)
    batchensemble   BatchEnsemble Conv2d/Linear, conversion of a model, the fold
    teachers        the DE-M teachers and the checks before any work (method and job share them)
    method          the engine methods ``latentbe`` and ``tdiv_sdiv``
    experiment      the pipeline behind ``jobs/distill.py``: the paper's table
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # Lazily, so that the method registry can import latentbe.config without importing torch.
    return getattr(importlib.import_module("metaensemble.methods.latentbe.method"), name)
