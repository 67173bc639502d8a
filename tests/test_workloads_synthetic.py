"""The synthetic scene generator: real file formats, determinism, truthful questions and captions,
realistic human answers, resolution-dependent details and a complete vocabulary."""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from knobsweep.metrics.vqa import vqa_accuracy
from knobsweep.workloads import prompts, synthetic
from knobsweep.workloads.synthetic import COLORS, SHAPES, Scene
from PIL import Image

SMALL_SIZES = ((160, 120), (120, 160), (192, 108), (128, 128))

# The keys of the real files (VQA v2 val2014, COCO 2014 captions as distributed, Karpathy's dataset_coco.json).
REAL_KEYS = {
    "vqa_questions": (
        {"info", "task_type", "data_type", "license", "data_subtype", "questions"},
        {"questions": {"image_id", "question", "question_id"}},
    ),
    "vqa_annotations": (
        {"info", "license", "data_subtype", "annotations", "data_type"},
        {
            "annotations": {
                "question_type",
                "multiple_choice_answer",
                "answers",
                "image_id",
                "answer_type",
                "question_id",
            }
        },
    ),
    "coco_captions": (
        {"info", "images", "licenses", "annotations"},
        {
            "images": {
                "license",
                "file_name",
                "coco_url",
                "height",
                "width",
                "date_captured",
                "flickr_url",
                "id",
            },
            "annotations": {"image_id", "id", "caption"},
        },
    ),
    "karpathy_split": (
        {"images", "dataset"},
        {"images": {"filepath", "sentids", "filename", "imgid", "split", "sentences", "cocoid"}},
    ),
}


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return synthetic.write_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), n_images=24, seed=7, image_sizes=SMALL_SIZES
    )


def test_files_have_exactly_the_real_keys(dataset):
    for name, (top_keys, entry_keys) in REAL_KEYS.items():
        data = json.loads(dataset[name].read_text())
        assert set(data) == top_keys, name
        for list_key, keys in entry_keys.items():
            assert data[list_key], (name, list_key)
            for entry in data[list_key]:
                assert set(entry) == keys, (name, list_key, entry)
    annotations = json.loads(dataset["vqa_annotations"].read_text())["annotations"]
    for ann in annotations:
        assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
        assert all(set(a) == {"answer", "answer_confidence", "answer_id"} for a in ann["answers"])
        assert {a["answer_confidence"] for a in ann["answers"]} <= {"yes", "maybe", "no"}
        assert ann["answer_type"] in ("yes/no", "number", "other")
    for entry in json.loads(dataset["karpathy_split"].read_text())["images"]:
        assert all(set(s) == {"tokens", "raw", "imgid", "sentid"} for s in entry["sentences"])


def test_images_are_jpegs_of_the_listed_sizes(dataset):
    images = json.loads(dataset["coco_captions"].read_text())["images"]
    assert len(images) == 24
    for entry in images:
        assert entry["file_name"] == f"COCO_val2014_{entry['id']:012d}.jpg"
        with Image.open(dataset["image_dir"] / entry["file_name"]) as im:
            assert im.format == "JPEG"
            assert im.size == (entry["width"], entry["height"])
    assert {(e["width"], e["height"]) for e in images} == set(SMALL_SIZES)  # every aspect ratio occurs


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kwargs = {"n_images": 6, "image_sizes": SMALL_SIZES}
    a = _tree_digest(
        synthetic.write_synthetic_dataset(tmp_path / "a", seed=3, **kwargs)["image_dir"].parents[1]
    )
    b = _tree_digest(
        synthetic.write_synthetic_dataset(tmp_path / "b", seed=3, **kwargs)["image_dir"].parents[1]
    )
    c = _tree_digest(
        synthetic.write_synthetic_dataset(tmp_path / "c", seed=4, **kwargs)["image_dir"].parents[1]
    )
    assert a == b
    assert len(a) == 6 + 4  # six images and four JSON files
    assert set(a.values()).isdisjoint(c.values())


