"""Run one cell (one knob setting on one workload's evaluation samples) and write its shard.

A cell's shard is one Parquet file with a row per evaluation sample (predictions and per-stage latency)
and, in its schema metadata under b"knobsweep", the provenance: model, dtype, device, library and code
versions, and the fingerprint of everything that determines the result.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knobsweep import io
from knobsweep.knobs import KnobSetting

if TYPE_CHECKING:
    import pandas as pd

# Bump by hand whenever a change to the inference path (knob application, generation, timing, image
# handling) can change a cell's predictions or latencies: every cell's fingerprint includes it, so the
# workflow re-runs them all. Fixes that cannot change results need no bump.
# 2: on CUDA, `auto` became fused_graph (was eager) and images are processed on the GPU.
# 3: on CUDA, `auto` became fused_regional_graph; the fused paths' prefill runs its experts through
#    `moe_grouped` and their decode splits the down projection over (token, expert) pairs; the graph paths
#    replay qwen3_vl_moe's language-model prefill from CUDA graphs (padded to a bucket).
# 4: the fused paths' decode steps run the Qwen3 families' attention and router fused (`FusedModules`);
#    internvl's prefill is graphed too.
# 5: ... and their decoder blocks' residual additions inside the output projection's and experts' kernels
#    (`decode_block`).
# 6: their prefill's experts run as Triton grouped GEMMs (`fused_moe.grouped_projection`, the gate in the
#    gate/up GEMM's epilogue) on pairs put in expert order by Triton kernels (`expert_order`); their decode
#    steps' RMSNorms are Triton kernels too (`rms_norm`, transformers' rounding), not compiled ones.
# 7: on CUDA the image is resized on the GPU (`resize_on_device`, torchvision), not by PIL on the host.
# 8: the fused paths' decode steps run folded kernels launched with PDL; the vision encoder is replayed from a
#    CUDA graph per image grid (qwen3_vl_moe).
# 9: the fused paths' forwards are switched on and off around each decode without nn.Module.__setattr__ (less
#    host time in every request).
# 10: the prompt's positions are computed on the host in the preprocess stage (no longer in the prefill's); on
#    CUDA the decode loop launches one step ahead of reading whether any row still runs.
# 11: through a vision graph the prefill reads the image grid on the host and skips transformers' device-side
#     placeholder count check (checked on the host instead): no wait for the GPU inside the prefill.
# 12: shards record the host's speed before each request (`host_probe_us`).
# 13: image placeholders are expanded on token ids, not in the prompt text (`models/image_tokens.py`): the
#     preprocess stage no longer tokenizes one placeholder per vision token.
INFERENCE_CODE_VERSION = "13"

SHARD_COLUMNS = (
    "workload",
    "vision_tokens",
    "top_k",
    "active_blocks",
    "kept_blocks",
    "sample_id",
    "prediction",
    "vision_tokens_actual",
    "prompt_tokens",
    "output_tokens",
    "preprocess_ms",
    "vision_ms",
    "prefill_ms",
    "decode_ms",
    "ttft_ms",
    "latency_ms",
    "host_probe_us",
)
_STAGES = ("preprocess", "vision", "prefill", "decode", "ttft")

log = logging.getLogger(__name__)


class Abandoned(Exception):
    """Raised between samples when `should_stop` says the requester is gone (a model worker's client was
    killed): the cell or importance run stops within one sample and the adapter is reset."""


def _check_stop(should_stop: Callable[[], bool] | None, what: str) -> None:
    if should_stop is not None and should_stop():
        raise Abandoned(f"{what}: abandoned, the requester is gone")


class ProgressLog:
    """Logs samples done, rate and estimated time left, at most every `every_s` seconds (and at the end)."""

    def __init__(
        self, what: str, total: int, every_s: float = 10.0, emit: Callable[[str], None] | None = None
    ):
        self.what, self.total, self.every_s = what, total, every_s
        self.emit = emit or log.info
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else math.inf
        left = (self.total - done) / rate if rate > 0 else math.inf
        self.emit(f"{self.what}: {done}/{self.total} samples, {rate:.2f} samples/s, ~{left:.0f} s left")


def load_image(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def warmup_rows(manifest: pd.DataFrame, n: int) -> pd.DataFrame:
    """The samples used to warm up: calibration samples first (they are not evaluated), then eval ones."""
    ordered = manifest.sort_values("split", key=lambda s: s != "calibration", kind="stable")
    return ordered.head(n)


def one_sample_per_grid(adapter: Any, rows: pd.DataFrame, vision_tokens: int) -> list[Any]:
    """The first of `rows` (itertuples) for each token grid their images get at `vision_tokens`; the grid depends
    only on an image's size, read from its file's header."""
    from PIL import Image

    first_of_grid = {}
    for row in rows.itertuples():
        with Image.open(row.image_path) as image:
            first_of_grid.setdefault(adapter.planned_grid(image, vision_tokens), row)
    return list(first_of_grid.values())


def run_cell(
    adapter: Any,
    manifest: pd.DataFrame,
    setting: KnobSetting,
    kept_blocks: Sequence[int],
    *,
    workload: str,
    max_new_tokens: int,
    warmup: int,
    progress_every_s: float = 10.0,
    should_stop: Callable[[], bool] | None = None,
) -> pd.DataFrame:
    """Generate, at batch 1, an answer for every evaluation sample of `manifest` under `setting` with only
    `kept_blocks` active; `warmup` samples run first with the same knobs and are discarded.
    `should_stop` is polled before every sample; when it returns True the cell raises `Abandoned`."""
    import pandas as pd

    from knobsweep.timing import host_probe_us

    if len(kept_blocks) != setting.active_blocks:
        raise ValueError(
            f"{setting.cell_id()}: {len(kept_blocks)} kept blocks given "
            f"for active_blocks={setting.active_blocks}"
        )
    eval_rows = manifest[manifest["split"] == "eval"]
    if eval_rows.empty:
        raise ValueError(f"{workload}: the manifest has no evaluation samples")
    what = f"{workload} {setting.cell_id()}"
    adapter.configure(top_k=setting.top_k, active_blocks=list(kept_blocks))
    try:
        # Untimed: the first request of each token grid at a budget checks the token-id expansion against the
        # processor, so no measured request runs both.
        for row in one_sample_per_grid(adapter, eval_rows, setting.vision_tokens):
            _check_stop(should_stop, what)
            adapter.check_preprocessing(load_image(row.image_path), row.prompt, setting.vision_tokens)
        start = time.monotonic()
        for row in warmup_rows(manifest, warmup).itertuples():
            _check_stop(should_stop, what)
            adapter.generate(
                load_image(row.image_path),
                row.prompt,
                vision_tokens=setting.vision_tokens,
                max_new_tokens=max_new_tokens,
            )
        warmup_s = time.monotonic() - start
        progress = ProgressLog(what, len(eval_rows), progress_every_s)
        start = time.monotonic()
        rows = []
        for done, row in enumerate(eval_rows.itertuples(), start=1):
            _check_stop(should_stop, what)
            image = load_image(row.image_path)
            host_probe = host_probe_us()  # how fast the host ran Python just before this request
            result = adapter.generate(
                image,
                row.prompt,
                vision_tokens=setting.vision_tokens,
                max_new_tokens=max_new_tokens,
            )
            timings = result.timings_ms
            rows.append(
                {
                    "workload": workload,
                    "vision_tokens": setting.vision_tokens,
                    "top_k": setting.top_k,
                    "active_blocks": setting.active_blocks,
                    "kept_blocks": [int(b) for b in kept_blocks],
                    "sample_id": row.sample_id,
                    "prediction": result.text,
                    "vision_tokens_actual": int(result.vision_tokens),
                    "prompt_tokens": int(result.prompt_tokens),
                    "output_tokens": int(result.output_tokens),
                    **{f"{stage}_ms": float(timings[stage]) for stage in _STAGES},
                    "latency_ms": float(timings["total"]),
                    "host_probe_us": host_probe,
                }
            )
            progress.update(done)
        samples_s = time.monotonic() - start
    finally:
        adapter.reset()
    frame = pd.DataFrame(rows, columns=list(SHARD_COLUMNS))
    # Wall time of warm-up and of the measured samples, for the per-cell overhead in the provenance.
    frame.attrs.update(warmup_s=warmup_s, samples_s=samples_s)
    return frame


def device_name(device: str) -> str:
    """A human-readable name of the device the model runs on (the GPU's product name on CUDA)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def cell_fingerprint(
    spec: dict[str, Any], manifest_sha256: str, importance_sha256: str, kept_blocks: Sequence[int]
) -> str:
    """sha256 of everything that determines the cell's result: the cell's specification (model identity,
    dtype, device kind, implementations, knobs, manifest and importance settings, prompts via the manifest,
    generation settings, warm-up count, INFERENCE_CODE_VERSION), the manifest's and importance file's
    content hashes and the kept blocks. Deliberately not the git commit."""
    return io.fingerprint(
        {
            "spec": spec,
            "manifest_sha256": manifest_sha256,
            "importance_sha256": importance_sha256,
            "kept_blocks": [int(b) for b in kept_blocks],
        }
    )


