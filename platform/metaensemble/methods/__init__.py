"""Method registry: name -> Method subclass (supervised, kd, weightformer; later issues add more)."""

from metaensemble.methods.base import Method
from metaensemble.methods.kd import EnsembleKD
from metaensemble.methods.weightformer import WeightFormerMethod
from metaensemble.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")
METHODS.add("supervised", Method)
METHODS.add("kd", EnsembleKD)
METHODS.add("weightformer", WeightFormerMethod)


def check_name(name: str) -> None:
    METHODS.check(name)


def build(cfg) -> Method:
    return METHODS.get(cfg.method)(cfg)


__all__ = ["METHODS", "Method", "build", "check_name"]
