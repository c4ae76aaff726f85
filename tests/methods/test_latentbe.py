"""LatentBE and TDiv-SDiv: the method's testable properties
(docs/distill.md describes the method), numbered as below.

    1. KD target             member_kd_loss / ensemble_kd_loss
    2. BE layer              BEConv2d / BELinear / tile
    3. Fold                  fold / with_mean_factors, every model family
    4. Pairing               student member m <-> teacher m
    5. r/s gradients         LatentBE.param_groups / configure_optimizer / factor_step_hook
    6. Perturbation          diversifying_perturbation / draw_pair
   (conversion)              check_convertible / to_batchensemble
   (end to end)              LatentBE / TDivSDiv .training_step, .export, .validate

Everything runs on tiny CPU models (8x8 inputs, a few channels).
"""

from __future__ import annotations

import copy
import math
from itertools import permutations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.methods.distill import ensemble_kd_loss, teacher_logits
from metaensemble.methods.latentbe.batchensemble import (
    BE_LAYERS,
    BEConv2d,
    BELinear,
    check_convertible,
    factor_parameters,
    fold,
    members_of,
    tile,
    to_batchensemble,
    with_mean_factors,
)
from metaensemble.methods.latentbe.method import (
    LatentBE,
    TDivSDiv,
    cross_entropy_div,
    diversifying_perturbation,
    draw_pair,
    member_kd_loss,
)
from metaensemble.models import create_model, load, save_model
from metaensemble.validation import load_config

T = 4.0

FAMILIES = {
    "convnet": {"width": 4},
    "vgg11_bn": {"width_mult": 0.125},
    "resnet18": {"width": 8},
    "wrn": {"depth": 10, "widen_factor": 1},
    "mlp": {"hidden": (16, 12)},
}


# ---- helpers ------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kd_logits(seed: int, m: int = 4, b: int = 16, c: int = 10):
    """Student [M, B, C], teachers [M, B, C], labels [B]."""
    g = _gen(seed)
    return (torch.randn(m, b, c, generator=g) * 2, torch.randn(m, b, c, generator=g) * 3,
            torch.randint(0, c, (b,), generator=g))


def _randomise_factors(model: nn.Module, seed: int, spread: float = 0.3, r: bool = True, s: bool = True) -> None:
    g = _gen(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, BE_LAYERS):
                if r:
                    mod.r.copy_(1 + spread * torch.randn(mod.r.shape, generator=g))
                if s:
                    mod.s.copy_(1 + spread * torch.randn(mod.s.shape, generator=g))


def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm affine parameters."""
    g = _gen(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))


@torch.no_grad()
def _warm_bn(model: nn.Module, x: torch.Tensor, members: int, steps: int = 3) -> None:
    """A few train-mode forwards so that BatchNorm running statistics are not (0, 1)."""
    model.train()
    for k in range(steps):
        model(tile(x * (1 + 0.2 * k) + 0.1 * k, members))
    model.eval()


def _be_model(name: str, members: int, in_chans: int = 3, img_size: int = 8, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = to_batchensemble(
        create_model(name, num_classes=10, in_chans=in_chans, img_size=img_size, **{**FAMILIES.get(name, {}), **kwargs}),
        members)
    _randomise_factors(model, seed + 1)
    _randomise_bn(model, seed + 2)
    _warm_bn(model, torch.randn(6, in_chans, img_size, img_size, generator=_gen(seed + 3)), members)
    return model


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _teachers(n: int, in_chans: int = 1, img_size: int = 8, width: int = 4, seed: int = 100) -> list[nn.Module]:
    out = []
    for k in range(n):
        torch.manual_seed(seed + k)
        t = create_model("convnet", num_classes=10, in_chans=in_chans, img_size=img_size, width=width)
        _randomise_bn(t, seed + 50 + k)
        with torch.no_grad():
            t[-1].weight.mul_(8.0)  # confident, distinct teachers (a fresh one is near-uniform)
        _warm_bn(t, torch.randn(8, in_chans, img_size, img_size, generator=_gen(seed + 70 + k)), 1)
        out.append(_frozen(t))
    return out


def _single(layer: nn.Module, members: int) -> nn.Module:
    """``layer`` converted to its BatchEnsemble layer (through to_batchensemble)."""
    return to_batchensemble(nn.Sequential(layer), members)[0]


# =========================================================================================
# 1. KD target
# =========================================================================================
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_member_kd_loss_is_the_mean_of_single_teacher_kd_per_member(alpha):
    """1: student member m is distilled from teacher m alone (ensemble_kd_loss with one
    teacher), averaged over members."""
    s, t, y = _kd_logits(0)
    expected = torch.stack([ensemble_kd_loss(s[m], t[m:m + 1], y, alpha, T) for m in range(4)]).mean()
    assert float(member_kd_loss(s, t, y, alpha, T)) == pytest.approx(float(expected), rel=1e-6, abs=1e-6)


def test_member_kd_target_is_its_own_teacher_not_the_ensemble():
    """1/4: member m's target is teacher m, not the ensemble mean of all teachers."""
    s, t, y = _kd_logits(1)
    ensemble_target = torch.stack([ensemble_kd_loss(s[m], t, y, 1.0, T) for m in range(4)]).mean()
    assert abs(float(member_kd_loss(s, t, y, 1.0, T)) - float(ensemble_target)) > 1e-2


def test_member_kd_loss_gradient_is_t2_cross_entropy_gradient():
    """1: KL and T^2 * CE(p_t, softmax(z_s / T)) differ by the teacher entropy only: same gradient."""
    s, t, y = _kd_logits(2)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    kd = member_kd_loss(s1, t, y, 1.0, T)
    p_t = F.softmax(t / T, -1)
    ce = T * T * -(p_t * F.log_softmax(s2 / T, -1)).sum(-1).mean()
    entropy = T * T * -(p_t * p_t.log()).sum(-1).mean()
    assert float(kd.detach()) == pytest.approx(float((ce - entropy).detach()), abs=1e-5)
    kd.backward()
    ce.backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-7, rtol=1e-5)


