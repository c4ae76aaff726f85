"""Soup regimes: which soup-regime zoo gives ensembles headroom over their members while
their uniform weight average stays at or above them (issue 26, build item 1).

    python benchmarks/regimes.py                                   # the default grid: 486 s on 2 cores
    python benchmarks/regimes.py --widths 4 --parent-epochs 8 --recipes 0.01:5 --parents 1 --draws 3
    python benchmarks/regimes.py --widths 4 8 --parent-epochs 4 8 15 --recipes 0.1:5 0.03,0.1:5 0.05,0.1:5 \
        0.1,0.2:5 --children 16 --reference '' --out benchmarks/results/regimes_lr   # lr as a grid axis: 292 s

For every setting (student width x parent epochs x fine-tune recipe) of the soup-regime
zoo recipe ``--config`` (``configs/teachers/digits_soup.yaml``): ``--parents`` parents
trained from scratch, each with ``--children`` children fine-tuned from it by the
recipe's own grid (seed and data order, label smoothing, cutout, training subset; a recipe
of several learning rates, ``0.05,0.1:5``, makes the learning rate one more grid axis), then
``--draws`` ensembles of K = ``--k`` children of one parent (distinct combinations) per
parent. Each ensemble is scored on the val and the test split:

- mean member: the mean accuracy of its K members;
- uniform average: the members' weights averaged (``weight_average``, as WeightFormer's
  evaluation does);
- ensemble: the mean of the members' softmax;
- headroom = ensemble - mean member, and soup - member = uniform average - mean member.

Every network scored (members and averages) has its BatchNorm statistics recomputed on
the train split, unaugmented (``models.batchnorm.recompute_bn``, the meta-train table's
one BN procedure, ``meta.bn_data=train``). Intervals: 95% two-level bootstrap of the mean
(parents resampled, then ensembles within each), ``--bootstrap`` resamples. For reference,
``--reference`` (the random-init zoo ``configs/teachers/digits_meta.yaml``: shared init,
trained from scratch) is scored the same way at each width, its teachers grouped into
``--parents`` groups of ``--children``.

The default rule (issue 26): among the settings whose uniform average is at or above the
mean member on VAL (mean over ensembles), the one with the largest VAL headroom. Test is
reported alongside and not used to choose.

Training is in this process, without Ray: ``engine.local.train_local``, built from the
engine's own pieces (initial weights, ``init_from``, per-rank seeding, loaders, the
method's optimiser and schedule, ``train_epoch``'s per-step code, per-epoch validation
and the same model selection), on configs made by the zoo job's own functions
(``teachers.parent_configs`` and ``teachers.child_config``): the recipe measured here is
the one ``jobs/train_teachers.py`` trains (checked once: the parent and four children
that job trained through Ray Train for digits_soup.yaml had bit-identical weights). One
torch thread.

Writes benchmarks/results/regimes.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "regimes"
METRICS = ("member", "soup", "ensemble", "headroom", "soup_gain")
LABELS = {"member": "mean member", "soup": "uniform average", "ensemble": "ensemble",
          "headroom": "headroom (ens - member)", "soup_gain": "soup - member"}


@dataclass
class Setting:
    kind: str
    """``soup`` (a soup-regime zoo) or ``scratch`` (the random-init reference)."""
    width: int
    parent_epochs: int | None = None
    lr: float | list[float] | None = None
    """The children's learning rate, or the grid's learning rates."""
    child_epochs: int | None = None
    draws: list[dict[str, Any]] = field(default_factory=list)
    """One per ensemble: group (parent), members, and val_/test_ of each of METRICS."""
    parents: list[dict[str, float]] = field(default_factory=list)
    """Each parent's val/test accuracy (BN recomputed)."""
    seconds: float = 0.0
    summary: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.kind == "scratch":
            return f"w{self.width} from scratch (random-init zoo)"
        lr = f"{self.lr:g}" if isinstance(self.lr, float) else f"grid {{{', '.join(f'{x:g}' for x in self.lr)}}}"
        return f"w{self.width} parent {self.parent_epochs} ep, child lr {lr} x {self.child_epochs} ep"


