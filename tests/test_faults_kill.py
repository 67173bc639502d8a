"""Faults end to end: a cell job killed with SIGKILL in the middle of its samples, then the whole run (Snakemake
and its job) killed the same way, as when a cluster allocation dies. Nothing partial may remain, the next run
must redo only the missing cell, and its results must equal those of an uninterrupted run. The uninterrupted
reference run is an independent run of the same config in another directory, so the comparison also shows
that two runs give bitwise identical predictions and quality on CPU.

Snakemake runs the repository's Snakefile in temporary working directories, on tests/configs/tiny.yaml cut
down to one workload, two cells and ten samples; the targets are the scored shards (analysis excluded).
The model worker is on (the default): the samples run in the worker, the killed process is the cell job
(its client), and the worker must abandon the cell at once and, after a killed run, exit on its own.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
CELLS = ["vt16_k1_b2", "vt32_k2_b4"]
KILLED = "vt32_k2_b4"
N_EVAL = 10
WORKER_IDLE_S = 5
RESULTS = "results/tiny"
TARGETS = [f"{RESULTS}/scored/qa/{cell}.parquet" for cell in CELLS]
# Compared bitwise between runs: everything but the timings.
COMPARED = [
    "sample_id",
    "prediction",
    "vision_tokens_actual",
    "prompt_tokens",
    "output_tokens",
    "kept_blocks",
    "vqa_accuracy",
    "quality",
]


def make_config() -> dict:
    config = copy.deepcopy(TINY)
    config["workloads"] = {"qa": {**TINY["workloads"]["qa"], "n_eval": N_EVAL, "n_calibration": 2}}
    config["cells"] = {"mode": "list", "list": CELLS}
    # A progress line per sample; the model worker (on by default) idles out soon after a killed run.
    config["inference"] = {"warmup": 1, "progress_every_s": 0.01, "worker_idle_s": WORKER_IDLE_S}
    return config


def command(workdir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(workdir / "config.test.yaml"),
        "--cores",
        "1",
        *args,
        *(TARGETS if "--cleanup-metadata" not in args else []),
    ]


STARTED: list[subprocess.Popen] = []  # every run this module starts, so none outlives it


def start(workdir: Path, *args: str) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.test.yaml").write_text(yaml.safe_dump(make_config()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command(workdir, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, so a test can kill the run as a whole
    )
    STARTED.append(process)
    return process


def finish(process: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def run(workdir: Path, *args: str) -> tuple[int, str]:
    return finish(start(workdir, *args))


def planned(workdir: Path) -> set[tuple[str, str]]:
    """(rule, output) of every job a dry run would run."""
    code, output = run(workdir, "-n")
    assert code == 0, output[-3000:]
    jobs, rule = set(), None
    for line in output.splitlines():
        match = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line)
        if match:
            rule = match.group(1)
        elif rule and line.strip().startswith("output:"):
            jobs.add((rule, line.split("output:", 1)[1].split(",")[0].strip()))
            rule = None
    return jobs


def samples_done(log: Path, offset: int) -> int:
    """Samples the killed cell reports done in its log after `offset` (the log of an earlier attempt may
    still be there: Snakemake appends to it)."""
    try:
        text = log.read_text()
    except FileNotFoundError:  # not written yet, or removed by Snakemake as the job (re)starts: polled again
        return 0
    text = text[offset:] if len(text) >= offset else text
    done = re.findall(rf"qa {KILLED}: (\d+)/{N_EVAL} samples", text)
    return int(done[-1]) if done else 0


def cell_job_processes(process: subprocess.Popen) -> list[psutil.Process]:
    """The Python processes running the cell step script among the run's descendants."""
    found = []
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "python" in Path(cmdline[0]).name and any(arg.endswith("cell.py") for arg in cmdline):
            found.append(child)
    return found


def wait_mid_samples(process: subprocess.Popen, workdir: Path) -> int:
    """Block until the killed cell has done some but not all of its samples; return how many."""
    log = workdir / "logs" / "tiny" / "cells" / "qa" / f"{KILLED}.log"
    try:
        offset = len(log.read_text())
    except FileNotFoundError:
        offset = 0
    deadline = time.monotonic() + 500
    while time.monotonic() < deadline:
        done = samples_done(log, offset)
        if 1 <= done < N_EVAL - 2:
            return done
        assert done < N_EVAL, "the cell finished before it could be killed"
        assert process.poll() is None, finish(process)[1][-3000:]
        time.sleep(0.005)
    raise AssertionError("the cell never started its samples")


