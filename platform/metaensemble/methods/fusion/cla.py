"""Cross-layer alignment (CLAFusion, Nguyen et al. ICASSP 2023): map a shallow network's
hidden units into a deeper one's and balance the depths, so OT fusion can fuse them.

    al = align_models(deep, shallow, cost="cka", x=samples)   # per stage: shallow -> deep
    bal = balance(shallow, al)       # bal.model: the shallow function at the deep depth
    plot_alignment(al, "alignment.png", "resnet34 <- resnet18")

Units are what ``structure(model).stages`` lists: an MLP's hidden linears (one stage), a
VGG's convs per pooling stage, a ResNet's residual blocks per stage. Costs C[i, k] are
between deep unit i and shallow unit k; ``align`` finds the strictly increasing map A of
shallow units into deep ones minimising sum_k C[A(k), k] by dynamic programming. As in
the original, each stage is aligned on its own with the pins applied in it
(``scope="stage"``); ``scope="network"`` is one alignment with the pins at the network's
two ends.

Balancing inserts at every deep position A skips a layer that is the identity on
non-negative inputs (every unit's input follows a ReLU, except the network's first unit's,
so nothing may be inserted before it): an identity linear, a 3x3 conv with a centred
identity kernel (plus an eval-mode identity BatchNorm), or a residual block with all-zero
convs (output relu(0 + x) = x).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from metaensemble.errors import ConfigError
from metaensemble.methods.fusion.structure import capture, family, generic_spec, spec_of, structure

COSTS = ("width", "width_abs", "cka", "cca", "wasserstein")
WIDTH_COSTS = ("width", "width_abs")
"""Costs from the units' widths alone: squared difference (the original's default,
``get_cost(..., "euclidean")`` on neuron counts) or absolute difference."""
SCOPES = ("stage", "network")


# ---- layer representations ------------------------------------------------------------
def _output_module(model: nn.Module, unit: str) -> nn.Module:
    """The module whose output is ``unit``'s representation: the ReLU after a linear/conv
    (after its BatchNorm, if any), or the residual block itself."""
    mod = model.get_submodule(unit)
    if not isinstance(mod, nn.Linear | nn.Conv2d):
        return mod
    parent_path, _, own = unit.rpartition(".")
    siblings = list(model.get_submodule(parent_path).named_children())
    after = [m for n, m in siblings[[n for n, _ in siblings].index(own) + 1:]]
    relu = next((m for m in after if isinstance(m, nn.ReLU)), None)
    if relu is None:
        raise ConfigError(f"unit {unit!r} is not followed by a ReLU in its container; cannot represent it")
    return relu


@torch.no_grad()
def representations(model: nn.Module, x: torch.Tensor, units: list[str]) -> dict[str, torch.Tensor]:
    """Per unit its post-ReLU output on ``x`` (eval mode, forward hooks): [N, F] for a
    linear, [N, C, H, W] for a conv or a residual block; float64 on the CPU."""
    ys = capture(model, {u: _output_module(model, u) for u in units}, x)
    return {u: y.to("cpu", torch.float64) for u, y in ys.items()}


def as_samples(a: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, features] (a conv's C*H*W flattened per sample)."""
    return a.flatten(1)


def as_positions(a: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N*H*W, C]: each sample's spatial position is an observation."""
    return a if a.dim() == 2 else a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])


def as_neurons(a: torch.Tensor) -> torch.Tensor:
    """[N, C(, H, W)] -> [C, N*H*W]: each neuron (channel) as one point."""
    return as_positions(a).T


