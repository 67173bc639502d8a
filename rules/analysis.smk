# Aggregation and analysis (CPU): scored shards -> per-cell records with bootstrap intervals -> frontiers,
# single- vs multi-knob policies, coupling and the verdicts, illustrative cases, figures, findings.
# Every analysis setting comes from config["analysis"] (defaults: knobsweep/analysis/defaults.py).


rule aggregate:
    input:
        scored_cells,
    output:
        results=report(
            f"{RESULTS}/e2_knob_grid_results.json",
            caption="../report/e2_knob_grid_results.rst",
            category="Analysis",
        ),
        rows=f"{RESULTS}/e2_knob_grid_rows.parquet",
    log:
        f"{LOGS}/analysis/aggregate.log",
    conda:
        "../envs/knobsweep.yaml"
    params:
        run=RUN,
        analysis=config["analysis"],
    script:
        "../workflow_scripts/steps/aggregate.py"


rule frontiers:
    input:
        results=f"{RESULTS}/e2_knob_grid_results.json",
        rows=f"{RESULTS}/e2_knob_grid_rows.parquet",
    output:
        report(
            f"{RESULTS}/e2_pareto_frontiers.json",
            caption="../report/e2_pareto_frontiers.rst",
            category="Analysis",
        ),
    log:
        f"{LOGS}/analysis/frontiers.log",
    conda:
        "../envs/knobsweep.yaml"
    params:
        analysis=config["analysis"],
    script:
        "../workflow_scripts/steps/frontiers.py"


rule policies:
    input:
        results=f"{RESULTS}/e2_knob_grid_results.json",
        rows=f"{RESULTS}/e2_knob_grid_rows.parquet",
    output:
        report(
            f"{RESULTS}/e2_policy_comparison.json",
            caption="../report/e2_policy_comparison.rst",
            category="Analysis",
        ),
    log:
        f"{LOGS}/analysis/policies.log",
    conda:
        "../envs/knobsweep.yaml"
    params:
        analysis=config["analysis"],
    script:
        "../workflow_scripts/steps/policies.py"


rule coupling:
    input:
        results=f"{RESULTS}/e2_knob_grid_results.json",
        rows=f"{RESULTS}/e2_knob_grid_rows.parquet",
        policies=f"{RESULTS}/e2_policy_comparison.json",
    output:
        report(
            f"{RESULTS}/e2_coupling_analysis.json",
            caption="../report/e2_coupling_analysis.rst",
            category="Analysis",
        ),
    log:
        f"{LOGS}/analysis/coupling.log",
    conda:
        "../envs/knobsweep.yaml"
    params:
        analysis=config["analysis"],
    script:
        "../workflow_scripts/steps/coupling.py"


rule cases:
    input:
        results=f"{RESULTS}/e2_knob_grid_results.json",
        frontiers=f"{RESULTS}/e2_pareto_frontiers.json",
        policies=f"{RESULTS}/e2_policy_comparison.json",
    output:
        report(
            f"{RESULTS}/e2_illustrative_cases.json",
            caption="../report/e2_illustrative_cases_json.rst",
            category="Analysis",
        ),
    log:
        f"{LOGS}/analysis/cases.log",
    conda:
        "../envs/knobsweep.yaml"
    params:
        analysis=config["analysis"],
    script:
        "../workflow_scripts/steps/cases.py"


rule figures:
    input:
        results=f"{RESULTS}/e2_knob_grid_results.json",
        frontiers=f"{RESULTS}/e2_pareto_frontiers.json",
        coupling=f"{RESULTS}/e2_coupling_analysis.json",
        cases=f"{RESULTS}/e2_illustrative_cases.json",
        policies=f"{RESULTS}/e2_policy_comparison.json",
    output:
        pareto_qa=report(
            f"{RESULTS}/figures/e2_pareto_qa.png",
            caption="../report/e2_pareto.rst",
            category="Figures",
            labels={"figure": "Pareto frontier", "workload": "qa"},
        ),
        pareto_captioning=report(
            f"{RESULTS}/figures/e2_pareto_captioning.png",
            caption="../report/e2_pareto.rst",
            category="Figures",
            labels={"figure": "Pareto frontier", "workload": "captioning"},
        ),
        coupling=report(
            f"{RESULTS}/figures/e2_coupling_proof.png",
            caption="../report/e2_coupling_proof.rst",
            category="Figures",
            labels={"figure": "one knob fixed", "workload": "both"},
        ),
        cases=report(
            f"{RESULTS}/figures/e2_illustrative_cases.png",
            caption="../report/e2_illustrative_cases.rst",
            category="Figures",
            labels={"figure": "illustrative cases", "workload": "both"},
        ),
    log:
        f"{LOGS}/analysis/figures.log",
    conda:
        "../envs/knobsweep.yaml"
    script:
        "../workflow_scripts/steps/figures.py"


rule findings:
    input:
        results=f"{RESULTS}/e2_knob_grid_results.json",
        frontiers=f"{RESULTS}/e2_pareto_frontiers.json",
        coupling=f"{RESULTS}/e2_coupling_analysis.json",
        policies=f"{RESULTS}/e2_policy_comparison.json",
        cases=f"{RESULTS}/e2_illustrative_cases.json",
    output:
        report(
            f"{RESULTS}/e2_findings.md",
            caption="../report/e2_findings.rst",
            category="Findings",
        ),
    log:
        f"{LOGS}/analysis/findings.log",
    conda:
        "../envs/knobsweep.yaml"
    script:
        "../workflow_scripts/steps/findings.py"
