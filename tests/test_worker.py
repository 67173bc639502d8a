"""The model worker (knobsweep.worker): cells and importance run in one long-lived process per model, with
results identical to fresh in-process runs (`cells.run_cell_job`, `importance.importance_job`, the
independent reference here); a killed client is abandoned within a sample; a failing task or a dead worker
fails its job with a clear message and the next request starts afresh; idle timeout and shutdown leave no
process; the client never imports torch; and a Snakemake run loads the model once.

Workers are real processes started by the code under test, in a temporary working directory each; every
test stops the workers it started.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from knobsweep import cells, importance, io, worker
from knobsweep.workloads.manifest import build_manifest, write_manifest
from knobsweep.workloads.synthetic import write_synthetic_dataset
from knobsweep.workloads.vqa import load_vqa

REPO = Path(__file__).resolve().parents[1]
N_BLOCKS = 6  # conftest's tiny checkpoints
# KNOBSWEEP_TEST_DEVICE=cuda runs the worker (and the in-process reference) on a GPU (see conftest.py).
DEVICE = os.environ.get("KNOBSWEEP_TEST_DEVICE", "cpu")
# What the specs' inference path "auto" resolves to for the tiny model: the plain path on the CPU, the fastest
# path with the same greedy outputs on CUDA (knobsweep.models.fast_path).
AUTO_PATH = "eager" if DEVICE == "cpu" else "fused_regional_graph"
AUTO_VISION_ENCODER = "as loaded" if DEVICE == "cpu" else "graphed"
# Every shard column but the timings.
COMPARED = [
    "workload",
    "vision_tokens",
    "top_k",
    "active_blocks",
    "kept_blocks",
    "sample_id",
    "prediction",
    "vision_tokens_actual",
    "prompt_tokens",
    "output_tokens",
]
SPEC = {
    "workload": "qa",
    "knobs": {"vision_tokens": 16, "top_k": 1, "active_blocks": 4},
    "blocks": {"keep_first": False, "keep_last": False},
    "runtime": {
        "model": {"built_by": "test"},
        "dtype": "float32",
        "device": DEVICE.split(":")[0],
        "attn_implementation": "sdpa",
        "experts_implementation": None,
        "trust_remote_code": False,
    },
    "manifest": {"workload": "qa", "source": "synthetic"},
    "importance": {"vision_tokens": 32, "top_k": None, "max_new_tokens": 2},
    "generation": {"max_new_tokens": 3, "batch_size": 1, "decoding": "greedy"},
    "warmup": 1,
    "inference_code_version": cells.INFERENCE_CODE_VERSION,
}
# Three cells that differ in every knob.
CELL_A = {"vision_tokens": 16, "top_k": 1, "active_blocks": 4}
CELL_B = {"vision_tokens": 64, "top_k": 2, "active_blocks": 6}
CELL_C = {"vision_tokens": 32, "top_k": 4, "active_blocks": 2}
# A cell of ~15 s on the long manifest (0.2-0.3 s a sample on a CPU core), killed after two samples.
CELL_LONG = {"vision_tokens": 256, "top_k": 2, "active_blocks": 6}
LONG_N_EVAL = 60
LONG_GENERATION = {**SPEC["generation"], "max_new_tokens": 32}

# A client in its own process (a cell job's step script without Snakemake).
CLIENT = """
import json, sys
from knobsweep import worker
from knobsweep.io import log_to_file

args = json.loads(sys.argv[1])
log_to_file(args.pop("log"))
provenance = worker.run_cell_in_worker(args.pop("spec"), **args)
report = {name: name in sys.modules for name in ("torch", "transformers")}
report["overhead_s"] = provenance["overhead_s"]
with open(args["out_path"] + ".json", "w") as f:
    json.dump(report, f)
"""

# Loaded by the workers of a test that sets KNOBSWEEP_TEST_OOM_AFTER: generate raises a CUDA
# out-of-memory error after that many calls (what a real GPU OOM looks like to the worker).
SITECUSTOMIZE = """
import os
if os.environ.get("KNOBSWEEP_TEST_OOM_AFTER"):
    import knobsweep.cells
    _load = knobsweep.cells.load_adapter
    def load_adapter(*args, **kwargs):
        adapter, load_s = _load(*args, **kwargs)
        real, calls = adapter.generate, []
        def generate(*a, **k):
            calls.append(1)
            if len(calls) > int(os.environ["KNOBSWEEP_TEST_OOM_AFTER"]):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
            return real(*a, **k)
        adapter.generate = generate
        return adapter, load_s
    knobsweep.cells.load_adapter = load_adapter