# ---- similarities and costs -------------------------------------------------------------
def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x - x.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between X [N, p] and Y [N, q] (same N samples), in [0, 1]: 1 for X vs X,
    invariant to orthogonal transforms and isotropic scaling of either. 0 when one side
    is constant over the samples (CKA is undefined there)."""
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"CKA compares the same samples: got {x.shape[0]} and {y.shape[0]} rows")
    x, y = _centred(x), _centred(y)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if p * q <= n * n:  # feature space: ||Y^T X||^2 / (||X^T X|| ||Y^T Y||)
        num = (y.T @ x).pow(2).sum()
        den = (x.T @ x).norm() * (y.T @ y).norm()
    else:  # sample space: <K, L> / (||K|| ||L||) with centred Gram matrices
        k, l_ = x @ x.T, y @ y.T
        num = (k * l_).sum()
        den = k.norm() * l_.norm()
    return 0.0 if den <= 0 else float((num / den).clamp(0.0, 1.0))


def _whitened_basis(x: torch.Tensor, tol: float) -> torch.Tensor:
    """Orthonormal basis [N, r] of the centred columns' span, dropping directions whose
    singular value is below tol * the largest (near-collinear features)."""
    u, s, _ = torch.linalg.svd(_centred(x), full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return u[:, :0]
    return u[:, s > tol * s[0]]


def cca_similarity(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-6) -> float:
    """Mean canonical correlation between X [N, p] and Y [N, q], in [0, 1], by SVD: the
    correlations are the singular values of Ux^T Uy for orthonormal bases of the two
    (centred) column spaces. Needs N well above p and q: with N <= p, q both spans are the
    whole centred sample space and every correlation is 1."""
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"CCA compares the same observations: got {x.shape[0]} and {y.shape[0]} rows")
    ux, uy = _whitened_basis(x, tol), _whitened_basis(y, tol)
    if ux.shape[1] == 0 or uy.shape[1] == 0:
        return 0.0
    rho = torch.linalg.svdvals(ux.T @ uy).clamp(0.0, 1.0)
    return float(rho.mean())


def wasserstein_cost(p: torch.Tensor, q: torch.Tensor) -> float:
    """Exact W1 (``ot.emd2``, uniform weights, euclidean ground cost) between two layers'
    neurons as points, P [n1, D] and Q [n2, D]. Each layer is first scaled so its neurons
    have unit mean squared norm, which puts every pair of layers on one scale (<= 2)."""
    import ot

    if p.shape[1] != q.shape[1]:
        raise ConfigError(f"Wasserstein cost needs neurons in one space: got {p.shape[1]} and {q.shape[1]} "
                          "dimensions (samples x positions); compare layers at the same resolution")

    def scaled(z: torch.Tensor) -> np.ndarray:
        z = z.to(torch.float64)
        rms = z.pow(2).sum(1).mean().sqrt()
        return (z / rms.clamp_min(1e-12)).numpy()

    a, b = scaled(p), scaled(q)
    m = ot.dist(a, b, metric="euclidean")
    return float(ot.emd2(ot.unif(len(a)), ot.unif(len(b)), m))


def unit_width(model: nn.Module, unit: str) -> int:
    """Output features (linear) or channels (conv, residual block) of ``unit``."""
    mod = model.get_submodule(unit)
    if isinstance(mod, nn.Linear):
        return mod.out_features
    if isinstance(mod, nn.Conv2d):
        return mod.out_channels
    return (getattr(mod, "conv3", None) or mod.conv2).out_channels


def pair_cost(a: torch.Tensor, b: torch.Tensor, cost: str) -> float:
    """Cost between two units' representations (``representations`` outputs) on the same
    samples: 1 - linear CKA, 1 - mean CCA (spatial positions as observations), or the
    Wasserstein cost between their neurons."""
    if cost == "cka":
        return 1.0 - linear_cka(as_samples(a), as_samples(b))
    if cost == "cca":
        pa, pb = as_positions(a), as_positions(b)
        if pa.shape[0] != pb.shape[0]:
            raise ConfigError(f"CCA cost needs units at one resolution: got {tuple(a.shape)} and {tuple(b.shape)}")
        return 1.0 - cca_similarity(pa, pb)
    if cost == "wasserstein":
        return wasserstein_cost(as_neurons(a), as_neurons(b))
    raise ConfigError(f"unknown activation cost {cost!r}; valid: "
                      f"{', '.join(c for c in COSTS if c not in WIDTH_COSTS)}")


# ---- dynamic programming ----------------------------------------------------------------
def align(cost: np.ndarray | torch.Tensor, pin_start: int = 1, pin_end: int = 1,
          forced: dict[int, int] | None = None, allowed: np.ndarray | torch.Tensor | None = None) -> list[int]:
    """The strictly increasing map A (shallow unit k -> deep unit A[k]) minimising
    sum_k C[A[k], k], for a cost C [n deep, m shallow], in O(mn).

    Pinned: A[k] = k for the first ``pin_start`` shallow units, A[m-1-j] = n-1-j for the
    last ``pin_end`` (0: a free end). The original's ``start_layer_idx`` is 1-based and
    counts the input, so its default 2 is ``pin_start=1``; its ``free_end_layers``
    (default 1) is ``pin_end``. ``forced`` {k: i} fixes more pairs; ``allowed``, a boolean
    [n, m] mask, lists the pairs A may use (cost entries outside it are ignored and may be
    NaN). Ties go to the earliest deep units."""
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ConfigError(f"the cost matrix must be 2-D [deep units, shallow units], got shape {c.shape}")
    n, m = c.shape
    if m == 0:
        return []
    if m > n:
        raise ConfigError(f"the shallow net must be the one with fewer units: the cost has {n} rows (deep net) "
                          f"and {m} columns (shallow net); swap the two nets")
    if pin_start < 0 or pin_end < 0:
        raise ConfigError(f"pin_start and pin_end must be >= 0, got {pin_start} and {pin_end}")
    if pin_start + pin_end > m:
        raise ConfigError(f"pinned units overlap: pin_start={pin_start} + pin_end={pin_end} > {m} shallow units; "
                          f"lower them to sum to at most {m}")
    ok = np.ones((n, m), bool) if allowed is None else np.array(allowed, dtype=bool)
    if ok.shape != (n, m):
        raise ConfigError(f"allowed mask has shape {ok.shape}, the cost {(n, m)}")
    fixed = [(k, k) for k in range(pin_start)] + [(m - 1 - j, n - 1 - j) for j in range(pin_end)]
    for k, i in [*fixed, *(forced or {}).items()]:
        if not (0 <= k < m and 0 <= i < n):
            raise ConfigError(f"forced pair shallow {k} -> deep {i} is outside the {n} x {m} cost")
        col = np.zeros(n, bool)
        col[i] = ok[i, k]
        ok[:, k] = col
    if np.isnan(c[ok]).any():
        raise ConfigError("the cost matrix has NaN entries at allowed pairs")
    c = np.where(ok, c, np.inf)

    total = np.full((m, n), np.inf)  # total[k, i]: best cost of units 0..k with A[k] = i
    back = np.full((m, n), -1)
    total[0] = c[:, 0]
    for k in range(1, m):
        best, arg = np.inf, -1
        for i in range(n):
            if i > 0 and total[k - 1, i - 1] < best:
                best, arg = total[k - 1, i - 1], i - 1
            total[k, i], back[k, i] = c[i, k] + best, arg
    if not np.isfinite(total[m - 1]).any():
        raise ConfigError(f"no strictly increasing map of the shallow net's {m} units into the deep net's {n} "
                          f"satisfies pin_start={pin_start}, pin_end={pin_end}, forced pairs {forced or {}} "
                          "and the allowed pairs (units map only within their own stage)")
    a = [int(np.argmin(total[m - 1]))]
    for k in range(m - 1, 0, -1):
        a.append(int(back[k, a[-1]]))
    return a[::-1]


@dataclass
class Alignment:
    """Where each shallow unit goes in the deep net, per stage."""

    family: str
    deep_units: list[list[str]]
    shallow_units: list[list[str]]
    mapping: list[list[int]]
    """Per stage s: mapping[s][k] is the index in deep_units[s] of shallow_units[s][k]."""
    cost: np.ndarray
    """[n deep, m shallow] over all units in order; NaN between units of different stages."""
    cost_name: str = "width"

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(shallow unit, deep unit) for every shallow unit."""
        return [(u, d[i]) for d, s, mp in zip(self.deep_units, self.shallow_units, self.mapping, strict=True)
                for u, i in zip(s, mp, strict=True)]

    @property
    def skipped(self) -> list[list[int]]:
        """Per stage the deep positions no shallow unit maps to (where ``balance`` inserts)."""
        return [[p for p in range(len(d)) if p not in set(mp)] for d, mp in zip(self.deep_units, self.mapping,
                                                                                strict=True)]

    def flat_map(self) -> list[int]:
        """The map over all units: shallow unit k (in order) -> deep unit index."""
        offsets = np.cumsum([0] + [len(d) for d in self.deep_units])
        return [int(offsets[s] + i) for s, mp in enumerate(self.mapping) for i in mp]