def test_member_kd_alpha_one_ignores_labels():
    """1: with alpha = 1 the labels do not enter (None, the labels, other labels: same loss)."""
    s, t, y = _kd_logits(3)
    a = member_kd_loss(s, t, y, 1.0, T)
    assert float(a) == float(member_kd_loss(s, t, None, 1.0, T))
    assert float(a) == float(member_kd_loss(s, t, (y + 1) % 10, 1.0, T))


def test_member_kd_alpha_below_one_adds_each_members_label_cross_entropy():
    """1: alpha < 1 adds (1 - alpha) * CE(member logits, labels), averaged over members."""
    s, t, y = _kd_logits(4)
    alpha = 0.25
    loss = member_kd_loss(s, t, y, alpha, T)
    kd = member_kd_loss(s, t, None, 1.0, T)
    ce = torch.stack([F.cross_entropy(s[m], y) for m in range(4)]).mean()
    assert float(loss) == pytest.approx(alpha * float(kd) + (1 - alpha) * float(ce), abs=1e-5)
    assert abs(float(loss) - float(member_kd_loss(s, t, (y + 3) % 10, alpha, T))) > 1e-3


def test_ensemble_kd_copies_of_one_teacher_give_single_teacher_kd():
    """1: M copies of one teacher give single-teacher KD."""
    s, t, y = _kd_logits(5)
    one = t[:1]
    for alpha in (1.0, 0.5):
        assert float(ensemble_kd_loss(s[0], one.expand(4, -1, -1), y, alpha, T)) == pytest.approx(
            float(ensemble_kd_loss(s[0], one, y, alpha, T)), abs=1e-6)


def test_ensemble_kd_target_is_mean_of_tempered_probabilities_not_softmax_of_mean_logits():
    """1: target = mean_m softmax(z_m / T), which differs from softmax(mean_m z_m / T)."""
    s, t, y = _kd_logits(6)
    p_bar = F.softmax(t / T, -1).mean(0)
    right = T * T * (p_bar * (p_bar.log() - F.log_softmax(s[0] / T, -1))).sum(-1).mean()
    wrong_t = F.softmax(t.mean(0) / T, -1)
    wrong = T * T * (wrong_t * (wrong_t.log() - F.log_softmax(s[0] / T, -1))).sum(-1).mean()
    got = float(ensemble_kd_loss(s[0], t, y, 1.0, T))
    assert got == pytest.approx(float(right), abs=1e-5)
    assert abs(got - float(wrong)) > 1e-3


def test_ensemble_kd_alpha_one_ignores_labels():
    """1: ensemble_kd_loss with alpha = 1 does not read the labels."""
    s, t, y = _kd_logits(7)
    a = ensemble_kd_loss(s[0], t, y, 1.0, T)
    assert float(a) == float(ensemble_kd_loss(s[0], t, None, 1.0, T))
    assert float(a) == float(ensemble_kd_loss(s[0], t, (y + 1) % 10, 1.0, T))


# =========================================================================================
# 2. BatchEnsemble layers
# =========================================================================================
def test_tile_is_member_major():
    """2: tile puts member m's copy of the batch in rows [m*B:(m+1)*B]."""
    x = torch.randn(5, 3, 4, 4)
    xt = tile(x, 3)
    assert xt.shape == (15, 3, 4, 4)
    for m in range(3):
        assert torch.equal(xt[m * 5:(m + 1) * 5], x)


PLAIN_LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "linear_nobias": (lambda: nn.Linear(6, 5, bias=False), (4, 6)),
    "conv": (lambda: nn.Conv2d(4, 6, 3, padding=1), (4, 4, 7, 7)),
    "conv_strided_nobias": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (4, 4, 7, 7)),
    "conv_grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 4, 7, 7)),
}


