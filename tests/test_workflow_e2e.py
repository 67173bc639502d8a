"""End to end: a Snakemake run of tests/configs/tiny.yaml (tiny random model built by the workflow, synthetic
data, both workloads, a handful of cells), its outputs and their schemas, then the rerun semantics shown
with dry runs against the finished run, and a cell killed mid-write.

The workflow files are copied to a temporary directory (so a test can edit a step script the way a
developer would) and Snakemake works in a temporary directory: nothing is written into the repository.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from knobsweep import io
from knobsweep.cells import SHARD_COLUMNS
from knobsweep.knobs import KnobSetting, full_grid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
RESULTS = "results/tiny"
WORKLOADS = ("qa", "captioning")
LISTED = [KnobSetting.from_cell_id(c) for c in TINY["cells"]["list"]]
ANALYSIS_RULES = {"aggregate", "frontiers", "policies", "coupling", "cases", "figures", "findings"}
SITECUSTOMIZE = """
import os
if os.environ.get("KNOBSWEEP_TEST_CODE_VERSION"):
    import knobsweep.cells
    knobsweep.cells.INFERENCE_CODE_VERSION = os.environ["KNOBSWEEP_TEST_CODE_VERSION"]
if os.environ.get("KNOBSWEEP_TEST_KILL_CELL"):
    import knobsweep.io
    _write = knobsweep.io.write_parquet_atomic
    def _write_and_die(frame, path, metadata=None):
        if str(path).endswith(os.environ["KNOBSWEEP_TEST_KILL_CELL"]) and "/cells/" in str(path):
            import pyarrow as pa, pyarrow.parquet as pq
            with knobsweep.io.atomic_path(path) as tmp:
                pq.write_table(pa.Table.from_pandas(frame.head(1)), tmp)
                os._exit(3)  # killed mid-write: no clean-up runs
        return _write(frame, path, metadata)
    knobsweep.io.write_parquet_atomic = _write_and_die
