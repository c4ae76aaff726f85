"""What a run reports about a model: its named predictions on a split and their metrics.

Shared by the training loop (every epoch and after the last) and ``engine.evaluate``
(a model no training produced), so both write the same report. A method predicts either
one tensor of log-probabilities or named ones (``{"ensemble": .., "member/0": ..}``); the
first name's metrics keep their plain names (``val_acc``), the others are prefixed with
their name (``member/0/val_acc``).
"""

from __future__ import annotations

import torch

from metaensemble import metrics
from metaensemble.methods.base import named

Named = tuple[dict[str, torch.Tensor], torch.Tensor]
"""Named log-probabilities ``{name: [N, C]}`` (float32, cpu) and labels [N]."""


def predict_named(method, net, loader, split: str) -> Named | None:
    """This rank's (named predictions, labels) of ``net`` (an exported model) over
    ``loader``; ranks without a loader (streamed splits are read by rank 0 alone)
    contribute None."""
    if loader is None:
        return None
    pred, y = method.predict(net, loader, split=split)
    return named(pred), y


def concat_predictions(parts: list[Named | None]) -> Named:
    """Every rank's part (as gathered, in rank order) joined into one split."""
    parts = [p for p in parts if p is not None and len(p[1])]
    names = list(parts[0][0])
    return ({n: torch.cat([p[0][n] for p in parts]) for n in names}, torch.cat([p[1] for p in parts]))


def per_name(reports: dict[str, dict[str, float]]) -> dict[str, float]:
    """One metrics dict from one per named prediction: the first as it is, the others'
    keys prefixed ``<name>/``."""
    out: dict[str, float] = {}
    for i, (name, m) in enumerate(reports.items()):
        out.update(m if i == 0 else {f"{name}/{k}": v for k, v in m.items()})
    return out


def split_metrics(preds: Named, split: str) -> dict[str, float]:
    """ACC, NLL and ECE of every named prediction on one split (``<split>_acc``, ...):
    what every epoch logs for val."""
    logps, y = preds
    return per_name({name: metrics.classification_metrics(logp, y, f"{split}_") for name, logp in logps.items()})


def final_report(val: Named, test: Named) -> dict[str, float]:
    """A finished model's report for every named prediction: val/test ACC, NLL and ECE,
    the val-fitted temperature, test cNLL and cECE (``metrics.calibrated_report``)."""
    (val_p, val_y), (test_p, test_y) = val, test
    return per_name({name: metrics.calibrated_report(val_p[name], val_y, test_p[name], test_y) for name in val_p})
