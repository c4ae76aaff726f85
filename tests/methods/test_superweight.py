"""SuperWeight ensembles without Ray: the method's testable properties 1-9
(docs/superweight.md), the budget loop, the initialisation and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from metaensemble.data import DatasetInfo
from metaensemble.errors import ConfigError
from metaensemble.methods.superweight import sharing as sh
from metaensemble.methods.superweight.method import SuperWeight, clone_values
from metaensemble.methods.superweight.model import (
    depth_bins,
    member_network,
    slice_sizes,
    superweight,
    tier_boxes,
    wrn_convs,
)
from metaensemble.validation import load_config

MEMBERS = [(16, 1.0), (16, 0.5), (10, 1.0)]
INFO = DatasetInfo(name="digits", num_classes=10, in_chans=1, img_size=8, mean=(0.5,), std=(0.25,), family="digits")


def _cfg(*overrides: str):
    return load_config("configs/superweight/digits.yaml", [
        "superweight.depths=[16,16,10]", "superweight.widths=[1.0,0.5,1.0]", "train.epochs=6",
        "superweight.split_epochs=2", "superweight.unshare_epochs=2", "optim.decay_milestones=[2]", *overrides])


def _grads(model, seed: int = 0) -> dict[int, list[torch.Tensor]]:
    """Per member of ``model``: random 'weight gradients' of its convs' shapes."""
    g = torch.Generator().manual_seed(seed)
    return {m: [torch.randn(c.cout, c.cin, c.k, c.k, generator=g) for c in mem.convs]
            for m, mem in enumerate(model.members)}


def _split_method(*overrides: str, seed: int = 0, grads=None) -> tuple[SuperWeight, torch.nn.Module]:
    """A method taken through its search phase with recorded gradients (``grads(search
    model)``, else random ones) and split."""
    torch.manual_seed(0)
    method = SuperWeight(_cfg(*overrides))
    method.validate()
    search = method.build_model(INFO)
    rec = sh.Recorder(weights=True)
    for j, gs in (grads or (lambda m: _grads(m, seed)))(search).items():
        for i, g in enumerate(gs):
            rec.grads[(j, i)] = g
    method.recorder = rec
    torch.manual_seed(1)
    return method, method.rebuild(search, method.cfg.superweight.split_epochs)


# ---- 2. initial bins --------------------------------------------------------------------
def test_initial_bins_are_7_6_6_6_for_wrn28_and_4_3_3_3_for_wrn16_with_1x1_apart():
    for depth, sizes in ((28, [7, 6, 6, 6]), (16, [4, 3, 3, 3])):
        convs = wrn_convs(depth, 4, 3)
        bins = depth_bins(convs, 4)
        assert [sum(b == k for b in bins) for k in range(4)] == sizes
        three = [b for c, b in zip(convs, bins, strict=True) if c.k == 3]
        assert three == sorted(three), "bins are contiguous in layer order"
        assert all(b == 4 for c, b in zip(convs, bins, strict=True) if c.k == 1), "1x1 convs in their own bin"
    with pytest.raises(ConfigError, match="only 7 3x3 convs"):
        depth_bins(wrn_convs(10, 1, 3), 8)


# ---- 3, 4. banks, tiers, composition -------------------------------------------------------
def test_banks_hold_k_templates_of_their_tier_slice_and_every_weight_has_its_convs_shape():
    torch.manual_seed(0)
    model = superweight(10, 1, 8, members=MEMBERS, templates=3)
    for g, lay in model.layout.items():
        for t, size in enumerate(lay["sizes"]):
            assert model.bank(g, t).shape == (3, size)
        boxes = lay["boxes"]
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(boxes)), "boxes nest"
    for m, mem in enumerate(model.members):
        for i, c in enumerate(mem.convs):
            assert model.compose(m, i).shape == (c.cout, c.cin, c.k, c.k)
    assert tier_boxes([(32, 16), (16, 16), (32, 32)]) == [(16, 16), (32, 16), (32, 32)]
    assert slice_sizes([(16, 16), (32, 16), (32, 32)], 3) == [16 * 16 * 9, 16 * 16 * 9, 32 * 16 * 9]


