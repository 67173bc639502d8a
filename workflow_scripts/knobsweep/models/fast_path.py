"""Inference paths of the knob engine: how the greedy decode steps run, not what they compute.

Every path runs the same transformers modules with the same knobs (run-time top-k, skipped blocks passing the
hidden state through, vision-token resize) and the same prefill: one forward over the prompt with a
DynamicCache, vision encoder inside it, as the plain path. The fused paths run the prefill's experts through
`fused_moe.moe_grouped` when the loaded implementation is transformers' `grouped_mm`: the same GEMMs per expert,
gate and rounding without its extra passes (bit-identical on CPU; on CUDA the GEMMs, with the gate in the first
one's epilogue, and the per-token sum of the K expert outputs are Triton kernels, which may add in another
order). They differ in the decode steps:

| path                   | KV cache in decode | decode step            | experts / attention in decode      |
| ---------------------- | ------------------ | ---------------------- | ---------------------------------- |
| `eager`                | DynamicCache       | run by Python          | the loaded ones (transformers)     |
| `static`               | StaticCache        | run by Python          | the loaded ones                    |
| `static_graph`         | StaticCache        | CUDA graph replay      | the loaded ones                    |
| `fused`                | StaticCache        | run by Python          | fused Triton experts, split-KV     |
| `fused_graph`          | StaticCache        | CUDA graph replay      | fused Triton experts, split-KV     |
| `fused_regional`       | StaticCache        | run by Python          | as `fused`, plus compiled pieces   |
| `fused_regional_graph` | StaticCache        | CUDA graph replay      | as `fused`, plus compiled pieces   |

`auto` is `fused_regional_graph` on CUDA for the families that support it (`static_graph` without Triton) and
`eager` elsewhere: on CPU the plain path is the simplest correct one, and graphs do not exist there.

The fused paths also replace, in decode steps, the Qwen3 families' attention, router and decoder-block forwards
(`FusedModules`; the graphed prefill has prefill forwards of its own, below): q/k/v in one GEMV over concatenated weights, one Triton kernel for the q/k norms,
rotary embedding and cache writes (`decode_attention.fused_attention_forward`), a Triton router
(`fused_moe.fused_router_forward`), and the blocks' residual additions inside the output projection's and the
experts' kernels (`decode_block.fused_decoder_layer_forward`); on CPU the attention runs transformers' ops after
the GEMV and the router and blocks are transformers'. Other families (ernie4_5_vl_moe) keep theirs.

`fused_regional_graph` (and `fused_regional`, its un-graphed CPU test form) compiles the pieces every decoder
block shares that have no fused forward (`RegionalCompile`: RMSNorms, MoE blocks, the rotary embedding;
parameters are graph inputs, so all blocks reuse one compiled graph per shape and top-k) the first time a
decoder is built in the process, in the first request, which the cell's warm-up runs untimed, like the
capture, and again for each new top-k; compiled code rounds like the compiled kernels do, not like eager bf16
code. For the Qwen3 families every piece of a decode step has a fused forward (norms included), so nothing is
compiled and it equals `fused_graph`; for the others `fused_graph` is the choice where torch.compile does not
work.

Graphed prefill (`_graph` paths, families with `supports_static_prefill`: qwen3_vl_moe, internvl)
----------------------------------------------------------------------------------------------
Un-graphed, a real-size prefill is bound by the host launching its ~4,600 kernels (on an H100 ~75-120 ms at
any prompt length, against 31 ms graphed at 314 tokens): latencies would follow the host, not the knobs. The
graph paths therefore also replay the language model's prefill from a CUDA graph: the vision encoder (graphed on
its own, below) and the merge of its features run as usual, then the language model's forward is intercepted and its inputs
(embeddings, positions, DeepStack features) are copied into the buffers of a graph captured for the prompt
length rounded up to `PREFILL_BUCKET` (right padding: with causal attention the padded positions come after
every real token and change none of them; their key/value slots are overwritten by the decode steps and
masked until then) and the image-token count rounded up to `IMAGE_BUCKET` (padded DeepStack rows add zeros to
a padded position). The keys and values go straight into the decoder's static cache. The measured prefill
includes the padded positions' work: at most PREFILL_BUCKET extra tokens (about 5% at 314 tokens, <= 0.8% at
1898). Graphs are captured before the request's clock starts, once per (length bucket, image bucket) and
decoder, and share one memory pool. On the fused paths the prefill runs the Qwen3 families' attention, router and
RMSNorms through `FusedModules`' prefill forwards (the prompt's attention over its own cache slots, which the
empty cache and the causal mask allow; one kernel per norm), and the experts through `moe_grouped`'s Triton
GEMMs: on an H100 the 1898-token prefill of the real-size model takes 35.5 ms, against 76 ms with transformers'
modules (bench/README.md).

Graphed vision encoder (`_graph` paths, families with `supports_vision_graph`: qwen3_vl_moe)
-----------------------------------------------------------------------------------------
Un-graphed, Qwen3-VL's vision encoder (27 blocks of small kernels) is bound by the host launching them: its time
follows the host, not the vision-token knob. The graph paths replay it from a CUDA graph per image grid (the rows
of `image_grid_thw`), `VisionGraph`. What its forward computes from the grid and reads on the host (the
position-embedding interpolation indices and weights, the rotary positions, the images' cumulative lengths, by
which the attention splits q/k/v with `.tolist()`) is computed once per grid by transformers' own helpers
(`transformers.vision_utils`; 5.17 and 5.24 checked) and passed as the keyword arguments those helpers return instead of
computing (the lengths as a host tensor: the split reads them without a synchronisation); the rest, device work
on a fixed pixel buffer, is captured. The graph is built before the request's clock starts (`prepare_vision`,
next to the decoder's), checked once against the forward as loaded, kept across knob changes (the encoder does not
depend on them; at most `MAX_VISION_GRAPHS`, the least recently used dropped first), and shares one memory pool
with the adapter's other vision graphs. During the prefill the vision model's forward is replaced on the instance
(the module's hooks, which time the vision stage, still run): the vision stage is the pixel copy and the replay.
The prefill then takes the processor's host copy of the grid (transformers splits the features per image by
it, `.tolist()`) and the placeholder masks without transformers' device-side count check (`placeholder_masks`;
checked on the host, `check_counts`): with them, transformers' forward no longer waits for the GPU.
A vision model whose forward does not take those inputs, or a graph that fails to build or differs from the
forward as loaded, leaves the forward as loaded on that path, with one log line (`vision_fallback`).

Static cache and graphs
-----------------------
A `StaticDecoder` owns one static KV cache for a (batch, cache length) pair, with a no-op layer at every
skipped block, and fixed input buffers (token, positions, a boolean attention mask over the whole cache).
The cache length is prompt + max_new_tokens rounded up to `CACHE_BUCKET`, so the prompts of one cell share a
few decoders. On CUDA the decoder captures its decode step in a CUDA graph when it is built, before the
request's prefill starts (so the capture is never timed); `configure()` drops every decoder, so graphs are
captured again after each knob change (top-k and the skipped blocks are baked into a graph).

After the prefill, its keys and values are copied into the static cache (counted in the prefill stage: a
few hundred MB at most, a fraction of a millisecond on a GPU). A decode step then writes its key/value at
the next slot (transformers' `StaticLayer.update`, which advances the layer's length tensor in place) and
attends to the prompt's unpadded slots and the slots written so far (the mask buffer).

Costs on CPU: `static` and `fused` exist there for testing (they equal the plain path's tokens in float32);
they are not faster on CPU, where the decode step of the tiny models is bound by Python, and attention there
runs over the whole bucket.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from knobsweep.models.base import ModelAdapter

INFERENCE_PATHS = (
    "auto",
    "eager",
    "static",
    "static_graph",
    "fused",
    "fused_graph",
    "fused_regional",
    "fused_regional_graph",
)
# Cache lengths are rounded up to a multiple of this, so that one cell's prompts share a few decoders.
CACHE_BUCKET = 256
# Decoders (static caches + graphs) kept per knob setting; the least recently used goes first.
MAX_DECODERS = 4
# Graphed prefill: prompt lengths are padded up to a multiple of PREFILL_BUCKET (always by at least one token,
# a spare slot for padded DeepStack rows), image-token counts up to a multiple of IMAGE_BUCKET; at most
# MAX_PREFILL_GRAPHS graphs per decoder.
PREFILL_BUCKET = 16
IMAGE_BUCKET = 64
MAX_PREFILL_GRAPHS = 8
# Vision-encoder graphs (one per image grid) kept per adapter and path, across knob changes; the least recently
# used goes first. Enough for one vision_tokens budget's grids in a real dataset: COCO's image sizes (640 on the
# long side, 333-640 on the other, both orientations) give 7-9 grids per budget of the study's grid, the
# synthetic workload's four sizes three; fewer slots than a cell's grids would recapture (~0.3 s each, untimed
# but slow) whenever its images alternate. Each graph keeps 54-101 MB of buffers (H200, `bench.vision_graph`):
# at most ~1.6 GB.
MAX_VISION_GRAPHS = 16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PathSpec:
    name: str
    static_cache: bool
    graph: bool
    fused: bool
    regional: bool = False  # torch.compile of the RMSNorms, MoE blocks and rope in decode steps
    static_prefill: bool = False  # the language model's prefill into the static cache, padded to a bucket
    vision_graph: bool = False  # the vision encoder per image grid from precomputed constants (`VisionGraph`)


PATHS: dict[str, PathSpec] = {
    "eager": PathSpec("eager", static_cache=False, graph=False, fused=False),
    "static": PathSpec("static", static_cache=True, graph=False, fused=False),
    "static_graph": PathSpec(
        "static_graph", static_cache=True, graph=True, fused=False, static_prefill=True, vision_graph=True
    ),
    "fused": PathSpec("fused", static_cache=True, graph=False, fused=True),
    "fused_graph": PathSpec(
        "fused_graph", static_cache=True, graph=True, fused=True, static_prefill=True, vision_graph=True
    ),
    "fused_regional": PathSpec("fused_regional", static_cache=True, graph=False, fused=True, regional=True),
    "fused_regional_graph": PathSpec(
        "fused_regional_graph",
        static_cache=True,
        graph=True,
        fused=True,
        regional=True,
        static_prefill=True,
        vision_graph=True,
    ),
}


def triton_available() -> bool:
    from knobsweep.models import fused_moe

    return fused_moe.triton is not None


def resolve_inference_path(adapter: ModelAdapter, requested: str) -> str:
    """The concrete path for `requested` on this adapter's device and family (`auto` resolved), or a clear
    error when the path cannot run here."""
    if requested not in INFERENCE_PATHS:
        raise ValueError(f"inference_path={requested!r} is not one of {list(INFERENCE_PATHS)}")
    cuda = adapter.device.type == "cuda"
    if requested == "auto":
        # CPU: the plain path (no graphs; the fused kernels gain little there). CUDA: the fastest path whose
        # greedy tokens equal the plain path's on every tiny family (tests/test_fast_path.py on an H100).
        if not cuda or not adapter.supports_static_decode:
            return "eager"
        if adapter.supports_fused_decode and triton_available():
            return "fused_regional_graph"
        return "static_graph"
    spec = PATHS[requested]
    if spec.graph and not cuda:
        raise ValueError(
            f"inference_path={requested!r} captures CUDA graphs and needs a CUDA device; the model is on "
            f"{adapter.device} (use 'static' or 'fused' there, or 'auto')"
        )
    if spec.static_cache and not adapter.supports_static_decode:
        raise ValueError(
            f"inference_path={requested!r}: the {adapter.family} adapter supports only 'eager' "
            "(its static-cache decode is not implemented or not verified)"
        )
    if spec.fused and not adapter.supports_fused_decode:
        raise ValueError(
            f"inference_path={requested!r}: the fused decode kernels do not support the {adapter.family} "
            "family's experts"
        )
    if spec.fused and cuda and not triton_available():
        raise ValueError(f"inference_path={requested!r} needs Triton on CUDA, which is not installed")
    return requested


def cache_length(prompt_tokens: int, max_new_tokens: int) -> int:
    """Static cache slots for a request: prompt + max_new_tokens, rounded up to `CACHE_BUCKET`."""
    return CACHE_BUCKET * math.ceil((prompt_tokens + max_new_tokens) / CACHE_BUCKET)


class StaticDecoder:
    """Greedy decode steps of one (batch, cache length) over a static KV cache; on CUDA graph paths the step
    is captured once at construction and replayed."""

    def __init__(
        self,
        adapter: ModelAdapter,
        spec: PathSpec,
        batch: int,
        max_len: int,
        position_template: torch.Tensor,
        regional: RegionalCompile | None = None,
        fused_modules: FusedModules | None = None,
    ) -> None:
        self.adapter, self.spec, self.regional, self.fused_modules = adapter, spec, regional, fused_modules
        self.batch, self.max_len = batch, max_len
        device = adapter.device
        self.cache, self.layers = self._new_static_cache()
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros_like(position_template)
        self.mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=device)
        self.prompt_tokens = 0
        self.logits: torch.Tensor | None = None
        self.graph: Any = None
        # Graphed prefill: graphs by (length bucket, image bucket), sharing one memory pool; the next request's.
        self.prefills: OrderedDict[tuple[int, int], PrefillGraph] = OrderedDict()
        self.prefill_pool: Any = None
        self.pending_prefill: PrefillGraph | None = None
        if spec.graph:
            try:
                self._capture()
            except Exception as error:
                raise RuntimeError(
                    f"{adapter.family}: capturing the decode step in a CUDA graph failed on inference path "
                    f"{spec.name!r} ({type(error).__name__}: {error}); inference_path='eager' avoids graphs"
                ) from error

    # ---- set-up ------------------------------------------------------------------------------------
    def _new_static_cache(self) -> tuple[Any, dict[int, Any]]:
        """A StaticCache with a no-op layer at every skipped block and the kept attention layers allocated
        now (a graph must see the cache's final tensors)."""
        from transformers import StaticCache

        from knobsweep.models.base import _holds_keys, _no_cache_layer

        adapter = self.adapter
        config = adapter.text_config()
        cache = StaticCache(config=adapter.model.config, max_cache_len=self.max_len)
        kept = set(adapter.active_blocks)
        heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        empty = torch.zeros(self.batch, heads, 0, head_dim, dtype=adapter.dtype, device=adapter.device)
        layers = {}
        for i in range(adapter.num_blocks):
            if i not in kept:
                cache.layers[i] = _no_cache_layer()
            elif _holds_keys(cache, i):
                cache.layers[i].lazy_initialization(empty, empty)
                layers[i] = cache.layers[i]
        if not layers:
            raise ValueError(
                f"{adapter.family}: no kept block has a key/value cache; use inference_path='eager'"
            )
        return cache, layers

    def _set_length(self, length: int) -> None:
        for layer in self.layers.values():
            layer.cumulative_length.fill_(length)

    @contextmanager
    def kernels(self) -> Iterator[None]:
        """On fused paths, the fused experts and split-KV attention for the decode steps only (the prefill keeps
        the loaded implementations, so it stays the plain path's)."""
        config = self.adapter.text_config()
        saved = (config._experts_implementation, config._attn_implementation)
        if not self.spec.fused:
            # torch's grouped_mm has no float32 CUDA kernel: its fallback reads the group offsets on the host,
            # which a CUDA graph cannot capture. batched_mm (per-token expert weights) never synchronises.
            if self.spec.graph and self.adapter.model.dtype == torch.float32 and saved[0] == "grouped_mm":
                config._experts_implementation = "batched_mm"
            try:
                yield
            finally:
                config._experts_implementation, config._attn_implementation = saved
            return
        from knobsweep.models import decode_attention, fused_moe

        config._experts_implementation = fused_moe.register()
        config._attn_implementation = decode_attention.register_splitkv()
        if self.fused_modules is not None:
            self.fused_modules.install()
        if self.regional is not None:
            self.regional.enable(self.fused_modules.decode_modules() if self.fused_modules else set())
        try:
            yield
        finally:
            config._experts_implementation, config._attn_implementation = saved
            if self.regional is not None:
                self.regional.disable()
            if self.fused_modules is not None:
                self.fused_modules.uninstall()

    def _forward(self) -> torch.Tensor:
        adapter = self.adapter
        out = adapter.model(
            input_ids=self.token,
            attention_mask=self.mask,
            position_ids=self.position,
            use_cache=True,
            **{adapter._cache_arg: self.cache},
        )
        return out.logits[:, -1, :]

    def _capture(self) -> None:
        """Capture one decode step (`capture_graph`). The warm-up steps write slots the real steps overwrite
        before reading them."""
        self.mask[..., 0] = True  # warm-up steps attend to one slot (no fully masked rows)
        with self.kernels():
            self.graph, self.logits = capture_graph(self._forward, lambda: self._set_length(0))
        self._set_length(0)
        self.mask.zero_()

    def release(self) -> None:
        """Drop the graphs now: the prefill graphs refer back to their decoder, so without this a dropped
        decoder's memory would wait for the garbage collector."""
        self.prefills.clear()
        self.pending_prefill = None
        self.graph = None

    # ---- per request -------------------------------------------------------------------------------
    def prepare_prefill(self, inputs: dict[str, torch.Tensor], processed: Any) -> bool:
        """Before the request's clock: the graphed prefill for this prompt's buckets, captured if new; the image
        tokens are counted on the processor's host output (`processed`). False where the prefill stays the plain
        path's (paths without it, families without support, batches of more than one row)."""
        self.pending_prefill = None
        adapter = self.adapter
        if not (self.spec.static_prefill and adapter.supports_static_prefill and self.batch == 1):
            return False
        # Graph-safe experts only: transformers' default grouped_mm, which `prefill_experts` runs as moe_grouped
        # or batched_mm where its CUDA kernel is missing. Another implementation chosen at load time (e.g. the
        # eager loop, which synchronises with the host) keeps the plain prefill.
        if adapter.text_config()._experts_implementation != "grouped_mm":
            return False
        prompt_tokens = inputs["input_ids"].shape[1]
        # Image tokens matter only for DeepStack's buffers (Qwen3-VL).
        image_tokens = sum(adapter.vision_tokens_of(processed)) if _deepstack_depth(adapter) else 0
        key = (_round_up(prompt_tokens + 1, PREFILL_BUCKET), _round_up(image_tokens, IMAGE_BUCKET))
        if key[0] > self.max_len:
            return False
        if key in self.prefills:
            self.prefills.move_to_end(key)
        else:
            while len(self.prefills) >= MAX_PREFILL_GRAPHS:
                self.prefills.popitem(last=False)
            if self.spec.graph and self.prefill_pool is None:
                self.prefill_pool = torch.cuda.graph_pool_handle()
            self.prefills[key] = PrefillGraph(self, *key)
        self.pending_prefill = self.prefills[key]
        return True

    def load_prefill(self, dynamic_cache: Any, attention_mask: torch.Tensor) -> None:
        """Copy the prefill's keys/values into the static cache; the mask admits the prompt's real tokens."""
        for i, layer in self.layers.items():
            source = dynamic_cache.layers[i]
            layer.cumulative_length.fill_(0)
            layer.update(source.keys, source.values)  # slots 0..prompt_tokens-1; length = prompt_tokens
        self.admit_prompt(attention_mask)

    def admit_prompt(self, attention_mask: torch.Tensor) -> None:
        """The prompt's keys/values are in the cache: the next token goes to slot prompt_tokens, the mask admits
        the prompt's real tokens (a graphed prefill's padded slots stay masked until decode steps overwrite them)."""
        prompt_tokens = attention_mask.shape[1]
        self._set_length(prompt_tokens)
        self.mask.zero_()
        self.mask[:, 0, 0, :prompt_tokens] = attention_mask.bool()
        self.prompt_tokens = prompt_tokens

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor, step: int) -> torch.Tensor:
        """Logits of decode step `step` (1, 2, ...): `tokens` (batch,) go to slot prompt_tokens + step - 1."""
        self.token.copy_(tokens[:, None])
        self.position.copy_(position_ids)
        self.mask[:, 0, 0, self.prompt_tokens + step - 1] = True
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._forward()


