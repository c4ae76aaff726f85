"""The MLflow UI in a real browser: ``jobs/mlflow_ui.py`` over a store with a finished
run, opened in headless Chromium (Debian's ``chromium`` package; .ci/run installs it).

MLflow 3.17's UI opens an experiment in the view its sidebar switch holds, a per-browser
setting that starts at "GenAI" (trace overview, token usage); ``jobs/mlflow_ui.py`` makes
"Model training" (the runs table) the default. The browser here has a fresh profile, as a
first-time user's. Screenshots of the pages go to ``runs/ui/`` under the repository.
While the UI runs, a job started from a shell logs through its server and leaves it
running (the UI owns it; tests/tracking/test_store.py has the job-owned servers).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from test_store import _run_jobs, _runs_in_db

from metaensemble import models, tracking
from metaensemble.config import REPO_ROOT
from metaensemble.tracking.runs import KIND_TRAINING, TAG_EXPERIMENT_KIND
from metaensemble.tracking.store import (
    ENV_HOME,
    SERVER_FILE,
    _free_port,
    _healthy,
    _looks_like_server,
    _read_record,
    recorded_server,
)
from metaensemble.validation import load_config

SHOTS = REPO_ROOT / "runs" / "ui"
EXPERIMENT = "ui-test/digits"
RUN = "ui-run"
METRICS = {"val_acc": 0.875, "test_acc": 0.8125, "train_loss": 0.25}  # the first two are key
START_TIMEOUT_S = 180.0  # a fresh SQLite store's migrations are slow on a busy machine
PAGE_TRIES = 3


def _headers(dom: str) -> list[str]:
    """The runs table's column headers, left to right."""
    return re.findall(r'data-testid="sort-header-([^"]+)"', dom)


def _browser() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Chromium is not installed (the test drives the MLflow UI in it): "
                    "apt-get install -y --no-install-recommends chromium, as .ci/run does")
    return path


def _text(dom: str) -> str:
    """The page's visible text, cells joined by ' | '."""
    body = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    return html.unescape(re.sub(r"\s*(<[^>]+>\s*)+", " | ", body))


class Browser:
    """Headless Chromium with one fresh profile (a first-time user's browser: its
    localStorage holds no choice of view yet)."""

    def __init__(self, profile: Path) -> None:
        self.exe, self.profile = _browser(), profile

    def open(self, url: str, shot: Path, *ready: str) -> str:
        """The DOM of ``url`` once its scripts settled (one of ``ready`` in it, tried a few
        times: the SPA renders after its API calls), and a screenshot of the page."""
        for _ in range(PAGE_TRIES):
            shot.unlink(missing_ok=True)
            out = subprocess.run(
                [self.exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 f"--user-data-dir={self.profile}", "--window-size=1400,1000",
                 "--virtual-time-budget=20000", f"--screenshot={shot}", "--dump-dom", url],
                capture_output=True, text=True, timeout=120,
            )
            assert out.returncode == 0, f"chromium failed on {url}:\n{out.stderr[-3000:]}"
            if any(r in out.stdout for r in ready):
                break
        assert shot.is_file(), f"no screenshot of {url}:\n{out.stderr[-3000:]}"
        return out.stdout


def _start_ui(store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, ENV_HOME: str(store)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "jobs/mlflow_ui.py", "--port", str(port)], cwd=REPO_ROOT,
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow_ui.py exited with {proc.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200 and recorded_server(store):
                    return proc, url
        except OSError:
            pass
        time.sleep(0.25)
    _stop_ui(proc, store)
    pytest.fail(f"mlflow_ui.py did not serve {url} within {START_TIMEOUT_S:.0f}s:\n{log.read_text()}")


def _stop_ui(proc: subprocess.Popen, store: Path) -> None:
    """SIGTERM the UI (it stops its mlflow server); kill whatever is left if it hangs."""
    rec = _read_record(store)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    pid = rec.get("pid") if rec else None
    if isinstance(pid, int) and _looks_like_server(pid, rec["url"]):  # left running: kill it
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finished_run(uri: str) -> tracking.RunHandle:
    """A teacher run as the platform logs one: config and params, metrics, and its
    checkpoint (model.safetensors + model.json) under the artifact folder ``model``."""
    c = tracking.client(uri)
    cfg = load_config("configs/teachers/digits.yaml", [f"experiment={EXPERIMENT}", "model.kwargs.width=4"])
    handle = tracking.open_run(c, cfg, RUN)
    tracking.log_metrics(c, handle.run_id, METRICS, step=0)
    model = models.create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=4)
    with tempfile.TemporaryDirectory() as d:
        models.save_model(model, d, dataset="digits", run_id=handle.run_id, metrics=METRICS)
        c.log_artifacts(handle.run_id, d, artifact_path="model")
    c.set_terminated(handle.run_id, status="FINISHED")
    return handle


