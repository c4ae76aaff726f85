"""The two stages of Learngene SWS: the pipelines behind ``jobs/learngene.py``.

aux          the aux-net (``method: learngene``) distilled from ``learngene.teacher``
             (or the first teacher of ``learngene.teacher_config``'s zoo, trained first
             if missing) as one engine run; its checkpoint is the learngene, registered as
             ``learngene.<dataset>.<aux arch>``
descendants  for every depth of ``learngene.depths``: a descendant initialised from the
             learngene (``model.expand``) and one from random init, both finetuned by
             engine runs with the same recipe and budget (AdamW, cosine to a min lr, no
             warm-up, lr scaled by global batch / 512), side by side; the table of val
             accuracy after 1 and after N epochs, test accuracy of the selected network,
             parameters, and the storage ratio (all descendants' parameters over the
             learngene's), under one parent MLflow run
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaensemble import data, engine, tracking
from metaensemble.config import Config
from metaensemble.errors import ConfigError
from metaensemble.methods.learngene.teacher import resolve_teacher


def registered_name(cfg: Config) -> str:
    return f"learngene.{cfg.data.name}.{cfg.model.name}"


# ---- stage 1: the aux-net (its teacher: methods/learngene/teacher.py) ----------------------
def check_aux(cfg: Config) -> None:
    """Everything checkable before any work, teacher aside."""
    if cfg.method != "learngene":
        raise ConfigError(f"jobs/learngene.py aux trains method learngene, got method={cfg.method!r}")
    engine.validate(cfg.with_overrides({"method": "supervised"}))  # data, model kwargs, optimiser
    from metaensemble.methods.learngene.model import parse_stages

    parse_stages(cfg.model.kwargs.get("stages", "L16_33433"))


@dataclass
class AuxOutcome:
    run_id: str
    version: str
    teacher: str
    metrics: dict[str, Any]
    parameters: int


def run_aux(cfg: Config, *, train_missing: bool = True) -> AuxOutcome:
    """Train the aux-net (one engine run; a finished run of this config is reused) and
    register it as the learngene."""
    check_aux(cfg)
    cfg, label = resolve_teacher(cfg, train_missing=train_missing)
    engine.validate(cfg)
    outcome = engine.fit(cfg)
    client = tracking.client()
    run = client.get_run(outcome.run_id)
    from metaensemble.models import load

    aux = load(outcome.model_uri)
    mv = tracking.register_model(
        client, registered_name(cfg), outcome.run_id,
        tags={"teacher": label, "stages": str(aux.stage_sizes), "embed_dim": aux.embed_dim},
        description=f"Learngenes (stage-wise weight-shared aux-nets) for {cfg.data.name}; jobs/learngene.py aux.",
    )
    return AuxOutcome(outcome.run_id, mv.version, label, dict(run.data.metrics),
                      sum(p.numel() for p in aux.parameters()))


# ---- stage 2: descendants ------------------------------------------------------------------
def learngene_uri(cfg: Config) -> str:
    """``learngene.learngene``, or the newest registered version of this config's learngene."""
    if cfg.learngene.learngene:
        return cfg.learngene.learngene
    tracking.ensure_tracking()
    client = tracking.client()
    name = registered_name(cfg)
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise ConfigError(f"no learngene registered as {name}: train one with `python jobs/learngene.py aux` "
                          f"(same config), or set learngene.learngene to a checkpoint folder or MLflow URI")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


def load_learngene(uri: str, cfg: Config):
    """The aux-net at ``uri``, checked against this config's aux shape: a learngene of
    another width, head count or patch size cannot initialise these descendants."""
    from metaensemble.methods.learngene.model import AuxViT
    from metaensemble.models import load

    if uri.endswith(".pth") and "://" not in uri:  # a learngene written by the original code
        from metaensemble.methods.learngene.original import load_original

        k = cfg.model.kwargs
        aux = load_original(uri, stages=k.get("stages", "L16_33433"), num_heads=k.get("num_heads", 12),
                            img_size=data.info(cfg.data).img_size, patch_size=k.get("patch_size") or 16,
                            embed_dim=k.get("embed_dim"))
    else:
        aux = load(uri)
    if not isinstance(aux, AuxViT):
        raise ConfigError(f"{uri} holds a {type(aux).__name__}, not a learngene (an aux_vit checkpoint)")
    want = {k: cfg.model.kwargs[k] for k in ("embed_dim", "num_heads", "patch_size") if k in cfg.model.kwargs}
    have = {"embed_dim": aux.embed_dim, "num_heads": aux.num_heads, "patch_size": aux.patch_size}
    diff = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if diff:
        raise ConfigError("learngene " + uri + " does not fit these descendants: " + "; ".join(
            f"its {k} is {a}, the config's model.kwargs.{k} is {b}" for k, (a, b) in diff.items()))
    return aux


