"""Per-cell overhead, repeatability and monotonicity of latencies (issue 8), for the lead's GPU run.

On the real-size Qwen3-VL-30B-A3B with random bf16 weights (bench/model.py), driven through the knob engine's
adapter (`bench.fast_path_check.build_adapter`) on the inference path `auto` (resolved and recorded), cells are
emulated the way the workflow's model worker runs them (`knobsweep.cells.run_cell`: one loaded model serves many
cells): per setting and workload, `configure(...)`, the first request (the "setting change": decoder build,
CUDA-graph capture, first compute), `--warmup` untimed requests, `--n` timed requests, `reset()`.

Parts, each in its own try block; the JSON is rewritten (tmp file + os.replace) after every part and every cell:

- load (run first, while the GPU is empty): the real-width model with only `--load-blocks` decoder blocks is
  saved as safetensors (+ processor) to a temp dir on local disk and loaded with `knobsweep.models.load_model`
  twice: after dropping the files from the page cache (posix_fadvise DONTNEED: read from disk; the estimate)
  and with the page cache warm (the lower bound). Seconds, bytes, GB/s, and the full model's time at that rate,
  amortised over the real config's cells (`load_per_cell_ratio` per cell), and a cell run as a job of its own
  as on SLURM (`slurm_overhead_ratio`: a full load, a fresh process's first setting change and the warm-up,
  over the cell's GPU time).
- cells, pass 1 and pass 2: the whole settings list twice (every setting is measured again after the others
  ran, as two runs of the same cell). Per setting and workload: median, P95, P99, mean of the adapter's
  CUDA-event `total` and of the wall time; setting-change and warm-up wall s; overhead = setting change +
  warm-up; cell GPU time = n_eval x mean total; overhead ratio = overhead / cell GPU time (target <= 10 %).
- repeatability: |P95 pass 2 - P95 pass 1| / P95 pass 1 per setting and workload (target <= 3 %), same for
  the median, and each stage's P95 difference in ms (which stage moved); before each cell's timed requests a
  `--host-probe-s` run of `bench.host_probe` records how steady the host CPU was (P95 / median of a fixed
  pure-Python workload): small cells are host-bound, and a host that stalls moves their tails.
- worker amortisation (`summary.worker_amortisation`): a model worker's one-time costs (the full load estimate +
  per top-k value of the grid the largest first-pass excess of a setting change over the same setting's second
  pass: Triton compilation, library initialisation) spread over the real run's cells, plus the worst second-pass
  (warm) cell's own overhead ratio.
  The built model is frozen out of the garbage collector as the workflow's `load_adapter` does it
  (`--no-gc-freeze` leaves it in, to measure what that saves).
- `--profile-changes`: each setting change under cProfile, its functions that took >= 1 % of it by cumulative
  time in the cell's `setting_change_profile` (Triton compilation, graph captures, first-use initialisation:
  where a worker's first cells spend their seconds; the profiler slows Python code, so compare the split, not
  the change's own time, with unprofiled runs).
- monotonicity: every pair of settings that differ in one knob; the setting with the smaller knob must not be
  slower (median total, mean of the two passes) by more than the noise = the larger pass-to-pass difference of
  the two settings' medians.

`qa` requests use max_new_tokens 4, not the config's 16: VQA answers are 1-3 tokens plus end-of-sequence, and a
random-weight model does not stop where a real answer would, so 16 would time ~4x the decode steps of a real
answer. `captioning` uses the config's 48 (captions do run that long). Output lengths are recorded per request;
monotonicity pairs whose median lengths differ are reported as not comparable.

Time on an H100/H200 (estimated from bench/results/h200_2026-11-27_fast_path_check.json: ~1.3 s for one qa
request of each of the 7 default settings, ~3.8 s for one captioning request of each): load part ~40 s, model
build ~10 s, one pass ~(n + warmup + 1) x 1.3 s + (n_captioning + warmup + 1) x 3.8 s. Cells that would end after
`--budget-s` are skipped (recorded as such), so fit n to the budget:
    # ~4.5 min
    PYTHONUNBUFFERED=1 PYTHONPATH=workflow_scripts python -m bench.cell_overhead --n 20 --n-captioning 10
    # the defaults (n = 30 for both workloads) need ~7.5 min: add --budget-s 480

CPU smoke test (tiny model, seconds):
    PYTHONPATH=workflow_scripts python -m bench.cell_overhead --tiny --device cpu --n 3 --warmup 1 --out /tmp/co.json
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Self

import numpy as np
import torch
import yaml
from knobsweep.cells import keep_out_of_garbage_collection
from knobsweep.timing import host_probe_us

from bench import keeps_torch_state, run_header, save_json
from bench.fast_path_check import build_adapter, image, kept
from bench.host_probe import probe as host_probe

ROOT = Path(__file__).resolve().parents[1]
REAL_CONFIG = ROOT / "config" / "qwen3_vl_30b_a3b.yaml"
# Default cell first, then its one-knob neighbours (the monotonicity pairs), then two mixed cells: if the
# budget runs out, what is cut is the least needed.
SETTINGS = [
    "vt1872_k8_b48",
    "vt1872_k8_b24",
    "vt576_k8_b48",
    "vt1872_k1_b48",
    "vt1872_k32_b48",
    "vt288_k1_b16",
    "vt576_k4_b24",
]
# The same structure on bench's tiny model (6 blocks, 32 experts; vision tokens 16-36).
TINY_SETTINGS = [
    "vt36_k8_b6",
    "vt36_k8_b4",
    "vt16_k8_b6",
    "vt36_k1_b6",
    "vt36_k32_b6",
    "vt16_k1_b2",
    "vt16_k4_b4",
]
QA_MAX_NEW_TOKENS = 4  # VQA answers are 1-3 tokens + end of sequence (the config allows 16)
QA_QUESTION = "What color is the bus parked next to the building?"
OVERHEAD_TARGET = 0.10
REPEAT_TARGET = 0.03


def parse_setting(name: str) -> dict:
    match = re.fullmatch(r"vt(\d+)_k(\d+)_b(\d+)", name)
    if not match:
        raise ValueError(
            f"--settings: {name!r} is not of the form vt<vision_tokens>_k<top_k>_b<active_blocks>"
        )
    vt, k, b = (int(g) for g in match.groups())
    return {"name": name, "vision_tokens": vt, "top_k": k, "active_blocks": b}


def real_config(path: Path) -> dict:
    """The real run's sample counts, cell count and limits, read from its config file."""
    config = yaml.safe_load(path.read_text())
    try:
        workloads = config["workloads"]
        grid = config["grid"]
        cells = len(workloads) * int(
            np.prod([len(grid[k]) for k in ("vision_tokens", "top_k", "active_blocks")])
        )
        return {
            "file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
            "n_eval": {w: int(workloads[w]["n_eval"]) for w in ("qa", "captioning")},
            "max_new_tokens_config": {w: int(workloads[w]["max_new_tokens"]) for w in ("qa", "captioning")},
            "warmup": int(config["inference"]["warmup"]),
            "cells_per_run": cells,
            "top_k_values": len(grid["top_k"]),
        }
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: missing field {e} (need workloads.qa/captioning, grid, inference)") from e


