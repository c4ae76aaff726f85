"""A SuperWeight ensemble of pre-activation Wide ResNets (the ``superweight`` architecture).

Every conv weight of every member is composed, never stored:

    piece(layer, tier t) = sum_k alpha[slot, t, k] * T[group, t, k]       (a flat slice)
    W(layer)             = gain * top-left (cout, cin) block of the tiers 0..t(layer)

``T[group, t]`` is the bank of (group, tier): K templates of exactly tier t's slice size.
A group's tiers nest: box 0 is its smallest layer's (rows, cols), box t grows box t-1 to
the next layer shape (extra output rows, extra input columns), and tier t is box t less
box t-1 (``tier_boxes``). A layer reads the smallest box that holds it, so a narrow layer
is the top-left block of a wide one that uses the same coefficients (same ``slot``) times
a fixed gain: W_narrow = sqrt(fan_in_wide / fan_in_narrow) * W_wide[:cout, :cin] (the
ratio of their ``gain``s; 1 only where the fan-ins are equal). Where two layers of one
slot do not nest (a join across depths), they share the block they have in common.

``gain`` = sqrt(fan_ref / fan_in) with fan_ref the group's largest fan-in: templates start
at He's std for fan_ref and the coefficients used at unit norm, so every assembled weight
starts at He's std for its own fan-in (the original initialised from the template's shape).
A coefficient row is used as ``alpha * scale[group, tier]`` with scale = 1 / sqrt(slice
elements x template variance): without it a step on alpha moves the weight along the
templates about 2 x cout times further than the same step on the templates does (the
sum over a whole slice in dL/dalpha), which made SGD at the recipe's lr diverge here.

The sharing map (``sharing``: each conv's group and coefficient slot, per member, and K)
is a constructor argument, so it is in every checkpoint's model.json and a resumed or
loaded ensemble is rebuilt with exactly the same sharing. ``member_network`` gives one
member as a plain ``wrn`` with its weights assembled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.errors import ConfigError
from metaensemble.models.registry import register_model


# ---- the members' convs ----------------------------------------------------------------
@dataclass(frozen=True)
class Conv:
    """One conv of a member, in forward order: ``key`` is its parameter name in ``wrn``."""

    key: str
    cout: int
    cin: int
    k: int
    stride: int

    @property
    def fan_in(self) -> int:
        return self.cin * self.k * self.k


def wrn_widths(width: float) -> list[int]:
    """Channels of a WRN's stem and three stages (the ``wrn`` architecture's rule)."""
    return [16] + [int(round(b * width)) for b in (16, 32, 64)]


def wrn_convs(depth: int, width: float, in_chans: int) -> list[Conv]:
    """A pre-activation WRN-depth-width's convs in forward order: the stem, then per block
    conv1, conv2 and the 1x1 shortcut where the shape changes."""
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"wrn depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
    n, widths = (depth - 4) // 6, wrn_widths(width)
    convs, cin, b = [Conv("conv1", widths[0], in_chans, 3, 1)], widths[0], 0
    for i, w in enumerate(widths[1:]):
        for j in range(n):
            stride = 2 if (j == 0 and i > 0) else 1
            convs += [Conv(f"blocks.{b}.conv1", w, cin, 3, stride), Conv(f"blocks.{b}.conv2", w, w, 3, 1)]
            if stride != 1 or cin != w:
                convs.append(Conv(f"blocks.{b}.shortcut", w, cin, 1, stride))
            cin, b = w, b + 1
    return convs


def wrn_parameters(depth: int, width: float, num_classes: int, in_chans: int) -> int:
    """Trainable parameters of a plain ``wrn`` (convs, BatchNorm affine, classifier),
    counted without building it."""
    convs = wrn_convs(depth, width, in_chans)
    blocks = [c for c in convs if c.key.endswith(".conv1")]
    bn = sum(2 * (c.cin + c.cout) for c in blocks) + 2 * blocks[-1].cout
    return sum(c.cout * c.fan_in for c in convs) + bn + blocks[-1].cout * num_classes + num_classes


def depth_bins(convs: list[Conv], bins: int) -> list[int]:
    """Initial bin of each conv: the 3x3 convs (stem included) in ``bins`` contiguous bins
    of near-equal size in layer order (WRN-28: 7/6/6/6, WRN-16: 4/3/3/3; bin b of every
    depth covers the same relative depth), every 1x1 conv in bin ``bins``."""
    three = [i for i, c in enumerate(convs) if c.k == 3]
    if bins > len(three):
        raise ConfigError(f"superweight.param_group_bins={bins} but a member has only {len(three)} 3x3 convs")
    out = [bins] * len(convs)
    base, extra = divmod(len(three), bins)
    pos = 0
    for b in range(bins):
        size = base + (b < extra)
        for i in three[pos:pos + size]:
            out[i] = b
        pos += size
    return out


# ---- banks and tiers ---------------------------------------------------------------------
def tier_boxes(shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The nested (rows, cols) boxes of one group whose layers have these (cout, cin)
    shapes: box 0 is the smallest layer's shape; each later distinct shape (by size)
    grows the box to hold it."""
    ordered = sorted(set(shapes), key=lambda s: (s[0] * s[1], s))
    boxes = [ordered[0]]
    for o, i in ordered[1:]:
        box = (max(boxes[-1][0], o), max(boxes[-1][1], i))
        if box != boxes[-1]:
            boxes.append(box)
    return boxes


