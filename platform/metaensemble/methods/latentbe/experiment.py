"""The ensemble-distillation experiment: the pipeline behind ``jobs/distill.py``.

1. plan      validate; take M teachers (``distill.teachers``, or the zoo of
             ``distill.teacher_config``, whose missing seeds are trained first) and
             check each is the student's architecture
2. train     every student of ``distill.methods`` (kd, latentbe, tdiv_sdiv) once per
             seed of ``distill.seeds``, as child engine runs of one parent MLflow run;
             each method's seeds are one pack (one Ray Train run), the methods side by
             side as the cluster allows
3. evaluate  the paper's table on the test split: the teachers' ensemble DE-M, each
             student as mean +- std over seeds (ACC, NLL, ECE, and cNLL, cECE after a
             temperature fitted on val), one procedure for every row; reliability
             diagrams as a PNG; every student registered as
             ``student.<dataset>.<arch>.<method>``, tagged with its teachers
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaensemble import data, engine, metrics, tracking
from metaensemble.config import Config
from metaensemble.evaluation import (
    COLUMNS,
    Difference,
    SeedRow,
    calibrated_columns,
    format_seed_table,
    paired_interval,
    reliability_diagram,
    seed_row,
    train_seconds,
    verdict,
)
from metaensemble.methods.base import predict_logp
from metaensemble.methods.latentbe.teachers import (  # noqa: F401 (jobs/ and tests read them here)
    METHODS,
    Teacher,
    members,
    resolve_teachers,
    validate,
)

LABELS = {"teacher": "Teacher DE-{m}", "member": "  single teacher (mean)", "kd": "Student KD",
          "latentbe": "+ LatentBE", "tdiv_sdiv": "+ TDiv-SDiv"}


@dataclass
class Plan:
    cfg: Config
    """The job's config with ``latentbe.members``, ``distill.teachers`` and
    ``distill.methods`` resolved."""
    teachers: list[Teacher]
    students: dict[str, Config] = field(default_factory=dict)
    """``<method>/s<seed>`` -> the student's engine config."""


# ---- 1. plan (validate and the teachers: methods/latentbe/teachers.py) -----------------
def plan(cfg: Config, *, train_missing: bool = True) -> Plan:
    """Validate, take the teachers (training the zoo's missing ones), check them, and make
    one student config per (method, seed)."""
    cfg, teachers = resolve_teachers(cfg, train_missing=train_missing)
    students = {}
    for method in cfg.distill.methods:
        c = cfg.with_overrides({"method": method, "task": "distill"})
        engine.validate(c)  # the method's own checks: teacher architectures, members, layers
        for seed in cfg.distill.seeds:
            students[f"{method}/s{seed}"] = c.with_overrides({"seed": seed})
    return Plan(cfg, teachers, students)


# ---- 3. evaluate -----------------------------------------------------------------------
@dataclass
class Scored:
    """One network's predictions and the table's columns for it."""

    test_logp: torch.Tensor
    test_y: torch.Tensor
    values: dict[str, float]


