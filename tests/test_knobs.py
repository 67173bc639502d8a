"""Knob settings, grids, sparse/dense selection and block selection (knobsweep.knobs)."""

import itertools

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