@pytest.mark.parametrize("kind", sorted(PLAIN_LAYERS))
def test_fresh_be_layer_equals_the_plain_layer_for_every_member(kind):
    """2: factors start at exactly 1, so every member computes the plain layer."""
    torch.manual_seed(0)
    make, shape = PLAIN_LAYERS[kind]
    plain = make()
    be = _single(copy.deepcopy(plain), 3)
    assert isinstance(be, BE_LAYERS)
    assert torch.equal(be.r, torch.ones_like(be.r)) and torch.equal(be.s, torch.ones_like(be.s))
    assert torch.equal(be.weight, plain.weight)
    x = torch.randn(*shape)
    with torch.no_grad():
        y, out = plain(x), be(tile(x, 3))
    for m in range(3):
        torch.testing.assert_close(out[m * 4:(m + 1) * 4], y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_member_output_depends_only_on_its_rows_and_its_factors(kind):
    """2: member m sees rows [m*B:(m+1)*B] and uses r[m], s[m] only."""
    torch.manual_seed(1)
    make, shape = PLAIN_LAYERS[kind]
    be = _single(make(), 3)
    _randomise_factors(be, 2)
    b = shape[0]
    x = torch.randn(3 * b, *shape[1:])

    def rows(t, m):
        return t[m * b:(m + 1) * b]

    be_r, be_s = copy.deepcopy(be), copy.deepcopy(be)
    with torch.no_grad():
        be_r.r[1].add_(0.5)  # member 1's input factor
        be_s.s[2].mul_(1.7)  # member 2's output factor
        x2 = x.clone()
        x2[:b] += 1.0  # member 0's rows
        base, after_r, after_s, after_x = be(x), be_r(x), be_s(x), be(x2)
    for m in range(3):
        assert torch.equal(rows(after_r, m), rows(base, m)) == (m != 1)
        assert torch.equal(rows(after_s, m), rows(base, m)) == (m != 2)
        assert torch.equal(rows(after_x, m), rows(base, m)) == (m != 0)


def test_be_linear_formula_scales_the_bias_by_s():
    """2: y_m = s_m * (W (r_m * x) + b) for a Linear, bias inside the s_m scaling."""
    torch.manual_seed(3)
    be = _single(nn.Linear(6, 5), 3)
    _randomise_factors(be, 4)
    with torch.no_grad():
        be.bias.copy_(torch.randn(5) * 2)
    x = torch.randn(3 * 4, 6)
    with torch.no_grad():
        out = be(x)
        for m in range(3):
            xm = x[m * 4:(m + 1) * 4]
            expected = be.s[m] * (((xm * be.r[m]) @ be.weight.T) + be.bias)
            unscaled_bias = be.s[m] * ((xm * be.r[m]) @ be.weight.T) + be.bias
            torch.testing.assert_close(out[m * 4:(m + 1) * 4], expected, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(out[m * 4:(m + 1) * 4], unscaled_bias, atol=1e-3)


def test_be_conv_formula_scales_the_bias_by_s():
    """2: y_m = s_m * (W conv (r_m * x) + b) for a Conv2d (r over input, s over output channels)."""
    torch.manual_seed(5)
    be = _single(nn.Conv2d(4, 6, 3, padding=1), 2)
    _randomise_factors(be, 6)
    with torch.no_grad():
        be.bias.copy_(torch.randn(6) * 2)
    x = torch.randn(2 * 3, 4, 5, 5)
    with torch.no_grad():
        out = be(x)
        for m in range(2):
            xm = x[m * 3:(m + 1) * 3] * be.r[m].view(1, -1, 1, 1)
            expected = be.s[m].view(1, -1, 1, 1) * (F.conv2d(xm, be.weight, padding=1) + be.bias.view(1, -1, 1, 1))
            torch.testing.assert_close(out[m * 3:(m + 1) * 3], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_batch_not_divisible_by_members_raises(kind):
    """2: the batch must be member-major tiled; 3 members cannot share 7 rows."""
    make, shape = PLAIN_LAYERS[kind]
    be = _single(make(), 3)
    with pytest.raises(ValueError, match="multiple of 3"):
        be(torch.randn(7, *shape[1:]))


# =========================================================================================
# 3. Fold
# =========================================================================================
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fold_equals_the_be_model_with_mean_factors_for_every_member(name):
    """3: fold(model)(x) == with_mean_factors(model)(tile(x)) for every member (eval mode,
    random factors, non-trivial BatchNorm statistics and affine)."""
    m = 3
    model = _be_model(name, m)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8, generator=_gen(9))
    folded = fold(model)
    assert not folded.training
    with torch.no_grad():
        y = folded(x)
        ref = with_mean_factors(model).eval()(tile(x, m)).view(m, 4, -1)
        own = model(tile(x, m)).view(m, 4, -1)
    for k in range(m):
        torch.testing.assert_close(y, ref[k], atol=1e-6, rtol=1e-6)
    # the factors really vary: member 0's own output is not the folded one
    assert (own[0] - y).abs().max() > 1e-3
    # folding does not touch the BatchEnsemble model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fold_is_the_plain_architecture_of_the_teachers(name, tmp_path):
    """3: the folded network is create_model's plain network (same class, state_dict keys
    and shapes, no BatchEnsemble layers), saved and loaded as the teachers' architecture."""
    plain = create_model(name, num_classes=10, in_chans=3, img_size=8, **FAMILIES[name])
    folded = fold(_be_model(name, 2))
    assert type(folded) is type(plain)
    assert not any(isinstance(mod, BE_LAYERS) for mod in folded.modules())
    assert folded.me_spec == plain.me_spec
    ps, fs = plain.state_dict(), folded.state_dict()
    assert list(fs) == list(ps)
    assert all(fs[k].shape == ps[k].shape for k in ps)
    plain.load_state_dict(fs, strict=True)
    back = load(save_model(folded, tmp_path / "student", dataset="test"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), folded(x))


@pytest.mark.parametrize("vary", ["r", "s"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_of_a_linear_is_the_mean_of_members_when_only_one_factor_varies(vary, bias):
    """3: with only r (or only s) varying, the folded linear equals the members' mean output."""
    torch.manual_seed(11)
    m = 4
    model = to_batchensemble(create_model("mlp", num_classes=7, in_chans=1, img_size=3, hidden=(), bias=bias), m)
    _randomise_factors(model, 12, spread=0.5, r=vary == "r", s=vary == "s")
    if bias:
        with torch.no_grad():
            model[1].bias.copy_(torch.randn(7))
    x = torch.randn(5, 1, 3, 3)
    with torch.no_grad():
        mean_out = model(tile(x, m)).view(m, 5, -1).mean(0)
        torch.testing.assert_close(fold(model)(x), mean_out, atol=1e-6, rtol=0)


def test_fold_is_not_the_mean_of_members_when_r_and_s_both_vary():
    """3 (the documented gap): with both r and s varying the fold differs from the members'
    mean by their covariance, so the exact-equality property above is specific to one factor."""
    torch.manual_seed(13)
    model = to_batchensemble(create_model("mlp", num_classes=7, in_chans=1, img_size=3, hidden=()), 4)
    _randomise_factors(model, 14, spread=0.5)
    x = torch.randn(5, 1, 3, 3)
    with torch.no_grad():
        gap = (fold(model)(x) - model(tile(x, 4)).view(4, 5, -1).mean(0)).abs().max()
    assert gap > 1e-3


def test_fold_scales_the_bias_by_the_mean_s():
    """3: b' = b * s_bar and W' = W * r_bar[in] * s_bar[out] (the notebook forgot the bias)."""
    torch.manual_seed(15)
    model = to_batchensemble(create_model("mlp", num_classes=6, in_chans=1, img_size=2, hidden=(5,)), 3)
    _randomise_factors(model, 16, spread=0.5)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, BELinear):
                mod.bias.copy_(torch.randn(mod.bias.shape) + 1)
    folded = fold(model)
    for name, mod in model.named_modules():
        if isinstance(mod, BELinear):
            r_bar, s_bar = mod.r.detach().mean(0), mod.s.detach().mean(0)
            fw, fb = folded.get_submodule(name).weight, folded.get_submodule(name).bias
            torch.testing.assert_close(fw, mod.weight.detach() * r_bar[None, :] * s_bar[:, None])
            torch.testing.assert_close(fb, mod.bias.detach() * s_bar)
            assert (fb - mod.bias.detach()).abs().max() > 1e-2  # an unscaled bias would be caught


def test_folded_grouped_conv_equals_mean_factor_conv():
    """3: BEConv2d.folded maps r onto the right input channels of each group."""
    torch.manual_seed(17)
    be = _single(nn.Conv2d(4, 6, 3, padding=1, groups=2), 3)
    _randomise_factors(be, 18, spread=0.5)
    w, b = be.folded()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ref = with_mean_factors(be)(tile(x, 3))[:2]
        torch.testing.assert_close(F.conv2d(x, w, b, padding=1, groups=2), ref, atol=1e-5, rtol=1e-5)


def _member(model: nn.Module, m: int) -> nn.Module:
    """A copy of the BatchEnsemble ``model`` whose every member is member ``m``: its fold is
    member m's own plain network (its effective weights W * s_m r_m^T, b * s_m)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in factor_parameters(out):
            p.copy_(p[m:m + 1].expand_as(p))
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_exact_fold_is_the_average_of_the_members_own_weights(name):
    """3 (latentbe.fold=exact): every tensor of fold(exact=True) is the average over the K
    members of that member's own plain network (to 1e-6), for every family; it differs from
    the mean-of-factors fold by the covariance of r and s, and is still one plain network."""
    k = 3
    model = _be_model(name, k)
    exact, mean = fold(model, exact=True), fold(model)
    members = [fold(_member(model, m)).state_dict() for m in range(k)]
    assert type(exact) is type(mean) and not any(isinstance(mod, BE_LAYERS) for mod in exact.modules())
    for key, v in exact.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(s[key] for s in members) / k, atol=1e-6, rtol=0)
    gap = max((exact.state_dict()[n] - mean.state_dict()[n]).abs().max() for n in mean.state_dict()
              if n.endswith("weight") and mean.state_dict()[n].ndim > 1)
    assert gap > 1e-3  # r and s both vary: the two folds differ


def test_exact_fold_of_a_grouped_conv_and_one_varying_factor():
    """3: the exact fold maps each member's r onto its group's input channels; with only r
    (or only s) varying, the two folds coincide (mean_m s r_m^T = s r_bar^T)."""
    torch.manual_seed(19)
    be = _single(nn.Conv2d(4, 6, 3, padding=1, groups=2), 3)
    _randomise_factors(be, 20, spread=0.5)
    w, _ = be.folded(exact=True)
    per_member = []
    for m in range(3):
        r = be.r[m].detach().view(2, 2).repeat_interleave(3, dim=0)  # [out, in/g]: group o // 3
        per_member.append(be.weight.detach() * (be.s[m].detach()[:, None] * r)[:, :, None, None])
    torch.testing.assert_close(w, sum(per_member) / 3, atol=1e-6, rtol=0)
    only_r = _single(nn.Linear(5, 4), 3)
    _randomise_factors(only_r, 21, spread=0.5, s=False)
    torch.testing.assert_close(only_r.folded(exact=True)[0], only_r.folded()[0], atol=1e-6, rtol=0)


def test_fold_needs_the_model_spec():
    """3: a model without me_spec cannot be folded back into an architecture."""
    with pytest.raises(ValueError, match="me_spec"):
        fold(to_batchensemble(nn.Sequential(nn.Linear(3, 2)), 2))


# =========================================================================================
# Conversion: check_convertible / to_batchensemble
# =========================================================================================
class _Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.gain


def test_a_layer_with_its_own_parameters_is_refused_and_named():
    """A parameter-holding layer that is neither conv/linear nor a norm is refused by name,
    before anything is converted."""
    model = nn.Sequential(nn.Linear(4, 4), _Gain(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"1 \(_Gain: gain\)"):
        check_convertible(model)
    with pytest.raises(ConfigError, match="_Gain"):
        to_batchensemble(model, 2)
    assert not any(isinstance(mod, BE_LAYERS) for mod in model.modules())


def test_a_vit_is_refused_naming_its_embeddings():
    """A timm ViT holds cls_token/pos_embed at its root: refused with those names."""
    vit = create_model("deit_tiny", num_classes=10, in_chans=3, img_size=32)
    with pytest.raises(ConfigError, match=r"\(root\).*cls_token.*pos_embed|\(root\).*pos_embed.*cls_token"):
        check_convertible(vit)


def test_norm_layers_are_convertible():
    """BatchNorm, LayerNorm and GroupNorm stay shared: they are not refused."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(),
                          nn.LayerNorm(4 * 3 * 3), nn.Linear(36, 2))
    check_convertible(model)
    to_batchensemble(model, 2)
    assert isinstance(model[0], BEConv2d) and isinstance(model[5], BELinear)


def test_conversion_keeps_batchnorm_shared_and_copies_weights():
    """Every conv/linear becomes a BE layer with the original weights; BatchNorm modules are
    the very same (one BN for all members, per-channel, not per member)."""
    torch.manual_seed(19)
    model = create_model("resnet18", num_classes=10, in_chans=3, img_size=8, width=8)
    plain_layers = {n: copy.deepcopy(mod) for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    bns = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    spec = model.me_spec
    be = to_batchensemble(model, 3)
    assert be is model and be.me_spec == spec and members_of(be) == 3
    for n, mod in be.named_modules():
        if n in plain_layers:
            assert isinstance(mod, BE_LAYERS) and mod.members == 3
            assert torch.equal(mod.weight, plain_layers[n].weight)
            assert mod.r.shape[0] == mod.s.shape[0] == 3
    now_bns = {n: mod for n, mod in be.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    assert set(now_bns) == set(bns)
    assert all(now_bns[n] is bns[n] for n in bns)
    assert len(factor_parameters(be)) == 2 * len(plain_layers)


def test_members_must_be_positive_and_members_of_needs_a_be_model():
    with pytest.raises(ConfigError):
        to_batchensemble(nn.Sequential(nn.Linear(2, 2)), 0)
    with pytest.raises(ValueError):
        members_of(nn.Linear(2, 2))


# =========================================================================================
# 4. Pairing
# =========================================================================================
def test_permuting_members_and_teachers_together_leaves_the_loss_unchanged():
    """4: the loss pairs student m with teacher m: a joint permutation changes nothing,
    permuting only one side changes it."""
    s, t, y = _kd_logits(20)
    base = float(member_kd_loss(s, t, y, 1.0, T))
    for perm in permutations(range(4)):
        p = list(perm)
        assert float(member_kd_loss(s[p], t[p], y, 1.0, T)) == pytest.approx(base, rel=1e-6)
        if p != [0, 1, 2, 3]:
            assert abs(float(member_kd_loss(s[p], t, y, 1.0, T)) - base) > 1e-4
            assert abs(float(member_kd_loss(s, t[p], y, 1.0, T)) - base) > 1e-4


# =========================================================================================
# 5. r/s gradients through LatentBE's optimiser
# =========================================================================================
def _optim_cfg(wd: float, lr: float, *extra: str):
    return load_config("configs/distill/digits.yaml", [
        "latentbe.members=3", "distill.teachers=[]", f"optim.lr={lr}", f"optim.weight_decay={wd}",
        "optim.momentum=0", "optim.nesterov=false", "optim.warmup_epochs=0", "optim.schedule=constant",
        "distill.alpha=1.0", *extra,
    ])


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_factor_update_follows_each_members_own_loss_and_decays_toward_one(name):
    """5: one SGD step moves r_i, s_i by -lr * (dL_i/dr_i + wd * (r_i - 1)), L_i member i's own
    KD loss (the training loss is the mean over members, so its gradient is x M); other
    weights move by -lr * (dL/dW + wd * W). The convnet runs in eval mode: shared train-mode
    BatchNorm would couple the members through the batch statistics."""
    wd, lr, m = 0.05, 0.1, 3
    method = LatentBE(_optim_cfg(wd, lr))
    assert method.members == m
    model = _be_model(name, m, in_chans=1, seed=21)
    model.eval()
    teachers = [_frozen(_be_model(name, 1, in_chans=1, seed=30 + k)) for k in range(m)]
    method._teachers = teachers
    optimizer, _ = method.configure_optimizer(model, steps_per_epoch=5)
    assert all(g["lr"] == pytest.approx(lr) for g in optimizer.param_groups)

    x, y = torch.randn(6, 1, 8, 8, generator=_gen(22)), torch.randint(0, 10, (6,), generator=_gen(23))
    factors = factor_parameters(model)
    others = [p for p in model.parameters() if all(p is not f for f in factors)]
    # each member's own loss and its gradient with respect to every factor
    t_logits = teacher_logits(teachers, x)
    own = []
    for i in range(m):
        logits = model(tile(x, m)).view(m, 6, -1)
        li = ensemble_kd_loss(logits[i], t_logits[i:i + 1], None, 1.0, T)
        grads = torch.autograd.grad(li, factors)
        for g in grads:  # member i's loss does not reach the other members' factors
            assert torch.count_nonzero(torch.cat([g[:i], g[i + 1:]])) == 0
        own.append([g[i].clone() for g in grads])
    # the mean loss's gradient for the other weights
    mean_loss = member_kd_loss(model(tile(x, m)).view(m, 6, -1), t_logits, None, 1.0, T)
    other_grads = torch.autograd.grad(mean_loss, others)

    f0, o0 = [p.detach().clone() for p in factors], [p.detach().clone() for p in others]
    optimizer.zero_grad()
    loss, _ = method.training_step(model, {"x": x, "y": y})
    assert float(loss.detach()) == pytest.approx(float(mean_loss.detach()), rel=1e-6)
    loss.backward()
    optimizer.step()

    for k, p in enumerate(factors):
        for i in range(m):
            expected = -lr * (own[i][k] + wd * (f0[k][i] - 1.0))
            torch.testing.assert_close(p.detach()[i] - f0[k][i], expected, atol=1e-6, rtol=1e-4)
    for p, p0, g in zip(others, o0, other_grads, strict=True):
        torch.testing.assert_close(p.detach() - p0, -lr * (g + wd * p0), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("decay_norm_bias", [True, False])
def test_factors_are_in_their_own_group_without_plain_weight_decay(decay_norm_bias):
    """5: r and s are in one group with weight_decay 0 (their decay toward 1 is the hook's),
    in no other group; every other parameter keeps the default grouping and decay."""
    wd = 0.01
    cfg = _optim_cfg(wd, 0.1, f"optim.decay_norm_bias={str(decay_norm_bias).lower()}")
    method = LatentBE(cfg)
    model = _be_model("convnet", 3, in_chans=1)
    factors = {id(p) for p in factor_parameters(model)}
    groups = method.param_groups(model)
    factor_groups = [g for g in groups if g.get("be_factors")]
    assert len(factor_groups) == 1
    fg = factor_groups[0]
    assert {id(p) for p in fg["params"]} == factors
    assert fg["weight_decay"] == 0.0 and fg["be_weight_decay"] == wd and fg["be_grad_scale"] == 3.0
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    for g in groups:
        if g is fg:
            continue
        assert not factors & {id(p) for p in g["params"]}
        for p in g["params"]:
            wants = wd if (decay_norm_bias or p.ndim > 1) else 0.0
            assert g["weight_decay"] == wants
    optimizer, _ = method.configure_optimizer(model, 4)
    opt_fg = [g for g in optimizer.param_groups if g.get("be_factors")]
    assert len(opt_fg) == 1 and opt_fg[0]["weight_decay"] == 0.0


def test_factor_decay_pulls_toward_one_with_zero_gradient():
    """5: with no loss gradient the factors move by -lr * wd * (r - 1): r = 1 stays put."""
    wd, lr = 0.1, 0.5
    method = LatentBE(_optim_cfg(wd, lr))
    model = to_batchensemble(create_model("mlp", num_classes=3, in_chans=1, img_size=2, hidden=(4,)), 3)
    _randomise_factors(model, 24)
    with torch.no_grad():
        model[1].r[0].fill_(1.0)
    optimizer, _ = method.configure_optimizer(model, 1)
    f0 = [p.detach().clone() for p in factor_parameters(model)]
    for p in factor_parameters(model):
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, p0 in zip(factor_parameters(model), f0, strict=True):
        torch.testing.assert_close(p.detach(), p0 - lr * wd * (p0 - 1.0))
    assert torch.equal(model[1].r[0], torch.ones(4))


# =========================================================================================
# 6. TDiv-SDiv perturbation
# =========================================================================================
MEAN, STD = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.3])


@pytest.fixture(scope="module")
def perturb_setup():
    """Four frozen plain convnet teachers and a BatchEnsemble convnet student (M = 4)."""
    teachers = _teachers(4, in_chans=3, seed=200)
    student = _be_model("convnet", 4, in_chans=3, seed=40)
    student.train()
    return teachers, student


def _normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN.view(1, -1, 1, 1)) / STD.view(1, -1, 1, 1)


def _pixels(xn: torch.Tensor) -> torch.Tensor:
    return xn * STD.view(1, -1, 1, 1) + MEAN.view(1, -1, 1, 1)


def _ce_div(zi: torch.Tensor, zj: torch.Tensor) -> torch.Tensor:
    """The spec's divergence, written out here: -mean_b sum_c stopgrad(p^j) log p^i, T = 1."""
    return -(F.softmax(zj, -1).detach() * F.log_softmax(zi, -1)).sum(-1).mean()


def test_cross_entropy_div_is_the_stopgrad_cross_entropy():
    """6: cross_entropy_div = -mean_b sum_c stopgrad(softmax(z_j)) log softmax(z_i), temperature
    1; no gradient flows into z_j."""
    g = _gen(40)
    zi = (torch.randn(5, 7, generator=g) * 2).requires_grad_(True)
    zj = (torch.randn(5, 7, generator=g) * 2).requires_grad_(True)
    value = cross_entropy_div(zi, zj)
    expected = -(F.softmax(zj.detach(), -1) * F.log_softmax(zi.detach(), -1)).sum(-1).mean()
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-6)
    gi, gj = torch.autograd.grad(value, (zi, zj), allow_unused=True)
    assert gj is None or torch.count_nonzero(gj) == 0
    torch.testing.assert_close(gi, (F.softmax(zi.detach(), -1) - F.softmax(zj.detach(), -1)) / 5)


def _objective(student, ti, tj, pixels, pair, members=4):
    """tdiv - sdiv at ``pixels``: teachers i, j and eval-mode student members i, j."""
    i, j = pair
    xn = _normalised(pixels)
    was = student.training
    student.eval()
    try:
        out = student(tile(xn, members)).view(members, pixels.shape[0], -1)
    finally:
        student.train(was)
    return _ce_div(ti(xn), tj(xn)) - _ce_div(out[i], out[j])


def _interior(b=6, seed=41):
    return 0.3 + 0.4 * torch.rand(b, 3, 8, 8, generator=_gen(seed))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_delta_has_norm_sqrt_d_over_255_per_example(perturb_setup, scale):
    """6: ||delta_b||_2 = scale * sqrt(D) / 255 for every example, D = C * H * W."""
    teachers, student = perturb_setup
    x = _normalised(_interior())
    _, delta = diversifying_perturbation(student, teachers[0], teachers[2], x, (0, 2), 4, MEAN, STD, scale)
    assert delta.shape == x.shape
    norms = delta.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((6,), scale * math.sqrt(3 * 8 * 8) / 255.0), rtol=1e-5, atol=0)


