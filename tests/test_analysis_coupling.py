"""Coupling: additive grids read as uncoupled, planted interactions are found on the right knob pair."""

import numpy as np
import pandas as pd
import pytest
from knobsweep.analysis.bootstrap import bootstrap_cells, percentile_interval
from knobsweep.analysis.coupling import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    additive_r2,
    coupling_report,
    decompose,
    grid_array,
    interaction_shares,
    verdict,
)
from knobsweep.analysis.defaults import analysis_params
from knobsweep.analysis.example import synthetic_rows

PARAMS = analysis_params({"n_bootstrap": 60, "seed": 3})


def additive_quality(workload, xv, xk, xb):
    return 0.2 + 0.3 * xv + 0.2 * xk**2 + 0.25 * np.sqrt(xb)


def additive_latency(workload, xv, xk, xb):
    return 5 + 20 * xv + 8 * xk + 15 * xb


def planted_quality(workload, xv, xk, xb):
    # The same main effects plus a strong vision_tokens x top_k interaction (a crossing pattern).
    return additive_quality(workload, xv, xk, xb) + 0.4 * (xv - 0.6) * (xk - 0.6) * 4


def analyse(quality_fn, latency_fn=additive_latency, noise=0.02):
    rows = synthetic_rows(
        n_samples=30,
        quality_fn=quality_fn,
        latency_fn=latency_fn,
        quality_noise=noise,
        latency_noise=0.01,
        seed=5,
    )
    reps = bootstrap_cells(rows, n_bootstrap=PARAMS["n_bootstrap"], seed=PARAMS["seed"])
    cells = rows.groupby(["workload", "vision_tokens", "top_k", "active_blocks"], as_index=False).agg(
        quality=("quality", "mean"),
        latency_mean_ms=("latency_ms", "mean"),
        latency_p95_ms=("latency_ms", lambda x: np.percentile(x, 95)),
    )
    return coupling_report(cells, reps, params=PARAMS)


def test_additive_grid_reads_as_not_coupled():
    out = analyse(additive_quality)
    for workload in ("qa", "captioning"):
        a = out["anova"][workload]["quality"]
        assert a["complete_grid"]
        assert a["non_additive_share"] < 0.02
        assert a["verdict"] == NOT_SUPPORTED
        assert out["anova"][workload]["latency_p95_ms"]["verdict"] == NOT_SUPPORTED
        # Additive quality and latency: fixing a knob cannot change which other settings are optimal.
        for knob in ("vision_tokens", "top_k", "active_blocks"):
            assert out["slices"][workload][knob]["mean_jaccard_distance"] == 0.0
    assert out["questions"]["Q1"]["verdict"] == NOT_SUPPORTED
    assert out["questions"]["Q4"]["verdict"] == INCONCLUSIVE  # no policy comparison given


def test_planted_interaction_is_found_on_its_pair():
    out = analyse(planted_quality)
    for workload in ("qa", "captioning"):
        a = out["anova"][workload]["quality"]
        assert a["verdict"] == SUPPORTED
        assert a["dominant_interaction"] == "vision_tokens:top_k"
        shares = a["shares"]
        assert shares["vision_tokens:top_k"] > 10 * max(
            shares["vision_tokens:active_blocks"], shares["top_k:active_blocks"]
        )
        assert shares["vision_tokens:top_k"] == pytest.approx(a["non_additive_share"], abs=0.02)
        assert a["shares_ci"]["vision_tokens:top_k"][0] > PARAMS["thresholds"]["interaction_share"]
    assert out["questions"]["Q1"]["verdict"] == SUPPORTED


def test_decomposition_matches_least_squares():
    rng = np.random.default_rng(0)
    grid = pd.MultiIndex.from_product(
        [[1, 2, 3], [1, 2], [4, 8, 12, 16]], names=["vision_tokens", "top_k", "active_blocks"]
    ).to_frame(index=False)
    y = rng.normal(size=len(grid))
    ss = decompose(grid_array(grid, y))
    terms = [k for k in ss if k != "total"]
    assert sum(ss[t] for t in terms) == pytest.approx(ss["total"])  # orthogonal decomposition
    main = sum(ss[k] for k in ("vision_tokens", "top_k", "active_blocks")) / ss["total"]
    r2, _ = additive_r2(grid, y[:, None])
    assert main == pytest.approx(float(r2[0]))
    # Two-way term = gain in R^2 when that interaction joins the additive OLS model (balanced design).
    x = pd.get_dummies(grid.astype(str), drop_first=True).astype(float)
    inter = np.column_stack(
        [
            x.filter(like="vision_tokens").to_numpy()[:, [i]] * x.filter(like="top_k").to_numpy()[:, [j]]
            for i in range(2)
            for j in range(1)
        ]
    )
    design = np.column_stack([np.ones(len(grid)), x.to_numpy(), inter])
    resid = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    r2_with = 1 - (resid**2).sum() / ((y - y.mean()) ** 2).sum()
    assert r2_with - main == pytest.approx(ss["vision_tokens:top_k"] / ss["total"])


