"""Classification metrics: ACC, NLL, ECE, temperature scaling, ensemble predictions.

Conventions (ensemble-distillation spec, "Metrics"):
- a predictor is given by its log-probabilities ``logp`` [N, C] (for a single network,
  ``log_softmax(logits)``; for an ensemble, ``log(mean_m softmax(z_m))``);
- NLL = mean(-log(p_y + 1e-8)); ECE: 15 equal-width bins on the max probability,
  right-closed, empty bins skipped;
- temperature t is fitted on val by minimising NLL of ``softmax(logp / t)``; cNLL and
  cECE are NLL and ECE on test after that division.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(dim=1) == labels).double().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    p_y = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    return float((-(p_y + EPS).log()).mean())


def ece_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Per-bin sufficient statistics [n_bins, 3]: (count, sum confidence, sum correct).

    Bins are right-closed: (k/n, (k+1)/n]; a confidence of exactly 0 falls in bin 0.
    Summing these across shards and then calling ``ece_from_bins`` is exact.
    """
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    # bucketize(right=False) gives i with edge[i-1] < conf <= edge[i]: right-closed bins.
    # The inner edges are made in conf's dtype so a confidence of exactly k/n lands in bin k-1.
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1].to(conf.dtype)
    idx = torch.bucketize(conf, edges, right=False)
    out = torch.zeros(n_bins, 3, dtype=torch.float64)
    out[:, 0].index_add_(0, idx, torch.ones_like(correct))
    out[:, 1].index_add_(0, idx, conf.double())
    out[:, 2].index_add_(0, idx, correct)
    return out


def ece_from_bins(bins: torch.Tensor) -> float:
    count = bins[:, 0]
    n = count.sum()
    nonempty = count > 0
    gap = (bins[nonempty, 1] - bins[nonempty, 2]).abs()  # |sum conf - sum correct| per bin
    return float(gap.sum() / n)


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    return ece_from_bins(ece_bins(probs, labels, n_bins))


def ensemble_logp(logits: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """log of the mean of member softmaxes. ``logits`` [M, N, C] or a list of [N, C]."""
    z = torch.stack(list(logits)) if isinstance(logits, list) else logits
    return torch.logsumexp(F.log_softmax(z.float(), dim=-1), dim=0) - torch.log(torch.tensor(float(z.shape[0])))


def fit_temperature(logp: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature t > 0 minimising val NLL of softmax(logp / t), starting at t = 1.

    Optimises log t with L-BFGS; the result is never worse on ``logp`` than t = 1.
    """
    logp = logp.detach().double()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        loss = F.cross_entropy(logp / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(loss_fn)
    t = float(log_t.detach().exp())
    with torch.no_grad():
        base = F.cross_entropy(logp, labels)
        fitted = F.cross_entropy(logp / t, labels)
    return t if fitted <= base else 1.0


def classification_metrics(logp: torch.Tensor, labels: torch.Tensor, prefix: str = "") -> dict[str, float]:
    probs = logp.float().exp()
    return {f"{prefix}acc": accuracy(probs, labels), f"{prefix}nll": nll(probs, labels), f"{prefix}ece": ece(probs, labels)}


def calibrated_report(val_logp, val_y, test_logp, test_y) -> dict[str, float]:
    """val/test ACC, NLL, ECE, plus the val-fitted temperature and test cNLL/cECE."""
    t = fit_temperature(val_logp, val_y)
    out = {**classification_metrics(val_logp, val_y, "val_"), **classification_metrics(test_logp, test_y, "test_")}
    scaled = F.log_softmax(test_logp.double() / t, dim=1)
    probs = scaled.exp()
    out.update({"temperature": t, "test_cnll": nll(probs, test_y), "test_cece": ece(probs, test_y)})
    return out
