"""Single- vs multi-knob policies on a hand-computable grid of eight cells."""

import numpy as np
import pandas as pd
import pytest
from knobsweep.analysis.coupling import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, single_knob_verdict
from knobsweep.analysis.defaults import analysis_params
from knobsweep.analysis.policies import compare_policies, resolve_default_top_k

# (vision_tokens, top_k, active_blocks): (P95 latency ms, quality); full setting = (2, 2, 2).
CELLS = {
    (2, 2, 2): (10, 1.0),
    (1, 2, 2): (6, 0.9),
    (2, 1, 2): (8, 0.5),
    (2, 2, 1): (7, 0.6),
    (1, 1, 1): (2, 0.4),
    (1, 1, 2): (4, 0.7),
    (1, 2, 1): (3, 0.5),
    (2, 1, 1): (5, 0.3),
}


def cells() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "workload": "qa",
                "vision_tokens": v,
                "top_k": k,
                "active_blocks": b,
                "latency_p95_ms": float(c),
                "quality": q,
                "quality_metric": "vqa_accuracy",
            }
            for (v, k, b), (c, q) in CELLS.items()
        ]
    )


def test_policies_by_hand():
    params = analysis_params({"latency_budgets_ms": [5, 7, 9, 10]})
    out = compare_policies(cells(), None, params=params)["workloads"]["qa"]
    assert out["full_setting"] == {"vision_tokens": 2, "top_k": 2, "active_blocks": 2}
    p = out["policies"]
    # Three-knob frontier (2,.4) (3,.5) (4,.7) (6,.9) (10,1); reference (10, 0.3): hypervolume 3.5.
    assert p["vision_tokens"]["hypervolume_multi"] == pytest.approx(3.5)
    assert p["vision_tokens"]["hypervolume_ratio"] == pytest.approx(2.4 / 3.5)
    assert p["top_k"]["hypervolume_ratio"] == pytest.approx(0.4 / 3.5)
    assert p["active_blocks"]["hypervolume_ratio"] == pytest.approx(0.9 / 3.5)
    assert out["best_single_knob"] == "vision_tokens"
    # Budgets 5, 7, 9, 10 ms: multi-knob best 0.7, 0.9, 0.9, 1.0.
    losses = {k: [b["quality_loss"] for b in p[k]["at_budgets"]] for k in p}
    assert np.isnan(losses["vision_tokens"][0]) and losses["vision_tokens"][1:] == pytest.approx([0, 0, 0])
    assert losses["top_k"][2:] == pytest.approx([0.4, 0.0])
    assert losses["active_blocks"][1:] == pytest.approx([0.3, 0.3, 0.0])
    assert [p[k]["max_quality_loss"] for k in ("vision_tokens", "top_k", "active_blocks")] == pytest.approx(
        [0, 0.4, 0.3]
    )
    assert [p[k]["n_budgets_infeasible"] for k in ("vision_tokens", "top_k", "active_blocks")] == [1, 2, 1]
    # Matched quality: top_k's (8 ms, 0.5) is reached by the three-knob frontier at 3 ms.
    point = p["top_k"]["at_single_frontier_points"][0]
    assert (point["single_latency_ms"], point["multi_latency_at_quality_ms"]) == (8, 3)
    assert point["latency_saved_fraction"] == pytest.approx(5 / 8)
    assert p["vision_tokens"]["at_single_frontier_points"][0]["latency_saved_ms"] == 0


def test_default_top_k_resolution():
    assert resolve_default_top_k([1, 2, 4], None) == 4
    assert resolve_default_top_k([1, 2, 4], 3) == 2
    assert resolve_default_top_k([1, 2, 8], 8) == 8
    with pytest.raises(ValueError, match="default_top_k=0"):
        resolve_default_top_k([1, 2], 0)


def test_default_top_k_moves_the_full_setting():
    params = analysis_params({"latency_budgets_ms": [10], "default_top_k": 1})
    out = compare_policies(cells(), None, params=params)["workloads"]["qa"]
    assert out["full_setting"]["top_k"] == 1
    # vision_tokens alone now moves along (1,1,2) and (2,1,2): best within 10 ms is 0.7.
    assert out["policies"]["vision_tokens"]["at_budgets"][0]["single_quality"] == pytest.approx(0.7)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="'latency_budget'"):
        analysis_params({"latency_budget": [1]})


def _summary(ratios: dict, missing: dict | None = None) -> dict:
    missing = missing or {}
    return {
        "best_single_knob": max(ratios, key=lambda k: ratios[k][0]),
        "policies": {
            k: {
                "hypervolume_ratio": r[0],
                "hypervolume_ratio_ci_low": r[1],
                "hypervolume_ratio_ci_high": r[2],
                "missing_levels": missing.get(k, []),
            }
            for k, r in ratios.items()
        },
    }


def test_q4_verdict_needs_complete_lines():
    short = {"vision_tokens": (0.7, 0.6, 0.8), "top_k": (0.3, 0.2, 0.4), "active_blocks": (0.5, 0.4, 0.6)}
    assert single_knob_verdict(_summary(short), 0.95)["verdict"] == SUPPORTED
    # A missing cell could raise a ratio: falling short cannot be concluded.
    out = single_knob_verdict(_summary(short, {"top_k": [8]}), 0.95)
    assert out["verdict"] == INCONCLUSIVE and "top_k" in out["note"]
    # One policy reaching the threshold answers the question even on an incomplete line.
    matched = {**short, "vision_tokens": (0.97, 0.96, 0.99)}
    assert single_knob_verdict(_summary(matched, {"top_k": [8]}), 0.95)["verdict"] == NOT_SUPPORTED
    straddling = {**short, "vision_tokens": (0.94, 0.9, 0.97)}
    assert single_knob_verdict(_summary(straddling), 0.95)["verdict"] == INCONCLUSIVE
