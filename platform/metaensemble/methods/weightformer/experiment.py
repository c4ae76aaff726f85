"""The WeightFormer experiment: the pipeline behind ``jobs/meta_train.py``.

1. plan       validate the config; ensure the teacher zoo (training missing seeds
              through the teacher-zoo job); download and check every teacher; split
              the zoo by teacher into meta-train / meta-val / meta-test (by hash):
              ``plan.py``, which the engine method's sweep hook shares
2. train      WeightFormer, its ablations and the MLP generator (meta-training on
              meta-train ensembles, selected on meta-val ensembles) and the KD
              baselines, as engine runs side by side through Ray Tune
3. evaluate   on meta-test ensembles, test split: ACC / NLL / ECE / wall time for
              every way of producing one network (the generated students finetuned
              by KD engine runs), printed and logged to MLflow through
              ``metaensemble.evaluation``; the WeightFormer generator is registered
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaensemble import data, engine, metrics, tracking
from metaensemble.config import Config
from metaensemble.evaluation import (
    Difference,
    Row,
    format_differences,
    format_table,
    gap_closed,
    log_table,
    mean_metrics,
    mean_row,
    measure,
    metric_sum,
    paired_bootstrap,
    train_seconds,
)
from metaensemble.methods import soups
from metaensemble.methods.base import predict_logp
from metaensemble.methods.weightformer.plan import (
    VARIANT_OVERRIDES,
    Plan,
    TeacherRecord,
    held_out_ensembles,
    plan,
    student_of,
    variant_configs,
)
from metaensemble.methods.weightformer.student import (
    build_student,
    distances,
    generate_student,
    make_ensembles,
    weight_average,
)
from metaensemble.methods.weightformer.use import BN_LABEL, EvalData, eval_data, prepare, run_id_of
from metaensemble.models import load, save_model
from metaensemble.models.batchnorm import recompute_bn

LABELS = {
    "mean_teacher": "mean single teacher",
    "anchor": "anchor teacher",
    "ensemble": "ensemble (prob. average)",
    "weight_average": "naive weight average",
    "aligned_average": "aligned weight average",
    "best_member": "best member (by val)",
    "greedy_soup": "greedy soup",
    "learned_soup": "learned soup",
    "kd_subset": "KD student (subset)",
    "kd_full": "KD student (full train)",
    "kd_long": "ceiling: KD 4x longer",
    "fit": "ceiling: output form fit by KD",
    "mlp": "MLP generator",
    "weightformer": "WeightFormer zero-shot",
    "weightformer_ft": "WeightFormer + finetune",
    "no_mask": "  ablation: no mask",
    "no_shift": "  ablation: no consistency views",
    "no_cross": "  ablation: no cross-layer flow",
    "base_mean": "  ablation: base=mean",
    "base_anchor": "  ablation: base=anchor",
    "per_row_mix": "  ablation: per-row mix",
}
ORDER = list(LABELS)
"""The table's row order (LABELS is written in it)."""
HIGHLIGHT = ("weightformer", "weightformer_ft")
"""Rows the bar chart draws in the job's own colour."""
FINETUNE_TRAIN_FRACTION = 1.0
"""The finetuning runs see the whole train split (as the full-data KD student they are
compared with does), not meta-training's ``data.train_fraction`` subset: on the digits
default that subset is one batch per epoch."""


# ---- 2. train --------------------------------------------------------------------------
def test_ensembles(cfg: Config) -> list[list[int]]:
    """The meta-test ensembles (indices into meta.test_teachers), as the method draws them."""
    return held_out_ensembles(cfg, cfg.meta.test_ensembles, len(cfg.meta.test_teachers))


def kd_overrides(
    cfg: Config, student: str, skw: dict[str, Any], teachers: list[str], epochs: int
) -> dict[str, Any]:
    """Overrides that turn the teacher recipe into an ensemble-KD run of the student."""
    return {
        "task": "kd",
        "method": "kd",
        "model.name": student,
        "model.kwargs": skw,
        "distill.teachers": teachers,
        "distill.alpha": cfg.distill.alpha,
        "distill.temperature": cfg.distill.temperature,
        "train.epochs": epochs,
        "seed": cfg.seed,
        "zoo.soup": None,  # a student, not a zoo: the teacher recipe's zoo section is not its own
    }


