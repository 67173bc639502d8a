"""Interaction shares, one-knob-fixed frontiers, workload comparison, verdicts -> e2_coupling_analysis.json."""

from knobsweep import io
from knobsweep.analysis.pipeline import run_coupling

io.log_to_file(snakemake.log[0])
run_coupling(
    snakemake.input.results,
    snakemake.input.rows,
    snakemake.input.policies,
    snakemake.output[0],
    config=snakemake.params.analysis,
)
