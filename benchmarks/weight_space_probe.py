"""What single networks exist near an ensemble's weights: the headroom a parameter
generator could reach at best, measured on the zoo the meta-train job uses.

    python benchmarks/weight_space_probe.py                  # the embedded default zoo
    python benchmarks/weight_space_probe.py --ensembles 8

For random K-teacher ensembles (teachers of every side: this is an analysis, nothing is
selected), on the val and test splits, mean over ensembles:

- anchor (raw, and with BatchNorm statistics recomputed on the meta-train subset);
  every network built below has its statistics recomputed on that subset
  (``recompute_bn``, the meta-train table's one BN procedure);
- the ensemble (probability average): the target;
- naive weight average, and the average after permutation alignment of every member to
  the anchor (activation matching, Hungarian per layer; exact function-preserving
  permutations of a plain conv/linear chain), interpolated anchor -> aligned mean;
- the best single network in the span anchor + sum_k c_{k,r} (aligned teacher_k - anchor)
  with one coefficient per teacher, row and tensor, fitted per ensemble by Adam on the
  KD loss, once on the meta-train subset and once on the full train split. A generator
  that outputs such coefficients can do no better than this fit on the data it sees.

Writes benchmarks/results/weight_space_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

OUT = Path(__file__).resolve().parent / "results"


def chain_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """(conv/linear, the BatchNorm after it or None) in order, for a plain chain network;
    anything else (residual blocks, attention) is refused by the function check later."""
    mods = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d | nn.BatchNorm1d)]
    out: list[tuple[nn.Module, nn.Module | None]] = []
    for m in mods:
        if isinstance(m, nn.Conv2d | nn.Linear):
            out.append((m, None))
        elif out and out[-1][1] is None:
            out[-1] = (out[-1][0], m)
    return out


def unit_activations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per hidden layer (all but the classifier), [units, samples*positions] standardised."""
    layers = chain_layers(model)[:-1]
    acts: list[torch.Tensor] = []
    hooks = [(bn or lin).register_forward_hook(lambda m, i, o: acts.append(o)) for lin, bn in layers]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    out = []
    for a in acts:
        a = a.transpose(0, 1).reshape(a.shape[1], -1)
        out.append((a - a.mean(1, keepdim=True)) / (a.std(1, keepdim=True) + 1e-6))
    return out


