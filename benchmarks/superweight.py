"""SuperWeight ensembles on the digits default: jobs/superweight.py's three ensembles, the
paper's claim checked (``evaluation.verdict``, paired over seeds), and the step time of the shared ensemble.

    python benchmarks/superweight.py                 # one run of the default (about 2 min on 2 cores)
    python benchmarks/superweight.py --seeds 0 1 2   # more runs: mean +- std over seeds
    python benchmarks/superweight.py --seeds 0 1 2 --set superweight.max_params=260000 --tag budget260k

Per seed, in one private MLflow store and Ray storage under a temporary folder: the SuperWeight
ensemble, the independent ensemble of the same WRNs and the one scaled to the same
parameter count (configs/superweight/digits.yaml, nothing chosen on test). Reported: test
ACC, NLL, ECE of each ensemble and its mean member, unique parameters, FLOPs; a paired
bootstrap 95% interval over test examples of SuperWeight minus each comparison in ACC;
the headroom (independent ensemble minus its mean member); and the optimisation step time
of the SuperWeight ensemble (forward, backward, SGD step) against the four independent
WRNs stepped one after another on the same batch, at the default's batch size, in this
process with 2 torch threads. Writes benchmarks/results/superweight.json and .md
(superweight_<tag>.* with --tag; --set overrides the config, k=v as on a job's command line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
CONFIG = "configs/superweight/digits.yaml"


def bootstrap_diff(a, b, y, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap over test examples of acc(a) - acc(b): (mean, low, high) 95%."""
    import torch

    ca = (a.argmax(1) == y).double()
    cb = (b.argmax(1) == y).double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(y), (n, len(y)), generator=g)
    diffs = (ca[idx].mean(1) - cb[idx].mean(1)).sort().values
    return float((ca - cb).mean()), float(diffs[int(0.025 * n)]), float(diffs[int(0.975 * n) - 1])


def step_times(cfg, run_id: str, repeats: int = 30) -> dict[str, float]:
    """ms per optimisation step: the trained SuperWeight ensemble (its final sharing) vs
    the same WRNs as separate networks, on one digits-shaped batch."""
    import torch
    import torch.nn.functional as F

    from metaensemble.models import create_model, load

    torch.set_num_threads(2)
    sw = load(f"runs:/{run_id}/model").train()
    nets = [create_model("wrn", num_classes=10, in_chans=1, img_size=8, depth=d, widen_factor=w).train()
            for d, w in cfg.superweight.members]
    x = torch.randn(cfg.data.batch_size, 1, 8, 8)
    y = torch.randint(0, 10, (cfg.data.batch_size,))

    def timed(step) -> float:
        for _ in range(5):
            step()
        t = time.perf_counter()
        for _ in range(repeats):
            step()
        return 1000 * (time.perf_counter() - t) / repeats

    opt_sw = torch.optim.SGD(sw.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    opts = [torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9, nesterov=True) for n in nets]

    def sw_step():
        logits = sw(x)
        loss = sum(F.cross_entropy(logits[m], y) for m in range(logits.shape[0]))
        opt_sw.zero_grad()
        loss.backward()
        opt_sw.step()

    def ind_step():
        for n, o in zip(nets, opts, strict=True):
            loss = F.cross_entropy(n(x), y)
            o.zero_grad()
            loss.backward()
            o.step()

    a, b = timed(sw_step), timed(ind_step)
    return {"superweight_ms": a, "independent_ms": b, "ratio": a / b, "batch_size": cfg.data.batch_size}


def one_seed(seed: int, overrides: list[str], d: str) -> dict:
    from metaensemble.methods.superweight import experiment
    from metaensemble.validation import load_config

    cfg = load_config(CONFIG, [f"storage_path={d}/ray", f"seed={seed}", "experiment=bench/superweight",
                               *overrides])
    t0 = time.perf_counter()
    out = experiment.run(cfg)
    wall = time.perf_counter() - t0
    print(experiment.format_outcome(out), flush=True)
    sw_logp, y = out.test["superweight"]
    intervals = {k: bootstrap_diff(sw_logp, out.test[k][0], y) for k in out.test if k != "superweight"}
    steps = step_times(cfg, out.run_ids["superweight"])
    return {"seed": seed, "rows": out.rows, "members": out.members, "split": out.split, "scale": out.scale,
            "claims": out.claims, "intervals": intervals, "step": steps, "wall_s": wall}


