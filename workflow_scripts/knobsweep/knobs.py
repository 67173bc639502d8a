"""The three knobs, the grid they span, cell ids, sparse/dense cell selection and block selection.

Knows nothing of models or files: everything here is plain values.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_CELL_ID = re.compile(r"^vt(\d+)_k(\d+)_b(\d+)$")


@dataclass(frozen=True, order=True)
class KnobSetting:
    vision_tokens: int  # target vision-token count T
    top_k: int  # experts per token
    active_blocks: int  # number of decoder blocks kept (top-N by importance)

    def cell_id(self) -> str:
        return f"vt{self.vision_tokens}_k{self.top_k}_b{self.active_blocks}"

    @classmethod
    def from_cell_id(cls, s: str) -> KnobSetting:
        match = _CELL_ID.match(s)
        if match is None:
            raise ValueError(
                f"cell id {s!r} is not of the form 'vt<vision_tokens>_k<top_k>_b<active_blocks>'"
            )
        return cls(*(int(g) for g in match.groups()))


def _axis(name: str, values: Iterable[int]) -> list[int]:
    axis = sorted({int(v) for v in values})
    if not axis:
        raise ValueError(f"knob {name!r} has no values")
    return axis


def full_grid(
    vision_tokens: Iterable[int], top_k: Iterable[int], active_blocks: Iterable[int]
) -> list[KnobSetting]:
    """Every combination of the three knob lists, sorted."""
    axes = (
        _axis("vision_tokens", vision_tokens),
        _axis("top_k", top_k),
        _axis("active_blocks", active_blocks),
    )
    return [KnobSetting(*values) for values in itertools.product(*axes)]


def sparse_minimum(vision_tokens: Iterable[int], top_k: Iterable[int], active_blocks: Iterable[int]) -> int:
    """The fewest cells `sparse_cells` can return: the grid's corners plus enough to cover every value."""
    axes = [
        _axis("vision_tokens", vision_tokens),
        _axis("top_k", top_k),
        _axis("active_blocks", active_blocks),
    ]
    corners = math.prod(min(len(a), 2) for a in axes)
    return corners + max(max(len(a) - 2, 0) for a in axes)


def sparse_cells(
    vision_tokens: Iterable[int], top_k: Iterable[int], active_blocks: Iterable[int], n: int, seed: int
) -> list[KnobSetting]:
    """A stratified sparse sample of `n` cells: the grid's corners, every value of every knob at least once,
    then uniformly drawn further cells. Deterministic for a given seed; sorted.
    """
    axes = [
        _axis("vision_tokens", vision_tokens),
        _axis("top_k", top_k),
        _axis("active_blocks", active_blocks),
    ]
    grid_size = math.prod(len(a) for a in axes)
    minimum = sparse_minimum(*axes)
    if n < minimum:
        raise ValueError(
            f"sparse sample size n={n} is below {minimum}, "
            "the corners plus one cell per knob value of this grid"
        )
    n = min(n, grid_size)
    rng = random.Random(seed)
    chosen: set[KnobSetting] = {KnobSetting(*c) for c in itertools.product(*[(a[0], a[-1]) for a in axes])}
    # Interior values (neither min nor max) of each knob, shuffled and paired across knobs like a Latin
    # hypercube; a knob with fewer interior values fills with random values of its own.
    interiors = [a[1:-1] for a in axes]
    rows = max(len(i) for i in interiors)
    columns = []
    for axis, interior in zip(axes, interiors):
        column = rng.sample(interior, len(interior)) + [rng.choice(axis) for _ in range(rows - len(interior))]
        columns.append(column)
    for values in zip(*columns):
        chosen.add(KnobSetting(*values))
    rest = sorted(set(full_grid(*axes)) - chosen)
    chosen.update(rng.sample(rest, max(n - len(chosen), 0)))
    return sorted(chosen)


def resolve_default_top_k(grid_top_k: Sequence[int], default_top_k: int | None) -> int:
    """The model's default top_k if on the grid, else the largest grid value below it; None: grid max."""
    values = sorted(int(k) for k in set(grid_top_k))
    if default_top_k is None:
        return values[-1]
    below = [k for k in values if k <= int(default_top_k)]
    if not below:
        raise ValueError(f"analysis.default_top_k={default_top_k} is below every grid top_k {values}")
    return below[-1]


def single_knob_lines(
    full: KnobSetting, vision_tokens: Iterable[int], top_k: Iterable[int], active_blocks: Iterable[int]
) -> list[KnobSetting]:
    """Every cell that moves one knob away from `full` with the other two at their `full` values (the
    settings a single-knob policy can reach), `full` included; sorted."""
    lines = {full}
    lines.update(KnobSetting(v, full.top_k, full.active_blocks) for v in vision_tokens)
    lines.update(KnobSetting(full.vision_tokens, k, full.active_blocks) for k in top_k)
    lines.update(KnobSetting(full.vision_tokens, full.top_k, b) for b in active_blocks)
    return sorted(lines)


def grid_neighbours(
    setting: KnobSetting, vision_tokens: Sequence[int], top_k: Sequence[int], active_blocks: Sequence[int]
) -> list[KnobSetting]:
    """The cells one grid step (±1 along one knob) from `setting`, sorted; the setting itself excluded."""
    axes = {
        "vision_tokens": _axis("vision_tokens", vision_tokens),
        "top_k": _axis("top_k", top_k),
        "active_blocks": _axis("active_blocks", active_blocks),
    }
    neighbours = []
    for name, axis in axes.items():
        value = getattr(setting, name)
        if value not in axis:
            raise ValueError(f"{setting.cell_id()}: {name}={value} is not on the grid {axis}")
        i = axis.index(value)
        for j in (i - 1, i + 1):
            if 0 <= j < len(axis):
                values = {k: getattr(setting, k) for k in axes}
                values[name] = axis[j]
                neighbours.append(KnobSetting(**values))
    return sorted(neighbours)


def select_blocks(
    importance: Sequence[float], n: int, *, keep_first: bool = False, keep_last: bool = False
) -> tuple[int, ...]:
    """Indices of the `n` blocks to keep: the most important ones (ties broken by lower block index),
    after forcing the first and/or last block in when asked. Returned in ascending order.
    """
    num_blocks = len(importance)
    if not 1 <= n <= num_blocks:
        raise ValueError(f"active_blocks={n} is outside 1..{num_blocks} (the model's block count)")
    if any(math.isnan(float(v)) for v in importance):
        raise ValueError("block importance contains NaN")
    forced = ({0} if keep_first else set()) | ({num_blocks - 1} if keep_last else set())
    if n < len(forced):
        raise ValueError(f"active_blocks={n} cannot keep both the first and the last block")
    ranked = sorted(
        (i for i in range(num_blocks) if i not in forced), key=lambda i: (-float(importance[i]), i)
    )
    return tuple(sorted(forced | set(ranked[: n - len(forced)])))


def dense_cells(
    frontier: Iterable[KnobSetting],
    vision_tokens: Sequence[int],
    top_k: Sequence[int],
    active_blocks: Sequence[int],
    exclude: Iterable[KnobSetting] = (),
    max_cells: int | None = None,
) -> list[KnobSetting]:
    """The dense stage: grid neighbours of the frontier cells that are not already run (`exclude`), sorted.

    With `max_cells` set, at most that many of them (0 = none). They are picked round-robin over the
    frontier in the order given (the caller passes it cheapest first): each round takes one not yet
    chosen new neighbour of each frontier cell (its own candidates in sorted order), until `max_cells`
    are chosen or none are left. Round-robin so that a small cap still refines every segment of the
    frontier, not only its cheap (or its expensive) end.
    """
    if max_cells is not None and (
        isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 0
    ):
        raise ValueError(f"max_cells must be an integer >= 0 or None, got {max_cells!r}")
    frontier = list(dict.fromkeys(frontier))  # order kept, duplicates dropped
    skip = set(frontier) | set(exclude)
    candidates = [
        [n for n in grid_neighbours(s, vision_tokens, top_k, active_blocks) if n not in skip]
        for s in frontier
    ]
    if max_cells is None:
        return sorted({n for own in candidates for n in own})
    chosen: set[KnobSetting] = set()
    queues = [iter(own) for own in candidates]
    while queues and len(chosen) < max_cells:
        still_open = []
        for queue in queues:
            if len(chosen) == max_cells:
                break
            pick = next((n for n in queue if n not in chosen), None)
            if pick is not None:
                chosen.add(pick)
                still_open.append(queue)
        queues = still_open
    return sorted(chosen)
