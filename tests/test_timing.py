"""Stage timers on the monotonic clock (CUDA events are exercised on the GPU machine)."""

from __future__ import annotations

import time

import pytest
from knobsweep.timing import StageTimer, host_stage


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
