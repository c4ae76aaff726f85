"""The meta-ensemble pipeline behind ``jobs/meta_train.py``.

    1. plan       validate the config; ensure the teacher zoo (training missing seeds
                  through the teacher-zoo job); download and check every teacher; split
                  the zoo by teacher into meta-train / meta-val / meta-test (by hash)
    2. train      WeightFormer, its ablations and the MLP generator (meta-training on
                  meta-train ensembles, selected on meta-val ensembles) and the KD
                  baselines, as engine runs run side by side by Ray Tune
    3. evaluate   on meta-test ensembles, test split: ACC / NLL / ECE / wall time for
                  every way of producing one network, printed and logged to MLflow
                  (table + bar chart); the WeightFormer generator is registered
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaensemble import data, engine, metrics, tracking
from metaensemble.config import Config, load_config
from metaensemble.errors import ConfigError, ZooError
from metaensemble.methods.base import predict_logp
from metaensemble.methods.kd import ensemble_kd_loss, load_teachers, teacher_logits
from metaensemble.methods.weightformer.method import (
    WeightFormerMethod,
    check_disjoint,
    make_eval_loader,
)
from metaensemble.methods.weightformer.student import (
    build_student,
    generate_student,
    make_ensembles,
    recompute_bn,
    weight_average,
)
from metaensemble.methods.weightformer.tokens import tokenise
from metaensemble.models import load

VARIANT_OVERRIDES: dict[str, dict[str, Any]] = {
    "weightformer": {},
    "no_mask": {"model.kwargs.mask": False},
    "no_shift": {"meta.lambda_shift": 0.0},
    "no_cross": {"model.kwargs.cross_layer": False},
    "base_mean": {"model.kwargs.base": "mean"},
}
LABELS = {
    "mean_teacher": "mean single teacher", "anchor": "anchor teacher (zero correction)",
    "anchor_bn": "anchor teacher, BN recomputed", "ensemble": "ensemble (prob. average)",
    "weight_average": "naive weight average", "kd_subset": "KD student (subset)", "kd_full": "KD student (full train)",
    "mlp": "MLP generator", "weightformer": "WeightFormer zero-shot", "weightformer_ft": "WeightFormer + finetune",
    "no_mask": "  ablation: no mask", "no_shift": "  ablation: no shift consistency",
    "no_cross": "  ablation: no cross-layer flow", "base_mean": "  ablation: base=mean",
}


@dataclass
class TeacherRecord:
    uri: str
    seed: int
    version: int
    sha256: str
    side: str


@dataclass
class Plan:
    cfg: Config
    """The meta-train config with meta.{train,val,test}_teachers filled in."""
    teacher_cfg: Config
    teachers: list[TeacherRecord] = field(default_factory=list)
    student_spec: dict[str, Any] = field(default_factory=dict)

    def side(self, name: str) -> list[TeacherRecord]:
        return [t for t in self.teachers if t.side == name]


# ---- 1. plan ---------------------------------------------------------------------------
def student_of(cfg: Config) -> tuple[str, dict[str, Any]]:
    return cfg.model.kwargs["student"], dict(cfg.model.kwargs.get("student_kwargs") or {})


def validate(cfg: Config) -> Config:
    """Everything checkable before any work: the generator, K, the split sizes, and that
    the zoo recipe trains teachers of the student's architecture. Returns the recipe."""
    if cfg.method != "weightformer":
        raise ConfigError(f"the meta-train job runs method weightformer, got method={cfg.method!r}")
    engine.validate(cfg, _GeneratorOnly(cfg))
    m = cfg.meta
    if m.zoo_size - m.num_val_teachers - m.num_test_teachers < m.ensemble_size:
        raise ZooError(f"meta.zoo_size={m.zoo_size} leaves {m.zoo_size - m.num_val_teachers - m.num_test_teachers} "
                       f"meta-train teachers after {m.num_val_teachers} val + {m.num_test_teachers} test; "
                       f"K={m.ensemble_size} needs at least {m.ensemble_size}")
    for side, n in (("val", m.num_val_teachers), ("test", m.num_test_teachers)):
        if n < m.ensemble_size:
            raise ZooError(f"meta.num_{side}_teachers={n} is fewer than K={m.ensemble_size}; "
                           f"a held-out ensemble needs K teachers")
    tcfg = load_config(m.teacher_config, [f"zoo.num_teachers={m.zoo_size}", f"storage_path={cfg.storage_path}"])
    student, skw = student_of(cfg)
    if (tcfg.model.name, dict(tcfg.model.kwargs)) != (student, skw) or tcfg.data.name != cfg.data.name:
        raise ConfigError(
            f"meta.teacher_config {m.teacher_config} trains {tcfg.model.name!r} {dict(tcfg.model.kwargs)} on "
            f"{tcfg.data.name!r}, but the student is {student!r} {skw} on {cfg.data.name!r}: teachers must have "
            f"the student's architecture and dataset")
    split_keys = ("val_fraction", "test_fraction", "split_seed")
    theirs, ours = ({k: getattr(c.data, k) for k in split_keys} for c in (tcfg, cfg))
    if theirs != ours:
        raise ConfigError(
            f"meta.teacher_config {m.teacher_config} splits {cfg.data.name} as {theirs}, but this job splits it as "
            f"{ours}: set data.val_fraction/test_fraction/split_seed to the teachers' values, so that meta-"
            f"validation and test data were never trained on")
    engine.validate(tcfg)
    return tcfg


