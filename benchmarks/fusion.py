"""Fusion on digits, repeated over parent seeds: jobs/fuse.py's pipeline on three settings
and its two other experiments, with the papers' claims checked (``evaluation.verdict``,
paired over the repeats).

    python benchmarks/fusion.py                 # 3 repeats (parent seeds) per setting
    python benchmarks/fusion.py --repeats 5

Settings (configs/fusion/*.yaml, each repeat with other parents):
- mlp_hetero   digits_mlp.yaml       MLPs of 6 and 4 hidden layers: CLA + OT (the default)
- mlp_same     digits_mlp_same.yaml  two 6-hidden-layer MLPs: OT, and the naive average
- vgg_hetero   digits_vgg.yaml       BN VGG-style nets of 6 and 3 convs: CLA + OT
- skill        digits_skill_transfer.yaml   label 4 + 10% of the rest vs the other 90%
- transfer     digits_transfer.yaml  the deep MLP's depth from the shallow parent vs scratch

Writes benchmarks/results/fusion.json and .md: per setting and row, test ACC and NLL as
mean +- std over repeats, the fusion's wall time, and the claims: one-shot fusion far
above the naive average (same architecture), and after finetuning at or above the
better parent. No choice is made on test: every setting runs with its config's values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "mlp_hetero": ("configs/fusion/digits_mlp.yaml", 1),
    "mlp_same": ("configs/fusion/digits_mlp_same.yaml", 2),
    "vgg_hetero": ("configs/fusion/digits_vgg.yaml", 1),
    "transfer": ("configs/fusion/digits_transfer.yaml", 1),
    "skill": ("configs/fusion/digits_skill_transfer.yaml", 2),
}


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--render", action="store_true",
                    help="rewrite fusion.md (claims included) from the measured fusion.json, without running")
    args = ap.parse_args()
    if args.render:
        payload = json.loads((OUT / "fusion.json").read_text())
        payload["claims"] = {**check(payload["settings"]), **timing_claim(payload.get("cifar_timing"))}
        (OUT / "fusion.json").write_text(json.dumps(payload, indent=2))
        (OUT / "fusion.md").write_text(markdown(payload))
        return 0
    from metaensemble.methods.fusion import experiment
    from metaensemble.teachers import zoo_teachers
    from metaensemble.validation import load_config

    t_all = time.perf_counter()
    results: dict[str, dict] = {}
    for name, (path, step) in SETTINGS.items():
        base = load_config(path)
        # every repeat's parents first, in one pack per recipe (not one Ray run per seed)
        recipes: dict[str, tuple] = {}
        for rep in range(args.repeats):
            for r in experiment.parent_recipes(base.with_overrides({"fusion.parent_seed": step * rep})):
                n = max(recipes.get(r.config_hash(), (r, 0))[1], r.zoo.first_seed + 1)
                recipes[r.config_hash()] = (r, n)
        for r, n in recipes.values():
            zoo_teachers(r.with_overrides({"zoo.first_seed": 0}), n)
        per_row: dict[str, dict[str, list[float]]] = {}
        labels: dict[str, str] = {}
        extra: list[dict] = []
        for rep in range(args.repeats):
            cfg = base.with_overrides({"fusion.parent_seed": step * rep, "seed": rep})
            t0 = time.perf_counter()
            out = experiment.run(cfg)
            wall = time.perf_counter() - t0
            for r in out.rows:
                d = per_row.setdefault(r.key, {"acc": [], "nll": [], "train_s": []})
                d["acc"].append(100 * r.mean["acc"])
                d["nll"].append(r.mean["nll"])
                d["train_s"].append(r.train_s)
                labels[r.key] = r.label
            for label, a in out.extra.get("label_accuracies", {}).items():
                key = out.extra["label_keys"][label]
                for k, v in a.items():
                    per_row[key].setdefault(k, []).append(100 * v)
            extra.append({"parents": [p.label for p in out.parents], "seconds": out.extra["seconds"],
                          "alignment": out.extra.get("alignment"), "job_wall_s": wall})
            print(f"[{name} repeat {rep}] {wall:.0f}s\n{experiment.format_outcome(out)}\n", flush=True)
        results[name] = {"config": path, "labels": labels,
                         "rows": {k: {m: summary(v) for m, v in d.items()} for k, d in per_row.items()},
                         "repeats": extra}
    timing = cifar_timing()
    claims = {**check(results), **timing_claim(timing)}
    payload = {"settings": results, "claims": claims, "repeats": args.repeats, "cifar_timing": timing,
               "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
               "command": "python benchmarks/fusion.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
               "wall_s": time.perf_counter() - t_all}
    OUT.mkdir(exist_ok=True)
    (OUT / "fusion.json").write_text(json.dumps(payload, indent=2))
    (OUT / "fusion.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


CHILD = """
import json, resource, sys, time, torch
from metaensemble.validation import load_config
from metaensemble import data
from metaensemble.models import create_model
from metaensemble.methods.fusion.pipeline import fuse_parents
from metaensemble.methods.fusion.structure import generic_spec
torch.manual_seed(0)
cfg = load_config("configs/fusion/cifar10_resnet34_18.yaml", [
    "data.name=synthetic", "data.root=null", "data.num_samples=2000", "data.channels=3", "data.image_size=32",
    "data.val_fraction=0.1", "fusion.bn_samples=1000"])