def parse_recipe(text: str) -> tuple[float | list[float], int]:
    """``LR:EPOCHS``, or ``LR,LR,...:EPOCHS`` for the learning rate as a grid axis."""
    try:
        lr, epochs = text.split(":")
        lrs = [float(x) for x in lr.split(",")]
        if len(set(lrs)) != len(lrs):
            raise ValueError
        return (lrs[0] if len(lrs) == 1 else lrs), int(epochs)
    except ValueError:
        raise SystemExit(f"--recipes takes LR:EPOCHS pairs such as 0.01:5, or distinct learning rates "
                         f"for a grid axis such as 0.05,0.1:5; got {text!r}") from None


def with_recipe(cfg, lr: float | list[float], epochs: int):
    """The recipe with the children's learning rate (or the grid's learning rates) and epochs."""
    soup = cfg.zoo.soup.model_dump()
    child = {**soup["child"], "optim": dict(soup["child"].get("optim") or {}), "train": {
        **(soup["child"].get("train") or {}), "epochs": epochs}}
    grid_optim = dict(soup["grid"].get("optim") or {})
    child["optim"].pop("lr", None)  # the recipe's own learning rate, child's or grid's, is replaced
    grid_optim.pop("lr", None)
    if isinstance(lr, list):
        grid_optim["lr"] = lr
    else:
        child["optim"]["lr"] = lr
    grid = {k: v for k, v in soup["grid"].items() if k != "optim"}
    return cfg.with_overrides({"zoo.soup": {**soup, "child": child, "grid": {**grid, **(
        {"optim": grid_optim} if grid_optim else {})}}})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/teachers/digits_soup.yaml")
    ap.add_argument("--reference", default="configs/teachers/digits_meta.yaml",
                    help="a from-scratch zoo recipe scored the same way at each width; '' for none")
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--parent-epochs", type=int, nargs="+", default=[4, 8, 15])
    ap.add_argument("--recipes", nargs="+", default=["0.01:5", "0.03:5", "0.1:5", "0.1:10"],
                    help="fine-tune recipes LR:EPOCHS (zoo.soup.child's optim.lr and train.epochs)")
    ap.add_argument("--parents", type=int, default=3)
    ap.add_argument("--children", type=int, default=8, help="children per parent")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--draws", type=int, default=10, help="ensembles per parent (distinct combinations)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT), help="results path without extension")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from metaensemble.validation import load_config

    recipes = [parse_recipe(r) for r in args.recipes]
    if args.children < args.k:
        raise SystemExit(f"--children {args.children} cannot form ensembles of --k {args.k}")
    base = load_config(args.config, [f"zoo.soup.parents={args.parents}"])
    if base.zoo.soup is None:
        raise SystemExit(f"{args.config} has no zoo.soup section: it is not a soup-regime recipe")
    t_start = time.perf_counter()
    ev = EvalData.of(base)
    settings: list[Setting] = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            if args.reference:
                settings.append(scratch_setting(args, width, ev))
                report_line(settings[-1])
            for pe in args.parent_epochs:
                cfg = base.with_overrides({"model.kwargs.width": width, "train.epochs": pe})
                parent_dirs, parent_scores, p_seconds = train_parents(cfg, ev, Path(tmp) / f"w{width}-p{pe}")
                for lr, epochs in recipes:
                    rcfg = with_recipe(cfg, lr, epochs)
                    s = soup_setting(args, rcfg, parent_dirs, ev)
                    s.parents, s.seconds = parent_scores, s.seconds + p_seconds / len(recipes)
                    settings.append(s)
                    report_line(s)
    for s in settings:
        s.summary = summarise(s, args.bootstrap, args.seed)
    chosen = choose([s for s in settings if s.kind == "soup"])
    seconds = time.perf_counter() - t_start
    write(args, settings, chosen, seconds)
    return 0