def test_a_tier_piece_is_the_coefficient_weighted_sum_of_its_bank_recomputed_by_hand():
    torch.manual_seed(0)
    model = superweight(10, 1, 8, members=MEMBERS, templates=3)
    # a conv of the widest member that needs more than one tier
    m, i = next((m, i) for m in range(3) for i in range(len(model.members[m].convs)) if model.sites[m][i][2] >= 1)
    g, s, t, gain = model.sites[m][i]
    c = model.members[m].convs[i]
    boxes, k = model.layout[g]["boxes"], model.layout[g]["k"]
    alpha = model.coefs[s].detach()
    pieces = []
    for j in range(t + 1):
        a = alpha[j] * model.coef_scale[(g, j)]
        pieces.append(sum(a[q] * model.bank(g, j).detach()[q] for q in range(3)))
    full = torch.zeros(boxes[t][0], boxes[t][1], k, k)
    full[: boxes[0][0], : boxes[0][1]] = pieces[0].view(boxes[0][0], boxes[0][1], k, k)
    for j in range(1, t + 1):
        (oa, ia), (ob, ib) = boxes[j - 1], boxes[j]
        n = oa * (ib - ia) * k * k
        full[:oa, ia:ib] = pieces[j][:n].view(oa, ib - ia, k, k)
        full[oa:ob, :ib] = pieces[j][n:].view(ob - oa, ib, k, k)
    assert torch.allclose(model.compose(m, i).detach(), gain * full[: c.cout, : c.cin], atol=1e-6)


def test_every_assembled_weight_starts_at_hes_std_for_its_own_fan_in():
    torch.manual_seed(0)
    model = superweight(10, 3, 32, members=[(16, 4.0), (16, 2.0)], templates=8)
    for m, mem in enumerate(model.members):
        for i, c in enumerate(mem.convs):
            w = model.compose(m, i).detach()
            if w.numel() < 4000:
                continue  # too few elements for a tight std
            assert w.std().item() == pytest.approx(math.sqrt(2.0 / c.fan_in), rel=0.15), c.key


def test_a_member_is_a_plain_wrn_with_its_weights_assembled():
    torch.manual_seed(0)
    model = superweight(10, 1, 8, members=MEMBERS, templates=2).eval()
    x = torch.randn(5, 1, 8, 8)
    for m in range(3):
        net = member_network(model, m)
        assert net.me_spec["arch"] == "wrn"
        assert torch.allclose(net(x), model.forward_member(x, m), atol=1e-5)


# ---- 1, 6. the budget, one tensor per bank, summed gradients ---------------------------------
def test_banks_fit_the_budget_are_one_tensor_each_and_counted_once():
    method, model = _split_method()
    sw = method.cfg.superweight
    assert model.bank_elements() <= sw.max_params
    assert 1 <= model.templates <= 8 and model.templates == method.templates
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # each tensor once
    assert counts["total"] < sum(p.numel() for m in range(3) for p in member_network(model, m).parameters())
    # a shared bank is one Parameter: each member's own loss alone reaches that tensor
    x = torch.randn(4, 1, 8, 8)
    reached = {}
    for m in range(3):
        model.zero_grad()
        model.forward_member(x, m).sum().backward()
        for b, p in enumerate(model.banks):
            if p.grad is not None and p.grad.abs().sum() > 0:
                reached.setdefault(b, set()).add(m)
    assert len(reached) == len(model.banks), "every bank is used"
    assert any(ms >= {0, 2} for ms in reached.values()), "WRN-16 and WRN-10 members share a bank"
    assert any(ms >= {0, 1} for ms in reached.values()), "the two widths of WRN-16 share a bank"


def test_one_backward_of_the_summed_losses_gives_each_bank_the_sum_of_the_members_gradients():
    torch.manual_seed(0)
    model = superweight(10, 1, 8, members=MEMBERS, templates=2).train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    per = []
    for m in range(3):
        model.zero_grad()
        F.cross_entropy(model.forward_member(x, m), y).backward()
        per.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.banks])
    model.zero_grad()
    logits = model(x)
    sum(F.cross_entropy(logits[m], y) for m in range(3)).backward()
    for b, p in enumerate(model.banks):
        assert torch.allclose(p.grad, per[0][b] + per[1][b] + per[2][b], atol=1e-5, rtol=1e-4)