def finetune_config(cfg: Config, aux, depth: int, init_uri: str | None) -> Config:
    """The descendant recipe (the same budget for both inits): ``method:
    learngene_descendant`` (DeiT's Mixup/CutMix and EMA as configured), AdamW at
    ``finetune_lr`` x global batch / 512, cosine to ``finetune_min_lr``, no warm-up. What
    only stage 1 reads (the teacher, alpha, T) is reset, so it does not name these runs."""
    from metaensemble.methods.learngene.config import LearngeneConfig

    lg = cfg.learngene
    ref = lg.lr_batch_reference
    scale = cfg.data.batch_size * cfg.scaling.num_workers / ref if ref else 1.0
    kwargs = {"depth": depth, "embed_dim": aux.embed_dim, "patch_size": aux.patch_size, "mlp_ratio": aux.mlp_ratio,
              "style": lg.style, "drop_path_rate": float(cfg.model.kwargs.get("drop_path_rate", 0.0))}
    if lg.style == "preserving":
        kwargs["num_heads"] = aux.num_heads
    fields = LearngeneConfig.model_fields
    stage1 = {f"learngene.{k}": fields[k].get_default(call_default_factory=True) for k in LearngeneConfig.stage1_only}
    return cfg.with_overrides({
        **stage1, "method": "learngene_descendant", "task": "descendant" if init_uri else "descendant_scratch",
        "model.name": "descendant_vit", "model.kwargs": kwargs, "model.init_from": init_uri,
        "optim.name": "adamw", "optim.lr": lg.finetune_lr * scale, "optim.weight_decay": lg.finetune_weight_decay,
        "optim.warmup_epochs": 0, "optim.schedule": "cosine", "optim.min_lr": lg.finetune_min_lr,
        "train.epochs": lg.finetune_epochs, "train.label_smoothing": lg.label_smoothing,
    })


@dataclass
class DepthRow:
    depth: int
    layers_source: list[int]
    parameters: int
    learngene: dict[str, float] = field(default_factory=dict)
    scratch: dict[str, float] = field(default_factory=dict)


@dataclass
class DescendantsOutcome:
    parent_run_id: str
    learngene: str
    learngene_parameters: int
    rows: list[DepthRow]
    run_ids: dict[str, str]
    storage_ratio: float
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"parent_run_id": self.parent_run_id, "learngene": self.learngene,
                "learngene_parameters": self.learngene_parameters, "rows": [r.__dict__ for r in self.rows],
                "run_ids": self.run_ids, "storage_ratio": self.storage_ratio, "seconds": self.seconds}


def _accuracies(client, run_id: str) -> dict[str, float]:
    """val accuracy after epoch 1 and after the last epoch, and the selected network's test accuracy."""
    # At the last step the engine logs the last epoch's val_acc, then the selected
    # network's: the first one logged at each step is that epoch's.
    hist: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: (m.step, m.timestamp)):
        hist.setdefault(m.step, m.value)
    run = client.get_run(run_id)
    return {"val_acc_1": hist[min(hist)], "val_acc_n": hist[max(hist)], "test_acc": run.data.metrics["test_acc"],
            "train_s": sum(m.value for m in client.get_metric_history(run_id, "train_time_s"))}


def init_name(depth: int, layers_source: list[int], head: bool = True) -> str:
    """The initial descendant's artifact folder: by depth, layers_source and whether the
    head was copied, so another of these is another ``model.init_from`` and so another run."""
    return f"d{depth}-{'_'.join(map(str, layers_source))}" + ("" if head else "-fresh_head")


def copies_head(mode: str, family: str, same_classes: bool) -> bool:
    """Whether the descendants start from the learngene's head (``learngene.head``):
    ``copy`` when the class counts match, ``fresh`` never, ``auto`` (the original code's
    rule) only on ImageNet, here a dataset of the ImageNet family with the same classes."""
    if mode not in ("auto", "copy", "fresh"):
        raise ConfigError(f"learngene.head={mode!r} is unknown; valid: auto, copy, fresh")
    return same_classes and (mode == "copy" or (mode == "auto" and family == "imagenet"))


