"""GPU check of the knob engine's inference paths (`knobsweep.models.fast_path`), for the lead's H100 run.

Three parts, each in its own try block; the JSON is rewritten after every part, so one failing part loses
nothing of the others (run in the order 2, 3, 1: the real-size numbers first, then the tests in what is left of
`--total-budget-s`):

1. tests: tests/test_fast_path.py and the knob-engine tests (tests/test_models_*.py) with
   KNOBSWEEP_TEST_DEVICE=cuda, in a subprocess with a time limit (pass/fail counts and the output's tail).
2. agreement: on the real-size Qwen3-VL-30B-A3B with random bf16 weights (bench/model.py), driven through the
   adapter (processor, chat template, greedy loop), greedy tokens of the plain path (`eager`) and of every other
   path over `--agree-steps` tokens at a few knob settings; where they part, the step, the plain path's
   top-1/top-2 logit margin there and the logit difference (bf16 summation order vs a real kernel error).
3. timing: per knob setting and path, `adapter.generate` after warm-up (which captures the graphs), stage
   timings from the adapter's own CUDA events: decode ms per step (= decode / (output_tokens - 1)), prefill,
   vision, ttft, total; medians over `--reps`.

The model's processor is a tiny checkpoint's (word-level tokenizer, Qwen3-VL image processor); the random
model is given that tokenizer's special-token ids, so real images and prompts go through the real code path.

Run on the GPU (~5-7 min; writes $OUT/fast_path_check.json and prints tables):
    PYTHONUNBUFFERED=1 PYTHONPATH=workflow_scripts python -m bench.fast_path_check
CPU smoke test of the script (tiny model, no tests part, seconds):
    PYTHONPATH=workflow_scripts python -m bench.fast_path_check --tiny --device cpu --skip-tests --out /tmp/fpc.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import keeps_torch_state, run_header, save_json

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = [
    "tests/test_fast_path.py",
    "tests/test_models_generate.py",
    "tests/test_models_knobs.py",
    "tests/test_models_vision_tokens.py",
    "tests/test_models_loading.py",
]
PROMPT = "Describe the image in detail and answer what objects are there."


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.kron(blocks, np.ones((height // 6 + 1, width // 8 + 1, 1), dtype=np.uint8))[:height, :width]
    noise = rng.integers(-20, 20, size=base.shape)
    return Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ part 1


def run_tests(timeout_s: float, device: str) -> dict:
    env = {**os.environ, "KNOBSWEEP_TEST_DEVICE": device, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "workflow_scripts"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", *TEST_FILES, "-q", "-rfEs", "-p", "no:cacheprovider"]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\nTIMEOUT after {timeout_s} s"
        rc = None
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|xfailed)", output)}
    if not counts:  # timed out: count pytest's progress characters so far
        marks = "".join(re.findall(r"^([.FEsx]+)(?:\s+\[\s*\d+%\])?$", output, flags=re.MULTILINE))
        counts = {"passed_so_far": marks.count("."), "failed_so_far": marks.count("F") + marks.count("E")}
    return {
        "command": " ".join(cmd),
        "returncode": rc,
        "counts": counts,
        "seconds": time.monotonic() - start,
        "output_tail": output[-6000:],
    }


# ------------------------------------------------------------------------------------------------ model


def build_adapter(tiny: bool, device: str, work: Path):
    """The real-size (or bench-tiny) random Qwen3-VL-MoE behind a Qwen3VLMoeAdapter with a tiny processor."""
    from knobsweep.models.qwen3_vl_moe import Qwen3VLMoeAdapter
    from knobsweep.models.tiny import build_tiny_checkpoint
    from transformers import AutoProcessor, GenerationConfig

    from bench.model import build_model, make_config

    small = build_tiny_checkpoint(work / "tiny_processor", family="qwen3_vl_moe", seed=0, num_blocks=2)
    processor = AutoProcessor.from_pretrained(small, local_files_only=True)
    small_config = json.loads((small / "config.json").read_text())
    config = make_config(tiny=tiny)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(config, key, small_config[key])
    config.text_config.vocab_size = max(config.text_config.vocab_size, len(processor.tokenizer))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(config, device, dtype=dtype)
    model.generation_config = GenerationConfig.from_pretrained(small, local_files_only=True)
    return Qwen3VLMoeAdapter(model, processor)


def kept(num_blocks: int, n: int, skip_first: bool = False) -> list[int]:
    from bench.model import kept_blocks

    if not skip_first:
        return kept_blocks(num_blocks, n)
    return [b + 1 for b in kept_blocks(num_blocks - 1, n)]  # block 0 skipped


def fast_paths(device: str) -> list[str]:
    from knobsweep.models.fast_path import triton_available

    if device != "cuda":
        return ["static", "fused"]
    fused = ["fused", "fused_graph", "fused_regional_graph"] if triton_available() else []
    return ["static", "static_graph", *fused]


# ------------------------------------------------------------------------------------------------ part 2


def greedy(adapter, path: str, img, vision_tokens: int, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    adapter.set_inference_path(path)
    adapter.logit_log = []
    try:
        result = adapter.generate(img, PROMPT, vision_tokens=vision_tokens, max_new_tokens=steps)
        return result.token_ids, adapter.logit_log
    finally:
        adapter.logit_log = None


def margin(logits: torch.Tensor) -> float:
    top = logits.float().flatten().topk(2).values
    return float(top[0] - top[1])


def compare(ref: tuple, got: tuple) -> dict:
    (ref_tokens, ref_logits), (tokens, logits) = ref, got
    same = next(
        (i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens))
    )
    out: dict = {
        "tokens": tokens,
        "equal_prefix": same,
        "all_equal": tokens == ref_tokens,
        "prefill_logits_equal": bool(torch.equal(logits[0], ref_logits[0])),
    }
    if len(logits) > 1 and len(ref_logits) > 1:
        d = logits[1].float() - ref_logits[1].float()
        out["first_decode_step_logits_rel_diff"] = float(d.norm() / ref_logits[1].float().norm())
        out["first_decode_step_logits_max_abs_diff"] = float(d.abs().max())
    if same < min(len(tokens), len(ref_tokens)):
        r, g = ref_logits[same].flatten().float(), logits[same].flatten().float()
        a, b = ref_tokens[same], tokens[same]
        out["divergence"] = {
            "step": same,
            "plain_token": a,
            "path_token": b,
            "plain_margin_top1_top2": margin(r),
            "plain_logit_gap_between_the_two_tokens": float(r[a] - r[b]),
            "path_logit_gap_between_the_two_tokens": float(g[a] - g[b]),
            "logits_max_abs_diff_at_step": float((g - r).abs().max()),
            "verdict": (
                "near-tie: the plain path's gap is below the logit noise"
                if float(r[a] - r[b]) <= float((g - r).abs().max()) * 2
                else "NOT a near-tie: look for a kernel error"
            ),
        }
    return out


def agreement(adapter, settings: list[dict], paths: list[str], steps: int, img, log) -> list[dict]:
    rows = []
    for s in settings:
        adapter.configure(top_k=s["top_k"], active_blocks=s["kept"])
        entry = {"setting": s["name"], "vision_tokens": s["vision_tokens"], "top_k": s["top_k"], "paths": {}}
        try:
            ref = greedy(adapter, "eager", img, s["vision_tokens"], steps)
            entry["plain_tokens"] = ref[0]
            entry["plain_margins"] = [round(margin(x), 4) for x in ref[1]]
        except Exception as e:  # noqa: BLE001 - reported, the other settings still run
            entry["error"] = f"{type(e).__name__}: {e}"
            rows.append(entry)
            continue
        for path in paths:
            try:
                entry["paths"][path] = compare(ref, greedy(adapter, path, img, s["vision_tokens"], steps))
            except Exception as e:  # noqa: BLE001
                entry["paths"][path] = {
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            finally:
                adapter.set_inference_path("eager")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        log(
            f"agreement {s['name']}: "
            + ", ".join(
                f"{p}: {v.get('equal_prefix', v.get('error'))}/{steps}" for p, v in entry["paths"].items()
            )
        )
        rows.append(entry)
    return rows


# ------------------------------------------------------------------------------------------------ part 3


def timing(adapter, settings: list[dict], paths: list[str], args, img, log, deadline: float) -> list[dict]:
    rows = []
    for s in settings:
        adapter.configure(top_k=s["top_k"], active_blocks=s["kept"])
        for path in ["eager", *paths]:
            if path in ("static", "fused") and adapter.device.type == "cuda":
                continue  # un-graphed static paths are for testing, not for latency
            if time.monotonic() > deadline:
                log(f"budget reached: {s['name']} {path} not timed")
                continue
            row = {
                "setting": s["name"],
                "vision_tokens": s["vision_tokens"],
                "top_k": s["top_k"],
                "active_blocks": len(s["kept"]),
                "path": path,
            }
            try:
                adapter.set_inference_path(path)
                reps = args.eager_reps if path == "eager" else args.reps
                samples = []
                t0 = time.monotonic()
                for i in range(args.warmup + reps):
                    if i == args.warmup:
                        # wall time of the warm-up requests: decoder set-up, graph capture, compilation
                        row["warmup_wall_s"] = time.monotonic() - t0
                    r = adapter.generate(
                        img, PROMPT, vision_tokens=s["vision_tokens"], max_new_tokens=args.new_tokens
                    )
                    if i >= args.warmup:
                        samples.append((r.timings_ms, r.output_tokens))
                steps = [t["decode"] / (n - 1) for t, n in samples if n > 1]
                row.update(
                    {
                        "reps": reps,
                        "output_tokens": [n for _, n in samples],
                        "vision_tokens_actual": r.vision_tokens,
                        "prompt_tokens": r.prompt_tokens,
                        "decode_step_ms_median": statistics.median(steps) if steps else None,
                        "decode_step_ms_all": [round(x, 3) for x in steps],
                        **{
                            f"{stage}_ms_median": statistics.median(t[stage] for t, _ in samples)
                            for stage in ("preprocess", "vision", "prefill", "decode", "ttft", "total")
                        },
                    }
                )
                log(
                    f"timing {s['name']} {path}: decode step {row['decode_step_ms_median']:.2f} ms, "
                    f"prefill {row['prefill_ms_median']:.1f} ms, vision {row['vision_ms_median']:.1f} ms"
                )
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                row["traceback"] = traceback.format_exc()[-3000:]
                log(f"timing {s['name']} {path}: {row['error']}")
            finally:
                adapter.set_inference_path("eager")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def print_tables(result: dict) -> None:
    tests = result.get("tests")
    if tests:
        print(
            f"\ntests: {tests.get('counts')} rc={tests.get('returncode')} in {tests.get('seconds', 0):.0f} s"
        )
    if result.get("agreement"):
        print(
            "\ngreedy agreement with the plain path (equal prefix / steps; divergence margin vs logit noise)"
        )
        for e in result["agreement"]:
            for p, v in e.get("paths", {}).items():
                div = v.get("divergence")
                extra = (
                    f" parts at {div['step']}: plain gap {div['plain_logit_gap_between_the_two_tokens']:.4f}, "
                    f"|dlogit| {div['logits_max_abs_diff_at_step']:.4f} ({div['verdict'][:9]})"
                    if div
                    else ""
                )
                print(f"  {e['setting']:<22} {p:<13} {v.get('equal_prefix', v.get('error'))}{extra}")
    if result.get("timing"):
        print(
            f"\n{'setting':<22} {'path':<13} {'decode/step':>11} {'prefill':>8} {'vision':>7} {'ttft':>8} {'total':>9}"
        )
        for r in result["timing"]:
            if "error" in r or r.get("decode_step_ms_median") is None:
                print(f"{r['setting']:<22} {r['path']:<13} {r.get('error', 'no decode steps')}")
                continue
            print(
                f"{r['setting']:<22} {r['path']:<13} {r['decode_step_ms_median']:11.2f} {r['prefill_ms_median']:8.1f} "
                f"{r['vision_ms_median']:7.1f} {r['ttft_ms_median']:8.1f} {r['total_ms_median']:9.1f}"
            )


@keeps_torch_state
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / "fast_path_check.json"
    )
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="bench's tiny config (CPU smoke test of this script)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--tests-timeout-s", type=float, default=240.0)
    p.add_argument(
        "--total-budget-s",
        type=float,
        default=470.0,
        help="the tests (run last) get what is left of this, at least 60 s",
    )
    p.add_argument(
        "--budget-s", type=float, default=300.0, help="stop starting timings after this many seconds"
    )
    p.add_argument("--agree-steps", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per timed request")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--eager-reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)

    result: dict = {
        **run_header("bench/fast_path_check.py", args.device),
    }

    def save() -> None:
        result["elapsed_s"] = time.monotonic() - start
        save_json(result, args.out)

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    if args.device == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            adapter = build_adapter(args.tiny, args.device, Path(tmp))
            n = adapter.num_blocks
            result["model"] = {
                "params": sum(p_.numel() for p_ in adapter.model.parameters()),
                "blocks": n,
                "experts": adapter.num_experts,
                "dtype": str(adapter.dtype),
            }
            log(f"model: {result['model']}")
        except Exception as e:  # noqa: BLE001
            result["errors"].append(f"model: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
            save()
            print_tables(result)
            return result
        paths = fast_paths(args.device)
        vt_small, vt_big = (16, 36) if args.tiny else (288, 1872)
        k = adapter.default_top_k
        agree_settings = [
            {
                "name": f"vt{vt_small}_k{k}_b{n}",
                "vision_tokens": vt_small,
                "top_k": k,
                "kept": list(range(n)),
            },
            {"name": f"vt{vt_small}_k1_b{n}", "vision_tokens": vt_small, "top_k": 1, "kept": list(range(n))},
            {
                "name": f"vt{vt_small}_k4_b{n // 2}",
                "vision_tokens": vt_small,
                "top_k": 4,
                "kept": kept(n, n // 2),
            },
            {
                "name": f"vt{vt_small}_k{k}_b{n // 3}_no0",
                "vision_tokens": vt_small,
                "top_k": k,
                "kept": kept(n, n // 3, skip_first=True),
            },
        ]
        img = image(1280, 960, seed=1)
        log("part 2: greedy agreement")
        try:
            result["agreement"] = agreement(adapter, agree_settings, paths, args.agree_steps, img, log)
        except Exception as e:  # noqa: BLE001
            result["errors"].append(f"agreement: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        save()

        time_settings = [
            {"name": f"vt{vt_big}_k{k}_b{n}", "vision_tokens": vt_big, "top_k": k, "kept": list(range(n))},
            {
                "name": f"vt{vt_small}_k{k}_b{n}",
                "vision_tokens": vt_small,
                "top_k": k,
                "kept": list(range(n)),
            },
            {"name": f"vt{vt_big}_k1_b{n}", "vision_tokens": vt_big, "top_k": 1, "kept": list(range(n))},
            {
                "name": f"vt{vt_big}_k{k}_b{n // 6}",
                "vision_tokens": vt_big,
                "top_k": k,
                "kept": kept(n, n // 6),
            },
            {
                "name": f"vt{vt_big}_k{4 * k}_b{n}",
                "vision_tokens": vt_big,
                "top_k": 4 * k,
                "kept": list(range(n)),
            },
        ]
        log("part 3: timing through the adapter")
        try:
            result["timing"] = timing(adapter, time_settings, paths, args, img, log, deadline)
        except Exception as e:  # noqa: BLE001
            result["errors"].append(f"timing: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        save()
        del adapter
    if args.device == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()  # the tests' subprocess needs the GPU memory back

    if not args.skip_tests:
        left = args.total_budget_s - (time.monotonic() - start)
        limit = max(60.0, min(args.tests_timeout_s, left))
        log(f"part 1 (last): tests with KNOBSWEEP_TEST_DEVICE={args.device}, time limit {limit:.0f} s")
        try:
            result["tests"] = run_tests(limit, args.device)
            log(f"tests: {result['tests']['counts']} (rc {result['tests']['returncode']})")
        except Exception as e:  # noqa: BLE001
            result["errors"].append(f"tests: {type(e).__name__}: {e}")
        save()
    print_tables(result)
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