def _unit_costs(deep: nn.Module, shallow: nn.Module, d_units: list[str], s_units: list[str], same: np.ndarray,
                cost: str, x: torch.Tensor | None) -> np.ndarray:
    """C [n deep, m shallow] between units of one stage (``same``), NaN elsewhere."""
    c = np.full(same.shape, np.nan)
    if cost in WIDTH_COSTS:
        wd = np.array([unit_width(deep, u) for u in d_units], dtype=np.float64)
        ws = np.array([unit_width(shallow, u) for u in s_units], dtype=np.float64)
        diff = wd[:, None] - ws[None, :]
        c[same] = (np.square(diff) if cost == "width" else np.abs(diff))[same]
    else:
        rd, rs = representations(deep, x, d_units), representations(shallow, x, s_units)
        for i, k in zip(*np.nonzero(same), strict=True):
            c[i, k] = pair_cost(rd[d_units[i]], rs[s_units[k]], cost)
    return c


def stage_pins(m: int, pin_start: int, pin_end: int) -> tuple[int, int]:
    """The pins within a stage of ``m`` shallow units. One unit cannot honour both ends: with
    ``pin_start`` >= 1 it maps to the stage's first deep unit, as the original's ``align``
    maps a one-layer chunk. Otherwise the pins are as given (and must fit in ``m``)."""
    return (1, 0) if m == 1 and pin_start >= 1 else (pin_start, pin_end)


