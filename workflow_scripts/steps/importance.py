"""Block importance of one workload on its calibration set (GPU job).

With inference.model_worker (the default) the computation runs in the run's model worker and this process
never imports torch (knobsweep.worker); otherwise the model is loaded here.
"""

from knobsweep.io import log_to_file
from knobsweep.worker import run_gpu_job

log_to_file(snakemake.log[0])
run_gpu_job(
    "importance",
    snakemake.params.spec,
    snakemake.config,
    threads=snakemake.threads,
    manifest_path=snakemake.input.manifest,
    out_path=snakemake.output[0],
)
