"""Using a meta-trained generator: one student for a given ensemble, in one call.

    out = generate("models:/weightformer.digits.convnet/3",
                   ["models:/teacher.digits.convnet/40", ...])   # 2..max_teachers teachers
    out.student, out.seconds, out.metrics          # the network, what it cost, test scores
    out.version                                    # student.digits.convnet.weightformer/<v>

The generator's own run config says how its inputs were prepared (``meta.align`` and the
alignment's reference, its first meta-train teacher), where BatchNorm statistics are
recomputed (``meta.bn_data``) and on which data split; the student is registered as
``student.<dataset>.<arch>.weightformer``, tagged with the ensemble's teachers and the
generator.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from mlflow.exceptions import MlflowException

from metaensemble import data, tracking
from metaensemble.config import Config
from metaensemble.errors import ConfigError
from metaensemble.methods.distill import load_teachers
from metaensemble.methods.weightformer.align import align_states
from metaensemble.methods.weightformer.student import (
    build_student,
    distances,
    generate_student,
)
from metaensemble.methods.weightformer.tokens import tokenise
from metaensemble.models.batchnorm import recompute_bn
from metaensemble.validation import load_config

BN_LABEL = ("every network scored here (teachers, baselines, generated, KD and finetuned students) has its "
            "BatchNorm statistics recomputed on the same images, the same way, before scoring")
"""How every network the meta-train table and ``generate`` score is prepared."""


@dataclass
class EvalData:
    test: Any
    """Test split loader: everything in the table is measured on it."""
    bn: Any
    """Where every scored network's BN statistics are recomputed (``meta.bn_data``)."""
    val: Any = None
    """The teachers' val split: what the soups select and fit on (never the test split)."""


def eval_data(cfg: Config) -> EvalData:
    full = data.load(cfg.data.model_copy(update={"train_fraction": 1.0}))
    bn = full if cfg.meta.bn_data == "train" else data.load(cfg.data)
    mk = lambda split: data.eval_loader(split, full.info, cfg.data.eval_batch_size, "cpu")  # noqa: E731
    return EvalData(mk(full.test), mk(bn.train), mk(full.val))


@dataclass
class Prepared:
    """An ensemble ready for a generator: the aligned state dicts and their token rows."""

    uris: list[str]
    states: list[dict[str, torch.Tensor]]
    rows: list[list[torch.Tensor]]
    seconds: float
    """Loading the checkpoints, aligning and tokenising."""
    fetch_seconds: float = 0.0
    """Of ``seconds``, loading the checkpoints (from MLflow or disk) into modules."""


def prepare(uris: list[str], gen: nn.Module, align: str = "none",
            reference: dict[str, torch.Tensor] | None = None) -> Prepared:
    """Load ``uris`` (checked against the generator's student architecture), align them
    to ``reference`` when ``align`` is ``permutation``, and tokenise them."""
    t0 = time.perf_counter()
    loaded = load_teachers(list(uris), gen.student_spec)
    fetched = time.perf_counter() - t0
    seen: dict[str, str] = {}
    for t in loaded:  # one checkpoint under two names is still one teacher
        if t.sha256 in seen:
            raise ConfigError(f"the ensemble lists one checkpoint twice: {seen[t.sha256]} and {t.uri}")
        seen[t.sha256] = t.uri
    states = [{k: v.detach().clone() for k, v in t.model.state_dict().items()} for t in loaded]
    states = align_states(states, reference if reference is not None else states[0], gen.layout, align)
    rows = [tokenise(s, gen.layout) for s in states]
    return Prepared(list(uris), states, rows, time.perf_counter() - t0, fetched)


def run_id_of(uri: str, client) -> str:
    """The MLflow run behind a ``runs:/<id>/...`` or ``models:/<name>/<version>`` URI."""
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/")[0]
    if uri.startswith("models:/"):
        name, _, version = uri[len("models:/"):].rpartition("/")
        if not name or not version.isdigit():
            raise ConfigError(f"generator URI {uri!r}: expected models:/<name>/<version>")
        try:
            return client.get_model_version(name, version).run_id
        except MlflowException:
            raise ConfigError(f"generator {uri}: no such registered version") from None
    raise ConfigError(f"generator {uri!r}: give a registered version (models:/weightformer.<dataset>.<arch>/<v>) "
                      f"or a run's model (runs:/<run id>/model); the generator's run config is needed")


