"""Score one cell: shard rows + workload manifest -> per-sample quality and the cell's corpus metrics."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from knobsweep.metrics.captions import CAPTION_METRICS, score_captions
from knobsweep.metrics.vqa import score_vqa

WORKLOAD_METRICS = {"qa": ("vqa_accuracy",), "captioning": CAPTION_METRICS}


def _check_metric(workload: str, quality_metric: str) -> None:
    if workload not in WORKLOAD_METRICS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {tuple(WORKLOAD_METRICS)}")
    if quality_metric not in WORKLOAD_METRICS[workload]:
        raise ValueError(
            f"quality_metric {quality_metric!r} is not a metric of workload {workload!r}; "
            f"expected one of {WORKLOAD_METRICS[workload]}"
        )


def _eval_samples(rows: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's eval rows in the order of ``rows``; errors unless the shard covers them exactly."""
    for name, frame, needed in (
        ("shard rows", rows, ("sample_id", "prediction")),
        ("manifest", manifest, ("sample_id", "split", "references", "answer_type", "question_type")),
    ):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} lack column(s) {missing}; have {list(frame.columns)}")
        duplicated = frame["sample_id"][frame["sample_id"].duplicated()].unique().tolist()
        if duplicated:
            raise ValueError(f"{name} repeat sample_id(s) {duplicated[:10]}")

    eval_manifest = manifest[manifest["split"] == "eval"].set_index("sample_id")
    if eval_manifest.empty:
        raise ValueError(
            f"manifest has no split == 'eval' rows (splits: {sorted(manifest['split'].unique())})"
        )
    shard_ids = set(rows["sample_id"])
    unknown = sorted(shard_ids - set(eval_manifest.index))
    if unknown:
        raise ValueError(
            f"{len(unknown)} shard sample_id(s) are not eval samples of the manifest: {unknown[:10]}"
        )
    uncovered = sorted(set(eval_manifest.index) - shard_ids)
    if uncovered:
        raise ValueError(
            f"shard misses {len(uncovered)} of the manifest's {len(eval_manifest)} eval samples: "
            f"{uncovered[:10]}; every cell must be scored on the workload's full eval set"
        )
    return eval_manifest.loc[rows["sample_id"]]


def score_cell_rows(
    rows: pd.DataFrame,
    manifest: pd.DataFrame,
    *,
    workload: str,
    quality_metric: str,
    vqa_variant: str = "official",
    caption_metrics: Sequence[str] = CAPTION_METRICS,
) -> tuple[pd.DataFrame, dict]:
    """Add per-sample metric columns and ``quality`` to a cell shard's rows; return them and cell metrics.

    ``rows``: a cell shard (one row per eval sample: ``sample_id``, ``prediction``, ...). ``manifest``:
    the workload manifest; the shard must cover exactly its ``split == "eval"`` samples, so that every
    cell is scored on the same fixed sample set (CIDEr depends on the scored set).

    ``workload="qa"``: metric ``vqa_accuracy`` (``vqa_variant`` "official" or "lmms_eval"); the cell's
    value is the mean of the per-sample values; also ``by_answer_type`` and ``by_question_type``.
    ``workload="captioning"``: ``caption_metrics`` (``quality_metric`` is always computed); the cell's
    values are the pycocoevalcap corpus values, so corpus BLEU-4 (and METEOR) differ from the mean of
    their per-sample values, while CIDEr and ROUGE-L equal it.

    Returns ``(scored_rows, cell_metrics)`` with ``cell_metrics = {"quality_metric", "quality",
    "metrics": {name: corpus value}, "n_samples"}`` (+ the breakdowns and ``vqa_variant`` for qa).
    """
    _check_metric(workload, quality_metric)
    samples = _eval_samples(rows, manifest)
    scored = rows.copy()
    predictions = rows["prediction"].tolist()
    not_text = [sid for sid, p in zip(rows["sample_id"], predictions) if not isinstance(p, str)]
    if not_text:
        raise ValueError(
            f"shard rows have a non-str prediction (e.g. missing) for sample_id(s) {not_text[:10]}"
        )
    references = [list(r) for r in samples["references"]]  # Parquet lists arrive as numpy arrays

    if workload == "qa":
        per_sample, summary = score_vqa(
            predictions,
            references,
            samples["answer_type"].tolist(),
            question_types=samples["question_type"].tolist(),
            variant=vqa_variant,
        )
        scored["vqa_accuracy"] = per_sample
        metrics = {"vqa_accuracy": summary["vqa_accuracy"]}
        extra = {
            "by_answer_type": summary["by_answer_type"],
            "by_question_type": summary["by_question_type"],
            "vqa_variant": vqa_variant,
        }
    else:
        if isinstance(caption_metrics, str):
            caption_metrics = (caption_metrics,)
        names = tuple(dict.fromkeys([*caption_metrics, quality_metric]))
        ids = rows["sample_id"].tolist()
        metrics, per_sample = score_captions(
            dict(zip(ids, predictions)), dict(zip(ids, references)), metrics=names
        )
        for name in names:
            scored[name] = [per_sample[sid][name] for sid in ids]
        extra = {}

    scored["quality"] = scored[quality_metric]
    cell = {
        "quality_metric": quality_metric,
        "quality": metrics[quality_metric],
        "metrics": metrics,
        **extra,
        "n_samples": len(scored),
    }
    return scored, cell
