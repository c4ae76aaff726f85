"""Where the test suite's time goes: pytest run under a sampler that reads every process's
CPU time once a second, then adds it up by kind of process, overall and per test.

    python benchmarks/suite_cpu.py                          # the whole suite (python -m pytest -q tests)
    python benchmarks/suite_cpu.py --out suite_cpu_engine -- tests/engine

A process counts under the first name it showed other than Ray's ``ray::IDLE``: a Ray
worker process under the actor class it became (``ray::RayTrainWorker``,
``ray::TrainController``, ...), its start-up included; a worker that runs tasks (Ray Data's,
for one) under the first task it was seen running; ``ray::IDLE`` is a worker never seen
doing anything. Processes already running when the suite starts count apart, and so does
this sampler. CPU of a process that starts and ends between two samples is missed (a
fraction of a second each); a sample's CPU goes to the tests whose time it overlaps, in
proportion.
Writes benchmarks/results/<out>.{json,md}: wall time, CPU time, the busy share of the cores,
CPU seconds and processes started by kind, and the slowest tests with their CPU by kind.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TICKS = os.sysconf("SC_CLK_TCK")

# Writes one line per test (setup, call and teardown together) to $SUITE_CPU_TESTS.
PLUGIN = '''
import json, os, time
import pytest
_OUT = open(os.environ["SUITE_CPU_TESTS"], "a")

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = time.time()
    yield
    _OUT.write(json.dumps({"id": item.nodeid, "t0": t0, "t1": time.time()}) + "\\n")
    _OUT.flush()
'''

# (kind, a part of the command line that names it), first match wins
KINDS = [
    ("raylet", "/raylet/raylet"), ("gcs_server", "/gcs/gcs_server"), ("ray dashboard", "ray-dashboard-"),
    ("ray dashboard", "dashboard/dashboard.py"), ("ray log monitor", "log_monitor.py"),
    ("ray runtime-env agent", "runtime_env/agent"), ("ray CLI (start, status, job submit)", "/bin/ray "),
    ("mlflow server: job execution", "huey"), ("mlflow server: job execution", "mlflow.server.jobs"),
    ("mlflow server", "mlflow server"),
    ("mlflow server", "uvicorn"), ("mlflow server", "mlflow.server"), ("chromium", "chrom"),
    ("a job in a fresh process", "jobs/"),
]


def kind_of(cmd: str, pytest_pid: int, pid: int) -> str:
    if pid == pytest_pid:
        return "pytest (the test process)"
    if cmd.startswith("ray::"):
        return "ray::" + re.split(r"[.\s\0(]", cmd[5:], maxsplit=1)[0]
    for kind, part in KINDS:
        if part in cmd:
            return kind
    return "python (other)" if "python" in cmd else "other"


class Sampler(threading.Thread):
    """Per process (pid + start time): its CPU ticks at each sample and its last command line."""

    def __init__(self, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period, self.stop_flag = period, threading.Event()
        self.last: dict[tuple[str, str], int] = {}
        self.cmd: dict[tuple[str, str], str] = {}
        self.samples: list[tuple[float, dict[tuple[str, str], int]]] = []
        self.baseline = {k: t for k, (t, _) in self._read().items()}  # what ran before the suite

    @staticmethod
    def _read() -> dict[tuple[str, str], tuple[int, str]]:
        out = {}
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                stat = (proc / "stat").read_text()
                fields = stat[stat.rfind(")") + 2:].split()
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, ValueError):
                continue
            out[(proc.name, fields[19])] = (int(fields[11]) + int(fields[12]), cmd)
        return out

    def sample(self) -> None:
        now, deltas = time.time(), {}
        for key, (ticks, cmd) in self._read().items():
            before = self.last.get(key, self.baseline.get(key, 0))
            if ticks > before:
                deltas[key] = ticks - before
            self.last[key] = ticks
            # the first name that says what the process does: a Ray worker starts as a plain
            # python command, then names itself ray::IDLE, then after its actor or task; a
            # task worker goes back to ray::IDLE between tasks, its CPU stays with the work
            known = self.cmd.get(key)
            if cmd and (known is None or known.startswith("ray::IDLE")
                        or (cmd.startswith("ray::") and not known.startswith("ray::"))):
                self.cmd[key] = cmd
        self.samples.append((now, deltas))

    def run(self) -> None:
        while not self.stop_flag.wait(self.period):
            self.sample()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="suite_cpu", help="results file name (without extension)")
    ap.add_argument("--top", type=int, default=30, help="how many of the slowest tests to list (default 30)")
    ap.add_argument("pytest_args", nargs="*", default=["tests"], help="after --: pytest's arguments")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "suite_cpu_plugin.py").write_text(PLUGIN)
        tests_file = Path(tmp) / "tests.jsonl"
        env = {**os.environ, "SUITE_CPU_TESTS": str(tests_file),
               "PYTHONPATH": os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH")) if p)}
        sampler = Sampler()
        t0 = time.time()
        sampler.start()
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "suite_cpu_plugin", *args.pytest_args],
                                cwd=REPO, env=env)
        code = proc.wait()
        sampler.stop_flag.set()
        sampler.join()
        sampler.sample()
        wall = time.time() - t0
        tests = [json.loads(line) for line in tests_file.read_text().splitlines()] if tests_file.exists() else []

    kind_by_key = {k: kind_of(c, proc.pid, int(k[0])) for k, c in sampler.cmd.items()}
    for key in sampler.baseline:
        kind_by_key[key] = "running before the suite"
    for key in sampler.cmd:
        if key[0] == str(os.getpid()):
            kind_by_key[key] = "this sampler"
    per_kind: collections.Counter = collections.Counter()
    started: collections.Counter = collections.Counter()
    for key in sampler.last:
        if key not in sampler.baseline:
            started[kind_by_key.get(key, "other")] += 1
    for _, deltas in sampler.samples:
        for key, d in deltas.items():
            per_kind[kind_by_key.get(key, "other")] += d / TICKS
    cpu = sum(per_kind.values())
    cores = os.cpu_count() or 1
    per_test = []
    for t in tests:
        c: collections.Counter = collections.Counter()
        prev = t0
        for ts, deltas in sampler.samples:  # sample (prev, ts] overlapping the test (t0, t1)
            share = max(0.0, min(ts, t["t1"]) - max(prev, t["t0"])) / max(ts - prev, 1e-9)
            prev = ts
            if share > 0:
                for key, d in deltas.items():
                    c[kind_by_key.get(key, "other")] += share * d / TICKS
        per_test.append({"id": t["id"], "wall_s": round(t["t1"] - t["t0"], 1), "cpu_s": round(sum(c.values()), 1),
                         "by_kind": {k: round(v, 1) for k, v in c.most_common(6)}})
    per_test.sort(key=lambda r: -r["wall_s"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {
        "commit": commit,
        "command": " ".join(["python benchmarks/suite_cpu.py", "--out", args.out, "--", *args.pytest_args]),
        "pytest_exit": code, "tests": len(tests), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "cores": cores, "busy_share": round(cpu / (wall * cores), 3),
        "by_kind": [{"kind": k, "cpu_s": round(v, 1), "share": round(v / cpu, 3),
                     "processes": started.get(k, 0)} for k, v in per_kind.most_common()],
        "slowest": per_test[: args.top],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Where the suite's time goes: `{result['command']}` at {commit}", "",
             f"{len(tests)} tests, pytest exit {code}: {wall:.0f} s of wall time, {cpu:.0f} s of CPU on "
             f"{cores} cores ({100 * result['busy_share']:.0f}% busy).", "",
             "| kind of process | CPU (s) | share | processes started |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['cpu_s']:.1f} | {100 * r['share']:.1f}% | {r['processes']} |"
              for r in result["by_kind"]]
    lines += ["", f"The {args.top} slowest tests (setup, call and teardown together):", "",
              "| test | wall (s) | CPU (s) | CPU by kind (s) |", "|---|---|---|---|"]
    lines += [f"| `{r['id']}` | {r['wall_s']} | {r['cpu_s']} | "
              + ", ".join(f"{k} {v}" for k, v in r["by_kind"].items()) + " |" for r in result["slowest"]]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:2 + 4 + len(result["by_kind"])]))
    print(f"written: {RESULTS / args.out}.json and .md")
    return code


if __name__ == "__main__":
    sys.exit(main())
