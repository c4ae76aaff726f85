"""The leaderboard: the pipeline behind ``jobs/compare.py``.

1. plan      validate (methods known, each able to take the zoo's architecture, K within
             the held-out teachers); ensure the zoo and split it exactly as the
             WeightFormer job does (``weightformer.plan``): the held-out ensembles are
             the first ``compare.ensembles`` of that job's meta-test ensembles
2. train     the engine runs, side by side as the cluster allows: the generator (the
             WeightFormer job's own run, reused when that job ran this config) and one
             KD / LatentBE / TDiv-SDiv student per ensemble (KD: the job's ``kd_full``
             runs). Finished runs are reused.
3. evaluate  per ensemble, every row through its own method's code: soups
             (``methods.soups``), OT fusion of the K teachers against one anchor, 1/K
             each (``fusion.pipeline.fuse_parents``), generated students
             (``weightformer.student``), the distilled students, and KD-finetuning of
             the fused and generated students (``weightformer.experiment.finetune``).
             Every network's BN statistics recomputed on the same images; test ACC,
             NLL, ECE and cNLL, cECE after a temperature fitted on val
4. log       the leaderboard (markdown, JSON, MLflow table), a Pareto plot, reliability
             diagrams, one child run per row with the same metric names
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaensemble import data, metrics, tracking
from metaensemble.config import Config
from metaensemble.errors import ConfigError
from metaensemble.evaluation import (
    calibrated_columns,
    log_table,
    mean_row,
    paired_interval,
    reliability_diagram,
    save_figure,
    train_seconds,
)
from metaensemble.methods import soups
from metaensemble.methods.base import predict_logp
from metaensemble.methods.compare.config import ROWS
from metaensemble.methods.weightformer import plan as wf_plan
from metaensemble.methods.weightformer.align import align_states
from metaensemble.methods.weightformer.experiment import finetune, kd_overrides, register_generator
from metaensemble.methods.weightformer.student import generate_student
from metaensemble.methods.weightformer.tokens import build_layout, tokenise
from metaensemble.methods.weightformer.use import BN_LABEL, eval_data
from metaensemble.models import create_model, load
from metaensemble.models.batchnorm import recompute_bn

LABELS = {
    "ensemble": "ensemble of K (reference)",
    "best_member": "best member (by val)",
    "uniform_soup": "uniform soup",
    "greedy_soup": "greedy soup",
    "learned_soup": "learned soup",
    "fusion": "OT fusion, one-shot",
    "fusion_ft": "OT fusion + finetune",
    "kd": "KD",
    "latentbe": "LatentBE",
    "tdiv_sdiv": "TDiv-SDiv",
    "weightformer": "WeightFormer zero-shot",
    "weightformer_ft": "WeightFormer + finetune",
}
ORDER = list(LABELS)
COLUMNS = ("acc", "nll", "ece", "cnll", "cece")
DISTILLERS = ("kd", "latentbe", "tdiv_sdiv")
SOUPS = ("best_member", "uniform_soup", "greedy_soup", "learned_soup")
"""Rows made by ``methods.soups``, which refuse ingredients of different parents."""
WEIGHT_SPACE = ("uniform_soup", "greedy_soup", "learned_soup", "weightformer", "weightformer_ft")
"""Rows that combine the teachers' weights as they are (no alignment of their own): on a
zoo from independent initialisations they take permuted teachers when ``meta.align`` is
``permutation``."""


# ---- 1. plan ---------------------------------------------------------------------------
def methods_of(cfg: Config) -> list[str]:
    methods = list(cfg.compare.methods or ROWS)
    unknown = [m for m in methods if m not in ROWS]
    if unknown:
        raise ConfigError(f"compare.methods: unknown method(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(ROWS)}")
    return methods


def validate(cfg: Config) -> list[str]:
    """Everything checkable before any work; returns the methods in board order."""
    methods = methods_of(cfg)
    m = cfg.meta
    if m.ensemble_size > m.num_test_teachers:
        raise ConfigError(f"meta.ensemble_size={m.ensemble_size} is more than the {m.num_test_teachers} held-out "
                          f"(meta-test) teachers: raise meta.num_test_teachers or lower K")
    n = math.comb(m.num_test_teachers, m.ensemble_size)
    if n < cfg.compare.ensembles:  # beyond that the draw repeats teacher sets with other anchors
        raise ConfigError(f"compare.ensembles={cfg.compare.ensembles}: {m.num_test_teachers} held-out teachers form "
                          f"only {n} distinct ensembles of K={m.ensemble_size}")
    student, skw = wf_plan.student_of(cfg)
    if "fusion" in methods:
        from metaensemble.methods.fusion.structure import family

        try:
            family(student)
        except ConfigError as e:
            raise ConfigError(f"method fusion cannot take the zoo's architecture {student!r}: {e}; "
                              f"leave it out (methods=[...])") from None
    if any(d in methods for d in ("latentbe", "tdiv_sdiv")):
        from metaensemble.methods.latentbe.batchensemble import check_convertible

        info = data.load(cfg.data).info
        try:
            check_convertible(create_model(student, num_classes=info.num_classes, in_chans=info.in_chans,
                                           img_size=info.img_size, **skw))
        except ConfigError as e:
            raise ConfigError(f"methods latentbe and tdiv_sdiv cannot take the zoo's architecture {student!r}: {e}; "
                              f"leave them out (methods=[...])") from None
    if "fusion" in methods or "weightformer" in methods:
        if not m.finetune_epochs:
            raise ConfigError("meta.finetune_epochs=0: the finetuned rows need at least one epoch")
    wf_plan.validate(cfg, soup_ensembles=soup_ensembles(cfg, methods))  # the zoo recipe, the split sizes, ...
    return [k for k in ROWS if k in methods]


def soup_ensembles(cfg: Config, methods: list[str]) -> int:
    """How many held-out ensembles get soups (their teachers must share a parent)."""
    return cfg.compare.ensembles if any(k in SOUPS for k in methods) else 0


def ensembles_of(cfg: Config) -> list[list[int]]:
    """The held-out ensembles (indices into ``meta.test_teachers``): the WeightFormer job's
    own draw, its first ``compare.ensembles``."""
    return wf_plan.held_out_ensembles(cfg, cfg.compare.ensembles, len(cfg.meta.test_teachers))


def distill_configs(p: wf_plan.Plan, methods: list[str], ensembles: list[list[int]]) -> dict[str, Config]:
    """``<method>/<i>``: a student of the zoo's architecture distilled from ensemble i by
    KD, LatentBE or TDiv-SDiv with one recipe (the zoo's, ``compare.distill_epochs``
    epochs): KD is the WeightFormer job's ``kd_full`` run of the same ensemble."""
    cfg = p.cfg
    epochs = cfg.compare.distill_epochs or cfg.meta.kd_epochs
    student, skw = wf_plan.student_of(cfg)
    out = {}
    for method in (d for d in DISTILLERS if d in methods):
        for i, ens in enumerate(ensembles):
            teachers = [cfg.meta.test_teachers[j] for j in ens]
            c = p.teacher_cfg.with_overrides(kd_overrides(cfg, student, skw, teachers, epochs))
            if method != "kd":
                c = c.with_overrides({"method": method, "latentbe.members": len(teachers)})
            out[f"{method}/{i}"] = c
    return out


