"""What every job shares: argument parsing and turning bad input into one clear line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import uuid
from collections.abc import Callable

from metaensemble.errors import MetaEnsembleError


def config_parser(description: str, default_config: str | None,
                  commands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """``[--config F] [key.sub=value ...]``; with ``commands`` (name -> help), a first
    positional ``command`` chosen among them comes before the overrides."""
    p = argparse.ArgumentParser(description=description)
    if commands:
        p.add_argument("command", choices=list(commands), help="; ".join(f"{k}: {v}" for k, v in commands.items()))
    p.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return p


def work_done() -> None:
    """Call before printing a job's summary: disconnects from Ray, so worker lines still
    in flight (they stay in the runs' log files) never arrive after the summary."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()


INTERRUPTED = "interrupted: rerun the same command to resume"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def run_job(main: Callable[[], int | None]) -> None:
    """Run ``main``; bad input exits 2 with one line on stderr instead of a traceback.

    Ctrl-C or SIGTERM ends the job with one line (INTERRUPTED) and exit 130: Ray and
    everything it runs for this job stopped, every MLflow run the job opened that is
    still RUNNING marked KILLED (``tracking.runs.close_interrupted``). Rerunning the
    command reopens those runs and resumes them from their last checkpoints."""
    from metaensemble.tracking.runs import INVOCATION_ENV

    invocation = os.environ.setdefault(INVOCATION_ENV, uuid.uuid4().hex)
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C reaches the job, not Tune's own stop
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if not getattr(signal.signal, "records_stops", False):  # once per process
        signal.signal = _recording(signal.signal)
    try:
        code = main()
    except MetaEnsembleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit):
        # inside ray.get, Ray turns the KeyboardInterrupt into SystemExit(1)
        if not _signalled:
            raise
        _stop_after_interrupt(invocation)
        print(INTERRUPTED, file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)  # no interpreter teardown: Ray's threads print nothing more
    sys.exit(code or 0)


_signalled: list[int] = []
"""The stop signals this job received: Ctrl-C or SIGTERM, whoever handled them."""


def _raise_interrupt(signum, frame) -> None:
    _signalled.append(signum)
    raise KeyboardInterrupt


def _recording(set_handler):
    """``signal.signal``, except that a SIGINT/SIGTERM handler installed later is wrapped
    so the signal is recorded first. Ray installs its own (Ray Train aborts its run
    gracefully on SIGINT and then exits 1; a Ray driver exits on SIGTERM): the job still
    has to know it was interrupted, not broken."""
    def install(signum, handler):
        if signum in (signal.SIGINT, signal.SIGTERM) and callable(handler) and handler is not _raise_interrupt:
            inner = handler

            def handler(s, frame):
                _signalled.append(s)
                return inner(s, frame)
        return set_handler(signum, handler)

    install.records_stops = True
    return install


def _stop_after_interrupt(invocation: str) -> None:
    """Stop this job's Ray processes, then close its runs (the MLflow server it uses is
    not Ray's, so it still answers), then run the exit handlers; a second Ctrl-C
    meanwhile is ignored."""
    import contextlib
    import io

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri and "mlflow" in sys.modules:
            from metaensemble.tracking.runs import client, close_interrupted

            with contextlib.suppress(Exception):
                close_interrupted(client(uri), invocation)
        import atexit

        atexit._run_exitfuncs()  # e.g. the local store's MLflow server stops if no other job uses it
