"""SuperWeight through the real engine (2-worker gloo DDP on a local Ray) and the job
end to end, against a real MLflow server; the job script in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch

from metaensemble import tracking
from metaensemble.config import REPO_ROOT
from metaensemble.engine import fit
from metaensemble.methods.superweight.method import SuperWeight
from metaensemble.models import unwrap
from metaensemble.validation import load_config


class RecordingSuperWeight(SuperWeight):
    """SuperWeight that writes, per rank and epoch, its parameters and sharing map."""

    def __init__(self, cfg, out_dir) -> None:
        super().__init__(cfg)
        self.out_dir = str(out_dir)

    def rebuild(self, model, epoch):
        rebuilt = super().rebuild(model, epoch)
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        net = rebuilt if rebuilt is not None else model
        banks = torch.cat([p.detach().flatten().cpu() for p in net.banks])
        allp = torch.cat([p.detach().flatten().cpu() for p in unwrap(model).parameters()])
        with open(os.path.join(self.out_dir, f"rank{rank}-epoch{epoch}.json"), "w") as f:
            json.dump({"phase": self.phase, "sharing": self.sharing, "split": self.split, "banks": banks.tolist()[:2000],
                       "params_sum": float(allp.double().sum()), "params": allp.tolist()[:5000]}, f)
        return rebuilt


@pytest.fixture(autouse=True, scope="module")
def _pickle_this_module_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _cfg(tmp_path, *overrides: str):
    return load_config("configs/superweight/digits.yaml", [
        f"storage_path={tmp_path / 'ray'}", f"experiment=test/{uuid.uuid4().hex[:8]}",
        "superweight.depths=[10,10]", "superweight.widths=[1.0,0.5]", "superweight.max_params=90000",
        "train.epochs=3", "superweight.split_epochs=1", "superweight.unshare_epochs=1",
        "optim.decay_milestones=[1]", "data.train_fraction=0.3", *overrides])


def test_two_ddp_workers_keep_identical_banks_and_learn_one_sharing_map(ray_local, tmp_path):
    cfg = _cfg(tmp_path, "scaling.num_workers=2", "scaling.cpus_per_worker=1",
               "superweight.unshare_threshold=0.999")  # a threshold that parts some slots
    out = tmp_path / "rec"
    out.mkdir()
    outcome = fit(cfg, method=RecordingSuperWeight(cfg, out))
    recs = {f.stem: json.loads(f.read_text()) for f in out.glob("*.json")}
    assert {f"rank{r}-epoch{e}" for r in (0, 1) for e in (1, 2, 3)} <= set(recs)
    for e in (1, 2, 3):
        r0, r1 = recs[f"rank0-epoch{e}"], recs[f"rank1-epoch{e}"]
        # ranks train on disjoint halves: equal parameters mean synchronised gradients
        assert r0["params"] == r1["params"] and r0["params_sum"] == r1["params_sum"], f"epoch {e}"
        assert r0["sharing"] == r1["sharing"] and r0["banks"] == r1["banks"]
    assert recs["rank0-epoch1"]["phase"] == "shared" and recs["rank0-epoch1"]["sharing"] is not None
    assert recs["rank0-epoch2"]["phase"] == "unshared" and recs["rank0-epoch2"]["split"]["clones"] > 0
    assert recs["rank1-epoch2"]["split"] == recs["rank0-epoch2"]["split"]
    # the exported run: the whole ensemble, its sharing map in model.json, named members
    m = outcome.metrics
    assert {"test_acc", "member/0/test_acc", "member/1/test_acc"} <= set(m)
    from metaensemble.models import load

    model = load(f"runs:/{outcome.run_id}/model")
    assert model.sharing == recs["rank0-epoch2"]["sharing"]
    assert model.bank_elements() <= cfg.superweight.max_params


def test_the_job_trains_the_three_ensembles_and_logs_them_side_by_side(ray_local, mlflow_uri, tmp_path):
    from metaensemble.methods.superweight import experiment

    name = f"test/{uuid.uuid4().hex[:8]}"
    # one run at a time (2 CPUs a worker, one torch thread): the SuperWeight and independent
    # ensembles train as one pack in one Ray Train run, without Tune trials (train_configs'
    # Tune path: tests/test_meta_train.py)
    cfg = _cfg(tmp_path, f"experiment={name}", "train.epochs=2", "superweight.unshare_epochs=0",
               "optim.schedule=cosine",  # unsharing: the DDP test
               "scaling.cpus_per_worker=2", "scaling.torch_threads=1")
    out = experiment.run(cfg)
    text = experiment.format_outcome(out)
    lines = text.splitlines()
    for label in ("SuperWeight ensemble", "Independent, same WRNs", "Independent, same #params"):
        assert any(line.startswith(label) for line in lines), label
    assert "learned sharing:" in text and "SuperWeight has fewer parameters" in text
    client = tracking.client()
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parent = next(x for x in runs if x.data.tags.get("metaensemble.job") == "superweight")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 5  # the SuperWeight ensemble, 2 independent and 2 scaled members
    # one run at a time: the SuperWeight ensemble and the independent members merged into
    # one pack (one Ray Train run), no Tune trial
    packs = {key: client.get_run(out.run_ids[key]).data.tags["metaensemble.ray_run"]
             for key in ("superweight", "independent/0", "independent/1")}
    assert len(set(packs.values())) == 1 and packs["superweight"].startswith("pack-"), packs
    assert not list((tmp_path / "ray").rglob("params.json"))
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"anytime.png", "superweight_table.md", "superweight_table.json"} <= arts
    table = json.loads(open(client.download_artifacts(parent.info.run_id, "superweight_table.json",
                                                      str(tmp_path))).read())
    rows = {row["key"]: row for row in table["rows"]}
    sw, ind, scaled = rows["superweight"], rows["independent"], rows["scaled"]
    assert sw["params"] < ind["params"], "the budget forces sharing"
    assert abs(scaled["params"] - sw["params"]) / sw["params"] < 0.05, "scaled to the same parameter count"
    assert sw["gflops"] == pytest.approx(ind["gflops"]) and scaled["gflops"] < ind["gflops"]
    assert all(len(table["subsets"][k]) == 3 for k in ("superweight", "independent", "scaled"))
    full = max(table["subsets"]["superweight"], key=lambda s: len(s["members"]))
    assert full["acc"] == pytest.approx(sw["acc"]) and full["flops"] == pytest.approx(sw["gflops"] * 1e9)
    assert parent.data.metrics["superweight_params"] == sw["params"]
    versions = client.search_model_versions("name='ensemble.digits.superweight'")
    assert any(v.run_id == sw_run for v in versions for sw_run in [table["run_ids"]["superweight"]])


def test_the_job_refuses_bad_input_before_any_work(mlflow_uri):
    from conftest import run_script

    client = tracking.client()
    before = len(client.search_experiments())
    r = run_script(["jobs/superweight.py", "superweight.max_params=1000"])
    assert r.returncode == 2 and "too small for even one template per bank" in r.stderr
    r = run_script(["jobs/superweight.py", "superweight.depths=[10,16,16]", "superweight.widths=[1,1,0.5]"])
    assert r.returncode == 2 and "decreasing order" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(client.search_experiments()) == before


def test_the_job_script_in_a_fresh_process_refuses_bad_input_with_one_line():
    r = subprocess.run([sys.executable, "jobs/superweight.py", "superweight.widths=[1.0,1.0,1.0,0.5]"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "strictly decreasing" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_shipped_search_space_sweeps_what_the_issue_names():
    from metaensemble.sweep.space import load_space

    space = load_space("search_spaces/superweight.yaml")
    assert space.metric == "val_acc"  # the ensemble's val accuracy: the first named prediction
    assert {"superweight.max_params", "superweight.param_group_bins", "superweight.split_threshold",
            "superweight.unshare_threshold", "superweight.unshare_epochs", "optim.lr"} <= set(space.params)
    cfg = load_config(space.base, [])
    assert cfg.method == "superweight"
