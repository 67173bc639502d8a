"""File-level entry points, one per workflow step: read the inputs, compute, write the output atomically.

`config` is the workflow config's `analysis:` section (defaults in analysis.defaults).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from ..aggregate import aggregate_cells, load_cells
from .bootstrap import CellReplicates, bootstrap_cells
from .cases import illustrative_cases
from .coupling import coupling_report
from .defaults import analysis_params
from .findings import findings_markdown
from .frontier import frontiers_report
from .jsonio import read_json, write_json, write_parquet, write_text
from .policies import compare_policies

Path = str | os.PathLike
log = logging.getLogger("knobsweep.analysis")


def _replicates(rows_parquet: Path, params: Mapping[str, Any]) -> CellReplicates:
    rows = pd.read_parquet(
        rows_parquet, columns=["workload", "vision_tokens", "top_k", "active_blocks", "quality", "latency_ms"]
    )
    return bootstrap_cells(rows, n_bootstrap=int(params["n_bootstrap"]), seed=int(params["seed"]))


def run_aggregate(
    scored_paths: Iterable[Path],
    results_json: Path,
    rows_parquet: Path,
    *,
    run: str,
    config: Mapping[str, Any] | None = None,
) -> None:
    params = analysis_params(config)
    t0 = time.monotonic()
    result, rows = aggregate_cells(
        scored_paths,
        run=run,
        n_bootstrap=int(params["n_bootstrap"]),
        seed=int(params["seed"]),
        ci_level=float(params["ci_level"]),
    )
    write_parquet(rows_parquet, rows)
    write_json(results_json, result)
    log.info("aggregated %d cells, %d rows in %.1f s", len(result["cells"]), len(rows), time.monotonic() - t0)


def run_frontiers(
    results_json: Path, rows_parquet: Path, out_json: Path, *, config: Mapping[str, Any] | None = None
) -> None:
    params = analysis_params(config)
    results = read_json(results_json)
    out = frontiers_report(
        load_cells(results), _replicates(rows_parquet, params), run=results["run"], params=params
    )
    write_json(out_json, out)


def run_policies(
    results_json: Path, rows_parquet: Path, out_json: Path, *, config: Mapping[str, Any] | None = None
) -> None:
    params = analysis_params(config)
    results = read_json(results_json)
    out = compare_policies(
        load_cells(results), _replicates(rows_parquet, params), params=params, run=results["run"]
    )
    write_json(out_json, out)


def run_coupling(
    results_json: Path,
    rows_parquet: Path,
    policies_json: Path,
    out_json: Path,
    *,
    config: Mapping[str, Any] | None = None,
) -> None:
    params = analysis_params(config)
    results = read_json(results_json)
    out = coupling_report(
        load_cells(results),
        _replicates(rows_parquet, params),
        params=params,
        policies=read_json(policies_json),
        run=results["run"],
    )
    write_json(out_json, out)


def run_cases(
    results_json: Path,
    frontiers_json: Path,
    policies_json: Path,
    out_json: Path,
    *,
    config: Mapping[str, Any] | None = None,
) -> None:
    params = analysis_params(config)
    results = read_json(results_json)
    out = illustrative_cases(
        load_cells(results),
        read_json(policies_json),
        params=params,
        frontiers=read_json(frontiers_json),
        run=results["run"],
    )
    write_json(out_json, out)


def run_figures(
    results_json: Path,
    frontiers_json: Path,
    coupling_json: Path,
    cases_json: Path,
    policies_json: Path,
    out: Mapping[str, Path],
) -> None:
    """`out` maps pareto_qa, pareto_captioning, coupling, cases to PNG paths."""
    from ..plots import make_figures

    make_figures(
        load_cells(read_json(results_json)),
        read_json(frontiers_json),
        read_json(coupling_json),
        read_json(cases_json),
        read_json(policies_json),
        out,
    )


def run_findings(
    results_json: Path,
    frontiers_json: Path,
    coupling_json: Path,
    policies_json: Path,
    cases_json: Path,
    out_md: Path,
) -> None:
    write_text(
        out_md,
        findings_markdown(
            read_json(results_json),
            read_json(frontiers_json),
            read_json(coupling_json),
            read_json(policies_json),
            read_json(cases_json),
        ),
    )