# ---- 3. evaluate -----------------------------------------------------------------------
@dataclass
class Board:
    """The leaderboard: per row, one measurement per ensemble."""

    per: dict[str, list[dict[str, float]]]
    best: list[tuple[str, torch.nn.Module]]
    """Per ensemble: the row whose network has the highest val accuracy (test unseen), and
    that network."""
    params: dict[str, int]
    flops: dict[str, int]
    one_off_s: dict[str, float]
    aligned: dict[str, bool]
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return [k for k in ORDER if k in self.per]

    def summary(self) -> list[dict[str, Any]]:
        """Per row: each column's mean and 95% t-interval over the ensembles, the paired
        accuracy difference against KD, cost."""
        n_served = max(len(v) for v in self.per.values())
        out = []
        for k in self.keys():
            rows = self.per[k]
            r: dict[str, Any] = {"key": k, "label": LABELS[k], "n": len(rows), "params": self.params[k],
                                 "flops": self.flops[k], "aligned": self.aligned.get(k, False)}
            for c in (*COLUMNS, "val_acc", "time_s"):
                v = [x[c] for x in rows]
                d = paired_interval(v, 0.0)
                r[c] = {"mean": d.mean, "lo": d.lo, "hi": d.hi, "per_ensemble": v}
            r["best_in"] = sum(b == k for b, _ in self.best)
            one_off = self.one_off_s.get(k, 0.0)
            r["one_off_s"] = one_off
            r["amortised_s"] = r["time_s"]["mean"] + one_off / n_served
            if "kd" in self.per and k != "kd":
                d = paired_interval([x["acc"] for x in rows], [x["acc"] for x in self.per["kd"]])
                r["acc_minus_kd"] = {"mean": d.mean, "lo": d.lo, "hi": d.hi}
            out.append(r)
        return out


