"""``pipeline.fuse_parents`` (alignment, balancing, OT, BatchNorm) on VGG and ResNet
parents of different depths and widths, and the OT details a permutation test cannot
see: pre-activation ground metric, Sinkhorn's cost scaling, per-model degenerate maps,
bias mismatches. Small models, digits-shaped data, no Ray or MLflow."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from metaensemble import data
from metaensemble.errors import ConfigError
from metaensemble.methods.fusion import cla, ot
from metaensemble.methods.fusion.config import FusionConfig
from metaensemble.methods.fusion.pipeline import average, bn_batches, fuse_parents
from metaensemble.methods.fusion.structure import generic_spec, structure
from metaensemble.models import create_model
from metaensemble.validation import load_config


@pytest.fixture(scope="module")
def digits():
    cfg = load_config("configs/fusion/digits_vgg.yaml", ["fusion.act_samples=64", "fusion.bn_samples=256"])
    return cfg, data.load(cfg.data)


def net(arch: str, seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(arch, num_classes=10, in_chans=1, img_size=8, **kw).eval()


def _bn_means_match_the_data(model: nn.Module, split, info, n: int) -> None:
    """Every BatchNorm's running mean is the batch mean of its input over the BN data."""
    seen: dict[str, list[torch.Tensor]] = {}
    bns = {n_: m for n_, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    hooks = [m.register_forward_hook(lambda m_, i, o, k=k: seen.setdefault(k, []).append(i[0].detach()))
             for k, m in bns.items()]
    model.eval()
    with torch.no_grad():
        for b in bn_batches(split, info, n, 0):
            model(b["x"])
    for h in hooks:
        h.remove()
    for k, m in bns.items():
        x = torch.cat(seen[k])
        assert torch.allclose(m.running_mean, x.mean((0, 2, 3)), atol=2e-3), k  # eval-mode inputs: upstream BNs use the unbiased variance


def test_teacher_student_vgg_keeps_the_students_widths_at_the_teachers_depth(digits):
    cfg, splits = digits
    teacher = net("vgg", 0, plan=[16, 16, "M", 32, 32, "M", 64, 64], batch_norm=True)
    student = net("vgg", 1, plan=[8, "M", 16, "M", 32], batch_norm=True)
    fcfg = cfg.fusion.model_copy(update={"anchor": "shallow"})
    f = fuse_parents([teacher, student], fcfg, splits.train, splits.info)
    assert f.anchor == 1 and f.deep == 0 and list(f.alignments) == [1]
    # the teacher's depth (2 convs per stage) at the student's widths; free end: identities after
    assert f.model.me_spec["kwargs"]["plan"] == [8, 8, "M", 16, 16, "M", 32, 32]
    _bn_means_match_the_data(f.model, splits.train, splits.info, fcfg.bn_samples)
    assert f.naive is None  # the teacher's shapes differ from the balanced student's


def test_resnet_cla_uses_the_degenerate_map_for_zero_blocks_and_the_per_model_weights(digits):
    cfg, splits = digits
    deep = net("resnet", 0, layers=[2, 1, 1, 1], width=4, stem="cifar")
    shallow = net("resnet", 1, layers=[1, 1, 1, 1], width=4, stem="cifar")
    fcfg = cfg.fusion.model_copy(update={"pin_start": 1, "pin_end": 0, "weight": 0.8})
    f = fuse_parents([deep, shallow], fcfg, splits.train, splits.info)
    assert f.inserted == {1: ["layer1.1"]}
    assert generic_spec(f.model.me_spec)["kwargs"]["layers"] == [2, 1, 1, 1]
    # the zero block's convs took the stream's map instead of a transport problem
    x = torch.cat([b["x"] for b in bn_batches(splits.train, splits.info, 64, 0)])
    res = ot.fuse(f.balanced, anchor=0, opts=ot.FusionOptions(s=0.8), x=x,
                  degenerate=[{}, cla.balance(shallow, f.alignments[1]).degenerate])
    assert torch.equal(res.maps["layer1.1.conv1"][0], res.maps["layer1.0"][0])
    assert torch.equal(res.maps["layer1.1.conv2"][0], res.maps["layer1.0"][0])
    # the naive average mixes with the same weights as the fusion (anchor 0.8)
    naive = average(f.balanced, res.weights, f.balanced[0].me_spec)
    assert res.weights == [0.8, pytest.approx(0.2)]
    w = naive.state_dict()["fc.weight"]
    assert torch.allclose(w, 0.8 * deep.state_dict()["fc.weight"] + 0.2 * f.balanced[1].state_dict()["fc.weight"])
    _bn_means_match_the_data(f.model, splits.train, splits.info, fcfg.bn_samples)


def test_bottleneck_zero_blocks_fuse(digits):
    cfg, splits = digits
    deep = net("resnet", 0, layers=[2, 1, 1, 1], block="bottleneck", width=4, stem="cifar")
    shallow = net("resnet", 1, layers=[1, 1, 1, 1], block="bottleneck", width=4, stem="cifar")
    for anchor in ("deep", "shallow"):
        f = fuse_parents([deep, shallow], cfg.fusion.model_copy(update={"pin_start": 1, "pin_end": 0, "anchor": anchor}),
                         splits.train, splits.info)
        assert generic_spec(f.model.me_spec)["kwargs"]["layers"] == [2, 1, 1, 1]


def test_degenerate_maps_are_per_model():
    """Three parents: the zero block of the balanced one must not stop the other deep
    parent's real conv from being solved."""
    x = torch.randn(32, 1, 8, 8)
    a, b = net("resnet", 0, layers=[2, 1, 1, 1], width=4, stem="cifar"), net("resnet", 2, layers=[2, 1, 1, 1], width=4, stem="cifar")
    shallow = net("resnet", 1, layers=[1, 1, 1, 1], width=4, stem="cifar")
    bal = cla.balance(shallow, cla.align_models(a, shallow, pin_start=1, pin_end=0))
    res = ot.fuse([b, bal.model, a], anchor=2, x=x, degenerate=[{}, bal.degenerate, {}])
    solved_b, reused = res.maps["layer1.1.conv1"]
    assert torch.equal(reused, res.maps["layer1.0"][1])
    assert "layer1.1.conv1" in res.costs and len(res.costs["layer1.1.conv1"]) == 1  # only b's was solved
    with pytest.raises(ConfigError, match="one per model"):
        ot.fuse([b, bal.model, a], anchor=2, x=x, degenerate=[{}, bal.degenerate])


def test_the_activation_metric_uses_pre_activations():
    m = net("mlp", 0, hidden=[16, 12])
    acts = ot.layer_activations(m, structure(m).layers()[:-1], torch.randn(40, 1, 8, 8))
    assert all((a < 0).any() for a in acts.values())  # before the ReLU: negative values present


def test_sinkhorn_is_invariant_to_the_costs_scale():
    c = ot.ground_cost(torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64))
    t1, t2 = ot.transport(c, "sinkhorn", 0.05), ot.transport(1000 * c, "sinkhorn", 0.05)
    assert torch.allclose(t1, t2, atol=1e-9)


