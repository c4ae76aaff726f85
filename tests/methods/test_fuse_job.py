"""jobs/fuse.py end to end on a real local Ray instance and MLflow server: parents of
different depths aligned, fused, finetuned and distilled into the fused shape, the
table, the alignment PNG, the fused network registered and loadable; the ``fusion``
engine method in 2-worker DDP building the same network as the driver; skill transfer
and heterogeneous transfer; bad input refused before any work."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metaensemble import data, engine, tracking
from metaensemble.config import REPO_ROOT
from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.methods.fusion import experiment
from metaensemble.methods.fusion.pipeline import fuse_parents
from metaensemble.models import create_model, load, save_model
from metaensemble.validation import load_config


def _train(hidden, seed: int, tmp: Path, label_split=None, epochs: int = 8) -> str:
    """A small digits MLP trained in-process (no Ray: these are the inputs of the job)."""
    cfg = load_config("configs/fusion/digits_mlp.yaml")
    dcfg = cfg.data if label_split is None else cfg.data.model_copy(update={"label_split": label_split})
    splits = data.load(dcfg)
    from metaensemble.methods.weightformer.method import make_eval_loader

    batches = list(make_eval_loader(splits.train, splits.info, 64, "cpu"))
    torch.manual_seed(seed)
    m = create_model("mlp", num_classes=10, in_chans=1, img_size=8, hidden=list(hidden))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(epochs):
        for b in batches:
            opt.zero_grad()
            F.cross_entropy(m(b["x"]), b["y"]).backward()
            opt.step()
    path = tmp / f"mlp-{'-'.join(map(str, hidden))}-s{seed}-{uuid.uuid4().hex[:4]}"
    save_model(m.eval(), path, dataset="digits")
    return str(path)


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parents")
    return _train((24, 20, 16, 12), 0, tmp), _train((24, 16, 12), 1, tmp), tmp


def _cfg(tmp: Path, *overrides: str, config: str = "configs/fusion/digits_mlp.yaml"):
    return load_config(config, [f"storage_path={tmp / 'ray'}", f"experiment=test/fuse-{uuid.uuid4().hex[:8]}",
                                "train.epochs=2", *overrides])


@pytest.fixture(scope="module")
def job(ray_local, parents, tmp_path_factory):
    deep, shallow, _ = parents
    tmp = tmp_path_factory.mktemp("fuse")
    cfg = _cfg(tmp, f"fusion.models=[{deep},{shallow}]")
    return cfg, experiment.run(cfg)


def test_the_job_prints_every_row_of_the_papers_table(job):
    cfg, out = job
    assert [r.key for r in out.rows] == ["parent0", "parent1", "ensemble", "cla", "cla_finetune", "kd"]
    by = {r.key: r for r in out.rows}
    assert by["cla_finetune"].train_s > 0 and by["kd"].train_s > 0
    for r in out.rows:
        assert 0.0 < r.mean["acc"] <= 1.0 and r.mean["nll"] > 0
    assert out.extra["deep"] == 0 and out.extra["anchor"] == 1  # the balanced shallow parent, as in the original
    mapping = out.extra["alignment"]["1"]["mapping"][0]
    assert mapping[0] == 0 and mapping[2] == 3  # first and last pinned; the middle one by its CKA cost
    text = experiment.format_outcome(out)
    assert "CLA one-shot" in text and "CLA + finetune 2 ep" in text and "KD, fused shape, 2 ep" in text


def test_the_registered_fused_network_is_the_driver_fusion_and_seeds_the_finetune(job, parents):
    cfg, out = job
    deep, shallow, _ = parents
    client = tracking.client()
    name = "fused.digits.mlp"
    shot = load(f"models:/{name}/{out.versions['one-shot']}")
    hidden = shot.me_spec["kwargs"]["hidden"]
    assert shot.me_spec["arch"] == "mlp" and len(hidden) == 4 and hidden[0] == 24 and hidden[-1] == 12
    assert 20 not in hidden  # the deep parent's depth at the shallow parent's widths (24, 16, 12)
    splits = data.load(cfg.data)
    again = fuse_parents([load(deep), load(shallow)], cfg.fusion, splits.train, splits.info).model
    for (k, a), b in zip(shot.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # deterministic for the fixed activation seed
    ft = client.get_run(out.run_ids["finetune"])
    assert ft.data.params["model.init_from"] == f"runs:/{out.parent_run_id}/fused"
    assert ft.data.tags.get("mlflow.parentRunId") == out.parent_run_id
    kd = client.get_run(out.run_ids["kd"])
    assert kd.data.params["method"] == "kd" and kd.data.params.get("model.init_from") in (None, "None", "null")
    v = client.get_model_version(name, out.versions["finetuned"])
    assert v.tags["stage"] == "finetuned" and v.run_id == out.run_ids["finetune"]
    names = {a.path for a in client.list_artifacts(out.parent_run_id)}
    assert {"fusion_table.md", "fusion_table.json", "alignment_1.png", "fused"} <= names
    run = client.get_run(out.parent_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["cla_acc"] == pytest.approx(out.rows[3].mean["acc"])


def test_the_fusion_method_fuses_on_every_ddp_worker(ray_local, parents, tmp_path):
    """Two gloo workers each fuse the parents from the same activation sample; with a
    learning rate of ~0 the trained network is the driver's fusion."""
    deep, shallow, _ = parents
    cfg = _cfg(tmp_path, "method=fusion", f"fusion.models=[{deep},{shallow}]", "train.epochs=1",
               "optim.lr=1.0e-12", "optim.weight_decay=0", "scaling.num_workers=2", "fusion.cla_cost=cka")
    assert cfg.model.name == "convnet"  # the method builds the fused network, whatever model says
    outcome = engine.fit(cfg)
    trained = load(outcome.model_uri)
    splits = data.load(cfg.data)
    driver = fuse_parents([load(deep), load(shallow)], cfg.fusion, splits.train, splits.info).model
    assert trained.me_spec == driver.me_spec
    for (k, a), b in zip(trained.state_dict().items(), driver.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_skill_transfer_reports_the_special_label_apart(ray_local, tmp_path):
    from metaensemble.config import LabelSplit

    a = _train((24, 16, 12), 0, tmp_path, LabelSplit(part="a"))
    b = _train((24, 16, 12), 1, tmp_path, LabelSplit(part="b"))
    cfg = _cfg(tmp_path, f"fusion.models=[{a},{b}]", config="configs/fusion/digits_skill_transfer.yaml")
    out = experiment.run(cfg)
    assert [r.key for r in out.rows] == ["parent_a", "parent_b", "ensemble", "naive", "ot"]
    accs = out.extra["label_accuracies"]
    b_row = next(v for k, v in accs.items() if k.startswith("parent B"))
    assert b_row["acc_special"] < 0.05  # B never saw a 4
    a_row = next(v for k, v in accs.items() if k.startswith("parent A"))
    assert a_row["acc_special"] > 0.8
    for label, (key, _) in zip(accs, [(r.key, r) for r in out.rows], strict=True):
        assert out.extra["label_keys"][label] == key
    ot_row = next(r for r in out.rows if r.key == "ot")
    assert accs["OT one-shot"]["acc_all"] == pytest.approx(ot_row.mean["acc"])
    assert "label 4" in experiment.format_outcome(out)


def test_transfer_initialises_the_deep_architecture_from_the_shallow_parent(ray_local, parents, tmp_path):
    deep, shallow, _ = parents
    cfg = _cfg(tmp_path, f"fusion.models=[{deep},{shallow}]", "train.epochs=1", "fusion.pin_start=2",
               config="configs/fusion/digits_transfer.yaml")
    out = experiment.run(cfg)
    assert [r.key for r in out.rows] == ["parent0", "parent1", "balanced", "from_shallow", "scratch"]
    by = {r.key: r for r in out.rows}
    # identity insertion keeps the shallow parent's function
    assert by["balanced"].mean["acc"] == pytest.approx(by["parent1"].mean["acc"])
    assert by["balanced"].mean["nll"] == pytest.approx(by["parent1"].mean["nll"], rel=1e-4)
    # pins 2 + 1 fix the map (0, 1, 3): one identity layer of width 16 at deep position 2
    assert out.extra["architecture"]["kwargs"]["hidden"] == [24, 16, 16, 12]
    assert out.extra["alignment"]["mapping"] == [[0, 1, 3]]
    client = tracking.client()
    init = client.get_run(out.run_ids["from_shallow"]).data.params["model.init_from"]
    assert init == f"runs:/{out.parent_run_id}/transfer_init"
    assert client.get_run(out.run_ids["scratch"]).data.params.get("model.init_from") in (None, "None", "null")


# ---- bad input: one clear error before any work ------------------------------------------------
def _no_new_runs(cfg, fn):
    client = tracking.client()
    before = len(client.search_experiments())
    with pytest.raises(ConfigError) as e:
        fn()
    assert len(client.search_experiments()) == before
    return str(e.value)


def test_bad_input_is_refused_before_any_work(mlflow_uri, parents, tmp_path):
    deep, shallow, _ = parents
    msg = _no_new_runs(None, lambda: experiment.run(_cfg(tmp_path, f"fusion.models=[{deep}]")))
    assert "two or more" in msg
    conv = tmp_path / "conv"
    save_model(create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=4), conv, dataset="digits")
    msg = _no_new_runs(None, lambda: experiment.run(_cfg(tmp_path, f"fusion.models=[{deep},{conv}]")))
    assert "the parents are of different families (convnet, mlp)" in msg  # one family: mlp, vgg, resnet or convnet
    msg = _no_new_runs(None, lambda: experiment.run(_cfg(tmp_path, f"fusion.models=[{deep},{shallow}]",
                                                         "fusion.pin_start=3", "fusion.pin_end=1")))
    assert "pin" in msg
    bad = tmp_path / "corrupt"
    save_model(create_model("mlp", num_classes=10, in_chans=1, img_size=8, hidden=[8]), bad, dataset="digits")
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    client = tracking.client()
    before = len(client.search_experiments())
    with pytest.raises(CheckpointError):
        experiment.run(_cfg(tmp_path, f"fusion.models=[{deep},{bad}]"))
    assert len(client.search_experiments()) == before
    msg = _no_new_runs(None, lambda: experiment.run(_cfg(tmp_path, f"fusion.models=[{deep},{shallow}]",
                                                         "data.name=synthetic", "data.channels=1")))
    assert "this job's data" in msg
    with pytest.raises(ConfigError, match="label_split"):
        experiment.validate(_cfg(tmp_path, config="configs/fusion/digits_skill_transfer.yaml",
                                 ).with_overrides({"data.label_split": None}))
    with pytest.raises(ConfigError, match="skill_transfer"):
        experiment.validate(_cfg(tmp_path, "data.label_split={special: 4}"))
    with pytest.raises(ConfigError, match="splits the data"):
        experiment.validate(_cfg(tmp_path, "data.val_fraction=0.2"))
    with pytest.raises(ConfigError, match="label_split.special=12"):
        data.load(_cfg(tmp_path, "data.label_split={special: 12}").data)


