"""Inference paths of the knob engine: how the greedy decode steps run, not what they compute.

Every path runs the same transformers modules with the same knobs (run-time top-k, skipped blocks passing the
hidden state through, vision-token resize) and the same prefill: one forward over the prompt with a
DynamicCache, vision encoder inside it, as the plain path. The fused paths run the prefill's experts through
`fused_moe.moe_grouped` when the loaded implementation is transformers' `grouped_mm`: the same grouped GEMMs,
gate and rounding without its extra passes (bit-identical on CPU; on CUDA the per-token sum of the K expert
outputs is one Triton kernel, which may add in another order). They differ in the decode steps:

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

`fused_regional_graph` (and `fused_regional`, its un-graphed CPU test form) compiles the pieces every decoder
block shares once (parameters are graph inputs, so all blocks reuse one compiled graph per shape and top-k) the
first time a decoder is built in the process (~10 s on an H100, in the first request, which the cell's warm-up
runs untimed, like the capture), and again for each new top-k (1-3 s). It rounds like the compiled kernels
do, not like eager bf16 code. `fused_graph` is the same without compilation (decode ~1.6x slower on the real
model): the choice where torch.compile does not work.

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

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PathSpec:
    name: str
    static_cache: bool
    graph: bool
    fused: bool
    regional: bool = False  # torch.compile of the RMSNorms, MoE blocks and rope in decode steps


PATHS: dict[str, PathSpec] = {
    "eager": PathSpec("eager", static_cache=False, graph=False, fused=False),
    "static": PathSpec("static", static_cache=True, graph=False, fused=False),
    "static_graph": PathSpec("static_graph", static_cache=True, graph=True, fused=False),
    "fused": PathSpec("fused", static_cache=True, graph=False, fused=True),
    "fused_graph": PathSpec("fused_graph", static_cache=True, graph=True, fused=True),
    "fused_regional": PathSpec("fused_regional", static_cache=True, graph=False, fused=True, regional=True),
    "fused_regional_graph": PathSpec(
        "fused_regional_graph", static_cache=True, graph=True, fused=True, regional=True
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
    ) -> None:
        self.adapter, self.spec, self.regional = adapter, spec, regional
        self.batch, self.max_len = batch, max_len
        device = adapter.device
        self.cache, self.layers = self._new_static_cache()
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros_like(position_template)
        self.mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=device)
        self.prompt_tokens = 0
        self.logits: torch.Tensor | None = None
        self.graph: Any = None
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
        if self.regional is not None:
            self.regional.enable()
        try:
            yield
        finally:
            config._experts_implementation, config._attn_implementation = saved
            if self.regional is not None:
                self.regional.disable()

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
        """Warm up on a side stream (lazy initialisation, Triton compilation), then capture one decode step.
        The warm-up steps write slots the real steps overwrite before reading them."""
        self.mask[..., 0] = True  # warm-up steps attend to one slot (no fully masked rows)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with self.kernels():
            with torch.cuda.stream(stream):
                for i in range(2):
                    self._set_length(0)
                    # The last warm-up fails loudly on a host synchronisation, which would break the capture.
                    torch.cuda.set_sync_debug_mode("error" if i == 1 else "default")
                    try:
                        self._forward()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
            torch.cuda.current_stream().wait_stream(stream)
            self._set_length(0)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._forward()
        self.graph = graph
        self._set_length(0)
        self.mask.zero_()

    # ---- per request -------------------------------------------------------------------------------
    def load_prefill(self, dynamic_cache: Any, attention_mask: torch.Tensor) -> None:
        """Copy the prefill's keys/values into the static cache; the mask admits the prompt's real tokens."""
        prompt_tokens = attention_mask.shape[1]
        for i, layer in self.layers.items():
            source = dynamic_cache.layers[i]
            layer.cumulative_length.fill_(0)
            layer.update(source.keys, source.values)  # slots 0..prompt_tokens-1; length = prompt_tokens
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

    def __init__(self, adapter: ModelAdapter, path: str) -> None:
        self.adapter = adapter
        self.spec = PATHS[path]
        self.decoders: OrderedDict[tuple[int, int], StaticDecoder] = OrderedDict()
        # Compiled once per process and adapter, shared by every decoder (knob changes recompile by guard).
        self.regional = RegionalCompile(adapter) if self.spec.regional else None

    def clear(self) -> None:
        """Drop every decoder (their graphs bake in the knobs); called by `configure()`."""
        self.decoders.clear()

    @contextmanager
    def prefill_kernels(self) -> Iterator[None]:
        """On fused paths, the prefill's experts through `moe_grouped` ("knobsweep_fused" serves more than
        FUSED_MAX_TOKENS tokens with it), if the loaded implementation is transformers' grouped_mm (another
        one, e.g. "eager", was chosen on purpose and is kept)."""
        config = self.adapter.text_config()
        saved = config._experts_implementation
        if not self.spec.fused or saved != "grouped_mm":
            yield
            return
        from knobsweep.models import fused_moe

        config._experts_implementation = fused_moe.register()
        try:
            yield
        finally:
            config._experts_implementation = saved

    def decoder(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> StaticDecoder:
        """The decoder for this request's batch and cache length, built (and captured) if new."""
        input_ids = inputs["input_ids"]
        batch, prompt_tokens = input_ids.shape
        key = (batch, cache_length(prompt_tokens, max_new_tokens))
        if key in self.decoders:
            self.decoders.move_to_end(key)
            return self.decoders[key]
        while len(self.decoders) >= MAX_DECODERS:
            self.decoders.popitem(last=False)
        # Only the shape and dtype of the decode positions are needed here (3D M-RoPE for the Qwen families).
        extra = {k: v for k, v in inputs.items() if k != "input_ids"}
        positions = self.adapter.model._prepare_position_ids_for_generation(input_ids, extra)
        decoder = StaticDecoder(self.adapter, self.spec, batch, key[1], positions[..., -1:], self.regional)
        self.decoders[key] = decoder
        return decoder


