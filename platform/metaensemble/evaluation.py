"""Results tables shared by every job that compares ways of producing one network.

A job measures each candidate (a teacher, an ensemble, a distilled or generated or fused
student) on one or more evaluation units (here: ensembles), averages the measurements
into one ``Row`` per candidate, prints ``format_table`` and hands the rows to
``log_table``, which puts the same table in MLflow as markdown, JSON, an MLflow table
and a bar chart. Nothing here knows which method produced a row.

    per = [measure(logp, y, seconds) for logp, y in ...]   # one dict per unit
    rows = [mean_row("kd_full", "KD student (full train)", per), ...]
    print(format_table(rows))
    log_table(client, run_id, rows, title="digits: held-out ensembles")

A job whose candidates are trained once per seed (the distillation students) reports
``SeedRow``s instead: mean +- std over seeds of test ACC, NLL, ECE and the calibrated
cNLL, cECE (``calibrated_columns``), printed by ``format_seed_table``, with
``reliability_diagram`` for the calibration.

Every claims table (a paper's claim checked on a job's results) prints ``verdict``'s
words: "holds" only when the paired interval over seeds (``paired_interval``) excludes 0
on the claimed side, "same direction, not significant" when only the means agree.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("acc", "nll", "ece", "time_s")
"""What every row reports: test accuracy (fraction), NLL (nats), 15-bin ECE, and the
wall time in seconds it took to produce the network being measured."""

LABEL_WIDTH = 34
COLUMNS = ("acc", "nll", "ece", "cnll", "cece")
"""The calibrated table's columns (``SeedRow``): test ACC, NLL, ECE, and test NLL and
ECE after a temperature fitted on val."""


@dataclass
class Row:
    key: str
    """Stable identifier (metric names, JSON, comparisons): ``kd_full``, ``weightformer``."""
    label: str
    """What the table prints; leading spaces indent a row under the one above it."""
    acc: float
    nll: float
    ece: float
    time_s: float
    n: int
    """How many evaluation units (e.g. ensembles) the means are over."""
    accs: list[float] = field(default_factory=list)
    """Per-unit accuracies in the units' order, so that two rows can be compared on the
    units they share (a row may cover only the first few)."""
    nlls: list[float] = field(default_factory=list)
    eces: list[float] = field(default_factory=list)
    """Per-unit NLL and ECE (the bar chart's intervals)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(logp, labels, time_s: float = 0.0) -> dict[str, float]:
    """One unit's measurement of one candidate: ``logp`` [N, C] log-probabilities,
    ``labels`` [N]; ``time_s`` the seconds it took to produce the network."""
    from metaensemble import metrics

    m = metrics.classification_metrics(logp, labels, "")
    return {
        "acc": float(m["acc"]),
        "nll": float(m["nll"]),
        "ece": float(m["ece"]),
        "time_s": float(time_s),
    }


def mean_metrics(per: list[dict[str, float]]) -> dict[str, float]:
    """The mean of several measurements, metric by metric (e.g. the single teachers of
    one ensemble, reported as one unit)."""
    if not per:
        raise ValueError("no measurements to average")
    return {k: float(np.mean([p[k] for p in per])) for k in METRICS}


def mean_row(key: str, label: str, per: list[dict[str, float]]) -> Row:
    """One table row: the mean over ``per`` (one measurement per unit) and the per-unit
    accuracies."""
    m = mean_metrics(per)
    return Row(
        key,
        label,
        m["acc"],
        m["nll"],
        m["ece"],
        m["time_s"],
        len(per),
        [float(p["acc"]) for p in per],
        [float(p["nll"]) for p in per],
        [float(p["ece"]) for p in per],
    )


def format_table(rows: list[Row]) -> str:
    """A fixed-width text table: ACC in percent, NLL, ECE, seconds, number of units."""
    head = f"{'method':<{LABEL_WIDTH}} {'ACC':>7} {'NLL':>7} {'ECE':>7} {'time (s)':>10} {'n':>3}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.label:<{LABEL_WIDTH}} {100 * r.acc:>7.2f} {r.nll:>7.4f} {r.ece:>7.4f} "
            f"{r.time_s:>10.3f} {r.n:>3}"
        )
    return "\n".join(lines)


def table_columns(rows: list[Row]) -> dict[str, list[Any]]:
    """The table column by column (the shape ``MlflowClient.log_table`` takes)."""
    return {
        "method": [r.label.strip() for r in rows],
        "key": [r.key for r in rows],
        "acc": [r.acc for r in rows],
        "nll": [r.nll for r in rows],
        "ece": [r.ece for r in rows],
        "time_s": [r.time_s for r in rows],
        "n": [r.n for r in rows],
    }


