"""ResNet-18/34/50 (CIFAR or ImageNet stem, optional no-BN variant) and the
pre-activation Wide ResNet of the ensemble-distillation recipe."""

from __future__ import annotations

import torch.nn as nn

from metaensemble.models.registry import register_model


def _norm(c: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if enabled else nn.Identity()


def _shortcut(cin: int, cout: int, stride: int, norm: bool) -> nn.Module:
    """Identity, or a strided 1x1 projection where the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not norm), _norm(cout, norm))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: bool) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=not norm)
        self.bn1 = _norm(planes, norm)
        self.conv2 = nn.Conv2d(planes, out, 3, 1, 1, bias=not norm)
        self.bn2 = _norm(out, norm)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, out, stride, norm)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: bool) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=not norm)
        self.bn1 = _norm(planes, norm)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=not norm)
        self.bn2 = _norm(planes, norm)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=not norm)
        self.bn3 = _norm(out, norm)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, out, stride, norm)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes: int, in_chans: int, stem: str, norm: bool,
                 width: int = 64) -> None:
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, width, 7, 2, 3, bias=not norm), _norm(width, norm),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, width, 3, 1, 1, bias=not norm), _norm(width, norm), nn.ReLU(inplace=True)
            )
        cin, stages = width, []
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1, norm))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def _resnet(block, layers):
    def build(num_classes: int, in_chans: int, img_size: int, stem: str | None = None,
              norm: bool = True, width: int = 64) -> nn.Module:
        chosen = stem or ("imagenet" if img_size >= 128 else "cifar")
        if chosen not in ("cifar", "imagenet"):
            from metaensemble.errors import ConfigError

            raise ConfigError(f"resnet stem must be 'cifar' or 'imagenet', got {stem!r}")
        return ResNet(block, layers, num_classes, in_chans, chosen, norm, width)

    return build


register_model("resnet18")(_resnet(BasicBlock, [2, 2, 2, 2]))
_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


@register_model("resnet")
def resnet(num_classes: int, in_chans: int, img_size: int, layers: tuple = (2, 2, 2, 2), block: str = "basic",
           width: int = 64, stem: str | None = None, norm: bool = True) -> nn.Module:
    """Any four-stage ResNet (blocks per stage, block type, base width): the descriptor of
    depth-balanced and fused ResNets (``resnet18`` is ``resnet`` with layers [2, 2, 2, 2])."""
    from metaensemble.errors import ConfigError

    if block not in _BLOCKS:
        raise ConfigError(f"resnet block must be one of {sorted(_BLOCKS)}, got {block!r}")
    layers = list(layers)
    if len(layers) != 4 or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in layers):
        raise ConfigError(f"resnet layers must be four positive block counts, got {layers}")
    if not isinstance(width, int) or width < 1:
        raise ConfigError(f"resnet width must be a positive int, got {width!r}")
    return _resnet(_BLOCKS[block], layers)(num_classes, in_chans, img_size, stem=stem, norm=norm, width=width)


RESNET_LAYERS = {"resnet18": ([2, 2, 2, 2], "basic"), "resnet34": ([3, 4, 6, 3], "basic"),
                 "resnet50": ([3, 4, 6, 3], "bottleneck")}
register_model("resnet34")(_resnet(BasicBlock, [3, 4, 6, 3]))
register_model("resnet50")(_resnet(Bottleneck, [3, 4, 6, 3]))


# ---- pre-activation Wide ResNet --------------------------------------------------------
class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn_momentum: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu(self.bn1(x))
        skip = self.shortcut(o) if self.shortcut is not None else x
        y = self.conv1(o)
        y = self.conv2(self.relu(self.bn2(y)))
        return y + skip


class WideResNet(nn.Module):
    """Pre-activation WRN-depth-k: widths 16, 16k, 32k, 64k (64/128/256 for WRN-28-4); a
    fractional k rounds each to the nearest channel count (scaled ensembles)."""

    def __init__(self, depth: int, widen_factor: float, num_classes: int, in_chans: int,
                 bn_momentum: float = 0.1) -> None:
        super().__init__()
        if (depth - 4) % 6:
            from metaensemble.errors import ConfigError

            raise ConfigError(f"wrn depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        if widen_factor <= 0 or round(16 * widen_factor) < 1:
            from metaensemble.errors import ConfigError

            raise ConfigError(f"wrn widen_factor must give at least one channel per stage, got {widen_factor}")
        widths = [16] + [int(round(b * widen_factor)) for b in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(PreActBlock(cin, w, 2 if (j == 0 and i > 0) else 1, bn_momentum))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@register_model("wrn")
def wrn(num_classes: int, in_chans: int, img_size: int, depth: int = 28, widen_factor: float = 4,
        bn_momentum: float = 0.1) -> nn.Module:
    return WideResNet(depth, widen_factor, num_classes, in_chans, bn_momentum)
