"""Several GPUs in one run: each GPU job (cell, importance) holds one of the run's GPUs for its whole run.

`snakemake --resources gpu=N` lets Snakemake run N GPU jobs at once, but it does not say which GPU a job should
use: without this every job would run on the first GPU, side by side, and time each other. With N > 1 the
Snakefile records the run's N devices (`run_gpu_slots`: the first N entries of CUDA_VISIBLE_DEVICES, else
devices 0..N-1) in KNOBSWEEP_GPU_SLOTS; each GPU job takes a free one (`gpu_slot`: an flock per device, held
until the job ends) and sets CUDA_VISIBLE_DEVICES to it before anything touches the GPU. Its model worker is
then that device's worker (the worker's key includes CUDA_VISIBLE_DEVICES): one model load per GPU for the
whole run, and every cell alone on its GPU. Snakemake never runs more than N GPU jobs at once, so a job finds
a free device at once (or within moments, while the previous holder exits).

A job the SLURM executor submits (its own allocation, `worker.job_has_own_allocation`) uses the GPU SLURM gave
it, untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from knobsweep import worker

log = logging.getLogger(__name__)

GPU_SLOTS_VARIABLE = "KNOBSWEEP_GPU_SLOTS"
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"  # also honoured by ROCm builds of torch
WAIT_NOTICE_S = 10.0


def run_gpu_slots(gpus: int | None, visible_devices: str | None) -> list[str]:
    """The devices a run with `--resources gpu=<gpus>` spreads its GPU jobs over, as CUDA_VISIBLE_DEVICES
    entries: none for fewer than two GPUs (every job uses the device the config names); the first `gpus`
    entries of `visible_devices` (as SLURM sets it for an allocation with GPUs) when it is set; else 0..gpus-1."""
    if gpus is None or gpus < 2:
        return []
    if visible_devices is None:
        return [str(i) for i in range(gpus)]
    devices = [d.strip() for d in visible_devices.split(",") if d.strip()]
    if len(devices) < gpus:
        raise ValueError(
            f"--resources gpu={gpus} asks for {gpus} GPU jobs at once, but {VISIBLE_DEVICES}="
            f"{visible_devices!r} lists {len(devices)} device(s): lower gpu= to at most {len(devices)}"
        )
    return devices[:gpus]


def check_device_for_slots(slots: list[str], device: str) -> None:
    """With slots each GPU job sees one device, its own: the config must name that one (cuda or cuda:0), or the
    CPU (where the slots only decide which worker serves a job)."""
    if slots and device not in ("cuda", "cuda:0", "cpu"):
        raise ValueError(
            f"model.device: {device!r} with --resources gpu={len(slots)}: each GPU job sees only the GPU it "
            "holds, as cuda:0; set model.device to 'cuda' (or run with --resources gpu=1)"
        )


@contextlib.contextmanager
def gpu_slot(lock_dir: Path | None = None) -> Iterator[str | None]:
    """Hold one of the run's GPUs (KNOBSWEEP_GPU_SLOTS) while the block runs, with CUDA_VISIBLE_DEVICES set
    to it (restored after); yields the device, or None (and changes nothing) when the run has no slots or
    this job has an allocation of its own."""
    slots = [s for s in os.environ.get(GPU_SLOTS_VARIABLE, "").split(",") if s]
    if not slots or worker.job_has_own_allocation():
        yield None
        return
    lock_dir = lock_dir or worker.private_dir()
    run = worker.short_hash(str(Path.cwd().resolve()))  # the run's working directory: its own slots
    waited_since = time.monotonic()
    noticed = False
    while True:
        for index, device in enumerate(slots):
            handle = open(lock_dir / f"{run}.gpu{index}.lock", "a")  # noqa: SIM115 - held across the yield
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            previous = os.environ.get(VISIBLE_DEVICES)
            os.environ[VISIBLE_DEVICES] = device
            log.info("GPU %s of %s (%s=%s)", index, len(slots), VISIBLE_DEVICES, device)
            try:
                yield device
            finally:
                if previous is None:
                    os.environ.pop(VISIBLE_DEVICES, None)
                else:
                    os.environ[VISIBLE_DEVICES] = previous
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if not noticed and time.monotonic() - waited_since > WAIT_NOTICE_S:
            # Only when more GPU jobs run than the run has slots (another tool or run in this directory).
            log.warning("all %d GPUs of the run are held by other jobs; waiting for one", len(slots))
            noticed = True
        time.sleep(0.1)
