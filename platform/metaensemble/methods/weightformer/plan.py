"""Before any work: the checks of a meta-train config, and the plan both the job and a
sweep of generators start from (the teacher zoo ensured, every teacher checked, the zoo
split by teacher into meta-train / meta-val / meta-test).

    tcfg = validate(cfg)          # the generator, K, the split sizes, the zoo recipe
    p = plan(cfg)                 # p.cfg: cfg with meta.{train,val,test}_teachers filled in

The engine method (``method``) and the job (``experiment``) both import this; it imports
neither.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metaensemble import data, engine, tracking
from metaensemble.config import Config
from metaensemble.errors import ConfigError, ZooError
from metaensemble.methods.base import Method
from metaensemble.methods.distill import load_teachers
from metaensemble.methods.weightformer.align import chain
from metaensemble.methods.weightformer.generator import GENERATORS, student_skeleton
from metaensemble.methods.weightformer.student import make_ensembles
from metaensemble.models import MODELS, model_kwargs
from metaensemble.validation import load_config

SIDES = ("train", "val", "test")


def generator_max_teachers(cfg: Config) -> int:
    """The largest ensemble the configured generator takes."""
    kw = cfg.model.kwargs
    if cfg.model.name == "mlp_generator":
        return int(kw.get("ensemble_size", 4))
    default = inspect.signature(MODELS.get(cfg.model.name)).parameters["max_teachers"].default
    return int(kw.get("max_teachers", default))


# ---- checks ----------------------------------------------------------------------------
def check_generator(cfg: Config) -> None:
    """Checks that need no teachers: the generator, its kwargs, K against its maximum."""
    m = cfg.meta
    if cfg.model.name not in GENERATORS:
        raise ConfigError(f"method weightformer trains a generator; model.name must be one of "
                          f"{', '.join(GENERATORS)}, got {cfg.model.name!r}")
    if "student" not in cfg.model.kwargs:
        raise ConfigError("model.kwargs.student must name the student architecture (e.g. convnet)")
    kmax = generator_max_teachers(cfg)
    lo, hi = m.train_sizes()
    if cfg.model.name == "mlp_generator" and lo != hi:
        raise ConfigError(f"the MLP generator takes one ensemble size; meta.train_k={m.train_k} asks for "
                          f"{lo}..{hi} (leave train_k empty)")
    if m.train_k and hi > kmax:
        raise ConfigError(f"meta.train_k={m.train_k} reaches {hi} teachers, more than the generator's "
                          f"max_teachers={kmax}")
    if m.align == "permutation":
        chain(student_skeleton(cfg.model.kwargs["student"], cfg.model.kwargs.get("student_kwargs"),
                               10, 1, 8)[1])
    if m.ensemble_size > kmax:
        what = "ensemble_size" if cfg.model.name == "mlp_generator" else "max_teachers"
        raise ConfigError(f"meta.ensemble_size={m.ensemble_size} exceeds the generator's {what}={kmax}; "
                          f"valid ensemble sizes: 2..{kmax}")
    if cfg.model.name == "mlp_generator" and m.ensemble_size != kmax:
        raise ConfigError(f"the MLP generator takes exactly model.kwargs.ensemble_size={kmax} teachers, "
                          f"but meta.ensemble_size={m.ensemble_size}")
    too_big = [k for k in m.report_k if k > kmax or (cfg.model.name == "mlp_generator" and k != kmax)]
    if too_big:
        raise ConfigError(f"meta.report_k={m.report_k} asks for K={too_big}, which this generator cannot take "
                          f"(it takes {'exactly ' + str(kmax) if cfg.model.name == 'mlp_generator' else f'2..{kmax}'})")
    unknown = set(cfg.model.kwargs) - set(model_kwargs(cfg.model.name))
    if unknown:
        raise ConfigError(f"model {cfg.model.name!r} does not take {', '.join(sorted(unknown))}; "
                          f"it takes: {', '.join(model_kwargs(cfg.model.name))}")

def check_teachers(cfg: Config) -> None:
    """Each side holds at least K teachers and no teacher is on two sides."""
    m = cfg.meta
    for side in SIDES:
        n = len(getattr(m, f"{side}_teachers"))
        need = max(m.ensemble_size, m.train_sizes()[1]) if side == "train" else m.ensemble_size
        if n < need:
            raise ZooError(f"meta.{side}_teachers has {n} teachers, fewer than the ensemble size "
                           f"K={need}; the zoo needs more teachers (or a smaller K)")
    seen: dict[str, str] = {}
    for side in SIDES:
        for uri in getattr(m, f"{side}_teachers"):
            if uri in seen and seen[uri] != side:
                raise ZooError(f"teacher {uri} is in both meta.{seen[uri]}_teachers and meta.{side}_teachers; "
                               f"the sides must be disjoint")
            seen[uri] = side


def check_disjoint(hashes: dict[str, list[str]]) -> None:
    """No checkpoint (by SHA-256 of its weights) may sit on two sides of the split."""
    sides = list(hashes)
    for i, a in enumerate(sides):
        for b in sides[i + 1:]:
            shared = set(hashes[a]) & set(hashes[b])
            if shared:
                raise ZooError(f"{len(shared)} teacher checkpoint(s) appear in both meta-{a} and meta-{b} "
                               f"(sha256 {sorted(shared)[0][:12]}...); held-out teachers must never be trained on")


# ---- the plan --------------------------------------------------------------------------
VARIANT_OVERRIDES: dict[str, dict[str, Any]] = {
    "weightformer": {},
    "no_mask": {"model.kwargs.mask": False},
    "no_shift": {"meta.lambda_shift": 0.0},
    "no_cross": {"model.kwargs.cross_layer": False},
    "base_mean": {"model.kwargs.base": "mean"},
    "base_anchor": {"model.kwargs.base": "anchor"},
    "per_row_mix": {"model.kwargs.coherent": False},
}


@dataclass
class TeacherRecord:
    uri: str
    seed: int
    version: int
    sha256: str
    side: str
    parent: str = ""
    """A soup-regime child's parent run id ("" for a teacher trained from scratch)."""


