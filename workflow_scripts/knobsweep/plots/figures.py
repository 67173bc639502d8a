"""The study's figures, drawn from the analysis JSON outputs only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..analysis.defaults import KNOBS, PRIMARY_LATENCY
from ..analysis.frontier import get_frontier

DPI = 200
KNOB_LABEL = {"vision_tokens": "vision tokens", "top_k": "top-k", "active_blocks": "active blocks"}
KNOB_SHORT = {"vision_tokens": "v", "top_k": "k", "active_blocks": "b"}
METRIC_LABEL = {
    "vqa_accuracy": "VQA accuracy",
    "cider": "CIDEr-D",
    "bleu4": "BLEU-4",
    "rouge_l": "ROUGE-L",
    "meteor": "METEOR",
}
MAX_COLS = 4
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p"]


# Rough size of a frontier point's label ("576/8/24 (97%)" at 6.5 pt) in points, for skipping overlaps.
LABEL_WIDTH_PT, LABEL_HEIGHT_PT = 55.0, 9.0


def _num(x: Any, fmt: str = ".2f") -> str:
    """Format a number from a JSON output; null (NaN) prints as n/a."""
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def _style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def _quality_label(cells: pd.DataFrame, workload: str) -> str:
    metric = cells.loc[cells["workload"] == workload, "quality_metric"]
    name = metric.iloc[0] if len(metric) else "quality"
    return f"{METRIC_LABEL.get(name, name)} (mean over samples)"


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _empty(path: str | os.PathLike, message: str) -> None:
    _style()
    fig, ax = plt.subplots(figsize=(6.5, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    _save(fig, path)


def _step(ax: plt.Axes, front: pd.DataFrame, cost: str, xmax: float, **kw: Any) -> None:
    """Frontier as a step function: best quality reachable within each latency, drawn to xmax."""
    if front.empty:
        return
    f = front.sort_values(cost)
    x = np.append(f[cost].to_numpy(float), xmax)
    y = np.append(f["quality"].to_numpy(float), f["quality"].iloc[-1])
    ax.step(x, y, where="post", **kw)


def pareto_figure(
    cells: pd.DataFrame, frontiers: Mapping[str, Any], workload: str, path: str | os.PathLike
) -> None:
    """Every cell of a workload (colour: vision tokens, marker: top-k, size: active blocks), the P95
    frontier as a step line with bootstrap intervals and frontier-membership probabilities."""
    group = cells[cells["workload"] == workload]
    if group.empty:
        _empty(path, f"workload '{workload}' is not in this run")
        return
    _style()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    front = get_frontier(frontiers, workload)
    on_front = (
        group.set_index(list(KNOBS)).index.isin(front.set_index(list(KNOBS)).index) if len(front) else False
    )
    palette = sns.color_palette("colorblind", group["vision_tokens"].nunique())
    common = {
        "x": PRIMARY_LATENCY,
        "y": "quality",
        "hue": "vision_tokens",
        "style": "top_k",
        "size": "active_blocks",
        "hue_order": sorted(group["vision_tokens"].unique()),
        "style_order": sorted(group["top_k"].unique()),
        "size_order": sorted(group["active_blocks"].unique(), reverse=True),
        "sizes": (20, 140),
        "palette": palette,
        "markers": dict(zip(sorted(group["top_k"].unique()), MARKERS)),
        "ax": ax,
    }
    # Every cell faded (this call also makes the legend, with every level); frontier cells drawn again on
    # top, opaque with a darker edge.
    sns.scatterplot(data=group, alpha=0.45, edgecolor="0.3", linewidth=0.2, legend="full", zorder=2, **common)
    if np.any(on_front):
        sns.scatterplot(
            data=group[on_front],
            alpha=1.0,
            edgecolor="black",
            linewidth=0.7,
            legend=False,
            zorder=5,
            **common,
        )
    xmax = float(group[PRIMARY_LATENCY].max()) * 1.02
    _step(ax, front, PRIMARY_LATENCY, xmax, color="black", lw=1.6, zorder=4, label="frontier (P95)")
    if not front.empty and "quality_ci_low" in front:
        ax.errorbar(
            front[PRIMARY_LATENCY],
            front["quality"],
            xerr=[
                front[PRIMARY_LATENCY] - front[f"{PRIMARY_LATENCY}_ci_low"],
                front[f"{PRIMARY_LATENCY}_ci_high"] - front[PRIMARY_LATENCY],
            ],
            yerr=[front["quality"] - front["quality_ci_low"], front["quality_ci_high"] - front["quality"]],
            fmt="none",
            ecolor="0.25",
            elinewidth=0.7,
            capsize=1.5,
            zorder=4,
        )
    # Label at most about ten frontier points (evenly spaced along it), and none whose label would overlap
    # one already placed (frontier points crowd at the low-latency corner), so the labels stay legible.
    step = max(1, int(np.ceil(len(front) / 10)))
    placed: list[np.ndarray] = []
    width, height = (size * ax.figure.dpi / 72 for size in (LABEL_WIDTH_PT, LABEL_HEIGHT_PT))  # in pixels
    for i, (_, r) in enumerate(front.iterrows()):
        if i % step and i != len(front) - 1:
            continue
        at = ax.transData.transform((r[PRIMARY_LATENCY], r["quality"]))  # display pixels
        if any(abs(at[0] - p[0]) < width and abs(at[1] - p[1]) < height for p in placed):
            continue
        placed.append(at)
        label = f"{int(r['vision_tokens'])}/{int(r['top_k'])}/{int(r['active_blocks'])}"
        if "p_on_frontier" in r and pd.notna(r["p_on_frontier"]):
            label += f" ({r['p_on_frontier']:.0%})"
        ax.annotate(
            label,
            (r[PRIMARY_LATENCY], r["quality"]),
            xytext=(-4, 5),
            textcoords="offset points",
            ha="right",
            fontsize=6.5,
            color="0.1",
            zorder=6,
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
        )
    handles, labels = ax.get_legend_handles_labels()
    rename = {"vision_tokens": "vision tokens", "top_k": "top-k", "active_blocks": "active blocks"}
    ax.legend(
        handles,
        [rename.get(lab, lab) for lab in labels],
        bbox_to_anchor=(1.01, 1),
        loc="upper left",
        fontsize=7.5,
        frameon=False,
    )
    ax.set_xlabel("P95 end-to-end latency per request (ms)")
    ax.set_ylabel(_quality_label(cells, workload))
    n = int(group["n_samples"].min()) if "n_samples" in group else None
    ax.set_title(
        f"{workload}: every cell and the Pareto frontier"
        + (
            f" (≥{n} samples per cell; bars: 95% bootstrap CI;\nlabels: vision tokens/top-k/active blocks "
            "(share of resamples keeping the point on the frontier))"
            if n
            else ""
        ),
        fontsize=9,
    )
    _save(fig, path)


def coupling_figure(coupling: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Rows: vision tokens, top-k, active blocks fixed; one panel per fixed value with the frontier over
    the other two knobs for every workload (quality relative to the workload's best cell)."""
    slices = coupling["slices"]
    workloads = sorted(slices)
    if not workloads:
        _empty(path, "no cells in this run")
        return
    _style()
    n_values = {k: len({s["value"] for w in workloads for s in slices[w][k]["slices"]}) for k in KNOBS}
    # At most MAX_COLS panels per line: a knob with more values wraps onto further lines.
    n_cols = min(MAX_COLS, max(n_values.values()))
    lines = {k: max(1, int(np.ceil(n_values[k] / n_cols))) for k in KNOBS}
    fig = plt.figure(figsize=(2.9 * n_cols + 0.4, 2.5 * sum(lines.values()) + 1.4), layout="constrained")
    subfigs = fig.subfigures(3, 1, hspace=0.03, height_ratios=[lines[k] for k in KNOBS])
    colors = dict(zip(workloads, sns.color_palette("colorblind", len(workloads))))
    best = {
        w: max(
            (p["quality"] for k in KNOBS for s in slices[w][k]["slices"] for p in s["frontier"]), default=0.0
        )
        for w in workloads
    }
    all_lat = [
        p[PRIMARY_LATENCY]
        for w in workloads
        for k in KNOBS
        for s in slices[w][k]["slices"]
        for p in s["frontier"]
    ]
    log_x = bool(all_lat) and max(all_lat) / max(min(all_lat), 1e-9) > 8
    for row, knob in enumerate(KNOBS):
        values = sorted({s["value"] for w in workloads for s in slices[w][knob]["slices"]})
        axes = subfigs[row].subplots(lines[knob], n_cols, squeeze=False, sharex=True, sharey=True).ravel()
        for col, ax in enumerate(axes):
            if col >= len(values):
                ax.axis("off")
                continue
            for w in workloads:
                res = slices[w][knob]
                sl = next((s for s in res["slices"] if s["value"] == values[col]), None)
                if sl is None or not sl["frontier"]:
                    continue
                f = pd.DataFrame(sl["frontier"]).sort_values(PRIMARY_LATENCY)
                y = f["quality"] / best[w] if best[w] else f["quality"]
                ax.step(
                    f[PRIMARY_LATENCY], y, where="post", color=colors[w], lw=1.3, marker="o", ms=3, label=w
                )
                # Label about six points per frontier, evenly spaced, plus its last (best) point.
                step = max(1, int(np.ceil(len(f) / 6)))
                for i, ((_, r), yy) in enumerate(zip(f.iterrows(), y)):
                    if i % step and i != len(f) - 1:
                        continue
                    txt = "·".join(f"{KNOB_SHORT[o]}{int(r[o])}" for o in res["others"])
                    ax.annotate(
                        txt,
                        (r[PRIMARY_LATENCY], yy),
                        xytext=(2, 3),
                        textcoords="offset points",
                        fontsize=5.5,
                        color=colors[w],
                    )
            if log_x:
                ax.set_xscale("log")
            ax.set_title(f"{KNOB_LABEL[knob]} = {values[col]}", fontsize=8.5)
            ax.tick_params(labelsize=7, labelbottom=True)
            ax.set_xlabel("P95 latency (ms)" if col >= len(values) - n_cols else "", fontsize=8)
            ax.set_ylabel("quality ÷ workload's best" if col % n_cols == 0 else "", fontsize=8)
        jac = ", ".join(f"{w} {_num(slices[w][knob]['mean_jaccard_distance'])}" for w in workloads)
        subfigs[row].suptitle(
            f"{'abc'[row]}) {KNOB_LABEL[knob]} fixed — mean Jaccard distance between the "
            f"slices' frontier settings: {jac}",
            fontsize=9,
            fontweight="bold",
            x=0.02,
            ha="left",
        )
    handles = [plt.Line2D([], [], color=colors[w], marker="o", label=w) for w in workloads]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=len(workloads),
        frameon=False,
        fontsize=8.5,
        title="frontier over the other two knobs (point labels: their values)",
        title_fontsize=8.5,
    )
    _save(fig, path)