class _GeneratorOnly(WeightFormerMethod):
    """Validation before the teacher lists exist (they come from the zoo)."""

    def validate(self) -> None:
        self.validate_generator()


def plan(cfg: Config, *, train_missing: bool = True) -> Plan:
    """Validate, make sure the zoo holds ``meta.zoo_size`` teachers, check them, split them."""
    tcfg = validate(cfg)
    from metaensemble.tracking import TeacherZoo

    tracking.ensure_tracking()
    student, skw = student_of(cfg)
    zoo = TeacherZoo(cfg.data.name, student)
    wanted = set(range(tcfg.zoo.first_seed, tcfg.zoo.first_seed + cfg.meta.zoo_size))
    have = [e for e in zoo.teachers() if e.seed in wanted and e.config_hash == tcfg.config_hash()]
    if len(have) < cfg.meta.zoo_size:
        if not train_missing:
            raise ZooError(f"zoo {zoo.name} has {len(have)} teachers of this recipe, meta.zoo_size={cfg.meta.zoo_size} "
                           f"needed (K={cfg.meta.ensemble_size}); train them with jobs/train_teachers.py "
                           f"--config {cfg.meta.teacher_config} zoo.num_teachers={cfg.meta.zoo_size}")
        from metaensemble.teachers import train_zoo

        print(f"zoo {zoo.name} holds {len(have)} of the {cfg.meta.zoo_size} teachers needed; training the rest", flush=True)
        train_zoo(tcfg)
        have = [e for e in zoo.teachers() if e.seed in wanted and e.config_hash == tcfg.config_hash()]
    have.sort(key=lambda e: e.seed)
    info = data.load(cfg.data).info
    spec = {"arch": student, "kwargs": {"num_classes": info.num_classes, "in_chans": info.in_chans,
                                        "img_size": info.img_size, **skw}}
    loaded = load_teachers([e.uri for e in have], spec)  # checks each checkpoint and its architecture
    perm = np.random.default_rng([cfg.seed, 29]).permutation(len(have))
    m = cfg.meta
    sides = {int(i): ("test" if j < m.num_test_teachers else "val" if j < m.num_test_teachers + m.num_val_teachers
                      else "train") for j, i in enumerate(perm)}
    records = [TeacherRecord(e.uri, e.seed, e.version, t.sha256, sides[i]) for i, (e, t) in enumerate(zip(have, loaded, strict=True))]
    check_disjoint({s: [r.sha256 for r in records if r.side == s] for s in ("train", "val", "test")})
    filled = cfg.with_overrides({f"meta.{s}_teachers": [r.uri for r in records if r.side == s]
                                 for s in ("train", "val", "test")})
    WeightFormerMethod(filled).validate()
    return Plan(filled, tcfg, records, spec)


