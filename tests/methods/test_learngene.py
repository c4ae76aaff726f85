"""Learngene stage 1 as an engine method and both stages of jobs/learngene.py: KD with
alpha = 1 uses no labels and gives the teacher no gradient (property 7), the DeiT lr
rule, foreign teacher files, a 2-worker gloo DDP aux-net run, descendants from the
registered learngene against random init, and bad input refused before any work."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import pytest
import torch

from metaensemble import data, tracking
from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.methods.learngene import experiment
from metaensemble.methods.learngene.method import LearngeneAux, load_foreign_teacher, soft_kd_loss
from metaensemble.models import create_model, save_model
from metaensemble.validation import load_config

TINY = "model.kwargs={embed_dim: 16, num_heads: 2, stages: L4_22, patch_size: 2}"


def _cfg(tmp: Path, *overrides: str):
    return load_config("configs/learngene/digits.yaml", [
        f"storage_path={tmp / 'ray'}", f"experiment=test/learngene-{uuid.uuid4().hex[:8]}", TINY, *overrides])


def _teacher_dir(tmp: Path, num_classes: int = 10, seed: int = 0) -> str:
    torch.manual_seed(seed)
    d = tmp / f"teacher-{num_classes}-{seed}"
    save_model(create_model("convnet", num_classes=num_classes, in_chans=1, img_size=8, width=4), d, dataset="digits")
    return str(d)


def _method(tmp: Path, *overrides: str) -> tuple[LearngeneAux, dict]:
    cfg = _cfg(tmp, f"learngene.teacher={_teacher_dir(tmp)}", *overrides)
    m = LearngeneAux(cfg)
    splits = data.load(cfg.data)
    model = m.build_model(splits.info)
    batch = next(iter(data.ArrayLoader(splits.train, splits.info, 16, shuffle=True)))
    return m, {"model": model, "batch": batch}


def test_kd_with_alpha_one_uses_no_labels_and_gives_the_teacher_no_gradient(tmp_path):
    m, s = _method(tmp_path, "learngene.alpha=1.0", "learngene.temperature=2.0")
    batch = s["batch"]
    loss, logs = m.training_step(s["model"], batch)
    shuffled = {**batch, "y": batch["y"].roll(1)}
    assert float(m.training_step(s["model"], shuffled)[0].detach()) == pytest.approx(float(loss.detach()), abs=1e-6)
    loss.backward()
    teacher = m.teachers("cpu")[0]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(p.grad is not None for p in s["model"].parameters() if p.requires_grad)
    with torch.no_grad():
        expected = soft_kd_loss(s["model"](batch["x"]), teacher(batch["x"]), 2.0)
    loss = loss.detach()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_soft_kd_is_t2_kl_from_the_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    p = torch.softmax(t / 3, -1)
    kl = (p * (p.log() - torch.log_softmax(s / 3, -1))).sum(-1).mean()
    assert float(soft_kd_loss(s, t, 3.0)) == pytest.approx(9 * float(kl), rel=1e-5)
    assert float(soft_kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_labels_enter_below_alpha_one_and_through_mixup(tmp_path):
    m, s = _method(tmp_path, "learngene.alpha=0.5", "learngene.mixup=0.8", "learngene.cutmix=1.0")
    batch = s["batch"]
    torch.manual_seed(0)
    import numpy as np

    np.random.seed(0)
    a = float(m.training_step(s["model"], batch)[0].detach())
    np.random.seed(0)
    torch.manual_seed(0)
    b = float(m.training_step(s["model"], {**batch, "y": (batch["y"] + 1) % 10})[0].detach())
    assert abs(a - b) > 1e-4
    assert m._mixup is not None and m._mixup.cutmix_alpha == 1.0


def test_the_deit_rule_scales_the_base_lr_by_global_batch_over_512(tmp_path):
    m, s = _method(tmp_path, "data.batch_size=128", "scaling.num_workers=2", "optim.lr=4e-3", "optim.min_lr=1e-5",
                   "optim.warmup_epochs=1", "train.epochs=4")
    opt, sched = m.configure_optimizer(s["model"], steps_per_epoch=10)
    sched.set_step(10)  # the end of the warm-up: the scaled base lr
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([4e-3 * 128 * 2 / 512] * len(opt.param_groups))
    sched.set_step(40)  # the end of the cosine: min_lr, unscaled (as DeiT)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5] * len(opt.param_groups))
    assert any(g["weight_decay"] == 0 for g in opt.param_groups)  # pos_embed, norms, biases: no decay
    m2, s2 = _method(tmp_path, "learngene.lr_batch_reference=null", "optim.lr=4e-3", "optim.warmup_epochs=1")
    opt2, sched2 = m2.configure_optimizer(s2["model"], steps_per_epoch=10)
    sched2.set_step(10)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([4e-3] * len(opt2.param_groups))


def test_a_foreign_teacher_file_loads_strictly_without_unpickling(tmp_path):
    info = data.load(_cfg(tmp_path).data).info
    torch.manual_seed(3)
    ref = create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=4).eval()
    path = tmp_path / "teacher.pth"
    torch.save({"model": ref.state_dict()}, path)
    got = load_foreign_teacher(str(path), "convnet", {"width": 4}, info).eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(got(x), ref(x))
    with pytest.raises(CheckpointError, match=r"shape mismatch .*0.weight: checkpoint \(4, 1, 3, 3\) vs model \(8, 1, 3, 3\)"):
        load_foreign_teacher(str(path), "convnet", {"width": 8}, info)
    torch.save({"model": ref.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_foreign_teacher(str(path), "convnet", {"width": 4}, info)
    cfg = _cfg(tmp_path, f"learngene.teacher={path}")
    with pytest.raises(ConfigError, match="set learngene.teacher_arch"):
        LearngeneAux(cfg).validate()
    # checked before any work: another class count (or shape) in the file is refused by validate
    torch.save({"model": create_model("convnet", num_classes=7, in_chans=1, img_size=8, width=4).state_dict()}, path)
    cfg = _cfg(tmp_path, f"learngene.teacher={path}", "learngene.teacher_arch=convnet",
               "learngene.teacher_kwargs={width: 4}")
    with pytest.raises(CheckpointError, match=r"13.weight: checkpoint \(7, 16\) vs model \(10, 16\)"):
        LearngeneAux(cfg).validate()
    # a procedural dataset is generated with real tensors (not on validate's meta device)
    torch.save({"model": create_model("convnet", num_classes=10, in_chans=3, img_size=16, width=4).state_dict()}, path)
    LearngeneAux(_cfg(tmp_path, f"learngene.teacher={path}", "learngene.teacher_arch=convnet",
                      "learngene.teacher_kwargs={width: 4}", "data.name=synthetic", "data.image_size=16",
                      "data.num_samples=200")).validate()


def test_mixup_mixes_the_images_the_student_and_teacher_see(tmp_path):
    import numpy as np

    plain, s = _method(tmp_path, "learngene.alpha=1.0")
    mixed, _ = _method(tmp_path, "learngene.alpha=1.0", "learngene.mixup=0.8", "learngene.mixup_prob=1.0")
    mixed._teachers = plain.teachers("cpu")
    np.random.seed(0)
    a = float(plain.training_step(s["model"], s["batch"])[0].detach())
    b = float(mixed.training_step(s["model"], s["batch"])[0].detach())
    assert float(plain.training_step(s["model"], s["batch"])[0].detach()) == a  # deterministic without mixup
    assert abs(a - b) > 1e-3 * a  # alpha = 1: no label enters, so only mixed inputs can change the loss


def test_descendants_take_a_learngene_written_by_the_original_code(tmp_path):
    from metaensemble.methods.learngene.original import to_original_state

    cfg = _cfg(tmp_path)
    torch.manual_seed(5)
    aux = create_model("aux_vit", num_classes=10, in_chans=1, img_size=8, **cfg.model.kwargs).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": to_original_state(aux), "args": argparse.Namespace(model="aux"), "epoch": 3}, path)
    got = experiment.load_learngene(str(path), cfg)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(got(x), aux(x))
    wide = cfg.with_overrides({"model.kwargs.embed_dim": 32})
    with pytest.raises(CheckpointError, match="not an aux-net of this shape"):
        experiment.load_learngene(str(path), wide)


@pytest.mark.parametrize("override, error, message", [
    ("model.kwargs={embed_dim: 16, num_heads: 2, stages: L5_22, patch_size: 2}", ConfigError, "sum"),
    ("model.name=deit_tiny", ConfigError, "set model.name=aux_vit"),
    ("learngene.teacher=null", ConfigError, "needs a teacher"),
])
def test_bad_aux_configs_are_refused_before_work(override, error, message, tmp_path):
    cfg = _cfg(tmp_path, f"learngene.teacher={_teacher_dir(tmp_path)}", override)
    with pytest.raises(error, match=message):
        LearngeneAux(cfg).validate()


def test_a_teacher_with_another_class_count_is_refused(tmp_path):
    cfg = _cfg(tmp_path, f"learngene.teacher={_teacher_dir(tmp_path, num_classes=7)}")
    with pytest.raises(CheckpointError, match="predicts 7 classes, but digits has 10"):
        LearngeneAux(cfg).validate()


# ---- stage 2's recipe: method learngene_descendant ------------------------------------------
def _descendant(tmp: Path, *overrides: str, init_uri: str | None = None):
    """A depth-4 descendant's finetuning config (``experiment.finetune_config``), its method,
    model and a batch."""
    from metaensemble import methods

    cfg = _cfg(tmp, *overrides)
    aux = create_model("aux_vit", num_classes=10, in_chans=1, img_size=8, **cfg.model.kwargs)
    fc = experiment.finetune_config(cfg, aux, 4, init_uri)
    m = methods.build(fc)
    m.validate()
    splits = data.load(fc.data)
    torch.manual_seed(3)
    model = m.build_model(splits.info)
    batch = next(iter(data.ArrayLoader(splits.train, splits.info, 16, shuffle=True)))
    return fc, m, model, batch


def test_descendants_finetune_with_cross_entropy_and_read_no_stage_1_field(tmp_path):
    """12: a descendant run is method learngene_descendant; without Mixup its loss is the
    supervised label-smoothed cross-entropy (the digits default's numbers stay); the
    teacher, alpha and T are reset, so they do not name the descendants' runs."""
    import torch.nn.functional as F

    fc, m, model, batch = _descendant(tmp_path, "learngene.teacher=/a/teacher", "learngene.alpha=0.5")
    assert fc.method == "learngene_descendant" and type(m).__name__ == "LearngeneDescendant"
    assert fc.learngene.teacher is None and fc.learngene.alpha == 1.0
    other, *_ = _descendant(tmp_path, "learngene.teacher=/b/teacher", "learngene.temperature=4")
    assert fc.config_hash() == other.config_hash()
    loss, logs = m.training_step(model, batch)
    expected = F.cross_entropy(model(batch["x"]), batch["y"], label_smoothing=0.1)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert fc.train.label_smoothing == 0.1
    assert "ema" not in logs and torch.is_tensor(m.predict(model.eval(), [batch])[0])  # no EMA: one prediction


def test_descendants_take_deits_mixup_cutmix_and_model_ema(tmp_path):
    """12: with learngene.mixup/cutmix the descendant trains on timm's mixed images and soft
    targets; with learngene.model_ema an EMA follows every optimiser step (decay d:
    ema <- d ema + (1 - d) w), is evaluated beside the network as 'ema', and comes back
    from the method's checkpoint state."""
    import numpy as np

    overrides = ("learngene.mixup=0.8", "learngene.cutmix=1.0", "learngene.model_ema=true",
                 "learngene.model_ema_decay=0.9")
    fc, m, model, batch = _descendant(tmp_path, *overrides)
    assert m._mixup is not None and m._mixup.mixup_alpha == 0.8 and m._mixup.cutmix_alpha == 1.0
    opt, _ = m.configure_optimizer(model, steps_per_epoch=5)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    np.random.seed(0)
    torch.manual_seed(0)
    loss, _ = m.training_step(model, batch)
    np.random.seed(0)
    torch.manual_seed(0)
    x, target = m._mixup(batch["x"].clone(), batch["y"])
    soft = torch.sum(-target * torch.log_softmax(model(x), -1), -1).mean()
    assert float(loss.detach()) == pytest.approx(float(soft.detach()), rel=1e-5)
    assert not torch.equal(x, batch["x"])  # the caller's batch is left alone, the model saw mixed images
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema = m._ema.module.state_dict()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ema[k], 0.9 * w0[k] + 0.1 * v.detach(), atol=1e-6, rtol=1e-5)
    pred, _ = m.predict(model.eval(), [batch])
    assert list(pred) == ["model", "ema"] and not torch.equal(pred["model"], pred["ema"])
    # the EMA in the checkpoint's method state, restored on resume
    state = m.state_dict()
    _, again, model2, _ = _descendant(tmp_path, *overrides)
    again.load_state_dict(state)
    again.configure_optimizer(model2, steps_per_epoch=5)
    assert all(torch.equal(again._ema.module.state_dict()[k], v) for k, v in state["ema"].items())