"""


def spec_for(knobs: dict, **changes) -> dict:
    spec = copy.deepcopy(SPEC)
    spec["knobs"] = dict(knobs)
    spec.update(changes)
    return spec


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoints) -> dict[str, str]:
    """The tiny 6-block checkpoint, a short qa manifest (4 eval + 2 calibration samples), a long one (60 eval
    samples, for a cell that can be killed half-way) and an importance file."""
    root = tmp_path_factory.mktemp("worker_inputs")
    paths = write_synthetic_dataset(root / "synthetic", n_images=40, seed=0)
    samples = load_vqa(paths["vqa_questions"], paths["vqa_annotations"], paths["image_dir"])
    for name, n_eval in (("short", 4), ("long", LONG_N_EVAL)):
        manifest = build_manifest("qa", samples, n_eval=n_eval, n_calibration=2, seed=0, prompt=None)
        write_manifest(manifest, root / f"{name}.parquet")
    io.write_json_atomic(
        {"num_blocks": N_BLOCKS, "selection_score": [0.6, 0.1, 0.5, 0.2, 0.4, 0.3]}, root / "importance.json"
    )
    return {
        "model": str(tiny_checkpoints["qwen3_vl_moe"]),
        "manifest": str(root / "short.parquet"),
        "long_manifest": str(root / "long.parquet"),
        "importance": str(root / "importance.json"),
    }


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """Fresh in-process runs (the model loaded for each): cell id -> shard rows."""
    root = tmp_path_factory.mktemp("reference")
    rows = {}
    for knobs in (CELL_A, CELL_B, CELL_C):
        spec = spec_for(knobs)
        out = root / f"{cells.KnobSetting(**knobs).cell_id()}.parquet"
        provenance = cells.run_cell_job(
            spec,
            model_path=inputs["model"],
            device=DEVICE,
            manifest_path=inputs["manifest"],
            importance_path=inputs["importance"],
            out_path=str(out),
        )
        assert provenance["inference_path"] == AUTO_PATH  # "auto", resolved
        rows[cells.KnobSetting(**knobs).cell_id()] = pd.read_parquet(out)
    return rows


def worker_processes(cwd: Path) -> list[psutil.Process]:
    """Live model workers started from `cwd` (zombies, exited but not yet reaped, do not count)."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd", "status"]):
        cmdline = process.info["cmdline"] or []
        running = process.info["status"] != psutil.STATUS_ZOMBIE
        if "knobsweep.worker" in cmdline and process.info["cwd"] == str(cwd) and running:
            found.append(process)
    return found


