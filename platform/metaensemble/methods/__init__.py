"""Method registry: name -> Method subclass. Later issues add kd, latentbe, fusion, ..."""

from metaensemble.methods.base import Method
from metaensemble.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")
METHODS.add("supervised", Method)


def check_name(name: str) -> None:
    METHODS.check(name)


def build(cfg) -> Method:
    return METHODS.get(cfg.method)(cfg)


__all__ = ["METHODS", "Method", "build", "check_name"]
