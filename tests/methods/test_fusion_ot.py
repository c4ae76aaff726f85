"""OT fusion: the method's testable properties (docs/fusion.md describes
the method), numbered as below.

    1. Permutation recovery   fuse(f, permuted f) -> T = P/n, logits of f (MLP, VGG, ResNet)
    2. Self-fusion            fuse(f, f) = f (BN VGG and BN ResNet too)
    3. EMD plans              n T a permutation; corrected columns sum to 1; T >= 0
    4. Mixing ends            s = 1 is the anchor; s = 0 is model 0 up to a permutation
    5. Class layer            never permuted, even with the anchor's class rows swapped
    9. Scale invariance       the EMD plan of c * C is the plan of C
   10. Determinism, k models  fixed seed -> same fusion; 1/k weights, explicit combination
   (widths)                   model 0 wider than the anchor -> anchor's shapes
   (errors)                   depths, missing x, bad options, bad weights
   (BN)                       recompute_bn_stats -> the data's batch statistics

Everything runs on tiny CPU models (1x8x8 inputs, widths 4-16).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from metaensemble.errors import ConfigError
from metaensemble.methods.fusion.ot import (
    FusionOptions,
    activation_sample,
    align_inputs,
    corrected,
    fuse,
    ground_cost,
    move_outputs,
    recompute_bn_stats,
    transport,
)
from metaensemble.methods.fusion.structure import Sum, structure
from metaensemble.models import create_model

SMALL = {
    "mlp": ("mlp", {"hidden": (12, 10)}),
    "vgg": ("vgg", {"plan": [6, "M", 8, "M", 10], "batch_norm": False, "bias": False}),
    "vgg_bn": ("vgg", {"plan": [6, "M", 8, "M", 10], "batch_norm": True}),
    "resnet": ("resnet", {"layers": [1, 1, 1, 1], "width": 4, "norm": False}),
    "resnet_bn": ("resnet", {"layers": [1, 1, 1, 1], "width": 4, "norm": True}),
    "bottleneck": ("resnet", {"layers": [2, 1, 1, 1], "width": 4, "block": "bottleneck", "norm": False}),
    "convnet": ("convnet", {"width": 4}),  # the digits zoo's teacher: conv-BN-ReLU stages, pooled
}
WEIGHT, ACT = FusionOptions(ground_metric="weight"), FusionOptions(ground_metric="activation")


def make(kind: str, seed: int = 0, **over) -> nn.Module:
    arch, kw = SMALL[kind]
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=5, in_chans=1, img_size=8, **{**kw, **over})
    _randomise_bn(model, seed)
    return model.eval()


def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN affine parameters and statistics, so a misplaced one shows."""
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 1 + 0.3 * torch.randn(n, generator=g)
            m.bias.data = 0.3 * torch.randn(n, generator=g)
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(1 + torch.rand(n, generator=g))


def inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).abs()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def permuted(model: nn.Module, seed: int = 7) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A functionally equal copy with every hidden layer's units permuted: new unit j is
    old unit perm[key][j]. A residual stream keeps one permutation from the stem (or the
    last projection shortcut) through every identity-shortcut block's output."""
    s = structure(model)
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    perms: dict[str, torch.Tensor] = {}
    for st in s.steps:
        if isinstance(st, Sum):
            shortcut = st.parts[1]
            perms[st.key] = perms[shortcut] if not shortcut.endswith("shortcut.0") else \
                torch.randperm(state[f"{shortcut}.weight"].shape[0], generator=g)
        elif not st.classifier and st.move_with is None:
            perms[st.name] = torch.randperm(state[f"{st.name}.weight"].shape[0], generator=g)
    new = dict(state)
    for layer in s.layers():
        w = state[f"{layer.name}.weight"]
        if layer.input != "input":
            w = w[:, perms[layer.input]]
        if layer.classifier:
            new[f"{layer.name}.weight"] = w
            continue
        p = perms[layer.move_with or layer.name]
        new[f"{layer.name}.weight"] = w[p]
        keys = [f"{layer.name}.bias"]
        if layer.bn:
            keys += [f"{layer.bn}.{b}" for b in ("weight", "bias", "running_mean", "running_var")]
        for key in keys:
            if key in state:
                new[key] = state[key][p]
    out = copy.deepcopy(model)
    out.load_state_dict(new)
    return out.eval(), perms


