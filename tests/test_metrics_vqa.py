"""Official VQA v2 accuracy (GT-Vision-Lab/VQA vqaEval.py, a013f00) and the lmms-eval variant.

Expected values are derived by hand from the official rules. The implementation was also checked
against a re-execution of the official vqaEval.py (20,000 random/perturbed questions, 100,000 random
strings through both normalisation steps: no difference); that script is not vendored here.
"""

import pytest
from knobsweep.metrics.vqa import (
    CONTRACTIONS,
    process_digit_article,
    process_punctuation,
    score_vqa,
    vqa_accuracy,
)


def humans(matching: str, n_matching: int, other: str = "cat") -> list[str]:
    """Ten human answers, n_matching of them equal to `matching`."""
    return [matching] * n_matching + [other] * (10 - n_matching)


# --- leave-one-out: 0/1/2/3/4+ matching humans ---------------------------------------------------


@pytest.mark.parametrize(
    "n_matching, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (9, 1.0)],
)
def test_leave_one_out_average(n_matching, expected):
    assert vqa_accuracy("dog", humans("dog", n_matching)) == pytest.approx(expected, abs=1e-12)


def test_three_humans_is_not_full_credit():
    # min(count/3, 1) without the leave-one-out average would give 1.0 here.
    assert vqa_accuracy("dog", humans("dog", 3)) < 0.95


# --- the all-identical gate ----------------------------------------------------------------------


def test_all_identical_humans_are_not_normalised_officially():
    assert vqa_accuracy("Black.", ["black"] * 10) == 0.0
    assert vqa_accuracy("Black.", ["black"] * 10, variant="lmms_eval") == 1.0


def test_all_identical_humans_still_cleaned_and_stripped():
    assert vqa_accuracy("  black\n", ["black"] * 10) == 1.0
    assert vqa_accuracy("black", ["black\t"] * 10) == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0  # no number-word mapping without normalisation


def test_gate_opens_when_one_human_differs():
    answers = ["black"] * 9 + ["dark"]
    # 9 humans say "black": each leave-one-out subset keeps >= 8 matches.
    assert vqa_accuracy("Black.", answers) == 1.0


def test_gate_is_checked_after_cleaning():
    # "black " and "black" are identical after strip, so the gate stays closed.
    assert vqa_accuracy("Black", ["black "] * 5 + ["black"] * 5) == 0.0


# --- digits, articles, contractions --------------------------------------------------------------

MIXED = ["x", "y"]  # appended so that the humans are never all identical and normalisation runs


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("two", "2"),
        ("Two", "2"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("a dog", "dog"),
        ("the dog", "dog"),
        ("An apple", "apple"),
        ("dont", "don't"),
        ("whats", "what's"),
        ("oclock", "o'clock"),
        ("1,000", "1000"),
    ],
)
def test_normalisation_matches(prediction, answer):
    assert vqa_accuracy(prediction, [answer] * 8 + MIXED) == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two Dogs", "2 dogs"),
        ("the   cat  and a dog", "cat and dog"),
        ("dont", "don't"),
        ("Dont", "don't"),  # lower-cased before the lookup
        ("im", "im"),  # the table's "Im" key is capitalised, so it never fires after lower-casing
        ("somebody'd", "somebodyd"),  # the table's reversed entry, kept as in the official script
        ("eleven", "eleven"),  # number words stop at ten
        ("a", ""),
        ("none of the two", "0 of 2"),
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_contractions_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don't"
    assert CONTRACTIONS["yall'd've"] == "y'all'd've"
    assert CONTRACTIONS["twas"] == "'twas"
    assert CONTRACTIONS["Im"] == "I'm"


