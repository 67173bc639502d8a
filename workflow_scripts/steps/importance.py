"""Block importance of one workload on its calibration set (GPU job).

With inference.model_worker (the default) the computation runs in the run's model worker and this process
never imports torch (knobsweep.worker); otherwise the model is loaded here.
"""

from knobsweep.io import log_to_file
from knobsweep.worker import run_gpu_job

log_to_file(snakemake.log[0])
config, inference = snakemake.config, snakemake.config["inference"]
run_gpu_job(
    "importance",
    snakemake.params.spec,
    use_worker=inference["model_worker"],
    threads=snakemake.threads,
    idle_s=inference["worker_idle_s"],
    log_dir=f"logs/{config['run']}",
    model_path=config["model"]["path"].rstrip("/"),
    device=config["model"]["device"],
    manifest_path=snakemake.input.manifest,
    out_path=snakemake.output[0],
    progress_every_s=inference["progress_every_s"],
)
