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


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """12 digits convnets (width 8), 6 epochs each, different seeds."""
    root = tmp_path_factory.mktemp("zoo")
    torch.set_num_threads(2)
    splits = data.load(load_config("configs/teachers/digits.yaml").data)
    paths = []
    for seed in range(12):
        torch.manual_seed(seed)
        m = create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=8)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        loader = data.ArrayLoader(splits.train, splits.info, 64, shuffle=True, augment=True, seed=seed, drop_last=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 6 * len(loader))
        for ep in range(6):
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


def test_generator_fits_an_ensemble_through_the_student(zoo):
    """Optimisation reaches the generator: on one ensemble and one batch, training the
    generator (the method's own step, loss through functional_call) lowers the KD loss
    of the student it generates, and the student it then generates is closer to the
    ensemble than the anchor is."""
    paths, splits = zoo
    cfg = load_config("configs/meta/digits.yaml", [
        "model.kwargs.student_kwargs={width: 8}", f"meta.train_teachers={paths[:4]}",
        f"meta.val_teachers={paths[4:8]}", f"meta.test_teachers={paths[8:12]}", "meta.lambda_shift=0"])
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
