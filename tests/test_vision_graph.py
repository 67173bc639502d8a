"""The graph paths' vision encoder (`fast_path.VisionGraph`): Qwen3-VL's vision forward with its grid-dependent
inputs precomputed gives the forward as loaded bit for bit and reads nothing from the device on the host (what
a CUDA graph needs); requests through it give the plain path's tokens, the vision stage stays timed, the instance
forward never outlives a prefill, the graphs survive knob changes and stay few, and anything it cannot handle is
an error or a logged fallback to the forward as loaded.

On CPU the VisionGraph runs its forward un-graphed (a path spec with `vision_graph=True` and no graphs); with
KNOBSWEEP_TEST_DEVICE=cuda the same tests replay CUDA graphs on the graph paths.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from types import MethodType

import pytest
import torch
from conftest import TEST_DEVICE, make_image
from knobsweep.models import ADAPTERS, fast_path, load_model
from knobsweep.models.fast_path import (
    PATHS,
    FastDecoding,
    VisionGraph,
    vision_constants,
    vision_graph_support,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CUDA = TEST_DEVICE == "cuda"
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="CUDA graphs need a GPU: run with KNOBSWEEP_TEST_DEVICE=cuda on a CUDA machine"
)
FAMILY = "qwen3_vl_moe"
SHIPPED = ROOT / "resources" / "models" / "tiny-qwen3-vl-moe"
# Image grids (t, h, w in patches; h and w even for the 2x2 merge): square, non-square both ways, two images in one
# request, and two frames of one image.
GRIDS = [[[1, 8, 8]], [[1, 6, 10]], [[1, 14, 8]], [[1, 6, 10], [1, 4, 4]], [[2, 4, 6]]]
# The path whose vision encoder runs through VisionGraph: on CUDA a graph path; on CPU the fused path with the
# vision graph switched on (un-graphed), since graph paths need CUDA.
GRAPH_PATH = "fused_graph" if CUDA else "fused"
VISION_TOKENS = 24
NEW_TOKENS = 6
# Images of three aspect ratios: three image grids at VISION_TOKENS.
IMAGES = [(64, 48, 1), (48, 64, 2), (96, 54, 3)]


def _visual_of_shipped_model():
    return load_model(SHIPPED, device=TEST_DEVICE, dtype="float32").model.model.visual


def _visual_random(attn_implementation: str = "sdpa", device: str = TEST_DEVICE):
    """A randomly initialised tiny vision encoder (3 blocks, DeepStack after blocks 0 and 2), float32."""
    from transformers import Qwen3VLMoeConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    config = Qwen3VLMoeConfig(
        vision_config={
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 48,
            "num_position_embeddings": 36,
            "deepstack_visual_indexes": [0, 2],
            "initializer_range": 0.3,
        }
    ).vision_config
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen3VLMoeVisionModel(config).eval()


def _pixels(visual, grid: list[list[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = visual.config
    patches = sum(t * h * w for t, h, w in grid)
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(patches, width, generator=generator).to(TEST_DEVICE)
    return pixels, torch.tensor(grid, device=pixels.device)


def _tensors(out) -> list[torch.Tensor]:
    flat = []
    for value in out.values():
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return flat


def _assert_identical(got, expected) -> None:
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())
    for a, b in zip(_tensors(got), _tensors(expected), strict=True):
        assert a.shape == b.shape and torch.equal(a, b), f"max difference {(a - b).abs().max()}"


# ---- the precomputed inputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["shipped", "random"])
@torch.inference_mode()
def test_precomputed_inputs_give_the_forward_as_loaded_bit_for_bit(which):
    visual = _visual_of_shipped_model() if which == "shipped" else _visual_random()
    assert vision_graph_support(visual) is None
    for seed, grid in enumerate(GRIDS):
        pixels, grid_thw = _pixels(visual, grid, seed)
        expected = visual(pixels, grid_thw=grid_thw)
        constants = vision_constants(visual, grid_thw)
        assert constants["cu_seqlens"].device.type == "cpu"  # sdpa: the split lengths read without a sync
        got = type(visual).forward(visual, pixels, grid_thw=grid_thw, return_dict=True, **constants)
        _assert_identical(got, expected)
        assert len(got.deepstack_features) == len(visual.config.deepstack_visual_indexes)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_precomputed_forward_reads_nothing_from_the_device_on_the_host(attn_implementation):
    """What a CUDA graph capture needs, checked without a GPU: on the meta device every host read of device data
    (`.tolist()`, `.item()`, a data-dependent shape) fails. With the precomputed inputs the forward runs there;
    without them it does not (the check can fail)."""
    visual = _visual_random(attn_implementation, device="meta")
    host = _visual_random(attn_implementation, device="cpu")
    grid = torch.tensor([[1, 6, 10], [1, 4, 4]])
    constants = {
        key: value if key == "cu_seqlens" else value.to("meta")
        for key, value in vision_constants(host, grid).items()
    }
    pixels = torch.empty(76, 1536, device="meta")
    out = type(visual).forward(visual, pixels, grid_thw=grid.to("meta"), return_dict=True, **constants)
    assert out.pooler_output.shape == (19, 48) and out.pooler_output.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):
        type(visual).forward(visual, pixels, grid_thw=grid.to("meta"), return_dict=True)


def test_unsupported_vision_forwards_are_recognised(monkeypatch):
    visual = _visual_random(device="cpu")
    visual.forward = visual.forward  # e.g. an offloading hook's instance forward
    assert "replaced on the instance" in vision_graph_support(visual)
    del visual.forward
    assert vision_graph_support(visual) is None
    monkeypatch.setattr(fast_path, "_VISION_HELPERS", (*fast_path._VISION_HELPERS, "get_vision_window_index"))
    assert "does not take its inputs from ['get_vision_window_index']" in vision_graph_support(visual)


def test_only_the_graph_paths_and_the_verified_family_use_vision_graphs():
    assert {name for name, spec in PATHS.items() if spec.vision_graph} == {
        name for name, spec in PATHS.items() if spec.graph
    }
    assert {cls.family for cls in ADAPTERS.values() if cls.supports_vision_graph} == {FAMILY}


# ---- VisionGraph ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def test_vision_graph_equals_the_forward_as_loaded_for_grids_in_alternation():
    """Two grids' graphs (on CUDA captured into one pool and replayed), called in turn with new pixels each time,
    give the forward as loaded exactly: the same kernels on the same inputs; the replay's launch order is
    the capture's. Each call returns a new output object (transformers replaces its fields) around the graph's
    buffers; return_dict=False gives its tuple."""
    visual = _visual_of_shipped_model()
    pool = torch.cuda.graph_pool_handle() if CUDA else None
    graphs = {}
    for i, grid in enumerate(([[1, 8, 8]], [[1, 6, 10]])):
        pixels, grid_thw = _pixels(visual, grid, seed=i)
        graphs[i] = VisionGraph(visual, grid_thw, pixels, graphed=CUDA, pool=pool), grid
        assert (graphs[i][0].graph is not None) == CUDA
    outputs = []
    for seed in range(2, 8):
        graph, grid = graphs[seed % 2]
        pixels, grid_thw = _pixels(visual, grid, seed)
        graph.expected_grid = grid_thw
        got = graph.forward(pixels, grid_thw, return_dict=True, use_cache=True, output_router_logits=False)
        _assert_identical(got, visual(pixels, grid_thw=grid_thw))
        assert isinstance(got.deepstack_features, list)
        assert all(got is not earlier for earlier in outputs)
        outputs.append(got)
        as_tuple = graph.forward(pixels, grid_thw, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], got.pooler_output)
        assert graph.verify(pixels, grid_thw) == 0.0


@torch.inference_mode()
def test_vision_graph_refuses_another_grid_pixel_shape_or_output():
    visual = _visual_random()
    pixels, grid = _pixels(visual, [[1, 6, 10]], seed=0)
    graph = VisionGraph(visual, grid, pixels, graphed=CUDA)
    graph.expected_grid = grid
    with pytest.raises(
        RuntimeError, match=r"pixels of shape \(40, 1536\).*grid \[\[1, 6, 10\]\].*\(60, 1536\)"
    ):
        graph.forward(pixels[:40], grid)
    with pytest.raises(RuntimeError, match=r"image grid \[\[1, 10, 6\]\] for the graph of image grid"):
        graph.forward(pixels, torch.tensor([[1, 10, 6]], device=grid.device))
    with pytest.raises(RuntimeError, match=r"does not handle: \['output_attentions'\]"):
        graph.forward(pixels, grid, output_attentions=True)
    with pytest.raises(RuntimeError, match=r"does not handle: \['interp_indices'\]"):
        graph.forward(pixels, grid, interp_indices=torch.zeros(1))
    # The same grid in another tensor is compared on the host and accepted.
    _assert_identical(graph.forward(pixels, grid.clone()), visual(pixels, grid_thw=grid))


# ---- through the adapter ------------------------------------------------------------------------------------------
def _with_vision_graph(adapter, on: bool):
    """The adapter on GRAPH_PATH with the vision graph switched `on` or off (a fresh FastDecoding: no graphs)."""
    adapter.set_inference_path(GRAPH_PATH)
    adapter._fast = FastDecoding(adapter, dataclasses.replace(PATHS[GRAPH_PATH], vision_graph=on))
    return adapter


@pytest.fixture(scope="module")
def vision_adapters(tiny_checkpoints) -> dict:
    """Adapters on TEST_DEVICE in float32: "eager", "plain" (GRAPH_PATH, the vision encoder as loaded) and "graph"
    (GRAPH_PATH, VisionGraph)."""
    path = tiny_checkpoints[FAMILY]
    out = {
        name: load_model(path, device=TEST_DEVICE, dtype="float32") for name in ("eager", "plain", "graph")
    }
    out["eager"].set_inference_path("eager")  # `auto`, the loaded path, is a graph path on CUDA
    _with_vision_graph(out["plain"], on=False)
    _with_vision_graph(out["graph"], on=True)
    return out


@pytest.fixture
def adapters(vision_adapters):
    yield vision_adapters
    for adapter in vision_adapters.values():
        adapter.reset()
        adapter.logit_log = None


def _generate(adapter, image: int, knobs: dict | None = None):
    """One request (image IMAGES[image]): its result and every step's logits."""
    adapter.configure(**(knobs or {}))
    adapter.logit_log = []
    w, h, seed = IMAGES[image]
    result = adapter.generate(
        make_image(w, h, seed),
        "What is in the picture?",
        vision_tokens=VISION_TOKENS,
        max_new_tokens=NEW_TOKENS,
    )
    logits, adapter.logit_log = adapter.logit_log, None
    return result, logits


