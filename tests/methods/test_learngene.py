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
    a = float(m.training_step(s["model"], batch)[0])
    np.random.seed(0)
    torch.manual_seed(0)
    b = float(m.training_step(s["model"], {**batch, "y": (batch["y"] + 1) % 10})[0])
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


# ---- both stages through the job's pipeline, on a real Ray instance -------------------------
@pytest.fixture(scope="module")
def stages(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learngene")
    cfg = _cfg(tmp, f"learngene.teacher={_teacher_dir(tmp, seed=1)}", "train.epochs=2", "scaling.num_workers=2",
               "scaling.cpus_per_worker=1", "learngene.depths=[2,4]", "learngene.finetune_epochs=2")
    aux = experiment.run_aux(cfg)
    # The descendants need no DDP (the aux-net run covers it): one worker of a quarter CPU
    # each lets all four finetuning runs go side by side (0.5 + 0.25 CPU per trial on the
    # 4 logical CPUs: one wave, not 3 runs and then 1).
    cfg = cfg.with_overrides({"scaling.num_workers": 1, "scaling.cpus_per_worker": 0.25})
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
