"""The leaderboard on both zoos (issue 27): every way the platform makes one network from K.

    python benchmarks/compare.py                      # both configs below, in turn
    python benchmarks/compare.py --configs configs/compare/digits.yaml

For each config, runs the leaderboard job's pipeline in this process
(``methods.compare.experiment.run``, what ``python jobs/compare.py --config C`` runs):
it ensures the config's zoo, trains what is missing (the generator, one KD / LatentBE /
TDiv-SDiv student per held-out ensemble, the finetunes; finished runs are reused), and
scores every row on the same held-out ensembles. The configs:

- ``configs/compare/digits.yaml``: the main job's soup-regime zoo (children fine-tuned
  from one parent), K = 4, the first 10 of its 30 held-out ensembles;
- ``configs/compare/digits_indep.yaml``: a zoo of teachers from independent initial
  weights; the weight-space rows take teachers permuted onto one reference first.

Writes benchmarks/results/compare.{json,md} (``--out``): per config, the leaderboard
(mean and 95% t-interval over ensembles, paired ACC - KD), the MLflow parent run, and
this invocation's seconds (plan / train / evaluate: a run whose training was reused
shows only the evaluation; docs/compare.md gives the first run's times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
OUT = ROOT / "benchmarks" / "results" / "compare"
CONFIGS = ["configs/compare/digits.yaml", "configs/compare/digits_indep.yaml"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--out", default=str(OUT), help="results path without extension")
    args = ap.parse_args()

    from metaensemble import leaderboard as experiment
    from metaensemble import tracking
    from metaensemble.validation import load_config

    cfgs = [load_config(c) for c in args.configs]  # every config checked before any work
    for c in cfgs:
        experiment.validate(c)
    results = []
    for path, cfg in zip(args.configs, cfgs, strict=True):
        t0 = time.perf_counter()
        out = experiment.run(cfg)
        board = experiment.format_board(cfg, out.summary)
        print(f"\n## {path}\n\n{board}\n", flush=True)
        results.append({"config": path, "teacher_config": cfg.meta.teacher_config, "align": cfg.meta.align,
                        "k": cfg.meta.ensemble_size, "seconds": out.seconds, "wall_s": time.perf_counter() - t0,
                        "markdown": board, **out.to_dict()})
    write(Path(args.out), results, tracking.describe_store())
    return 0


def write(out: Path, results: list[dict], store: str) -> None:
    command = shlex.join(["python", "benchmarks/compare.py", *sys.argv[1:]])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, "results": results},
                                                   indent=1, default=float))
    md = ["# One network from K: the leaderboard", "", f"`{command}` on {machine}; MLflow: {store}.", ""]
    for r in results:
        s = r["seconds"]
        md += [f"## {r['config']} (zoo {r['teacher_config']}, meta.align={r['align']})", "", r["markdown"], "",
               f"This invocation: {r['wall_s']:.0f} s (zoo {s['plan_s']:.0f} s, training {s['train_s']:.0f} s, "
               f"evaluation {s['eval_s']:.0f} s; runs already finished in the store are reused, so a rerun "
               f"shows only the evaluation). MLflow parent run `{r['parent_run_id']}`.",
               ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    sys.exit(main())
