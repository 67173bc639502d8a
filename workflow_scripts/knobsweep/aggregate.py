"""Scored shards -> one record per cell with bootstrap intervals (e2_knob_grid_results.json) + all rows."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .analysis.bootstrap import CELL_KEYS, STATISTICS, bootstrap_cells, percentile_interval
from .analysis.defaults import KNOBS, WORKLOADS
from .io import PROVENANCE_KEY, SCORES_KEY
from .knobs import KnobSetting

METRICS: tuple[str, ...] = ("vqa_accuracy", "cider", "bleu4", "rouge_l", "meteor")
STAGES: tuple[str, ...] = ("preprocess", "vision", "prefill", "decode", "ttft")
REQUIRED_COLUMNS: tuple[str, ...] = (
    *CELL_KEYS,
    "kept_blocks",
    "sample_id",
    "prediction",
    "vision_tokens_actual",
    "prompt_tokens",
    "output_tokens",
    *(f"{s}_ms" for s in STAGES),
    "latency_ms",
    "quality",
)
QUALITY_CI_METHOD = (
    "percentile bootstrap of the mean of per-sample `quality` values, resampling samples with replacement "
    "within each cell; per-sample values were scored once on the cell's full sample set, so for CIDEr-D the "
    "document frequencies stay those of the full set (corpus CIDEr-D and VQA accuracy equal the mean of the "
    "per-sample values; the corpus BLEU/METEOR values are not resampled)"
)
LATENCY_CI_METHOD = (
    "percentile bootstrap of each latency statistic (mean; P50/P95/P99 by numpy linear interpolation), "
    "resampling samples with replacement within each cell; latency_n_samples requests behind every "
    "percentile, latency_pXX_tail_n of them at or above the estimate"
)
_CELL_FILE = re.compile(r"^vt(\d+)_k(\d+)_b(\d+)$")
# Provenance entries that say how a cell's latencies were measured: the card, the inference path, how its
# requests ran the vision encoder (a vision graph may fall back to the forward as loaded) and how they expanded
# the image placeholders (on token ids, or by the processor where the two differed). Cells compared on one
# frontier should agree on them; they are recorded per cell, listed per workload, and a warning names the
# setups where a workload's cells differ (latencies measured differently are not comparable).
MEASUREMENT_KEYS: tuple[str, ...] = ("device_name", "inference_path", "vision_encoder", "preprocess")
# A cell whose median host probe (`host_probe_us`, timed before each request) is this many times the run's usual
# one (the median over its cells), or as many times below it, was measured while the host ran Python at another
# speed than during most cells: its host-bound stages (preprocess above all) read high (or low) beside theirs.
# The H200 hosts measured here switched between two speeds ~1.5-2x apart within minutes; a steady host keeps the
# cells within ~10 % of each other.
HOST_SPEED_RATIO = 1.25

log = logging.getLogger(__name__)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# Provenance entries (flattened, dotted) that must agree: on the model across all shards, on the manifest
# across the shards of a workload. model_path counts only when no path-independent identity is recorded
# (the same model may live at different paths on different machines).
MODEL_KEYS: tuple[str, ...] = ("config_hash", "spec.runtime.")
MODEL_FALLBACK_KEYS: tuple[str, ...] = ("model_path", "model")
ALWAYS_MODEL_KEYS: tuple[str, ...] = ("dtype",)
MANIFEST_KEYS: tuple[str, ...] = ("manifest_sha256", "spec.manifest.", "manifest")


def _identity_keys(provenance: dict[str, Any], group: str) -> dict[str, Any]:
    """Provenance entries naming the model (`group`="model") or the manifest ("manifest")."""
    flat = _flatten(provenance)

    def pick(prefixes: tuple[str, ...]) -> dict[str, Any]:
        return {
            k: json.dumps(v, sort_keys=True)
            for k, v in flat.items()
            if any(k == p or (p.endswith(".") and k.startswith(p)) for p in prefixes)
        }

    if group == "manifest":
        return pick(MANIFEST_KEYS)
    return (pick(MODEL_KEYS) or pick(MODEL_FALLBACK_KEYS)) | pick(ALWAYS_MODEL_KEYS)


def read_scored_shard(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """(rows, corpus scores, provenance) of one scored shard; checks columns and that the file name and
    directory agree with the rows' knobs and workload."""
    path = Path(path)
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if SCORES_KEY not in meta:
        raise ValueError(
            f"{path}: Parquet metadata lacks the {SCORES_KEY.decode()!r} key (not a scored shard?)"
        )
    scores = json.loads(meta[SCORES_KEY])
    provenance = json.loads(meta[PROVENANCE_KEY]) if PROVENANCE_KEY in meta else {}
    rows = table.to_pandas()
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"{path}: scored shard lacks columns {missing}")
    if rows.empty:
        raise ValueError(f"{path}: scored shard has no rows")
    for col in CELL_KEYS:
        if rows[col].nunique() != 1:
            raise ValueError(f"{path}: column {col!r} holds several values {sorted(rows[col].unique())}")
    m = _CELL_FILE.match(path.stem)
    if m:
        from_name = tuple(int(x) for x in m.groups())
        from_rows = tuple(int(rows[k].iloc[0]) for k in KNOBS)
        if from_name != from_rows:
            raise ValueError(f"{path}: file name says knobs {from_name} but rows hold {from_rows}")
    if path.parent.name in WORKLOADS and path.parent.name != rows["workload"].iloc[0]:
        raise ValueError(
            f"{path}: directory says workload {path.parent.name!r}, rows hold {rows['workload'].iloc[0]!r}"
        )
    for col in ("quality", "latency_ms"):
        bad = rows[col].isna() | ~np.isfinite(rows[col].astype(float))
        if bad.any():
            raise ValueError(
                f"{path}: column {col!r} is missing or not finite for sample_id "
                f"{rows.loc[bad, 'sample_id'].iloc[0]!r} ({int(bad.sum())} rows)"
            )
    if rows["sample_id"].duplicated().any():
        raise ValueError(
            f"{path}: duplicate sample_id {rows.loc[rows['sample_id'].duplicated(), 'sample_id'].iloc[0]!r}"
        )
    return rows, scores, provenance