"""


class Workflow:
    def __init__(self, root: Path):
        self.root = root
        self.workdir = root / "work"
        self.workdir.mkdir()
        for name in ("Snakefile", "rules", "schemas", "envs", "report", "workflow_scripts/steps"):
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, root / name)
        (root / "site").mkdir()
        (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)

    def snakemake(self, config: dict, *args: str, env: dict | None = None, timeout: int = 900):
        path = self.workdir / "config.test.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd = [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(self.root / "Snakefile"),
            "-d",
            str(self.workdir),
            "--configfile",
            str(path),
            "--cores",
            "2",
            "--resources",
            "gpu=1",
            *args,
        ]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(self.root / "site"), **(env or {})}
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=full_env)

    def planned(self, config: dict, env: dict | None = None) -> set[tuple[str, str]]:
        """(rule, first output) of every job a dry run would run."""
        result = self.snakemake(config, "-n", env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        jobs, rule = set(), None
        for line in result.stdout.splitlines():
            match = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line)
            if match:
                rule = match.group(1)
            elif rule and line.strip().startswith("output:"):
                jobs.add((rule, line.split("output:", 1)[1].split(",")[0].strip()))
                rule = None
            elif rule == "all" and line.strip().startswith("jobid:"):
                jobs.add(("all", ""))
                rule = None
        return jobs


def rules_of(jobs):
    return {rule for rule, _ in jobs}


def cell_path(workload, setting, kind="cells"):
    return f"{RESULTS}/{kind}/{workload}/{setting.cell_id()}.parquet"


def with_(config: dict, **changes) -> dict:
    """A copy of `config` with dotted keys (a__b__c) changed."""
    config = json.loads(json.dumps(config))
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return config


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    wf = Workflow(tmp_path_factory.mktemp("workflow"))
    result = wf.snakemake(TINY)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return wf


def test_every_output_exists_and_matches_its_schema(workflow):
    work = workflow.workdir
    # Manifests (the contract's columns).
    for workload in WORKLOADS:
        manifest = pd.read_parquet(work / RESULTS / "manifest" / f"{workload}.parquet")
        assert {"sample_id", "split", "image_path", "prompt", "references", "answer_type"} <= set(
            manifest.columns
        )
        assert (manifest["split"] == "eval").sum() == TINY["workloads"][workload]["n_eval"]
        assert (manifest["split"] == "calibration").sum() == TINY["workloads"][workload]["n_calibration"]
    # Importance: one value per block of the tiny model, with baseline, sample count and provenance.
    for workload in WORKLOADS:
        importance = json.loads((work / RESULTS / "importance" / f"{workload}.json").read_text())
        blocks = TINY["model"]["tiny"]["overrides"]["num_blocks"]
        assert importance["num_blocks"] == blocks
        assert len(importance["importance"]) == len(importance["selection_score"]) == blocks
        assert sorted(importance["ranking"]) == list(range(blocks))
        assert importance["n_calibration"] == TINY["workloads"][workload]["n_calibration"]
        assert importance["quality_metric"] == {"qa": "vqa_accuracy", "captioning": "cider"}[workload]
        assert {"baseline_quality", "provenance"} <= set(importance)
    loads = sum(
        not json.loads((work / RESULTS / "importance" / f"{w}.json").read_text())["provenance"]["overhead_s"][
            "model_reused"
        ]
        for w in WORKLOADS
    )
    # Cell shards and scored shards.
    for workload in WORKLOADS:
        for setting in LISTED:
            shard = pq.read_table(work / cell_path(workload, setting))
            assert shard.column_names == list(SHARD_COLUMNS)
            rows = shard.to_pandas()
            assert len(rows) == TINY["workloads"][workload]["n_eval"]
            assert (
                (
                    rows[["vision_tokens", "top_k", "active_blocks"]]
                    == [setting.vision_tokens, setting.top_k, setting.active_blocks]
                )
                .all()
                .all()
            )
            assert all(len(b) == setting.active_blocks for b in rows["kept_blocks"])
            assert (rows["latency_ms"] > 0).all() and (rows["vision_tokens_actual"] > 0).all()
            provenance = io.read_parquet_metadata(work / cell_path(workload, setting))
            assert re.fullmatch(r"[0-9a-f]{64}", provenance["fingerprint"])
            assert provenance["spec"]["knobs"] == {
                "vision_tokens": setting.vision_tokens,
                "top_k": setting.top_k,
                "active_blocks": setting.active_blocks,
            }
            # The model worker (on by default) loaded the model once, for the first GPU job.
            assert (provenance["overhead_s"]["load"] > 0) != provenance["overhead_s"]["model_reused"]
            loads += not provenance["overhead_s"]["model_reused"]
            scored_path = work / cell_path(workload, setting, "scored")
            scored = pd.read_parquet(scored_path)
            metric_columns = ["vqa_accuracy"] if workload == "qa" else ["cider", "bleu4", "rouge_l", "meteor"]
            assert set(SHARD_COLUMNS) | set(metric_columns) | {"quality"} <= set(scored.columns)
            scores = io.read_parquet_metadata(scored_path, io.SCORES_KEY)
            assert scores["quality_metric"] == metric_columns[0] and "metrics" in scores
            assert io.read_parquet_metadata(scored_path) == provenance
            assert (work / "benchmarks" / "tiny" / "cells" / workload / f"{setting.cell_id()}.tsv").exists()
            log = (work / "logs" / "tiny" / "cells" / workload / f"{setting.cell_id()}.log").read_text()
            assert re.search(r"\d+/\d+ samples, [\d.]+ samples/s, ~\d+ s left", log)
    assert loads == 1  # one model load for the run's 2 importance and 6 cell jobs
    # Aggregation and analysis.
    results = json.loads((work / RESULTS / "e2_knob_grid_results.json").read_text())
    assert results["run"] == "tiny"
    assert {
        (c["workload"], c["vision_tokens"], c["top_k"], c["active_blocks"]) for c in results["cells"]
    } == {(w, s.vision_tokens, s.top_k, s.active_blocks) for w in WORKLOADS for s in LISTED}
    for record in results["cells"]:
        assert {"quality", "latency_p95_ms", "n_samples", "kept_blocks", "quality_metric"} <= set(record)
    rows = pd.read_parquet(work / RESULTS / "e2_knob_grid_rows.parquet")
    assert len(rows) == sum(TINY["workloads"][w]["n_eval"] for w in WORKLOADS) * len(LISTED)
    for name in (
        "e2_pareto_frontiers.json",
        "e2_coupling_analysis.json",
        "e2_policy_comparison.json",
        "e2_illustrative_cases.json",
    ):
        json.loads((work / RESULTS / name).read_text())
    assert (work / RESULTS / "e2_findings.md").read_text().strip()
    for figure in ("e2_pareto_qa", "e2_pareto_captioning", "e2_coupling_proof", "e2_illustrative_cases"):
        assert (work / RESULTS / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_to_do_after_a_finished_run(workflow):
    assert workflow.planned(TINY) == set()


def test_adding_a_knob_value_schedules_only_the_new_cells(workflow):
    full = with_(TINY, cells__mode="full", cells__list=[])
    grid = full["grid"]
    jobs = workflow.planned(full)
    expected = {("cell", cell_path(w, s)) for w in WORKLOADS for s in full_grid(**grid) if s not in LISTED}
    assert {j for j in jobs if j[0] == "cell"} == expected
    assert rules_of(jobs) == {"cell", "score", "all"} | ANALYSIS_RULES
    wider = with_(full, grid__vision_tokens=[16, 24, 32])
    jobs = workflow.planned(wider)
    expected = {
        ("cell", cell_path(w, s)) for w in WORKLOADS for s in full_grid(**wider["grid"]) if s not in LISTED
    }
    assert {j for j in jobs if j[0] == "cell"} == expected


def _cells(*workloads):
    return {("cell", cell_path(w, s)) for w in workloads for s in LISTED}


def _importance(*workloads):
    return {("importance", f"{RESULTS}/importance/{w}.json") for w in workloads}


def _manifests(*workloads):
    return {("manifest", f"{RESULTS}/manifest/{w}.parquet") for w in workloads}


@pytest.mark.parametrize(
    "changes,env,expected",
    [
        ({"model__dtype": "bfloat16"}, None, _cells(*WORKLOADS) | _importance(*WORKLOADS)),
        ({"workloads__qa__n_eval": 3}, None, _cells("qa") | _importance("qa") | _manifests("qa")),
        ({"workloads__qa__seed": 1}, None, _cells("qa") | _importance("qa") | _manifests("qa")),
        (
            {"workloads__captioning__prompt": "Describe the image in one sentence."},
            None,
            _cells("captioning") | _importance("captioning") | _manifests("captioning"),
        ),
        (
            {"workloads__captioning__max_new_tokens": 5},
            None,
            _cells("captioning") | _importance("captioning"),
        ),
        ({"inference__warmup": 2}, None, _cells(*WORKLOADS)),
        ({"blocks__keep_first": True}, None, _cells(*WORKLOADS)),
        ({"importance__top_k": 1}, None, _cells(*WORKLOADS) | _importance(*WORKLOADS)),
        ({}, {"KNOBSWEEP_TEST_CODE_VERSION": "bumped"}, _cells(*WORKLOADS) | _importance(*WORKLOADS)),
        (
            {"model__tiny__seed": 1},
            None,
            _cells(*WORKLOADS) | _importance(*WORKLOADS) | {("tiny_model", f"{RESULTS}/model/config.json")},
        ),
    ],
    ids=[
        "dtype",
        "qa-n_eval",
        "qa-seed",
        "captioning-prompt",
        "captioning-max_new_tokens",
        "warmup",
        "keep_first",
        "importance-top_k",
        "inference-code-version",
        "model-weights",
    ],
)
def test_result_determining_change_reruns_exactly_the_affected_cells(workflow, changes, env, expected):
    jobs = workflow.planned(with_(TINY, **changes), env=env)
    gpu_and_data = {
        j for j in jobs if j[0] in ("cell", "importance", "manifest", "tiny_model", "synthetic_data")
    }
    assert gpu_and_data == expected
    # Scoring follows exactly the re-run cells.
    rerun_cells = {path for rule, path in expected if rule == "cell"}
    assert {path.replace("/scored/", "/cells/") for rule, path in jobs if rule == "score"} == rerun_cells


def test_scoring_change_rescores_without_inference(workflow):
    jobs = workflow.planned(with_(TINY, scoring__vqa_variant="lmms_eval"))
    assert {j for j in jobs if j[0] == "score"} == {("score", cell_path("qa", s, "scored")) for s in LISTED}
    assert rules_of(jobs) == {"score", "all"} | ANALYSIS_RULES


def _edited(path: Path):
    """Context: append a comment line to a copied step script (a code change); restore its content and
    modification time afterwards (Snakemake compares a script's mtime with its outputs')."""

    class Edit:
        def __enter__(self):
            self.text, self.stat = path.read_text(), path.stat()
            path.write_text(self.text + "\n# edited by a test\n")

        def __exit__(self, *exc):
            path.write_text(self.text)
            os.utime(path, ns=(self.stat.st_atime_ns, self.stat.st_mtime_ns))

    return Edit()


def test_touching_the_scoring_script_rescores_without_inference(workflow):
    with _edited(workflow.root / "workflow_scripts" / "steps" / "score.py"):
        jobs = workflow.planned(TINY)
    assert {j for j in jobs if j[0] == "score"} == {
        ("score", cell_path(w, s, "scored")) for w in WORKLOADS for s in LISTED
    }
    assert rules_of(jobs) == {"score", "all"} | ANALYSIS_RULES


def test_plotting_change_redraws_plots_only(workflow):
    with _edited(workflow.root / "workflow_scripts" / "steps" / "figures.py"):
        jobs = workflow.planned(TINY)
    assert rules_of(jobs) == {"figures", "all"}


def test_sparse_dense_adds_the_neighbours_of_the_frontier(workflow):
    from knobsweep.knobs import grid_neighbours

    config = with_(
        TINY,
        cells__mode="sparse_dense",
        cells__list=[],
        cells__sparse={"n": 5, "seed": 0, "single_knob_lines": False},
        cells__dense={"max_cells": 1},
    )
    config["grid"] = {"vision_tokens": [16, 24, 32], "top_k": [1, 2], "active_blocks": [4]}
    del config["workloads"]["captioning"]
    result = workflow.snakemake(config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = json.loads((workflow.workdir / RESULTS / "cells_dense.json").read_text())
    sparse = [KnobSetting.from_cell_id(c) for c in stages["sparse"]["qa"]]
    frontier = [KnobSetting.from_cell_id(c) for c in stages["frontier"]["qa"]]
    dense = [KnobSetting.from_cell_id(c) for c in stages["dense"]["qa"]]
    assert len(sparse) == 5 and frontier and set(frontier) <= set(sparse)
    expected = {n for f in frontier for n in grid_neighbours(f, **config["grid"])} - set(sparse)
    # The cap reaches the checkpoint (which neighbour it picks is tested in test_knobs).
    assert stages["max_cells"] == 1 and set(dense) <= expected and len(dense) == min(1, len(expected))
    # The final target holds both stages: every sparse and dense cell is scored and aggregated.
    for setting in sparse + dense:
        assert (workflow.workdir / cell_path("qa", setting, "scored")).exists()
    results = json.loads((workflow.workdir / RESULTS / "e2_knob_grid_results.json").read_text())
    aggregated = {(c["vision_tokens"], c["top_k"], c["active_blocks"]) for c in results["cells"]}
    assert aggregated == {(s.vision_tokens, s.top_k, s.active_blocks) for s in sparse + dense}
    assert workflow.planned(config) == set()


def test_killed_cell_leaves_no_shard_and_the_next_run_completes_it(workflow):
    extra = [KnobSetting(16, 2, 2), KnobSetting(32, 1, 2)]  # cells no other test runs
    config = with_(TINY, cells__list=[s.cell_id() for s in LISTED + extra])
    del config["workloads"]["captioning"]  # one workload shows it; keeps the test short
    killed = extra[0]
    result = workflow.snakemake(
        config, "--keep-going", env={"KNOBSWEEP_TEST_KILL_CELL": f"{killed.cell_id()}.parquet"}
    )
    assert result.returncode != 0
    cells_dir = workflow.workdir / RESULTS / "cells" / "qa"
    assert not (workflow.workdir / cell_path("qa", killed)).exists()
    assert any(
        p.name.startswith(f".{killed.cell_id()}.parquet.") for p in cells_dir.iterdir()
    )  # killed mid-write
    assert (workflow.workdir / cell_path("qa", extra[1])).exists()  # --keep-going finished the other cell
    jobs = workflow.planned(config)
    assert {j for j in jobs if j[0] in ("cell", "importance", "manifest")} == {
        ("cell", cell_path("qa", killed))
    }
    result = workflow.snakemake(config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert workflow.planned(config) == set()
    assert not [p for p in cells_dir.iterdir() if p.name.endswith(".tmp")]  # the rerun removed the leftover
