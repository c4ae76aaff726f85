"""Model soups (docs/soups.md): the properties that fail if the code is wrong.

    (a) greedy soup   offers follow val accuracy; an ingredient is kept iff the soup's val
                      accuracy with it does not drop (checked by recomputing every offer);
                      a harmful ingredient (a permuted copy of the best, as accurate as it;
                      a flipped classifier) is rejected, a harmless one kept; soup >= best
    (b) learned soup  every layer's coefficients get a gradient; they move from uniform and
                      drop the harmful ingredient; val NLL at or below the uniform soup's;
                      deterministic
    (c) uniform soup  the hand-computed mean of every parameter; counters: the first's
    (d) bad input     other widths, other keys, other parents: one CheckpointError naming
                      what differs, before any data is read
    (e) BatchNorm     statistics recomputed (not the average of the ingredients'), exactly
                      what models.batchnorm.recompute_bn gives the averaged weights

Tiny BN convnets on scikit-learn's digits (8x8), fine-tuned children of one parent.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble.errors import CheckpointError
from metaensemble.methods.soups import (
    average,
    bake,
    best_member,
    greedy_soup,
    learned_soup,
    score,
    uniform_soup,
)
from metaensemble.methods.soups.learned import layer_groups, mix, soup_logits
from metaensemble.models import create_model
from metaensemble.models.batchnorm import recompute_bn


def _net(width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=width)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [{"x": x[i:i + size], "y": y[i:i + size]} for i in range(0, len(y), size)]


def _train(net: nn.Module, batches: list[dict], epochs: int, lr: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        for i in torch.randperm(len(batches), generator=g).tolist():
            loss = F.cross_entropy(net(batches[i]["x"]), batches[i]["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"train": _batches(x[:1200], y[:1200], 50), "bn": _batches(x[:1200], y[:1200], 400),
            "val": _batches(x[1200:1500], y[1200:1500], 150)}


@pytest.fixture(scope="module")
def children(digits):
    """A parent trained from scratch briefly, and three children fine-tuned from it
    (other data orders and learning rates): the regime soups are made for."""
    parent = _train(_net(), digits["train"], epochs=3, lr=0.01, seed=0)
    kids = [_train(copy.deepcopy(parent), digits["train"], 2, lr, seed) for seed, lr in
            [(1, 3e-3), (2, 5e-3), (3, 2e-3)]]
    return [{k: v.clone() for k, v in c.state_dict().items()} for c in kids]


def _val(state, digits):
    return score(bake(_net(), state, digits["bn"]), digits["val"])


def _permuted(state: dict, seed: int = 0) -> dict:
    """The same function with the first block's channels permuted (conv, BN, next conv's inputs)."""
    p = torch.randperm(state["0.weight"].shape[0], generator=torch.Generator().manual_seed(seed))
    out = {k: v.clone() for k, v in state.items()}
    for k in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        out[k] = state[k][p]
    out["4.weight"] = state["4.weight"][:, p]
    return out


def _flipped(state: dict) -> dict:
    """The classifier's logits negated and scaled: averaged in, it turns the soup's votes around."""
    out = {k: v.clone() for k, v in state.items()}
    out["13.weight"], out["13.bias"] = -10 * state["13.weight"], -10 * state["13.bias"]
    return out


class Unreadable:
    """A loader that fails when read: the checks must come before any work."""

    def __iter__(self):
        raise AssertionError("data was read before the ingredients were checked")


# ---- (a) greedy soup -----------------------------------------------------------------------
def _hand_average(states: list[dict]) -> dict:
    return {k: (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v)
            for k, v in states[0].items()}


def test_greedy_soup_keeps_an_ingredient_iff_val_accuracy_does_not_drop(children, digits):
    accs = [_val(s, digits).correct for s in children]
    best = max(range(3), key=lambda i: accs[i])
    harmful = _permuted(children[best])  # as accurate as the best on its own: offered right after it
    assert _val(harmful, digits).correct == accs[best]
    states = [*children, harmful, _flipped(children[0]), copy.deepcopy(children[best])]
    soup = greedy_soup(states, _net(), digits["bn"], digits["val"])
    assert [o.index for o in soup.offers][:2] == [best, 3]
    members = [best]
    current = _val(children[best], digits).correct
    for o in soup.offers[1:]:  # recompute every offer independently
        with_it = _val(_hand_average([states[j] for j in [*members, o.index]]), digits).correct
        assert o.score.correct == with_it
        assert o.accepted == (with_it >= current), (o, current)
        if o.accepted:
            members, current = [*members, o.index], with_it
    assert soup.members == members
    assert {3, 4}.isdisjoint(soup.members), "a harmful ingredient was kept"
    assert 5 in soup.members, "an exact copy of the best (no drop: >=) was rejected"
    assert soup.val.correct == current >= max(accs)
    assert score(soup.model, digits["val"]) == soup.val


def test_best_member_is_the_most_accurate_ingredient(children, digits):
    states = [_flipped(children[0]), *children]
    accs = [_val(s, digits).correct for s in states]
    out = best_member(states, _net(), digits["bn"], digits["val"])
    assert out.members == [accs.index(max(accs))] and out.val.correct == max(accs)


# ---- (b) learned soup ---------------------------------------------------------------------
def test_every_layers_coefficients_get_a_gradient(children, digits):
    skeleton = _net()
    groups = layer_groups(skeleton)
    assert [g for g, _ in groups] == ["0", "1", "4", "5", "8", "9", "13"]
    stacked = {n: torch.stack([s[n] for s in children]) for _, names in groups for n in names}
    buffers = {k: v for k, v in average(children).items() if k not in stacked}
    logits = torch.zeros(len(groups), len(children), requires_grad=True)
    batch = digits["val"][0]
    F.cross_entropy(soup_logits(skeleton.train(), mix(stacked, groups, logits), buffers, batch["x"]),
                    batch["y"]).backward()
    assert (logits.grad.abs().sum(1) > 0).all(), logits.grad
    assert torch.equal(buffers["1.running_mean"], average(children)["1.running_mean"]), "BN stats changed in place"


def test_learned_soup_moves_from_uniform_and_beats_it_on_val(children, digits):
    states = [*children, _flipped(children[0])]
    uniform = uniform_soup(states, _net(), digits["bn"], digits["val"])
    learned = learned_soup(states, _net(), digits["bn"], digits["val"], epochs=10, lr=0.05)
    coef = torch.tensor(learned.coefficients["13"])
    assert coef.sum().item() == pytest.approx(1.0)
    assert coef.argmin().item() == 3 and coef[3] < 0.25 - 0.05, coef  # the flipped classifier gets less
    assert learned.val.nll <= uniform.val.nll
    assert learned.val.correct >= uniform.val.correct
    plain = learned_soup(children, _net(), digits["bn"], digits["val"], epochs=10, lr=0.05)
    assert plain.val.nll <= uniform_soup(children, _net(), digits["bn"], digits["val"]).val.nll
    again = learned_soup(states, _net(), digits["bn"], digits["val"], epochs=10, lr=0.05)
    assert again.coefficients == learned.coefficients
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                 learned.model.state_dict().values(), strict=True))


def test_learned_soup_mixes_each_layer_convexly(children, digits):
    learned = learned_soup(children, _net(), digits["bn"], digits["val"], epochs=2)
    st = learned.model.state_dict()
    for k, names in layer_groups(_net()):
        w = torch.tensor(learned.coefficients[k])
        for n in names:
            assert torch.allclose(st[n], torch.tensordot(w, torch.stack([s[n] for s in children]), dims=1), atol=1e-6)


# ---- (c) uniform soup, (e) BatchNorm --------------------------------------------------------
def test_uniform_soup_is_the_mean_of_the_parameters(children, digits):
    soup = uniform_soup(children, _net(), digits["bn"], digits["val"])
    st = soup.model.state_dict()
    for name, _ in _net().named_parameters():
        hand = sum(s[name] for s in children) / len(children)
        assert torch.allclose(st[name], hand, atol=1e-7), name
    assert st["1.num_batches_tracked"] == children[0]["1.num_batches_tracked"]
    assert soup.members == [0, 1, 2] and not soup.model.training


def test_uniform_soup_recomputes_batchnorm_statistics(children, digits):
    soup = uniform_soup(children, _net(), digits["bn"], digits["val"])
    st = soup.model.state_dict()
    plain = torch.stack([s["1.running_mean"] for s in children]).mean(0)
    assert not torch.allclose(st["1.running_mean"], plain, atol=1e-3)
    ref = _net()
    ref.load_state_dict(_hand_average(children))
    recompute_bn(ref, digits["bn"])
    for k in ("1.running_mean", "1.running_var", "5.running_mean", "9.running_var"):
        assert torch.allclose(st[k], ref.state_dict()[k], atol=1e-6), k
    x = torch.cat([b["x"] for b in digits["bn"]])
    assert torch.allclose(st["1.running_mean"], ref[0](x).mean((0, 2, 3)), atol=1e-5)


# ---- (d) bad input ------------------------------------------------------------------------
SOUPS = [uniform_soup, greedy_soup, learned_soup, best_member]


@pytest.mark.parametrize("make", SOUPS, ids=lambda f: f.__name__)
def test_other_widths_are_one_clear_error_before_any_work(make, children):
    wide = _net(width=16).state_dict()
    with pytest.raises(CheckpointError) as e:
        make([children[0], wide], _net(), Unreadable(), Unreadable())
    msg = str(e.value)
    assert "ingredient 1" in msg and "0.weight (16, 1, 3, 3) vs (8, 1, 3, 3)" in msg
    assert "ingredient 0" not in msg and "same widths" in msg


def test_other_architecture_names_missing_and_unexpected_tensors(children):
    mlp = create_model("mlp", num_classes=10, in_chans=1, img_size=8, hidden=(8,)).state_dict()
    with pytest.raises(CheckpointError, match=r"ingredient 2: missing 18: 0\.weight, 1\.running_mean, .*"
                       r"unexpected 2: 3\.weight, 3\.bias, shape or dtype kind differs 1: 1\.weight \(8, 64\) vs \(8,\)"):
        uniform_soup([*children[:2], mlp], _net(), Unreadable(), Unreadable())


@pytest.mark.parametrize("make", SOUPS, ids=lambda f: f.__name__)
def test_different_parents_are_one_clear_error_before_any_work(make, children):
    with pytest.raises(CheckpointError) as e:
        make(children, _net(), Unreadable(), Unreadable(), parents=["run-a", "run-b", "run-a"])
    msg = str(e.value)
    assert "'run-a': ingredients 0, 2" in msg and "'run-b': ingredients 1" in msg and "one parent" in msg


def test_parents_unknown_for_some_ingredients_is_refused_and_one_parent_accepted(children, digits):
    with pytest.raises(CheckpointError, match="unknown: ingredients 2"):
        uniform_soup(children, _net(), Unreadable(), Unreadable(), parents=[7, 7, None])
    soup = uniform_soup(children, _net(), digits["bn"], digits["val"], parents=[7, 7, 7])
    assert soup.members == [0, 1, 2]
    # no parent known for any (a random-init zoo): only the architecture checks apply
    assert uniform_soup(children, _net(), digits["bn"], digits["val"], parents=[None] * 3).members == [0, 1, 2]


class Indexed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("order", torch.arange(3))

    def forward(self, x):
        return self.fc(x[:, self.order])


def test_no_ingredients_and_unequal_index_buffers_are_refused(children):
    with pytest.raises(CheckpointError, match="at least one ingredient"):
        greedy_soup([], _net(), Unreadable(), Unreadable())
    a, b = Indexed().state_dict(), Indexed().state_dict()
    b["order"] = torch.tensor([2, 1, 0])
    with pytest.raises(CheckpointError, match=r"integer tensors differ .*order \(ingredient 1\)"):
        uniform_soup([a, b], Indexed(), Unreadable(), Unreadable())
    odd = {k: v.clone() for k, v in children[1].items()}
    odd["1.num_batches_tracked"] += 5  # a counter may differ: the first's is kept
    assert average([children[0], odd])["1.num_batches_tracked"] == children[0]["1.num_batches_tracked"]