def _paired_stages(deep: nn.Module, shallow: nn.Module) -> tuple[str, list[list[str]], list[list[str]]]:
    """The family and both nets' units per stage, checked to be alignable."""
    fam_d, fam_s = family(spec_of(deep)["arch"]), family(spec_of(shallow)["arch"])
    if fam_d != fam_s:
        raise ConfigError(f"cross-layer alignment needs one family: the deep net is {fam_d}, the shallow {fam_s}")
    d_st, s_st = structure(deep).stages, structure(shallow).stages
    if len(d_st) != len(s_st):
        raise ConfigError(f"the two nets must have the same number of stages: deep {len(d_st)} "
                          f"({[len(s) for s in d_st]} units), shallow {len(s_st)} ({[len(s) for s in s_st]} units)")
    for s, (d, sh) in enumerate(zip(d_st, s_st, strict=True)):
        if len(sh) > len(d):
            raise ConfigError(f"stage {s}: the shallow net has {len(sh)} units, the deep net only {len(d)}; "
                              "the shallow net must have at most the deep net's units in every stage")
    return fam_d, d_st, s_st


def align_models(deep: nn.Module, shallow: nn.Module, cost: str = "width", x: torch.Tensor | None = None,
                 pin_start: int = 1, pin_end: int = 1, scope: str = "stage") -> Alignment:
    """Align ``shallow``'s units into ``deep``'s (same family, same number of stages).

    ``scope="stage"`` (the original's, for VGG pooling chunks and ResNet stages): one DP per
    stage, ``pin_start``/``pin_end`` applied in each (``stage_pins``: a one-unit stage
    takes the start pin). ``"network"``: one DP over all units, allowed only within a
    stage, the pins at the network's two ends. An MLP has one stage: both agree there.
    Either way a ResNet stage's first block (which downsamples and changes width) maps to
    the deep stage's first block. ``x`` [N, ...] (inputs, same for both nets) is needed by
    every cost but the width ones; pairs of different stages are never compared (NaN)."""
    if cost not in COSTS:
        raise ConfigError(f"unknown alignment cost {cost!r}; valid: {', '.join(COSTS)}")
    if scope not in SCOPES:
        raise ConfigError(f"unknown alignment scope {scope!r}; valid: {', '.join(SCOPES)}")
    if cost not in WIDTH_COSTS and x is None:
        raise ConfigError(f"alignment cost {cost!r} compares activations: pass inputs x (or use cost='width')")
    fam_d, d_st, s_st = _paired_stages(deep, shallow)
    d_units, s_units = list(itertools.chain(*d_st)), list(itertools.chain(*s_st))
    d_stage = np.repeat(np.arange(len(d_st)), [len(s) for s in d_st])
    s_stage = np.repeat(np.arange(len(s_st)), [len(s) for s in s_st])
    same = d_stage[:, None] == s_stage[None, :]
    c = _unit_costs(deep, shallow, d_units, s_units, same, cost, x)
    heads = fam_d == "resnet"
    try:
        if scope == "stage":
            mapping = [_align_stage(c[np.ix_(d_stage == s, s_stage == s)], s, pin_start, pin_end, heads)
                       for s in range(len(s_st))]
        else:
            mapping = _align_network(c, same, [len(s) for s in d_st], [len(s) for s in s_st], pin_start, pin_end,
                                     heads)
    except ConfigError as e:
        rule = "; a ResNet stage's first block maps to the deep stage's first block" if heads else ""
        raise ConfigError(f"{e}. Units per stage: deep {[len(s) for s in d_st]}, shallow "
                          f"{[len(s) for s in s_st]} (alignment scope {scope!r}){rule}") from None
    return Alignment(fam_d, [list(s) for s in d_st], [list(s) for s in s_st], mapping, c, cost)


