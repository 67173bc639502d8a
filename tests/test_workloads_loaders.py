"""The VQA v2 and COCO caption loaders read the real formats (here written by the synthetic generator)
and reject bad input with an error naming the file and the id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from knobsweep.workloads import DataError, synthetic
from knobsweep.workloads.coco import load_coco_captions
from knobsweep.workloads.vqa import load_vqa

SMALL_SIZES = ((160, 120), (120, 160), (192, 108), (128, 128))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, Path]:
    return synthetic.write_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), n_images=12, seed=11, questions_per_image=3, image_sizes=SMALL_SIZES
    )


@pytest.fixture
def data(source, tmp_path) -> dict[str, Path]:
    """A private copy that a test may break."""
    root = source["image_dir"].parents[1]
    shutil.copytree(root, tmp_path / "data")
    return {k: tmp_path / "data" / p.relative_to(root) for k, p in source.items()}


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_load_vqa_reads_the_synthetic_files(source):
    samples = load_vqa(source["vqa_questions"], source["vqa_annotations"], source["image_dir"])
    questions = json.loads(source["vqa_questions"].read_text())["questions"]
    annotations = {
        a["question_id"]: a for a in json.loads(source["vqa_annotations"].read_text())["annotations"]
    }
    assert len(samples) == len(questions) == 36
    assert [s.question_id for s in samples] == sorted(q["question_id"] for q in questions)
    for s in samples:
        ann = annotations[s.question_id]
        assert s.answers == tuple(a["answer"] for a in ann["answers"]) and len(s.answers) == 10
        assert (s.answer_type, s.question_type, s.multiple_choice_answer) == (
            ann["answer_type"],
            ann["question_type"],
            ann["multiple_choice_answer"],
        )
        assert s.image_path.is_absolute() and s.image_path.is_file()
        assert s.image_path.name == f"COCO_val2014_{s.image_id:012d}.jpg"


def test_load_coco_captions_reads_the_synthetic_files(source):
    samples = load_coco_captions(source["coco_captions"], source["image_dir"])
    data = json.loads(source["coco_captions"].read_text())
    assert [s.image_id for s in samples] == sorted(i["id"] for i in data["images"])
    for s in samples:
        expected = [
            a["caption"]
            for a in sorted(data["annotations"], key=lambda a: a["id"])
            if a["image_id"] == s.image_id
        ]
        assert list(s.captions) == expected and len(expected) == 5
        assert s.image_path.is_file()


@pytest.mark.parametrize("split", ["val", "test"])
def test_karpathy_split_selects_its_images(source, split):
    karpathy = json.loads(source["karpathy_split"].read_text())["images"]
    expected = sorted(e["cocoid"] for e in karpathy if e["split"] == split)
    samples = load_coco_captions(
        source["coco_captions"], source["image_dir"], source["karpathy_split"], split=split
    )
    assert [s.image_id for s in samples] == expected and 0 < len(expected) < 12


def test_missing_paths_are_named(source, tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="nope.json.*does not exist"):
        load_vqa(missing, source["vqa_annotations"], source["image_dir"])
    with pytest.raises(DataError, match="no_images.*does not exist"):
        load_vqa(source["vqa_questions"], source["vqa_annotations"], tmp_path / "no_images")
    with pytest.raises(DataError, match="nope.json.*does not exist"):
        load_coco_captions(missing, source["image_dir"])
    with pytest.raises(DataError, match="nope.json.*does not exist"):
        load_coco_captions(source["coco_captions"], source["image_dir"], missing)


def test_broken_json_names_file_and_position(data):
    text = data["vqa_annotations"].read_text()
    data["vqa_annotations"].write_text(text.replace('"annotations": [', '"annotations": [\n,', 1))
    with pytest.raises(DataError) as e:
        load_vqa(data["vqa_questions"], data["vqa_annotations"], data["image_dir"])
    assert "v2_mscoco_val2014_annotations.json" in str(e.value) and "line 2, column 1," in str(e.value)
    data["coco_captions"].write_text('{"images": [')
    with pytest.raises(DataError, match=r"captions_val2014.json is not valid JSON.*line 1, column 13,"):
        load_coco_captions(data["coco_captions"], data["image_dir"])


def test_question_without_annotation(data):
    victim = {}

    def drop(d):
        victim.update(d["annotations"].pop(4))

    _edit(data["vqa_annotations"], drop)
    with pytest.raises(DataError) as e:
        load_vqa(data["vqa_questions"], data["vqa_annotations"], data["image_dir"])
    assert f"question_id {victim['question_id']}" in str(e.value)
    assert "v2_mscoco_val2014_annotations.json" in str(e.value) and "no annotation" in str(e.value)


@pytest.mark.parametrize("n_answers", [9, 11, 0])
def test_annotation_without_ten_answers(data, n_answers):
    qid = {}

    def change(d):
        ann = d["annotations"][2]
        qid["id"] = ann["question_id"]
        ann["answers"] = (ann["answers"] * 2)[:n_answers]

    _edit(data["vqa_annotations"], change)
    with pytest.raises(
        DataError,
        match=rf"annotations.json: question_id {qid['id']} has {n_answers} answers, expected exactly 10",
    ):
        load_vqa(data["vqa_questions"], data["vqa_annotations"], data["image_dir"])


def test_annotation_of_another_image(data):
    def change(d):
        d["annotations"][0]["image_id"] += 1

    _edit(data["vqa_annotations"], change)
    with pytest.raises(DataError, match=r"question_id \d+ is annotated with image_id \d+"):
        load_vqa(data["vqa_questions"], data["vqa_annotations"], data["image_dir"])


def test_missing_keys_are_named(data):
    _edit(data["vqa_questions"], lambda d: d["questions"][1].pop("question"))
    with pytest.raises(DataError, match=r"questions.json: question #1 lacks key\(s\) \['question'\]"):
        load_vqa(data["vqa_questions"], data["vqa_annotations"], data["image_dir"])


def test_caption_of_unknown_image(data):
    _edit(data["coco_captions"], lambda d: d["annotations"][3].update(image_id=987654321))
    with pytest.raises(
        DataError, match=r"captions_val2014.json: caption \d+ refers to unknown image_id 987654321"
    ):
        load_coco_captions(data["coco_captions"], data["image_dir"])


def test_image_without_captions(data):
    victim = {}

    def change(d):
        victim["id"] = d["images"][5]["id"]
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != victim["id"]]

    _edit(data["coco_captions"], change)
    with pytest.raises(
        DataError, match=rf"captions_val2014.json: image_id {victim['id']} .* has no captions"
    ):
        load_coco_captions(data["coco_captions"], data["image_dir"])


def test_karpathy_image_unknown_to_the_captions(data):
    _edit(data["karpathy_split"], lambda d: d["images"][1].update(cocoid=424242, split="test"))
    with pytest.raises(
        DataError, match=r"dataset_coco.json: image cocoid 424242 .* is not in .*captions_val2014.json"
    ):
        load_coco_captions(data["coco_captions"], data["image_dir"], data["karpathy_split"], split="test")
    with pytest.raises(DataError, match=r"split 'testing' is not one of"):
        load_coco_captions(data["coco_captions"], data["image_dir"], data["karpathy_split"], split="testing")
