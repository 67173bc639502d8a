"""Vision-token budgets: the largest grid with at most T tokens near the image's aspect, kept by the processor."""

from __future__ import annotations

import math

import pytest
from conftest import TEST_DEVICE, TINY_FAMILIES, make_image
from knobsweep.models import KnobError, token_grid

SEED_GRID = [288, 432, 576, 720, 1008, 1440, 1872]
ASPECTS = {"4:3": (640, 480), "3:4": (480, 640), "16:9": (1920, 1080), "1:1": (500, 500)}
# The bound this rule achieves on the seed grid (worst case: 1:1 at 288 -> 16x17 = 272 tokens).
MIN_FILL = 0.94


def _error(rows: int, cols: int, width: int, height: int) -> float:
    return abs(math.log(cols / rows / (width / height)))


@pytest.mark.parametrize("vision_tokens", SEED_GRID)
@pytest.mark.parametrize("aspect", ASPECTS)
def test_grid_is_the_largest_within_tolerance(vision_tokens, aspect):
    width, height = ASPECTS[aspect]
    rows, cols = token_grid(width, height, vision_tokens, min_tokens=4, aspect_tolerance=0.10)
    assert rows * cols <= vision_tokens
    assert rows * cols >= MIN_FILL * vision_tokens
    assert _error(rows, cols, width, height) <= math.log1p(0.10) + 1e-12
    # Brute force: no grid within the tolerance holds more tokens.
    best = max(
        r * c
        for r in range(1, vision_tokens + 1)
        for c in range(1, vision_tokens // r + 1)
        if _error(r, c, width, height) <= math.log1p(0.10) + 1e-12
    )
    assert rows * cols == best


def test_tiny_budgets_fall_back_to_closest_aspect():
    # 16:9 at 4 tokens: nothing within 10%; (1, 2) has the closest aspect ratio.
    assert token_grid(1920, 1080, 4) == (1, 2)
    assert token_grid(500, 500, 4) == (2, 2)
    with pytest.raises(KnobError, match="below the minimum"):
        token_grid(500, 500, 3, min_tokens=4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_processor_keeps_the_planned_grid(tiny_adapters, family):
    adapter = tiny_adapters[family]
    low, high = adapter.vision_token_range()
    assert low <= 16 and high >= max(SEED_GRID)
    for vision_tokens in [16, *SEED_GRID]:
        images = [make_image(w // 4, h // 4, seed=vision_tokens) for w, h in ASPECTS.values()]
        inputs = adapter.prepare_inputs(images, ["What is in the image?"] * len(images), vision_tokens)
        counts = adapter.vision_tokens_of(inputs)
        assert counts == [adapter.planned_vision_tokens(image, vision_tokens) for image in images]
        assert all(count <= vision_tokens for count in counts)
        if hasattr(adapter, "pixels_per_token") and family.startswith("qwen"):
            side = adapter.pixels_per_token()
            for image, count in zip(images, counts):
                rows, cols = adapter.planned_grid(image, vision_tokens)
                assert adapter.resize_for_tokens(image, vision_tokens).size == (cols * side, rows * side)
                assert count == rows * cols


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generate_reports_actual_vision_tokens(tiny_adapters, family):
    adapter = tiny_adapters[family]
    image = make_image(80, 45)
    result = adapter.generate(image, "What?", vision_tokens=30, max_new_tokens=1)
    assert result.vision_tokens == adapter.planned_vision_tokens(image, 30) <= 30
    with pytest.raises(KnobError, match="vision_tokens must be an int"):
        adapter.resize_for_tokens(image, 30.5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_device_resize_gives_the_host_resize_within_rounding(tiny_adapters, family):
    """`resize_on_device` (torchvision, run on the model's device) against PIL's `resize_for_tokens`: same
    size and orientation, pixels within rounding. On CUDA torchvision resizes in float without PIL's rounding
    and clipping between the horizontal and vertical passes: ~20 % of pixels differ by a level when
    upscaling, a few by up to ~16 at sharp edges (ringing); a misplaced pixel grid differs by tens of levels
    on average. Here on the test device, whatever it is."""
    import numpy as np

    adapter = tiny_adapters[family]
    for width, height in [(160, 90), (90, 160)]:
        image = make_image(width, height, seed=width)
        host = np.asarray(adapter.resize_for_tokens(image, 64)).astype(int)
        on_device = adapter.resize_on_device(image, 64)
        assert on_device.dtype.is_floating_point is False and on_device.device.type == adapter.device.type
        on_device = on_device.permute(1, 2, 0).cpu().numpy().astype(int)
        assert on_device.shape == host.shape
        difference = np.abs(on_device - host)
        assert difference.mean() <= 0.5
        assert np.quantile(difference, 0.99) <= 2


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_images_are_processed_on_the_models_device(tiny_adapters, family):
    """On CUDA the image is resized and processed on the GPU (steadier, faster preprocessing): the same
    tokens as on the host, pixel values within the resizes' rounding; on the CPU nothing changes."""
    from unittest import mock

    import torch

    adapter = tiny_adapters[family]
    image = make_image(640, 480, seed=3)
    if TEST_DEVICE != "cuda":
        assert adapter.image_processor_kwargs() == {}
        with mock.patch.object(type(adapter), "resize_on_device", side_effect=AssertionError("on the CPU")):
            adapter.prepare_inputs([image], ["What is shown?"], 64)
        return
    assert adapter.image_processor_kwargs() == {"device": str(adapter.device)}
    with mock.patch.object(type(adapter), "resize_for_tokens", side_effect=AssertionError("resized on host")):
        on_device = adapter.prepare_inputs([image], ["What is shown?"], 64)
    with mock.patch.object(type(adapter), "image_processor_kwargs", return_value={}):
        on_host = adapter.prepare_inputs([image], ["What is shown?"], 64)
    assert on_device["pixel_values"].device.type == "cuda"
    assert torch.equal(on_device["input_ids"].cpu(), on_host["input_ids"])
    assert adapter.vision_tokens_of(on_device) == adapter.vision_tokens_of(on_host)
    # Within the resizes' rounding (see above), in levels of 255 after the processor's normalisation.
    std = adapter.processor.image_processor.image_std
    level = 1 / 255 / min(std if isinstance(std, (list, tuple)) else [std])
    difference = (on_device["pixel_values"].cpu().float() - on_host["pixel_values"].float()).abs()
    assert difference.mean() <= 0.5 * level
    assert torch.quantile(difference.flatten()[:1_000_000], 0.99) <= 2 * level + 1e-4