# ---- 5. coefficient sharing ----------------------------------------------------------------
def test_a_narrow_layer_is_the_wide_layers_top_left_block_times_a_fixed_gain():
    _, model = _split_method()
    wide, narrow = model.members[0], model.members[1]  # WRN-16-1 and WRN-16-0.5 share slots by name
    checked, gains = 0, set()
    for i, c in enumerate(narrow.convs):
        j = next((j for j, d in enumerate(wide.convs) if d.key == c.key), None)
        if j is None or model.sites[1][i][1] != model.sites[0][j][1]:
            continue
        gain = math.sqrt(wide.convs[j].fan_in / c.fan_in)  # sqrt(fan_ref / fan_in) of each, fan_ref cancels
        a, b = model.compose(0, j).detach(), model.compose(1, i).detach()
        assert torch.allclose(b, gain * a[: c.cout, : c.cin], atol=1e-6), c.key
        checked += 1
        gains.add(round(gain, 6))
    assert checked >= len(narrow.convs) - 1
    assert gains > {1.0}, "a narrower fan-in scales the block up: it is not the bare block"


# ---- 8. the split --------------------------------------------------------------------------
def test_components_are_transitive_and_independent_of_the_order_layers_are_visited():
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(16, 16, 3, 3, generator=g) for _ in range(7)]
    grads[3] = grads[0] + torch.randn(16, 16, 3, 3, generator=g)  # cosine(0, 3) about 0.71
    grads[5] = grads[3] + torch.randn(16, 16, 3, 3, generator=g)  # cosine(3, 5) about 0.82, (0, 5) about 0.58
    sim = sh.similarity(grads)
    t = 0.65
    assert sim[0, 5] < t < min(sim[0, 3], sim[3, 5]), "0 and 5 are linked only through 3"
    comps = sh.components(sim, t)
    assert [0, 3, 5] in comps and len(comps) == 5
    for perm in ([6, 5, 4, 3, 2, 1, 0], [2, 0, 6, 3, 1, 5, 4]):
        p = torch.tensor(perm)
        permuted = sh.components(sim[p][:, p], t)
        assert sorted(sorted(perm[i] for i in c) for c in permuted) == sorted(comps)


def test_union_find_joins_a_v_shaped_graph_in_every_order_of_its_edges():
    # 0-2 and 1-2 similar, 0-1 not: one component however the edges come
    for edges in itertools.permutations([(0, 2), (1, 2)]):
        for flips in itertools.product((False, True), repeat=2):
            order = [(b, a) if f else (a, b) for (a, b), f in zip(edges, flips, strict=True)]
            assert sh.union_find(3, order) == [[0, 1, 2]], order
    sim = torch.tensor([[1.0, -0.2, 0.8], [-0.2, 1.0, 0.7], [0.8, 0.7, 1.0]], dtype=torch.float64)
    for perm in itertools.permutations(range(3)):  # every labelling: every visiting order
        p = torch.tensor(perm)
        assert sh.components(sim[p][:, p], 0.5) == [[0, 1, 2]], perm
    assert sh.components(sim, 0.75) == [[0, 2], [1]]


def test_the_gradient_cosine_of_nested_blocks_differing_in_input_channels_is_the_hand_value():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 2, 1, 1)  # 2 in, 2 out
    b = torch.tensor([[1.0, 0.0, 9.0], [0.0, 1.0, 9.0]]).view(2, 3, 1, 1)  # 3 in: its third column is not shared
    # common block b[:, :2] = identity: a . I = 1 + 4 = 5, |a| = sqrt(30), |I| = sqrt(2)
    assert sh.cosine_common(a, b) == pytest.approx(5 / math.sqrt(60), abs=1e-12)
    assert sh.cosine_common(b, a) == pytest.approx(5 / math.sqrt(60), abs=1e-12)
    k3 = torch.arange(1.0, 1 + 2 * 3 * 9).view(2, 3, 3, 3)
    assert sh.cosine_common(k3[:, :2], k3) == pytest.approx(1.0, abs=1e-12), "a block of itself"


def test_the_search_phase_has_one_coefficient_vector_per_group_and_tier():
    method = SuperWeight(_cfg())
    model = method.build_model(INFO)
    groups = {g for row in model.sharing["groups"] for g in row}
    assert len(model.coefs) == len(groups), "one slot per group"
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for m, mem in enumerate(model.members):
        for i, c in enumerate(mem.convs):
            g, s, _, _ = model.sites[m][i]
            assert s == model.slot_group.index(g)
            by_shape.setdefault((g, c.cout, c.cin, c.k), []).append(model.compose(m, i).detach())
    shared = [ws for ws in by_shape.values() if len(ws) > 1]
    assert len(shared) >= 4, "several layers of one shape in one bin, across both members"
    for ws in shared:
        assert all(torch.equal(w, ws[0]) for w in ws[1:])


