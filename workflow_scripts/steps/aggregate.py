"""Scored shards -> e2_knob_grid_results.json (per-cell records with bootstrap intervals) + all rows."""

from knobsweep import io
from knobsweep.analysis.pipeline import run_aggregate

io.log_to_file(snakemake.log[0])
run_aggregate(
    snakemake.input,
    snakemake.output.results,
    snakemake.output.rows,
    run=snakemake.params.run,
    config=snakemake.params.analysis,
)
