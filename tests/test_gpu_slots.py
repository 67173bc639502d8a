"""Several GPUs in one run (knobsweep.gpu_slots): which devices a run spreads its GPU jobs over, and that each
job holds one of them alone, with CUDA_VISIBLE_DEVICES set to it and restored after. The end-to-end run on two
(CPU-emulated) GPUs is in tests/test_worker.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from knobsweep import gpu_slots, worker

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("gpus", "visible", "expected"),
    [
        (None, None, []),  # no --resources gpu=...: the device the config names
        (1, None, []),
        (1, "3,5", []),
        (2, None, ["0", "1"]),
        (3, "3,5,7,9", ["3", "5", "7"]),  # SLURM's allocation: its devices, in its order
        (2, "GPU-aa, GPU-bb", ["GPU-aa", "GPU-bb"]),  # UUIDs, spaces ignored
    ],
)
def test_run_gpu_slots(gpus, visible, expected):
    assert gpu_slots.run_gpu_slots(gpus, visible) == expected


def test_more_gpu_jobs_than_visible_devices_is_refused():
    with pytest.raises(ValueError, match=r"gpu=3 .*CUDA_VISIBLE_DEVICES='3,5' lists 2 device\(s\)"):
        gpu_slots.run_gpu_slots(3, "3,5")


def test_with_slots_the_config_must_name_the_jobs_own_device():
    gpu_slots.check_device_for_slots(["0", "1"], "cuda")
    gpu_slots.check_device_for_slots(["0", "1"], "cuda:0")
    gpu_slots.check_device_for_slots(["0", "1"], "cpu")  # the jobs run side by side, one worker each
    gpu_slots.check_device_for_slots([], "cuda:1")
    with pytest.raises(ValueError, match=r"model.device: 'cuda:1' with --resources gpu=2"):
        gpu_slots.check_device_for_slots(["0", "1"], "cuda:1")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run's working directory with two slots, no SLURM, and CUDA_VISIBLE_DEVICES unset."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(gpu_slots.GPU_SLOTS_VARIABLE, "3,5")
    monkeypatch.delenv(gpu_slots.VISIBLE_DEVICES, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    locks = tmp_path / "locks"
    locks.mkdir()
    return locks


def test_each_job_holds_its_own_device_and_restores_the_environment(run_dir):
    with gpu_slots.gpu_slot(run_dir) as first:
        assert first == "3" and os.environ[gpu_slots.VISIBLE_DEVICES] == "3"
        with gpu_slots.gpu_slot(run_dir) as second:  # another job while the first runs: the other device
            assert second == "5" and os.environ[gpu_slots.VISIBLE_DEVICES] == "5"
        assert os.environ[gpu_slots.VISIBLE_DEVICES] == "3"
    assert gpu_slots.VISIBLE_DEVICES not in os.environ
    with gpu_slots.gpu_slot(run_dir) as again:  # released: the first device is free again
        assert again == "3"


def test_no_slots_or_an_allocation_of_its_own_changes_nothing(run_dir, monkeypatch):
    monkeypatch.setenv(gpu_slots.VISIBLE_DEVICES, "7")
    # The SLURM executor: the job's allocation has its GPU, which SLURM chose.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv(worker.RUN_ALLOCATION_VARIABLE, "")
    with gpu_slots.gpu_slot(run_dir) as slot:
        assert slot is None and os.environ[gpu_slots.VISIBLE_DEVICES] == "7"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv(gpu_slots.GPU_SLOTS_VARIABLE, "")  # --resources gpu=1
    with gpu_slots.gpu_slot(run_dir) as slot:
        assert slot is None and os.environ[gpu_slots.VISIBLE_DEVICES] == "7"


HOLDER = """
import sys, time
from pathlib import Path
from knobsweep.gpu_slots import gpu_slot
with gpu_slot(Path(sys.argv[1])) as device:
    print(device, flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_device_another_job_holds_is_not_taken_until_it_ends(run_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow_scripts")}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), "3"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "3"
        held_since = time.monotonic()
        with gpu_slots.gpu_slot(run_dir) as device:
            assert device == "5"
            # Both held: a third job waits until one is released (the other process's, after its 3 s).
            with gpu_slots.gpu_slot(run_dir) as third:
                assert third == "3"
                assert time.monotonic() - held_since > 2.5
        assert holder.wait(10) == 0
    finally:
        holder.kill()
        holder.wait()


SEES = """
import json, os
from knobsweep.gpu_slots import gpu_slot
with gpu_slot() as device:
    import torch
    torch.ones(1, device="cuda")  # CUDA initialised inside the slot, as in a cell job or its worker
    print(json.dumps({"slot": device, "count": torch.cuda.device_count(),
                      "uuid": str(torch.cuda.get_device_properties(0).uuid)}), flush=True)
    import time; time.sleep(2)  # both hold their device at once
"""


def gpus_here() -> int:
    if os.environ.get("KNOBSWEEP_TEST_DEVICE", "cpu") != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


@pytest.mark.skipif(gpus_here() < 2, reason="needs KNOBSWEEP_TEST_DEVICE=cuda and two CUDA GPUs")
def test_two_jobs_at_once_each_see_one_gpu_and_not_the_same(tmp_path):
    env = {**os.environ, gpu_slots.GPU_SLOTS_VARIABLE: "0,1", "PYTHONPATH": str(REPO / "workflow_scripts")}
    env.pop(gpu_slots.VISIBLE_DEVICES, None)
    env.pop("SLURM_JOB_ID", None)
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", SEES], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    seen = [json.loads(job.communicate(timeout=120)[0]) for job in jobs]
    assert sorted(s["slot"] for s in seen) == ["0", "1"]
    assert [s["count"] for s in seen] == [1, 1]
    assert seen[0]["uuid"] != seen[1]["uuid"]