# --- punctuation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("red-white", "red white"),  # no space next to "-": replaced by a space
        ("red - white", "red  white"),  # "- " occurs: every "-" deleted
        ("red -white", "red white"),  # " -" occurs: deleted
        ("yes!", "yes "),  # "!" at the end, no space next to it: becomes a space
        ("yes !", "yes "),  # " !" occurs: deleted
        ("a/b c/d", "a b c d"),
        ("hello, world", "hello world"),  # ", " occurs: deleted
        ("a,b", "a b"),
        ("1,000", "1000"),  # comma between digits: deleted
        ("1,000 red-white", "1000 redwhite"),  # ... and then every punctuation mark is deleted
        ("(1,5)", "15"),
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("3.", "3"),  # not followed by a digit: removed
        ("u.s.a.", "usa"),
        (".5", ".5"),
        ("it's 5:30", "it's 5:30"),  # apostrophe and colon are not punctuation here
        ("a_b@c", "a b c"),
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_period_removal_stops_after_32():
    # The official call passes re.UNICODE (32) in sub's count position.
    text = "." * 40
    assert process_punctuation(text) == "." * 8


def test_lmms_eval_comma_pattern_accepts_repeated_commas():
    assert process_punctuation("1,,2 a-b") == "1  2 a b"  # official: no digit,comma,digit
    assert process_punctuation("1,,2 a-b", variant="lmms_eval") == "12 ab"


def test_punctuation_rules_in_accuracy():
    answers = ["red white"] * 8 + MIXED
    assert vqa_accuracy("red-white", answers) == 1.0
    # "red  white" after punctuation; the word step splits on whitespace, so the spaces collapse.
    assert vqa_accuracy("red - white", answers) == 1.0
    assert vqa_accuracy("Red - White.", answers) == 1.0
    assert vqa_accuracy("redwhite", answers) == 0.0


# --- errors and aggregation ----------------------------------------------------------------------


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="variant"):
        vqa_accuracy("a", ["a"] * 10, variant="molmo")
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("a", [])
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("a", "a")
    with pytest.raises(TypeError, match="prediction"):
        vqa_accuracy(None, ["a"] * 10)
    with pytest.raises(TypeError, match="human answers"):
        vqa_accuracy("a", ["a", None])


def test_score_vqa_summary_and_breakdowns():
    preds = ["yes", "2", "dog", "no", "cat"]
    answers = [
        ["yes"] * 10,  # 1.0
        ["two"] * 3 + ["3"] * 7,  # 3 matches after normalisation: 0.9
        humans("dog", 1),  # 0.3
        ["yes"] * 10,  # 0.0
        humans("cat", 10, other="dog"),  # 1.0
    ]
    types = ["yes/no", "number", "other", "yes/no", "other"]
    qtypes = ["is the", "how many", "what", "is the", "what"]
    per_sample, summary = score_vqa(preds, answers, types, question_types=qtypes)
    assert per_sample == pytest.approx([1.0, 0.9, 0.3, 0.0, 1.0], abs=1e-12)
    assert summary["vqa_accuracy"] == pytest.approx(3.2 / 5, abs=1e-12)
    assert summary["n_samples"] == 5
    assert summary["variant"] == "official"
    assert summary["by_answer_type"]["yes/no"] == {"vqa_accuracy": 0.5, "n_samples": 2}
    assert summary["by_answer_type"]["number"]["vqa_accuracy"] == pytest.approx(0.9, abs=1e-12)
    assert summary["by_answer_type"]["other"]["vqa_accuracy"] == pytest.approx(0.65, abs=1e-12)
    assert set(summary["by_question_type"]) == {"is the", "how many", "what"}
    assert summary["by_question_type"]["what"]["n_samples"] == 2


def test_score_vqa_variant_and_length_errors():
    per_sample, summary = score_vqa(["Black."], [["black"] * 10], ["other"], variant="lmms_eval")
    assert per_sample == [1.0]
    assert "by_question_type" not in summary
    with pytest.raises(ValueError, match="length"):
        score_vqa(["a", "b"], [["a"] * 10], ["other", "other"])
    with pytest.raises(ValueError, match="at least one"):
        score_vqa([], [], [])
    with pytest.raises(TypeError, match="sample 1"):
        score_vqa(["a", None], [["a"] * 10] * 2, ["other"] * 2)
