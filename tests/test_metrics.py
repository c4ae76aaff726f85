"""Metric properties (ensemble-distillation spec, property 7, and the conventions)."""

import torch
import torch.nn.functional as F

from metaensemble import metrics


def _calibrated_sample(n=200_000, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, c, generator=g)
    probs = logits.softmax(1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)  # y ~ p: calibrated by construction
    return logits, probs, labels


def test_calibrated_predictor_has_ece_near_zero():
    _, probs, y = _calibrated_sample()
    assert metrics.ece(probs, y) < 0.01


def test_confidence_one_with_accuracy_a_gives_ece_one_minus_a():
    n, a = 1000, 0.73
    y = torch.zeros(n, dtype=torch.long)
    pred = torch.zeros(n, dtype=torch.long)
    pred[int(a * n):] = 1
    probs = F.one_hot(pred, 3).float()
    assert abs(metrics.ece(probs, y) - (1 - a)) < 1e-9
    assert abs(metrics.accuracy(probs, y) - a) < 1e-9


def test_ece_bins_are_right_closed_and_empty_bins_skipped():
    # max-probabilities exactly on bin edges 7/15 and 8/15, and one at 0.9
    edge = torch.tensor([7 / 15, 8 / 15, 0.9])
    probs = torch.stack([edge, 1 - edge], dim=1)
    bins = metrics.ece_bins(probs, torch.tensor([0, 1, 0]))
    counts = bins[:, 0]
    # confidences are 8/15 (row 0: max(7/15, 8/15)), 8/15 (row 1), 0.9
    assert counts[7] == 2  # 8/15 is the right edge of bin 7, so it is inside bin 7
    assert counts[13] == 1  # 0.9 in (13/15, 14/15]
    assert counts.sum() == 3
    # ECE over non-empty bins only: |sum conf - sum correct| / n per bin
    # row 0 predicts 1 (label 0) and row 1 predicts 0 (label 1): both wrong; row 2 right
    expected = (abs(2 * 8 / 15 - 0.0) + abs(0.9 - 1.0)) / 3
    assert abs(metrics.ece(probs, torch.tensor([0, 1, 0])) - float(expected)) < 1e-6


def test_nll_uses_eps_and_matches_cross_entropy():
    logits, probs, y = _calibrated_sample(1000)
    assert abs(metrics.nll(probs, y) - F.cross_entropy(logits, y).item()) < 1e-4
    hard = F.one_hot(torch.zeros(4, dtype=torch.long), 2).float()
    assert abs(metrics.nll(hard, torch.ones(4, dtype=torch.long)) - (-torch.log(torch.tensor(1e-8))).item()) < 1e-3


def test_temperature_scaling_recovers_t0_and_keeps_accuracy():
    g = torch.Generator().manual_seed(1)
    z = 3.0 * torch.randn(50_000, 10, generator=g)
    t0 = 2.5
    y = torch.multinomial((z / t0).softmax(1), 1, generator=g).squeeze(1)  # data ~ softmax(z / t0)
    logp = F.log_softmax(z, 1)
    t = metrics.fit_temperature(logp, y)
    assert abs(t - t0) / t0 < 0.05
    scaled = F.log_softmax(logp / t, 1)
    assert metrics.accuracy(scaled.exp(), y) == metrics.accuracy(logp.exp(), y)
    assert metrics.nll(scaled.exp(), y) <= metrics.nll(logp.exp(), y)


def test_temperature_never_raises_val_nll_when_already_calibrated():
    logits, _, y = _calibrated_sample(20_000, seed=3)
    logp = F.log_softmax(logits, 1)
    t = metrics.fit_temperature(logp, y)
    assert metrics.nll(F.log_softmax(logp / t, 1).exp(), y) <= metrics.nll(logp.exp(), y) + 1e-12
    assert abs(t - 1.0) < 0.05


def test_ensemble_is_probability_average_not_logit_average():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 100, 5, generator=g) * 3
    logp = metrics.ensemble_logp(z)
    assert torch.allclose(logp.exp(), z.softmax(-1).mean(0), atol=1e-6)
    assert not torch.allclose(logp.exp(), z.mean(0).softmax(-1), atol=1e-3)
    # M copies of one member are that member
    same = metrics.ensemble_logp([z[0]] * 3)
    assert torch.allclose(same, F.log_softmax(z[0], -1), atol=1e-6)


def test_calibrated_report_fits_on_val_only():
    logits, _, y = _calibrated_sample(4000, seed=5)
    val, test = F.log_softmax(logits[:2000] * 3, 1), F.log_softmax(logits[2000:] * 3, 1)
    r = metrics.calibrated_report(val, y[:2000], test, y[2000:])
    assert r["temperature"] > 2.0  # overconfident by 3x: t near 3
    assert r["test_cnll"] < r["test_nll"] and r["test_cece"] < r["test_ece"]