def test_the_split_refines_the_bins_is_deterministic_and_lowers_its_threshold_until_the_budget_fits():
    method, model = _split_method()
    first = method.sharing
    again, _ = _split_method()
    assert again.sharing == first, "the same gradients give the same sharing map"
    sw = method.cfg.superweight
    bins = [depth_bins(wrn_convs(d, w, 1), sw.param_group_bins) for d, w in sw.members]
    for gs, bs in zip(first["groups"], bins, strict=True):
        for g in set(gs):
            assert len({b for x, b in zip(gs, bs, strict=True) if x == g}) == 1, "a group lies in one bin"
    # gradients alike within each half of every bin: the accepted split refines the bins
    sw_model = SuperWeight(method.cfg).build_model(INFO)
    g = torch.Generator().manual_seed(0)
    grads = {}
    for j, mem in enumerate(sw_model.members):
        bins_j = depth_bins(mem.convs, sw.param_group_bins)
        base = {}
        out = []
        for i, (c, b) in enumerate(zip(mem.convs, bins_j, strict=True)):
            half = [x for x, bb in enumerate(bins_j) if bb == b].index(i) % 2
            base.setdefault((b, half), torch.randn(64, 64, 3, 3, generator=g))
            out.append(base[(b, half)][: c.cout, : c.cin, : c.k, : c.k] + 0.1 * torch.randn(
                c.cout, c.cin, c.k, c.k, generator=g))
        grads[j] = out
    searched = sh.search_members(sw.members)
    found = sh.learn_sharing(sw.members, 1, {searched[j]: v for j, v in grads.items()}, bins=sw.param_group_bins,
                             max_params=400_000, templates=8, min_templates=2, start=0.5, step=0.05, floor=-1.0)
    groups0 = found.sharing["groups"][0]
    assert found.threshold == 0.5 and len(set(groups0)) > len(set(bins[0])), "a split beyond the bins"
    for gs, bs in zip(found.sharing["groups"], bins, strict=True):
        for grp in set(gs):
            assert len({b for x, b in zip(gs, bs, strict=True) if x == grp}) == 1, "a group lies in one bin"
    tried = method.split["tried"]
    assert tried[0][0] == sw.split_threshold and tried[-1][2] >= sw.min_templates
    assert all(k < sw.min_templates for _, _, k in tried[:-1])
    # a budget that only fits the bins: the loop goes down to the floor, then keeps the bins
    tight, _ = _split_method("superweight.max_params=137728", "superweight.split_floor=0.05")
    assert tight.split["threshold"] is None and tight.split["groups"] == sw.param_group_bins + 1


def _joined_grads(model) -> tuple[dict[int, list[torch.Tensor]], dict[int, int]]:
    """Random gradients for the search members, except that every conv of the second
    (another depth) copies, on their common block, the gradient of the last conv of its
    bin and kernel size in the first; and which conv that is."""
    grads = _grads(model)
    ref, other = model.members
    bins_ref, bins_other = depth_bins(ref.convs, 4), depth_bins(other.convs, 4)
    target = {}
    for i, (c, b) in enumerate(zip(other.convs, bins_other, strict=True)):
        j = max(j for j, (d, bb) in enumerate(zip(ref.convs, bins_ref, strict=True)) if bb == b and d.k == c.k)
        o, n = min(c.cout, ref.convs[j].cout), min(c.cin, ref.convs[j].cin)
        grads[1][i][:o, :n] = 2 * grads[0][j][:o, :n]
        target[i] = j
    return grads, target


def test_another_depth_shares_the_coefficients_of_its_most_similar_layer_of_the_largest_member():
    ref = [torch.randn(4, 4, 3, 3) for _ in range(3)]
    other = [ref[2] + 0.01 * torch.randn(4, 4, 3, 3), ref[0].clone()]
    assert sh.nearest(ref, [0, 0, 0], other, [0, 0]) == [2, 0]
    assert sh.nearest(ref, [0, 1, 1], other, [1, 0]) == [2, 0]
    # through the method: WRN-10-1's convs join WRN-16-1's, across depths
    grads, target = None, None

    def record(model):
        nonlocal grads, target
        grads, target = _joined_grads(model)
        return grads

    method, model = _split_method(grads=record)
    slots, groups = model.sharing["slots"], model.sharing["groups"]
    wide, deep10 = model.members[0].convs, model.members[2].convs
    for i, j in target.items():
        assert slots[2][i] == slots[0][j] and groups[2][i] == groups[0][j], deep10[i].key
    assert len({slots[2][i] for i in target}) < len(target), "several convs may join one"
    same = [(i, j) for i, j in target.items() if (deep10[i].cout, deep10[i].cin) == (wide[j].cout, wide[j].cin)]
    assert same and all(torch.equal(model.compose(2, i), model.compose(0, j)) for i, j in same)
    # the narrower WRN-16 still shares by conv name with the wider one
    keys0 = {c.key: slots[0][j] for j, c in enumerate(wide)}
    assert all(slots[1][i] == keys0[c.key] for i, c in enumerate(model.members[1].convs) if c.key in keys0)
    # and unsharing now parts convs of different depths too: a slot's users span depths
    users = {}
    for m, row in enumerate(slots):
        for s in row:
            users.setdefault(s, set()).add(model.member_specs[m][0])
    assert any(len(ds) > 1 for ds in users.values())


