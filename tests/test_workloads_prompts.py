"""Prompt templates: lmms-eval defaults, rendering, and clear errors for unusable templates."""

from __future__ import annotations

import pytest
from knobsweep.workloads import prompts


def test_defaults_follow_lmms_eval():
    assert prompts.render_prompt("qa", None, "What color is the cat?") == (
        "What color is the cat?\nAnswer the question using a single word or phrase."
    )
    assert prompts.default_max_new_tokens("qa") == 16
    assert (
        prompts.render_prompt("captioning", None) == "Provide a one-sentence caption for the provided image."
    )
    assert prompts.default_max_new_tokens("captioning") == 64
    assert prompts.qa_prompt("Why?") == prompts.render_prompt("qa", None, "Why?")
    assert prompts.caption_prompt() == prompts.render_prompt("captioning", None)


def test_custom_templates():
    assert prompts.render_prompt("qa", "Q: {question} A:", "how many?") == "Q: how many? A:"
    assert prompts.render_prompt("qa", "{{literal}} {question}", "x?") == "{literal} x?"
    assert prompts.render_prompt("captioning", "Describe {{this}} image.") == "Describe {this} image."


@pytest.mark.parametrize(
    ("workload", "template", "message"),
    [
        ("qa", "Answer briefly.", r"must contain \{question\}"),
        ("qa", "{question} {answer}", r"unknown field\(s\) \['answer'\]"),
        ("qa", "{question", "malformed"),
        ("qa", "{question} }", "malformed"),
        ("qa", "{}", r"unknown field\(s\) \[''\]"),
        ("qa", "{question!r}", "plain named fields"),
        ("qa", "{question.upper}", "unknown field"),
        ("captioning", "Caption {question}", r"unknown field\(s\) \['question'\]; allowed: none"),
        ("captioning", "", "non-empty"),
        ("vqa", "{question}", "unknown workload 'vqa'"),
    ],
)
def test_bad_templates_are_named(workload, template, message):
    with pytest.raises(ValueError, match=message):
        prompts.validate_template(workload, template)


def test_empty_question_is_rejected():
    with pytest.raises(ValueError, match="question is empty"):
        prompts.render_prompt("qa", None, "  ")
