"""Block importance on a workload's calibration set: the drop in quality when one decoder block is skipped.

Quality is the workload's primary metric (VQA accuracy for `qa`, CIDEr for `captioning`) over the
calibration samples, first with every block, then with each block skipped alone.

Ties: on a small calibration set many blocks change no answer (QA) or move CIDEr by noise (captioning),
so several blocks share a drop. The tie-break is the prediction change rate, the fraction of calibration
samples whose prediction differs from the all-blocks prediction when the block is skipped: a block whose
removal changes more outputs is kept first. It costs no extra generation (the token log-likelihood of the
references would need a second, family-specific forward pass per sample). Remaining ties go to the lower
block index. The ranking is stored as `selection_score` (higher = keep first) for `knobs.select_blocks`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from knobsweep.cells import Abandoned, ProgressLog, load_image

if TYPE_CHECKING:
    import pandas as pd

QUALITY_METRIC = {"qa": "vqa_accuracy", "captioning": "cider"}

log = logging.getLogger(__name__)


def quality(
    workload: str, predictions: Sequence[str], samples: pd.DataFrame, *, vqa_variant: str = "official"
) -> float:
    """The workload's primary metric of `predictions` against the samples' references."""
    if workload == "qa":
        from knobsweep.metrics.vqa import score_vqa

        per_sample, _ = score_vqa(
            list(predictions),
            [list(r) for r in samples["references"]],
            list(samples["answer_type"]),
            variant=vqa_variant,
        )
        return float(sum(per_sample) / len(per_sample))
    if workload == "captioning":
        from knobsweep.metrics.captions import score_captions

        ids = list(samples["sample_id"])
        corpus, _ = score_captions(
            dict(zip(ids, predictions)),
            {i: list(r) for i, r in zip(ids, samples["references"])},
            metrics=("cider",),
        )
        return float(corpus["cider"])
    raise ValueError(f"unknown workload {workload!r}")


def _predict(
    adapter: Any,
    samples: pd.DataFrame,
    images: list,
    vision_tokens: int,
    max_new_tokens: int,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    predictions = []
    for image, prompt in zip(images, samples["prompt"]):
        if should_stop is not None and should_stop():
            raise Abandoned("importance: abandoned, the requester is gone")
        result = adapter.generate(image, prompt, vision_tokens=vision_tokens, max_new_tokens=max_new_tokens)
        predictions.append(result.text)
    return predictions


def block_importance(
    adapter: Any,
    manifest: pd.DataFrame,
    *,
    workload: str,
    vision_tokens: int,
    top_k: int | None,
    max_new_tokens: int,
    vqa_variant: str = "official",
    progress_every_s: float = 10.0,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Importance of every decoder block on the manifest's calibration samples (see the module docstring).
    `should_stop` is polled before every generation (see `knobsweep.cells.run_cell`)."""
    samples = manifest[manifest["split"] == "calibration"].reset_index(drop=True)
    if samples.empty:
        raise ValueError(f"{workload}: the manifest has no calibration samples")
    images = [load_image(p) for p in samples["image_path"]]
    num_blocks = int(adapter.num_blocks)
    top_k = int(top_k if top_k is not None else adapter.default_top_k)
    progress = ProgressLog(f"{workload} importance", (num_blocks + 1) * len(samples), progress_every_s)
    start = time.monotonic()
    try:
        adapter.configure(top_k=top_k, active_blocks=list(range(num_blocks)))
        baseline_predictions = _predict(adapter, samples, images, vision_tokens, max_new_tokens, should_stop)
        baseline = quality(workload, baseline_predictions, samples, vqa_variant=vqa_variant)
        progress.update(len(samples))
        blocks = []
        for skipped in range(num_blocks):
            adapter.configure(top_k=top_k, active_blocks=[b for b in range(num_blocks) if b != skipped])
            predictions = _predict(adapter, samples, images, vision_tokens, max_new_tokens, should_stop)
            q = quality(workload, predictions, samples, vqa_variant=vqa_variant)
            changed = sum(p != b for p, b in zip(predictions, baseline_predictions)) / len(samples)
            blocks.append(
                {
                    "block": skipped,
                    "quality": q,
                    "importance": baseline - q,
                    "prediction_change_rate": changed,
                }
            )
            progress.update((skipped + 2) * len(samples))
    finally:
        adapter.reset()
    ranking = sorted(
        range(num_blocks), key=lambda b: (-blocks[b]["importance"], -blocks[b]["prediction_change_rate"], b)
    )
    selection_score = [0.0] * num_blocks
    for position, block in enumerate(ranking):
        selection_score[block] = float(num_blocks - position)
    return {
        "workload": workload,
        "quality_metric": QUALITY_METRIC[workload],
        "baseline_quality": baseline,
        "n_calibration": len(samples),
        "num_blocks": num_blocks,
        "vision_tokens": vision_tokens,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "importance": [b["importance"] for b in blocks],
        "prediction_change_rate": [b["prediction_change_rate"] for b in blocks],
        "ranking": ranking,
        "selection_score": selection_score,
        "tie_break": "prediction_change_rate (higher first), then lower block index",
        "blocks": blocks,
        "elapsed_s": time.monotonic() - start,
    }