def half_interval(values: Iterable[float], confidence: float = 0.95) -> float:
    """Half the width of the Student-t interval of the mean of ``values``; 0 for fewer
    than two (nothing to draw)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size < 2:
        return 0.0
    d = paired_interval(v, 0.0, confidence=confidence)
    return float(d.hi - d.mean)


def bar_figure(rows: list[Row], highlight: Iterable[str] = ()):
    """The figure of ``bar_chart`` (not saved): four horizontal bar panels (accuracy %
    from 0 to 100, NLL, ECE, seconds to produce on a log axis), one bar per row in table
    order with its 95% t-interval over the row's units; a row that cost 0 s gets no bar
    but the words "0 s"; rows in ``highlight`` in another colour, with a legend."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    marked = set(highlight)
    fig, axes = plt.subplots(1, 4, figsize=(18, max(3.0, 0.35 * len(rows) + 2.0)), sharey=True)
    ypos = np.arange(len(rows))
    colours = ["tab:orange" if r.key in marked else "tab:blue" for r in rows]
    panels = (
        ("acc", "test accuracy (%)", lambda r: [100 * a for a in r.accs]),
        ("nll", "test NLL", lambda r: r.nlls),
        ("ece", "test ECE", lambda r: r.eces),
    )
    for ax, (attr, name, units) in zip(axes, panels, strict=False):
        scale = 100 if attr == "acc" else 1
        vals = [scale * getattr(r, attr) for r in rows]
        ax.barh(ypos, vals, xerr=[half_interval(units(r)) for r in rows], capsize=3, color=colours,
                error_kw={"elinewidth": 1})
        if attr == "acc":
            ax.set_xlim(0, 100)  # the whole scale: differences of a point look like one
        ax.set_title(name)
    ax = axes[3]
    times = [r.time_s for r in rows]
    positive = [t for t in times if t > 0]
    ax.set_xscale("log")
    if positive:
        left = min(positive) / 3
        for y, t, c in zip(ypos, times, colours, strict=True):
            if t > 0:
                ax.barh([y], [t - left], left=left, color=c)
            else:
                ax.text(left, y, " 0 s", va="center", fontsize=8)
        ax.set_xlim(left, max(positive) * 2)
    ax.set_title("seconds to produce (log)")
    axes[0].set_yticks(ypos, [r.label.strip() for r in rows])
    axes[0].invert_yaxis()
    handles = [Patch(color="tab:orange", label="this job's method"), Patch(color="tab:blue", label="the other rows")]
    fig.legend(handles=handles if marked else handles[1:], loc="lower center", ncol=2, fontsize=9,
               title="bars: mean over units; error bars: 95% t-interval", title_fontsize=9)
    return fig


def bar_chart(rows: list[Row], path: str | Path, title: str, highlight: Iterable[str] = ()) -> Path:
    """``bar_figure`` with ``title``, written as a PNG at ``path``."""
    return save_figure(bar_figure(rows, highlight), title, path)


def save_figure(fig, title: str, path: str | Path) -> Path:
    """Title, tighten and write ``fig`` as a PNG at ``path``; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout(rect=(0, min(0.4, 0.75 / fig.get_figheight()) if fig.legends else 0, 1, 1))  # room for it
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_table(
    client,
    run_id: str,
    rows: list[Row],
    title: str,
    *,
    name: str = "eval",
    highlight: Iterable[str] = (),
    metrics: bool = True,
) -> list[str]:
    """Log a results table to the MLflow run ``run_id``: ``<name>_table.md`` (the printed
    table), ``<name>_table.json`` (every field of every row), ``<name>_table_mlflow.json``
    (an MLflow table, comparable across runs in the UI) and ``<name>_bars.png``
    (``bar_chart``); with ``metrics``, also ``<key>_<metric>`` for every row. Returns the
    artifact paths written."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        (out / f"{name}_table.md").write_text(f"{title}\n\n{format_table(rows)}\n")
        (out / f"{name}_table.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2))
        bar_chart(rows, out / f"{name}_bars.png", title, highlight)
        client.log_artifacts(run_id, d)
        written = sorted(p.name for p in out.iterdir())
    client.log_table(run_id, table_columns(rows), f"{name}_table_mlflow.json")
    if metrics:
        from metaensemble import tracking

        tracking.log_metrics(
            client, run_id, {f"{r.key}_{m}": getattr(r, m) for r in rows for m in METRICS}
        )
    return [*written, f"{name}_table_mlflow.json"]


# ---- candidates over seeds: mean +- std, calibrated columns -------------------------------
def calibrated_columns(val: tuple[Any, Any], test: tuple[Any, Any]) -> dict[str, float]:
    """``COLUMNS`` (and the temperature) of one network from its val and test
    (log-probabilities, labels): the temperature is fitted on val by NLL."""
    from metaensemble import metrics

    r = metrics.calibrated_report(val[0], val[1], test[0], test[1])
    return {"acc": r["test_acc"], "nll": r["test_nll"], "ece": r["test_ece"], "cnll": r["test_cnll"],
            "cece": r["test_cece"], "temperature": r["temperature"]}


@dataclass
class SeedRow:
    """A candidate measured once per seed (or per member): the mean and the sample std
    (ddof 1) of ``COLUMNS`` over ``per_seed``, and its mean training seconds."""

    key: str
    label: str
    mean: dict[str, float]
    std: dict[str, float]
    n: int
    train_s: float = 0.0
    per_seed: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "mean": self.mean, "std": self.std, "n": self.n,
                "train_s": self.train_s, "per_seed": self.per_seed}


