"""Stage timers on the monotonic clock (CUDA events are exercised on the GPU machine)."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import TEST_DEVICE
from knobsweep.timing import StageTimer, host_probe_us, host_stage


def test_stage_timer_measures_between_marks():
    timer = StageTimer("cpu")
    assert not timer.uses_cuda_events
    timer.mark("a")
    time.sleep(0.02)
    timer.mark("b")
    time.sleep(0.01)
    timer.mark("c")
    ab, bc, ac = timer.elapsed_ms("a", "b"), timer.elapsed_ms("b", "c"), timer.elapsed_ms("a", "c")
    assert 15 <= ab <= 500 and 5 <= bc <= 500
    assert ac == pytest.approx(ab + bc)
    with pytest.raises(KeyError, match="no mark named 'z'"):
        timer.elapsed_ms("a", "z")


def test_host_stage_records_milliseconds():
    out: dict[str, float] = {}
    with host_stage("cpu", out, "preprocess"):
        time.sleep(0.01)
    assert 5 <= out["preprocess"] <= 500


def test_wait_returns_once_the_device_has_reached_the_mark():
    timer = StageTimer(TEST_DEVICE)
    x = torch.randn(1024, 1024, device=TEST_DEVICE)
    for _ in range(20):  # queued device work before the mark
        x = x @ x / 32
    timer.mark("after")
    timer.wait("after")
    if timer.uses_cuda_events:
        assert timer._marks["after"].query()
    with pytest.raises(KeyError, match="no mark named 'z'; marks: \\['after'\\]"):
        timer.wait("z")


def test_host_probe_measures_how_fast_the_host_runs_python():
    # A profile hook on every Python call slows the interpreter (as a slow host does); the probe must see it.
    import statistics
    import sys

    normal = statistics.median(host_probe_us() for _ in range(30))
    sys.setprofile(lambda frame, event, arg: sum(range(20)))
    try:
        slowed = statistics.median(host_probe_us() for _ in range(30))
    finally:
        sys.setprofile(None)
    assert 0 < normal < 5_000
    assert slowed > 3 * normal
