"""The jobs as a user runs them: a fresh process, real Ray, the session's MLflow server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("job", sorted(p.name for p in __import__("pathlib").Path(REPO, "jobs").glob("*.py")
                                         if p.name != "_library.py"))
def test_every_job_imports_its_own_library_first(job):
    """``import _library`` is each job's first statement (after the docstring and any
    ``from __future__``): before it, an import could load an installed copy of the library
    instead of the checkout's (jobs/fuse.py once had it inside its docstring)."""
    import ast

    body = ast.parse(open(os.path.join(REPO, "jobs", job)).read()).body
    body = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    first = body[0]
    assert isinstance(first, ast.Import) and [a.name for a in first.names] == ["_library"], (
        f"jobs/{job}: first statement is line {first.lineno}, not `import _library`")


def _run(args, env_extra, timeout=600):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,match", [
    (["jobs/train_teachers.py", "model.name=nope"], "unknown model 'nope'; known models:"),
    (["jobs/train_teachers.py", "--config", "configs/missing.yaml"], "config file not found"),
    (["jobs/train_teachers.py", "data.name=cifar10", "data.root=/nowhere"], "cifar-10-batches-py"),
    (["jobs/distill.py", "data.root=/nowhere"], "dataset 'digits' is built in and reads no files"),
    (["jobs/sweep.py", "search_spaces/none.yaml"], "not found; shipped:"),
    (["jobs/prepare_data.py", "--out", "x", "data.nme=digits"], "unknown config key 'data.nme'"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, match):
    from conftest import run_script

    home = tmp_path / "mlflow-home"
    r = run_script(args, {"METAENSEMBLE_MLFLOW_HOME": str(home), "MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and match in r.stderr and "Traceback" not in r.stderr
    assert not home.exists()


def test_bad_input_in_a_fresh_process_is_one_line_and_exit_2(tmp_path):
    home = tmp_path / "mlflow-home"
    r = _run(["jobs/train_teachers.py", "model.name=nope"], {"METAENSEMBLE_MLFLOW_HOME": str(home),
                                                             "MLFLOW_TRACKING_URI": ""}, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0
    assert "Traceback" not in r.stderr and not home.exists()


def _recorded_checkpoint(storage: Path) -> bool:
    """Whether Ray Train has recorded a checkpoint of a run under ``storage`` (its
    ``checkpoint_manager_snapshot.json``): only a recorded one is resumed from, and a
    checkpoint folder can exist a moment before it is recorded."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]:
                return True
        except (OSError, ValueError, KeyError, TypeError):  # being written, or none yet
            continue
    return False


def test_train_teachers_job_interrupted_then_rerun_resumes_and_finishes(mlflow_uri, tmp_path):
    """The teacher-zoo job end to end, interrupted first (issue 29): SIGINT mid-run ends
    it with one line and exit 130, no traceback and no Ray hint; every run it opened is
    KILLED with an end time; none of its processes keeps running. The same command again
    resumes from the checkpoints, finishes every run and prints the zoo, while a second
    job started at the same moment on the same store (its own zoo) runs beside it: both
    finish with no traceback or Ray error in either console, sharing the one MLflow server
    and the one Ray storage folder, each with its own local Ray instance."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from metaensemble import tracking
    from metaensemble.cli import EXIT_INTERRUPTED, INTERRUPTED
    from metaensemble.config import REPO_ROOT

    experiment = f"jobtest/teachers-{uuid.uuid4().hex[:6]}"
    args = ["jobs/train_teachers.py", "zoo.num_teachers=2", "zoo.pack_size=2", "train.epochs=12", "model.name=convnet",
            "model.kwargs.width=4", f"storage_path={tmp_path / 'ray'}", f"experiment={experiment}"]
    invocation = f"test-{uuid.uuid4().hex}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "METAENSEMBLE_INVOCATION": invocation}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=out, stderr=err)
        deadline = time.monotonic() + 240
        while not _recorded_checkpoint(tmp_path / "ray") and proc.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "err.log").read_text()[-3000:]
            time.sleep(0.2)
        assert proc.poll() is None, "the zoo finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    stdout, stderr = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert code == EXIT_INTERRUPTED, stdout[-2000:] + stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == INTERRUPTED
    assert "Traceback" not in stdout + stderr and "Tuner.restore" not in stdout + stderr, stderr[-3000:]
    c = tracking.client(mlflow_uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all(r.data.tags.get("metaensemble.invocation") == invocation for r in runs)
    assert {r.info.status for r in runs} == {"KILLED"} and all(r.info.end_time for r in runs)
    needle = f"METAENSEMBLE_INVOCATION={invocation}".encode()
    deadline = time.monotonic() + 20  # Ray's own processes take a few seconds to exit after the driver
    while (left := [p for p in Path("/proc").glob("[0-9]*") if _environ_has(p, needle)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the interrupted job still running: {[_cmdline(p) for p in left]}"

    # the same command (resumed, not restarted) and, side by side, another zoo's job
    beside = [args[0], "zoo.num_teachers=1", "zoo.pack_size=1", "train.epochs=2", *args[4:-1],
              f"experiment={experiment}-beside"]
    assert beside[4] == "model.name=convnet" and beside[-2].startswith("storage_path=")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    env.pop("RAY_ADDRESS", None)
    procs = [subprocess.Popen([sys.executable, *a], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in (args, beside)]
    (r, b) = [_Done(p, *p.communicate(timeout=600)) for p in procs]
    for job in (r, b):
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        console = job.stdout + job.stderr
        for noise in ("Traceback", "Found multiple active Ray instances", "GetTimeoutError", "Error"):
            assert noise not in console, f"{noise!r} in a console of two jobs side by side:\n{console[-4000:]}"
    assert "teacher zoo teacher.digits.convnet" in b.stdout
    (other,) = c.search_runs([c.get_experiment_by_name(f"{experiment}-beside").experiment_id])
    assert other.info.status == "FINISHED" and other.data.metrics["test_acc"] > 0.3
    # side by side, not one after the other: the second zoo's run began before the resumed one ended
    assert other.info.start_time < max(x.info.end_time for x in c.search_runs([exp.experiment_id]))
    assert "training 2: [0, 1] in 1 Ray Train run of up to 2" in r.stdout  # one pack
    assert "resumed from checkpoint after epoch" in r.stdout + r.stderr
    again = c.search_runs([exp.experiment_id])
    assert {x.info.run_id for x in again} == {x.info.run_id for x in runs}  # the same runs, reopened
    assert {x.info.status for x in again} == {"FINISHED"}
    # the listing covers every convnet teacher the session's registry holds (other tests add some)
    assert re.search(r"teacher zoo teacher\.digits\.convnet: \d+ teachers", r.stdout)
    assert "seed version  val_acc test_acc" in r.stdout
    listed = {int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s+\d+\s+[01]\.\d{4}\s", r.stdout, re.M)}
    assert {0, 1} <= listed  # seed, version, val_acc rows of the listing


class _Done:
    def __init__(self, proc, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = proc.returncode, stdout, stderr


def _cmdline(proc) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return proc.name


def _environ_has(proc, needle: bytes) -> bool:
    try:
        return needle in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def test_the_readmes_test_command_is_the_script_ci_runs_and_it_sets_up_chromium():
    """Issue 29: the README's test command must pass on a fresh machine as written, so it
    is ``.ci/run`` itself, which installs Chromium (the UI test's browser) where missing."""
    import os
    import re

    from metaensemble.config import REPO_ROOT

    block = re.search(r"## Tests\n\n```bash\n(.+?)\n```", (REPO_ROOT / "README.md").read_text(), re.S)
    assert block and block.group(1).strip() == ".ci/run"
    script = REPO_ROOT / ".ci" / "run"
    text = script.read_text()
    assert os.access(script, os.X_OK)
    assert "command -v chromium" in text and "apt-get install" in text
    assert text.rstrip().endswith('pip install -e ".[dev]" && python -m pytest -q tests')
