"""VQA v2 accuracy, as the official evaluation computes it.

Reimplements (not copies) GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`
(commit a013f00, 2021-03-11):

1. clean every answer, human and predicted: "\\n" and "\\t" become spaces, then strip;
2. normalise only if the human answers are not all identical (``variant="official"``);
   normalising = punctuation processing, then digit/article/contraction processing;
3. for each human answer, leave it out and count the other answers equal to the prediction;
   accuracy = mean over the leave-one-out subsets of min(1, matches / 3).
   With 10 humans: 0, 1, 2, 3, >=4 matches give 0, 0.3, 0.6, 0.9, 1.0.

``variant="lmms_eval"`` follows lmms-eval's VQAv2 task after its 2025 fixes (PRs #760 and #794):
the same steps but always normalising (no all-identical gate), with the comma-between-digits pattern
of its EvalAIAnswerProcessor. Example: ten humans answering "black", prediction "Black." scores 0.0
officially and 1.0 in the lmms_eval variant.

Accuracies are fractions in [0, 1] (the official script prints 100x, rounded to 2 decimals).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import resources

VARIANTS = ("official", "lmms_eval")

# The official table, verbatim as data (120 entries). Lookup happens after lower-casing, so its few
# capitalised keys ("Im", "Ive", ...) never fire, and "somebody'd" maps to "somebodyd": both kept as is.
CONTRACTIONS: dict[str, str] = json.loads(
    resources.files(__package__).joinpath("vqa_contractions.json").read_text(encoding="utf-8")
)
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe, colon and period are not in the list; periods have their own rule below.
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# The official script ran under Python 2 with str patterns and no re.UNICODE flag, so \d meant [0-9].
_COMMA_BETWEEN_DIGITS = {
    "official": re.compile(r"(\d)(,)(\d)", re.ASCII),
    "lmms_eval": re.compile(r"(?<=\d)(,)+(?=\d)", re.ASCII),  # EvalAIAnswerProcessor.COMMA_STRIP
}
# Official pattern "(?!<=\d)(\.)(?!\d)": the first group is a (mistyped) lookahead that can never fail
# at a ".", so this removes every "." not followed by a digit ("3.5" keeps its period, "3." loses it).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in `count` (re.UNICODE
# == 32), so at most 32 periods are removed. Kept for fidelity; it only matters for long outputs.
_PERIOD_MAX_REPLACEMENTS = 32


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown VQA accuracy variant {variant!r}; expected one of {VARIANTS}")


def clean_answer(text: str) -> str:
    """Step 1 of the official script: tabs/newlines to spaces, strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str, *, variant: str = "official") -> str:
    """Official punctuation rule.

    For each punctuation mark p: if p is followed or preceded by a space anywhere in the (original)
    text, or the text has a comma between two digits anywhere, every p is deleted; otherwise every p
    becomes a space. Then periods not followed by a digit are removed.
    """
    _check_variant(variant)
    has_digit_comma = _COMMA_BETWEEN_DIGITS[variant].search(text) is not None
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_MAX_REPLACEMENTS)


def process_digit_article(text: str) -> str:
    """Official word rule: lower-case, number words to digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str, *, variant: str = "official") -> str:
    """Punctuation then digit/article processing (the official normalisation, without cleaning)."""
    return process_digit_article(process_punctuation(text, variant=variant))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, variant: str = "official") -> float:
    """VQA accuracy of one predicted answer against the human answers (10 in VQA v2), in [0, 1]."""
    _check_variant(variant)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}: {prediction!r}")
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty sequence of human answers, got {answers!r}")
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"human answers must be str, got {type(a).__name__}: {a!r} in {list(answers)!r}")

    humans = [clean_answer(a) for a in answers]
    pred = clean_answer(prediction)
    if variant == "lmms_eval" or len(set(humans)) > 1:
        humans = [normalize_answer(a, variant=variant) for a in humans]
        pred = normalize_answer(pred, variant=variant)

    # Leave-one-out, computed as the official loop does (same float operations, same order).
    matches = sum(h == pred for h in humans)
    per_subset = [min(1, float(matches - (h == pred)) / 3) for h in humans]
    return float(sum(per_subset)) / len(per_subset)


def _group_means(values: Sequence[float], groups: Sequence[str]) -> dict[str, dict[str, float | int]]:
    sums: dict[str, list[float]] = {}
    for v, g in zip(values, groups):
        sums.setdefault(g, []).append(v)
    return {
        g: {"vqa_accuracy": float(sum(vs)) / len(vs), "n_samples": len(vs)} for g, vs in sorted(sums.items())
    }


def score_vqa(
    predictions: Sequence[str],
    answers_lists: Sequence[Sequence[str]],
    answer_types: Sequence[str],
    *,
    question_types: Sequence[str] | None = None,
    variant: str = "official",
) -> tuple[list[float], dict]:
    """Per-sample VQA accuracy and a summary.

    Returns ``(per_sample, summary)``: ``per_sample[i]`` is ``vqa_accuracy`` of sample i; ``summary`` is
    ``{"vqa_accuracy": mean, "n_samples": N, "variant": ..., "by_answer_type": {type: {"vqa_accuracy",
    "n_samples"}}}`` plus ``"by_question_type"`` of the same shape when ``question_types`` is given.
    The overall value is the mean over questions, as in the official script (not a mean of type means).
    """
    _check_variant(variant)
    n = len(predictions)
    lengths = {"predictions": n, "answers_lists": len(answers_lists), "answer_types": len(answer_types)}
    if question_types is not None:
        lengths["question_types"] = len(question_types)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"score_vqa inputs differ in length: {lengths}")
    if n == 0:
        raise ValueError("score_vqa needs at least one sample")

    per_sample = []
    for i, (pred, answers) in enumerate(zip(predictions, answers_lists)):
        try:
            per_sample.append(vqa_accuracy(pred, list(answers), variant=variant))
        except (TypeError, ValueError) as err:
            raise type(err)(f"sample {i}: {err}") from err

    summary: dict = {
        "vqa_accuracy": float(sum(per_sample)) / n,
        "n_samples": n,
        "variant": variant,
        "by_answer_type": _group_means(per_sample, [str(t) for t in answer_types]),
    }
    if question_types is not None:
        summary["by_question_type"] = _group_means(per_sample, [str(t) for t in question_types])
    return per_sample, summary
