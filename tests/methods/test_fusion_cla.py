"""Cross-layer alignment: testable properties 6-8 of OT fusion (docs/fusion.md).

    6. DP = brute force        align (pins, forced pairs, allowed mask, errors); per stage
    7. Identity insertion      balance: MLP, VGG (+BN), ResNet (basic, bottleneck, no norm)
    8. CKA                     linear_cka; and the CCA cost on an invertible transform
   (models)                    align_models costs and stages; plot_alignment
   (original's defaults)       one leading pin, squared width cost, pins in every stage

Everything runs on tiny CPU models (1x8x8 inputs, widths 4-16).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from metaensemble.errors import ConfigError
from metaensemble.methods.fusion.cla import (
    align,
    align_models,
    balance,
    cca_similarity,
    linear_cka,
    pair_cost,
    plot_alignment,
    representations,
)
from metaensemble.methods.fusion.config import FusionConfig
from metaensemble.methods.fusion.structure import generic_spec, structure
from metaensemble.models import create_model, load, save_model

BASE = {"num_classes": 3, "in_chans": 1, "img_size": 8}


def make(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return create_model(arch, **BASE, **kw)


def randomise_bn(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm statistics and affines, so copying them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def inputs(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---- 6. dynamic programming ----------------------------------------------------------------
def brute_force(c, pin_start, pin_end, forced=None, allowed=None):
    """Minimum cost over every strictly increasing map satisfying the constraints (inf if none)."""
    n, m = c.shape
    best = np.inf
    for a in itertools.combinations(range(n), m):
        if any(a[k] != k for k in range(pin_start)) or any(a[m - 1 - j] != n - 1 - j for j in range(pin_end)):
            continue
        if any(a[k] != i for k, i in (forced or {}).items()):
            continue
        if allowed is not None and not all(allowed[a[k], k] for k in range(m)):
            continue
        best = min(best, sum(c[a[k], k] for k in range(m)))
    return best


def map_cost(c, a):
    return sum(c[i, k] for k, i in enumerate(a))


def check_map(a, n, m, pin_start, pin_end):
    assert len(a) == m and all(0 <= i < n for i in a)
    assert all(x < y for x, y in itertools.pairwise(a))
    assert a[:pin_start] == list(range(pin_start))
    assert all(a[m - 1 - j] == n - 1 - j for j in range(pin_end))


@pytest.mark.parametrize("pins", [(2, 1), (1, 1), (0, 0), (1, 0), (0, 2), (3, 0)])
def test_dp_equals_brute_force(pins):
    rng = np.random.default_rng(sum(pins))
    pin_start, pin_end = pins
    cases = 0
    for n in range(1, 9):
        for m in range(1, n + 1):
            if pin_start + pin_end > m:
                continue
            for _ in range(3):
                c = rng.normal(size=(n, m))
                a = align(c, pin_start, pin_end)
                check_map(a, n, m, pin_start, pin_end)
                assert map_cost(c, a) == pytest.approx(brute_force(c, pin_start, pin_end), abs=1e-12)
                # every map sums exactly m entries: a constant shift changes no choice
                assert align(c + 7.5, pin_start, pin_end) == a
                assert align(c - 3.0, pin_start, pin_end) == a
                cases += 1
    assert cases > 50


def test_dp_with_allowed_mask_and_forced_pairs():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        n = int(rng.integers(2, 9))
        m = int(rng.integers(1, n + 1))
        c = rng.normal(size=(n, m))
        allowed = rng.random((n, m)) < 0.7
        forced = {}
        if rng.random() < 0.5:
            k = int(rng.integers(0, m))
            forced = {k: int(rng.integers(k, n - (m - 1 - k)))}
        best = brute_force(c, 0, 0, forced, allowed)
        if not np.isfinite(best):
            with pytest.raises(ConfigError, match="no strictly increasing map"):
                align(c, 0, 0, forced=forced, allowed=allowed)
            continue
        # NaN outside the mask is ignored, as align_models' cross-stage entries are
        a = align(np.where(allowed, c, np.nan), 0, 0, forced=forced, allowed=allowed)
        assert all(allowed[i, k] for k, i in enumerate(a)) and all(a[k] == i for k, i in forced.items())
        assert map_cost(c, a) == pytest.approx(best, abs=1e-12)
        checked += 1
    assert checked > 50


def test_dp_pins_override_cheaper_maps():
    c = np.ones((6, 3))
    c[3, 0] = c[4, 1] = c[1, 2] = -100.0  # the cheapest entries all lie off the pins
    assert align(c, 1, 1) == [0, 4, 5]
    assert align(c, 2, 1) == [0, 1, 5]
    assert align(c, 0, 0) == [3, 4, 5]  # the free map takes both reachable cheap entries


def test_default_pins_are_the_originals_first_and_last_hidden_layer():
    """The original's start_layer_idx=2 is 1-based and counts the input: it pins the first
    hidden layer only (free_end_layers=1 pins the last). So a shallow parent of two hidden
    layers aligns under the defaults, and its second unit is not pinned at the start."""
    cfg = FusionConfig()
    assert (cfg.pin_start, cfg.pin_end) == (1, 1)
    c = np.ones((5, 3))
    c[2, 0] = c[3, 1] = -10.0  # unit 0 is cheapest at deep 2, unit 1 at deep 3
    assert align(c) == align(c, cfg.pin_start, cfg.pin_end) == [0, 3, 4]  # only unit 0 is held at the start
    assert align(c, 2, 1) == [0, 1, 4]  # two pinned units: what pin_start=2 means
    deep, shallow = make("mlp", hidden=(8, 8, 8, 8)), make("mlp", seed=1, hidden=(8, 8))
    al = align_models(deep, shallow, pin_start=cfg.pin_start, pin_end=cfg.pin_end, scope=cfg.cla_scope)
    assert al.mapping == [[0, 3]]
    assert_balanced(deep, shallow, al)


def test_dp_errors():
    with pytest.raises(ConfigError, match="fewer units.*swap"):
        align(np.zeros((3, 4)))
    with pytest.raises(ConfigError, match="overlap"):
        align(np.zeros((5, 2)), pin_start=2, pin_end=1)
    mask = np.ones((4, 3), bool)
    mask[:, 1] = False
    with pytest.raises(ConfigError, match="no strictly increasing map"):
        align(np.zeros((4, 3)), 0, 0, allowed=mask)
    with pytest.raises(ConfigError, match="no strictly increasing map"):
        align(np.zeros((4, 3)), 1, 1, forced={1: 3})  # unit 1 at the deep end leaves no room for unit 2
    with pytest.raises(ConfigError, match="NaN"):
        align(np.full((4, 3), np.nan), 1, 1)


# ---- 7. identity insertion -----------------------------------------------------------------
def assert_balanced(deep, shallow, al, **kw):
    bal = balance(shallow, al)
    x = inputs()
    shallow.eval()
    bal.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bal.model(x), shallow(x), atol=1e-5, rtol=1e-5)
    # the deep depth, per stage
    assert [len(s) for s in structure(bal.model).stages] == [len(s) for s in structure(deep).stages]
    assert len(bal.inserted) == sum(len(s) for s in al.skipped)
    # a generic descriptor, built by the registry
    assert bal.model.me_spec == generic_spec(bal.model.me_spec)
    assert bal.model.me_spec["arch"] in ("mlp", "vgg", "resnet")
    return bal


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_identity_insertion(bias):
    deep, shallow = make("mlp", hidden=(12, 10, 8, 6)), make("mlp", seed=1, hidden=(16, 8), bias=bias)
    al = align_models(deep, shallow, pin_start=1, pin_end=1)
    assert al.mapping == [[0, 3]]
    bal = assert_balanced(deep, shallow, al)
    assert bal.model.me_spec["kwargs"]["hidden"] == [16, 16, 16, 8]
    assert bal.inserted == ["3", "5"] and bal.degenerate == {}
    torch.testing.assert_close(bal.model.get_submodule("3").weight, torch.eye(16))
    # a free end: the skipped positions come after the last shallow unit
    al = align_models(deep, shallow, pin_start=1, pin_end=0)
    assert al.mapping == [[0, 2]]  # width 8 goes to the deep unit of width 8
    bal = assert_balanced(deep, shallow, al)
    assert bal.model.me_spec["kwargs"]["hidden"] == [16, 16, 8, 8]
    assert bal.inserted == ["3", "7"]


@pytest.mark.parametrize("batch_norm,bias", [(False, True), (True, True), (False, False)])
def test_vgg_identity_insertion(batch_norm, bias):
    deep = make("vgg", plan=[8, 8, "M", 16, 16], batch_norm=batch_norm, bias=bias)
    shallow = make("vgg", seed=1, plan=[4, "M", 8], batch_norm=batch_norm, bias=bias)
    randomise_bn(shallow)
    al = align_models(deep, shallow, pin_start=1, pin_end=0)
    assert al.mapping == [[0], [0]]  # a width tie goes to the earliest deep unit
    bal = assert_balanced(deep, shallow, al)
    assert bal.model.me_spec["kwargs"]["plan"] == [4, 4, "M", 8, 8]
    assert bal.model.me_spec["kwargs"]["batch_norm"] is batch_norm
    # the shapes of the deep architecture at the shallow widths
    expected = make("vgg", plan=[4, 4, "M", 8, 8], batch_norm=batch_norm, bias=bias)
    assert {k: v.shape for k, v in bal.model.state_dict().items()} == \
        {k: v.shape for k, v in expected.state_dict().items()}
    # identity on non-negative input, not in general: the inserted conv sits after a ReLU
    conv = bal.model.get_submodule(bal.inserted[0])
    z = torch.rand(2, 4, 5, 5)
    torch.testing.assert_close(conv(z), z)


def test_vgg_insertion_at_a_stage_head_after_the_pool():
    deep = make("vgg", plan=[8, 8, "M", 16, 16, 16], batch_norm=True)
    shallow = make("vgg", seed=1, plan=[4, 6, "M", 8], batch_norm=True)
    randomise_bn(shallow)
    al = align_models(deep, shallow, pin_start=2, pin_end=1, scope="network")
    assert al.mapping == [[0, 1], [2]]  # stage 2's first two positions are inserted copies of width 6
    bal = assert_balanced(deep, shallow, al)
    assert bal.model.me_spec["kwargs"]["plan"] == [4, 6, "M", 6, 6, 8]


@pytest.mark.parametrize("block,norm", [("basic", True), ("basic", False), ("bottleneck", True)])
def test_resnet_identity_insertion(block, norm):
    deep = make("resnet", layers=[2, 2, 1, 2], block=block, width=4, norm=norm, stem="cifar")
    shallow = make("resnet", seed=1, layers=[1, 1, 1, 1], block=block, width=4, norm=norm, stem="cifar")
    randomise_bn(shallow)
    # one DP over the network: pin_end=1 would send layer4.0 to layer4.1, but a stage head maps to the head
    with pytest.raises(ConfigError, match="no strictly increasing map.*first block maps to"):
        align_models(deep, shallow, pin_start=1, pin_end=1, scope="network")
    al = align_models(deep, shallow)  # per stage (the default): a one-block stage takes the start pin
    assert al.pairs == [(f"layer{s}.0", f"layer{s}.0") for s in range(1, 5)]
    assert align_models(deep, shallow, pin_start=1, pin_end=0, scope="network").mapping == al.mapping
    bal = balance(shallow, al)
    assert bal.inserted == ["layer1.1", "layer2.1", "layer4.1"]
    if block == "basic":  # both convs as wide as the stream: its map at the block input
        assert bal.degenerate == {f"{b}.{c}": f"{b[:-1]}0" for b in bal.inserted for c in ("conv1", "conv2")}
    else:  # a bottleneck's inner convs are narrower than the stream: a uniform plan
        assert bal.degenerate == {**{f"{b}.{c}": "uniform" for b in bal.inserted for c in ("conv1", "conv2")},
                                  **{f"{b}.conv3": f"{b[:-1]}0" for b in bal.inserted}}
    assert_balanced(deep, shallow, al)
    expected = make("resnet", layers=[2, 2, 1, 2], block=block, width=4, norm=norm, stem="cifar")
    assert {k: v.shape for k, v in bal.model.state_dict().items()} == \
        {k: v.shape for k, v in expected.state_dict().items()}


def test_resnet18_to_resnet34_shape_and_degenerate_chain():
    deep, shallow = make("resnet34", width=4), make("resnet18", seed=1, width=4)
    randomise_bn(shallow)
    al = align_models(deep, shallow)  # the original's defaults: per stage, its first and last block pinned
    assert al.mapping == [[0, 2], [0, 3], [0, 5], [0, 2]]
    bal = assert_balanced(deep, shallow, al)
    assert bal.model.me_spec["kwargs"]["layers"] == [3, 4, 6, 3]
    # consecutive inserted blocks each reuse the stream just before them
    for conv, key in bal.degenerate.items():
        stage, j = conv.split(".")[:2]
        assert key == f"{stage}.{int(j) - 1}"


def test_balanced_model_round_trips(tmp_path):
    deep = make("vgg", plan=[8, 8, "M", 16, 16], batch_norm=True)
    shallow = make("vgg", seed=1, plan=[4, "M", 8], batch_norm=True)
    randomise_bn(shallow)
    bal = balance(shallow, align_models(deep, shallow, pin_start=1, pin_end=0))
    save_model(bal.model, tmp_path / "bal")
    back = load(tmp_path / "bal")
    assert back.me_spec["arch"] == "vgg" and back.me_spec["kwargs"]["plan"] == [4, 4, "M", 8, 8]
    x = inputs()
    bal.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), bal.model(x))


def test_insertion_before_the_first_unit_is_rejected():
    deep, shallow = make("mlp", hidden=(8, 8, 8)), make("mlp", seed=1, hidden=(8, 8))
    al = align_models(deep, shallow, pin_start=0, pin_end=1)
    al.mapping = [[1, 2]]
    with pytest.raises(ConfigError, match="before the first unit"):
        balance(shallow, al)
    deep = make("vgg", plan=[8, 8, "M", 16])
    shallow = make("vgg", seed=1, plan=[8, "M", 16])
    al = align_models(deep, shallow, pin_start=0, pin_end=0)
    al.mapping = [[1], [0]]
    with pytest.raises(ConfigError, match="before the first unit"):
        balance(shallow, al)


def test_resnet_stage_head_insertion_is_rejected():
    deep = make("resnet", layers=[1, 2, 1, 1], width=4)
    shallow = make("resnet", seed=1, layers=[1, 1, 1, 1], width=4)
    al = align_models(deep, shallow, pin_start=1, pin_end=1)
    al.mapping[1] = [1]
    with pytest.raises(ConfigError, match="head of a ResNet stage"):
        balance(shallow, al)


def test_balance_rejects_another_shallow_net():
    deep, shallow = make("mlp", hidden=(8, 8, 8)), make("mlp", hidden=(8, 8))
    al = align_models(deep, shallow, pin_start=1, pin_end=1)
    with pytest.raises(ConfigError, match="different shallow net"):
        balance(make("mlp", hidden=(8, 8, 4)), al)


# ---- 8. CKA and CCA ------------------------------------------------------------------------
def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    y = torch.randn(50, 7, generator=g, dtype=torch.float64) + x[:, :7]
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    assert linear_cka(x, y @ q) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 3.7 * y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, y + 5.0) == pytest.approx(base, abs=1e-12)  # centred
    # with more features than samples the Gram-matrix form is used: it equals the definition
    wide, small = torch.randn(20, 200, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g,
                                                                                    dtype=torch.float64)
    wc, sc = wide - wide.mean(0), small - small.mean(0)
    by_definition = (sc.T @ wc).norm() ** 2 / ((wc.T @ wc).norm() * (sc.T @ sc).norm())
    assert linear_cka(wide, small) == pytest.approx(float(by_definition), abs=1e-12)
    for seed in range(20):
        g.manual_seed(seed)
        a, b = torch.randn(30, 5, generator=g), torch.randn(30, 40, generator=g)
        assert 0.0 <= linear_cka(a, b) <= 1.0
    assert linear_cka(torch.ones(10, 3), x[:10]) == 0.0


def test_cca_of_an_invertible_transform_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    assert cca_similarity(x, x @ a + 2.0) == pytest.approx(1.0, abs=1e-9)
    assert pair_cost(x, x @ a, "cca") == pytest.approx(0.0, abs=1e-9)
    # a collinear feature is dropped, not divided by zero
    dup = torch.cat([x, x[:, :1]], 1)
    assert cca_similarity(dup, x) == pytest.approx(1.0, abs=1e-9)
    ind = torch.randn(200, 6, generator=g, dtype=torch.float64)
    assert cca_similarity(x, ind) < 0.5
    # conv units: spatial positions are observations, so a channel mixing is found too
    conv = torch.randn(10, 4, 5, 5, generator=g, dtype=torch.float64)
    mixed = torch.einsum("dc,nchw->ndhw", torch.randn(4, 4, generator=g, dtype=torch.float64) + 2 * torch.eye(4),
                         conv)
    assert pair_cost(conv, mixed, "cca") == pytest.approx(0.0, abs=1e-9)


def test_wasserstein_cost_is_zero_for_permuted_and_scaled_neurons():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 6, 3, 3, generator=g).relu()
    assert pair_cost(a, a[:, torch.randperm(6, generator=g)], "wasserstein") == pytest.approx(0.0, abs=1e-9)
    assert pair_cost(a, 4.0 * a, "wasserstein") == pytest.approx(0.0, abs=1e-9)
    b = torch.randn(16, 9, 3, 3, generator=g).relu()
    assert 0.0 < pair_cost(a, b, "wasserstein") <= 2.0


# ---- align_models --------------------------------------------------------------------------
def test_width_cost_values():
    deep, shallow = make("mlp", hidden=(16, 12, 8, 4)), make("mlp", hidden=(16, 4))
    al = align_models(deep, shallow, pin_start=1, pin_end=1)
    np.testing.assert_array_equal(al.cost, [[0, 144], [16, 64], [64, 16], [144, 0]])  # squared differences
    assert al.mapping == [[0, 3]] and al.cost_name == "width"
    assert al.pairs == [("1", "1"), ("3", "7")] and al.skipped == [[1, 2]]
    absolute = align_models(deep, shallow, cost="width_abs")
    np.testing.assert_array_equal(absolute.cost, [[0, 12], [4, 8], [8, 4], [12, 0]])


def test_width_cost_is_squared_by_default_and_absolute_as_an_option():
    """The original's width cost is the squared difference; where the absolute one picks
    another map, the default follows the original."""
    assert FusionConfig().cla_cost == "width"
    deep, shallow = make("mlp", hidden=(20, 12, 20, 8, 32)), make("mlp", seed=1, hidden=(16, 32, 24, 20))
    squared = align_models(deep, shallow)  # first and last pinned: 32 and 24 go into 12, 20, 8
    absolute = align_models(deep, shallow, cost="width_abs")
    # squared: two moderate misses, 12^2 + 16^2 = 400 < 20^2 + 4^2 = 416; absolute: 20 + 4 = 24 < 12 + 16 = 28
    assert squared.mapping == [[0, 2, 3, 4]]
    assert absolute.mapping == [[0, 1, 2, 4]]
    np.testing.assert_array_equal(squared.cost, absolute.cost ** 2)


@pytest.mark.parametrize("cost", ["width", "cka", "cca", "wasserstein"])
def test_align_models_mlp_gives_a_valid_map(cost):
    deep, shallow = make("mlp", hidden=(16, 12, 8, 8, 6)), make("mlp", seed=1, hidden=(12, 8, 6))
    al = align_models(deep, shallow, cost=cost, x=inputs(64), pin_start=1, pin_end=1)
    check_map(al.mapping[0], 5, 3, 1, 1)
    assert al.cost.shape == (5, 3) and np.isfinite(al.cost).all()
    if cost != "width":
        assert (al.cost >= -1e-9).all() and (al.cost <= 2 + 1e-9).all()
    assert_balanced(deep, shallow, al)


def test_activation_costs_find_copied_layers():
    """Self-alignment is the identity at zero cost, and a balanced copy's units cost 0 against
    the shallow units they copy (the inserted identities repeat their predecessor)."""
    shallow = make("mlp", seed=1, hidden=(16, 12, 8))
    deep = balance(shallow, align_models(make("mlp", hidden=(16, 16, 12, 12, 8)), shallow, pin_start=1,
                                         pin_end=1)).model
    x = inputs(128)
    for cost in ("cka", "cca", "wasserstein"):
        own = align_models(shallow, shallow, cost=cost, x=x, pin_start=0, pin_end=0)
        assert own.mapping == [[0, 1, 2]]
        np.testing.assert_allclose(np.diag(own.cost), 0.0, atol=1e-6)
        got = align_models(deep, shallow, cost=cost, x=x, pin_start=1, pin_end=1)
        assert sum(got.cost[i, k] for k, i in enumerate(got.flat_map())) == pytest.approx(0.0, abs=1e-6)


def test_vgg_alignment_never_crosses_stages():
    deep = make("vgg", plan=[8, 8, 8, "M", 16, 16, "M", 16])
    shallow = make("vgg", seed=1, plan=[8, "M", 16, "M", 16])
    for cost in ("width", "cka", "wasserstein"):
        al = align_models(deep, shallow, cost=cost, x=inputs(), pin_start=1, pin_end=1)
        assert al.deep_units == [["features.0", "features.2", "features.4"], ["features.7", "features.9"],
                                 ["features.12"]]
        assert len(al.mapping) == 3 and all(0 <= i < len(d) for d, mp in zip(al.deep_units, al.mapping, strict=True)
                                            for i in mp)
        assert np.isnan(al.cost[0, 1]) and np.isfinite(al.cost[0, 0])
        assert_balanced(deep, shallow, al)
    with pytest.raises(ConfigError, match="same number of stages"):
        align_models(deep, make("vgg", plan=[8, 16]))
    with pytest.raises(ConfigError, match="stage 1"):
        align_models(make("vgg", plan=[8, 8, "M", 16]), make("vgg", plan=[8, "M", 16, 16]), pin_start=1)


def stage_optimum(c: np.ndarray, pin_start: int, pin_end: int, heads: bool) -> tuple[float, int, int]:
    """Brute force within one stage (cost [n, m]): the pins applied in the stage, a one-unit
    stage taking the start pin (the original's), ResNet heads to heads."""
    first, last = (1, 0) if c.shape[1] == 1 and pin_start >= 1 else (pin_start, pin_end)
    return brute_force(c, first, last, {0: 0} if heads else None), first, last


@pytest.mark.parametrize("pins", [(1, 1), (0, 0), (1, 0), (0, 1), (2, 0)])
def test_per_stage_alignment_equals_brute_force_in_every_stage(pins):
    x = inputs()
    pairs = [(make("vgg", plan=[8, 8, 8, "M", 16, 16, "M", 16, 16, 16]),
              make("vgg", seed=1, plan=[8, 8, "M", 16, "M", 16, 16])),
             (make("vgg", plan=[8, 8, "M", 16, 16, 16, 16]), make("vgg", seed=1, plan=[8, "M", 16, 16, 16])),
             (make("resnet", layers=[3, 2, 4, 2], width=4), make("resnet", seed=1, layers=[2, 1, 3, 2], width=4))]
    checked = 0
    for deep, shallow in pairs:
        heads = structure(deep).family == "resnet"
        cost = align_models(deep, shallow, cost="cka", x=x, pin_start=0, pin_end=0).cost  # the pins change no cost
        d_off = np.cumsum([0] + [len(s) for s in structure(deep).stages])
        s_off = np.cumsum([0] + [len(s) for s in structure(shallow).stages])
        stages = [cost[d_off[s]:d_off[s + 1], s_off[s]:s_off[s + 1]] for s in range(len(d_off) - 1)]
        optima = [stage_optimum(c, *pins, heads) for c in stages]
        if not all(np.isfinite(best) for best, _, _ in optima):
            with pytest.raises(ConfigError, match="stage .*(no strictly increasing map|overlap)"):
                align_models(deep, shallow, cost="cka", x=x, pin_start=pins[0], pin_end=pins[1])
            continue
        al = align_models(deep, shallow, cost="cka", x=x, pin_start=pins[0], pin_end=pins[1])
        for c, mp, (best, first, last) in zip(stages, al.mapping, optima, strict=True):
            check_map(mp, *c.shape, first, last)
            assert map_cost(c, mp) == pytest.approx(best, abs=1e-12)
            checked += 1
    assert checked >= 5


def test_pins_apply_in_every_stage_by_default_and_at_the_ends_with_network_scope():
    assert FusionConfig().cla_scope == "stage"
    deep = make("vgg", plan=[8, 8, 8, "M", 16, 16, 16])
    shallow = make("vgg", seed=1, plan=[8, 8, "M", 16, 16])  # the width cost is flat in each stage: pins decide
    assert align_models(deep, shallow).mapping == [[0, 2], [0, 2]]  # each stage's first and last pinned
    # one DP: the first unit and the last pinned; the rest take the earliest deep units
    assert align_models(deep, shallow, scope="network").mapping == [[0, 1], [0, 2]]
    resnet_d, resnet_s = make("resnet", layers=[3, 3, 1, 1], width=4), make("resnet", seed=1, layers=[2, 2, 1, 1], width=4)
    assert align_models(resnet_d, resnet_s).mapping == [[0, 2], [0, 2], [0], [0]]
    assert align_models(resnet_d, resnet_s, scope="network", pin_end=0).mapping == [[0, 1], [0, 1], [0], [0]]


def test_resnet_stage_heads_map_to_heads():
    deep = make("resnet", layers=[2, 3, 2, 2], width=4)
    shallow = make("resnet", seed=1, layers=[1, 2, 1, 2], width=4)
    # the width cost is flat within a stage; cka would happily pick a non-head block
    al = align_models(deep, shallow, cost="cka", x=inputs(), pin_start=1, pin_end=1)
    for d, s, mp in zip(al.deep_units, al.shallow_units, al.mapping, strict=True):
        assert mp[0] == 0
        assert all(u.split(".")[0] == d[i].split(".")[0] for u, i in zip(s, mp, strict=True))
    assert_balanced(deep, shallow, al)


def test_align_models_errors():
    mlp, vgg = make("mlp", hidden=(8, 8)), make("vgg", plan=[8, "M", 8])
    with pytest.raises(ConfigError, match="one family"):
        align_models(vgg, mlp)
    with pytest.raises(ConfigError, match="valid: width, width_abs, cka, cca, wasserstein"):
        align_models(mlp, mlp, cost="l2")
    with pytest.raises(ConfigError, match="valid: stage, network"):
        align_models(mlp, mlp, scope="global")
    with pytest.raises(ConfigError, match="pass inputs x"):
        align_models(mlp, mlp, cost="cka")
    with pytest.raises(ConfigError, match="at most the deep net's units"):
        align_models(make("mlp", hidden=(8,)), mlp)


def test_representations_are_post_relu_and_leave_the_model_as_it_was():
    model = make("vgg", plan=[4, "M", 8], batch_norm=True)
    model.train()
    reps = representations(model, inputs(5), ["features.0", "features.4"])
    assert reps["features.0"].shape == (5, 4, 8, 8) and reps["features.4"].shape == (5, 8, 4, 4)
    assert (reps["features.0"] >= 0).all() and model.training
    blocks = representations(make("resnet", layers=[1, 1, 1, 1], width=4), inputs(5), ["layer2.0"])
    assert blocks["layer2.0"].shape == (5, 8, 4, 4)


# ---- figure --------------------------------------------------------------------------------
def test_plot_alignment_writes_a_png(tmp_path):
    deep = make("vgg", plan=[8, 8, 8, "M", 16, 16, "M", 16])
    shallow = make("vgg", seed=1, plan=[8, "M", 16, "M", 16])
    al = align_models(deep, shallow, cost="cka", x=inputs(), pin_start=1, pin_end=1)
    path = plot_alignment(al, tmp_path / "alignment.png", "vgg: deep <- shallow (cka)")
    data = path.read_bytes()
    assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    mlp = align_models(make("mlp", hidden=(16, 12, 8, 4)), make("mlp", hidden=(16, 4)), pin_start=1, pin_end=1)
    assert plot_alignment(mlp, tmp_path / "mlp.png", "mlp").stat().st_size > 0
