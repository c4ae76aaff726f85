"""The ensemble-distillation table from one run of jobs/distill.py's pipeline, the paper's
claims checked on it (``evaluation.verdict``), and each method's training step time relative to
KD's, measured in the same run.

    python benchmarks/distill.py                        # the embedded default (digits)
    python benchmarks/distill.py distill.seeds=[0,1,2]  # any config override
    python benchmarks/distill.py --render               # distill.md again from distill.json

Writes benchmarks/results/distill.json and .md. Test split; students over the config's
seeds (mean +- std); cNLL/cECE after a temperature fitted on val. Step time: one
optimiser step (teachers' forward, perturbation where the method has one, the student's
forward and backward, the update) on the default's batches, single-threaded as each
student's Ray worker runs here, median of 5 repeats of 20 steps after 5 warm-up steps.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"


def step_times(cfg, teachers: list[str], steps: int = 20, repeats: int = 5) -> dict[str, float]:
    """Seconds per training step of each method on the same batches and teachers."""
    import torch

    from metaensemble import data, methods
    from metaensemble.methods.base import freeze
    from metaensemble.models import load

    torch.set_num_threads(1)
    splits = data.load(cfg.data)
    loader = data.ArrayLoader(splits.train, splits.info, cfg.data.batch_size, shuffle=True, augment=True,
                              drop_last=True)
    batches = [b for _, b in zip(range(steps), loader, strict=False)]
    frozen = [freeze(load(u)) for u in teachers]
    out = {}
    for name in ("kd", "latentbe", "tdiv_sdiv"):
        c = cfg.with_overrides({"method": name, "distill.teachers": teachers})
        method = methods.build(c)
        method._teachers = frozen[: len(method.teacher_uris())]  # loaded once, as in a worker
        torch.manual_seed(0)
        model = method.build_model(splits.info).train()
        opt, sched = method.configure_optimizer(model, len(batches))

        def one(batch, model=model, method=method, opt=opt):
            loss, _ = method.training_step(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for b in batches[:5]:
            one(b)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                one(b)
            runs.append((time.perf_counter() - t0) / len(batches))
        out[name] = statistics.median(runs)
    return out


def markdown(result: dict) -> str:
    """The results page from ``distill.json``; the claims' verdicts are recomputed from its
    per-seed rows (``evaluation.verdict``: holds only when the paired interval over seeds
    excludes 0)."""
    from metaensemble.evaluation import SeedRow, format_seed_table
    from metaensemble.methods.latentbe.experiment import directions

    rows = [SeedRow(**r) for r in result["rows"]]
    steps, ratio, m = result["step_time_s"], result["step_time_vs_kd"], len(result["teachers"])
    lines = [
        "# Ensemble distillation on the default", "",
        f"`{result['command'].strip()}`, {result['machine']['cpus']} cores, wall {result['wall_s']:.0f} s "
        f"(MLflow parent run {result['mlflow_parent_run']}).", "",
        f"Teachers: {', '.join(result['teachers'])}. Headroom: DE-{m} is "
        f"{100 * result['headroom_acc']:.2f} points above its mean member on test.", "",
        "```", format_seed_table(rows), "```", "",
        "The paper's claims (holds: the paired 95% t-interval over seeds excludes 0; same direction, not "
        "significant: only the means agree):", "",
        *[f"- {k}: **{v}**" for k, v in directions(rows).items()], "",
        "Training step time (one optimiser step, 1 thread, median of 5 x 20 steps):", "",
        "| method | ms / step | vs KD |", "|---|---|---|",
        *[f"| {k} | {1000 * v:.2f} | {ratio[k]:.2f}x |" for k, v in steps.items()], "",
    ]
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:] == ["--render"]:  # rewrite distill.md from the measured distill.json
        (OUT / "distill.md").write_text(markdown(json.loads((OUT / "distill.json").read_text())))
        return 0
    from metaensemble.methods.latentbe import experiment
    from metaensemble.validation import load_config

    cfg = load_config("configs/distill/digits.yaml", sys.argv[1:])
    t0 = time.perf_counter()
    outcome = experiment.run(cfg)
    wall = time.perf_counter() - t0
    from metaensemble.cli import work_done

    work_done()
    teachers = [t.uri for t in outcome.teachers]
    steps = step_times(cfg, teachers)
    rows = {r.key: r for r in outcome.rows}
    result = {
        "command": "python benchmarks/distill.py " + " ".join(sys.argv[1:]),
        "config": cfg.to_dict(),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "teachers": [t.label for t in outcome.teachers],
        "rows": [r.to_dict() for r in outcome.rows],
        "directions": outcome.directions,
        "headroom_acc": rows["teacher"].mean["acc"] - rows["member"].mean["acc"],
        "step_time_s": steps,
        "step_time_vs_kd": {k: v / steps["kd"] for k, v in steps.items()},
        "wall_s": wall,
        "mlflow_parent_run": outcome.parent_run_id,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "distill.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (OUT / "distill.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
