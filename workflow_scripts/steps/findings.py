"""The findings summary (Markdown) from the analysis outputs."""

from knobsweep import io
from knobsweep.analysis.pipeline import run_findings

io.log_to_file(snakemake.log[0])
run_findings(
    snakemake.input.results,
    snakemake.input.frontiers,
    snakemake.input.coupling,
    snakemake.input.policies,
    snakemake.input.cases,
    snakemake.output[0],
)
