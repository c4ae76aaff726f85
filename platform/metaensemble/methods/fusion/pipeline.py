"""Fuse trained parents into one network: cross-layer alignment and depth balancing where
depths differ, OT fusion against the anchor, BatchNorm statistics recomputed on training
data. Shared by jobs/fuse.py (one-shot rows) and the ``fusion`` engine method (sweeps).

    fused = fuse_parents(parents, cfg.fusion, splits.train, splits.info)
    fused.model          # the fused network, BN statistics from training data
    fused.naive          # the plain average of the (balanced) parents, where shapes allow
    fused.alignments     # parent index -> cross-layer alignment into the deepest parent
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from metaensemble import data
from metaensemble.errors import ConfigError
from metaensemble.methods.fusion import cla, ot
from metaensemble.methods.fusion.structure import Layer, spec_of, structure
from metaensemble.models import create_model


@dataclass
class Fused:
    model: nn.Module
    anchor: int
    """Index of the anchor parent (its widths and neuron order are the fused network's)."""
    deep: int
    """Index of the deepest parent (the depth every other parent is balanced to)."""
    balanced: list[nn.Module]
    """The parents at the deep parent's depth (inserted identity layers), in order."""
    alignments: dict[int, cla.Alignment] = field(default_factory=dict)
    inserted: dict[int, list[str]] = field(default_factory=dict)
    naive: nn.Module | None = None
    """The parents' plain weight average (same weights), where their shapes agree."""
    seconds: float = 0.0
    """Wall time of alignment + fusion + BatchNorm statistics."""


def options(fcfg) -> ot.FusionOptions:
    return ot.FusionOptions(
        ground_metric=fcfg.ground_metric, distance=fcfg.distance, solver=fcfg.solver,
        sinkhorn_reg=fcfg.sinkhorn_reg, correction=fcfg.correction, past_correction=fcfg.past_correction,
        s=fcfg.weight,
    )


def depth(model: nn.Module) -> int:
    return sum(len(s) for s in structure(model).stages)


def pick(depths: list[int], how: str) -> int:
    """The parent ``how`` names: deepest/shallowest (ties: the last), first or last."""
    n = len(depths)
    if how == "first":
        return 0
    if how == "last":
        return n - 1
    best = max(depths) if how == "deep" else min(depths)
    return max(i for i, d in enumerate(depths) if d == best)


def _subset_loader(split, info, idx: torch.Tensor, batch_size: int):
    sub = split.subset(idx) if isinstance(split, data.ArraySplit) else torch.utils.data.Subset(split, idx.tolist())
    return data.eval_loader(sub, info, batch_size)


def sample_inputs(split, info, n: int, seed: int) -> torch.Tensor:
    """``n`` training inputs (normalised, unaugmented) drawn with ``seed``: the same
    examples for every parent and every run with this seed."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=g)[: min(n, len(split))].sort().values
    return torch.cat([b["x"] for b in _subset_loader(split, info, idx, 512)])


def bn_batches(split, info, n: int | None, seed: int, batch_size: int = 256):
    """Unaugmented training batches for BatchNorm statistics (``n`` examples, None: all)."""
    if n is None or n >= len(split):
        idx = torch.arange(len(split))
    else:
        idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed + 1))[:n].sort().values
    return _subset_loader(split, info, idx, batch_size)


def check_parents(parents: list[nn.Module]) -> None:
    if len(parents) < 2:
        raise ConfigError(f"fusion needs two or more parents, got {len(parents)}")
    classes = {spec_of(p)["kwargs"].get("num_classes") for p in parents}
    if len(classes) > 1:
        raise ConfigError(f"the parents predict different numbers of classes ({sorted(classes)}): fusion keeps "
                          f"the class layer's rows, so every parent must predict the same classes")
    fams = {structure(p).family for p in parents}
    if len(fams) > 1:
        raise ConfigError(f"the parents are of different families ({', '.join(sorted(fams))}): fusion aligns "
                          f"layers within one family (mlp, vgg, resnet or convnet)")


def check_fits(parents: list[nn.Module], info, names: list[str] | None = None) -> None:
    """Every parent takes ``info``'s images and predicts its classes (ConfigError if not)."""
    for name, n in zip(names or [f"parent {i}" for i in range(len(parents))], parents, strict=True):
        kw = spec_of(n)["kwargs"]
        theirs = (kw.get("num_classes"), kw.get("in_chans"), kw.get("img_size"))
        if theirs != (info.num_classes, info.in_chans, info.img_size):
            raise ConfigError(f"{name} is a {spec_of(n)['arch']} for {theirs[0]} classes of {theirs[1]}x{theirs[2]}px "
                              f"images, but {info.name} has {info.num_classes} classes of {info.in_chans}x"
                              f"{info.img_size}px: fuse networks trained on this job's data")


def _same_shapes(models: list[nn.Module]) -> bool:
    ref = {k: v.shape for k, v in models[0].state_dict().items()}
    return all({k: v.shape for k, v in m.state_dict().items()} == ref for m in models[1:])


def fuse_parents(parents: list[nn.Module], fcfg, train_split, info, weights: list[float] | None = None) -> Fused:
    """Align (where depths differ), fuse against the anchor and recompute BatchNorm
    statistics on ``train_split`` (``fcfg``: the ``fusion`` section)."""
    t0 = time.perf_counter()
    check_parents(parents)
    parents = [p.eval() for p in parents]
    depths = [depth(p) for p in parents]
    deep = pick(depths, "deep")
    anchor = pick(depths, fcfg.anchor)
    x = sample_inputs(train_split, info, fcfg.act_samples, fcfg.act_seed)
    names = _step_names(parents[deep])
    balanced, alignments, inserted, degenerate = [], {}, {}, []
    for i, p in enumerate(parents):
        if i == deep or _step_names(p) == names:
            balanced.append(p)
            degenerate.append({})
            continue
        al = cla.align_models(parents[deep], p, cost=fcfg.cla_cost, x=x, pin_start=fcfg.pin_start,
                              pin_end=fcfg.pin_end, scope=fcfg.cla_scope)
        b = cla.balance(p, al)
        balanced.append(b.model.eval())
        alignments[i], inserted[i] = al, list(b.inserted)
        degenerate.append(dict(b.degenerate))
    res = ot.fuse(balanced, anchor=anchor, opts=options(fcfg), x=x, degenerate=degenerate, weights=weights)
    bn = bn_batches(train_split, info, fcfg.bn_samples, fcfg.act_seed)
    model = ot.recompute_bn_stats(res.model, bn)
    naive = None
    if _same_shapes(balanced):
        naive = average(balanced, res.weights, spec_of(balanced[anchor]))
        naive = ot.recompute_bn_stats(naive, bn)
    return Fused(model.eval(), anchor, deep, balanced, alignments, inserted, naive, time.perf_counter() - t0)


def _step_names(model: nn.Module) -> list[str]:
    return [s.name if isinstance(s, Layer) else s.key for s in structure(model).steps]


@torch.no_grad()
def average(models: list[nn.Module], weights: list[float], spec: dict) -> nn.Module:
    """The weighted average of same-shape networks' parameters (no alignment): the naive
    baseline. BatchNorm statistics are averaged too and should be recomputed."""
    out = create_model(spec["arch"], **spec["kwargs"])
    states = [m.state_dict() for m in models]
    new = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            new[k] = sum(w * s[k].float() for w, s in zip(weights, states, strict=True)).to(v.dtype)
        else:
            new[k] = v.clone()
    out.load_state_dict(new)
    return out.eval()
