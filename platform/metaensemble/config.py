"""Typed experiment configs: a YAML file plus dotted ``key.sub=value`` overrides.

The schema: the core sections, and the method sections the method registry declares
(``declare_methods``). It imports nothing of the library but ``errors``: the names in a
config (method, dataset, model) are checked against their registries by
``metaensemble.validation.load_config``, which jobs call before they touch Ray or
MLflow. The resolved config is what every run saves next to its results, and its hash
names the run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from metaensemble.errors import ConfigError

# The checkout relative paths resolve against. A Ray worker running a shipped copy of the
# library (``engine.trainer.ensure_ray``) is told where it is: METAENSEMBLE_ROOT, "." for the
# job's working directory on that node (a worker starts there).
REPO_ROOT = Path(os.environ.get("METAENSEMBLE_ROOT") or Path(__file__).resolve().parents[2]).resolve()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LabelSplit(_Strict):
    """Skill transfer's split of the train split by label (OT fusion's ``p_split``): part
    ``a`` holds every example of ``special`` and ``fraction`` of each other label's, part
    ``b`` the rest of the other labels' (none of ``special``). Val and test stay whole."""

    special: int = Field(4, ge=0)
    fraction: float = Field(0.1, ge=0.0, lt=1.0)
    part: Literal["a", "b"] = "a"
    seed: int = 0


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
    every run with this split_seed, or subset_seed); val and test are unchanged."""
    subset_seed: int | None = None
    """Seed that draws the ``train_fraction`` subset (None: ``split_seed``). A soup-regime
    zoo's children each draw their own (``zoo.soup``); the split itself never changes."""
    label_split: LabelSplit | None = None
    """Train on one part of a split by label (skill transfer); None: every label."""
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    augment: bool = True
    cutout: int = Field(0, ge=0)
    """Cutout (DeVries & Taylor 2017) on array datasets' training batches: a square of
    this side, centred on a random pixel and clipped at the border, set to the mean
    (zero after normalisation); 0: none. The SuperWeight recipe uses 16 on CIFAR."""
    transform: Literal["standard", "deit"] = "standard"
    """Training augmentation of file datasets (imagefolder, and parquet shards of encoded
    images): ``standard`` is RandomResizedCrop + flip; ``deit`` is timm's transform factory
    with RandAugment (``auto_augment``) and random erasing (``re_prob``), the DeiT recipe
    (on parquet shards the PIL stages run on Ray Data's workers and the erasing on the
    training worker's normalised batch). Array datasets (digits, synthetic, cifar, and
    their parquet shards) have their own augmentation and take only ``standard``."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    re_prob: float = Field(0.25, ge=0.0, le=1.0)
    repeated_aug: int = Field(1, ge=1)
    """Repeated augmentation (DeiT's default, 3; timm's ``RepeatAugSampler``): each image an
    epoch draws comes this many times, each copy on another rank and augmented anew; an
    epoch keeps the steps of a plain one, so it draws about 1/repeated_aug of the images.
    1: off. File datasets (imagefolder) only."""
    loader_workers: int = Field(0, ge=0)
    shuffle_buffer: int | None = Field(None, ge=0)
    """Streamed (parquet) training: rows in each training worker's local shuffle buffer,
    on top of the shard files' new order every epoch (0: file order only; None: four
    batches, ``4 * batch_size``). Every epoch waits for the buffer to fill before its first
    step, and a larger one costs more per image: at 20,000 ImageNet-sized JPEGs on 2 data
    CPUs, 256 rows gave 1.04x the ImageFolder DataLoader's images/s and 2000 rows
    less (docs/cluster.md)."""
    data_cpus: float | None = Field(None, gt=0.0)
    """Streamed (parquet) training: CPUs Ray Data may use for reading, decoding and
    augmenting, apart from the training workers' (None: whatever they leave free)."""
    image_size: int | None = Field(None, gt=0)
    # synthetic only
    num_classes: int = Field(10, ge=2)
    num_samples: int = Field(2000, ge=10)
    channels: int = Field(3, ge=1)

    def train_shuffle_buffer(self) -> int:
        """The local shuffle buffer streamed training uses (``shuffle_buffer``, or four batches)."""
        return 4 * self.batch_size if self.shuffle_buffer is None else self.shuffle_buffer