def test_delta_is_the_normalised_gradient_of_tdiv_minus_sdiv(perturb_setup):
    """6: delta = g / ||g|| * sqrt(D) / 255 with g = d(tdiv - sdiv)/dx for the given pair
    (the same members i, j of the teachers and of the student)."""
    teachers, student = perturb_setup
    pixels = _interior(seed=42)
    pair = (3, 1)
    p = pixels.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_objective(student, teachers[3], teachers[1], p, pair), p)
    expected = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * (math.sqrt(192) / 255.0)
    _, delta = diversifying_perturbation(student, teachers[3], teachers[1], _normalised(pixels), pair, 4, MEAN, STD)
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-4)


def test_a_small_step_along_delta_increases_tdiv_minus_sdiv(perturb_setup):
    """6: the objective grows along delta (and shrinks along -delta), on interior pixels."""
    teachers, student = perturb_setup
    pixels = _interior(seed=43)
    for pair in [(0, 1), (2, 3), (3, 0)]:
        ti, tj = teachers[pair[0]], teachers[pair[1]]
        _, delta = diversifying_perturbation(student, ti, tj, _normalised(pixels), pair, 4, MEAN, STD)
        with torch.no_grad():
            f0 = float(_objective(student, ti, tj, pixels, pair))
            up = float(_objective(student, ti, tj, pixels + 0.5 * delta, pair))
            down = float(_objective(student, ti, tj, pixels - 0.5 * delta, pair))
        assert up > f0 > down


