"""Caption metrics through pycocoevalcap's own scorers (salaniz/pycocoevalcap 1.2).

What a call does, the way ``COCOEvalCap.evaluate()`` does it, minus SPICE:
PTBTokenizer (Java, Stanford CoreNLP 3.4.1, lower-cases and drops punctuation) over predictions and
references, then the scorers on the tokenised text:

- ``cider``: ``Cider()``, which is CIDEr-D (n=4, sigma=6, clipping, x10);
- ``bleu4``: ``Bleu(4)``, its 4th value (corpus BLEU-4 with the 'closest' reference length);
- ``rouge_l``: ``Rouge()`` (ROUGE-L, beta=1.2);
- ``meteor``: ``Meteor()`` (Java, METEOR 1.5, ``-Xmx2G``).

Each call starts the tokenizer JVM once (predictions and references in one file) and, if METEOR is
asked for, one METEOR JVM, which is closed before returning.

Things to know when reading the numbers:

- CIDEr's document frequencies (and its ``ref_len = log(#images)``) come from the references of the
  evaluated set only. Scores depend on which samples are scored together, so every cell of a sweep
  must be scored on the same sample set, per-sample CIDEr is only comparable within that set, and a
  set of one image scores 0.
- Corpus values are the scorers' own: CIDEr and ROUGE-L are means of the per-sample values; BLEU-4 is
  corpus BLEU (n-gram counts pooled over samples), not the mean of per-sample BLEU-4; METEOR is the
  jar's aggregate over pooled statistics, not the mean of per-sample METEOR.
- An empty prediction (or one that is only punctuation, which the tokenizer reduces to "") is scored
  as the empty string: 0 on every metric, and it counts in the corpus values (for BLEU as a zero-length
  hypothesis). This is deterministic; pycocoevalcap copes with "" as long as the tokenizer's lines stay
  aligned, which is why line-break characters other than "\\n" (which pycocoevalcap already replaces)
  are turned into spaces first: Java would otherwise split the line and shift every later caption.
- SPICE is not offered: pycocoevalcap's ``Spice()`` downloads Stanford CoreNLP at run time.
- pycocoevalcap's tokenizer writes its temporary file next to its jar, inside the installed package,
  so that directory must be writable.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence

CAPTION_METRICS = ("cider", "bleu4", "rouge_l", "meteor")

JAVA_MISSING = (
    "caption metrics need Java (pycocoevalcap's PTBTokenizer and METEOR are Java programs) but no "
    "'java' is on PATH; install a JRE, e.g. `apt-get install openjdk-17-jre-headless` or "
    "`conda install -c conda-forge openjdk`"
)
SPICE_FORBIDDEN = (
    "metric 'spice' is not available: pycocoevalcap's Spice() downloads Stanford CoreNLP (~385 MB) at "
    "run time, and knobsweep runs without network downloads; use cider, bleu4, rouge_l or meteor"
)

# Characters that end a line for Java's PTBTokenizer (-preserveLines) besides "\n".
_JAVA_LINE_BREAKS = re.compile("\r\n?|[\u000b\u000c\u0085\u2028\u2029]")
_SENTINEL_KEY, _SENTINEL = ("end", ""), "knobsweependofinput"


def _one_line(text: str) -> str:
    return _JAVA_LINE_BREAKS.sub(" ", text)


def _check_inputs(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], metrics: Sequence[str]
) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    for m in metrics:
        if m == "spice":
            raise ValueError(SPICE_FORBIDDEN)
        if m not in CAPTION_METRICS:
            raise ValueError(f"unknown caption metric {m!r}; expected some of {CAPTION_METRICS}")
    if not metrics:
        raise ValueError(f"no caption metric asked for; expected some of {CAPTION_METRICS}")

    missing_refs = sorted(set(predictions) - set(references))
    missing_preds = sorted(set(references) - set(predictions))
    if missing_refs or missing_preds:
        raise ValueError(
            "predictions and references must have the same sample ids; "
            f"{len(missing_refs)} without references: {missing_refs[:10]}, "
            f"{len(missing_preds)} without a prediction: {missing_preds[:10]}"
        )
    if not predictions:
        raise ValueError("score_captions needs at least one sample")
    for sid, pred in predictions.items():
        if not isinstance(pred, str):
            raise TypeError(
                f"prediction of sample {sid!r} must be a str, got {type(pred).__name__}: {pred!r}"
            )
    for sid, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references of sample {sid!r} must be a non-empty list of str, got {refs!r}")
    return tuple(dict.fromkeys(metrics))  # de-duplicated, order kept


def _tokenize(
    ids: list[str], predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """One PTBTokenizer run over predictions and references together; returns (gts, res)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Tokenisation is line by line (-preserveLines), so one file gives what two runs would.
    captions = {("pred", sid): [{"caption": _one_line(predictions[sid])}] for sid in ids}
    captions |= {("ref", sid): [{"caption": _one_line(r)} for r in references[sid]] for sid in ids}
    # The wrapper zips keys with output lines, so a split or lost line would silently shift every later
    # caption. A known last line must come back in place.
    captions[_SENTINEL_KEY] = [{"caption": _SENTINEL}]
    tokenized = PTBTokenizer().tokenize(captions)
    if tokenized.get(_SENTINEL_KEY) != [_SENTINEL]:
        raise RuntimeError("PTBTokenizer output lines do not line up with its input captions")
    res = {sid: tokenized[("pred", sid)] for sid in ids}
    gts = {sid: tokenized[("ref", sid)] for sid in ids}
    return gts, res


