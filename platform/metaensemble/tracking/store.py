"""Where MLflow lives.

- ``MLFLOW_TRACKING_URI`` set (a cluster's ``mlflow server``): use it as is.
- Otherwise a local store under the repository, ``runs/mlflow/`` (SQLite database +
  artifact folder), always reached through one local ``mlflow server`` process that
  owns the database, so many concurrent writers (Tune trials, DDP rank 0s) never hit
  SQLite's "database is locked". A server started by ``jobs/mlflow_ui.py`` is reused;
  otherwise the job starts a private one on a free port and stops it at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from metaensemble.config import REPO_ROOT

ENV_HOME = "METAENSEMBLE_MLFLOW_HOME"


def local_store_dir() -> Path:
    return Path(os.environ.get(ENV_HOME) or REPO_ROOT / "runs" / "mlflow").resolve()


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTrackingServer:
    """An ``mlflow server`` over the local SQLite store, run as a child process."""

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

    def start(self, timeout: float = 120.0) -> LocalTrackingServer:
        self.store.mkdir(parents=True, exist_ok=True)
        log = open(self.store / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {log.name}")
            if _healthy(self.url):
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within {timeout:.0f}s; see {log.name}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    # A server meant to be shared (jobs/mlflow_ui.py) records itself here.
    def record(self) -> None:
        (self.store / "server.json").write_text(json.dumps({"url": self.url, "pid": os.getpid()}))

    def unrecord(self) -> None:
        (self.store / "server.json").unlink(missing_ok=True)


_OWNED: LocalTrackingServer | None = None


def recorded_server(store: Path | None = None) -> str | None:
    p = (store or local_store_dir()) / "server.json"
    try:
        url = json.loads(p.read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
    return url if _healthy(url) else None


def ensure_tracking() -> str:
    """The tracking URI to use, starting a private local server if none is configured.

    Sets ``MLFLOW_TRACKING_URI`` in this process so later MLflow calls and child
    processes use it.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file: noise in job logs
    global _OWNED
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = recorded_server()
        if uri is None:
            if _OWNED is None:
                _OWNED = LocalTrackingServer().start()
                atexit.register(_OWNED.stop)
            uri = _OWNED.url
        os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def describe_store() -> str:
    """Where this process's runs went, in words a user can act on."""
    if _OWNED is not None and os.environ.get("MLFLOW_TRACKING_URI") == _OWNED.url:
        return f"local store {_OWNED.store} (browse it with: python jobs/mlflow_ui.py)"
    return f"server {os.environ.get('MLFLOW_TRACKING_URI') or 'not configured'}"