def test_perturbed_inputs_are_clipped_pixels_in_unit_interval(perturb_setup):
    """6: x' = clip(x + delta, 0, 1) in pixel space, returned normalised; near the bounds the
    clip is active, and the inputs do change."""
    teachers, student = perturb_setup
    g = _gen(44)
    pixels = torch.where(torch.rand(6, 3, 8, 8, generator=g) < 0.5, 0.002, 0.998) + 0.0
    pixels[:2] = _interior(2, seed=45)  # some interior examples too
    x = _normalised(pixels)
    x_adv, delta = diversifying_perturbation(student, teachers[1], teachers[0], x, (1, 0), 4, MEAN, STD, scale=4.0)
    out = _pixels(x_adv)
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    torch.testing.assert_close(out, (pixels + delta).clamp(0, 1), atol=1e-6, rtol=0)
    clipped = ((pixels + delta) < 0) | ((pixels + delta) > 1)
    assert clipped.any()  # the bounds were exercised
    assert ((out - pixels).abs() > 1e-6).float().mean() > 0.5  # the inputs changed


def test_perturbation_leaves_student_batchnorm_and_mode_and_grads_alone(perturb_setup):
    """6: the student pass is eval-mode: running_mean/var and num_batches_tracked do not move,
    training mode is restored (train or eval), and no parameter gradient is accumulated."""
    teachers, student = perturb_setup
    x = _normalised(_interior(seed=46))
    for mode in (True, False):
        student.train(mode)
        buffers = {k: v.clone() for k, v in student.named_buffers()}
        assert any("num_batches_tracked" in k for k in buffers)
        diversifying_perturbation(student, teachers[0], teachers[3], x, (0, 3), 4, MEAN, STD)
        for k, v in student.named_buffers():
            assert torch.equal(v, buffers[k]), k
        assert all(mod.training == mode for mod in student.modules())
        assert all(p.grad is None for p in student.parameters())
        assert all(p.grad is None for t in teachers for p in t.parameters())
    student.train()



