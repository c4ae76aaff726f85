"""Learning who shares what: gradient similarity, the split, the join and unsharing.

Pure functions of recorded gradients (no training, no I/O), except ``Recorder``, which
the method attaches to the ensemble to collect them:

- ``split_bins``: per initial bin, layers of the largest member whose weight gradients
  have cosine (on their common top-left block) above a threshold are merged with a
  union-find, so the groups are transitive, refine the bins, and do not depend on the
  order layers are visited in.
- the join (``nearest``, in ``sharing_from``): a layer of another depth joins its most
  gradient-similar layer of the largest member in the same bin: it takes that layer's
  group and shares its coefficient slot, as in the original, so sharing and unsharing
  reach across depths.
- ``learn_sharing``: the split at the start threshold, lowered by ``split_step`` until the
  budget holds ``min_templates`` per bank or the floor is passed (then the bins stay).
- ``unshare``: layers sharing a coefficient slot whose coefficient gradients have cosine
  at or below a threshold get their own slots (clones of the shared values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from metaensemble.methods.superweight.model import (
    depth_bins,
    depth_slots,
    template_elements,
    templates_for,
    wrn_convs,
)


class Recorder:
    """Sums the gradients of each composed conv weight (``weights``) or of each conv's use
    of its coefficient slot (``coefs``) over the steps it is attached for."""

    def __init__(self, *, weights: bool = False, coefs: bool = False) -> None:
        self.weights, self.coefs = weights, coefs
        self.grads: dict[tuple[int, int], torch.Tensor] = {}
        self.steps = 0

    def _hook(self, key: tuple[int, int]):
        def add(g: torch.Tensor) -> None:
            g = g.detach().float()
            self.grads[key] = self.grads[key] + g if key in self.grads else g.clone()
        return add

    def watch_weight(self, w: torch.Tensor, m: int, i: int) -> None:
        w.register_hook(self._hook((m, i)))

    def watch_coef(self, alpha: torch.Tensor, m: int, i: int) -> None:
        alpha.register_hook(self._hook((m, i)))

    def reduced(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
        """The sums over every DDP rank (the same on each), on the CPU; ``all_reduce`` is
        the run context's in-place sum over ranks (``RunContext.all_reduce``), called on
        every rank for the same keys in the same order."""
        out = {k: self.grads[k] for k in sorted(self.grads)}
        for k in out:
            all_reduce(out[k])
        return {k: v.cpu() for k, v in out.items()}


def cosine_common(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two gradients on their common leading block (every dim cut to the
    smaller size: the top-left block where shapes nest)."""
    common = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape, strict=True))
    x, y = a[common].flatten().double(), b[common].flatten().double()
    return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-30))