def assert_same_state(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].double(), sb[k].double(), atol=atol), k


# ---- 1. permutation recovery --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "vgg", "resnet", "bottleneck", "convnet"])
@pytest.mark.parametrize("opts", [ACT, WEIGHT], ids=["activation", "weight"])
def test_fusing_a_permuted_copy_recovers_the_permutation(kind, opts):
    f = make(kind)
    x = inputs()
    g, perms = permuted(f)
    assert torch.allclose(logits(g, x), logits(f, x), atol=1e-5)  # the helper keeps the function
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())

    result = fuse([g, f], opts=opts, x=x)
    for key, p in perms.items():
        (t,) = result.maps[key]
        n = len(p)
        expected = torch.eye(n, dtype=torch.float64)[p] / n  # T[i, p[i]] = 1/n
        assert torch.allclose(t, expected, atol=1e-9), key
    assert torch.allclose(logits(result.model, x), logits(f, x), atol=1e-5)
    assert_same_state(result.model, f, atol=1e-5)


# ---- 2. self-fusion ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(SMALL))
def test_self_fusion_is_the_model(kind):
    f = make(kind)
    result = fuse([f, copy.deepcopy(f)], x=inputs())
    assert_same_state(result.model, f)
    assert result.model.me_spec == f.me_spec


# ---- 3. EMD plans --------------------------------------------------------------------------
def test_emd_plans_are_permutations_and_correction_makes_barycentres():
    f, g = make("mlp", 0), make("mlp", 1)
    result = fuse([g, f], x=inputs())
    for key, (t,) in result.maps.items():
        n = t.shape[0]
        assert (t >= 0).all()
        nt = n * t
        assert torch.allclose(nt, nt.round(), atol=1e-9)
        assert torch.allclose(nt.sum(0), torch.ones(n, dtype=torch.float64)), key
        assert torch.allclose(nt.sum(1), torch.ones(n, dtype=torch.float64)), key
        assert torch.allclose(corrected(t).sum(0), torch.ones(n, dtype=torch.float64))
        assert torch.equal(corrected(t, correction=False), t)  # the original's flag off: T as solved