# ---- 7. unsharing --------------------------------------------------------------------------
def _unshare_epoch(method, model, threshold: float, x: torch.Tensor | None = None, optimizer=None):
    """The epoch before the unsharing point through the method (recorder attached by
    training_step; with ``optimizer``, a step after each batch), then the rebuild at
    that point with ``threshold``; with ``x``, also the eval-mode outputs on it just
    before the rebuild."""
    sw = method.cfg.superweight
    method.cfg = method.cfg.with_overrides({"superweight.unshare_threshold": threshold})
    method.epochs_done = sw.split_epochs + sw.unshare_epochs - 1
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        batch = {"x": torch.randn(16, 1, 8, 8, generator=g), "y": torch.randint(0, 10, (16,), generator=g)}
        if optimizer is not None:
            optimizer.zero_grad()
        method.training_step(model, batch)[0].backward()
        if optimizer is not None:
            optimizer.step()
    rec = method.recorder
    assert rec is not None and rec.coefs and not rec.weights
    # each conv's gradient covers the tiers it uses
    assert all(rec.grads[(m, i)].shape[0] == site[2] + 1 for m, row in enumerate(model.sites)
               for i, site in enumerate(row))
    before = None
    if x is not None:
        with torch.no_grad():
            before = model.eval()(x)
        model.train()
    rebuilt = method.rebuild(model, sw.split_epochs + sw.unshare_epochs)
    return rebuilt if x is None else (rebuilt, before)


def test_unsharing_follows_the_coefficient_gradients_recorded_in_training():
    method, model = _split_method()
    assert _unshare_epoch(method, model, -1.0) is None, "a threshold no cosine is at or below parts nothing"
    assert method.split["clones"] == 0 and method.phase == "unshared"


def test_unsharing_keeps_the_outputs_and_every_clone_is_its_own_trained_parameter():
    method, model = _split_method()
    x = torch.randn(6, 1, 8, 8)
    after, before = _unshare_epoch(method, model, 0.999, x)
    assert after is not None and method.split["clones"] > 0 and method.phase == "unshared"
    assert len(after.coefs) == len(model.coefs) + method.split["clones"]
    after.eval()
    assert torch.allclose(after(x), before, atol=1e-5)
    after.train()
    optimizer, _ = method.configure_optimizer(after, 10)
    in_optimizer = [p for grp in optimizer.param_groups for p in grp["params"]]
    assert {id(p) for p in after.coefs} <= {id(p) for p in in_optimizer}
    assert len({id(p) for p in in_optimizer}) == len(in_optimizer) == len(list(after.parameters()))
    coef_groups = [grp for grp in optimizer.param_groups if any(p is after.coefs[0] for p in grp["params"])]
    assert coef_groups[0]["weight_decay"] == 0.0, "no weight decay on coefficients"
    after(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in after.coefs)


def _step(method, model, optimizer, seed: int = 11) -> None:
    g = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(16, 1, 8, 8, generator=g), "y": torch.randint(0, 10, (16,), generator=g)}
    optimizer.zero_grad()
    method.training_step(model, batch)[0].backward()
    optimizer.step()


def test_after_one_step_an_unshared_clone_and_its_source_differ_and_no_coefficients_share_storage():
    method, model = _split_method()
    after = _unshare_epoch(method, model, 0.999)
    clones = {s: model.sharing["slots"][m][i] for m, row in enumerate(after.sharing["slots"])
              for i, s in enumerate(row) if s >= len(model.coefs)}  # clone -> its source slot
    assert clones
    storages = [p.untyped_storage().data_ptr() for p in [*after.coefs, *model.coefs]]
    assert len(set(storages)) == len(storages), "every coefficient tensor its own storage"

    def common(c: int, src: int) -> tuple[torch.Tensor, torch.Tensor]:  # the tiers both hold
        n = min(after.coefs[c].shape[0], after.coefs[src].shape[0])
        return after.coefs[c][:n], after.coefs[src][:n]

    assert all(torch.equal(*common(c, src)) for c, src in clones.items()), "a clone starts as its source"
    optimizer, _ = method.configure_optimizer(after, 10)
    _step(method, after, optimizer)
    for c, src in clones.items():
        assert not torch.equal(*common(c, src)), f"clone {c} of slot {src} moved with it"


