"""Constructed scored rows and shards (no model, no GPU) for tests and for trying the analysis.

The default response surfaces are made up: both workloads gain quality from every knob, but with
different couplings, and latency grows with vision_tokens x active_blocks (prefill) and top_k x
active_blocks (decode), so the study's questions have non-trivial answers on this data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .defaults import KNOBS

# (workload, x_v, x_k, x_b) with x = knob / grid max -> mean quality / mean latency (ms)
MeanFn = Callable[[str, float, float, float], float]


def default_quality(workload: str, xv: float, xk: float, xb: float) -> float:
    if workload == "qa":
        return 0.2 + 0.3 * xb**0.5 + 0.1 * xk + 0.25 * xv * xb
    return 0.1 + 0.5 * xb * xk + 0.3 * xv**0.5 * xk


def default_latency(workload: str, xv: float, xk: float, xb: float) -> float:
    decode_tokens = 3.0 if workload == "captioning" else 1.0
    return 5.0 + 30.0 * xb * (0.2 + xv) + decode_tokens * 8.0 * xb * (0.3 + xk)


def synthetic_rows(
    *,
    vision_tokens: Sequence[int] = (64, 144, 256),
    top_k: Sequence[int] = (1, 2, 4),
    active_blocks: Sequence[int] = (4, 8, 12),
    workloads: Sequence[str] = ("qa", "captioning"),
    n_samples: int = 40,
    seed: int = 0,
    quality_fn: MeanFn = default_quality,
    latency_fn: MeanFn = default_latency,
    quality_noise: float = 0.15,
    latency_noise: float = 0.1,
) -> pd.DataFrame:
    """Per-sample scored rows with the scored-shard columns for every cell of the full grid."""
    rng = np.random.default_rng(seed)
    vmax, kmax, bmax = max(vision_tokens), max(top_k), max(active_blocks)
    frames = []
    for workload in workloads:
        for v in vision_tokens:
            for k in top_k:
                for b in active_blocks:
                    x = (v / vmax, k / kmax, b / bmax)
                    q = quality_fn(workload, *x) + quality_noise * rng.standard_normal(n_samples)
                    lat = latency_fn(workload, *x) * np.exp(latency_noise * rng.standard_normal(n_samples))
                    stage = lat / 5.0
                    df = pd.DataFrame(
                        {
                            "workload": workload,
                            "vision_tokens": v,
                            "top_k": k,
                            "active_blocks": b,
                            "kept_blocks": [list(range(b))] * n_samples,
                            "sample_id": [f"{workload}-{i:04d}" for i in range(n_samples)],
                            "prediction": "a",
                            "vision_tokens_actual": v,
                            "prompt_tokens": v + 12,
                            "output_tokens": 12 if workload == "captioning" else 2,
                            "preprocess_ms": stage,
                            "vision_ms": stage,
                            "prefill_ms": stage,
                            "decode_ms": 2 * stage,
                            "ttft_ms": 3 * stage,
                            "latency_ms": lat,
                            "quality": q,
                        }
                    )
                    if workload == "qa":
                        df["vqa_accuracy"] = q
                    else:
                        df["cider"] = q
                        for i, metric in enumerate(("bleu4", "rouge_l", "meteor")):
                            df[metric] = np.clip(
                                0.4 * q + 0.1 * i + 0.05 * rng.standard_normal(n_samples), 0, 1
                            )
                    frames.append(df)
    return pd.concat(frames, ignore_index=True)


def write_scored_shards(
    rows: pd.DataFrame,
    run_dir: str | Path,
    *,
    model: str = "tiny-model",
    manifest: str = "manifest-v1",
    vision_encoder: str = "as loaded",
    preprocess: str = "image placeholders expanded on token ids",
) -> list[Path]:
    """Write rows as scored shards run_dir/scored/{workload}/vt{V}_k{K}_b{B}.parquet with metadata."""
    paths = []
    for (workload, v, k, b), group in rows.groupby(["workload", *KNOBS]):
        metric = "vqa_accuracy" if workload == "qa" else "cider"
        metric_cols = [
            c
            for c in ("vqa_accuracy", "cider", "bleu4", "rouge_l", "meteor")
            if c in group and group[c].notna().all()
        ]
        metrics = {c: float(group[c].mean()) for c in metric_cols}
        scores = {
            "quality_metric": metric,
            "quality": metrics[metric],
            "metrics": metrics,
            "n_samples": len(group),
        }
        # Shaped like knobsweep.cells.cell_provenance (the keys aggregation compares).
        provenance = {
            "model_path": f"/models/{model}",
            "config_hash": f"sha-{model}",
            "dtype": "float32",
            "manifest_sha256": f"{manifest}-{workload}",
            "spec": {
                "runtime": {"model": {"name": model}, "dtype": "float32"},
                "manifest": {"workload": workload, "n_eval": len(group)},
            },
            "fingerprint": f"{model}-{workload}-{v}-{k}-{b}",
            "device_name": "cpu",
            "inference_path": "eager",
            "vision_encoder": vision_encoder,
            "preprocess": preprocess,
        }
        table = pa.Table.from_pandas(
            group.dropna(axis=1, how="all").reset_index(drop=True), preserve_index=False
        )
        table = table.replace_schema_metadata(
            {
                **(table.schema.metadata or {}),
                b"knobsweep_scores": json.dumps(scores).encode(),
                b"knobsweep": json.dumps(provenance).encode(),
            }
        )
        path = Path(run_dir) / "scored" / workload / f"vt{v}_k{k}_b{b}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        paths.append(path)
    return paths