# ---- data and scoring ------------------------------------------------------------------------
@dataclass
class EvalData:
    bn: Any
    """The train split, unaugmented: where every scored network's BN statistics come from."""
    val: Any
    test: Any

    @classmethod
    def of(cls, cfg) -> EvalData:
        from metaensemble import data

        full = data.load(cfg.data.model_copy(update={"train_fraction": 1.0, "subset_seed": None}))
        mk = lambda split: data.eval_loader(split, full.info, cfg.data.eval_batch_size, "cpu")  # noqa: E731
        return cls(mk(full.train), mk(full.val), mk(full.test))


@dataclass
class Member:
    state: dict
    """The trained weights, as the engine selected them."""
    probs: dict[str, Any]
    """split -> softmax [N, C] of the BN-recomputed network."""
    labels: dict[str, Any]


def score_member(model, ev: EvalData) -> Member:
    import copy

    from metaensemble.methods.base import predict_logp
    from metaensemble.models.batchnorm import recompute_bn

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    net = recompute_bn(copy.deepcopy(model), ev.bn)
    probs, labels = {}, {}
    for split in ("val", "test"):
        logp, y = predict_logp(net, getattr(ev, split))
        probs[split], labels[split] = logp.exp(), y
    return Member(state, probs, labels)


def accuracy(probs, y) -> float:
    return float((probs.argmax(1) == y).float().mean()) * 100.0


def score_ensemble(members: list[Member], skeleton, ev: EvalData) -> dict[str, float]:
    """Mean member, uniform average (BN recomputed), ensemble, and the two differences,
    on val and test, in accuracy points."""
    import copy

    import torch

    from metaensemble.methods.base import predict_logp
    from metaensemble.methods.weightformer.student import weight_average
    from metaensemble.models.batchnorm import recompute_bn

    soup = copy.deepcopy(skeleton)
    soup.load_state_dict(weight_average([m.state for m in members]))
    recompute_bn(soup, ev.bn)
    out = {}
    for split in ("val", "test"):
        y = members[0].labels[split]
        member = float(np.mean([accuracy(m.probs[split], y) for m in members]))
        ens = accuracy(torch.stack([m.probs[split] for m in members]).mean(0), y)
        logp, _ = predict_logp(soup, getattr(ev, split))
        avg = accuracy(logp, y)
        out.update({f"{split}_member": member, f"{split}_soup": avg, f"{split}_ensemble": ens,
                    f"{split}_headroom": ens - member, f"{split}_soup_gain": avg - member})
    return out


