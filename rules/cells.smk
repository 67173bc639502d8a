# One job per cell (GPU): load the model once, apply the knobs, warm up, run every evaluation sample at
# batch 1 and write one shard. The sparse_dense mode adds a checkpoint that picks the dense cells.


rule cell:
    input:
        model=model_files(),
        manifest=f"{RESULTS}/manifest/{{workload}}.parquet",
        importance=f"{RESULTS}/importance/{{workload}}.json",
    output:
        f"{RESULTS}/cells/{{workload}}/{CELL}.parquet",
    log:
        f"{LOGS}/cells/{{workload}}/{CELL}.log",
    benchmark:
        f"{BENCHMARKS}/cells/{{workload}}/{CELL}.tsv"
    conda:
        "../envs/knobsweep.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        spec=cell_spec,
    script:
        "../workflow_scripts/steps/cell.py"


checkpoint dense_cells:
    input:
        first_stage_scored,
    output:
        f"{RESULTS}/cells_dense.json",
    log:
        f"{LOGS}/cells_dense.log",
    conda:
        "../envs/knobsweep.yaml"
    params:
        spec=lambda wildcards: dense_spec(),
    script:
        "../workflow_scripts/steps/dense_cells.py"