def _align_stage(c: np.ndarray, stage: int, pin_start: int, pin_end: int, heads: bool) -> list[int]:
    """One stage's DP with the pins applied in it (``stage_pins``)."""
    first, last = stage_pins(c.shape[1], pin_start, pin_end)
    try:
        return align(c, first, last, forced={0: 0} if heads else None)
    except ConfigError as e:
        raise ConfigError(f"stage {stage}: {e}") from None


def _align_network(c: np.ndarray, same: np.ndarray, d_sizes: list[int], s_sizes: list[int], pin_start: int,
                   pin_end: int, heads: bool) -> list[list[int]]:
    """One DP over all units (allowed within a stage), split back into stages of
    ``s_sizes`` shallow units."""
    d_off, s_off = np.cumsum([0, *d_sizes]), np.cumsum([0, *s_sizes])
    forced = {int(s_off[s]): int(d_off[s]) for s in range(len(s_sizes))} if heads else None
    flat = align(c, pin_start, pin_end, forced=forced, allowed=same)
    return [[flat[k] - int(d_off[s]) for k in range(s_off[s], s_off[s + 1])] for s in range(len(s_sizes))]


# ---- depth balancing --------------------------------------------------------------------
@dataclass
class Balanced:
    model: nn.Module
    """The shallow net's function at the deep net's depth, built by ``create_model`` from
    its family's generic descriptor (so it saves, loads and registers like any model)."""
    inserted: list[str] = field(default_factory=list)
    """Unit names of the inserted layers in ``model``."""
    degenerate: dict[str, str] = field(default_factory=dict)
    """ResNet: per conv of an inserted zero block, the map key to reuse for it (the residual
    stream at the block input), for ``ot.fuse(degenerate=...)``."""


def _vgg_plan(plan: list, widths: list[list[int]]) -> list:
    """``plan`` with its s-th run of convs replaced by ``widths[s]``; the pools stay."""
    out, runs = [], iter(widths)
    for is_pool, group in itertools.groupby(plan, key=lambda v: v == "M"):
        out += list(group) if is_pool else next(runs)
    return out