class ModelConfig(_Strict):
    name: str = "convnet"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None
    """Start the run from these weights: a checkpoint folder (model.safetensors +
    model.json) or an MLflow URI (``runs:/<id>/model``, ``models:/name/3``). Every tensor
    must match the built model's; a mismatch names each one that differs."""
    init_seed: int | None = Field(None, ge=0)
    """Seed of the initial weights alone (None: the run's ``seed``). Runs with different
    seeds and one init_seed start from the same weights and differ only in data order and
    augmentation: a zoo of such teachers lies in one loss basin."""


class OptimConfig(_Strict):
    """Optimiser and schedule, built with timm's factories (``engine.optim``)."""

    name: str = "sgd"
    """A timm optimiser name (sgd, adamw, adam, lamb, ...); ``sgd`` with ``nesterov``."""
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    decay_norm_bias: bool = False
    """Weight decay on norms and biases too (off: timm's 1-d exclusion)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra optimiser arguments (betas, eps, ...)."""
    schedule: Literal["cosine", "constant", "step", "multistep"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    warmup_lr: float = Field(0.0, ge=0.0)
    """lr at the first warm-up step (0: lr / warm-up steps)."""
    min_lr: float = Field(0.0, ge=0.0)
    decay_epochs: int = Field(0, ge=0)
    """step: decay every this many epochs (0: a third of the run)."""
    decay_milestones: list[int] = Field(default_factory=list)
    decay_rate: float = Field(0.1, gt=0.0)

    @model_validator(mode="after")
    def _milestones(self) -> OptimConfig:
        if self.schedule == "multistep" and not self.decay_milestones:
            raise ValueError("optim.schedule=multistep needs optim.decay_milestones (epochs), e.g. [30, 60]")
        if any(m < 1 for m in self.decay_milestones) or len(set(self.decay_milestones)) != len(self.decay_milestones):
            raise ValueError(f"optim.decay_milestones must be distinct epochs >= 1; got {self.decay_milestones}")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: bool = False
    """bf16 autocast; only takes effect on GPU."""
    channels_last: bool = False
    """channels_last memory format; only takes effect on GPU."""
    grad_clip: float | None = Field(None, gt=0.0)
    """Clip the gradient's global norm to this before every update (None: no clipping),
    after any gradient transform the method registers on its optimiser (LatentBE's)."""
    select_metric: str = "val_acc"
    select_mode: Literal["max", "min"] = "max"
    log_every: int = Field(0, ge=0)
    """Print a line every N steps (0: per-epoch lines only)."""
    steps_per_epoch: int | None = Field(None, gt=0)
    """Optimiser steps per epoch (per worker), cycling the train loader as needed; default:
    one pass over the worker's shard. Small subsets (meta-training) set it."""


class ScalingConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    """Training workers; ``[min, max]`` makes the run elastic (Ray Train's
    ``num_workers=(min, max)``): it starts with as many as fit, up to max, and after a
    lost worker or node resumes from its latest checkpoint with the workers that remain
    (at least min), growing again when resources return (checked every
    ``elastic_resize_s``). Stored as ``min_workers`` + ``num_workers`` (the max)."""
    min_workers: int | None = Field(None, ge=1)
    elastic_resize_s: float = Field(60.0, gt=0.0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(0, ge=-1)
    torch_threads: int = Field(0, ge=0)
    """torch intra-op threads per worker (0: one per CPU reserved for the worker)."""

    @model_validator(mode="before")
    @classmethod
    def _min_max(cls, d: Any) -> Any:
        if isinstance(d, dict) and isinstance(d.get("num_workers"), list | tuple):
            nw = list(d["num_workers"])
            if len(nw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in nw):
                raise ValueError(f"scaling.num_workers must be an int or [min, max] (two ints); got {nw}")
            d = {**d, "min_workers": nw[0], "num_workers": nw[1]}
        return d

    @model_validator(mode="after")
    def _elastic(self) -> ScalingConfig:
        if self.min_workers is None:
            return self
        if self.min_workers > self.num_workers:
            raise ValueError(f"scaling.num_workers=[{self.min_workers}, {self.num_workers}]: min must be <= max")
        if self.min_workers < self.num_workers and self.max_failures == 0:
            raise ValueError(f"scaling.num_workers=[{self.min_workers}, {self.num_workers}] is elastic: it resumes "
                             f"after a failure, so it needs scaling.max_failures > 0 (or -1: unlimited)")
        return self


SOUP_FIXED = ("task", "method", "seed", "experiment", "storage_path", "zoo", "scaling", "model.name",
              "model.kwargs", "model.init_from", "data.name", "data.root", "data.val_fraction",
              "data.test_fraction", "data.split_seed")
"""Keys a soup-regime zoo's parent, child or grid overrides may not set: what makes the
zoo's networks averageable (the architecture), its split (val and test never trained
on), its packing (one scaling section) and what the zoo sets itself (seeds, init_from)."""
SOUP_FIXED_CHILD = ("model.init_seed", "data.subset_seed")
"""Further keys a child or the grid may not set: a child starts from its parent's weights
(``model.init_from``), and draws its ``train_fraction`` subset with its own seed."""


class SoupRecipe(_Strict):
    """A soup-regime zoo (model soups, Wortsman et al. 2022): ``parents`` networks trained
    from scratch, then every zoo seed a child fine-tuned from one of them.

    Parent p: the recipe with ``parent``'s overrides, seed ``parent_seed + p``. Child of
    zoo seed s (index i = s - ``zoo.first_seed``): the recipe with ``child``'s overrides,
    then combination ``(i // parents) % n`` of the ``n`` in ``grid`` (the product of its
    value lists, keys sorted), seed s, ``model.init_from`` parent ``i % parents``, and
    ``data.subset_seed`` s when its ``data.train_fraction`` is below 1 (each child its own
    subset). Growing the zoo never changes an existing child. Overrides are nested
    sections (``{optim: {lr: 0.01}}``) or dotted keys (``{optim.lr: 0.01}``); a grid's
    leaves are lists of values. Parents are registered, tagged ``role=parent``, and are
    not the zoo's teachers; each child is tagged with its parent's MLflow run id."""

    parents: int = Field(1, ge=1)
    parent_seed: int = Field(0, ge=0)
    parent: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the recipe for the parents (e.g. ``{train: {epochs: 8}}``)."""
    child: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the recipe for every child: the fine-tune recipe."""
    grid: dict[str, Any] = Field(default_factory=dict)
    """What varies between children: each leaf a non-empty list of values."""

    @model_validator(mode="after")
    def _keys(self) -> SoupRecipe:
        problems = []
        for part, fixed in (("parent", SOUP_FIXED), ("child", SOUP_FIXED + SOUP_FIXED_CHILD),
                            ("grid", SOUP_FIXED + SOUP_FIXED_CHILD)):
            bad = sorted(k for k in flatten(getattr(self, part)) if _under(k, fixed))
            if bad:
                problems.append(f"zoo.soup.{part} may not set {', '.join(bad)} (the zoo fixes {', '.join(fixed)})")
        for k, v in flatten(self.grid).items():
            if not isinstance(v, list) or not v:
                problems.append(f"zoo.soup.grid.{k} must be a non-empty list of values, got {v!r}")
        both = sorted(set(flatten(self.child)) & set(flatten(self.grid)))
        if both:
            problems.append(f"zoo.soup.child and zoo.soup.grid both set {', '.join(both)}: set each key in one")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def combinations(self) -> list[dict[str, Any]]:
        """The grid's combinations as dotted overrides, in a fixed order (keys sorted,
        the last varying fastest); ``[{}]`` for an empty grid."""
        grid = flatten(self.grid)
        keys = sorted(grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]

    def parent_overrides(self, p: int) -> dict[str, Any]:
        """Dotted overrides that turn the zoo's recipe into parent ``p``'s run."""
        return {**flatten(self.parent), "seed": self.parent_seed + p, "zoo.soup": None}

    def child_overrides(self, index: int, seed: int, parent_uris: list[str]) -> dict[str, Any]:
        """Dotted overrides that turn the zoo's recipe into the child of zoo index
        ``index`` (seed ``seed``), fine-tuned from ``parent_uris[index % parents]``; the
        caller adds ``data.subset_seed`` (it depends on the resolved ``train_fraction``)."""
        if len(parent_uris) != self.parents:
            raise ValueError(f"zoo.soup.parents={self.parents}, but {len(parent_uris)} parent URIs were given")
        combos = self.combinations()
        return {**flatten(self.child), **combos[(index // self.parents) % len(combos)], "seed": seed,
                "model.init_from": parent_uris[index % self.parents], "zoo.soup": None}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


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
    soup: SoupRecipe | None = None
    """A soup-regime zoo: parents trained from scratch, every seed a child fine-tuned from
    one (``SoupRecipe``); None: every seed trained from scratch on the recipe."""


# ---- method sections: each method owns its config section --------------------------------
class Section(_Strict):
    """Base of a method's own config section (``distill``, ``meta``, ...).

    ``eval_only`` names the fields only a job's evaluation reads: changing them retrains
    nothing, so they do not enter the run hash."""

    eval_only: ClassVar[tuple[str, ...]] = ()
    added_later: ClassVar[tuple[str, ...]] = ()
    """Fields added after runs were named by this section: at their default they stay out
    of the run hash, so a rerun of an earlier command still finds its runs."""


_SECTIONS: dict[str, type[Section]] = {}
_READS: dict[str, tuple[str, ...]] = {}
"""Method name -> the sections it reads (only these name its runs)."""


def declare_methods(sections: dict[str, type[Section]], reads: dict[str, tuple[str, ...]]) -> None:
    """Tell the schema the method sections (``cfg.<name>``, each filled with its defaults
    when absent) and which sections each method reads. The method registry
    (``metaensemble.methods.registry``) does, when imported: the schema imports no method."""
    core = sorted(set(sections) & set(Config.model_fields))
    if core:
        raise ValueError(f"config sections {core} are core sections")
    unknown = sorted({s for r in reads.values() for s in r} - set(sections))
    if unknown:
        raise ValueError(f"methods read config sections {unknown} that are not declared")
    _SECTIONS.clear()
    _SECTIONS.update(sections)
    _READS.clear()
    _READS.update({name: tuple(r) for name, r in reads.items()})


def _declared() -> None:
    if not _READS:
        raise RuntimeError("the config schema knows no method yet: import metaensemble.methods (its registry "
                           "declares them; metaensemble.validation.load_config does) before building a Config")


def sections() -> dict[str, type[Section]]:
    _declared()
    return dict(_SECTIONS)


def method_reads(name: str) -> tuple[str, ...]:
    """The sections method ``name`` reads; an unknown method lists the known ones."""
    _declared()
    if name not in _READS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(_READS))}")
    return _READS[name]


class Config(BaseModel):
    """The whole experiment: the core sections below plus every method's own section
    (``cfg.distill``, ``cfg.meta``, ...: the method registry declares them, see
    ``declare_methods``), each filled with its defaults when absent."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    task: str = "teachers"
    method: str = "supervised"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    zoo: ZooConfig = Field(default_factory=ZooConfig)
    storage_path: str = "runs/ray"
    """Ray Train storage: a folder (relative to the repository) or a URI (s3://...)."""
    experiment: str | None = None
    """MLflow experiment; default ``<dataset>/<task>``."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Method sections are extras: checked here, so a refused assignment stores nothing.
        if name not in type(self).model_fields and not name.startswith("_"):
            known = sections()
            if name not in known:
                raise ConfigError(f"unknown config key {name!r}; valid keys here: {', '.join(_top_keys())}")
            if not isinstance(value, known[name]):
                try:
                    value = known[name].model_validate(value if value is not None else {})
                except ValidationError as e:
                    raise ConfigError("invalid config: " + "; ".join(_describe(e, (name,)))) from None
        super().__setattr__(name, value)

    @model_validator(mode="after")
    def _method_sections(self) -> Config:
        # The method name and every method section are checked here (torch-free); data
        # and model names against their registries in ``validation.check_names``.
        method_reads(self.method)
        known = sections()
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for key in list(extra):
            if key not in known:
                raise ValueError(f"unknown config key {key!r}; valid keys here: {', '.join(_top_keys())}")
        for key, cls in known.items():
            value = extra.get(key)
            if not isinstance(value, cls):
                extra[key] = cls.model_validate(value if value is not None else {})
        return self

    @model_validator(mode="after")
    def _soup_runs(self) -> Config:
        # Every run a soup-regime zoo will train is a valid config: the parent, and the
        # child recipe with each grid combination (the parent's URI is a placeholder).
        soup = self.zoo.soup
        if soup is None:
            return self
        def check(what: str, overrides: dict[str, Any]) -> None:
            try:
                self.with_overrides(overrides)
            except ConfigError as e:
                raise ValueError(f"{what} does not give a valid run: {str(e).removeprefix('invalid config: ')}") from None

        check("zoo.soup.parent", soup.parent_overrides(0))
        check("zoo.soup.child", {**flatten(soup.child), "zoo.soup": None})
        for c, combo in enumerate(soup.combinations()):
            check(f"zoo.soup.grid's combination {combo}",
                  soup.child_overrides(c * soup.parents, 0, ["<parent>"] * soup.parents))
        return self

    # ---- derived values -------------------------------------------------------------
    @property
    def experiment_name(self) -> str:
        return self.experiment or f"{self.data.name}/{self.task}"

    def resolved_storage_path(self) -> str:
        if "://" in self.storage_path:
            return self.storage_path
        if in_ray_working_dir() and not Path(self.storage_path).is_absolute():
            raise ConfigError(
                f"storage_path={self.storage_path!r} is relative, and this job runs from Ray's copy of the "
                f"submitted directory ({REPO_ROOT}), which Ray deletes after the job: give storage_path as shared "
                f"storage every node reaches (an absolute path or s3://bucket/prefix)")
        return str(resolve_path(self.storage_path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self, exclude_seed: bool = True) -> str:
        """Hash of everything that changes what is trained (not where it is stored)."""
        d = self.to_dict()
        soup = (d.get("zoo") or {}).get("soup")
        for k in ("storage_path", "experiment", "zoo"):
            d.pop(k, None)
        if soup is not None:  # a soup-regime zoo's recipe is its parents' and children's too
            d["zoo_soup"] = {**soup, **{k: flatten(soup[k]) for k in ("parent", "child", "grid")}}  # either spelling
        # Sections a method does not read do not name its runs.
        reads = method_reads(self.method)
        for name, cls in sections().items():
            if name not in reads:
                d.pop(name, None)
            else:
                for k in cls.eval_only:
                    d[name].pop(k, None)
                for k in cls.added_later:
                    if d[name].get(k) == cls.model_fields[k].get_default(call_default_factory=True):
                        d[name].pop(k, None)
        if d["model"].get("init_from") is None:
            d["model"].pop("init_from", None)  # an unset init_from does not name a run
        if d["data"].get("subset_seed") is None:
            d["data"].pop("subset_seed", None)  # nor does the default subset seed
        if d["data"].get("label_split") is None:
            d["data"].pop("label_split", None)  # nor does an unset label split
        if not d["data"].get("cutout"):
            d["data"].pop("cutout", None)  # nor does cutout off
        if d["data"].get("repeated_aug") == 1:
            d["data"].pop("repeated_aug", None)  # off names no run (hashes from before it stay)
        d["data"].pop("data_cpus", None)  # resources, not what is trained
        # The one streamed dataset (data.DATASETS marks it ``streaming``; the schema imports no
        # registry) is named by the buffer it trains with; 2000 rows, the old default, names
        # nothing, so runs from before stay found. In-memory data has no buffer.
        if d["data"]["name"] == "parquet" and self.data.train_shuffle_buffer() != 2000:
            d["data"]["shuffle_buffer"] = self.data.train_shuffle_buffer()
        else:
            d["data"].pop("shuffle_buffer", None)
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

    def section(self, name: str) -> Section:
        """A method's section by name (``cfg.section("meta")`` is ``cfg.meta``)."""
        sections()
        value = (self.__pydantic_extra__ or {}).get(name)
        if value is None:
            raise ConfigError(f"no config section {name!r}; sections: {', '.join(_top_keys())}")
        return value


def _top_keys() -> list[str]:
    return sorted([*Config.model_fields, *sections()])


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
    if model is Config and field in sections():
        return sections()[field]
    if model is None or field not in model.model_fields:
        return None
    ann = model.model_fields[field].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _unknown_key(dotted: str, model: type[BaseModel] | None, node: dict[str, Any]) -> None:
    valid = (_top_keys() if model is Config else sorted(model.model_fields)) if model is not None else sorted(node)
    raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {', '.join(valid)}")


def build_config(d: dict[str, Any]) -> Config:
    """Validate a plain dict into a Config, turning pydantic errors into one clear message."""
    d = dict(d)
    lines: list[str] = []
    known = sections()
    for key in [k for k in d if k not in Config.model_fields]:
        if key not in known:
            lines.append(f"unknown config key {key!r}; valid keys here: {', '.join(_top_keys())}")
            d.pop(key)
            continue
        try:  # validated here so that errors carry the section's name
            d[key] = known[key].model_validate(d[key] if d[key] is not None else {})
        except ValidationError as e:
            lines += _describe(e, (key,))
    if not lines:
        try:
            return Config.model_validate(d)
        except ValidationError as e:
            lines += _describe(e, ())
    raise ConfigError("invalid config: " + "; ".join(lines)) from None


def _describe(e: ValidationError, prefix: tuple[str, ...]) -> list[str]:
    lines = []
    for err in e.errors():
        loc_t = (*prefix, *err["loc"])
        loc = ".".join(str(x) for x in loc_t)
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc_t[:-1])
            valid = ", ".join(_top_keys() if parent is Config else sorted(parent.model_fields)) if parent else "?"
            lines.append(f"unknown config key {loc!r}; valid keys here: {valid}")
        elif err["type"] == "value_error" and not prefix and not err["loc"]:
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        elif err["type"] == "value_error" and loc_t[:2] == ("zoo", "soup"):  # its messages name their keys
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{loc or 'config'}: {err['msg']}")
    return lines


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in loc:
        model = _submodel(model, str(part))
    return model


def _read_yaml(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One config file as a dict. A file may start from another: ``base: <path>`` (from
    the repository root) reads that file first and lays this one's keys over it, section
    by section (configs/compare/digits.yaml is the main job's config plus a section)."""
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p in seen:
        raise ConfigError(f"config file {p}: its base: chain comes back to it ({' -> '.join(map(str, seen))})")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping, got {type(d).__name__}")
    base = d.pop("base", None)
    if base is None:
        return d
    if not isinstance(base, str):
        raise ConfigError(f"config file {p}: base must be a path to another config, got {base!r}")
    return _merge(_read_yaml(base, (*seen, p)), d)


def _merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(under)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply dotted overrides, validate the schema.
    Jobs call ``metaensemble.validation.load_config``, which also checks the names."""
    d = _read_yaml(path) if path is not None else {}
    d = json.loads(json.dumps(build_config(d).to_dict()))  # fill defaults first
    parsed = parse_overrides(overrides or [])
    for key, value in parsed.items():
        _set_dotted(d, key, value)
    if isinstance(parsed.get("scaling.num_workers"), int) and "scaling.min_workers" not in parsed:
        d["scaling"]["min_workers"] = None  # a fixed count replaces an elastic [min, max]
    return build_config(d)


def in_ray_working_dir() -> bool:
    """Whether this process runs the library from a job's working directory (``ray job
    submit --working-dir``), a per-node copy Ray deletes once the job is over."""
    return "working_dir_files" in REPO_ROOT.parts


def save_config(cfg: Config, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return p
