"""The adapter's explicit greedy loop: equals transformers' generate, batch = batch 1, honest results."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from conftest import TINY_FAMILIES, make_image
from knobsweep.models import STAGES, GenerationResult
from knobsweep.timing import StageTimer

CASES = [
    ((64, 48), "What color is the circle?"),
    ((40, 72), "Describe the image briefly."),
    ((80, 45), "How many?"),
]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("vision_tokens", [16, 40])
def test_loop_equals_transformers_generate(tiny_adapters, family, vision_tokens):
    adapter = tiny_adapters[family]
    images = [make_image(w, h, seed=i) for i, ((w, h), _) in enumerate(CASES)]
    prompts = [p for _, p in CASES]
    inputs = adapter.move_inputs(adapter.prepare_inputs(images, prompts, vision_tokens))
    with torch.inference_mode():
        reference = adapter.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reference = reference[:, inputs["input_ids"].shape[1] :].tolist()
    results = adapter.generate_batch(images, prompts, vision_tokens=vision_tokens, max_new_tokens=8)
    eos, pad = adapter.eos_token_ids(), adapter.pad_token_id()
    for row, result in zip(reference, results):
        # generate pads finished rows; our ids stop at the end-of-sequence token.
        assert result.token_ids == row[: len(result.token_ids)]
        assert all(t == pad for t in row[len(result.token_ids) :])
        assert len(result.token_ids) == 8 or result.token_ids[-1] in eos
    # Each row alone (batch 1, no padding) gives the same tokens as in the padded batch.
    for image, prompt, batched in zip(images, prompts, results):
        single = adapter.generate(image, prompt, vision_tokens=vision_tokens, max_new_tokens=8)
        assert single.token_ids == batched.token_ids
        assert single.text == batched.text
        assert single.vision_tokens == batched.vision_tokens
        assert single.prompt_tokens == batched.prompt_tokens


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_result_fields_and_timings(tiny_adapters, family):
    adapter = tiny_adapters[family]
    image = make_image(64, 48)
    result = adapter.generate(image, "What color is the circle?", vision_tokens=24, max_new_tokens=5)
    assert isinstance(result, GenerationResult)
    tokenizer = adapter.processor.tokenizer
    expected_text = tokenizer.decode(
        [t for t in result.token_ids if t not in adapter.eos_token_ids()], skip_special_tokens=True
    )
    assert result.text == expected_text.strip()
    assert result.output_tokens == len(result.token_ids) and 1 <= result.output_tokens <= 5
    assert result.vision_tokens == adapter.planned_vision_tokens(image, 24) <= 24
    inputs = adapter.prepare_inputs([image], ["What color is the circle?"], 24)
    assert result.prompt_tokens == inputs["input_ids"].shape[1] > result.vision_tokens
    t = result.timings_ms
    assert set(t) == set(STAGES)
    assert all(v >= 0 for v in t.values()) and t["vision"] > 0 and t["prefill"] > 0
    assert t["ttft"] == pytest.approx(t["preprocess"] + t["vision"] + t["prefill"])
    assert t["total"] == pytest.approx(t["ttft"] + t["decode"])
    if result.output_tokens == 1:
        assert t["decode"] < t["prefill"] + t["vision"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generation_is_deterministic_and_stops_at_max_new_tokens(tiny_adapters, family):
    adapter = tiny_adapters[family]
    image = make_image(48, 48, seed=5)
    first = adapter.generate(image, "What is this?", vision_tokens=16, max_new_tokens=3)
    second = adapter.generate(image, "What is this?", vision_tokens=16, max_new_tokens=3)
    assert first.token_ids == second.token_ids and first.output_tokens <= 3
    longer = adapter.generate(image, "What is this?", vision_tokens=16, max_new_tokens=6)
    assert longer.token_ids[: len(first.token_ids)] == first.token_ids


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generate_rejects_bad_requests(tiny_adapters, family):
    adapter = tiny_adapters[family]
    image = make_image(48, 48)
    with pytest.raises(ValueError, match="max_new_tokens"):
        adapter.generate(image, "x", vision_tokens=16, max_new_tokens=0)
    with pytest.raises(ValueError, match="as many images as prompts"):
        adapter.generate_batch([image], ["a", "b"], vision_tokens=16, max_new_tokens=2)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prefill_gets_the_positions_generate_computes_from_the_moved_inputs(tiny_adapters, family):
    # The adapter computes them from the processor's host tensors, before they move to the device.
    adapter = tiny_adapters[family]
    image, prompt = make_image(64, 48), "What color is the circle?"
    seen = []
    handle = adapter.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        adapter.generate(image, prompt, vision_tokens=24, max_new_tokens=1)
    finally:
        handle.remove()
    inputs = adapter.move_inputs(adapter.prepare_inputs([image], [prompt], 24))
    extra = {k: v for k, v in inputs.items() if k != "input_ids"}
    expected = adapter.model._prepare_position_ids_for_generation(inputs["input_ids"], extra)
    (positions,) = seen
    assert positions.device == expected.device
    assert torch.equal(positions, expected)


class _RecordingTimer(StageTimer):
    """A StageTimer that keeps the order of its marks and the intervals read from it."""

    made: ClassVar[list[_RecordingTimer]] = []

    def __init__(self, device) -> None:
        super().__init__(device)
        self.order, self.read = [], []
        _RecordingTimer.made.append(self)

    def mark(self, name: str) -> None:
        super().mark(name)
        self.order.append(name)

    def elapsed_ms(self, start: str, end: str) -> float:
        self.read.append((start, end))
        return super().elapsed_ms(start, end)


@pytest.mark.parametrize("ahead", [0, 1])
@pytest.mark.parametrize("ends", [(1, 3, 2), (0, 0, 0)], ids=["rows end apart", "all end at the prefill"])
def test_decoding_ahead_keeps_the_tokens_and_times_only_the_steps_needed(
    tiny_adapters, monkeypatch, ahead, ends
):
    adapter = tiny_adapters["qwen3_vl_moe"]
    images = [make_image(w, h, seed=i) for i, ((w, h), _) in enumerate(CASES)]
    prompts = [p for _, p in CASES]
    reference = [
        r.token_ids for r in adapter.generate_batch(images, prompts, vision_tokens=16, max_new_tokens=8)
    ]
    # Rows end early: the tokens they gave at steps `ends` now end a sequence.
    eos = adapter.eos_token_ids() | {row[end] for row, end in zip(reference, ends, strict=True)}
    expected = [
        row[: next(i for i, t in enumerate(row) if t in eos or i == len(row) - 1) + 1] for row in reference
    ]
    last = max(len(row) for row in expected) - 1
    monkeypatch.setattr(adapter, "eos_token_ids", lambda: eos)
    monkeypatch.setattr(adapter, "_eos_tensors", {})
    monkeypatch.setattr(adapter, "_decode_steps_ahead", lambda device: ahead)
    monkeypatch.setattr("knobsweep.models.base.StageTimer", _RecordingTimer)
    _RecordingTimer.made.clear()
    results = adapter.generate_batch(images, prompts, vision_tokens=16, max_new_tokens=8)
    assert [r.token_ids for r in results] == expected
    (timer,) = _RecordingTimer.made
    # One step launched past the last one needed when deciding ahead, none otherwise (each launched step marks
    # its token); the decode stage ends at the last step needed.
    launched = min(last + ahead, 7)
    assert [m for m in timer.order if m.startswith("token_")] == [
        f"token_{s}" for s in range(1, launched + 1)
    ]
    assert ("prefill_end", f"token_{last}" if last else "prefill_end") in timer.read
