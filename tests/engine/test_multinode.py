"""Across nodes: a local Ray cluster of two nodes (two raylets on this machine, each with
3 logical CPUs). A sweep submitted with `ray job submit` places its trials on both nodes and logs
them to one MLflow server; an elastic 2-worker DDP run spans both nodes, loses one
mid-run, and resumes from its latest checkpoint on the node that remains, in the same
MLflow run."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from metaensemble import tracking
from metaensemble.config import REPO_ROOT
from metaensemble.tracking.store import free_ports

# CPUs each node offers: a sweep's trial is a 0.5-CPU driver plus one 2-CPU worker, so two
# workers never fit on one node and each node holds one worker wherever the two drivers
# land (with 2-CPU nodes both drivers on one node left room for one worker only, and the
# trials took turns on the other node)
NODE_CPUS = 3


def _own_ports(avoid: tuple[int, ...] = ()) -> list[str]:
    # every port of its own (the session's local Ray instance holds the defaults), none of
    # them one of the head's own ports chosen before
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    ports = [p for p in free_ports(len(flags) + len(avoid)) if p not in avoid]
    return [f"--{flag}={p}" for flag, p in zip(flags, ports, strict=False)]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a node's process group: every process of the node is in it (measured), and
    `ray start --block` takes over 5 s to stop on SIGTERM."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=30)


class Cluster:
    """`ray start --head` plus worker nodes, each `ray start --block` in its own process
    group (so a node can be killed alone, and the session's Ray is never touched)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port, self.dash_port, self.client_port = free_ports(3)
        self.env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32),  # a fresh machine has no ~/.ray/auth_token
                    # after the loss, the elastic restart first waits this long for the max worker
                    # count before it settles for what fits (Ray's default: 60 s)
                    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "8",
                    # a killed node is found dead after 3 failed health checks a second apart
                    # (Ray's defaults: 5, 3 s apart, so the loss took 15 s to be noticed)
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        self.env.pop("RAY_ADDRESS", None)
        self.temp = Path("/tmp") / f"mn{uuid.uuid4().hex[:6]}"
        self.nodes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def _start(self, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"node{len(self.nodes)}.log", "w")
        proc = subprocess.Popen(["ray", "start", "--block", f"--num-cpus={NODE_CPUS}", "--disable-usage-stats",
                                 *_own_ports((self.port, self.dash_port, self.client_port)),
                                 *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def start_head(self) -> None:
        self._start(["--head", f"--port={self.port}", f"--dashboard-port={self.dash_port}", "--include-dashboard=true",
                     f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp}"])
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(self.dashboard + "/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # answering (401 under token auth): it is up
                return
            except OSError:
                if time.time() > deadline or self.nodes[0].poll() is not None:
                    raise RuntimeError("head did not come up: " + (self.tmp / "node0.log").read_text()[-2000:]) from None
                time.sleep(1)

    def add_node(self) -> subprocess.Popen:
        # its own temp dir, as a separate machine has: nodes sharing one would share (and
        # garbage-collect) each other's copies of a job's working directory
        proc = self._start([f"--address={self.address}", f"--temp-dir={self.temp}-{len(self.nodes)}"])
        self.wait_nodes(len([p for p in self.nodes if p.poll() is None]))
        return proc

    def alive_nodes(self) -> int:
        out = subprocess.run(["ray", "status", f"--address={self.address}"], env=self.env, capture_output=True,
                             text=True, timeout=60).stdout
        active = out.split("Active:")[-1].split("Pending:")[0]
        return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() != n:
            if time.time() > deadline:
                raise RuntimeError(f"the cluster did not reach {n} live nodes")
            time.sleep(1)

    def stop(self) -> None:
        for p in reversed(self.nodes):
            _kill_group(p)
        for i in range(len(self.nodes)):  # the nodes' session folders
            shutil.rmtree(self.temp if i == 0 else f"{self.temp}-{i}", ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mlflow_uri):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_head()
        c.add_node()
        yield c
    finally:
        c.stop()


def _submit(c: Cluster, mlflow_uri: str, args: list[str]) -> str:
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri}})
    cmd = ["ray", "job", "submit", "--address", c.dashboard, "--working-dir", ".", "--runtime-env-json", runtime_env,
           "--", "python", *args]
    for _ in range(10):  # the job agent comes up a little after the dashboard answers
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=c.env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        if "No available agent to submit job" not in out:
            break
        time.sleep(3)
    assert proc.returncode == 0, out[-20000:]
    return out


def test_a_sweep_submitted_to_the_cluster_runs_trials_on_both_nodes_into_one_mlflow(cluster, mlflow_uri, tmp_path):
    experiment = f"test/mn-sweep-{uuid.uuid4().hex[:6]}"  # the base config's; the sweep names its own
    space = tmp_path / "space.yaml"
    space.write_text("""name: mn
base: configs/teachers/digits.yaml
metric: val_acc
mode: max
num_samples: 2
max_concurrent_trials: 2
params:
  optim.lr: {choice: [0.05, 0.1]}
""")
    # a trial is its driver (0.5 CPU) and one 2-CPU worker: two workers never share a
    # 3-CPU node, and after the drivers each node still has room for one, so the two
    # trials' workers run at once, one on each node (4 epochs, not 1: on a loaded machine
    # the second trial must start before the first ends, or it may take the freed node)
    out = _submit(cluster, mlflow_uri, ["jobs/sweep.py", str(space), f"experiment={experiment}",
                                        f"storage_path={tmp_path / 'ray'}", "train.epochs=4", "model.kwargs.width=4",
                                        "scaling.cpus_per_worker=2"])
    assert "best val_acc" in out
    c = tracking.client(mlflow_uri)
    exp_id = re.search(r"\(experiment id (\w+)\)", out).group(1)
    runs = c.search_runs([exp_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    nodes = {r.data.tags["metaensemble.worker_nodes"] for r in children}
    assert len(nodes) == 2, f"the trials ran on {nodes}"


DRIVER = """
import sys
from metaensemble.validation import load_config
from metaensemble.engine import fit
out = fit(load_config("configs/teachers/digits.yaml", sys.argv[1:]))
print("RUN", out.run_id, flush=True)
"""


def test_an_elastic_ddp_run_loses_a_node_and_resumes_on_the_other_in_the_same_run(cluster, mlflow_uri, tmp_path):
    experiment = f"test/mn-elastic-{uuid.uuid4().hex[:6]}"
    # the loss comes after 2 epochs; 10 more of margin for it to land mid-run (with 5 more,
    # a fast machine once finished the run before the dead node was found: resumed == epochs)
    epochs = 12
    # 2 CPUs per worker, 3 per node: the 2-worker group spans both nodes
    args = [f"experiment={experiment}", f"storage_path={tmp_path / 'ray'}", f"train.epochs={epochs}",
            "model.kwargs.width=32", "scaling.num_workers=[1, 2]", "scaling.max_failures=3", "scaling.cpus_per_worker=2"]
    (tmp_path / "driver.py").write_text(DRIVER)
    log = open(tmp_path / "driver.log", "w")
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": mlflow_uri}
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), *args], cwd=REPO_ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    c = tracking.client(mlflow_uri)
    try:
        # kill the second node once two epochs are checkpointed and logged
        deadline = time.time() + 300
        run = None
        while time.time() < deadline and driver.poll() is None:
            exp = c.get_experiment_by_name(experiment)
            runs = c.search_runs([exp.experiment_id]) if exp else []
            if runs and len(c.get_metric_history(runs[0].info.run_id, "epoch")) >= 2:
                run = runs[0]
                break
            time.sleep(0.5)
        assert run is not None, (tmp_path / "driver.log").read_text()[-3000:]
        lost_at = len(c.get_metric_history(run.info.run_id, "epoch"))
        _kill_group(cluster.nodes[1])
        assert driver.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        _kill_group(driver)
        log.close()
    out = (tmp_path / "driver.log").read_text()
    assert f"RUN {run.info.run_id}" in out, "the same MLflow run, resumed"
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    final = runs[0]
    resumed = int(final.data.tags["metaensemble.resumed_from_epoch"])
    assert lost_at - 1 <= resumed < epochs, "resumed from the checkpoint the kill found, nothing earlier"
    hist = {k: [(int(m.step), m.value) for m in sorted(c.get_metric_history(final.info.run_id, k),
                                                       key=lambda m: (m.timestamp, m.step))]
            for k in ("epoch", "workers", "nodes", "lr")}
    epochs_logged = [v for _, v in hist["epoch"]]
    assert set(epochs_logged) == set(range(1, epochs + 1)) and epochs_logged[-1] == epochs
    workers = [v for _, v in hist["workers"]]
    nodes = [v for _, v in hist["nodes"]]
    assert workers[0] == 2 and nodes[0] == 2, "the 2-worker group spans two nodes"
    assert workers[-1] == 1 and nodes[-1] == 1, "after the loss: the remaining node's one worker"
    # the schedule is where an uninterrupted run's would be, though one worker now takes
    # twice the steps per epoch: at the end of the last epoch the cosine has reached its floor
    assert hist["lr"][-1][1] < 1e-4 * 0.05, hist["lr"]
