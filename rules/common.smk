# Everything that is not a rule: config validation, the cell selection, the specifications that decide
# reruns, input functions and the final target.

import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# The package is importable without installation (e.g. a bare Snakemake next to --sdm conda).
sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))

from knobsweep import config as ks_config
from knobsweep import gpu_slots as ks_gpu_slots
from knobsweep import worker as ks_worker
from knobsweep.cells import INFERENCE_CODE_VERSION
from knobsweep.knobs import (
    KnobSetting,
    full_grid,
    resolve_default_top_k,
    single_knob_lines,
    sparse_cells,
)

validate(config, schema="../schemas/config.schema.yaml", set_default=True)
try:
    ks_config.resolve_defaults(config)
    MODEL_LIMITS = ks_config.check_config(config)
except ks_config.ConfigError as e:
    raise WorkflowError(str(e)) from None

RUN = config["run"]
RESULTS = f"results/{RUN}"
LOGS = f"logs/{RUN}"
BENCHMARKS = f"benchmarks/{RUN}"
WORKLOADS = list(config["workloads"])
GRID = config["grid"]
MODEL_DIR = config["model"]["path"].rstrip("/")
CELL = "vt{vision_tokens}_k{top_k}_b{active_blocks}"

# The model's full setting: the largest vision budget and block count of the grid, and the model's own
# top-k (or the largest grid value below it). Single-knob policies move one knob away from it.
config["analysis"]["default_top_k"] = ks_config.model_default_top_k(
    config, MODEL_LIMITS
)
FULL_SETTING = KnobSetting(
    max(GRID["vision_tokens"]),
    resolve_default_top_k(GRID["top_k"], config["analysis"]["default_top_k"]),
    max(GRID["active_blocks"]),
)


wildcard_constraints:
    workload="|".join(WORKLOADS),
    vision_tokens=r"\d+",
    top_k=r"\d+",
    active_blocks=r"\d+",


# ---------------------------------------------------------------------------------------------------
# Specifications. Each rule that makes a result gets ONE dict-valued param holding everything that
# determines its output (several params are compared by Snakemake as an unnamed set, which can miss a
# change), so the params trigger reruns exactly the outputs whose inputs changed.


def runtime_spec():
    model = config["model"]
    # The device kind ("cuda", "cpu"); the GPU's name goes to the provenance.
    return {
        "model": ks_config.model_identity(model),
        "dtype": model["dtype"],
        "device": model["device"].split(":")[0],
        "attn_implementation": model["attn_implementation"],
        "experts_implementation": model["experts_implementation"],
        "inference_path": model["inference_path"],
        "trust_remote_code": model["trust_remote_code"],
    }


def manifest_spec(workload):
    # Generation limits are not a property of the sample set.
    spec = {
        k: v for k, v in config["workloads"][workload].items() if k != "max_new_tokens"
    }
    if spec["source"] == "synthetic":
        spec["data"] = {"synthetic": config["synthetic"]}
    return {"workload": workload, **spec}


def importance_settings(workload):
    importance = config["importance"]
    return {
        "vision_tokens": importance["vision_tokens"] or max(GRID["vision_tokens"]),
        "top_k": importance["top_k"],  # None: the model's default
        "max_new_tokens": config["workloads"][workload]["max_new_tokens"],
    }


def importance_spec(wildcards):
    return {
        "runtime": runtime_spec(),
        "manifest": manifest_spec(wildcards.workload),
        "importance": importance_settings(wildcards.workload),
        "inference_code_version": INFERENCE_CODE_VERSION,
    }


def cell_spec(wildcards):
    """The cell's full specification; its sha256 together with the manifest's and the importance file's
    content hashes is the fingerprint stored in the shard."""
    workload = wildcards.workload
    return {
        "workload": workload,
        "knobs": {
            "vision_tokens": int(wildcards.vision_tokens),
            "top_k": int(wildcards.top_k),
            "active_blocks": int(wildcards.active_blocks),
        },
        "blocks": dict(config["blocks"]),
        "runtime": runtime_spec(),
        "manifest": manifest_spec(workload),
        "importance": importance_settings(workload),
        "generation": {
            "max_new_tokens": config["workloads"][workload]["max_new_tokens"],
            "batch_size": 1,
            "decoding": "greedy",
        },
        "warmup": config["inference"]["warmup"],
        "inference_code_version": INFERENCE_CODE_VERSION,
    }


def scoring_spec(wildcards):
    # Only the settings of this workload's metrics, so that e.g. vqa_variant re-scores qa alone.
    scoring = config["scoring"]
    if wildcards.workload == "qa":
        return {"workload": "qa", "vqa_variant": scoring["vqa_variant"]}
    return {"workload": "captioning", "caption_metrics": scoring["caption_metrics"]}


# ---------------------------------------------------------------------------------------------------
# Inputs


def model_files():
    # A model the workflow builds is an ordinary input: its rebuild re-runs everything downstream.
    # A model on disk is ancient(): copying or moving it keeps the results (its content identity is in
    # the params). Not ancient() for a built one: Snakemake 9.27 then skips the dependants entirely.
    if config["model"]["build_tiny"]:
        return f"{MODEL_DIR}/config.json"
    return ancient(f"{MODEL_DIR}/config.json")


def synthetic_paths():
    root = f"{RESULTS}/synthetic"
    return {
        "vqa_questions": f"{root}/vqa/v2_OpenEnded_mscoco_val2014_questions.json",
        "vqa_annotations": f"{root}/vqa/v2_mscoco_val2014_annotations.json",
        "coco_captions": f"{root}/coco/annotations/captions_val2014.json",
        "karpathy_split": f"{root}/coco/dataset_coco.json",
    }


