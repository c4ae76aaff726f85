"""Method registry. A method is a folder here whose ``config.py`` declares it to the
schema (``register_method``: name, ``module:Class``, the sections it reads) without
importing torch; its class is imported only when a run is built.

    methods.method_class("kd")     # -> EnsembleKD
    methods.build(cfg)             # -> an instance for cfg.method
"""

from __future__ import annotations

import importlib
from typing import Any

from metaensemble.config import method_names, method_spec, register_method

register_method("supervised", "metaensemble.methods.base:Method")


def method_class(name: str) -> type:
    """The engine method class registered as ``name`` (imports it)."""
    module, _, attr = method_spec(name).impl.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_name(name: str) -> None:
    method_spec(name)


def names() -> list[str]:
    return method_names()


def build(cfg) -> Any:
    return method_class(cfg.method)(cfg)


def __getattr__(name: str) -> Any:
    if name == "Method":
        from metaensemble.methods.base import Method

        return Method
    raise AttributeError(name)


__all__ = ["Method", "build", "check_name", "method_class", "names"]
