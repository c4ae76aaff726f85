"""Search-space validation (no Ray) and a real ASHA sweep of engine runs on digits."""

from __future__ import annotations

import time
import uuid

import pytest
import yaml

from metaensemble import tracking
from metaensemble.errors import SearchSpaceError
from metaensemble.sweep import load_space, run_sweep


def _space(tmp_path, **changes):
    d = {
        "name": f"t{uuid.uuid4().hex[:6]}",
        "base": "configs/teachers/digits.yaml",
        "overrides": {"storage_path": str(tmp_path / "ray"), "model.kwargs.width": 8, "train.epochs": 6},
        "metric": "val_acc", "mode": "max", "num_samples": 1, "max_concurrent_trials": 2,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "params": {"optim.lr": {"grid": [0.1, 0.05, 1.0e-5, 2.0e-5]}},
    }
    d.update(changes)
    p = tmp_path / f"{d['name']}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_shipped_teacher_space_is_valid():
    space = load_space("search_spaces/teacher.yaml")
    assert space.metric == "val_acc" and set(space.params) == {"optim.lr", "optim.weight_decay", "train.epochs"}


def test_shipped_generator_space_is_valid_and_scores_meta_validation_ensembles():
    space = load_space("search_spaces/generator.yaml")
    assert space.metric == "val_acc" and space.scheduler.name == "asha"
    assert {"model.kwargs.d_model", "model.kwargs.depth", "model.kwargs.heads", "model.kwargs.base",
            "model.kwargs.residual_scale", "optim.lr", "distill.alpha", "distill.temperature", "meta.lambda_mask",
            "meta.lambda_shift", "meta.cutoff", "meta.mask_lr_scale", "data.train_fraction"} == set(space.params)
    base = space.base_config([])
    assert base.method == "weightformer" and base.meta.ablations == []
    # val_acc of a weightformer run is measured on students generated for meta-val
    # ensembles; the meta-test teachers only ever enter the final test report
    from metaensemble.methods.weightformer import WeightFormerMethod

    assert "meta-validation" in WeightFormerMethod.predict.__doc__


@pytest.mark.parametrize("changes,match", [
    ({"metric": "test_acc"}, r"metric must be a validation metric"),
    ({"params": {"optim.lrr": {"uniform": [0.1, 0.2]}}}, r"unknown config key 'optim.lrr'; valid keys here: .*lr"),
    ({"params": {"optim.lr": {"gaussian": [0.1, 0.2]}}}, r"expected one of \{uniform, loguniform, choice, randint, grid\}"),
    ({"params": {"optim.lr": {"loguniform": [0.0, 0.2]}}}, r"low must be > 0"),
    ({"params": {"optim.lr": {"uniform": [0.3, 0.2]}}}, r"low < high"),
    ({"params": {}}, r"params is empty"),
    ({"schedular": {"name": "asha"}}, r"unknown key 'schedular'"),
    ({"scheduler": {"name": "pbt"}}, r"scheduler.name"),
    ({"base": "configs/nope.yaml"}, r"config file not found"),
    ({"params": {"optim.lr": {"choice": [0.1, "fast"]}}}, r"optim.lr"),
])
def test_invalid_space_files_name_the_problem(tmp_path, changes, match):
    with pytest.raises(SearchSpaceError, match=match):
        load_space(_space(tmp_path, **changes))


