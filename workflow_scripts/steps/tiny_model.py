"""Build a tiny random checkpoint (model.build_tiny) with the synthetic scenes' words in its tokenizer."""

from knobsweep.io import log_to_file
from knobsweep.models.tiny import build_tiny_checkpoint
from knobsweep.workloads.synthetic import VOCABULARY

log_to_file(snakemake.log[0])
tiny = snakemake.config["model"]["tiny"]
out_dir = snakemake.output[0].rsplit("/", 1)[0]
build_tiny_checkpoint(
    out_dir, family=tiny["family"], seed=tiny["seed"], vocabulary=VOCABULARY, **tiny["overrides"]
)