def test_perturbation_restores_each_submodules_own_mode(perturb_setup):
    """A submodule deliberately in eval mode inside a training student stays in eval mode."""
    teachers, student = perturb_setup
    student.train()
    frozen_bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    frozen_bn.eval()
    diversifying_perturbation(student, teachers[0], teachers[1], _normalised(_interior(seed=49)), (0, 1), 4, MEAN, STD)
    assert not frozen_bn.training
    assert all(m.training for m in student.modules() if m is not frozen_bn)
    student.train()

def test_perturbation_uses_eval_mode_batchnorm():
    """6: sdiv uses the running statistics: the gradient is that of the eval-mode student,
    which differs from the train-mode (batch statistics) one."""
    teachers = _teachers(2, in_chans=3, seed=300)
    student = _be_model("convnet", 2, in_chans=3, seed=47)
    student.train()
    pixels = _interior(seed=48)
    p = pixels.clone().requires_grad_(True)
    (g_eval,) = torch.autograd.grad(_objective(student, teachers[0], teachers[1], p, (0, 1), 2), p)
    _, delta = diversifying_perturbation(student, teachers[0], teachers[1], _normalised(pixels), (0, 1), 2, MEAN, STD)
    d_eval = g_eval / g_eval.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * (math.sqrt(192) / 255.0)
    torch.testing.assert_close(delta, d_eval, atol=1e-6, rtol=1e-4)


