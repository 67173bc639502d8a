"""score_cell_rows: shard rows + manifest -> scored rows and cell metrics, for both workloads.

The manifest and shard here are small stand-ins built to the columns of docs/architecture.md and
round-tripped through Parquet, so references arrive as Parquet lists do (numpy arrays).
"""

import shutil

import pandas as pd
import pytest
from knobsweep.metrics.captions import score_captions
from knobsweep.scoring import score_cell_rows


def parquet_roundtrip(frame: pd.DataFrame, tmp_path, name: str) -> pd.DataFrame:
    path = tmp_path / f"{name}.parquet"
    frame.to_parquet(path, index=False)
    return pd.read_parquet(path)


def manifest_frame(samples: list[dict], workload: str) -> pd.DataFrame:
    rows = []
    for i, s in enumerate(samples):
        rows.append(
            {
                "sample_id": s["sample_id"],
                "split": s.get("split", "eval"),
                "image_id": i,
                "image_path": f"/data/img{i}.jpg",
                "image_width": 64,
                "image_height": 64,
                "question": s.get("question", ""),
                "question_id": i if workload == "qa" else -1,
                "prompt": "p",
                "references": s["references"],
                "answer_type": s.get("answer_type", ""),
                "question_type": s.get("question_type", ""),
            }
        )
    return pd.DataFrame(rows)


def shard_frame(predictions: dict[str, str], workload: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "workload": workload,
            "vision_tokens": 64,
            "top_k": 2,
            "active_blocks": 4,
            "sample_id": list(predictions),
            "prediction": list(predictions.values()),
            "latency_ms": [10.0 + i for i in range(len(predictions))],
        }
    )