def test_parents_with_and_without_biases_are_refused():
    x = torch.randn(16, 1, 8, 8)
    with pytest.raises(ConfigError, match="bias"):
        ot.fuse([net("mlp", 0, hidden=[8], bias=True), net("mlp", 1, hidden=[8], bias=False)], x=x)
    with pytest.raises(ConfigError, match="bias"):
        ot.fuse([net("mlp", 0, hidden=[8], bias=False), net("mlp", 1, hidden=[8], bias=True)], x=x)


def test_parents_of_other_families_or_class_counts_are_refused(digits):
    cfg, splits = digits
    with pytest.raises(ConfigError, match="different families"):
        fuse_parents([net("mlp", 0, hidden=[8, 8, 8]), net("vgg", 0, plan=[8, "M", 8])], cfg.fusion,
                     splits.train, splits.info)
    other = create_model("mlp", num_classes=5, in_chans=1, img_size=8, hidden=[8, 8, 8])
    with pytest.raises(ConfigError, match="numbers of classes"):
        fuse_parents([net("mlp", 0, hidden=[8, 8, 8]), other], cfg.fusion, splits.train, splits.info)
    with pytest.raises(ConfigError, match="two or more"):
        fuse_parents([net("mlp", 0, hidden=[8, 8, 8])], cfg.fusion, splits.train, splits.info)


