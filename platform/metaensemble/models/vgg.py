"""VGG-11/13 in the CIFAR style used by OT fusion: conv features (optionally without
BatchNorm and/or bias, as weight-matching fusion wants) and one linear classifier."""

from __future__ import annotations

import torch.nn as nn

from metaensemble.models.registry import register_model

_PLANS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, plan, num_classes: int, in_chans: int, batch_norm: bool, bias: bool,
                 width_mult: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for v in plan:
            if v == "M":
                # ceil_mode keeps a 1x1 map at 1x1, so small inputs (digits) still work.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            out = max(1, int(v * width_mult))
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes, bias=bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _make(plan_name: str, batch_norm: bool):
    def build(num_classes: int, in_chans: int, img_size: int, bias: bool = True,
              width_mult: float = 1.0) -> nn.Module:
        return VGG(_PLANS[plan_name], num_classes, in_chans, batch_norm, bias, width_mult)

    return build


for _name in _PLANS:
    register_model(_name)(_make(_name, batch_norm=False))
    register_model(f"{_name}_bn")(_make(_name, batch_norm=True))


def check_plan(plan) -> list:
    """A VGG plan: conv widths (positive ints) and "M" (2x2 max-pool), at least one conv."""
    from metaensemble.errors import ConfigError

    out = []
    for v in plan:
        if v == "M" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            out.append(v)
        else:
            raise ConfigError(f"vgg plan entries are positive conv widths or 'M' (max-pool), got {v!r} in {list(plan)}")
    if not any(v != "M" for v in out):
        raise ConfigError(f"vgg plan needs at least one conv width, got {list(plan)}")
    return out


@register_model("vgg")
def vgg(num_classes: int, in_chans: int, img_size: int, plan: tuple = tuple(_PLANS["vgg11"]),
        batch_norm: bool = False, bias: bool = True) -> nn.Module:
    """Any VGG-style plan (conv widths and "M"): the descriptor of depth-balanced and fused
    VGGs (``vgg11`` with ``width_mult=0.5`` is ``vgg`` with the halved plan)."""
    return VGG(check_plan(plan), num_classes, in_chans, batch_norm, bias)


def plan_of(arch: str, width_mult: float = 1.0) -> list:
    """The explicit plan of a named VGG (``vgg11``, ``vgg13_bn``, ...) at ``width_mult``."""
    base = _PLANS[arch.removesuffix("_bn")]
    return [v if v == "M" else max(1, int(v * width_mult)) for v in base]