def importance_of_loaded(
    adapter: Any,
    spec: dict[str, Any],
    *,
    manifest_path: str,
    progress_every_s: float = 30.0,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Everything the importance job does with a loaded model (shared by the in-process job and the model
    worker): check the vision budget against the model, compute the importance. No provenance yet."""
    from knobsweep.cells import reset_random_state
    from knobsweep.workloads.manifest import read_manifest

    settings = spec["importance"]
    low, high = adapter.vision_token_range()
    if not low <= settings["vision_tokens"] <= high:
        raise ValueError(
            f"importance: vision_tokens={settings['vision_tokens']} outside the model's range {low}..{high}"
        )
    reset_random_state()
    return block_importance(
        adapter,
        read_manifest(manifest_path),
        workload=spec["manifest"]["workload"],
        vision_tokens=settings["vision_tokens"],
        top_k=settings["top_k"],
        max_new_tokens=settings["max_new_tokens"],
        progress_every_s=progress_every_s,
        should_stop=should_stop,
    )


def write_importance(
    result: dict[str, Any],
    spec: dict[str, Any],
    *,
    model_path: str,
    device: str,
    manifest_path: str,
    out_path: str,
    load_s: float,
    model_reused: bool,
    started: float,
    device_label: str | None = None,
) -> dict[str, Any]:
    """Add the provenance to `result` and write it atomically (`started`: time.monotonic() at the job's
    start; `device_label`: the device's name when read in the model worker)."""
    from knobsweep import io
    from knobsweep.cells import INFERENCE_CODE_VERSION, device_name

    manifest_sha256 = io.sha256_file(manifest_path)
    result["provenance"] = {
        "model_path": str(model_path),
        "config_hash": io.sha256_file(f"{model_path}/config.json"),
        "device_name": device_label if device_label is not None else device_name(device),
        "library_versions": io.library_versions(),
        "code_version": {"inference": INFERENCE_CODE_VERSION, "git_commit": io.git_commit()},
        "manifest_sha256": manifest_sha256,
        "fingerprint": io.fingerprint({"spec": spec, "manifest_sha256": manifest_sha256}),
        "spec": spec,
        "overhead_s": {
            "load": load_s,
            "model_reused": bool(model_reused),
            "client_s": time.monotonic() - started,
        },
    }
    io.write_json_atomic(result, out_path)
    return result


def importance_job(
    spec: dict[str, Any],
    *,
    model_path: str,
    device: str,
    manifest_path: str,
    out_path: str,
    progress_every_s: float = 30.0,
) -> dict[str, Any]:
    """The importance job in this process: load the model, compute block importance, write the JSON
    atomically. (`knobsweep.worker.importance_in_worker` does the same in the model worker.)"""
    from knobsweep.cells import load_adapter

    started = time.monotonic()
    what = f"{spec['manifest']['workload']} importance"
    adapter, load_s = load_adapter(spec["runtime"], model_path=model_path, device=device, what=what)
    result = importance_of_loaded(
        adapter, spec, manifest_path=manifest_path, progress_every_s=progress_every_s
    )
    return write_importance(
        result,
        spec,
        model_path=model_path,
        device=device,
        manifest_path=manifest_path,
        out_path=out_path,
        load_s=load_s,
        model_reused=False,
        started=started,
    )
