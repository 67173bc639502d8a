"""Illustrative cases: settings optimal for one workload and dominated for the other, where a single-knob
policy loses most to the three-knob one, and frontier points at no knob's extreme."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .defaults import KNOBS, PRIMARY_LATENCY
from .frontier import best_benefit_within, get_frontier, least_cost_reaching, pareto_frontier


def _setting(row: pd.Series) -> dict[str, int]:
    return {k: int(row[k]) for k in KNOBS}


def case_rank(case: Mapping[str, Any]) -> tuple:
    """Robust cases first (on the frontier in at least min_p_on_frontier of resamples, or no bootstrap),
    then the largest normalised quality gap."""
    return (
        not case["robust"],
        -(case["quality_gap_normalised"] or 0.0),
        -(case["latency_excess_fraction"] or 0.0),
    )


def cross_workload_cases(
    cells: pd.DataFrame, *, n_cases: int, min_p_on_frontier: float = 0.5
) -> list[dict[str, Any]]:
    """Settings on workload A's frontier but dominated for workload B, most striking first (case_rank).

    quality_gap: B's frontier quality within the setting's B latency minus its B quality;
    quality_gap_normalised divides by B's quality range over all its cells. latency_excess_ms: the
    setting's B latency minus the least latency on B's frontier reaching the same quality.
    """
    out = []
    workloads = sorted(cells["workload"].unique())
    for wa, wb in itertools.permutations(workloads, 2):
        a = cells[cells["workload"] == wa]
        b = cells[cells["workload"] == wb].set_index(list(KNOBS))
        fa = pareto_frontier(a, cost=PRIMARY_LATENCY, benefit="quality")
        fb = pareto_frontier(b.reset_index(), cost=PRIMARY_LATENCY, benefit="quality")
        on_b = {tuple(int(r[k]) for k in KNOBS) for _, r in fb.iterrows()}
        c_b, q_b = fb[PRIMARY_LATENCY].to_numpy(float), fb["quality"].to_numpy(float)
        q_range = float(np.ptp(b["quality"].to_numpy(float))) or 1.0
        found = []
        for _, r in fa.iterrows():
            key = tuple(int(r[k]) for k in KNOBS)
            if key in on_b or key not in b.index:
                continue
            rb = b.loc[key]
            gap = best_benefit_within(c_b, q_b, float(rb[PRIMARY_LATENCY])) - float(rb["quality"])
            excess = float(rb[PRIMARY_LATENCY]) - least_cost_reaching(c_b, q_b, float(rb["quality"]))
            found.append(
                {
                    "optimal_for": wa,
                    "dominated_for": wb,
                    "setting": dict(zip(KNOBS, key)),
                    "optimal_quality": float(r["quality"]),
                    "optimal_latency_p95_ms": float(r[PRIMARY_LATENCY]),
                    "p_on_frontier": r["p_on_frontier"]
                    if "p_on_frontier" in r and pd.notna(r["p_on_frontier"])
                    else None,
                    "dominated_quality": float(rb["quality"]),
                    "dominated_latency_p95_ms": float(rb[PRIMARY_LATENCY]),
                    "quality_gap": gap,
                    "quality_gap_normalised": gap / q_range,
                    "latency_excess_ms": excess,
                    "latency_excess_fraction": excess / float(rb[PRIMARY_LATENCY]),
                }
            )
        for d in found:
            d["robust"] = d["p_on_frontier"] is None or d["p_on_frontier"] >= min_p_on_frontier
        found.sort(key=case_rank)
        out.extend(found[:n_cases])
    return sorted(out, key=case_rank)


def single_knob_worst(policies: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per workload and knob: the budget where moving only that knob loses most quality."""
    out = []
    for workload, summary in policies["workloads"].items():
        for knob, res in summary["policies"].items():
            feasible = [
                b
                for b in res["at_budgets"]
                if b["single_feasible"]
                and b["quality_loss"] is not None
                and np.isfinite(b["quality_loss"])
                and b["quality_loss"] > 0
            ]
            worst = max(feasible, key=lambda b: b["quality_loss"]) if feasible else None
            out.append(
                {
                    "workload": workload,
                    "knob": knob,
                    "full_setting": summary["full_setting"],
                    "worst_budget": worst,
                    "n_budgets_infeasible": res["n_budgets_infeasible"],
                    "hypervolume_ratio": res["hypervolume_ratio"],
                }
            )
    out.sort(key=lambda d: -(d["worst_budget"]["quality_loss"] if d["worst_budget"] else -np.inf))
    return out


def interior_frontier_points(cells: pd.DataFrame) -> dict[str, Any]:
    """Frontier points whose every knob lies strictly between the grid's smallest and largest value."""
    out: dict[str, Any] = {}
    for workload, group in cells.groupby("workload", sort=True):
        front = pareto_frontier(group, cost=PRIMARY_LATENCY, benefit="quality")
        lo = {k: group[k].min() for k in KNOBS}
        hi = {k: group[k].max() for k in KNOBS}
        interior = front[np.all([(front[k] > lo[k]) & (front[k] < hi[k]) for k in KNOBS], axis=0)]
        out[workload] = {
            "n_frontier_points": len(front),
            "n_interior": len(interior),
            "points": [
                {**_setting(r), "quality": float(r["quality"]), PRIMARY_LATENCY: float(r[PRIMARY_LATENCY])}
                for _, r in interior.iterrows()
            ],
        }
    return out


def illustrative_cases(
    cells: pd.DataFrame,
    policies: Mapping[str, Any] | None,
    *,
    params: Mapping[str, Any],
    frontiers: Mapping[str, Any] | None = None,
    run: str = "",
) -> dict[str, Any]:
    """Content of e2_illustrative_cases.json (`frontiers`: e2_pareto_frontiers.json, for p_on_frontier)."""
    if frontiers is not None:
        p = pd.concat([get_frontier(frontiers, w) for w in cells["workload"].unique()], ignore_index=True)
        if "p_on_frontier" in p:
            cells = cells.merge(p[["workload", *KNOBS, "p_on_frontier"]], on=["workload", *KNOBS], how="left")
    return {
        "run": run,
        "latency_statistic": PRIMARY_LATENCY,
        "min_p_on_frontier": float(params["cases_min_p_on_frontier"]),
        "cross_workload": cross_workload_cases(
            cells, n_cases=int(params["n_cases"]), min_p_on_frontier=float(params["cases_min_p_on_frontier"])
        ),
        "single_knob_worst": single_knob_worst(policies) if policies is not None else [],
        "interior_frontier_points": interior_frontier_points(cells),
    }