def run_processes(workdir: Path) -> list[int]:
    """Live processes of a run: the workflow's (the directory is on their command line) and the model
    worker (started there)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = p.info["cmdline"] or []
        if str(workdir) in " ".join(cmdline) or (
            "knobsweep.worker" in cmdline and p.info["cwd"] == str(workdir)
        ):
            found.append(p.pid)
    return found


def wait_no_process(workdir: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (found := run_processes(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def wait_abandoned(workdir: Path, since: float) -> float | None:
    """Seconds from `since` until the model worker's log says it abandoned the killed cell (None: never)."""
    deadline = since + 60
    while time.monotonic() < deadline:
        for log in (workdir / "logs" / "tiny").glob("model_worker_*.log"):
            if f"qa {KILLED}: abandoned, the client is gone" in log.read_text():
                return time.monotonic() - since
        time.sleep(0.05)
    return None


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)


def scored(workdir: Path) -> dict[str, pd.DataFrame]:
    return {
        cell: pd.read_parquet(workdir / RESULTS / "scored" / "qa" / f"{cell}.parquet")[COMPARED]
        for cell in CELLS
    }


def cells_present(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / RESULTS / "cells" / "qa").iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The reference run (uninterrupted, in its own directory, started first and running alongside) and
    the interrupted run, killed three ways in the same cell and checked after each."""
    root = tmp_path_factory.mktemp("faults_kill")
    reference = start(root / "reference")
    interrupted = root / "interrupted"
    killed_shard = f"{RESULTS}/cells/qa/{KILLED}.parquet"
    steps: dict = {"dir": interrupted, "reference": root / "reference", "orphans": []}
    try:
        # 1. Kill the cell job (only it) in the middle of its samples; --keep-going lets Snakemake finish
        #    every other job.
        process = start(interrupted, "--keep-going")
        steps["killed_at_sample"] = wait_mid_samples(process, interrupted)
        victims = cell_job_processes(process)
        assert len(victims) == 1, victims
        victims[0].kill()
        steps["job_kill"] = finish(process)
        steps["plan_after_job_kill"] = planned(interrupted)
        steps["cells_after_job_kill"] = cells_present(interrupted)
        # 2. Kill the whole run (Snakemake and its job) in the middle of the same cell.
        process = start(interrupted)
        steps["run_killed_at_sample"] = wait_mid_samples(process, interrupted)
        steps["cell_jobs_at_run_kill"] = len(cell_job_processes(process))
        kill_group(process)
        killed_at = time.monotonic()
        # The model worker has its own session and survives the run: it must leave the cell within a
        # sample (its client is gone) and then exit after its idle time.
        steps["abandoned_after_s"] = wait_abandoned(interrupted, killed_at)
        steps["orphans"] = wait_no_process(interrupted, WORKER_IDLE_S + 30)
        steps["cells_after_run_kill"] = cells_present(interrupted)
        # Snakemake's lock of the killed run is still there: a plain run stops at once, asking to unlock.
        steps["locked"] = run(interrupted)
        steps["unlock"] = run(interrupted, "--unlock")
        steps["plan_after_run_kill"] = planned(interrupted)
        # 3. Kill Snakemake alone in the middle of the same cell; the job lives on and writes its shard (what
        #    happens with the SLURM executor, whose jobs are separate batch jobs).
        process = start(interrupted)
        wait_mid_samples(process, interrupted)
        jobs = cell_job_processes(process)
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
        psutil.wait_procs(jobs, timeout=300)
        steps["cells_after_controller_kill"] = cells_present(interrupted)
        steps["incomplete"] = run(interrupted, "-n")
        run(interrupted, "--unlock")
        steps["cleanup"] = run(interrupted, "--cleanup-metadata", killed_shard)
        # 4. The next plain run.
        steps["resume"] = run(interrupted)
        steps["plan_after_resume"] = planned(interrupted) if steps["resume"][0] == 0 else None
        steps["reference_run"] = finish(reference)
    finally:
        for process in STARTED:
            if process.poll() is None:
                kill_group(process)
        for pid in steps["orphans"]:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
    return steps


def test_reference_run_completes(runs):
    code, output = runs["reference_run"]
    assert code == 0, output[-3000:]


ONLY_THE_KILLED_CELL = {
    ("cell", f"{RESULTS}/cells/qa/{KILLED}.parquet"),
    ("score", f"{RESULTS}/scored/qa/{KILLED}.parquet"),
}
OTHER_CELLS = [f"{c}.parquet" for c in CELLS if c != KILLED]


def test_killed_cell_job_leaves_no_shard_and_only_it_is_planned(runs):
    code, output = runs["job_kill"]
    assert code != 0  # the failure is reported
    assert "Error in rule cell" in output and KILLED in output, output[-3000:]
    assert runs["killed_at_sample"] < N_EVAL
    # No shard and no temporary file of the killed cell; the other cell is complete.
    assert runs["cells_after_job_kill"] == OTHER_CELLS
    assert runs["plan_after_job_kill"] == ONLY_THE_KILLED_CELL


def test_killed_run_leaves_no_shard_and_no_process(runs):
    assert runs["cell_jobs_at_run_kill"] == 1 and runs["run_killed_at_sample"] < N_EVAL  # killed mid-cell
    # The job died with the run; the model worker, in a session of its own, left the cell within a sample
    # (it does not keep the GPU busy) and then exited after its idle time: no process remains.
    assert runs["abandoned_after_s"] is not None and runs["abandoned_after_s"] < 10, runs["abandoned_after_s"]
    assert runs["orphans"] == []
    assert runs["cells_after_run_kill"] == OTHER_CELLS


def test_run_after_a_killed_run_stops_and_says_to_unlock(runs):
    code, output = runs["locked"]
    assert code != 0 and "--unlock" in output, output[-3000:]
    assert not re.findall(r"^(?:local)?rule (\w+):", output, flags=re.MULTILINE)  # no job started
    assert runs["unlock"][0] == 0, runs["unlock"][1][-3000:]
    # After unlocking, only the killed cell is planned (no --rerun-incomplete needed: it has no file).
    assert runs["plan_after_run_kill"] == ONLY_THE_KILLED_CELL


def test_shard_finished_after_snakemake_died_is_kept_not_recomputed(runs):
    # The orphaned job finished its shard; Snakemake flags it incomplete (it never saw the job end) and
    # stops, naming the file. The shard is complete (atomic write), so --cleanup-metadata keeps it, and
    # the next run scores it without recomputing the cell (--rerun-incomplete would redo the GPU work).
    assert runs["cells_after_controller_kill"] == sorted(f"{c}.parquet" for c in CELLS)
    code, output = runs["incomplete"]
    assert code != 0 and "IncompleteFilesException" in output and f"{KILLED}.parquet" in output, output[
        -3000:
    ]
    assert runs["cleanup"][0] == 0, runs["cleanup"][1][-3000:]


def test_next_run_completes_only_what_is_missing(runs):
    code, output = runs["resume"]
    assert code == 0, output[-3000:]
    jobs = re.findall(r"^(?:local)?rule (\w+):", output, flags=re.MULTILINE)
    assert jobs == ["score"], jobs  # the kept shard is scored; nothing else runs again
    assert runs["plan_after_resume"] == set()


def test_resumed_results_equal_an_uninterrupted_run(runs):
    reference, resumed = scored(runs["reference"]), scored(runs["dir"])
    for cell in CELLS:
        pd.testing.assert_frame_equal(resumed[cell], reference[cell], check_exact=True)
        assert len(resumed[cell]) == N_EVAL


def test_two_runs_of_one_config_are_bitwise_identical(runs):
    # The cell never interrupted was computed by two independent runs (own model build, data, manifest,
    # importance): identical predictions, token counts and quality.
    for cell in CELLS:
        if cell == KILLED:
            continue
        a = pd.read_parquet(runs["reference"] / RESULTS / "scored" / "qa" / f"{cell}.parquet")
        b = pd.read_parquet(runs["dir"] / RESULTS / "scored" / "qa" / f"{cell}.parquet")
        pd.testing.assert_frame_equal(a[COMPARED], b[COMPARED], check_exact=True)
    importance = [
        {
            k: v
            for k, v in json.loads((d / RESULTS / "importance" / "qa.json").read_text()).items()
            if k not in ("provenance", "elapsed_s")
        }
        for d in (runs["reference"], runs["dir"])
    ]
    assert importance[0] == importance[1]
    manifests = [
        pd.read_parquet(d / RESULTS / "manifest" / "qa.parquet").drop(columns="image_path")
        for d in (runs["reference"], runs["dir"])
    ]
    pd.testing.assert_frame_equal(manifests[0], manifests[1], check_exact=True)


def test_shards_record_that_remote_code_stayed_off(runs):
    # What the workflow itself passed to the cell job (tiny.yaml does not mention trust_remote_code).
    from knobsweep import io

    for cell in CELLS:
        provenance = io.read_parquet_metadata(runs["dir"] / RESULTS / "cells" / "qa" / f"{cell}.parquet")
        assert provenance["spec"]["runtime"]["trust_remote_code"] is False
