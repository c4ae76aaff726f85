"""WeightFormer's training signal on a real zoo of trained digits convnets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaensemble import data
from metaensemble.config import load_config
from metaensemble.methods.base import Method
from metaensemble.methods.kd import ensemble_kd_loss
from metaensemble.methods.weightformer import WeightFormerMethod
from metaensemble.methods.weightformer.student import generate_student
from metaensemble.models import create_model, save_model

ZOO = 24


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The embedded default's recipe in-process: 24 digits convnets (width 16, 15 epochs)
    that share their initial weights (model.init_seed) and differ in data order and
    augmentation, on the default split (val: 30% of the non-test images)."""
    root = tmp_path_factory.mktemp("zoo")
    torch.set_num_threads(2)
    tcfg = load_config("configs/teachers/digits.yaml")
    assert tcfg.model.init_seed is not None
    splits = data.load(tcfg.data)
    paths = []
    for seed in range(ZOO):
        torch.manual_seed(tcfg.model.init_seed)
        m = create_model("convnet", num_classes=10, in_chans=1, img_size=8, **tcfg.model.kwargs)
        torch.manual_seed(seed)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        loader = data.ArrayLoader(splits.train, splits.info, 64, shuffle=True, augment=True, seed=seed, drop_last=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, tcfg.train.epochs * len(loader))
        for ep in range(tcfg.train.epochs):
            loader.set_epoch(ep)
            m.train()
            for b in loader:
                loss = F.cross_entropy(m(b["x"]), b["y"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        paths.append(str(save_model(m.eval(), root / f"seed{seed}", dataset="digits")))
    return paths, splits


def meta_cfg(paths, *overrides):
    """The embedded default's meta-training config on this zoo: 12 meta-train, 6 meta-val
    and 6 meta-test teachers."""
    return load_config("configs/meta/digits.yaml", [
        f"meta.train_teachers={paths[:12]}", f"meta.val_teachers={paths[12:18]}",
        f"meta.test_teachers={paths[18:]}", *overrides])


def test_generator_fits_an_ensemble_through_the_student(zoo):
    """Optimisation reaches the generator: on one ensemble and one batch, training the
    generator (the method's own step, loss through functional_call) lowers the KD loss
    of the student it generates, and the student it then generates is closer to the
    ensemble than the anchor is."""
    paths, splits = zoo
    cfg = meta_cfg(paths, "meta.lambda_shift=0")
    method = WeightFormerMethod(cfg)
    method.validate()
    torch.manual_seed(0)
    gen = method.build_model(splits.info)
    method.sample_orders = lambda: [[0, 1, 2, 3]]
    batch = next(iter(data.ArrayLoader(data.load(cfg.data).train, splits.info, 128)))
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss, logs = method.training_step(gen, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["kd"])
    assert losses[-1] < 0.7 * losses[0]
    pool = method.pools["train"]
    t = torch.stack([Method.predict(method, pool.models[i], [batch])[0] for i in range(4)])
    student, _ = generate_student(gen, pool.rows, pool.states, [0, 1, 2, 3])
    student.train()  # batch statistics, as in training
    with torch.no_grad():
        kd_student = float(ensemble_kd_loss(student(batch["x"]), t, batch["y"], 1.0, cfg.distill.temperature))
        kd_anchor = float(ensemble_kd_loss(t[0], t, batch["y"], 1.0, cfg.distill.temperature))
    assert kd_student < kd_anchor


def test_meta_training_lowers_the_loss_and_beats_the_anchor_on_held_out_ensembles(zoo):
    """The issue's "the generator learns": meta-trained over random ensembles of the 12
    meta-train teachers with the default's optimiser, schedule, clipping and step count,
    its loss falls, and the zero-shot students it generates for 12 ensembles of the 6
    meta-VALIDATION teachers (never trained on) are more accurate on the val split than
    their anchors with BatchNorm statistics plainly recomputed on the subset and than the
    naive weight average, and no worse than the raw anchors. With a zero correction it
    reproduces the anchor."""
    from metaensemble.engine.optim import build_optimizer, build_scheduler
    from metaensemble.methods.weightformer.method import make_eval_loader
    from metaensemble.methods.weightformer.student import (
        build_student,
        recompute_bn,
        weight_average,
    )

    paths, _ = zoo
    cfg = meta_cfg(paths, "meta.val_ensembles=12")
    method = WeightFormerMethod(cfg)
    method.validate()
    splits = data.load(cfg.data)
    torch.manual_seed(cfg.seed)
    gen = method.build_model(splits.info)
    pool, orders = method.pools["val"], method.ensembles["val"]
    assert len(orders) == 12 and not set(pool.hashes) & set(method.pools["train"].hashes)
    val = make_eval_loader(splits.val, splits.info, 512, "cpu")
    bn = method.bn_loader("cpu")

    def accuracy(models) -> float:
        hits = []
        for mod in models:
            lp, y = Method.predict(method, mod, val)
            hits.append((lp.argmax(1) == y).float().mean())
        return float(torch.stack(hits).mean()) * 100

    def generated_accuracy() -> float:
        lp, y = method.predict(gen, val, "val")
        return float((lp.argmax(1) == y).float().mean()) * 100

    spec = gen.student_spec
    anchor_raw = accuracy(pool.models[o[0]] for o in orders)
    anchor_bn = accuracy(recompute_bn(build_student(spec, pool.states[o[0]]), bn) for o in orders)
    average = accuracy(recompute_bn(build_student(spec, weight_average([pool.states[i] for i in o])), bn)
                       for o in orders)
    gen.zero_residual_()
    assert generated_accuracy() == pytest.approx(anchor_raw, abs=1e-4)
    torch.manual_seed(cfg.seed)
    gen = method.build_model(splits.info)

    steps = cfg.train.epochs * cfg.train.steps_per_epoch
    opt = build_optimizer(cfg.optim, gen.parameters())
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps_per_epoch, cfg.train.epochs)
    loader = data.ArrayLoader(splits.train, splits.info, cfg.data.batch_size, shuffle=True, augment=True, seed=0,
                              drop_last=True)
    kd, epoch = [], 0
    while len(kd) < steps:
        loader.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            loss, logs = method.training_step(gen, batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            kd.append(logs["kd"])
            if len(kd) == steps:
                break
    first, last = sum(kd[:50]) / 50, sum(kd[-50:]) / 50
    assert last < 0.9 * first, (first, last)
    learned = generated_accuracy()
    # measured earlier (another torch build): anchor 97.83, plain BN recompute 97.56, average 97.16,
    # generated 98.05; with torch 2.14.1 (other numerics, another zoo): 97.91, 97.45, 97.20,
    # 97.99. The margin over the raw anchor (+0.08 to +0.22 points, 4 to 11 of 5172
    # predictions) is within noise (docs/weightformer.md), so the test asks only that the
    # generator not fall below it.
    assert learned >= anchor_raw and learned > anchor_bn + 0.2 and learned > average + 0.2, \
        (learned, anchor_bn, anchor_raw, average)
