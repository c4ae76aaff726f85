"""From generated rows to a working student, and the ensembles a generator is shown.

    xs = ensemble_input(pool_rows, order)                 # per layer [1, K, R, L]
    state = assemble(gen(xs)["rows"], layout, anchor, 0)  # the student's state dict
    student = generate_student(gen, pool_rows, pool_states, order, bn_loader)
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from metaensemble.methods.weightformer.tokens import Layout, detokenise, stack_ensemble
from metaensemble.models import create_model

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def ensemble_input(pool_rows: list[list[torch.Tensor]], orders: list[list[int]], device=None) -> list[torch.Tensor]:
    """Per layer [V, K, R, L]: view v holds the pool's teachers ``orders[v]`` in that order."""
    views = [stack_ensemble(pool_rows, order) for order in orders]
    return [torch.stack([v[li] for v in views]).to(device) for li in range(len(views[0]))]


def assemble(rows: list[torch.Tensor], layout: Layout, like: dict[str, torch.Tensor], view: int = 0
             ) -> dict[str, torch.Tensor]:
    """View ``view`` of a generator's output rows as a student state dict."""
    return detokenise([r[view] for r in rows], layout, like=like)


def student_logits(skeleton: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The student with generated ``state`` applied to ``x`` through ``functional_call``,
    so the loss reaches the generator. Buffers (BN running statistics) are passed as
    detached copies: a train-mode forward updates them in place and they take no gradient."""
    buffers = {k for k, _ in skeleton.named_buffers()}
    state = {k: (v.detach().clone() if k in buffers else v) for k, v in state.items()}
    return functional_call(skeleton, state, (x,))


def build_student(spec: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain student module (``spec``: the generator's ``student_spec``) holding ``state``."""
    model = create_model(spec["arch"], **spec["kwargs"])
    model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    return model


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def _subset_stats(model: nn.Module, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact per-BatchNorm (mean, var) over ``loader``'s batches; ``model``'s own running
    statistics are left as they were."""
    bns = _bn_layers(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in bns]
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for batch in loader:
        model(batch["x"])
    out = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m, (mean, var, n, mom) in zip(bns, saved, strict=True):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(n)
        m.momentum = mom
    model.train(was)
    return out


@torch.no_grad()
def recompute_bn(model: nn.Module, loader, reference: nn.Module | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``loader``; returns ``model`` in
    eval mode.

    Without ``reference``: the exact mean/variance over the loader's batches. With
    ``reference`` (the same architecture, with statistics accumulated over its full
    training data: the anchor teacher), the loader only measures how far ``model``'s
    statistics moved from the reference's on the same images, and that shift is applied to
    the reference's statistics: mean = ref + (m - m_ref), var = ref * v / v_ref. On a
    subset of ~100 images the plain estimate's sampling error costs a trained digits
    convnet about 0.3 points; here it cancels, and a network equal to the reference keeps
    the reference's statistics."""
    bns = _bn_layers(model)
    if not bns:
        return model.eval()
    new = _subset_stats(model, loader)
    if reference is None:
        for m, (mean, var) in zip(bns, new, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        return model.eval()
    ref_bns = _bn_layers(reference)
    if len(ref_bns) != len(bns):
        raise ValueError(f"reference has {len(ref_bns)} BatchNorm layers, the model {len(bns)}")
    ref_new = _subset_stats(reference, loader)
    for m, r, (mean, var), (r_mean, r_var) in zip(bns, ref_bns, new, ref_new, strict=True):
        m.running_mean.copy_(r.running_mean + (mean - r_mean))
        m.running_var.copy_(r.running_var * (var / r_var.clamp_min(1e-12)))
    return model.eval()


@torch.no_grad()
def generate_student(gen: nn.Module, pool_rows: list[list[torch.Tensor]], pool_states: list[dict[str, torch.Tensor]],
                     order: list[int], bn_loader=None) -> tuple[nn.Module, float]:
    """One eval-mode generation for the ensemble ``order`` (indices into the pool; the
    first is the anchor), BN statistics re-estimated on ``bn_loader`` relative to the
    anchor's (``recompute_bn`` with the anchor as reference: a zero correction gives the
    anchor itself). Returns the student and the wall time in seconds (generation +
    assembly + BN re-estimation)."""
    t0 = time.perf_counter()
    dev = next(gen.parameters()).device
    was = gen.training
    gen.eval()
    try:
        out = gen(ensemble_input(pool_rows, [order], device=dev))
    finally:
        gen.train(was)
    anchor = {k: v.to(dev) for k, v in pool_states[order[0]].items()}
    student = build_student(gen.student_spec, assemble(out["rows"], gen.layout, anchor)).to(dev)
    if bn_loader is not None:
        recompute_bn(student, bn_loader, reference=build_student(gen.student_spec, pool_states[order[0]]).to(dev))
    student.eval()
    return student, time.perf_counter() - t0


def weight_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The naive parameter average of same-architecture networks (integer buffers: the first's)."""
    out = {}
    for k, v in states[0].items():
        out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
    return out


def make_ensembles(n: int, k: int, count: int, seed: int) -> list[list[int]]:
    """``count`` distinct ordered ensembles of ``k`` out of ``n`` teachers (the first is the
    anchor): a combination and which member leads. Fewer when fewer exist."""
    if n < k:
        raise ValueError(f"{n} teachers cannot form an ensemble of {k}")
    total = math.comb(n, k) * k
    rng = np.random.default_rng([seed, n, k])
    if total <= max(count, 2000):
        cands = [list(c[r:] + c[:r]) for c in itertools.combinations(range(n), k) for r in range(k)]
        pick = rng.permutation(len(cands))[:count]
        return [cands[i] for i in pick]
    out: list[list[int]] = []
    seen = set()
    while len(out) < count:
        c = sorted(rng.choice(n, size=k, replace=False).tolist())
        r = int(rng.integers(k))
        t = tuple(c[r:] + c[:r])
        if t not in seen:
            seen.add(t)
            out.append(list(t))
    return out