# ---- 2. train --------------------------------------------------------------------------
def variant_configs(p: Plan) -> dict[str, Config]:
    cfg = p.cfg
    out = {"weightformer": cfg}
    for name in cfg.meta.ablations:
        if name == "mlp":
            student, skw = student_of(cfg)
            out["mlp"] = cfg.with_overrides({"model.name": "mlp_generator", "model.kwargs": {
                "student": student, "student_kwargs": skw, "ensemble_size": cfg.meta.ensemble_size,
                "hidden": cfg.meta.mlp_hidden,
                **{k: v for k, v in cfg.model.kwargs.items() if k in ("chunk", "base", "residual_scale")}}})
        else:
            out[name] = cfg.with_overrides(VARIANT_OVERRIDES[name])
    return out


def test_ensembles(cfg: Config) -> list[list[int]]:
    """The meta-test ensembles (indices into meta.test_teachers), as the method draws them."""
    return make_ensembles(len(cfg.meta.test_teachers), cfg.meta.ensemble_size, cfg.meta.test_ensembles, cfg.seed + 1)


def kd_configs(p: Plan) -> dict[str, Config]:
    """Ensemble-KD students for the first ``meta.kd_ensembles`` test ensembles: on the
    meta-training subset (as many optimiser steps as the full run) and on the full train split."""
    cfg, t = p.cfg, p.teacher_cfg
    student, skw = student_of(cfg)
    n_train = len(data.load(t.data).train)
    steps = max(1, n_train // t.data.batch_size)
    out = {}
    for i, ens in enumerate(test_ensembles(cfg)[: cfg.meta.kd_ensembles]):
        common = {"task": "kd", "method": "kd", "model.name": student, "model.kwargs": skw,
                  "distill.teachers": [cfg.meta.test_teachers[j] for j in ens],
                  "train.epochs": cfg.meta.kd_epochs, "seed": cfg.seed}
        base = t.with_overrides({**common, "distill.alpha": cfg.distill.alpha, "distill.temperature": cfg.distill.temperature})
        out[f"kd_full/{i}"] = base
        out[f"kd_subset/{i}"] = base.with_overrides({"data.train_fraction": cfg.data.train_fraction,
                                                     "train.steps_per_epoch": steps})
    return out


def _run_name(cfg: Config, trial_id: str) -> str:
    return cfg.run_key()


def train_all(runs: dict[str, Config], experiment: str, parent_run_id: str, storage: str, name: str) -> dict[str, str]:
    """Train every config (side by side as the cluster allows); returns name -> MLflow run id."""
    from ray import tune

    from metaensemble.sweep import concurrency, launch

    uri = tracking.ensure_tracking()
    engine.ensure_ray()
    first = next(iter(runs.values()))
    static = {"base": first.to_dict(), "experiment": experiment, "tracking_uri": uri, "name": name,
              "parent_run_id": parent_run_id, "run_name_fn": _run_name}
    # The KD students train in seconds each: one pack (one Ray Train run, started first)
    # holds them all; every generator run, minutes each, gets its own.
    kd = [_flat_overrides(c.to_dict()) for k, c in runs.items() if k.startswith("kd_")]
    space = ([{"pack": kd}] if len(kd) > 1 else kd) + [_flat_overrides(c.to_dict()) for k, c in runs.items()
                                                         if not k.startswith("kd_")]
    results = launch(static, {"params": tune.grid_search(space)}, name=name,
                     storage=storage, metric="val_acc", mode="max", num_samples=1,
                     max_concurrent=concurrency(first, 0), verbose=0)  # the runs print their own epoch lines
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(runs)} runs failed; first: {errors[0]}")
    client = tracking.client(uri)
    exp_id = tracking.experiment_id(client, experiment)
    ids = {}
    for key, c in runs.items():
        run = tracking.find_run(client, exp_id, c.with_overrides({"experiment": experiment}).run_key())
        if run is None or run.info.status != "FINISHED":
            raise RuntimeError(f"run {key} ({c.run_key()}) did not finish")
        ids[key] = run.info.run_id
    return ids