@dataclass
class Plan:
    cfg: Config
    """The meta-train config with meta.{train,val,test}_teachers filled in."""
    teacher_cfg: Config
    teachers: list[TeacherRecord] = field(default_factory=list)
    student_spec: dict[str, Any] = field(default_factory=dict)

    def side(self, name: str) -> list[TeacherRecord]:
        return [t for t in self.teachers if t.side == name]


def student_of(cfg: Config) -> tuple[str, dict[str, Any]]:
    return cfg.model.kwargs["student"], dict(cfg.model.kwargs.get("student_kwargs") or {})


def validate(cfg: Config, *, soup_ensembles: int | None = None) -> Config:
    """Everything checkable before any work: the generator, K, the split sizes, that the
    zoo recipe trains teachers of the student's architecture, and that the first
    ``soup_ensembles`` held-out ensembles (None: ``meta.test_ensembles``, the main job's
    soups; 0: no soups) can be souped. Returns the recipe."""
    if cfg.method != "weightformer":
        raise ConfigError(f"the meta-train job runs method weightformer, got method={cfg.method!r}")
    engine.validate(cfg, _GeneratorOnly(cfg))
    for variant in variant_configs(cfg).values():  # every generator run the job will start
        check_generator(variant)
    m = cfg.meta
    n_train = m.zoo_size - m.num_val_teachers - m.num_test_teachers
    if m.num_train_teachers > n_train:
        raise ZooError(
            f"meta.num_train_teachers={m.num_train_teachers} exceeds the {n_train} meta-train teachers "
            f"meta.zoo_size={m.zoo_size} leaves after {m.num_val_teachers} val + {m.num_test_teachers} test; "
            f"valid: 0 (all of them) or 1..{n_train}"
        )
    n_train = m.num_train_teachers or n_train
    if n_train < m.ensemble_size:
        raise ZooError(
            f"meta.zoo_size={m.zoo_size} leaves {n_train} meta-train teachers after "
            f"{m.num_val_teachers} val + {m.num_test_teachers} test; K={m.ensemble_size} needs at "
            f"least {m.ensemble_size}"
        )
    if n_train < m.train_sizes()[1]:
        raise ZooError(
            f"meta.zoo_size={m.zoo_size} leaves {n_train} meta-train teachers after "
            f"{m.num_val_teachers} val + {m.num_test_teachers} test; meta.train_k={m.train_k} needs at "
            f"least {m.train_sizes()[1]}"
        )
    for side, n in (("val", m.num_val_teachers), ("test", m.num_test_teachers)):
        if n < m.ensemble_size:
            raise ZooError(
                f"meta.num_{side}_teachers={n} is fewer than K={m.ensemble_size}; "
                f"a held-out ensemble needs K teachers"
            )
    tcfg = load_config(
        m.teacher_config, [f"zoo.num_teachers={m.zoo_size}", f"storage_path={cfg.storage_path}"]
    )
    student, skw = student_of(cfg)
    if (tcfg.model.name, dict(tcfg.model.kwargs)) != (
        student,
        skw,
    ) or tcfg.data.name != cfg.data.name:
        raise ConfigError(
            f"meta.teacher_config {m.teacher_config} trains {tcfg.model.name!r} "
            f"{dict(tcfg.model.kwargs)} on {tcfg.data.name!r}, but the student is {student!r} "
            f"{skw} on {cfg.data.name!r}: teachers must have the student's architecture and dataset"
        )
    split_keys = ("val_fraction", "test_fraction", "split_seed")
    theirs, ours = ({k: getattr(c.data, k) for k in split_keys} for c in (tcfg, cfg))
    if theirs != ours:
        raise ConfigError(
            f"meta.teacher_config {m.teacher_config} splits {cfg.data.name} as {theirs}, but this "
            f"job splits it as {ours}: set data.val_fraction/test_fraction/split_seed to the "
            f"teachers' values, so that meta-validation and test data were never trained on"
        )
    from metaensemble.teachers import validate_recipe

    validate_recipe(tcfg)  # a soup-regime zoo's parent and children too, before any work
    check_soup_parents(cfg, tcfg, cfg.meta.test_ensembles if soup_ensembles is None else soup_ensembles)
    return tcfg


