"""profiles/slurm on a real single-node SLURM, end to end with tests/configs/tiny.yaml.

tests/slurm/setup.sh installs Debian's SLURM (slurmctld, slurmd, munge), writes a one-node cluster with one
fake GPU and starts it; the runs go through snakemake-executor-plugin-slurm with the repository's profile,
changed only where a 2-core CI machine needs it (memory requests capped, faster first poll, no automatic
retry). During the first run one running cell job is cancelled with scancel: that run must fail naming the
SLURM job and keep every other cell's shard; the second run must run that cell alone. The final results
must equal a local run's (timings aside), and slurmctld's own job records must show that only the GPU rules
(importance, cell) asked for a GPU. Daemons started here are stopped by PID (tests/slurm/teardown.sh).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import SLURM_SHIM_DIR
from knobsweep.io import read_parquet_metadata

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "tests" / "slurm"
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
TINY = yaml.safe_load(TINY_CONFIG.read_text())
RESULTS = f"results/{TINY['run']}"
WORKLOADS = list(TINY["workloads"])
CELL_IDS = TINY["cells"]["list"]
GPU_RULES = {"importance", "cell"}
SETUP_RULES = {"importance", "manifest", "synthetic_data", "tiny_model"}
STATE_DIR = Path(os.environ.get("KNOBSWEEP_SLURM_DIR", "/tmp/knobsweep-slurm"))
RUN_TIMEOUT_S = 900  # one Snakemake run (the tiny run takes ~3 min locally, ~3-4 min through SLURM)
# The first end-to-end test also pays for the fixtures: set-up, the local run and both SLURM runs.
END_TO_END_TIMEOUT_S = 3 * RUN_TIMEOUT_S + 600
CI_MEM_MB = 3000  # what a rule may ask for on the 2-core / 24 GiB CI machine
# Identical between the SLURM run and the local run (timing columns differ).
COMPARED = [
    "workload",
    "sample_id",
    "vision_tokens",
    "top_k",
    "active_blocks",
    "kept_blocks",
    "prediction",
    "vision_tokens_actual",
    "prompt_tokens",
    "output_tokens",
    "quality",
]
METRICS = {"qa": ["vqa_accuracy"], "captioning": ["cider", "bleu4", "rouge_l", "meteor"]}

needs_root_and_apt = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None,
    reason="installs and starts SLURM from Debian packages: needs root and apt-get",
)


@pytest.fixture(autouse=True, scope="module")
def real_slurm_commands():
    """These tests use the real `scontrol`, not conftest's fast-failing one."""
    saved = os.environ["PATH"]
    os.environ["PATH"] = os.pathsep.join(d for d in saved.split(os.pathsep) if d != SLURM_SHIM_DIR)
    yield
    os.environ["PATH"] = saved


def run_env() -> dict:
    # SLURM jobs inherit this environment (the plugin submits with --export=ALL).
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    # The repository's Snakefile, working in a temporary directory: nothing is written into the repo.
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(TINY_CONFIG),
        *args,
    ]


class Run:
    """A Snakemake process in its own session, so that a run past its timeout dies with its children."""

    def __init__(self, cmd: list[str], timeout: float = RUN_TIMEOUT_S):
        self.deadline = time.monotonic() + timeout
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=run_env(),
            start_new_session=True,
        )

    def wait(self) -> subprocess.CompletedProcess:
        try:
            out, _ = self.proc.communicate(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
            cancel_run_jobs(out)
            pytest.fail(f"snakemake did not finish in time:\n{out[-5000:]}")
        self.seconds = time.monotonic() - self.started
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, "")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Snakemake may sleep minutes between polls


def run_id(output: str) -> str:
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, f"no SLURM run ID in the output:\n{output[-3000:]}"
    return match.group(1)


def cancel_run_jobs(output: str):
    """After a killed run: cancel its SLURM jobs (the plugin names every job after the run ID)."""
    match = re.search(r"SLURM run ID: (\S+)", output or "")
    if match:
        subprocess.run(["scancel", "--quiet", "--name", match.group(1)], check=False, timeout=30)


def scheduler(*args: str) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 0, f"{' '.join(args)} failed: {result.stderr}"
    return result.stdout


