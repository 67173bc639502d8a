"""Checkpoint of the sparse_dense mode: the Pareto frontier of each workload's sparse cells and the
grid neighbours of its cells that still have to run (the dense stage)."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from knobsweep import io
from knobsweep.analysis.frontier import pareto_frontier
from knobsweep.knobs import KnobSetting, dense_cells

io.log_to_file(snakemake.log[0])
spec = snakemake.params.spec
grid = spec["grid"]
latency = spec["latency"]
statistic = {
    "latency_mean_ms": np.mean,
    "latency_p50_ms": lambda x: np.percentile(x, 50),
    "latency_p95_ms": lambda x: np.percentile(x, 95),
    "latency_p99_ms": lambda x: np.percentile(x, 99),
}[latency]
records = []
for path in snakemake.input:
    shard = pq.read_table(path, columns=["workload", "vision_tokens", "top_k", "active_blocks", "latency_ms"])
    first = shard.slice(0, 1).to_pylist()[0]
    scores = json.loads(shard.schema.metadata[io.SCORES_KEY])
    records.append(
        {
            **{k: first[k] for k in ("workload", "vision_tokens", "top_k", "active_blocks")},
            "quality": scores["quality"],
            latency: float(statistic(shard["latency_ms"].to_numpy())),
        }
    )
cells = pd.DataFrame(records)
result = {"latency": latency, "max_cells": spec["max_cells"], "sparse": {}, "frontier": {}, "dense": {}}
for workload in spec["workloads"]:
    sparse = cells[cells["workload"] == workload]
    # pareto_frontier sorts by cost: cheapest first, the order the capped round-robin walks.
    front = pareto_frontier(sparse, cost=latency, benefit="quality")
    frontier = [
        KnobSetting(int(r.vision_tokens), int(r.top_k), int(r.active_blocks)) for r in front.itertuples()
    ]
    done = [
        KnobSetting(int(r.vision_tokens), int(r.top_k), int(r.active_blocks)) for r in sparse.itertuples()
    ]
    result["sparse"][workload] = sorted(s.cell_id() for s in done)
    result["frontier"][workload] = [s.cell_id() for s in frontier]
    added = dense_cells(
        frontier,
        grid["vision_tokens"],
        grid["top_k"],
        grid["active_blocks"],
        exclude=done,
        max_cells=spec["max_cells"],
    )
    result["dense"][workload] = [s.cell_id() for s in added]
io.write_json_atomic(result, snakemake.output[0])