def kd_configs(p: Plan) -> dict[str, Config]:
    """Ensemble-KD students for the first ``meta.kd_ensembles`` test ensembles: on the
    meta-training subset (as many optimiser steps as the full run) and on the full train split."""
    cfg, t = p.cfg, p.teacher_cfg
    student, skw = student_of(cfg)
    n_train = len(data.load(t.data).train)
    steps = max(1, n_train // t.data.batch_size)
    out = {}
    for i, ens in enumerate(test_ensembles(cfg)[: cfg.meta.kd_ensembles]):
        base = t.with_overrides(
            kd_overrides(
                cfg, student, skw, [cfg.meta.test_teachers[j] for j in ens], cfg.meta.kd_epochs
            )
        )
        out[f"kd_full/{i}"] = base
        out[f"kd_subset/{i}"] = base.with_overrides(
            {"data.train_fraction": cfg.data.train_fraction, "train.steps_per_epoch": steps}
        )
    for i, ens in enumerate(test_ensembles(cfg)[: cfg.meta.ceiling_ensembles]):  # a ceiling: KD 4x longer
        out[f"kd_long/{i}"] = t.with_overrides(
            kd_overrides(cfg, student, skw, [cfg.meta.test_teachers[j] for j in ens], 4 * cfg.meta.kd_epochs))
    return out


def train_all(
    runs: dict[str, Config], experiment: str, parent_run_id: str, storage: str, name: str
) -> dict[str, str]:
    """Train every config (side by side as the cluster allows); returns name -> MLflow run id.
    The KD students train in seconds each: one pack (one Ray Train run, started first)
    holds them all; every generator run, minutes each, gets its own."""
    from metaensemble.sweep import train_configs

    kd = [k for k in runs if k.startswith("kd_")]
    groups = [kd] + [[k] for k in runs if k not in kd]
    return train_configs(runs, groups, experiment=experiment, parent_run_id=parent_run_id,
                         storage=storage, name=name)


# ---- 3. evaluate -----------------------------------------------------------------------
def finetune_configs(p: Plan, init_uris: list[str], ensembles: list[list[int]],
                     epochs: list[int] | None = None) -> list[Config]:
    """One KD engine run per generated student: ``model.init_from`` its saved weights,
    distilled from its own ensemble for ``meta.finetune_epochs`` epochs (or ``epochs[i]``)
    of SGD (momentum 0.9, Nesterov, cosine to 0 from ``meta.finetune_lr``), in the job's
    experiment."""
    cfg, m = p.cfg, p.cfg.meta
    student, skw = student_of(cfg)
    epochs = epochs or [m.finetune_epochs] * len(init_uris)
    return [
        p.teacher_cfg.with_overrides(
            {
                **kd_overrides(
                    cfg, student, skw, [m.test_teachers[j] for j in ens], n_epochs
                ),
                "task": "kd_finetune",
                "experiment": cfg.experiment_name,
                "model.init_from": uri,
                "model.init_seed": None,
                "optim.name": "sgd",
                "optim.lr": m.finetune_lr,
                "optim.momentum": 0.9,
                "optim.nesterov": True,
                "optim.weight_decay": 5e-4,
                "optim.decay_norm_bias": True,  # decay on every tensor, as before
                "optim.warmup_epochs": 0,
                "optim.schedule": "cosine",
                "optim.min_lr": 0.0,
                "data.train_fraction": FINETUNE_TRAIN_FRACTION,
                "data.batch_size": cfg.data.batch_size,
                "data.augment": cfg.data.augment,
                "train.steps_per_epoch": None,
                "train.grad_clip": None,
            }
        )
        for uri, ens, n_epochs in zip(init_uris, ensembles, epochs, strict=True)
    ]


def save_students(
    client, parent_run_id: str, students: list[torch.nn.Module], dataset: str,
    artifact_path: str = "finetune_init",
) -> list[str]:
    """Log each student as ``<artifact_path>/<i>`` of the job's run and return their
    ``runs:/`` URIs: a ``model.init_from`` every Ray worker can read, on any node."""
    with tempfile.TemporaryDirectory() as d:
        for i, s in enumerate(students):
            save_model(s, Path(d) / str(i), dataset=dataset)
        client.log_artifacts(parent_run_id, d, artifact_path=artifact_path)
    return [f"runs:/{parent_run_id}/{artifact_path}/{i}" for i in range(len(students))]


def finetune(
    p: Plan,
    students: list[torch.nn.Module],
    ensembles: list[list[int]],
    parent_run_id: str,
    bn_loader,
    of: str | list[str] = "weightformer",
    epochs: list[int] | None = None,
) -> list[tuple[torch.nn.Module, float]]:
    """KD-finetune the students (generated, or made by method ``of``; a list gives each
    student's own) as engine runs packed into one Ray Train run, for
    ``meta.finetune_epochs`` (or ``epochs[i]``); returns each selected model, its BN
    statistics recomputed on ``bn_loader``, and the seconds it cost (the run's training
    time + the BN pass)."""
    client = tracking.client()
    ofs = [of] * len(students) if isinstance(of, str) else list(of)
    if len(ofs) != len(students):
        raise ValueError(f"finetune: {len(students)} students but {len(ofs)} methods in `of`")
    uris: list[str] = [""] * len(students)
    for name in dict.fromkeys(ofs):  # each method's students under its own artifact folder
        idx = [i for i, o in enumerate(ofs) if o == name]
        artifact = "finetune_init" if name == "weightformer" else f"{name}_init"
        saved = save_students(client, parent_run_id, [students[i] for i in idx], p.cfg.data.name, artifact)
        for i, uri in zip(idx, saved, strict=True):
            uris[i] = uri
    cfgs = finetune_configs(p, uris, ensembles, epochs)
    eps = epochs or [p.cfg.meta.finetune_epochs] * len(ofs)
    counts = " and ".join(f"{ofs.count(n)} {n} ({eps[ofs.index(n)]} epoch(s) of KD each)" for n in dict.fromkeys(ofs))
    print(f"finetuning {counts} students, one Ray Train run", flush=True)
    outcomes = engine.fit_pack(
        cfgs, parent_run_id=parent_run_id, tags=[{"metaensemble.finetune_of": o} for o in ofs]
    )
    out = []
    for o in outcomes:
        model = load(o.model_uri)
        t0 = time.perf_counter()
        recompute_bn(model, bn_loader)
        out.append((model, train_seconds(client, o.run_id) + time.perf_counter() - t0))
    return out


def _timed(fn) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@dataclass
class Evaluation:
    rows: list[Row]
    differences: list[Difference]
    cost: dict[str, float]
    distances: dict[str, list[float]]
    by_k: list[dict[str, Any]]
    sizes: dict[str, int] = field(default_factory=dict)
    """Parameters of each generator (by row key) and ``values``: the numbers it generates
    per student (the student's floating-point tensors)."""

    def to_dict(self) -> dict[str, Any]:
        cost = {k: (v if math.isfinite(v) else None) for k, v in self.cost.items()}  # JSON has no inf
        return {"rows": [r.to_dict() for r in self.rows], "differences": [d.to_dict() for d in self.differences],
                "cost": cost, "distances": self.distances, "by_k": self.by_k, "sizes": self.sizes}


def evaluate(p: Plan, run_ids: dict[str, str], parent_run_id: str) -> Evaluation:
    """The table on meta-test ensembles, test split: baselines built from the teachers,
    every generator's zero-shot students, WeightFormer's finetuned students and the KD
    students, one row each (the mean over the ensembles); paired bootstrap intervals of
    the differences that matter; cost and break-even; distances; zero-shot at other K.
    Every scored network's BN statistics are recomputed on the same images (BN_LABEL)."""
    cfg, m = p.cfg, p.cfg.meta
    torch.manual_seed(cfg.seed)
    ev = eval_data(cfg)
    gens = {k: load(f"runs:/{rid}/model") for k, rid in run_ids.items() if not k.startswith("kd_")}
    wf = gens["weightformer"]
    reference = None
    if m.align != "none":
        reference = prepare([m.train_teachers[0]], wf).states[0]
    raw = prepare(list(m.test_teachers), wf)  # as trained (the naive average's input)
    pool = prepare(list(m.test_teachers), wf, m.align, reference)
    teachers = [recompute_bn(build_student(p.student_spec, s), ev.bn) for s in raw.states]
    scores = [predict_logp(t, ev.test) for t in teachers]
    per: dict[str, list[dict[str, float]]] = {}
    dist: dict[str, list[float]] = {"rel_l2_to_anchor": [], "rel_l2_to_mean": [], "rel_l2_to_nearest": []}
    split_s: dict[str, list[float]] = {"fetch_s": [], "prep_s": [], "generate_bn_s": [], "kd_train_s": [],
                                       "kd_bn_s": []}
    to_finetune: list[tuple[torch.nn.Module, float]] = []
    ensembles = test_ensembles(cfg)
    for ens in ensembles:
        # what a user pays before generating: fetching the checkpoints (``fetch_s``, as KD
        # does too), aligning and tokenising them (``prep_s``, from memory)
        prep = prepare([m.test_teachers[j] for j in ens], wf, m.align, reference)
        prep_s = prep.seconds - prep.fetch_seconds
        for key, row in _baselines(p, ens, raw.states, pool.states, scores, ev).items():
            per.setdefault(key, []).append(row)
        for key, gen in gens.items():
            student, dt = generate_student(gen, pool.rows, pool.states, ens, ev.bn)
            per.setdefault(key, []).append(measure(*predict_logp(student, ev.test), prep_s + dt))
            if key == "weightformer":
                to_finetune.append((student, prep_s + dt))
                split_s["fetch_s"].append(prep.fetch_seconds)
                split_s["prep_s"].append(prep_s)
                split_s["generate_bn_s"].append(dt)
                st = student.state_dict()
                for k, v in distances(st, [pool.states[j] for j in ens]).items():
                    dist[k].append(v)
    # one Ray Train run finetunes the generated students and fits the ceiling's averages
    fit = [(_timed(lambda ens=ens: recompute_bn(build_student(p.student_spec, weight_average(
        [pool.states[j] for j in ens])), ev.bn)), ens) for ens in ensembles[: m.ceiling_ensembles]]
    jobs = [(s, ens, "weightformer", m.finetune_epochs) for (s, _), ens in zip(to_finetune, ensembles, strict=True)
            if m.finetune_epochs] + [(s, ens, "fit", m.kd_epochs) for (s, _), ens in fit]
    if jobs:
        tuned = finetune(p, [j[0] for j in jobs], [j[1] for j in jobs], parent_run_id, ev.bn,
                         of=[j[2] for j in jobs], epochs=[j[3] for j in jobs])
        start = [dt for _, dt in to_finetune] if m.finetune_epochs else []
        start += [dt for (_, dt), _ in fit]
        for (_, _, of, _), t0, (model, seconds) in zip(jobs, start, tuned, strict=True):
            key = "weightformer_ft" if of == "weightformer" else "fit"
            per.setdefault(key, []).append(measure(*predict_logp(model, ev.test), t0 + seconds))
    client = tracking.client()
    for kind in ("kd_subset", "kd_full", "kd_long"):
        for i in range(len(ensembles)):
            rid = run_ids.get(f"{kind}/{i}")
            if rid is not None:  # teachers in memory -> ready: its training epochs and the BN pass
                model = load(f"runs:/{rid}/model")
                (_, bn_s), train_s = _timed(lambda model=model: recompute_bn(model, ev.bn)), train_seconds(client, rid)
                per.setdefault(kind, []).append(measure(*predict_logp(model, ev.test), train_s + bn_s))
                if kind == "kd_full":
                    split_s["kd_train_s"].append(train_s)
                    split_s["kd_bn_s"].append(bn_s)
    rows = [mean_row(k, LABELS[k], per[k]) for k in ORDER if k in per]
    by_k = [_at_k(p, wf, pool, raw, scores, ev, k) for k in m.report_k]
    spent = {k: float(np.mean(v)) for k, v in split_s.items() if v}
    meta_s = {"meta_train_s": epoch_seconds(client, run_ids["weightformer"]), **zoo_only_seconds(p, client)}
    sizes = {k: sum(t.numel() for t in g.parameters()) for k, g in gens.items()}
    sizes["values"] = wf.layout.num_values()
    sizes["train_teachers"] = len(m.train_teachers)
    return Evaluation(rows, differences(rows, m.bootstrap, cfg.seed), {**spent, **cost(rows, spent, meta_s)}, dist,
                      by_k, sizes)


def epoch_seconds(client, run_id: str) -> float:
    """A run's epochs end to end: training, validation and checkpointing (the sum of its
    ``epoch_time_s``; not the seen/unseen diagnostics, nor Ray's start-up)."""
    return metric_sum(client, run_id, "epoch_time_s")


def zoo_only_seconds(p: Plan, client) -> dict[str, float]:
    """The zoo teachers that exist only for meta-training (the meta-train and meta-val
    sides; the meta-test teachers are the user's own ensembles): how many, and the sum of
    their training epochs. A teacher whose run cannot be found (a checkpoint folder, not
    an MLflow run) or logged no ``train_time_s`` counts in ``zoo_only_missing``."""
    n, total, missing = 0, 0.0, 0
    for t in p.teachers:
        if t.side not in ("train", "val"):
            continue
        n += 1
        try:
            seconds = metric_sum(client, run_id_of(t.uri, client), "train_time_s")
        except Exception:  # noqa: BLE001 - a folder or a pruned run: said, not fatal
            seconds = 0.0
        total += seconds
        missing += seconds == 0.0
    return {"zoo_only_teachers": float(n), "zoo_only_s": total, "zoo_only_missing": float(missing)}


def differences(rows: list[Row], resamples: int, seed: int) -> list[Difference]:
    """Paired bootstrap intervals over the held-out ensembles: WeightFormer zero-shot
    against the anchor, the naive average, KD, the MLP generator; its finetune against
    KD; every ablation against the full model; and the share of the mean-member to
    ensemble gap zero-shot closes."""
    by = {r.key: r for r in rows}
    out = []
    pairs = [("weightformer", "anchor"), ("weightformer", "weight_average"), ("weightformer", "aligned_average"),
             ("weightformer", "mean_teacher"), ("weightformer", "best_member"), ("weightformer", "greedy_soup"),
             ("weightformer", "learned_soup"), ("weightformer", "kd_full"), ("weightformer", "kd_subset"),
             ("weightformer_ft", "kd_full"), ("weightformer", "mlp"), ("weightformer", "fit"),
             ("weightformer", "kd_long")]
    pairs += [(k, "weightformer") for k in VARIANT_OVERRIDES if k != "weightformer"]
    for a, b in pairs:
        if a in by and b in by:
            out.append(paired_bootstrap(by[a].accs, by[b].accs, f"{LABELS[a].strip()} - {LABELS[b].strip()}",
                                        resamples, seed))
    if {"weightformer", "mean_teacher", "ensemble"} <= set(by):
        out.append(gap_closed(by["weightformer"].accs, by["mean_teacher"].accs, by["ensemble"].accs,
                              "gap closed by zero-shot (fraction of ensemble - mean member)", resamples, seed))
    return out


def cost(rows: list[Row], spent: dict[str, float], meta: dict[str, float]) -> dict[str, float]:
    """Seconds per network on the same boundaries for WeightFormer and full-data KD:

    - ``*_ready_s``, teachers in memory to a network ready to use: align + tokenise +
      generate + BN against KD's training epochs + BN (the table's time column);
    - ``*_e2e_s``, end to end: the same plus fetching the K checkpoints (``fetch_s``,
      measured for the generator and charged to KD alike, which loads the same files);
    - ``amortised_s``: meta-training's epochs (training and meta-validation) plus the
      training of the zoo teachers that exist only for meta-training, and
      ``break_even_ensembles``, after how many ensembles that has paid for itself end to
      end (inf when KD is not slower)."""
    by = {r.key: r for r in rows}
    out = dict(meta)
    out["amortised_s"] = meta.get("meta_train_s", 0.0) + meta.get("zoo_only_s", 0.0)
    if "weightformer" not in by or "kd_full" not in by:
        return out
    fetch = spent.get("fetch_s", 0.0)
    wf, kd = by["weightformer"].time_s, by["kd_full"].time_s
    out.update({"wf_ready_s": wf, "kd_ready_s": kd, "speedup_ready": kd / max(wf, 1e-9),
                "wf_e2e_s": fetch + wf, "kd_e2e_s": fetch + kd, "speedup_e2e": (fetch + kd) / max(fetch + wf, 1e-9)})
    saving = kd - wf
    out["break_even_ensembles"] = math.ceil(out["amortised_s"] / saving) if saving > 0 else math.inf
    return out


def _at_k(p: Plan, gen, pool, raw, scores, ev: EvalData, k: int) -> dict[str, Any]:
    """Zero-shot WeightFormer on ``meta.report_k_ensembles`` held-out ensembles of ``k``."""
    m = p.cfg.meta
    accs: dict[str, list[float]] = {"mean_teacher": [], "ensemble": [], "weight_average": [], "weightformer": []}
    for ens in make_ensembles(len(m.test_teachers), k, m.report_k_ensembles, p.cfg.seed + 7 * k):
        y = scores[ens[0]][1]
        accs["mean_teacher"].append(float(np.mean([measure(*scores[j])["acc"] for j in ens])))
        accs["ensemble"].append(measure(metrics.ensemble_logp(torch.stack([scores[j][0] for j in ens])), y)["acc"])
        avg = recompute_bn(build_student(p.student_spec, weight_average([raw.states[j] for j in ens])), ev.bn)
        accs["weight_average"].append(measure(*predict_logp(avg, ev.test))["acc"])
        student, _ = generate_student(gen, pool.rows, pool.states, ens, ev.bn)
        accs["weightformer"].append(measure(*predict_logp(student, ev.test))["acc"])
    return {"k": k, "n": len(accs["weightformer"]), **{key: float(np.mean(v)) for key, v in accs.items()}}


def _baselines(p: Plan, ens: list[int], raw_states, states, scores, ev: EvalData) -> dict[str, dict[str, float]]:
    """One ensemble's rows that need no training: its members, its anchor, the ensemble,
    the naive weight average (and, with alignment, the average of the aligned teachers)."""
    def average(sts):
        return _timed(lambda: recompute_bn(build_student(p.student_spec, weight_average([sts[j] for j in ens])), ev.bn))

    y = scores[ens[0]][1]
    avg, t_avg = average(raw_states)
    out = {
        "mean_teacher": mean_metrics([measure(*scores[j]) for j in ens]),
        "anchor": measure(*scores[ens[0]]),
        "ensemble": measure(metrics.ensemble_logp(torch.stack([scores[j][0] for j in ens])), y),
        "weight_average": measure(*predict_logp(avg, ev.test), t_avg),
    }
    if p.cfg.meta.align != "none":
        aligned, t_al = average(states)
        out["aligned_average"] = measure(*predict_logp(aligned, ev.test), t_al)
    return {**out, **_soups(p, ens, raw_states, ev)}


def _soups(p: Plan, ens: list[int], raw_states, ev: EvalData) -> dict[str, dict[str, float]]:
    """The soups a user would try first (``methods.soups``): selected and fit on the
    teachers' val split, BN recomputed like every other row, scored on test. Their time
    is the whole soup (every val pass and BN recomputation it makes). Teachers of
    different parents are refused by the soups (weights not averageable)."""
    parent = {r.uri: r.parent or None for r in p.teachers}
    test = p.cfg.meta.test_teachers
    states, parents = [raw_states[j] for j in ens], [parent.get(test[j]) for j in ens]
    skeleton = build_student(p.student_spec, states[0])
    out = {}
    for key, make in (("best_member", soups.best_member), ("greedy_soup", soups.greedy_soup),
                      ("learned_soup", soups.learned_soup)):
        soup = make(states, skeleton, ev.bn, ev.val, parents=parents)
        out[key] = measure(*predict_logp(soup.model, ev.test), soup.seconds)
    return out


def format_evaluation(cfg: Config, ev: Evaluation) -> str:
    """What the job prints after training: the table, its legend, the intervals, cost,
    distances and the other ensemble sizes."""
    m = cfg.meta
    bn = "the train split" if m.bn_data == "train" else "the meta-training subset"
    lines = [f"held-out ensembles: {m.test_ensembles} of K={m.ensemble_size} meta-test teachers "
             f"({m.num_test_teachers} teachers meta-training never saw), test split; "
             f"align={m.align}",
             f"BatchNorm: {BN_LABEL} ({bn}, unaugmented)", *_size_lines(cfg, ev), "", format_table(ev.rows), "",
             f"paired bootstrap 95% intervals over held-out ensembles (accuracy points; {m.bootstrap} resamples):"]
    pts = [d for d in ev.differences if not d.label.startswith("gap")]
    lines.append(format_differences(pts))
    lines += [format_differences([d for d in ev.differences if d.label.startswith("gap")], unit="fraction")]
    lines += _cost_lines(ev.cost)
    if ev.distances["rel_l2_to_anchor"]:
        a, mn, nr = (np.asarray(ev.distances[k]) for k in ("rel_l2_to_anchor", "rel_l2_to_mean", "rel_l2_to_nearest"))
        lines.append(f"generated students' relative L2 distance (weights, biases, BN affine): to their anchor "
                     f"{a.mean():.4f} ({a.min():.4f}-{a.max():.4f}), to their teachers' mean {mn.mean():.4f} "
                     f"({mn.min():.4f}-{mn.max():.4f}), to the nearest of their teachers {nr.mean():.4f} "
                     f"({nr.min():.4f}-{nr.max():.4f})")
    if ev.by_k:
        lines += ["", "zero-shot at other ensemble sizes (test accuracy %, mean over held-out ensembles):",
                  f"{'K':>3} {'n':>3} {'mean member':>12} {'ensemble':>9} {'avg':>7} {'WeightFormer':>13}"]
        for r in ev.by_k:
            lines.append(f"{r['k']:>3} {r['n']:>3} {100 * r['mean_teacher']:>12.2f} {100 * r['ensemble']:>9.2f} "
                         f"{100 * r['weight_average']:>7.2f} {100 * r['weightformer']:>13.2f}")
    return "\n".join(lines)


def _cost_lines(c: dict[str, float]) -> list[str]:
    """The cost paragraph: the same boundaries for WeightFormer and KD (see ``cost``)."""
    if "kd_ready_s" not in c:
        return []
    be = c["break_even_ensembles"]
    zoo = f"{int(c['zoo_only_teachers'])} zoo teachers used only for meta-training {c['zoo_only_s']:.0f} s"
    if c.get("zoo_only_missing"):
        zoo += f" ({int(c['zoo_only_missing'])} without a run to time)"
    return ["", "cost per network (mean over held-out ensembles):",
            f"  teachers in memory -> network ready: WeightFormer {c['wf_ready_s']:.3f} s (align + tokenise "
            f"{c['prep_s']:.3f}, generate + BN {c['generate_bn_s']:.3f}), KD (full train) {c['kd_ready_s']:.2f} s "
            f"(training {c['kd_train_s']:.2f}, BN {c['kd_bn_s']:.3f}): {c['speedup_ready']:.0f}x",
            f"  end to end (+ fetching the K checkpoints, {c['fetch_s']:.3f} s): WeightFormer {c['wf_e2e_s']:.3f} s, "
            f"KD {c['kd_e2e_s']:.2f} s: {c['speedup_e2e']:.0f}x",
            f"  amortised: meta-training {c['meta_train_s']:.0f} s (training and meta-validation) + {zoo} = "
            f"{c['amortised_s']:.0f} s; pays for itself after {be if be != math.inf else 'no number of'} "
            "ensembles (end to end)"]


def _size_lines(cfg: Config, ev: Evaluation) -> list[str]:
    """The legend's line on how large each generator is against what it learns from."""
    if "weightformer" not in ev.sizes:
        return []
    z, n = ev.sizes, ev.sizes.get("train_teachers", 0)
    mlp = f", the MLP generator {z['mlp']:,}" if "mlp" in z else ""
    return [f"generators: WeightFormer {z['weightformer']:,} parameters{mlp}; a student is {z['values']:,} "
            f"values; meta-training sees {n} teachers ({n * z['values']:,} values)"]


# ---- the whole job ---------------------------------------------------------------------
@dataclass
class MetaOutcome:
    parent_run_id: str
    rows: list[Row]
    run_ids: dict[str, str]
    teachers: list[TeacherRecord]
    generator_version: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    evaluation: Evaluation | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent_run_id": self.parent_run_id,
            "rows": [r.to_dict() for r in self.rows],
            "run_ids": self.run_ids,
            "teachers": [asdict(t) for t in self.teachers],
            "generator_version": self.generator_version,
            "seconds": self.seconds,
            "evaluation": self.evaluation.to_dict() if self.evaluation else None,
        }


