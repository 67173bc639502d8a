"""One cell: apply the knobs, warm up, run every evaluation sample, write the shard (GPU job).

With inference.model_worker (the default) the model stays loaded in the run's model worker and this
process never imports torch (knobsweep.worker); otherwise the model is loaded here.
"""

from knobsweep.io import log_to_file
from knobsweep.worker import run_gpu_job

log_to_file(snakemake.log[0])
run_gpu_job(
    "cell",
    snakemake.params.spec,
    snakemake.config,
    threads=snakemake.threads,
    manifest_path=snakemake.input.manifest,
    importance_path=snakemake.input.importance,
    out_path=snakemake.output[0],
)