def union_find(n: int, edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components of the graph on ``0..n-1`` with these edges, each sorted,
    ordered by their smallest member: the same for any order of the edges (the
    original's queue relabelled one end of each edge, so 0-2 then 1-2 left 0 alone)."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    out: dict[int, list[int]] = {}
    for a in range(n):
        out.setdefault(find(a), []).append(a)
    return sorted(out.values(), key=lambda c: c[0])


def components(sim: torch.Tensor, threshold: float) -> list[list[int]]:
    """``union_find`` over the edges where ``sim[a, b] > threshold``."""
    n = sim.shape[0]
    return union_find(n, ((a, b) for a in range(n) for b in range(a + 1, n) if sim[a, b] > threshold))


def similarity(grads: list[torch.Tensor]) -> torch.Tensor:
    n = len(grads)
    sim = torch.eye(n, dtype=torch.float64)
    for a in range(n):
        for b in range(a + 1, n):
            sim[a, b] = sim[b, a] = cosine_common(grads[a], grads[b])
    return sim


def split_bins(grads: list[torch.Tensor], bins: list[int], threshold: float) -> list[int]:
    """Groups of one member's convs: each bin split into the components of its layers'
    gradient similarity above ``threshold``; groups numbered bin by bin, components in
    the order of their first layer."""
    groups = [-1] * len(bins)
    nxt = 0
    for b in sorted(set(bins)):
        idx = [i for i, x in enumerate(bins) if x == b]
        for comp in components(similarity([grads[i] for i in idx]), threshold):
            for c in comp:
                groups[idx[c]] = nxt
            nxt += 1
    return groups


def nearest(ref_grads: list[torch.Tensor], ref_bins: list[int], grads: list[torch.Tensor],
            bins: list[int]) -> list[int]:
    """For each conv of another depth, the reference member's conv in the same bin whose
    gradient is most similar to its own (ties: the earlier conv)."""
    out = []
    for g, b in zip(grads, bins, strict=True):
        cands = [i for i, x in enumerate(ref_bins) if x == b]
        out.append(max(cands, key=lambda i: (cosine_common(g, ref_grads[i]), -i)))
    return out


def search_members(members: list[tuple[int, float]]) -> list[int]:
    """The search phase's members: the first (deepest, widest) and the first of each
    other depth."""
    seen, out = set(), []
    for m, (d, _) in enumerate(members):
        if d not in seen:
            seen.add(d)
            out.append(m)
    return out


def _by_key(groups: list[int], ref_convs, convs, ref_bins: list[int], bins: list[int]) -> list[int]:
    """A same-depth member copies the reference's groups conv by conv (by name); a conv
    the reference lacks (a shortcut only the narrower one has) takes the group of the
    reference's first conv of its bin."""
    by = {c.key: g for c, g in zip(ref_convs, groups, strict=True)}
    first = {}
    for b, g in zip(ref_bins, groups, strict=True):
        first.setdefault(b, g)
    return [by.get(c.key, first.get(b, groups[0])) for c, b in zip(convs, bins, strict=True)]


def sharing_from(members: list[tuple[int, float]], in_chans: int, bins: int, threshold: float | None,
                 grads: dict[int, list[torch.Tensor]]) -> dict[str, Any]:
    """The whole ensemble's sharing map for one split threshold (None: the bins are the
    groups). ``grads``: per search member (index into ``members``), its convs' weight
    gradients in forward order. Coefficient slots: members of one depth share one slot
    per conv name (a narrower member reads the leading block of a wider one's
    coefficients); a conv of another depth shares the slot of its ``nearest`` conv of the
    largest member, as the original's join does (a conv name its depth's searched member
    lacks keeps a slot of its own)."""
    convs = [wrn_convs(d, w, in_chans) for d, w in members]
    bin_of = [depth_bins(c, bins) for c in convs]
    searched = search_members(members)
    big = searched[0]
    top = split_bins(grads[big], bin_of[big], threshold) if threshold is not None else bin_of[big]
    per_depth: dict[int, tuple[int, list[int]]] = {members[big][0]: (big, top)}
    joined: dict[tuple[int, str], tuple[int, str]] = {}
    for s in searched[1:]:
        near = nearest(grads[big], bin_of[big], grads[s], bin_of[s])
        per_depth[members[s][0]] = (s, [top[i] for i in near])
        joined.update({(members[s][0], c.key): (members[big][0], convs[big][i].key)
                       for c, i in zip(convs[s], near, strict=True)})
    groups = []
    for m, (d, _) in enumerate(members):
        ref, g = per_depth[d]
        groups.append(g if ref == m else _by_key(g, convs[ref], convs[m], bin_of[ref], bin_of[m]))
    # A slot lies in one group: a joined conv takes its nearest conv's group and slot, and
    # members of one depth copy groups and slots by conv name.
    return {"groups": groups, "slots": depth_slots(members, in_chans, joined)}


@dataclass
class Split:
    sharing: dict[str, Any]
    templates: int
    threshold: float | None
    """The threshold that fitted (None: none did down to the floor; the bins stay)."""
    tried: list[tuple[float, int, int]] = field(default_factory=list)
    """(threshold, groups, templates per bank) for every threshold tried."""


def learn_sharing(members: list[tuple[int, float]], in_chans: int, grads: dict[int, list[torch.Tensor]], *,
                  bins: int, max_params: int, templates: int, min_templates: int, start: float, step: float,
                  floor: float) -> Split:
    """The split at ``start``, lowered by ``step`` while the budget holds fewer than
    ``min_templates`` templates per bank, never below ``floor``; then the bins as the
    groups (the join across depths still made)."""
    tried = []
    t = start
    while t >= floor - 1e-9:
        sharing = sharing_from(members, in_chans, bins, t, grads)
        k = templates_for(max_params, template_elements(members, in_chans, sharing), templates)
        tried.append((round(t, 6), len({g for row in sharing["groups"] for g in row}), k))
        if k >= min_templates:
            return Split(sharing, k, round(t, 6), tried)
        t -= step
    sharing = sharing_from(members, in_chans, bins, None, grads)
    k = templates_for(max_params, template_elements(members, in_chans, sharing), templates)
    return Split(sharing, k, None, tried)


def unshare(sharing: dict[str, Any], grads: dict[tuple[int, int], torch.Tensor],
            threshold: float) -> tuple[dict[str, Any], dict[int, int]]:
    """Convs sharing a slot whose coefficient gradients (each [its tiers, K]; compared on
    the tiers they share) have cosine <= ``threshold`` are parted: each component of the similarity graph above the
    threshold beyond the first gets a new slot. Returns the new map and new slot ->
    the slot whose values it clones."""
    slots = [list(row) for row in sharing["slots"]]
    users: dict[int, list[tuple[int, int]]] = {}
    for m, row in enumerate(slots):
        for i, s in enumerate(row):
            users.setdefault(s, []).append((m, i))
    nxt = 1 + max(s for row in slots for s in row)
    clones: dict[int, int] = {}
    for s in sorted(users):
        us = users[s]
        if len(us) < 2:
            continue
        comps = components(similarity([grads[u] for u in us]), threshold)
        for comp in comps[1:]:
            for c in comp:
                m, i = us[c]
                slots[m][i] = nxt
            clones[nxt] = s
            nxt += 1
    return {"groups": [list(g) for g in sharing["groups"]], "slots": slots}, clones
