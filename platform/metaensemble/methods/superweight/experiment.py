"""The SuperWeight experiment: the pipeline behind ``jobs/superweight.py``.

1. validate  the SuperWeight config and every comparison's config, before any work
2. train     the SuperWeight ensemble (``method: superweight``) and, side by side, an
             independent ensemble of the same WRNs (each member its own run, its own
             seed); then an independent ensemble whose widths are scaled by one factor
             so that its parameters match the SuperWeight ensemble's unique trainable
             parameters (known after its split); all child runs of one parent run, on
             the same data, recipe and epochs
3. evaluate  on test, one procedure for each: the ensemble (mean of member softmaxes) and
             every member in ACC, NLL, ECE; unique trainable parameters (every tensor
             once); every subset of members with its accuracy and FLOPs (torch's FLOP
             counter on one image), the anytime curve as a PNG; the SuperWeight
             ensemble registered as ``ensemble.<dataset>.superweight``
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from metaensemble import data, engine, metrics, tracking
from metaensemble.config import Config
from metaensemble.errors import ConfigError
from metaensemble.evaluation import measure, paired_interval, train_seconds, verdict
from metaensemble.methods.base import predict_logp

LABELS = {"superweight": "SuperWeight ensemble", "independent": "Independent, same WRNs",
          "scaled": "Independent, same #params"}


def validate(cfg: Config) -> None:
    """Everything checkable before any work (the method's budget and member checks, the
    comparisons' configs)."""
    if cfg.method != "superweight":
        raise ConfigError(f"jobs/superweight.py trains method superweight; got method={cfg.method!r}")
    engine.validate(cfg)
    for c in member_configs(cfg, "independent", 1.0).values():
        engine.validate(c)


def member_configs(cfg: Config, kind: str, scale: float) -> dict[str, Config]:
    """One supervised WRN run per member, widths times ``scale``, seed ``seed + m``, for
    the epochs and schedule the SuperWeight members train after their search phase."""
    out = {}
    for m, (d, w) in enumerate(cfg.superweight.members):
        width = round(w * scale, 4)
        out[f"{kind}/{m}"] = cfg.with_overrides({
            "method": "supervised", "model.name": "wrn", "seed": cfg.seed + m,
            "train.epochs": cfg.train.epochs - cfg.superweight.split_epochs,
            "model.kwargs": {"depth": d, "widen_factor": width, "bn_momentum": cfg.superweight.bn_momentum}})
    return out


def scale_to(members: list[tuple[int, float]], target: int, num_classes: int, in_chans: int) -> float:
    """The width factor c whose ensemble {WRN-d-(w c)} has the parameter count closest to
    ``target`` (bisection on c, then the better neighbour at 4 decimals)."""
    from metaensemble.methods.superweight.model import wrn_parameters

    total = lambda c: sum(wrn_parameters(d, round(w * c, 4), num_classes, in_chans) for d, w in members)  # noqa: E731
    lo, hi = max(1.0 / (16 * w) for _, w in members), 1.0  # the narrowest member's first stage: 1 channel
    if total(lo) > target:
        raise ConfigError(f"cannot scale {members} to {target:,} parameters: even at widths x {lo} they have "
                          f"{total(lo):,}; drop 'scaled' from superweight.comparisons or raise superweight.max_params")
    hi = max(hi, lo)
    while total(hi) < target:
        hi *= 2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda c: abs(total(c) - target))


# ---- evaluation -----------------------------------------------------------------------------
def flops(net: nn.Module, info) -> int:
    """Forward FLOPs of one image (torch's counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, info.in_chans, info.img_size, info.img_size)
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return int(counter.get_total_flops())


@dataclass
class Ensemble:
    key: str
    label: str
    members: list[str]
    """Each member as ``WRN-d-w``."""
    member_logp: list[torch.Tensor]
    """Test log-probabilities per member [N, C]."""
    labels: torch.Tensor
    params: int
    member_flops: list[int]
    train_s: float


def score(logp: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test ACC, NLL, ECE: ``evaluation.measure`` without its time column."""
    return {k: v for k, v in measure(logp, y).items() if k != "time_s"}


def subsets(e: Ensemble) -> list[dict[str, Any]]:
    """Every non-empty subset of members: its ensemble's test accuracy and FLOPs."""
    out = []
    n = len(e.member_logp)
    for r in range(1, n + 1):
        for idx in itertools.combinations(range(n), r):
            logp = metrics.ensemble_logp(torch.stack([e.member_logp[i] for i in idx]))
            out.append({"members": list(idx), "acc": score(logp, e.labels)["acc"],
                        "flops": sum(e.member_flops[i] for i in idx)})
    return out


def _ensemble(key: str, nets: list[nn.Module], names: list[str], params: int, train_s: float, test,
              info) -> Ensemble:
    """One procedure for every ensemble: each member network's test predictions and FLOPs."""
    logps, y = [], None
    for net in nets:
        lp, y = predict_logp(net, test)
        logps.append(lp)
    return Ensemble(key, LABELS[key], names, logps, y, params, [flops(n, info) for n in nets], train_s)


