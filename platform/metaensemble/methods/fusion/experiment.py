"""The fusion experiments behind ``jobs/fuse.py``, each under one parent MLflow run.

``fusion.experiment``:

- ``fusion`` (the paper's table): every parent, their ensemble, the naive weight average
  (where shapes allow, after depth balancing), the one-shot fused network (OT fusion for
  parents of one depth, CLA + OT fusion otherwise), it finetuned through the engine
  (selected on val), and KD from the parents into a network of the fused shape for the
  same epochs. The fused networks are registered as ``fused.<dataset>.<arch>``; the
  layer alignment goes to MLflow as ``alignment_<i>.png``.
- ``skill_transfer``: two parents of one recipe trained on the two parts of a split by
  label (``data.label_split``: part a holds every example of one label and a fraction of
  the others, part b the rest), fused one-shot; accuracy on the special label, on the
  other labels and on all.
- ``transfer``: a network of the deepest parent's depth at the shallowest parent's widths
  (the deep architecture itself when the widths agree) initialised from the shallowest
  parent through cross-layer alignment and depth balancing, finetuned, against the same
  architecture trained from scratch for the same epochs.

Parents are ``fusion.models`` (folders, ``models:/``, ``runs:/``) or one network from the
zoo of each recipe in ``fusion.parent_configs`` (trained first if missing; ``parents``,
which the engine method's sweeps share). Rows are
scored by one procedure (``evaluation.calibrated_columns``: ACC, NLL, ECE on test, cNLL
and cECE after a temperature fitted on val). One-shot networks get BatchNorm statistics
recomputed on the training split; trained rows keep the statistics their training
accumulated, as any trained network.
"""

from __future__ import annotations

import json
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
    COLUMNS,
    SeedRow,
    calibrated_columns,
    format_seed_table,
    seed_row,
    train_seconds,
)
from metaensemble.methods.base import predict_logp
from metaensemble.methods.fusion.parents import (  # noqa: F401 (jobs/, benchmarks/ and tests read them here)
    SPLIT_KEYS,
    Parent,
    parent_recipes,
    resolve_parents,
    validate,
)


# ---- scoring -----------------------------------------------------------------------------
@dataclass
class Scored:
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    values: dict[str, float]


def score_model(model, val, test) -> Scored:
    v, t = predict_logp(model, val), predict_logp(model, test)
    return Scored(v, t, calibrated_columns(v, t))


def score_ensemble(members: list[Scored]) -> Scored:
    v = (metrics.ensemble_logp(torch.stack([m.val[0] for m in members])), members[0].val[1])
    t = (metrics.ensemble_logp(torch.stack([m.test[0] for m in members])), members[0].test[1])
    return Scored(v, t, calibrated_columns(v, t))


def label_accuracies(s: Scored, special: int) -> dict[str, float]:
    """Test accuracy on the special label, on the other labels, and on all."""
    logp, y = s.test
    right = logp.argmax(1) == y
    sp = y == special
    return {"acc_special": float(right[sp].float().mean()), "acc_others": float(right[~sp].float().mean()),
            "acc_all": float(right.float().mean())}


# ---- outcome -------------------------------------------------------------------------------
@dataclass
class FuseOutcome:
    parent_run_id: str
    experiment: str
    rows: list[SeedRow]
    parents: list[Parent]
    run_ids: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """Per experiment: the alignment maps, inserted layers, label accuracies, seconds."""

    def to_dict(self) -> dict[str, Any]:
        return {"parent_run_id": self.parent_run_id, "experiment": self.experiment,
                "rows": [r.to_dict() for r in self.rows], "parents": [p.__dict__ for p in self.parents],
                "run_ids": self.run_ids, "versions": self.versions, "extra": self.extra}


def format_outcome(out: FuseOutcome) -> str:
    text = format_seed_table(out.rows)
    accs = out.extra.get("label_accuracies")
    if accs:
        special = out.extra["special"]
        head = f"{'network':<30} {f'label {special}':>10} {'others':>10} {'all':>10}"
        lines = [head, "-" * len(head)]
        for label, a in accs.items():
            lines.append(f"{label:<30} {100 * a['acc_special']:>10.2f} {100 * a['acc_others']:>10.2f} "
                         f"{100 * a['acc_all']:>10.2f}")
        text += "\n\nskill transfer: test accuracy (%) by label\n" + "\n".join(lines)
    return text


