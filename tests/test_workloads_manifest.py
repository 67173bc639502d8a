"""Sample manifests: the contract's columns, a deterministic seeded choice, disjoint calibration and
evaluation sets, stratification, image checks, and atomic Parquet files."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from knobsweep.workloads import DataError, synthetic
from knobsweep.workloads.coco import CaptionSample, load_coco_captions
from knobsweep.workloads.manifest import build_manifest, read_manifest, write_manifest
from knobsweep.workloads.vqa import VqaSample, load_vqa
from PIL import Image

SMALL_SIZES = ((160, 120), (120, 160), (192, 108), (128, 128))
# docs/architecture.md, "Manifest".
CONTRACT_COLUMNS = [
    "sample_id",
    "split",
    "image_id",
    "image_path",
    "image_width",
    "image_height",
    "question",
    "question_id",
    "prompt",
    "references",
    "answer_type",
    "question_type",
]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, Path]:
    return synthetic.write_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), n_images=40, seed=5, questions_per_image=3, image_sizes=SMALL_SIZES
    )


@pytest.fixture(scope="module")
def qa_samples(source) -> list[VqaSample]:
    return load_vqa(source["vqa_questions"], source["vqa_annotations"], source["image_dir"])


@pytest.fixture(scope="module")
def caption_samples(source) -> list[CaptionSample]:
    return load_coco_captions(source["coco_captions"], source["image_dir"])


def qa_manifest(samples, seed=0, **kw):
    kw = {"n_eval": 60, "n_calibration": 16, "prompt": None, **kw}
    return build_manifest("qa", samples, seed=seed, **kw)


def test_columns_types_and_content(qa_samples):
    df = qa_manifest(qa_samples)
    assert list(df.columns) == CONTRACT_COLUMNS
    assert Counter(df["split"]) == {"eval": 60, "calibration": 16}
    assert df["sample_id"].is_unique
    by_id = {s.question_id: s for s in qa_samples}
    for row in df.itertuples():
        s = by_id[row.question_id]
        assert row.sample_id == str(s.question_id) and row.image_id == s.image_id
        assert row.references == list(s.answers) and len(row.references) == 10
        assert row.prompt == f"{s.question}\nAnswer the question using a single word or phrase."
        assert (row.answer_type, row.question_type, row.question) == (
            s.answer_type,
            s.question_type,
            s.question,
        )
        assert Path(row.image_path).is_absolute()
        assert Image.open(row.image_path).size == (row.image_width, row.image_height)
    for column in ("image_id", "question_id", "image_width", "image_height"):
        assert df[column].dtype == "int64"
    # Sorted: evaluation rows first, then calibration, each by question id.
    expected = pd.concat([df[df.split == s].sort_values("question_id") for s in ("eval", "calibration")])
    assert df["sample_id"].tolist() == expected["sample_id"].tolist()


def test_same_seed_same_manifest_other_seed_other(qa_samples, tmp_path):
    a, b, c = (
        qa_manifest(qa_samples, seed=1),
        qa_manifest(qa_samples, seed=1),
        qa_manifest(qa_samples, seed=2),
    )
    pd.testing.assert_frame_equal(a, b)
    assert (
        write_manifest(a, tmp_path / "a.parquet").read_bytes()
        == write_manifest(b, tmp_path / "b.parquet").read_bytes()
    )
    assert set(a["sample_id"]) != set(c["sample_id"])
    # The order of the input does not matter.
    pd.testing.assert_frame_equal(a, qa_manifest(list(reversed(qa_samples)), seed=1))


def test_calibration_and_evaluation_are_disjoint_by_question_and_image(qa_samples):
    for seed in range(5):
        df = qa_manifest(qa_samples, seed=seed, n_eval=70, n_calibration=20)
        ev, cal = df[df.split == "eval"], df[df.split == "calibration"]
        assert set(ev["sample_id"]).isdisjoint(cal["sample_id"])
        assert set(ev["image_id"]).isdisjoint(cal["image_id"])


def _hand_made(tmp_path: Path, answer_types: list[str]) -> list[VqaSample]:
    """One question per image, each image a real (tiny) JPEG."""
    samples = []
    for i, answer_type in enumerate(answer_types):
        path = tmp_path / f"COCO_val2014_{i + 1:012d}.jpg"
        Image.new("RGB", (8 + i % 3, 6), (i, 0, 0)).save(path)
        samples.append(
            VqaSample(
                question_id=(i + 1) * 1000,
                image_id=i + 1,
                image_path=path,
                question=f"q{i}?",
                answers=("yes",) * 10,
                answer_type=answer_type,
                question_type="is there a",
                multiple_choice_answer="yes",
            )
        )
    return samples


def test_stratification_by_hand(tmp_path):
    # 25 yes/no, 15 number, 10 other; 7 evaluation samples: exact shares 3.5 / 2.1 / 1.4, floors 3 / 2 / 1,
    # the one remaining sample goes to the largest fractional part (yes/no): 4 / 2 / 1.
    samples = _hand_made(tmp_path, ["yes/no"] * 25 + ["number"] * 15 + ["other"] * 10)
    df = build_manifest("qa", samples, n_eval=7, n_calibration=0, seed=3, prompt=None, stratify="answer_type")
    assert Counter(df["answer_type"]) == {"yes/no": 4, "number": 2, "other": 1}
    # 10 / 10 / 10 and 4 samples: 1.33 each, floors 1 / 1 / 1; equal fractional parts, so the remaining
    # one goes by name to "number" (< "other" < "yes/no").
    samples = _hand_made(tmp_path, ["yes/no"] * 10 + ["number"] * 10 + ["other"] * 10)
    df = build_manifest("qa", samples, n_eval=4, n_calibration=0, seed=3, prompt=None, stratify="answer_type")
    assert Counter(df["answer_type"]) == {"number": 2, "other": 1, "yes/no": 1}


def test_stratification_follows_the_pool(qa_samples):
    df = qa_manifest(qa_samples, n_eval=50, n_calibration=12, stratify="answer_type", seed=4)
    calibration_images = set(df[df.split == "calibration"]["image_id"])
    pool = Counter(s.answer_type for s in qa_samples if s.image_id not in calibration_images)
    chosen = Counter(df[df.split == "eval"]["answer_type"])
    assert sum(chosen.values()) == 50
    for answer_type, n in pool.items():
        assert abs(chosen[answer_type] - 50 * n / sum(pool.values())) < 1, (answer_type, chosen, pool)


def test_captioning_manifest(caption_samples):
    df = build_manifest("captioning", caption_samples, n_eval=20, n_calibration=8, seed=0, prompt=None)
    assert list(df.columns) == CONTRACT_COLUMNS and len(df) == 28
    assert df["image_id"].is_unique and df["sample_id"].tolist() == [str(i) for i in df["image_id"]]
    by_id = {s.image_id: s for s in caption_samples}
    for row in df.itertuples():
        assert row.references == list(by_id[row.image_id].captions) and len(row.references) == 5
        assert (row.question, row.question_id, row.answer_type, row.question_type) == ("", -1, "", "")
        assert row.prompt == "Provide a one-sentence caption for the provided image."
    custom = build_manifest(
        "captioning",
        caption_samples,
        n_eval=20,
        n_calibration=8,
        seed=0,
        prompt="Describe the image in one sentence.",
    )
    assert set(custom["prompt"]) == {"Describe the image in one sentence."}


def test_too_many_samples_names_the_counts(qa_samples, caption_samples):
    with pytest.raises(
        DataError, match=r"requested n_eval 110 \+ n_calibration 20 = 130 samples, but only 120"
    ):
        qa_manifest(qa_samples, n_eval=110, n_calibration=20)
    # Calibration takes whole images: fewer questions are left for evaluation than the plain difference.
    with pytest.raises(
        DataError, match=r"requested n_eval 100, but only \d+ samples are available on images not used"
    ):
        qa_manifest(qa_samples, n_eval=100, n_calibration=19)
    with pytest.raises(DataError, match=r"= 41 samples, but only 40"):
        build_manifest("captioning", caption_samples, n_eval=40, n_calibration=1, seed=0, prompt=None)


def _copy_with_broken_image(source, tmp_path, damage) -> tuple[list[VqaSample], int]:
    image_dir = tmp_path / "val2014"
    shutil.copytree(source["image_dir"], image_dir)
    samples = load_vqa(source["vqa_questions"], source["vqa_annotations"], image_dir)
    victim = samples[0].image_id
    damage(image_dir / f"COCO_val2014_{victim:012d}.jpg")
    return samples, victim


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.unlink(),
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
        lambda p: p.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg"),
    ],
    ids=["missing", "truncated", "garbage"],
)
def test_bad_image_is_named(source, tmp_path, damage):
    samples, victim = _copy_with_broken_image(source, tmp_path, damage)
    # All samples chosen, so the broken image is among them.
    with pytest.raises(DataError) as e:
        build_manifest("qa", samples, n_eval=len(samples), n_calibration=0, seed=0, prompt=None)
    message = str(e.value)
    assert f"COCO_val2014_{victim:012d}.jpg" in message and f"image_id {victim}" in message
    assert "does not exist" in message or "cannot be read" in message


def test_unchosen_bad_images_do_not_matter(source, tmp_path):
    samples, victim = _copy_with_broken_image(source, tmp_path, lambda p: p.unlink())
    kept = [s for s in samples if s.image_id != victim]
    assert len(build_manifest("qa", kept, n_eval=10, n_calibration=2, seed=0, prompt=None)) == 12


def test_bad_arguments(qa_samples, caption_samples):
    with pytest.raises(ValueError, match="cannot stratify by 'answer_type'"):
        build_manifest(
            "captioning",
            caption_samples,
            n_eval=5,
            n_calibration=1,
            seed=0,
            prompt=None,
            stratify="answer_type",
        )
    with pytest.raises(ValueError, match="must contain {question}"):
        qa_manifest(qa_samples, prompt="Answer briefly.")
    with pytest.raises(ValueError, match="unknown workload"):
        build_manifest("vqa", qa_samples, n_eval=5, n_calibration=1, seed=0, prompt=None)
    with pytest.raises(TypeError, match="expected VqaSample"):
        build_manifest("qa", caption_samples, n_eval=5, n_calibration=1, seed=0, prompt=None)
    with pytest.raises(ValueError, match="n_eval must be a positive integer"):
        qa_manifest(qa_samples, n_eval=0)


def test_write_read_roundtrip_is_atomic(qa_samples, tmp_path):
    df = qa_manifest(qa_samples)
    path = write_manifest(df, tmp_path / "manifest" / "qa.parquet")
    assert [p.name for p in path.parent.iterdir()] == ["qa.parquet"]  # no temporary file left behind
    back = read_manifest(path)
    pd.testing.assert_frame_equal(back, df)
    assert isinstance(back["references"][0], list)


def test_read_manifest_rejects_bad_files(qa_samples, tmp_path):
    with pytest.raises(DataError, match="missing.parquet does not exist"):
        read_manifest(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet cannot be read as Parquet"):
        read_manifest(tmp_path / "junk.parquet")
    df = qa_manifest(qa_samples)
    df.drop(columns=["prompt"]).to_parquet(tmp_path / "short.parquet")
    with pytest.raises(DataError, match=r"short.parquet: missing column\(s\) \['prompt'\]"):
        read_manifest(tmp_path / "short.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt'\]"):
        write_manifest(df.drop(columns=["prompt"]), tmp_path / "never.parquet")
    assert not (tmp_path / "never.parquet").exists()
