"""Pareto frontiers (lower cost, higher benefit), hypervolume and budget look-ups on them.

A setting is on the frontier when no other setting has cost <= and benefit >= with one of them strict.
Ties: among equal cost only the best benefit stays, among equal benefit only the lowest cost; exact
duplicates in both keep one, the lowest (vision_tokens, top_k, active_blocks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .bootstrap import CELL_KEYS, CellReplicates
from .defaults import CAPTION_SECONDARY_METRICS, KNOBS, LATENCY_STATS, PRIMARY_LATENCY

FRONTIER_DEFINITION = (
    "settings no other setting beats on both cost (lower) and benefit (higher); equal cost keeps only the "
    "best benefit, equal benefit keeps only the lowest cost, exact duplicates keep the lowest "
    "(vision_tokens, top_k, active_blocks); sorted by cost"
)


def knob_order(df: pd.DataFrame) -> np.ndarray:
    """Rank of each row by (vision_tokens, top_k, active_blocks): the duplicate tie-break."""
    knobs = [df[k].to_numpy() for k in KNOBS if k in df.columns]
    order = np.lexsort(knobs[::-1])
    rank = np.empty(len(df), int)
    rank[order] = np.arange(len(df))
    return rank


def frontier_mask(cost: np.ndarray, benefit: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of frontier members for 1-d cost/benefit arrays (tiebreak: lower wins duplicates)."""
    cost, benefit = np.asarray(cost, float), np.asarray(benefit, float)
    if np.isnan(cost).any() or np.isnan(benefit).any():
        raise ValueError("frontier: cost or benefit holds NaN")
    tiebreak = np.arange(len(cost)) if tiebreak is None else np.asarray(tiebreak)
    order = np.lexsort((tiebreak, -benefit, cost))  # last key sorts first
    b = benefit[order]
    best_before = np.concatenate(([-np.inf], np.maximum.accumulate(b)[:-1]))
    mask = np.zeros(len(cost), bool)
    mask[order[b > best_before]] = True
    return mask


def pareto_frontier(df: pd.DataFrame, *, cost: str, benefit: str) -> pd.DataFrame:
    """The frontier rows of `df` (original index kept), sorted by cost."""
    for col in (cost, benefit):
        if col not in df.columns:
            raise ValueError(f"pareto_frontier: no column {col!r}")
        bad = df[col].isna()
        if bad.any():
            raise ValueError(
                f"pareto_frontier: column {col!r} is NaN in {int(bad.sum())} rows, e.g. "
                f"{df.loc[bad].iloc[0][[c for c in KNOBS if c in df]].to_dict()}"
            )
    if df.empty:
        return df.copy()
    knobs = [k for k in KNOBS if k in df.columns]
    tiebreak = knob_order(df) if knobs else np.arange(len(df))
    mask = frontier_mask(df[cost].to_numpy(float), df[benefit].to_numpy(float), tiebreak)
    return df[mask].sort_values([cost, benefit], ascending=[True, False], kind="mergesort")


def hypervolume(
    front_cost: np.ndarray,
    front_benefit: np.ndarray,
    *,
    ref_cost: float,
    ref_benefit: float,
    cost_scale: float = 1.0,
    benefit_scale: float = 1.0,
) -> float:
    """Area dominated by the points and bounded by the reference point (worse than it counts zero),
    in units of cost_scale x benefit_scale."""
    c, b = np.asarray(front_cost, float), np.asarray(front_benefit, float)
    keep = (c <= ref_cost) & (b >= ref_benefit)
    if not keep.any():
        return 0.0
    mask = frontier_mask(c[keep], b[keep])
    c, b = c[keep][mask], b[keep][mask]
    order = np.argsort(c)
    c, b = c[order], b[order]
    widths = np.diff(np.append(c, ref_cost))
    return float(np.sum(widths * (b - ref_benefit)) / (cost_scale * benefit_scale))


def best_benefit_within(cost: np.ndarray, benefit: np.ndarray, budget: float) -> float:
    """Best benefit among points with cost <= budget (NaN when none fits): the frontier as a step function."""
    cost, benefit = np.asarray(cost, float), np.asarray(benefit, float)
    ok = cost <= budget
    return float(benefit[ok].max()) if ok.any() else float("nan")