class FastDecoding:
    """The decoders of the current knob setting, keyed by (batch, cache length)."""

    def __init__(self, adapter: ModelAdapter, path: str | PathSpec) -> None:
        self.adapter = adapter
        # A PathSpec directly: combinations no path name has (the tests' un-graphed static prefill on CPU).
        self.spec = path if isinstance(path, PathSpec) else PATHS[path]
        self.decoders: OrderedDict[tuple[int, int], StaticDecoder] = OrderedDict()
        # Compiled once per process and adapter, shared by every decoder (knob changes recompile by guard).
        self.regional = (
            RegionalCompile(adapter.text_model(), adapter._original_layers) if self.spec.regional else None
        )
        self.fused_modules = (
            FusedModules(
                adapter._original_layers,
                adapter._routers,
                final_norm=getattr(adapter.text_model(), "norm", None),
            )
            if self.spec.fused
            else None
        )
        # The vision encoder's graphs by image grid (rows of image_grid_thw), sharing one memory pool; they do
        # not depend on the knobs, so `clear()` keeps them. The next request's, with its grid tensor.
        self.vision_graphs: OrderedDict[tuple[tuple[int, ...], ...], VisionGraph] = OrderedDict()
        self.vision_pool: Any = None
        self.pending_vision: tuple[VisionGraph, torch.Tensor] | None = None
        # Why the vision encoder runs as loaded on this path, once a graph could not be used (logged once).
        self.vision_fallback: str | None = None

    def clear(self) -> None:
        """Drop every decoder (their graphs bake in the knobs); called by `configure()`. The vision graphs stay."""
        for decoder in self.decoders.values():
            decoder.release()
        self.decoders.clear()

    def prepare_vision(self, inputs: dict[str, torch.Tensor], processed: Any) -> bool:
        """Before the request's clock: the vision graph for this request's image grid, built (and on graph paths
        captured) if new. The grid is the processor's host tensor (`processed`): the prefill then passes it to the
        model instead of the moved copy (`vision_forward` expects that one). False where the vision encoder runs
        as loaded: paths without vision graphs, families without `supports_vision_graph`, requests without images
        or with videos, and after a fallback (`vision_fallback`)."""
        self.pending_vision = None
        adapter = self.adapter
        if not (self.spec.vision_graph and adapter.supports_vision_graph) or self.vision_fallback is not None:
            return False
        pixels, grid = inputs.get("pixel_values"), processed.get("image_grid_thw")
        if pixels is None or grid is None or inputs.get("pixel_values_videos") is not None:
            return False
        key = tuple(tuple(int(v) for v in row) for row in grid.tolist())
        graph = self.vision_graphs.get(key)
        if graph is not None:
            self.vision_graphs.move_to_end(key)
        else:
            (visual,) = adapter.vision_modules()
            reason = vision_graph_support(visual)
            if reason is None:
                try:
                    # Built and checked with the moved grid: its precomputed inputs belong on the device.
                    graph = self._new_vision_graph(visual, key, inputs["image_grid_thw"], pixels)
                except Exception as error:  # noqa: BLE001 - the plain forward is correct, only slower: logged
                    reason = f"its graph for image grid {list(key)} failed ({type(error).__name__}: {error})"
            if reason is not None:
                self._vision_fall_back(visual, reason)
                return False
        self.pending_vision = (graph, grid)
        return True

    def vision_encoder_mode(self) -> str:
        """ "graphed" where this path replays the vision encoder per image grid, "as loaded" where it does not,
        "as loaded: <why>" once a graph could not be used (`vision_fallback`)."""
        if not (self.spec.vision_graph and self.adapter.supports_vision_graph):
            return "as loaded"
        return "graphed" if self.vision_fallback is None else f"as loaded: {self.vision_fallback}"

    def _new_vision_graph(
        self, visual: torch.nn.Module, key: tuple, grid: torch.Tensor, pixels: torch.Tensor
    ) -> VisionGraph:
        """A VisionGraph for `grid` (least recently used ones dropped first), checked against the vision model's
        own forward on this request's pixels."""
        while len(self.vision_graphs) >= MAX_VISION_GRAPHS:
            self.vision_graphs.popitem(last=False)
        if self.spec.graph and self.vision_pool is None:
            self.vision_pool = torch.cuda.graph_pool_handle()
        graph = VisionGraph(visual, grid, pixels, graphed=self.spec.graph, pool=self.vision_pool)
        error = graph.verify(pixels, grid)
        if not error <= VISION_CHECK_TOLERANCE:
            raise RuntimeError(
                f"its output differs from the vision model's by {error:.3g} of the largest output value"
            )
        self.vision_graphs[key] = graph
        return graph

    def _vision_fall_back(self, visual: torch.nn.Module, reason: str) -> None:
        """From now on the vision encoder runs as loaded on this path (correct, launched from Python); one log
        line per process and reason."""
        self.vision_fallback = reason
        self.vision_graphs.clear()
        self.vision_pool = None
        message = (
            f"{self.adapter.family}: the vision encoder ({type(visual).__name__}) runs un-graphed on inference "
            f"path {self.spec.name!r}: {reason}"
        )
        if message not in _LOGGED_FALLBACKS:
            _LOGGED_FALLBACKS.add(message)
            log.warning(message)

    @contextmanager
    def vision_forward(self) -> Iterator[None]:
        """For one prefill: the vision model's forward replaced on the instance by the prepared VisionGraph's (the
        module's hooks, which time the vision stage, still run), and the multimodal model's `get_placeholder_mask`
        by `placeholder_masks` (the count it checks on the device was checked on the host: `check_counts`); then
        the classes' methods again."""
        pending, self.pending_vision = self.pending_vision, None
        if pending is None:
            yield
            return
        graph, grid = pending
        multimodal = self.adapter.model.model
        graph.expected_grid = grid
        graph.visual.forward = graph.forward
        multimodal.get_placeholder_mask = MethodType(placeholder_masks, multimodal)
        try:
            yield
        finally:
            del graph.visual.forward  # back to the class's forward
            del multimodal.get_placeholder_mask
            graph.expected_grid = None

    @contextmanager
    def prefill_kernels(self, decoder: StaticDecoder | None = None) -> Iterator[None]:
        """The prefill's experts (`prefill_experts`), the prepared vision graph (`vision_forward`) and, where the
        decoder prepared one, the language model's forward replaced by its graphed prefill."""
        graph = decoder.pending_prefill if decoder is not None else None
        with (
            prefill_experts(self.adapter, self.spec, graphed=graph is not None and graph.graph is not None),
            self.vision_forward(),
        ):
            if graph is None:
                yield
                return
            text = self.adapter.text_model()
            text.forward = graph.intercept
            try:
                yield
            finally:
                del text.forward  # back to the class's forward
                decoder.pending_prefill = None

    def decoder(
        self, inputs: dict[str, torch.Tensor], position_ids: torch.Tensor, max_new_tokens: int
    ) -> StaticDecoder:
        """The decoder for this request's batch and cache length, built (and captured) if new; `position_ids`
        (the prompt's) give the shape and dtype of the decode positions (3D M-RoPE for the Qwen families)."""
        input_ids = inputs["input_ids"]
        batch, prompt_tokens = input_ids.shape
        key = (batch, cache_length(prompt_tokens, max_new_tokens))
        if key in self.decoders:
            self.decoders.move_to_end(key)
            return self.decoders[key]
        while len(self.decoders) >= MAX_DECODERS:
            self.decoders.popitem(last=False)[1].release()
        decoder = StaticDecoder(
            self.adapter, self.spec, batch, key[1], position_ids[..., -1:], self.regional, self.fused_modules
        )
        self.decoders[key] = decoder
        return decoder


