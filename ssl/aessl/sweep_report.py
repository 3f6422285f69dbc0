"""A sweep's statistics and its self-contained report.html (ssl/sweep.py writes both).

From results.parquet (one row per run: axis values, seed, metrics):

  cell table        per cell, every metric's mean ± 95% confidence interval over seeds
                    (Student t: mean ± t(0.975, n-1) * sd / sqrt(n); no interval from one seed);
  per axis          each value of an axis, its metric averaged over the other axes' cells
                    within a seed first, then mean ± 95% CI over seeds;
  paired tests      for two values a, b of an axis, the runs that differ only in that axis
                    (same other values, same seed) are paired; the differences b - a get a
                    mean, a bootstrap 95% CI (percentile, 10,000 resamples, fixed generator)
                    and a two-sided Wilcoxon signed-rank p-value (scipy). With 3 pairs the
                    smallest possible p is 0.25: few seeds cannot make a difference
                    "significant", which is the point of showing it;
  plots             each metric against every numeric axis, one line per combination of
                    the other axes, with the CI as error bars.
"""

from __future__ import annotations

import io
import math
from itertools import combinations
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import grids
from .fileio import write_bytes_atomic
from .sweep import LOWER_IS_BETTER

SHOWN = ("qwk", "mae", "spearman", "false_positive_rate", "top_k_precision")
TITLES = {"qwk": "QWK", "mae": "MAE", "spearman": "Spearman", "accuracy": "accuracy", "accuracy_within_1": "±1 accuracy",
          "false_positive_rate": "FPR", "top_k_precision": "top-K precision"}


