"""Sample a workload's evaluation and calibration sets into its manifest."""

from knobsweep.io import log_to_file
from knobsweep.workloads.manifest import build_manifest, write_manifest

log_to_file(snakemake.log[0])
spec = snakemake.params.spec
workload = spec["workload"]
if workload == "qa":
    from knobsweep.workloads.vqa import load_vqa

    samples = load_vqa(snakemake.input.questions, snakemake.input.annotations, snakemake.params.image_dir)
else:
    from knobsweep.workloads.coco import load_coco_captions

    samples = load_coco_captions(
        snakemake.input.captions,
        snakemake.params.image_dir,
        karpathy_split=snakemake.input.get("karpathy_split"),
        split=spec["data"].get("split", "val"),
    )
manifest = build_manifest(
    workload,
    samples,
    n_eval=spec["n_eval"],
    n_calibration=spec["n_calibration"],
    seed=spec["seed"],
    prompt=spec["prompt"],
    stratify=spec["stratify"],
)
write_manifest(manifest, snakemake.output[0])