def flops_of(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Inference FLOPs of one image (torch's counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x[:1])
    model.train(was)
    return int(fc.get_total_flops())


class _Scorer:
    """Measures networks on the same val / test images, BN statistics recomputed on the
    same images for every network (``bn=True``)."""

    def __init__(self, ev) -> None:
        self.ev = ev
        self.x = next(iter(ev.test))["x"]

    def logps(self, model: torch.nn.Module) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        return predict_logp(model, self.ev.val), predict_logp(model, self.ev.test)

    def measure(self, model: torch.nn.Module, seconds: float) -> tuple[dict[str, float], Any]:
        val, test = self.logps(model)
        val_acc = float((val[0].argmax(1) == val[1]).float().mean())
        return {**calibrated_columns(val, test), "val_acc": val_acc, "time_s": float(seconds)}, test

    def bn(self, model: torch.nn.Module) -> tuple[torch.nn.Module, float]:
        t0 = time.perf_counter()
        recompute_bn(model, self.ev.bn)
        return model, time.perf_counter() - t0


def evaluate(p: wf_plan.Plan, methods: list[str], ensembles: list[list[int]], run_ids: dict[str, str],
             parent_run_id: str) -> Board:
    cfg, m = p.cfg, p.cfg.meta
    torch.manual_seed(cfg.seed)
    ev = eval_data(cfg)
    sc = _Scorer(ev)
    client = tracking.client()
    uris = list(m.test_teachers)
    teachers = [load(u).eval() for u in uris]  # as stored: every method starts from these
    raw = [{k: v.detach().clone() for k, v in t.state_dict().items()} for t in teachers]
    t_logp = [sc.logps(sc.bn(copy.deepcopy(t))[0]) for t in teachers]
    per: dict[str, list[dict[str, float]]] = {}
    curves: dict[str, list[Any]] = {}
    nets: dict[str, torch.nn.Module] = {}
    best: list[tuple[float, str, torch.nn.Module]] = [(-1.0, "", torch.nn.Identity())] * len(ensembles)

    def add(key: str, row: dict[str, float], test, net: torch.nn.Module | None, i: int) -> None:
        per.setdefault(key, []).append(row)
        curves.setdefault(key, []).append(test)
        if net is not None:
            nets.setdefault(key, net)
            if row["val_acc"] > best[i][0]:  # ties: the row measured first
                best[i] = (row["val_acc"], key, net)

    gen = load(f"runs:/{run_ids['weightformer']}/model") if "weightformer" in methods else None
    # meta.align=permutation: the weight-space rows take the ensemble's teachers permuted
    # onto the WeightFormer job's reference (its first meta-train teacher) first, whether
    # or not WeightFormer is on the board; each such row is charged the alignment time
    layout = reference = None
    if m.align != "none":
        info = data.load(cfg.data).info
        layout = build_layout(teachers[0], torch.zeros(2, info.in_chans, info.img_size, info.img_size))
        reference = load(m.train_teachers[0]).state_dict()
    parent_of = {r.uri: r.parent or None for r in p.teachers}
    full = data.load(cfg.data.model_copy(update={"train_fraction": 1.0}))
    fused, generated = [], []
    for i, ens in enumerate(ensembles):
        members = [teachers[j] for j in ens]
        # the reference: the ensemble's averaged probabilities (K networks at inference)
        val = (metrics.ensemble_logp(torch.stack([t_logp[j][0][0] for j in ens])), t_logp[ens[0]][0][1])
        test = (metrics.ensemble_logp(torch.stack([t_logp[j][1][0] for j in ens])), t_logp[ens[0]][1][1])
        val_acc = float((val[0].argmax(1) == val[1]).float().mean())
        add("ensemble", {**calibrated_columns(val, test), "val_acc": val_acc, "time_s": 0.0}, test, None, i)
        t0 = time.perf_counter()
        states = [raw[j] for j in ens] if layout is None else align_states([raw[j] for j in ens], reference, layout,
                                                                             m.align)
        align_s = time.perf_counter() - t0
        parents = [parent_of.get(uris[j]) for j in ens]
        for key in SOUPS:  # each row made by the soups function of its name
            if key in methods:
                make = getattr(soups, key)
                skeleton = load(uris[ens[0]])
                soup = make(states if key != "best_member" else [raw[j] for j in ens], skeleton, ev.bn, ev.val,
                            parents=parents)
                row, t = sc.measure(soup.model, soup.seconds + (align_s if key != "best_member" else 0.0))
                add(key, row, t, soup.model, i)
        if "fusion" in methods:
            from metaensemble.methods.fusion.pipeline import fuse_parents

            k = len(members)
            f = fuse_parents(members, cfg.fusion, full.train, full.info, weights=[1.0 / k] * k)
            model, bn_s = sc.bn(f.model)
            row, t = sc.measure(model, f.seconds + bn_s)
            add("fusion", row, t, model, i)
            fused.append((model, f.seconds + bn_s))
        if gen is not None:  # from the teachers in memory: (align,) tokenise, generate, BN pass
            t0 = time.perf_counter()
            rows_k = [tokenise(st, gen.layout) for st in states]
            student, _ = generate_student(gen, rows_k, states, list(range(len(ens))), ev.bn)
            made_s = align_s + time.perf_counter() - t0
            row, t = sc.measure(student, made_s)
            add("weightformer", row, t, student, i)
            generated.append((student, made_s))
        for d in DISTILLERS:
            rid = run_ids.get(f"{d}/{i}")
            if rid is not None:  # its cost: the training epochs and the BN pass
                model, bn_s = sc.bn(load(f"runs:/{rid}/model"))
                row, t = sc.measure(model, train_seconds(client, rid) + bn_s)
                add(d, row, t, model, i)
    # the fused and the generated students finetuned together: one Ray Train run (a pack)
    made = [(key, i, s, before) for key, ms in (("fusion", fused), ("weightformer", generated))
            for i, (s, before) in enumerate(ms)]
    if made:
        tuned = finetune(p, [s for _, _, s, _ in made], [ensembles[i] for _, i, _, _ in made], parent_run_id,
                         ev.bn, of=[key for key, _, _, _ in made])
        for (key, i, _, before), (model, seconds) in zip(made, tuned, strict=True):
            row, t = sc.measure(model, before + seconds)
            add(f"{key}_ft", row, t, model, i)
    params = {k: sum(q.numel() for q in n.parameters()) for k, n in nets.items()}
    flops = {k: flops_of(n, sc.x) for k, n in nets.items()}
    params["ensemble"] = sum(sum(q.numel() for q in teachers[j].parameters()) for j in ensembles[0])
    flops["ensemble"] = sum(flops_of(teachers[j], sc.x) for j in ensembles[0])
    one_off = {}
    if "weightformer" in run_ids:
        one_off = {"weightformer": train_seconds(client, run_ids["weightformer"])}
        one_off["weightformer_ft"] = one_off["weightformer"]
    aligned = {k: True for k in ("fusion", "fusion_ft")}
    if m.align != "none":
        aligned.update({k: True for k in WEIGHT_SPACE})
    pooled = {k: (torch.cat([c[0] for c in v]), torch.cat([c[1] for c in v])) for k, v in curves.items()}
    return Board(per, [(k, net) for _, k, net in best], params, flops, one_off, aligned, pooled)


# ---- 4. report -------------------------------------------------------------------------
def _ci(c: dict[str, float], scale: float = 1.0, fmt: str = ".2f") -> str:
    half = (c["hi"] - c["lo"]) / 2 * scale
    return f"{c['mean'] * scale:{fmt}} ± {half:{fmt}}" if math.isfinite(half) else f"{c['mean'] * scale:{fmt}}"


def format_board(cfg: Config, summary: list[dict[str, Any]]) -> str:
    """The leaderboard as a markdown table: mean ± half-width of the 95% t-interval over
    the held-out ensembles."""
    n = summary[0]["n"] if summary else 0
    lines = [f"{cfg.data.name}: {n} held-out ensembles of K={cfg.meta.ensemble_size} meta-test teachers "
             f"(no generator saw them), test split; BatchNorm of every network: {BN_LABEL}; "
             f"cNLL / cECE after a temperature fitted on val; ± half the 95% t-interval over ensembles",
             "",
             "| method | ACC (%) | NLL | ECE | cNLL | cECE | ACC - KD (points) | params | MFLOPs | "
             "time to produce (s) | one-off (s) | amortised (s) | aligned | best (by val) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        d = r.get("acc_minus_kd")
        diff = (f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]" if d else "-")
        best = "-" if r["key"] == "ensemble" else f"{r['best_in']}/{n}"
        lines.append(
            f"| {r['label']} | {_ci(r['acc'], 100)} | {_ci(r['nll'], fmt='.3f')} | {_ci(r['ece'], fmt='.3f')} | "
            f"{_ci(r['cnll'], fmt='.3f')} | {_ci(r['cece'], fmt='.3f')} | {diff} | {r['params']:,} | "
            f"{r['flops'] / 1e6:.2f} | {r['time_s']['mean']:.3f} | {r['one_off_s']:.0f} | {r['amortised_s']:.2f} | "
            f"{'yes' if r['aligned'] else 'no'} | {best} |")
    lines += ["", "best (by val): in how many ensembles the row's network had the highest val accuracy of "
              "all single networks; that network is registered, one version per ensemble."]
    return "\n".join(lines)


def pareto_plot(summary: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Accuracy against time to produce one network (log axis), 95% interval bars, one
    labelled marker per row; the reference ensemble (no time to produce) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in summary:
        a = r["acc"]
        if r["key"] == "ensemble":
            ax.axhline(100 * a["mean"], color="grey", ls="--", lw=1)
            ax.text(0.01, 100 * a["mean"], "ensemble of K (K networks at inference)", va="bottom", fontsize=8,
                    color="grey", transform=ax.get_yaxis_transform())  # x in axes fraction: any x scale
            continue
        x = max(r["time_s"]["mean"], 1e-3)
        lo, hi = 100 * (a["mean"] - a["lo"]), 100 * (a["hi"] - a["mean"])
        ax.errorbar([x], [100 * a["mean"]], yerr=[[lo], [hi]], fmt="o", capsize=3)
        ax.annotate(r["label"], (x, 100 * a["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("time to produce one network (s, log scale; rows under 1 ms drawn at 1 ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    return save_figure(fig, title, path)


def register_best(client, parent: str, cfg: Config, board: Board, teacher_sets: list[list[str]]) -> list[str]:
    """Per ensemble, its best single network (highest val accuracy) logged under the parent
    run (``best/<i>``) and registered as a version of ``student.<dataset>.<arch>.compare_best``
    tagged with the row and the teachers; a rerun returns the same versions."""
    from metaensemble.models import save_model

    arch = wf_plan.student_of(cfg)[0]
    name = f"student.{cfg.data.name}.{arch}.compare_best"
    versions = []
    for i, ((key, net), teachers) in enumerate(zip(board.best, teacher_sets, strict=True)):
        row = board.per[key][i]
        with tempfile.TemporaryDirectory() as d:
            save_model(net, Path(d) / "model", dataset=cfg.data.name)
            client.log_artifacts(parent, str(Path(d) / "model"), f"best/{i}")
        tags = {"method": key, "teachers": ",".join(teachers), "ensemble_size": str(len(teachers)),
                "val_acc": str(round(row["val_acc"], 6)), "test_acc": str(round(row["acc"], 6))}
        mv = tracking.register_model(
            client, name, parent, f"best/{i}", tags=tags,
            description=f"The leaderboard's best single network per held-out {cfg.data.name} ensemble (by val "
                        "accuracy), whichever method made it (jobs/compare.py).")
        for k, v in tags.items():  # a rerun that re-logged best/<i> keeps the version's tags true
            if mv.tags.get(k) != v:
                client.set_model_version_tag(name, mv.version, k, v)
        versions.append(str(mv.version))
    return versions


def log_board(client, parent: str, cfg: Config, board: Board, summary: list[dict[str, Any]]) -> None:
    """Everything to MLflow: ``leaderboard.md`` / ``.json``, the MLflow table and bar chart
    (``log_table``), ``pareto.png``, ``reliability.png``, and one child run per row with
    the same metric names (MLflow's compare view lines them up)."""
    title = f"{cfg.data.name}: one network from K={cfg.meta.ensemble_size}"
    rows = [mean_row(r["key"], r["label"], board.per[r["key"]]) for r in summary]
    log_table(client, parent, rows, title, name="leaderboard")
    client.log_text(parent, format_board(cfg, summary), "leaderboard.md")
    client.log_dict(parent, {"rows": summary}, "leaderboard.json")
    with tempfile.TemporaryDirectory() as d:
        pareto_plot(summary, Path(d) / "pareto.png", title)
        reliability_diagram({LABELS[k]: v for k, v in board.curves.items()}, Path(d) / "reliability.png", title,
                            ece={r["label"]: r["ece"]["mean"] for r in summary})
        client.log_artifacts(parent, d)
    exp_id = client.get_run(parent).info.experiment_id
    known = {r.data.tags.get("metaensemble.compare_row"): r.info.run_id for r in client.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{parent}' and tags.metaensemble.compare_row != ''")}
    for r in summary:
        rid = known.get(r["key"]) or client.create_run(exp_id, tags={
            "mlflow.parentRunId": parent, "mlflow.runName": r["key"], "metaensemble.compare_row": r["key"],
            "metaensemble.label": r["label"], **tracking.runs.invocation_tags()}).info.run_id
        values = {c: r[c]["mean"] for c in COLUMNS} | {f"{c}_{e}": r[c][e] for c in COLUMNS for e in ("lo", "hi")} | {
            "time_s": r["time_s"]["mean"], "one_off_s": r["one_off_s"], "amortised_s": r["amortised_s"],
            "params": r["params"], "flops": r["flops"], "n_ensembles": r["n"], "best_in": r["best_in"]}
        if "kd" in board.per:  # KD's own row: 0 (every row logs the same names)
            values["acc_minus_kd"] = r["acc_minus_kd"]["mean"] if "acc_minus_kd" in r else 0.0
        tracking.log_metrics(client, rid, values)
        client.set_tag(rid, "metaensemble.aligned", str(r["aligned"]).lower())
        client.set_terminated(rid, "FINISHED")


# ---- the whole job ---------------------------------------------------------------------
@dataclass
class CompareOutcome:
    parent_run_id: str
    summary: list[dict[str, Any]]
    run_ids: dict[str, str]
    ensembles: list[list[str]]
    """Each held-out ensemble's teacher URIs: what every row of it saw."""
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"parent_run_id": self.parent_run_id, "rows": self.summary, "run_ids": self.run_ids,
                "ensembles": self.ensembles, "seconds": self.seconds}


def run(cfg: Config, *, train_missing: bool = True) -> CompareOutcome:
    """The whole job under one MLflow parent run, which a rerun of the same config
    reopens; finished runs (this job's or the WeightFormer job's) are reused."""
    from metaensemble.sweep import train_configs

    t0 = time.perf_counter()
    methods = validate(cfg)
    p = wf_plan.plan(cfg, train_missing=train_missing, soup_ensembles=soup_ensembles(cfg, methods))
    cfg = p.cfg
    ensembles = ensembles_of(cfg)
    t_plan = time.perf_counter()
    client = tracking.client(tracking.ensure_tracking())
    digest = hashlib.sha256(json.dumps(cfg.compare.model_dump(), sort_keys=True).encode()).hexdigest()[:8]
    key = f"compare-{cfg.run_key()}-{digest}"
    with tracking.job_run(client, cfg, key, "compare") as parent:
        tracking.set_tags(client, parent, {"methods": ",".join(methods), "ensembles": str(len(ensembles))})
        runs = distill_configs(p, methods, ensembles)
        groups = [[k for k in runs if k.startswith(f"{d}/")] for d in reversed(DISTILLERS)]
        if "weightformer" in methods:
            runs["weightformer"] = wf_plan.variant_configs(p)["weightformer"]
            groups.insert(0, ["weightformer"])
        groups = [g for g in groups if g]
        run_ids = {}
        if runs:
            print(f"training {len(runs)} runs (finished ones are reused): {', '.join(runs)}", flush=True)
            run_ids = train_configs(runs, groups, experiment=cfg.experiment_name, parent_run_id=parent,
                                    storage=f"{cfg.resolved_storage_path()}/compare", name=key[:150])
        if "weightformer" in run_ids:  # the generator, registered as the main job registers it
            version = register_generator(client, cfg, run_ids["weightformer"], parent)
            print(f"generator: weightformer.{cfg.data.name}.{wf_plan.student_of(cfg)[0]} version {version}", flush=True)
        t_train = time.perf_counter()
        board = evaluate(p, methods, ensembles, run_ids, parent)
        summary = board.summary()
        teacher_sets = [[cfg.meta.test_teachers[j] for j in ens] for ens in ensembles]
        versions = register_best(client, parent, cfg, board, teacher_sets)
        log_board(client, parent, cfg, board, summary)
        print(f"best network per ensemble (by val): {', '.join(k for k, _ in board.best)}; registered as "
              f"student.{cfg.data.name}.{wf_plan.student_of(cfg)[0]}.compare_best versions {', '.join(versions)}",
              flush=True)
        seconds = {"plan_s": t_plan - t0, "train_s": t_train - t_plan, "eval_s": time.perf_counter() - t_train,
                   "total_s": time.perf_counter() - t0}
        tracking.log_metrics(client, parent, seconds)
    return CompareOutcome(parent, summary, run_ids, teacher_sets, seconds)
