"""Defaults of every analysis parameter: the one place they live.

The workflow's `config.yaml` may override any key under `analysis:`; `analysis_params` merges and checks.
Each output JSON records the parameters it was computed with, thresholds included.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

KNOBS: tuple[str, ...] = ("vision_tokens", "top_k", "active_blocks")
WORKLOADS: tuple[str, ...] = ("qa", "captioning")
LATENCY_STATS: tuple[str, ...] = ("latency_mean_ms", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms")
#: Latency statistic every headline frontier, budget and verdict uses.
PRIMARY_LATENCY = "latency_p95_ms"
CAPTION_SECONDARY_METRICS: tuple[str, ...] = ("bleu4", "rouge_l", "meteor")

ANALYSIS_DEFAULTS: dict[str, Any] = {
    # Bootstrap over samples within each cell (percentile intervals).
    "n_bootstrap": 1000,
    "seed": 0,
    "ci_level": 0.95,
    # Latency budgets for "best setting under a budget" and single- vs multi-knob comparisons. Absolute
    # budgets (ms) per workload if given ({"qa": [...], "captioning": [...]} or one list for both);
    # otherwise these quantiles of the workload's cell P95 latencies.
    "latency_budgets_ms": None,
    "latency_budget_quantiles": [0.1, 0.25, 0.5, 0.75, 0.9],
    # The model's default experts per token; None: the grid's largest top_k. If it is not a grid value,
    # the largest grid value below it is used (recorded in the output).
    "default_top_k": None,
    # Verdict thresholds (see analysis.coupling.verdict for the rule).
    "thresholds": {
        # Q1: coupled if the non-additive share of variation exceeds this (CI lower bound) and the noise floor.
        "interaction_share": 0.05,
        # Q2: workload-specific if the Jaccard distance between the workloads' frontier settings exceeds it.
        "workload_jaccard": 0.3,
        # Q3: fixing a knob moves the frontier if the mean Jaccard distance between slices exceeds it.
        "slice_jaccard": 0.3,
        # Q4: a single-knob policy matches the three-knob one if its hypervolume ratio reaches this.
        "single_knob_hv_ratio": 0.95,
    },
    # Illustrative cases: at most this many per workload pair; cases whose setting stays on its frontier in
    # at least this share of resamples are shown first.
    "n_cases": 5,
    "cases_min_p_on_frontier": 0.5,
}


def analysis_params(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults updated by `overrides` (the config's `analysis:` section); unknown keys are an error."""
    params = copy.deepcopy(ANALYSIS_DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in params:
            raise ValueError(f"config analysis: unknown key {key!r}; known keys: {sorted(params)}")
        if key == "thresholds":
            unknown = set(value or {}) - set(params["thresholds"])
            if unknown:
                raise ValueError(f"config analysis.thresholds: unknown keys {sorted(unknown)}")
            params["thresholds"].update(value or {})
        else:
            params[key] = value
    if int(params["n_bootstrap"]) < 2:
        raise ValueError(f"config analysis.n_bootstrap must be >= 2, got {params['n_bootstrap']!r}")
    if not 0 < float(params["ci_level"]) < 1:
        raise ValueError(f"config analysis.ci_level must be in (0, 1), got {params['ci_level']!r}")
    for q in params["latency_budget_quantiles"]:
        if not 0 <= float(q) <= 1:
            raise ValueError(f"config analysis.latency_budget_quantiles: {q!r} is not in [0, 1]")
    return params