def superweight_ensemble(run_id: str, client, test, info) -> Ensemble:
    """The SuperWeight run's members, each as a plain WRN with its weights assembled."""
    from metaensemble.methods.superweight.model import member_network
    from metaensemble.models import load

    model = load(f"runs:/{run_id}/model").eval()
    return _ensemble("superweight", [member_network(model, m) for m in range(len(model.members))],
                     [f"WRN-{d}-{w:g}" for d, w in model.member_specs], model.parameter_counts()["total"],
                     train_seconds(client, run_id), test, info)


def independent_ensemble(kind: str, run_ids: list[str], client, test, info) -> Ensemble:
    from metaensemble.models import load

    nets = [load(f"runs:/{r}/model") for r in run_ids]
    names = [f"WRN-{n.me_spec['kwargs']['depth']}-{n.me_spec['kwargs']['widen_factor']:g}" for n in nets]
    return _ensemble(kind, nets, names, sum(sum(p.numel() for p in n.parameters()) for n in nets),
                     sum(train_seconds(client, r) for r in run_ids), test, info)


@dataclass
class Outcome:
    parent_run_id: str
    rows: list[dict[str, Any]]
    members: dict[str, list[dict[str, Any]]]
    subsets: dict[str, list[dict[str, Any]]]
    run_ids: dict[str, str]
    scale: float | None
    split: dict[str, Any]
    claims: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)
    version: str | None = None
    test: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    """Per ensemble: its test log-probabilities [N, C] and the labels (not serialised)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "test"}


def row(e: Ensemble) -> dict[str, Any]:
    ens = score(metrics.ensemble_logp(torch.stack(e.member_logp)), e.labels)
    per = [score(lp, e.labels) for lp in e.member_logp]
    return {"key": e.key, "label": e.label, **ens, "member_acc": sum(p["acc"] for p in per) / len(per),
            "params": e.params, "gflops": sum(e.member_flops) / 1e9, "train_s": e.train_s,
            "members": ", ".join(e.members)}


def claims(runs: list[list[dict[str, Any]]]) -> dict[str, str]:
    """The paper's claim over one or more runs (seeds), each a list of rows, with its
    ``evaluation.verdict`` paired over the runs: the SuperWeight ensemble above the
    independent ensemble (ACC and NLL) with fewer parameters (exact: no seed noise); and
    against the one of the same parameter count. One run cannot establish a difference."""
    by = [{r["key"]: r for r in rows} for rows in runs]

    def minus(key: str, col: str, exact: bool = False):
        return paired_interval([b["superweight"][col] for b in by], [b[key][col] for b in by], exact=exact)

    out = {}
    for k in ("independent", "scaled"):
        if all(k in b for b in by):
            out[f"SuperWeight ACC above {LABELS[k]}"] = verdict(minus(k, "acc"), "higher")
            out[f"SuperWeight NLL below {LABELS[k]}"] = verdict(minus(k, "nll"), "lower")
    if all("independent" in b for b in by):
        out["SuperWeight has fewer parameters than the independent ensemble"] = verdict(
            minus("independent", "params", exact=True), "lower")
    return out


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (f"{'ensemble':<28} {'ACC':>7} {'NLL':>7} {'ECE':>7} {'mean member':>11} {'params':>9} {'MFLOPs':>8} "
            f"{'train s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<28} {100 * r['acc']:>7.2f} {r['nll']:>7.4f} {r['ece']:>7.4f} "
                     f"{100 * r['member_acc']:>11.2f} {r['params']:>9,d} {1e3 * r['gflops']:>8.2f} "
                     f"{r['train_s']:>8.1f}")
    return "\n".join(lines)


def anytime_plot(subs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Accuracy of every subset of members against its FLOPs, with each ensemble's
    Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (key, pts), colour in zip(subs.items(), ("C0", "C1", "C2"), strict=False):
        xs = [p["flops"] / 1e6 for p in pts]
        ys = [100 * p["acc"] for p in pts]
        ax.scatter(xs, ys, s=14, color=colour, alpha=0.5)
        front, best = [], -1.0
        for x, y in sorted(zip(xs, ys, strict=True)):
            if y > best:
                front.append((x, y))
                best = y
        ax.plot(*zip(*front, strict=True), color=colour, label=LABELS[key])
    ax.set_xlabel("MFLOPs per image (subset of members)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: Config) -> Outcome:
    """The whole job under one parent MLflow run; a rerun of the same config reuses the
    finished runs."""
    from metaensemble.sweep import train_configs

    validate(cfg)
    t0 = time.perf_counter()
    client = tracking.client(tracking.ensure_tracking())
    key = f"superweight-{cfg.run_key()}"
    _, _, test = data.eval_splits(cfg.data)
    storage = f"{cfg.resolved_storage_path()}/superweight"
    with tracking.job_run(client, cfg, key, "superweight") as parent:
        runs = {"superweight": cfg}
        if "independent" in cfg.superweight.comparisons:
            runs.update(member_configs(cfg, "independent", 1.0))
        # members of seconds each: one pack (one Ray Train run) per comparison
        groups = [["superweight"]] + ([[k for k in runs if k != "superweight"]] if len(runs) > 1 else [])
        print(f"training the SuperWeight ensemble ({', '.join(f'WRN-{d}-{w:g}' for d, w in cfg.superweight.members)}, "
              f"bank budget {cfg.superweight.max_params:,}) and {len(runs) - 1} independent members", flush=True)
        run_ids = train_configs(runs, groups, experiment=cfg.experiment_name, parent_run_id=parent,
                                storage=storage, name=key[:150])
        shape = _info(run_ids["superweight"])
        sw = superweight_ensemble(run_ids["superweight"], client, test, shape)
        scale = None
        if "scaled" in cfg.superweight.comparisons:
            scale = scale_to(cfg.superweight.members, sw.params, shape.num_classes, shape.in_chans)
            scaled = member_configs(cfg, "scaled", scale)
            print(f"training the independent ensemble scaled to {sw.params:,} parameters (widths x {scale:.3f})",
                  flush=True)
            run_ids.update(train_configs(scaled, [list(scaled)], experiment=cfg.experiment_name,
                                         parent_run_id=parent, storage=storage, name=f"{key[:140]}-scaled"))
        t_train = time.perf_counter()
        ensembles = [sw] + [independent_ensemble(k, [run_ids[f"{k}/{m}"] for m in range(len(cfg.superweight.members))],
                                                  client, test, shape)
                            for k in ("independent", "scaled") if k in cfg.superweight.comparisons]
        rows = [row(e) for e in ensembles]
        subs = {e.key: subsets(e) for e in ensembles}
        members = {e.key: [{"member": n, **score(lp, e.labels), "mflops": f / 1e6}
                           for n, lp, f in zip(e.members, e.member_logp, e.member_flops, strict=True)]
                   for e in ensembles}
        split = _split_state(run_ids["superweight"])
        out = Outcome(parent, rows, members, subs, run_ids, scale, split, claims([rows]),
                      test={e.key: (metrics.ensemble_logp(torch.stack(e.member_logp)), e.labels) for e in ensembles})
        out.version = tracking.register_model(
            client, f"ensemble.{cfg.data.name}.superweight", run_ids["superweight"],
            tags={"members": ", ".join(sw.members), "unique_params": sw.params, "job_run": parent},
            description="A SuperWeight ensemble (jobs/superweight.py): members composed from shared template banks.",
        ).version
        out.seconds = {"train_s": t_train - t0, "total_s": time.perf_counter() - t0}
        log_outcome(client, parent, out, f"{cfg.data.name}: SuperWeight ensemble vs independent ensembles")
    return out


def _meta(run_id: str) -> dict[str, Any]:
    from metaensemble.models import local_dir, read_meta

    return read_meta(local_dir(f"runs:/{run_id}/model"))


def _info(run_id: str):
    from metaensemble.data import DatasetInfo

    return DatasetInfo(**_meta(run_id)["dataset_info"])


def _split_state(run_id: str) -> dict[str, Any]:
    """What the split found, from the run's model: groups, slots, templates per bank."""
    kw = _meta(run_id)["kwargs"]
    sharing = kw["sharing"]
    learned = sharing.get("learned") or {}
    return {"groups": len({g for r in sharing["groups"] for g in r}),
            "slots": len({s for r in sharing["slots"] for s in r}), "templates": kw["templates"],
            "threshold": learned.get("threshold"), "tried": learned.get("tried", []),
            "clones": learned.get("clones", 0)}