def test_missing_and_malformed_space_files(tmp_path):
    with pytest.raises(SearchSpaceError, match=r"not found; shipped: .*teacher.yaml"):
        load_space(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        load_space(tmp_path / "bad.yaml")


def test_command_line_sets_sweep_settings_and_overrides_the_base(tmp_path):
    space = load_space(_space(tmp_path))
    changed, rest = space.split_overrides(["num_samples=3", "max_concurrent_trials=1", "train.epochs=2"])
    assert (changed.num_samples, changed.max_concurrent_trials) == (3, 1)
    assert (space.num_samples, space.max_concurrent_trials) == (1, 2)  # the loaded space is untouched
    assert rest == ["train.epochs=2"] and changed.base_config(rest).train.epochs == 2
    for bad, match in [("num_samples=0", r"num_samples must be >= 1, got 0"),
                       ("num_samples=many", r"num_samples must be an integer, got 'many'"),
                       ("max_concurrent_trials=-1", r"max_concurrent_trials must be >= 0")]:
        with pytest.raises(SearchSpaceError, match=match):
            space.split_overrides([bad])


def test_asha_sweep_stops_trials_early_with_one_child_run_per_trial(ray_local, tmp_path):
    # two learning rates that learn run first (2 at once), so the one that cannot is
    # measured against them at its first rung
    space = load_space(_space(tmp_path, params={"optim.lr": {"grid": [0.1, 0.05, 1.0e-5]}}))
    outcome = run_sweep(space)
    assert len(outcome.trials) == 3
    stopped = [t for t in outcome.trials if not t["done"]]
    assert stopped, "ASHA should stop the trials whose learning rate cannot learn"
    assert all(t["epochs"] < 6 for t in stopped)
    assert outcome.best_params["optim.lr"] in (0.1, 0.05)

    c = tracking.client()
    children = tracking.child_runs(c, outcome.experiment_id, outcome.parent_run_id)
    assert len(children) == 3
    by_status = sorted(r.info.status for r in children)
    assert by_status == ["FINISHED"] * 3  # an early stop is the sweep working: FINISHED, tagged
    tagged = [r for r in children if r.data.tags.get("metaensemble.stopped_early") == "asha"]
    assert len(tagged) == len(stopped)
    parent = c.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_val_acc"] == outcome.best_metric

    # No placement group of a stopped trial is left holding resources.
    from ray.util.state import list_placement_groups

    deadline = time.monotonic() + 30
    while (live := [p for p in list_placement_groups() if p.state == "CREATED"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not live, live

    # The same command again restores the finished sweep instead of running new trials.
    again = run_sweep(space)
    assert again.parent_run_id == outcome.parent_run_id
    assert len(tracking.child_runs(c, outcome.experiment_id, outcome.parent_run_id)) == 3


def test_a_trial_whose_worker_raises_ends_failed_in_mlflow(ray_local, tmp_path):
    """A width the config accepts (model.kwargs is free-form) but no convnet can be built
    with: the engine run raises inside its Ray Train worker. That trial is an error, not
    an early stop: its MLflow run ends FAILED (never left RUNNING), the other FINISHED."""
    space = load_space(_space(tmp_path, scheduler={"name": "fifo"}, max_concurrent_trials=2,
                              overrides={"storage_path": str(tmp_path / "ray"), "train.epochs": 1},
                              params={"model.kwargs.width": {"grid": [8, -1]}}))
    outcome = run_sweep(space)
    by_width = {t["params"]["model.kwargs.width"]: t for t in outcome.trials}
    assert by_width[8]["done"] and by_width[8]["error"] is None
    assert not by_width[-1]["done"] and "negative dimension" in by_width[-1]["error"]
    assert outcome.best_params == {"model.kwargs.width": 8}

    c = tracking.client()
    children = tracking.child_runs(c, outcome.experiment_id, outcome.parent_run_id)
    status = {r.data.params["model.kwargs.width"]: r.info.status for r in children}
    assert status == {"8": "FINISHED", "-1": "FAILED"}
    broken = next(r for r in children if r.data.params["model.kwargs.width"] == "-1")
    assert "metaensemble.stopped_early" not in broken.data.tags and broken.info.end_time is not None
    assert c.get_run(outcome.parent_run_id).info.status == "FINISHED"


def test_a_failed_trial_closes_its_own_runs_without_a_sweep(mlflow_uri, digits_cfg):
    """Callers of ``launch`` without a sweep to close their runs (the meta-train job, the
    teacher zoo) rely on the trial: a raised training error turns its RUNNING runs FAILED
    and leaves finished ones alone."""
    from metaensemble.sweep.runner import fail_unfinished

    c = tracking.client()
    cfgs = [digits_cfg(f"seed={s}") for s in (1, 2)]
    cfgs = [cfg.with_overrides({"experiment": cfgs[0].experiment_name}) for cfg in cfgs]
    handles = [tracking.open_run(c, cfg, cfg.run_key()) for cfg in cfgs]
    c.set_terminated(handles[0].run_id, status="FINISHED")  # the pack's first member was done
    assert fail_unfinished(cfgs, [cfg.run_key() for cfg in cfgs], mlflow_uri) == [handles[1].run_id]
    assert [c.get_run(h.run_id).info.status for h in handles] == ["FINISHED", "FAILED"]


def test_an_interrupted_optuna_sweep_is_restored_by_the_same_command(ray_local, mlflow_uri, tmp_path):
    """One sweep shows both: an optuna search runs its trials under one parent, and a
    sweep whose driver is killed between its trials is restored (the searcher with it),
    not restarted, by the same command."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = _space(tmp_path, num_samples=2, scheduler={"name": "fifo"}, max_concurrent_trials=1,
                  search={"name": "optuna", "seed": 1},
                  overrides={"storage_path": str(tmp_path / "ray"), "model.kwargs.width": 8, "train.epochs": 2},
                  params={"optim.lr": {"loguniform": [0.01, 0.2]}})  # one trial done before the kill, one after
    space = load_space(path)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": mlflow_uri}
    c = tracking.client()
    exp_name = f"digits/sweep-{space.name}"
    with open(tmp_path / "sweep.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "jobs/sweep.py", str(path)], cwd=repo, env=env, stdout=log, stderr=log)
        first_done, deadline = None, time.monotonic() + 300
        while first_done is None and time.monotonic() < deadline and proc.poll() is None:
            exp = c.get_experiment_by_name(exp_name)
            runs = c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'") if exp else []
            first_done = next((r for r in runs if "metaensemble.trial_id" in r.data.tags), None)
            time.sleep(0.5)
        assert first_done is not None and proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(3)  # let Tune write its experiment state after that trial
        exp = c.get_experiment_by_name(exp_name)
        finished = [r for r in c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
                    if "metaensemble.trial_id" in r.data.tags]
        assert len(finished) < 2, "both trials finished before the kill: nothing left to restore"
        proc.kill()  # the sweep's driver dies with trials left to run
        proc.wait()
    # its output went to a file: no Tune status table, no colour codes (issue 29)
    out = (tmp_path / "sweep.log").read_text()
    assert "] done:" in out, out[-3000:]  # the finished trial's own line
    assert "Trial status" not in out and "\x1b[" not in out, out[-3000:]

    outcome = run_sweep(space)  # the same sweep again: restored, not restarted
    assert len(outcome.trials) == 2 and all(t["done"] for t in outcome.trials)
    children = tracking.child_runs(c, outcome.experiment_id, outcome.parent_run_id)
    assert len(children) == 2, "a restored sweep must not start its trials over"
    again = c.get_run(first_done.info.run_id)
    assert again.info.end_time == first_done.info.end_time, "a finished trial was trained again"
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 2
    # optuna drew both trials' learning rates from the space, under the one parent
    lrs = [t["params"]["optim.lr"] for t in outcome.trials]
    assert all(0.01 <= lr <= 0.2 for lr in lrs) and lrs[0] != lrs[1]
    assert sorted(float(r.data.params["optim.lr"]) for r in children) == sorted(lrs)
    assert first_done.info.run_id in {r.info.run_id for r in children}


def test_closing_a_sweep_gives_each_trial_run_its_final_status(mlflow_uri, tmp_path):
    """Trial runs are closed by the sweep, not by the dying trial: stopped early ->
    FINISHED with the scheduler's name as the ``stopped_early`` tag, broken (with or
    without a report) -> FAILED, finished runs keep FINISHED."""
    from ray.tune import Result

    from metaensemble.sweep.runner import _close

    space = load_space(_space(tmp_path))
    c = tracking.client()
    exp_id = tracking.experiment_id(c, f"closing-{uuid.uuid4().hex[:6]}")
    parent = c.create_run(exp_id, run_name="parent").info.run_id

    def child(tid, status):
        run = c.create_run(exp_id, run_name=tid, tags={tracking.runs.TAG_PARENT: parent, "metaensemble.trial_id": tid})
        if status != "RUNNING":
            c.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    def result(tid, epoch, acc, final=False, error=None):
        m = {"trial_id": tid, "epoch": epoch, "val_acc": acc, "config": {"params": {"optim.lr": 0.1}}}
        return Result(metrics={**m, "final": 1} if final else m, checkpoint=None, error=error, path=str(tmp_path))

    runs = {"done": child("done", "FINISHED"), "stopped": child("stopped", "RUNNING"),
            "broke": child("broke", "RUNNING"), "broke_silent": child("broke_silent", "RUNNING")}
    grid = [result("done", 6, 0.9, final=True), result("stopped", 1, 0.1),
            result("broke", 2, 0.5, error=RuntimeError("worker died")),
            Result(metrics={}, checkpoint=None, error=RuntimeError("no report"), path=str(tmp_path))]
    outcome = _close(c, exp_id, parent, space, grid, str(tmp_path))

    status = {k: c.get_run(v).info.status for k, v in runs.items()}
    assert status == {"done": "FINISHED", "stopped": "FINISHED", "broke": "FAILED", "broke_silent": "FAILED"}
    assert c.get_run(runs["stopped"]).data.tags["metaensemble.stopped_early"] == "asha"
    assert "metaensemble.stopped_early" not in c.get_run(runs["done"]).data.tags
    assert "metaensemble.stopped_early" not in c.get_run(runs["broke"]).data.tags
    assert outcome.best_metric == 0.9 and c.get_run(parent).info.status == "FINISHED"
    assert [t["error"] for t in outcome.trials] == [None, None, "worker died", "no report"]


def test_a_grace_period_longer_than_the_trials_is_refused_before_any_work(tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("METAENSEMBLE_MLFLOW_HOME", str(store))
    space = load_space("search_spaces/teacher.yaml")
    with pytest.raises(SearchSpaceError, match=r"grace_period=2 is more than the 1 epochs"):
        run_sweep(space.model_copy(update={"params": {"optim.lr": {"choice": [0.1]}}}), ["train.epochs=1"])
    assert not store.exists()


def test_more_groups_than_fit_at_once_are_merged_into_that_many_packs(digits_cfg, tmp_path):
    """train_configs' groups beyond what runs at once join packs (one Ray Train start-up
    per pack, not per waiting group), dealt in snake order; runs that cannot share a Ray
    Train run (another scaling, streamed data) keep their groups."""
    from metaensemble.sweep.runner import merge_groups

    runs = {k: digits_cfg(f"seed={i}") for i, k in enumerate("abcde")}
    groups = [["a", "b"], ["c"], ["d"], ["e"]]
    assert merge_groups(groups, 2, runs) == [["a", "b", "e"], ["c", "d"]]
    assert merge_groups([[k] for k in "abcde"], 3, runs) == [["a"], ["b", "e"], ["c", "d"]]
    assert merge_groups(groups, 1, runs) == [["a", "b", "c", "d", "e"]]
    assert merge_groups(groups, 4, runs) == groups and merge_groups(groups, 9, runs) == groups
    runs["e"] = digits_cfg("seed=4", "scaling.num_workers=3")
    assert merge_groups(groups, 2, runs) == groups
    runs["e"] = digits_cfg("seed=4", "data.name=parquet", f"data.root={tmp_path}")
    assert merge_groups(groups, 2, runs) == groups
