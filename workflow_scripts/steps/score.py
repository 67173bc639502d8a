"""Score one cell's shard: per-sample metrics, quality and the cell's corpus metrics (CPU)."""

import pandas as pd
import pyarrow.parquet as pq
from knobsweep import io
from knobsweep.importance import QUALITY_METRIC
from knobsweep.scoring import score_cell_rows
from knobsweep.workloads.manifest import read_manifest

io.log_to_file(snakemake.log[0])
spec = snakemake.params.spec
workload = spec["workload"]
rows = pd.read_parquet(snakemake.input.shard)
scored, cell_metrics = score_cell_rows(
    rows,
    read_manifest(snakemake.input.manifest),
    workload=workload,
    quality_metric=QUALITY_METRIC[workload],
    **{k: v for k, v in spec.items() if k in ("vqa_variant", "caption_metrics")},
)
provenance = pq.read_schema(snakemake.input.shard).metadata[io.PROVENANCE_KEY]
io.write_parquet_atomic(
    scored,
    snakemake.output[0],
    {io.PROVENANCE_KEY: provenance, io.SCORES_KEY: io.canonical_json(cell_metrics)},
)
