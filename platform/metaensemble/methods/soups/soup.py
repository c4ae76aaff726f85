"""Uniform soup, greedy soup (Wortsman et al. 2022) and the best member, one interface.

    soup = greedy_soup(states, model, bn_loader, val_loader, parents=parents)
    soup.model, soup.members, soup.val_acc, soup.seconds

Every network scored or returned here, the ingredients included, is ``model`` holding the
weights with its BatchNorm statistics recomputed on ``bn_loader`` (``models.batchnorm``,
the library's one BN procedure), scored on ``val_loader`` in eval mode.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.methods.base import predict_logp
from metaensemble.methods.soups.ingredients import State, average, check_ingredients
from metaensemble.models.batchnorm import recompute_bn


@dataclass(frozen=True)
class Score:
    """A network's val scores: ``correct`` of ``total`` images, mean NLL (nats)."""

    correct: int
    total: int
    nll: float

    @property
    def acc(self) -> float:
        return self.correct / max(self.total, 1)


@dataclass(frozen=True)
class Offer:
    """One ingredient offered to the greedy soup and the val score of the soup with it."""

    index: int
    score: Score
    accepted: bool


@dataclass
class Soup:
    """A soup: ``model`` in eval mode, BN statistics recomputed, ready to use."""

    model: nn.Module
    members: list[int]
    """The ingredients in it, as indices into the ``states`` given (greedy: in order of acceptance)."""
    val: Score
    seconds: float
    """Wall time to make it: averaging, search or fitting, BN passes and val scoring."""
    offers: list[Offer] = field(default_factory=list)
    """Greedy soup: every ingredient in the order offered, accepted or not."""
    coefficients: dict[str, list[float]] = field(default_factory=dict)
    """Learned soup: each layer's mixing weights over the K ingredients (sum 1)."""

    @property
    def val_acc(self) -> float:
        return self.val.acc


def bake(model: nn.Module, state: State, bn_loader: Iterable) -> nn.Module:
    """A copy of ``model`` holding ``state`` (strict), BN statistics recomputed on
    ``bn_loader`` (batches ``{"x": ...}``), in eval mode."""
    net = copy.deepcopy(model)
    net.load_state_dict(state, strict=True)
    return recompute_bn(net, bn_loader)


def score(net: nn.Module, val_loader: Iterable) -> Score:
    """``net``'s eval-mode val score over ``val_loader`` (batches ``{"x", "y"}``)."""
    logp, y = predict_logp(net, val_loader)
    correct = int((logp.argmax(1) == y).sum()) if len(y) else 0
    nll = float(F.nll_loss(logp, y)) if len(y) else float("nan")
    return Score(correct, len(y), nll)


def _ranked(scores: Sequence[Score]) -> list[int]:
    """Indices by val accuracy, best first; ties keep the given order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i].correct)


def uniform_soup(states: Sequence[State], model: nn.Module, bn_loader: Iterable, val_loader: Iterable,
                 *, parents: Sequence[Hashable | None] | None = None) -> Soup:
    """The plain average of all ``states`` (integer counters: the first's), BN recomputed."""
    t0 = time.perf_counter()
    check_ingredients(states, model, parents)
    net = bake(model, average(states), bn_loader)
    return Soup(net, list(range(len(states))), score(net, val_loader), time.perf_counter() - t0)


def best_member(states: Sequence[State], model: nn.Module, bn_loader: Iterable, val_loader: Iterable,
                *, parents: Sequence[Hashable | None] | None = None) -> Soup:
    """The one ingredient with the best val accuracy (ties: the first given), BN recomputed."""
    t0 = time.perf_counter()
    check_ingredients(states, model, parents)
    nets = [bake(model, s, bn_loader) for s in states]
    scores = [score(n, val_loader) for n in nets]
    best = _ranked(scores)[0]
    return Soup(nets[best], [best], scores[best], time.perf_counter() - t0)


@torch.no_grad()
def greedy_soup(states: Sequence[State], model: nn.Module, bn_loader: Iterable, val_loader: Iterable,
                *, parents: Sequence[Hashable | None] | None = None) -> Soup:
    """Greedy soup: ingredients in order of val accuracy, best first; each next one joins
    the uniform average if the soup's val accuracy with it does not drop (>=)."""
    t0 = time.perf_counter()
    check_ingredients(states, model, parents)
    scores = [score(bake(model, s, bn_loader), val_loader) for s in states]
    order = _ranked(scores)
    members = [order[0]]
    net, best = bake(model, states[order[0]], bn_loader), scores[order[0]]
    offers = [Offer(order[0], best, True)]
    for i in order[1:]:
        trial = bake(model, average([states[j] for j in [*members, i]]), bn_loader)
        s = score(trial, val_loader)
        offers.append(Offer(i, s, s.correct >= best.correct))
        if offers[-1].accepted:
            members, net, best = [*members, i], trial, s
    return Soup(net, members, best, time.perf_counter() - t0, offers)