def test_requests_through_vision_graphs_give_the_plain_paths_tokens_and_time_the_vision_stage(
    adapters, monkeypatch
):
    """Two image grids in turn, twice: the same tokens as the plain path, and the same first logits as the same
    path with the vision encoder as loaded (exactly: the vision features are bit-identical); each grid's graph is
    built once and reused, runs inside the timed vision stage, and its instance forward is gone afterwards."""
    calls = []
    original = VisionGraph.forward
    monkeypatch.setattr(
        VisionGraph, "forward", lambda self, *a, **k: calls.append(self) or original(self, *a, **k)
    )
    adapter, visual = adapters["graph"], adapters["graph"].model.model.visual
    built = {}
    for image in (0, 1, 0, 1):
        expected, _ = _generate(adapters["eager"], image)
        reference, reference_logits = _generate(adapters["plain"], image)
        got, got_logits = _generate(adapter, image)
        assert got.token_ids == expected.token_ids == reference.token_ids
        assert torch.equal(got_logits[0], reference_logits[0])
        assert got.timings_ms["vision"] > 0 and got.timings_ms["prefill"] > 0
        assert "forward" not in visual.__dict__ and adapter._fast.pending_vision is None
        graph = calls[-1]
        key = tuple(tuple(row) for row in graph.rows)
        assert built.setdefault(key, graph) is graph  # captured once per grid, then replayed
        assert (graph.graph is not None) == CUDA
    assert len(calls) == 4 + len(built)  # one per request, plus each new graph's check (`verify`)
    assert len(built) == 2 and list(adapter._fast.vision_graphs) == list(built)
    assert adapter._fast.vision_fallback is None