def draw_ensembles(n: int, k: int, count: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``count`` distinct k-subsets of range(n) (all of them when fewer exist)."""
    combos = list(itertools.combinations(range(n), k))
    pick = rng.permutation(len(combos))[: min(count, len(combos))]
    return [combos[i] for i in sorted(pick)]


# ---- training --------------------------------------------------------------------------------
def train_parents(cfg, ev: EvalData, folder: Path):
    """Train the recipe's parents from scratch; (their folders, their scores, seconds)."""
    from metaensemble.engine.local import train_local
    from metaensemble.models import save_model
    from metaensemble.teachers import parent_configs

    t0 = time.perf_counter()
    dirs, scores = [], []
    for p, pcfg in enumerate(parent_configs(cfg)):
        run = train_local(pcfg)
        d = folder / f"parent{p}"
        save_model(run.model, d, dataset=pcfg.data.name)
        dirs.append(str(d))
        m = score_member(run.model, ev)
        scores.append({s: accuracy(m.probs[s], m.labels[s]) for s in ("val", "test")})
    return dirs, scores, time.perf_counter() - t0


def soup_setting(args, cfg, parent_dirs: list[str], ev: EvalData) -> Setting:
    """Children of every parent (zoo seeds 0 .. parents x children - 1, child i of parent
    i mod parents, exactly as the zoo job assigns them), then the ensembles' scores."""
    from metaensemble.engine.local import train_local
    from metaensemble.teachers import child_config

    t0 = time.perf_counter()
    soup = cfg.zoo.soup
    groups: dict[int, list[Member]] = {p: [] for p in range(soup.parents)}
    skeleton = None
    for i in range(soup.parents * args.children):
        seed = cfg.zoo.first_seed + i
        run = train_local(child_config(cfg, seed, parent_dirs))
        groups[i % soup.parents].append(score_member(run.model, ev))
        skeleton = run.model
    lr = soup.child["optim"].get("lr", (soup.grid.get("optim") or {}).get("lr"))
    s = Setting("soup", cfg.model.kwargs["width"], cfg.train.epochs, lr, soup.child["train"]["epochs"])
    lr_key = tuple(lr) if isinstance(lr, list) else lr
    s.draws = score_groups(args, groups, skeleton, ev, (s.width, s.parent_epochs, lr_key, s.child_epochs))
    s.seconds = time.perf_counter() - t0
    return s


def scratch_setting(args, width: int, ev: EvalData) -> Setting:
    """The reference: the random-init recipe's teachers (seeds 0 ..), in groups."""
    from metaensemble.engine.local import train_local
    from metaensemble.validation import load_config

    t0 = time.perf_counter()
    cfg = load_config(args.reference, [f"model.kwargs.width={width}"])
    groups: dict[int, list[Member]] = {p: [] for p in range(args.parents)}
    skeleton = None
    for i in range(args.parents * args.children):
        run = train_local(cfg.with_overrides({"seed": cfg.zoo.first_seed + i}))
        groups[i // args.children].append(score_member(run.model, ev))
        skeleton = run.model
    s = Setting("scratch", width)
    s.draws = score_groups(args, groups, skeleton, ev, (width, "scratch"))
    s.seconds = time.perf_counter() - t0
    return s


def score_groups(args, groups: dict[int, list[Member]], skeleton, ev: EvalData, key) -> list[dict[str, Any]]:
    out = []
    for g, members in groups.items():
        rng = np.random.default_rng([args.seed, g, zlib.crc32(str(key).encode())])
        for combo in draw_ensembles(len(members), args.k, args.draws, rng):
            out.append({"group": g, "members": list(combo),
                        **score_ensemble([members[j] for j in combo], skeleton, ev)})
    return out


# ---- summary, choice, output -----------------------------------------------------------------
def summarise(s: Setting, resamples: int, seed: int) -> dict[str, dict[str, float]]:
    """Per metric and split: the mean over ensembles and a 95% two-level bootstrap
    interval (groups resampled, then ensembles within each group)."""
    rng = np.random.default_rng([seed, 97])
    groups = sorted({d["group"] for d in s.draws})
    out = {}
    for split in ("val", "test"):
        for m in METRICS:
            key = f"{split}_{m}"
            by = [np.array([d[key] for d in s.draws if d["group"] == g]) for g in groups]
            means = np.empty(resamples)
            for b in range(resamples):
                picked = [by[i] for i in rng.integers(0, len(by), len(by))]
                means[b] = np.mean(np.concatenate([v[rng.integers(0, len(v), len(v))] for v in picked]))
            lo, hi = np.percentile(means, [2.5, 97.5])
            out[key] = {"mean": float(np.mean([d[key] for d in s.draws])), "lo": float(lo), "hi": float(hi)}
    return out


def choose(soups: list[Setting]) -> Setting | None:
    """The issue's rule: the largest val headroom among settings whose val uniform
    average is at or above the val mean member; None when no setting qualifies."""
    ok = [s for s in soups if s.summary["val_soup_gain"]["mean"] >= 0.0]
    return max(ok, key=lambda s: s.summary["val_headroom"]["mean"]) if ok else None


def report_line(s: Setting) -> None:
    m = lambda k: np.mean([d[k] for d in s.draws])  # noqa: E731
    print(f"[regimes] {s.name}: val member {m('val_member'):.2f} soup {m('val_soup'):.2f} "
          f"ens {m('val_ensemble'):.2f} | test member {m('test_member'):.2f} soup {m('test_soup'):.2f} "
          f"ens {m('test_ensemble'):.2f} ({len(s.draws)} ensembles, {s.seconds:.0f} s)", flush=True)


def _iv(x: dict[str, float]) -> str:
    return f"{x['mean']:+.2f} [{x['lo']:+.2f}, {x['hi']:+.2f}]"


def table(settings: list[Setting], chosen: Setting | None) -> list[str]:
    head = ("| setting | parent (test) | member | uniform avg | ensemble | headroom | soup - member "
            "| val headroom | val soup - member | rule |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in settings:
        sm = s.summary
        parent = f"{np.mean([p['test'] for p in s.parents]):.2f}" if s.parents else "-"
        ok = sm["val_soup_gain"]["mean"] >= 0.0
        rule = ("**chosen**" if s is chosen else "eligible" if ok else "avg < member") if s.kind == "soup" else "reference"
        lines.append(f"| {s.name} | {parent} | {sm['test_member']['mean']:.2f} | {sm['test_soup']['mean']:.2f} | "
                     f"{sm['test_ensemble']['mean']:.2f} | {_iv(sm['test_headroom'])} | {_iv(sm['test_soup_gain'])} | "
                     f"{_iv(sm['val_headroom'])} | {_iv(sm['val_soup_gain'])} | {rule} |")
    return lines


def write(args, settings: list[Setting], chosen: Setting | None, seconds: float) -> None:
    cmd = " ".join(["python benchmarks/regimes.py", *map(shlex.quote, sys.argv[1:])])
    where = f"{platform.machine()}, {_cpus()} CPUs, python {platform.python_version()}, one torch thread"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    given = {**vars(args), "out": str(out.resolve().relative_to(repo)) if out.resolve().is_relative_to(repo) else str(out)}
    doc = {"command": cmd, "machine": where, "seconds": seconds, "args": given,
           "chosen": chosen.name if chosen else None,
           "settings": [{"name": s.name, "kind": s.kind, "width": s.width, "parent_epochs": s.parent_epochs,
                         "lr": s.lr, "child_epochs": s.child_epochs, "seconds": s.seconds, "parents": s.parents,
                         "summary": s.summary, "draws": draw_table(s.draws)} for s in settings]}
    out.with_suffix(".json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    n = {s.kind: len(s.draws) for s in settings}
    md = [f"# Soup regimes: {args.config}, K = {args.k}", "",
          f"`{cmd}` on {where}, {seconds:.0f} s.", "",
          f"Accuracy points; every network's BatchNorm statistics recomputed on the train split. "
          f"member / uniform avg / ensemble: test split, mean over ensembles ({n.get('soup', 0)} per setting: "
          f"{args.draws} per parent x {args.parents} parents of {args.children} children each). Differences: mean "
          f"[95% two-level bootstrap interval: parents, then ensembles]. Rule: the largest VAL headroom among "
          f"settings whose VAL uniform average is at or above the VAL mean member.", "",
          *table(settings, chosen), ""]
    if chosen is None:
        best = max((s for s in settings if s.kind == "soup"), key=lambda s: s.summary["val_soup_gain"]["mean"])
        md.append(f"No setting's uniform average is at or above its mean member on val; the closest is "
                  f"{best.name} ({_iv(best.summary['val_soup_gain'])}).")
    else:
        md.append(f"Chosen: **{chosen.name}** (val headroom {_iv(chosen.summary['val_headroom'])}, val soup - member "
                  f"{_iv(chosen.summary['val_soup_gain'])}).")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def draw_table(draws: list[dict[str, Any]]) -> dict[str, Any]:
    """The ensembles' scores as columns and rows (accuracy points to 3 decimals): the
    results file stays small; headroom and soup - member follow from the three scores."""
    cols = ["group", "members", *(f"{split}_{m}" for split in ("val", "test") for m in ("member", "soup", "ensemble"))]
    return {"columns": cols, "rows": [[d[c] if c in ("group", "members") else round(d[c], 3) for c in cols]
                                      for d in draws]}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