def align_to(anchor_acts: list[torch.Tensor], model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every hidden layer's units permuted to best match the
    anchor's (max total activation correlation); checked to compute the same function."""
    from scipy.optimize import linear_sum_assignment

    names = {m: n for n, m in model.named_modules()}
    layers = chain_layers(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for li, (a_ref, a_mod) in enumerate(zip(anchor_acts, unit_activations(model, x), strict=True)):
        _, perm = linear_sum_assignment((a_ref @ a_mod.T).numpy(), maximize=True)
        perm = torch.as_tensor(perm)
        lin, bn = layers[li]
        for mod in (lin, bn):
            if mod is None:
                continue
            for k in ("weight", "bias", "running_mean", "running_var"):
                key = f"{names[mod]}.{k}"
                if key in state and state[key].ndim:
                    state[key] = state[key][perm]
        nxt = f"{names[layers[li + 1][0]]}.weight"
        w = state[nxt]
        groups = w.shape[1] // len(perm)  # a linear after a flatten sees units x positions
        state[nxt] = w.unflatten(1, (len(perm), groups))[:, perm].flatten(1, 2) if groups > 1 else w[:, perm]
    check = copy.deepcopy(model)
    check.load_state_dict(state)
    with torch.no_grad():
        gap = (check.eval()(x) - model.eval()(x)).abs().max().item()
    if gap > 1e-3:
        raise SystemExit(f"alignment changed the network's outputs (max |diff| {gap:.2e}): the probe needs a plain "
                         f"conv/linear chain student")
    return state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/meta/digits.yaml")
    ap.add_argument("--ensembles", type=int, default=8)
    ap.add_argument("--fit-steps", type=int, default=300)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from metaensemble import data, metrics
    from metaensemble.methods.base import predict_logp
    from metaensemble.methods.distill import ensemble_kd_loss, load_teachers
    from metaensemble.methods.weightformer.method import make_eval_loader
    from metaensemble.methods.weightformer.plan import plan as meta_plan
    from metaensemble.methods.weightformer.student import student_logits, weight_average
    from metaensemble.models import create_model
    from metaensemble.models.batchnorm import recompute_bn
    from metaensemble.validation import load_config

    t_start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    plan = meta_plan(cfg)
    spec = plan.student_spec
    teachers = [t.model.eval() for t in load_teachers([r.uri for r in plan.teachers], spec)]
    k = cfg.meta.ensemble_size
    splits = data.load(cfg.data)
    full = data.load(cfg.data.model_copy(update={"train_fraction": 1.0}))
    info = splits.info
    bn_loader = make_eval_loader(splits.train, info, 256, "cpu")
    loaders = {s: make_eval_loader(getattr(splits, s), info, 512, "cpu") for s in ("val", "test")}

    def stack(split) -> tuple[torch.Tensor, torch.Tensor]:
        bs = list(make_eval_loader(split, info, 512, "cpu"))
        return torch.cat([b["x"] for b in bs]), torch.cat([b["y"] for b in bs])

    fit_data = {"subset": stack(splits.train), "full": stack(full.train)}
    x_align = fit_data["subset"][0]

    def build(state):
        m = create_model(spec["arch"], **spec["kwargs"])
        m.load_state_dict(state)
        return m

    def score(model, recompute=True) -> dict[str, float]:
        """Test/val metrics; BN statistics recomputed on the subset first."""
        if recompute:
            model = recompute_bn(model, bn_loader)
        out = {}
        for s, ld in loaders.items():
            out.update(metrics.classification_metrics(*predict_logp(model, ld), f"{s}_"))
        return out

    def fit_mix(anchor, aligned, models, x, y, rng) -> dict[str, torch.Tensor]:
        """Per-ensemble fit of one coefficient per (teacher, row, tensor) on the KD loss."""
        skel = create_model(spec["arch"], **spec["kwargs"]).train()
        keys = [n for n, v in anchor.items() if v.is_floating_point() and v.ndim]
        coef = {n: torch.zeros(len(aligned), anchor[n].shape[0], requires_grad=True) for n in keys}
        opt = torch.optim.Adam(coef.values(), lr=0.01)
        with torch.no_grad():
            t_logits = torch.stack([m.eval()(x) for m in models])

        def state():
            out = dict(anchor)
            for n in keys:
                c = coef[n].view(len(aligned), -1, *([1] * (anchor[n].ndim - 1)))
                out[n] = anchor[n] + sum(c[i] * (aligned[i][n] - anchor[n]) for i in range(len(aligned)))
            return out

        for _ in range(args.fit_steps):
            idx = torch.as_tensor(rng.choice(len(y), min(64, len(y)), replace=False))
            loss = ensemble_kd_loss(student_logits(skel, state(), x[idx]), t_logits[:, idx], y[idx],
                                    cfg.distill.alpha, cfg.distill.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {n: v.detach() for n, v in state().items()}

    rng = np.random.default_rng(cfg.seed)
    rows: dict[str, list[dict[str, float]]] = {}

    def add(key, metrics):
        rows.setdefault(key, []).append(metrics)

    for e in range(args.ensembles):
        ens = rng.choice(len(teachers), k, replace=False).tolist()
        models = [teachers[i] for i in ens]
        anchor = {n: v.clone() for n, v in models[0].state_dict().items()}
        add("anchor", score(copy.deepcopy(models[0]), recompute=False))
        add("anchor_bn", score(copy.deepcopy(models[0])))
        ens_metrics = {}
        for s, ld in loaders.items():
            lps = [predict_logp(m, ld) for m in models]
            ens_metrics.update(metrics.classification_metrics(metrics.ensemble_logp([lp for lp, _ in lps]), lps[0][1], f"{s}_"))
        add("ensemble", ens_metrics)
        add("naive_average", score(build(weight_average([m.state_dict() for m in models]))))
        ref = unit_activations(models[0], x_align)
        aligned = [align_to(ref, m, x_align) for m in models[1:]]
        mean = weight_average([anchor, *aligned])
        for a in (0.25, 0.5, 1.0):
            st = {n: (anchor[n].float() * (1 - a) + mean[n].float() * a).to(v.dtype) if v.is_floating_point() else v
                  for n, v in anchor.items()}
            add(f"aligned_interp_{a}", score(build(st)))
        for name, (x, y) in fit_data.items():
            add(f"span_fit_{name}", score(build(fit_mix(anchor, aligned, models, x, y, rng))))
        print(f"ensemble {e + 1}/{args.ensembles} done ({time.perf_counter() - t_start:.0f}s)", flush=True)

    labels = {
        "anchor": "anchor teacher (raw)", "anchor_bn": "anchor + BN plainly recomputed", "ensemble": "ensemble (target)",
        "naive_average": "naive weight average", "aligned_interp_0.25": "aligned: 0.75 anchor + 0.25 mean",
        "aligned_interp_0.5": "aligned: 0.5 anchor + 0.5 mean", "aligned_interp_1.0": "aligned mean",
        "span_fit_subset": f"span fit on the subset ({len(fit_data['subset'][1])} examples)",
        "span_fit_full": f"span fit on full train ({len(fit_data['full'][1])} examples)",
    }
    table = {key: {m: float(np.mean([r[m] for r in rs])) for m in rs[0]} for key, rs in rows.items()}
    result = {"command": " ".join(["python", "benchmarks/weight_space_probe.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, python {platform.python_version()}",
              "zoo": f"{len(teachers)} x {spec['arch']} {spec['kwargs']}", "ensemble_size": k,
              "ensembles": args.ensembles, "fit_steps": args.fit_steps, "wall_s": time.perf_counter() - t_start,
              "rows": {key: {"label": labels[key], **v} for key, v in table.items()}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "weight_space_probe.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Weight-space probe: {result['zoo']}, K={k}, {args.ensembles} ensembles", "",
             f"`{result['command']}` on {result['machine']}, {result['wall_s']:.0f} s.", "",
             "| network | val ACC | val NLL | test ACC | test NLL |", "|---|---|---|---|---|"]
    for key, v in table.items():
        lines.append(f"| {labels[key]} | {100 * v['val_acc']:.2f} | {v['val_nll']:.3f} | {100 * v['test_acc']:.2f} | "
                     f"{v['test_nll']:.3f} |")
    (OUT / "weight_space_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
