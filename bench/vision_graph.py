"""Qwen3-VL-30B-A3B's vision encoder, launched from Python as loaded vs replayed from the graph paths'
`VisionGraph` (`knobsweep.models.fast_path`), per vision-token budget.

The encoder alone (27 blocks, DeepStack mergers; ~0.6 B parameters) is built from bench/model.py's transcribed
config with random bf16 weights on the device. For each budget the image grid is the one `token_grid` gives a
640x480 image (288 -> 15x19 = 285 tokens, 576 -> 21x27 = 567, 1008 -> 28x36, 1872 -> 39x48), with random pixels.
Per grid: the forward as loaded (`visual(pixels, grid_thw=grid)`, what the plain paths run), then a VisionGraph
built (constants + capture; its seconds and memory), then its `forward` (pixel copy + replay + output object, what
the graph paths run inside the vision stage). Each repetition starts on an idle device (synchronised), as a
request's vision stage does after preprocessing, and is timed with CUDA events; `host_ms` is the time Python took
to return from the call (for the forward as loaded: issuing its kernels), which exceeds the device time where the
encoder is launch-bound. Checks in the same run: each graph's outputs against the forward as loaded on the same
pixels (bit-identical expected), and once more with the grids' graphs replayed in alternation (they share one
memory pool).

GPU (~1 min; prints a table, writes JSON):
    PYTHONUNBUFFERED=1 PYTHONPATH=workflow_scripts python -m bench.vision_graph --out $OUT/vision_graph.json
CPU smoke test (tiny config; no graphs there: the VisionGraph runs its forward un-graphed, wall-clock timing):
    PYTHONPATH=workflow_scripts python -m bench.vision_graph --device cpu --tiny --reps 2 --out /tmp/vg.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import keeps_torch_state, run_header, save_json
from bench.model import make_config

TOKENS = (288, 576, 1008, 1872)
IMAGE_SIZE = (640, 480)


def build_vision(tiny: bool, device: str, dtype: torch.dtype) -> nn.Module:
    """The vision encoder alone, random weights, constructed on `device` in `dtype` (sdpa attention, as loaded)."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    config = make_config(tiny=tiny).vision_config
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            visual = Qwen3VLMoeVisionModel(config)
    finally:
        torch.set_default_dtype(previous)
    rope = visual.rotary_pos_emb  # fp32 inverse frequencies, as from_pretrained keeps them
    rope.inv_freq = rope.inv_freq.float()
    return visual.eval().requires_grad_(False)


def grid_for(vision_tokens: int) -> tuple[int, int]:
    """(rows, cols) of merged tokens the adapter gives a 640x480 image at this budget."""
    from knobsweep.models.base import token_grid

    return token_grid(*IMAGE_SIZE, vision_tokens)


