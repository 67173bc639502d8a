"""Faults in the input data: a corrupt, truncated or missing image, broken annotation JSON, a question
without annotation. Each is rejected by the manifest rule, before any GPU job: the Snakemake run fails at
`manifest`, the job's log names the file and the id, and no importance or cell job starts.

Real-format (VQA v2 / COCO) files are written by the synthetic generator into a temporary directory, then
damaged; Snakemake runs the repository's Snakefile in a temporary working directory. The model directory
holds only JSON files, so any job past the manifest would fail loudly as well.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from knobsweep.workloads.coco import load_coco_captions
from knobsweep.workloads.manifest import build_manifest
from knobsweep.workloads.synthetic import write_synthetic_dataset
from knobsweep.workloads.vqa import load_vqa

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
N_EVAL, N_CALIBRATION = 3, 1

pytestmark = pytest.mark.slow  # one Snakemake run (with its manifest job) per case


def fake_model(root: Path) -> str:
    root.mkdir(parents=True)
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen3_vl_moe",
                "text_config": {"num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2},
                "vision_config": {"patch_size": 16, "spatial_merge_size": 2},
            }
        )
    )
    return str(root)


def chosen(workload: str, paths: dict) -> list:
    """The samples the manifest rule will pick (same loader, sizes and seed), to damage one of them."""
    if workload == "qa":
        samples = load_vqa(paths["vqa_questions"], paths["vqa_annotations"], paths["image_dir"])
    else:
        samples = load_coco_captions(paths["coco_captions"], paths["image_dir"])
    manifest = build_manifest(
        workload, samples, n_eval=N_EVAL, n_calibration=N_CALIBRATION, seed=0, prompt=None
    )
    return manifest.to_dict("records")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(2000))


def drop_annotation(path: Path, question_id: int) -> None:
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["question_id"] != question_id]
    path.write_text(json.dumps(data))


# case -> (workload, damage(paths, first chosen sample) -> words the manifest log must contain)
def _image(damage):
    def apply(paths, sample):
        image = Path(sample["image_path"])
        if damage is None:
            image.unlink()
        else:
            damage(image)
        return [str(image), f"image_id {sample['image_id']}", f"sample {sample['sample_id']}"]

    return apply


def _broken_json(key):
    def apply(paths, sample):
        truncate(paths[key])
        return [str(paths[key]), "not valid JSON"]

    return apply


def _missing_annotation(paths, sample):
    drop_annotation(paths["vqa_annotations"], sample["question_id"])
    return [str(paths["vqa_annotations"]), f"question_id {sample['question_id']}"]


def _too_few_samples(paths, sample):
    return ["qa manifest", "n_eval 1000", "only"]


CASES = {
    "qa-truncated-image": ("qa", _image(truncate)),
    "qa-garbage-image": ("qa", _image(garbage)),
    "qa-missing-image": ("qa", _image(None)),
    "qa-broken-annotations-json": ("qa", _broken_json("vqa_annotations")),
    "qa-broken-questions-json": ("qa", _broken_json("vqa_questions")),
    "qa-question-without-annotation": ("qa", _missing_annotation),
    "captioning-truncated-image": ("captioning", _image(truncate)),
    "captioning-broken-captions-json": ("captioning", _broken_json("coco_captions")),
    # Not damaged data but more samples asked for than the data holds (known only once it is read).
    "qa-n_eval-larger-than-the-data": ("qa", _too_few_samples),
}
N_EVAL_OF = {"qa-n_eval-larger-than-the-data": 1000}


def config_for(workload: str, paths: dict, model: str, n_eval: int = N_EVAL) -> dict:
    config = copy.deepcopy(TINY)
    config["model"] = {"path": model, "device": "cpu"}
    if workload == "qa":
        data = {
            "questions": str(paths["vqa_questions"]),
            "annotations": str(paths["vqa_annotations"]),
            "images": str(paths["image_dir"]),
        }
        spec = {"source": "vqa", "data": data}
    else:
        spec = {
            "source": "coco",
            "data": {"captions": str(paths["coco_captions"]), "images": str(paths["image_dir"])},
        }
    config["workloads"] = {workload: {**spec, "n_eval": n_eval, "n_calibration": N_CALIBRATION}}
    return config


# Runs each case's Snakemake command line in one process (saves an interpreter and Snakemake import per
# case); writes {case: {"rc", "output"}} as JSON. The jobs themselves still run in their own processes.
BATCH_RUNNER = r"""
import contextlib, io, json, sys
from snakemake.cli import main

cases = json.load(open(sys.argv[1]))
results = {}
for name, argv in cases.items():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(argv)
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    results[name] = {"rc": rc, "output": out.getvalue()}
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Damage one copy of the data per case (plus an undamaged control) and run Snakemake on each."""
    root = tmp_path_factory.mktemp("faults_data")
    model = fake_model(root / "model")
    argvs, runs = {}, {}
    for case, (workload, damage) in [*CASES.items(), ("control", ("qa", None))]:
        paths = write_synthetic_dataset(root / case / "data", n_images=6, seed=0)
        expected = damage(paths, chosen(workload, paths)[0]) if damage else []
        workdir = root / case / "work"
        workdir.mkdir()
        config = workdir / "config.test.yaml"
        config.write_text(yaml.safe_dump(config_for(workload, paths, model, N_EVAL_OF.get(case, N_EVAL))))
        argvs[case] = [
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(workdir),
            "--configfile",
            str(config),
            "--cores",
            "1",
        ]
        runs[case] = {"workload": workload, "expected": expected, "workdir": workdir}
    (root / "cases.json").write_text(json.dumps(argvs))
    (root / "runner.py").write_text(BATCH_RUNNER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(root / "runner.py"), str(root / "cases.json"), str(root / "results.json")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for case, result in json.loads((root / "results.json").read_text()).items():
        runs[case].update(result)
    return runs


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_stops_at_the_manifest_rule(runs, case):
    run = runs[case]
    workdir, workload = run["workdir"], run["workload"]
    assert run["rc"] != 0
    assert "Error in rule manifest" in run["output"], run["output"][-3000:]
    log = (workdir / "logs" / "tiny" / "manifest" / f"{workload}.log").read_text()
    for words in run["expected"]:
        assert words in log, log[-3000:]
    # No manifest, and no job after it started.
    assert not (workdir / "results" / "tiny" / "manifest" / f"{workload}.parquet").exists()
    started = {p.parent.name for p in (workdir / "logs" / "tiny").rglob("*.log")}
    assert started == {"manifest"}, started
    assert not (workdir / "results" / "tiny" / "importance").exists()
    assert not (workdir / "results" / "tiny" / "cells").exists()


def test_the_undamaged_data_passes_the_manifest_rule(runs):
    # The control: the same set-up without damage gets past the manifest (and then fails at importance,
    # whose model directory has no weights).
    run = runs["control"]
    assert run["rc"] != 0
    assert (run["workdir"] / "results" / "tiny" / "manifest" / "qa.parquet").exists()
    assert "Error in rule importance" in run["output"], run["output"][-3000:]
