# knobsweep: how vision tokens, MoE top-k and active decoder blocks of an MoE VLM trade quality for
# latency. See README.md; every config key is documented in config/README.md.

from snakemake.utils import min_version

min_version("9.27")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/importance.smk"
include: "rules/cells.smk"
include: "rules/scoring.smk"
include: "rules/analysis.smk"


rule all:
    default_target: True
    input:
        get_final_output(),


# The run's model worker (inference.model_worker) holds the model: let it go when the run ends. A killed
# run's worker exits on its own after inference.worker_idle_s.
onsuccess:
    shutdown_model_workers()


onerror:
    shutdown_model_workers()
