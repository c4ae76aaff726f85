"""BatchNorm statistics re-estimated from data: what a network needs after its weights
were made rather than trained (fused, generated, averaged).

    recompute_bn(model, loader)      # loader yields {"x": ...} batches; model comes back in eval mode
"""

from __future__ import annotations

import torch
import torch.nn as nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
def recompute_bn(model: nn.Module, loader) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics over all of ``loader``'s batches
    with no momentum (PyTorch's cumulative average: the exact mean, and the mean of the
    batches' unbiased variances); returns ``model`` in eval mode. The one BN procedure of
    the library: fused networks and every network the meta-train table scores go through it."""
    bns = _bn_layers(model)
    if not bns:
        return model.eval()
    for m, (mean, var) in zip(bns, _subset_stats(model, loader), strict=True):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return model.eval()