@pytest.mark.parametrize("config", ["cifar10_resnet34_18", "cifar100_resnet_teacher_student",
                                    "cifar10_vgg_teacher_student", "cifar10_resnet_transfer", "digits_vgg",
                                    "digits_mlp"])
def test_every_shipped_configs_pins_admit_an_alignment(config):
    """The shipped parents' architectures (at tiny widths: the width cost needs no
    activations) align under each config's pins."""
    cfg = load_config(f"configs/fusion/{config}.yaml")
    nets = []
    for p in cfg.fusion.parent_configs:
        r = load_config(p)
        kw = dict(r.model.kwargs)
        if "width" in kw or r.model.name.startswith("resnet"):
            kw["width"] = 4
        if "width_mult" in kw:
            kw["width_mult"] = kw["width_mult"] / 16
        nets.append(create_model(r.model.name, num_classes=10, in_chans=1, img_size=8, **kw))
    deep, shallow = sorted(nets, key=lambda n: -sum(len(s) for s in structure(n).stages))
    al = cla.align_models(deep, shallow, cost="width", pin_start=cfg.fusion.pin_start, pin_end=cfg.fusion.pin_end)
    bal = cla.balance(shallow, al)
    assert [len(s) for s in structure(bal.model).stages] == [len(s) for s in structure(deep).stages]


def test_pins_that_leave_no_alignment_are_one_clear_error(digits):
    cfg, splits = digits
    teacher = net("vgg", 0, plan=[16, 16, "M", 32, 32, "M", 64, 64], batch_norm=True)
    student = net("vgg", 1, plan=[8, "M", 16, "M", 32], batch_norm=True)
    network = cfg.fusion.model_copy(update={"pin_start": 2, "cla_scope": "network"})
    with pytest.raises(ConfigError, match="no strictly increasing map"):  # unit 1 is in stage 1, deep unit 1 in stage 0
        fuse_parents([teacher, student], network, splits.train, splits.info)
    student = net("vgg", 1, plan=[8, 8, "M", 16, "M", 32], batch_norm=True)
    with pytest.raises(ConfigError, match="stage 0: pinned units overlap"):  # per stage: 2 + 1 pins, 2 units
        fuse_parents([teacher, student], cfg.fusion.model_copy(update={"pin_start": 2}), splits.train, splits.info)


def test_the_defaults_fuse_the_deep_net_onto_the_balanced_shallow_one(digits):
    """FusionConfig's defaults are the original's: a shallow parent of two hidden layers
    aligns (its first and last pinned), the anchor is the balanced shallow net (the fused
    network has the deep net's depth and the shallow net's widths), and a VGG aligns per
    pooling stage with the pins in each."""
    _, splits = digits
    deep, shallow = net("mlp", 0, hidden=[16, 16, 16, 16]), net("mlp", 1, hidden=[12, 10])
    f = fuse_parents([deep, shallow], FusionConfig(act_samples=64), splits.train, splits.info)
    assert f.anchor == 1 and f.deep == 0 and f.alignments[1].mapping == [[0, 3]]
    assert f.model.me_spec["kwargs"]["hidden"] == [12, 12, 12, 10]
    # s = 1 returns the anchor exactly: the balanced shallow net
    whole = fuse_parents([deep, shallow], FusionConfig(act_samples=64, weight=1.0), splits.train, splits.info)
    want = f.balanced[1].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in whole.model.state_dict().items())
    teacher = net("vgg", 0, plan=[16, 16, 16, "M", 32, 32, 32], batch_norm=True)
    student = net("vgg", 1, plan=[8, 8, "M", 16, 16], batch_norm=True)
    f = fuse_parents([teacher, student], FusionConfig(act_samples=64, bn_samples=256), splits.train, splits.info)
    assert f.alignments[1].mapping == [[0, 2], [0, 2]]  # each stage's first and last pinned
    assert f.model.me_spec["kwargs"]["plan"] == [8, 8, 8, "M", 16, 16, 16]
