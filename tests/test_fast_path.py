"""The fast inference paths (static KV cache, CUDA-graph decode, fused decode kernels) give the plain path's
greedy tokens under every knob, keep the knobs' references exact, and time the same stages.

On CPU the static-cache paths without graphs (`static`, `fused`) run against the plain DynamicCache path in
float32. The CUDA-graph paths need a GPU: those tests run with KNOBSWEEP_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import copy
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE, make_image, run_in_triton_interpreter
from knobsweep.models import STAGES, load_model
from knobsweep.models.fast_path import CACHE_BUCKET, INFERENCE_PATHS, cache_length, resolve_inference_path
from test_models_knobs import IMAGES, PROMPTS, _strip, pruned_copy

FAMILY = "qwen3_vl_moe"
# Families with static-cache decode (qwen3_5_moe's linear-attention state is not carried over: eager only).
FAST_FAMILIES = ("qwen3_vl_moe", "internvl", "ernie4_5_vl_moe")
CUDA = TEST_DEVICE == "cuda"
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="CUDA graphs need a GPU: run with KNOBSWEEP_TEST_DEVICE=cuda on a CUDA machine"
)
# Paths compared against the plain one on this device.
FAST_PATHS = ["static", "fused"] + (["static_graph", "fused_graph"] if CUDA else [])
KNOB_SETTINGS = [
    {},
    {"top_k": 1},
    {"top_k": 3},
    {"active_blocks": [1, 2, 3, 4, 5]},  # block 0 skipped
    {"active_blocks": [2, 5]},  # block 0, the DeepStack depth 1 and middle blocks skipped
    {"top_k": 2, "active_blocks": [0, 3, 4]},
]
VISION_TOKENS = 24
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def family_adapters(tiny_checkpoints) -> dict:
    """family -> {path -> a float32 adapter on TEST_DEVICE using that inference path}, loaded lazily."""

    class Adapters(dict):
        def __missing__(self, family):
            path = tiny_checkpoints[family]
            self[family] = {
                name: load_model(path, device=TEST_DEVICE, dtype="float32", inference_path=name)
                for name in ["eager", *FAST_PATHS]
            }
            return self[family]

    return Adapters()


@pytest.fixture(params=FAST_FAMILIES)
def adapters(request, family_adapters) -> dict:
    """path -> adapter for one family; every adapter is reset after the test."""
    out = family_adapters[request.param]
    yield out
    for adapter in out.values():
        adapter.reset()
        adapter.logit_log = None


def _run(adapter, knobs: dict, n: int = 1, new_tokens: int = NEW_TOKENS):
    """Token ids of each request and every step's logits (batch of n when n > 1)."""
    adapter.configure(**knobs)
    adapter.logit_log = []
    images = [make_image(w, h, seed) for w, h, seed in IMAGES[:n]]
    if n == 1:
        results = [
            adapter.generate(images[0], PROMPTS[0], vision_tokens=VISION_TOKENS, max_new_tokens=new_tokens)
        ]
    else:
        results = adapter.generate_batch(
            images, PROMPTS[:n], vision_tokens=VISION_TOKENS, max_new_tokens=new_tokens
        )
    logits, adapter.logit_log = adapter.logit_log, None
    return [r.token_ids for r in results], logits, results


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize(
    "knobs", KNOB_SETTINGS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()) or "default"
)
def test_fast_path_gives_the_plain_paths_tokens_and_logits(adapters, path, knobs):
    expected, expected_logits, _ = _run(adapters["eager"], knobs)
    got, got_logits, _ = _run(adapters[path], knobs)
    assert got == expected
    assert len(got_logits) == len(expected_logits) >= 2
    # The prefill is the plain path's own forward: identical on CPU. On CUDA the graph paths replay a graphed
    # prefill (qwen3_vl_moe: padded, attention over the static cache): float32 rounding only.
    # Decode steps: other kernels and cache lengths, float32 rounding only.
    if CUDA:
        torch.testing.assert_close(got_logits[0], expected_logits[0], rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(got_logits[0], expected_logits[0])
    tol = 1e-3 if CUDA else 1e-4
    for step, (a, b) in enumerate(zip(got_logits, expected_logits)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{path} {knobs}: step {step}")


@pytest.mark.parametrize("path", FAST_PATHS)
def test_left_padded_batch_equals_plain_path(adapters, path):
    knobs = {"top_k": 2, "active_blocks": [1, 3, 4, 5]}
    expected, _, _ = _run(adapters["eager"], knobs, n=3)
    got, _, results = _run(adapters[path], knobs, n=3)
    assert got == expected
    assert len({r.prompt_tokens for r in results}) > 1, "the batch should need padding"


@pytest.mark.parametrize("path", FAST_PATHS)
def test_batch_beyond_the_fused_kernels_size_equals_plain_path(adapters, path):
    """Batches of more than FUSED_MAX_TOKENS rows leave the fused kernel for transformers' experts (in float32:
    batched_mm, since grouped_mm's float32 fallback synchronises and breaks graph capture on CUDA)."""
    from knobsweep.models.fused_moe import FUSED_MAX_TOKENS

    n = FUSED_MAX_TOKENS + 2
    images = [make_image(w, h, seed + 10 * i) for i in range(2) for w, h, seed in IMAGES][:n]
    prompts = (PROMPTS * 2)[:n]
    tokens = {}
    for name in ("eager", path):
        adapter = adapters[name]
        adapter.configure(top_k=2)
        results = adapter.generate_batch(images, prompts, vision_tokens=VISION_TOKENS, max_new_tokens=6)
        tokens[name] = [r.token_ids for r in results]
    assert tokens[path] == tokens["eager"]


@pytest.mark.parametrize("path", [p for p in FAST_PATHS if p.startswith("fused")])
def test_fused_paths_run_the_prefill_experts_through_the_grouped_kernels(
    adapters, path, tiny_checkpoints, monkeypatch
):
    """Each kept MoE block's prefill goes through `moe_grouped` (its logits equal the plain path's: the first
    test of this file); an experts implementation chosen at load time is kept. In float32 on CUDA torch has no
    grouped_mm kernel: transformers' batched_mm serves the prefill there."""
    from knobsweep.models import fused_moe

    calls = []
    original = fused_moe.moe_grouped
    monkeypatch.setattr(
        fused_moe, "moe_grouped", lambda e, *a, **k: calls.append(id(e)) or original(e, *a, **k)
    )
    adapter = adapters[path]
    knobs = {"top_k": 2, "active_blocks": [1, 3, 4]}
    _run(adapter, knobs)
    # The blocks whose experts ran it (ernie4_5_vl_moe: text and vision experts in each block).
    block_of = {id(m): i for i, layer in enumerate(adapter.decoder_layers()) for m in layer.modules()}
    assert sorted({block_of[c] for c in calls}) == ([] if CUDA else knobs["active_blocks"])
    explicit = load_model(
        tiny_checkpoints[adapter.family],
        device=TEST_DEVICE,
        dtype="float32",
        inference_path=path,
        experts_implementation="eager",
    )
    calls.clear()
    tokens, _, _ = _run(explicit, knobs)
    assert calls == []
    # ... and so is the plain prefill: the eager experts synchronise with the host, which a graph cannot capture.
    assert all(not d.prefills for d in explicit._fast.decoders.values())
    assert tokens == _run(adapters["eager"], knobs)[0]


@pytest.mark.parametrize("path", [p for p in FAST_PATHS if p.startswith("fused")])
def test_fused_paths_run_each_kept_blocks_decode_attention_and_router_fused(adapters, path, monkeypatch):
    """Decode steps of the fused paths go through the fused attention (`attention_step`) in every kept block of
    the Qwen3 families (its logits equal the plain path's: the first test of this file) and, where Triton runs,
    through the Triton router (with the post-attention norm, `route_normed`, in the whole-block forward) and the
    whole-block forward (residual additions in the output projection's kernel); ernie4_5_vl_moe keeps transformers' (other attention and router classes)."""
    from knobsweep.models import decode_attention, fused_moe

    attention_calls, route_calls, residual_calls = [], [], []
    attend, route, route_normed, project = (
        decode_attention.attention_step,
        fused_moe.route,
        fused_moe.route_normed,
        decode_attention.linear_residual,
    )
    monkeypatch.setattr(
        decode_attention,
        "attention_step",
        lambda m, *a, **k: attention_calls.append(id(m)) or attend(m, *a, **k),
    )
    monkeypatch.setattr(
        fused_moe, "route", lambda x, w, *a: route_calls.append(w.data_ptr()) or route(x, w, *a)
    )
    # the whole-block forward runs the post-attention norm and the router in one kernel
    monkeypatch.setattr(
        fused_moe,
        "route_normed",
        lambda h, n, eps, w, *a: route_calls.append(w.data_ptr()) or route_normed(h, n, eps, w, *a),
    )
    monkeypatch.setattr(
        decode_attention,
        "linear_residual",
        lambda x, w, *a, **k: residual_calls.append(w.data_ptr()) or project(x, w, *a, **k),
    )
    adapter = adapters[path]
    knobs = {"top_k": 2, "active_blocks": [1, 3, 4]}
    _run(adapter, knobs)
    block_of = {id(m): i for i, layer in enumerate(adapter._original_layers) for m in layer.modules()}
    router_block = {block_of[id(r)]: r.weight.data_ptr() for r in adapter._routers}
    fused = adapter.family in ("qwen3_vl_moe", "internvl")
    assert sorted({block_of[c] for c in attention_calls}) == (knobs["active_blocks"] if fused else [])
    routed = sorted(i for i, ptr in router_block.items() if ptr in route_calls)
    assert routed == (knobs["active_blocks"] if fused and CUDA else [])
    projected = (
        sorted(
            i
            for i, layer in enumerate(adapter._original_layers)
            if layer.self_attn.o_proj.weight.data_ptr() in residual_calls
        )
        if fused
        else []
    )
    assert projected == (knobs["active_blocks"] if fused and CUDA else [])


# Families whose static prefill logic is tested here (both graph it on the graph paths).
STATIC_PREFILL_FAMILIES = ("qwen3_vl_moe", "internvl")


@pytest.fixture(scope="module")
def static_prefill_adapters(tiny_checkpoints) -> dict:
    """(family, fused) -> an adapter whose static decode path also runs the padded static prefill, un-graphed
    (the graph paths run it graphed: the tests above on CUDA)."""
    import dataclasses

    from knobsweep.models.fast_path import FastDecoding

    out = {}
    for family in STATIC_PREFILL_FAMILIES:
        for fused in (False, True):
            adapter = load_model(
                tiny_checkpoints[family],
                device=TEST_DEVICE,
                dtype="float32",
                inference_path="fused" if fused else "static",
            )
            adapter.supports_static_prefill = True  # internvl: on for this test only (see above)
            adapter._fast = FastDecoding(
                adapter, dataclasses.replace(adapter._fast.spec, static_prefill=True)
            )
            out[family, fused] = adapter
    yield out
    for adapter in out.values():
        adapter.reset()


@pytest.mark.parametrize("family", STATIC_PREFILL_FAMILIES)
@pytest.mark.parametrize("fused", [False, True], ids=["static", "fused"])
@pytest.mark.parametrize(
    "knobs", KNOB_SETTINGS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()) or "default"
)
def test_padded_static_prefill_gives_the_plain_paths_tokens_and_logits(
    family_adapters, static_prefill_adapters, family, fused, knobs, monkeypatch
):
    """The graph paths' prefill logic (prompt padded to a bucket, DeepStack by index with padded rows, keys and
    values written into the static cache) gives the plain path's tokens, and logits within float32 rounding."""
    from knobsweep.models import fast_path

    calls = []
    original = fast_path.PrefillGraph.intercept
    monkeypatch.setattr(
        fast_path.PrefillGraph, "intercept", lambda self, **k: calls.append(self) or original(self, **k)
    )
    expected, expected_logits, _ = _run(family_adapters[family]["eager"], knobs)
    got, got_logits, results = _run(static_prefill_adapters[family, fused], knobs)
    assert got == expected
    for step, (a, b) in enumerate(zip(got_logits, expected_logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{knobs}: step {step}")
    (graph,) = calls  # one prefill, through the padded path
    assert graph.length > results[0].prompt_tokens and graph.length % fast_path.PREFILL_BUCKET == 0
    if family == "qwen3_vl_moe":  # DeepStack features, padded to the image bucket
        assert graph.deepstack is not None and graph.image_tokens >= VISION_TOKENS
    else:
        assert graph.deepstack is None and graph.image_tokens == 0


@pytest.mark.parametrize("family", STATIC_PREFILL_FAMILIES)
def test_fused_static_prefill_runs_the_prompt_forwards_in_each_kept_block(
    static_prefill_adapters, family, monkeypatch
):
    """On the fused paths the padded static prefill runs `FusedModules`' prefill forwards (prompt attention,
    Triton RMSNorm, also in decode steps; on the CPU they fall back to transformers', above on CUDA they are the
    kernels) in every kept block and only there, plus the final norm, and leaves no forward installed; the
    un-fused static path runs none."""
    from knobsweep.models import decode_attention, rms_norm

    calls = []
    attend, normalise = decode_attention.prompt_attention_forward, rms_norm.rms_norm_forward
    monkeypatch.setattr(
        decode_attention,
        "prompt_attention_forward",
        lambda m, *a, **k: calls.append(("attention", id(m))) or attend(m, *a, **k),
    )
    monkeypatch.setattr(
        rms_norm, "rms_norm_forward", lambda m, x: calls.append(("norm", id(m))) or normalise(m, x)
    )
    knobs = {"top_k": 2, "active_blocks": [1, 3, 4]}
    adapter = static_prefill_adapters[family, True]
    _run(adapter, knobs)
    final_norm = adapter.text_model().norm
    block_of = {id(m): i for i, layer in enumerate(adapter._original_layers) for m in layer.modules()}
    block_of[id(final_norm)] = "final norm"
    assert sorted(block_of[m] for kind, m in calls if kind == "attention") == knobs["active_blocks"]
    # input, post-attention, q and k norms (the prompt attention runs the q/k norms itself where Triton does),
    # in the prefill and the decode steps, and the language model's final norm
    normed = {block_of[m] for kind, m in calls if kind == "norm"}
    assert normed == {*knobs["active_blocks"], "final norm"}
    modules = [m for layer in adapter._original_layers for m in layer.modules()] + [final_norm]
    assert all("forward" not in m.__dict__ for m in modules)
    calls.clear()
    _run(static_prefill_adapters[family, False], knobs)
    assert calls == []


def test_prefill_buckets_do_not_change_the_result(static_prefill_adapters, monkeypatch):
    """Padding is invisible to the real tokens: buckets of 16 and 128 tokens (and image buckets of 64 and 8)
    give the same logits."""
    from knobsweep.models import fast_path

    adapter = static_prefill_adapters[FAMILY, True]
    outputs = []
    for prompt_bucket, image_bucket in ((16, 64), (128, 8)):
        monkeypatch.setattr(fast_path, "PREFILL_BUCKET", prompt_bucket)
        monkeypatch.setattr(fast_path, "IMAGE_BUCKET", image_bucket)
        adapter.configure()  # drops decoders and their prefill graphs
        outputs.append(_run(adapter, {"top_k": 3}))
    (tokens_a, logits_a, _), (tokens_b, logits_b, _) = outputs
    assert tokens_a == tokens_b
    for a, b in zip(logits_a, logits_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_deepstack_by_index_equals_transformers_boolean_mask():
    from knobsweep.models.fast_path import _deepstack_by_index
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 40, 8, generator=g)
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, 5:29] = True
    embeds = torch.randn(24, 8, generator=g)
    expected = Qwen3VLMoeTextModel._deepstack_process(None, hidden, mask, embeds)
    # 24 image rows padded to 32: the padded rows (zeros) point at the last (padded) position 39.
    positions = torch.nonzero_static(mask[0], size=32, fill_value=39).view(-1)
    padded = torch.cat([embeds, torch.zeros(8, 8)])
    got = _deepstack_by_index(hidden, positions, padded)
    assert torch.equal(got[:, :39], expected[:, :39])
    assert torch.equal(got[:, 39], hidden[:, 39])  # zeros added to the padded position


@pytest.mark.parametrize("path", FAST_PATHS)
def test_skipped_blocks_equal_pruned_copy_on_fast_path(adapters, path):
    """The masked model on the fast path decodes like a physically pruned copy (transformers' generate)."""
    adapter = adapters[path]
    kept = [2, 5]
    reference = pruned_copy(adapter, kept)
    images = [make_image(w, h, seed) for w, h, seed in IMAGES]
    inputs = adapter.move_inputs(adapter.prepare_inputs(images, PROMPTS, VISION_TOKENS))
    expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = expected[:, inputs["input_ids"].shape[1] :]
    adapter.configure(active_blocks=kept)
    ours = adapter.generate_batch(images, PROMPTS, vision_tokens=VISION_TOKENS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in ours] == [_strip(row.tolist(), adapter) for row in expected]


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("top_k", [1, 4])
def test_runtime_top_k_equals_model_built_with_it_on_fast_path(adapters, path, top_k):
    adapter = adapters[path]
    config = copy.deepcopy(adapter.model.config)
    config.get_text_config(decoder=True).num_experts_per_tok = top_k
    built = type(adapter.model)(config).to(adapter.device).eval()
    built.load_state_dict(adapter.model.state_dict())
    built.generation_config = adapter.model.generation_config
    images = [make_image(w, h, seed) for w, h, seed in IMAGES[:2]]
    inputs = adapter.move_inputs(adapter.prepare_inputs(images, PROMPTS[:2], VISION_TOKENS))
    expected = built.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[
        :, inputs["input_ids"].shape[1] :
    ]
    adapter.configure(top_k=top_k)
    results = adapter.generate_batch(
        images, PROMPTS[:2], vision_tokens=VISION_TOKENS, max_new_tokens=NEW_TOKENS
    )
    assert [r.token_ids for r in results] == [_strip(row.tolist(), adapter) for row in expected]


@pytest.mark.parametrize("path", FAST_PATHS)
def test_knob_changes_rebuild_decoders_and_keep_tokens(adapters, path):
    """Decoders (static caches, graphs) are reused within a setting and rebuilt after each knob change:
    switching A -> B -> A gives A's tokens again, B's equal the plain path's."""
    adapter = adapters[path]
    a, b = {"top_k": 2}, {"top_k": 5, "active_blocks": [0, 1, 4]}
    first, _, _ = _run(adapter, a)
    decoders = dict(adapter._fast.decoders)
    assert len(decoders) == 1
    again, _, _ = _run(adapter, a)  # same knobs: configure() keeps the decoder
    assert again == first and adapter._fast.decoders == decoders
    other, _, _ = _run(adapter, b)
    assert all(d not in decoders.values() for d in adapter._fast.decoders.values())
    expected_other, _, _ = _run(adapters["eager"], b)
    assert other == expected_other
    back, _, _ = _run(adapter, a)
    assert back == first


@pytest.mark.parametrize("path", FAST_PATHS)
def test_timings_and_fields_on_fast_path(adapters, path):
    _, _, (result,) = _run(adapters[path], {"top_k": 2}, new_tokens=6)
    _, _, (plain,) = _run(adapters["eager"], {"top_k": 2}, new_tokens=6)
    assert (result.text, result.vision_tokens, result.prompt_tokens, result.output_tokens) == (
        plain.text,
        plain.vision_tokens,
        plain.prompt_tokens,
        plain.output_tokens,
    )
    t = result.timings_ms
    assert set(t) == set(STAGES)
    assert all(v >= 0 for v in t.values()) and t["vision"] > 0 and t["prefill"] > 0
    assert t["ttft"] == pytest.approx(t["preprocess"] + t["vision"] + t["prefill"])
    assert t["total"] == pytest.approx(t["ttft"] + t["decode"])
    if result.output_tokens > 1:
        assert t["decode"] > 0


def test_one_token_and_long_answers_use_the_right_cache_length(adapters):
    adapter = adapters["static"]
    one, _, (r1,) = _run(adapter, {}, new_tokens=1)
    expected_one, _, _ = _run(adapters["eager"], {}, new_tokens=1)
    assert one == expected_one and r1.output_tokens == 1
    # A request longer than one bucket gets a decoder with a longer cache, same tokens as the plain path.
    long_new = CACHE_BUCKET + 5
    got, _, (r2,) = _run(adapter, {"top_k": 1}, new_tokens=long_new)
    expected, _, _ = _run(adapters["eager"], {"top_k": 1}, new_tokens=long_new)
    assert got == expected
    assert {key[1] for key in adapter._fast.decoders} == {cache_length(r2.prompt_tokens, long_new)}


def test_cache_length_buckets():
    assert cache_length(1, 1) == CACHE_BUCKET
    assert cache_length(CACHE_BUCKET - 10, 10) == CACHE_BUCKET
    assert cache_length(CACHE_BUCKET - 10, 11) == 2 * CACHE_BUCKET
    assert cache_length(1898, 32) == 2048


def test_auto_and_invalid_paths(tiny_checkpoints, tiny_adapters):
    adapter = tiny_adapters[FAMILY]
    assert {"auto", "eager", "static", "static_graph", "fused", "fused_graph"} <= set(INFERENCE_PATHS)
    if CUDA:
        # The fastest path that equals the plain path's tokens (the tests of this file) is the CUDA default.
        assert resolve_inference_path(adapter, "auto") == "fused_regional_graph"
    else:
        # On CPU auto is the plain path (graphs do not exist there), and graph paths are refused.
        assert resolve_inference_path(adapter, "auto") == "eager"
        assert adapter.inference_path == "eager"
        with pytest.raises(ValueError, match="needs a CUDA device"):
            adapter.set_inference_path("static_graph")
    with pytest.raises(ValueError, match="inference_path='bogus' is not one of"):
        adapter.set_inference_path("bogus")
    with pytest.raises(ValueError, match="inference_path 'bogus' is not one of"):
        load_model(tiny_checkpoints[FAMILY], inference_path="bogus")
    # Families whose static-cache decode is not implemented run the plain path under auto and refuse others.
    other = tiny_adapters["qwen3_5_moe"]
    assert resolve_inference_path(other, "auto") == "eager"
    with pytest.raises(ValueError, match="supports only 'eager'"):
        other.set_inference_path("static")
    assert other.inference_path == "eager"


@needs_cuda
def test_graph_paths_capture_once_per_setting_and_length(adapters):
    for path in ("static_graph", "fused_graph"):
        adapter = adapters[path]
        _run(adapter, {"top_k": 2})
        (decoder,) = adapter._fast.decoders.values()
        assert decoder.graph is not None
        graph = decoder.graph
        prefills = dict(decoder.prefills)
        _run(adapter, {"top_k": 2})
        decoder = next(iter(adapter._fast.decoders.values()))
        assert decoder.graph is graph
        # qwen3_vl_moe graphs its prefill too: one graph per (length, image) bucket, captured once.
        assert len(prefills) == (1 if adapter.supports_static_prefill else 0)
        assert all(decoder.prefills[key].graph is g.graph is not None for key, g in prefills.items())


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="on a GPU the other tests of this file run the compiled Triton kernels")
def test_fused_path_runs_the_triton_kernels_exactly_in_the_interpreter(tiny_checkpoints):
    """The fused decode path with the real Triton kernels (Triton's CPU interpreter, float32) gives the plain
    path's tokens; a subprocess because TRITON_INTERPRET must be set before Triton is imported (~30 s)."""
    pytest.importorskip("triton", reason="the fused decode kernels need the triton package")
    script = textwrap.dedent("""
        import sys
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, sys.argv[2])
        from conftest import make_image
        from knobsweep.models import fused_moe, load_model
        calls = {"triton": 0}
        original = fused_moe.moe_fused
        def counted(*args, **kwargs):
            calls["triton"] += 1
            calls["residual"] = calls.get("residual", 0) + ("residual" in kwargs)
            return original(*args, **kwargs)
        fused_moe.moe_fused = counted
        tokens = {}
        for path in ("eager", "fused"):
            adapter = load_model(sys.argv[1], dtype="float32", inference_path=path)
            adapter.configure(top_k=3, active_blocks=[1, 2, 4])
            result = adapter.generate(make_image(64, 48, 1), "What color is the circle?", vision_tokens=16,
                                      max_new_tokens=5)
            tokens[path] = result.token_ids
        print(tokens, calls)
        assert calls["triton"] > 0, "the Triton kernels did not run"
        assert calls["residual"] > 0, "the whole-block decode forward did not run"
        assert tokens["fused"] == tokens["eager"], tokens
    """)
    run_in_triton_interpreter(script, str(tiny_checkpoints[FAMILY]), str(Path(__file__).parent), timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile on CPU (inductor) needs a C++ compiler",
)
@pytest.mark.parametrize("family", [FAMILY] + ([f for f in FAST_FAMILIES if f != FAMILY] if CUDA else []))
def test_regional_compile_path_gives_the_plain_paths_tokens(tiny_checkpoints, family):
    """`fused_regional` (the pieces without a fused forward compiled once for all blocks) equals the plain
    path, also after a skip-set change (no recompile) and a top-k change (recompile); ~30 s with a cold
    inductor cache (one family on the CPU, every fast family on CUDA)."""
    from torch._dynamo.utils import counters

    path = "fused_regional_graph" if CUDA else "fused_regional"
    eager = load_model(tiny_checkpoints[family], device=TEST_DEVICE, dtype="float32", inference_path="eager")
    regional = load_model(tiny_checkpoints[family], device=TEST_DEVICE, dtype="float32", inference_path=path)
    counters.clear()
    for knobs in ({"top_k": 2}, {"top_k": 2, "active_blocks": [1, 2, 4, 5]}, {"top_k": 5}):
        expected, expected_logits, _ = _run(eager, knobs)
        got, got_logits, _ = _run(regional, knobs)
        assert got == expected, knobs
        for a, b in zip(got_logits, expected_logits):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    if CUDA and family in ("qwen3_vl_moe", "internvl"):
        # Every piece of a Qwen3 decode step has a fused forward (FusedModules, the norms included): the
        # compiler never runs, so a worker's first knob change compiles nothing.
        assert counters["stats"]["calls_captured"] == 0, dict(counters["stats"])
    else:  # the pieces without a fused forward here (on CPU: the MoE blocks, rope), one graph for all 6 blocks
        assert counters["stats"]["calls_captured"] > 0, "nothing was compiled"
        assert counters["stats"]["unique_graphs"] <= 8


def test_compile_on_first_call_builds_nothing_until_called():
    """`RegionalCompile`'s wrappers import torch._dynamo and compile only when called: a path whose decode
    pieces all have fused forwards pays nothing for them (checked on CUDA by the regional test above)."""
    from knobsweep.models.fast_path import CompileOnFirstCall

    def scaled_sine(x):
        return torch.sin(x) * 2

    lazy = CompileOnFirstCall(scaled_sine)
    assert lazy.compiled is None
    x = torch.randn(8)
    torch.testing.assert_close(lazy(x), scaled_sine(x))
    assert lazy.compiled is not None