QA_SAMPLES = [
    {"sample_id": "q1", "references": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
    {
        "sample_id": "q2",
        "references": ["2"] * 2 + ["3"] * 8,
        "answer_type": "number",
        "question_type": "how many",
    },
    {
        "sample_id": "q3",
        "references": ["dog"] * 1 + ["cat"] * 9,
        "answer_type": "other",
        "question_type": "what",
    },
    {"sample_id": "q4", "references": ["black"] * 10, "answer_type": "other", "question_type": "what color"},
    {"sample_id": "c1", "split": "calibration", "references": ["no"] * 10, "answer_type": "yes/no"},
]
# Shard order differs from the manifest's; q4's "Black." only matches in the lmms_eval variant.
QA_PREDICTIONS = {"q3": "Dog", "q1": "Yes.", "q4": "Black.", "q2": "two"}
QA_EXPECTED = {"q3": 0.3, "q1": 0.0, "q4": 0.0, "q2": 0.6}  # q1: all-identical gate, no normalisation


@pytest.fixture
def qa_inputs(tmp_path):
    manifest = parquet_roundtrip(manifest_frame(QA_SAMPLES, "qa"), tmp_path, "manifest")
    rows = parquet_roundtrip(shard_frame(QA_PREDICTIONS, "qa"), tmp_path, "shard")
    return rows, manifest


def test_qa_scores(qa_inputs):
    rows, manifest = qa_inputs
    scored, cell = score_cell_rows(rows, manifest, workload="qa", quality_metric="vqa_accuracy")
    assert scored["sample_id"].tolist() == list(QA_PREDICTIONS)
    assert scored["latency_ms"].tolist() == rows["latency_ms"].tolist()  # shard columns kept
    assert scored["vqa_accuracy"].tolist() == pytest.approx(
        [QA_EXPECTED[s] for s in QA_PREDICTIONS], abs=1e-12
    )
    assert scored["quality"].tolist() == scored["vqa_accuracy"].tolist()
    assert cell["quality_metric"] == "vqa_accuracy"
    assert cell["quality"] == pytest.approx(0.9 / 4, abs=1e-12)
    assert cell["metrics"] == {"vqa_accuracy": cell["quality"]}
    assert cell["n_samples"] == 4
    assert cell["vqa_variant"] == "official"
    assert cell["by_answer_type"]["other"] == {"vqa_accuracy": pytest.approx(0.15, abs=1e-12), "n_samples": 2}
    assert cell["by_answer_type"]["yes/no"]["n_samples"] == 1  # calibration sample not counted
    assert set(cell["by_question_type"]) == {"is the", "how many", "what", "what color"}


def test_qa_lmms_eval_variant(qa_inputs):
    rows, manifest = qa_inputs
    scored, cell = score_cell_rows(
        rows, manifest, workload="qa", quality_metric="vqa_accuracy", vqa_variant="lmms_eval"
    )
    assert dict(zip(scored["sample_id"], scored["quality"])) == pytest.approx(
        {"q3": 0.3, "q1": 1.0, "q4": 1.0, "q2": 0.6}, abs=1e-12
    )
    assert cell["vqa_variant"] == "lmms_eval"


def test_shard_must_cover_exactly_the_eval_samples(qa_inputs):
    rows, manifest = qa_inputs
    kwargs = {"workload": "qa", "quality_metric": "vqa_accuracy"}
    with pytest.raises(ValueError, match=r"misses 1 .*\['q2'\]"):
        score_cell_rows(rows[rows["sample_id"] != "q2"], manifest, **kwargs)
    extra = pd.concat([rows, shard_frame({"c1": "no"}, "qa")], ignore_index=True)
    with pytest.raises(ValueError, match=r"not eval samples .*\['c1'\]"):
        score_cell_rows(extra, manifest, **kwargs)
    unknown = pd.concat([rows, shard_frame({"zz": "no"}, "qa")], ignore_index=True)
    with pytest.raises(ValueError, match=r"\['zz'\]"):
        score_cell_rows(unknown, manifest, **kwargs)
    with pytest.raises(ValueError, match=r"shard rows repeat sample_id.*\['q1'\]"):
        score_cell_rows(pd.concat([rows, rows.iloc[[1]]]), manifest, **kwargs)
    with pytest.raises(ValueError, match="lack column.*prediction"):
        score_cell_rows(rows.drop(columns="prediction"), manifest, **kwargs)
    with pytest.raises(ValueError, match=r"non-str prediction.*\['q1'\]"):
        score_cell_rows(
            rows.assign(
                prediction=[p if s != "q1" else None for s, p in zip(rows["sample_id"], rows["prediction"])]
            ),
            manifest,
            **kwargs,
        )
    with pytest.raises(ValueError, match="no split == 'eval'"):
        score_cell_rows(rows, manifest.assign(split="calibration"), **kwargs)


@pytest.mark.parametrize(
    "workload, metric, match",
    [
        ("vqa", "vqa_accuracy", "unknown workload 'vqa'"),
        ("qa", "cider", "'cider' is not a metric of workload 'qa'"),
        ("captioning", "vqa_accuracy", "'vqa_accuracy' is not a metric of workload 'captioning'"),
        ("captioning", "spice", "'spice' is not a metric"),
    ],
)
def test_unknown_workload_or_metric(qa_inputs, workload, metric, match):
    rows, manifest = qa_inputs
    with pytest.raises(ValueError, match=match):
        score_cell_rows(rows, manifest, workload=workload, quality_metric=metric)


CAPTION_SAMPLES = [
    {"sample_id": "i1", "references": ["A man riding a horse on a beach.", "A person rides a horse."]},
    {"sample_id": "i2", "references": ["Two dogs playing with a ball.", "Dogs chase a red ball on grass."]},
    {"sample_id": "i3", "references": ["A red bus on a city street.", "A bus driving down a road."]},
    {"sample_id": "i0", "split": "calibration", "references": ["A cat on a laptop."]},
]
CAPTION_PREDICTIONS = {"i2": "two dogs with a ball", "i1": "a man rides a horse on the beach", "i3": ""}


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (see README)")
def test_captioning_scores_equal_score_captions(tmp_path):
    manifest = parquet_roundtrip(manifest_frame(CAPTION_SAMPLES, "captioning"), tmp_path, "manifest")
    rows = parquet_roundtrip(shard_frame(CAPTION_PREDICTIONS, "captioning"), tmp_path, "shard")
    # quality_metric outside caption_metrics is computed as well.
    scored, cell = score_cell_rows(
        rows, manifest, workload="captioning", quality_metric="bleu4", caption_metrics=("cider", "rouge_l")
    )
    refs = {s["sample_id"]: s["references"] for s in CAPTION_SAMPLES if s.get("split") != "calibration"}
    corpus, per_sample = score_captions(CAPTION_PREDICTIONS, refs, metrics=("cider", "rouge_l", "bleu4"))

    assert cell["metrics"] == corpus
    assert cell["quality_metric"] == "bleu4" and cell["quality"] == corpus["bleu4"]
    assert cell["n_samples"] == 3 and "by_answer_type" not in cell
    for metric in ("cider", "rouge_l", "bleu4"):
        assert scored[metric].tolist() == [per_sample[s][metric] for s in CAPTION_PREDICTIONS]
    assert scored["quality"].tolist() == scored["bleu4"].tolist()
    assert "meteor" not in scored.columns
    assert corpus["cider"] > 0 and scored.set_index("sample_id").loc["i3", "quality"] == 0.0
