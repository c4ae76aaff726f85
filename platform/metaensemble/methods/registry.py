"""The method registry (torch-free): every method's name, engine class and the config
sections it reads, found by folder.

A method is a folder under ``methods/`` whose ``config.py`` (no torch) declares

    SECTIONS = {"meta": MetaConfig}                 # the config sections it owns (cfg.meta)
    METHODS = {"weightformer": {                    # the methods it implements
        "impl": "metaensemble.methods.weightformer.method:WeightFormerMethod",
        "sections": ("distill", "meta"),            # what it reads; only these name its runs
        "models": ("weightformer", "mlp_generator"),  # architectures that live with it,
        "models_module": "metaensemble.methods.weightformer.generator",  # registered there
    }}

Importing this module imports every such ``config.py`` and declares the sections to the
schema (``config.declare_methods``). Nothing else lists the methods, and neither the
schema nor any method imports this module; an engine class is imported only when a run
is built.

    registry.names()                # ["fusion", "kd", ...]
    registry.method_class("kd")     # -> EnsembleKD (imports it)
    registry.build(cfg)             # an instance for cfg.method
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaensemble import config
from metaensemble.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """What is known of a method without importing it."""

    name: str
    impl: str
    """``module:Class`` of the engine method."""
    sections: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    models_module: str | None = None


def _discover() -> tuple[dict[str, MethodSpec], dict[str, type[config.Section]]]:
    methods = {"supervised": MethodSpec("supervised", "metaensemble.methods.base:Method")}
    sections: dict[str, type[config.Section]] = {}
    here = Path(__file__).parent
    for folder in sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.ispkg):
        if not (here / folder / "config.py").is_file():
            continue
        module = importlib.import_module(f"metaensemble.methods.{folder}.config")
        for name, cls in getattr(module, "SECTIONS", {}).items():
            if name in sections:
                raise ValueError(f"config section {name!r} is declared twice (again by methods/{folder})")
            sections[name] = cls
        for name, decl in getattr(module, "METHODS", {}).items():
            if name in methods:
                raise ValueError(f"method {name!r} is declared twice (again by methods/{folder})")
            methods[name] = MethodSpec(name, decl["impl"], tuple(decl.get("sections", ())),
                                       tuple(decl.get("models", ())), decl.get("models_module"))
    return methods, sections


_METHODS, _SECTIONS = _discover()
config.declare_methods(_SECTIONS, {name: spec.sections for name, spec in _METHODS.items()})


def spec(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(names())}")
    return _METHODS[name]


def check_name(name: str) -> None:
    spec(name)


def names() -> list[str]:
    return sorted(_METHODS)


def model_modules() -> dict[str, str]:
    """Architecture name -> the module that registers it, for architectures owned by methods."""
    return {a: s.models_module for s in _METHODS.values() for a in s.models if s.models_module}


def method_class(name: str) -> type:
    """The engine method class registered as ``name`` (imports it)."""
    module, _, attr = spec(name).impl.partition(":")
    return getattr(importlib.import_module(module), attr)


def build(cfg: config.Config) -> Any:
    return method_class(cfg.method)(cfg)
