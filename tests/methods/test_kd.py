"""Ensemble KD loss: property 1 of methods/ensemble-distillation.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaensemble.errors import ConfigError
from metaensemble.methods.distill import EnsembleKD, ensemble_kd_loss
from metaensemble.validation import load_config


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 32, 10, generator=g) * 3, torch.randn(32, 10, generator=g) * 2, torch.randint(0, 10, (32,), generator=g)


def test_kd_is_t2_cross_entropy_to_the_mean_of_tempered_probabilities_up_to_a_constant():
    t_logits, s, y = _logits(0)
    T = 4.0
    p_bar = F.softmax(t_logits / T, -1).mean(0)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    kd = ensemble_kd_loss(s1, t_logits, y, 1.0, T)
    ce = T * T * -(p_bar * F.log_softmax(s2 / T, -1)).sum(-1).mean()
    entropy = T * T * -(p_bar * p_bar.log()).sum(-1).mean()
    assert float(kd.detach()) == pytest.approx(float((ce - entropy).detach()), abs=1e-5)
    kd.backward()
    ce.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_target_is_not_the_softmax_of_averaged_logits():
    t_logits, s, y = _logits(1)
    T = 4.0
    wrong = F.softmax(t_logits.mean(0) / T, -1)
    wrong_loss = T * T * (wrong * (wrong.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    assert abs(float(ensemble_kd_loss(s, t_logits, y, 1.0, T)) - float(wrong_loss)) > 1e-3


def test_copies_of_one_teacher_give_single_teacher_kd():
    t_logits, s, y = _logits(2)
    one = t_logits[:1]
    assert float(ensemble_kd_loss(s, one.expand(4, -1, -1), y, 1.0, 4.0)) == pytest.approx(
        float(ensemble_kd_loss(s, one, y, 1.0, 4.0)), abs=1e-6)


def test_alpha_one_ignores_labels_and_alpha_below_one_adds_cross_entropy():
    t_logits, s, y = _logits(3)
    a = ensemble_kd_loss(s, t_logits, y, 1.0, 4.0)
    assert float(a) == float(ensemble_kd_loss(s, t_logits, (y + 1) % 10, 1.0, 4.0))
    assert float(a) == float(ensemble_kd_loss(s, t_logits, None, 1.0, 4.0))
    mixed = ensemble_kd_loss(s, t_logits, y, 0.25, 4.0)
    assert float(mixed) == pytest.approx(0.25 * float(a) + 0.75 * float(F.cross_entropy(s, y)), abs=1e-5)


def test_kd_method_needs_teachers():
    cfg = load_config("configs/teachers/digits.yaml", ["method=kd"])
    with pytest.raises(ConfigError, match="distill.teachers"):
        EnsembleKD(cfg).validate()