def importance_content_hash(path: str | os.PathLike) -> str:
    """Fingerprint of an importance file without its provenance and timing, which vary between
    otherwise identical computations."""
    import json

    with open(path) as f:
        importance = json.load(f)
    return io.fingerprint({k: v for k, v in importance.items() if k not in ("provenance", "elapsed_s")})


def cell_provenance(
    spec: dict[str, Any],
    *,
    model_path: str,
    manifest_path: str,
    importance_path: str,
    kept_blocks: Sequence[int],
    device: str,
    load_s: float | None = None,
    warmup_s: float | None = None,
    samples_s: float | None = None,
    model_reused: bool = False,
    client_s: float | None = None,
    device_label: str | None = None,
    inference_path: str | None = None,
    vision_encoder: str | None = None,
    preprocess: str | None = None,
) -> dict[str, Any]:
    """The shard's provenance. `vision_encoder`: how its requests ran the vision encoder
    (`ModelAdapter.vision_encoder_mode`; the vision stage's latency depends on it), not fingerprinted; `preprocess`:
    how they expanded the image placeholders (`ModelAdapter.preprocess_mode`; the preprocess stage's latency depends
    on it). `overhead_s` says how the cell ran (model load, 0.0 when a model worker
    reused a loaded model; warm-up; samples; the job's wall time end to end) and is not fingerprinted.
    `device_label` is the device's name when it was read elsewhere (in the model worker)."""
    manifest_sha256 = io.sha256_file(manifest_path)
    importance_sha256 = importance_content_hash(importance_path)
    return {
        "model_path": str(Path(model_path).resolve()),
        "config_hash": io.sha256_file(Path(model_path, "config.json")),
        "dtype": spec["runtime"]["dtype"],
        "device": device,
        "device_name": device_label if device_label is not None else device_name(device),
        "inference_path": inference_path,
        "vision_encoder": vision_encoder,
        "preprocess": preprocess,
        "library_versions": io.library_versions(),
        "code_version": {"inference": INFERENCE_CODE_VERSION, "git_commit": io.git_commit()},
        "fingerprint": cell_fingerprint(spec, manifest_sha256, importance_sha256, kept_blocks),
        "manifest_sha256": manifest_sha256,
        "importance_sha256": importance_sha256,
        "kept_blocks": [int(b) for b in kept_blocks],
        "spec": spec,
        "host": platform.node(),
        # Which of the host's GPUs measured the cell (set per job with several GPUs: knobsweep.gpu_slots).
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "overhead_s": {
            "load": load_s,
            "warmup": warmup_s,
            "samples": samples_s,
            "model_reused": bool(model_reused),
            "client_s": client_s,
        },
    }