def test_the_job_script_refuses_bad_input_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "jobs/fuse.py", "fusion.solver=simplex"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "solver" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_shipped_fusion_space_sweeps_every_option_the_issue_names():
    from metaensemble.sweep.space import load_space

    space = load_space("search_spaces/fusion.yaml")
    assert space.metric == "val_acc"  # scored on val, never test
    assert {"fusion.ground_metric", "fusion.solver", "fusion.sinkhorn_reg", "fusion.cla_cost", "fusion.pin_start",
            "fusion.pin_end", "fusion.weight", "optim.lr"} <= set(space.params)
    base = space.base_config([])
    assert base.method == "fusion" and base.fusion.models == []  # filled by FusionMethod.prepare_sweep
    from metaensemble.methods.fusion.method import FusionMethod

    assert callable(FusionMethod.prepare_sweep)


def test_other_parents_open_another_job_run(parents):
    """parent_configs is not part of the config hash: the networks it resolved to name
    the run, or a job on new parents would reopen the old run and reuse its finetune."""
    deep, shallow, _ = parents
    cfg = load_config("configs/fusion/digits_mlp.yaml")
    a = experiment.run_key(cfg, [experiment.Parent(deep, "a"), experiment.Parent(shallow, "b")])
    b = experiment.run_key(cfg, [experiment.Parent(deep, "a"), experiment.Parent(deep, "b")])
    assert a != b and a == experiment.run_key(cfg, [experiment.Parent(deep, "x"), experiment.Parent(shallow, "y")])