def test_unsharing_keeps_the_optimiser_state_of_every_parameter_that_persists():
    from metaensemble.engine.optim import carry_state

    method, model = _split_method()
    opt, _ = method.configure_optimizer(model, 10)
    after = _unshare_epoch(method, model, 0.999, optimizer=opt)
    new_opt, _ = method.configure_optimizer(after, 10)
    carried = method.carried_parameters(model, after)
    n_clones = len(after.coefs) - len(model.coefs)
    assert carry_state(opt, new_opt, carried) == len(list(after.parameters())) - n_clones
    olds = dict(model.named_parameters())
    for k, p in after.named_parameters():
        if k.startswith("coefs.") and int(k.split(".")[1]) >= len(model.coefs):
            assert not new_opt.state.get(p), f"{k}: a clone starts with no state, as the original's"
            continue
        old = opt.state[olds[k]]["momentum_buffer"]
        assert torch.equal(new_opt.state[p]["momentum_buffer"], old[: p.shape[0]]), k
    # the same step on both: banks and the members' own parameters move alike (their
    # gradients do not change with unsharing; a fresh momentum would move them otherwise)
    _step(method, model, opt)
    _step(method, after, new_opt)
    for k, p in after.named_parameters():
        if not k.startswith("coefs."):
            assert torch.allclose(p, olds[k], atol=1e-6, rtol=1e-5), k
    # the split rebuilds every member from scratch: nothing carries
    split, rebuilt = _split_method()
    assert split.phase == "shared" and split.carried_parameters(rebuilt, rebuilt) == {}


def test_clone_values_copies_the_source_slot_into_each_clone():
    _, old = _split_method()
    slots = [list(r) for r in old.sharing["slots"]]
    i = len(slots[1]) - 1
    src = slots[1][i]
    slots[1][i] = len(old.coefs)  # member 1's last conv parts from member 0's
    new = superweight(10, 1, 8, members=MEMBERS, sharing={"groups": old.sharing["groups"], "slots": slots},
                      templates=old.templates)
    clone_values(old, new, {len(old.coefs): src})
    assert torch.equal(new.coefs[len(old.coefs)], old.coefs[src][: new.coefs[len(old.coefs)].shape[0]])
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(old.eval()(x), new.eval()(x), atol=1e-6)


# ---- 9. save, load, resume -------------------------------------------------------------------
def test_a_saved_ensemble_and_a_resumed_method_rebuild_the_same_sharing_map_and_outputs(tmp_path):
    from metaensemble.models import load, save_model

    method, model = _split_method()
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    save_model(model, tmp_path / "sw", dataset="digits")
    loaded = load(tmp_path / "sw").eval()
    assert loaded.sharing == model.sharing and loaded.templates == model.templates
    assert torch.equal(loaded(x), model(x))
    # what the engine does on resume: load_state_dict, then build_model, then the weights
    resumed = SuperWeight(method.cfg)
    resumed.load_state_dict(method.state_dict())
    rebuilt = resumed.build_model(INFO)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.sharing == model.sharing and resumed.phase == "shared"
    assert torch.equal(rebuilt.eval()(x), model(x))
    # and after unsharing: more slots, the same map and outputs on resume
    model.train()
    unshared = _unshare_epoch(method, model, 0.999).eval()
    again = SuperWeight(method.cfg)
    again.load_state_dict(method.state_dict())
    net = again.build_model(INFO)
    net.load_state_dict(unshared.state_dict())
    assert again.phase == "unshared" and net.sharing == unshared.sharing != model.sharing
    assert torch.equal(net.eval()(x), unshared(x))


