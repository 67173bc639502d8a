"""Single-knob policies (move one knob, the other two at the model's full setting) against the
three-knob frontier: quality lost at matched latency budgets, latency saved at matched quality,
hypervolume ratio, with bootstrap intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..knobs import resolve_default_top_k
from .bootstrap import CellReplicates, percentile_interval
from .defaults import KNOBS, PRIMARY_LATENCY
from .frontier import best_benefit_within, hypervolume, least_cost_reaching, pareto_frontier


def latency_budgets(cells: pd.DataFrame, workload: str, params: Mapping[str, Any]) -> list[float]:
    """Latency budgets (ms) for a workload: configured ones, else quantiles of its cells' P95 latency."""
    given = params.get("latency_budgets_ms")
    if isinstance(given, Mapping):
        given = given.get(workload)
    if given:
        return sorted(float(b) for b in given)
    lat = cells.loc[cells["workload"] == workload, PRIMARY_LATENCY].to_numpy(float)
    return sorted(float(np.quantile(lat, q)) for q in params["latency_budget_quantiles"])


def full_setting(cells: pd.DataFrame, default_top_k: int | None) -> dict[str, int]:
    return {
        "vision_tokens": int(cells["vision_tokens"].max()),
        "top_k": resolve_default_top_k(cells["top_k"], default_top_k),
        "active_blocks": int(cells["active_blocks"].max()),
    }


def policy_cells(cells: pd.DataFrame, knob: str, full: Mapping[str, int]) -> pd.DataFrame:
    """Cells reachable by moving only `knob`, the other knobs at their full setting."""
    mask = np.ones(len(cells), bool)
    for other in KNOBS:
        if other != knob:
            mask &= cells[other].to_numpy() == full[other]
    return cells[mask]


def _compare(
    single: pd.DataFrame, multi: pd.DataFrame, budgets: Sequence[float], ref: tuple[float, float], cost: str
) -> dict[str, Any]:
    sf = pareto_frontier(single, cost=cost, benefit="quality") if len(single) else single
    mf = pareto_frontier(multi, cost=cost, benefit="quality")
    s_c, s_q = sf[cost].to_numpy(float), sf["quality"].to_numpy(float)
    m_c, m_q = mf[cost].to_numpy(float), mf["quality"].to_numpy(float)
    at_budgets = []
    for budget in budgets:
        bm, bs = best_benefit_within(m_c, m_q, budget), best_benefit_within(s_c, s_q, budget)
        at_budgets.append(
            {
                "budget_ms": budget,
                "multi_quality": bm,
                "single_quality": bs,
                "quality_loss": bm - bs,
                "single_feasible": bool(np.isfinite(bs)),
            }
        )
    at_points = []
    for c, q in zip(s_c, s_q):
        m_cost = least_cost_reaching(m_c, m_q, q)
        at_points.append(
            {
                "single_latency_ms": c,
                "single_quality": q,
                "multi_quality_at_latency": best_benefit_within(m_c, m_q, c),
                "multi_latency_at_quality_ms": m_cost,
                "latency_saved_ms": c - m_cost,
                "latency_saved_fraction": (c - m_cost) / c if c > 0 else np.nan,
            }
        )
    hv_m = hypervolume(m_c, m_q, ref_cost=ref[0], ref_benefit=ref[1])
    hv_s = hypervolume(s_c, s_q, ref_cost=ref[0], ref_benefit=ref[1])
    losses = [
        b["quality_loss"] for b in at_budgets if b["single_feasible"] and np.isfinite(b["quality_loss"])
    ]
    saved = [p["latency_saved_fraction"] for p in at_points if np.isfinite(p["latency_saved_fraction"])]
    return {
        "single_frontier": sf,
        "at_budgets": at_budgets,
        "at_single_frontier_points": at_points,
        "hypervolume_multi": hv_m,
        "hypervolume_single": hv_s,
        "hypervolume_ratio": hv_s / hv_m if hv_m > 0 else np.nan,
        "max_quality_loss": max(losses) if losses else np.nan,
        "mean_quality_loss": float(np.mean(losses)) if losses else np.nan,
        "n_budgets_infeasible": sum(not b["single_feasible"] for b in at_budgets),
        "max_latency_saved_fraction": max(saved) if saved else np.nan,
    }


