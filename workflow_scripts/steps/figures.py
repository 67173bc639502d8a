"""The study's figures from the analysis outputs."""

from knobsweep import io
from knobsweep.analysis.pipeline import run_figures

io.log_to_file(snakemake.log[0])
run_figures(
    snakemake.input.results,
    snakemake.input.frontiers,
    snakemake.input.coupling,
    snakemake.input.cases,
    snakemake.input.policies,
    dict(snakemake.output.items()),
)
