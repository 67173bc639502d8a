"""Image placeholders expanded on token ids (`knobsweep.models.image_tokens`) against the processor's own output,
and how the adapter checks it before use and falls back to the processor where the two differ."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_FAMILIES, make_image
from knobsweep.models import load_model
from knobsweep.models.image_tokens import PlaceholderExpansion, first_difference, unsupported_reason

EXPANDED = "image placeholders expanded on token ids"
PROMPTS = ("What is the man holding?", "Describe the image in one sentence, with as much detail as you can.")
# (width, height): landscape, portrait, square-ish; each gets its own token grid.
SIZES = ((160, 120), (120, 160), (150, 100))


def processor_calls(adapter, vision_tokens: int, images, prompts) -> list[tuple[list, list, dict]]:
    """(images, texts, images_kwargs) of each processor call `prepare_inputs` makes for this request: one for the
    whole batch, or one per image for InternVL (each with its own tile count)."""
    texts = [adapter.chat_prompt(p) for p in prompts]
    kwargs = adapter.image_processor_kwargs()
    if adapter.family != "internvl":
        return [(adapter.images_for_processor(images, vision_tokens), texts, kwargs)]
    calls = []
    for image, text in zip(images, texts):
        rows, cols = adapter.planned_grid(image, vision_tokens)
        tiles = {"crop_to_patches": True, "min_patches": rows * cols, "max_patches": rows * cols}
        calls.append((adapter.images_for_processor([image], vision_tokens), [text], {**tiles, **kwargs}))
    return calls


def by_processor(adapter, images, texts, kwargs):
    return adapter.processor(
        images=images, text=texts, return_tensors="pt", padding=True, images_kwargs=kwargs
    )


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_expansion_gives_the_processors_output(tiny_adapters, family):
    """Every key, shape, dtype and element of the processor's output, for batches whose prompts pad differently,
    images of three aspect ratios, and budgets from the smallest to a few hundred vision tokens."""
    adapter = tiny_adapters[family]
    assert unsupported_reason(adapter.processor) is None
    adapter.processor.tokenizer.padding_side = "left"
    low, high = adapter.vision_token_range()
    budgets = sorted({low, min(high, 4 * low), min(high, 300)})
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    expansion = None
    for vision_tokens in budgets:
        for batch in ([0, 1], [2], [1, 2]):
            chosen = [images[i] for i in batch]
            prompts = [PROMPTS[i % 2] for i in batch]
            for call in processor_calls(adapter, vision_tokens, chosen, prompts):
                reference = by_processor(adapter, *call)
                expansion = expansion or PlaceholderExpansion(adapter.processor, reference.keys())
                assert first_difference(reference, expansion(*call)) is None, (vision_tokens, batch)
    # The placeholder of a prompt became as many image tokens as the image has vision tokens.
    inputs = adapter.prepare_inputs(images[:1], PROMPTS[:1], budgets[-1])
    image_tokens = (inputs["input_ids"] == adapter.model.config.image_token_id).sum().item()
    assert image_tokens == adapter.vision_tokens_of(inputs)[0] > 1


def test_right_padding_too(tiny_adapters):
    adapter = tiny_adapters["qwen3_vl_moe"]
    tokenizer = adapter.processor.tokenizer
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:2])]
    try:
        tokenizer.padding_side = "right"
        (call,) = processor_calls(adapter, 64, images, PROMPTS)
        reference = by_processor(adapter, *call)
        assert (
            first_difference(reference, PlaceholderExpansion(adapter.processor, reference.keys())(*call))
            is None
        )
        assert reference["attention_mask"][0, -1] == 0  # the shorter prompt was padded on the right
    finally:
        tokenizer.padding_side = "left"


def counting(processor):
    """A stand-in for `processor` that counts its calls and forwards everything else."""

    class Counting:
        calls = 0

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return processor(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(processor, name)

    return Counting()


@pytest.fixture
def fresh_adapter(tiny_checkpoints):
    """A Qwen3-VL-MoE adapter of its own (the check's state is the adapter's), its processor counted."""
    adapter = load_model(tiny_checkpoints["qwen3_vl_moe"], device="cpu", dtype="float32")
    adapter.processor = counting(adapter.processor)
    return adapter


def test_the_first_request_of_each_grid_checks_the_expansion_then_the_processor_is_not_called(fresh_adapter):
    adapter = fresh_adapter
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    assert adapter.preprocess_mode() == "processor"  # nothing checked yet
    adapter.prepare_inputs(images[:2], PROMPTS, 64)
    assert adapter.processor.calls == 1 and adapter.preprocess_mode() == EXPANDED
    # Other images and prompts with the same token grids: the expansion only, and its output is the processor's.
    again = adapter.prepare_inputs(images[:2], PROMPTS[::-1], 64)
    assert adapter.processor.calls == 1
    (call,) = processor_calls(adapter, 64, images[:2], PROMPTS[::-1])
    assert first_difference(by_processor(adapter, *call), again) is None
    assert adapter.processor.calls == 2  # that reference call
    # Each new grid, or new budget, is checked once.
    for request in (
        ([images[2]], 64),
        ([images[2]], 64),
        (images[1::-1], 64),
        (images[:2], 128),
        (images[:2], 128),
    ):
        adapter.prepare_inputs(request[0], PROMPTS[: len(request[0])], request[1])
    assert adapter.processor.calls == 5
    assert adapter.preprocess_mode() == EXPANDED


def test_images_resized_on_the_device_are_checked_per_grid_too(fresh_adapter, monkeypatch):
    """On CUDA the resized images reach the processor as (3, height, width) tensors (`resize_on_device`); here the
    same path runs on the CPU, the image processor told to work on the CPU device."""
    adapter = fresh_adapter
    monkeypatch.setattr(type(adapter), "image_processor_kwargs", lambda self: {"device": "cpu"})
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    (call,) = processor_calls(adapter, 64, images[:1], PROMPTS[:1])
    assert isinstance(call[0][0], torch.Tensor)
    for image in (images[0], images[0], images[1], images[1]):
        inputs = adapter.prepare_inputs([image], PROMPTS[:1], 64)
    assert adapter.processor.calls == 2 and adapter.preprocess_mode() == EXPANDED
    (call,) = processor_calls(adapter, 64, images[1:2], PROMPTS[:1])
    assert first_difference(by_processor(adapter, *call), inputs) is None


def test_an_expansion_that_differs_on_one_grid_only_is_caught_there(fresh_adapter):
    """Checked on one grid, the expansion is not trusted on another: there it is compared again, and where it
    differs the request gets the processor's output."""
    adapter = fresh_adapter
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    adapter.prepare_inputs(images[:1], PROMPTS[:1], 64)
    assert adapter.preprocess_mode() == EXPANDED
    checked = adapter._expansion
    wrong_on = adapter.planned_grid(images[2], 64)
    real = checked._replacement

    def replacement(image_inputs, image_index):
        ids = real(image_inputs, image_index)
        _, rows, cols = image_inputs["image_grid_thw"][image_index].tolist()
        merge = adapter.processor.image_processor.merge_size
        return ids[:-1] if (rows // merge, cols // merge) == wrong_on else ids

    checked._replacement = replacement
    inputs = adapter.prepare_inputs(images[2:], PROMPTS[:1], 64)
    (call,) = processor_calls(adapter, 64, images[2:], PROMPTS[:1])
    assert first_difference(by_processor(adapter, *call), inputs) is None
    width, height = adapter.resized_size(images[2], 64)
    assert adapter.preprocess_mode().startswith(
        f"processor: token-id expansion differs at 64 vision tokens (images of {width}x{height} pixels): input_ids"
    )


def test_an_expansion_that_differs_is_dropped_for_the_processor(fresh_adapter, monkeypatch, caplog):
    """Where the ids differ from the processor's (here: one image token short), the request gets the processor's
    output, the adapter says why in its preprocess mode and a warning, and never uses the expansion again."""
    adapter = fresh_adapter
    real = PlaceholderExpansion._replacement
    monkeypatch.setattr(PlaceholderExpansion, "_replacement", lambda self, *a: real(self, *a)[:-1])
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:2])]
    with caplog.at_level(logging.WARNING, logger="knobsweep.models.base"):
        inputs = adapter.prepare_inputs(images, PROMPTS, 64)
    (call,) = processor_calls(adapter, 64, images, PROMPTS)
    assert first_difference(by_processor(adapter, *call), inputs) is None
    mode = adapter.preprocess_mode()
    assert mode.startswith("processor: token-id expansion differs at 64 vision tokens (images of ")
    assert "pixels): input_ids: shape" in mode
    assert any(mode.removeprefix("processor: ") in r.getMessage() for r in caplog.records)
    calls = adapter.processor.calls
    adapter.prepare_inputs(images, PROMPTS, 64)
    adapter.prepare_inputs(images, PROMPTS, 128)
    assert adapter.processor.calls == calls + 2  # the processor for every request
    assert adapter.preprocess_mode() == mode


