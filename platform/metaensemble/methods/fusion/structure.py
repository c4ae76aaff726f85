"""What fusion needs to know about a network: its layers in forward order, which neuron
map each layer's input is expressed in, where residual streams add up, and the hidden
layers cross-layer alignment may map (per stage).

Families: ``mlp``, VGG (``vgg``, ``vgg11``/``vgg13`` and their ``_bn`` variants) and
ResNet (``resnet``, ``resnet18/34/50``), and the digits ``convnet`` (one depth: OT fusion
only, no cross-layer alignment). ``generic_spec`` rewrites a model's registry
spec in the family's generic descriptor (``mlp`` hidden widths, ``vgg`` plan, ``resnet``
blocks per stage), the form a depth-balanced or fused network is described in.

Maps are keyed by name: ``"input"`` is the network input (the identity), a layer's own
map is keyed by its module path, and a residual sum's by the block's path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from metaensemble.errors import ConfigError

FAMILIES = {"mlp": "mlp", "vgg": "vgg", "vgg11": "vgg", "vgg13": "vgg", "vgg11_bn": "vgg", "vgg13_bn": "vgg",
            "resnet": "resnet", "resnet18": "resnet", "resnet34": "resnet", "resnet50": "resnet",
            "convnet": "convnet"}


@dataclass(frozen=True)
class Layer:
    """One weight layer (``nn.Linear`` or ``nn.Conv2d``) at module path ``name``."""

    name: str
    kind: str
    """"linear" or "conv"."""
    bn: str | None
    """The BatchNorm right after it (its affine parameters move with the layer's map)."""
    input: str
    """Key of the map its input (weight columns / input channels) is aligned with."""
    move_with: str | None = None
    """Key of the map its outputs are moved with, when not its own (a residual sum's)."""
    classifier: bool = False
    """The class layer: outputs never permuted."""


@dataclass(frozen=True)
class Sum:
    """A residual sum: its map (key ``key``) is the average of ``parts``' maps."""

    key: str
    parts: tuple[str, ...]


@dataclass
class Structure:
    family: str
    steps: list[Layer | Sum]
    """Forward order; a Sum comes after the layers it averages and before the ones it moves."""
    stages: list[list[str]] = field(default_factory=list)
    """Cross-layer alignment units per stage: hidden linears (mlp), convs per pooling stage
    (vgg), residual blocks per stage (resnet); excludes the stem and the classifier."""

    def layers(self) -> list[Layer]:
        return [s for s in self.steps if isinstance(s, Layer)]


def family(arch: str) -> str:
    if arch not in FAMILIES:
        raise ConfigError(f"fusion supports the mlp, VGG, ResNet and convnet families ({', '.join(sorted(FAMILIES))}); "
                          f"got {arch!r}")
    return FAMILIES[arch]


def spec_of(model: nn.Module) -> dict[str, Any]:
    spec = getattr(model, "me_spec", None)
    if spec is None:
        raise ConfigError("fusion needs models built by the registry (create_model or a checkpoint); "
                          f"this {type(model).__name__} has no me_spec")
    return spec


def generic_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` ({"arch", "kwargs"}) in its family's generic descriptor."""
    from metaensemble.models.resnet import RESNET_LAYERS
    from metaensemble.models.vgg import plan_of

    arch, kw = spec["arch"], dict(spec["kwargs"])
    fam = family(arch)
    if fam == "vgg" and arch != "vgg":
        mult = kw.pop("width_mult", 1.0)
        kw = {**kw, "plan": plan_of(arch, mult), "batch_norm": arch.endswith("_bn")}
        kw.setdefault("bias", True)
        return {"arch": "vgg", "kwargs": kw}
    if fam == "resnet" and arch != "resnet":
        layers, block = RESNET_LAYERS[arch]
        return {"arch": "resnet", "kwargs": {**kw, "layers": list(layers), "block": block}}
    return {"arch": arch, "kwargs": kw}


def _bn_after(mods: list[tuple[str, nn.Module]], i: int) -> str | None:
    if i + 1 < len(mods) and isinstance(mods[i + 1][1], nn.BatchNorm2d | nn.BatchNorm1d):
        return mods[i + 1][0]
    return None


def structure(model: nn.Module) -> Structure:
    """The fusion structure of a registry model of a supported family."""
    fam = family(spec_of(model)["arch"])
    if fam == "mlp":
        return _mlp(model)
    if fam == "vgg":
        return _vgg(model)
    if fam == "convnet":
        return _convnet(model)
    return _resnet(model)


def _mlp(model: nn.Module) -> Structure:
    linears = [(n, m) for n, m in model.named_children() if isinstance(m, nn.Linear)]
    steps: list[Layer | Sum] = []
    prev = "input"
    for i, (name, _) in enumerate(linears):
        last = i == len(linears) - 1
        steps.append(Layer(name, "linear", None, prev, classifier=last))
        prev = name
    return Structure("mlp", steps, [[n for n, _ in linears[:-1]]])


def _vgg(model: nn.Module) -> Structure:
    mods = list(model.features.named_children())
    steps: list[Layer | Sum] = []
    stages: list[list[str]] = [[]]
    prev = "input"
    for i, (idx, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            bn = _bn_after(mods, i)
            name = f"features.{idx}"
            steps.append(Layer(name, "conv", f"features.{bn}" if bn else None, prev))
            stages[-1].append(name)
            prev = name
        elif isinstance(m, nn.MaxPool2d) and stages[-1]:
            stages.append([])
    steps.append(Layer("classifier", "linear", None, prev, classifier=True))
    return Structure("vgg", steps, [s for s in stages if s])


def _convnet(model: nn.Module) -> Structure:
    """The digits convnet (``models/small.py``): one flat Sequential of conv (+ BN) + ReLU
    blocks, max-pools between them, global pooling and a linear classifier. A VGG without
    the ``features``/``classifier`` split: each pooling chunk is a stage."""
    mods = list(model.named_children())
    steps: list[Layer | Sum] = []
    stages: list[list[str]] = [[]]
    prev = "input"
    for i, (name, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            steps.append(Layer(name, "conv", _bn_after(mods, i), prev))
            stages[-1].append(name)
            prev = name
        elif isinstance(m, nn.MaxPool2d) and stages[-1]:
            stages.append([])
        elif isinstance(m, nn.Linear):
            steps.append(Layer(name, "linear", None, prev, classifier=True))
    return Structure("convnet", steps, [s for s in stages if s])


def _norm_name(block: nn.Module, prefix: str, attr: str) -> str | None:
    return f"{prefix}.{attr}" if isinstance(getattr(block, attr), nn.BatchNorm2d) else None


def _resnet(model: nn.Module) -> Structure:
    steps: list[Layer | Sum] = []
    stem = list(model.stem.named_children())
    steps.append(Layer("stem.0", "conv", f"stem.{stem[1][0]}" if isinstance(stem[1][1], nn.BatchNorm2d) else None,
                       "input"))
    stream = "stem.0"
    stages: list[list[str]] = []
    for s in range(1, 5):
        stage = getattr(model, f"layer{s}")
        names = []
        for j, block in enumerate(stage):
            p = f"layer{s}.{j}"
            names.append(p)
            convs = [a for a in ("conv1", "conv2", "conv3") if hasattr(block, a)]
            prev = stream
            for k, a in enumerate(convs):
                last = k == len(convs) - 1
                steps.append(Layer(f"{p}.{a}", "conv", _norm_name(block, p, f"bn{k + 1}"), prev,
                                   move_with=p if last else None))
                prev = f"{p}.{a}"
            if isinstance(block.shortcut, nn.Sequential):
                sc_bn = f"{p}.shortcut.1" if isinstance(block.shortcut[1], nn.BatchNorm2d) else None
                steps.append(Layer(f"{p}.shortcut.0", "conv", sc_bn, stream, move_with=p))
                parts = (prev, f"{p}.shortcut.0")
            else:
                parts = (prev, stream)
            steps.append(Sum(p, parts))
            stream = p
        stages.append(names)
    steps.append(Layer("fc", "linear", None, stream, classifier=True))
    return Structure("resnet", steps, stages)


@torch.no_grad()
def capture(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of ``modules`` (key -> submodule of ``model``) on one eval-mode
    forward of ``x``, detached copies (an in-place ReLU would overwrite them); the
    model's train/eval mode is restored."""
    out: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, y, k=k: out.__setitem__(k, y.detach().clone()))
               for k, m in modules.items()]
    was = model.training
    try:
        model.eval()
        model(x.to(next(model.parameters()).device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return out