def wait_gone(pid: int, timeout: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout)  # reaps it too when this process started it
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory of its own (one worker namespace); its workers are stopped afterwards."""
    work = tmp_path / "run"
    work.mkdir()
    monkeypatch.chdir(work)
    yield work
    worker.shutdown_workers(work)
    for process in worker_processes(work):
        if not wait_gone(process.pid, 10):
            process.kill()
            wait_gone(process.pid, 10)


def run_cell(inputs, knobs: dict, out: Path, *, idle_s: float = 60, manifest: str | None = None, **changes):
    return worker.run_cell_in_worker(
        spec_for(knobs, **changes),
        model_path=inputs["model"],
        device=DEVICE,
        manifest_path=manifest or inputs["manifest"],
        importance_path=inputs["importance"],
        out_path=str(out),
        progress_every_s=0.01,
        threads=1,
        idle_s=idle_s,
        log_dir="logs",
    )


def only_worker(cwd: Path) -> dict:
    status = worker.worker_status(cwd, timeout_s=10)
    assert len(status) == 1, status
    return next(iter(status.values()))


def assert_same_rows(shard: Path, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(shard)[COMPARED], expected[COMPARED], check_exact=True)


def test_cells_in_one_worker_equal_fresh_in_process_runs(inputs, reference, workdir):
    # Importance first (it goes through the worker too), then three cells differing in every knob, then
    # the first again: one model load, every result equal to a fresh process's.
    spec = spec_for(CELL_A)
    importance.importance_job(
        copy.deepcopy(spec),
        model_path=inputs["model"],
        device=DEVICE,
        manifest_path=inputs["manifest"],
        out_path="importance_in_process.json",
    )
    importance_provenance = worker.importance_in_worker(
        copy.deepcopy(spec),
        model_path=inputs["model"],
        device=DEVICE,
        manifest_path=inputs["manifest"],
        out_path="importance_worker.json",
        threads=1,
        log_dir="logs",
    )["provenance"]
    in_process, in_worker = (
        {k: v for k, v in json.loads(Path(name).read_text()).items() if k not in ("provenance", "elapsed_s")}
        for name in ("importance_in_process.json", "importance_worker.json")
    )
    assert in_worker == in_process
    assert importance_provenance["overhead_s"]["model_reused"] is False
    assert importance_provenance["overhead_s"]["load"] > 0

    order = [CELL_A, CELL_B, CELL_C, CELL_A]
    provenances = [run_cell(inputs, knobs, workdir / f"cell{i}.parquet") for i, knobs in enumerate(order)]
    for i, knobs in enumerate(order):
        assert_same_rows(workdir / f"cell{i}.parquet", reference[cells.KnobSetting(**knobs).cell_id()])
    assert [p["overhead_s"]["model_reused"] for p in provenances] == [True] * 4
    assert [p["overhead_s"]["load"] for p in provenances] == [0.0] * 4
    assert all(p["overhead_s"]["client_s"] > 0 for p in provenances)
    # The path that ran ("auto" resolved in the worker; the plain path for now) is recorded.
    assert [p["inference_path"] for p in provenances] == [AUTO_PATH] * 4
    assert [p["vision_encoder"] for p in provenances] == [AUTO_VISION_ENCODER] * 4
    status = only_worker(workdir)
    assert status["tasks"] == 5 and status["model_loaded"]
    log = next((workdir / "logs").glob("model_worker_*.log")).read_text()
    assert len(re.findall(r"model loaded in", log)) == 1
    # How the cell ran is no part of the fingerprint: the in-process shard's fingerprint is the same.
    ref_provenance = cells.cell_provenance(
        spec_for(CELL_A),
        model_path=inputs["model"],
        manifest_path=inputs["manifest"],
        importance_path=inputs["importance"],
        kept_blocks=provenances[0]["kept_blocks"],
        device=DEVICE,
    )
    assert provenances[0]["fingerprint"] == ref_provenance["fingerprint"]
    assert provenances[0]["device_name"] == ref_provenance["device_name"]


def test_client_imports_no_torch_and_a_killed_client_is_abandoned(inputs, reference, workdir):
    script = workdir / "client.py"
    script.write_text(CLIENT)

    def client(knobs: dict, name: str, manifest: str, **changes) -> subprocess.Popen:
        args = {
            "spec": spec_for(knobs, **changes),
            "model_path": inputs["model"],
            "device": DEVICE,
            "manifest_path": manifest,
            "importance_path": inputs["importance"],
            "out_path": str(workdir / "cells" / f"{name}.parquet"),
            "progress_every_s": 0.01,  # a line per sample
            "threads": 1,
            "log_dir": "logs",
            "log": str(workdir / f"{name}.log"),
        }
        return subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=workdir)

    # A client process of its own starts the worker and runs a cell without importing torch/transformers.
    first = client(CELL_A, "first", inputs["manifest"])
    assert first.wait(300) == 0, (workdir / "first.log").read_text()[-3000:]
    report = json.loads((workdir / "cells" / "first.parquet.json").read_text())
    assert report["torch"] is False and report["transformers"] is False
    assert report["overhead_s"]["model_reused"] is False
    assert_same_rows(workdir / "cells" / "first.parquet", reference["vt16_k1_b4"])
    pid = only_worker(workdir)["pid"]

    # A long cell, killed with SIGKILL after two samples.
    PROGRESS = rf"qa vt256_k2_b6: (\d+)/{LONG_N_EVAL} samples"
    long = client(CELL_LONG, "killed", inputs["long_manifest"], generation=LONG_GENERATION)
    log = workdir / "killed.log"
    deadline = time.monotonic() + 300
    done = 0
    while done < 2:
        assert time.monotonic() < deadline and long.poll() is None, log.read_text()[-3000:]
        found = re.findall(PROGRESS, log.read_text()) if log.exists() else []
        done = int(found[-1]) if found else 0
        time.sleep(0.01)
    long.kill()
    killed_at = time.monotonic()
    long.wait(10)
    # The worker answers again (it serves one request at a time: it has left the cell) within a short time.
    status = only_worker(workdir)
    back_after = time.monotonic() - killed_at
    assert status["pid"] == pid
    assert back_after < 5, back_after
    worker_log = next((workdir / "logs").glob("model_worker_*.log")).read_text()
    assert "qa vt256_k2_b6: abandoned, the client is gone" in worker_log
    assert int(re.findall(PROGRESS, worker_log)[-1]) < LONG_N_EVAL - 10  # stopped mid-cell
    # No shard and no temporary file of the killed cell.
    assert sorted(p.name for p in (workdir / "cells").iterdir()) == ["first.parquet", "first.parquet.json"]

    # The same worker serves the next request correctly (knobs reset after the abandoned cell).
    provenance = run_cell(inputs, CELL_C, workdir / "after.parquet")
    assert provenance["overhead_s"]["model_reused"] is True
    assert only_worker(workdir)["pid"] == pid
    assert_same_rows(workdir / "after.parquet", reference["vt32_k4_b2"])


def test_a_failing_task_names_the_cell_and_the_next_request_starts_a_fresh_worker(
    inputs, reference, workdir, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)  # the task's forwarded log lines reach the handler below
    site = workdir / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("KNOBSWEEP_TEST_OOM_AFTER", "2")  # inherited by the worker this request starts
    out = workdir / "cells" / "vt16_k1_b4.parquet"
    with pytest.raises(RuntimeError) as raised:
        run_cell(inputs, CELL_A, out)
    message = str(raised.value)
    assert "qa vt16_k1_b4" in message and "CUDA out of memory" in message, message
    assert "worker traceback" in message
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))
    # The failed worker has exited (it had already closed its socket when the error came back).
    failed_pid = int(re.search(r"pid (\d+)", message).group(1))
    assert wait_gone(failed_pid, 10)
    assert worker.worker_status(workdir) == {}

    # The next request starts a fresh worker (without the fault) and gets correct results.
    monkeypatch.delenv("KNOBSWEEP_TEST_OOM_AFTER")
    provenance = run_cell(inputs, CELL_A, out)
    assert provenance["overhead_s"]["model_reused"] is False and provenance["overhead_s"]["load"] > 0
    assert_same_rows(out, reference["vt16_k1_b4"])
    pid = only_worker(workdir)["pid"]
    assert pid != failed_pid

    # A worker that dies during a task (SIGKILL, e.g. the kernel's OOM killer): the client's error names
    # the cell and says so; the next request starts a fresh worker.
    class KillOnProgress(logging.Handler):
        def emit(self, record):
            if "samples/s" in record.getMessage():
                os.kill(pid, signal.SIGKILL)

    handler = KillOnProgress()
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(RuntimeError, match=rf"qa vt256_k2_b6: the model worker \(pid {pid}\) died"):
            run_cell(inputs, CELL_LONG, workdir / "cells" / "long.parquet", manifest=inputs["long_manifest"])
    finally:
        logging.getLogger().removeHandler(handler)
    assert wait_gone(pid, 10)
    assert not (workdir / "cells" / "long.parquet").exists()
    provenance = run_cell(inputs, CELL_C, workdir / "cells" / "vt32_k4_b2.parquet")
    assert provenance["overhead_s"]["model_reused"] is False
    assert only_worker(workdir)["pid"] not in (pid, failed_pid)
    assert_same_rows(workdir / "cells" / "vt32_k4_b2.parquet", reference["vt32_k4_b2"])


def test_idle_timeout_and_shutdown_leave_no_process(inputs, workdir, tmp_path, monkeypatch):
    # Idle: the worker exits on its own after idle_s without a request, and removes its socket.
    run_cell(inputs, CELL_A, workdir / "a.parquet", idle_s=2)
    pid = only_worker(workdir)["pid"]
    socket = next(worker.SOCKET_DIR.glob(f"{worker.worker_name(workdir, {})[:8]}*.sock"))
    start = time.monotonic()
    assert wait_gone(pid, 20)
    assert 1.5 < time.monotonic() - start < 15
    assert not socket.exists() and worker_processes(workdir) == []
    assert "no request for 2 s: exiting" in next((workdir / "logs").glob("model_worker_*.log")).read_text()

    # Shutdown (what the Snakefile's onsuccess/onerror handlers call): fast, and the worker exits.
    run_cell(inputs, CELL_A, workdir / "b.parquet", idle_s=600)
    pid = only_worker(workdir)["pid"]
    assert worker.shutdown_workers(tmp_path / "elsewhere") == 0  # another directory's: none
    assert only_worker(workdir)["pid"] == pid
    start = time.monotonic()
    assert worker.shutdown_workers(workdir) == 1
    assert time.monotonic() - start < 2
    assert wait_gone(pid, 10)
    assert worker_processes(workdir) == [] and worker.worker_status(workdir) == {}
    # Nothing to shut down, or no worker directory at all: no error, no wait.
    assert worker.shutdown_workers(workdir) == 0
    monkeypatch.setattr(worker, "SOCKET_DIR", tmp_path / "missing")
    assert worker.shutdown_workers(workdir) == 0


def test_job_has_own_allocation_only_when_the_run_lives_elsewhere(monkeypatch):
    cases = [  # (SLURM_JOB_ID of the job, the run's allocation as the Snakefile recorded it, expected)
        (None, None, False),  # no SLURM
        (None, "", False),
        ("4242", "", True),  # the SLURM executor: the run on a login node, the job in its own allocation
        ("4242", None, True),  # not started by the Snakefile: assume the worst
        ("4242", "4241", True),  # the run in one allocation, the job submitted into another
        ("4242", "4242", False),  # the run inside the job's allocation (sbatch/salloc/srun): share
    ]
    for job, run, expected in cases:
        for name, value in (("SLURM_JOB_ID", job), (worker.RUN_ALLOCATION_VARIABLE, run)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        assert worker.job_has_own_allocation() is expected, (job, run)


@pytest.mark.parametrize("job", ["cell", "importance"])
@pytest.mark.parametrize("use_worker", [True, False])
def test_a_gpu_job_runs_where_the_config_says_inside_its_gpu_slot(job, use_worker, monkeypatch):
    """The step scripts' dispatch: the job's own function, in the worker or in this process, with every path and
    setting passed on, while the job holds its GPU slot."""
    import torch
    from knobsweep import gpu_slots

    calls, held = [], []

    @contextlib.contextmanager
    def slot():
        held.append(True)
        yield "0"
        held.append(False)

    def recorder(name):
        return lambda spec, **kwargs: calls.append((name, spec, kwargs, held[-1]))

    monkeypatch.setattr(gpu_slots, "gpu_slot", slot)
    for name in ("run_cell_in_worker", "importance_in_worker"):
        monkeypatch.setattr(worker, name, recorder(name))
    monkeypatch.setattr(cells, "run_cell_job", recorder("run_cell_job"))
    monkeypatch.setattr(importance, "importance_job", recorder("importance_job"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    config = {
        "run": "r",
        "model": {"path": "models/m/", "device": "cpu"},
        "inference": {"model_worker": use_worker, "worker_idle_s": 5.0, "progress_every_s": 7.0},
    }
    worker.run_gpu_job(job, {"s": 1}, config, threads=3, manifest_path="man", out_path="out")

    expected = {
        ("cell", True): "run_cell_in_worker",
        ("importance", True): "importance_in_worker",
        ("cell", False): "run_cell_job",
        ("importance", False): "importance_job",
    }[job, use_worker]
    arguments = {
        "model_path": "models/m",
        "device": "cpu",
        "manifest_path": "man",
        "out_path": "out",
        "progress_every_s": 7.0,
    }
    settings = {"threads": 3, "idle_s": 5.0, "log_dir": "logs/r"} if use_worker else {}
    assert calls[-1] == (expected, {"s": 1}, {**arguments, **settings}, True)
    assert calls[:-1] == ([] if use_worker else [("threads", 3)])
    assert held == [True, False]  # the slot was released afterwards
    with pytest.raises(ValueError, match="unknown GPU job 'cells'"):
        worker.run_gpu_job("cells", {}, config, threads=1)


def test_in_the_runs_own_allocation_cells_share_one_worker(inputs, reference, workdir, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv(worker.RUN_ALLOCATION_VARIABLE, "4242")
    first = run_cell(inputs, CELL_A, workdir / "a.parquet", idle_s=600)
    pid = only_worker(workdir)["pid"]
    second = run_cell(inputs, CELL_B, workdir / "b.parquet", idle_s=600)
    assert [first["overhead_s"]["model_reused"], second["overhead_s"]["model_reused"]] == [False, True]
    assert only_worker(workdir)["pid"] == pid  # still serving, until the run's end shuts it down
    assert_same_rows(workdir / "a.parquet", reference["vt16_k1_b4"])
    assert worker.shutdown_workers(workdir) == 1
    assert wait_gone(pid, 10)


def test_under_slurm_each_job_has_its_own_worker_and_it_exits_with_the_job(
    inputs, reference, workdir, monkeypatch
):
    key = worker.model_key(inputs["model"], DEVICE, SPEC["runtime"])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv(worker.RUN_ALLOCATION_VARIABLE, "")  # the run on a login node, the job in its own
    assert worker.model_key(inputs["model"], DEVICE, SPEC["runtime"]) != key  # not another job's worker
    provenance = run_cell(inputs, CELL_A, workdir / "a.parquet")
    assert provenance["overhead_s"]["model_reused"] is False
    assert_same_rows(workdir / "a.parquet", reference["vt16_k1_b4"])
    log = next((workdir / "logs").glob("model_worker_*.log")).read_text()
    pid = int(re.search(r"model worker pid (\d+) listening", log).group(1))
    assert wait_gone(pid, 10)  # gone with the job's end, not after its idle time
    assert "shutdown requested" in next((workdir / "logs").glob("model_worker_*.log")).read_text()


def test_start_up_failure_shows_the_workers_log(inputs, workdir, monkeypatch):
    # A worker that cannot start (here: its package is hidden by a broken module of the same name).
    broken = workdir / "broken" / "knobsweep"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('knobsweep test: broken on purpose')\n")
    monkeypatch.setattr(worker, "__file__", str(broken / "worker.py"))
    with pytest.raises(RuntimeError, match=r"exited with code 1 during start-up(.|\n)*broken on purpose"):
        run_cell(inputs, CELL_A, workdir / "a.parquet")
    assert not (workdir / "a.parquet").exists()


def test_model_key_follows_the_model_files(inputs, tmp_path):
    import shutil

    copy_dir = tmp_path / "model"
    shutil.copytree(inputs["model"], copy_dir)
    key = worker.model_key(str(copy_dir), "cpu", SPEC["runtime"])
    assert worker.model_key(str(copy_dir) + "/", "cpu", SPEC["runtime"]) == key
    assert worker.model_key(str(copy_dir), "cuda:0", SPEC["runtime"]) != key
    assert worker.model_key(str(copy_dir), "cpu", {**SPEC["runtime"], "dtype": "bfloat16"}) != key
    weights = copy_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # a rebuild
    assert worker.model_key(str(copy_dir), "cpu", SPEC["runtime"]) != key
    assert worker.worker_name(tmp_path, key) != worker.worker_name(tmp_path / "other", key)
    assert len(str(worker.WorkerPaths(worker.worker_name(tmp_path, key)).socket)) < 100
    with pytest.raises(FileNotFoundError, match="config.json"):
        worker.model_key(str(tmp_path), "cpu", SPEC["runtime"])


# --- end to end -----------------------------------------------------------------------------------------

TINY = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
E2E_CELLS = ["vt16_k1_b2", "vt32_k2_b4", "vt32_k1_b4"]
SCORED = [f"results/tiny/scored/qa/{cell}.parquet" for cell in E2E_CELLS]


def snakemake_run(
    workdir: Path, model_worker: bool, *args: str, gpus: int = 1
) -> subprocess.CompletedProcess:
    config = copy.deepcopy(TINY)
    config["workloads"] = {"qa": TINY["workloads"]["qa"]}
    config["cells"] = {"mode": "list", "list": E2E_CELLS}
    config["inference"]["model_worker"] = model_worker
    config["model"]["device"] = DEVICE  # with KNOBSWEEP_TEST_DEVICE=cuda: real GPUs, one per job with gpus=2
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.test.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    command += ["--configfile", str(workdir / "config.test.yaml"), "--resources", f"gpu={gpus}"]
    command += ["--cores", str(gpus), *args, *SCORED]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("KNOBSWEEP_GPU_SLOTS", None)
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)


def log_interval(path: Path) -> tuple[datetime, datetime]:
    """When a job's log says it started and ended (its first and last timestamped lines)."""
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", path.read_text(), re.MULTILINE)
    first, last = (datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f") for stamp in (stamps[0], stamps[-1]))
    return first, last


@pytest.mark.slow
def test_a_snakemake_run_loads_the_model_once_per_gpu_and_matches_a_run_without_worker(tmp_path):
    import torch

    if DEVICE != "cpu" and torch.cuda.device_count() < 2:
        pytest.skip(f"on {DEVICE} this test's third run needs two GPUs (--resources gpu=2)")
    runs = {}
    for model_worker, gpus in ((True, 1), (False, 1), (True, 2)):
        workdir = tmp_path / f"worker_{model_worker}_gpus_{gpus}"
        result = snakemake_run(workdir, model_worker, gpus=gpus)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        deadline = time.monotonic() + 10
        while worker_processes(workdir) and time.monotonic() < deadline:
            time.sleep(0.1)
        job_logs = {
            "cells": sorted((workdir / "logs/tiny/cells").rglob("*.log")),
            "importance": sorted((workdir / "logs/tiny/importance").rglob("*.log")),
        }
        loads = sum(
            len(re.findall(r"model loaded in", p.read_text()))
            for p in job_logs["cells"] + job_logs["importance"]
        )
        provenance = [io.read_parquet_metadata(workdir / s.replace("/scored/", "/cells/")) for s in SCORED]
        runs[model_worker, gpus] = (workdir, loads, provenance, job_logs)
    workdir, loads, provenance, _ = runs[True, 1]
    assert loads == 1  # importance and the three cells: one model load
    assert all(p["overhead_s"]["model_reused"] for p in provenance)
    assert worker_processes(workdir) == []  # the run's end (onsuccess) stopped the worker
    assert "shutdown requested" in next((workdir / "logs" / "tiny").glob("model_worker_*.log")).read_text()
    assert runs[False, 1][1] == 1 + len(E2E_CELLS)  # without the worker: a load per job
    assert not any(p["overhead_s"]["model_reused"] for p in runs[False, 1][2])
    for scored, without, with_ in zip(SCORED, runs[False, 1][2], provenance):
        a, b = (pd.read_parquet(runs[key][0] / scored) for key in ((True, 1), (False, 1)))
        pd.testing.assert_frame_equal(
            a[[*COMPARED, "vqa_accuracy", "quality"]], b[[*COMPARED, "vqa_accuracy", "quality"]]
        )
        assert with_["spec"] == without["spec"]  # the worker settings are in no specification
    assert {p["visible_devices"] for p in provenance} == {None}  # one GPU: the device the config names

    # Two GPUs (--resources gpu=2; on the CPU emulated: the CPU config's jobs still get CUDA_VISIBLE_DEVICES): each
    # GPU job holds one device alone, each device's worker loads the model once, and the results are the same.
    two_dir, two_loads, two_provenance, two_logs = runs[True, 2]
    held = {}  # job log -> the device it held
    for path in two_logs["cells"] + two_logs["importance"]:
        found = re.findall(r"GPU (\d) of 2 \(CUDA_VISIBLE_DEVICES=(\d)\)", path.read_text())
        assert len(found) == 1 and found[0][0] == found[0][1], (path, found)
        held[path] = found[0][1]
    cell_devices = [held[path] for path in two_logs["cells"]]
    assert sorted(p["visible_devices"] for p in two_provenance) == sorted(cell_devices)
    assert set(cell_devices) == {"0", "1"}  # after importance, two of the three cells ran at once
    assert two_loads == len(set(held.values())) == 2  # one load per GPU, for importance and three cells
    assert len(list((two_dir / "logs" / "tiny").glob("model_worker_*.log"))) == 2
    for a, b in itertools.combinations(two_logs["cells"], 2):
        (a_start, a_end), (b_start, b_end) = log_interval(a), log_interval(b)
        if a_start < b_end and b_start < a_end:  # ran at the same time: never on the same GPU
            assert held[a] != held[b], (a, b)
    assert worker_processes(two_dir) == []
    for scored in SCORED:
        a, b = (pd.read_parquet(runs[key][0] / scored) for key in ((True, 1), (True, 2)))
        pd.testing.assert_frame_equal(
            a[[*COMPARED, "vqa_accuracy", "quality"]], b[[*COMPARED, "vqa_accuracy", "quality"]]
        )

    # Switching the worker off re-runs nothing (the shards stay valid).
    workdir = runs[True, 1][0]
    result = snakemake_run(workdir, False, "-n")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr, result.stdout[
        -3000:
    ]
