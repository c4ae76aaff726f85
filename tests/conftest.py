"""Shared, real components: one local MLflow server and one local Ray instance per
test session (starting either takes seconds, so tests share them)."""

from __future__ import annotations

import os
import pickle
import uuid

import numpy as np
import pytest

from metaensemble.validation import load_config

# Fixtures that start real services: a test that uses one (or is marked ``slow`` itself,
# e.g. it runs a job in a fresh process) is in the slow tier. The quick tier for the inner
# loop is ``python -m pytest -q -m "not slow" tests``: no Ray, no MLflow server, no jobs.
_SERVICE_FIXTURES = {"ray_local", "mlflow_uri", "ray_head", "cluster"}
# modules that start servers or jobs themselves, or train a zoo in-process
_SLOW_MODULES = {"test_store.py", "test_ui_browser.py", "test_weightformer_learns.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts Ray, an MLflow server or a job (left out of the quick tier)")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op torch thread in the test process, as in the engine's Ray workers: the
    networks here are tiny, and two threads on two shared cores spend their time
    synchronising (measured: ~3x the CPU time of a generator's training, far more wall
    time while Ray workers share the cores)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def _mlflow_server(tmp_path_factory):
    """The session's MLflow server, starting in a background thread (its URL is known at
    once, so MLFLOW_TRACKING_URI is set before anything else starts: Ray's processes
    inherit it); ``mlflow_uri`` waits for it to answer. Ray starts meanwhile."""
    import threading

    from metaensemble.tracking import LocalTrackingServer

    server = LocalTrackingServer(store=tmp_path_factory.mktemp("mlflow"))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    failed: list[BaseException] = []

    def start():
        try:
            server.start()
        except BaseException as e:  # raised again by mlflow_uri, in the test that needs it
            failed.append(e)

    starting = threading.Thread(target=start, daemon=True)
    starting.start()

    def ready() -> str:
        starting.join()
        if failed:
            raise failed[0]
        return server.url

    yield ready
    starting.join()
    server.stop()
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def mlflow_uri(_mlflow_server):
    url = _mlflow_server()
    import mlflow

    mlflow.set_tracking_uri(url)
    return url


@pytest.fixture(scope="session")
def ray_local(_mlflow_server, request):
    """A real local Ray instance with 4 logical CPUs (2-worker gloo DDP + trial drivers),
    started while the MLflow server starts; the tests that use it get that server too."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    from metaensemble.engine.trainer import REPORT_POLL_S

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)
    from metaensemble.engine.trainer import LOCAL_RAY_ENV, RAY_DATA_ENV

    # what ensure_ray sets for the jobs' local instances (no preemption watcher per run)
    for k, v in {**RAY_DATA_ENV, **LOCAL_RAY_ENV}.items():
        os.environ.setdefault(k, v)
    # every process this session's Ray instances start carries the marker (Ray's children
    # inherit the environment): what ray.shutdown leaves behind is found and ended by it
    marker = os.environ.setdefault("METAENSEMBLE_TEST_SESSION", uuid.uuid4().hex)
    ray.init(num_cpus=4, log_to_driver=True, include_dashboard=True)
    try:
        request.getfixturevalue("mlflow_uri")  # torn down after this fixture
    except BaseException:
        ray.shutdown()
        raise
    yield ray
    ray.shutdown()
    _end_leftovers(marker)


def _end_leftovers(marker: str) -> None:
    """SIGKILL the Ray worker processes (``ray::...``) still carrying ``marker`` after Ray
    shut down: a Ray Train controller whose raylet is gone can outlive it (seen: 800 MB
    each, adopted by init)."""
    import signal
    from pathlib import Path

    needle = f"METAENSEMBLE_TEST_SESSION={marker}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if ((proc / "cmdline").read_bytes().startswith(b"ray::")
                    and needle in (proc / "environ").read_bytes().split(b"\0")):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture
def digits_cfg(tmp_path):
    """A fast digits config with its own Ray storage and MLflow experiment."""

    def make(*overrides: str):
        return load_config(
            "configs/teachers/digits.yaml",
            [f"storage_path={tmp_path / 'ray'}", f"experiment=test/{uuid.uuid4().hex[:8]}",
             "train.epochs=2", "model.kwargs.width=8",
             # the engine tests' own small setting: the teachers' split and independent inits
             "data.val_fraction=0.1", "model.init_seed=null", *overrides],
        )

    return make


# ---- small files in the real on-disk formats --------------------------------------------
def write_cifar(root, name="cifar10", n_per_batch=20, n_test=30, seed=0):
    """Tiny CIFAR files in the python-pickle layout (bytes keys, as the originals)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        files, key, k = [f"data_batch_{i}" for i in range(1, 6)], b"labels", 10
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        files, key, k = ["train"], b"fine_labels", 100
    blobs = {}
    for f in files + (["test_batch"] if name == "cifar10" else ["test"]):
        n = n_test if f.startswith("test") else n_per_batch
        blob = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, k, n).tolist()}
        (d / f).write_bytes(pickle.dumps(blob, protocol=2))
        blobs[f] = blob
    return blobs


def write_imagefolder(root, classes=("cat", "dog", "owl"), per_class=6, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


class RayRunDir:
    """The Ray Train storage folder of ``cfg``'s run, ``<run key>-<MLflow run id prefix>``,
    found once it exists (tests watch it while the run is going)."""

    def __init__(self, cfg) -> None:
        from pathlib import Path

        self.root, self.key = Path(cfg.resolved_storage_path()), cfg.run_key()

    def path(self):
        found = sorted(self.root.glob(f"{self.key}-*")) if self.root.is_dir() else []
        return found[0] if found else self.root / f"{self.key}-pending"

    def glob(self, pattern: str):
        return self.path().glob(pattern)

    def __truediv__(self, name: str):
        return self.path() / name


@pytest.fixture
def ray_run_dir():
    return RayRunDir


class WorkerKiller:
    """SIGKILLs a process (a Ray Train worker) from a background thread as soon as
    ``find_pid()`` returns its pid, ``delay`` seconds later; ``join()`` gives the pids killed."""

    def __init__(self, find_pid, delay: float = 0.0, timeout: float = 240.0) -> None:
        import threading

        self.killed: list[int] = []
        self._thread = threading.Thread(target=self._watch, args=(find_pid, delay, timeout), daemon=True)
        self._thread.start()

    def _watch(self, find_pid, delay: float, timeout: float) -> None:
        import signal
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = find_pid()
            if pid is not None:
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                return
            time.sleep(0.05)

    def join(self) -> list[int]:
        self._thread.join(timeout=5)
        return self.killed


@pytest.fixture
def worker_killer():
    return WorkerKiller


class ScriptResult:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_script(args: list[str], env: dict[str, str] | None = None) -> ScriptResult:
    """``python <args>`` from the repository root, run in this process (runpy, its own
    argv, environment and captured streams): the script's own code path for input that
    fails before any work, without a fresh interpreter's seconds of imports. Every job
    also has a test in a real fresh process (tests/test_jobs.py and the job's tests)."""
    import contextlib
    import io
    import runpy
    import sys
    import traceback

    from metaensemble.config import REPO_ROOT

    env = env or {}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.environ.update(env)
    os.chdir(REPO_ROOT)
    sys.argv = list(args)
    script_dir = str((REPO_ROOT / args[0]).parent)
    sys.path.insert(0, script_dir)  # as `python jobs/x.py` does (jobs/_library.py)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO_ROOT / args[0]), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what a fresh process would print and exit 1 with
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        sys.path.remove(script_dir)
        os.chdir(saved_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ScriptResult(code, out.getvalue(), err.getvalue())