def _cell_key(row: pd.Series) -> tuple[str, int, int, int]:
    return (str(row["workload"]), *(int(row[k]) for k in KNOBS))


def _check_provenance(shards: list[tuple[Path, str, dict[str, Any]]]) -> list[str]:
    """Refuse shards whose provenance disagrees on the model (all shards) or the manifest (per workload)."""
    checked: set[str] = set()

    def compare(group: list[tuple[Path, str, dict[str, Any]]], word: str) -> None:
        ids = [(p, _identity_keys(prov, word)) for p, _, prov in group]
        keys = sorted(set().union(*(k for _, k in ids)))
        checked.update(keys)
        for key in keys:
            first_path, first = ids[0][0], ids[0][1].get(key)
            for p, other in ids[1:]:
                if other.get(key) != first:
                    raise ValueError(
                        f"shards disagree on provenance {key!r}: {first_path} has {first}, {p} has "
                        f"{other.get(key)}; refusing to aggregate cells from different {word}s"
                    )

    compare(shards, "model")
    for workload in sorted({w for _, w, _ in shards}):
        compare([s for s in shards if s[1] == workload], "manifest")
    return sorted(checked)


def aggregate_cells(
    scored_paths: Iterable[str | os.PathLike],
    *,
    run: str,
    n_bootstrap: int,
    seed: int,
    ci_level: float = 0.95,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Per-cell records (quality, every metric, latency statistics, stage means, counts, bootstrap
    intervals) and the concatenated per-sample rows of all scored shards."""
    paths = sorted(Path(p) for p in scored_paths)
    if not paths:
        raise ValueError("aggregate_cells: no scored shards given")
    frames, corpus, shard_info = [], {}, []
    for path in paths:
        rows, scores, provenance = read_scored_shard(path)
        key = _cell_key(rows.iloc[0])
        if key in corpus:
            raise ValueError(f"two scored shards for cell {key}: {corpus[key]['path']} and {path}")
        n_meta = scores.get("n_samples")
        if n_meta is not None and int(n_meta) != len(rows):
            raise ValueError(
                f"{path}: knobsweep_scores says n_samples={n_meta} but the shard has {len(rows)} rows"
            )
        corpus[key] = {"path": path, "scores": scores, "provenance": provenance}
        shard_info.append((path, str(key[0]), provenance))
        frames.append(rows)
    checked_keys = _check_provenance(shard_info)
    all_rows = pd.concat(frames, ignore_index=True)

    reps = bootstrap_cells(all_rows, n_bootstrap=n_bootstrap, seed=seed)
    intervals = {name: percentile_interval(reps.stats[name], ci_level) for name in STATISTICS}
    records = []
    groups = {_cell_key(g.iloc[0]): g for _, g in all_rows.groupby(list(CELL_KEYS), sort=False)}
    for i, cell in reps.cells.iterrows():
        key = _cell_key(cell)
        info = corpus[key]
        scores = info["scores"]
        group = groups[key]
        quality_metric = scores.get("quality_metric")
        if quality_metric is None:
            raise ValueError(f"{info['path']}: knobsweep_scores lacks 'quality_metric'")
        metrics = dict(scores.get("metrics", {}))
        quality = scores.get("quality", metrics.get(quality_metric))
        if quality is None:
            raise ValueError(
                f"{info['path']}: knobsweep_scores has neither 'quality' nor metrics[{quality_metric!r}]"
            )
        kept = group["kept_blocks"].iloc[0]
        lat = group["latency_ms"].to_numpy(float)
        q = group["quality"].to_numpy(float)
        rec: dict[str, Any] = dict(zip(CELL_KEYS, key))
        rec.update(
            kept_blocks=[int(b) for b in kept],
            quality_metric=quality_metric,
            quality=float(quality),
            quality_sample_mean=float(q.mean()),
        )
        for metric in METRICS:
            if metric in metrics:
                rec[metric] = metrics[metric]
        if "by_answer_type" in scores:  # VQA accuracy per answer type (yes/no, number, other)
            rec["by_answer_type"] = scores["by_answer_type"]
        for name, fn in STATISTICS.items():
            if name != "quality":
                rec[name] = float(fn(q, lat))
        for stage in STAGES:
            rec[f"{stage}_ms_mean"] = float(group[f"{stage}_ms"].astype(float).mean())
        for col in ("vision_tokens_actual", "prompt_tokens", "output_tokens"):
            rec[f"{col}_mean"] = float(group[col].astype(float).mean())
        rec["n_samples"] = len(group)
        rec["latency_n_samples"] = len(lat)
        for p in (95, 99):
            rec[f"latency_p{p}_tail_n"] = int((lat >= rec[f"latency_p{p}_ms"]).sum())
        for name in STATISTICS:
            low, high = intervals[name]
            rec[f"{name}_ci_low"], rec[f"{name}_ci_high"] = float(low[i]), float(high[i])
        rec["shard"] = str(info["path"])
        rec["fingerprint"] = info["provenance"].get("fingerprint")
        rec.update({k: info["provenance"].get(k) for k in MEASUREMENT_KEYS})
        # Shards written before code version 12 have no host probe.
        probe = group["host_probe_us"].astype(float) if "host_probe_us" in group else None
        rec["host_probe_us_median"] = float(probe.median()) if probe is not None else None
        records.append(rec)
    host_speed = _host_speed(records)

    workloads = {}
    for workload, group in all_rows.groupby("workload"):
        sample_sets = group.groupby(list(KNOBS))["sample_id"].apply(frozenset)
        metrics_seen = sorted({r["quality_metric"] for r in records if r["workload"] == workload})
        if len(metrics_seen) != 1:
            raise ValueError(f"workload {workload!r}: cells use different quality metrics {metrics_seen}")
        setups = _measurement_setups([r for r in records if r["workload"] == workload])
        if len(setups) > 1:
            log.warning(
                "workload %r: its cells' latencies were measured in %d different ways %s: compare them with care",
                workload,
                len(setups),
                setups,
            )
        workloads[workload] = {
            "quality_metric": metrics_seen[0],
            "n_cells": len(sample_sets),
            "same_samples_in_every_cell": bool(sample_sets.nunique() == 1),
            "measurement_setups": setups,
        }
    result = {
        "run": run,
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "ci_level": float(ci_level),
        "quality_ci_method": QUALITY_CI_METHOD,
        "latency_ci_method": LATENCY_CI_METHOD,
        "provenance_keys_checked": checked_keys,
        "workloads": workloads,
        "host_speed": host_speed,
        "cells": records,
    }
    return result, all_rows


def _host_speed(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Each cell's `host_probe_ratio` (its median host probe over the run's usual one, the median over cells; > 1:
    the host ran slower) into the records, and the cells at HOST_SPEED_RATIO or more either way; logs a warning
    naming them."""
    probes = [r["host_probe_us_median"] for r in records if r["host_probe_us_median"] is not None]
    usual = float(np.median(probes)) if probes else None
    off = []
    for rec in records:
        probe = rec["host_probe_us_median"]
        rec["host_probe_ratio"] = probe / usual if probe is not None and usual else None
        ratio = rec["host_probe_ratio"]
        if ratio is not None and (ratio >= HOST_SPEED_RATIO or ratio <= 1 / HOST_SPEED_RATIO):
            cell = KnobSetting(*(int(rec[k]) for k in KNOBS)).cell_id()
            off.append({"workload": rec["workload"], "cell": cell, "host_probe_ratio": ratio})
    if off:
        log.warning(
            "%d cell(s) were measured while the host ran Python >= %.2fx slower or faster than during most "
            "cells (ratio > 1: slower); their host-bound stages (preprocess) are not comparable: %s",
            len(off),
            HOST_SPEED_RATIO,
            ", ".join(f"{c['workload']} {c['cell']} ({c['host_probe_ratio']:.2f})" for c in off),
        )
    return {
        "usual_probe_us": usual,
        "speed_ratio": HOST_SPEED_RATIO,
        "cells_at_another_host_speed": off,
        "cells_without_probe": len(records) - len(probes),
    }


def _measurement_setups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct (MEASUREMENT_KEYS) setups of these cell records, each with its number of cells."""
    counts: dict[str, int] = {}
    for rec in records:
        key = json.dumps({k: rec.get(k) for k in MEASUREMENT_KEYS}, sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    return [{**json.loads(key), "n_cells": n} for key, n in sorted(counts.items())]


def load_cells(results: dict[str, Any] | str | os.PathLike) -> pd.DataFrame:
    """e2_knob_grid_results.json (or its loaded dict) as a DataFrame with one row per cell."""
    if not isinstance(results, dict):
        with open(results) as fh:
            results = json.load(fh)
    cells = pd.DataFrame(results["cells"])
    if cells.empty:
        raise ValueError("e2_knob_grid_results holds no cells")
    return cells.sort_values(list(CELL_KEYS)).reset_index(drop=True)


__all__: Sequence[str] = ("aggregate_cells", "load_cells", "read_scored_shard")