def test_sinkhorn_plan_has_uniform_marginals_and_is_spread():
    c = ground_cost(torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64))
    t = transport(c, "sinkhorn", reg=0.5)
    assert torch.allclose(t.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(t.sum(0), torch.full((4,), 1 / 4, dtype=torch.float64), atol=1e-6)
    assert (t > 1e-6).all()  # entropic: every pair keeps some mass
    assert torch.allclose(corrected(t).sum(0), torch.ones(4, dtype=torch.float64))


def test_correction_divides_by_the_actual_column_mass():
    t = torch.tensor([[0.2, 0.1], [0.1, 0.3], [0.2, 0.1]], dtype=torch.float64)  # columns 0.5, 0.5 -> 0.5, 0.5
    t[0, 0] = 0.3  # column 0 now holds 0.6
    assert torch.allclose(corrected(t).sum(0), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(corrected(t)[:, 0], t[:, 0] / 0.6)
    assert torch.equal(corrected(t, correction=False), t)


def test_correction_off_shrinks_the_aligned_weights_by_the_width():
    """Without correction the moved rows are T^T W: each 1/n of a neuron's weights (the
    original code's behaviour with its flag off), so the fused net is not model 0's at s=0."""
    f, g = make("mlp", 0), make("mlp", 1)
    on = fuse([g, f], opts=FusionOptions(s=0.0), x=inputs()).model.state_dict()
    off = fuse([g, f], opts=FusionOptions(s=0.0, correction=False), x=inputs()).model.state_dict()
    n = on["1.weight"].shape[0]
    assert torch.allclose(off["1.weight"], on["1.weight"] / n, atol=1e-7)


def test_ground_costs():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    e = ground_cost(a, b, "euclidean")
    assert e.shape == (2, 3) and e.dtype == torch.float64
    assert torch.allclose(e, torch.cdist(a.double(), b.double()))
    assert torch.allclose(ground_cost(a, b, "sqeuclidean"), e.square())
    cos = ground_cost(a, b, "cosine")
    assert torch.allclose(cos[:, :2], torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), atol=1e-12)


# ---- 4. mixing ends ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "vgg_bn", "resnet_bn"])
def test_s_one_is_the_anchor(kind):
    f, g = make(kind, 0), make(kind, 1)
    result = fuse([g, f], opts=FusionOptions(s=1.0), x=inputs())
    for k, v in f.state_dict().items():
        assert torch.equal(result.model.state_dict()[k], v), k


@pytest.mark.parametrize("kind", ["mlp", "vgg"])
@pytest.mark.parametrize("opts", [FusionOptions(s=0.0), FusionOptions(s=0.0, ground_metric="weight")],
                         ids=["activation", "weight"])
def test_s_zero_with_equal_widths_is_model_zero(kind, opts):
    f, g = make(kind, 0), make(kind, 1)
    x = inputs()
    fused = fuse([g, f], opts=opts, x=x).model
    assert torch.allclose(logits(fused, x), logits(g, x), atol=1e-5)
    assert not torch.allclose(logits(fused, x), logits(f, x), atol=1e-2)


# ---- 5. class layer ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "vgg"])
def test_class_layer_is_never_permuted(kind):
    f = make(kind)
    x = inputs()
    swapped = copy.deepcopy(f)  # the anchor: f with class rows 0 and 1 swapped
    name = structure(f).layers()[-1].name
    with torch.no_grad():
        for key in (f"{name}.weight", f"{name}.bias"):
            t = getattr(swapped.get_submodule(name), key.rsplit(".", 1)[1])
            if t is not None:
                t[[0, 1]] = t[[1, 0]].clone()
    assert torch.equal(logits(swapped, x)[:, [1, 0]], logits(f, x)[:, :2])
    assert not torch.allclose(logits(swapped, x), logits(f, x), atol=1e-3)

    for opts in (FusionOptions(s=0.0), FusionOptions(s=0.0, ground_metric="weight")):
        fused = fuse([f, swapped], opts=opts, x=x).model
        assert torch.allclose(logits(fused, x), logits(f, x), atol=1e-5)
    half = fuse([f, swapped], x=x).model.get_submodule(name).weight
    w = f.get_submodule(name).weight
    assert torch.allclose(half, 0.5 * (w + swapped.get_submodule(name).weight))


# ---- 9. scale invariance -------------------------------------------------------------------
def test_emd_plan_is_unchanged_by_scaling_the_cost():
    g = torch.Generator().manual_seed(0)
    for n0, n1 in ((7, 7), (9, 5)):
        c = torch.rand(n0, n1, generator=g, dtype=torch.float64)
        t = transport(c)
        for scale in (1e-3, 3.0, 250.0):
            assert torch.allclose(transport(scale * c), t, atol=1e-12)


# ---- 10. determinism, k models -------------------------------------------------------------
def test_activation_sample_is_deterministic_in_its_seed():
    data = torch.arange(100.0).view(100, 1)
    a, b = activation_sample(data, 10, seed=3), activation_sample(data, 10, seed=3)
    assert torch.equal(a, b) and a.shape == (10, 1)
    assert not torch.equal(a, activation_sample(data, 10, seed=4))
    assert len(set(a.flatten().tolist())) == 10  # without replacement
    ds = [(data[i], i % 3) for i in range(100)]
    assert torch.equal(activation_sample(ds, 10, seed=3), a)
    assert torch.equal(activation_sample([{"x": d} for d in data], 10, seed=3), a)


def test_fusion_is_deterministic_for_a_fixed_seed():
    f, g = make("resnet_bn", 0), make("resnet_bn", 1)
    data = inputs(200)
    r1 = fuse([g, f], x=activation_sample(data, 32, seed=5))
    r2 = fuse([g, f], x=activation_sample(data, 32, seed=5))
    assert_same_state(r1.model, r2.model, atol=0)
    assert r1.maps.keys() == r2.maps.keys()
    assert all(torch.equal(r1.maps[k][0], r2.maps[k][0]) for k in r1.maps)


def test_three_identical_models_fuse_to_the_model():
    f = make("vgg_bn")
    result = fuse([f, copy.deepcopy(f), copy.deepcopy(f)], x=inputs())
    assert result.weights == pytest.approx([1 / 3] * 3)
    assert_same_state(result.model, f)
    assert all(len(ts) == 2 for ts in result.maps.values())


def test_three_models_are_the_weighted_sum_of_aligned_models():
    models = [make("mlp", s) for s in range(3)]
    x = inputs()
    for weights in (None, [0.2, 0.5, 0.3]):
        result = fuse(models, x=x, weights=weights)
        mix = weights or [1 / 3] * 3
        state = result.model.state_dict()
        prev = [None, None]
        for name in ("1", "3", "5"):  # the MLP's linears
            ws, bs = [], []
            for i in range(2):
                w = models[i].state_dict()[f"{name}.weight"].double()
                b = models[i].state_dict()[f"{name}.bias"].double()
                if prev[i] is not None:
                    w = w @ prev[i]
                if name != "5":
                    t_c = corrected(result.maps[name][i])
                    w, b = t_c.T @ w, t_c.T @ b
                    prev[i] = t_c
                ws.append(w)
                bs.append(b)
            anchor = models[2].state_dict()
            expect_w = mix[0] * ws[0] + mix[1] * ws[1] + mix[2] * anchor[f"{name}.weight"].double()
            expect_b = mix[0] * bs[0] + mix[1] * bs[1] + mix[2] * anchor[f"{name}.bias"].double()
            assert torch.allclose(state[f"{name}.weight"].double(), expect_w, atol=1e-6), name
            assert torch.allclose(state[f"{name}.bias"].double(), expect_b, atol=1e-6), name


def test_two_model_default_weights_follow_s_and_the_anchor():
    f, g = make("mlp", 0), make("mlp", 1)
    assert fuse([g, f], opts=FusionOptions(s=0.8), x=inputs()).weights == pytest.approx([0.2, 0.8])
    assert fuse([f, g], anchor=0, opts=FusionOptions(s=0.8), x=inputs()).weights == pytest.approx([0.8, 0.2])


# ---- different widths ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,wide,narrow", [
    ("mlp", {"hidden": (12, 16)}, {"hidden": (8, 6)}),
    ("vgg_bn", {"plan": [12, "M", 12, "M", 16]}, {"plan": [8, "M", 8, "M", 6]}),
    ("resnet_bn", {"width": 6}, {"width": 4}),
])
@pytest.mark.parametrize("opts", [ACT, WEIGHT, FusionOptions(solver="sinkhorn")],
                         ids=["activation", "weight", "sinkhorn"])