def format_outcome(out: Outcome) -> str:
    lines = [format_rows(out.rows), ""]
    for key, ms in out.members.items():
        lines.append(f"  {LABELS[key]}: " + "; ".join(f"{m['member']} {100 * m['acc']:.2f}" for m in ms))
    s = out.split
    if not s.get("tried"):
        how = "no search: the depth bins"
    elif s.get("threshold") is None:
        how = "no threshold fitted the budget: the depth bins"
    else:
        how = f"split at gradient cosine > {s['threshold']:g}"
    lines.append(f"\nlearned sharing: {s['groups']} groups ({how}), {s['slots']} coefficient slots after "
                 f"{s.get('clones', 0)} unsharing clones, {s['templates']} templates per bank"
                 + (f"; scaled widths x {out.scale:.3f}" if out.scale else ""))
    lines += [f"  {k}: {v}" for k, v in out.claims.items()]
    return "\n".join(lines)


def log_outcome(client, run_id: str, out: Outcome, title: str) -> None:
    """``superweight_table.md`` / ``.json``, ``anytime.png`` and per-row metrics."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "superweight_table.md").write_text(f"{title}\n\n```\n{format_outcome(out)}\n```\n")
        (p / "superweight_table.json").write_text(json.dumps(out.to_dict(), indent=2, default=str))
        anytime_plot(out.subsets, p / "anytime.png", title)
        client.log_artifacts(run_id, d)
    values = {}
    for r in out.rows:
        for k in ("acc", "nll", "ece", "member_acc", "params", "gflops", "train_s"):
            values[f"{r['key']}_{k}"] = r[k]
    tracking.log_metrics(client, run_id, {**values, **out.seconds})
