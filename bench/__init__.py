"""Latency benchmark of the real-size model with random weights (see bench/README.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def keeps_torch_state(main: Callable[..., Any]) -> Callable[..., Any]:
    """Restore the caller's grad mode and thread count after `main`: the tests call the benchmarks in-process,
    and a benchmark turns gradients off and may pin threads."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        import torch

        grad_enabled, threads = torch.is_grad_enabled(), torch.get_num_threads()
        try:
            return main(*args, **kwargs)
        finally:
            torch.set_grad_enabled(grad_enabled)
            torch.set_num_threads(threads)

    return wrapped