def markdown(payload: dict) -> str:
    runs = payload["runs"]
    keys = [r["key"] for r in runs[0]["rows"]]
    label = {r["key"]: r["label"] for r in runs[0]["rows"]}

    def stat(key: str, col: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        vals = [scale * next(r for r in run["rows"] if r["key"] == key)[col] for run in runs]
        s = fmt.format(statistics.fmean(vals))
        return s + (f" +- {fmt.format(statistics.stdev(vals))}" if len(vals) > 1 else "")

    lines = [f"# SuperWeight ensembles on digits ({len(runs)} run{'s' * (len(runs) > 1)})", "",
             f"`{payload.get('command', 'python benchmarks/superweight.py')}` on {payload['machine']}; config `{CONFIG}`"
             f"{' with ' + ' '.join(payload['overrides']) if payload.get('overrides') else ''}; test split (359 "
             f"images); nothing selected on test.", "",
             "| ensemble | ACC | NLL | ECE | mean member ACC | unique params | MFLOPs/image | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for k in keys:
        lines.append(f"| {label[k]} | {stat(k, 'acc', 100)} | {stat(k, 'nll', 1, '{:.4f}')} | "
                     f"{stat(k, 'ece', 1, '{:.4f}')} | {stat(k, 'member_acc', 100)} | {stat(k, 'params', 1, '{:,.0f}')} | "
                     f"{stat(k, 'gflops', 1e3)} | {stat(k, 'train_s', 1, '{:.0f}')} |")
    lines += ["", "Paired bootstrap over test examples (2,000 resamples), SuperWeight minus each, ACC points:", ""]
    for run in runs:
        for k, (m, lo, hi) in run["intervals"].items():
            lines.append(f"- seed {run['seed']}, minus {label[k]}: {100 * m:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]")
    lines += ["", "Members (test ACC):", ""]
    for run in runs:
        for k, ms in run["members"].items():
            lines.append(f"- seed {run['seed']}, {label[k]}: " + "; ".join(f"{m['member']} {100 * m['acc']:.2f}" for m in ms))
    lines += ["", "Learned sharing and step time:", ""]
    for run in runs:
        s, st = run["split"], run["step"]
        lines.append(f"- seed {run['seed']}: {s['groups']} groups, {s['slots']} coefficient slots, {s['templates']} "
                     f"templates per bank; scaled widths x {run['scale']:.3f}; step {st['superweight_ms']:.1f} ms "
                     f"(SuperWeight) vs {st['independent_ms']:.1f} ms (four independent WRNs), ratio {st['ratio']:.2f} "
                     f"at batch {st['batch_size']}; whole run {run['wall_s']:.0f} s")
    from metaensemble.methods.superweight.experiment import claims

    lines += ["", "Claims (the paper: better than the independent ensemble with fewer parameters; holds: the "
              f"paired 95% t-interval over the {len(runs)} seed{'s' * (len(runs) > 1)} excludes 0 (a single seed never "
              "does); same direction, not significant: only the means agree):", ""]
    for claim, v in claims([run["rows"] for run in runs]).items():
        lines.append(f"- {claim}: **{v}**")
    head = [next(r for r in run["rows"] if r["key"] == "independent") for run in runs]
    room = statistics.fmean(100 * (h["acc"] - h["member_acc"]) for h in head)
    lines += ["", f"Headroom: the independent ensemble is {room:.2f} points above its mean member."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", nargs="*", default=[], metavar="K=V", help="config overrides")
    ap.add_argument("--tag", default="", help="write superweight_<tag>.{json,md}")
    ap.add_argument("--render", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args()
    name = f"superweight_{args.tag}" if args.tag else "superweight"
    if args.render:
        (OUT / f"{name}.md").write_text(markdown(json.loads((OUT / f"{name}.json").read_text())))
        return 0
    import atexit
    import shutil
    import sys

    # A private MLflow store (database and artifacts) and Ray storage, removed at exit
    # after the store's server has stopped (atexit runs the last registered first).
    d = tempfile.mkdtemp(prefix="bench-superweight-")
    atexit.register(shutil.rmtree, d, True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["METAENSEMBLE_MLFLOW_HOME"] = f"{d}/mlflow"
    runs = [one_seed(s, args.set, d) for s in args.seeds]
    payload = {"machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}", "runs": runs,
               "overrides": args.set, "command": "python " + " ".join(["benchmarks/superweight.py", *sys.argv[1:]])}
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (OUT / f"{name}.md").write_text(markdown(payload))
    print((OUT / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