def test_vision_graphs_survive_knob_changes_and_stay_few(adapters, monkeypatch):
    monkeypatch.setattr(fast_path, "MAX_VISION_GRAPHS", 2)
    adapter = _with_vision_graph(adapters["graph"], on=True)
    _generate(adapter, 0)
    ((key_a, graph_a),) = adapter._fast.vision_graphs.items()
    _generate(adapter, 1, {"top_k": 2})  # a knob change drops the decoders, not the vision graphs
    key_b = list(adapter._fast.vision_graphs)[1]
    assert adapter._fast.vision_graphs[key_a] is graph_a
    _generate(adapter, 0, {"top_k": 1, "active_blocks": [0, 2, 5]})  # image 0's grid is the most recent
    assert adapter._fast.vision_graphs[key_a] is graph_a
    _generate(adapter, 2)  # a third grid: the least recently used (image 1's) goes
    keys = list(adapter._fast.vision_graphs)
    assert len(keys) == 2 and keys[0] == key_a and key_b not in keys
    expected, _ = _generate(adapters["eager"], 1)
    got, _ = _generate(adapter, 1)  # built again
    assert got.token_ids == expected.token_ids and list(adapter._fast.vision_graphs) == [keys[1], key_b]
    _with_vision_graph(adapter, on=True)