# ---- the method's loss, predictions, recorder --------------------------------------------------
def test_the_loss_is_the_sum_of_member_cross_entropies_and_predictions_are_named():
    torch.manual_seed(0)
    method = SuperWeight(_cfg("superweight.split_epochs=0", "superweight.unshare_epochs=0"))
    model = method.build_model(INFO)
    assert len(model.members) == 3, "no search phase: every member from the start"
    assert model.sharing["slots"][0] != model.sharing["groups"][0], "one coefficient slot per conv, not per bin"
    assert not torch.equal(model.compose(0, 2), model.compose(0, 4)), "two convs of one bin are not one weight"
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss, logs = method.training_step(model, {"x": x, "y": y})
    logits = model(x)
    assert loss.item() == pytest.approx(sum(F.cross_entropy(logits[m], y).item() for m in range(3)), rel=1e-5)
    named, ys = method.predict(model, [{"x": x, "y": y}])
    assert list(named) == ["ensemble", "member/0", "member/1", "member/2"] and torch.equal(ys, y)
    assert torch.allclose(named["ensemble"].exp(), torch.stack([named[f"member/{m}"].exp() for m in range(3)]).mean(0),
                          atol=1e-6)


def test_the_schedule_runs_at_the_base_lr_in_the_search_and_restarts_after_the_split():
    method, model = _split_method("optim.warmup_epochs=0")  # 6 epochs: 2 search, then 4 with a decay after 2
    o = method.cfg.optim
    spe = 10
    search = SuperWeight(method.cfg)
    opt, sched = search.configure_optimizer(search.build_model(INFO), spe)
    for step in (0, 15):
        sched.set_step(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(o.lr)
    opt, sched = method.configure_optimizer(model, spe)
    lrs = {}
    for epoch in (2, 3, 4, 5):  # after the split: epochs 1-2 at lr, then x decay_rate
        sched.set_step(epoch * spe + 1)
        lrs[epoch] = opt.param_groups[0]["lr"]
    assert lrs[2] == lrs[3] == pytest.approx(o.lr)
    assert lrs[4] == lrs[5] == pytest.approx(o.lr * o.decay_rate)


def test_the_comparisons_train_the_post_split_epochs_on_the_same_schedule():
    from metaensemble.engine.optim import build_optimizer, build_scheduler
    from metaensemble.methods.superweight.experiment import member_configs
    from metaensemble.models import create_model

    method, model = _split_method("optim.schedule=cosine", "optim.warmup_epochs=1")
    ind = member_configs(method.cfg, "independent", 1.0)["independent/0"]
    assert ind.train.epochs == method.cfg.train.epochs - method.cfg.superweight.split_epochs
    assert ind.optim == method.cfg.optim and ind.data == method.cfg.data
    spe, split = 10, method.cfg.superweight.split_epochs
    opt, sched = method.configure_optimizer(model, spe)
    net = create_model(ind.model.name, num_classes=10, in_chans=1, img_size=8, **ind.model.kwargs)
    opt2 = build_optimizer(ind.optim, net)
    sched2 = build_scheduler(opt2, ind.optim, spe, ind.train.epochs)
    for step in range(0, ind.train.epochs * spe, 3):
        sched.set_step(split * spe + step)
        sched2.set_step(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(opt2.param_groups[0]["lr"]), step


def test_unsharing_compares_only_the_tiers_both_convs_read():
    sharing = {"groups": [[0], [0]], "slots": [[0], [0]]}
    agree = torch.tensor([[1.0, 2.0, -1.0]])
    # member 0 reads tiers 0-1, member 1 tier 0 only: a disagreement in tier 1 is not theirs to compare
    grads = {(0, 0): torch.cat([agree, torch.tensor([[5.0, -3.0, 1.0]])]), (1, 0): agree * 2}
    assert sh.unshare(sharing, grads, 0.9)[1] == {}
    # both read tiers 0-1 and disagree in tier 1: parted
    grads[(1, 0)] = torch.cat([agree, torch.tensor([[-5.0, 3.0, -1.0]])])
    new, clones = sh.unshare(sharing, grads, 0.9)
    assert clones == {1: 0} and new["slots"] == [[0], [1]]


def test_the_search_phase_records_weight_gradients_in_its_last_epoch_only():
    method = SuperWeight(_cfg())
    model = method.build_model(INFO)
    assert len(model.members) == 2, "search: the deepest-widest member and the first of the other depth"
    batch = {"x": torch.randn(4, 1, 8, 8), "y": torch.randint(0, 10, (4,))}
    method.training_step(model, batch)[0].backward()
    assert method.recorder is None, "epoch 1 of a 2-epoch search records nothing"
    assert method.rebuild(model, 1) is None, "epoch 1 of 2 search epochs: nothing to rebuild yet"
    for _ in range(2):
        method.training_step(model, batch)[0].backward()
    rec = method.recorder
    assert rec is not None and len(rec.grads) == sum(len(m.convs) for m in model.members)
    assert rec.grads[(0, 0)].shape == (16, 1, 3, 3)
    one = rec.grads[(0, 0)].clone()
    method.training_step(model, batch)[0].backward()
    assert not torch.equal(rec.grads[(0, 0)], one), "summed over every step of the epoch"


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["superweight.depths=[10,16]", "superweight.widths=[1.0,1.0]"], "decreasing order"),
    (["superweight.depths=[16,16,10]", "superweight.widths=[1.0,1.0,0.5]"], "strictly decreasing within one depth"),
    (["superweight.depths=[16,10]", "superweight.widths=[0.5,1.0]"], "deepest and widest"),
    (["superweight.depths=[16,10]", "superweight.widths=[1.0,0.01]"], "every stage a channel"),
    (["superweight.depths=[18,10]", "superweight.widths=[1.0,1.0]"], "6n \\+ 4"),
    (["superweight.depths=[16]", "superweight.widths=[1.0]"], "at least 2 members"),
    (["superweight.max_params=1000"], "too small for even one template per bank"),
    (["superweight.split_epochs=6"], "must be below train.epochs"),
    (["optim.decay_milestones=[4]"], "fall after the run"),
    (["superweight.param_group_bins=8", "superweight.depths=[16,10]", "superweight.widths=[1.0,1.0]"],
     "has only 7 3x3 convs"),
])
def test_bad_input_is_one_clear_error_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        SuperWeight(_cfg(*overrides)).validate()


