"""Optimal transport between two sets of rows (neurons, weight rows): the ground cost
between them and the transport plan with uniform marginals (POT). Shared by OT fusion
(``methods.fusion.ot``) and WeightFormer's permutation alignment.

    plan = transport(ground_cost(a, b, "euclidean"), "emd")    # [n0, n1], float64
"""

from __future__ import annotations

import numpy as np
import ot
import torch

from metaensemble.errors import ConfigError

DISTANCES = ("euclidean", "sqeuclidean", "cosine")
SOLVERS = ("emd", "sinkhorn")
SINKHORN_ITERS = 10_000
"""POT's default of 1000 does not converge on some layers at reg 0.01."""


def ground_cost(a: torch.Tensor, b: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """[n0, n1] float64 cost between the rows of ``a`` [n0, d] and ``b`` [n1, d]."""
    if distance not in DISTANCES:
        raise ConfigError(f"distance must be one of {', '.join(DISTANCES)}; got {distance!r}")
    a, b = a.detach().double(), b.detach().double().to(a.device)
    if distance == "cosine":
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (1 - a @ b.T).clamp_min(0)
    # The matmul form of cdist loses the exact zeros that permutation recovery relies on.
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return d.square() if distance == "sqeuclidean" else d


def transport(cost: torch.Tensor, solver: str = "emd", reg: float = 0.01) -> torch.Tensor:
    """The plan T [n0, n1] (float64, CPU) with uniform marginals minimising <T, cost>:
    exact EMD (``ot.emd``) or entropic Sinkhorn (``ot.sinkhorn``, ``reg`` relative to
    the cost divided by its maximum)."""
    if solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    m = np.ascontiguousarray(cost.detach().cpu().double().numpy())
    n0, n1 = m.shape
    a, b = np.full(n0, 1.0 / n0), np.full(n1, 1.0 / n1)
    if solver == "emd":
        t = ot.emd(a, b, m)
    else:
        top = m.max()
        t = ot.sinkhorn(a, b, m / top if top > 0 else m, reg, numItermax=SINKHORN_ITERS)
    return torch.from_numpy(np.asarray(t, dtype=np.float64))