def _identity(model: nn.Module, unit: str, fam: str, bn: str | None) -> None:
    """Make the freshly built ``unit`` the identity on non-negative inputs."""
    mod = model.get_submodule(unit)
    if fam == "mlp":
        nn.init.eye_(mod.weight)
    elif fam == "vgg":
        mod.weight.zero_()
        centre = mod.kernel_size[0] // 2
        mod.weight[:, :, centre, centre] = torch.eye(mod.out_channels)
        if bn is not None:  # eval mode: (x - 0) / sqrt(1 - eps + eps) * 1 + 0 = x
            norm = model.get_submodule(bn)
            norm.reset_parameters()
            norm.running_var.fill_(1.0 - norm.eps)
    else:  # residual block: every conv zero, every norm's eval output 0, so relu(0 + x) = x
        for sub in mod.modules():
            if isinstance(sub, nn.Conv2d):
                sub.weight.zero_()
            elif isinstance(sub, nn.BatchNorm2d):
                sub.reset_parameters()
    for sub in ([mod] if fam != "resnet" else mod.modules()):
        if isinstance(sub, nn.Linear | nn.Conv2d) and sub.bias is not None:
            sub.bias.zero_()


def _moved(key: str, rename: dict[str, str]) -> str:
    """``key`` (a state-dict entry) with its module path renamed (longest prefix wins)."""
    mod, _, leaf = key.rpartition(".")
    parts = mod.split(".")
    for j in range(len(parts), 0, -1):
        head = ".".join(parts[:j])
        if head in rename:
            return ".".join([rename[head], *parts[j:], leaf])
    return key


@torch.no_grad()
def balance(shallow: nn.Module, alignment: Alignment) -> Balanced:
    """Insert identity layers into ``shallow`` at every deep position ``alignment`` skips,
    so it has the deep net's depth and computes the same function. Every other weight (and
    BatchNorm statistics) is copied from ``shallow``."""
    from metaensemble.models import create_model

    old = structure(shallow)
    fam = alignment.family
    if old.family != fam or old.stages != alignment.shallow_units:
        raise ConfigError(f"the alignment was computed for a different shallow net: its units are "
                          f"{alignment.shallow_units}, this {old.family} net's {old.stages}")
    skipped = alignment.skipped
    if skipped[0][:1] == [0]:
        raise ConfigError(f"cannot insert a layer before the first unit ({alignment.deep_units[0][0]!r} is "
                          "unmapped): the network input is not non-negative, so an identity-on-ReLU layer "
                          "would change the function; pin the first unit (pin_start >= 1)")
    if fam == "resnet" and any(sk[:1] == [0] for sk in skipped):
        raise ConfigError("cannot insert a block at the head of a ResNet stage: the head downsamples, so a "
                          f"stride-1 block cannot precede it; heads must map to heads (skipped {skipped})")

    widths, prev = [], None
    for s, (deep, mp) in enumerate(zip(alignment.deep_units, alignment.mapping, strict=True)):
        inv = {i: k for k, i in enumerate(mp)}
        stage = []
        for p in range(len(deep)):
            prev = unit_width(shallow, old.stages[s][inv[p]]) if p in inv else prev
            stage.append(prev)
        widths.append(stage)

    spec = generic_spec(spec_of(shallow))
    kw = dict(spec["kwargs"])
    if fam == "mlp":
        kw["hidden"] = [w for stage in widths for w in stage]
    elif fam == "vgg":
        kw["plan"] = _vgg_plan(list(kw["plan"]), widths)
    else:
        kw["layers"] = [len(d) for d in alignment.deep_units]
    model = create_model(spec["arch"], **kw)
    new = structure(model)

    rename = {u: new.stages[s][i] for s, mp in enumerate(alignment.mapping) for u, i in zip(old.stages[s], mp,
                                                                                          strict=True)}
    old_layers, new_layers = {la.name: la for la in old.layers()}, {la.name: la for la in new.layers()}
    if fam == "vgg":
        rename |= {old_layers[u].bn: new_layers[v].bn for u, v in rename.items() if old_layers[u].bn}
    rename[old.layers()[-1].name] = new.layers()[-1].name  # the classifier (an MLP's moves)

    state = model.state_dict()
    for key, t in shallow.state_dict().items():
        state[_moved(key, rename)] = t.detach().clone()
    model.load_state_dict(state)

    inserted = [new.stages[s][p] for s, sk in enumerate(skipped) for p in sk]
    degenerate = {}
    for unit in inserted:
        _identity(model, unit, fam, new_layers[unit].bn if fam == "vgg" else None)
        if fam == "resnet":
            # Its convs are all zero: the transport problem is degenerate. Convs as wide as the
            # residual stream reuse the stream's map at the block input (the previous block's);
            # a bottleneck's narrower inner convs get a uniform plan (any plan moves zeros alike).
            stage, j = unit.rsplit(".", 1)
            convs = [(n, m) for n, m in model.get_submodule(unit).named_children() if isinstance(m, nn.Conv2d)]
            width = convs[-1][1].out_channels
            for name, sub in convs:
                degenerate[f"{unit}.{name}"] = f"{stage}.{int(j) - 1}" if sub.out_channels == width else "uniform"
    return Balanced(model.train(shallow.training), inserted, degenerate)


