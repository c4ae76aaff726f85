"""Typed experiment configs: a YAML file plus dotted ``key.sub=value`` overrides.

A config is validated completely (unknown keys, wrong types, unknown registry names,
missing data roots) before a job touches Ray or MLflow. The resolved config is what
every run saves next to its results, and its hash names the run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from metaensemble.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    name: str = "digits"
    root: str | None = None
    """Dataset folder (cifar10/cifar100/imagefolder/parquet); relative paths resolve
    against the repository root, so workers that chdir still find it."""
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Used only by datasets without an official test split (digits, synthetic)."""
    split_seed: int = 0
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Train on a fixed subset of the train split (the same examples on every worker and
    every run with this split_seed); val and test are unchanged."""
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    augment: bool = True
    loader_workers: int = Field(0, ge=0)
    image_size: int | None = Field(None, gt=0)
    # synthetic only
    num_classes: int = Field(10, ge=2)
    num_samples: int = Field(2000, ge=10)
    channels: int = Field(3, ge=1)


class ModelConfig(_Strict):
    name: str = "convnet"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init_seed: int | None = Field(None, ge=0)
    """Seed of the initial weights alone (None: the run's ``seed``). Runs with different
    seeds and one init_seed start from the same weights and differ only in data order and
    augmentation: a zoo of such teachers lies in one loss basin."""


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    warmup_epochs: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: bool = False
    """bf16 autocast; only takes effect on GPU."""
    channels_last: bool = False
    """channels_last memory format; only takes effect on GPU."""
    grad_clip: float | None = Field(None, gt=0.0)
    select_metric: str = "val_acc"
    select_mode: Literal["max", "min"] = "max"
    log_every: int = Field(0, ge=0)
    """Print a line every N steps (0: per-epoch lines only)."""
    steps_per_epoch: int | None = Field(None, gt=0)
    """Optimiser steps per epoch (per worker), cycling the train loader as needed; default:
    one pass over the worker's shard. Small subsets (meta-training) set it."""


class ScalingConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(0, ge=-1)
    torch_threads: int = Field(0, ge=0)
    """torch intra-op threads per worker (0: one per CPU reserved for the worker)."""


class ZooConfig(_Strict):
    num_teachers: int = Field(4, ge=1)
    first_seed: int = 0
    max_concurrent: int = Field(0, ge=0)
    """0: as many as the cluster's resources allow."""
    pack_size: int = Field(1, ge=0)
    """Teachers trained one after another in one Ray Train run (``engine.fit_pack``): 1
    gives every teacher its own worker group (large models); more pays the workers'
    start-up once per pack, which dominates when a teacher trains in seconds; 0 spreads
    the missing seeds evenly over the runs that fit at once."""


class DistillConfig(_Strict):
    """Distillation from an ensemble (kd, weightformer): the loss
    alpha * T^2 * KL(mean_k softmax(z_k/T) || softmax(z_s/T)) + (1 - alpha) * CE."""

    teachers: list[str] = Field(default_factory=list)
    """Teacher checkpoints (folders or MLflow URIs such as models:/teacher.digits.convnet/3)."""
    alpha: float = Field(1.0, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0)


class MetaConfig(_Strict):
    """WeightFormer meta-training: which teachers, how ensembles are drawn, the extra losses."""

    ensemble_size: int = Field(4, ge=2)
    """K, the teachers per ensemble (at most the generator's max_teachers)."""
    train_teachers: list[str] = Field(default_factory=list)
    val_teachers: list[str] = Field(default_factory=list)
    test_teachers: list[str] = Field(default_factory=list)
    """Teacher URIs per side; the meta-train job fills them from the teacher zoo."""
    zoo_size: int = Field(16, ge=2)
    num_val_teachers: int = Field(4, ge=0)
    num_test_teachers: int = Field(4, ge=1)
    teacher_config: str = "configs/teachers/digits.yaml"
    """Recipe the job uses to train zoo teachers the registry lacks."""
    val_ensembles: int = Field(4, ge=1)
    test_ensembles: int = Field(4, ge=1)
    lambda_mask: float = Field(1e-3, ge=0.0)
    lambda_shift: float = Field(0.1, ge=0.0)
    """0 switches shift consistency off (no second view is generated)."""
    ablations: list[Literal["no_mask", "no_shift", "no_cross", "base_mean", "mlp"]] = Field(
        default_factory=lambda: ["no_mask", "no_shift", "no_cross", "base_mean", "mlp"])
    mlp_hidden: int = Field(256, gt=0)
    kd_epochs: int = Field(15, ge=1)
    """Epochs of the KD baselines (on the subset and on the full train split)."""
    kd_ensembles: int = Field(2, ge=0)
    """How many of the test ensembles get KD baselines (each costs two training runs)."""
    finetune_epochs: int = Field(1, ge=0)
    finetune_lr: float = Field(0.01, gt=0.0)


DISTILL_METHODS = ("kd", "weightformer")
META_METHODS = ("weightformer",)
META_EVAL_ONLY = ("zoo_size", "num_val_teachers", "num_test_teachers", "teacher_config", "test_ensembles",
                  "ablations", "mlp_hidden", "kd_epochs", "kd_ensembles", "finetune_epochs", "finetune_lr")
"""Fields of ``meta`` that only the job's evaluation reads: changing them retrains nothing."""


class Config(_Strict):
    task: str = "teachers"
    method: str = "supervised"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    zoo: ZooConfig = Field(default_factory=ZooConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    meta: MetaConfig = Field(default_factory=MetaConfig)
    storage_path: str = "runs/ray"
    """Ray Train storage: a folder (relative to the repository) or a URI (s3://...)."""
    experiment: str | None = None
    """MLflow experiment; default ``<dataset>/<task>``."""

    @model_validator(mode="after")
    def _check_names(self) -> Config:
        # Imported here: the registries import this module's types.
        from metaensemble import data, methods, models

        data.check_name(self.data.name)
        models.check_name(self.model.name)
        methods.check_name(self.method)
        return self

    # ---- derived values -------------------------------------------------------------
    @property
    def experiment_name(self) -> str:
        return self.experiment or f"{self.data.name}/{self.task}"

    def resolved_storage_path(self) -> str:
        if "://" in self.storage_path:
            return self.storage_path
        return str(resolve_path(self.storage_path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self, exclude_seed: bool = True) -> str:
        """Hash of everything that changes what is trained (not where it is stored)."""
        d = self.to_dict()
        for k in ("storage_path", "experiment", "zoo"):
            d.pop(k, None)
        # Sections a method does not read do not name its runs.
        if self.method not in DISTILL_METHODS:
            d.pop("distill")
        if self.method not in META_METHODS:
            d.pop("meta")
        else:
            for k in META_EVAL_ONLY:
                d["meta"].pop(k)
        d["scaling"] = {k: v for k, v in d["scaling"].items() if k in ("num_workers",)}
        if exclude_seed:
            d.pop("seed")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def run_key(self) -> str:
        """Deterministic run name: re-running the same command resumes this run."""
        return f"{self.task}-{self.model.name}-{self.config_hash()}-s{self.seed}"

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> Config:
        d = self.to_dict()
        items = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        for key, value in items.items():
            _set_dotted(d, key, value)
        return build_config(d)


def resolve_path(p: str | Path) -> Path:
    """Relative paths are taken from the repository root (Ray workers chdir elsewhere)."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "model.kwargs.width=32"]`` -> ``{"train.lr": 0.1, ...}``.

    Values are read as YAML scalars, so ``true``, ``1e-3`` and ``[1, 2]`` keep their types.
    """
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"override {arg!r} is not of the form key.sub=value")
        key, raw = arg.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {arg!r}: value is not valid YAML ({e})") from None
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = d
    model: type[BaseModel] | None = Config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} is not a section")
        if part not in node:
            _unknown_key(".".join(parts[: i + 1]), model, node)
        node = node[part]
        model = _submodel(model, part)
    if not isinstance(node, dict):
        raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:-1])} is not a section")
    leaf = parts[-1]
    # Free-form dicts (model.kwargs) accept new keys; typed sections do not.
    if leaf not in node and model is not None:
        _unknown_key(dotted, model, node)
    node[leaf] = value


