"""Are the knobs coupled? Interaction shares (ANOVA on the grid), frontiers of two knobs with the third
fixed, workload comparison, and verdicts on the study's four questions."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .bootstrap import CELL_KEYS, CellReplicates, percentile_interval
from .defaults import KNOBS, PRIMARY_LATENCY
from .frontier import frontier_mask, hypervolume, knob_order
from .policies import latency_budgets

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported by this run", "inconclusive"
VERDICT_RULE = (
    f"'{SUPPORTED}' when the statistic's bootstrap interval lies entirely on the hypothesis' side of the "
    f"threshold, '{NOT_SUPPORTED}' when it lies entirely on the other side (or at it), '{INCONCLUSIVE}' "
    "when it straddles the threshold or could not be computed; a question's overall verdict is "
    f"'{SUPPORTED}' if any workload (or knob) supports it, '{NOT_SUPPORTED}' if all reject it, else "
    f"'{INCONCLUSIVE}'"
)
# response name -> (cell column, transform)
RESPONSES: dict[str, tuple[str, Any]] = {
    "quality": ("quality", None),
    "latency_mean_ms": ("latency_mean_ms", None),
    "latency_p95_ms": (PRIMARY_LATENCY, None),
    "log_latency_p95_ms": (PRIMARY_LATENCY, np.log),
}
VERDICT_RESPONSES = ("quality", "latency_p95_ms")
TERMS = (
    "vision_tokens",
    "top_k",
    "active_blocks",
    "vision_tokens:top_k",
    "vision_tokens:active_blocks",
    "top_k:active_blocks",
    "vision_tokens:top_k:active_blocks",
)


SHARE_CI_METHOD = (
    "percentile bootstrap interval shifted by the bootstrap bias (mean of the replicates minus the point "
    "estimate), clipped to [0, 1]"
)


def bias_corrected_interval(replicates: np.ndarray, point: float, ci_level: float) -> tuple[float, float]:
    """Interval of a variance share. Resampling the samples of every cell adds sampling noise to every cell
    value once more, and noise always lands partly in the interaction terms: the replicates sit above the
    point estimate by about one noise floor, so a plain percentile interval can miss the point estimate
    altogether. Shifting it back by the bootstrap bias removes that second dose."""
    replicates = np.asarray(replicates, float)
    if not np.isfinite(point) or np.isnan(replicates).all():
        return np.nan, np.nan
    low, high = percentile_interval(replicates, ci_level)
    bias = float(np.nanmean(replicates)) - point
    return float(np.clip(low - bias, 0.0, 1.0)), float(np.clip(high - bias, 0.0, 1.0))


def verdict(low: float, high: float, threshold: float, *, above: bool = True) -> str:
    """Hypothesis 'statistic > threshold' (above=True) or 'statistic < threshold' judged on its interval."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    if above:
        return SUPPORTED if low > threshold else NOT_SUPPORTED if high <= threshold else INCONCLUSIVE
    return SUPPORTED if high < threshold else NOT_SUPPORTED if low >= threshold else INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    if any(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if verdicts and all(v == NOT_SUPPORTED for v in verdicts):
        return NOT_SUPPORTED
    return INCONCLUSIVE


# ---------------------------------------------------------------- interaction shares


def _levels(cells: pd.DataFrame) -> dict[str, list[int]]:
    return {k: sorted(int(v) for v in cells[k].unique()) for k in KNOBS}


def grid_array(cells: pd.DataFrame, values: np.ndarray) -> np.ndarray | None:
    """values (n_cells, ...) placed on the (V, K, B) grid; None when the grid is not a full factorial."""
    levels = _levels(cells)
    shape = tuple(len(levels[k]) for k in KNOBS)
    if len(cells) != int(np.prod(shape)) or cells[list(KNOBS)].duplicated().any():
        return None
    idx = tuple(np.searchsorted(levels[k], cells[k].to_numpy()) for k in KNOBS)
    out = np.empty(shape + values.shape[1:])
    out[idx] = values
    return out


def decompose(y: np.ndarray) -> dict[str, np.ndarray]:
    """Sums of squares of a balanced three-way layout y[i, j, k, ...] (one value per cell; trailing axes
    are independent replicates): main effects, two-way interactions, three-way residual, total."""
    g = y.mean(axis=(0, 1, 2))
    ma, mb, mc = y.mean(axis=(1, 2)), y.mean(axis=(0, 2)), y.mean(axis=(0, 1))
    a, b, c = ma - g, mb - g, mc - g
    ab = y.mean(axis=2) - ma[:, None] - mb[None, :] + g
    ac = y.mean(axis=1) - ma[:, None] - mc[None, :] + g
    bc = y.mean(axis=0) - mb[:, None] - mc[None, :] + g
    resid = (
        y
        - g
        - a[:, None, None]
        - b[None, :, None]
        - c[None, None, :]
        - ab[:, :, None]
        - ac[:, None, :]
        - bc[None, :, :]
    )
    n_i, n_j, n_k = y.shape[:3]
    return {
        "vision_tokens": n_j * n_k * (a**2).sum(axis=0),
        "top_k": n_i * n_k * (b**2).sum(axis=0),
        "active_blocks": n_i * n_j * (c**2).sum(axis=0),
        "vision_tokens:top_k": n_k * (ab**2).sum(axis=(0, 1)),
        "vision_tokens:active_blocks": n_j * (ac**2).sum(axis=(0, 1)),
        "top_k:active_blocks": n_i * (bc**2).sum(axis=(0, 1)),
        "vision_tokens:top_k:active_blocks": (resid**2).sum(axis=(0, 1, 2)),
        "total": ((y - g) ** 2).sum(axis=(0, 1, 2)),
    }


def additive_r2(cells: pd.DataFrame, values: np.ndarray) -> tuple[np.ndarray, int]:
    """R^2 of an additive OLS model with categorical knobs (values (n_cells, ...)), and its residual dof."""
    x = pd.get_dummies(cells[list(KNOBS)].astype(str), drop_first=True).to_numpy(float)
    x = np.column_stack([np.ones(len(cells)), x])
    y = values.reshape(len(cells), -1)
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    ss_res = ((y - x @ beta) ** 2).sum(axis=0)
    ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    return r2.reshape(values.shape[1:]), len(cells) - int(np.linalg.matrix_rank(x))


def interaction_shares(
    cells: pd.DataFrame,
    point: np.ndarray,
    replicates: np.ndarray | None,
    *,
    ci_level: float,
    threshold: float,
) -> dict[str, Any]:
    """Shares of the response's variation across the grid, with bootstrap intervals and a noise floor.

    point: (n_cells,) cell values; replicates: (n_cells, B) bootstrap replicates of them.
    """
    levels = _levels(cells)
    n = len(cells)
    dof_additive = 1 + sum(len(v) - 1 for v in levels.values())
    out: dict[str, Any] = {"n_cells": n, "levels": levels}
    y = grid_array(cells, point)
    if y is not None:
        ss = decompose(y)
        total = float(ss["total"])
        out.update(
            complete_grid=True,
            method="three-way ANOVA decomposition of cell values (full factorial)",
            ss_total=total,
            shares={t: float(ss[t]) / total if total > 0 else np.nan for t in TERMS},
        )
        non_add = 1.0 - sum(out["shares"][t] for t in KNOBS)
        out["non_additive_share"] = non_add
        two_way = [t for t in TERMS if t.count(":") == 1]
        out["dominant_interaction"] = max(two_way, key=lambda t: out["shares"][t]) if total > 0 else None
        if replicates is not None:
            ssr = decompose(grid_array(cells, replicates))
            with np.errstate(invalid="ignore", divide="ignore"):
                shr = {t: ssr[t] / ssr["total"] for t in TERMS}
            out["shares_ci"] = {
                t: [float(v) for v in bias_corrected_interval(shr[t], out["shares"][t], ci_level)]
                for t in TERMS
            }
            non_add_r = 1.0 - sum(shr[t] for t in KNOBS)
    else:
        r2, dof_res = additive_r2(cells, point[:, None])
        total = float(((point - point.mean()) ** 2).sum())
        non_add = 1.0 - float(r2[0])
        out.update(
            complete_grid=False,
            method="additive OLS with categorical knobs (grid incomplete: "
            "interaction terms not separable); non-additive share = 1 - R^2",
            ss_total=total,
            additive_r2=float(r2[0]),
            residual_dof=dof_res,
            non_additive_share=non_add,
        )
        if replicates is not None:
            non_add_r = 1.0 - additive_r2(cells, replicates)[0]
    dof_nonadd = n - dof_additive if out["complete_grid"] else out["residual_dof"]
    out["non_additive_dof"] = dof_nonadd
    if dof_nonadd <= 0:  # the additive model fits any values exactly: nothing to measure
        out["non_additive_share"] = np.nan
        out["note"] = f"{n} cells leave no degree of freedom beyond the additive model"
        out["verdict"] = INCONCLUSIVE
        return out
    if replicates is not None:
        low, high = bias_corrected_interval(non_add_r, out["non_additive_share"], ci_level)
        out["non_additive_share_ci_low"], out["non_additive_share_ci_high"] = float(low), float(high)
        out["ci_method"] = SHARE_CI_METHOD
        out["bootstrap_bias"] = float(np.nanmean(non_add_r) - out["non_additive_share"])
        # Sampling noise alone puts about (dof_nonadd / n) * sum of cell variances into the non-additive part.
        noise = dof_nonadd / n * float(np.var(replicates, axis=1, ddof=1).sum())
        out["noise_floor_share"] = noise / total if total > 0 else np.nan
        bar = max(threshold, out["noise_floor_share"]) if np.isfinite(out["noise_floor_share"]) else threshold
        out["verdict_threshold"] = bar
        out["verdict"] = verdict(low, high, bar)
    else:
        out["verdict"] = INCONCLUSIVE
    return out


# ---------------------------------------------------------------- slices: one knob fixed


def _jaccard_distance(a: set, b: set) -> float:
    union = a | b
    return 1.0 - len(a & b) / len(union) if union else 0.0


def _pairwise_distances(
    other_vals: np.ndarray, masks: list[np.ndarray], cost: np.ndarray, q: np.ndarray, rank: np.ndarray
) -> np.ndarray:
    """Jaccard distance between the frontier settings of every pair of slices, each pair compared on the
    other-knob settings both slices hold (an incomplete grid would otherwise differ by design); NaN where
    fewer than two settings are shared."""
    keys = [{tuple(x): i for i, x in zip(np.flatnonzero(m), other_vals[m])} for m in masks]
    n = len(masks)
    dist = np.full((n, n), np.nan)
    for a in range(n):
        dist[a, a] = 0.0
        for b in range(a + 1, n):
            common = sorted(keys[a].keys() & keys[b].keys())
            if len(common) < 2:
                continue
            fronts = []
            for k in (keys[a], keys[b]):
                idx = np.array([k[c] for c in common])
                fm = frontier_mask(cost[idx], q[idx], rank[idx])
                fronts.append({c for c, on in zip(common, fm) if on})
            dist[a, b] = dist[b, a] = _jaccard_distance(*fronts)
    return dist


def _mean_off_diagonal(dist: np.ndarray) -> float:
    upper = dist[np.triu_indices(len(dist), k=1)]
    upper = upper[np.isfinite(upper)]
    return float(upper.mean()) if len(upper) else np.nan


def _others(knob: str) -> list[str]:
    return [k for k in KNOBS if k != knob]


def slice_analysis(
    group: pd.DataFrame,
    reps_idx: np.ndarray | None,
    reps: CellReplicates | None,
    *,
    budgets: list[float],
    ci_level: float,
    threshold: float,
) -> dict[str, Any]:
    """For each knob and each of its values: the frontier over the other two knobs, best setting under
    each budget, hypervolume; Jaccard distances between slices (bootstrap interval of the mean)."""
    cost, q = group[PRIMARY_LATENCY].to_numpy(float), group["quality"].to_numpy(float)
    rank = knob_order(group)
    ref_cost, ref_q = float(cost.max()), float(q.min())
    scale_c, scale_q = float(np.ptp(cost)) or 1.0, float(np.ptp(q)) or 1.0
    out = {}
    for knob in KNOBS:
        others = _others(knob)
        values = sorted(int(v) for v in group[knob].unique())
        slices = []
        masks = [group[knob].to_numpy() == v for v in values]
        for value, m in zip(values, masks):
            sub = group[m]
            fm = frontier_mask(cost[m], q[m], rank[m])
            front = sub[fm].sort_values(PRIMARY_LATENCY)
            best = []
            for budget in budgets:
                ok = sub[sub[PRIMARY_LATENCY] <= budget]
                if ok.empty:
                    best.append({"budget_ms": budget, "setting": None, "quality": None})
                else:
                    top = ok.iloc[np.lexsort((knob_order(ok), -ok["quality"].to_numpy()))[0]]
                    best.append(
                        {
                            "budget_ms": budget,
                            "setting": {o: int(top[o]) for o in others},
                            "quality": float(top["quality"]),
                        }
                    )
            slices.append(
                {
                    "value": value,
                    "frontier": [
                        {
                            **{o: int(r[o]) for o in others},
                            "quality": float(r["quality"]),
                            PRIMARY_LATENCY: float(r[PRIMARY_LATENCY]),
                        }
                        for _, r in front.iterrows()
                    ],
                    "best_under_budget": best,
                    "hypervolume": hypervolume(
                        cost[m][fm],
                        q[m][fm],
                        ref_cost=ref_cost,
                        ref_benefit=ref_q,
                        cost_scale=scale_c,
                        benefit_scale=scale_q,
                    ),
                }
            )
        other_vals = group[others].to_numpy()
        dist = _pairwise_distances(other_vals, masks, cost, q, rank)
        res = {
            "others": others,
            "slices": slices,
            "jaccard_distance": dist,
            "mean_jaccard_distance": _mean_off_diagonal(dist),
            "budget_best_changes": sum(
                len({json_key(s["best_under_budget"][i]["setting"]) for s in slices}) > 1
                for i in range(len(budgets))
            ),
        }
        if reps is not None and reps_idx is not None and np.isfinite(res["mean_jaccard_distance"]):
            c_r, q_r = reps.stats[PRIMARY_LATENCY][reps_idx], reps.stats["quality"][reps_idx]
            boot = np.array(
                [
                    _mean_off_diagonal(_pairwise_distances(other_vals, masks, c_r[:, b], q_r[:, b], rank))
                    for b in range(reps.n_bootstrap)
                ]
            )
            low, high = percentile_interval(boot, ci_level)
            res["mean_jaccard_distance_ci_low"], res["mean_jaccard_distance_ci_high"] = (
                float(low),
                float(high),
            )
            res["verdict"] = verdict(low, high, threshold)
        else:
            res["verdict"] = INCONCLUSIVE
        out[knob] = res
    return out


def json_key(setting: Mapping[str, int] | None) -> str:
    return "none" if setting is None else ",".join(f"{k}={v}" for k, v in sorted(setting.items()))


# ---------------------------------------------------------------- workloads compared


def _spearman(x: pd.Series, y: pd.Series) -> float:
    if len(x) < 3 or np.ptp(x.to_numpy(float)) == 0 or np.ptp(y.to_numpy(float)) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def workload_comparison(
    cells: pd.DataFrame, reps: CellReplicates | None, *, ci_level: float, threshold: float
) -> dict[str, Any]:
    """Do the workloads share frontier settings? Jaccard distance of their frontiers over common cells."""
    workloads = sorted(cells["workload"].unique())
    if len(workloads) < 2:
        return {
            "workloads": workloads,
            "verdict": INCONCLUSIVE,
            "note": "fewer than two workloads in this run",
        }
    out: dict[str, Any] = {"workloads": workloads, "pairs": []}
    verdicts = []
    for wa, wb in itertools.combinations(workloads, 2):
        a = cells[cells["workload"] == wa].set_index(list(KNOBS))
        b = cells[cells["workload"] == wb].set_index(list(KNOBS))
        common = sorted(set(a.index) & set(b.index))
        a, b = a.loc[common].reset_index(), b.loc[common].reset_index()
        settings = [tuple(int(x) for x in r) for r in a[list(KNOBS)].to_numpy()]
        rank = knob_order(a)

        def front(c: np.ndarray, q: np.ndarray, settings=settings, rank=rank) -> set:
            return {s for s, on in zip(settings, frontier_mask(c, q, rank)) if on}

        fa = front(a[PRIMARY_LATENCY].to_numpy(float), a["quality"].to_numpy(float))
        fb = front(b[PRIMARY_LATENCY].to_numpy(float), b["quality"].to_numpy(float))
        pair: dict[str, Any] = {
            "workloads": [wa, wb],
            "n_common_cells": len(common),
            "frontier_settings": {wa: sorted(fa), wb: sorted(fb)},
            "shared_settings": sorted(fa & fb),
            "jaccard_distance": _jaccard_distance(fa, fb),
            "quality_spearman": _spearman(a["quality"], b["quality"]),
            "latency_p95_spearman": _spearman(a[PRIMARY_LATENCY], b[PRIMARY_LATENCY]),
        }
        flat = [w for w, d in ((wa, a), (wb, b)) if np.ptp(d["quality"].to_numpy(float)) == 0]
        if reps is not None:
            keys = reps.cells.set_index(list(CELL_KEYS)).index
            ia = keys.get_indexer([(wa, *k) for k in common])
            ib = keys.get_indexer([(wb, *k) for k in common])
            boot = np.empty(reps.n_bootstrap)
            for r in range(reps.n_bootstrap):
                sa = front(reps.stats[PRIMARY_LATENCY][ia, r], reps.stats["quality"][ia, r])
                sb = front(reps.stats[PRIMARY_LATENCY][ib, r], reps.stats["quality"][ib, r])
                boot[r] = _jaccard_distance(sa, sb)
            low, high = percentile_interval(boot, ci_level)
            pair["jaccard_distance_ci_low"], pair["jaccard_distance_ci_high"] = float(low), float(high)
            pair["verdict"] = verdict(low, high, threshold)
        else:
            pair["verdict"] = INCONCLUSIVE
        if flat:  # a frontier of constant quality is just the fastest cell: nothing to compare
            pair["verdict"] = INCONCLUSIVE
            pair["note"] = f"quality is the same in every cell of {', '.join(flat)}"
        verdicts.append(pair["verdict"])
        out["pairs"].append(pair)
    out["verdict"] = combine(verdicts)
    return out


# ---------------------------------------------------------------- single- vs multi-knob (Q4)


def single_knob_verdict(summary: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    """Q4 for one workload of e2_policy_comparison.json: 'supported' (every single-knob policy falls short)
    needs every knob's line through the full setting complete and every hypervolume-ratio interval below
    the threshold; a missing cell can only raise a single-knob ratio, so one interval at or above the
    threshold answers 'not supported' even on an incomplete line."""
    per_knob, verdicts, incomplete = {}, [], []
    for knob, res in summary["policies"].items():
        low, high = res.get("hypervolume_ratio_ci_low"), res.get("hypervolume_ratio_ci_high")
        low = np.nan if low is None else low
        high = np.nan if high is None else high
        per_knob[knob] = {
            "hypervolume_ratio": res["hypervolume_ratio"],
            "ci": [low, high],
            "missing_levels": res.get("missing_levels", []),
        }
        verdicts.append(verdict(low, high, threshold, above=False))
        if res.get("missing_levels"):
            incomplete.append(knob)
    if any(v == NOT_SUPPORTED for v in verdicts):
        result = NOT_SUPPORTED
    elif all(v == SUPPORTED for v in verdicts) and not incomplete:
        result = SUPPORTED
    else:
        result = INCONCLUSIVE
    out = {"best_single_knob": summary["best_single_knob"], "per_knob": per_knob, "verdict": result}
    if incomplete:
        out["note"] = f"the run lacks cells on the single-knob line of {', '.join(incomplete)}"
    return out


# ---------------------------------------------------------------- the report


def coupling_report(
    cells: pd.DataFrame,
    reps: CellReplicates | None,
    *,
    params: Mapping[str, Any],
    policies: Mapping[str, Any] | None = None,
    run: str = "",
) -> dict[str, Any]:
    """Content of e2_coupling_analysis.json; `policies` is e2_policy_comparison.json (for Q4)."""
    thr = params["thresholds"]
    ci_level = float(params["ci_level"])
    keys = reps.cells.set_index(list(CELL_KEYS)).index if reps is not None else None
    anova: dict[str, Any] = {}
    slices: dict[str, Any] = {}
    for workload, group in cells.groupby("workload", sort=True):
        group = group.reset_index(drop=True)
        idx = (
            keys.get_indexer(list(group[list(CELL_KEYS)].itertuples(index=False)))
            if keys is not None
            else None
        )
        if idx is not None and (idx < 0).any():
            raise ValueError(f"workload {workload!r}: cells in the results JSON lack rows for the bootstrap")
        anova[workload] = {}
        for name, (col, transform) in RESPONSES.items():
            f = transform or (lambda x: x)
            point = f(group[col].to_numpy(float))
            rep = f(reps.stats[col][idx]) if reps is not None else None
            anova[workload][name] = interaction_shares(
                group, point, rep, ci_level=ci_level, threshold=thr["interaction_share"]
            )
        slices[workload] = slice_analysis(
            group,
            idx,
            reps,
            budgets=latency_budgets(cells, workload, params),
            ci_level=ci_level,
            threshold=thr["slice_jaccard"],
        )
    workloads = workload_comparison(cells, reps, ci_level=ci_level, threshold=thr["workload_jaccard"])

    q1 = {w: {r: anova[w][r]["verdict"] for r in VERDICT_RESPONSES} for w in anova}
    q3 = {w: {k: slices[w][k]["verdict"] for k in KNOBS} for w in slices}
    q4 = {
        w: single_knob_verdict(summary, thr["single_knob_hv_ratio"])
        for w, summary in (policies or {"workloads": {}})["workloads"].items()
    }
    questions = {
        "Q1": {
            "question": "Are the knobs coupled?",
            "hypothesis": "the share of quality's or P95 latency's variation across the grid that additive "
            "per-knob effects leave unexplained exceeds the threshold (and the noise floor)",
            "threshold": thr["interaction_share"],
            "per_workload": q1,
            "verdict": combine([v for d in q1.values() for v in d.values()]),
        },
        "Q2": {
            "question": "Are the optima workload-specific?",
            "hypothesis": "the Jaccard distance between the workloads' frontier settings exceeds the threshold",
            "threshold": thr["workload_jaccard"],
            "per_pair": [
                {
                    "workloads": p["workloads"],
                    "jaccard_distance": p["jaccard_distance"],
                    "ci": [p.get("jaccard_distance_ci_low"), p.get("jaccard_distance_ci_high")],
                    "verdict": p["verdict"],
                }
                for p in workloads.get("pairs", [])
            ],
            "verdict": workloads["verdict"],
        },
        "Q3": {
            "question": "Does fixing one knob move the frontier over the other two?",
            "hypothesis": "the mean Jaccard distance between the frontier settings of the other two knobs, "
            "across the fixed knob's values, exceeds the threshold",
            "threshold": thr["slice_jaccard"],
            "per_workload": q3,
            "verdict": combine([v for d in q3.values() for v in d.values()]),
        },
        "Q4": {
            "question": "Do single-knob policies fall short of multi-knob ones?",
            "hypothesis": "every single-knob policy falls short of the three-knob frontier: each one's "
            "hypervolume ratio stays below the threshold",
            "threshold": thr["single_knob_hv_ratio"],
            "per_workload": q4,
            "verdict": combine([d["verdict"] for d in q4.values()]) if q4 else INCONCLUSIVE,
        },
    }
    return {
        "run": run,
        "params": dict(params),
        "verdict_rule": VERDICT_RULE,
        "latency_statistic": PRIMARY_LATENCY,
        "questions": questions,
        "anova": anova,
        "slices": slices,
        "workload_comparison": workloads,
    }