def write_shard(rows: pd.DataFrame, path: str | os.PathLike, provenance: dict[str, Any]) -> None:
    """Write the shard atomically with its provenance under the b"knobsweep" metadata key."""
    missing = [c for c in SHARD_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"{path}: shard rows lack the columns {missing}")
    io.write_parquet_atomic(
        rows[list(SHARD_COLUMNS)], path, {io.PROVENANCE_KEY: io.canonical_json(provenance)}
    )


def check_setting(adapter: Any, setting: KnobSetting) -> None:
    """Re-check the knobs against the loaded model (the DAG-time check reads only its JSON files)."""
    low, high = adapter.vision_token_range()
    problems = []
    if not low <= setting.vision_tokens <= high:
        problems.append(f"vision_tokens={setting.vision_tokens} outside the model's range {low}..{high}")
    if setting.top_k > adapter.num_experts:
        problems.append(f"top_k={setting.top_k} above the model's {adapter.num_experts} experts")
    if setting.active_blocks > adapter.num_blocks:
        problems.append(
            f"active_blocks={setting.active_blocks} above the model's {adapter.num_blocks} blocks"
        )
    if problems:
        raise ValueError(f"{setting.cell_id()}: " + "; ".join(problems))


def load_adapter(runtime: dict[str, Any], *, model_path: str, device: str, what: str) -> tuple[Any, float]:
    """Load the model of a spec's `runtime` section; returns the adapter and the load time in seconds."""
    from knobsweep.models import load_model

    start = time.monotonic()
    adapter = load_model(
        model_path,
        device=device,
        dtype=runtime["dtype"],
        attn_implementation=runtime["attn_implementation"],
        experts_implementation=runtime["experts_implementation"],
        trust_remote_code=runtime["trust_remote_code"],
        inference_path=runtime.get("inference_path", "auto"),
    )
    keep_out_of_garbage_collection()
    load_s = time.monotonic() - start
    log.info("%s: model loaded in %.1f s", what, load_s)
    return adapter, load_s