def score(val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> Scored:
    """ACC, NLL, ECE on test and cNLL, cECE after the temperature fitted on val: the one
    procedure behind every row of the table (teachers, their ensemble, students)."""
    return Scored(test[0], test[1], calibrated_columns(val, test))


def _per_seed(row: SeedRow, k: str) -> list[float] | float:
    """``row``'s column ``k`` per seed, paired by seed index; a row of one (DE-M) as its value."""
    return [p[k] for p in row.per_seed] if row.n > 1 else row.mean[k]


def _minus(a: SeedRow, b: SeedRow, k: str) -> Difference:
    """``a - b`` in column ``k`` with its paired interval over seeds."""
    return paired_interval(_per_seed(a, k), _per_seed(b, k), f"{a.key} - {b.key} {k}")


def directions(rows: list[SeedRow]) -> dict[str, str]:
    """The paper's claims, each with its ``evaluation.verdict`` (paired over seeds):
    every student below DE-M (lower ACC and higher NLL); LatentBE at or above KD in NLL
    (lower NLL); TDiv-SDiv the best student in NLL and in ECE. A claim whose rows are
    missing is left out."""
    by = {r.key: r for r in rows}
    students = [by[k] for k in METHODS if k in by]
    out: dict[str, str] = {}
    if "teacher" in by and students:
        t = by["teacher"]
        below = [d for s in students for d in (_minus(t, s, "acc"), _minus(s, t, "nll"))]
        out["every student below DE-M"] = verdict(below, "higher")
    if "kd" in by and "latentbe" in by:
        out["LatentBE at or above KD in NLL"] = verdict(_minus(by["latentbe"], by["kd"], "nll"), "lower")
    if "tdiv_sdiv" in by and len(students) > 1:
        others = [s for s in students if s.key != "tdiv_sdiv"]
        for k in ("nll", "ece"):
            out[f"TDiv-SDiv best student in {k.upper()}"] = verdict(
                [_minus(by["tdiv_sdiv"], s, k) for s in others], "lower")
    return out


def evaluate(p: Plan, run_ids: dict[str, str]) -> tuple[list[SeedRow], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The table's rows (teacher DE-M, mean single teacher, each method over seeds) and
    each row's pooled test predictions for the reliability diagrams."""
    from metaensemble.models import load

    cfg = p.cfg
    _, val, test = data.eval_splits(cfg.data)
    client = tracking.client()
    t_val, t_test = [], []
    for t in p.teachers:
        model = load(t.uri)
        t_val.append(predict_logp(model, val))
        t_test.append(predict_logp(model, test))
    ens = score((metrics.ensemble_logp(torch.stack([v[0] for v in t_val])), t_val[0][1]),
                (metrics.ensemble_logp(torch.stack([v[0] for v in t_test])), t_test[0][1]))
    m = len(p.teachers)
    rows = [seed_row("teacher", LABELS["teacher"].format(m=m), [ens.values]),
            seed_row("member", LABELS["member"], [score(v, s).values for v, s in zip(t_val, t_test, strict=True)])]
    curves = {rows[0].label: (ens.test_logp, ens.test_y)}
    for method in cfg.distill.methods:
        per, logps, ys, seconds = [], [], [], []
        for seed in cfg.distill.seeds:
            rid = run_ids[f"{method}/s{seed}"]
            model = load(f"runs:/{rid}/model")
            s = score(predict_logp(model, val), predict_logp(model, test))
            per.append(s.values)
            logps.append(s.test_logp)
            ys.append(s.test_y)
            seconds.append(train_seconds(client, rid))
        rows.append(seed_row(method, LABELS[method], per, float(np.mean(seconds))))
        curves[LABELS[method]] = (torch.cat(logps), torch.cat(ys))
    return rows, curves


def register_students(client, p: Plan, run_ids: dict[str, str], parent_run_id: str) -> dict[str, str]:
    """Each student run's model as a version of ``student.<dataset>.<arch>.<method>``,
    tagged with its teachers and seed; returns key -> version."""
    cfg = p.cfg
    out = {}
    for key, rid in run_ids.items():
        method, seed = key.split("/s")
        mv = tracking.register_model(
            client, f"student.{cfg.data.name}.{cfg.model.name}.{method}", rid,
            tags={"teachers": ", ".join(t.label for t in p.teachers), "seed": seed, "method": method,
                  "distill_run": parent_run_id},
            description=f"{cfg.model.name} students distilled on {cfg.data.name} by {method} (jobs/distill.py).",
        )
        out[key] = mv.version
    return out


# ---- the whole job ---------------------------------------------------------------------
@dataclass
class DistillOutcome:
    parent_run_id: str
    rows: list[SeedRow]
    run_ids: dict[str, str]
    versions: dict[str, str]
    directions: dict[str, str]
    teachers: list[Teacher]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"parent_run_id": self.parent_run_id, "rows": [r.to_dict() for r in self.rows],
                "run_ids": self.run_ids, "versions": self.versions, "directions": self.directions,
                "teachers": [t.__dict__ for t in self.teachers], "seconds": self.seconds}


def run(cfg: Config, *, train_missing: bool = True) -> DistillOutcome:
    """The whole job under one parent MLflow run, which a rerun of the same config
    reopens (finished students are reused, not retrained)."""
    from metaensemble.sweep import train_configs

    t0 = time.perf_counter()
    p = plan(cfg, train_missing=train_missing)
    t_plan = time.perf_counter()
    cfg = p.cfg
    client = tracking.client(tracking.ensure_tracking())
    key = f"distill-{cfg.run_key()}"
    with tracking.job_run(client, cfg, key, "distill") as parent:
        tracking.set_tags(client, parent, {"teachers": ", ".join(t.label for t in p.teachers),
                                           "methods": ",".join(cfg.distill.methods),
                                           "seeds": ",".join(map(str, cfg.distill.seeds))})
        print(f"teachers (M={len(p.teachers)}): {', '.join(t.label for t in p.teachers)}", flush=True)
        print(f"training {len(p.students)} students: {', '.join(p.students)}", flush=True)
        groups = [[k for k in p.students if k.startswith(f"{m}/")] for m in cfg.distill.methods]
        # the slowest method first, so that the others fill in around it
        groups.sort(key=lambda g: -METHODS.index(g[0].split("/")[0]))
        run_ids = train_configs(p.students, groups, experiment=cfg.experiment_name, parent_run_id=parent,
                                storage=f"{cfg.resolved_storage_path()}/distill", name=key[:150])
        t_train = time.perf_counter()
        log_fold_gaps(client, run_ids)
        rows, curves = evaluate(p, run_ids)
        versions = register_students(client, p, run_ids, parent)
        dirs = directions(rows)
        shape = ", ".join(f"{k} {v}" for k, v in cfg.model.kwargs.items())
        title = f"{cfg.data.name}, {cfg.model.name}{f' ({shape})' if shape else ''}: DE-{len(p.teachers)} and its students"
        log_results(client, parent, rows, curves, dirs, title)
        seconds = {"plan_s": t_plan - t0, "train_s": t_train - t_plan, "total_s": time.perf_counter() - t0}
        tracking.log_metrics(client, parent, seconds)
    return DistillOutcome(parent, rows, run_ids, versions, dirs, p.teachers, seconds)


FOLD_GAP = "fold_gap"
"""Metric prefix of the gap between a LatentBE student's two folds: ``fold_gap/<split>_<m>``
is the other fold's ``<split>_<m>`` minus the selected fold's (positive acc: the other
fold is more accurate; see ``latentbe.fold``)."""


def log_fold_gaps(client, run_ids: dict[str, str]) -> None:
    """On every student run that evaluated the other fold beside the selected one (its
    ``fold_<other>/...`` metrics), the gaps as ``fold_gap/...`` metrics."""
    for rid in run_ids.values():
        m = client.get_run(rid).data.metrics
        other = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("fold_") and "/" in k
                 and not k.startswith(f"{FOLD_GAP}/")}
        gaps = {f"{FOLD_GAP}/{k}": v - m[k] for k, v in other.items()
                if k in m and k.split("_", 1)[0] in ("val", "test") and k.split("_", 1)[1] in ("acc", "nll", "ece")}
        if gaps:
            tracking.log_metrics(client, rid, gaps)


def log_results(client, run_id: str, rows: list[SeedRow], curves, dirs: dict[str, str], title: str) -> None:
    """``distill_table.md`` / ``.json``, ``reliability.png`` and ``<key>_<column>``
    metrics (means, and ``_std``) on the parent run."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        claims = "\n".join(f"- {k}: {v}" for k, v in dirs.items())
        (out / "distill_table.md").write_text(f"{title}\n\n{format_seed_table(rows)}\n\n{claims}\n")
        (out / "distill_table.json").write_text(json.dumps({"rows": [r.to_dict() for r in rows],
                                                            "directions": dirs}, indent=2))
        reliability_diagram(curves, out / "reliability.png", title, ece={r.label: r.mean["ece"] for r in rows})
        client.log_artifacts(run_id, d)
    values = {}
    for r in rows:
        for k in (*COLUMNS, "temperature"):
            values[f"{r.key}_{k}"] = r.mean[k]
            if r.n > 1:
                values[f"{r.key}_{k}_std"] = r.std[k]
    tracking.log_metrics(client, run_id, values)