def test_draw_pair_gives_distinct_members_and_every_ordered_pair():
    """6: i != j always; over many draws all M(M-1) ordered pairs occur, about uniformly."""
    g = _gen(50)
    for members in (2, 4):
        counts: dict[tuple[int, int], int] = {}
        n = 3000
        for _ in range(n):
            i, j = draw_pair(members, g)
            assert i != j and 0 <= i < members and 0 <= j < members
            counts[(i, j)] = counts.get((i, j), 0) + 1
        pairs = members * (members - 1)
        assert set(counts) == {(i, j) for i in range(members) for j in range(members) if i != j}
        assert all(abs(c - n / pairs) < 0.25 * n / pairs for c in counts.values())


# =========================================================================================
# End to end: LatentBE / TDivSDiv training steps, export, validate
# =========================================================================================
@pytest.fixture(scope="module")
def digits():
    """The digits data (8x8, one channel) and a batch of it."""
    from metaensemble.data import ArrayLoader
    from metaensemble.data import load as load_data

    cfg = load_config("configs/distill/digits.yaml")
    splits = load_data(cfg.data)
    batch = next(iter(ArrayLoader(splits.train, splits.info, 12, shuffle=True, augment=True, seed=0)))
    return splits.info, batch


def _method(cls, *extra: str):
    cfg = load_config("configs/distill/digits.yaml", ["latentbe.members=3", "distill.teachers=[]", *extra])
    method = cls(cfg)
    method._teachers = _teachers(3, in_chans=1, seed=400)
    return method


def _student(method, info, seed=60):
    torch.manual_seed(seed)
    model = method.build_model(info)
    _randomise_factors(model, seed + 1, spread=0.2)
    model.train()
    return model


