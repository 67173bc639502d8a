"""The preprocess stage of a request, part by part, measured twice (issue 8: the same cell twice within 3 %).

Whole requests repeat worst in their host stages: between two passes of one cell on an H100 host the preprocess
stage (resize the image to the token budget, render the prompt, run the processor, check the token count, copy
to the device) moved from 63 to 39 ms median while prefill and decode stayed within 2 %. This script times that
stage as `ModelAdapter.generate_batch` does (host clock, the device synchronised at both ends) and each of its
parts, `--n` times per vision-token budget, in two passes, for three ways of preprocessing:

- `host_resize`: `resize_for_tokens` (PIL bicubic resize on the host), then the processor, which on CUDA does
  its tensor work on the device (the adapter's way before session 9);
- `device_resize`: `resize_on_device` (the decoded image copied to the device as uint8 and resized there with
  torchvision's bicubic+antialias resize, as transformers' image processors resize on a device), then the
  processor on that tensor (sessions 9-14);
- `token_ids`: the device resize, then the image processor and the prompt's placeholder expanded on token ids
  (`ModelAdapter.run_processor`, `models/image_tokens.py`), no longer in the text: what `prepare_inputs` does now.

It also records how far the two resizes' pixels are apart. The model is irrelevant here (the bench-tiny
Qwen3-VL-MoE with the tiny processor: patch 16, merge 2, 32 pixels per token, like the real model). Per part:
median, P95 and the pass-to-pass difference of both. `--profile`: one pass of `--profile-how` (default
`token_ids`) under cProfile, the functions that took >= 1 % of it (`bench.cell_overhead.profile_rows`).

    PYTHONPATH=workflow_scripts python -m bench.preprocess --n 100 --out bench/results/<card>_<date>_preprocess.json
    PYTHONPATH=workflow_scripts python -m bench.preprocess --device cpu --n 3 --out /tmp/pre.json   # smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from knobsweep.timing import synchronize

from bench import keeps_torch_state, run_header, save_json
from bench.cell_overhead import profile_rows
from bench.fast_path_check import build_adapter, image

VISION_TOKENS = (1872, 576, 288)
# COCO val2014's commonest sizes (landscape, portrait, the 640x427 crop).
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427))
PROMPT = "What is the man holding? Answer the question using a single word or phrase."
# Ways of preprocessing, each what the adapter did at some point: PIL resize then the processor; resize on the
# device then the processor; resize on the device then the placeholders expanded on token ids (now).
HOW = ("host_resize", "device_resize", "token_ids")


def one_request(adapter, img, vision_tokens: int, how: str) -> dict[str, float]:
    """ms per part of one request's preprocess stage, and `stage`: all of it, timed as generate_batch does."""
    device = adapter.device
    parts: dict[str, float] = {}

    def mark(name: str, start: float) -> float:
        synchronize(device)
        now = time.perf_counter()
        parts[name] = (now - start) * 1000.0
        return now

    synchronize(device)
    t0 = t = time.perf_counter()
    if how == "host_resize":
        resized = adapter.resize_for_tokens(img, vision_tokens)
    else:
        resized = adapter.resize_on_device(img, vision_tokens)
    t = mark("resize", t)
    text = adapter.chat_prompt(PROMPT)
    t = mark("prompt", t)
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    tokenizer.padding_side = "left"
    if how == "token_ids":  # checked against the processor at this budget in the warm-up
        inputs = adapter.run_processor([resized], [text], adapter.image_processor_kwargs(), vision_tokens)
    else:
        inputs = adapter.processor(
            images=[resized],
            text=[text],
            return_tensors="pt",
            padding=True,
            images_kwargs=adapter.image_processor_kwargs(),
        )
    t = mark("processor", t)
    adapter.check_counts([img], inputs, vision_tokens)
    adapter.vision_tokens_of(inputs)
    adapter.move_inputs(inputs)
    t = mark("checks_and_copy", t)
    adapter.prompt_positions(inputs).to(device, non_blocking=True)
    mark("positions", t)
    parts["stage"] = (time.perf_counter() - t0) * 1000.0
    return parts


def summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean())}


def pixel_difference(adapter, img, vision_tokens: int) -> dict[str, float]:
    host = np.asarray(adapter.resize_for_tokens(img, vision_tokens)).astype(int)
    on_device = adapter.resize_on_device(img, vision_tokens).permute(1, 2, 0).cpu().numpy().astype(int)
    diff = np.abs(host - on_device)
    return {"max_abs": int(diff.max()), "fraction_differing": float((diff > 0).mean())}


@keeps_torch_state
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--n", type=int, default=100, help="requests per budget, pass and way of resizing")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--vision-tokens", type=int, nargs="+", default=list(VISION_TOKENS))
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-how", choices=HOW, default="token_ids")
    p.add_argument("--out", type=Path, default=Path("preprocess.json"))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    result = {**run_header("bench.preprocess", args.device), "n": args.n, "rows": []}
    with tempfile.TemporaryDirectory() as work:
        adapter = build_adapter(True, args.device, Path(work))
    images = [image(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SIZES)]
    result["pixels_per_token"] = adapter.pixels_per_token()
    result["image_processor"] = type(adapter.processor.image_processor).__name__
    result["pixel_difference"] = {
        str(vt): [pixel_difference(adapter, img, vt) for img in images] for vt in args.vision_tokens
    }
    for how in HOW:
        for img in images:
            for vt in args.vision_tokens:
                for _ in range(args.warmup):
                    one_request(adapter, img, vt, how)
    for pass_index in (1, 2):
        for how in HOW:
            for vt in args.vision_tokens:
                samples = [one_request(adapter, images[i % len(images)], vt, how) for i in range(args.n)]
                row = {"pass": pass_index, "how": how, "vision_tokens": vt}
                for part in samples[0]:
                    row[part] = summary([s[part] for s in samples])
                result["rows"].append(row)
                print(
                    f"pass {pass_index} {how:13s} vt{vt:<5d} stage median {row['stage']['median']:6.2f} "
                    f"p95 {row['stage']['p95']:6.2f} ms | "
                    + " ".join(f"{k} {row[k]['median']:.2f}" for k in samples[0] if k != "stage"),
                    flush=True,
                )
    result["token_ids_preprocess_mode"] = adapter.preprocess_mode()  # the expansion, unless it differed
    stage = {(r["pass"], r["how"], r["vision_tokens"]): r["stage"] for r in result["rows"]}
    result["repeatability"] = [
        {
            "how": how,
            "vision_tokens": vt,
            **{
                f"{stat}_pass_difference": abs(stage[2, how, vt][stat] - stage[1, how, vt][stat])
                / stage[1, how, vt][stat]
                for stat in ("median", "p95")
            },
        }
        for how in HOW
        for vt in args.vision_tokens
    ]
    if args.profile:
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        for i in range(args.n):
            one_request(adapter, images[i % len(images)], args.vision_tokens[0], args.profile_how)
        profile.disable()
        total = time.perf_counter() - start
        result["profile"] = {"total_s": total, "rows": profile_rows(profile, total)}
        for r in result["profile"]["rows"]:
            print(f"  {r['cumulative_s']:7.3f} s {r['calls']:6d}  {r['function']}")
    save_json(result, args.out)
    print(json.dumps(result["repeatability"], indent=1))
    return result


if __name__ == "__main__":
    main()