def test_the_instance_methods_are_removed_when_the_prefill_fails(adapters, monkeypatch):
    adapter = adapters["graph"]
    visual, model = adapter.model.model.visual, adapter.model.model

    def fail(*args, **kwargs):
        assert "forward" in visual.__dict__  # the vision encoder ran through the graph just before
        raise RuntimeError("prefill failed after the vision encoder")

    with monkeypatch.context() as patch:
        patch.setattr(fast_path, "placeholder_masks", fail)
        with pytest.raises(RuntimeError, match="prefill failed after the vision encoder"):
            _generate(adapter, 0)
    assert "forward" not in visual.__dict__ and "get_placeholder_mask" not in model.__dict__
    assert adapter._fast.pending_vision is None
    expected, _ = _generate(adapters["eager"], 0)
    got, _ = _generate(adapter, 0)
    assert got.token_ids == expected.token_ids


def test_the_prefill_reads_the_host_grid_and_masks_placeholders_without_the_device_check(
    adapters, monkeypatch
):
    """Through a vision graph, transformers' forward gets the processor's own (host) grid tensor and the placeholder
    masks of `placeholder_masks`, once per request, and the class's method is back afterwards; with the vision
    encoder as loaded it gets the moved grid and transformers' masks."""
    model_class = type(adapters["graph"].model.model)
    grids, masks, processed = [], [], []
    features, placeholder_masks = model_class.get_image_features, fast_path.placeholder_masks
    prepare = type(adapters["graph"]).prepare_inputs
    monkeypatch.setattr(
        model_class,
        "get_image_features",
        lambda self, pixels, grid=None, **kw: grids.append(grid) or features(self, pixels, grid, **kw),
    )
    monkeypatch.setattr(
        fast_path, "placeholder_masks", lambda *a, **kw: masks.append(a) or placeholder_masks(*a, **kw)
    )
    monkeypatch.setattr(
        type(adapters["graph"]),
        "prepare_inputs",
        lambda *a, **kw: processed.append(prepare(*a, **kw)) or processed[-1],
    )
    # On the CPU the move returns the processor's tensors themselves: copies, to tell them apart.
    move = type(adapters["graph"]).move_inputs
    monkeypatch.setattr(
        type(adapters["graph"]),
        "move_inputs",
        lambda *a, **kw: {key: value.clone() for key, value in move(*a, **kw).items()},
    )
    for image in (0, 1):
        expected, _ = _generate(adapters["plain"], image)
        assert grids[-1] is not processed[-1]["image_grid_thw"] and len(masks) == image  # the moved grid
        got, _ = _generate(adapters["graph"], image)
        assert got.token_ids == expected.token_ids
        assert grids[-1] is processed[-1]["image_grid_thw"] and grids[-1].device.type == "cpu"
        assert (
            len(masks) == image + 1 and "get_placeholder_mask" not in adapters["graph"].model.model.__dict__
        )


