"""WeightFormer's training signal on a real zoo of trained digits convnets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaensemble import data
from metaensemble.methods.base import Method
from metaensemble.methods.distill import ensemble_kd_loss
from metaensemble.methods.weightformer import WeightFormerMethod
from metaensemble.methods.weightformer.student import generate_student
from metaensemble.models import create_model, save_model
from metaensemble.validation import load_config

TRAIN, VAL, TEST = 8, 6, 4  # meta-train (train_k's largest K = 8), meta-val, meta-test
ZOO = TRAIN + VAL + TEST



@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The embedded default's recipe in-process: 18 narrow digits convnets (width 4, 15
    epochs) that share their initial weights (model.init_seed) and differ in data order
    and augmentation, on the default split (val: 30% of the non-test images)."""
    root = tmp_path_factory.mktemp("zoo")
    tcfg = load_config("configs/teachers/digits_meta.yaml")
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
    """The embedded default's meta-training config on this zoo: 8 meta-train, 6 meta-val
    and 4 meta-test teachers."""
    return load_config("configs/meta/digits.yaml", [
        f"meta.train_teachers={paths[:TRAIN]}", f"meta.val_teachers={paths[TRAIN:TRAIN + VAL]}",
        f"meta.test_teachers={paths[TRAIN + VAL:]}", *overrides])


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
    method.sample_orders = lambda: ([[0, 1, 2, 3]], [0.0])
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


def test_meta_training_moves_the_generator_beyond_its_base_on_held_out_ensembles(zoo):
    """The generator learns something that transfers: meta-trained over random ensembles
    (K = 2..8) of the 8 meta-train teachers with the default's optimiser, cosine schedule
    and clipping for 200 steps (2 of the default's 6 epochs of 100 steps; 400 steps
    measured no better on this zoo: margins +0.8..+1.2 over seeds 0..3), the zero-shot
    students it generates for 12 ensembles of the
    6 meta-VALIDATION teachers (never trained on) are more accurate on the val split than
    its starting point, the naive weight average (what base=mix outputs with a zero
    correction, checked exactly). Every network's BN statistics are recomputed the same
    way. (Whether it beats the members is the job's question, answered with intervals in
    docs/weightformer.md; on this zoo it does not.)"""
    from metaensemble.engine.optim import build_optimizer, build_scheduler
    from metaensemble.methods.weightformer.method import make_eval_loader
    from metaensemble.methods.weightformer.student import build_student, weight_average
    from metaensemble.models.batchnorm import recompute_bn

    paths, _ = zoo
    cfg = meta_cfg(paths, "meta.val_ensembles=12", "train.epochs=2")
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
    average = accuracy(recompute_bn(build_student(spec, weight_average([pool.states[i] for i in o])), bn)
                       for o in orders)
    gen.zero_residual_()
    assert generated_accuracy() == pytest.approx(average, abs=1e-4)
    torch.manual_seed(cfg.seed)
    gen = method.build_model(splits.info)

    steps = cfg.train.epochs * cfg.train.steps_per_epoch
    opt = build_optimizer(cfg.optim, method.param_groups(gen))
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps_per_epoch, cfg.train.epochs)
    loader = data.ArrayLoader(splits.train, splits.info, cfg.data.batch_size, shuffle=True, augment=True, seed=0,
                              drop_last=True)
    epoch, step = 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            loss, _ = method.training_step(gen, batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    learned = generated_accuracy()
    # measured on this 18-teacher zoo (seed 0): the mean of the weights 85.00, generated
    # after 200 steps 86.18, mean member 88.71
    # measured on the default's 64-teacher zoo (meta-val ensembles): the mean of the
    # weights 87.12, generated after 800 steps at 3e-4 88.37 (a tuning run), mean member 89.36,
    # ensemble 92.55
    assert learned > average + 0.5, (learned, average)
