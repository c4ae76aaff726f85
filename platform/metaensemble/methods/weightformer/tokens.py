"""Neuron tokens: a network's state dict <-> one row of numbers per output unit.

A *layer* is a weight-bearing module (conv, linear, ...) in forward order, merged with
the normalisation layer that follows it when that layer has one value per output unit
(BatchNorm affine + running statistics, LayerNorm affine). Row ``r`` of a layer is the
flattened incoming weights of output unit ``r``, then its bias, then its norm values:

    conv [C_out, C_in, 3, 3] + bias [C_out] + BN (weight, bias, running_mean, running_var)
    -> rows [C_out, C_in*9 + 1 + 4]

Tensors of modules that no such layer owns (a LayerNorm before a linear, a class token,
a position embedding) are layers of their own, one row per leading index. Integer
buffers (``num_batches_tracked``) are not generated; the student takes the anchor's.

For an ensemble of K teachers a layer's token sequence is ``[cross]`` followed by
teacher 1's rows, then teacher 2's, ...: teacher k's row r is token ``1 + k*C_out + r``
(k from 0), with model id ``k + 1`` and relative position ``r``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Segment:
    """One tensor's share of a row: ``key``'s row r is ``row[start:start + width]``."""

    key: str
    shape: tuple[int, ...]
    start: int
    width: int


@dataclass(frozen=True)
class LayerSpec:
    name: str
    rows: int
    segments: tuple[Segment, ...]

    @property
    def row_len(self) -> int:
        return sum(s.width for s in self.segments)


@dataclass(frozen=True)
class Layout:
    """How a state dict maps to per-layer row matrices (see the module docstring)."""

    layers: tuple[LayerSpec, ...]
    passthrough: tuple[str, ...]
    dtypes: dict[str, torch.dtype]

    @property
    def keys(self) -> list[str]:
        return [s.key for layer in self.layers for s in layer.segments] + list(self.passthrough)

    def num_values(self) -> int:
        return sum(layer.rows * layer.row_len for layer in self.layers)


def token_index(k: int, r: int, rows: int) -> int:
    """Position of teacher ``k``'s (0-based) row ``r`` in a layer's token sequence."""
    return 1 + k * rows + r


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules holding tensors directly, in the order a forward pass calls
    them; modules a forward does not reach follow in registration order."""
    order: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: order.append(n) if n not in order else None))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    seen = set(order)
    for name, m in model.named_modules():
        if name not in seen and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))):
            order.append(name)
    return order


def build_layout(model: nn.Module, example: torch.Tensor) -> Layout:
    """The token layout of ``model`` (``example``: one input batch, e.g. zeros [2, C, H, W])."""
    modules = dict(model.named_modules())
    state = model.state_dict()
    layers: list[dict] = []
    passthrough: list[str] = []
    for name in forward_order(model, example):
        m = modules[name]
        prefix = f"{name}." if name else ""
        tensors = [(prefix + n, t) for n, t in _direct_tensors(m) if prefix + n in state]
        floats = [(k, t) for k, t in tensors if t.is_floating_point()]
        passthrough += [k for k, t in tensors if not t.is_floating_point()]
        if not floats:
            continue
        groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for k, t in floats:
            groups.setdefault(t.shape[0] if t.ndim else 1, []).append((k, t))
        prev = layers[-1] if layers else None
        if (isinstance(m, _NORMS) and len(groups) == 1 and prev is not None and prev["primary"]
                and not prev["has_norm"] and prev["rows"] == next(iter(groups))):
            prev["tensors"] += floats
            prev["has_norm"] = True
            continue
        for rows, group in groups.items():
            layers.append({"name": name, "rows": rows, "tensors": group, "has_norm": False,
                           "primary": not isinstance(m, _NORMS) and any(t.ndim >= 2 for _, t in group)})
    specs = []
    for layer in layers:
        segs, start = [], 0
        for k, t in layer["tensors"]:
            width = max(1, t.numel() // layer["rows"])
            segs.append(Segment(k, tuple(t.shape), start, width))
            start += width
        specs.append(LayerSpec(layer["name"], layer["rows"], tuple(segs)))
    return Layout(tuple(specs), tuple(passthrough), {k: v.dtype for k, v in state.items()})


def _direct_tensors(m: nn.Module):
    yield from m.named_parameters(recurse=False)
    yield from m.named_buffers(recurse=False)


def tokenise(state: dict[str, torch.Tensor], layout: Layout) -> list[torch.Tensor]:
    """Per layer, the rows [C_out, row_len] (float32) of one network's state dict."""
    out = []
    for layer in layout.layers:
        out.append(torch.cat([state[s.key].reshape(layer.rows, s.width).float() for s in layer.segments], dim=1))
    return out


def detokenise(rows: list[torch.Tensor], layout: Layout, like: dict[str, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
    """The state dict of one network's per-layer rows ``rows[l]`` [C_out, row_len]: the
    inverse of ``tokenise``, differentiable. ``like`` supplies the passthrough tensors
    (the anchor's integer buffers)."""
    out: dict[str, torch.Tensor] = {}
    for layer, r in zip(layout.layers, rows, strict=True):
        if tuple(r.shape) != (layer.rows, layer.row_len):
            raise ValueError(f"layer {layer.name}: rows of shape {tuple(r.shape)}, layout wants {(layer.rows, layer.row_len)}")
        for s in layer.segments:
            out[s.key] = r[:, s.start:s.start + s.width].reshape(s.shape).to(layout.dtypes[s.key])
    if like is not None:
        for k in layout.passthrough:
            out[k] = like[k]
    return out


def stack_ensemble(teacher_rows: list[list[torch.Tensor]], order: list[int] | None = None) -> list[torch.Tensor]:
    """Per layer, [K, C_out, row_len] for teachers in ``order`` (default: as given)."""
    order = list(range(len(teacher_rows))) if order is None else order
    return [torch.stack([teacher_rows[k][li] for k in order]) for li in range(len(teacher_rows[0]))]


def segment_ids(layer: LayerSpec) -> torch.Tensor:
    """[row_len] index of the segment each column belongs to."""
    return torch.cat([torch.full((s.width,), i, dtype=torch.long) for i, s in enumerate(layer.segments)])


def num_chunks(layer: LayerSpec, chunk: int) -> int:
    return math.ceil(layer.row_len / chunk)
