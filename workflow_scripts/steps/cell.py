"""One cell: apply the knobs, warm up, run every evaluation sample, write the shard (GPU job).

With inference.model_worker (the default) the model stays loaded in the run's model worker and this
process never imports torch (knobsweep.worker); otherwise the model is loaded here.
"""

from knobsweep.gpu_slots import gpu_slot
from knobsweep.io import log_to_file

log_to_file(snakemake.log[0])
inference = snakemake.config["inference"]
job = {
    "model_path": snakemake.config["model"]["path"].rstrip("/"),
    "device": snakemake.config["model"]["device"],
    "manifest_path": snakemake.input.manifest,
    "importance_path": snakemake.input.importance,
    "out_path": snakemake.output[0],
    "progress_every_s": inference["progress_every_s"],
}
# With several GPUs (--resources gpu=N) the job holds one of them, set before torch starts.
with gpu_slot():
    if inference["model_worker"]:
        from knobsweep.worker import run_cell_in_worker

        run_cell_in_worker(
            snakemake.params.spec,
            **job,
            threads=snakemake.threads,
            idle_s=inference["worker_idle_s"],
            log_dir=f"logs/{snakemake.config['run']}",
        )
    else:
        import torch
        from knobsweep.cells import run_cell_job

        torch.set_num_threads(snakemake.threads)
        run_cell_job(snakemake.params.spec, **job)
