"""Learngene via stage-wise weight sharing (Xia et al., IJCAI 2024;
docs/learngene.md): an aux-net whose layers share one block per stage is
distilled from a teacher; its stage blocks (the learngene) initialise plain ViTs of any depth.

    config     the ``learngene`` section (torch-free, read by the method registry)
    model      AuxViT, DescendantViT (registered models), the stage layout, ``expand``
    original   loading the original code's checkpoint.pth into an AuxViT
    teacher    the aux-net's teacher (zoo, URI or file), shared by the method and the job
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "model": ("AuxViT", "DescendantViT", "check_layers_source", "default_layers_source", "expand",
              "learngene_state", "parse_stages"),
    "original": ("load_original", "to_original_state"),
}


def __getattr__(name: str) -> Any:
    # Lazily, so that the method registry can import learngene.config without importing torch.
    for module, names in _MODULES.items():
        if name in names:
            return getattr(importlib.import_module(f"metaensemble.methods.learngene.{module}"), name)
    raise AttributeError(name)