def mean_ci(x) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t interval, n); the half-width is NaN below 2 values."""
    from scipy import stats

    x = np.asarray([v for v in x if v == v], dtype=float)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n < 2:
        return float(x[0]), float("nan"), 1
    return float(x.mean()), float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)), n


def bootstrap_ci(diff, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    d = np.asarray(diff, dtype=float)
    if len(d) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def wilcoxon_p(diff) -> float:
    from scipy import stats

    d = np.asarray(diff, dtype=float)
    if len(d) == 0 or not np.any(d != 0):
        return float("nan") if len(d) == 0 else 1.0
    return float(stats.wilcoxon(d, zero_method="zsplit", alternative="two-sided").pvalue)


def axes_of(frame: pd.DataFrame, axes: list[str]) -> list[str]:
    return [a for a in axes if a in frame.columns]


def cell_table(frame: pd.DataFrame, axes: list[str], metrics=SHOWN) -> pd.DataFrame:
    rows = []
    for cell, g in frame.groupby("cell", sort=False):
        row = {"cell": cell, **{a: g[a].iloc[0] for a in axes}, "seeds": len(g)}
        for m in metrics:
            row[m], row[f"{m}_ci"], _ = mean_ci(g[m])
        row["wall_s"] = float(g["wall_s"].mean()) if "wall_s" in g else float("nan")
        row["params"] = int(g["params"].iloc[0]) if "params" in g else 0
        rows.append(row)
    return pd.DataFrame(rows)


def axis_table(frame: pd.DataFrame, axis: str, metrics=SHOWN) -> pd.DataFrame:
    """Per value of `axis`: the metric averaged over the other cells within each seed, then
    mean ± CI over seeds."""
    rows = []
    for value, g in frame.groupby(axis, sort=False):
        per_seed = g.groupby("seed")[list(metrics)].mean()
        row = {axis: value, "seeds": len(per_seed), "cells": g["cell"].nunique()}
        for m in metrics:
            row[m], row[f"{m}_ci"], _ = mean_ci(per_seed[m])
        rows.append(row)
    return pd.DataFrame(rows)


def paired_table(frame: pd.DataFrame, axis: str, axes: list[str], metric: str) -> pd.DataFrame:
    """Every pair of values of `axis`: runs equal in the other axes and the seed, paired."""
    others = [a for a in axes if a != axis]
    values = list(dict.fromkeys(frame[axis].tolist()))
    rows = []
    key = [*others, "seed"]
    for a, b in combinations(values, 2):
        left = frame[frame[axis] == a].set_index(key)[metric] if key else None
        right = frame[frame[axis] == b].set_index(key)[metric]
        joined = pd.concat([left.rename("a"), right.rename("b")], axis=1, join="inner").dropna()
        diff = (joined["b"] - joined["a"]).to_numpy()
        lo, hi = bootstrap_ci(diff)
        better = -1 if metric in LOWER_IS_BETTER else 1
        rows.append({"a": a, "b": b, "pairs": len(diff), "mean_diff": float(diff.mean()) if len(diff) else float("nan"),
                     "ci_low": lo, "ci_high": hi, "wilcoxon_p": wilcoxon_p(diff),
                     "b_better": int(np.sum(better * diff > 0)), "a_better": int(np.sum(better * diff < 0))})
    return pd.DataFrame(rows)


def numeric_axes(frame: pd.DataFrame, axes: list[str]) -> list[str]:
    return [a for a in axes if frame[a].nunique() > 1 and pd.api.types.is_numeric_dtype(frame[a])
            and not pd.api.types.is_bool_dtype(frame[a])]


def plot_axis(frame: pd.DataFrame, axis: str, axes: list[str], metric: str) -> Figure:
    """`metric` against numeric `axis`: one line per combination of the other axes, CI bars."""
    others = [a for a in axes if a != axis]
    fig = Figure(figsize=(5.2, 3.6), dpi=100)
    ax = fig.add_subplot()
    groups = frame.groupby(others, sort=False) if others else [((), frame)]
    for name, g in groups:
        xs, ys, es = [], [], []
        for x, gx in sorted(g.groupby(axis), key=lambda kv: kv[0]):
            m, ci, _ = mean_ci(gx[metric])
            xs.append(x), ys.append(m), es.append(0 if ci != ci else ci)
        label = ", ".join(f"{o.split('.')[-1]}={v}" for o, v in zip(others, name if isinstance(name, tuple) else (name,)))
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label or None)
    ax.set_xlabel(axis)
    ax.set_ylabel(TITLES.get(metric, metric) + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    if frame[axis].min() > 0 and frame[axis].max() / max(frame[axis].min(), 1e-12) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(frame[axis].unique()))
    ax.set_xticklabels([f"{v:g}" for v in sorted(frame[axis].unique())])
    ax.grid(alpha=0.3)
    if others:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def png_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return grids.data_uri(buf.getvalue())


def fmt(m: float, ci: float | None = None, digits: int = 3) -> str:
    if m != m:
        return "–"
    return f"{m:.{digits}f}" if ci is None or ci != ci else f"{m:.{digits}f} ± {ci:.{digits}f}"


def fmt_p(p: float) -> str:
    return "–" if p != p else f"{p:.3f}"


def report_data(frame: pd.DataFrame, axes: list[str], metric: str, failed: list[str] | None = None,
                zipped: bool = False) -> dict:
    """Everything the page shows, as tables of strings and figures. Zipped axes move
    together, so they are compared as one axis (their values joined), paired on the seed."""
    axes = axes_of(frame, axes)
    metrics = [metric] + [m for m in SHOWN if m != metric]
    cells = cell_table(frame, axes, metrics) if len(frame) else pd.DataFrame()
    compared = axes
    if zipped and len(axes) > 1 and len(frame):
        joint = " + ".join(axes)
        frame = frame.assign(**{joint: [", ".join(str(v) for v in row) for row in frame[axes].itertuples(index=False)]})
        compared = [joint]
    cell_rows = [{"values": [str(r[a]) for a in axes], "seeds": r["seeds"],
                  "metrics": [fmt(r[m], r[f"{m}_ci"]) for m in metrics],
                  "wall": f"{r['wall_s']:.0f}" if r["wall_s"] == r["wall_s"] else "–", "params": f"{r['params']:,}"}
                 for r in cells.to_dict("records")]
    per_axis = []
    for axis in compared:
        if frame[axis].nunique() < 2:
            continue
        t = axis_table(frame, axis, metrics)
        pairs = paired_table(frame, axis, compared, metric)
        per_axis.append({
            "axis": axis,
            "rows": [{"value": str(r[axis]), "seeds": r["seeds"], "cells": r["cells"],
                      "metrics": [fmt(r[m], r[f"{m}_ci"]) for m in metrics]} for r in t.to_dict("records")],
            "pairs": [{"a": str(r["a"]), "b": str(r["b"]), "n": r["pairs"], "diff": fmt(r["mean_diff"]),
                       "ci": f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", "p": fmt_p(r["wilcoxon_p"]),
                       "wins": f"{r['b_better']}–{r['a_better']}"} for r in pairs.to_dict("records")],
        })
    plots = [{"title": f"{TITLES.get(m, m)} vs {axis}", "uri": png_data_uri(plot_axis(frame, axis, axes, m))}
             for axis in numeric_axes(frame, axes) for m in (metric, "mae", "false_positive_rate") if m in frame]
    return {"axes": axes, "metrics": [TITLES.get(m, m) for m in metrics], "metric": TITLES.get(metric, metric),
            "cells": cell_rows, "per_axis": per_axis, "plots": plots, "runs": len(frame),
            "seeds": sorted(frame["seed"].unique().tolist()) if len(frame) else [], "failed": failed or []}


def markdown(data: dict, name: str) -> str:
    """The report's tables as Markdown (OUT/summary.md: for docs and pull requests)."""
    lines = [f"### Sweep `{name}`: {data['runs']} runs, seeds {', '.join(map(str, data['seeds']))}", "",
             "Mean ± 95% CI over seeds:", "",
             "| " + " | ".join([*data["axes"], "seeds", *data["metrics"]]) + " |",
             "|" + "---|" * (len(data["axes"]) + 1 + len(data["metrics"]))]
    lines += ["| " + " | ".join([*r["values"], str(r["seeds"]), *r["metrics"]]) + " |" for r in data["cells"]]
    for ax in data["per_axis"]:
        lines += ["", f"Paired differences in {data['metric']} along `{ax['axis']}` (b − a; same seed and other axes):", "",
                  "| a | b | pairs | mean b − a | 95% bootstrap CI | Wilcoxon p | wins b–a |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['a']} | {p['b']} | {p['n']} | {p['diff']} | {p['ci']} | {p['p']} | {p['wins']} |" for p in ax["pairs"]]
    return "\n".join(lines) + "\n"


def write_report(frame: pd.DataFrame, out: Path, name: str, axes: list[str], metric: str, description: str,
                 failed: list[str] | None = None, missing: int = 0, zipped: bool = False) -> Path:
    """OUT/report.html, self-contained (figures inlined), and OUT/summary.md (its tables)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("aessl", "templates"), autoescape=True)
    data = report_data(frame, axes, metric, failed, zipped)
    html = env.get_template("sweep.html.j2").render(name=name, description=description, missing=missing, **data)
    path = out / "report.html"
    write_bytes_atomic(path, html.encode())
    write_bytes_atomic(out / "summary.md", markdown(data, name).encode())
    return path