def test_different_widths_fuse_into_the_anchors_shapes(kind, wide, narrow, opts):
    m0, anchor = make(kind, 0, **wide), make(kind, 1, **narrow)
    x = inputs()
    result = fuse([m0, anchor], opts=opts, x=x)
    shapes = {k: v.shape for k, v in anchor.state_dict().items()}
    assert {k: v.shape for k, v in result.model.state_dict().items()} == shapes
    assert result.model.me_spec == anchor.me_spec
    for key, (t,) in result.maps.items():
        n0 = m0.state_dict()[f"{key}.weight"].shape[0] if f"{key}.weight" in shapes else t.shape[0]
        assert t.shape[0] == n0 and (t >= 0).all()
        assert torch.allclose(t.sum(1), torch.full((t.shape[0],), 1 / t.shape[0], dtype=torch.float64), atol=1e-6)
        assert torch.allclose(corrected(t).sum(0), torch.ones(t.shape[1], dtype=torch.float64))
    assert torch.isfinite(logits(result.model, x)).all()


def test_past_correction_off_needs_equal_widths():
    f, g = make("mlp", 0), make("mlp", 1)
    x = inputs()
    fused = fuse([g, f], opts=FusionOptions(past_correction=False), x=x).model
    assert torch.isfinite(logits(fused, x)).all()
    with pytest.raises(ConfigError, match="past_correction"):
        fuse([make("mlp", 0, hidden=(16, 10)), f], opts=FusionOptions(past_correction=False), x=x)


