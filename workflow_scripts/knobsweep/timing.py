"""Stage timers: CUDA events on a CUDA device, a monotonic clock otherwise.

A `StageTimer` records named marks on one timeline and reports the milliseconds between two marks.
On CUDA a mark is a `torch.cuda.Event` recorded on the current stream, so a stage is charged the device
time between its marks (kernels launched earlier but still running are charged to the stage they belong
to); reading a duration synchronises on the later event. On CPU a mark is `time.perf_counter()`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Named marks on one timeline (CUDA events when `device` is CUDA, else the monotonic clock)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.uses_cuda_events = self.device.type == "cuda"
        self._marks: dict[str, torch.cuda.Event | float] = {}

    def mark(self, name: str) -> None:
        """Record the mark `name` now (on the current CUDA stream, or on the host clock)."""
        if self.uses_cuda_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks[name] = event
        else:
            self._marks[name] = time.perf_counter()

    def _get(self, name: str) -> torch.cuda.Event | float:
        if name not in self._marks:
            raise KeyError(f"StageTimer: no mark named {name!r}; marks: {sorted(self._marks)}")
        return self._marks[name]

    def wait(self, name: str) -> None:
        """Block the host until the device has reached mark `name` (on the CPU it has already)."""
        mark = self._get(name)
        if self.uses_cuda_events:
            mark.synchronize()

    def has(self, name: str) -> bool:
        return name in self._marks

    def elapsed_ms(self, start: str, end: str) -> float:
        """Milliseconds from mark `start` to mark `end` (waits for `end` on CUDA)."""
        first, last = self._get(start), self._get(end)
        if self.uses_cuda_events:
            last.synchronize()
            return float(first.elapsed_time(last))
        return (last - first) * 1000.0


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on `device` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def host_stage(device: torch.device | str, into: dict[str, float], name: str) -> Iterator[None]:
    """Time host work (e.g. preprocessing) with the monotonic clock; waits for the device at both ends so the
    stage holds neither earlier device work nor device work it launched (such as host-to-device copies)."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        into[name] = (time.perf_counter() - start) * 1000.0


# ~2,000 multiply-adds of Python ints: 80-150 us on the hosts measured here, small beside any request.
_HOST_PROBE_ITEMS = tuple(range(2_000))


def host_probe_us() -> float:
    """Microseconds this host takes for a fixed pure-Python workload: how fast the host runs Python right now.
    A cell times it before each request (outside the request's clock). The host-bound part of a request
    (preprocessing, launches, Python between decode steps) slows with the host; on the cloud machines measured
    here the host switched between two speeds ~2x apart within minutes, so a cell's median probe says whether
    it was measured while the host ran slow (`aggregate` flags such cells)."""
    start = time.perf_counter()
    sum(x * 3 for x in _HOST_PROBE_ITEMS)
    return (time.perf_counter() - start) * 1e6