def _flat_overrides(d: dict[str, Any]) -> dict[str, Any]:
    """A whole config as top-level overrides (sections replaced wholesale)."""
    return {k: v for k, v in d.items() if k != "experiment"}


# ---- 3. evaluate -----------------------------------------------------------------------
@dataclass
class Row:
    key: str
    acc: float
    nll: float
    ece: float
    time_s: float
    n: int
    accs: list[float] = field(default_factory=list)
    """Per-ensemble accuracies, in the order of the meta-test ensembles (the KD rows cover
    the first ``meta.kd_ensembles`` of them): for comparisons on the same ensembles."""

    @property
    def label(self) -> str:
        return LABELS.get(self.key, self.key)


def _mean_row(key: str, per: list[dict[str, float]]) -> Row:
    return Row(key, *(float(np.mean([r[k] for r in per])) for k in ("acc", "nll", "ece", "time_s")), len(per),
               [float(r["acc"]) for r in per])


def _metrics(logp, y, t: float) -> dict[str, float]:
    m = metrics.classification_metrics(logp, y, "")
    return {"acc": m["acc"], "nll": m["nll"], "ece": m["ece"], "time_s": t}


def finetune(student, teachers, loader, epochs: int, lr: float, alpha: float, temperature: float, bn_loader):
    """``epochs`` of KD (the meta-training loss) from the generated student: SGD with
    momentum, cosine to 0; BN statistics recomputed on ``bn_loader`` after."""
    steps = max(1, epochs * len(loader))
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for ep in range(epochs):
        loader.set_epoch(ep)
        student.train()
        for b in loader:
            with torch.enable_grad():
                loss = ensemble_kd_loss(student(b["x"]), teacher_logits(teachers, b["x"]), b["y"], alpha, temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
    return recompute_bn(student, bn_loader)


def _epoch_time(client, run_id: str) -> float:
    return float(sum(m.value for m in client.get_metric_history(run_id, "epoch_time_s")))


def evaluate(p: Plan, run_ids: dict[str, str]) -> list[Row]:
    """The evaluation table on meta-test ensembles, test split (see the module docstring)."""
    cfg = p.cfg
    torch.manual_seed(cfg.seed)
    splits = data.load(cfg.data.model_copy(update={"train_fraction": 1.0}))
    sub = data.load(cfg.data)
    info = splits.info
    test_loader = make_eval_loader(splits.test, info, cfg.data.eval_batch_size, "cpu")
    bn_loader = make_eval_loader(sub.train, info, cfg.data.eval_batch_size, "cpu")
    full_bn_loader = make_eval_loader(splits.train, info, cfg.data.eval_batch_size, "cpu")  # finetuning sees all of train
    ft_loader = data.ArrayLoader(splits.train, info, cfg.data.batch_size, shuffle=True, augment=cfg.data.augment,
                                 seed=cfg.seed, drop_last=True) if isinstance(splits.train, data.ArraySplit) else \
        data.DatasetLoader(splits.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
    loaded = load_teachers(list(cfg.meta.test_teachers), p.student_spec)
    models = [t.model for t in loaded]
    states = [{k: v.clone() for k, v in m_.state_dict().items()} for m_ in models]
    gens = {k: load(f"runs:/{rid}/model") for k, rid in run_ids.items() if not k.startswith("kd_")}
    layout = gens["weightformer"].layout
    rows_pool = [tokenise(s, layout) for s in states]
    teacher_scores = [predict_logp(m_, test_loader) for m_ in models]
    client = tracking.client()
    per: dict[str, list[dict[str, float]]] = {}
    d = cfg.distill
    for i, ens in enumerate(test_ensembles(cfg)):
        per.setdefault("mean_teacher", []).append(
            {k: float(np.mean([_metrics(*teacher_scores[j], 0.0)[k] for j in ens])) for k in ("acc", "nll", "ece", "time_s")})
        # the anchor as it is: what a generator with a zero correction outputs
        per.setdefault("anchor", []).append(_metrics(*teacher_scores[ens[0]], 0.0))
        ens_logp = metrics.ensemble_logp(torch.stack([teacher_scores[j][0] for j in ens]))
        per.setdefault("ensemble", []).append(_metrics(ens_logp, teacher_scores[ens[0]][1], 0.0))
        # the anchor with BN statistics plainly recomputed on the subset (a generator with a
        # zero correction outputs the anchor itself: its statistics are re-estimated
        # relative to the anchor's, see recompute_bn)
        t0 = time.perf_counter()
        anchor = recompute_bn(build_student(p.student_spec, states[ens[0]]), bn_loader)
        per.setdefault("anchor_bn", []).append(_metrics(*predict_logp(anchor, test_loader), time.perf_counter() - t0))
        t0 = time.perf_counter()
        avg = recompute_bn(build_student(p.student_spec, weight_average([states[j] for j in ens])), bn_loader)
        per.setdefault("weight_average", []).append(_metrics(*predict_logp(avg, test_loader), time.perf_counter() - t0))
        for key, gen in gens.items():
            student, dt = generate_student(gen, rows_pool, states, ens, bn_loader)
            per.setdefault(key, []).append(_metrics(*predict_logp(student, test_loader), dt))
            if key == "weightformer" and cfg.meta.finetune_epochs:
                t0 = time.perf_counter()
                finetune(student, [models[j] for j in ens], ft_loader, cfg.meta.finetune_epochs, cfg.meta.finetune_lr,
                         d.alpha, d.temperature, full_bn_loader)
                per.setdefault("weightformer_ft", []).append(
                    _metrics(*predict_logp(student, test_loader), dt + time.perf_counter() - t0))
        for kind in ("kd_subset", "kd_full"):
            rid = run_ids.get(f"{kind}/{i}")
            if rid is not None:
                per.setdefault(kind, []).append(_metrics(*predict_logp(load(f"runs:/{rid}/model"), test_loader),
                                                         _epoch_time(client, rid)))
    order = ["mean_teacher", "anchor", "anchor_bn", "ensemble", "weight_average", "kd_subset", "kd_full", "mlp", "weightformer",
             "weightformer_ft", "no_mask", "no_shift", "no_cross", "base_mean"]
    return [_mean_row(k, per[k]) for k in order if k in per]


def format_table(rows: list[Row]) -> str:
    head = f"{'method':<34} {'ACC':>7} {'NLL':>7} {'ECE':>7} {'time (s)':>10} {'n':>3}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.label:<34} {100 * r.acc:>7.2f} {r.nll:>7.4f} {r.ece:>7.4f} {r.time_s:>10.3f} {r.n:>3}")
    return "\n".join(lines)


def bar_chart(rows: list[Row], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 5), sharey=True)
    labels = [r.label.strip() for r in rows]
    ypos = np.arange(len(rows))
    for ax, (attr, name) in zip(axes, (("acc", "test accuracy (%)"), ("nll", "test NLL"), ("ece", "test ECE"),
                                       ("time_s", "seconds to produce (log)")), strict=True):
        vals = [100 * r.acc if attr == "acc" else getattr(r, attr) for r in rows]
        ax.barh(ypos, [max(v, 1e-4) for v in vals] if attr == "time_s" else vals,
                color=["tab:orange" if r.key.startswith("weightformer") else "tab:blue" for r in rows])
        if attr == "acc":
            lo = min(vals)
            ax.set_xlim(max(0.0, lo - 2.0), 100.0)
        if attr == "time_s":
            ax.set_xscale("log")
        ax.set_title(name)
    axes[0].set_yticks(ypos, labels)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the whole job ---------------------------------------------------------------------
