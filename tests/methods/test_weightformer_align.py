"""Permutation alignment of WeightFormer teachers: function preservation, recovery of a
known permutation, lower distance to the reference, modes and non-chain students."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from metaensemble.errors import ConfigError
from metaensemble.methods.weightformer.align import (
    align_states,
    align_to,
    apply_permutation,
    chain,
    permutation_to,
)
from metaensemble.methods.weightformer.tokens import build_layout
from metaensemble.models import create_model

SHAPE = {"num_classes": 10, "in_chans": 1, "img_size": 8}
ARCHS = [("convnet", {"width": 4}), ("mlp", {"hidden": (16, 8)})]
X = torch.zeros(2, 1, 8, 8)


def net(arch, kw, seed):
    torch.manual_seed(seed)
    m = create_model(arch, **SHAPE, **kw)
    with torch.no_grad():  # non-trivial BN statistics and affine values
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.eval()


def outputs(arch, kw, state, x):
    m = create_model(arch, **SHAPE, **kw)
    m.load_state_dict(state, strict=True)
    with torch.no_grad():
        return m.eval()(x)


def random_perms(layout, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(layout.layers[i].rows, generator=g) for i in chain(layout)[:-1]]


def distance(a, b, layout):
    return sum((a[s.key].float() - b[s.key].float()).square().sum().item()
               for layer in layout.layers for s in layer.segments)


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_apply_permutation_preserves_the_function(arch, kw):
    m = net(arch, kw, 0)
    layout = build_layout(m, X)
    state = m.state_dict()
    permuted = apply_permutation(state, random_perms(layout, 1), layout)
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(outputs(arch, kw, permuted, x), m(x).detach(), atol=1e-5)
    assert set(permuted) == set(state)
    for k in layout.passthrough:
        assert torch.equal(permuted[k], state[k])


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_aligning_a_permuted_copy_recovers_the_original(arch, kw):
    m = net(arch, kw, 0)
    layout = build_layout(m, X)
    state = m.state_dict()
    permuted = apply_permutation(state, random_perms(layout, 2), layout)
    aligned = align_to(permuted, state, layout)
    assert set(aligned) == set(state)
    for k in state:
        assert torch.equal(aligned[k], state[k]), k
    assert all(torch.equal(p, torch.arange(len(p))) for p in permutation_to(state, state, layout))


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_aligning_another_network_keeps_its_function_and_nears_the_reference(arch, kw):
    ref, other = net(arch, kw, 0), net(arch, kw, 1)
    layout = build_layout(ref, X)
    aligned = align_to(other.state_dict(), ref.state_dict(), layout)
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(outputs(arch, kw, aligned, x), other(x).detach(), atol=1e-5)
    before = distance(other.state_dict(), ref.state_dict(), layout)
    after = distance(aligned, ref.state_dict(), layout)
    assert after < before


def test_modes():
    ref, other = net("convnet", {"width": 4}, 0), net("convnet", {"width": 4}, 1)
    layout = build_layout(ref, X)
    states = [other.state_dict(), ref.state_dict()]
    assert all(a is b for a, b in zip(align_states(states, ref.state_dict(), layout, "none"), states, strict=True))
    aligned = align_states(states, ref.state_dict(), layout, "permutation")
    for k, v in ref.state_dict().items():  # the reference aligned to itself is itself
        assert torch.equal(aligned[1][k], v)
    with pytest.raises(ConfigError, match="permutation"):
        align_states(states, ref.state_dict(), layout, "sinkhorn")


class Concat(nn.Module):
    """Dense skip: the classifier reads both hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 16), nn.Linear(16, 8), nn.Linear(24, 10)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.c(torch.cat([h, self.b(h)], dim=1))


@pytest.mark.parametrize("model,match", [
    (Concat(), "layer c takes 24 inputs but the layer before it .* has 8 outputs"),
    (nn.Sequential(nn.Flatten(), nn.LayerNorm(64), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)),
     "layer 1 .* is not a conv/linear layer"),
    (create_model("resnet18", **SHAPE, width=4, stem="cifar"), "sequential student"),
])
def test_a_non_chain_student_is_rejected(model, match):
    layout = build_layout(model, X)
    with pytest.raises(ConfigError, match=match):
        chain(layout)
    with pytest.raises(ConfigError, match="meta.align=permutation"):
        align_to(model.state_dict(), model.state_dict(), layout)