def test_default_sizes_reach_the_largest_budget_and_cover_the_aspects():
    largest_budget_pixels = 1872 * 32 * 32
    assert all(w * h >= largest_budget_pixels for w, h in synthetic.DEFAULT_IMAGE_SIZES)
    aspects = {round(w / h, 2) for w, h in synthetic.DEFAULT_IMAGE_SIZES}
    assert aspects == {round(4 / 3, 2), round(3 / 4, 2), round(16 / 9, 2), 1.0}
    # Small details span about one 32-px vision token at full size, so smaller budgets blur them away.
    short = min(min(size) for size in synthetic.DEFAULT_IMAGE_SIZES)
    assert 2 * synthetic.SIZE_RADIUS["tiny"][1] * short <= 40
    assert synthetic.MARKER_HEIGHT * short <= 40


def test_full_size_generation_is_fast(tmp_path):
    start = time.perf_counter()
    paths = synthetic.write_synthetic_dataset(tmp_path, n_images=40, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"40 full-size images took {elapsed:.1f} s"  # ~1 s on one core when measured
    sizes = {Image.open(p).size for p in paths["image_dir"].iterdir()}
    assert sizes <= set(synthetic.DEFAULT_IMAGE_SIZES) and len(sizes) > 1


def _scenes(n: int, seed: int, width: int = 400, height: int = 300):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng, synthetic.render_scene(rng, width=width, height=height)


def test_objects_are_drawn_where_the_scene_says():
    for _, scene in _scenes(20, 1, 800, 600):
        pixels = scene.image.load()
        for obj in scene.objects:
            cx, cy = int(obj.x * scene.width), int(obj.y * scene.height)
            if obj.marker is None:
                assert pixels[cx, cy] == COLORS[obj.color], obj
            else:  # the digit's ink (black or white) lies inside the object
                h = synthetic.MARKER_HEIGHT * min(scene.width, scene.height)
                box = scene.image.crop((cx - h, cy - h / 2, cx + h, cy + h / 2))
                ink = np.asarray(box).reshape(-1, 3).tolist()
                assert [20, 20, 20] in ink or [250, 250, 250] in ink, obj


def _truth(scene: Scene, question: str) -> str:
    """The answer computed from the object list, independently of the question generator."""
    objs = scene.objects
    unique = lambda **kw: [o for o in objs if all(getattr(o, k) == v for k, v in kw.items())]
    if m := re.fullmatch(r"how many (\w+) (\w+)s are (there|in the picture)\?", question):
        return str(len(unique(color=m[1], shape=m[2])))
    if m := re.fullmatch(r"how many (\w+)s are (there|in the image)\?", question):
        return str(len(unique(shape=m[1])))
    if m := re.fullmatch(r"what number is (?:written )?on the (\w+) (\w+) (\w+)\?", question):
        (o,) = unique(size=m[1], color=m[2], shape=m[3])
        return str(o.marker)
    if m := re.fullmatch(r"what (?:color is the|is the color of the) (\w+) (\w+)\?", question):
        (o,) = unique(size=m[1], shape=m[2])
        return o.color
    if m := re.fullmatch(r"what (?:shape is the|is the shape of the) (\w+) (\w+) object\?", question):
        (o,) = unique(size=m[1], color=m[2])
        return o.shape
    if m := re.fullmatch(r"is the (\w+) (\w+) (\w+) on the left or (?:the right|right side)\?", question):
        (o,) = unique(size=m[1], color=m[2], shape=m[3])
        assert abs(o.x - 0.5) > 0.1
        return "left" if o.x < 0.5 else "right"
    if m := re.fullmatch(r"is there an? (?:(large|small|tiny) )?(\w+) (\w+)\?", question):
        found = unique(color=m[2], shape=m[3], **({"size": m[1]} if m[1] else {}))
        return "yes" if found else "no"
    if m := re.fullmatch(r"are there any (\w+) (\w+)s\?", question):
        return "yes" if unique(color=m[1], shape=m[2]) else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_questions_are_true_and_well_formed():
    counts = Counter()
    for rng, scene in _scenes(150, 2):
        questions = synthetic.questions_for(scene, rng, n=4)
        assert len({q.question for q in questions}) == len(questions)
        for q in questions:
            assert q.canonical_answer == _truth(scene, q.question), q
            assert len(q.answers) == 10
            assert q.answer_type == {"yes": "yes/no", "no": "yes/no"}.get(
                q.canonical_answer, "number" if q.canonical_answer.isdigit() else "other"
            )
            assert q.question.startswith(q.question_type)
            counts[q.answer_type] += 1
            counts[q.canonical_answer] += 1
            counts["resolution"] += "tiny" in q.question or "number is" in q.question
    total = counts["yes/no"] + counts["number"] + counts["other"]
    assert min(counts["yes/no"], counts["number"], counts["other"]) > 0.2 * total
    assert 0.4 < counts["yes"] / (counts["yes"] + counts["no"]) < 0.6  # "yes" is not a free answer
    assert counts["resolution"] > 0.2 * total  # many questions need the small details


def test_human_answers_are_realistic():
    questions = [q for rng, scene in _scenes(200, 3) for q in synthetic.questions_for(scene, rng, n=3)]
    unanimous = [q for q in questions if len(set(q.answers)) == 1]
    assert 0.15 * len(questions) < len(unanimous) < 0.6 * len(questions)
    all_answers = Counter(a for q in questions for a in q.answers)
    # Surface variants that the official normalisation must handle: number words, case, periods, articles.
    assert any(w in all_answers for w in ("two", "three", "Two", "Three"))
    assert any(a.endswith(".") for a in all_answers) and any(a[0].isupper() for a in all_answers)
    assert any(a.startswith(("a ", "an ")) for a in all_answers)
    assert any(
        a.startswith(("dark ", "light ", "bright ")) for a in all_answers
    )  # right to a person, not exact
    # Real disagreement: some questions' humans differ even after the official normalisation.
    disagree = [q for q in questions if vqa_accuracy(q.canonical_answer, q.answers) < 1.0]
    assert len(disagree) > 0.02 * len(questions)
    for q in questions:
        # The canonical answer is the humans' plurality, so it scores well under the official metric.
        assert vqa_accuracy(q.canonical_answer, q.answers) >= 0.6, q


def test_captions_describe_the_scene():
    phrase = re.compile(
        r"\b(a|an|one|two|three|four|five|six|seven|eight|nine|ten) (large|small|tiny) "
        rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)})(s?)\b",
        re.IGNORECASE,
    )
    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    for rng, scene in _scenes(60, 4):
        captions = synthetic.captions_for(scene, rng)
        assert len(captions) == 5 and len(set(captions)) >= 4
        for caption in captions:
            n_words = sum(t.isalnum() for t in synthetic.tokenize_words(caption))
            assert 12 <= n_words <= 25, caption
            for count, size, color, shape, plural in phrase.findall(caption):
                n = 1 if count.lower() in ("a", "an") else numbers.index(count.lower())
                actual = sum((o.size, o.color, o.shape) == (size, color, shape) for o in scene.objects)
                assert n == actual and (plural == "s") == (n > 1), (caption, count, size, color, shape)
        assert sum(scene.background in c for c in captions) >= 2


