"""One cell: load the model once, apply the knobs, warm up, run every evaluation sample (GPU job)."""

import torch
from knobsweep.cells import run_cell_job
from knobsweep.io import log_to_file

log_to_file(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
run_cell_job(
    snakemake.params.spec,
    model_path=snakemake.config["model"]["path"].rstrip("/"),
    device=snakemake.config["model"]["device"],
    manifest_path=snakemake.input.manifest,
    importance_path=snakemake.input.importance,
    out_path=snakemake.output[0],
    progress_every_s=snakemake.config["inference"]["progress_every_s"],
)
