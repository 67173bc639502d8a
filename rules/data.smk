# Inputs of the study: the model (a tiny random one when model.build_tiny), the synthetic data set
# (workloads with source: synthetic) and one sample manifest per workload.


if config["model"]["build_tiny"]:

    rule tiny_model:
        output:
            f"{MODEL_DIR}/config.json",
        log:
            f"{LOGS}/tiny_model.log",
        conda:
            "../envs/knobsweep.yaml"
        params:
            spec=lambda wildcards: ks_config.model_identity(config["model"]),
        script:
            "../workflow_scripts/steps/tiny_model.py"


rule synthetic_data:
    output:
        **synthetic_paths(),
    log:
        f"{LOGS}/synthetic_data.log",
    conda:
        "../envs/knobsweep.yaml"
    params:
        spec=lambda wildcards: config["synthetic"],
    script:
        "../workflow_scripts/steps/synthetic_data.py"


rule manifest:
    input:
        unpack(data_files),
    output:
        f"{RESULTS}/manifest/{{workload}}.parquet",
    log:
        f"{LOGS}/manifest/{{workload}}.log",
    conda:
        "../envs/knobsweep.yaml"
    params:
        spec=lambda wildcards: manifest_spec(wildcards.workload),
        image_dir=lambda wildcards: image_dir(wildcards.workload),
    script:
        "../workflow_scripts/steps/manifest.py"