def test_past_correction_off_costs_the_aligned_weights_and_moves_the_unaligned_ones():
    """As the original: with past_correction=False the weight ground metric still compares
    W0 T_prev with the anchor's rows; only the moved weights are T^T W0 instead of
    T^T W0 T_prev. Two hidden layers of two neurons, by hand."""
    def mlp(first, second, head):
        torch.manual_seed(0)
        m = create_model("mlp", num_classes=2, in_chans=2, img_size=1, hidden=(2, 2), bias=False)
        for name, w in zip(("1", "3", "5"), (first, second, head), strict=True):
            m.get_submodule(name).weight.data = torch.tensor(w, dtype=torch.float32)
        return m.eval()

    m0 = mlp([[1, 0], [0, 3]], [[1, 4], [4, 0]], [[1, 2], [3, 4]])
    anchor = mlp([[0, 3], [1, 0]], [[4, 1], [0, 4]], [[5, 6], [7, 8]])
    opts = FusionOptions(ground_metric="weight", past_correction=False)
    res = fuse([m0, anchor], opts=opts)
    swap, eye = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    assert torch.equal(2 * res.maps["1"][0], swap)  # layer 1: model 0's neurons are the anchor's, swapped
    # layer 3 costed on W0 P = [[4, 1], [0, 4]], the anchor's own rows: the identity. (On the
    # unaligned rows [[1, 4], [4, 0]] the cost would be [[sqrt 18, 1], [1, sqrt 32]]: a swap.)
    torch.testing.assert_close(res.costs["3"][0], torch.tensor([[0.0, 5.0], [5.0, 0.0]], dtype=torch.float64))
    assert torch.equal(2 * res.maps["3"][0], eye)
    w = {k: res.model.get_submodule(k).weight.detach().double() for k in ("1", "3", "5")}
    torch.testing.assert_close(w["1"], torch.tensor([[0.0, 3.0], [1.0, 0.0]], dtype=torch.float64))
    # moved unaligned: 0.5 (I^T [[1, 4], [4, 0]]) + 0.5 [[4, 1], [0, 4]]
    torch.testing.assert_close(w["3"], torch.tensor([[2.5, 2.5], [2.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(w["5"], torch.tensor([[3.0, 4.0], [5.0, 6.0]], dtype=torch.float64))
    # past correction on: the same maps, the aligned rows moved (here the anchor's own)
    on = fuse([m0, anchor], opts=FusionOptions(ground_metric="weight"))
    assert torch.equal(on.maps["3"][0], res.maps["3"][0])
    torch.testing.assert_close(on.model.get_submodule("3").weight.detach().double(),
                               torch.tensor([[4.0, 1.0], [0.0, 4.0]], dtype=torch.float64))


def test_linear_after_a_flatten_is_aligned_per_spatial_position():
    g = torch.Generator().manual_seed(0)
    c, k, out = 4, 6, 3
    lin = torch.randn(out, c * k, dtype=torch.float64, generator=g)
    feats = torch.randn(10, c, k, dtype=torch.float64, generator=g)  # anchor's channels
    p = torch.randperm(c, generator=g)
    t_c = torch.eye(c, dtype=torch.float64)[p]  # model-0 channel i is anchor channel p[i]
    w0 = lin.view(out, c, k)[:, p].reshape(out, c * k)  # model 0 reads its own channel order
    assert torch.allclose(feats[:, p].flatten(1) @ w0.T, feats.flatten(1) @ lin.T)
    assert torch.allclose(align_inputs(w0, t_c), lin)
    conv = torch.randn(out, c, 3, 3, dtype=torch.float64, generator=g)
    assert torch.allclose(align_inputs(conv[:, p], t_c), conv)


def test_residual_layers_move_with_their_sums_map():
    f, g = make("resnet", 0), make("resnet", 1, width=6)
    result = fuse([g, f], opts=WEIGHT)
    (t_stem,), (t_conv2,), (t_sum,) = (result.maps[k] for k in ("stem.0", "layer1.0.conv2", "layer1.0"))
    assert torch.allclose(t_sum, (t_conv2 + t_stem) / 2)  # identity shortcut: the stream's map
    assert not torch.allclose(t_sum, t_conv2)
    for name, t_in, t_out in (("layer1.0.conv2", result.maps["layer1.0.conv1"][0], t_sum),
                              ("layer2.0.conv1", t_sum, result.maps["layer2.0.conv1"][0]),
                              ("layer2.0.shortcut.0", t_sum, result.maps["layer2.0"][0])):
        w = align_inputs(g.state_dict()[f"{name}.weight"].double(), corrected(t_in))
        expect = 0.5 * move_outputs(corrected(t_out), w) + 0.5 * f.state_dict()[f"{name}.weight"].double()
        assert torch.allclose(result.model.state_dict()[f"{name}.weight"].double(), expect, atol=1e-6), name


def test_degenerate_layers_reuse_the_named_map():
    f, g = make("resnet_bn", 0), make("resnet_bn", 1)
    result = fuse([g, f], x=inputs(), degenerate={"layer1.0.conv1": "stem.0"})
    assert torch.equal(result.maps["layer1.0.conv1"][0], result.maps["stem.0"][0])
    assert "layer1.0.conv1" not in result.costs
    with pytest.raises(ConfigError, match="not computed before"):
        fuse([g, f], x=inputs(), degenerate={"layer1.0.conv1": "layer2.0"})
    with pytest.raises(ConfigError, match="unknown layers"):
        fuse([g, f], x=inputs(), degenerate={"nope": "stem.0"})


# ---- errors --------------------------------------------------------------------------------
def test_models_of_different_depths_need_cross_layer_alignment():
    with pytest.raises(ConfigError, match="cross-layer alignment"):
        fuse([make("mlp", hidden=(12, 10, 8)), make("mlp")], x=inputs())
    with pytest.raises(ConfigError, match="cross-layer alignment"):
        fuse([make("resnet", layers=[2, 1, 1, 1]), make("resnet")], x=inputs())


def test_activation_metric_needs_inputs():
    f = make("mlp")
    with pytest.raises(ConfigError, match="needs inputs x"):
        fuse([f, f])
    fuse([f, f], opts=WEIGHT)  # the weight metric does not


@pytest.mark.parametrize("bad", [{"ground_metric": "gradient"}, {"distance": "manhattan"}, {"solver": "lp"},
                                 {"sinkhorn_reg": 0}, {"sinkhorn_reg": -1.0}, {"correction": "yes"},
                                 {"past_correction": 1}, {"s": 1.5}, {"s": -0.1}])
def test_bad_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        FusionOptions(**bad)


def test_bad_fusion_arguments_are_config_errors():
    f = make("mlp")
    x = inputs()
    with pytest.raises(ConfigError, match="at least two"):
        fuse([f], x=x)
    with pytest.raises(ConfigError, match="anchor"):
        fuse([f, f], anchor=2, x=x)
    with pytest.raises(ConfigError, match="summing to 1"):
        fuse([f, f], weights=[0.7, 0.7], x=x)
    with pytest.raises(ConfigError, match="class counts"):
        g = create_model("mlp", num_classes=3, in_chans=1, img_size=8, hidden=(12, 10))
        fuse([g, f], x=x)
    with pytest.raises(ConfigError):
        ground_cost(x.flatten(1), x.flatten(1), "manhattan")


# ---- BatchNorm statistics ------------------------------------------------------------------
def test_recompute_bn_stats_matches_the_datas_batch_statistics():
    f, g = make("vgg_bn", 0), make("vgg_bn", 1)
    fused = fuse([g, f], x=inputs()).model
    data = inputs(96, seed=9)
    batches = [data[i:i + 32] for i in range(0, 96, 32)]
    out = recompute_bn_stats(fused, batches)
    assert out is fused and not fused.training
    with torch.no_grad():
        conv = fused.features[0](data)  # [N, C, H, W] before the first BN
    bn = fused.features[1]
    assert torch.allclose(bn.running_mean, conv.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, conv.var((0, 2, 3)), rtol=0.05)
    # dict and tuple batches work too, and give the same statistics
    mean = bn.running_mean.clone()
    recompute_bn_stats(fused, [{"x": b} for b in batches])
    assert torch.allclose(bn.running_mean, mean)
    recompute_bn_stats(fused, [(b, torch.zeros(len(b))) for b in batches])
    assert torch.allclose(bn.running_mean, mean)
