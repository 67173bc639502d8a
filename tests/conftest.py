"""Shared fixtures: offline Hugging Face, one CPU thread, tiny random checkpoints built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The SLURM executor plugin runs `scontrol show config` whenever Snakemake starts. Where SLURM's client is
# installed but no controller answers (here and on CI once tests/test_slurm.py has stopped its own), that
# call waits ~9 s for its timeout, in each of the ~60 Snakemake runs of the local tests. Those tests see an
# `scontrol` that fails at once; tests/test_slurm.py takes this directory off PATH for its own tests.
SLURM_SHIM_DIR = tempfile.mkdtemp(prefix="knobsweep-no-slurm-")
Path(SLURM_SHIM_DIR, "scontrol").write_text("#!/bin/sh\nexit 1\n")
Path(SLURM_SHIM_DIR, "scontrol").chmod(0o755)
os.environ["PATH"] = SLURM_SHIM_DIR + os.pathsep + os.environ.get("PATH", "")
atexit.register(shutil.rmtree, SLURM_SHIM_DIR, ignore_errors=True)

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

# Device of the shared adapters: CPU here; set KNOBSWEEP_TEST_DEVICE=cuda to run the same tests on a GPU.
TEST_DEVICE = os.environ.get("KNOBSWEEP_TEST_DEVICE", "cpu")
# Families the knob-engine tests run on (each built as a tiny random checkpoint with 6 blocks).
TINY_FAMILIES = ("qwen3_vl_moe", "qwen3_5_moe", "internvl", "ernie4_5_vl_moe")


def run_in_triton_interpreter(script: str, *args: object, timeout: int = 300) -> None:
    """Run `script` (`python -c`, `args` as sys.argv[1:]) in a subprocess with Triton's CPU interpreter on
    (TRITON_INTERPRET must be set before Triton is imported); fail with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """family -> path of a tiny 6-block checkpoint, built lazily once per session."""
    from knobsweep.models.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    built: dict = {}

    class Paths(dict):
        def __missing__(self, family):
            self[family] = build_tiny_checkpoint(root / family, family=family, seed=0, num_blocks=6)
            return self[family]

    return Paths(built)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_checkpoints) -> dict:
    """family -> loaded float32 adapter on TEST_DEVICE (reset after every test)."""
    from knobsweep.models import load_model

    class Adapters(dict):
        def __missing__(self, family):
            self[family] = load_model(tiny_checkpoints[family], device=TEST_DEVICE, dtype="float32")
            return self[family]

    return Adapters()


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random image with some structure (blocks of colour plus noise)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    base = np.kron(blocks, np.ones((height // 4 + 1, width // 4 + 1, 1), dtype=np.uint8))[:height, :width]
    noise = rng.integers(-30, 30, size=base.shape)
    return Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(autouse=True)
def _reset_shared_adapters(request):
    """Put every shared adapter back to its defaults after each test, so a failing test cannot leak knobs."""
    yield
    if "tiny_adapters" in request.fixturenames:
        for adapter in request.getfixturevalue("tiny_adapters").values():
            adapter.reset()
