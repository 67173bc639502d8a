"""Write the synthetic data set in the real VQA v2 / COCO formats."""

from pathlib import Path

from knobsweep.io import log_to_file
from knobsweep.workloads.synthetic import write_synthetic_dataset

log_to_file(snakemake.log[0])
spec = snakemake.params.spec
out_dir = Path(snakemake.output.vqa_questions).parents[1]
paths = write_synthetic_dataset(out_dir, n_images=spec["n_images"], seed=spec["seed"], **spec["options"])
for name, path in paths.items():
    expected = getattr(snakemake.output, name, None)
    if expected is not None and Path(expected) != Path(path):
        raise RuntimeError(f"write_synthetic_dataset wrote {name} to {path}, the workflow expects {expected}")
