"""Where a warm request makes the host wait for the GPU: every synchronising CUDA call of one request, with the
Python stack that made it (issue 8: a host that waits for the GPU inside a timed stage leaves the GPU idle and
puts the host's speed into the measured latency).

On the real-size Qwen3-VL-30B-A3B with random bf16 weights behind the knob engine's adapter
(`bench.fast_path_check.build_adapter`, path `--inference-path`, default `auto`), per setting and workload: three
warm requests, then one under `torch.cuda.set_sync_debug_mode("warn")`, whose warnings are collected with their
stacks (`capture_syncs`). torch's debug mode sees the calls that drain the device (`.item()`, `.tolist()`, a copy
to pageable host memory, `torch.cuda.synchronize`), not `Event.synchronize()` or waits inside libraries.

Session 12 found 19 + one per decode step; session 13's count is 3 (bench/README.md). ~1.5 min on an H200:
    PYTHONUNBUFFERED=1 PYTHONPATH=workflow_scripts python -m bench.request_syncs --out $OUT/request_syncs.json
On the CPU (tiny model) the requests run and nothing is counted (the debug mode is CUDA's):
    PYTHONPATH=workflow_scripts python -m bench.request_syncs --tiny --device cpu --out /tmp/syncs.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bench import keeps_torch_state, run_header, save_json
from bench.cell_overhead import QA_MAX_NEW_TOKENS, _prompts, parse_setting
from bench.fast_path_check import build_adapter, image, kept

SETTINGS = ("vt288_k1_b16", "vt1872_k8_b48")
TINY_SETTINGS = ("vt36_k8_b4",)  # bench's tiny model: 6 blocks, a small image budget
CAPTION_MAX_NEW_TOKENS = 48
# Stack frames kept per synchronising call, innermost first: enough to reach the project's code from torch's.
STACK_DEPTH = 7


def _frame_name(frame: traceback.FrameSummary) -> str:
    """file:line:function, the file relative to site-packages or the repository."""
    name = frame.filename.split("site-packages/")[-1]
    for root in ("workflow_scripts/", "bench/", "tests/"):
        if f"/{root}" in name:
            name = root + name.split(f"/{root}", 1)[1]
    return f"{name}:{frame.lineno}:{frame.name}"


@contextmanager
def capture_syncs() -> Iterator[collections.Counter]:
    """Count the synchronisation warnings raised inside the block, by the stack that raised them (innermost
    frame first, " <- " between frames). On CUDA it turns torch's sync debug mode on for the block."""
    stacks: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        stacks[" <- ".join(_frame_name(f) for f in reversed(frames[-STACK_DEPTH:]))] += 1

    cuda = torch.cuda.is_available()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield stacks
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")


@keeps_torch_state
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.request_syncs", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="bench's tiny config (CPU smoke test of this script)")
    p.add_argument("--settings", nargs="+", default=None, help=f"default {' '.join(SETTINGS)}")
    p.add_argument("--inference-path", default="auto")
    p.add_argument("--out", type=Path, default=Path("request_syncs.json"))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    result = {**run_header("bench.request_syncs", args.device), "counted": args.device == "cuda", "rows": []}
    with tempfile.TemporaryDirectory() as work:
        adapter = build_adapter(args.tiny, args.device, Path(work))
    result["inference_path"] = adapter.set_inference_path(args.inference_path)
    img, prompts = image(640, 480, seed=1), _prompts()
    for name in args.settings or (TINY_SETTINGS if args.tiny else SETTINGS):
        setting = parse_setting(name)
        adapter.configure(
            top_k=setting["top_k"], active_blocks=kept(adapter.num_blocks, setting["active_blocks"])
        )
        for kind, max_new in (("qa", QA_MAX_NEW_TOKENS), ("captioning", CAPTION_MAX_NEW_TOKENS)):
            request = functools.partial(
                adapter.generate,
                img,
                prompts[kind],
                vision_tokens=setting["vision_tokens"],
                max_new_tokens=max_new,
            )
            for _ in range(3):  # decoders built, graphs captured, kernels compiled
                request()
            with capture_syncs() as stacks:
                out = request()
            row = {
                "setting": name,
                "kind": kind,
                "output_tokens": out.output_tokens,
                "syncs": sum(stacks.values()) if result["counted"] else None,
                "stacks": stacks.most_common(),
            }
            result["rows"].append(row)
            print(f"{name:16s} {kind:10s} {out.output_tokens:3d} tokens: {row['syncs']} synchronising calls")
            for stack, count in row["stacks"]:
                print(f"    {count} x {stack}")
            save_json(result, args.out)
    adapter.reset()
    return result


if __name__ == "__main__":
    main()
