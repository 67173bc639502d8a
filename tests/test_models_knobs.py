"""Run-time knobs equal their physical counterparts: skipped blocks = a pruned copy, run-time top-k = a
model built with that top-k, reset = the model as loaded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TINY_FAMILIES, make_image

IMAGES = [(64, 48, 1), (48, 64, 2), (96, 54, 3)]  # 4:3, 3:4, 16:9
PROMPTS = ["What color is the circle?", "Describe the image briefly.", "How many red squares are there?"]
SKIP_SETS = [
    [1, 2, 3, 4, 5],  # block 0 skipped
    [0, 1, 2, 3, 4],  # last block skipped
    [2, 5],  # block 0, the DeepStack depth 1 and middle blocks skipped
    [0, 3],
]
VISION_TOKENS = 24
NEW_TOKENS = 6


def _inputs(adapter, n: int = 1):
    images = [make_image(w, h, seed) for w, h, seed in IMAGES[:n]]
    return adapter.move_inputs(adapter.prepare_inputs(images, PROMPTS[:n], VISION_TOKENS))


def _text_model(adapter, model):
    """The decoder stack of `model` (a copy of adapter.model), found through the same family adapter."""
    return type(adapter).text_model(type("Shim", (), {"model": model})())


def pruned_copy(adapter, kept: list[int]):
    """A deep copy of the model with the skipped blocks physically removed, config fixed, layer indices
    renumbered, and DeepStack features injected at their ORIGINAL depths (the documented semantics)."""
    assert adapter.active_blocks == tuple(range(adapter.num_blocks)), "copy the model as loaded"
    model = copy.deepcopy(adapter.model)
    text = _text_model(adapter, model)
    layers = [text.layers[i] for i in kept]
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    text.layers = torch.nn.ModuleList(layers)
    for config in {id(c): c for c in (text.config, model.config.get_text_config(decoder=True))}.values():
        config.num_hidden_layers = len(kept)
        for name in ("layer_types", "mlp_layer_types"):  # per-block lists (attention kind, dense/MoE)
            if getattr(config, name, None) is not None:
                setattr(config, name, [getattr(config, name)[i] for i in kept])
    if hasattr(text, "_deepstack_process"):
        _inject_deepstack_at_original_depths(text, kept)
    return model


def _inject_deepstack_at_original_depths(text, kept: list[int]) -> None:
    """Qwen3-VL injects DeepStack feature d after decoder layer d; in the pruned copy, feature d goes after
    the last kept layer with original index <= d (before the first kept layer if there is none)."""
    state: dict = {}

    def capture(module, args, kwargs):
        state["masks"] = kwargs.get("visual_pos_masks")
        state["embeds"] = kwargs.get("deepstack_visual_embeds")
        kwargs["deepstack_visual_embeds"] = None  # the hooks below inject instead
        return args, kwargs

    def inject(hidden, depths: range):
        embeds = state.get("embeds")
        if embeds is not None:
            for d in range(depths.start, min(depths.stop, len(embeds))):
                hidden = text._deepstack_process(hidden, state["masks"], embeds[d])
        return hidden

    text.register_forward_pre_hook(capture, with_kwargs=True)
    before_first = range(kept[0])

    def pre_first(module, args, kwargs):
        return (inject(args[0], before_first), *args[1:]), kwargs

    text.layers[0].register_forward_pre_hook(pre_first, with_kwargs=True)
    for j, original in enumerate(kept):
        following = kept[j + 1] if j + 1 < len(kept) else len(text.layers) + len(kept)
        depths = range(original, following)
        text.layers[j].register_forward_hook(lambda m, a, out, depths=depths: inject(out, depths))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("kept", SKIP_SETS, ids=lambda k: "keep" + "-".join(map(str, k)))
def test_skipped_blocks_equal_pruned_model(tiny_adapters, family, kept):
    adapter = tiny_adapters[family]
    reference = pruned_copy(adapter, kept)
    full_inputs = _inputs(adapter, n=3)
    with torch.inference_mode():
        full_logits = adapter.model(**full_inputs).logits
    adapter.configure(active_blocks=kept)

    # Uncached forward, a left-padded batch of three images and prompts.
    with torch.inference_mode():
        masked_logits = adapter.model(**full_inputs, use_cache=False).logits
        pruned_logits = reference(**full_inputs, use_cache=False).logits
    real = full_inputs["attention_mask"].bool()
    assert (masked_logits - pruned_logits)[real].abs().max().item() <= 1e-5
    assert not torch.allclose(masked_logits[real], full_logits[real], atol=1e-3), "skipping changed nothing"

    # Cached greedy generation: our loop (batch of 3 and batch 1) and transformers' generate on the masked
    # model both equal generate on the pruned copy.
    # A hybrid model whose kept blocks are all linear attention has no layer transformers can read the
    # sequence length from: the pruned copy then decodes without a cache (recomputing every step).
    types = getattr(adapter.text_config(), "layer_types", None)
    pruned_has_attention = types is None or any(types[i] == "full_attention" for i in kept)
    expected = reference.generate(
        **full_inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=pruned_has_attention
    )
    expected = expected[:, full_inputs["input_ids"].shape[1] :]
    masked_generate = adapter.model.generate(**full_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(masked_generate[:, full_inputs["input_ids"].shape[1] :], expected)
    images = [make_image(w, h, seed) for w, h, seed in IMAGES]
    ours = adapter.generate_batch(images, PROMPTS, vision_tokens=VISION_TOKENS, max_new_tokens=NEW_TOKENS)
    for row, result in enumerate(ours):
        assert result.token_ids == _strip(expected[row].tolist(), adapter)
    single = adapter.generate(images[2], PROMPTS[2], vision_tokens=VISION_TOKENS, max_new_tokens=NEW_TOKENS)
    assert single.token_ids == ours[2].token_ids


def _strip(ids: list[int], adapter) -> list[int]:
    """generate() output up to and including the first end-of-sequence token (padding after it dropped)."""
    out = []
    for t in ids:
        out.append(t)
        if t in adapter.eos_token_ids():
            break
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_deepstack_injection_is_attached_to_original_depth(tiny_adapters, family):
    """Skipping DeepStack layer 0 must still inject its features: differs from dropping the injection."""
    adapter = tiny_adapters[family]
    text = adapter.text_model()
    if not hasattr(text, "_deepstack_process"):
        pytest.skip(f"{family} has no DeepStack")
    inputs = _inputs(adapter)
    adapter.configure(active_blocks=[1, 2, 3, 4, 5])
    with torch.inference_mode():
        kept_injection = adapter.model(**inputs).logits
        original = text._deepstack_process
        calls = []

        def drop_first(hidden, masks, embeds):
            calls.append(1)
            return hidden if len(calls) == 1 else original(hidden, masks, embeds)

        text._deepstack_process = drop_first
        try:
            dropped = adapter.model(**inputs).logits
        finally:
            del text._deepstack_process
    assert len(calls) == len(adapter.model.config.vision_config.deepstack_visual_indexes)
    assert not torch.allclose(kept_injection, dropped, atol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2, 4, 8, 16, 32])
def test_runtime_top_k_equals_model_built_with_it(tiny_adapters, family, top_k):
    adapter = tiny_adapters[family]
    if top_k > adapter.num_experts:
        pytest.skip(f"{family} tiny model has {adapter.num_experts} experts")
    config = copy.deepcopy(adapter.model.config)
    config.get_text_config(decoder=True).num_experts_per_tok = top_k
    built = type(adapter.model)(config).to(adapter.device).eval()
    built.load_state_dict(adapter.model.state_dict())
    built.generation_config = adapter.model.generation_config
    inputs = _inputs(adapter, n=2)
    adapter.configure(top_k=top_k)
    with torch.inference_mode():
        ours, theirs = adapter.model(**inputs).logits, built(**inputs).logits
    assert torch.equal(ours, theirs)
    expected = built.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[
        :, inputs["input_ids"].shape[1] :
    ]
    images = [make_image(w, h, seed) for w, h, seed in IMAGES[:2]]
    results = adapter.generate_batch(
        images, PROMPTS[:2], vision_tokens=VISION_TOKENS, max_new_tokens=NEW_TOKENS
    )
    assert [r.token_ids for r in results] == [_strip(row.tolist(), adapter) for row in expected]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_reset_and_context_manager_restore_outputs(tiny_adapters, family):
    adapter = tiny_adapters[family]
    inputs = _inputs(adapter)
    layers_before = list(adapter.text_model().layers)
    with torch.inference_mode():
        before = adapter.model(**inputs).logits
        adapter.configure(top_k=2, active_blocks=[0, 2, 4])
        changed = adapter.model(**inputs).logits
        with adapter.knobs(top_k=1, active_blocks=[5]):
            assert adapter.top_k == 1 and adapter.active_blocks == (5,)
        assert adapter.top_k == 2 and adapter.active_blocks == (0, 2, 4)  # restored to the previous setting
        assert torch.equal(adapter.model(**inputs).logits, changed)
        adapter.reset()
        after = adapter.model(**inputs).logits
    assert not torch.allclose(before, changed, atol=1e-3)
    assert torch.equal(before, after)
    assert all(a is b for a, b in zip(adapter.text_model().layers, layers_before))
    assert adapter.top_k == adapter.default_top_k and adapter.active_blocks == tuple(
        range(adapter.num_blocks)
    )


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_invalid_knobs_raise_clear_errors(tiny_adapters, family):
    from knobsweep.models import KnobError

    adapter = tiny_adapters[family]
    n, e = adapter.num_blocks, adapter.num_experts
    cases = [
        ({"top_k": 0}, "top_k=0"),
        ({"top_k": e + 1}, f"top_k={e + 1}"),
        ({"top_k": 2.0}, "top_k"),
        ({"active_blocks": [0, n]}, f"block index {n}"),
        ({"active_blocks": [-1]}, "block index -1"),
        ({"active_blocks": [1, 1, 2]}, "duplicate"),
        ({"active_blocks": []}, "empty"),
        ({"active_blocks": 3}, "sequence"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(KnobError, match=needle):
            adapter.configure(**kwargs)
        assert adapter.top_k == adapter.default_top_k and adapter.active_blocks == tuple(range(n))
    # numpy integers (e.g. from an importance ranking) are fine and stored as plain ints.
    adapter.configure(top_k=np.int64(2), active_blocks=np.array([3, 1]))
    assert adapter.top_k == 2 and adapter.active_blocks == (1, 3)
    assert all(type(b) is int for b in adapter.active_blocks)
    low, high = adapter.vision_token_range()
    image = make_image(64, 48)
    for bad in (low - 1, high + 1):
        with pytest.raises(
            KnobError, match=rf"vision_tokens={bad} is outside the valid range {low}\.\.{high}"
        ):
            adapter.generate(image, "What?", vision_tokens=bad, max_new_tokens=2)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_knobs_hold_under_every_experts_implementation(tiny_checkpoints, tiny_adapters, family):
    """The router's top-k is read by the experts kernels of every implementation: eager and batched_mm agree
    with the default (grouped_mm) under knobs."""
    from knobsweep.models import load_model

    reference = tiny_adapters[family]
    images = [make_image(w, h, seed) for w, h, seed in IMAGES[:2]]
    knobs = {"top_k": 2, "active_blocks": [0, 2, 3, 5]}
    with reference.knobs(**knobs):
        expected = reference.generate_batch(
            images, PROMPTS[:2], vision_tokens=VISION_TOKENS, max_new_tokens=4
        )
        expected_logits = reference.model(**_inputs(reference, n=2), use_cache=False).logits
    for implementation in ("eager", "batched_mm"):
        adapter = load_model(
            tiny_checkpoints[family], device=reference.device, experts_implementation=implementation
        )
        with adapter.knobs(**knobs):
            got = adapter.generate_batch(images, PROMPTS[:2], vision_tokens=VISION_TOKENS, max_new_tokens=4)
            logits = adapter.model(**_inputs(adapter, n=2), use_cache=False).logits
        # Float32 in another summation order: on an H200 batched_mm's logits were 1.03e-4 from grouped_mm's (the
        # largest logit ~5); a knob an implementation ignored moves them by O(0.1).
        tolerance = 1e-4 * max(1.0, expected_logits.abs().max().item())
        assert (logits - expected_logits).abs().max().item() < tolerance, implementation
        assert [r.token_ids for r in got] == [r.token_ids for r in expected], implementation


def test_top_k_keeps_unnormalised_routing_semantics(tmp_path):
    """Qwen3-MoE with norm_topk_prob=False (raw softmax weights of the kept experts): run-time top-k still
    equals a model built with that top-k."""
    from knobsweep.models import load_model
    from knobsweep.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "raw", family="internvl", num_blocks=2, norm_topk_prob=False)
    adapter = load_model(path)
    assert adapter.model.config.text_config.norm_topk_prob is False
    inputs = _inputs(adapter, n=2)
    for top_k in (1, 4, 16):
        config = copy.deepcopy(adapter.model.config)
        config.text_config.num_experts_per_tok = top_k
        built = type(adapter.model)(config).eval()
        built.load_state_dict(adapter.model.state_dict())
        adapter.configure(top_k=top_k)
        with torch.inference_mode():
            assert torch.equal(adapter.model(**inputs).logits, built(**inputs).logits)


def test_study_scale_skipping_equals_pruned_model(tmp_path):
    """The default tiny model (24 blocks, 64 experts) at a seed-grid budget (576 tokens): 8 kept blocks
    chosen irregularly (block 0 and both DeepStack depths skipped) with top-k 2 equal the pruned copy."""
    from knobsweep.models import load_model
    from knobsweep.models.tiny import build_tiny_checkpoint

    adapter = load_model(build_tiny_checkpoint(tmp_path / "tiny24", seed=1))
    kept = [2, 3, 5, 8, 13, 17, 21, 23]
    reference = pruned_copy(adapter, kept)
    for router in _text_model(adapter, reference).layers:
        router.mlp.gate.top_k = 2
    images = [make_image(640, 480, seed=7), make_image(360, 640, seed=8)]
    prompts = PROMPTS[:2]
    inputs = adapter.move_inputs(adapter.prepare_inputs(images, prompts, 576))
    counts = adapter.vision_tokens_of(inputs)
    assert counts == [adapter.planned_vision_tokens(image, 576) for image in images]
    assert all(0.94 * 576 <= c <= 576 for c in counts)
    adapter.configure(top_k=2, active_blocks=kept)
    with torch.inference_mode():
        masked = adapter.model(**inputs, use_cache=False).logits
        pruned = reference(**inputs, use_cache=False).logits
        expected = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
    real = inputs["attention_mask"].bool()
    assert (masked - pruned)[real].abs().max().item() <= 1e-5
    ours = adapter.generate_batch(images, prompts, vision_tokens=576, max_new_tokens=8)
    expected = expected[:, inputs["input_ids"].shape[1] :]
    assert [r.token_ids for r in ours] == [_strip(row.tolist(), adapter) for row in expected]