def compare_policies(
    cells: pd.DataFrame,
    reps: CellReplicates | None,
    *,
    params: Mapping[str, Any],
    run: str = "",
    cost: str = PRIMARY_LATENCY,
) -> dict[str, Any]:
    """Content of e2_policy_comparison.json (see the README for the schema)."""
    ci_level = float(params["ci_level"])
    out: dict[str, Any] = {
        "run": run,
        "cost": cost,
        "benefit": "quality",
        "default_top_k_config": params.get("default_top_k"),
        "loss_definition": "multi-knob minus single-knob best quality with latency <= budget "
        "(frontiers as step functions); NaN/null where the single-knob "
        "policy has no setting within the budget",
        "hypervolume_reference": "the workload's worst latency and worst quality over all cells",
        "workloads": {},
    }
    for workload, group in cells.groupby("workload", sort=True):
        full = full_setting(group, params.get("default_top_k"))
        budgets = latency_budgets(cells, workload, params)
        ref = (float(group[cost].max()), float(group["quality"].min()))
        policies = {}
        for knob in KNOBS:
            single = policy_cells(group, knob, full)
            res = _compare(single, group, budgets, ref, cost)
            levels = sorted(int(v) for v in group[knob].unique())
            res["missing_levels"] = sorted(set(levels) - {int(v) for v in single[knob]})
            sf = res.pop("single_frontier")
            res["single_frontier"] = [
                {k: int(r[k]) for k in KNOBS} | {"quality": r["quality"], cost: r[cost]}
                for _, r in sf.iterrows()
            ]
            policies[knob] = res
        out["workloads"][workload] = {"full_setting": full, "budgets_ms": budgets, "policies": policies}
    if reps is not None:
        _add_bootstrap(out, reps, cost, ci_level)
    for summary in out["workloads"].values():
        policies = summary["policies"]
        ratios = {
            k: policies[k]["hypervolume_ratio"]
            for k in KNOBS
            if np.isfinite(policies[k]["hypervolume_ratio"])
        }
        summary["best_single_knob"] = max(ratios, key=ratios.get) if ratios else None
    return out


def _ratio_and_loss(
    c: np.ndarray, q: np.ndarray, single: np.ndarray, budgets: Sequence[float], ref: tuple[float, float]
) -> tuple[float, float]:
    """Hypervolume ratio and largest quality loss over the budgets (numpy only, for the bootstrap)."""
    hv_m = hypervolume(c, q, ref_cost=ref[0], ref_benefit=ref[1])
    hv_s = hypervolume(c[single], q[single], ref_cost=ref[0], ref_benefit=ref[1]) if single.any() else 0.0
    losses = [best_benefit_within(c, q, b) - best_benefit_within(c[single], q[single], b) for b in budgets]
    losses = [x for x in losses if np.isfinite(x)]
    return (hv_s / hv_m if hv_m > 0 else np.nan), (max(losses) if losses else np.nan)


def _add_bootstrap(out: dict[str, Any], reps: CellReplicates, cost: str, ci_level: float) -> None:
    """Intervals of the hypervolume ratio and the largest quality loss: the comparison recomputed on every
    bootstrap replicate of the cell statistics (budgets and full setting held fixed)."""
    for workload, idx in reps.cells.groupby("workload").indices.items():
        summary = out["workloads"].get(workload)
        if summary is None:
            continue
        wcells = reps.cells.iloc[idx]
        c_all, q_all = reps.stats[cost][idx], reps.stats["quality"][idx]
        for knob in KNOBS:
            single = np.ones(len(idx), bool)
            for other in KNOBS:
                if other != knob:
                    single &= wcells[other].to_numpy() == summary["full_setting"][other]
            vals = np.array(
                [
                    _ratio_and_loss(
                        c_all[:, b],
                        q_all[:, b],
                        single,
                        summary["budgets_ms"],
                        (float(c_all[:, b].max()), float(q_all[:, b].min())),
                    )
                    for b in range(reps.n_bootstrap)
                ]
            )
            res = summary["policies"][knob]
            for j, name in enumerate(("hypervolume_ratio", "max_quality_loss")):
                if np.isfinite(vals[:, j]).any():
                    low, high = percentile_interval(vals[:, j], ci_level)
                    res[f"{name}_ci_low"], res[f"{name}_ci_high"] = float(low), float(high)