def test_the_aux_net_keeps_the_ema_too(tmp_path):
    """12: learngene.model_ema applies to stage 1 as well (DeiT's default in both stages)."""
    m, s = _method(tmp_path, "learngene.model_ema=true")
    m.configure_optimizer(s["model"], steps_per_epoch=2)
    pred, _ = m.predict(s["model"].eval(), [s["batch"]])
    assert list(pred) == ["model", "ema"] and set(m.state_dict()) == {"ema"}


def test_a_descendant_run_needs_a_descendant_and_an_even_batch_with_mixup(tmp_path):
    from metaensemble.methods.learngene.method import LearngeneDescendant

    fc, *_ = _descendant(tmp_path)
    with pytest.raises(ConfigError, match="set model.name=descendant_vit"):
        LearngeneDescendant(fc.with_overrides({"model.name": "aux_vit"})).validate()
    with pytest.raises(ConfigError, match="batch_size must be even"):
        LearngeneDescendant(fc.with_overrides({"learngene.mixup": 0.8, "data.batch_size": 63})).validate()


# ---- both stages through the job's pipeline, on a real Ray instance -------------------------
@pytest.fixture(scope="module")
def stages(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learngene")
    cfg = _cfg(tmp, f"learngene.teacher={_teacher_dir(tmp, seed=1)}", "train.epochs=2", "scaling.num_workers=2",
               "scaling.cpus_per_worker=1", "learngene.depths=[2,4]", "learngene.finetune_epochs=2")
    aux = experiment.run_aux(cfg)
    # The descendants need no DDP (the aux-net run covers it): one worker, of 2 of the 4
    # logical CPUs, so that one run fits at a time and train_configs packs all four runs
    # into one Ray Train run (one start-up; on 2 cores, 4 at once paid 4).
    cfg = cfg.with_overrides({"scaling.num_workers": 1, "scaling.cpus_per_worker": 2})
    return cfg, aux, experiment.run_descendants(cfg)


def test_the_aux_net_trains_with_two_ddp_workers_and_is_registered_as_the_learngene(stages):
    cfg, aux, _ = stages
    client = tracking.client()
    run = client.get_run(aux.run_id)
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    mv = client.get_model_version("learngene.digits.aux_vit", aux.version)
    assert mv.run_id == aux.run_id and mv.tags["stages"] == "[2, 2]"
    assert aux.parameters == sum(p.numel() for p in create_model(
        "aux_vit", num_classes=10, in_chans=1, img_size=8, **cfg.model.kwargs).parameters())


def test_descendants_grow_from_the_learngene_and_train_against_random_init(stages):
    from metaensemble.models import load

    cfg, aux_out, out = stages
    assert out.learngene == f"models:/learngene.digits.aux_vit/{aux_out.version}"
    assert [r.depth for r in out.rows] == [2, 4]
    assert [r.layers_source for r in out.rows] == [[0, 1], [0, 0, 1, 1]]
    client = tracking.client()
    for r in out.rows:
        for kind in ("learngene", "scratch"):
            run = client.get_run(out.run_ids[f"{kind}/d{r.depth}"])
            assert run.info.status == "FINISHED"
            assert run.data.params["model.kwargs.depth"] == str(r.depth)
            assert (run.data.params.get("model.init_from") not in (None, "None", "null")) == (kind == "learngene")
        assert set(r.learngene) == {"val_acc_1", "val_acc_n", "test_acc", "train_s"}
    assert out.storage_ratio == pytest.approx(sum(r.parameters for r in out.rows) / out.learngene_parameters)
    # the depth-4 descendant of an L4_22 learngene starts as the aux-net itself (property 6)
    aux = load(out.learngene)
    init = load(f"runs:/{out.parent_run_id}/descendant_init/{experiment.init_name(4, [0, 0, 1, 1])}")
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(init(x), aux(x), atol=1e-5, rtol=1e-5)
    assert "descendants_table.md" in {a.path for a in client.list_artifacts(out.parent_run_id)}
    # val@N is the last epoch's val accuracy, not the selected network's (logged after it)
    for r in out.rows:
        hist = sorted(client.get_metric_history(out.run_ids[f"learngene/d{r.depth}"], "val_acc"),
                      key=lambda m: (m.step, m.timestamp))
        assert r.learngene["val_acc_n"] == [m.value for m in hist if m.step == cfg.learngene.finetune_epochs][0]


def test_another_layers_source_is_another_descendant_run(stages):
    cfg, aux_out, out = stages
    again = experiment.run_descendants(cfg.with_overrides({"learngene.depths": [4],
                                                            "learngene.layers_source": [0, 0, 0, 1]}))
    assert again.rows[0].layers_source == [0, 0, 0, 1]
    assert again.run_ids["learngene/d4"] != out.run_ids["learngene/d4"]
    assert again.run_ids["scratch/d4"] == out.run_ids["scratch/d4"]  # random init does not depend on it


def test_a_learngene_of_another_width_is_refused_before_any_run(stages, tmp_path):
    cfg, aux_out, _ = stages
    wide = cfg.with_overrides({"model.kwargs.embed_dim": 32, "experiment": f"test/lg-{uuid.uuid4().hex[:6]}",
                               "learngene.learngene": f"models:/learngene.digits.aux_vit/{aux_out.version}"})
    with pytest.raises(ConfigError, match="its embed_dim is 16, the config's model.kwargs.embed_dim is 32"):
        experiment.run_descendants(wide)
    assert tracking.client().get_experiment_by_name(wide.experiment_name) is None


def test_an_invalid_layers_source_is_refused_before_any_run(stages):
    cfg, aux_out, _ = stages
    bad = cfg.with_overrides({"learngene.depths": [3], "learngene.layers_source": [1, 0, 1],
                              "experiment": f"test/lg-{uuid.uuid4().hex[:6]}"})
    with pytest.raises(ConfigError, match="decreas|non-decreasing"):
        experiment.run_descendants(bad)
    assert tracking.client().get_experiment_by_name(bad.experiment_name) is None


@pytest.mark.parametrize("name, params", [("imagenet_aux_s", 9_628_648), ("imagenet_aux_b", 36_951_016)])
def test_the_imagenet_configs_build_the_papers_aux_nets(name, params):
    cfg = load_config(f"configs/learngene/{name}.yaml")
    with torch.device("meta"):
        aux = create_model(cfg.model.name, num_classes=1000, in_chans=3, img_size=cfg.data.image_size,
                           **cfg.model.kwargs)
    assert sum(p.numel() for p in aux.parameters()) == params
    assert cfg.scaling.num_workers * cfg.data.batch_size == 512 and cfg.data.transform == "deit"
    assert cfg.learngene.teacher_arch == "levit_384" and cfg.train.amp


@pytest.mark.parametrize("name, lr", [("imagenet_aux_s", 5e-5), ("imagenet_aux_b", 1e-5)])
def test_the_imagenet_configs_give_the_papers_descendants_with_deits_recipe(name, lr):
    """12: depth 12 from the paper's list in the same run as the other depths (their default
    spread), the learngene's head (the original's ImageNet branch), and DeiT's defaults for
    the descendants: Mixup 0.8, CutMix 1.0, label smoothing 0.1, model EMA 0.99996,
    repeated augmentation x3; every descendant config validates."""
    from metaensemble import methods
    from metaensemble.methods.learngene.model import check_layers_source, default_layers_source

    cfg = load_config(f"configs/learngene/{name}.yaml")
    lg = cfg.learngene
    assert lg.depths == [6, 9, 12, 15] and lg.source_for(12) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [lg.source_for(d) for d in (6, 9, 15)] == [None] * 3
    assert lg.head == "auto" and experiment.copies_head(lg.head, "imagenet", True)
    assert (lg.mixup, lg.cutmix, lg.mixup_prob, lg.label_smoothing) == (0.8, 1.0, 1.0, 0.1)
    assert lg.model_ema and lg.model_ema_decay == 0.99996 and cfg.data.repeated_aug == 3
    with torch.device("meta"):
        aux = create_model(cfg.model.name, num_classes=1000, in_chans=3, img_size=224, **cfg.model.kwargs)
    for d in lg.depths:
        src = check_layers_source(lg.source_for(d) or default_layers_source(aux.stage_sizes, d), d, 5)
        fc = experiment.finetune_config(cfg, aux, d, f"runs:/parent/descendant_init/{experiment.init_name(d, src)}")
        methods.build(fc).validate()
        assert fc.method == "learngene_descendant" and fc.model.kwargs["style"] == "deit"
        assert fc.optim.lr == pytest.approx(lr) and fc.optim.warmup_epochs == 0 and fc.train.epochs == 10
        assert fc.learngene.mixup == 0.8 and fc.learngene.model_ema and fc.data.repeated_aug == 3