def cases_figure(
    cells: pd.DataFrame,
    frontiers: Mapping[str, Any],
    cases: Mapping[str, Any],
    policies: Mapping[str, Any] | None,
    path: str | os.PathLike,
) -> None:
    """(a, b) the most striking setting optimal for one workload and dominated for the other; (c) the
    single-knob policy that loses most against the three-knob frontier."""
    cross = cases.get("cross_workload", [])
    worst = [c for c in cases.get("single_knob_worst", []) if c.get("worst_budget")]
    if not cross and not worst:
        _empty(path, "no illustrative case in this run (one workload, or no dominated setting)")
        return
    _style()
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2))
    if cross:
        case = cross[0]  # the analysis ranks the most striking robust case first
        setting = case["setting"]
        for ax, workload, role in (
            (axes[0], case["optimal_for"], "optimal"),
            (axes[1], case["dominated_for"], "dominated"),
        ):
            g = cells[cells["workload"] == workload]
            ax.scatter(g[PRIMARY_LATENCY], g["quality"], s=14, color="0.7", label="all cells", zorder=2)
            front = get_frontier(frontiers, workload)
            _step(
                ax,
                front,
                PRIMARY_LATENCY,
                float(g[PRIMARY_LATENCY].max()) * 1.02,
                color="black",
                lw=1.3,
                label="frontier",
                zorder=3,
            )
            x, y = case[f"{role}_latency_p95_ms"], case[f"{role}_quality"]
            colour = sns.color_palette("colorblind")[2 if role == "optimal" else 3]
            ax.scatter(
                [x],
                [y],
                s=140,
                marker="*",
                color=colour,
                edgecolor="black",
                zorder=5,
                label="v{vision_tokens}/k{top_k}/b{active_blocks}".format(**setting),
            )
            if role == "optimal":
                text = f"v{setting['vision_tokens']}/k{setting['top_k']}/b{setting['active_blocks']} is on the\n{workload} frontier"
                if case.get("p_on_frontier") is not None:
                    text += f" (in {case['p_on_frontier']:.0%} of resamples)"
            else:
                top = y + case["quality_gap"]
                ax.annotate(
                    "",
                    xy=(x, top),
                    xytext=(x, y),
                    arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.5},
                )
                text = (
                    f"the same setting is dominated for {workload}:\n−{case['quality_gap']:.3g} quality at "
                    f"the same latency\n({_num(case['quality_gap_normalised'], '.0%')} of the {workload} quality range)"
                )
            ax.text(
                0.03,
                0.97,
                text,
                transform=ax.transAxes,
                va="top",
                fontsize=8,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"},
            )
            ax.set_xlabel("P95 latency (ms)")
            ax.set_ylabel(_quality_label(cells, workload))
            ax.set_title(f"({'a' if role == 'optimal' else 'b'}) {workload}", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
            ax.set_ylim(top=ax.get_ylim()[1] + 0.18 * np.ptp(ax.get_ylim()))
    else:
        for ax in axes[:2]:
            ax.axis("off")
            ax.text(
                0.5,
                0.5,
                "no setting optimal for one\nworkload and dominated for another",
                ha="center",
                va="center",
                fontsize=9,
            )
    ax = axes[2]
    if worst and policies is not None:
        w = worst[0]
        workload, knob = w["workload"], w["knob"]
        g = cells[cells["workload"] == workload]
        res = policies["workloads"][workload]["policies"][knob]
        xmax = float(g[PRIMARY_LATENCY].max()) * 1.02
        ax.scatter(g[PRIMARY_LATENCY], g["quality"], s=14, color="0.75", zorder=2, label="all cells")
        _step(
            ax,
            get_frontier(frontiers, workload),
            PRIMARY_LATENCY,
            xmax,
            color="black",
            lw=1.3,
            label="three-knob frontier",
            zorder=3,
        )
        single = pd.DataFrame(res["single_frontier"])
        colour = sns.color_palette("colorblind")[0]
        _step(
            ax,
            single,
            PRIMARY_LATENCY,
            xmax,
            color=colour,
            lw=1.6,
            ls="--",
            marker="o",
            ms=4,
            label=f"only {KNOB_LABEL[knob]} moves",
            zorder=4,
        )
        b = w["worst_budget"]
        ax.axvline(b["budget_ms"], color="0.4", ls=":", lw=1)
        ax.annotate(
            "",
            xy=(b["budget_ms"], b["multi_quality"]),
            xytext=(b["budget_ms"], b["single_quality"]),
            arrowprops={"arrowstyle": "<->", "color": "0.1"},
        )
        ax.annotate(
            f"−{b['quality_loss']:.3g} quality\nat {b['budget_ms']:.3g} ms budget",
            (b["budget_ms"], (b["multi_quality"] + b["single_quality"]) / 2),
            xytext=(6, 0),
            textcoords="offset points",
            fontsize=8,
        )
        ax.set_xlabel("P95 latency (ms)")
        ax.set_ylabel(_quality_label(cells, workload))
        ax.set_title(
            f"(c) {workload}: single-knob policy vs three knobs\n"
            f"(hypervolume ratio {_num(res['hypervolume_ratio'])})",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def make_figures(
    cells: pd.DataFrame,
    frontiers: Mapping[str, Any],
    coupling: Mapping[str, Any],
    cases: Mapping[str, Any],
    policies: Mapping[str, Any] | None,
    out: Mapping[str, str | os.PathLike],
) -> None:
    """Write every figure; `out` maps pareto_qa, pareto_captioning, coupling, cases to paths."""
    pareto_figure(cells, frontiers, "qa", out["pareto_qa"])
    pareto_figure(cells, frontiers, "captioning", out["pareto_captioning"])
    coupling_figure(coupling, out["coupling"])
    cases_figure(cells, frontiers, cases, policies, out["cases"])
