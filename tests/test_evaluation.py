"""The shared results table: measurements, row means, the text table, the chart, and
what lands in an MLflow run (a real local MLflow server)."""

from __future__ import annotations

import json
import math
import sys
import uuid
from pathlib import Path

import pytest
import torch

from metaensemble.evaluation import (
    Row,
    bar_chart,
    format_table,
    log_table,
    mean_metrics,
    mean_row,
    measure,
    table_columns,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _rows() -> list[Row]:
    return [
        mean_row(
            "ensemble",
            "ensemble (prob. average)",
            [
                {"acc": 0.9, "nll": 0.3, "ece": 0.02, "time_s": 0.0},
                {"acc": 0.8, "nll": 0.5, "ece": 0.04, "time_s": 0.0},
            ],
        ),
        mean_row(
            "student",
            "  ablation: student",
            [{"acc": 0.75, "nll": 0.6, "ece": 0.05, "time_s": 2.5}],
        ),
    ]


def test_measure_reads_accuracy_nll_ece_from_log_probs():
    # 3 of 4 right; the right ones with p = 0.9, the wrong one with p(true) = 0.2
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.8, 0.2]])
    y = torch.tensor([0, 1, 0, 1])
    m = measure(p.log(), y, 1.5)
    assert m["acc"] == pytest.approx(0.75)
    assert m["nll"] == pytest.approx(-(3 * math.log(0.9) + math.log(0.2)) / 4, rel=1e-5)
    assert 0.0 <= m["ece"] <= 1.0 and m["time_s"] == 1.5


def test_mean_row_averages_each_metric_and_keeps_per_unit_accuracies():
    r = _rows()[0]
    assert (r.key, r.label, r.n) == ("ensemble", "ensemble (prob. average)", 2)
    assert (
        r.acc == pytest.approx(0.85)
        and r.nll == pytest.approx(0.4)
        and r.ece == pytest.approx(0.03)
    )
    assert r.accs == [0.9, 0.8]
    assert mean_metrics(
        [
            {"acc": 1.0, "nll": 0.0, "ece": 0.0, "time_s": 4.0},
            {"acc": 0.0, "nll": 2.0, "ece": 1.0, "time_s": 0.0},
        ]
    ) == {"acc": 0.5, "nll": 1.0, "ece": 0.5, "time_s": 2.0}
    with pytest.raises(ValueError, match="no measurements"):
        mean_row("x", "x", [])


def test_format_table_prints_percent_accuracy_in_fixed_columns():
    lines = format_table(_rows()).splitlines()
    assert lines[0].split() == ["method", "ACC", "NLL", "ECE", "time", "(s)", "n"]
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    assert lines[2].startswith("ensemble (prob. average)") and lines[2].split()[-5:] == [
        "85.00",
        "0.4000",
        "0.0300",
        "0.000",
        "2",
    ]
    assert lines[3].startswith("  ablation: student")  # indentation of a label is kept
    assert lines[3].split()[-5:] == ["75.00", "0.6000", "0.0500", "2.500", "1"]
    assert len({len(x) for x in lines[2:]}) == 1  # columns line up


