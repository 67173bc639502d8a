"""Prompt templates of the workloads and their generation limits (defaults follow lmms-eval).

A template is a `str.format` string. The qa template must contain `{question}`; the captioning template
may contain no field at all. Literal braces are written `{{` and `}}`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from knobsweep.workloads import WORKLOADS


@dataclass(frozen=True)
class PromptDefaults:
    template: str
    max_new_tokens: int


# lmms-eval's VQAv2 suffix with 16 new tokens; its COCO caption prompt with 64 new tokens.
DEFAULTS: dict[str, PromptDefaults] = {
    "qa": PromptDefaults("{question}\nAnswer the question using a single word or phrase.", 16),
    "captioning": PromptDefaults("Provide a one-sentence caption for the provided image.", 64),
}
_FIELDS = {"qa": {"question"}, "captioning": set()}


def _check_workload(workload: str) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r} (known: {', '.join(WORKLOADS)})")


def default_template(workload: str) -> str:
    _check_workload(workload)
    return DEFAULTS[workload].template


def default_max_new_tokens(workload: str) -> int:
    _check_workload(workload)
    return DEFAULTS[workload].max_new_tokens


def validate_template(workload: str, template: str) -> None:
    """Raise ValueError naming the template when it cannot be rendered for `workload`."""
    _check_workload(workload)
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{workload} prompt template must be a non-empty string, got {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # e.g. a single '{' or '}'
        raise ValueError(
            f"{workload} prompt template {template!r} is malformed: {e} (write literal braces as {{{{ }}}})"
        ) from e
    fields = {name for _, name, _, _ in parsed if name is not None}
    allowed = _FIELDS[workload]
    unknown = sorted(fields - allowed)
    if unknown:
        known = ", ".join(f"{{{f}}}" for f in sorted(allowed)) or "none"
        raise ValueError(
            f"{workload} prompt template {template!r} uses unknown field(s) {unknown}; allowed: {known}"
        )
    if "" in fields or any(spec or conv for _, name, spec, conv in parsed if name):
        raise ValueError(f"{workload} prompt template {template!r}: use plain named fields like {{question}}")
    missing = sorted(allowed - fields)
    if missing:
        raise ValueError(
            f"{workload} prompt template {template!r} must contain {', '.join('{' + m + '}' for m in missing)}"
        )


def render_prompt(workload: str, template: str | None, question: str = "") -> str:
    """The text given to the model: `template` (None = the workload's default) filled with `question`."""
    template = default_template(workload) if template is None else template
    validate_template(workload, template)
    if workload == "qa":
        if not question.strip():
            raise ValueError("qa prompt: the question is empty")
        return template.format(question=question)
    return template.format()


def qa_prompt(question: str, template: str | None = None) -> str:
    return render_prompt("qa", template, question)


def caption_prompt(template: str | None = None) -> str:
    return render_prompt("captioning", template)
