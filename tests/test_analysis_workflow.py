"""The analysis rules under Snakemake: synthetic scored shards in a scratch directory -> every analysis
output and the HTML report (the upstream rules are not run)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from knobsweep.analysis.example import synthetic_rows, write_scored_shards

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "tiny.yaml"
ANALYSIS_RULES = ["aggregate", "frontiers", "policies", "coupling", "cases", "figures", "findings"]


@pytest.mark.slow
def test_analysis_rules_and_report(tmp_path):
    # The CI config with every cell of its small grid (a full factorial, so the ANOVA path runs).
    config = yaml.safe_load(CONFIG.read_text())
    config["cells"] = {"mode": "full"}
    config_path = tmp_path / "tiny_full.yaml"
    config_path.write_text(yaml.safe_dump(config))
    grid = config["grid"]
    rows = synthetic_rows(
        vision_tokens=grid["vision_tokens"],
        top_k=grid["top_k"],
        active_blocks=grid["active_blocks"],
        n_samples=8,
    )
    run_dir = tmp_path / "results" / config["run"]
    write_scored_shards(rows, run_dir)
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")  # the Snakefile's default configfile
    snakemake = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(config_path),
        "--cores",
        "1",
    ]
    # Targets relative to --directory (absolute paths would not match the rules' outputs).
    targets = [
        f"results/{config['run']}/{name}" for name in ("e2_findings.md", "figures/e2_illustrative_cases.png")
    ]
    done = subprocess.run(
        [*snakemake, "--allowed-rules", *ANALYSIS_RULES, "--", *targets],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in (
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
    ):
        assert (run_dir / name).stat().st_size > 0, name
    findings = (run_dir / "e2_findings.md").read_text()
    expected = "- qa: cpu, `eager`, vision encoder as loaded, image placeholders expanded on token ids ("
    assert expected in findings and "not comparable" not in findings
    report = tmp_path / "report.html"
    subprocess.run(
        [*snakemake, "--report", str(report), "--", *targets],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    html = report.read_text()
    assert "e2_coupling_proof.png" in html and "e2_findings.md" in html