# ---- figure -----------------------------------------------------------------------------
def plot_alignment(alignment: Alignment, path: str | Path, title: str) -> Path:
    """The cost matrix (shallow units as rows, deep units as columns; grey: different
    stages, never compared), the chosen map (a marker per shallow unit, its cost written
    in) and the deep positions where balancing inserts a layer (hatched columns)."""
    import matplotlib

    from metaensemble.evaluation import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(alignment.cost, dtype=np.float64).T  # [m shallow, n deep]
    m, n = c.shape
    d_names = [u for s in alignment.deep_units for u in s]
    s_names = [u for s in alignment.shallow_units for u in s]
    flat = alignment.flat_map()
    offsets = np.cumsum([0] + [len(d) for d in alignment.deep_units])
    inserted = [int(offsets[s] + p) for s, sk in enumerate(alignment.skipped) for p in sk]

    def label(u: str) -> str:
        return f"linear {u}" if u.isdigit() else u  # an MLP's units are Sequential indices

    fig, ax = plt.subplots(figsize=(max(5.5, 0.55 * n + 2.5), max(3.5, 0.45 * m + 2.2)))
    im = ax.imshow(np.ma.masked_invalid(c), cmap=plt.get_cmap("viridis").with_extremes(bad="lightgrey"),
                   aspect="auto")
    fig.colorbar(im, ax=ax, label=f"cost ({alignment.cost_name})")
    for i in inserted:
        ax.axvspan(i - 0.5, i + 0.5, facecolor="none", edgecolor="tab:red", hatch="//", lw=0)
    for b in offsets[1:-1]:
        ax.axvline(b - 0.5, color="white", lw=1.5)
    s_off = np.cumsum([0] + [len(s) for s in alignment.shallow_units])
    for b in s_off[1:-1]:
        ax.axhline(b - 0.5, color="white", lw=1.5)
    ax.plot(flat, range(m), "o-", color="tab:red", mfc="white", ms=9, lw=1.2)
    for k, i in enumerate(flat):
        ax.annotate(f"{c[k, i]:.3g}", (i, k), xytext=(0, 10), textcoords="offset points", ha="center",
                    fontsize=7, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.set_xticks(range(n), [label(u) + ("*" if i in inserted else "") for i, u in enumerate(d_names)],
                  rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(m), [label(u) for u in s_names], fontsize=8)
    ax.set_xlabel("deep net unit   (*, hatched: identity layer inserted)")
    ax.set_ylabel("shallow net unit")
    ax.set_title("o: the deep unit each shallow unit maps to (its cost)", fontsize=9)
    return save_figure(fig, title, path)