@pytest.mark.parametrize("cls", [LatentBE, TDivSDiv])
def test_training_step_is_finite_trains_the_student_and_not_the_teachers(cls, digits):
    """End to end: a finite loss whose gradient reaches every student parameter (factors
    included) and no teacher parameter."""
    info, batch = digits
    method = _method(cls)
    model = _student(method, info)
    assert members_of(model) == 3 and model.me_spec["arch"] == "convnet"
    torch.manual_seed(0)
    loss, logs = method.training_step(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss", "correct"} <= set(logs)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert all(p.grad.abs().sum() > 0 for p in factor_parameters(model))
    assert all(p.grad is None for t in method.teachers("cpu") for p in t.parameters())


def test_latentbe_step_is_member_kd_against_the_paired_teachers(digits):
    """4/end to end: the LatentBE loss is member_kd_loss of student member m against teacher m;
    reordering the teachers changes it; with alpha = 1 the labels do not matter."""
    info, batch = digits
    method = _method(LatentBE)
    model = _student(method, info)
    model.eval()  # no BatchNorm updates between the evaluations compared
    x, y = batch["x"], batch["y"]
    loss, _ = method.training_step(model, batch)
    with torch.no_grad():
        logits = model(tile(x, 3)).view(3, x.shape[0], -1)
    expected = member_kd_loss(logits, teacher_logits(method._teachers, x), y, 1.0, T)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    other, _ = method.training_step(model, {**batch, "y": (y + 1) % 10})
    assert float(other.detach()) == float(loss.detach())
    method._teachers = method._teachers[::-1]
    swapped, _ = method.training_step(model, batch)
    assert abs(float(swapped.detach()) - float(loss.detach())) > 1e-4


def test_latentbe_alpha_below_one_uses_labels(digits):
    info, batch = digits
    method = _method(LatentBE, "distill.alpha=0.5")
    model = _student(method, info).eval()
    a, _ = method.training_step(model, batch)
    b, _ = method.training_step(model, {**batch, "y": (batch["y"] + 1) % 10})
    assert abs(float(a.detach()) - float(b.detach())) > 1e-3


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_tdiv_sdiv_step_is_latentbe_on_the_perturbed_batch(digits, scale):
    """End to end: TDiv-SDiv draws a pair, perturbs with the dataset's mean/std and
    latentbe.perturb_scale, and computes the LatentBE loss on x' alone (teachers re-run on x');
    the student's BatchNorm is updated once (the perturbation pass moves nothing)."""
    info, batch = digits
    method = _method(TDivSDiv, f"latentbe.perturb_scale={scale}")
    model = _student(method, info)
    ref_model = copy.deepcopy(model)
    tracked = [mod.num_batches_tracked.clone() for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
    x, y = batch["x"], batch["y"]

    torch.manual_seed(7)
    loss, logs = method.training_step(model, batch)
    torch.manual_seed(7)
    i, j = draw_pair(3)
    teachers = method._teachers
    x_adv, delta = diversifying_perturbation(ref_model, teachers[i], teachers[j], x, (i, j), 3,
                                             torch.tensor(info.mean), torch.tensor(info.std), scale)
    expected = member_kd_loss(ref_model(tile(x_adv, 3)).view(3, x.shape[0], -1), teacher_logits(teachers, x_adv),
                              y, 1.0, T)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(logs["delta_norm"]) == pytest.approx(scale * math.sqrt(64) / 255.0, rel=1e-5)
    # x' is not x: the LatentBE loss on the clean batch differs
    clean = member_kd_loss(copy.deepcopy(ref_model)(tile(x, 3)).view(3, x.shape[0], -1),
                           teacher_logits(teachers, x), y, 1.0, T)
    assert abs(float(clean.detach()) - float(loss.detach())) > 1e-6
    now = [mod.num_batches_tracked for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert all(int(a) == int(b) + 1 for a, b in zip(now, tracked, strict=True))


def test_export_is_the_fold(digits):
    """3/end to end: what is evaluated and saved is the plain fold of the student."""
    info, _ = digits
    method = _method(LatentBE)
    model = _student(method, info).eval()
    exported = method.export(model)
    assert type(exported) is nn.Sequential and not any(isinstance(m, BE_LAYERS) for m in exported.modules())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), with_mean_factors(model)(tile(x, 3))[:4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("choice, other", [("mean_factors", "fold_exact"), ("exact", "fold_mean_factors")])
def test_the_chosen_fold_is_exported_and_the_other_is_evaluated_beside_it(digits, choice, other):
    """14: latentbe.fold picks what is exported; predict gives the other fold's
    log-probabilities under its own name, so every epoch logs the gap between them."""
    from metaensemble.data import ArrayLoader
    from metaensemble.data import load as load_data
    from metaensemble.engine.report import split_metrics
    from metaensemble.methods.base import predict_logp

    info, _ = digits
    method = _method(LatentBE, f"latentbe.fold={choice}")
    model = _student(method, info).eval()
    exported = method.export(model)
    want = fold(model, exact=choice == "exact")
    for k, v in want.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[k], v, atol=0, rtol=0)
    loader = ArrayLoader(load_data(method.cfg.data).val, info, 64)
    pred, y = method.predict(exported, loader)
    assert list(pred) == ["fold", other]
    torch.testing.assert_close(pred["fold"], predict_logp(want, loader)[0])
    torch.testing.assert_close(pred[other], predict_logp(fold(model, exact=choice != "exact"), loader)[0])
    assert (pred["fold"] - pred[other]).abs().max() > 1e-4
    assert {"val_acc", f"{other}/val_acc", f"{other}/val_nll"} <= set(split_metrics((pred, y), "val"))
    plain, _ = method.predict(want, loader)  # not this method's export: one prediction
    assert torch.is_tensor(plain)


def test_gradients_are_clipped_after_the_factor_scaling():
    """14: train.grad_clip clips the gradient the update uses, after LatentBE's factor
    hook (x M, decay toward 1): one SGD step at lr 1 moves every parameter by exactly the
    clipped transformed gradient, which differs from transforming a clipped one."""
    from metaensemble.engine.loop import configure_optimizer

    wd, m, max_norm = 0.1, 3, 0.05
    method = LatentBE(_optim_cfg(wd, 1.0, f"train.grad_clip={max_norm}"))
    model = to_batchensemble(create_model("mlp", num_classes=3, in_chans=1, img_size=2, hidden=(4,)), m)
    _randomise_factors(model, 31)
    optimizer, _ = configure_optimizer(method, model, method.cfg, 1)  # as the engine's workers build it
    params = list(model.parameters())
    torch.manual_seed(32)
    grads = [torch.randn_like(p) for p in params]
    factors = {id(p) for p in factor_parameters(model)}

    def transform(p, g):
        return g * m + wd * (p.detach() - 1.0) if id(p) in factors else g

    def clip(gs):
        total = torch.cat([g.flatten() for g in gs]).norm()
        return [g * min(1.0, max_norm / (float(total) + 1e-6)) for g in gs]

    after = clip([transform(p, g) for p, g in zip(params, grads, strict=True)])
    before = [transform(p, g) for p, g in zip(params, clip(grads), strict=True)]
    assert max((a - b).abs().max() for a, b in zip(after, before, strict=True)) > 1e-3
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}  # SGD's own, after
    p0 = [p.detach().clone() for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    optimizer.step()
    for p, q, a in zip(params, p0, after, strict=True):
        torch.testing.assert_close(q - p.detach(), a + decay[id(p)] * q, atol=1e-6, rtol=1e-5)


def _write_teachers(root, n, width=4):
    paths = []
    for k in range(n):
        torch.manual_seed(500 + k)
        m = create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=width)
        paths.append(str(save_model(m, root / f"t{k}", dataset="digits")))
    return paths


def _validate_cfg(teachers, *extra):
    return load_config("configs/distill/digits.yaml", [f"distill.teachers=[{','.join(teachers)}]", *extra])


def test_validate_accepts_same_architecture_teachers_and_loads_the_first_m(tmp_path, digits):
    """Member m is paired with teacher m: the first M teachers are loaded, in order."""
    info, _ = digits
    paths = _write_teachers(tmp_path, 4)
    method = LatentBE(_validate_cfg(paths, "latentbe.members=3"))
    method.validate()
    assert method.members == 3 and method.teacher_uris() == paths[:3]
    model = method.build_model(info)
    assert members_of(model) == 3
    loaded = method.teachers("cpu")
    assert len(loaded) == 3
    for t, path in zip(loaded, paths[:3], strict=True):
        assert all(not p.requires_grad for p in t.parameters()) and not t.training
        assert torch.equal(t.state_dict()["0.weight"], load(path).state_dict()["0.weight"])
    assert LatentBE(_validate_cfg(paths, "latentbe.members=null")).members == 4


def test_validate_refuses_bad_teacher_sets(tmp_path):
    """Fewer teachers than members, one member, or teachers of another architecture."""
    paths = _write_teachers(tmp_path, 2)
    with pytest.raises(ConfigError, match="latentbe.members=3"):
        LatentBE(_validate_cfg(paths, "latentbe.members=3")).validate()
    with pytest.raises(ConfigError, match="at least 2 members"):
        LatentBE(_validate_cfg(paths[:1], "latentbe.members=null")).validate()
    wide = _write_teachers(tmp_path / "wide", 2, width=8)
    with pytest.raises(CheckpointError, match="architecture"):
        TDivSDiv(_validate_cfg(wide, "latentbe.members=2")).validate()