def check_soup_parents(cfg: Config, tcfg: Config, count: int) -> None:
    """A soup averages its ingredients' weights, which only children of one parent allow.
    With a soup-regime zoo of several parents (zoo index i fine-tuned from parent
    i % parents, ``SoupRecipe``), each of the first ``count`` held-out ensembles, drawn as
    the jobs draw them, must hold children of one parent."""
    soup = tcfg.zoo.soup
    if soup is None or soup.parents == 1 or not count:
        return
    m = cfg.meta
    sides = split_sides(m.zoo_size, m.num_val_teachers, m.num_test_teachers, cfg.seed, m.num_train_teachers)
    test = [i for i, side in enumerate(sides) if side == "test"]
    for e, ens in enumerate(held_out_ensembles(cfg, count, len(test))):
        of = sorted({test[j] % soup.parents for j in ens})
        if len(of) > 1:
            raise ZooError(
                f"held-out ensemble {e} would hold children of parents {', '.join(map(str, of))} of the "
                f"soup-regime zoo (meta.teacher_config {m.teacher_config}: zoo.soup.parents={soup.parents}, "
                f"zoo index i fine-tuned from parent i % {soup.parents}); soups average weights, which only "
                f"children of one parent allow: use a recipe with zoo.soup.parents=1"
            )


def held_out_ensembles(cfg: Config, count: int, n_test: int) -> list[list[int]]:
    """The jobs' held-out ensembles: the first ``count`` of the seeded draw of K =
    ``meta.ensemble_size`` out of ``n_test`` meta-test teachers (indices into them). The
    main job, the leaderboard and the checks before any work all draw with this."""
    return make_ensembles(n_test, cfg.meta.ensemble_size, count, cfg.seed + 1)


class _GeneratorOnly(Method):
    """What ``engine.validate`` checks of the method before the teacher lists exist (they
    come from the zoo)."""

    def validate(self) -> None:
        check_generator(self.cfg)


