"""What every job shares: argument parsing and turning bad input into one clear line."""

from __future__ import annotations

import argparse
import sys
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


def run_job(main: Callable[[], int | None]) -> None:
    """Run ``main``; bad input exits 2 with one line on stderr instead of a traceback."""
    try:
        code = main()
    except MetaEnsembleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
