"""Illustrative cases -> e2_illustrative_cases.json."""

from knobsweep import io
from knobsweep.analysis.pipeline import run_cases

io.log_to_file(snakemake.log[0])
run_cases(
    snakemake.input.results,
    snakemake.input.frontiers,
    snakemake.input.policies,
    snakemake.output[0],
    config=snakemake.params.analysis,
)
