"""OT fusion (Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020).

Every non-anchor model is aligned to the anchor one layer at a time, then the aligned
models and the anchor are averaged. A map T [n0, n1] is a transport plan between model
0's n0 neurons and the anchor's n1 neurons with uniform marginals (rows 1/n0, columns
1/n1); its corrected form T_c (``corrected``) is what weights are multiplied with:

    W0'  = W0 T_c(input)          incoming side, per kernel / spatial position
    W0'' = T_c(layer)^T W0'       outputs (bias, BatchNorm weight and bias too)
    W    = sum_m w_m W_m''        (the anchor enters unaligned)

    result = fuse([model_a, model_b], opts=FusionOptions(), x=activation_sample(train, 200, 0))
    recompute_bn_stats(result.model, batches)

The fused network is the anchor's architecture (widths and neuron order). The class
layer's outputs are never moved. In a ResNet each layer's own map is solved first
(phase 1), a residual sum's map is the mean of its parts' maps, and the layers feeding a
sum are moved with the sum's map (phase 2). Everything here is pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from metaensemble.errors import ConfigError
from metaensemble.methods.fusion.structure import Layer, Structure, Sum, capture, spec_of, structure
from metaensemble.models import create_model
from metaensemble.models.batchnorm import recompute_bn
from metaensemble.transport import DISTANCES, SOLVERS, ground_cost, transport

METRICS = ("activation", "weight")


@dataclass
class FusionOptions:
    """How maps are found and models combined.

    ``sinkhorn_reg`` is the entropic regularisation relative to the cost's scale: the cost
    is divided by its maximum before Sinkhorn, so the same value suits any layer.
    ``past_correction=False`` moves every layer's unaligned weights (T^T W0, not
    T^T W0 T_prev); the weight ground metric still compares the aligned incoming rows
    W0 T_prev, as the original does. Only valid where each layer's input widths are
    equal. ``s`` is the anchor's weight when fusing two models (model 0 gets 1 - s); k > 2
    models get 1/k each."""

    ground_metric: str = "activation"
    distance: str = "euclidean"
    solver: str = "emd"
    sinkhorn_reg: float = 0.01
    correction: bool = True
    past_correction: bool = True
    s: float = 0.5

    def __post_init__(self) -> None:
        for name, valid in (("ground_metric", METRICS), ("distance", DISTANCES), ("solver", SOLVERS)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"fusion {name} must be one of {', '.join(valid)}; got {getattr(self, name)!r}")
        if isinstance(self.sinkhorn_reg, bool) or not isinstance(self.sinkhorn_reg, int | float) \
                or not self.sinkhorn_reg > 0:
            raise ConfigError(f"fusion sinkhorn_reg must be a positive number, got {self.sinkhorn_reg!r}")
        for name in ("correction", "past_correction"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"fusion {name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.s, bool) or not isinstance(self.s, int | float) or not 0 <= self.s <= 1:
            raise ConfigError(f"fusion s (the anchor's weight) must be a number in [0, 1], got {self.s!r}")


@dataclass
class FusionResult:
    model: nn.Module
    """The fused network: the anchor's architecture, in eval mode, BN statistics the
    anchor's (recompute them with ``recompute_bn_stats``)."""
    maps: dict[str, list[torch.Tensor]]
    """Per map key (layer path or residual-sum key; not the classifier), one plan T
    [n0, n1] (float64, uncorrected) per non-anchor model, in model order."""
    costs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """Per layer whose map was solved, the ground cost [n0, n1] per non-anchor model."""
    weights: list[float] = field(default_factory=list)
    """The mixing weight of each model (the anchor's included), summing to 1."""


# ---- maps ---------------------------------------------------------------------------------
def corrected(t: torch.Tensor, correction: bool = True) -> torch.Tensor:
    """T_c [n0, n1] that weights are multiplied with. ``correction``: each column divided
    by its mass, so every anchor neuron is a barycentre of model-0 neurons (columns sum
    to 1). Without it, T as solved (entries about 1/n: the aligned weights shrink by the
    widths), as the original code does when its correction flag is off."""
    if correction:
        return t / t.sum(0, keepdim=True).clamp_min(1e-30)
    return t