def data_files(wildcards):
    spec = config["workloads"][wildcards.workload]
    if spec["source"] == "synthetic":
        paths = synthetic_paths()
        if wildcards.workload == "qa":
            return {
                "questions": paths["vqa_questions"],
                "annotations": paths["vqa_annotations"],
            }
        return {"captions": paths["coco_captions"]}
    names = ks_config.REAL_SOURCES[wildcards.workload][spec["source"]]
    files = {n: spec["data"][n] for n in names if n != "images"}
    if spec["data"].get("karpathy_split"):
        files["karpathy_split"] = spec["data"]["karpathy_split"]
    return files


def image_dir(workload):
    spec = config["workloads"][workload]
    if spec["source"] == "synthetic":
        return f"{RESULTS}/synthetic/images/val2014"
    return spec["data"]["images"]


# ---------------------------------------------------------------------------------------------------
# Cell selection


def first_stage_cells():
    """The cells chosen from the config alone (the sparse stage in sparse_dense mode)."""
    cells = config["cells"]
    if cells["mode"] == "full":
        return full_grid(GRID["vision_tokens"], GRID["top_k"], GRID["active_blocks"])
    if cells["mode"] == "list":
        return sorted({KnobSetting.from_cell_id(c) for c in cells["list"]})
    sparse = set(
        sparse_cells(
            GRID["vision_tokens"],
            GRID["top_k"],
            GRID["active_blocks"],
            n=cells["sparse"]["n"],
            seed=cells["sparse"]["seed"],
        )
    )
    if cells["sparse"]["single_knob_lines"]:
        sparse.update(single_knob_lines(FULL_SETTING, *GRID.values()))
    return sorted(sparse)


def scored_path(workload, setting):
    return f"{RESULTS}/scored/{workload}/{setting.cell_id()}.parquet"


def first_stage_scored(wildcards=None):
    return [scored_path(w, s) for w in WORKLOADS for s in first_stage_cells()]


def selected_cells(wildcards=None):
    """{workload: [KnobSetting, ...]} of every cell of the run (after the dense checkpoint, if any)."""
    selected = {w: set(first_stage_cells()) for w in WORKLOADS}
    if config["cells"]["mode"] == "sparse_dense":
        with open(checkpoints.dense_cells.get().output[0]) as f:
            dense = json.load(f)["dense"]
        for workload in WORKLOADS:
            selected[workload] |= {
                KnobSetting.from_cell_id(c) for c in dense.get(workload, [])
            }
    return {w: sorted(s) for w, s in selected.items()}


def scored_cells(wildcards=None):
    """Scored shard paths of every selected cell of every workload (the aggregation's input)."""
    return [
        scored_path(w, s) for w, settings in selected_cells().items() for s in settings
    ]


def dense_spec():
    return {
        "grid": {k: sorted(v) for k, v in GRID.items()},
        "latency": config["cells"]["dense"]["latency"],
        "max_cells": config["cells"]["dense"].get("max_cells"),
        "workloads": WORKLOADS,
    }


# ---------------------------------------------------------------------------------------------------
# Model worker


# Jobs in the run's own SLURM allocation share its worker; jobs the SLURM executor submits (each its own
# allocation) do not (knobsweep.worker.job_has_own_allocation). Set once, by the run's first Snakemake process.
os.environ.setdefault(
    ks_worker.RUN_ALLOCATION_VARIABLE, os.environ.get("SLURM_JOB_ID", "")
)

# With --resources gpu=N (N > 1) each GPU job holds one of N devices and its own model worker there
# (knobsweep.gpu_slots). Set once, by the run's first Snakemake process.
if ks_gpu_slots.GPU_SLOTS_VARIABLE not in os.environ:
    try:
        _slots = ks_gpu_slots.run_gpu_slots(
            getattr(workflow.global_resources.get("gpu"), "value", None),
            os.environ.get(ks_gpu_slots.VISIBLE_DEVICES),
        )
        ks_gpu_slots.check_device_for_slots(_slots, config["model"]["device"])
    except ValueError as e:
        raise WorkflowError(str(e)) from None
    os.environ[ks_gpu_slots.GPU_SLOTS_VARIABLE] = ",".join(_slots)


def shutdown_model_workers():
    # Fast and never raises; a busy or unreachable worker exits after its idle time.
    if config["inference"]["model_worker"]:
        ks_worker.shutdown_workers()


# ---------------------------------------------------------------------------------------------------
# Final target


def analysis_outputs():
    names = [
        "e2_knob_grid_results.json",
        "e2_knob_grid_rows.parquet",
        "e2_pareto_frontiers.json",
        "e2_coupling_analysis.json",
        "e2_policy_comparison.json",
        "e2_illustrative_cases.json",
        "e2_findings.md",
        "figures/e2_pareto_qa.png",
        "figures/e2_pareto_captioning.png",
        "figures/e2_coupling_proof.png",
        "figures/e2_illustrative_cases.png",
    ]
    return [f"{RESULTS}/{name}" for name in names]


def get_final_output():
    outputs = [f"{RESULTS}/importance/{w}.json" for w in WORKLOADS]
    outputs += first_stage_scored()
    if config["cells"]["mode"] == "sparse_dense":
        outputs.append(f"{RESULTS}/cells_dense.json")
    outputs += analysis_outputs()
    return outputs