def run(cfg: Config, *, train_missing: bool = True) -> MetaOutcome:
    """The whole job (see the module docstring) under one MLflow parent run, which a
    rerun of the same config reopens: finished runs are reused, not retrained."""
    t_start = time.perf_counter()
    pl = plan(cfg, train_missing=train_missing)
    t_plan = time.perf_counter()
    cfg = pl.cfg
    client = tracking.client(tracking.ensure_tracking())
    key = f"meta-{cfg.run_key()}"
    with tracking.job_run(client, cfg, key, "meta_train") as parent:
        client.log_dict(parent, {"teachers": [asdict(t) for t in pl.teachers]}, "teachers.json")
        tracking.set_tags(
            client,
            parent,
            {
                f"teachers.{s}": ",".join(f"v{t.version}" for t in pl.side(s))
                for s in ("train", "val", "test")
            },
        )
        print(_split_summary(pl), flush=True)
        runs = {**variant_configs(pl), **kd_configs(pl)}
        print(f"training {len(runs)} runs: {', '.join(runs)}", flush=True)
        run_ids = train_all(
            runs, cfg.experiment_name, parent, f"{cfg.resolved_storage_path()}/meta", key[:150]
        )
        t_train = time.perf_counter()
        ev = evaluate(pl, run_ids, parent)
        t_eval = time.perf_counter()
        version = register_generator(client, cfg, run_ids["weightformer"], parent)
        log_table(
            client,
            parent,
            ev.rows,
            f"{cfg.data.name}: meta-test ensembles of K={cfg.meta.ensemble_size}",
            highlight=HIGHLIGHT,
        )
        client.log_dict(parent, ev.to_dict(), "evaluation.json")
        client.log_text(parent, format_evaluation(cfg, ev), "evaluation.txt")
        tracking.log_metrics(client, parent, {k: v for k, v in ev.cost.items() if math.isfinite(v)})
        seconds = {
            "plan_s": t_plan - t_start,
            "train_s": t_train - t_plan,
            "eval_s": t_eval - t_train,
            "total_s": time.perf_counter() - t_start,
        }
        tracking.log_metrics(client, parent, seconds)
    return MetaOutcome(parent, ev.rows, run_ids, pl.teachers, version, seconds, ev)


def _split_summary(pl: Plan) -> str:
    parts = [f"{s}: seeds {sorted(t.seed for t in pl.side(s))}" for s in ("train", "val", "test")]
    return f"teacher split by checkpoint ({len(pl.teachers)} teachers): " + "; ".join(parts)


def register_generator(client, cfg: Config, run_id: str, parent_run_id: str) -> str:
    """Register the meta-trained generator as ``weightformer.<dataset>.<student>``; the
    same run registered again keeps its version. Returns the version."""
    student, _ = student_of(cfg)
    mv = tracking.register_model(
        client,
        f"weightformer.{cfg.data.name}.{student}",
        run_id,
        tags={"meta_train_run": parent_run_id, "ensemble_size": cfg.meta.ensemble_size},
        description=f"WeightFormer generators for {cfg.data.name} / {student} students.",
    )
    return mv.version