def capture_graph(
    run: Callable[[], torch.Tensor], reset: Callable[[], None], pool: Any = None
) -> tuple[Any, Any]:
    """Warm `run` up twice on a side stream (lazy initialisation, Triton and torch.compile compilation; the
    second warm-up fails loudly on a host synchronisation, which would break the capture), then capture it in a
    CUDA graph with the garbage collector off; `reset` runs before each. Returns the graph and run's output
    (the graph's output buffer).
    Thread-local capture mode: only this thread's calls can invalidate the capture (a worker's other threads,
    e.g. image preprocessing, may use CUDA meanwhile)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(2):
            reset()
            torch.cuda.set_sync_debug_mode("error" if i == 1 else "default")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    # No garbage collection during the capture: in the GPU tests a collection there (of dropped decoders'
    # objects; which one's destruction was not pinned down, a lone CUDAGraph's is harmless) invalidated it.
    # Collect first to free dropped decoders' memory (torch 2.11 collects here too, newer torch only under
    # TORCH_CUDAGRAPH_GC); cheap where the loaded model is frozen out (`cells.keep_out_of_garbage_collection`).
    gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            output = run()
    finally:
        gc.enable()
    return graph, output


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


def _deepstack_depth(adapter: ModelAdapter) -> int:
    """Decoder layers that receive DeepStack features (Qwen3-VL); 0 for families without them."""
    vision = getattr(adapter.model.config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", ()) or ())


@contextmanager
def prefill_experts(adapter: ModelAdapter, spec: PathSpec, graphed: bool) -> Iterator[None]:
    """The experts implementation of a prefill. Fused paths: `moe_grouped` ("knobsweep_fused" serves more than
    FUSED_MAX_TOKENS tokens with it) if the loaded implementation is transformers' grouped_mm (another one,
    e.g. "eager", was chosen on purpose and is kept). A graphed prefill in float32 otherwise: batched_mm
    (torch's grouped_mm has no float32 CUDA kernel; its fallback synchronises, which a graph cannot capture)."""
    config = adapter.text_config()
    saved = config._experts_implementation
    if saved == "grouped_mm" and spec.fused:
        from knobsweep.models import fused_moe

        config._experts_implementation = fused_moe.register()
    elif saved == "grouped_mm" and graphed and adapter.dtype == torch.float32:
        config._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        config._experts_implementation = saved


def _deepstack_by_index(
    hidden_states: torch.Tensor, image_positions: torch.Tensor, visual_embeds: torch.Tensor
) -> torch.Tensor:
    """Qwen3-VL's DeepStack injection (`_deepstack_process`) at image positions given as indices (batch 1):
    transformers indexes with a boolean mask, which synchronises with the host. Same gather, add and scatter;
    padded rows (zeros) all point at one padded position."""
    hidden_states = hidden_states.clone()
    local = hidden_states[0, image_positions] + visual_embeds.to(hidden_states.dtype)
    hidden_states[0, image_positions] = local
    return hidden_states


# Arguments the language model may receive besides its inputs and the graphed prefill ignores (the cache is
# replaced by the decoder's static one); the extra outputs only while they are not asked for.
_IGNORED_ARGS = ("use_cache", "cache_position", "return_dict")
_EXTRA_OUTPUTS = ("output_attentions", "output_hidden_states", "output_router_logits")


class PrefillGraph:
    """The language model's prefill of prompts padded to `length` tokens with up to `image_tokens` image tokens,
    written into its decoder's static cache; replayed from a CUDA graph on graph paths (see the module
    docstring). `intercept` stands in for the language model's forward during the request's prefill."""

    def __init__(self, decoder: StaticDecoder, length: int, image_tokens: int) -> None:
        adapter = decoder.adapter
        device, dtype = adapter.device, adapter.dtype
        hidden = int(adapter.text_config().hidden_size)
        self.decoder, self.length, self.image_tokens = decoder, length, image_tokens
        self.text = adapter.text_model()
        self.embeds = torch.zeros(1, length, hidden, dtype=dtype, device=device)
        self.positions = torch.zeros(*decoder.position.shape[:-1], length, dtype=torch.long, device=device)
        self.steps = torch.arange(1, length + 1, device=device)
        rows = torch.arange(length, device=device)[:, None]
        cols = torch.arange(decoder.max_len, device=device)[None, :]
        self.mask = (cols <= rows).view(1, 1, length, decoder.max_len)  # causal over the cache's slots
        depth = _deepstack_depth(adapter)
        self.deepstack = (
            torch.zeros(depth, image_tokens, hidden, dtype=dtype, device=device)
            if depth and image_tokens
            else None
        )
        self.image_positions = torch.full((image_tokens,), length - 1, dtype=torch.long, device=device)
        self.hidden: torch.Tensor | None = None
        self.graph: Any = None
        if decoder.spec.graph:
            try:
                self._capture()
            except Exception as error:
                raise RuntimeError(
                    f"{adapter.family}: capturing the prefill ({length} tokens) in a CUDA graph failed on "
                    f"inference path {decoder.spec.name!r} ({type(error).__name__}: {error}); "
                    "inference_path='eager' avoids graphs"
                ) from error

    def _forward(self) -> torch.Tensor:
        adapter, decoder = self.decoder.adapter, self.decoder
        extra = {}
        if self.deepstack is not None:
            extra = {
                "visual_pos_masks": self.image_positions,
                "deepstack_visual_embeds": list(self.deepstack),
            }
        self.text._deepstack_process = _deepstack_by_index
        # Fused paths: the prompt's attention, routers and norms in Triton kernels (`FusedModules`). The cache
        # is empty (length 0) when this runs, which the prompt attention relies on.
        fused = decoder.fused_modules if decoder.spec.fused else None
        if fused is not None:
            fused.install(prefill=True)
        try:
            out = type(self.text).forward(
                self.text,
                input_ids=None,
                inputs_embeds=self.embeds,
                position_ids=self.positions,
                attention_mask=self.mask,
                use_cache=True,
                **{adapter._cache_arg: decoder.cache},
                **extra,
            )
        finally:
            del self.text._deepstack_process
            if fused is not None:
                fused.uninstall()
        return out.last_hidden_state

    def _capture(self) -> None:
        """Capture the prefill into the decoder's prefill pool (`capture_graph`). Warm-ups write cache slots the
        request's prefill overwrites."""
        decoder = self.decoder
        with prefill_experts(decoder.adapter, decoder.spec, graphed=True):
            self.graph, self.hidden = capture_graph(
                self._forward, lambda: decoder._set_length(0), pool=decoder.prefill_pool
            )

    def intercept(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_pos_masks: torch.Tensor | None = None,
        deepstack_visual_embeds: list[torch.Tensor] | None = None,
        **rest: Any,
    ) -> Any:
        """The language model's forward for one prompt (batch 1, no padding): copy its inputs into the padded
        buffers, run (replay) the prefill, return the real positions' hidden states."""
        from transformers.modeling_outputs import BaseModelOutputWithPast

        rest.pop(self.decoder.adapter._cache_arg, None)
        unexpected = sorted(
            k
            for k, v in rest.items()
            if (k in _EXTRA_OUTPUTS and v) or (k not in _IGNORED_ARGS + _EXTRA_OUTPUTS and v is not None)
        )
        if input_ids is not None or inputs_embeds is None or position_ids is None or unexpected:
            raise RuntimeError(
                f"graphed prefill: the language model was called with inputs it does not handle "
                f"(input_ids given: {input_ids is not None}, embeddings: {inputs_embeds is not None}, "
                f"positions: {position_ids is not None}, other: {unexpected})"
            )
        length = inputs_embeds.shape[1]
        if length >= self.length or position_ids.shape[:-1] != self.positions.shape[:-1]:
            raise RuntimeError(
                f"graphed prefill: prompt of {length} tokens / positions {tuple(position_ids.shape)} do not fit "
                f"the graph prepared for {self.length} / {tuple(self.positions.shape)}"
            )
        self.embeds[:, :length].copy_(inputs_embeds)
        self.embeds[:, length:].zero_()
        self.positions[..., :length].copy_(position_ids)
        self.positions[..., length:].copy_(position_ids[..., -1:] + self.steps[: self.length - length])
        if self.deepstack is not None:
            image_tokens = deepstack_visual_embeds[0].shape[0] if deepstack_visual_embeds else 0
            if image_tokens > self.image_tokens or len(deepstack_visual_embeds or ()) != len(self.deepstack):
                raise RuntimeError(
                    f"graphed prefill: {image_tokens} image tokens at {len(deepstack_visual_embeds or ())} "
                    f"DeepStack depths do not fit the graph's {self.image_tokens} at {len(self.deepstack)}"
                )
            for buffer, features in zip(self.deepstack, deepstack_visual_embeds, strict=True):
                buffer[:image_tokens].copy_(features)
                buffer[image_tokens:].zero_()
            found = torch.nonzero_static(
                visual_pos_masks[0], size=self.image_tokens, fill_value=self.length - 1
            )
            self.image_positions.copy_(found.view(-1))
        elif deepstack_visual_embeds:
            raise RuntimeError(
                "graphed prefill: DeepStack features for a graph prepared without image tokens"
            )
        self.decoder._set_length(0)
        if self.graph is not None:
            self.graph.replay()
            hidden = self.hidden
        else:
            hidden = self._forward()
        return BaseModelOutputWithPast(last_hidden_state=hidden[:, :length])


# ---- the vision encoder ---------------------------------------------------------------------------------------
# transformers' helpers (transformers.vision_utils; 5.17 and 5.24 checked) that compute the vision forward's grid-dependent
# inputs, each returning its precomputed value instead when the forward's keyword arguments hold it (popped).
_VISION_HELPERS = (
    "get_vision_interpolation_indices_and_weights",
    "get_vision_position_ids",
    "get_vision_attention_seqlens",
)
# Arguments the vision model receives from `get_image_features` that a VisionGraph ignores; the extra outputs only
# while they are not asked for.
_VISION_IGNORED_ARGS = ("return_dict", "use_cache")
_VISION_EXTRA_OUTPUTS = ("output_attentions", "output_hidden_states", "output_router_logits")
# Largest difference from the vision model's own forward, relative to its largest output value, that a new vision
# graph may show (`FastDecoding._new_vision_graph`): a gross-error guard (a wrong constant or a stale buffer gives
# O(1)); the same kernels on the same inputs give 0 (tests/test_vision_graph.py).
VISION_CHECK_TOLERANCE = 1e-2
_LOGGED_FALLBACKS: set[str] = set()


def vision_graph_support(visual: torch.nn.Module) -> str | None:
    """None where `visual`'s forward takes its grid-dependent inputs precomputed (`vision_constants`); otherwise
    why not, for the log line of the fallback to the forward as loaded."""
    if "forward" in visual.__dict__:
        return "its forward is replaced on the instance (e.g. by an offloading hook)"
    try:
        from transformers import vision_utils
    except ImportError:
        return "this transformers has no vision_utils"
    missing = [name for name in _VISION_HELPERS if not hasattr(vision_utils, name)]
    if missing:
        return f"transformers.vision_utils has no {missing}"
    called = inspect.unwrap(type(visual).forward).__code__.co_names
    uncalled = [name for name in _VISION_HELPERS if name not in called]
    if uncalled:
        return f"{type(visual).__name__}.forward does not take its inputs from {uncalled}"
    return None


def vision_constants(visual: torch.nn.Module, grid_thw: torch.Tensor) -> dict[str, Any]:
    """The inputs of Qwen3-VL's vision forward that depend only on the image grid, computed by transformers' own
    helpers with the arguments the forward gives them, as the keyword arguments the helpers pop instead of
    computing: position-embedding interpolation indices and weights, rotary positions, and the images'
    cumulative lengths. The attention splits q/k/v by those lengths read on the host (`.tolist()`), which would
    synchronise inside the forward: given as a host tensor they need none (flash attention instead takes them on
    the device, with the longest length as a number)."""
    from transformers import vision_utils
    from transformers.utils.generic import is_flash_attention_requested

    indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
        grid_thw,
        num_grid_per_side=visual.num_grid_per_side,
        mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners,
        spatial_merge_size=visual.config.spatial_merge_size,
    )
    positions = vision_utils.get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    cu_seqlens = vision_utils.get_vision_cu_seqlens(grid_thw)
    constants = {"interp_indices": indices, "interp_weights": weights, "position_ids": positions}
    if is_flash_attention_requested(visual.config):
        constants["cu_seqlens"] = cu_seqlens
        constants["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    else:
        constants["cu_seqlens"] = cu_seqlens.cpu()
    return constants


class VisionGraph:
    """Qwen3-VL's vision encoder (`model.model.visual`) for one image grid (the rows of `image_grid_thw`): the
    grid's host-dependent inputs computed once (`vision_constants`), the pixels copied into a fixed buffer, the
    rest replayed from a CUDA graph on graph paths (on other devices: the same forward, un-graphed). `forward`
    stands in for the vision model's forward during a request's prefill (`FastDecoding.vision_forward`); it returns
    the vision model's output type with the graph's buffers, valid until the next replay of any of the adapter's
    vision graphs (they share one memory pool), which the request's prefill, their only reader, never outlives."""

    def __init__(
        self,
        visual: torch.nn.Module,
        grid_thw: torch.Tensor,
        pixel_values: torch.Tensor,
        graphed: bool,
        pool: Any = None,
    ) -> None:
        self.visual = visual
        self.grid = grid_thw.clone()
        self.rows = [[int(v) for v in row] for row in grid_thw.tolist()]
        self.constants = vision_constants(visual, self.grid)
        self.pixels = pixel_values.to(visual.dtype, copy=True)  # warm-ups and capture on real pixels
        self.output_type: type | None = None
        self.layout: list[tuple[str, int | None]] = []  # (field, None: a tensor | n: a list of n tensors)
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.expected_grid: torch.Tensor | None = None  # the prepared request's grid tensor
        self.graph: Any = None
        if graphed:
            self.graph, self.outputs = capture_graph(self._forward, lambda: None, pool=pool)

    def _forward(self) -> tuple[torch.Tensor, ...]:
        """The vision model's forward (the class's: no hooks) on the buffer, its output's tensors in order."""
        visual = self.visual
        out = type(visual).forward(
            visual, self.pixels, grid_thw=self.grid, return_dict=True, **self.constants
        )
        flat: list[torch.Tensor] = []
        layout: list[tuple[str, int | None]] = []
        for key, value in out.items():
            if isinstance(value, torch.Tensor):
                layout.append((key, None))
                flat.append(value)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
                layout.append((key, len(value)))
                flat.extend(value)
            else:
                raise TypeError(f"the vision model's output field {key!r} is a {type(value).__name__}")
        self.output_type, self.layout = type(out), layout
        return tuple(flat)

    def _output(self, flat: tuple[torch.Tensor, ...]) -> Any:
        """A new output object of the vision model's type around `flat` (callers replace its fields)."""
        fields: dict[str, Any] = {}
        i = 0
        for key, count in self.layout:
            if count is None:
                fields[key], i = flat[i], i + 1
            else:
                fields[key], i = list(flat[i : i + count]), i + count
        return self.output_type(**fields)

    def forward(
        self, hidden_states: torch.Tensor, grid_thw: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """The vision model's forward for this grid: copy the pixels (`hidden_states`, patches x C*T*P*P) into the
        buffer, replay (run) it. Another grid, pixel shape or an output the graph does not record is an error."""
        unexpected = sorted(
            k
            for k, v in kwargs.items()
            if (k in _VISION_EXTRA_OUTPUTS and v)
            or (k not in _VISION_IGNORED_ARGS + _VISION_EXTRA_OUTPUTS and v is not None)
        )
        if unexpected:
            raise RuntimeError(
                f"vision graph: the vision model was called with arguments it does not handle: {unexpected}"
            )
        if hidden_states.shape != self.pixels.shape:
            raise RuntimeError(
                f"vision graph: pixels of shape {tuple(hidden_states.shape)} for the graph of image grid "
                f"{self.rows}, which takes {tuple(self.pixels.shape)}"
            )
        # The prepared request's grid tensor is the one checked; another is compared on the host (synchronises).
        if grid_thw is not self.expected_grid and (grid_thw is None or grid_thw.tolist() != self.rows):
            got = None if grid_thw is None else grid_thw.tolist()
            raise RuntimeError(f"vision graph: image grid {got} for the graph of image grid {self.rows}")
        self.pixels.copy_(hidden_states)
        if self.graph is not None:
            self.graph.replay()
            out = self._output(self.outputs)
        else:
            out = self._output(self._forward())
        return out.to_tuple() if kwargs.get("return_dict") is False else out

    def verify(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> float:
        """Largest difference between `forward` and the vision model's own forward on these pixels, relative to
        the largest output value (0: identical)."""
        visual = self.visual
        pixel_values = pixel_values.to(visual.dtype)
        expected = type(visual).forward(visual, pixel_values, grid_thw=grid_thw, return_dict=True)
        saved, self.expected_grid = self.expected_grid, grid_thw
        try:
            got = self.forward(pixel_values, grid_thw)
        finally:
            self.expected_grid = saved
        error, scale = 0.0, 0.0
        for key, count in self.layout:
            pairs = (
                [(got[key], expected[key])]
                if count is None
                else list(zip(got[key], expected[key], strict=True))
            )
            for a, b in pairs:
                if a.shape != b.shape:
                    return math.inf
                scale = max(scale, float(b.float().abs().nan_to_num(nan=math.inf).max()))
                error = max(error, float((a.float() - b.float()).abs().nan_to_num(nan=math.inf).max()))
        return error / scale if scale > 0 else error


def placeholder_masks(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor,
    image_features: torch.Tensor | None = None,
    video_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL's `get_placeholder_mask` (the image and video placeholders' masks, (batch, tokens, 1)) without its
    check that the placeholders match the features in number: on the device that check and its error message,
    formatted before the check, each wait for the GPU. The graph paths check the count on the host before the
    request (`QwenVisionGridAdapter.check_counts`). Without `input_ids`: transformers' own."""
    if input_ids is None:
        return type(model).get_placeholder_mask(
            model, input_ids, inputs_embeds, image_features, video_features
        )
    image = (input_ids == model.config.image_token_id).unsqueeze(-1)
    video = (input_ids == model.config.video_token_id).unsqueeze(-1)
    return image.to(inputs_embeds.device), video.to(inputs_embeds.device)


class CompileOnFirstCall:
    """`torch.compile(fn, dynamic=False)`, built at the first call. Building it imports torch._dynamo and
    inductor (3 s on a warm CPU, more on a fresh machine: part of a worker's first knob change), which a path
    whose decode pieces all have fused forwards (the Qwen3 families on CUDA) never calls."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.compiled = fn, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            from torch import _dynamo

            # One entry per (module class, shape, top-k); the default limit (8) would fall back to eager code
            # after a few top-k values in one process.
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            self.compiled = torch.compile(self.fn, dynamic=False)
        return self.compiled(*args, **kwargs)


class RegionalCompile:
    """`torch.compile` of the pieces every decoder block shares: the RMSNorms, each block's MLP (router +
    experts) and the rotary embedding function, enabled only around decode steps (the benchmark's regional
    paths use it too).

    Parameters are graph inputs, so one compiled graph per shape and top-k serves every block, unlike compiling
    the whole step, which bakes in the block list. Switched on by setting each module's `_compiled_call_impl`
    (what `nn.Module.compile` does) and the modeling module's `apply_rotary_pos_emb`. `text`: the language
    model (its RMSNorms); `layers`: all its decoder blocks, skipped ones included (their MLPs)."""

    def __init__(self, text: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
        import sys

        self.modules = [m for m in text.modules() if type(m).__name__.endswith("RMSNorm")]
        self.modules += [layer.mlp for layer in layers if hasattr(layer, "mlp")]
        attention = next((layer.self_attn for layer in layers if hasattr(layer, "self_attn")), None)
        self.modeling = sys.modules[type(attention).__module__] if attention is not None else None
        self.rope = getattr(self.modeling, "apply_rotary_pos_emb", None)
        self.rope_compiled: CompileOnFirstCall | None = None
        self.compiled: dict[int, CompileOnFirstCall] = {}

    def enable(self, skip: set[int] = frozenset()) -> None:
        """Compiled calls for the modules, except those whose id is in `skip` (they have a fused forward: a
        compiled call would take precedence over it)."""
        for m in self.modules:
            if id(m) in skip:
                continue
            if id(m) not in self.compiled:
                self.compiled[id(m)] = CompileOnFirstCall(m._call_impl)
            m.__dict__["_compiled_call_impl"] = self.compiled[
                id(m)
            ]  # as FusedModules.install: no __setattr__
        if self.rope is not None:
            if self.rope_compiled is None:
                self.rope_compiled = CompileOnFirstCall(self.rope)
            self.modeling.apply_rotary_pos_emb = self.rope_compiled

    def disable(self) -> None:
        for m in self.modules:
            m.__dict__.pop("_compiled_call_impl", None)  # back to nn.Module's class default, None
        if self.rope is not None:
            self.modeling.apply_rotary_pos_emb = self.rope


class FusedModules:
    """The fused paths' forwards for the modules that have one, set on the instances only around decode steps
    (`install()`) or the graphed prefill (`install(prefill=True)`); each falls back to its class's forward for
    what it does not handle (on CPU, without Triton, the attention runs transformers' ops):

    | module                        | decode step                                | graphed prefill            |
    | ----------------------------- | ------------------------------------------ | -------------------------- |
    | Qwen3-style attention         | `decode_attention.fused_attention_forward` | `prompt_attention_forward` |
    | Qwen3 router                  | `fused_moe.fused_router_forward`           | the same                   |
    | Qwen3 MoE decoder block       | `decode_block.fused_decoder_layer_forward` | (the class's)              |
    | Qwen3 RMSNorm (blocks, final) | `rms_norm.rms_norm_forward`                | the same                   |

    The attentions' q/k/v weights are concatenated once, here. A block is fused only where its attention and
    router are."""

    def __init__(
        self,
        layers: list[torch.nn.Module],
        routers: list[torch.nn.Module],
        blocks: bool = True,
        final_norm: torch.nn.Module | None = None,
    ) -> None:
        from knobsweep.models import decode_attention, decode_block, fused_moe, rms_norm

        # (module, where its forwards are defined, the decode step's forward, the prefill's; None: the class's),
        # looked up by name at each install. Modules whose instance already has its own forward (e.g.
        # accelerate's offloading hooks) are left alone.
        self.forwards: list[tuple[torch.nn.Module, Any, str | None, str | None]] = []

        def free(module: torch.nn.Module) -> bool:
            return "forward" not in module.__dict__

        for layer in layers:
            attention = getattr(layer, "self_attn", None)
            if attention is not None and free(attention) and decode_attention.fusable_attention(attention):
                decode_attention.concatenate_qkv(attention)
                self.forwards.append(
                    (attention, decode_attention, "fused_attention_forward", "prompt_attention_forward")
                )
        for router in routers:
            if free(router) and fused_moe.fusable_router(router):
                self.forwards.append((router, fused_moe, "fused_router_forward", "fused_router_forward"))
        # Whole blocks (residual additions in the kernels), where their attention and router are fused too;
        # blocks=False: the module-level forwards only (the benchmark's comparison).
        fused = {id(entry[0]) for entry in self.forwards}
        for layer in layers if blocks else ():
            if (
                free(layer)
                and decode_block.fusable_layer(layer)
                and id(layer.self_attn) in fused
                and id(layer.mlp.gate) in fused
            ):
                self.forwards.append((layer, decode_block, "fused_decoder_layer_forward", None))
        # The blocks' norms and the language model's final norm (`final_norm`), in decode steps and prefills:
        # with them every piece of a Qwen3 decode step has a Triton forward, and nothing is left for
        # `RegionalCompile` (whose compilation was most of a worker's first knob change).
        candidates = [m for layer in layers for m in layer.modules()]
        if final_norm is not None:
            candidates.append(final_norm)
        norms = [m for m in candidates if rms_norm.fusable_norm(m) and free(m)]
        self.forwards += [(norm, rms_norm, "rms_norm_forward", "rms_norm_forward") for norm in norms]
        self._decode_modules = frozenset(
            id(module) for module, _, decode, _ in self.forwards if decode is not None
        )

    def decode_modules(self) -> frozenset[int]:
        """ids of the modules with a decode-step forward here (what `RegionalCompile` must leave alone)."""
        return self._decode_modules

    def install(self, prefill: bool = False) -> None:
        # Straight into the instances' __dict__ (what nn.Module.__setattr__ does for a value that is no
        # parameter, buffer or module, without its checks): ~340 modules at every request's decode, ~1 us each
        # through __setattr__ (on the H100's host, a small cell's requests are ~18 ms).
        for module, owner, decode, prompt in self.forwards:
            name = prompt if prefill else decode
            if name is not None:
                module.__dict__["forward"] = MethodType(getattr(owner, name), module)

    def uninstall(self) -> None:
        for module, *_ in self.forwards:
            module.__dict__.pop("forward", None)
