"""Caption metrics: knobsweep.metrics.captions against direct pycocoevalcap calls on the same input."""

import shutil

import psutil
import pytest
from knobsweep.metrics import captions
from knobsweep.metrics.captions import CAPTION_METRICS, score_captions
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (see README)")

REFERENCES = {
    "img1": [
        "A man riding a horse on a beach.",
        "A person rides a brown horse along the shore.",
        "Man on horseback at the beach.",
    ],
    "img2": ["Two dogs playing with a red ball in the grass.", "A pair of dogs chase a ball on a lawn."],
    "img3": [
        "A plate of food with broccoli and rice.",
        "Broccoli, rice and chicken on a white plate.",
        "A healthy meal on a plate.",
    ],
    "img4": ["A red double-decker bus on a city street.", "A bus driving down the road in London."],
    "img5": ["A cat sleeping on a laptop keyboard.", "A cat lying on a computer."],
}
PREDICTIONS = {
    "img1": "A man rides a horse on the beach.",
    "img2": "",  # empty prediction
    "img3": "...",  # only punctuation: "" after tokenisation
    "img4": "A red bus on a street",
    "img5": "A cat sleeping on a laptop keyboard.",
}


def pycocoevalcap_reference(predictions, references):
    """What COCOEvalCap.evaluate() computes, minus SPICE, called directly."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    out = {}
    bleu, bleus = Bleu(4).compute_score(gts, res, verbose=0)
    out["bleu4"] = (bleu[3], bleus[3])
    out["cider"] = Cider().compute_score(gts, res)
    out["rouge_l"] = Rouge().compute_score(gts, res)
    meteor = Meteor()
    out["meteor"] = meteor.compute_score(gts, res)
    meteor.meteor_p.stdin.close()
    meteor.meteor_p.wait()
    ids = list(gts)
    return (
        {m: float(v[0]) for m, v in out.items()},
        {sid: {m: float(v[1][i]) for m, v in out.items()} for i, sid in enumerate(ids)},
    )


@pytest.fixture(scope="module")
def scored():
    return score_captions(PREDICTIONS, REFERENCES)


@pytest.fixture(scope="module")
def reference():
    return pycocoevalcap_reference(PREDICTIONS, REFERENCES)


def test_corpus_equals_pycocoevalcap(scored, reference):
    corpus, _ = scored
    assert list(corpus) == list(CAPTION_METRICS)
    assert corpus == pytest.approx(reference[0], rel=1e-12, abs=1e-15)
    assert corpus["cider"] > 0 and corpus["meteor"] > 0


def test_per_sample_equals_pycocoevalcap(scored, reference):
    _, per_sample = scored
    assert set(per_sample) == set(PREDICTIONS)
    for sid, values in per_sample.items():
        assert values == pytest.approx(reference[1][sid], rel=1e-12, abs=1e-15), sid


def test_empty_and_punctuation_only_predictions_score_zero(scored):
    _, per_sample = scored
    for sid in ("img2", "img3"):
        assert per_sample[sid] == {m: 0.0 for m in CAPTION_METRICS}
    assert per_sample["img5"]["meteor"] > 0.9  # the exact copy of a reference


def test_corpus_bleu4_is_not_mean_of_per_sample(scored):
    corpus, per_sample = scored
    mean = sum(v["bleu4"] for v in per_sample.values()) / len(per_sample)
    assert corpus["bleu4"] != pytest.approx(mean)
    assert corpus["cider"] == pytest.approx(sum(v["cider"] for v in per_sample.values()) / len(per_sample))


def test_no_java_left_running(scored):
    java = [p for p in psutil.Process().children(recursive=True) if "java" in p.name()]
    assert java == []


def test_meteor_closed_even_when_scoring_fails():
    with pytest.raises(RuntimeError, match="boom"), captions._meteor() as meteor:
        meteor.lock.acquire()  # as compute_score holds it when it raises
        raise RuntimeError("boom")
    assert meteor.meteor_p.returncode is not None
    assert not meteor.lock.locked()


def test_single_image_cider_is_zero():
    corpus, per_sample = score_captions(
        {"a": "a dog runs"}, {"a": ["a dog runs", "a dog"]}, metrics=("cider",)
    )
    assert corpus == {"cider": 0.0}
    assert per_sample == {"a": {"cider": 0.0}}


def test_java_line_breaks_do_not_shift_captions():
    refs = {"a": ["a dog runs on grass"], "b": ["a cat on a mat"], "c": ["a red bus"]}
    plain = score_captions({"a": "a dog runs", "b": "a cat", "c": "a bus"}, refs, metrics=("rouge_l",))
    broken = score_captions({"a": "a dog\rruns", "b": "a\u2028cat", "c": "a bus"}, refs, metrics=("rouge_l",))
    assert broken == plain


def test_shifted_tokenizer_lines_are_detected(monkeypatch):
    monkeypatch.setattr(captions, "_one_line", lambda text: text)  # without the line-break clean-up
    with pytest.raises(RuntimeError, match="line up"):
        score_captions(
            {"a": "a dog\rruns", "b": "a cat"}, {"a": ["a dog"], "b": ["a cat"]}, metrics=("cider",)
        )


@pytest.mark.parametrize(
    "predictions, references, metrics, error, match",
    [
        ({"a": "x"}, {"a": ["x"]}, ("spice",), ValueError, "downloads Stanford CoreNLP"),
        ({"a": "x"}, {"a": ["x"]}, ("cider", "bleu"), ValueError, "unknown caption metric 'bleu'"),
        ({"a": "x"}, {"a": ["x"]}, (), ValueError, "no caption metric"),
        ({"a": "x", "b": "y"}, {"a": ["x"], "c": ["z"]}, ("cider",), ValueError, r"\['b'\].*\['c'\]"),
        ({}, {}, ("cider",), ValueError, "at least one"),
        ({"a": None}, {"a": ["x"]}, ("cider",), TypeError, "sample 'a'"),
        ({"a": "x"}, {"a": []}, ("cider",), ValueError, "references of sample 'a'"),
        ({"a": "x"}, {"a": "x"}, ("cider",), ValueError, "references of sample 'a'"),
    ],
)
def test_bad_input_raises(predictions, references, metrics, error, match):
    with pytest.raises(error, match=match):
        score_captions(predictions, references, metrics=metrics)


def test_missing_java_says_how_to_install(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="openjdk"):
        score_captions({"a": "x"}, {"a": ["x"]}, metrics=("cider",))