@dataclass
class MetaOutcome:
    parent_run_id: str
    rows: list[Row]
    run_ids: dict[str, str]
    teachers: list[TeacherRecord]
    generator_version: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"parent_run_id": self.parent_run_id, "rows": [{**asdict(r), "label": r.label} for r in self.rows],
                "run_ids": self.run_ids, "teachers": [asdict(t) for t in self.teachers],
                "generator_version": self.generator_version, "seconds": self.seconds}


def run(cfg: Config, *, train_missing: bool = True) -> MetaOutcome:
    t_start = time.perf_counter()
    pl = plan(cfg, train_missing=train_missing)
    t_plan = time.perf_counter()
    cfg = pl.cfg
    uri = tracking.ensure_tracking()
    client = tracking.client(uri)
    experiment = cfg.experiment_name
    key = f"meta-{cfg.run_key()}"
    handle = tracking.open_run(client, cfg, key, tags={"metaensemble.job": "meta_train"})
    if handle.resumed:
        client.update_run(handle.run_id, status="RUNNING")
    parent = handle.run_id
    try:
        client.log_dict(parent, {"teachers": [asdict(t) for t in pl.teachers]}, "teachers.json")
        tracking.set_tags(client, parent, {f"teachers.{s}": ",".join(f"v{t.version}" for t in pl.side(s))
                                           for s in ("train", "val", "test")})
        print(_split_summary(pl), flush=True)
        runs = {**variant_configs(pl), **kd_configs(pl)}
        print(f"training {len(runs)} runs: {', '.join(runs)}", flush=True)
        run_ids = train_all(runs, experiment, parent, f"{cfg.resolved_storage_path()}/meta", key[:150])
        t_train = time.perf_counter()
        rows = evaluate(pl, run_ids)
        t_eval = time.perf_counter()
        version = _register_generator(client, cfg, run_ids["weightformer"], parent)
        with tempfile.TemporaryDirectory() as d:
            table = format_table(rows)
            (Path(d) / "eval_table.md").write_text(table + "\n")
            (Path(d) / "eval_table.json").write_text(json.dumps([{**asdict(r), "label": r.label} for r in rows], indent=2))
            bar_chart(rows, Path(d) / "eval_bars.png", f"{cfg.data.name}: meta-test ensembles of K={cfg.meta.ensemble_size}")
            client.log_artifacts(parent, d)
        client.log_table(parent, {"method": [r.label.strip() for r in rows], "acc": [r.acc for r in rows],
                                  "nll": [r.nll for r in rows], "ece": [r.ece for r in rows],
                                  "time_s": [r.time_s for r in rows], "n_ensembles": [r.n for r in rows]},
                         "eval_table_mlflow.json")
        tracking.log_metrics(client, parent, {f"{r.key}_{m}": getattr(r, m) for r in rows for m in ("acc", "nll", "ece", "time_s")})
        seconds = {"plan_s": t_plan - t_start, "train_s": t_train - t_plan, "eval_s": t_eval - t_train,
                   "total_s": time.perf_counter() - t_start}
        tracking.log_metrics(client, parent, seconds)
        client.set_terminated(parent, status="FINISHED")
    except BaseException:
        client.set_terminated(parent, status="FAILED")
        raise
    return MetaOutcome(parent, rows, run_ids, pl.teachers, version, seconds)


def _split_summary(pl: Plan) -> str:
    parts = [f"{s}: seeds {sorted(t.seed for t in pl.side(s))}" for s in ("train", "val", "test")]
    return f"teacher split by checkpoint ({len(pl.teachers)} teachers): " + "; ".join(parts)


def _register_generator(client, cfg: Config, run_id: str, parent: str) -> str:
    from mlflow.exceptions import MlflowException

    student, _ = student_of(cfg)
    name = f"weightformer.{cfg.data.name}.{student}"
    try:
        client.create_registered_model(name, description=f"WeightFormer generators for {cfg.data.name} / {student} students.")
    except MlflowException:
        pass
    for v in client.search_model_versions(f"name='{name}'"):
        if v.run_id == run_id:
            return v.version
    mv = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id,
                                     tags={"meta_train_run": parent, "ensemble_size": str(cfg.meta.ensemble_size)})
    return mv.version
