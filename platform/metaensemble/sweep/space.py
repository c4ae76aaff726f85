"""Search-space files: one YAML is a whole sweep, validated before anything runs.

    name: teacher
    base: configs/teachers/digits.yaml     # the config every trial starts from
    overrides: {train.epochs: 8}           # fixed changes to the base (dotted keys)
    metric: val_acc                        # a validation metric: never test
    mode: max
    num_samples: 8
    max_concurrent_trials: 0               # 0: as many as the cluster's CPUs/GPUs allow
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or {name: fifo}
    search: {name: random}                 # or {name: optuna}
    params:                                # dotted config key -> one distribution
      optim.lr: {loguniform: [0.005, 0.2]}
      optim.weight_decay: {loguniform: [1.0e-5, 1.0e-3]}
      train.epochs: {choice: [4, 8]}
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metaensemble.config import Config, resolve_path
from metaensemble.errors import ConfigError, SearchSpaceError
from metaensemble.validation import check_names, load_config

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint", "grid")
VALID_METRICS = ("val_acc", "val_nll", "val_ece")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Strict):
    name: Literal["asha", "fifo"] = "asha"
    max_t: int | None = Field(None, ge=1)
    """Most epochs a trial may run (default: the base config's train.epochs)."""
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)


class SearchSpec(_Strict):
    name: Literal["random", "optuna"] = "random"
    seed: int = 0


SWEEP_SETTINGS = ("num_samples", "max_concurrent_trials")


class SearchSpace(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(0, ge=0)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    params: dict[str, dict[str, Any]]

    source: str | None = None

    def base_config(self, extra: list[str] | None = None) -> Config:
        cfg = load_config(self.base, [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()] + (extra or []))
        return cfg

    def split_overrides(self, args: list[str]) -> tuple[SearchSpace, list[str]]:
        """Command-line ``key=value`` words: the sweep settings among them
        (``num_samples``, ``max_concurrent_trials``) applied to a copy of this space, and
        the rest, which are dotted overrides of the base config."""
        settings: dict[str, Any] = {}
        rest = []
        for a in args:
            key, sep, value = a.partition("=")
            if sep and key in SWEEP_SETTINGS:
                try:
                    settings[key] = int(value)
                except ValueError:
                    raise SearchSpaceError(f"{key} must be an integer, got {value!r}") from None
                low = SearchSpace.model_fields[key].metadata[0].ge
                if settings[key] < low:
                    raise SearchSpaceError(f"{key} must be >= {low}, got {settings[key]}")
            else:
                rest.append(a)
        return self.model_copy(update=settings), rest

    def spec_hash(self) -> str:
        d = self.model_dump(exclude={"source"})
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _check_distribution(key: str, dist: dict[str, Any]) -> None:
    if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise SearchSpaceError(
            f"params.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}}}: [...], got {dist!r}"
        )
    kind, arg = next(iter(dist.items()))
    if not isinstance(arg, list) or not arg:
        raise SearchSpaceError(f"params.{key}.{kind}: expected a non-empty list, got {arg!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(arg) != 2 or not all(isinstance(v, int | float) for v in arg) or not arg[0] < arg[1]:
            raise SearchSpaceError(f"params.{key}.{kind}: expected [low, high] numbers with low < high, got {arg!r}")
        if kind == "loguniform" and arg[0] <= 0:
            raise SearchSpaceError(f"params.{key}.loguniform: low must be > 0, got {arg[0]}")


def sample_value(dist: dict[str, Any], rng: random.Random) -> Any:
    kind, arg = next(iter(dist.items()))
    if kind in ("choice", "grid"):
        return rng.choice(arg)
    if kind == "uniform":
        return rng.uniform(*arg)
    if kind == "loguniform":
        import math

        return math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1])))
    return rng.randrange(int(arg[0]), int(arg[1]))


def load_space(path: str | Path) -> SearchSpace:
    """Parse and fully validate a search-space file, including that every param path
    exists in the base config and that sampled values make a valid config."""
    p = resolve_path(path)
    if not p.is_file():
        known = sorted(x.name for x in (resolve_path("search_spaces")).glob("*.yaml"))
        raise SearchSpaceError(f"search space {p} not found; shipped: {', '.join(known) or '(none)'}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SearchSpaceError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SearchSpaceError(f"{p} must hold a mapping with name, base, params, ...")
    try:
        space = SearchSpace.model_validate({**raw, "source": str(p)})
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown key {loc!r} (valid: {', '.join(f for f in SearchSpace.model_fields if f != 'source')})")
            else:
                msgs.append(f"{loc}: {err['msg']}")
        raise SearchSpaceError(f"{p}: " + "; ".join(msgs)) from None
    if space.metric not in VALID_METRICS:
        raise SearchSpaceError(f"{p}: metric must be a validation metric ({', '.join(VALID_METRICS)}), got {space.metric!r}")
    if not space.params:
        raise SearchSpaceError(f"{p}: params is empty; give at least one dotted key with a distribution")
    for key, dist in space.params.items():
        if not isinstance(dist, dict):
            raise SearchSpaceError(f"{p}: params.{key} must be a mapping like {{loguniform: [1e-4, 1e-1]}}")
        _check_distribution(key, dist)
    try:
        base = space.base_config()
        rng = random.Random(0)
        check_names(base.with_overrides({k: sample_value(d, rng) for k, d in space.params.items()}))
    except ConfigError as e:
        raise SearchSpaceError(f"{p}: {e}") from None
    return space
