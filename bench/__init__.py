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


def run_header(script: str, device: str) -> dict[str, Any]:
    """The start of a benchmark's JSON: script, date, card and library versions (errors recorded, not raised)."""
    import sys
    from datetime import UTC, datetime

    import torch

    header: dict[str, Any] = {
        "script": script,
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "errors": [],
    }
    try:
        import transformers

        header["versions"]["transformers"] = transformers.__version__
        if device == "cuda":
            import triton

            header["versions"]["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - a missing version is worth a line, not a failed run
        header["errors"].append(f"versions: {type(e).__name__}: {e}")
    return header


def save_json(result: dict[str, Any], path: Any) -> None:
    """Write a benchmark's JSON atomically (rewritten after every part, so a failing part loses nothing)."""
    import json

    from knobsweep.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str))