@contextlib.contextmanager
def _meteor() -> Iterator[object]:
    """A pycocoevalcap Meteor whose JVM is shut down on exit (its __del__ runs only at collection)."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        yield meteor
    finally:
        proc: subprocess.Popen = meteor.meteor_p
        # compute_score leaves its lock held if it raised; Meteor.__del__ would then block forever.
        if meteor.lock.locked():
            meteor.lock.release()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.kill()  # as Meteor.__del__ does; waiting for a clean exit can take seconds mid-start-up
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    metrics: Sequence[str] = CAPTION_METRICS,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Score predicted captions against reference captions with pycocoevalcap.

    ``predictions``: sample id -> predicted caption; ``references``: sample id -> reference captions
    (same ids). Returns ``(corpus, per_sample)``: ``corpus[metric]`` is the scorer's corpus value and
    ``per_sample[sample_id][metric]`` the per-sample value, for each of ``metrics`` (names from
    ``CAPTION_METRICS``). See the module docstring for CIDEr's dependence on the scored set, the
    BLEU-4/METEOR corpus values, and empty predictions.
    """
    metrics = _check_inputs(predictions, references, metrics)
    if shutil.which("java") is None:
        raise FileNotFoundError(JAVA_MISSING)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(predictions)
    gts, res = _tokenize(ids, predictions, references)

    corpus: dict[str, float] = {}
    per_metric: dict[str, Sequence[float]] = {}
    for name in metrics:
        if name == "bleu4":
            score, scores = Bleu(4).compute_score(gts, res, verbose=0)
            corpus[name], per_metric[name] = score[3], scores[3]
        elif name == "cider":
            corpus[name], per_metric[name] = Cider().compute_score(gts, res)
        elif name == "rouge_l":
            corpus[name], per_metric[name] = Rouge().compute_score(gts, res)
        elif name == "meteor":
            with _meteor() as meteor:
                try:
                    corpus[name], per_metric[name] = meteor.compute_score(gts, res)
                except ValueError as err:  # the jar died or printed something unexpected
                    raise RuntimeError(f"METEOR (Java) failed: {err}") from err

    corpus = {name: float(corpus[name]) for name in metrics}
    per_sample = {sid: {name: float(per_metric[name][i]) for name in metrics} for i, sid in enumerate(ids)}
    return corpus, per_sample