def p95_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95 % bootstrap percentile interval of the P95 of `values` (the requests resampled with replacement): how
    far the P95 of this many requests could move by chance alone. With 100 requests and a heavy tail (a few slow
    requests) it spans tens of percent, wider than the 3 % target, which such a sample cannot resolve."""
    a = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    replicates = np.percentile(rng.choice(a, size=(resamples, a.size)), 95, axis=1)
    low, high = np.percentile(replicates, [2.5, 97.5])
    return [float(low), float(high)]


def stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "p95_ci95": p95_interval(values),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ load


def build_partial_checkpoint(tiny: bool, blocks: int, device: str, work: Path) -> Path:
    """The real-width (or tiny) random model with only `blocks` decoder blocks, saved as safetensors with a
    tiny checkpoint's processor (as build_adapter does)."""
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
    config.text_config.num_hidden_layers = blocks
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(config, device, dtype=dtype)
    model.generation_config = GenerationConfig.from_pretrained(small, local_files_only=True)
    out = work / "checkpoint"
    model.save_pretrained(out)  # safetensors (transformers 5 writes nothing else)
    processor.save_pretrained(out)
    del model
    free_memory(device)
    return out


def full_model_params(tiny: bool, vocab_size: int | None = None) -> int:
    """Parameters of the full model (all blocks), counted on the meta device."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from bench.model import make_config

    config = make_config(tiny=tiny)
    if vocab_size is not None:
        config.text_config.vocab_size = max(config.text_config.vocab_size, vocab_size)
    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def evict_from_page_cache(files: list[Path]) -> bool:
    """Write the files out and ask the kernel to drop their cached pages (no root needed), so that the next
    read comes from disk. False where posix_fadvise does not exist."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def time_load(path: Path, device: str, dtype_name: str, log) -> dict:
    """Seconds of knobsweep.models.load_model (or, if it refuses the checkpoint, of from_pretrained)."""
    run: dict = {}
    sync(device)
    t0 = time.monotonic()
    try:
        from knobsweep.models import load_model

        loaded = load_model(path, device=device, dtype=dtype_name)
        run["loader"] = "knobsweep.models.load_model"
    except Exception as e:  # noqa: BLE001 - fall back to transformers' loader, saying so
        run["load_model_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
        log(f"load: load_model failed ({type(e).__name__}: {e}); timing from_pretrained instead")
        from transformers import Qwen3VLMoeForConditionalGeneration

        t0 = time.monotonic()
        loaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(
            path, dtype=getattr(torch, dtype_name), device_map=device, local_files_only=True
        )
        run["loader"] = "Qwen3VLMoeForConditionalGeneration.from_pretrained (load_model failed)"
    sync(device)
    run["load_s"] = time.monotonic() - t0
    del loaded
    free_memory(device)
    return run


def measure_load(args, real: dict, log) -> dict:
    dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    work = Path(tempfile.mkdtemp(prefix="cell_overhead_load_", dir=args.load_dir))
    out: dict = {"blocks": args.load_blocks, "dtype": dtype_name, "dir": str(work)}
    try:
        t0 = time.monotonic()
        path = build_partial_checkpoint(args.tiny, args.load_blocks, args.device, work)
        out["build_and_save_s"] = time.monotonic() - t0
        files = sorted(path.glob("*.safetensors"))
        out["bytes"] = sum(f.stat().st_size for f in files)
        out["files"] = len(files)
        log(
            f"load: saved {out['bytes'] / 1e9:.2f} GB in {len(files)} file(s) in {out['build_and_save_s']:.1f} s"
        )
        element = 2 if dtype_name == "bfloat16" else 4
        saved = json.loads((path / "config.json").read_text())
        out["full_model_params"] = full_model_params(args.tiny, saved["text_config"]["vocab_size"])
        out["full_model_bytes"] = out["full_model_params"] * element
        out["runs"] = []
        # first with the files dropped from the page cache (read from disk), then again (page cache warm)
        for cache in ("evicted", "warm"):
            evicted = evict_from_page_cache(files) if cache == "evicted" else False
            run = {"page_cache": cache if cache == "warm" or evicted else "warm (eviction unavailable)"}
            run.update(time_load(path, args.device, dtype_name, log))
            run["gb_per_s"] = out["bytes"] / run["load_s"] / 1e9
            run["full_load_s"] = out["full_model_bytes"] / out["bytes"] * run["load_s"]
            out["runs"].append(run)
            log(
                f"load ({run['page_cache']}): {run['load_s']:.2f} s for {out['bytes'] / 1e9:.2f} GB = "
                f"{run['gb_per_s']:.2f} GB/s; full model {out['full_model_bytes'] / 1e9:.1f} GB -> "
                f"{run['full_load_s']:.1f} s"
            )
        out["loader"] = out["runs"][0]["loader"]
        out["load_s"] = out["runs"][0]["load_s"]
        out["gb_per_s"] = out["runs"][0]["gb_per_s"]
        out["full_load_s_estimate"] = out["runs"][0]["full_load_s"]
        out["full_load_s_lower_bound"] = min(r["full_load_s"] for r in out["runs"])
        out["cells_per_run"] = real["cells_per_run"]
        out["full_load_s_per_cell"] = out["full_load_s_estimate"] / real["cells_per_run"]
        out["note"] = (
            "full-model seconds = measured seconds x full bytes / saved bytes (fixed costs such as processor "
            "loading are scaled too). The first load reads from local disk after posix_fadvise(DONTNEED) "
            "(the estimate, used per cell); the second with the page cache warm (the lower bound). A shared "
            "or network file system on a cluster can be slower than this machine's local disk."
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        free_memory(args.device)
    return out


# ------------------------------------------------------------------------------------------------ cells


PROFILE_TOP = 30  # functions kept per profiled setting change


def profile_rows(profile: cProfile.Profile, total_s: float) -> list[dict]:
    """The functions that took >= 1 % of a profiled setting change, by cumulative time (what a setting change
    spends on Triton compilation, graph captures, first-use initialisation...); own time and calls too."""
    stats = pstats.Stats(profile)
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        if cumulative >= 0.01 * total_s:
            where = f"{Path(path).name}:{line}" if line else path
            rows.append(
                {"function": f"{where}({name})", "cumulative_s": cumulative, "own_s": own, "calls": calls}
            )
    rows.sort(key=lambda r: -r["cumulative_s"])
    return rows[:PROFILE_TOP]


class GcPauses:
    """Milliseconds Python's garbage collector ran, and full (generation 2) collections, since `reset()`
    (`gc.callbacks`): whether collections land inside timed requests (on an H200, session 9: at most 0.1 ms
    per request and no full collection; they do not explain the P95 spread)."""

    def __init__(self) -> None:
        self.ms, self.full_collections, self._start = 0.0, 0, 0.0

    def __enter__(self) -> Self:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def reset(self) -> None:
        self.ms, self.full_collections = 0.0, 0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._start) * 1000.0
            self.full_collections += info["generation"] == 2


def _correlation(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def run_cell(adapter, setting: dict, kind: str, args, real: dict, img, device: str) -> dict:
    """One cell as the workflow's worker runs it: configure, first request, warm-up, timed requests, reset."""
    max_new = QA_MAX_NEW_TOKENS if kind == "qa" else real["max_new_tokens_config"]["captioning"]
    prompt = _prompts()[kind]
    row: dict = {
        "setting": setting["name"],
        "vision_tokens": setting["vision_tokens"],
        "top_k": setting["top_k"],
        "active_blocks": setting["active_blocks"],
        "kind": kind,
        "max_new_tokens": max_new,
    }

    def request():
        return adapter.generate(img, prompt, vision_tokens=setting["vision_tokens"], max_new_tokens=max_new)

    start = time.monotonic()
    try:
        sync(device)
        profile = cProfile.Profile() if args.profile_changes else None
        t0 = time.monotonic()
        if profile is not None:
            profile.enable()
        adapter.configure(top_k=setting["top_k"], active_blocks=setting["kept"])
        # configure() keeps the decoders (and graphs) when the knobs did not change, e.g. the default cell
        # right after reset(): then this cell's setting change captures nothing, as in the worker
        fast = getattr(adapter, "_fast", None)
        row["decoders_kept"] = len(fast.decoders) if fast is not None else None
        first = request()
        sync(device)
        row["setting_change_s"] = time.monotonic() - t0
        if profile is not None:
            profile.disable()
            row["setting_change_profile"] = profile_rows(profile, row["setting_change_s"])
        row["first_request_total_ms"] = first.timings_ms["total"]
        t0 = time.monotonic()
        for _ in range(args.warmup):
            request()
        sync(device)
        row["warmup_s"] = time.monotonic() - t0
        if args.host_probe_s > 0:
            row["host_probe"] = host_probe(args.host_probe_s)
        n = args.n if kind == "qa" else args.n_captioning
        totals, walls, tokens, stages, gc_ms, gc_full, probes = [], [], [], [], [], [], []
        with GcPauses() as pauses:
            for _ in range(n):
                pauses.reset()
                probes.append(host_probe_us())  # as the workflow's cells do, before each request's clock
                t0 = time.perf_counter()
                r = request()
                sync(device)
                walls.append((time.perf_counter() - t0) * 1e3)
                totals.append(r.timings_ms["total"])
                tokens.append(r.output_tokens)
                stages.append(r.timings_ms)
                gc_ms.append(pauses.ms)
                gc_full.append(pauses.full_collections)
        steps = [t["decode"] / (k - 1) for t, k in zip(stages, tokens, strict=True) if k > 1]
        row.update(
            {
                "n": n,
                "warmup": args.warmup,
                "total_ms": [round(x, 3) for x in totals],
                "wall_ms": [round(x, 3) for x in walls],
                "output_tokens": tokens,
                "vision_tokens_actual": r.vision_tokens,
                "prompt_tokens": r.prompt_tokens,
                "preprocess": adapter.preprocess_mode(),  # placeholders expanded on token ids, or the processor
                "total": stats(totals),
                "wall": stats(walls),
                "stage_medians_ms": {
                    stage: float(np.median([t[stage] for t in stages]))
                    for stage in ("preprocess", "vision", "prefill", "decode", "ttft")
                },
                "stage_p95_ms": {
                    stage: float(np.percentile([t[stage] for t in stages], 95))
                    for stage in ("preprocess", "vision", "prefill", "decode")
                },
                "decode_step_ms_median": float(np.median(steps)) if steps else None,
                # The workflow's per-request host probe (knobsweep.timing.host_probe_us), its median, and how
                # closely the preprocess stage and the total follow it request by request (Pearson).
                "host_probe_us": [round(x, 2) for x in probes],
                "host_probe_us_median": float(np.median(probes)),
                "host_probe_correlation": {
                    stage: _correlation(probes, [t[stage] for t in stages])
                    for stage in ("preprocess", "total")
                },
                # Python's garbage collector inside each timed request (wall ms, full collections).
                "gc_ms": [round(x, 3) for x in gc_ms],
                "gc_full_collections": gc_full,
            }
        )
        n_eval = real["n_eval"][kind]
        row["n_eval"] = n_eval
        row["overhead_s"] = row["setting_change_s"] + row["warmup_s"]
        row["cell_gpu_s"] = n_eval * row["total"]["mean"] / 1e3
        row["overhead_ratio"] = row["overhead_s"] / row["cell_gpu_s"]
    except Exception as e:  # noqa: BLE001 - recorded, the other cells still run
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()[-3000:]
    finally:
        adapter.reset()
        row["cell_wall_s"] = time.monotonic() - start
    return row


def _prompts() -> dict[str, str]:
    from knobsweep.workloads.prompts import caption_prompt, qa_prompt

    return {"qa": qa_prompt(QA_QUESTION), "captioning": caption_prompt()}


# ------------------------------------------------------------------------------------------------ analysis


def repeatability(cells: list[dict]) -> list[dict]:
    by_key = {(c["pass"], c["setting"], c["kind"]): c for c in cells if "total" in c}
    rows = []
    for (p, name, kind), one in by_key.items():
        two = by_key.get((2, name, kind))
        if p != 1 or two is None:
            continue
        a, b = one["total"], two["total"]
        rows.append(
            {
                "setting": name,
                "kind": kind,
                "p95_pass1_ms": a["p95"],
                "p95_pass2_ms": b["p95"],
                "p95_rel_diff": abs(b["p95"] - a["p95"]) / a["p95"],
                "median_pass1_ms": a["median"],
                "median_pass2_ms": b["median"],
                "median_rel_diff": abs(b["median"] - a["median"]) / a["median"],
                # The two P95s' bootstrap intervals overlap: the difference is within their sampling noise.
                "p95_within_sampling_noise": max(a["p95_ci95"][0], b["p95_ci95"][0])
                <= min(a["p95_ci95"][1], b["p95_ci95"][1]),
                "p95_ci95_rel_halfwidth": [
                    (x["p95_ci95"][1] - x["p95_ci95"][0]) / 2 / x["p95"] for x in (a, b)
                ],
                # How steady the host was just before each pass's timed requests (bench.host_probe).
                "host_p95_over_median": [x.get("host_probe", {}).get("p95_over_median") for x in (one, two)],
                # How fast it ran Python around the requests (the workflow's per-request probe, medians in us).
                "host_probe_us_median": [x.get("host_probe_us_median") for x in (one, two)],
                # Which stage moved the P95: pass 2 - pass 1, ms per stage.
                "stage_p95_diff_ms": {
                    stage: two["stage_p95_ms"][stage] - one["stage_p95_ms"][stage]
                    for stage in one.get("stage_p95_ms", {})
                    if stage in two.get("stage_p95_ms", {})
                },
            }
        )
    for r in rows:
        r["p95_within_target"] = r["p95_rel_diff"] <= REPEAT_TARGET
    return rows


KNOBS = ("vision_tokens", "top_k", "active_blocks")


def monotonicity(cells: list[dict]) -> list[dict]:
    """Pairs of settings of one workload that differ in one knob; the smaller knob must not be slower (mean of
    the passes' median totals) by more than the noise (the larger pass-to-pass difference of the two settings'
    medians). Only pairs with the same median output length are comparable (a random model may stop early)."""
    medians: dict[tuple[str, str], list[float]] = {}
    lengths: dict[tuple[str, str], list[int]] = {}
    knobs: dict[str, dict] = {}
    for c in cells:
        if "total" in c:
            medians.setdefault((c["setting"], c["kind"]), []).append(c["total"]["median"])
            lengths.setdefault((c["setting"], c["kind"]), []).extend(c["output_tokens"])
            knobs[c["setting"]] = {k: c[k] for k in KNOBS}
    rows = []
    for (small, kind), m_small in medians.items():
        for (big, kind2), m_big in medians.items():
            if kind2 != kind or small == big:
                continue
            differ = [k for k in KNOBS if knobs[small][k] != knobs[big][k]]
            if len(differ) != 1 or knobs[small][differ[0]] > knobs[big][differ[0]]:
                continue
            noise = max(max(m) - min(m) for m in (m_small, m_big))
            slower_by = float(np.mean(m_small) - np.mean(m_big))
            tokens = [float(np.median(lengths[(name, kind)])) for name in (small, big)]
            comparable = tokens[0] == tokens[1]
            rows.append(
                {
                    "kind": kind,
                    "knob": differ[0],
                    "smaller": small,
                    "larger": big,
                    "median_smaller_ms": float(np.mean(m_small)),
                    "median_larger_ms": float(np.mean(m_big)),
                    "noise_ms": noise,
                    "passes": min(len(m_small), len(m_big)),
                    "output_tokens_median": tokens,
                    "comparable": comparable,
                    "violation": comparable and slower_by > noise,
                }
            )
    return rows


def load_amortisation(result: dict) -> None:
    """Per cell: the full model's load time per cell of a run (one load per run: the model worker), over that
    cell's GPU time; and what the cell costs outside its samples as a job of its own, as on SLURM, where every
    cell job loads the model and its first request is a fresh process's first (`slurm_overhead_ratio`: (full
    load estimate + the first measured cell's setting change + this cell's warm-up) / its GPU time; without the
    process start and imports, so a lower bound)."""
    load = result.get("load", {})
    per_cell = load.get("full_load_s_per_cell")
    measured = [c for c in result["cells"] if "setting_change_s" in c]
    first_change = measured[0]["setting_change_s"] if measured else None
    for c in result["cells"]:
        if per_cell is not None and "cell_gpu_s" in c:
            c["load_per_cell_ratio"] = per_cell / c["cell_gpu_s"]
            job_s = load["full_load_s_estimate"] + first_change + c["warmup_s"]
            c["slurm_overhead_ratio"] = job_s / c["cell_gpu_s"]


def worker_amortisation(result: dict) -> dict:
    """A model worker's one-time costs spread over a real run, as the workflow runs it (one worker, one model load
    for all of a run's cells). A setting's one-time part is how much longer its first pass's setting change took
    than its second's (the second finds the kernels compiled and the libraries initialised, and captures its
    graphs again: the knob changed in between). Triton compiles kernels specialised per top-k, so a worker pays
    that once per top-k value: bound = full load estimate + the grid's top-k values x the largest one-time part
    (the worker's first cell's, which also initialises libraries). Spread over the run's cells, each taken as the
    smallest measured cell's GPU time (larger cells dilute it more), and added to the largest overhead ratio of a
    second-pass cell (a warm worker's steady state): the worst cell of a run with its share of the one-time costs."""
    cells = [c for c in result["cells"] if "overhead_ratio" in c]
    load_s = result.get("load", {}).get("full_load_s_estimate")
    if not cells or load_s is None:
        return {}
    changes = {(c["pass"], c["setting"], c["kind"]): c["setting_change_s"] for c in cells}
    first_pass = [c for c in cells if c["pass"] == 1]
    one_time = {
        f"{c['setting']} {c['kind']}": max(
            0.0, c["setting_change_s"] - changes.get((2, c["setting"], c["kind"]), 0.0)
        )
        for c in first_pass
    }
    steady = [c["overhead_ratio"] for c in cells if c["pass"] == 2] or [
        c["overhead_ratio"] for c in first_pass[1:]
    ]
    top_k_values = result["real_config"]["top_k_values"]
    one_time_bound_s = load_s + top_k_values * max(one_time.values())
    cells_per_run = result["real_config"]["cells_per_run"]
    smallest_cell_gpu_s = min(c["cell_gpu_s"] for c in cells)
    share = one_time_bound_s / (cells_per_run * smallest_cell_gpu_s)
    worst_steady = max(steady, default=0.0)
    return {
        "load_s_estimate": load_s,
        "one_time_s": one_time,
        "top_k_values": top_k_values,
        "one_time_bound_s": one_time_bound_s,
        "cells_per_run": cells_per_run,
        "smallest_cell_gpu_s": smallest_cell_gpu_s,
        "one_time_share_per_cell_ratio": share,
        "max_steady_cell_overhead_ratio": worst_steady,
        "worst_cell_ratio": share + worst_steady,
        "within_target": share + worst_steady <= OVERHEAD_TARGET,
    }


def print_tables(result: dict) -> None:
    load = result.get("load", {})
    if "load_s" in load:
        print(f"\nload ({load['loader']}): {load['blocks']} blocks, {load['bytes'] / 1e9:.2f} GB saved")
        for r in load["runs"]:
            print(
                f"  page cache {r['page_cache']:<8}: {r['load_s']:.2f} s = {r['gb_per_s']:.2f} GB/s; full model "
                f"{load['full_model_bytes'] / 1e9:.1f} GB -> {r['full_load_s']:.1f} s"
            )
        print(
            f"  per cell: {load['full_load_s_per_cell']:.3f} s (estimate / {load['cells_per_run']} cells of a run)"
        )
    print(
        f"\n{'setting':<16} {'kind':<10} {'pass':>4} {'median':>9} {'P95':>9} {'P99':>9} {'change s':>9} "
        f"{'warmup s':>9} {'overhead':>9} {'load/cell':>9} {'as a job':>9}"
    )
    for c in result.get("cells", []):
        head = f"{c['setting']:<16} {c['kind']:<10} {c['pass']:>4}"
        if "total" not in c:
            print(f"{head} {c.get('error', c.get('skipped', '?'))}")
            continue
        t = c["total"]
        load_ratio = f"{100 * c['load_per_cell_ratio']:8.3f}%" if "load_per_cell_ratio" in c else f"{'-':>9}"
        job_ratio = f"{100 * c['slurm_overhead_ratio']:8.1f}%" if "slurm_overhead_ratio" in c else f"{'-':>9}"
        print(
            f"{head} {t['median']:9.1f} {t['p95']:9.1f} {t['p99']:9.1f} {c['setting_change_s']:9.2f} "
            f"{c['warmup_s']:9.2f} {100 * c['overhead_ratio']:8.2f}% {load_ratio} {job_ratio}"
        )
    print(
        "(ms: the adapter's CUDA-event total; overhead = (change + warm-up) / (n_eval x mean total); as a job: "
        "a cell as its own job, as on SLURM = (full load + the first cell's change + warm-up) / the same)"
    )
    summary = result.get("summary", {})
    worker = summary.get("worker_amortisation")
    if worker:
        print(
            f"\none model worker for the run: one-time <= {worker['one_time_bound_s']:.1f} s (load estimate "
            f"{worker['load_s_estimate']:.1f} s + {worker['top_k_values']} top-k values x the largest first-pass "
            f"excess {max(worker['one_time_s'].values()):.1f} s) over {worker['cells_per_run']} cells of >= "
            f"{worker['smallest_cell_gpu_s']:.1f} s GPU time = {100 * worker['one_time_share_per_cell_ratio']:.2f}% "
            f"per cell; + the worst warm cell's {100 * worker['max_steady_cell_overhead_ratio']:.2f}% = "
            f"{100 * worker['worst_cell_ratio']:.2f}% ({'within' if worker['within_target'] else 'OVER'} the "
            f"{OVERHEAD_TARGET:.0%} target)"
        )
    if result.get("repeatability"):
        print(f"\nrepeatability (|P95 pass 2 - pass 1| / pass 1, target <= {REPEAT_TARGET:.0%})")
        for r in result["repeatability"]:
            print(
                f"  {r['setting']:<16} {r['kind']:<10} P95 {100 * r['p95_rel_diff']:6.2f}%  "
                f"median {100 * r['median_rel_diff']:6.2f}%  {'ok' if r['p95_within_target'] else 'OVER'}  "
                f"(P95 95% CI +-{100 * max(r['p95_ci95_rel_halfwidth']):.0f}%"
                f"{', overlapping' if r['p95_within_sampling_noise'] else ', apart'}; host P95/median "
                + "/".join("-" if h is None else f"{h:.2f}" for h in r["host_p95_over_median"])
                + ")  "
                + " ".join(f"{k} {v:+.1f}" for k, v in r["stage_p95_diff_ms"].items())
                + (" (stage P95s, pass 2 - pass 1, ms)" if r["stage_p95_diff_ms"] else "")
            )
    if result.get("monotonicity"):
        print("\nmonotonicity (smaller knob not slower than larger by more than the pass-to-pass noise)")
        for m in result["monotonicity"]:
            print(
                f"  {m['kind']:<10} {m['smaller']:<16} {m['median_smaller_ms']:9.1f} <= {m['larger']:<16} "
                f"{m['median_larger_ms']:9.1f} (noise {m['noise_ms']:.2f} ms, {m['passes']} pass(es)) "
                + ("VIOLATION" if m["violation"] else "ok" if m["comparable"] else "not comparable: ")
                + ("" if m["comparable"] else f"output tokens {m['output_tokens_median']}")
            )
    if summary:
        print("\nsummary: " + json.dumps(summary))


def summarise(result: dict) -> dict:
    cells = [c for c in result["cells"] if "overhead_ratio" in c]
    rep, mono = result.get("repeatability", []), result.get("monotonicity", [])
    return {
        "cells_measured": len(cells),
        "cells_skipped_or_failed": len(result["cells"]) - len(cells),
        "max_overhead_ratio": max((c["overhead_ratio"] for c in cells), default=None),
        "max_slurm_overhead_ratio": max(
            (c["slurm_overhead_ratio"] for c in cells if "slurm_overhead_ratio" in c), default=None
        ),
        "overhead_within_target": all(c["overhead_ratio"] <= OVERHEAD_TARGET for c in cells)
        if cells
        else None,
        "worker_amortisation": worker_amortisation(result),
        "max_p95_rel_diff": max((r["p95_rel_diff"] for r in rep), default=None),
        "repeatability_within_target": all(r["p95_within_target"] for r in rep) if rep else None,
        "monotonicity_pairs": len(mono),
        "monotonicity_violations": sum(m["violation"] for m in mono),
        "monotonicity_not_comparable": sum(not m["comparable"] for m in mono),
    }


# ------------------------------------------------------------------------------------------------ main


@keeps_torch_state
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / "cell_overhead.json"
    )
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="bench's tiny config (CPU smoke test of this script)")
    p.add_argument("--n", type=int, default=30, help="timed requests per cell")
    p.add_argument(
        "--n-captioning", type=int, default=None, help="timed requests per captioning cell (default: --n)"
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed requests after the first (config: 5)")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no cell that would end after this")
    p.add_argument("--load-blocks", type=int, default=4, help="decoder blocks of the saved/loaded model")
    p.add_argument("--load-dir", type=Path, default=None, help="local disk for the load test (default: tmp)")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--settings", nargs="+", default=None, help="e.g. vt1872_k8_b48 vt288_k1_b16")
    p.add_argument("--config", type=Path, default=REAL_CONFIG, help="the real run's config (n_eval, grid)")
    p.add_argument("--inference-path", default="auto", help="model.inference_path of the emulated cells")
    p.add_argument(
        "--host-probe-s",
        type=float,
        default=0.5,
        help="seconds of bench.host_probe before each cell's timed requests (0: none): how steady the host was",
    )
    p.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="leave the built model in the garbage collector's generations (the workflow freezes it out after "
        "loading, `knobsweep.cells.keep_out_of_garbage_collection`): to measure what that saves",
    )
    p.add_argument(
        "--profile-changes",
        action="store_true",
        help="profile each setting change (cProfile: where its seconds go; slows Python code, so the changes' "
        "own times are then upper bounds)",
    )
    args = p.parse_args(argv)
    if args.n_captioning is None:
        args.n_captioning = args.n
    if min(args.n, args.n_captioning) < 1 or args.warmup < 0 or args.load_blocks < 1:
        p.error(
            f"need --n >= 1, --warmup >= 0, --load-blocks >= 1 (got {args.n}, {args.warmup}, {args.load_blocks})"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    settings = [parse_setting(s) for s in (args.settings or (TINY_SETTINGS if args.tiny else SETTINGS))]
    start = time.monotonic()
    deadline = start + args.budget_s

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)

    real = real_config(args.config)
    result: dict = {
        **run_header("bench/cell_overhead.py", args.device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "real_config": real,
        "max_new_tokens": {
            "qa": QA_MAX_NEW_TOKENS,
            "captioning": real["max_new_tokens_config"]["captioning"],
        },
        "targets": {"overhead_ratio": OVERHEAD_TARGET, "p95_rel_diff": REPEAT_TARGET},
        "cells": [],
    }

    def save() -> None:
        result["elapsed_s"] = time.monotonic() - start
        save_json(result, args.out)

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    if args.device == "cpu":
        torch.set_num_threads(1)

    # Load first: the GPU is empty, and the 4-block model fits next to nothing else.
    if not args.skip_load:
        log(f"load: {args.load_blocks}-block model -> safetensors -> load_model")
        try:
            result["load"] = measure_load(args, real, log)
        except Exception as e:  # noqa: BLE001
            result["load"] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-3000:],
            }
            log(f"load: {result['load']['error']}")
        save()

    with tempfile.TemporaryDirectory() as tmp:
        try:
            t0 = time.monotonic()
            adapter = build_adapter(args.tiny, args.device, Path(tmp))
            if args.gc_freeze:
                keep_out_of_garbage_collection()  # as the workflow's load_adapter does
            from knobsweep.models.fast_path import resolve_inference_path

            resolved = resolve_inference_path(adapter, args.inference_path)
            result["inference_path"] = {
                "requested": args.inference_path,
                "resolved": adapter.set_inference_path(args.inference_path),
            }
            assert result["inference_path"]["resolved"] == resolved
            num_blocks = adapter.num_blocks
            result["model"] = {
                "params": sum(p_.numel() for p_ in adapter.model.parameters()),
                "blocks": num_blocks,
                "experts": adapter.num_experts,
                "dtype": str(adapter.dtype),
                "build_s": time.monotonic() - t0,
                # the real config asks for sdpa attention and grouped_mm experts (prefill; decode per path)
                "attn_implementation": getattr(adapter.model.config, "_attn_implementation", None),
                "experts_implementation": getattr(adapter.model.config, "_experts_implementation", None),
            }
            log(f"model: {result['model']}, path {args.inference_path} -> {resolved}")
        except Exception as e:  # noqa: BLE001
            result["errors"].append(f"model: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
            save()
            print_tables(result)
            return result
        for s in settings:
            s["kept"] = kept(num_blocks, s["active_blocks"])
        img = image(640, 480, seed=1)  # COCO-sized; the adapter resizes it to the setting's vision tokens
        durations: dict[tuple[str, str], float] = {}  # (setting, kind) -> wall s of its first pass
        last: dict[str, float] = {}  # kind -> wall s of the last cell of that kind
        for pass_ in (1, 2):
            log(f"pass {pass_}")
            for s in settings:
                for kind in ("qa", "captioning"):
                    # skip a cell that would not end within the budget (estimate: its pass-1 time, or the
                    # last cell of the same workload)
                    estimate = durations.get((s["name"], kind), last.get(kind, 0.0))
                    if time.monotonic() + estimate > deadline:
                        row = {"pass": pass_, "setting": s["name"], "kind": kind, "skipped": "budget"}
                        result["cells"].append(row)
                        log(f"pass {pass_} {s['name']} {kind}: skipped (budget; estimate {estimate:.0f} s)")
                        continue
                    row = {"pass": pass_, **run_cell(adapter, s, kind, args, real, img, args.device)}
                    durations.setdefault((s["name"], kind), row["cell_wall_s"])
                    last[kind] = row["cell_wall_s"]
                    result["cells"].append(row)
                    if "error" in row:
                        log(f"pass {pass_} {s['name']} {kind}: {row['error']}")
                    else:
                        log(
                            f"pass {pass_} {s['name']} {kind}: median {row['total']['median']:.1f} ms, "
                            f"P95 {row['total']['p95']:.1f}, change {row['setting_change_s']:.2f} s, "
                            f"warm-up {row['warmup_s']:.2f} s, overhead {100 * row['overhead_ratio']:.2f}%, "
                            f"GC in requests: max {max(row['gc_ms']):.1f} ms, "
                            f"{sum(row['gc_full_collections'])} full collections"
                        )
                    save()
        del adapter
        gc.unfreeze()  # the caller's process goes on (the tests run this in-process)
        free_memory(args.device)

    for name, fn in (("repeatability", repeatability), ("monotonicity", monotonicity)):
        try:
            result[name] = fn(result["cells"])
        except Exception as e:  # noqa: BLE001
            result["errors"].append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
    try:
        load_amortisation(result)
        result["summary"] = summarise(result)
    except Exception as e:  # noqa: BLE001
        result["errors"].append(f"summary: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
    save()
    print_tables(result)
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