def _submodel(model: type[BaseModel] | None, field: str) -> type[BaseModel] | None:
    if model is None or field not in model.model_fields:
        return None
    ann = model.model_fields[field].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _unknown_key(dotted: str, model: type[BaseModel] | None, node: dict[str, Any]) -> None:
    valid = sorted(model.model_fields) if model is not None else sorted(node)
    raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {', '.join(valid)}")


def build_config(d: dict[str, Any]) -> Config:
    """Validate a plain dict into a Config, turning pydantic errors into one clear message."""
    try:
        return Config.model_validate(d)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                parent = _model_at(err["loc"][:-1])
                valid = ", ".join(sorted(parent.model_fields)) if parent else "?"
                lines.append(f"unknown config key {loc!r}; valid keys here: {valid}")
            else:
                lines.append(f"{loc or 'config'}: {err['msg']}")
        raise ConfigError("invalid config: " + "; ".join(lines)) from None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in loc:
        model = _submodel(model, str(part))
    return model


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply dotted overrides, validate."""
    d: dict[str, Any] = {}
    if path is not None:
        p = resolve_path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(d).__name__}")
    d = json.loads(json.dumps(build_config(d).to_dict()))  # fill defaults first
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(d, key, value)
    return build_config(d)


def save_config(cfg: Config, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return p
