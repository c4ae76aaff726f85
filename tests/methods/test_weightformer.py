"""WeightFormer: the method's testable properties (numbered in the tests' names and
comments; the method is described in docs/weightformer.md), on real (small) networks, no Ray.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from metaensemble.errors import ConfigError, ZooError
from metaensemble.methods.weightformer import WeightFormerMethod
from metaensemble.methods.weightformer.generator import student_skeleton
from metaensemble.methods.weightformer.plan import check_disjoint, check_generator
from metaensemble.methods.weightformer.student import (
    assemble,
    ensemble_input,
    generate_student,
    make_ensembles,
    student_logits,
)
from metaensemble.methods.weightformer.tokens import detokenise, token_index, tokenise
from metaensemble.models import create_model, save_model
from metaensemble.validation import load_config

SHAPE = {"num_classes": 10, "in_chans": 1, "img_size": 8}



def nets(arch="convnet", n=4, **kw):
    out = []
    for s in range(n):
        torch.manual_seed(100 + s)
        m = create_model(arch, **SHAPE, **kw)
        with torch.no_grad():  # non-trivial BN statistics and affine values
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_()
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0, 0.1)
        out.append(m.eval())
    return out


def gen(name="weightformer", student="convnet", skw=None, **kw):
    torch.manual_seed(0)
    return create_model(name, **SHAPE, student=student, student_kwargs=skw or {"width": 4}, **kw)


def pool(models, layout):
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    return [tokenise(s, layout) for s in states], states


# ---- 1: the assembled student ------------------------------------------------------------
@pytest.mark.parametrize("arch,kw", [("convnet", {"width": 4}), ("mlp", {"hidden": (16, 8)}),
                                     ("resnet18", {"width": 4, "stem": "cifar"}), ("vgg11", {"width_mult": 0.125})])
def test_assembled_student_has_exactly_the_architectures_tensors(arch, kw):
    g = gen(student=arch, skw=kw)
    teachers = nets(arch, 2, **kw)
    rows, states = pool(teachers, g.layout)
    out = g(ensemble_input(rows, [[0, 1]]))
    state = assemble(out["rows"], g.layout, states[0])
    ref = teachers[0].state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert state[k].shape == v.shape and state[k].dtype == v.dtype, k
    fresh = create_model(arch, **SHAPE, **kw)
    fresh.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    # every floating tensor is generated: the layout covers all of them
    floats = {k for k, v in ref.items() if v.is_floating_point()}
    assert floats == {s.key for ly in g.layout.layers for s in ly.segments}


# ---- 2: tokens ---------------------------------------------------------------------------
def test_tokenise_detokenise_is_identity_and_rows_sit_where_the_layout_says():
    _, layout = student_skeleton("convnet", {"width": 4}, **SHAPE)
    teachers = nets(n=3, width=4)
    for t in teachers:
        s = t.state_dict()
        back = detokenise(tokenise(s, layout), layout, like=s)
        assert set(back) == set(s) and all(torch.equal(back[k], s[k]) for k in s)
    rows, _ = pool(teachers, layout)
    xs = ensemble_input(rows, [[2, 0, 1]])
    conv = teachers[0][0].weight  # layer 0 = first conv + its BN
    ly = layout.layers[0]
    assert ly.rows == conv.shape[0] and ly.row_len == conv[0].numel() + 4
    for pos, k in enumerate([2, 0, 1]):
        for r in range(ly.rows):
            w = teachers[k][0].weight[r].flatten()
            bn = teachers[k][1]
            expect = torch.cat([w, torch.stack([bn.weight[r], bn.bias[r], bn.running_mean[r], bn.running_var[r]])])
            assert torch.equal(xs[0][0, pos, r], expect.float())
    assert token_index(2, 3, ly.rows) == 1 + 2 * ly.rows + 3


# ---- 3: sequences ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_sequence_has_cross_plus_k_times_rows_tokens_with_ids_and_positions(k):
    g = gen(max_teachers=8)
    seen = []
    h = g.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    rows, _ = pool(nets(n=k, width=4), g.layout)
    g(ensemble_input(rows, [list(range(k))]))
    h.remove()
    assert seen == [1 + k * ly.rows for ly in g.layout.layers]
    for ly in g.layout.layers:
        ids, pos, _ = g.token_ids(k, ly.rows, "cpu")
        assert ids[0] == 0 and (ids[1:] > 0).all()
        for t in range(k):
            sl = slice(token_index(t, 0, ly.rows), token_index(t, ly.rows - 1, ly.rows) + 1)
            assert (ids[sl] == t + 1).all() and torch.equal(pos[sl], torch.arange(ly.rows))


def test_ensemble_size_above_the_maximum_is_refused():
    g = gen(max_teachers=3)
    rows, _ = pool(nets(n=4, width=4), g.layout)
    with pytest.raises(ConfigError, match="max_teachers=3"):
        g(ensemble_input(rows, [[0, 1, 2, 3]]))
    m = gen("mlp_generator", ensemble_size=3)
    with pytest.raises(ConfigError, match="exactly 3"):
        m(ensemble_input(rows, [[0, 1]]))


# ---- 4 and 8: gradients ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["weightformer", "mlp_generator"])
def test_loss_through_functional_call_reaches_every_generator_parameter_and_no_teacher(name):
    from metaensemble.methods.distill import ensemble_kd_loss

    g = gen(name)
    teachers = nets(n=4, width=4)
    for t in teachers:
        t.requires_grad_(True)
    rows, states = pool(teachers, g.layout)
    skel, _ = student_skeleton("convnet", {"width": 4}, **SHAPE)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    # the KD loss alone (no shift term, no mask L1) must reach every parameter
    out = g(ensemble_input(rows, [[0, 1, 2, 3]]))
    z = student_logits(skel.train(), assemble(out["rows"], g.layout, states[0]), x)
    with torch.no_grad():
        tz = torch.stack([t(x) for t in teachers])
    loss = ensemble_kd_loss(z, tz, y, 0.5, 4.0)
    loss.backward()
    for n, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    for t in teachers:
        assert all(p.grad is None for p in t.parameters())
    if name == "weightformer":
        assert g.mask_bias.grad.abs().sum() > 0


def test_sparsity_is_zero_for_a_zero_mask_and_l1_otherwise():
    g = gen()
    rows, _ = pool(nets(n=2, width=4), g.layout)
    assert float(g(ensemble_input(rows, [[0, 1]]))["mask_l1"].detach()) == 0.0
    with torch.no_grad():
        g.mask_bias.fill_(-0.5)
    assert float(g(ensemble_input(rows, [[0, 1]]))["mask_l1"].detach()) == pytest.approx(0.5)


# ---- 5: residual on the base -------------------------------------------------------------
@pytest.mark.parametrize("name,base", [("weightformer", "anchor"), ("weightformer", "mean"), ("weightformer", "mix"),
                                       ("mlp_generator", "anchor"), ("mlp_generator", "mean")])
def test_zeroed_residual_outputs_the_anchor_or_the_mean_exactly(name, base):
    """(base=mix with its scorer zeroed is the uniform mix: the mean.)"""
    g = gen(name, base=base)
    g.zero_residual_()
    teachers = nets(n=4, width=4)
    rows, states = pool(teachers, g.layout)
    order = [2, 0, 3, 1]
    state = assemble(g(ensemble_input(rows, [order]))["rows"], g.layout, states[order[0]])
    for k in state:
        if base == "anchor":
            expect = states[order[0]][k]
        elif states[0][k].is_floating_point():
            expect = torch.stack([states[i][k] for i in order]).mean(0)
        else:
            expect = states[order[0]][k]
        assert torch.allclose(state[k], expect, rtol=0, atol=0 if base == "anchor" else 1e-6), k


# ---- 5b: a coherent mix, no teacher-blind output ------------------------------------------
def _unit_of_column(layout, li):
    """For layer li's row columns: the previous layer's unit each incoming weight reads
    (from the weight's shape: dim 1 is the unit), None for bias and norm columns."""
    layer = layout.layers[li]
    w = next(s for s in layer.segments if len(s.shape) >= 2)
    per = w.width // w.shape[1]
    return [(j - w.start) // per if w.start <= j < w.start + w.width else None for j in range(layer.row_len)]


def test_a_unit_that_prefers_a_teacher_takes_its_row_and_the_next_layers_column_from_it():
    """Unit 3 of the second conv scores teacher 2 far above the others (every other score
    0). Its incoming row, bias and BN values and the next layer's column 3 (every output
    unit's weights from it) are teacher 2's; the rest is the mean. Mixed per row (the old
    base, ``coherent=False``), the next layer's column 3 would be the mean."""
    from metaensemble.methods.weightformer.generator import coherent_mix, unit_links

    g = gen()
    rows, _ = pool(nets(n=4, width=4), g.layout)
    xs = ensemble_input(rows, [[0, 1, 2, 3]])
    links = unit_links(g.layout)
    scores = [torch.zeros(1, 4, ly.rows) for ly in g.layout.layers]
    scores[1][0, 2, 3] = 60.0
    mixed = [coherent_mix(xs[li], scores[li], scores[li - 1] if li else None, links[li]) for li in range(len(xs))]
    mean = [x.mean(dim=1) for x in xs]
    assert torch.allclose(mixed[1][0, 3], xs[1][0, 2, 3], atol=1e-6)  # the unit's whole row
    col = [j for j, u in enumerate(_unit_of_column(g.layout, 2)) if u == 3]
    assert len(col) == 9  # a 3x3 kernel per input unit
    assert torch.allclose(mixed[2][0][:, col], xs[2][0, 2][:, col], atol=1e-6)  # the next layer's column 3
    other = [j for j in range(g.layout.layers[2].row_len) if j not in col]
    assert torch.allclose(mixed[2][0][:, other], mean[2][0][:, other], atol=1e-6)
    keep = [r for r in range(g.layout.layers[1].rows) if r != 3]
    assert torch.allclose(mixed[1][0, keep], mean[1][0, keep], atol=1e-6)
    per_row = coherent_mix(xs[2], scores[2])
    assert (per_row[0][:, col] - xs[2][0, 2][:, col]).abs().max() > 1e-2  # incoherent: teacher 2 does not show


def test_the_generators_mix_is_the_coherent_mix_of_its_own_scores():
    """With the correction zeroed and random scorer weights, every generated value is
    sum_k softmax_k(s_l[k, r] + s_{l-1}[k, unit read by the column]) x_k, written out here
    value by value from the weights' shapes; with ``coherent=False`` the column's unit
    plays no part."""
    for coherent in (True, False):
        g = gen(coherent=coherent)
        with torch.no_grad():
            g.codec.zero_residual_()
            g.mix_score.weight.normal_(0, 1.0)
        rows, _ = pool(nets(n=3, width=4), g.layout)
        xs = ensemble_input(rows, [[0, 1, 2]])
        out = g(xs)
        s = out["mix_scores"]
        assert len(s) == len(xs) and s[1].abs().max() > 0.1
        for li, x in enumerate(xs):
            units = _unit_of_column(g.layout, li) if li else [None] * x.shape[-1]
            for r in range(x.shape[2]):
                for j in range(x.shape[3]):
                    logit = s[li][0, :, r].clone()
                    if coherent and units[j] is not None:
                        logit = logit + s[li - 1][0, :, units[j]]
                    expect = (logit.softmax(0) * x[0, :, r, j]).sum()
                    assert torch.allclose(out["rows"][li][0, r, j], expect, atol=1e-5), (coherent, li, r, j)


def test_the_mix_is_per_row_where_the_student_is_not_a_chain():
    from metaensemble.methods.weightformer.generator import unit_links

    g = gen(student="resnet18", skw={"width": 4, "stem": "cifar"})
    assert all(link is None for link in unit_links(g.layout)) and all(link is None for link in g.links)
    assert any(link is not None for link in gen().links)


@pytest.mark.parametrize("name", ["weightformer", "mlp_generator"])
def test_a_zero_state_decodes_to_a_zero_correction_and_rows_are_not_padded(name):
    """No output path ignores the teachers: with every codec parameter random (the
    per-chunk embeddings too), a zero hidden state decodes to exactly zero, whatever the
    base and scale; an output bias or a per-chunk offset would not. A row shorter than
    ``chunk`` is one chunk of its own length."""
    g = gen(name)
    with torch.no_grad():
        for prm in g.codec.parameters():
            prm.normal_()
    for li, ly in enumerate(g.layout.layers):
        assert g.codec.widths[li] == min(256, ly.row_len) and g.codec.inp[li].in_features % ly.row_len == 0
        d = g.codec.out[li].in_features
        h = torch.zeros(2, ly.rows, d)
        base, scale = torch.randn(2, ly.rows, ly.row_len), torch.rand(2, ly.row_len) + 0.5
        assert torch.equal(g.codec.decode(li, h, base, scale), torch.zeros_like(base))
        assert g.codec.decode(li, torch.randn(2, ly.rows, d), base, scale).abs().max() > 0
    if name == "weightformer":
        assert g.norm.bias is None  # the state decoded has no learned offset either


# ---- 6: order ----------------------------------------------------------------------------
def test_identical_teachers_make_the_output_order_invariant_exactly():
    g = gen()
    one = nets(n=1, width=4)[0]
    rows, _ = pool([one] * 4, g.layout)
    a = g(ensemble_input(rows, [[0, 1, 2, 3]]))["rows"]
    b = g(ensemble_input(rows, [[2, 3, 0, 1]]))["rows"]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---- 7: cross-layer flow -----------------------------------------------------------------
@pytest.mark.parametrize("cross", [True, False])
def test_changing_layer_l_teachers_moves_the_next_layers_generated_rows_only_with_the_flow(cross):
    """At initialisation (no training), so the flow is there from the start and not
    buried under a near-zero output head: layer 1's teachers move layer 2's generated
    correction (its rows minus the base, the teachers' mean at init) by more than 0.1% of
    its size with the flow, and by exactly nothing without it."""
    g = gen(cross_layer=cross).eval()
    rows, _ = pool(nets(n=4, width=4), g.layout)
    xs = ensemble_input(rows, [[0, 1, 2, 3]])
    ys = [x.clone() for x in xs]
    ys[1] = ys[1] + torch.randn_like(ys[1])
    with torch.no_grad():
        ra, rb = g(xs)["rows"], g(ys)["rows"]
    assert torch.equal(ra[0], rb[0])
    correction = ra[2] - xs[2].mean(dim=1)
    change = float((ra[2] - rb[2]).norm() / correction.norm())
    if cross:
        assert change > 1e-3, change
    else:
        assert change == 0.0


@pytest.mark.parametrize("cross", [True, False])
def test_changing_layer_l_teachers_changes_the_next_cross_input_only_with_the_flow(cross):
    g = gen(cross_layer=cross)
    rows, _ = pool(nets(n=4, width=4), g.layout)
    xs = ensemble_input(rows, [[0, 1, 2, 3]])
    ys = [x.clone() for x in xs]
    ys[1] = ys[1] + torch.randn_like(ys[1])  # only layer 1's teachers change
    ca, cb = g(xs)["cross"], g(ys)["cross"]
    assert torch.equal(ca[1], cb[1])  # inputs up to layer 1 are untouched
    assert (not torch.equal(ca[2], cb[2])) == cross
    if not cross:
        assert all(torch.equal(c, g.cross0.expand_as(c)) for c in ca)


def test_ablation_switches_remove_their_component():
    assert gen(mask=False).mask_bias is None and gen(mask=True).mask_bias is not None
    g = gen(mask=False)
    rows, _ = pool(nets(n=2, width=4), g.layout)
    assert g.attention_bias(*g.token_ids(2, 4, "cpu")[::2]) is None
    assert float(g(ensemble_input(rows, [[0, 1]]))["mask_l1"]) == 0.0
    assert gen(cross_layer=False).cross_proj is None
    n_mask = sum(p.numel() for p in gen().parameters()) - sum(p.numel() for p in gen(mask=False).parameters())
    assert n_mask == gen().mask_bias.numel()


# ---- 10: determinism ---------------------------------------------------------------------
def test_two_eval_generations_are_bit_identical():
    g = gen()
    teachers = nets(n=4, width=4)
    rows, states = pool(teachers, g.layout)
    a, _ = generate_student(g, rows, states, [1, 0, 2, 3])
    b, _ = generate_student(g, rows, states, [1, 0, 2, 3])
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- 9 and the method's inputs -----------------------------------------------------------
def write_teachers(root, n, **kw):
    paths = []
    for i, m in enumerate(nets(n=n, width=4, **kw)):
        paths.append(str(save_model(m, root / f"t{i}", dataset="digits")))
    return paths


def meta_cfg(paths, *extra, k=2):
    return load_config("configs/meta/digits.yaml", [
        "model.kwargs.student_kwargs={width: 4}", "model.kwargs.d_model=16", "model.kwargs.heads=2",
        f"meta.ensemble_size={k}", "meta.train_k=[2, 4]", f"meta.train_teachers={paths[:4]}",
        f"meta.val_teachers={paths[4:6]}", f"meta.test_teachers={paths[6:8]}", "meta.val_ensembles=2",
        "meta.test_ensembles=2", "meta.report_k=[2]", *extra])


def test_training_samples_only_meta_train_teachers(tmp_path):
    paths = write_teachers(tmp_path, 8)
    m = WeightFormerMethod(meta_cfg(paths, "meta.lambda_shift=1000"))  # weight enough to see the term
    m.validate()
    g = m.build_model(__import__("metaensemble.data", fromlist=["load"]).load(m.cfg.data).info)
    train_hashes = set(m.pools["train"].hashes)
    assert train_hashes.isdisjoint(m.pools["test"].hashes) and train_hashes.isdisjoint(m.pools["val"].hashes)
    used = set()
    orig = m.pools["train"].rows
    sizes = set()
    for _ in range(60):
        orders, cut = m.sample_orders()
        sizes.add(len(orders[0]))
        assert len(orders) == 3 and cut == [0.0, 0.0, m.cfg.meta.cutoff] and orders[2] == orders[0]
        assert sorted(orders[1]) == sorted(orders[0]) and orders[1] != orders[0]  # shifted, same teachers
        for order in orders:
            used.update(m.pools["train"].hashes[i] for i in order)
    assert used <= train_hashes and m.pools["train"].rows is orig
    assert sizes == {2, 3, 4}  # K drawn from meta.train_k
    batch = {"x": torch.randn(8, 1, 8, 8), "y": torch.randint(0, 10, (8,))}
    with torch.no_grad():  # a correction as large as the base: the views' disagreement is not negligible
        g.codec.log_scale.fill_(0.0)
    loss, logs = m.training_step(g, batch)
    loss = loss.detach()
    assert torch.isfinite(loss) and logs["shift"] > 0 and logs["mask_l1"] > 0
    # the loss is exactly KD + lambda_mask * |mask| + lambda_shift * consistency: dropping
    # either term (or its weight) from the sum breaks this
    lm, ls = m.cfg.meta.lambda_mask, m.cfg.meta.lambda_shift
    assert float(loss) == pytest.approx(float(logs["kd"] + lm * logs["mask_l1"] + ls * logs["shift"]), rel=1e-6)
    assert float(ls * logs["shift"]) > 1e-4 * float(loss) and float(lm * logs["mask_l1"]) > 1e-7


def test_epoch_metrics_score_seen_and_unseen_students_on_subset_and_val_images(tmp_path):
    """With the correction zeroed (students are the teachers' weight averages), each of
    the 8 diagnostics equals the same score computed here from its own ensembles and
    images: seen = fixed ensembles of meta-train teachers, unseen = the meta-val
    ensembles; subset = the meta-training subset, val = the val split."""
    from metaensemble import data
    from metaensemble.methods.distill import ensemble_kd_loss
    from metaensemble.methods.weightformer.student import build_student, weight_average
    from metaensemble.models.batchnorm import recompute_bn

    paths = write_teachers(tmp_path, 8)
    m = WeightFormerMethod(meta_cfg(paths))
    splits = data.load(m.cfg.data)
    g = m.build_model(splits.info)
    g.zero_residual_()
    got = m.epoch_metrics(g)
    d = m.cfg.distill
    images = {"subset": splits.train, "val": splits.val}
    assert len(splits.train) < len(data.load(m.cfg.data.model_copy(update={"train_fraction": 1.0})).train)
    seen = make_ensembles(4, 2, m.cfg.meta.val_ensembles, m.cfg.seed + 2)
    for side, pool_, ensembles in (("seen", m.pools["train"], seen), ("unseen", m.pools["val"], m.ensembles["val"])):
        for name, split in images.items():
            whole = next(iter(data.eval_loader(split, splits.info, len(split))))  # one batch, normalised
            x, y = whole["x"], whole["y"]
            kd, acc = [], []
            for order in ensembles:
                st = build_student(g.student_spec, weight_average([pool_.states[i] for i in order]))
                recompute_bn(st, m.bn_loader("cpu"))
                with torch.no_grad():
                    z = st.eval()(x)
                    t = torch.stack([pool_.models[i](x) for i in order])
                kd.append(float(ensemble_kd_loss(z, t, y, d.alpha, d.temperature)))
                acc.append(float((z.argmax(1) == y).float().mean()))
            assert got[f"{side}_{name}_acc"] == pytest.approx(sum(acc) / len(acc), abs=1e-6), (side, name)
            assert got[f"{side}_{name}_kd"] == pytest.approx(sum(kd) / len(kd), rel=1e-4), (side, name)
    assert len(got) == 8


def _order_sensitivity(lambda_shift, paths, steps=60):
    """Train a generator ``steps`` Adam steps through the method's own loss, then measure
    on 4 distinct held-out teachers how much a cyclic shift of their order moves the
    generated rows, relative to the generated correction."""
    m = WeightFormerMethod(meta_cfg(paths, f"meta.lambda_shift={lambda_shift}", "meta.cutoff=0.0",
                                    "model.kwargs.residual_scale=0.5"))
    torch.manual_seed(0)
    g = m.build_model(__import__("metaensemble.data", fromlist=["load"]).load(m.cfg.data).info)
    opt = torch.optim.Adam(g.parameters(), lr=3e-3)
    gen_ = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = {"x": torch.randn(16, 1, 8, 8, generator=gen_), "y": torch.randint(0, 10, (16,), generator=gen_)}
        loss, _ = m.training_step(g, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    g.eval()
    pool_ = m.pools["train"]
    with torch.no_grad():
        xs = ensemble_input(pool_.rows, [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1]])
        rows = g(xs)["rows"]
    moved = sum(float((r[0] - r[v]).norm()) for r in rows for v in (1, 2))
    size = sum(float((r[0] - x[0].mean(dim=0)).norm()) for r, x in zip(rows, xs, strict=True))
    return moved / (2 * size)


def test_shift_consistency_makes_the_trained_generator_order_invariant_on_distinct_teachers(tmp_path):
    """Trained with the shift term, a generator's output on 4 distinct teachers moves under
    a reordering far less than one trained without it (remove the term from the loss and
    the two are the same)."""
    paths = write_teachers(tmp_path, 8)
    with_shift, without = _order_sensitivity(10.0, paths), _order_sensitivity(0.0, paths)
    assert with_shift < 0.5 * without, (with_shift, without)


def test_the_mask_moves_when_trained_and_its_l1_pulls_it_to_zero(tmp_path):
    """The mask bias has its own initialisation and learning rate (meta.mask_lr_scale), so
    a few steps move it measurably; a large lambda_mask (the L1 term) shrinks it."""
    paths = write_teachers(tmp_path, 8)

    def trained_mask(lambda_mask):
        m = WeightFormerMethod(meta_cfg(paths, f"meta.lambda_mask={lambda_mask}", "meta.mask_lr_scale=10"))
        torch.manual_seed(0)
        g = m.build_model(__import__("metaensemble.data", fromlist=["load"]).load(m.cfg.data).info)
        start = g.mask_bias.detach().clone()
        groups = m.param_groups(g)
        assert [gr.get("lr_scale", 1.0) for gr in groups if any(p is g.mask_bias for p in gr["params"])] == [10]
        opt = torch.optim.Adam([{"params": gr["params"], "lr": 1e-3 * gr.get("lr_scale", 1.0)} for gr in groups])
        for i in range(20):
            torch.manual_seed(i)
            loss, _ = m.training_step(g, {"x": torch.randn(8, 1, 8, 8), "y": torch.randint(0, 10, (8,))})
            opt.zero_grad()
            loss.backward()
            opt.step()
        return start, g.mask_bias.detach()

    start, plain = trained_mask(0.0)
    assert float(start.abs().mean()) > 0  # its own (non-zero) initialisation
    assert float((plain - start).abs().max()) > 0.05  # 20 steps at 10x lr move the entries K <= 4 uses
    _, shrunk = trained_mask(1e3)
    assert float(shrunk.abs().mean()) < 0.5 * float(plain.abs().mean())


def test_the_mix_scorer_and_the_mask_have_their_own_learning_rates_and_every_parameter_one_group(tmp_path):
    paths = write_teachers(tmp_path, 8)
    m = WeightFormerMethod(meta_cfg(paths, "meta.mask_lr_scale=10", "meta.mix_lr_scale=30"))
    g = m.build_model(__import__("metaensemble.data", fromlist=["load"]).load(m.cfg.data).info)
    groups = m.param_groups(g)
    ids = [id(p) for gr in groups for p in gr["params"]]
    assert sorted(ids) == sorted(id(p) for p in g.parameters())  # each once
    scale = {id(p): gr.get("lr_scale", 1.0) for gr in groups for p in gr["params"]}
    assert {scale[id(p)] for p in g.mix_score.parameters()} == {30} and scale[id(g.mask_bias)] == 10
    assert {scale[id(p)] for p in g.codec.parameters()} == {1.0}


def test_a_checkpoint_on_two_sides_is_refused(tmp_path):
    paths = write_teachers(tmp_path, 8)
    with pytest.raises(ZooError, match="both meta.train_teachers and meta.test_teachers"):
        WeightFormerMethod(meta_cfg(paths[:6] + [paths[0], paths[7]])).validate()
    with pytest.raises(ZooError, match="meta-train and meta-test"):
        check_disjoint({"train": ["a", "b"], "val": ["c"], "test": ["b"]})


def test_bad_teacher_inputs_are_refused_with_clear_errors(tmp_path):
    paths = write_teachers(tmp_path, 8)
    with pytest.raises(ConfigError, match="exceeds the generator's max_teachers=8; valid ensemble sizes: 2..8"):
        WeightFormerMethod(meta_cfg(paths, "meta.train_k=[]", k=9)).validate()
    with pytest.raises(ConfigError, match="reaches 9 teachers, more than the generator's max_teachers=8"):
        WeightFormerMethod(meta_cfg(paths, "meta.train_k=[2, 9]")).validate()
    with pytest.raises(ConfigError, match=r"meta.train_k must be \[lo, hi\]"):
        meta_cfg(paths, "meta.train_k=[3, 2]")
    with pytest.raises(ConfigError, match="base must be one of anchor, mean, mix"):
        gen(base="median")
    with pytest.raises(ConfigError, match="sequential student"):
        check_generator(meta_cfg(paths, "meta.align=permutation", "model.kwargs.student=resnet18",
                                 "model.kwargs.student_kwargs={width: 4, stem: cifar}"))
    with pytest.raises(ZooError, match="fewer than the ensemble size K=3"):
        WeightFormerMethod(meta_cfg(paths, "meta.train_k=[]", k=3)).validate()
    # a teacher of another width than the student
    wide = str(save_model(nets(n=1, width=8)[0], tmp_path / "wide", dataset="digits"))
    m = WeightFormerMethod(meta_cfg([wide] + paths[1:]))
    with pytest.raises(Exception, match="teachers must have the student's architecture"):
        m.build_model(__import__("metaensemble.data", fromlist=["load"]).load(m.cfg.data).info)
    # a corrupt checkpoint
    (tmp_path / "t5" / "model.safetensors").write_bytes(b"not a tensor file")
    m = WeightFormerMethod(meta_cfg(paths))
    with pytest.raises(Exception, match="corrupt"):
        m.build_model(__import__("metaensemble.data", fromlist=["load"]).load(m.cfg.data).info)


def test_held_out_ensembles_mixing_parents_of_a_soup_zoo_are_refused_before_any_work(tmp_path):
    """Soups average weights, which only children of one parent allow: with a two-parent
    soup-regime zoo (zoo index i a child of parent i % 2) the main job's held-out
    ensembles would mix parents, so the job stops at validation; the leaderboard stops
    only when soups are on its board."""
    import yaml

    from metaensemble import leaderboard
    from metaensemble.methods.weightformer import plan
    from metaensemble.methods.weightformer.student import make_ensembles

    recipe = yaml.safe_load(open("configs/teachers/digits_soup.yaml"))
    recipe["zoo"]["soup"]["parents"] = 2
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config("configs/meta/digits.yaml", [f"meta.teacher_config={tmp_path / 'two.yaml'}"])
    with pytest.raises(ZooError, match=r"held-out ensemble 0 would hold children of parents 0, 1 .*zoo.soup.parents=1"):
        plan.validate(cfg)
    # what the check reads: the jobs' own split and draw, and the recipe's parent of each index
    m = cfg.meta
    sides = plan.split_sides(m.zoo_size, m.num_val_teachers, m.num_test_teachers, cfg.seed, m.num_train_teachers)
    test = [i for i, side in enumerate(sides) if side == "test"]
    ens = make_ensembles(len(test), m.ensemble_size, 1, cfg.seed + 1)[0]
    assert len({test[j] % 2 for j in ens}) == 2
    assert plan.validate(cfg, soup_ensembles=0).zoo.soup.parents == 2  # no soups: nothing averaged
    board = load_config("configs/compare/digits.yaml", [f"meta.teacher_config={tmp_path / 'two.yaml'}"])
    assert leaderboard.validate(board.with_overrides({"compare.methods": ["kd", "weightformer"]})) == ["kd", "weightformer"]
    with pytest.raises(ZooError, match="zoo.soup.parents=2"):
        leaderboard.validate(board.with_overrides({"compare.methods": ["kd", "greedy_soup"]}))
    plan.validate(load_config("configs/meta/digits.yaml"))  # the default: one parent


def test_the_default_config_and_every_run_it_starts_validate():
    """The main job validates the generator of every variant it will train (the MLP's own
    K, its report_k) before any work, so none fails after the zoo has been trained."""
    from metaensemble.methods.weightformer import plan

    cfg = load_config("configs/meta/digits.yaml")
    plan.validate(cfg)
    variants = plan.variant_configs(cfg)
    assert set(variants) == {"weightformer", *cfg.meta.ablations}
    assert variants["mlp"].meta.report_k == [] and variants["mlp"].meta.train_k == []
    # what the variant check catches: an MLP generator asked for more than its one K
    with pytest.raises(ConfigError, match="cannot take"):
        check_generator(variants["mlp"].with_overrides({"meta.report_k": [2, 3]}))


def test_fewer_meta_train_teachers_keep_the_same_held_out_teachers():
    from metaensemble.methods.weightformer.plan import split_sides

    full = split_sides(40, 4, 4, seed=3)
    some = split_sides(40, 4, 4, seed=3, n_train=7)
    assert [i for i, s in enumerate(full) if s in ("val", "test")] == [i for i, s in enumerate(some) if s in ("val", "test")]
    assert all(a == b for a, b in zip(full, some, strict=True) if a != "train")
    train = [i for i, s in enumerate(full) if s == "train"]
    assert [i for i, s in enumerate(some) if s == "train"] == train[:7]
    assert some.count("unused") == len(train) - 7


def test_make_ensembles_are_distinct_and_in_range():
    e = make_ensembles(4, 4, 10, 0)
    assert len(e) == 4 and len({tuple(x) for x in e}) == 4  # only the 4 anchors of one combination exist
    e = make_ensembles(8, 3, 20, 1)
    assert len({tuple(x) for x in e}) == 20 and all(len(set(x)) == 3 and max(x) < 8 for x in e)
    assert len({frozenset(x) for x in e}) == 20  # distinct combinations while C(8, 3) = 56 last
    assert make_ensembles(8, 3, 20, 1) == e
    e = make_ensembles(5, 4, 8, 0)  # 5 combinations: then further anchors of the same ones
    assert len({tuple(x) for x in e}) == 8 and len({frozenset(x) for x in e[:5]}) == 5


def test_relative_l2_distance():
    from metaensemble.methods.weightformer.student import relative_l2

    a = {"w": torch.ones(4), "bn.running_mean": torch.ones(2), "n": torch.tensor(3)}
    b = {"w": torch.full((4,), 1.5), "bn.running_mean": torch.zeros(2), "n": torch.tensor(1)}
    assert relative_l2(b, a) == pytest.approx(0.5)  # running statistics and integers left out
    assert relative_l2(a, a) == 0.0


def test_cutoff_view_zeroes_a_span_of_tokens_and_only_that_view_changes():
    g = gen().eval()
    rows, _ = pool(nets(n=4, width=4), g.layout)
    xs = ensemble_input(rows, [[0, 1, 2, 3], [0, 1, 2, 3]])
    with torch.no_grad():
        full = g(xs)["rows"]
        cut = g(xs, cutoff=[0.0, 0.5])["rows"]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, cut, strict=True))
    assert all(torch.equal(a[0], a[1]) for a in full)
    assert any(not torch.equal(b[0], b[1]) for b in cut)
    from metaensemble.methods.weightformer.generator import cutoff_keep

    keep = cutoff_keep(2, 4, 8, [0.0, 0.25], "cpu")
    assert keep[0].all() and int((keep[1] == 0).sum()) == 8
    dropped = (keep[1].flatten() == 0).nonzero().flatten()
    assert int(dropped.max() - dropped.min()) == 7  # one contiguous span
    assert cutoff_keep(2, 4, 8, [0.0, 0.0], "cpu") is None