def generator_config(uri: str, client) -> Config:
    """The run config the generator was meta-trained with."""
    run_id = run_id_of(uri, client)
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(run_id, "config.yaml", d)
        except MlflowException:
            raise ConfigError(f"generator {uri}: its run {run_id} has no config.yaml; give a generator that "
                              f"jobs/meta_train.py trained") from None
        cfg = load_config(path)
    if cfg.method != "weightformer" or cfg.model.name not in ("weightformer", "mlp_generator"):
        raise ConfigError(f"{uri} is not a parameter generator (its run trained method {cfg.method!r}, "
                          f"model {cfg.model.name!r}); give a weightformer.<dataset>.<arch> version")
    return cfg


@dataclass
class Generated:
    student: nn.Module
    seconds: dict[str, float]
    """load_tokenise_s, generate_bn_s (generation + assembly + BN pass), total_s."""
    metrics: dict[str, float] = field(default_factory=dict)
    distances: dict[str, float] = field(default_factory=dict)
    """Relative L2 of the student to its anchor and to the teachers' mean."""
    run_id: str | None = None
    version: str | None = None
    model_name: str | None = None
    reused: bool = False
    """The same generator and teachers were generated and registered before: that run and
    version are returned (the student is the same: generation is deterministic)."""


def generate(generator: str, teachers: list[str], *, evaluate: bool = True, register: bool = True,
             experiment: str | None = None) -> Generated:
    """Generate the student of the ensemble ``teachers`` (teacher URIs; the first is the
    anchor) with the generator at ``generator``; BN statistics recomputed as the
    generator's config says; scored on the test split (``evaluate``) and registered as
    ``student.<dataset>.<arch>.weightformer`` (``register``, in experiment
    ``<dataset>/generate``). Bad input fails before anything is written."""
    from metaensemble.evaluation import measure
    from metaensemble.methods.base import predict_logp
    from metaensemble.models import load

    client = tracking.client(tracking.ensure_tracking())
    cfg = generator_config(generator, client)
    gen = load(generator).eval()
    kmax = getattr(gen, "max_teachers", getattr(gen, "k", None))
    lo = 2 if hasattr(gen, "max_teachers") else kmax
    if not lo <= len(teachers) <= kmax:
        raise ConfigError(f"this generator takes {lo}..{kmax} teachers; got {len(teachers)}")
    reference = None
    if cfg.meta.align != "none":
        reference = prepare([cfg.meta.train_teachers[0]], gen).states[0]
    prep = prepare(teachers, gen, cfg.meta.align, reference)  # checks every checkpoint's architecture
    ev = eval_data(cfg)  # the meta-train table's BN images and test split
    bn = ev.bn
    order = list(range(len(teachers)))
    student, t_gen = generate_student(gen, prep.rows, prep.states, order, bn)
    out = Generated(student, {"load_tokenise_s": prep.seconds, "generate_bn_s": t_gen,
                              "total_s": prep.seconds + t_gen})
    st = student.state_dict()
    out.distances = distances(st, prep.states)
    if evaluate:
        test = ev.test
        out.metrics = measure(*predict_logp(student, test), out.seconds["total_s"])
        members = [measure(*predict_logp(recompute_bn(build_student(gen.student_spec, s), bn), test))
                   for s in prep.states]
        out.metrics["mean_member_acc"] = sum(m["acc"] for m in members) / len(members)
    if register:
        out.run_id, out.version, out.model_name, out.reused = _register(client, cfg, generator, teachers, student,
                                                                        out, experiment, BN_LABEL)
    return out