def train_seconds(client, run_id: str) -> float:
    """A run's optimisation time: the sum of its epochs' ``train_time_s`` (no validation,
    checkpointing or start-up; an epoch logged twice, as after a resume, counts once)."""
    return metric_sum(client, run_id, "train_time_s")


def metric_sum(client, run_id: str, key: str) -> float:
    """The sum over steps of a per-epoch metric, the last value of each step."""
    return float(sum({x.step: x.value for x in client.get_metric_history(run_id, key)}.values()))


def seed_row(key: str, label: str, per: list[dict[str, float]], train_s: float = 0.0) -> SeedRow:
    """``per``: one ``calibrated_columns`` dict per seed."""
    cols = (*COLUMNS, "temperature")
    mean = {k: float(np.mean([p[k] for p in per])) for k in cols}
    std = {k: float(np.std([p[k] for p in per], ddof=1)) if len(per) > 1 else 0.0 for k in cols}
    return SeedRow(key, label, mean, std, len(per), train_s, per)


def format_seed_table(rows: list[SeedRow]) -> str:
    """The paper's table: ACC (%), NLL, ECE, cNLL, cECE as mean +- std over seeds."""
    head = f"{'method':<24} {'ACC':>14} {'NLL':>16} {'ECE':>16} {'cNLL':>16} {'cECE':>16} {'train s':>8} {'n':>2}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for k in COLUMNS:
            f = 100.0 if k == "acc" else 1.0
            w, p = (14, 2) if k == "acc" else (16, 4)
            cells.append(f"{f * r.mean[k]:.{p}f} +- {f * r.std[k]:.{p}f}".rjust(w) if r.n > 1
                         else f"{f * r.mean[k]:.{p}f}".rjust(w))
        secs = f"{r.train_s:>8.1f}" if r.train_s else f"{'-':>8}"
        lines.append(f"{r.label:<24} {' '.join(cells)} {secs} {r.n:>2}")
    return "\n".join(lines)