def _log(client, run_id: str, out: FuseOutcome, title: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "fusion_table.md").write_text(f"{title}\n\n{format_outcome(out)}\n")
        Path(d, "fusion_table.json").write_text(json.dumps(out.to_dict(), indent=2, default=str))
        client.log_artifacts(run_id, d)
    values = {f"{r.key}_{k}": r.mean[k] for r in out.rows for k in (*COLUMNS, "temperature")}
    for label, a in out.extra.get("label_accuracies", {}).items():
        key = out.extra["label_keys"][label]
        values.update({f"{key}_{k}": v for k, v in a.items()})
    tracking.log_metrics(client, run_id, values)


def _save_model(client, run_id: str, model, path: str, dataset: str, **meta) -> str:
    from metaensemble.models import save_model

    with tempfile.TemporaryDirectory() as d:
        save_model(model, Path(d) / path.rsplit("/", 1)[-1], dataset=dataset, **meta)
        client.log_artifacts(run_id, d, artifact_path=path.rsplit("/", 1)[0] if "/" in path else None)
    return f"runs:/{run_id}/{path}"


def _groups(cfg: Config, keys: list[str]) -> list[list[str]]:
    """Trained rows side by side on GPUs (one trial each); on CPUs one pack (one Ray Train
    run trains them one after another: runs of seconds would pay the start-up twice)."""
    return [[k] for k in keys] if cfg.scaling.use_gpu else [list(keys)]


def trained_rows(cfg: Config, spec: dict, fused_uri: str, parents: list[str]) -> dict[str, Config]:
    """The engine configs of the table's trained rows (``fusion.rows``): the fused network
    finetuned from ``fused_uri`` (cross-entropy, or KD from the parents with
    ``fusion.finetune=kd``), and KD from the parents into a fresh network of its shape."""
    runs: dict[str, Config] = {}
    if "finetune" in cfg.fusion.rows:
        runs["finetune"] = _trained_config(cfg, spec, task="fusion_finetune", init_from=fused_uri,
                                           teachers=parents if cfg.fusion.finetune == "kd" else None)
    if "kd" in cfg.fusion.rows:
        runs["kd"] = _trained_config(cfg, spec, task="fusion_kd", init_from=None, teachers=parents)
    return runs


def _trained_config(cfg: Config, spec: dict, *, task: str, init_from: str | None, teachers: list[str] | None,
                    seed: int | None = None) -> Config:
    over: dict[str, Any] = {"task": task, "model.name": spec["arch"],
                            "model.kwargs": {k: v for k, v in spec["kwargs"].items()
                                             if k not in ("num_classes", "in_chans", "img_size")},
                            "model.init_from": init_from, "model.init_seed": None,
                            "method": "kd" if teachers else "supervised"}
    if teachers:
        over["distill.teachers"] = teachers
    if seed is not None:
        over["seed"] = seed
    return cfg.with_overrides(over)


# ---- the experiments -----------------------------------------------------------------------
def run_key(cfg: Config, parents: list[Parent]) -> str:
    """The job's MLflow run key: its config, its fusion and distillation options (the
    trained rows' method reads neither, so ``cfg.run_key`` alone leaves them out) and its
    parents (``parent_configs`` does not name a run, the networks it resolved to do). A
    rerun reopens its own run; any other fusion gets another, and with it other trained
    rows (their ``model.init_from`` names this run)."""
    import hashlib

    what = {"parents": [p.uri for p in parents], "fusion": cfg.fusion.model_dump(exclude={"models"}),
            "distill": cfg.distill.model_dump()}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"fuse-{cfg.fusion.experiment}-{cfg.run_key()}-{digest}"


def run(cfg: Config, *, train_missing: bool = True) -> FuseOutcome:
    """The experiment ``fusion.experiment`` under one parent MLflow run (a rerun of the
    same config reopens it and reuses finished trained rows)."""
    from metaensemble.models import load

    t0 = time.perf_counter()
    parents = resolve_parents(cfg, train_missing=train_missing)
    t_parents = time.perf_counter() - t0
    client = tracking.client(tracking.ensure_tracking())
    key = run_key(cfg, parents)
    splits, val, test = data.eval_splits(cfg.data)
    nets = [load(p.uri) for p in parents]
    prepared = prepare(cfg, nets, splits)  # alignment and fusion: bad pins etc. fail before the run opens
    with tracking.job_run(client, cfg, key, "fuse") as parent_run:
        tracking.set_tags(client, parent_run, {"parents": ", ".join(p.label for p in parents),
                                               "fusion.experiment": cfg.fusion.experiment})
        print(f"parents: {', '.join(p.label for p in parents)}", flush=True)
        fn = {"fusion": _fusion, "skill_transfer": _skill_transfer, "transfer": _transfer}[cfg.fusion.experiment]
        out = fn(cfg, client, parent_run, parents, nets, prepared, splits, val, test)
        out.extra.setdefault("seconds", {})["parents_s"] = t_parents
        out.extra["seconds"]["total_s"] = time.perf_counter() - t0
        _log(client, parent_run, out, f"{cfg.data.name}: fusion.experiment={cfg.fusion.experiment}")
        tracking.log_metrics(client, parent_run, out.extra["seconds"])
    return out


