"""The findings summary (Markdown), written from the analysis outputs: every number and verdict comes from
them, nothing is concluded here that they do not say."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .defaults import KNOBS, PRIMARY_LATENCY
from .frontier import get_frontier

Json = Mapping[str, Any]


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and not np.isfinite(x))


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if _missing(x) else f"{x:.{digits}g}"


def _pct(x: Any, digits: int = 1) -> str:
    return "n/a" if _missing(x) else f"{100 * x:.{digits}f}%"


def _ci(d: Json, name: str, pct: bool = False) -> str:
    """'value [low, high]' of a statistic and its *_ci_low/*_ci_high entries."""
    fmt = _pct if pct else _f
    value, low, high = d.get(name), d.get(f"{name}_ci_low"), d.get(f"{name}_ci_high")
    if _missing(value):
        return "n/a"
    return fmt(value) if _missing(low) or _missing(high) else f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def _setting(d: Json) -> str:
    return f"vision_tokens={d['vision_tokens']}, top_k={d['top_k']}, active_blocks={d['active_blocks']}"


def _question(q: Json, key: str, threshold: str) -> list[str]:
    return [
        f"## {key}. {q['question']} — **{q['verdict']}**",
        "",
        f"Hypothesis: {q['hypothesis']} (threshold {threshold}).",
        "",
    ]


def _grid(results: Json, cells: pd.DataFrame, coupling: Json) -> list[str]:
    lines = [
        f"# Findings of run `{results['run']}`",
        "",
        (
            f"Generated from the analysis outputs. Intervals are {100 * results['ci_level']:.0f}% percentile "
            f"bootstrap intervals ({results['n_bootstrap']} resamples of the samples within each cell, seed "
            f"{results['seed']}). Latency statistic: {PRIMARY_LATENCY}."
        ),
        "",
        f"Verdict rule: {coupling['verdict_rule']}.",
        "",
        "## The grid",
        "",
        "| workload | quality metric | cells | samples per cell | P95 latency range (ms) | quality range |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for w, g in cells.groupby("workload"):
        lines.append(
            f"| {w} | {g['quality_metric'].iloc[0]} | {len(g)} | {g['n_samples'].min()}–{g['n_samples'].max()} "
            f"| {_f(g[PRIMARY_LATENCY].min())}–{_f(g[PRIMARY_LATENCY].max())} "
            f"| {_f(g['quality'].min())}–{_f(g['quality'].max())} |"
        )
    tail = cells["latency_p95_tail_n"]
    lines += [
        "",
        (
            f"Each P95 rests on at least {int(cells['n_samples'].min())} requests per cell (the slowest "
            f"{int(tail.min())}–{int(tail.max())} of them at or above it); per-cell intervals are in "
            "e2_knob_grid_results.json."
        ),
        "",
        (
            "How the latencies were measured (card, inference path, vision encoder, preprocessing; from each "
            "shard's provenance):"
        ),
        "",
    ]
    for workload, info in sorted(results["workloads"].items()):
        setups = info.get("measurement_setups") or []
        described = "; ".join(
            f"{s.get('device_name')}, `{s.get('inference_path')}`, vision encoder {s.get('vision_encoder')}, "
            f"{s.get('preprocess') or 'preprocessing not recorded'} ({s['n_cells']} cell{'s' if s['n_cells'] != 1 else ''})"
            for s in setups
        )
        differ = " **Its cells were measured in different ways: their latencies are not comparable.**"
        lines.append(f"- {workload}: {described or 'not recorded'}.{differ if len(setups) > 1 else ''}")
    return lines + ["", *_host_speed_lines(results.get("host_speed"))]


def _host_speed_lines(host_speed: Json | None) -> list[str]:
    """Which cells were measured while the host ran Python at another speed than during most (aggregate's
    `host_speed`)."""
    if not host_speed or host_speed.get("usual_probe_us") is None:
        return ["Host speed: not recorded in these shards (written before inference code version 12).", ""]
    off = host_speed["cells_at_another_host_speed"]
    ratio = host_speed["speed_ratio"]
    head = (
        f"Host speed (a fixed Python workload timed before each request; median over cells "
        f"{host_speed['usual_probe_us']:.0f} µs): "
    )
    if not off:
        return [head + f"every cell within {ratio:.2f}x of it.", ""]
    listed = ", ".join(f"{c['workload']} {c['cell']} ({c['host_probe_ratio']:.2f})" for c in off)
    return [
        head + f"**{len(off)} cell(s) were measured while the host ran >= {ratio:.2f}x slower or faster** "
        f"(ratio > 1: slower): {listed}. Their host-bound stages (preprocess above all) are not comparable "
        "with the other cells'; measure them again on a quiet host before comparing small latency differences: "
        "the run's usual command with `--forcerun "
        + " ".join(f"<results>/cells/{c['workload']}/{c['cell']}.parquet" for c in off)
        + "`.",
        "",
    ]


def _q1(coupling: Json) -> list[str]:
    q = coupling["questions"]["Q1"]
    lines = _question(q, "Q1", _pct(q["threshold"], 0))
    lines += [
        "| workload | response | non-additive share | noise floor | largest two-way term | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for w, by_resp in coupling["anova"].items():
        for resp in ("quality", "latency_p95_ms", "log_latency_p95_ms"):
            a = by_resp[resp]
            dom = a.get("dominant_interaction")
            if dom:
                dom_txt = f"{dom} ({_pct(a['shares'][dom])})"
            else:
                dom_txt = "n/a (grid incomplete)" if not a["complete_grid"] else "n/a"
            verdict = a["verdict"] if resp != "log_latency_p95_ms" else "(informative only)"
            lines.append(
                f"| {w} | {resp} | {_ci(a, 'non_additive_share', pct=True)} | "
                f"{_pct(a.get('noise_floor_share'), 2)} | {dom_txt} | {verdict} |"
            )
    if any(not a["quality"]["complete_grid"] for a in coupling["anova"].values()):
        lines += [
            "",
            (
                "The grid is incomplete for some workload: the non-additive share there is 1 − R² of an "
                "additive model with categorical knobs, and single interaction terms are not separable."
            ),
        ]
    lines += [
        "",
        (
            "On the log scale a purely multiplicative latency model is additive: a small log-latency share "
            "next to a large linear one means the latency coupling is multiplicative."
        ),
        "",
    ]
    return lines


def _q2(coupling: Json) -> list[str]:
    q = coupling["questions"]["Q2"]
    lines = _question(q, "Q2", str(q["threshold"]))
    comparison = coupling["workload_comparison"]
    for p in comparison.get("pairs", []):
        wa, wb = p["workloads"]
        lines.append(
            f"- {wa} vs {wb} over {p['n_common_cells']} common cells: Jaccard distance "
            f"{_ci(p, 'jaccard_distance')}; {len(p['shared_settings'])} shared frontier settings of "
            f"{len(p['frontier_settings'][wa])} ({wa}) and {len(p['frontier_settings'][wb])} ({wb}); Spearman "
            f"correlation of cell quality {_f(p['quality_spearman'])}, of P95 latency "
            f"{_f(p['latency_p95_spearman'])}. Verdict: {p['verdict']}"
            + (f" ({p['note']})." if "note" in p else ".")
        )
    if "note" in comparison:
        lines.append(f"- {comparison['note']}.")
    return [*lines, ""]


def _q3(coupling: Json) -> list[str]:
    q = coupling["questions"]["Q3"]
    lines = _question(q, "Q3", str(q["threshold"]))
    lines += [
        (
            "| workload | fixed knob | mean Jaccard distance between slices "
            "| budgets whose best other-knob setting changes | verdict |"
        ),
        "| --- | --- | --- | --- | --- |",
    ]
    for w, by_knob in coupling["slices"].items():
        first = by_knob[KNOBS[0]]["slices"]
        n_budgets = len(first[0]["best_under_budget"]) if first else 0
        for knob in KNOBS:
            s = by_knob[knob]
            lines.append(
                f"| {w} | {knob} | {_ci(s, 'mean_jaccard_distance')} | {s['budget_best_changes']} of "
                f"{n_budgets} | {s['verdict']} |"
            )
    lines += [
        "",
        (
            "Slices are compared on the other-knob settings both hold. Resampling jitters near-ties on and "
            "off a frontier, which by itself raises Jaccard distances; compare with the "
            "frontier-membership probabilities below. A best setting under a common budget can change "
            "merely because the fixed knob shifts every latency."
        ),
        "",
    ]
    return lines


def _q4(coupling: Json, policies: Json) -> list[str]:
    q = coupling["questions"]["Q4"]
    lines = _question(q, "Q4", str(q["threshold"]))
    lines += [
        (
            "| workload | knob moved alone | hypervolume ratio | largest quality loss at a budget "
            "| budgets out of its reach |"
        ),
        "| --- | --- | --- | --- | --- |",
    ]
    for w, summary in policies["workloads"].items():
        for knob in KNOBS:
            r = summary["policies"][knob]
            lines.append(
                f"| {w} | {knob} | {_ci(r, 'hypervolume_ratio')} | {_ci(r, 'max_quality_loss')} | "
                f"{r['n_budgets_infeasible']} of {len(summary['budgets_ms'])} |"
            )
    lines.append("")
    for w, summary in policies["workloads"].items():
        best = summary["best_single_knob"] or "none (no hypervolume ratio could be computed)"
        budgets = ", ".join(_f(b) for b in summary["budgets_ms"])
        lines.append(
            f"- {w}: full setting {_setting(summary['full_setting'])}; best single knob {best}; "
            f"budgets (ms) {budgets}."
        )
    for w, d in q["per_workload"].items():
        lines.append(f"- {w}: verdict {d['verdict']}" + (f" ({d['note']})." if "note" in d else "."))
    return [*lines, ""]


def _frontiers_and_cases(cells: pd.DataFrame, frontiers: Json, cases: Json) -> list[str]:
    lines = ["## Frontiers", ""]
    for w in sorted(cells["workload"].unique()):
        f = get_frontier(frontiers, w)
        interior = cases["interior_frontier_points"].get(w, {})
        p_txt = ""
        if "p_on_frontier" in f and f["p_on_frontier"].notna().any():
            p = f["p_on_frontier"]
            p_txt = (
                f"; probability of staying on it under resampling {_f(p.min(), 2)}–{_f(p.max(), 2)} "
                f"(median {_f(p.median(), 2)})"
            )
        lines.append(
            f"- {w}: {len(f)} of {int((cells['workload'] == w).sum())} cells on the P95 frontier{p_txt}; "
            f"{interior.get('n_interior', 0)} frontier points sit at no knob's extreme."
        )
    lines += ["", "## Illustrative cases", ""]
    cross = cases.get("cross_workload", [])  # ranked by the analysis
    for c in cross[:3]:
        lines.append(
            f"- {_setting(c['setting'])}: on the {c['optimal_for']} frontier, dominated for {c['dominated_for']} "
            f"by {_f(c['quality_gap'])} quality at the same latency ({_pct(c['quality_gap_normalised'], 0)} of "
            f"its quality range; {_pct(c['latency_excess_fraction'], 0)} of its latency could be saved at equal "
            "quality"
            + (
                f"; on the {c['optimal_for']} frontier in {_pct(c['p_on_frontier'], 0)} of resamples)."
                if c.get("p_on_frontier") is not None
                else ")."
            )
        )
    if not cross:
        lines.append("- No setting is optimal for one workload and dominated for the other in this run.")
    worst = [c for c in cases.get("single_knob_worst", []) if c.get("worst_budget")]
    if worst:
        c, b = worst[0], worst[0]["worst_budget"]
        lines.append(
            f"- Largest single-knob loss: {c['workload']}, moving only {c['knob']}: "
            f"{_f(b['quality_loss'])} quality below the three-knob frontier at a {_f(b['budget_ms'])} ms "
            "budget."
        )
    return lines


def findings_markdown(results: Json, frontiers: Json, coupling: Json, policies: Json, cases: Json) -> str:
    """Markdown summary of which of the study's expected findings hold on this run, with their numbers."""
    cells = pd.DataFrame(results["cells"])
    lines = (
        _grid(results, cells, coupling)
        + _q1(coupling)
        + _q2(coupling)
        + _q3(coupling)
        + _q4(coupling, policies)
        + _frontiers_and_cases(cells, frontiers, cases)
    )
    return "\n".join(lines) + "\n"
