"""Programmatic dependent launch (PDL) of the decode step's Triton kernels, an option measured by the benchmark.

A decode step of the real model is ~400 small kernels; between two of them the GPU idles while the next grid is
launched and ramps up. With PDL (Hopper and later) a kernel launched with `launch_pdl=True` may start while the
kernel before it still runs: each of these kernels first lets its successor launch (`gdc_launch_dependents`),
then waits until its predecessor has finished and its writes are visible (`gdc_wait`), and only then touches
memory, so the arithmetic and every ordering between the kernels stay as without PDL. CUDA graphs keep the
dependency (a programmatic edge). `ENABLED` switches it on; `bench/latency.py` measures it
(`fused_regional_graph_pdl`).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs may lack Triton
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - a Triton without grid dependency control
    gdc_wait = gdc_launch_dependents = None

ENABLED = True  # measured faster (bench/README.md); the benchmark's comparison paths switch it off

if triton is not None:

    @triton.jit
    def wait_for_previous_kernel(PDL: tl.constexpr):
        # First statement of a kernel that may be launched with PDL: let the next kernel launch, wait for the
        # previous one (compiled only where PDL is set).
        if PDL:
            gdc_launch_dependents()
            gdc_wait()


def use(x: torch.Tensor) -> bool:
    """Whether kernels working on x launch with PDL: `ENABLED`, Triton's grid dependency control present, x on a
    CUDA device of compute capability 9.0 or more."""
    return (
        ENABLED and gdc_wait is not None and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    )