def prepare(cfg: Config, nets, splits):
    """The experiment's fusion (``fusion``, ``skill_transfer``: ``pipeline.Fused``) or
    depth balancing (``transfer``: (alignment, balanced, deep, shallow)), computed before
    the job's run opens so that parents that cannot be aligned leave nothing behind."""
    from metaensemble.methods.fusion import cla
    from metaensemble.methods.fusion.pipeline import (
        check_fits,
        check_parents,
        depth,
        fuse_parents,
        pick,
        sample_inputs,
    )

    f = cfg.fusion
    check_fits(nets, splits.info, list(f.models) or None)
    if f.experiment != "transfer":
        return fuse_parents(nets, f, splits.train, splits.info)
    check_parents(nets)
    depths = [depth(n) for n in nets]
    deep, shallow = pick(depths, "deep"), pick(depths, "shallow")
    if depths[deep] == depths[shallow]:
        raise ConfigError(f"fusion.experiment=transfer initialises a deeper network from a shallower one; the "
                          f"parents all have {depths[deep]} alignable layers")
    x = sample_inputs(splits.train, splits.info, f.act_samples, f.act_seed)
    al = cla.align_models(nets[deep], nets[shallow], cost=f.cla_cost, x=x, pin_start=f.pin_start, pin_end=f.pin_end,
                          scope=f.cla_scope)
    return al, cla.balance(nets[shallow], al), deep, shallow


def _parent_rows(nets, scored: list[Scored]) -> list[SeedRow]:
    from metaensemble.methods.fusion.pipeline import depth

    return [seed_row(f"parent{i}", f"parent {i} ({n.me_spec['arch']}, {depth(n)} lay.)", [s.values])
            for i, (n, s) in enumerate(zip(nets, scored, strict=True))]


def _alignment_pngs(client, run_id: str, fused, parents: list[Parent]) -> dict[str, Any]:
    from metaensemble.methods.fusion import cla

    info = {}
    with tempfile.TemporaryDirectory() as d:
        for i, al in fused.alignments.items():
            cla.plot_alignment(al, Path(d) / f"alignment_{i}.png",
                               f"{parents[i].label} (shallow) onto {parents[fused.deep].label} (deep)")
            info[str(i)] = {"mapping": al.mapping, "inserted": fused.inserted[i]}
        if fused.alignments:
            client.log_artifacts(run_id, d)
    return info


def _fusion(cfg, client, run_id, parents, nets, fused, splits, val, test) -> FuseOutcome:
    from metaensemble.models import load
    from metaensemble.sweep import train_configs

    scored = [score_model(n, val, test) for n in nets]
    rows = _parent_rows(nets, scored)
    rows.append(seed_row("ensemble", f"ensemble of {len(nets)}", [score_ensemble(scored).values]))
    shot = "cla" if fused.alignments else "ot"
    name = "CLA" if shot == "cla" else "OT"
    if fused.naive is not None:
        rows.append(seed_row("naive", "naive average" + (" (balanced)" if fused.alignments else ""),
                             [score_model(fused.naive, val, test).values]))
    rows.append(seed_row(shot, f"{name} one-shot", [score_model(fused.model, val, test).values]))
    extra: dict[str, Any] = {"alignment": _alignment_pngs(client, run_id, fused, parents),
                             "anchor": fused.anchor, "deep": fused.deep,
                             "seconds": {"fusion_s": fused.seconds}}
    spec = fused.model.me_spec
    fused_uri = _save_model(client, run_id, fused.model, "fused", splits.info.name,
                            parents=[p.label for p in parents], stage="one-shot")
    arch_name = f"fused.{cfg.data.name}.{spec['arch']}"
    tags = {"parents": ", ".join(p.label for p in parents), "fuse_run": run_id, "method": shot}
    versions = {"one-shot": tracking.register_model(client, arch_name, run_id, "fused", tags={**tags, "stage": "one-shot"},
                                                    description="Fused networks (jobs/fuse.py).").version}
    runs = trained_rows(cfg, spec, fused_uri, [p.uri for p in parents])
    run_ids = {}
    if runs:
        run_ids = train_configs(runs, _groups(cfg, list(runs)), experiment=cfg.experiment_name, parent_run_id=run_id,
                                storage=f"{cfg.resolved_storage_path()}/fuse", name=f"fuse-{cfg.config_hash()}")
        e = cfg.train.epochs
        how = "KD finetune" if cfg.fusion.finetune == "kd" else "finetune"
        labels = {"finetune": f"{name} + {how} {e} ep", "kd": f"KD, fused shape, {e} ep"}
        for k, rid in run_ids.items():
            rows.append(seed_row(f"{shot}_{k}" if k == "finetune" else k, labels[k],
                                 [score_model(load(f"runs:/{rid}/model"), val, test).values],
                                 train_seconds(client, rid)))
        if "finetune" in run_ids:
            versions["finetuned"] = tracking.register_model(client, arch_name, run_ids["finetune"],
                                                            tags={**tags, "stage": "finetuned"}).version
    return FuseOutcome(run_id, "fusion", rows, parents, run_ids, versions, extra)


