"""Learned soup (Wortsman et al. 2022), by layer: per-layer mixing coefficients over the
K ingredients, fit on the val split by gradient descent.

A layer is a module that owns parameters directly (a conv with its bias, a BatchNorm's
affine pair): its tensors share one coefficient vector alpha [K], softmax-normalised, so
each layer of the soup is a convex combination of the ingredients' same layer. The
student is run through ``torch.func.functional_call`` so the loss reaches alpha.

While fitting, BatchNorm layers normalise with each batch's own statistics (train mode)
and every other module is in eval mode (no dropout): the mixed weights have no running
statistics of their own until the final BN recompute, the same as every other soup's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Hashable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from metaensemble.methods.soups.ingredients import State, average, check_ingredients
from metaensemble.methods.soups.soup import Soup, bake, score

Groups = list[tuple[str, list[str]]]


def layer_groups(model: nn.Module) -> Groups:
    """``model``'s layers in registration order: (module name, its parameter names)."""
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return list(groups.items())


def mix(stacked: dict[str, torch.Tensor], groups: Groups, logits: torch.Tensor) -> State:
    """The soup's parameters: layer g's tensors are sum_k softmax(logits[g])_k * ingredient
    k's. ``stacked``: parameter name -> [K, *shape] float32; ``logits``: [G, K]."""
    out = {}
    for (_, names), row in zip(groups, logits, strict=True):
        w = torch.softmax(row, 0)
        for n in names:
            out[n] = torch.tensordot(w, stacked[n], dims=1)
    return out


def fitting_mode(model: nn.Module) -> nn.Module:
    """Eval mode except BatchNorm layers, which normalise with batch statistics."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return model


def soup_logits(skeleton: nn.Module, params: State, buffers: State, x: torch.Tensor) -> torch.Tensor:
    """``skeleton`` run with ``params``; buffers as fresh detached copies (a train-mode BN
    updates them in place, and they take no gradient)."""
    fresh = {k: v.detach().clone() for k, v in buffers.items()}
    return functional_call(skeleton, {**fresh, **params}, (x,))


def learned_soup(states: Sequence[State], model: nn.Module, bn_loader: Iterable, val_loader: Iterable,
                 *, parents: Sequence[Hashable | None] | None = None, epochs: int = 10,
                 lr: float = 0.05) -> Soup:
    """Learned soup by layer: coefficients start uniform (logits 0) and take ``epochs``
    passes of Adam (``lr``) over ``val_loader``'s batches, in their order, minimising
    cross-entropy; then the mixed weights get their BN statistics recomputed on
    ``bn_loader`` and are scored on val. No randomness: the same inputs give the same soup."""
    t0 = time.perf_counter()
    check_ingredients(states, model, parents)
    if epochs < 1 or lr <= 0:
        raise ValueError(f"learned soup needs epochs >= 1 and lr > 0; got epochs={epochs}, lr={lr}")
    skeleton = fitting_mode(copy.deepcopy(model))
    dev = next(skeleton.parameters()).device
    groups = layer_groups(skeleton)
    stacked = {n: torch.stack([s[n].detach().to(dev, torch.float32) for s in states])
               for _, names in groups for n in names}
    buffers = {k: v.to(dev) for k, v in average(states).items() if k not in stacked}
    logits = fit_coefficients(skeleton, stacked, groups, buffers, val_loader, epochs, lr)
    with torch.no_grad():
        mixed = mix(stacked, groups, logits)
    like = model.state_dict()
    state = {**buffers, **{k: v.to(like[k].dtype) for k, v in mixed.items()}}
    net = bake(model, state, bn_loader)
    coefficients = {g: torch.softmax(row, 0).tolist() for (g, _), row in zip(groups, logits, strict=True)}
    return Soup(net, list(range(len(states))), score(net, val_loader), time.perf_counter() - t0,
                coefficients=coefficients)


def fit_coefficients(skeleton: nn.Module, stacked: dict[str, torch.Tensor], groups: Groups, buffers: State,
                     val_loader: Iterable, epochs: int, lr: float) -> torch.Tensor:
    """The mixing logits [G, K] after ``epochs`` Adam passes over ``val_loader``."""
    k = next(iter(stacked.values())).shape[0]
    logits = torch.zeros(len(groups), k, device=next(iter(stacked.values())).device, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in range(epochs):
        for batch in val_loader:
            out = soup_logits(skeleton, mix(stacked, groups, logits), buffers, batch["x"])
            loss = F.cross_entropy(out.float(), batch["y"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return logits.detach()