def align_inputs(weight: torch.Tensor, t_c: torch.Tensor) -> torch.Tensor:
    """W0' = W0 T_c over the input dimension. ``weight``: conv [out, n0, kh, kw] (aligned
    per kernel position) or linear [out, n0 * k] (k > 1: fed by a flattened [n0, k]
    feature map, aligned per spatial position). Returns [out, n1, ...]."""
    n0, n1 = t_c.shape
    t_c = t_c.to(weight)
    if weight.dim() == 4:
        return torch.einsum("oikl,ij->ojkl", weight, t_c)
    out, fin = weight.shape
    if fin % n0:
        raise ConfigError(f"a linear layer with {fin} inputs cannot follow {n0} neurons "
                          f"(its inputs must be {n0} channels x spatial positions)")
    k = fin // n0
    return torch.einsum("ock,cj->ojk", weight.reshape(out, n0, k), t_c).reshape(out, n1 * k)


def move_outputs(t_c: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """T_c^T X: ``tensor`` [n0, ...] (weight rows, bias, BN affine) -> [n1, ...]."""
    flat = tensor.reshape(tensor.shape[0], -1)
    return (t_c.to(tensor).T @ flat).reshape(t_c.shape[1], *tensor.shape[1:])


# ---- activations -------------------------------------------------------------------------
def activation_sample(data, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` inputs drawn without replacement (all of them if fewer) from a tensor [N, ...]
    or a dataset (items ``{"x": ...}``, ``(x, y, ...)`` or ``x``), deterministic in
    ``seed``. Returns [n, ...]."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the activation sample size must be a positive int, got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(data), generator=g)[:n]
    if isinstance(data, torch.Tensor):
        return data[idx]
    return torch.stack([torch.as_tensor(_input_of(data[int(i)])) for i in idx])


def _input_of(item):
    if isinstance(item, dict):
        return item["x"]
    if isinstance(item, tuple | list):
        return item[0]
    return item


@torch.no_grad()
def layer_activations(model: nn.Module, layers: Sequence[Layer], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's pre-activation outputs (its BatchNorm's output where it has one) on
    ``x`` in eval mode: per layer name [neurons, samples] (linear) or
    [channels, samples * positions] (conv)."""
    ys = capture(model, {layer.name: model.get_submodule(layer.bn or layer.name) for layer in layers}, x)
    return {k: y.transpose(0, 1).reshape(y.shape[1], -1) for k, y in ys.items()}


# ---- fusion ------------------------------------------------------------------------------
def _signature(s: Structure) -> list[tuple]:
    return [("sum", st.key, st.parts) if isinstance(st, Sum)
            else ("layer", st.name, st.kind, st.input, st.move_with, st.classifier, st.bn is not None)
            for st in s.steps]


def _check_compatible(models: list[nn.Module], structs: list[Structure], states: list[dict], a: int) -> None:
    ref = _signature(structs[a])
    for i, s in enumerate(structs):
        sig = _signature(s)
        if sig == ref:
            continue
        na, ni = len(structs[a].layers()), len(s.layers())
        where = next((f"step {j}: {x} vs the anchor's {y}" for j, (x, y) in enumerate(zip(sig, ref, strict=False))
                      if x != y), f"{len(sig)} steps vs the anchor's {len(ref)}")
        raise ConfigError(
            f"OT fusion needs models of one layer structure; model {i} ({spec_of(models[i])['arch']}, {ni} weight "
            f"layers) differs from the anchor ({spec_of(models[a])['arch']}, {na} weight layers) at {where}. "
            "Depth-balance models of different depths with cross-layer alignment (CLAFusion) first")
    for layer in structs[a].layers():
        has = [f"{layer.name}.bias" in st for st in states]
        if len(set(has)) > 1:
            i = has.index(not has[a])
            raise ConfigError(f"model {i}'s {layer.name} {'has' if has[i] else 'has no'} bias and the anchor's "
                              f"{'has' if has[a] else 'has none'}: fuse networks built alike (the bias option)")
        wa = states[a][f"{layer.name}.weight"].shape
        for i, st in enumerate(states):
            w = st[f"{layer.name}.weight"].shape
            bad = w[2:] != wa[2:] or (layer.input == "input" and w[1] != wa[1]) or (layer.classifier and w[0] != wa[0])
            if bad:
                raise ConfigError(f"model {i}'s {layer.name}.weight {tuple(w)} does not fit the anchor's {tuple(wa)}: "
                                  "inputs, kernel sizes and class counts must match (only widths may differ)")


def _mixing(weights: Sequence[float] | None, k: int, a: int, s: float) -> list[float]:
    if weights is None:
        if k == 2:
            return [s if i == a else 1 - s for i in range(2)]
        return [1 / k] * k
    w = [float(v) for v in weights]
    if len(w) != k or any(v < 0 for v in w) or abs(sum(w) - 1) > 1e-6:
        raise ConfigError(f"fusion weights must be {k} non-negative numbers summing to 1 (one per model), got {list(weights)}")
    return w


def _incoming(state: dict, layer: Layer, plans: dict, opts: FusionOptions, aligned: bool = True) -> torch.Tensor:
    """``layer``'s weight (float64, CPU), its input side aligned to the anchor's (W0 T_prev)
    unless ``aligned`` is false."""
    w = state[f"{layer.name}.weight"].detach().cpu().double()
    if layer.input == "input":
        return w
    t = plans[layer.input]
    if aligned:
        return align_inputs(w, corrected(t, opts.correction))
    if t.shape[0] != t.shape[1]:
        raise ConfigError(f"past_correction=False leaves {layer.name}'s inputs unaligned, which needs equal input "
                          f"widths; got {t.shape[0]} vs the anchor's {t.shape[1]} (use past_correction=True)")
    return w


def _solve_maps(state: dict, anchor_state: dict, struct: Structure, opts: FusionOptions,
                acts: dict | None, anchor_acts: dict | None, degenerate: dict[str, str]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Phase 1: every layer's own plan and every residual sum's, in forward order."""
    plans: dict[str, torch.Tensor] = {}
    costs: dict[str, torch.Tensor] = {}
    for st in struct.steps:
        if isinstance(st, Sum):
            plans[st.key] = torch.stack([plans[p] for p in st.parts]).mean(0)
            continue
        if st.classifier:
            continue
        if st.name in degenerate:
            key = degenerate[st.name]
            if key == "uniform":  # any plan moves all-zero neurons alike; spread evenly
                n0, n1 = state[f"{st.name}.weight"].shape[0], anchor_state[f"{st.name}.weight"].shape[0]
                plans[st.name] = torch.full((n0, n1), 1.0 / (n0 * n1), dtype=torch.float64)
                continue
            if key not in plans:
                raise ConfigError(f"degenerate layer {st.name} reuses the map {key!r}, which is not computed before it; "
                                  f"maps computed so far: {', '.join(plans) or '(none)'}")
            plans[st.name] = plans[key]
            continue
        if opts.ground_metric == "activation":
            cost = ground_cost(acts[st.name], anchor_acts[st.name], opts.distance)
        else:
            rows = _incoming(state, st, plans, opts).flatten(1)  # aligned, whatever past_correction says
            cost = ground_cost(rows, anchor_state[f"{st.name}.weight"].detach().cpu().flatten(1), opts.distance)
        costs[st.name] = cost.cpu()
        plans[st.name] = transport(cost, opts.solver, opts.sinkhorn_reg)
    return plans, costs


def _moved(state: dict, struct: Structure, plans: dict, opts: FusionOptions) -> dict[str, torch.Tensor]:
    """Phase 2: every fused tensor of one model, aligned to the anchor (float64)."""
    out: dict[str, torch.Tensor] = {}
    for layer in struct.layers():
        tensors = {f"{layer.name}.weight": _incoming(state, layer, plans, opts, aligned=opts.past_correction)}
        for key in _layer_keys(layer, state)[1:]:
            tensors[key] = state[key].detach().cpu().double()
        if not layer.classifier:
            t_c = corrected(plans[layer.move_with or layer.name], opts.correction)
            tensors = {k: move_outputs(t_c, v) for k, v in tensors.items()}
        out.update(tensors)
    return out


def fuse(models: Sequence[nn.Module], anchor: int = -1, opts: FusionOptions | None = None,
         x: torch.Tensor | None = None, degenerate: dict[str, str] | None = None,
         weights: Sequence[float] | None = None) -> FusionResult:
    """OT-fuse ``models`` (same layer structure, any widths) into the anchor's architecture.

    ``x`` [N, ...]: the inputs every model's activations are measured on (required for the
    activation ground metric; see ``activation_sample``). ``degenerate`` maps a layer name
    to the key whose map it reuses instead of solving transport (an inserted all-zero
    residual block's neurons are indistinguishable). ``weights``: one mixing weight per
    model, summing to 1 (default: the anchor s and model 0 1 - s for two models, 1/k each
    for k > 2). Everything that is not a fused layer (BN running statistics included) is
    the anchor's."""
    opts = opts or FusionOptions()
    models = list(models)
    k = len(models)
    if k < 2:
        raise ConfigError(f"fusion needs at least two models, got {k}")
    if not -k <= anchor < k:
        raise ConfigError(f"anchor must index one of the {k} models (0..{k - 1} or negative), got {anchor}")
    a = anchor % k
    if opts.ground_metric == "activation" and x is None:
        raise ConfigError("the activation ground metric needs inputs x (e.g. activation_sample(train_set, 200, seed)); "
                          "pass x or use ground_metric='weight'")
    structs = [structure(m) for m in models]
    states = [m.state_dict() for m in models]
    _check_compatible(models, structs, states, a)
    mix = _mixing(weights, k, a, opts.s)
    struct = structs[a]
    hidden = [layer for layer in struct.layers() if not layer.classifier]
    if degenerate is None or isinstance(degenerate, dict):
        degenerate = [dict(degenerate or {})] * k
    degenerate = [dict(d or {}) for d in degenerate]
    if len(degenerate) != k:
        raise ConfigError(f"degenerate must be one dict for every model or a list of {k} (one per model), "
                          f"got {len(degenerate)}")
    unknown = sorted(set().union(*degenerate) - {layer.name for layer in hidden})
    if unknown:
        raise ConfigError(f"degenerate names unknown layers {unknown}; hidden layers: "
                          f"{', '.join(layer.name for layer in hidden)}")

    acts = [layer_activations(m, hidden, x) if opts.ground_metric == "activation" else None for m in models]
    fused_tensors = {key: mix[a] * states[a][key].detach().cpu().double()
                     for layer in struct.layers() for key in _layer_keys(layer, states[a])}
    maps: dict[str, list[torch.Tensor]] = {}
    costs: dict[str, list[torch.Tensor]] = {}
    for i, state in enumerate(states):
        if i == a:
            continue
        # a layer inserted into either of the pair (model i or the anchor) is degenerate for the pair
        plans, cost = _solve_maps(state, states[a], struct, opts, acts[i], acts[a], {**degenerate[i], **degenerate[a]})
        for key, v in _moved(state, struct, plans, opts).items():
            fused_tensors[key] += mix[i] * v
        for key, t in plans.items():
            maps.setdefault(key, []).append(t)
        for key, c in cost.items():
            costs.setdefault(key, []).append(c)

    spec = spec_of(models[a])
    fused = create_model(spec["arch"], **spec["kwargs"])
    new_state = {key: v.clone() for key, v in states[a].items()}
    for key, v in fused_tensors.items():
        new_state[key] = v.to(states[a][key].dtype)
    fused.load_state_dict(new_state, strict=True)
    device = next(models[a].parameters()).device
    return FusionResult(fused.to(device).eval(), maps, costs, mix)


def _layer_keys(layer: Layer, state: dict) -> list[str]:
    """The state-dict keys fused for ``layer``: weight first, then bias and BatchNorm affine
    parameters where present."""
    keys = [f"{layer.name}.weight", f"{layer.name}.bias"]
    if layer.bn:
        keys += [f"{layer.bn}.weight", f"{layer.bn}.bias"]
    return [k for k in keys if k in state]


# ---- BatchNorm statistics ----------------------------------------------------------------
def recompute_bn_stats(model: nn.Module, batches: Iterable) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/variance exactly over ``batches``
    (tensors, ``{"x": ...}`` dicts or ``(x, y, ...)`` tuples); returns ``model`` in eval
    mode. Needed after fusion: the fused affine parameters no longer match the anchor's
    statistics. (The original OT-fusion code resets them to 0/1, which is wrong for a BN
    network.)"""
    device = next(model.parameters()).device
    return recompute_bn(model, ({"x": _input_of(b).to(device)} for b in batches))
