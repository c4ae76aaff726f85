"""Permutation alignment of a teacher to a reference ("weight matching", Ainsworth et
al., "Git Re-Basin", ICLR 2023; one forward pass, as OT fusion's weight metric does).

Hidden units of a network can be reordered without changing its function: for a chain of
layers with permutation matrices P_l (outputs of layer l), the state

    W_l' = P_l W_l P_{l-1}^T      (conv: permute dim 0 by P_l, dim 1 by P_{l-1})
    b_l' = P_l b_l, BN_l' = P_l BN_l (affine and running statistics)

computes the same outputs (P_0 = I: the input; the classifier's P_L = I). Layer by
layer in forward order, P_l is the permutation minimising

    sum_r || row_r(W_l P_{l-1}^T) - row_r(W_l^ref) ||^2

over the layer's whole token rows (``tokens.tokenise``: incoming weights, bias, norm
values), solved as exact optimal transport between the two sets of rows with uniform
marginals (``metaensemble.transport``, EMD): with equal sizes the plan is a permutation
matrix scaled by 1/n. A permutation ``p`` here is a LongTensor with ``p[r]`` the unit of
``state`` matched to the reference's unit ``r``, so ``W_l' = W_l[p]``.

Only plain chains qualify (``chain``): every layer of the layout is a conv/linear layer
(with its merged norm) whose inputs are the previous layer's outputs. Residual sums,
concatenations, standalone norms and embeddings are rejected.
"""

from __future__ import annotations

import torch

from metaensemble.errors import ConfigError
from metaensemble.methods.weightformer.tokens import LayerSpec, Layout, Segment
from metaensemble.transport import ground_cost, transport

ALIGN_MODES = ("none", "permutation")

_NEEDS = ("meta.align=permutation needs a sequential student (conv/linear layers in a chain, "
          "e.g. convnet, mlp, vgg)")


def incoming_weight(layer: LayerSpec) -> Segment | None:
    """The layer's incoming-weight segment (a ``.weight`` of at least 2 dimensions: dim 0
    its units, dim 1 the units it reads)."""
    return next((s for s in layer.segments if s.key.endswith(".weight") and len(s.shape) >= 2), None)


def chain(layout: Layout) -> list[int]:
    """Indices of the layout's primary (conv/linear) layers, checked to form a chain: each
    takes as many inputs (weight dim 1) as the layer before it has outputs. Raises
    ``ConfigError`` otherwise."""
    if not layout.layers:
        raise ConfigError(f"{_NEEDS}; the layout has no layers")
    prev: LayerSpec | None = None
    for layer in layout.layers:
        w = incoming_weight(layer)
        if w is None:
            raise ConfigError(f"{_NEEDS}; layer {layer.name} ({', '.join(s.key for s in layer.segments)}) "
                              "is not a conv/linear layer (a standalone norm, embedding or token)")
        if prev is not None and w.shape[1] != prev.rows:
            raise ConfigError(f"{_NEEDS}; layer {layer.name} takes {w.shape[1]} inputs but the layer before it "
                              f"({prev.name}) has {prev.rows} outputs")
        prev = layer
    return list(range(len(layout.layers)))


def _rows(state: dict[str, torch.Tensor], layer: LayerSpec, p_in: torch.Tensor | None) -> torch.Tensor:
    """The layer's token rows [C_out, row_len] with its inputs reordered by ``p_in``."""
    parts, w = [], incoming_weight(layer)
    for s in layer.segments:
        t = state[s.key]
        if p_in is not None and s is w:
            t = t.index_select(1, p_in.to(t.device))
        parts.append(t.detach().reshape(layer.rows, s.width).float().cpu())
    return torch.cat(parts, dim=1)


def permutation_to(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                   layout: Layout) -> list[torch.Tensor]:
    """Per chain layer but the last (the classifier), the permutation ``p`` [rows] (CPU
    long) matching ``state``'s unit ``p[r]`` to ``reference``'s unit ``r``."""
    idx = chain(layout)
    perms: list[torch.Tensor] = []
    p_in = None
    for i in idx[:-1]:
        layer = layout.layers[i]
        cost = ground_cost(_rows(state, layer, p_in), _rows(reference, layer, None), "sqeuclidean")
        p = transport(cost, "emd").argmax(dim=0)
        if not torch.equal(p.sort().values, torch.arange(layer.rows)):
            raise RuntimeError(f"layer {layer.name}: the transport plan is not a permutation")
        perms.append(p)
        p_in = p
    return perms


def apply_permutation(state: dict[str, torch.Tensor], perms: list[torch.Tensor],
                      layout: Layout) -> dict[str, torch.Tensor]:
    """A new state dict computing the same function: chain layer ``i``'s outputs (every
    tensor of the layer: weight rows, bias, norm values) reordered by ``perms[i]``, and the
    next layer's inputs (weight dim 1) alike. Other tensors (integer buffers, the
    classifier's outputs) are the given ones, not copies."""
    idx = chain(layout)
    if len(perms) != len(idx) - 1:
        raise ValueError(f"{len(perms)} permutations for a chain of {len(idx)} layers (want {len(idx) - 1})")
    out = dict(state)
    for i, p in zip(idx[:-1], perms, strict=True):
        layer, nxt = layout.layers[i], layout.layers[i + 1]
        if tuple(p.shape) != (layer.rows,):
            raise ValueError(f"layer {layer.name}: a permutation of shape {tuple(p.shape)}, want ({layer.rows},)")
        for s in layer.segments:
            out[s.key] = out[s.key].index_select(0, p.to(out[s.key].device))
        w = incoming_weight(nxt).key
        out[w] = out[w].index_select(1, p.to(out[w].device))
    return out


def align_to(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
             layout: Layout) -> dict[str, torch.Tensor]:
    """``state`` with its hidden units reordered to match ``reference``'s (same function)."""
    return apply_permutation(state, permutation_to(state, reference, layout), layout)


def align_states(states: list[dict[str, torch.Tensor]], reference: dict[str, torch.Tensor],
                 layout: Layout, mode: str) -> list[dict[str, torch.Tensor]]:
    """``states`` as given (``mode="none"``) or each aligned to ``reference``
    (``"permutation"``)."""
    if mode not in ALIGN_MODES:
        raise ConfigError(f"meta.align must be one of {', '.join(ALIGN_MODES)}; got {mode!r}")
    if mode == "none":
        return list(states)
    return [align_to(s, reference, layout) for s in states]
