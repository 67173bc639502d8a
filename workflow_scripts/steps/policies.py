"""Single-knob policies against the three-knob frontier -> e2_policy_comparison.json."""

from knobsweep import io
from knobsweep.analysis.pipeline import run_policies

io.log_to_file(snakemake.log[0])
run_policies(
    snakemake.input.results, snakemake.input.rows, snakemake.output[0], config=snakemake.params.analysis
)