def tier_of(boxes: list[tuple[int, int]], shape: tuple[int, int]) -> int:
    """The first (smallest) box holding a (cout, cin) shape."""
    return next(t for t, (o, i) in enumerate(boxes) if o >= shape[0] and i >= shape[1])


def slice_sizes(boxes: list[tuple[int, int]], k: int) -> list[int]:
    """Elements of one template of each tier: box t less box t-1, times k x k."""
    areas = [o * i for o, i in boxes]
    return [(a - (areas[t - 1] if t else 0)) * k * k for t, a in enumerate(areas)]


def initial_sharing(members: list[tuple[int, float]], in_chans: int, bins: int) -> dict[str, Any]:
    """Groups = the depth bins; one coefficient slot per group (the search phase)."""
    groups = [depth_bins(wrn_convs(d, w, in_chans), bins) for d, w in members]
    return {"groups": groups, "slots": [list(g) for g in groups]}


def depth_slots(members: list[tuple[int, float]], in_chans: int,
                joined: dict[tuple[int, str], tuple[int, str]] | None = None) -> list[list[int]]:
    """Coefficient slots after the search: members of one depth share one slot per conv
    name (a narrower member reads the leading block of a wider one's coefficients); a
    (depth, conv name) in ``joined`` uses the slot of the (depth, conv name) it maps to
    (the join across depths); the rest, one slot each. Numbered in order of first use."""
    ids: dict[tuple[int, str], int] = {}
    joined = joined or {}
    return [[ids.setdefault(joined.get((d, c.key), (d, c.key)), len(ids)) for c in wrn_convs(d, w, in_chans)]
            for d, w in members]


def bins_sharing(members: list[tuple[int, float]], in_chans: int, bins: int) -> dict[str, Any]:
    """The depth bins as the groups, with the slots of ``depth_slots``: the sharing when
    no split is learned (no search, or no threshold fits the budget)."""
    groups = [depth_bins(wrn_convs(d, w, in_chans), bins) for d, w in members]
    return {"groups": groups, "slots": depth_slots(members, in_chans)}