def plan(cfg: Config, *, train_missing: bool = True, soup_ensembles: int | None = None) -> Plan:
    """Validate (``soup_ensembles``: as ``validate``), make sure the zoo holds
    ``meta.zoo_size`` teachers, check them, split them.

    ``plan(cfg).cfg`` is ``cfg`` with its teachers resolved: what a sweep of generators
    trains from (``WeightFormerMethod.prepare_sweep``)."""
    tcfg = validate(cfg, soup_ensembles=soup_ensembles)
    from metaensemble.tracking import TeacherZoo

    tracking.ensure_tracking()
    student, skw = student_of(cfg)
    zoo = TeacherZoo(cfg.data.name, student)
    wanted = set(range(tcfg.zoo.first_seed, tcfg.zoo.first_seed + cfg.meta.zoo_size))
    have = [e for e in zoo.teachers(tcfg.config_hash()) if e.seed in wanted]
    if len(have) < cfg.meta.zoo_size:
        if not train_missing:
            raise ZooError(
                f"zoo {zoo.name} has {len(have)} teachers of this recipe, "
                f"meta.zoo_size={cfg.meta.zoo_size} needed (K={cfg.meta.ensemble_size}); "
                f"train them with jobs/train_teachers.py "
                f"--config {cfg.meta.teacher_config} zoo.num_teachers={cfg.meta.zoo_size}"
            )
        from metaensemble.teachers import train_zoo

        print(
            f"zoo {zoo.name} holds {len(have)} of the {cfg.meta.zoo_size} teachers needed; "
            "training the rest",
            flush=True,
        )
        train_zoo(tcfg)
        have = [
            e for e in zoo.teachers(tcfg.config_hash()) if e.seed in wanted
        ]
    have.sort(key=lambda e: e.seed)
    info = data.info(cfg.data)
    spec = {
        "arch": student,
        "kwargs": {
            "num_classes": info.num_classes,
            "in_chans": info.in_chans,
            "img_size": info.img_size,
            **skw,
        },
    }
    loaded = load_teachers(
        [e.uri for e in have], spec
    )  # checks each checkpoint and its architecture
    sides = split_sides(len(have), cfg.meta.num_val_teachers, cfg.meta.num_test_teachers, cfg.seed,
                        cfg.meta.num_train_teachers)
    records = [
        TeacherRecord(e.uri, e.seed, e.version, t.sha256, sides[i], e.parent)
        for i, (e, t) in enumerate(zip(have, loaded, strict=True))
    ]
    check_disjoint(
        {s: [r.sha256 for r in records if r.side == s] for s in ("train", "val", "test")}
    )
    filled = cfg.with_overrides(
        {
            f"meta.{s}_teachers": [r.uri for r in records if r.side == s]
            for s in ("train", "val", "test")
        }
    )
    check_generator(filled)
    check_teachers(filled)
    return Plan(filled, tcfg, records, spec)


def split_sides(n: int, n_val: int, n_test: int, seed: int, n_train: int = 0) -> list[str]:
    """Each of ``n`` teachers' side ("train", "val" or "test"), by a seeded permutation:
    the same zoo and seed always give the same split. With ``n_train``, only the first
    ``n_train`` meta-train teachers (in the given order: by seed) stay "train", the rest
    are "unused"; val and test do not change."""
    perm = np.random.default_rng([seed, 29]).permutation(n)
    sides = [""] * n
    for j, i in enumerate(perm):
        sides[int(i)] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    if n_train:
        for i in [i for i, s in enumerate(sides) if s == "train"][n_train:]:
            sides[i] = "unused"
    return sides


def variant_configs(p: Plan | Config) -> dict[str, Config]:
    """The generator runs: WeightFormer and each of ``meta.ablations`` (of a plan's config,
    or of a config before its teachers are known, for validation)."""
    cfg = p.cfg if isinstance(p, Plan) else p
    out = {"weightformer": cfg}
    for name in cfg.meta.ablations:
        if name == "mlp":
            student, skw = student_of(cfg)
            out["mlp"] = cfg.with_overrides(
                {
                    "model.name": "mlp_generator",
                    "model.kwargs": {
                        "student": student,
                        "student_kwargs": skw,
                        "ensemble_size": cfg.meta.ensemble_size,
                        "hidden": cfg.meta.mlp_hidden,
                        **{
                            k: v
                            for k, v in cfg.model.kwargs.items()
                            if k in ("chunk", "residual_scale")
                        },
                        # the MLP reads a fixed K in a fixed order: no learned mix
                        "base": "anchor" if cfg.model.kwargs.get("base") == "anchor" else "mean",
                    },
                    "meta.train_k": [],
                    "meta.report_k": [],  # K = 2..8 is reported for WeightFormer only
                }
            )
        else:
            out[name] = cfg.with_overrides(VARIANT_OVERRIDES[name])
    return out