def _skill_transfer(cfg, client, run_id, parents, nets, fused, splits, val, test) -> FuseOutcome:
    special = cfg.data.label_split.special
    scored = [score_model(n, val, test) for n in nets]
    ens = score_ensemble(scored)
    shot = "cla" if fused.alignments else "ot"
    named = {f"parent A (label {special} + {cfg.data.label_split.fraction:.0%})": ("parent_a", scored[0]),
             "parent B (the rest)": ("parent_b", scored[1]), "ensemble of A and B": ("ensemble", ens)}
    if fused.naive is not None:
        named["naive average"] = ("naive", score_model(fused.naive, val, test))
    named[f"{shot.upper()} one-shot"] = (shot, score_model(fused.model, val, test))
    rows = [seed_row(k, label[:24], [s.values]) for label, (k, s) in named.items()]
    accs = {label: label_accuracies(s, special) for label, (_, s) in named.items()}
    uri = _save_model(client, run_id, fused.model, "fused", splits.info.name, stage="skill-transfer")
    extra = {"label_accuracies": accs, "special": special, "label_keys": {lb: k for lb, (k, _) in named.items()},
             "seconds": {"fusion_s": fused.seconds}, "fused_uri": uri}
    return FuseOutcome(run_id, "skill_transfer", rows, parents, {}, {}, extra)


def _transfer(cfg, client, run_id, parents, nets, prepared, splits, val, test) -> FuseOutcome:
    from metaensemble.methods.fusion import cla
    from metaensemble.models import load
    from metaensemble.sweep import train_configs

    al, balanced, deep, shallow = prepared
    spec = balanced.model.me_spec
    init_uri = _save_model(client, run_id, balanced.model, "transfer_init", splits.info.name,
                           source=parents[shallow].label)
    from metaensemble.methods.fusion.pipeline import depth

    rows = [seed_row(f"parent{i}", f"{'deep' if i == deep else 'shallow'} parent ({depth(n)} lay.)",
                     [score_model(n, val, test).values]) for i, n in enumerate(nets) if i in (deep, shallow)]
    rows.append(seed_row("balanced", "shallow, depth-balanced", [score_model(balanced.model, val, test).values]))
    runs = {"from_shallow": _trained_config(cfg, spec, task="transfer_init", init_from=init_uri, teachers=None),
            "scratch": _trained_config(cfg, spec, task="transfer_scratch", init_from=None, teachers=None)}
    run_ids = train_configs(runs, _groups(cfg, list(runs)), experiment=cfg.experiment_name, parent_run_id=run_id,
                            storage=f"{cfg.resolved_storage_path()}/fuse", name=f"transfer-{cfg.config_hash()}")
    e = cfg.train.epochs
    labels = {"from_shallow": f"from shallow + {e} ep", "scratch": f"from scratch, {e} ep"}
    for k, rid in run_ids.items():
        rows.append(seed_row(k, labels[k], [score_model(load(f"runs:/{rid}/model"), val, test).values],
                             train_seconds(client, rid)))
    with tempfile.TemporaryDirectory() as d:
        cla.plot_alignment(al, Path(d) / "alignment.png", f"{parents[shallow].label} onto {parents[deep].label}")
        client.log_artifacts(run_id, d)
    extra = {"alignment": {"mapping": al.mapping, "inserted": list(balanced.inserted)},
             "architecture": spec}
    return FuseOutcome(run_id, "transfer", rows, parents, run_ids, {}, extra)
