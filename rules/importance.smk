# Block importance per workload (GPU): quality on the calibration set with every block, then with each
# block skipped alone.


rule importance:
    input:
        model=model_files(),
        manifest=f"{RESULTS}/manifest/{{workload}}.parquet",
    output:
        f"{RESULTS}/importance/{{workload}}.json",
    log:
        f"{LOGS}/importance/{{workload}}.log",
    benchmark:
        f"{BENCHMARKS}/importance/{{workload}}.tsv"
    conda:
        "../envs/knobsweep.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        spec=importance_spec,
    script:
        "../workflow_scripts/steps/importance.py"
