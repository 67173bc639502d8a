"""Per-workload Pareto frontiers with frontier-membership probabilities -> e2_pareto_frontiers.json."""

from knobsweep import io
from knobsweep.analysis.pipeline import run_frontiers

io.log_to_file(snakemake.log[0])
run_frontiers(
    snakemake.input.results, snakemake.input.rows, snakemake.output[0], config=snakemake.params.analysis
)
