"""Block importance of one workload on its calibration set (GPU job)."""

import torch
from knobsweep.importance import importance_job
from knobsweep.io import log_to_file

log_to_file(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
importance_job(
    snakemake.params.spec,
    model_path=snakemake.config["model"]["path"].rstrip("/"),
    device=snakemake.config["model"]["device"],
    manifest_path=snakemake.input.manifest,
    out_path=snakemake.output[0],
    progress_every_s=snakemake.config["inference"]["progress_every_s"],
)
