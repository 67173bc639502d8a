# Scoring (CPU): a cell's shard + the workload's manifest -> the scored shard. Kept apart from the GPU
# rule so a change to scoring never re-runs inference.


rule score:
    input:
        shard=f"{RESULTS}/cells/{{workload}}/{CELL}.parquet",
        manifest=f"{RESULTS}/manifest/{{workload}}.parquet",
    output:
        f"{RESULTS}/scored/{{workload}}/{CELL}.parquet",
    log:
        f"{LOGS}/scored/{{workload}}/{CELL}.log",
    conda:
        "../envs/knobsweep.yaml"
    params:
        spec=scoring_spec,
    script:
        "../workflow_scripts/steps/score.py"
