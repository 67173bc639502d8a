"""Pareto frontier against a brute-force dominance check; hypervolume and step look-ups by hand."""

import itertools

import numpy as np
import pandas as pd
import pytest
from knobsweep.analysis.bootstrap import bootstrap_cells
from knobsweep.analysis.example import synthetic_rows
from knobsweep.analysis.frontier import (
    best_benefit_within,
    frontier_membership,
    hypervolume,
    least_cost_reaching,
    pareto_frontier,
)


def brute_force_frontier(df: pd.DataFrame) -> set[tuple]:
    """O(n^2): rows no other row weakly dominates with one strict; exact duplicates keep the lowest knobs."""
    keep = set()
    rows = list(df.itertuples(index=False))
    for r in rows:
        dominated = any(
            o.cost <= r.cost and o.benefit >= r.benefit and (o.cost < r.cost or o.benefit > r.benefit)
            for o in rows
        )
        twins = [o for o in rows if o.cost == r.cost and o.benefit == r.benefit]
        first_twin = min((o.vision_tokens, o.top_k, o.active_blocks) for o in twins)
        if not dominated and (r.vision_tokens, r.top_k, r.active_blocks) == first_twin:
            keep.add((r.vision_tokens, r.top_k, r.active_blocks))
    return keep


@pytest.mark.parametrize("seed", range(60))
def test_frontier_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    grid = list(itertools.product([64, 144, 256, 576], [1, 2, 4, 8], [8, 16, 24]))
    n = int(rng.integers(1, len(grid)))
    chosen = [grid[i] for i in rng.choice(len(grid), n, replace=False)]
    # Few distinct values: ties in cost, in benefit and exact duplicates in both are common.
    df = pd.DataFrame(chosen, columns=["vision_tokens", "top_k", "active_blocks"])
    df["cost"] = rng.integers(0, 6, n).astype(float)
    df["benefit"] = rng.integers(0, 6, n).astype(float)
    df = df.sample(frac=1, random_state=seed)  # input order must not matter
    front = pareto_frontier(df, cost="cost", benefit="benefit")
    got = {tuple(int(x) for x in r) for r in front[["vision_tokens", "top_k", "active_blocks"]].to_numpy()}
    assert got == brute_force_frontier(df)
    assert front["cost"].is_monotonic_increasing and front["benefit"].is_monotonic_increasing
    assert front["cost"].is_unique and front["benefit"].is_unique


def test_frontier_rejects_nan():
    df = pd.DataFrame(
        {
            "vision_tokens": [1, 2],
            "top_k": [1, 1],
            "active_blocks": [1, 1],
            "cost": [1.0, np.nan],
            "benefit": [1.0, 2.0],
        }
    )
    with pytest.raises(ValueError, match="'cost' is NaN"):
        pareto_frontier(df, cost="cost", benefit="benefit")


def test_hypervolume_by_hand():
    # Staircase through (2, 0.4), (3, 0.5), (4, 0.7); the dominated (5, 0.3) adds nothing; ref (10, 0.3).
    hv = hypervolume([2, 3, 4, 5], [0.4, 0.5, 0.7, 0.3], ref_cost=10, ref_benefit=0.3)
    assert hv == pytest.approx(1 * 0.1 + 1 * 0.2 + 6 * 0.4)
    assert hypervolume([11], [1.0], ref_cost=10, ref_benefit=0.3) == 0.0
    assert hypervolume(
        [2], [0.5], ref_cost=10, ref_benefit=0.0, cost_scale=8, benefit_scale=0.5
    ) == pytest.approx(1.0)


def test_step_lookups():
    cost, benefit = np.array([2.0, 3.0, 4.0]), np.array([0.4, 0.5, 0.7])
    assert best_benefit_within(cost, benefit, 3.5) == 0.5
    assert np.isnan(best_benefit_within(cost, benefit, 1.0))
    assert least_cost_reaching(cost, benefit, 0.45) == 3.0
    assert np.isnan(least_cost_reaching(cost, benefit, 0.9))


def test_membership_is_certain_without_noise_and_uncertain_with_it():
    rows = synthetic_rows(n_samples=5, quality_noise=0.0, latency_noise=0.0, workloads=("qa",))
    reps = bootstrap_cells(rows, n_bootstrap=20, seed=1)
    p = frontier_membership(reps, cost="latency_p95_ms")
    point = reps.replicate_frame(0)  # all replicates equal the point estimate without noise
    on = pareto_frontier(point, cost="latency_p95_ms", benefit="quality").index
    expected = np.zeros(len(point))
    expected[on] = 1.0
    np.testing.assert_array_equal(p, expected)

    noisy = bootstrap_cells(
        synthetic_rows(n_samples=10, quality_noise=0.5, workloads=("qa",)), n_bootstrap=50, seed=1
    )
    p = frontier_membership(noisy, cost="latency_p95_ms")
    assert ((p > 0) & (p < 1)).any()