def test_the_trained_rows_finetune_the_fused_network_by_ce_or_by_kd_and_distil_a_fresh_one():
    spec = {"arch": "mlp", "kwargs": {"num_classes": 10, "in_chans": 1, "img_size": 8, "hidden": [64, 64]}}
    parents = ["models:/p/1", "models:/p/2"]
    ce = experiment.trained_rows(load_config("configs/fusion/digits_mlp.yaml"), spec, "runs:/abc/fused", parents)
    kd = experiment.trained_rows(load_config("configs/fusion/digits_mlp.yaml", ["fusion.finetune=kd"]), spec,
                                 "runs:/abc/fused", parents)
    assert ce["finetune"].method == "supervised" and kd["finetune"].method == "kd"
    assert kd["finetune"].distill.teachers == parents
    for runs in (ce, kd):
        assert runs["finetune"].model.init_from == "runs:/abc/fused"
        assert runs["finetune"].model.name == "mlp" and runs["finetune"].model.kwargs == {"hidden": [64, 64]}
        assert runs["kd"].method == "kd" and runs["kd"].model.init_from is None
        assert runs["kd"].distill.teachers == parents
    only = experiment.trained_rows(load_config("configs/fusion/digits_mlp.yaml", ["fusion.rows=[kd]"]), spec,
                                   "runs:/abc/fused", parents)
    assert list(only) == ["kd"]