def _register(client, cfg: Config, generator: str, teachers: list[str], student: nn.Module, out: Generated,
              experiment: str | None, bn_label: str) -> tuple[str, str, str, bool]:
    """Log the student in a run and register it; the run and version of an earlier call
    with the same generator, teachers and BN procedure are returned instead (reused=True)."""
    from metaensemble.models import save_model

    arch = student.me_spec["arch"] if hasattr(student, "me_spec") else cfg.model.kwargs["student"]
    name = f"student.{cfg.data.name}.{arch}.weightformer"
    exp = experiment or f"{cfg.data.name}/generate"
    exp_id = tracking.experiment_id(client, exp)
    key = hashlib.sha256(json.dumps([generator, list(teachers), bn_label]).encode()).hexdigest()[:16]
    for old in client.search_runs([exp_id], f"tags.`metaensemble.generate_key` = '{key}' "
                                            "and attributes.status = 'FINISHED'"):
        mv = tracking.find_version(client, name, old.info.run_id)
        if mv is not None:
            return old.info.run_id, str(mv.version), name, True
    run = client.create_run(exp_id, run_name=f"generate-{len(teachers)}", tags={
        "metaensemble.generator": generator, "metaensemble.teachers": ",".join(teachers),
        "metaensemble.generate_key": key, **tracking.runs.invocation_tags()})
    rid = run.info.run_id
    try:
        with tempfile.TemporaryDirectory() as d:
            save_model(student, Path(d) / "model", dataset=cfg.data.name)
            client.log_artifacts(rid, str(Path(d) / "model"), "model")
        tracking.log_metrics(client, rid, {**{f"test_{k}": v for k, v in out.metrics.items()}, **out.seconds,
                                           **out.distances})
        client.set_tag(rid, "bn_procedure", bn_label)
        mv = tracking.register_model(
            client, name, rid,
            tags={"generator": generator, "teachers": ",".join(teachers), "ensemble_size": len(teachers),
                  **({"test_acc": round(out.metrics["acc"], 6)} if out.metrics else {})},
            description=f"Students generated by WeightFormer for {cfg.data.name} / {arch} ensembles.")
        client.set_terminated(rid)
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    return rid, str(mv.version), name, False


def describe(out: Generated, teachers: list[str]) -> str:
    lines = [f"ensemble of {len(teachers)}: {', '.join(teachers)}"]
    if out.metrics:
        lines.append(f"generated student: test ACC {100 * out.metrics['acc']:.2f}, NLL {out.metrics['nll']:.4f}, "
                     f"ECE {out.metrics['ece']:.4f} (its teachers' mean {100 * out.metrics['mean_member_acc']:.2f})")
    lines.append(f"cost: {out.seconds['total_s']:.3f} s (load + align + tokenise {out.seconds['load_tokenise_s']:.3f}, "
                 f"generate + BN {out.seconds['generate_bn_s']:.3f})")
    lines.append(f"relative L2 distance: to its anchor {out.distances['rel_l2_to_anchor']:.4f}, "
                 f"to the teachers' mean {out.distances['rel_l2_to_mean']:.4f}, "
                 f"to the nearest teacher {out.distances['rel_l2_to_nearest']:.4f}")
    if out.version:
        again = "; the same generator and teachers were registered before: that version" if out.reused else ""
        lines.append(f"registered as {out.model_name} version {out.version} (MLflow run {out.run_id}{again})")
    return "\n".join(lines)


def resolve_generator(spec: str | None, dataset: str, arch: str) -> str:
    """A version number, a URI, or None (the newest version of ``weightformer.<dataset>.<arch>``)."""
    name = f"weightformer.{dataset}.{arch}"
    if spec and ":/" in spec:
        return spec
    if spec is not None and not spec.isdigit():
        raise ConfigError(f"--generator {spec!r}: give a version of {name} or a models:/ or runs:/ URI")
    if spec is None:
        client = tracking.client(tracking.ensure_tracking())
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ConfigError(f"no generator is registered as {name}; run jobs/meta_train.py first "
                              f"(or pass --generator runs:/<run id>/model)")
        spec = str(max(int(v.version) for v in versions))
    return f"models:/{name}/{spec}"


def resolve_teachers(specs: list[str], dataset: str, arch: str) -> list[str]:
    """Zoo versions (``40``) become ``models:/teacher.<dataset>.<arch>/40``; URIs and folders stay."""
    from metaensemble.tracking.zoo import registered_name

    return [f"models:/{registered_name(dataset, arch)}/{s}" if s.isdigit() else s for s in specs]