@torch.inference_mode()
def test_placeholder_masks_equal_transformers_masks(vision_adapters):
    adapter = vision_adapters["eager"]
    model = adapter.model.model
    w, h, seed = IMAGES[0]
    inputs = adapter.move_inputs(adapter.prepare_inputs([make_image(w, h, seed)], ["What?"], VISION_TOKENS))
    input_ids = torch.cat([inputs["input_ids"], inputs["input_ids"].flip(1)])  # two rows, placeholders apart
    embeds = model.get_input_embeddings()(input_ids)
    image_tokens = int((input_ids == model.config.image_token_id).sum())
    assert image_tokens == 2 * adapter.vision_tokens_of(inputs)[0]
    features = torch.zeros(image_tokens, embeds.shape[-1], device=embeds.device)
    for ids in (input_ids, None):  # without input_ids: transformers' own (compares embeddings)
        got = fast_path.placeholder_masks(model, ids, embeds, image_features=features)
        expected = model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
        for a, b in zip(got, expected, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        assert int(got[0].sum()) == image_tokens


def test_a_prompt_whose_placeholders_do_not_match_the_image_is_refused(vision_adapters):
    """The graph paths skip transformers' device-side count check: the host checks it when the inputs are made."""
    adapter = vision_adapters["eager"]
    image = make_image(*IMAGES[1][:2], IMAGES[1][2])
    inputs = adapter.prepare_inputs([image], ["What?"], VISION_TOKENS)  # checks and passes
    ids = inputs["input_ids"][0]
    first = int((ids == adapter.model.config.image_token_id).nonzero()[0])
    ids[first] = adapter.pad_token_id()
    count = adapter.vision_tokens_of(inputs)[0]
    with pytest.raises(
        RuntimeError, match=f"prompt 0 holds {count - 1} image placeholder tokens for an image of {count}"
    ):
        adapter.check_counts([image], inputs, VISION_TOKENS)


@pytest.mark.parametrize("missing", [None, "host grid", "placeholder masks"])
def test_transformers_prefill_forward_reads_nothing_from_the_device_with_the_host_grid_and_masks(
    tiny_checkpoints, missing
):
    """What the graph paths give transformers' multimodal forward (on the meta device every host read of device
    data fails): with the processor's host grid and `placeholder_masks` it runs up to the language model without
    one; without either it does not (the check can fail). The vision model runs with its precomputed inputs, as
    in a VisionGraph."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.modeling_outputs import BaseModelOutputWithPast

    config = AutoConfig.from_pretrained(tiny_checkpoints[FAMILY], local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config).model
    visual, merge = model.visual, config.vision_config.spatial_merge_size
    grid = torch.tensor([[1, 6, 10], [1, 4, 4]])
    tokens = int(grid.prod(-1).sum()) // merge**2
    constants = {
        key: value if key == "cu_seqlens" else value.to("meta")
        for key, value in vision_constants(visual, grid).items()
    }
    visual.forward = lambda pixels, grid_thw=None, **kw: type(visual).forward(
        visual, pixels, grid_thw=grid_thw, **kw, **constants
    )
    received = {}

    def language_model(**kwargs):
        received.update(kwargs)
        return BaseModelOutputWithPast(last_hidden_state=kwargs["inputs_embeds"])

    model.language_model.forward = language_model
    if missing != "placeholder masks":
        model.get_placeholder_mask = MethodType(fast_path.placeholder_masks, model)
    input_ids = torch.full((1, tokens + 7), 5, device="meta")
    vision = config.vision_config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.empty(int(grid.prod(-1).sum()), patch, device="meta")
    arguments = {
        "input_ids": input_ids,
        "pixel_values": pixels,
        "image_grid_thw": grid.to("meta") if missing == "host grid" else grid,
        "position_ids": torch.zeros(3, 1, tokens + 7, dtype=torch.long, device="meta"),
    }
    if missing is None:
        model(**arguments)
        assert received["inputs_embeds"].shape == (1, tokens + 7, config.text_config.hidden_size)
        assert len(received["deepstack_visual_embeds"]) == len(config.vision_config.deepstack_visual_indexes)
    else:  # a host read of a meta tensor: `.tolist()` ("cannot copy out") or the check's `.item()`
        with pytest.raises((RuntimeError, NotImplementedError), match="meta tensor"):
            model(**arguments)


@pytest.mark.parametrize("fault", ["unsupported", "wrong_output"])
def test_a_vision_graph_that_cannot_be_used_falls_back_with_one_log_line(
    adapters, monkeypatch, caplog, fault
):
    """An unsupported vision forward, or a graph whose output differs from the forward as loaded (here: wrong
    rotary positions), leaves the vision encoder as loaded on this path, with one warning; the tokens stay the
    plain path's."""
    monkeypatch.setattr(fast_path, "_LOGGED_FALLBACKS", set())
    if fault == "unsupported":
        monkeypatch.setattr(
            fast_path, "_VISION_HELPERS", (*fast_path._VISION_HELPERS, "get_vision_window_index")
        )
    else:
        original = fast_path.vision_constants

        def wrong(visual, grid_thw):
            constants = original(visual, grid_thw)
            return {**constants, "position_ids": constants["position_ids"].flip(0)}

        monkeypatch.setattr(fast_path, "vision_constants", wrong)
    adapter = _with_vision_graph(adapters["graph"], on=True)
    assert (
        adapter.vision_encoder_mode() == "graphed" and adapters["eager"].vision_encoder_mode() == "as loaded"
    )
    assert adapters["plain"].vision_encoder_mode() == "as loaded"  # a graph path with vision graphs off
    try:
        with caplog.at_level(logging.WARNING, logger=fast_path.__name__):
            for image in (0, 1, 0):
                expected, _ = _generate(adapters["eager"], image)
                got, _ = _generate(adapter, image)
                assert got.token_ids == expected.token_ids and got.timings_ms["vision"] > 0
        (record,) = [r for r in caplog.records if "runs un-graphed" in r.getMessage()]
        reason = "does not take its inputs" if fault == "unsupported" else "differs from the vision model's"
        assert reason in record.getMessage() and reason in adapter._fast.vision_fallback
        assert not adapter._fast.vision_graphs
        assert (
            adapter.vision_encoder_mode() == f"as loaded: {adapter._fast.vision_fallback}"
        )  # shard provenance
    finally:
        _with_vision_graph(adapter, on=True)


# ---- the benchmark ------------------------------------------------------------------------------------------------
def test_benchmark_runs_on_cpu_with_the_tiny_config(tmp_path):
    from knobsweep.models.base import token_grid

    from bench.vision_graph import main

    out = tmp_path / "vg.json"
    returned = main(
        ["--device", "cpu", "--tiny", "--tokens", "16", "36", "--reps", "2", "--warmup", "1"]
        + ["--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["encoder"]["support"] == "ok"
    assert [r["vision_tokens_budget"] for r in result["grids"]] == [16, 36]
    for row in result["grids"]:
        rows, cols = token_grid(640, 480, row["vision_tokens_budget"])
        assert row["vision_tokens"] == rows * cols and row["grid_thw"] == [1, 2 * rows, 2 * cols]
        assert row["agreement"]["exact"] and row["relative_error"] == 0.0
        assert len(row["plain"]["samples_ms"]) == len(row["graph"]["samples_ms"]) == 2
        assert row["graph"]["median_ms"] > 0
    assert result["alternation"] == {"replays": 4, "all_exact": True}
    assert returned["grids"][0]["grid_thw"] == result["grids"][0]["grid_thw"]
    assert torch.is_grad_enabled()
