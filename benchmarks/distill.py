"""The ensemble-distillation table from one run of jobs/distill.py's pipeline, the paper's
directions checked on it (met or not), and each method's training step time relative to
KD's, measured in the same run.

    python benchmarks/distill.py                        # the embedded default (digits)
    python benchmarks/distill.py distill.seeds=[0,1,2]  # any config override

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


def main() -> int:
    from metaensemble.evaluation import format_seed_table
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
    ratio = {k: v / steps["kd"] for k, v in steps.items()}
    table = format_seed_table(outcome.rows)
    rows = {r.key: r for r in outcome.rows}
    headroom = rows["teacher"].mean["acc"] - rows["member"].mean["acc"]
    result = {
        "command": "python benchmarks/distill.py " + " ".join(sys.argv[1:]),
        "config": cfg.to_dict(),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "teachers": [t.label for t in outcome.teachers],
        "rows": [r.to_dict() for r in outcome.rows],
        "directions": outcome.directions,
        "headroom_acc": headroom,
        "step_time_s": steps,
        "step_time_vs_kd": ratio,
        "wall_s": wall,
        "mlflow_parent_run": outcome.parent_run_id,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "distill.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Ensemble distillation on the default", "",
        f"`{result['command'].strip()}`, {result['machine']['cpus']} cores, wall {wall:.0f} s "
        f"(MLflow parent run {outcome.parent_run_id}).", "",
        f"Teachers: {', '.join(result['teachers'])}. Headroom: DE-{len(teachers)} is "
        f"{100 * headroom:.2f} points above its mean member on test.", "",
        "```", table, "```", "",
        "The paper's directions (on the means):", "",
        *[f"- {k}: **{'holds' if v else 'does not hold'}**" for k, v in outcome.directions.items()], "",
        "Training step time (one optimiser step, 1 thread, median of 5 x 20 steps):", "",
        "| method | ms / step | vs KD |", "|---|---|---|",
        *[f"| {k} | {1000 * v:.2f} | {ratio[k]:.2f}x |" for k, v in steps.items()], "",
    ]
    (OUT / "distill.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