def test_an_expansion_that_raises_is_dropped_for_the_processor(fresh_adapter, monkeypatch):
    def broken(self, *args):
        raise KeyError("num_patches")

    monkeypatch.setattr(PlaceholderExpansion, "__call__", broken)
    image = make_image(*SIZES[0])
    inputs = fresh_adapter.prepare_inputs([image], PROMPTS[:1], 64)
    width, height = fresh_adapter.resized_size(image, 64)
    assert fresh_adapter.preprocess_mode().endswith(
        f"differs at 64 vision tokens (images of {width}x{height} pixels): KeyError: 'num_patches'"
    )
    (call,) = processor_calls(fresh_adapter, 64, [image], PROMPTS[:1])
    assert first_difference(by_processor(fresh_adapter, *call), inputs) is None


def test_processors_whose_placeholders_cannot_be_expanded_on_ids(tiny_adapters):
    processor = tiny_adapters["qwen3_vl_moe"].processor
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    replace = processor.replace_image_token
    assert "no tokenizer" in unsupported_reason(SimpleNamespace(image_processor=image_processor))
    no_hook = SimpleNamespace(
        tokenizer=tokenizer, image_processor=image_processor, image_token="<|image_pad|>"
    )
    assert "replace_image_token" in unsupported_reason(no_hook)
    plain_text = SimpleNamespace(
        tokenizer=tokenizer,
        image_processor=image_processor,
        image_token="<image here>",
        replace_image_token=replace,
    )
    assert "'<image here>' is not kept whole" in unsupported_reason(plain_text)


def test_first_difference_names_what_differs():
    ids = torch.tensor([[1, 2, 3]])
    reference = {"input_ids": ids, "pixel_values": torch.zeros(2, 3)}
    assert first_difference(reference, {k: v.clone() for k, v in reference.items()}) is None
    assert "keys" in first_difference(reference, {"input_ids": ids})
    assert first_difference(reference, {**reference, "input_ids": torch.tensor([[1, 2, 4]])}) == (
        "input_ids: differs at index [0, 2]"
    )
    assert first_difference(reference, {**reference, "input_ids": ids.int()}).startswith("input_ids: dtype")
    assert first_difference(reference, {**reference, "input_ids": ids[:, :2]}).startswith("input_ids: shape")
    assert "not a tensor" in first_difference(reference, {**reference, "input_ids": [[1, 2, 3]]})