def least_cost_reaching(cost: np.ndarray, benefit: np.ndarray, target: float) -> float:
    """Lowest cost among points with benefit >= target (NaN when none reaches it)."""
    cost, benefit = np.asarray(cost, float), np.asarray(benefit, float)
    ok = benefit >= target
    return float(cost[ok].min()) if ok.any() else float("nan")


def frontier_membership(reps: CellReplicates, *, cost: str, benefit: str = "quality") -> np.ndarray:
    """Per cell of reps.cells: share of bootstrap replicates in which it is on its workload's frontier."""
    counts = np.zeros(len(reps.cells))
    knobs_rank = knob_order(reps.cells)
    for idx in reps.cells.groupby("workload").indices.values():
        c, b = reps.stats[cost][idx], reps.stats[benefit][idx]
        for r in range(reps.n_bootstrap):
            counts[idx] += frontier_mask(c[:, r], b[:, r], knobs_rank[idx])
    return counts / reps.n_bootstrap


def _point_record(row: pd.Series, columns: list[str]) -> dict[str, Any]:
    rec = {"workload": row["workload"], **{k: int(row[k]) for k in KNOBS}}
    for col in columns:
        for name in (col, f"{col}_ci_low", f"{col}_ci_high"):
            if name in row.index:
                rec[name] = row[name]
    for extra in ("n_samples", "latency_n_samples", "p_on_frontier"):
        if extra in row.index and pd.notna(row[extra]):
            rec[extra] = row[extra]
    return rec


def compute_frontiers(cells: pd.DataFrame, reps: CellReplicates | None = None) -> list[dict[str, Any]]:
    """Frontiers per workload: quality vs every latency statistic, and each secondary caption metric vs P95.

    With `reps`, each point of a quality frontier carries p_on_frontier: the share of bootstrap
    replicates (samples resampled within every cell) in which it stays on the frontier.
    """
    out = []
    membership: dict[str, pd.DataFrame] = {}
    if reps is not None:
        for lat in LATENCY_STATS:
            membership[lat] = reps.cells.assign(p_on_frontier=frontier_membership(reps, cost=lat))
    for workload, group in cells.groupby("workload", sort=True):
        pairs = [(lat, "quality") for lat in LATENCY_STATS]
        pairs += [
            (PRIMARY_LATENCY, m)
            for m in CAPTION_SECONDARY_METRICS
            if m in group.columns and group[m].notna().all()
        ]
        for cost, benefit in pairs:
            g = group
            if benefit == "quality" and cost in membership:
                g = group.merge(membership[cost], on=list(CELL_KEYS), how="left")
            front = pareto_frontier(g, cost=cost, benefit=benefit)
            cols = [benefit, cost] + (["quality"] if benefit != "quality" else [])
            out.append(
                {
                    "workload": workload,
                    "cost": cost,
                    "benefit": benefit,
                    "quality_metric": group["quality_metric"].iloc[0] if "quality_metric" in group else None,
                    "n_cells": len(group),
                    "n_points": len(front),
                    "points": [_point_record(r, cols) for _, r in front.iterrows()],
                }
            )
    return out


def frontiers_report(
    cells: pd.DataFrame, reps: CellReplicates | None, *, run: str, params: dict[str, Any]
) -> dict[str, Any]:
    """Content of e2_pareto_frontiers.json."""
    return {
        "run": run,
        "definition": FRONTIER_DEFINITION,
        "primary_cost": PRIMARY_LATENCY,
        "n_bootstrap": None if reps is None else reps.n_bootstrap,
        "seed": params.get("seed"),
        "p_on_frontier_method": "share of bootstrap replicates (samples resampled within every cell, "
        "cell statistics and the frontier recomputed) in which the setting is "
        "on the frontier",
        "frontiers": compute_frontiers(cells, reps),
    }


def get_frontier(
    frontiers: dict[str, Any], workload: str, cost: str = PRIMARY_LATENCY, benefit: str = "quality"
) -> pd.DataFrame:
    """One frontier of an e2_pareto_frontiers.json dict as a DataFrame (empty if absent)."""
    for f in frontiers["frontiers"]:
        if f["workload"] == workload and f["cost"] == cost and f["benefit"] == benefit:
            return pd.DataFrame(f["points"])
    return pd.DataFrame()
