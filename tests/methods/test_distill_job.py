"""jobs/distill.py end to end on a real local Ray instance and MLflow server: teachers
trained into the zoo first, KD / LatentBE / TDiv-SDiv students over two seeds, the
table, the reliability diagram, registered students that load as plain models and score
what their runs logged; a 2-worker DDP TDiv-SDiv run; bad input refused before work."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from metaensemble import tracking
from metaensemble.config import REPO_ROOT
from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.evaluation import format_seed_table
from metaensemble.methods.latentbe import experiment
from metaensemble.methods.latentbe.batchensemble import BE_LAYERS
from metaensemble.validation import load_config


def _teacher_recipe(tmp: Path, **changes) -> Path:
    raw = yaml.safe_load((REPO_ROOT / "configs/teachers/digits_narrow.yaml").read_text())
    raw["train"]["epochs"] = 4
    for dotted, v in changes.items():
        node = raw
        *head, last = dotted.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    path = tmp / f"teachers-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cfg(tmp: Path, *overrides: str, recipe: Path | None = None):
    return load_config("configs/distill/digits.yaml", [
        f"storage_path={tmp / 'ray'}", f"experiment=test/distill-{uuid.uuid4().hex[:8]}", "train.epochs=3",
        "distill.seeds=[0,1]", "latentbe.members=2", f"distill.teacher_config={recipe or _teacher_recipe(tmp)}", *overrides])


@pytest.fixture(scope="module")
def job(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    # the zoo's missing teachers in one Ray Train run (a pack), not one run each; the
    # students one run at a time (2 CPUs a worker, one torch thread), so all six, of three
    # methods, train as one pack in one Ray Train run, without Tune trials
    cfg = _cfg(tmp, "scaling.cpus_per_worker=2", "scaling.torch_threads=1",
               recipe=_teacher_recipe(tmp, **{"zoo.pack_size": 2}))
    return cfg, experiment.run(cfg)


def test_the_job_trains_every_student_and_prints_the_papers_table(job):
    cfg, out = job
    assert [r.key for r in out.rows] == ["teacher", "member", "kd", "latentbe", "tdiv_sdiv"]
    students = {r.key: r for r in out.rows[2:]}
    assert all(r.n == 2 and len(r.per_seed) == 2 and r.train_s > 0 for r in students.values())
    for r in out.rows:
        assert set(r.mean) >= {"acc", "nll", "ece", "cnll", "cece"}
        assert 0.0 < r.mean["acc"] <= 1.0 and r.mean["nll"] > 0
    # the mean +- std is over the seeds' own values
    kd = students["kd"]
    assert kd.mean["acc"] == pytest.approx(sum(p["acc"] for p in kd.per_seed) / 2)
    assert kd.std["acc"] == pytest.approx(abs(kd.per_seed[0]["acc"] - kd.per_seed[1]["acc"]) / 2 ** 0.5)
    table = format_seed_table(out.rows)
    assert "Teacher DE-2" in table and "+ TDiv-SDiv" in table and "+-" in table
    assert set(out.directions) == {"every student below DE-M", "LatentBE at or above KD in NLL",
                                   "TDiv-SDiv best student in NLL", "TDiv-SDiv best student in ECE"}


def test_the_parent_run_holds_the_table_the_diagrams_and_every_student_as_a_child(job):
    cfg, out = job
    client = tracking.client()
    names = {a.path for a in client.list_artifacts(out.parent_run_id)}
    assert {"distill_table.md", "distill_table.json", "reliability.png"} <= names
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["tdiv_sdiv_nll"] == pytest.approx(out.rows[-1].mean["nll"])
    exp_id = tracking.experiment_id(client, cfg.experiment_name)
    children = tracking.child_runs(client, exp_id, out.parent_run_id)
    assert sorted(r.info.run_id for r in children) == sorted(out.run_ids.values())
    assert all(r.info.status == "FINISHED" for r in children)
    methods = {r.data.params["method"] for r in children}
    assert methods == {"kd", "latentbe", "tdiv_sdiv"}
    # one run at a time here: the six students of three methods trained as one pack, each
    # as it trains alone (tests/engine/test_engine.py)
    packs = {r.data.tags["metaensemble.ray_run"] for r in children}
    assert len(children) == 6 and len(packs) == 1 and packs.pop().startswith("pack-")


def test_registered_students_load_as_the_teachers_plain_architecture_and_score_what_their_run_logged(job):
    from metaensemble import data
    from metaensemble.methods.base import predict_logp
    from metaensemble.models import load, read_meta

    cfg, out = job
    client = tracking.client()
    splits = data.load(cfg.data)
    test = data.ArrayLoader(splits.test, splits.info, 512)
    teacher_meta = read_meta(__import__("metaensemble.models", fromlist=["local_dir"]).local_dir(out.teachers[0].uri))
    for key, version in out.versions.items():
        method, seed = key.split("/s")
        name = f"student.{cfg.data.name}.{cfg.model.name}.{method}"
        mv = client.get_model_version(name, version)
        assert mv.run_id == out.run_ids[key]
        assert mv.tags["teachers"] == ", ".join(t.label for t in out.teachers)
        assert mv.tags["seed"] == seed
        model = load(f"models:/{name}/{version}")
        assert not any(isinstance(m, BE_LAYERS) for m in model.modules())
        assert model.me_meta["arch"] == teacher_meta["arch"]
        assert model.me_meta["kwargs"] == teacher_meta["kwargs"]
        logp, y = predict_logp(model, test)
        acc = float((logp.argmax(1) == y).float().mean())
        assert acc == pytest.approx(client.get_run(mv.run_id).data.metrics["test_acc"], abs=1e-6)


def test_latentbe_students_are_selected_on_their_folded_network(job):
    """The run's val_acc history is the folded network's: its best epoch's value is the
    val accuracy of the saved (folded) model."""
    from metaensemble import data
    from metaensemble.methods.base import predict_logp
    from metaensemble.models import load

    cfg, out = job
    client = tracking.client()
    rid = out.run_ids["latentbe/s0"]
    run = client.get_run(rid)
    best = int(run.data.metrics["best_epoch"])
    hist = {m.step: m.value for m in client.get_metric_history(rid, "val_acc")}
    splits = data.load(cfg.data)
    logp, y = predict_logp(load(f"runs:/{rid}/model"), data.ArrayLoader(splits.val, splits.info, 512))
    assert float((logp.argmax(1) == y).float().mean()) == pytest.approx(hist[best], abs=1e-6)
    # the gap to the other fold, evaluated beside it, is a metric of its own
    m = run.data.metrics
    for split in ("val", "test"):
        for k in ("acc", "nll", "ece"):
            assert m[f"fold_gap/{split}_{k}"] == pytest.approx(m[f"fold_exact/{split}_{k}"] - m[f"{split}_{k}"])
    assert not any(k.startswith("fold_gap/") for k in client.get_run(out.run_ids["kd/s0"]).data.metrics)


def test_a_tdiv_sdiv_student_trains_with_two_gloo_ddp_workers(job, tmp_path):
    from metaensemble import engine
    from metaensemble.models import load

    cfg, out = job
    c = cfg.with_overrides({"method": "tdiv_sdiv", "seed": 7, "distill.teachers": [t.uri for t in out.teachers], "train.epochs": 1, "task": "distill_ddp",
                            "scaling.num_workers": 2, "scaling.cpus_per_worker": 1,
                            "storage_path": str(tmp_path / "ray")})
    o = engine.fit(c)
    client = tracking.client()
    run = client.get_run(o.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_delta_norm"] == pytest.approx((8 * 8) ** 0.5 / 255, rel=1e-3)
    model = load(o.model_uri)
    assert not any(isinstance(m, BE_LAYERS) for m in model.modules())
    assert torch.isfinite(next(model.parameters())).all()


# ---- bad input: one clear error before any work -------------------------------------------
def _write_teachers(tmp: Path, n: int, **kwargs) -> list[str]:
    from metaensemble.models import create_model, save_model

    out = []
    for i in range(n):
        m = create_model("convnet", num_classes=10, in_chans=1, img_size=8, **kwargs)
        d = tmp / f"t{i}"
        save_model(m, d, dataset="digits")
        out.append(str(d))
    return out


def test_teachers_of_another_architecture_are_refused_before_any_run(mlflow_uri, tmp_path):
    teachers = _write_teachers(tmp_path, 4, width=8)
    cfg = _cfg(tmp_path, f"distill.teachers={teachers}")
    with pytest.raises(CheckpointError, match=r"teacher .* is 'convnet' \{'width': 8\}, but the latentbe student "
                                              r"is 'convnet' \{'width': 4\}"):
        experiment.run(cfg)
    client = tracking.client()
    assert client.get_experiment_by_name(cfg.experiment_name) is None  # nothing opened in MLflow


def test_fewer_teachers_than_members_is_refused(mlflow_uri, tmp_path):
    teachers = _write_teachers(tmp_path, 2, width=4)
    with pytest.raises(ConfigError, match="latentbe.members=4 but distill.teachers has 2"):
        experiment.validate(_cfg(tmp_path, f"distill.teachers={teachers}", "latentbe.members=4"))
    from metaensemble import engine

    c = _cfg(tmp_path, f"distill.teachers={teachers}", "method=latentbe", "latentbe.members=4")
    with pytest.raises(ConfigError, match="latentbe.members=4 but distill.teachers has only 2"):
        engine.validate(c)


def test_a_teacher_recipe_of_another_architecture_is_refused(tmp_path):
    recipe = _teacher_recipe(tmp_path, **{"model.kwargs": {"width": 16}})
    with pytest.raises(ConfigError, match="must have the student's architecture and data"):
        experiment.validate(_cfg(tmp_path, recipe=recipe))


@pytest.mark.parametrize("override, message", [
    ("distill.temperature=0", "distill.temperature: Input should be greater than 0"),
    ("distill.temperature=1000", "distill.temperature: Input should be less than or equal to 100"),
    ("latentbe.perturb_scale=0", "latentbe.perturb_scale: Input should be greater than 0"),
    ("latentbe.perturb_scale=50", "latentbe.perturb_scale: Input should be less than or equal to 16"),
    ("latentbe.members=1", "latentbe.members: Input should be greater than or equal to 2"),
    ("methods=[kd,fold]", "distill.methods.1: Input should be 'kd', 'latentbe' or 'tdiv_sdiv'"),
    ("distill.seeds=[3]", "the table's \\+- std needs at least 2 seeds"),
])
def test_the_job_refuses_bad_input_with_one_clear_message(override, message, tmp_path):
    from conftest import run_script

    store = tmp_path / "store"
    args = ["jobs/distill.py", override, f"storage_path={tmp_path / 'ray'}"]
    if override.startswith("distill.temperature=0"):  # one case in a fresh process, as a user runs it
        p = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "METAENSEMBLE_MLFLOW_HOME": str(store)})
    else:
        p = run_script(args, {"METAENSEMBLE_MLFLOW_HOME": str(store)})
    assert p.returncode != 0
    assert message.replace("\\", "") in p.stderr or pytest.fail(p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    assert not store.exists() or not any(store.iterdir())  # no MLflow store was even started