class RegionalCompile:
    """`torch.compile` of the pieces every decoder block shares: the RMSNorms, each block's MLP (router +
    experts) and the rotary embedding function, enabled only around decode steps (ported from the benchmark).

    Parameters are graph inputs, so one compiled graph per shape and top-k serves every block, unlike compiling
    the whole step, which bakes in the block list. Switched on by setting each module's `_compiled_call_impl`
    (what `nn.Module.compile` does) and the modeling module's `apply_rotary_pos_emb`."""

    def __init__(self, adapter: ModelAdapter) -> None:
        import sys

        from torch import _dynamo

        # One entry per (module class, shape, top-k); the default limit (8) would fall back to eager code
        # after a few top-k values in one process.
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
        text = adapter.text_model()
        self.modules = [m for m in text.modules() if type(m).__name__.endswith("RMSNorm")]
        self.modules += [layer.mlp for layer in adapter._original_layers if hasattr(layer, "mlp")]
        attention = next(
            (layer.self_attn for layer in adapter._original_layers if hasattr(layer, "self_attn")), None
        )
        self.modeling = sys.modules[type(attention).__module__] if attention is not None else None
        self.rope = getattr(self.modeling, "apply_rotary_pos_emb", None)
        self.rope_compiled: Any = None
        self.compiled: dict[int, Any] = {}

    def enable(self) -> None:
        for m in self.modules:
            if id(m) not in self.compiled:
                self.compiled[id(m)] = torch.compile(m._call_impl, dynamic=False)
            m._compiled_call_impl = self.compiled[id(m)]
        if self.rope is not None:
            if self.rope_compiled is None:
                self.rope_compiled = torch.compile(self.rope, dynamic=False)
            self.modeling.apply_rotary_pos_emb = self.rope_compiled

    def disable(self) -> None:
        for m in self.modules:
            m._compiled_call_impl = None
        if self.rope is not None:
            self.modeling.apply_rotary_pos_emb = self.rope