def test_bar_chart_writes_a_png(tmp_path):
    path = bar_chart(_rows(), tmp_path / "bars.png", "a title", highlight=["student"])
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_bars_carry_their_intervals_on_honest_axes():
    """Every bar with its 95% t-interval over the row's units; accuracy from 0 to 100; a
    row that cost 0 s is said, not drawn as a tiny bar; the highlight colour has a legend."""
    from metaensemble.evaluation import bar_figure, half_interval, mean_row, paired_interval

    per = [{"acc": a, "nll": n, "ece": e, "time_s": 0.0} for a, n, e in ((0.8, 0.5, 0.05), (0.9, 0.3, 0.07),
                                                                         (0.85, 0.4, 0.02))]
    rows = [mean_row("ensemble", "ensemble", per),
            mean_row("student", "student", [{**p, "time_s": 2.0} for p in per])]
    fig = bar_figure(rows, highlight=["student"])
    acc_ax, nll_ax, _ece_ax, time_ax = fig.axes[:4]
    assert acc_ax.get_xlim() == (0.0, 100.0)
    d = paired_interval([0.5, 0.3, 0.4], 0.0)
    assert half_interval([0.5, 0.3, 0.4]) == pytest.approx(d.hi - d.mean)
    (err,) = [c for c in nll_ax.containers if hasattr(c, "lines") and c.lines[1]]  # the error bars
    seg = err.lines[2][0].get_segments()[0]  # row 0's horizontal error segment
    assert seg[1][0] - seg[0][0] == pytest.approx(2 * (d.hi - d.mean))
    assert len(time_ax.patches) == 1 and any(t.get_text().strip() == "0 s" for t in time_ax.texts)
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "this job's method" in labels
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_reliability_panels_show_the_tables_ece_and_a_legend_for_every_mark():
    from metaensemble.evaluation import reliability_figure

    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(300, 5, generator=g) * 3, 1)
    y = torch.randint(0, 5, (300,), generator=g)
    fig = reliability_figure({"KD": (logp, y), "LatentBE": (logp, y)}, ece={"KD": 0.1234})
    titles = [ax.get_title() for ax in fig.axes]
    assert "ECE 0.1234 (table: mean over units)" in titles[0] and "(pooled bins)" in titles[1]
    handles, labels = fig.axes[0].get_legend_handles_labels()
    assert sorted(labels) == ["accuracy", "calibrated", "mean confidence"]  # every mark drawn is named
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_table_columns_are_parallel_lists():
    cols = table_columns(_rows())
    assert cols["method"] == ["ensemble (prob. average)", "ablation: student"]
    assert cols["key"] == ["ensemble", "student"] and cols["n"] == [2, 1]
    assert {len(v) for v in cols.values()} == {2}


def test_log_table_puts_the_table_chart_and_metrics_in_the_run(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_uri)
    exp = c.create_experiment(f"test/eval-{uuid.uuid4().hex[:6]}")
    run_id = c.create_run(exp).info.run_id
    rows = _rows()
    written = log_table(c, run_id, rows, "digits: a table", highlight=["student"])

    arts = {a.path for a in c.list_artifacts(run_id)}
    assert (
        set(written)
        == arts
        == {"eval_table.md", "eval_table.json", "eval_bars.png", "eval_table_mlflow.json"}
    )
    get = lambda name: Path(c.download_artifacts(run_id, name, str(tmp_path)))  # noqa: E731
    assert get("eval_bars.png").read_bytes()[:8] == PNG
    md = get("eval_table.md").read_text()
    assert md.startswith("digits: a table") and format_table(rows) in md
    back = [Row(**d) for d in json.loads(get("eval_table.json").read_text())]
    assert back == rows
    table = json.loads(get("eval_table_mlflow.json").read_text())  # MLflow's split-orient table
    assert table["columns"][:2] == ["method", "key"] and len(table["data"]) == 2
    m = c.get_run(run_id).data.metrics
    assert m["ensemble_acc"] == pytest.approx(0.85) and m["student_time_s"] == pytest.approx(2.5)


