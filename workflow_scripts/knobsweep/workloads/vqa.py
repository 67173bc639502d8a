"""VQA v2 (val2014) as users keep it: the questions and annotations JSON files and the COCO image folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from knobsweep.workloads import DataError, load_json, require_keys

IMAGE_FILE_PATTERN = "COCO_val2014_{image_id:012d}.jpg"
ANSWER_TYPES = ("yes/no", "number", "other")


@dataclass(frozen=True)
class VqaSample:
    question_id: int
    image_id: int
    image_path: Path
    question: str
    answers: tuple[str, ...]  # the ten human answers, as written
    answer_type: str  # "yes/no" | "number" | "other"
    question_type: str
    multiple_choice_answer: str


def load_vqa(
    questions_json: str | Path,
    annotations_json: str | Path,
    image_dir: str | Path,
    *,
    image_file_pattern: str = IMAGE_FILE_PATTERN,
) -> list[VqaSample]:
    """Every question of `questions_json` joined with its annotation, sorted by question id.

    Raises DataError (naming the file and the id) for a missing path, broken JSON, a question without
    annotation, an annotation whose image differs from its question's, an annotation without exactly ten
    answers, or an unknown answer type. Images are only located here; the manifest opens the chosen ones.
    """
    questions_json, annotations_json, image_dir = (
        Path(questions_json),
        Path(annotations_json),
        Path(image_dir),
    )
    if not image_dir.is_dir():
        raise DataError(f"VQA image directory {image_dir} does not exist (or is not a directory)")
    questions = load_json(questions_json, "VQA questions")
    annotations = load_json(annotations_json, "VQA annotations")
    require_keys(questions, ("questions",), questions_json, "the top level")
    require_keys(annotations, ("annotations",), annotations_json, "the top level")

    by_question: dict[int, dict] = {}
    for i, ann in enumerate(annotations["annotations"]):
        require_keys(
            ann,
            ("question_id", "image_id", "answers", "answer_type", "question_type", "multiple_choice_answer"),
            annotations_json,
            f"annotation #{i}",
        )
        qid = int(ann["question_id"])
        if qid in by_question:
            raise DataError(f"{annotations_json}: question_id {qid} is annotated twice")
        by_question[qid] = ann

    samples = []
    seen: set[int] = set()
    for i, q in enumerate(questions["questions"]):
        require_keys(q, ("question_id", "image_id", "question"), questions_json, f"question #{i}")
        qid, image_id = int(q["question_id"]), int(q["image_id"])
        if qid in seen:
            raise DataError(f"{questions_json}: question_id {qid} occurs twice")
        seen.add(qid)
        ann = by_question.get(qid)
        if ann is None:
            raise DataError(
                f"{annotations_json}: no annotation for question_id {qid} (image_id {image_id}) "
                f"of {questions_json}"
            )
        if int(ann["image_id"]) != image_id:
            raise DataError(
                f"{annotations_json}: question_id {qid} is annotated with image_id {ann['image_id']}, "
                f"but {questions_json} gives image_id {image_id}"
            )
        answers = ann["answers"]
        if not isinstance(answers, list) or len(answers) != 10:
            n = len(answers) if isinstance(answers, list) else type(answers).__name__
            raise DataError(f"{annotations_json}: question_id {qid} has {n} answers, expected exactly 10")
        for j, a in enumerate(answers):
            require_keys(a, ("answer",), annotations_json, f"answer #{j} of question_id {qid}")
        if ann["answer_type"] not in ANSWER_TYPES:
            raise DataError(
                f"{annotations_json}: question_id {qid} has answer_type {ann['answer_type']!r}, "
                f"expected one of {ANSWER_TYPES}"
            )
        samples.append(
            VqaSample(
                question_id=qid,
                image_id=image_id,
                image_path=(image_dir / image_file_pattern.format(image_id=image_id)).absolute(),
                question=str(q["question"]),
                answers=tuple(str(a["answer"]) for a in answers),
                answer_type=str(ann["answer_type"]),
                question_type=str(ann["question_type"]),
                multiple_choice_answer=str(ann["multiple_choice_answer"]),
            )
        )
    if not samples:
        raise DataError(f"{questions_json}: no questions")
    return sorted(samples, key=lambda s: s.question_id)