def inputs_for(visual: nn.Module, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixels (patches x C*T*P*P, in the encoder's dtype) and the image_grid_thw of one image."""
    config = visual.config
    merge = config.spatial_merge_size
    device = next(visual.parameters()).device
    grid = torch.tensor([[1, rows * merge, cols * merge]], device=device)
    patches = rows * cols * merge * merge
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(patches, width, generator=generator).to(device=device, dtype=visual.dtype)
    return pixels, grid


def timed(call: Callable[[], Any], device: str, reps: int, warmup: int) -> dict:
    """Device ms (CUDA events; on CPU wall clock) and host ms of `call`, each repetition from an idle device."""
    cuda = device == "cuda"
    device_ms, host_ms = [], []
    for i in range(warmup + reps):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        call()
        host = (time.perf_counter() - t0) * 1e3
        if cuda:
            end.record()
            end.synchronize()
        if i >= warmup:
            host_ms.append(host)
            device_ms.append(start.elapsed_time(end) if cuda else host)
    return {**summary(device_ms), "host_median_ms": statistics.median(host_ms), "samples_ms": device_ms}


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {
        "median_ms": statistics.median(ordered),
        "p95_ms": p95,
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
        "mean_ms": statistics.fmean(ordered),
    }


def tensors(out: Any) -> list[torch.Tensor]:
    """The output's tensors in field order (lists flattened)."""
    flat = []
    for value in out.values():
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return flat


def compare(got: Any, expected: Any) -> dict:
    """Bit-identical?, and the largest absolute difference over all output tensors."""
    pairs = list(zip(tensors(got), tensors(expected), strict=True))
    exact = all(a.shape == b.shape and torch.equal(a, b) for a, b in pairs)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
    return {"exact": exact, "max_abs_diff": diff, "fields": list(expected.keys())}


def measure_grid(visual: nn.Module, vision_tokens: int, args, pool: Any, seed: int) -> tuple[dict, Any]:
    from knobsweep.models.fast_path import VisionGraph

    cuda = args.device == "cuda"
    rows, cols = grid_for(vision_tokens)
    pixels, grid = inputs_for(visual, rows, cols, seed)
    row = {
        "vision_tokens_budget": vision_tokens,
        "vision_tokens": rows * cols,
        "grid_thw": grid.tolist()[0],
        "patches": int(pixels.shape[0]),
    }
    row["plain"] = timed(lambda: visual(pixels, grid_thw=grid), args.device, args.reps, args.warmup)
    expected = visual(pixels, grid_thw=grid)

    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    t0 = time.perf_counter()
    graph = VisionGraph(visual, grid, pixels, graphed=cuda, pool=pool)
    row["build_s"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        # allocated: the graph's buffers, outputs and constants; reserved: also the pool's intermediates
        row["graph_memory_mb"] = (torch.cuda.memory_allocated() - before[0]) / 2**20
        row["graph_reserved_mb"] = (torch.cuda.memory_reserved() - before[1]) / 2**20
    row["relative_error"] = graph.verify(pixels, grid)
    graph.expected_grid = grid
    row["graph"] = timed(lambda: graph.forward(pixels, grid), args.device, args.reps, args.warmup)
    row["agreement"] = compare(graph.forward(pixels, grid), expected)
    row["speedup_median"] = row["plain"]["median_ms"] / row["graph"]["median_ms"]
    return row, (graph, pixels, grid, expected)


def print_table(result: dict) -> None:
    print(
        f"\n{'budget':>6} {'tokens':>6} {'grid':>12} | {'plain med':>9} {'p95':>7} {'host':>7} | "
        f"{'graph med':>9} {'p95':>7} {'host':>6} | {'speedup':>7} {'exact':>5} {'build s':>7} {'MB':>6}"
    )
    for r in result["grids"]:
        p, g = r["plain"], r["graph"]
        grid = "x".join(str(v) for v in r["grid_thw"])
        print(
            f"{r['vision_tokens_budget']:>6} {r['vision_tokens']:>6} {grid:>12} | {p['median_ms']:>9.2f} "
            f"{p['p95_ms']:>7.2f} {p['host_median_ms']:>7.2f} | {g['median_ms']:>9.2f} {g['p95_ms']:>7.2f} "
            f"{g['host_median_ms']:>6.2f} | {r['speedup_median']:>6.1f}x {r['agreement']['exact']!s:>5} "
            f"{r['build_s']:>7.2f} {r.get('graph_memory_mb', float('nan')):>6.0f}"
        )
    if "alternation" in result:
        print(
            f"alternation (graphs replayed in turn, against the forward as loaded): {result['alternation']}"
        )
    for error in result["errors"]:
        print("ERROR:", error.splitlines()[0])


@keeps_torch_state
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / "vision_graph.json"
    )
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="bench's tiny config (CPU smoke test of this script)")
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    from knobsweep.models import fast_path

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    if args.device == "cpu":
        torch.set_num_threads(1)
    result: dict = {**run_header("bench/vision_graph.py", args.device), "args": vars(args), "grids": []}
    start = time.monotonic()
    with torch.inference_mode():
        visual = build_vision(args.tiny, args.device, torch.float32 if args.tiny else torch.bfloat16)
        result["encoder"] = {
            "params": sum(p_.numel() for p_ in visual.parameters()),
            "dtype": str(visual.dtype),
            "attn_implementation": visual.config._attn_implementation,
            "support": fast_path.vision_graph_support(visual) or "ok",
        }
        pool = torch.cuda.graph_pool_handle() if args.device == "cuda" else None
        kept = []
        for seed, vision_tokens in enumerate(args.tokens):
            try:
                row, state = measure_grid(visual, vision_tokens, args, pool, seed)
                result["grids"].append(row)
                kept.append(state)
            except Exception as e:  # noqa: BLE001 - one grid's failure is recorded, the others still run
                result["errors"].append(
                    f"{vision_tokens}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
                )
            save_json(result, args.out)
        try:
            checks = []
            for _ in range(2):
                for graph, pixels, grid, expected in kept:
                    graph.expected_grid = grid
                    checks.append(compare(graph.forward(pixels, grid), expected)["exact"])
            result["alternation"] = {"replays": len(checks), "all_exact": all(checks)}
        except Exception as e:  # noqa: BLE001
            result["errors"].append(f"alternation: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
    result["elapsed_s"] = time.monotonic() - start
    save_json(result, args.out)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
