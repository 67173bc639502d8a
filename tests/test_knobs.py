"""Knob settings, grids, sparse/dense selection and block selection (knobsweep.knobs)."""

import itertools
import random
import re

import pytest
from knobsweep.knobs import (
    KnobSetting,
    dense_cells,
    full_grid,
    grid_neighbours,
    select_blocks,
    single_knob_lines,
    sparse_cells,
    sparse_minimum,
)

SEED_GRID = ([288, 432, 576, 720, 1008, 1440, 1872], [1, 2, 4, 8, 16, 32], [8, 10, 12, 14, 16, 18, 20, 24])


def test_cell_id_round_trip():
    setting = KnobSetting(576, 8, 24)
    assert setting.cell_id() == "vt576_k8_b24"
    assert KnobSetting.from_cell_id("vt576_k8_b24") == setting
    for bad in ("vt576_k8", "576_8_24", "vt576_k8_b24.parquet", "vtx_k8_b24"):
        with pytest.raises(ValueError, match="cell id"):
            KnobSetting.from_cell_id(bad)


def test_full_grid_is_the_seed_product():
    grid = full_grid(*SEED_GRID)
    assert len(grid) == 7 * 6 * 8 == 336
    assert set(grid) == {KnobSetting(*c) for c in itertools.product(*SEED_GRID)}
    assert grid == sorted(grid)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [14, 24, 60])
def test_sparse_cells_cover_every_value_and_the_corners(n, seed):
    cells = sparse_cells(*SEED_GRID, n=n, seed=seed)
    assert len(cells) == len(set(cells)) == n
    assert set(cells) <= set(full_grid(*SEED_GRID))
    for i, name in enumerate(("vision_tokens", "top_k", "active_blocks")):
        assert {getattr(c, name) for c in cells} == set(SEED_GRID[i]), name
    corners = {KnobSetting(*c) for c in itertools.product(*[(min(a), max(a)) for a in SEED_GRID])}
    assert len(corners) == 8 and corners <= set(cells)


def test_sparse_cells_are_deterministic_and_seeded():
    assert sparse_cells(*SEED_GRID, n=24, seed=3) == sparse_cells(*SEED_GRID, n=24, seed=3)
    assert sparse_cells(*SEED_GRID, n=24, seed=3) != sparse_cells(*SEED_GRID, n=24, seed=4)


def test_sparse_cells_minimum_and_clipping():
    # 8 corners + the 6 interior values of active_blocks (the knob with most values).
    assert sparse_minimum(*SEED_GRID) == 14
    with pytest.raises(ValueError, match="n=13 is below 14"):
        sparse_cells(*SEED_GRID, n=13, seed=0)
    assert sparse_cells([1, 2], [1], [3], n=50, seed=0) == full_grid([1, 2], [1], [3])


def test_grid_neighbours_step_one_along_each_knob():
    vt, k, b = [16, 32, 64], [1, 2, 4], [2, 4]
    inner = grid_neighbours(KnobSetting(32, 2, 4), vt, k, b)
    assert inner == sorted(
        [
            KnobSetting(16, 2, 4),
            KnobSetting(64, 2, 4),
            KnobSetting(32, 1, 4),
            KnobSetting(32, 4, 4),
            KnobSetting(32, 2, 2),
        ]
    )
    corner = grid_neighbours(KnobSetting(16, 1, 2), vt, k, b)
    assert corner == [KnobSetting(16, 1, 4), KnobSetting(16, 2, 2), KnobSetting(32, 1, 2)]
    with pytest.raises(ValueError, match="top_k=3 is not on the grid"):
        grid_neighbours(KnobSetting(16, 3, 2), vt, k, b)


def test_dense_cells_are_new_neighbours_of_the_frontier():
    vt, k, b = [16, 32, 64], [1, 2], [4]
    frontier = [KnobSetting(16, 1, 4)]
    done = [KnobSetting(16, 1, 4), KnobSetting(32, 1, 4)]
    assert dense_cells(frontier, vt, k, b, exclude=done) == [KnobSetting(16, 2, 4)]


