"""One tracking server per local store: jobs share it, the last one out stops it.

Each job is a real process with no ``MLFLOW_TRACKING_URI`` and its own store under
``METAENSEMBLE_MLFLOW_HOME``, as a job launched from a shell on this machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from metaensemble.tracking.store import (
    ENV_HOME,
    KEEP_SERVER_LOGS,
    SERVER_FILE,
    SERVER_JOB_EXECUTION,
    LocalTrackingServer,
    _group_alive,
)

# Waits on a "go" file so that both jobs call ensure_tracking() at the same moment, then
# logs 5 runs and prints its tracking URI and the store's server record.
JOB = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from metaensemble import tracking
    ready, go, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    uri = tracking.ensure_tracking()
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "race")
    for i in range(5):
        c.create_run(exp, run_name=f"{name}-{i}", tags={"job": name})
    record = json.loads((tracking.local_store_dir() / "server.json").read_text())
    print(json.dumps({"uri": uri, "record": record, "describe": tracking.describe_store()}))
""")


def _start_job(store: Path, name: str, go: Path) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env[ENV_HOME] = str(store)
    ready = store.parent / f"{name}.ready"
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(ready), str(go), name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready


def _run_jobs(store: Path, names: list[str], timeout: float = 180) -> list[dict]:
    """Start the jobs, release them together once all have imported, return their output."""
    go = store.parent / "go"
    go.unlink(missing_ok=True)
    jobs = [_start_job(store, n, go) for n in names]
    deadline = time.monotonic() + timeout
    while not all(ready.exists() for _, ready in jobs):
        assert time.monotonic() < deadline, "jobs did not start"
        assert all(p.poll() is None for p, _ in jobs), [p.communicate() for p, _ in jobs]
        time.sleep(0.01)
    go.touch()
    outs = []
    for proc, _ in jobs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def _port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


def _wait_stopped(record: dict, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(record["pid"]) and _port_closed(record["url"]):
            return True
        time.sleep(0.2)
    return False


def _runs_in_db(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    return c.search_runs([c.get_experiment_by_name("race").experiment_id], max_results=100)


def test_jobs_started_together_replace_a_dead_server_share_one_new_one_and_the_last_stops_it(tmp_path):
    """Two jobs at once on a store whose recorded server died without removing its record
    (a crashed job's): the first to take the lock replaces it, the other joins that one,
    and the last to leave stops it."""
    store = tmp_path / "store"
    store.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    # a pid above pid_max: no process has it
    dead = {"url": dead_url, "pid": 2**22 + 1, "owner": "job"}
    (store / SERVER_FILE).write_text(json.dumps(dead))
    old_logs = [store / f"server-{1000 + i}.log" for i in range(7)]  # earlier servers', oldest first
    for i, log in enumerate(old_logs):
        log.write_text("old")
        os.utime(log, (time.time() - 3600 + i, time.time() - 3600 + i))

    a, b = _run_jobs(store, ["a", "b"])

    assert a["uri"] != dead_url and a["record"]["url"] == a["uri"], "the dead server was not replaced"
    assert a["uri"] == b["uri"], "two jobs on one store started two servers"
    assert a["record"] == b["record"] and a["record"]["owner"] == "job"
    new_logs = set(store.glob("server-*.log")) - set(old_logs)
    assert len(new_logs) == 1, "more than one server was started"
    # the store keeps its newest KEEP_SERVER_LOGS server logs: this server's and the 4 newest before it
    assert sorted(store.glob("server-*.log")) == sorted([*new_logs, *old_logs[-(KEEP_SERVER_LOGS - 1):]])
    assert str(store) in a["describe"]
    # both gone: the last one stopped the server and removed the record
    assert not (store / SERVER_FILE).exists()
    assert _wait_stopped(a["record"]), "the server outlived its last job"
    assert list((store / "clients").iterdir()) == []
    runs = _runs_in_db(store)
    assert sorted(r.info.run_name for r in runs) == [f"{j}-{i}" for j in "ab" for i in range(5)]


def _cmdlines() -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of every process."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out[int(proc.name)] = (int(stat[stat.rfind(")") + 2:].split()[2]), cmd)
        except (OSError, ValueError):
            continue
    return out


def test_a_local_server_goes_without_mlflows_job_execution_unless_asked(monkeypatch):
    monkeypatch.delenv(SERVER_JOB_EXECUTION, raising=False)
    assert LocalTrackingServer.environment()[SERVER_JOB_EXECUTION] == "false"
    monkeypatch.setenv(SERVER_JOB_EXECUTION, "true")  # the user's own choice is kept
    assert LocalTrackingServer.environment()[SERVER_JOB_EXECUTION] == "true"


def test_the_sessions_server_runs_as_its_environment_says(mlflow_uri):
    """The session's server (a LocalTrackingServer, as every job's): the server and its one
    uvicorn worker, and MLflow's job runner and huey consumers only where the environment
    asked for job execution (by default it does not)."""
    port = mlflow_uri.rsplit(":", 1)[1]
    procs = _cmdlines()
    (server,) = [pid for pid, (_, cmd) in procs.items()
                 if "-m mlflow server " in cmd and f"--port {port} " in cmd + " "]
    group = [cmd for pgid, cmd in procs.values() if pgid == server]
    assert any("uvicorn" in c for c in group), group
    asked = LocalTrackingServer.environment()[SERVER_JOB_EXECUTION] == "true"
    assert any("huey" in c or "mlflow.server.jobs" in c for c in group) == asked, group


# A job beside the UI's server (jobs/mlflow_ui.py): it uses that server and leaves it
# running; tests/tracking/test_ui_browser.py runs such a job while its UI is up.