def keep_out_of_garbage_collection() -> None:
    """Move everything allocated so far (the loaded model above all: it lives as long as its process) out of the
    garbage collector's generations, so that full collections stop walking it. torch 2.11 collects before every
    CUDA-graph capture and `fast_path.capture_graph` does too: with the real-size model loaded each full
    collection took ~0.35 s, two per capture, several captures per knob change. Objects made later, such as a
    cell's decoders and their graphs, are collected as before."""
    gc.collect()
    gc.freeze()


def reset_random_state() -> None:
    """Seed torch before each cell or importance run: decoding is greedy, so nothing should draw random
    numbers, but if anything did, a run in a model worker that ran other tasks before would still match a
    fresh process."""
    import torch

    torch.manual_seed(0)


def run_loaded_cell(
    adapter: Any,
    spec: dict[str, Any],
    *,
    manifest_path: str,
    importance_path: str,
    progress_every_s: float = 30.0,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[pd.DataFrame, tuple[int, ...]]:
    """Everything a cell job does with a loaded model: check the knobs against it, select the kept blocks
    from the importance file, run the cell. Returns the rows (`attrs`: warmup_s, samples_s) and the kept
    blocks. Shared by the in-process job and the model worker."""
    import json

    from knobsweep.knobs import select_blocks
    from knobsweep.workloads.manifest import read_manifest

    setting = KnobSetting(**spec["knobs"])
    check_setting(adapter, setting)
    with open(importance_path) as f:
        importance = json.load(f)
    if importance["num_blocks"] != adapter.num_blocks:
        raise ValueError(
            f"{importance_path}: importance of {importance['num_blocks']} blocks, "
            f"the model has {adapter.num_blocks}"
        )
    kept_blocks = select_blocks(importance["selection_score"], setting.active_blocks, **spec["blocks"])
    manifest = read_manifest(manifest_path)
    reset_random_state()
    vision_before = adapter.vision_encoder_mode()
    rows = run_cell(
        adapter,
        manifest,
        setting,
        kept_blocks,
        workload=spec["workload"],
        max_new_tokens=spec["generation"]["max_new_tokens"],
        warmup=spec["warmup"],
        progress_every_s=progress_every_s,
        should_stop=should_stop,
    )
    rows.attrs["inference_path"] = adapter.inference_path  # "auto" resolved for this device
    vision = adapter.vision_encoder_mode()
    if vision != vision_before:  # a vision graph failed during this cell: its first samples ran graphed
        vision = f"graphed, then from part-way through this cell {vision}"
    rows.attrs["vision_encoder"] = vision
    rows.attrs["preprocess"] = adapter.preprocess_mode()
    return rows, tuple(kept_blocks)


def finish_cell(
    spec: dict[str, Any],
    rows: pd.DataFrame,
    kept_blocks: Sequence[int],
    *,
    model_path: str,
    device: str,
    manifest_path: str,
    importance_path: str,
    out_path: str,
    load_s: float,
    warmup_s: float,
    samples_s: float,
    model_reused: bool,
    started: float,
    device_label: str | None = None,
    inference_path: str | None = None,
    vision_encoder: str | None = None,
    preprocess: str | None = None,
) -> dict[str, Any]:
    """Write the cell's shard with its provenance (`started`: time.monotonic() at the job's start).
    Returns the provenance."""
    provenance = cell_provenance(
        spec,
        model_path=model_path,
        manifest_path=manifest_path,
        importance_path=importance_path,
        kept_blocks=kept_blocks,
        device=device,
        load_s=load_s,
        warmup_s=warmup_s,
        samples_s=samples_s,
        model_reused=model_reused,
        client_s=time.monotonic() - started,
        device_label=device_label,
        inference_path=inference_path,
        vision_encoder=vision_encoder,
        preprocess=preprocess,
    )
    write_shard(rows, out_path, provenance)
    log.info(
        "%s: load %.1f s%s, warm-up %.1f s (%d samples), %d samples in %.1f s, job %.1f s",
        KnobSetting(**spec["knobs"]).cell_id(),
        load_s,
        " (model reused)" if model_reused else "",
        warmup_s,
        spec["warmup"],
        len(rows),
        samples_s,
        time.monotonic() - started,
    )
    return provenance


def run_cell_job(
    spec: dict[str, Any],
    *,
    model_path: str,
    device: str,
    manifest_path: str,
    importance_path: str,
    out_path: str,
    progress_every_s: float = 30.0,
) -> dict[str, Any]:
    """One cell job in this process: load the model, select the kept blocks, run the cell, write its
    shard. Returns the provenance written. (`knobsweep.worker.run_cell_in_worker` does the same with the
    model kept loaded in a worker process.)"""
    started = time.monotonic()
    what = f"{spec['workload']} {KnobSetting(**spec['knobs']).cell_id()}"
    adapter, load_s = load_adapter(spec["runtime"], model_path=model_path, device=device, what=what)
    rows, kept_blocks = run_loaded_cell(
        adapter,
        spec,
        manifest_path=manifest_path,
        importance_path=importance_path,
        progress_every_s=progress_every_s,
    )
    return finish_cell(
        spec,
        rows,
        kept_blocks,
        model_path=model_path,
        device=device,
        manifest_path=manifest_path,
        importance_path=importance_path,
        out_path=out_path,
        load_s=load_s,
        warmup_s=rows.attrs["warmup_s"],
        samples_s=rows.attrs["samples_s"],
        model_reused=False,
        started=started,
        inference_path=rows.attrs["inference_path"],
        vision_encoder=rows.attrs["vision_encoder"],
        preprocess=rows.attrs["preprocess"],
    )