def test_cutout_reaches_training_batches_only_and_leaves_existing_run_hashes_alone():
    from metaensemble import data

    cfg = _cfg()
    assert cfg.data.cutout == 3
    splits = data.load(cfg.data)
    kw = {"shuffle": True, "augment": True, "drop_last": True}
    with_cut = next(iter(data.ArrayLoader(splits.train, splits.info, 32, cutout=3, **kw)))["x"]
    without = next(iter(data.ArrayLoader(splits.train, splits.info, 32, **kw)))["x"]
    evaluation = next(iter(data.ArrayLoader(splits.val, splits.info, 32, cutout=3)))["x"]
    assert ((with_cut == 0).flatten(1).sum(1) >= 4).all(), "a square per training example"
    assert (without == 0).sum() == 0 and (evaluation == 0).sum() == 0
    # a recipe written before data.cutout existed keeps its run hash (its zoo is found again)
    assert load_config("configs/teachers/digits.yaml", []).config_hash() == "138fced6c6c1"
    assert load_config("configs/teachers/digits.yaml", ["data.cutout=3"]).config_hash() != "138fced6c6c1"


def test_cutout_sets_one_clipped_square_per_example_to_the_mean():
    from metaensemble.data.loaders import cutout_batch

    x = torch.ones(64, 1, 8, 8)
    out = cutout_batch(x, 3, torch.Generator().manual_seed(0))
    zeros = (out == 0).flatten(1).sum(1)
    assert zeros.max() == 9 and zeros.min() >= 4, "a 3x3 square, clipped at the border (at least 2x2)"
    assert torch.equal(cutout_batch(x, 0, torch.Generator()), x)


def test_wrn_takes_a_fractional_width_for_scaled_ensembles():
    from metaensemble.models import create_model

    net = create_model("wrn", num_classes=10, in_chans=1, img_size=8, depth=10, widen_factor=0.5)
    assert net.fc.in_features == 32 and net.conv1.out_channels == 16
    assert create_model("wrn", num_classes=10, in_chans=3, img_size=32, depth=16, widen_factor=4).fc.in_features == 256
    from metaensemble.methods.superweight.model import wrn_parameters

    for d, w, c in ((10, 0.5, 1), (16, 1.0, 3), (28, 0.7, 3)):
        net = create_model("wrn", num_classes=100, in_chans=c, img_size=32, depth=d, widen_factor=w)
        assert wrn_parameters(d, w, 100, c) == sum(p.numel() for p in net.parameters())


def _reduce_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from metaensemble.engine.loop import run_context

    rec = sh.Recorder(weights=True)
    rec.grads = {(0, 0): torch.full((2, 2), float(rank + 1)), (0, 1): torch.full((3,), 10.0 * (rank + 1))}
    torch.save(rec.reduced(run_context(rank, 2, torch.device("cpu")).all_reduce), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_recorded_gradients_are_summed_over_ddp_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_reduce_worker, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert torch.equal(r[(0, 0)], torch.full((2, 2), 3.0)) and torch.equal(r[(0, 1)], torch.full((3,), 30.0))