def test_random_random_is_accepted_and_deterministic():
    def draw(seed):
        rng = random.Random(seed)
        scene = synthetic.render_scene(rng, width=96, height=64)
        return scene.image.tobytes(), synthetic.questions_for(scene, rng), synthetic.captions_for(scene, rng)

    assert draw(5) == draw(5)
    assert draw(5)[0] != draw(6)[0]
    with pytest.raises(TypeError, match="rng"):
        synthetic.render_scene(5, width=96, height=64)


def test_vocabulary_covers_every_generated_text():
    vocabulary = set(synthetic.VOCABULARY)
    assert len(vocabulary) < 300 and len(synthetic.VOCABULARY) == len(vocabulary)
    cased_split = lambda text: re.findall(r"\w+|[^\w\s]+", text)
    texts = [prompts.caption_prompt()]
    for rng, scene in _scenes(300, 5, 64, 48):
        for q in synthetic.questions_for(scene, rng, n=6):
            texts += [q.question, prompts.qa_prompt(q.question), q.canonical_answer, *q.answers]
        texts += synthetic.captions_for(scene, rng)
    missing = Counter(
        t
        for text in texts
        for t in {*synthetic.tokenize_words(text), *cased_split(text)}
        if t not in vocabulary
    )
    assert not missing, missing.most_common(20)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_images"):
        synthetic.write_synthetic_dataset("/nonexistent-never-written", n_images=0, seed=0)
    with pytest.raises(ValueError, match="too small"):
        synthetic.render_scene(np.random.default_rng(0), width=8, height=8)