def reliability_figure(curves: dict[str, tuple[Any, Any]], n_bins: int = 15,
                       ece: dict[str, float] | None = None):
    """The figure of ``reliability_diagram`` (not saved): one panel per row, accuracy per
    confidence bin (15 equal-width, right-closed, as ECE) as bars and the bin's mean
    confidence as a dot, against the diagonal. The bins pool the row's test predictions
    over its units (seeds, ensembles); the ECE in a panel's title is ``ece[label]``, the
    table's mean over units, where given, else the pooled bins' own (said so)."""
    import matplotlib
    import torch

    from metaensemble import metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    width = 1.0 / n_bins
    centres = (np.arange(n_bins) + 0.5) * width
    for ax, (label, (logp, y)) in zip(axes, curves.items(), strict=True):
        bins = metrics.ece_bins(logp.float().exp(), y, n_bins).numpy()
        count = np.maximum(bins[:, 0], 1)
        acc, conf = bins[:, 2] / count, bins[:, 1] / count
        filled = bins[:, 0] > 0
        ax.bar(centres[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
        ax.plot(centres[filled], conf[filled], "o", color="tab:red", ms=4, label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        if ece is not None and label in ece:
            note = f"ECE {ece[label]:.4f} (table: mean over units)"
        else:
            note = f"ECE {metrics.ece_from_bins(torch.from_numpy(bins)):.4f} (pooled bins)"
        ax.set_title(f"{label.strip()}\n{note}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return fig


def reliability_diagram(curves: dict[str, tuple[Any, Any]], path: str | Path, title: str,
                        n_bins: int = 15, ece: dict[str, float] | None = None) -> Path:
    """``reliability_figure`` with ``title``, written as a PNG at ``path``."""
    return save_figure(reliability_figure(curves, n_bins, ece), title, path)


# ---- paired comparisons over evaluation units ----------------------------------------------
@dataclass
class Difference:
    """``a - b`` of two rows' accuracies over the units both cover, with a paired
    bootstrap 95% interval (units resampled with replacement, the same draw for both)."""

    label: str
    mean: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def paired_bootstrap(a: Iterable[float], b: Iterable[float], label: str = "", resamples: int = 10000,
                     seed: int = 0) -> Difference:
    """Mean of ``a - b`` over paired units and its percentile 95% interval. ``a`` and ``b``
    are per-unit values in the same unit order; the shorter one sets how many pairs."""
    a, b = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError(f"{label or 'difference'}: no paired units to compare")
    d = a[:n] - b[:n]
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return Difference(label, float(d.mean()), float(lo), float(hi), n)


def gap_closed(x: Iterable[float], low: Iterable[float], high: Iterable[float], label: str = "",
               resamples: int = 10000, seed: int = 0) -> Difference:
    """The fraction of the gap from ``low`` to ``high`` that ``x`` closes, as a ratio of
    means over paired units (sum(x - low) / sum(high - low)), with a paired bootstrap
    95% interval."""
    x, lo_, hi_ = (np.asarray(list(v), dtype=np.float64) for v in (x, low, high))
    n = min(len(x), len(lo_), len(hi_))
    if n == 0:
        raise ValueError(f"{label or 'gap'}: no paired units")
    num, den = x[:n] - lo_[:n], hi_[:n] - lo_[:n]
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    ratio = num[idx].sum(1) / np.where(den[idx].sum(1) == 0, np.nan, den[idx].sum(1))
    lo, hi = np.nanpercentile(ratio, [2.5, 97.5])
    return Difference(label, float(num.sum() / den.sum()) if den.sum() else float("nan"), float(lo), float(hi), n)


def format_differences(diffs: list[Difference], unit: str = "points") -> str:
    """One line per difference: mean and 95% interval (accuracy differences in points,
    fractions as they are)."""
    width = max([len(d.label) for d in diffs] + [10])
    lines = []
    for d in diffs:
        s = 100.0 if unit == "points" else 1.0
        mark = "" if d.excludes_zero else "   (interval contains 0)"
        lines.append(f"{d.label:<{width}}  {s * d.mean:+7.2f}  [{s * d.lo:+7.2f}, {s * d.hi:+7.2f}]  n={d.n}{mark}")
    return "\n".join(lines)


# ---- the paper's claims: verdicts over seeds -----------------------------------------------
HOLDS, NOT_SIGNIFICANT, FAILS = "holds", "same direction, not significant", "does not hold"
VERDICTS = (HOLDS, NOT_SIGNIFICANT, FAILS)
"""What every claims table prints: the claimed direction with a paired interval over seeds
that excludes 0; the claimed direction on the means only; the other direction."""


def paired_interval(a: Iterable[float] | float, b: Iterable[float] | float, label: str = "",
                    confidence: float = 0.95, exact: bool = False) -> Difference:
    """Mean of ``a - b`` over paired seeds and its Student-t interval (n - 1 degrees of
    freedom). Either side may be one number, compared with every seed of the other (a
    single teacher ensemble). One seed gives an unbounded interval: it cannot establish a
    difference. ``exact``: the values carry no seed noise (parameter counts, a timing
    against its threshold), and the interval is the mean itself."""
    a, b = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (a, b))
    if a.size == 1 and b.size > 1:
        a = np.full_like(b, a[0])
    elif b.size == 1:
        b = np.full_like(a, b[0])
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError(f"{label or 'difference'}: no paired seeds to compare")
    d = a[:n] - b[:n]
    mean = float(d.mean())
    if exact:
        return Difference(label, mean, mean, mean, n)
    if n == 1:
        return Difference(label, mean, -np.inf, np.inf, 1)
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
    return Difference(label, mean, mean - half, mean + half, n)


def verdict(diffs: Difference | Iterable[Difference], better: str = "higher") -> str:
    """The verdict on a claim that every difference lies on the ``better`` side of 0
    (``higher``: a > b; ``lower``: a < b): ``HOLDS`` when every interval excludes 0 on that
    side, ``FAILS`` when any mean is not on that side, else ``NOT_SIGNIFICANT``."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    diffs = [diffs] if isinstance(diffs, Difference) else list(diffs)
    if not diffs:
        raise ValueError("a verdict needs at least one difference")
    sign = 1.0 if better == "higher" else -1.0
    if any(sign * d.mean <= 0 for d in diffs):
        return FAILS
    return HOLDS if all(d.lo > 0 if sign > 0 else d.hi < 0 for d in diffs) else NOT_SIGNIFICANT
