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
from metaensemble.models.batchnorm import recompute_bn


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


@torch.no_grad()
def generate_student(gen: nn.Module, pool_rows: list[list[torch.Tensor]], pool_states: list[dict[str, torch.Tensor]],
                     order: list[int], bn_loader=None) -> tuple[nn.Module, float]:
    """One eval-mode generation for the ensemble ``order`` (indices into the pool; the
    first is the anchor, whose integer buffers the student takes), BN statistics
    recomputed on ``bn_loader``. Returns the student and the wall time in seconds
    (generation + assembly + BN pass)."""
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
        recompute_bn(student, bn_loader)
    student.eval()
    return student, time.perf_counter() - t0


def relative_l2(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """||state - ref|| / ||ref|| over the learned tensors (weights, biases, BN affine;
    not BN running statistics or integer buffers)."""
    keys = [k for k, v in ref.items() if v.is_floating_point() and "running_" not in k]
    num = sum(float((state[k].float() - ref[k].float()).pow(2).sum()) for k in keys)
    den = sum(float(ref[k].float().pow(2).sum()) for k in keys)
    return (num / max(den, 1e-30)) ** 0.5


def distances(state: dict[str, torch.Tensor], teachers: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """A generated student's ``relative_l2`` to its anchor (``teachers[0]``), to its
    teachers' weight average, and to the nearest of them (near 0 for a student that copies
    one teacher, however far it is from the anchor)."""
    return {"rel_l2_to_anchor": relative_l2(state, teachers[0]),
            "rel_l2_to_mean": relative_l2(state, weight_average(teachers)),
            "rel_l2_to_nearest": min(relative_l2(state, t) for t in teachers)}


def weight_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The naive parameter average of same-architecture networks (integer buffers: the first's)."""
    out = {}
    for k, v in states[0].items():
        out[k] = torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
    return out


def make_ensembles(n: int, k: int, count: int, seed: int) -> list[list[int]]:
    """``count`` ordered ensembles of ``k`` out of ``n`` teachers (the first is the anchor):
    distinct combinations, each with a random member leading; only when ``count`` exceeds
    the C(n, k) combinations do further anchors of the same combinations follow. Fewer
    when fewer (combination, anchor) pairs exist."""
    if n < k:
        raise ValueError(f"{n} teachers cannot form an ensemble of {k}")
    rng = np.random.default_rng([seed, n, k])
    n_comb = math.comb(n, k)
    if n_comb <= max(count, 2000):
        combos = [list(c) for c in itertools.combinations(range(n), k)]
        combos = [combos[i] for i in rng.permutation(n_comb)]
        lead = [rng.permutation(k).tolist() for _ in combos]  # each combination's anchors, in draw order
        out = [c[r:] + c[:r] for rnd in range(k) for c, ls in zip(combos, lead, strict=True) for r in [ls[rnd]]]
        return out[:count]
    out: list[list[int]] = []
    seen = set()
    while len(out) < count:
        c = tuple(sorted(rng.choice(n, size=k, replace=False).tolist()))
        if c not in seen:
            seen.add(c)
            r = int(rng.integers(k))
            out.append(list(c[r:] + c[:r]))
    return out