def test_mlflow_ui_in_chromium(tmp_path):
    browser = Browser(tmp_path / "chromium")  # fails here, before any server, without Chromium
    store = tmp_path / "mlflow"
    SHOTS.mkdir(parents=True, exist_ok=True)
    proc, ui = _start_ui(store, tmp_path / "mlflow_ui.log")
    try:
        # a job on this machine logs through the UI's server (the store's recorded one)
        uri = recorded_server(store)
        run = _finished_run(uri)
        exp = run.experiment_id
        assert tracking.client(uri).get_experiment(exp).tags.get(TAG_EXPERIMENT_KIND) == KIND_TRAINING

        dom = browser.open(f"{ui}/#/experiments", SHOTS / "experiments.png", EXPERIMENT)
        assert EXPERIMENT in _text(dom), _text(dom)[:3000]
        assert f'href="#/experiments/{exp}"' in dom  # the link the user follows next

        # The experiment opens in the model-training view (the runs table), not in MLflow 3's
        # GenAI overview (trace usage, token usage, costs), and on a first visit in the
        # platform's saved view: the key metrics and the model as columns, not MLflow's
        # default Dataset and Source.
        run_link = f'href="#/experiments/{exp}/runs/{run.run_id}"'
        dom = browser.open(f"{ui}/#/experiments/{exp}", SHOTS / "experiment.png", "sort-header-val_acc",
                           "<title>Overview - ")
        text = _text(dom)
        assert f"<title>Runs - Experiment {exp} - MLflow</title>" in dom, text[:3000]
        headers = _headers(dom)  # MLflow 3.18 puts the view's metric columns before its parameters
        assert headers[:3] == ["Run Name", "Created", "Duration"], text[:3000]
        assert sorted(headers[3:]) == ["model.name", "test_acc", "val_acc"], text[:3000]
        assert re.search(rf"{run_link}><span[^>]*>{RUN}</span>", dom), text[:3000]  # a row of the table
        assert "| 0.8125 | 0.875 | convnet |" in text, text[:3000]  # its key values in the row
        assert "viewing a shared view" in text, text[:3000]  # MLflow's banner: keep it or exit
        for genai in ("Token Usage", "Tokens per Trace", "Cost Breakdown", "Overview - Experiment"):
            assert genai not in dom, f"GenAI overview: {genai!r} on the experiment page:\n{text[:3000]}"
        # the second visit is the user's own view (what "Exit shared view" leads back to)
        dom = browser.open(f"{ui}/#/experiments/{exp}", SHOTS / "experiment-again.png", run_link)
        assert "viewing a shared view" not in _text(dom) and "sort-header-val_acc" not in dom, _text(dom)[:3000]
        assert 'data-testid="sort-header-Run Name"' in dom, _text(dom)[:3000]

        run_url = f"{ui}/#/experiments/{exp}/runs/{run.run_id}"
        dom = browser.open(run_url, SHOTS / "run.png", "val_acc")
        text = _text(dom)
        assert f"| {RUN} |" in text and "| Finished |" in text, text[:3000]
        for name, value in METRICS.items():
            assert f"| {name} | {value} |" in text, text[:3000]

        dom = browser.open(f"{run_url}/artifacts", SHOTS / "run-artifacts.png", 'artifact-name="model"')
        node = re.search(r'data-testid="artifact-tree-node" artifact-name="model".*?</div></div>', dom, re.S)
        assert node is not None and "fa-folder" in node.group(0), _text(dom)[:3000]

        # a job started from a shell on this machine (a real process, its own store setting
        # and no MLFLOW_TRACKING_URI) uses the UI's server, and leaves it running
        (job,) = _run_jobs(store, ["job"])
        assert job["uri"] == uri and job["record"]["owner"] == "ui"
        assert _healthy(uri), "a job stopped the UI's server"
        assert json.loads((store / SERVER_FILE).read_text())["url"] == uri
        assert len(_runs_in_db(store)) == 5
    finally:
        _stop_ui(proc, store)
    assert proc.returncode == 0, (tmp_path / "mlflow_ui.log").read_text()
    assert not (store / SERVER_FILE).exists()  # the UI took its server's record away
