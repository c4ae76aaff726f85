"""The architecture registry: ``create_model(name, num_classes=, in_chans=, img_size=, **kw)``.

Every model built here remembers how it was built (``model.me_spec``), which is what a
checkpoint's model.json stores so the model can be rebuilt without unpickling.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from metaensemble.errors import ConfigError
from metaensemble.registry import Registry


class _ModelRegistry(Registry):
    """The architecture registry, plus architectures that live with their method (the
    WeightFormer generators): a method declares them to the method registry (torch-free:
    ``models`` and ``models_module`` in its config.py), so this registry imports no method
    until one of them is looked up, and then only the module that registers it (the
    generators' module brings POT and SciPy: over a second of CPU in every Ray Train
    worker that only builds a convnet). Listing every name imports them all."""

    _plugins_loaded = False

    def _load(self, name: object = None) -> None:
        """Import the method module that registers ``name``; every one for no name, or for
        a name still unknown after that (its error lists every architecture)."""
        if self._plugins_loaded or (isinstance(name, str) and name in self._items):
            return
        import importlib

        from metaensemble.methods.registry import model_modules

        modules = model_modules()
        if isinstance(name, str) and name in modules:
            importlib.import_module(modules[name])
            if name in self._items:
                return
        type(self)._plugins_loaded = True
        for module in sorted(set(modules.values())):
            importlib.import_module(module)

    def check(self, name: str) -> None:
        self._load(name)
        super().check(name)

    def names(self) -> list[str]:
        self._load()
        return super().names()

    def __contains__(self, name: object) -> bool:
        self._load(name)
        return super().__contains__(name)


MODELS: Registry = _ModelRegistry("model")
_BASE_ARGS = ("num_classes", "in_chans", "img_size")


def register_model(name: str):
    return MODELS.register(name)


def model_kwargs(name: str) -> list[str]:
    """Keyword arguments a model accepts beyond num_classes/in_chans/img_size."""
    sig = inspect.signature(MODELS.get(name))
    return [p for p in sig.parameters if p not in _BASE_ARGS]


def create_model(name: str, *, num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    builder = MODELS.get(name)
    unknown = sorted(set(kwargs) - set(model_kwargs(name)))
    if unknown:
        raise ConfigError(
            f"model {name!r} does not take {', '.join(unknown)}; it takes: "
            f"{', '.join(model_kwargs(name)) or '(no extra arguments)'}"
        )
    model = builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    model.me_spec = {  # type: ignore[attr-defined]
        "arch": name,
        "kwargs": {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size, **kwargs},
    }
    return model