def test_incomplete_grid_falls_back_to_ols():
    rng = np.random.default_rng(1)
    grid = pd.MultiIndex.from_product(
        [[1, 2, 3], [1, 2, 4], [4, 8, 12]], names=["vision_tokens", "top_k", "active_blocks"]
    ).to_frame(index=False)
    grid = grid.drop(index=[0, 5, 13]).reset_index(drop=True)
    y = grid["vision_tokens"] + 2.0 * grid["top_k"] + 0.1 * rng.normal(size=len(grid))
    out = interaction_shares(grid, y.to_numpy(float), None, ci_level=0.95, threshold=0.05)
    assert out["complete_grid"] is False and "incomplete" in out["method"]
    assert out["non_additive_share"] < 0.05 and out["residual_dof"] == len(grid) - 7
    assert out["verdict"] == INCONCLUSIVE  # no bootstrap replicates given


def test_verdict_rule():
    assert verdict(0.06, 0.1, 0.05) == SUPPORTED
    assert verdict(0.01, 0.04, 0.05) == NOT_SUPPORTED
    assert verdict(0.04, 0.06, 0.05) == INCONCLUSIVE
    assert verdict(0.5, 0.9, 0.95, above=False) == SUPPORTED
    assert verdict(float("nan"), 0.9, 0.95) == INCONCLUSIVE


def test_planted_interaction_moves_the_slice_frontiers():
    out = analyse(planted_quality)
    # Crossing vision_tokens x top_k pattern: which top_k is worth its latency depends on vision_tokens.
    for workload in ("qa", "captioning"):
        assert out["slices"][workload]["vision_tokens"]["mean_jaccard_distance"] > 0.2


def test_incomplete_additive_grid_keeps_slice_frontiers_equal():
    rows = synthetic_rows(
        n_samples=10,
        quality_fn=additive_quality,
        latency_fn=additive_latency,
        quality_noise=0.0,
        latency_noise=0.0,
        workloads=("qa",),
    )
    cells = rows.groupby(["workload", "vision_tokens", "top_k", "active_blocks"], as_index=False).agg(
        quality=("quality", "mean"),
        latency_mean_ms=("latency_ms", "mean"),
        latency_p95_ms=("latency_ms", lambda x: np.percentile(x, 95)),
    )
    # Drop a different other-knob setting from each vision_tokens slice: the slices now hold different
    # settings, which alone must not read as a moved frontier.
    drop = ((cells["vision_tokens"] == 64) & (cells["top_k"] == 4) & (cells["active_blocks"] == 4)) | (
        (cells["vision_tokens"] == 144) & (cells["top_k"] == 2) & (cells["active_blocks"] == 12)
    )
    out = coupling_report(cells[~drop].reset_index(drop=True), None, params=PARAMS)
    assert out["anova"]["qa"]["quality"]["complete_grid"] is False
    assert out["slices"]["qa"]["vision_tokens"]["mean_jaccard_distance"] == 0.0


def test_share_interval_removes_the_bootstraps_second_dose_of_noise():
    """Additive truth, noisy cells: resampling adds noise once more, so the replicates' non-additive share sits
    above the point estimate. The reported interval must still cover the point estimate (the plain percentile
    interval does not here), and the verdict must not call the noise an interaction."""
    rng = np.random.default_rng(3)
    grid = pd.MultiIndex.from_product(  # the seed study's full grid: 129 non-additive degrees of freedom
        [[1, 2, 3], [1, 2, 4, 8, 16, 32], [8, 10, 12, 14, 16, 18, 20, 24]],
        names=["vision_tokens", "top_k", "active_blocks"],
    ).to_frame(index=False)
    truth = 0.1 * grid["vision_tokens"] + 0.01 * np.log2(grid["top_k"]) + 0.01 * grid["active_blocks"]
    sigma = 0.03
    point = truth.to_numpy(float) + rng.normal(0, sigma, len(grid))
    replicates = point[:, None] + rng.normal(0, sigma, (len(grid), 500))
    out = interaction_shares(grid, point, replicates, ci_level=0.95, threshold=0.05)
    plain_low, _ = percentile_interval(1.0 - additive_r2(grid, replicates)[0], 0.95)
    # The plain percentile interval misses its own point estimate here.
    assert plain_low > out["non_additive_share"], (plain_low, out["non_additive_share"])
    assert out["non_additive_share_ci_low"] <= out["non_additive_share"] <= out["non_additive_share_ci_high"]
    assert out["bootstrap_bias"] > 0 and "bias" in out["ci_method"]
    for term, (low, high) in out["shares_ci"].items():
        assert low <= out["shares"][term] + 1e-12 and out["shares"][term] <= high + 1e-12, term
    assert out["verdict"] != SUPPORTED
