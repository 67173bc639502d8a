"""How steady is this machine's host CPU? A fixed pure-Python workload (~0.5 ms) timed over and over.

Small cells are bound by the host (preprocessing, launching graphs, Python between decode steps): where the host
itself stalls, their tail latencies move between two runs of the same cell though the GPU's work does not.
`bench.cell_overhead` runs a short probe before each cell's timed requests and records it with the cell.

    python -m bench.host_probe --seconds 12 --out /tmp/host_probe.json

On the H100 machines lent here (16 cores, 2026-11-28) the workload's P95 was 1.9x its median and 18 % of the
iterations took over 1.3x the median (pinned to one core with taskset: 24 %); on the 2-core development machine
1.09x and 0.05 % (`results/h100_2026-11-28_s11_host_probe_pinned.json`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

_WORK = list(range(20_000))
SLOW = 1.3  # an iteration slower than this many medians counts as stalled


def probe(seconds: float) -> dict:
    """Time the workload for `seconds`; its median, P95, max (ms), the fraction of stalled iterations and the
    times (s from the start) at which runs of stalled iterations began."""
    times, stamps = [], []
    end = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        sum(x * 3 for x in _WORK)
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        stamps.append(t1)
    ms = np.array(times)
    median = float(np.median(ms))
    stalled = ms > SLOW * median
    starts = np.flatnonzero(stalled & ~np.concatenate(([False], stalled[:-1])))
    return {
        "seconds": seconds,
        "iterations": len(ms),
        "median_ms": median,
        "p95_ms": float(np.percentile(ms, 95)),
        "max_ms": float(ms.max()),
        "p95_over_median": float(np.percentile(ms, 95)) / median,
        "stalled_fraction": float(stalled.mean()),
        "stall_starts_s": [round(float(stamps[i] - stamps[0]), 3) for i in starts[:100]],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error(f"--seconds must be > 0 (got {args.seconds})")
    result = probe(args.seconds)
    print(json.dumps({k: v for k, v in result.items() if k != "stall_starts_s"}))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