splits = data.load(cfg.data)
nets = [create_model(a, num_classes=10, in_chans=3, img_size=32).eval() for a in ("resnet34", "resnet18")]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
fused = fuse_parents(nets, cfg.fusion, splits.train, splits.info)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"fusion_s": dt, "peak_rss_mib": peak / 1024, "before_fusion_rss_mib": base / 1024,
                  "threads": torch.get_num_threads(), "mapping": {str(k): v.mapping for k, v in fused.alignments.items()},
                  "fused_arch": fused.model.me_spec["arch"], "layers": generic_spec(fused.model.me_spec)["kwargs"]["layers"],
                  "settings": "resnet34 + resnet18 (width 64, BN, CIFAR stem), 3x32x32, 10 classes, "
                              "configs/fusion/cifar10_resnet34_18.yaml's fusion options (activation metric, "
                              "200 samples, exact EMD, squared width cost, each stage's first and last block "
                              "pinned, the ResNet-18 as anchor), BatchNorm statistics on 1000 "
                              "synthetic images; random weights (timing only)"}))
"""


def cifar_timing() -> dict:
    """CLAFusion of a ResNet-34 and a ResNet-18 at CIFAR shapes in a fresh process (its
    peak RSS is the fusion's), on synthetic images: alignment, OT fusion, BatchNorm."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parents[1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def timing_claim(timing: dict | None) -> dict[str, dict]:
    """The CLAFusion time at CIFAR shapes against its 60 s target (one measurement: exact)."""
    if not timing:
        return {}
    from metaensemble.evaluation import paired_interval, verdict

    return {"CLAFusion of ResNet-18 + ResNet-34 at CIFAR shapes under 60 s on 2 cores": {
        "verdict": verdict(paired_interval(timing["fusion_s"], 60.0, exact=True), "lower"),
        "fusion_s": timing["fusion_s"], "peak_rss_mib": timing["peak_rss_mib"]}}


def check(results: dict) -> dict[str, dict]:
    """The papers' claims with the numbers they rest on, each with its
    ``evaluation.verdict`` paired over the repeats (parent seeds): holds only when the
    paired 95% t-interval of the difference excludes 0."""
    from metaensemble.evaluation import paired_interval, verdict

    def above(a: list[float], b: list[float], margin: float = 0.0) -> str:
        return verdict(paired_interval([x - margin for x in a], b), "higher")

    out = {}
    for name, shot, what in (("mlp_same", "ot", "OT one-shot far above the naive average (same architecture)"),
                             ("mlp_hetero", "cla", "mlp_hetero: CLA one-shot far above the naive average of the "
                                                   "depth-balanced parents"),
                             ("vgg_hetero", "cla", "vgg_hetero: CLA one-shot far above the naive average of the "
                                                   "depth-balanced parents")):
        rows = results.get(name, {}).get("rows", {})
        if shot in rows and "naive" in rows:
            out[what] = {"verdict": above(rows[shot]["acc"]["values"], rows["naive"]["acc"]["values"], 10.0),
                         shot: rows[shot]["acc"]["mean"], "naive": rows["naive"]["acc"]["mean"],
                         "rule": "more than 10 points"}
    for name in ("mlp_hetero", "mlp_same", "vgg_hetero"):
        rows = results.get(name, {}).get("rows", {})
        ft = next((k for k in rows if k.endswith("_finetune")), None)
        if ft and "parent0" in rows:
            best = [max(a, b) for a, b in zip(rows["parent0"]["acc"]["values"], rows["parent1"]["acc"]["values"],
                                              strict=True)]
            diff = [f - b for f, b in zip(rows[ft]["acc"]["values"], best, strict=True)]
            out[f"{name}: finetuned fusion at or above the better parent"] = {
                "verdict": above(rows[ft]["acc"]["values"], best), "finetuned": rows[ft]["acc"]["mean"],
                "better_parent": statistics.fmean(best), "diff_per_repeat": diff}
        if ft and "kd" in rows:
            out[f"{name}: finetuned fusion above KD into the fused shape (same epochs)"] = {
                "verdict": above(rows[ft]["acc"]["values"], rows["kd"]["acc"]["values"]),
                "finetuned": rows[ft]["acc"]["mean"], "kd": rows["kd"]["acc"]["mean"]}
    tr = results.get("transfer", {}).get("rows", {})
    if "from_shallow" in tr:
        out["transfer: initialised from the shallow parent above from scratch"] = {
            "verdict": above(tr["from_shallow"]["acc"]["values"], tr["scratch"]["acc"]["values"]),
            "from_shallow": tr["from_shallow"]["acc"]["mean"], "scratch": tr["scratch"]["acc"]["mean"]}
    sk = results.get("skill", {}).get("rows", {})
    if "ot" in sk:
        out["skill transfer: fused one-shot knows label 4 better than parent B"] = {
            "verdict": above(sk["ot"]["acc_special"]["values"], sk["parent_b"]["acc_special"]["values"]),
            "fused": sk["ot"]["acc_special"]["mean"], "parent_b": sk["parent_b"]["acc_special"]["mean"]}
    return out


def markdown(p: dict) -> str:
    lines = [f"# Fusion on digits ({p['repeats']} repeats over parent seeds)", "",
             f"Command: `{p['command']}` on {p['machine']}; wall time {p['wall_s'] / 60:.1f} min. Test split, "
             f"mean +- std over repeats; one-shot rows with BatchNorm statistics recomputed on the train split.", ""]
    for name, r in p["settings"].items():
        lines += [f"## {name} ({r['config']})", "", "| row | ACC (%) | NLL | train s |", "|---|---|---|---|"]
        for k, d in r["rows"].items():
            ts = d["train_s"]["mean"]
            lines.append(f"| {r['labels'][k]} | {d['acc']['mean']:.2f} +- {d['acc']['std']:.2f} | "
                         f"{d['nll']['mean']:.4f} +- {d['nll']['std']:.4f} | {ts:.1f} |" if ts else
                         f"| {r['labels'][k]} | {d['acc']['mean']:.2f} +- {d['acc']['std']:.2f} | "
                         f"{d['nll']['mean']:.4f} +- {d['nll']['std']:.4f} | - |")
        if any("acc_special" in d for d in r["rows"].values()):
            lines += ["", "| row | label 4 (%) | other labels (%) | all (%) |", "|---|---|---|---|"]
            for k, d in r["rows"].items():
                if "acc_special" in d:
                    lines.append(f"| {r['labels'][k]} | {d['acc_special']['mean']:.2f} +- {d['acc_special']['std']:.2f} | "
                                 f"{d['acc_others']['mean']:.2f} +- {d['acc_others']['std']:.2f} | "
                                 f"{d['acc_all']['mean']:.2f} +- {d['acc_all']['std']:.2f} |")
        fs = [x["seconds"].get("fusion_s") for x in r["repeats"] if x["seconds"].get("fusion_s") is not None]
        if fs:
            lines += ["", f"Fusion (alignment + OT + BatchNorm statistics) wall time: "
                          f"{statistics.fmean(fs):.2f} s per repeat."]
        lines.append("")
    t = p.get("cifar_timing")
    if t:
        lines += ["## CLAFusion at CIFAR shapes", "", f"{t['settings']}: fused into `{t['fused_arch']}` "
                  f"layers {t['layers']} in **{t['fusion_s']:.1f} s**, peak RSS {t['peak_rss_mib']:.0f} MiB "
                  f"({t['before_fusion_rss_mib']:.0f} MiB before fusing), {t['threads']} threads.", ""]
    lines += ["## Claims", "", "Holds: the paired 95% t-interval over the repeats (parent seeds) excludes 0; same "
              "direction, not significant: only the means agree.", ""]
    for k, v in p["claims"].items():
        nums = ", ".join(f"{a} {b:.2f}" for a, b in v.items() if isinstance(b, float))
        lines.append(f"- {k}: **{v['verdict']}** ({nums})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from metaensemble.cli import run_job

    run_job(main)