def run_descendants(cfg: Config) -> DescendantsOutcome:
    """Stage 2 (see the module docstring). Every input is checked and every descendant
    expanded before any run opens."""
    from metaensemble.methods.learngene.model import default_layers_source, expand
    from metaensemble.models import save_model
    from metaensemble.sweep import train_configs

    t0 = time.perf_counter()
    check_aux(cfg)
    uri = learngene_uri(cfg)
    aux = load_learngene(uri, cfg)
    info = data.info(cfg.data)
    if (info.in_chans, info.img_size) != (aux.in_chans, aux.img_size):
        raise ConfigError(f"learngene {uri} takes {aux.in_chans}x{aux.img_size}x{aux.img_size} images, "
                          f"{cfg.data.name} has {info.in_chans}x{info.img_size}x{info.img_size}")
    lg = cfg.learngene
    sources = {d: list(lg.source_for(d) or default_layers_source(aux.stage_sizes, d)) for d in lg.depths}
    head = copies_head(lg.head, info.family, info.num_classes == aux.num_classes)
    client = tracking.client(tracking.ensure_tracking())
    key = f"descendants-{cfg.run_key()}-{uri.replace('/', '_').replace(':', '')}"[:200]
    with tempfile.TemporaryDirectory() as tmp:
        inits, params = {}, {}
        for d, src in sources.items():
            desc = expand(aux, d, src, lg.style, num_classes=info.num_classes, copy_head=head)  # checks layers_source
            save_model(desc, Path(tmp) / init_name(d, src, head), dataset=cfg.data.name)
            params[d] = sum(p.numel() for p in desc.parameters())
        runs: dict[str, Config] = {}
        with tracking.job_run(client, cfg, key, "learngene_descendants") as parent:
            tracking.set_tags(client, parent, {"learngene": uri, "depths": ",".join(map(str, lg.depths)),
                                               "style": lg.style, "head": "copied" if head else "fresh"})
            client.log_artifacts(parent, tmp, artifact_path="descendant_init")
            for d in lg.depths:
                inits[d] = f"runs:/{parent}/descendant_init/{init_name(d, sources[d], head)}"
                runs[f"learngene/d{d}"] = finetune_config(cfg, aux, d, inits[d])
                runs[f"scratch/d{d}"] = finetune_config(cfg, aux, d, None)
            for c in runs.values():
                engine.validate(c)
            print(f"learngene {uri}: {aux.stage_sizes} stages of width {aux.embed_dim}; finetuning "
                  f"{len(runs)} descendants ({lg.finetune_epochs} epochs each): {', '.join(runs)}", flush=True)
            t_start = time.perf_counter()
            groups = [[k] for k in runs]
            run_ids = train_configs(runs, groups, experiment=cfg.experiment_name, parent_run_id=parent,
                                    storage=f"{cfg.resolved_storage_path()}/learngene", name=key[:150])
            rows = [DepthRow(d, sources[d], params[d], _accuracies(client, run_ids[f"learngene/d{d}"]),
                             _accuracies(client, run_ids[f"scratch/d{d}"])) for d in lg.depths]
            aux_params = sum(p.numel() for p in aux.parameters())
            ratio = sum(params.values()) / aux_params
            seconds = {"train_s": time.perf_counter() - t_start, "total_s": time.perf_counter() - t0}
            table = format_table(rows, aux_params, ratio, lg.finetune_epochs)
            client.log_text(parent, table, "descendants_table.md")
            values = {"storage_ratio": ratio, **seconds}
            for r in rows:
                for init, acc in (("learngene", r.learngene), ("scratch", r.scratch)):
                    values.update({f"d{r.depth}_{init}_{k}": v for k, v in acc.items()})
            tracking.log_metrics(client, parent, values)
    return DescendantsOutcome(parent, uri, aux_params, rows, run_ids, ratio, seconds)


def format_table(rows: list[DepthRow], aux_params: int, ratio: float, epochs: int) -> str:
    head = (f"{'depth':>5} {'layers_source':<36} {'params':>9}   {'learngene init: val@1':>21} {f'val@{epochs}':>7} "
            f"{'test':>6}   {'random init: val@1':>18} {f'val@{epochs}':>7} {'test':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        a, b = r.learngene, r.scratch
        src = ",".join(map(str, r.layers_source))
        lines.append(f"{r.depth:>5} {src:<36} {r.parameters:>9,}   {100 * a['val_acc_1']:>21.2f} "
                     f"{100 * a['val_acc_n']:>7.2f} {100 * a['test_acc']:>6.2f}   {100 * b['val_acc_1']:>18.2f} "
                     f"{100 * b['val_acc_n']:>7.2f} {100 * b['test_acc']:>6.2f}")
    lines.append(f"learngene: {aux_params:,} parameters; storage ratio (all descendants / learngene): {ratio:.2f}x")
    return "\n".join(lines)