def bank_layout(members: list[tuple[int, float]], in_chans: int, sharing: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Per group: its kernel size, tier boxes, slice sizes and largest fan-in."""
    convs = [wrn_convs(d, w, in_chans) for d, w in members]
    by: dict[int, list[Conv]] = {}
    for m, cs in enumerate(convs):
        if len(sharing["groups"][m]) != len(cs):
            raise ConfigError(f"superweight sharing map: member {m} has {len(cs)} convs but "
                              f"{len(sharing['groups'][m])} group entries")
        for c, g in zip(cs, sharing["groups"][m], strict=True):
            by.setdefault(g, []).append(c)
    out = {}
    for g, cs in sorted(by.items()):
        ks = {c.k for c in cs}
        if len(ks) != 1:
            raise ConfigError(f"superweight group {g} mixes kernel sizes {sorted(ks)}")
        k = ks.pop()
        boxes = tier_boxes([(c.cout, c.cin) for c in cs])
        out[g] = {"k": k, "boxes": boxes, "sizes": slice_sizes(boxes, k), "fan_ref": max(c.fan_in for c in cs)}
    return out


def template_elements(members: list[tuple[int, float]], in_chans: int, sharing: dict[str, Any]) -> int:
    """Elements of one template of every bank: the budget holds K times this many."""
    return sum(sum(b["sizes"]) for b in bank_layout(members, in_chans, sharing).values())


def templates_for(max_params: int, elements: int, most: int) -> int:
    """K: as many templates per bank as the budget allows, at most ``most``."""
    return min(most, max_params // elements)


# ---- the network -------------------------------------------------------------------------
class _Block(nn.Module):
    """A pre-activation block's own parameters (its convs are composed)."""

    def __init__(self, cin: int, cout: int, momentum: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=momentum)
        self.bn2 = nn.BatchNorm2d(cout, momentum=momentum)


class Member(nn.Module):
    """One WRN member: its BatchNorms and classifier; named as in ``wrn`` so that
    ``member_network`` loads them into a plain WRN."""

    def __init__(self, depth: int, width: float, num_classes: int, in_chans: int, momentum: float) -> None:
        super().__init__()
        self.depth, self.width = depth, width
        self.convs = wrn_convs(depth, width, in_chans)
        blocks = [c for c in self.convs if c.key.endswith(".conv1")]
        self.blocks = nn.ModuleList(_Block(c.cin, c.cout, momentum) for c in blocks)
        self.bn = nn.BatchNorm2d(blocks[-1].cout, momentum=momentum)
        self.fc = nn.Linear(blocks[-1].cout, num_classes)

    def forward(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        w = dict(zip((c.key for c in self.convs), weights, strict=True))
        strides = {c.key: c.stride for c in self.convs}
        x = F.conv2d(x, w["conv1"], padding=1)
        for b, blk in enumerate(self.blocks):
            o = F.relu(blk.bn1(x))
            key = f"blocks.{b}"
            y = F.conv2d(o, w[f"{key}.conv1"], stride=strides[f"{key}.conv1"], padding=1)
            y = F.conv2d(F.relu(blk.bn2(y)), w[f"{key}.conv2"], padding=1)
            sc = w.get(f"{key}.shortcut")
            x = y + (F.conv2d(o, sc, stride=strides[f"{key}.shortcut"]) if sc is not None else x)
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SuperWeightEnsemble(nn.Module):
    """Members of different depths and widths whose convs are composed from shared banks;
    ``forward`` returns every member's logits [M, B, C]."""

    def __init__(self, num_classes: int, in_chans: int, members: list[tuple[int, float]],
                 sharing: dict[str, Any], templates: int, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.member_specs = [(int(d), float(w)) for d, w in members]
        self.sharing = {"groups": [list(map(int, g)) for g in sharing["groups"]],
                        "slots": [list(map(int, s)) for s in sharing["slots"]]}
        self.templates = templates
        self.members = nn.ModuleList(Member(d, w, num_classes, in_chans, bn_momentum) for d, w in self.member_specs)
        self.layout = bank_layout(self.member_specs, in_chans, self.sharing)
        if templates < 1:
            raise ConfigError("superweight: a bank needs at least one template")
        # Banks: one Parameter per (group, tier), He's std for the group's largest fan-in.
        self.banks = nn.ParameterList()
        self.bank_index: dict[tuple[int, int], int] = {}
        for g, lay in self.layout.items():
            std = math.sqrt(2.0 / lay["fan_ref"])
            for t, size in enumerate(lay["sizes"]):
                self.bank_index[(g, t)] = len(self.banks)
                self.banks.append(nn.Parameter(torch.randn(templates, size) * std))
        # Each conv: (group, slot, tier, gain); each slot: its group and the tiers it needs.
        self.sites: list[list[tuple[int, int, int, float]]] = []
        slot_group: dict[int, int] = {}
        slot_tiers: dict[int, int] = {}
        for m, member in enumerate(self.members):
            row = []
            for c, g, s in zip(member.convs, self.sharing["groups"][m], self.sharing["slots"][m], strict=True):
                if slot_group.setdefault(s, g) != g:
                    raise ConfigError(f"superweight sharing map: slot {s} is used by groups {slot_group[s]} and {g}")
                lay = self.layout[g]
                t = tier_of(lay["boxes"], (c.cout, c.cin))
                slot_tiers[s] = max(slot_tiers.get(s, 0), t)
                row.append((g, s, t, math.sqrt(lay["fan_ref"] / c.fan_in)))
            self.sites.append(row)
        if sorted(slot_group) != list(range(len(slot_group))):
            raise ConfigError(f"superweight sharing map: slots must be numbered 0..n-1, got {sorted(slot_group)}")
        # Coefficients: per slot [tiers, K]; per (group, tier) the slots' rows start
        # orthogonal where K allows and every row at unit norm.
        self.coefs = nn.ParameterList(nn.Parameter(torch.empty(slot_tiers[s] + 1, templates))
                                      for s in range(len(slot_group)))
        self.slot_group = [slot_group[s] for s in range(len(slot_group))]
        self.coef_scale = {(g, t): 1.0 / math.sqrt(size * 2.0 / lay["fan_ref"])
                           for g, lay in self.layout.items() for t, size in enumerate(lay["sizes"])}
        with torch.no_grad():
            for g in self.layout:
                for t in range(len(self.layout[g]["sizes"])):
                    users = [s for s in range(len(self.coefs)) if self.slot_group[s] == g and slot_tiers[s] >= t]
                    rows = torch.empty(len(users), templates)
                    nn.init.orthogonal_(rows)
                    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) / self.coef_scale[(g, t)]
                    for r, s in enumerate(users):
                        self.coefs[s][t].copy_(rows[r])
        self.recorder: Any = None
        """Set by the method to record per-layer gradients (``Recorder``)."""

    # ---- composition ---------------------------------------------------------------------
    def bank(self, group: int, tier: int) -> nn.Parameter:
        return self.banks[self.bank_index[(group, tier)]]

    def compose(self, m: int, i: int) -> torch.Tensor:
        """Conv ``i`` of member ``m``: its tiers' pieces assembled into its box, cut to
        its shape, times its gain."""
        g, s, t, gain = self.sites[m][i]
        conv = self.members[m].convs[i]
        lay, k = self.layout[g], self.layout[g]["k"]
        alpha = self.coefs[s]
        if self.recorder is not None and self.recorder.coefs and torch.is_grad_enabled():
            alpha = alpha[: t + 1].clone()  # this layer's own use of the slot (its tiers): its gradient alone
            self.recorder.watch_coef(alpha, m, i)
        boxes, scale = lay["boxes"], self.coef_scale
        w = (alpha[0] * scale[(g, 0)] @ self.bank(g, 0)).view(boxes[0][0], boxes[0][1], k, k)
        for j in range(1, t + 1):
            (oa, ia), (ob, ib) = boxes[j - 1], boxes[j]
            piece = alpha[j] * scale[(g, j)] @ self.bank(g, j)
            split = oa * (ib - ia) * k * k
            right = piece[:split].view(oa, ib - ia, k, k)
            bottom = piece[split:].view(ob - oa, ib, k, k)
            w = torch.cat([torch.cat([w, right], 1), bottom], 0)
        w = (w[: conv.cout, : conv.cin] * gain).contiguous()  # a strided weight is ~30x slower in mkldnn
        if self.recorder is not None and self.recorder.weights and w.requires_grad:
            self.recorder.watch_weight(w, m, i)
        return w

    def member_weights(self, m: int) -> list[torch.Tensor]:
        return [self.compose(m, i) for i in range(len(self.members[m].convs))]

    def forward_member(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return self.members[m](x, self.member_weights(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.forward_member(x, m) for m in range(len(self.members))])

    # ---- counts ----------------------------------------------------------------------------
    def bank_elements(self) -> int:
        return sum(p.numel() for p in self.banks)

    def parameter_counts(self) -> dict[str, int]:
        """Unique trainable parameters, every tensor counted once: banks, coefficients,
        and each member's own BatchNorm and classifier."""
        own = sum(p.numel() for p in self.members.parameters())
        banks, coefs = self.bank_elements(), sum(p.numel() for p in self.coefs)
        return {"banks": banks, "coefficients": coefs, "member_own": own, "total": banks + coefs + own}


ENSEMBLES = ("superweight",)
"""Registered architectures that are whole ensembles (``forward``: [M, B, C] logits)."""


@register_model("superweight")
def superweight(num_classes: int, in_chans: int, img_size: int, members: list | None = None,
                sharing: dict | None = None, templates: int = 8, bins: int = 4, bn_momentum: float = 0.1) -> nn.Module:
    """A SuperWeight ensemble; ``sharing`` None: the initial depth bins (search phase)."""
    if not members:
        raise ConfigError("superweight needs members: a list of [depth, width]")
    members = [(int(d), float(w)) for d, w in members]
    sharing = sharing or initial_sharing(members, in_chans, bins)
    return SuperWeightEnsemble(num_classes, in_chans, members, sharing, templates, bn_momentum)


def member_network(model: SuperWeightEnsemble, m: int) -> nn.Module:
    """Member ``m`` as a plain ``wrn`` (registered architecture) with its convs assembled
    and its own BatchNorms and classifier: the same function, one network."""
    from metaensemble.models import create_model

    d, w = model.member_specs[m]
    fc = model.members[m].fc
    net = create_model("wrn", num_classes=fc.out_features, in_chans=model.members[m].convs[0].cin, img_size=32,
                       depth=d, widen_factor=int(w) if float(w).is_integer() else w,
                       bn_momentum=model.members[m].bn.momentum)
    with torch.no_grad():
        state = {k: v.detach().clone() for k, v in model.members[m].state_dict().items()}
        for c, wt in zip(model.members[m].convs, model.member_weights(m), strict=True):
            state[f"{c.key}.weight"] = wt.detach().clone()
    net.load_state_dict(state)
    return net.train(model.training)
