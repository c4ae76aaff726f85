"""The methods: ``base`` (the contract every engine method implements), ``distill``
(ensemble distillation, shared by the methods that distil) and one folder per method.
``registry`` (torch-free) finds them by folder.

    methods.method_class("kd")     # -> EnsembleKD
    methods.build(cfg)             # -> an instance for cfg.method
"""

from __future__ import annotations

from typing import Any

from metaensemble.methods.registry import build, check_name, method_class, names


def __getattr__(name: str) -> Any:
    if name == "Method":  # lazily: the package stays torch-free
        from metaensemble.methods.base import Method

        return Method
    raise AttributeError(name)


__all__ = ["Method", "build", "check_name", "method_class", "names"]
