"""Small models for digits, tests and throughput: an MLP and a compact convnet."""

from __future__ import annotations

import torch.nn as nn

from metaensemble.models.registry import register_model


@register_model("mlp")
def mlp(num_classes: int, in_chans: int, img_size: int, hidden: tuple[int, ...] = (128, 64),
        bias: bool = True) -> nn.Module:
    dims = [in_chans * img_size * img_size, *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], num_classes, bias=bias))
    return nn.Sequential(*layers)


@register_model("convnet")
def convnet(num_classes: int, in_chans: int, img_size: int, width: int = 32,
            batch_norm: bool = True) -> nn.Module:
    """Three 3x3 conv blocks (width, 2*width, 4*width), max-pool after the first two,
    global average pool, linear classifier."""

    def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        mods: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            mods.append(nn.BatchNorm2d(cout))
        mods.append(nn.ReLU(inplace=True))
        if pool:
            mods.append(nn.MaxPool2d(2, ceil_mode=True))
        return mods

    w = width
    return nn.Sequential(
        *block(in_chans, w, True), *block(w, 2 * w, True), *block(2 * w, 4 * w, False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )
