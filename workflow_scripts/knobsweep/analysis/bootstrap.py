"""Bootstrap over samples within each cell.

Every cell gets its own random stream derived from (seed, workload, knobs), so a cell's replicates do not
depend on which other cells a run holds or in which order they are read. Replicate b of every statistic
of a cell comes from the same resample of that cell's samples (quality and latency stay paired).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .defaults import KNOBS

CELL_KEYS: tuple[str, ...] = ("workload", *KNOBS)

# name -> statistic of (quality, latency_ms) along the last axis. The point estimate and every bootstrap
# replicate use these same functions. Percentiles: numpy's default (linear interpolation, Hyndman-Fan 7).
StatFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
STATISTICS: dict[str, StatFn] = {
    "quality": lambda q, lat: q.mean(axis=-1),
    "latency_mean_ms": lambda q, lat: lat.mean(axis=-1),
    "latency_p50_ms": lambda q, lat: np.percentile(lat, 50, axis=-1),
    "latency_p95_ms": lambda q, lat: np.percentile(lat, 95, axis=-1),
    "latency_p99_ms": lambda q, lat: np.percentile(lat, 99, axis=-1),
}


def cell_rng(
    seed: int, workload: str, vision_tokens: int, top_k: int, active_blocks: int
) -> np.random.Generator:
    key = (zlib.crc32(workload.encode()), int(vision_tokens), int(top_k), int(active_blocks))
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def resample(
    values: dict[str, np.ndarray], rng: np.random.Generator, n_bootstrap: int
) -> dict[str, np.ndarray]:
    """(n_bootstrap, n) resamples of each per-sample array, all with the same indices."""
    n = len(next(iter(values.values())))
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    return {name: arr[idx] for name, arr in values.items()}


@dataclass
class CellReplicates:
    """Bootstrap replicates of every statistic of every cell."""

    cells: pd.DataFrame  # CELL_KEYS columns, one row per cell, sorted
    stats: dict[str, np.ndarray]  # statistic -> (n_cells, n_bootstrap)
    n_bootstrap: int
    seed: int

    def replicate_frame(self, b: int) -> pd.DataFrame:
        """The cells with every statistic's value in replicate b."""
        df = self.cells.copy()
        for name, reps in self.stats.items():
            df[name] = reps[:, b]
        return df


def bootstrap_cells(
    rows: pd.DataFrame, *, n_bootstrap: int, seed: int, extra: tuple[str, ...] = ()
) -> CellReplicates:
    """Replicates of STATISTICS (plus the mean of each column in `extra`) for every cell in `rows`.

    `rows` holds per-sample rows with CELL_KEYS, `quality` and `latency_ms` columns.
    """
    missing = [c for c in (*CELL_KEYS, "quality", "latency_ms", *extra) if c not in rows.columns]
    if missing:
        raise ValueError(f"bootstrap_cells: rows lack columns {missing}")
    cells, out = [], {name: [] for name in (*STATISTICS, *extra)}
    for key, group in rows.groupby(list(CELL_KEYS), sort=True):
        values = {
            "quality": group["quality"].to_numpy(float),
            "latency_ms": group["latency_ms"].to_numpy(float),
        }
        values.update({c: group[c].to_numpy(float) for c in extra})
        res = resample(values, cell_rng(seed, *key), n_bootstrap)
        for name, fn in STATISTICS.items():
            out[name].append(fn(res["quality"], res["latency_ms"]))
        for c in extra:
            out[c].append(res[c].mean(axis=-1))
        cells.append(dict(zip(CELL_KEYS, key)))
    frame = pd.DataFrame(cells, columns=list(CELL_KEYS))
    stats = {name: np.asarray(v, dtype=float).reshape(len(frame), n_bootstrap) for name, v in out.items()}
    return CellReplicates(frame, stats, int(n_bootstrap), int(seed))


def percentile_interval(replicates: np.ndarray, ci_level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval along the last axis (NaN replicates ignored)."""
    alpha = (1.0 - ci_level) / 2.0
    replicates = np.asarray(replicates, float)
    if np.isnan(replicates).all(axis=-1).any():  # no finite replicate: no interval (and no warning)
        filled = np.where(np.isnan(replicates).all(axis=-1, keepdims=True), 0.0, replicates)
        low, high = np.nanquantile(filled, [alpha, 1.0 - alpha], axis=-1)
        empty = np.isnan(replicates).all(axis=-1)
        return np.where(empty, np.nan, low), np.where(empty, np.nan, high)
    low, high = np.nanquantile(replicates, [alpha, 1.0 - alpha], axis=-1)
    return low, high