def random_dense_case(seed: int):
    """A small random grid, a frontier (random order, as a latency order would be) and run cells."""
    rng = random.Random(seed)
    axes = [sorted(rng.sample(range(1, 40), rng.randint(1, 4))) for _ in range(3)]
    grid = full_grid(*axes)
    frontier = rng.sample(grid, rng.randint(1, min(6, len(grid))))
    done = rng.sample(grid, rng.randint(0, len(grid) // 2))
    return axes, grid, frontier, done


def reference_new_neighbours(axes, grid, frontier, done) -> dict[KnobSetting, set[KnobSetting]]:
    """Brute force: per frontier cell, the grid cells whose knob indices differ by one step in one knob,
    minus the frontier and the run cells."""

    def index(s: KnobSetting) -> tuple[int, ...]:
        return tuple(axis.index(v) for axis, v in zip(axes, (s.vision_tokens, s.top_k, s.active_blocks)))

    skip = set(frontier) | set(done)
    return {
        f: {c for c in grid if c not in skip and sum(abs(a - b) for a, b in zip(index(c), index(f))) == 1}
        for f in frontier
    }


@pytest.mark.parametrize("seed", range(60))
def test_dense_cells_cap_against_brute_force(seed):
    axes, grid, frontier, done = random_dense_case(seed)
    own = reference_new_neighbours(axes, grid, frontier, done)
    every = set().union(*own.values())
    # No cap: all new neighbours, as before the cap existed.
    assert dense_cells(frontier, *axes, exclude=done) == sorted(every)
    assert dense_cells(frontier, *axes, exclude=done, max_cells=None) == sorted(every)
    for cap in range(len(every) + 3):
        chosen = dense_cells(frontier, *axes, exclude=done, max_cells=cap)
        assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
        assert set(chosen) <= every
        assert len(chosen) == min(cap, len(every))
        assert chosen == dense_cells(frontier, *axes, exclude=done, max_cells=cap)  # deterministic
        if cap >= len(frontier):
            # Round-robin: every frontier cell with a new neighbour gets at least one of its own.
            assert all(own[f] & set(chosen) for f in frontier if own[f]), (cap, frontier, chosen)
        # The first round: each frontier cell in turn takes its smallest neighbour not yet taken. When
        # that round alone reaches the cap, it is the whole answer (no cell gets two while a later one
        # still had one to pick).
        first_round: set[KnobSetting] = set()
        for f in frontier:
            if len(first_round) < cap and own[f] - first_round:
                first_round.add(min(own[f] - first_round))
        if len(first_round) == cap:
            assert set(chosen) == first_round
        else:
            assert first_round <= set(chosen)


def test_dense_cells_cap_spreads_over_the_frontier_cheapest_first():
    vt, k, b = [16, 32, 64, 128], [1, 2], [4]
    # Cheapest first; each frontier cell has new neighbours at top_k=2 and along vision_tokens.
    frontier = [KnobSetting(16, 1, 4), KnobSetting(64, 1, 4)]
    # All new neighbours: (16,2,4), (32,1,4), (64,2,4), (128,1,4).
    assert len(dense_cells(frontier, vt, k, b)) == 4
    # Round 1: (16,2,4) for the first cell, (32,1,4) for the second ((64,1,4)'s smallest new neighbour).
    assert dense_cells(frontier, vt, k, b, max_cells=1) == [KnobSetting(16, 2, 4)]
    assert dense_cells(frontier, vt, k, b, max_cells=2) == [KnobSetting(16, 2, 4), KnobSetting(32, 1, 4)]
    # Round 2: the first cell's next candidate (32,1,4) is taken, so it has none left; the second
    # cell takes (64,2,4).
    assert dense_cells(frontier, vt, k, b, max_cells=3) == [
        KnobSetting(16, 2, 4),
        KnobSetting(32, 1, 4),
        KnobSetting(64, 2, 4),
    ]
    # The order of the frontier decides who picks first.
    assert dense_cells(frontier[::-1], vt, k, b, max_cells=1) == [KnobSetting(32, 1, 4)]
    assert dense_cells(frontier, vt, k, b, max_cells=0) == []


@pytest.mark.parametrize("bad", [-1, 1.5, "all", True, "3"])
def test_dense_cells_rejects_a_bad_cap(bad):
    with pytest.raises(ValueError, match=r"max_cells.*" + re.escape(repr(bad))):
        dense_cells([KnobSetting(16, 1, 4)], [16, 32], [1], [4], max_cells=bad)


def test_select_blocks_top_n_by_importance():
    importance = [0.5, 0.1, 0.9, 0.0, 0.3]
    assert select_blocks(importance, 2) == (0, 2)
    assert select_blocks(importance, 5) == (0, 1, 2, 3, 4)
    # An independent reference: the n largest by value.
    for n in range(1, 6):
        expected = sorted(sorted(range(5), key=lambda i: importance[i], reverse=True)[:n])
        assert select_blocks(importance, n) == tuple(expected)


def test_select_blocks_ties_go_to_the_lower_index():
    assert select_blocks([1.0, 1.0, 1.0, 1.0], 2) == (0, 1)
    assert select_blocks([0.0, 2.0, 2.0, 2.0, 5.0], 3) == (1, 2, 4)


def test_select_blocks_keep_first_and_last():
    importance = [0.0, 5.0, 4.0, 3.0, 0.0]
    assert select_blocks(importance, 2) == (1, 2)
    assert select_blocks(importance, 2, keep_first=True) == (0, 1)
    assert select_blocks(importance, 2, keep_last=True) == (1, 4)
    assert select_blocks(importance, 3, keep_first=True, keep_last=True) == (0, 1, 4)
    with pytest.raises(ValueError, match="cannot keep both"):
        select_blocks(importance, 1, keep_first=True, keep_last=True)


def test_select_blocks_rejects_bad_counts():
    with pytest.raises(ValueError, match="active_blocks=5 is outside 1..4"):
        select_blocks([1, 2, 3, 4], 5)
    with pytest.raises(ValueError, match="active_blocks=0"):
        select_blocks([1, 2, 3, 4], 0)
    with pytest.raises(ValueError, match="NaN"):
        select_blocks([1.0, float("nan")], 1)


def test_single_knob_lines_are_the_cells_one_knob_away_from_the_full_setting():
    full = KnobSetting(1872, 8, 24)
    lines = single_knob_lines(full, *SEED_GRID)
    # Brute force: grid cells that differ from the full setting in at most one knob.
    expected = sorted(
        s
        for s in full_grid(*SEED_GRID)
        if sum(
            a != b
            for a, b in zip(
                (s.vision_tokens, s.top_k, s.active_blocks),
                (full.vision_tokens, full.top_k, full.active_blocks),
            )
        )
        <= 1
    )
    assert lines == expected
    assert len(lines) == 7 + 6 + 8 - 2