def job_records(name: str) -> list[dict]:
    """slurmctld's record of every job submitted under job name `name`."""
    records = []
    for line in scheduler("scontrol", "show", "job", "--oneliner").splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("JobName") == name:
            records.append(fields)
    return records


def planned_jobs(workdir: Path) -> dict[str, int]:
    """{rule: count} of what a dry run would run now."""
    result = subprocess.run(
        snakemake_cmd(workdir, "-n", "--cores", "1"),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=run_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("Job stats:", 1)[1].split("total", 1)[0]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def daemons_running() -> bool:
    try:
        pid = int((STATE_DIR / "run" / "slurmctld.pid").read_text())
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a killed daemon may linger as zombie
    except (OSError, ValueError):
        return False


def ci_profile(root: Path) -> Path:
    """The repository's profile with only what the CI machine and this test need changed."""
    profile = yaml.safe_load(PROFILE.read_text())
    for resources in profile["set-resources"].values():
        resources["mem_mb"] = min(resources["mem_mb"], CI_MEM_MB)  # the real model's request never fits
    profile["default-resources"]["mem_mb"] = min(profile["default-resources"]["mem_mb"], CI_MEM_MB)
    profile["slurm-init-seconds-before-status-checks"] = 2  # jobs of seconds: poll soon
    profile["retries"] = 0  # the cancelled cell must fail the run, not be resubmitted
    profile["slurm-keep-successful-logs"] = True
    directory = root / "profile"
    directory.mkdir()
    (directory / "config.yaml").write_text(yaml.safe_dump(profile))
    return directory


def cancel_a_running_cell(run: Run) -> str:
    """scancel one running cell job; returns its SLURM job id."""
    while time.monotonic() < run.deadline and run.proc.poll() is None:
        queue = scheduler("squeue", "-h", "--states=RUNNING", "-o", "%i|%k")
        for line in queue.splitlines():
            job_id, comment = line.split("|", 1)
            if comment.startswith("rule_cell_"):
                # A tiny cell runs for seconds: suspend it first. A finished job cannot be suspended, so
                # a successful suspend means the cell is cancelled before writing its shard.
                if subprocess.run(
                    ["scontrol", "suspend", job_id], capture_output=True, check=False, timeout=30
                ).returncode:
                    continue
                scheduler("scancel", job_id)
                return job_id
        time.sleep(0.2)
    pytest.fail("no cell job was seen running")


# --- the profile itself (fast) ------------------------------------------------------------------------


def test_profile_keys_are_real_options():
    profile = yaml.safe_load(PROFILE.read_text())
    help_text = subprocess.run(
        [sys.executable, "-m", "snakemake", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=run_env(),
    ).stdout
    options = set(re.findall(r"--([a-z0-9-]+)", help_text))
    assert set(profile) <= options, f"not options of snakemake or the SLURM plugin: {set(profile) - options}"
    assert profile["executor"] == "slurm"
    # squeue works with and without slurmdbd; sacct without slurmdbd makes Snakemake wait forever.
    assert profile["slurm-status-command"] == "squeue"


def test_profile_names_rules_of_the_workflow(tmp_path):
    result = subprocess.run(
        snakemake_cmd(tmp_path, "--list-rules"),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=run_env(),
    )
    assert result.returncode == 0, result.stderr
    rules = set(result.stdout.split())
    profile = yaml.safe_load(PROFILE.read_text())
    grouped = {entry.split("=")[0] for entry in profile["groups"]}
    assert grouped <= rules | {"tiny_model"}  # tiny_model exists only when model.build_tiny (it is here)
    assert set(profile["set-resources"]) <= rules
    # A failed group deletes all its outputs, and plugin 2.8.0's array tasks check the first task's
    # outputs (issue #447): GPU work stays one SLURM job per cell.
    assert not grouped & GPU_RULES
    assert "slurm-array-jobs" not in profile


# --- end to end on SLURM (slow) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A running single-node SLURM; stopped afterwards if this fixture started it."""
    started_here = not daemons_running()
    setup = subprocess.run(
        ["bash", str(SLURM_SCRIPTS / "setup.sh"), str(STATE_DIR)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    try:
        assert setup.returncode == 0, f"tests/slurm/setup.sh failed:\n{setup.stdout}\n{setup.stderr}"
        yield STATE_DIR
    finally:
        if started_here:
            teardown = subprocess.run(
                ["bash", str(SLURM_SCRIPTS / "teardown.sh"), str(STATE_DIR)],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            assert teardown.returncode == 0, teardown.stderr
            assert not list((STATE_DIR / "run").rglob("*.pid")), "teardown left PID files behind"
            assert not daemons_running()


@pytest.fixture(scope="module")
def local_run_started(tmp_path_factory):
    """The reference run by the local executor, started early: it overlaps the SLURM runs' waiting."""
    workdir = tmp_path_factory.mktemp("local")
    run = Run(snakemake_cmd(workdir, "--cores", "2", "--resources", "gpu=1"))
    yield workdir, run
    run.kill()


@pytest.fixture(scope="module")
def local_run(local_run_started) -> Path:
    workdir, run = local_run_started
    result = run.wait()
    assert result.returncode == 0, result.stdout[-5000:]
    return workdir


@pytest.fixture(scope="module")
def slurm_runs(cluster, local_run_started, tmp_path_factory) -> dict:
    """The first run with one cell cancelled mid-run, then the resuming run; both through the profile."""
    root = tmp_path_factory.mktemp("slurm")
    workdir = root / "work"
    workdir.mkdir()
    cmd = snakemake_cmd(workdir, "--profile", str(ci_profile(root)))
    first_run = Run(cmd)
    try:
        cancelled = cancel_a_running_cell(first_run)
    except BaseException:
        first_run.kill()
        cancel_run_jobs(first_run.wait().stdout)
        raise
    first = first_run.wait()
    missing = [
        (w, c)
        for w in WORKLOADS
        for c in CELL_IDS
        if not (workdir / RESULTS / "cells" / w / f"{c}.parquet").exists()
    ]
    planned = planned_jobs(workdir)
    second_run = Run(cmd)
    second = second_run.wait()
    print(f"SLURM runs: {first_run.seconds:.0f} s (cancelled {cancelled}), {second_run.seconds:.0f} s")
    return {
        "workdir": workdir,
        "first": first,
        "second": second,
        "cancelled": cancelled,
        "missing": missing,
        "planned": planned,
    }


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
@needs_root_and_apt
def test_cancelled_cell_fails_the_run_and_only_it_reruns(slurm_runs):
    first, cancelled = slurm_runs["first"], slurm_runs["cancelled"]
    assert first.returncode != 0, "a cancelled cell job must fail the run"
    report = f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'"
    assert report in first.stdout, first.stdout[-5000:]
    # Exactly one shard is missing, the cancelled cell's; every other cell finished (keep-going).
    assert len(slurm_runs["missing"]) == 1, slurm_runs["missing"]
    workload, cell_id = slurm_runs["missing"][0]
    assert "Error in rule cell" in first.stdout
    assert f"{RESULTS}/cells/{workload}/{cell_id}.parquet" in first.stdout.split("Error in rule cell", 1)[1]
    # The next run plans that one cell and nothing before it ...
    planned = slurm_runs["planned"]
    assert planned["cell"] == 1, planned
    assert not SETUP_RULES & set(planned), planned
    # ... and does it: one GPU job, the cancelled cell, then completes.
    second = slurm_runs["second"]
    assert second.returncode == 0, second.stdout[-5000:]
    knobs = "_".join(re.findall(r"\d+", cell_id))
    gpu_jobs = [r["Comment"] for r in job_records(run_id(second.stdout)) if "gpu" in r.get("TresPerJob", "")]
    assert gpu_jobs == [f"rule_cell_wildcards_{workload}_{knobs}"]
    assert len(re.findall(r"Finished jobid: \d+ \(Rule: cell\)", second.stdout)) == 1


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
@needs_root_and_apt
def test_only_gpu_rules_requested_a_gpu(slurm_runs):
    profile = yaml.safe_load(PROFILE.read_text())
    records = [r for key in ("first", "second") for r in job_records(run_id(slurm_runs[key].stdout))]
    assert records, "no SLURM job records found"
    seen = set()
    for record in records:
        # The plugin's comment: rule_<rule>_wildcards_<values>, or rule_<group>_<its rules> for a group.
        rule = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", record["Comment"]).group(1)
        seen.add(rule)
        requested = record.get("TresPerJob", "")
        if rule in GPU_RULES:
            assert requested == "gres:gpu:1", f"{record['Comment']} asked for {requested!r}"
            assert f"mem={CI_MEM_MB}M" in record["TRES"]
            hours, minutes = divmod(profile["set-resources"][rule]["runtime"], 60)
            assert record["TimeLimit"] == f"{hours:02d}:{minutes:02d}:00", record["TimeLimit"]
        else:
            assert "gpu" not in requested, f"CPU job {record['Comment']} asked for {requested!r}"
        # cores: 1 in the profile: a group asks for one CPU, as it runs one job at a time.
        assert "cpu=1," in record["TRES"], f"{record['Comment']}: {record['TRES']}"
    assert GPU_RULES <= seen, seen
    # Grouped CPU work went out as groups (data preparation, scoring, analysis).
    assert {"data", "scoring", "analysis"} <= {rule.split("_", 1)[0] for rule in seen}, seen


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
@needs_root_and_apt
def test_results_equal_a_local_run(slurm_runs, local_run):
    on_slurm, local = slurm_runs["workdir"] / RESULTS, local_run / RESULTS
    for workload in WORKLOADS:
        for cell_id in CELL_IDS:
            frames = []
            for results in (on_slurm, local):
                frame = pd.read_parquet(results / "scored" / workload / f"{cell_id}.parquet")
                frame = frame[COMPARED + METRICS[workload]].sort_values("sample_id").reset_index(drop=True)
                frame["kept_blocks"] = frame["kept_blocks"].map(list)
                frames.append(frame)
            pd.testing.assert_frame_equal(*frames, obj=f"{workload}/{cell_id}")
        importance = [
            json.loads((r / "importance" / f"{workload}.json").read_text()) for r in (on_slurm, local)
        ]
        assert importance[0]["importance"] == importance[1]["importance"]
    quality = [
        {
            (c["workload"], c["vision_tokens"], c["top_k"], c["active_blocks"]): c["quality"]
            for c in json.loads((r / "e2_knob_grid_results.json").read_text())["cells"]
        }
        for r in (on_slurm, local)
    ]
    assert quality[0] == quality[1] and len(quality[0]) == len(WORKLOADS) * len(CELL_IDS)


# --- the whole sweep in one allocation (slow) ---------------------------------------------------------

SWEEP_SCRIPT = REPO / "profiles" / "slurm" / "sweep_in_one_allocation.sbatch"


def submit_sweep(workdir: Path) -> str:
    """sbatch the one-allocation script for the tiny run (limits the CI machine can give); returns the job id."""
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--chdir={workdir}",
            f"--mem={CI_MEM_MB}",
            "--cpus-per-task=2",
            "--time=30",
            f"--output={workdir}/sweep-%j.log",
            str(SWEEP_SCRIPT),
            *snakemake_cmd(workdir)[3:],  # -s <Snakefile> -d <workdir> --configfile <tiny>
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env=run_env(),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_for_job_end(job_id: str, deadline: float) -> None:
    while scheduler("squeue", "-h", "-j", job_id, "-o", "%T").strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False, timeout=30)
            pytest.fail(f"SLURM job {job_id} did not end in time")
        time.sleep(0.5)


def batch_shell_pid(job_id: str) -> int:
    """The PID of a running job's batch shell (this single-node cluster runs it on this machine)."""
    for line in scheduler("scontrol", "listpids", job_id).splitlines()[1:]:
        pid, _job, step = line.split()[:3]
        if step == "batch" and pid.isdigit():
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(part.endswith(b"snakemake") for part in command):
                return int(pid)
    pytest.fail(f"no Snakemake batch shell found for job {job_id}")


def worker_logs(workdir: Path) -> set[Path]:
    return set((workdir / "logs" / TINY["run"]).glob("model_worker_*.log"))


def cell_shards(workdir: Path) -> dict[Path, tuple[int, int]]:
    """{shard: (inode, mtime_ns)} of the cells finished so far."""
    shards = (workdir / RESULTS / "cells").glob("*/*.parquet")
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}


@pytest.fixture(scope="module")
def allocation_runs(cluster, local_run_started, tmp_path_factory) -> dict:
    """The sweep script twice: the first allocation interrupted once two cells are done, as the script's
    `--signal=B:INT@120` does before the time limit; the second resuming."""
    workdir = tmp_path_factory.mktemp("allocation")
    deadline = time.monotonic() + 2 * RUN_TIMEOUT_S
    first = submit_sweep(workdir)
    # Two shards: the first is then certainly recorded as complete (one GPU job at a time, so the second
    # cell started after Snakemake had finished the first). A tiny cell takes ~1 s: others remain.
    while len(cell_shards(workdir)) < 2:
        if time.monotonic() > deadline or not scheduler("squeue", "-h", "-j", first, "-o", "%T").strip():
            subprocess.run(["scancel", first], check=False, timeout=30)
            pytest.fail(
                f"two cells did not finish in the first allocation; its log:\n{_read(workdir, first)}"
            )
        time.sleep(0.05)
    # SIGINT to the batch shell alone (Snakemake, exec'd by the script), as `--signal=B:INT` sends it. Sent
    # directly: with this cluster's proctrack/linuxproc, `scancel --batch` signals the shell's children too.
    os.kill(batch_shell_pid(first), signal.SIGINT)
    wait_for_job_end(first, deadline)
    after_first = {
        "shards": cell_shards(workdir),
        "incomplete": incomplete_outputs(workdir),
        "logs": worker_logs(workdir),
        "locks": list((workdir / ".snakemake" / "locks").glob("*")),
        "output": _read(workdir, first),
    }
    second = submit_sweep(workdir)
    wait_for_job_end(second, deadline)
    return {"workdir": workdir, "first": after_first, "second_output": _read(workdir, second)}


def incomplete_outputs(workdir: Path) -> set[Path]:
    """Outputs Snakemake marked incomplete (a job interrupted before Snakemake recorded it finished)."""
    markers = (workdir / ".snakemake" / "incomplete").glob("*")
    return {workdir / base64.urlsafe_b64decode(m.name).decode() for m in markers}


def _read(workdir: Path, job_id: str) -> str:
    path = workdir / f"sweep-{job_id}.log"
    return path.read_text() if path.exists() else ""


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
@needs_root_and_apt
def test_sweep_in_one_allocation_loads_the_model_once_and_resumes(allocation_runs, local_run):
    workdir, first = allocation_runs["workdir"], allocation_runs["first"]
    all_cells = len(WORKLOADS) * len(CELL_IDS)
    # The interrupted allocation: Snakemake stopped the running job and released its lock.
    assert "Terminating processes on user request" in first["output"], first["output"][-3000:]
    assert first["locks"] == [], first["locks"]
    kept = {p: stat for p, stat in first["shards"].items() if p not in first["incomplete"]}
    assert 1 <= len(kept) < all_cells, (sorted(first["shards"]), sorted(first["incomplete"]))
    # One model worker per allocation, loaded once, serving every GPU job there.
    assert len(first["logs"]) == 1
    first_log = next(iter(first["logs"])).read_text()
    assert first_log.count("listening on") == 1, first_log
    assert len(re.findall(r"model reused", first_log)) >= 2  # an importance run and two cells at least
    second_output = allocation_runs["second_output"]
    assert re.search(r"\d+ of \d+ steps \(100%\) done", second_output), second_output[-3000:]
    new_logs = worker_logs(workdir) - first["logs"]
    assert len(new_logs) == 1
    assert next(iter(new_logs)).read_text().count("listening on") == 1
    # The resumed allocation kept the finished shards untouched and computed the rest, with one load.
    shards = cell_shards(workdir)
    assert len(shards) == all_cells
    assert all(shards[p] == stat for p, stat in kept.items())
    new_cells = [p for p in shards if p not in kept]
    loads = [not read_parquet_metadata(p)["overhead_s"]["model_reused"] for p in new_cells]
    assert sum(loads) <= 1, loads
    # Same results as the local run.
    for workload in WORKLOADS:
        for cell_id in CELL_IDS:
            frames = [
                pd.read_parquet(r / RESULTS / "scored" / workload / f"{cell_id}.parquet")[COMPARED]
                .sort_values("sample_id")
                .reset_index(drop=True)
                .assign(kept_blocks=lambda f: f["kept_blocks"].map(list))
                for r in (workdir, local_run)
            ]
            pd.testing.assert_frame_equal(*frames, obj=f"{workload}/{cell_id}")