def test_log_table_under_another_name_leaves_eval_artifacts_alone(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(mlflow_uri)
    run_id = c.create_run(c.create_experiment(f"test/eval-{uuid.uuid4().hex[:6]}")).info.run_id
    log_table(c, run_id, _rows(), "t", name="fusion", metrics=False)
    assert {a.path for a in c.list_artifacts(run_id)} == {
        "fusion_table.md",
        "fusion_table.json",
        "fusion_bars.png",
        "fusion_table_mlflow.json",
    }
    assert c.get_run(run_id).data.metrics == {}


def test_seed_rows_report_the_mean_and_sample_std_over_seeds():
    from metaensemble.evaluation import COLUMNS, format_seed_table, seed_row

    per = [{k: v for k in (*COLUMNS, "temperature")} for v in (0.5, 0.7, 0.9)]
    row = seed_row("kd", "Student KD", per, train_s=3.0)
    assert row.mean["acc"] == pytest.approx(0.7) and row.std["nll"] == pytest.approx(0.2)  # ddof 1
    text = format_seed_table([row, seed_row("teacher", "Teacher DE-4", per[:1])])
    assert "70.00 +- 20.00" in text and "0.7000 +- 0.2000" in text
    assert "Teacher DE-4" in text and "+-" not in text.splitlines()[-1]  # one value: no spread


def test_calibrated_columns_and_the_reliability_diagram(tmp_path):
    from metaensemble import metrics
    from metaensemble.evaluation import calibrated_columns, reliability_diagram

    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 5, generator=g) * 3
    y = torch.distributions.Categorical(logits=z / 2).sample()  # true temperature 2
    logp = torch.log_softmax(z, 1)
    cols = calibrated_columns((logp[:200], y[:200]), (logp[200:], y[200:]))
    report = metrics.calibrated_report(logp[:200], y[:200], logp[200:], y[200:])
    assert cols["cnll"] == report["test_cnll"] and cols["acc"] == report["test_acc"]
    assert cols["temperature"] > 1.3 and cols["cnll"] < cols["nll"]
    png = reliability_diagram({"a": (logp, y), "b": (logp / 2, y)}, tmp_path / "r.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- verdicts on the papers' claims: paired over seeds ------------------------------------------
KD_NLL = [0.2589, 0.2883, 0.2681, 0.2894, 0.2752]
LATENTBE_NLL = [0.2588, 0.2923, 0.2734, 0.2696, 0.2411]
"""The distillation benchmark's test NLL per seed (benchmarks/results/distill.json)."""


def _t(d) -> float:
    import numpy as np

    d = np.asarray(d, dtype=float)
    return float(d.mean() / (d.std(ddof=1) / np.sqrt(len(d))))


def test_paired_interval_is_the_student_t_interval_over_seeds():
    from metaensemble.evaluation import paired_interval

    a, b = [1.0, 2.0, 4.0, 3.0, 5.0], [0.5, 1.0, 1.0, 2.5, 1.0]
    d = paired_interval(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    half = 2.7764451051977987 * torch.tensor(diffs).std().item() / math.sqrt(5)  # t(0.975, 4 df)
    assert d.n == 5 and d.mean == pytest.approx(sum(diffs) / 5)
    assert (d.lo, d.hi) == (pytest.approx(d.mean - half), pytest.approx(d.mean + half))
    one = paired_interval([0.3, 0.5, 0.4], 0.1)  # one number against every seed (a single DE-M)
    assert one.mean == pytest.approx(0.3) and one.n == 3
    assert paired_interval([0.3, 0.5, 0.4], 0.1).lo == pytest.approx(-paired_interval(0.1, [0.3, 0.5, 0.4]).hi)
    assert math.isinf(paired_interval([0.9], [0.1]).lo)  # one seed establishes nothing
    assert paired_interval([5.0], [7.0], exact=True).hi == -2.0  # no seed noise: the value itself


def test_verdict_holds_only_when_the_interval_over_seeds_excludes_zero():
    """The issue's case: LatentBE minus KD in NLL, t = -1.16 over 5 seeds, is noise: the
    means agree with the claim (lower), the interval contains 0: not 'holds'."""
    from metaensemble.evaluation import FAILS, HOLDS, NOT_SIGNIFICANT, paired_interval, verdict

    kd = KD_NLL
    latentbe = LATENTBE_NLL
    diffs = [x - y for x, y in zip(latentbe, kd, strict=True)]
    assert _t(diffs) == pytest.approx(-1.16, abs=0.01)
    d = paired_interval(latentbe, kd)
    assert d.mean < 0 < d.hi
    assert verdict(d, "lower") == NOT_SIGNIFICANT != HOLDS
    assert verdict(d, "higher") == FAILS
    # the same mean difference over seeds that agree: the interval excludes 0
    tight = [k - 0.009 + 0.001 * (i % 2) for i, k in enumerate(kd)]
    assert verdict(paired_interval(tight, kd), "lower") == HOLDS
    # a claim over several differences holds only if every one does
    assert verdict([paired_interval(tight, kd), d], "lower") == NOT_SIGNIFICANT
    assert verdict([paired_interval(tight, kd), paired_interval(kd, tight)], "lower") == FAILS
    assert verdict(paired_interval([1.0], [0.0]), "higher") == NOT_SIGNIFICANT  # one seed
    assert verdict(paired_interval(10, 20, exact=True), "lower") == HOLDS  # e.g. parameter counts
    with pytest.raises(ValueError, match="better"):
        verdict(d, "smaller")


def test_the_distillation_claims_table_uses_the_verdict_rule():
    """Every claim of jobs/distill.py's table (distill_table.md, the MLflow artifact, the
    benchmark's results) is judged by evaluation.verdict on the per-seed rows."""
    from metaensemble.evaluation import COLUMNS, seed_row
    from metaensemble.methods.latentbe.experiment import directions

    def rows(kd_nll, lbe_nll, td_nll):
        per = lambda nll, acc: [{**{k: 0.1 for k in (*COLUMNS, "temperature")}, "acc": acc, "nll": v}  # noqa: E731
                                for v in nll]
        return [seed_row("teacher", "Teacher DE-4", per([0.15], 0.97)),
                seed_row("kd", "Student KD", per(kd_nll, 0.92)),
                seed_row("latentbe", "+ LatentBE", per(lbe_nll, 0.925)),
                seed_row("tdiv_sdiv", "+ TDiv-SDiv", per(td_nll, 0.93))]

    kd, noisy = KD_NLL, LATENTBE_NLL  # t = -1.16
    out = directions(rows(kd, noisy, [v - 0.05 for v in noisy]))
    assert out["LatentBE at or above KD in NLL"] == "same direction, not significant"
    assert out["TDiv-SDiv best student in NLL"] == "holds"
    assert out["every student below DE-M"] == "holds"
    assert set(out.values()) <= {"holds", "same direction, not significant", "does not hold"}
    out = directions(rows(kd, [v - 0.02 for v in kd], [v + 0.01 for v in kd]))
    assert out["LatentBE at or above KD in NLL"] == "holds"
    assert out["TDiv-SDiv best student in NLL"] == "does not hold"


def test_the_superweight_claims_table_uses_the_verdict_rule():
    """One run (one seed) cannot establish the accuracy claims; parameter counts are exact;
    over seeds the paired interval decides."""
    from metaensemble.methods.superweight.experiment import claims

    def run(sw_acc: float, ind_acc: float) -> list[dict]:
        return [{"key": "superweight", "acc": sw_acc, "nll": 0.2, "params": 100},
                {"key": "independent", "acc": ind_acc, "nll": 0.3, "params": 200}]

    one = claims([run(0.95, 0.90)])
    assert one["SuperWeight ACC above Independent, same WRNs"] == "same direction, not significant"
    assert one["SuperWeight has fewer parameters than the independent ensemble"] == "holds"
    three = claims([run(0.95, 0.90), run(0.96, 0.90), run(0.955, 0.91)])
    assert three["SuperWeight ACC above Independent, same WRNs"] == "holds"
    assert three["SuperWeight NLL below Independent, same WRNs"] == "holds"
    assert claims([run(0.90, 0.95)])["SuperWeight ACC above Independent, same WRNs"] == "does not hold"


def _benchmark(name: str):
    """A script of benchmarks/ loaded as a module (its main() is not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / f"benchmarks/{name}.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_the_regimes_rule_and_the_main_jobs_zoo_are_the_committed_tables_choice():
    """benchmarks/regimes.py's rule: the largest VAL headroom among soup settings whose VAL
    uniform average is at or above the VAL mean member (test never chooses); and the main
    job's zoo recipe is the setting that rule picks from the committed table with the
    learning rate as a grid axis."""
    import json

    from metaensemble.validation import load_config

    bench = _benchmark("regimes")

    def setting(width: int, headroom: float, gain: float, test_headroom: float = 0.0):
        s = bench.Setting("soup", width, 8, 0.1, 5)
        s.summary = {"val_headroom": {"mean": headroom}, "val_soup_gain": {"mean": gain},
                     "test_headroom": {"mean": test_headroom}, "test_soup_gain": {"mean": 1.0}}
        return s

    a, b, c = setting(4, 2.0, 0.1), setting(8, 3.0, -0.01, test_headroom=9.0), setting(16, 1.0, 0.0, 5.0)
    assert bench.choose([a, b, c]) is a  # b: the largest headroom, but its average is below its member
    assert bench.choose([c, b]) is c  # an average level with the member is eligible
    assert bench.choose([b]) is None

    doc = json.loads(Path(__file__).parents[1].joinpath("benchmarks/results/regimes_lr.json").read_text())
    settings = []
    for d in doc["settings"]:
        s = bench.Setting(d["kind"], d["width"], d["parent_epochs"], d["lr"], d["child_epochs"])
        s.summary = d["summary"]
        settings.append(s)
    chosen = bench.choose([s for s in settings if s.kind == "soup"])
    assert chosen.name == doc["chosen"]
    meta = load_config("configs/meta/digits.yaml")
    recipe = load_config(meta.meta.teacher_config)
    soup = recipe.zoo.soup
    assert soup.parents == 1 and "lr" not in soup.child["optim"]
    assert (recipe.model.kwargs["width"], recipe.train.epochs, soup.grid["optim"]["lr"], soup.child["train"]["epochs"]) == (
        chosen.width, chosen.parent_epochs, chosen.lr, chosen.child_epochs)


def test_the_regimes_recipes_are_the_zoo_recipes_they_name():
    """regimes.py's settings are the zoo's own recipes, from either shipped recipe as its
    --config: one learning rate (the child's) gives the lr-0.1 zoo, learning rates as a
    grid axis give the default; a recipe's own rate, child's or grid's, never stays."""
    from metaensemble.validation import load_config

    bench = _benchmark("regimes")
    default = load_config("configs/teachers/digits_soup.yaml")
    lr01 = load_config("configs/teachers/digits_soup_lr01.yaml")
    for base in (default, lr01):
        one = bench.with_recipe(base.with_overrides({"train.epochs": 8}), *bench.parse_recipe("0.1:5"))
        grid = bench.with_recipe(base.with_overrides({"train.epochs": 4}), *bench.parse_recipe("0.03,0.1:5"))
        assert one.config_hash() == lr01.config_hash() and grid.config_hash() == default.config_hash()
        assert "lr" not in (one.zoo.soup.grid.get("optim") or {}) and "lr" not in grid.zoo.soup.child["optim"]
    with pytest.raises(SystemExit, match="distinct learning rates"):
        bench.parse_recipe("0.1,0.1:5")


def test_the_fusion_benchmarks_claims_use_the_verdict_rule():
    """benchmarks/fusion.py's claims are judged by evaluation.verdict over the parent
    seeds (accuracies in points): a margin met on average but not in every repeat is not
    "holds"."""
    bench = _benchmark("fusion")

    def results(ot: list[float], naive: list[float]) -> dict:
        acc = lambda v: {"acc": {"values": v, "mean": sum(v) / len(v)}}  # noqa: E731
        return {"mlp_same": {"rows": {"ot": acc(ot), "naive": acc(naive)}}}

    claim = "OT one-shot far above the naive average (same architecture)"
    assert bench.check(results([80.0, 82.0, 81.0], [50.0, 52.0, 49.0]))[claim]["verdict"] == "holds"
    # more than 10 points on average, but one repeat 2 points above: the interval includes 10
    noisy = bench.check(results([80.0, 52.0, 81.0], [50.0, 50.0, 49.0]))[claim]["verdict"]
    assert noisy == "same direction, not significant"
    assert bench.check(results([50.0, 52.0, 51.0], [50.0, 52.0, 49.0]))[claim]["verdict"] == "does not hold"


def test_the_learngene_benchmarks_claims_use_the_verdict_rule():
    """benchmarks/learngene.py: one seed per depth never makes an accuracy claim "holds";
    the throughput claim is a single measurement against its 0.9 target."""
    from types import SimpleNamespace

    bench = _benchmark("learngene")

    def row(lg: float, scratch: float):
        return SimpleNamespace(learngene={"test_acc": lg, "val_acc_1": lg}, scratch={"test_acc": scratch, "val_acc_n": scratch})

    out = bench.accuracy_claims([row(0.9, 0.2), row(0.95, 0.1)], [{"ratio": 1.04}, {"ratio": 0.97}], 5)
    assert out["learngene init above random init after 5 epochs (test), every depth"] == "same direction, not significant"
    assert out["aux-net costs no more compute per image than a plain ViT (images/s within 10%), every shape"] == "holds"
    worse = bench.accuracy_claims([row(0.9, 0.2), row(0.1, 0.5)], [{"ratio": 0.85}], 5)
    assert worse["learngene init above random init after 5 epochs (test), every depth"] == "does not hold"
    assert worse["aux-net costs no more compute per image than a plain ViT (images/s within 10%), every shape"] == "does not hold"


def test_the_data_benchmarks_steady_state_leaves_out_the_shuffle_buffers_fill_and_drain():
    """A stream that yields nothing for 5 s (its shuffle buffer filling), then 100 images/s,
    then its last 200 images at once (the buffer draining): the steady rate is the 100."""
    bench = _benchmark("data_throughput")
    marks = [(5.0 + i, 100 * (i + 1)) for i in range(8)] + [(12.5, 1000)]
    assert bench.steady_rate(marks) == pytest.approx(100.0)  # the whole epoch: 1000 / 12.5 = 80
    assert math.isnan(bench.steady_rate([(3.0, 1000)])) and math.isnan(bench.steady_rate([]))  # no middle half
    times, counts, first, cpu = [12.5, 12.5, 12.5], [1000] * 3, [5.0] * 3, [None] * 3
    out = bench.summarise(times, counts, first, cpu, [marks, marks, [(3.0, 1000)]])
    assert out["steady_images_per_s"] == pytest.approx(100.0) and out["images_per_s"] == pytest.approx(80.0)
