"""Where MLflow lives.

- ``MLFLOW_TRACKING_URI`` set (a cluster's ``mlflow server``): use it as is.
- Otherwise a local store under the repository, ``runs/mlflow/`` (SQLite database +
  artifact folder), always reached through one local ``mlflow server`` process that
  owns the database, so many concurrent writers (Tune trials, DDP rank 0s) never hit
  SQLite's "database is locked".

One server per store, even for jobs started at the same moment: every decision about
the server is taken under an exclusive ``flock`` on ``<store>/server.lock``.

- ``<store>/server.json`` records the store's server (url, server pid, owner). A job
  reuses a healthy recorded server; otherwise it starts one (detached, in its own
  session, so it outlives the job that started it) and records it with owner ``job``.
  A recorded server that does not answer is replaced.
- Each job that joined the server this way registers as a client, ``<store>/clients/<pid>``.
  At exit it unregisters; the last live client stops a job-owned server and removes
  ``server.json``. A job killed without running ``atexit`` leaves its file behind; its
  pid is found dead by the next job to leave, which then stops the server.
- ``jobs/mlflow_ui.py`` records its own server with owner ``ui``: jobs use it and never
  stop it; the UI removes the record when it exits.
- Processes that get ``MLFLOW_TRACKING_URI`` from a parent (Ray workers, Tune trials)
  are not clients: the job that joined the server keeps it up for them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaensemble.config import REPO_ROOT

ENV_HOME = "METAENSEMBLE_MLFLOW_HOME"
SERVER_FILE = "server.json"
LOCK_FILE = "server.lock"
CLIENTS_DIR = "clients"
OWNER_JOB = "job"
OWNER_UI = "ui"
# A busy server on a small machine can be slow to answer /health: wait this long, while
# its process lives, before calling it dead and replacing it.
BUSY_GRACE_S = 15.0
STOP_TIMEOUT_S = 15.0


KEEP_SERVER_LOGS = 5
"""Server logs a local store keeps (one per server started: each job that found none running)."""


def prune_server_logs(store: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``server-*.log`` files of ``store``; returns the
    deleted ones. A running server writes to its log, so its log is among the newest."""
    logs = sorted(store.glob("server-*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in logs[keep:]:
        old.unlink(missing_ok=True)
    return logs[keep:]


def local_store_dir() -> Path:
    return Path(os.environ.get(ENV_HOME) or REPO_ROOT / "runs" / "mlflow").resolve()


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def free_ports(n: int) -> list[int]:
    """`n` distinct free local ports. Every socket stays bound until all are chosen: ports
    asked for one at a time may come back equal (the kernel hands a just-closed port out
    again), and two Ray components given one port refuse to start."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _free_port() -> int:
    return free_ports(1)[0]


# ---- processes -----------------------------------------------------------------------
def _proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie counts as dead: its parent may never reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in Path("/proc").iterdir():
        stat = _proc_stat(entry.name) if entry.name.isdigit() else None
        if stat is not None and stat[0] != "Z" and stat[2] == str(pgid):
            return True
    return False


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _looks_like_server(pid: int, url: str) -> bool:
    """Whether ``pid`` is still the ``mlflow server`` serving ``url``: a recorded pid can
    have been reused by an unrelated process after the server died, and must not be killed."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self/cmdline").exists() and _alive(pid)  # no /proc: trust it
    except OSError:
        return False
    port = url.rsplit(":", 1)[-1].encode()
    return b"mlflow" in cmd and b"server" in cmd and port in cmd


def _stop_group(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the server's process group (mlflow forks uvicorn and job runners), SIGKILL
    what is left after ``timeout``, and wait until none of it runs."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not _group_alive(pid):
                return
            time.sleep(0.1)


# ---- the server ----------------------------------------------------------------------
SERVER_JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"  # MLflow's own setting (default: on)


class LocalTrackingServer:
    """An ``mlflow server`` over the local SQLite store, run in its own session."""

    def __init__(self, store: Path | None = None, port: int | None = None) -> None:
        self.store = (store or local_store_dir()).resolve()
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.store / 'mlflow.db'}",
            "--artifacts-destination", str(self.store / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]

    @staticmethod
    def environment() -> dict[str, str]:
        """The server's environment: this process's, without MLflow's job execution
        unless it was asked for. That feature (GenAI evaluation and scorer jobs, none of
        which the platform runs) starts a job runner and 7 huey consumer processes beside
        the server, each importing MLflow: 18 s of CPU per start on 2 cores, measured once
        (docs/tracking.md), for nothing here."""
        return {**os.environ, SERVER_JOB_EXECUTION: os.environ.get(SERVER_JOB_EXECUTION, "false")}

    def start(self, timeout: float = 120.0) -> LocalTrackingServer:
        self.store.mkdir(parents=True, exist_ok=True)
        prune_server_logs(self.store, KEEP_SERVER_LOGS - 1)  # and this server's own
        log = open(self.store / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.environment(), stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {log.name}")
            if _healthy(self.url):
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within "
                           f"{timeout:.0f}s; see {log.name}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def record_data(self, owner: str) -> dict[str, Any]:
        pid = self.proc.pid if self.proc is not None else os.getpid()
        return {"url": self.url, "pid": pid, "owner": owner}

    def record(self, owner: str = OWNER_UI) -> None:
        """Make this server the store's shared one. The default owner, ``ui``, is kept
        running by jobs (they never stop it): ``jobs/mlflow_ui.py`` owns it."""
        with store_lock(self.store):
            _write_record(self.store, self.record_data(owner))

    def unrecord(self) -> None:
        """Remove the record if it is still this server's (a job may have replaced it)."""
        with store_lock(self.store):
            rec = _read_record(self.store)
            if rec is not None and rec.get("url") == self.url:
                (self.store / SERVER_FILE).unlink(missing_ok=True)


# ---- the store's record, lock and clients -------------------------------------------
@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Exclusive across processes: serialises every start, reuse and stop of the store's
    server. Not re-entrant: a second ``store_lock`` in the same process waits for the first."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_record(store: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((store / SERVER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "url" in rec else None


def _write_record(store: Path, rec: dict[str, Any]) -> None:
    """Write-then-rename, so a reader without the lock never sees half a file."""
    tmp = store / f"{SERVER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, store / SERVER_FILE)


def recorded_server(store: Path | None = None) -> str | None:
    """The url of the store's recorded server if it answers, else None."""
    rec = _read_record(store or local_store_dir())
    return rec["url"] if rec is not None and _healthy(rec["url"]) else None


def _answers(rec: dict[str, Any]) -> bool:
    """Whether a recorded server answers, giving a busy but live one ``BUSY_GRACE_S``."""
    deadline = time.monotonic() + BUSY_GRACE_S
    while True:
        if _healthy(rec["url"], timeout=2.0):
            return True
        pid = rec.get("pid")
        if not isinstance(pid, int) or not _alive(pid) or time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _stop_recorded(rec: dict[str, Any]) -> None:
    """Stop a job-owned recorded server if its process is still that server."""
    pid = rec.get("pid")
    if rec.get("owner") != OWNER_JOB or not isinstance(pid, int):
        return
    if _looks_like_server(pid, rec["url"]):
        _stop_group(pid)


def _shared_server(store: Path) -> dict[str, Any]:
    """The store's server: the recorded one if it answers, else a new job-owned one.
    Call under ``store_lock``."""
    rec = _read_record(store)
    if rec is not None and _answers(rec):
        return rec
    if rec is not None:  # dead or hung: a hung job server must not keep the database
        _stop_recorded(rec)
    server = LocalTrackingServer(store=store).start()
    rec = server.record_data(OWNER_JOB)
    _write_record(store, rec)
    return rec


def _clients(store: Path) -> Path:
    return store / CLIENTS_DIR


def _register(store: Path, pid: int) -> None:
    _clients(store).mkdir(parents=True, exist_ok=True)
    (_clients(store) / str(pid)).write_text("")


def _live_clients(store: Path) -> list[int]:
    """Pids of registered clients still running; files of dead ones are removed."""
    live = []
    for f in _clients(store).glob("*"):
        if f.name.isdigit() and _alive(int(f.name)):
            live.append(int(f.name))
        else:
            f.unlink(missing_ok=True)
    return live


# ---- this process --------------------------------------------------------------------
@dataclass
class _Joined:
    """The local server this process joined as a client."""

    store: Path
    record: dict[str, Any]
    pid: int

    @property
    def url(self) -> str:
        return self.record["url"]


_JOINED: _Joined | None = None


def _join(store: Path) -> _Joined:
    """Reuse or start the store's server and register this process as its client."""
    global _JOINED
    pid = os.getpid()
    first = _JOINED is None or _JOINED.pid != pid or _JOINED.store != store
    with store_lock(store):
        rec = _shared_server(store)
        _register(store, pid)
    _JOINED = _Joined(store, rec, pid)
    if first:
        atexit.register(_leave, store, pid)
    return _JOINED


def _leave(store: Path, pid: int) -> None:
    """Unregister; the last live client stops a job-owned server (the recorded one, and
    the one this process joined if a UI has replaced the record since)."""
    if os.getpid() != pid:  # a forked child running its parent's atexit
        return
    with store_lock(store):
        (_clients(store) / str(pid)).unlink(missing_ok=True)
        if _live_clients(store):
            return
        rec = _read_record(store)
        if rec is not None:
            _stop_recorded(rec)
            if rec.get("owner") == OWNER_JOB:
                (store / SERVER_FILE).unlink(missing_ok=True)
        joined = _JOINED.record if _JOINED is not None and _JOINED.store == store else None
        if joined is not None and (rec is None or joined["url"] != rec["url"]):
            _stop_recorded(joined)


def ensure_tracking() -> str:
    """The tracking URI to use, joining the local store's shared server if none is configured.

    Sets ``MLFLOW_TRACKING_URI`` in this process so later MLflow calls and child
    processes use it (and do not register as clients themselves).
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file: noise in job logs
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        from metaensemble.config import in_ray_working_dir

        if in_ray_working_dir() and not os.environ.get(ENV_HOME):
            from metaensemble.errors import ConfigError

            raise ConfigError("MLFLOW_TRACKING_URI is not set, and this job runs from Ray's copy of the submitted "
                              "directory, which Ray deletes after the job: point it at an MLflow server, e.g. "
                              "ray job submit --runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": "
                              "\"http://HOST:5000\"}}' (cluster.yaml's head sets it for every node)")
        uri = _join(local_store_dir()).url
        os.environ["MLFLOW_TRACKING_URI"] = uri
        # MLflow prints "View run ... at: http://127.0.0.1:<port>" links to this private
        # server, which stops with the last job using it: jobs name the store instead
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def describe_store() -> str:
    """Where this process's runs went, in words a user can act on."""
    if _JOINED is not None and os.environ.get("MLFLOW_TRACKING_URI") == _JOINED.url:
        return f"local store {_JOINED.store} (browse it with: python jobs/mlflow_ui.py)"
    return f"server {os.environ.get('MLFLOW_TRACKING_URI') or 'not configured'}"
