"""Latency benchmark of Qwen3-VL-30B-A3B (random bf16 weights) per knob setting and inference path.

For each knob setting (vision_tokens, top_k, active_blocks) and each inference path it times, at batch 1 with
CUDA events after warm-up: the vision encoder, the LM prefill (with the image's features and DeepStack
injections), and one decode step at the prompt's end. In the same process it measures the copy bandwidth and the
bf16 matmul rate and divides analytic byte / FLOP counts (bench/floors.py) by them to get floors.

Paths (bench/README.md says more):
  eager                    transformers' eager experts loop, DynamicCache, no graph (the naive baseline)
  grouped_mm               transformers' grouped_mm experts, DynamicCache, no graph (transformers' default)
  grouped_mm_static_graph  grouped_mm experts, StaticCache, prefill and decode step each in a CUDA graph
  lean_grouped             experts "knobsweep_fused": in the prefill `moe_grouped` (grouped_mm's GEMMs
                           without its extra passes), in decode the Triton kernels; DynamicCache, no graph:
                           the prefill of the knob engine's fused paths
  fused_static_graph       Triton decode experts (bench/fused_moe.py) + split-KV decode attention
                           (bench/attention.py), StaticCache, prefill and decode each in a CUDA graph;
                           prefill experts through `moe_grouped`
  fused_regional_graph_tf_attention
                           as fused_static_graph, plus torch.compile of the norms, MoE blocks and rope,
                           compiled once and shared by all blocks (the knob engine's `fused_regional_graph`
                           until INFERENCE_CODE_VERSION 3)
  fused_regional_graph_separate_adds
                           as above, with the knob engine's fused decode attention (q/k/v in one GEMV; q/k
                           norms, rope and cache writes in one kernel) and Triton router
                           (`fast_path.FusedModules`; its `fused_regional_graph` in INFERENCE_CODE_VERSION 4)
  fused_regional_graph_unfolded
                           as fused_regional_graph_separate_adds, with whole-block forwards: the residual
                           additions in the output projection's (a Triton GEMV) and the experts' kernels, the
                           cache length advanced in the split-KV combine kernel (`decode_block`); its prefill
                           with the graphed-prefill forwards (prompt attention over the prompt's own slots,
                           Triton norms and router): the knob engine's `fused_regional_graph` in
                           INFERENCE_CODE_VERSION 5-7 (12 kernels per block)
  fused_regional_graph_no_pdl
                           as above, with the blocks' two norms, the router's logits and softmax/top-k and the
                           experts' combine folded into neighbouring kernels (`decode_block.FOLD_NORMS`: 8
                           kernels per block)
  fused_regional_graph     as above, the Triton kernels launched with programmatic dependent launch
                           (`knobsweep.models.pdl`: each lets the next launch, fetches its weights, then waits
                           for the previous): the knob engine's `fused_regional_graph`, `auto` on CUDA
                           (INFERENCE_CODE_VERSION 8). Nothing of the Qwen3 families is compiled
  fused_compiled_graph     (--compiled) the whole decode step through torch.compile, default cell only

Run (GPU):  PYTHONPATH=workflow_scripts python -m bench.latency --out results.json
Run (CPU smoke test, seconds):  python -m bench.latency --device cpu --tiny --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers
from knobsweep.models import decode_block, pdl
from knobsweep.models.fast_path import FusedModules, RegionalCompile
from transformers import DynamicCache, StaticCache

from bench import attention as gqa_attention
from bench import floors, fused_moe, keeps_torch_state
from bench.model import Knobs, PromptInputs, build_model, make_config, make_inputs

# Knob values of the study (tiny: same structure, scaled to the tiny model).
GRIDS = {
    "full": {
        "vision_tokens": (288, 576, 1008, 1872),
        "top_k": (1, 2, 4, 8, 16, 32),
        "active_blocks": (8, 16, 24, 48),
    },
    "tiny": {"vision_tokens": (16, 24, 36, 48), "top_k": (1, 2, 4, 8, 16, 32), "active_blocks": (2, 3, 4, 6)},
}


@dataclass(frozen=True, order=True)
class Setting:
    vision_tokens: int
    top_k: int
    active_blocks: int

    def cell_id(self) -> str:
        return f"vt{self.vision_tokens}_k{self.top_k}_b{self.active_blocks}"


@dataclass(frozen=True)
class Path_:
    name: str
    experts: str  # transformers experts_implementation
    cache: str  # "dynamic" | "static"
    graph: bool  # decode step captured in a CUDA graph (CUDA only)
    attention: str = "sdpa"  # attention implementation used for the decode step
    compile: bool = False  # whole decode step through torch.compile (then captured), default setting only
    regional: bool = False  # RMSNorms, MoE blocks and rope compiled once, shared by all blocks (CUDA only)
    # the fused decode attention (q/k/v in one GEMV; norms, rope, cache writes in one kernel) and Triton router
    # (`fast_path.FusedModules`) in decode steps
    fused_forwards: bool = False
    # with fused_forwards: also the whole-block forwards (residual additions in the output projection's and the
    # experts' kernels, `decode_block`)
    fused_blocks: bool = False
    # the prefill with the knob engine's graphed-prefill forwards (`FusedModules.install(prefill=True)`: prompt
    # attention over the prompt's own slots, Triton norms and router); else transformers' modules
    fused_prefill: bool = False
    # with fused_blocks: the blocks' norms, router and experts' combine folded into neighbouring kernels
    # (`decode_block.FOLD_NORMS`, 8 kernels per block); False: session 8's 12
    fold_norms: bool = True
    # the Triton kernels launched with programmatic dependent launch (`knobsweep.models.pdl`)
    pdl: bool = False


PATHS = {
    "eager": Path_("eager", "eager", "dynamic", False),
    "grouped_mm": Path_("grouped_mm", "grouped_mm", "dynamic", False),
    "grouped_mm_static_graph": Path_("grouped_mm_static_graph", "grouped_mm", "static", True),
    "lean_grouped": Path_("lean_grouped", fused_moe.NAME, "dynamic", False),
    "fused_static_graph": Path_(
        "fused_static_graph", fused_moe.NAME, "static", True, gqa_attention.SPLITKV_NAME
    ),
    # transformers' attention and router around the fused experts: the knob engine's `fused_regional_graph`
    # until INFERENCE_CODE_VERSION 3
    "fused_regional_graph_tf_attention": Path_(
        "fused_regional_graph_tf_attention",
        fused_moe.NAME,
        "static",
        True,
        gqa_attention.SPLITKV_NAME,
        regional=True,
    ),
    # the fused attention and router, residual additions as kernels of their own: the knob engine's
    # `fused_regional_graph` in INFERENCE_CODE_VERSION 4
    "fused_regional_graph_separate_adds": Path_(
        "fused_regional_graph_separate_adds",
        fused_moe.NAME,
        "static",
        True,
        gqa_attention.SPLITKV_NAME,
        regional=True,
        fused_forwards=True,
    ),
    # the whole-block forwards with a kernel each for the norms, the router's logits, its softmax/top-k and the
    # experts' combine: the knob engine's `fused_regional_graph` in INFERENCE_CODE_VERSION 5-7
    "fused_regional_graph_unfolded": Path_(
        "fused_regional_graph_unfolded",
        fused_moe.NAME,
        "static",
        True,
        gqa_attention.SPLITKV_NAME,
        regional=True,
        fused_forwards=True,
        fused_blocks=True,
        fused_prefill=True,
        fold_norms=False,
    ),
    "fused_regional_graph": Path_(
        "fused_regional_graph",
        fused_moe.NAME,
        "static",
        True,
        gqa_attention.SPLITKV_NAME,
        regional=True,
        fused_forwards=True,
        fused_blocks=True,
        fused_prefill=True,
        pdl=True,
    ),
    # the knob engine's kernels launched without programmatic dependent launch (its INFERENCE_CODE_VERSION 8
    # otherwise)
    "fused_regional_graph_no_pdl": Path_(
        "fused_regional_graph_no_pdl",
        fused_moe.NAME,
        "static",
        True,
        gqa_attention.SPLITKV_NAME,
        regional=True,
        fused_forwards=True,
        fused_blocks=True,
        fused_prefill=True,
    ),
}
# Compiles for ~1.5 min per knob setting (top_k and the block list are baked in): run with --compiled, default
# setting only, after everything else.
COMPILED = Path_(
    "fused_compiled_graph", fused_moe.NAME, "static", True, gqa_attention.SPLITKV_NAME, compile=True
)


def select_settings(grid: dict[str, tuple[int, ...]]) -> list[Setting]:
    """The default cell, one-knob sweeps from it, and three mixed cells (not the full product)."""
    vt, k, b = grid["vision_tokens"], grid["top_k"], grid["active_blocks"]
    default = Setting(vt[-1], 8, b[-1])
    out = [default]
    out += [Setting(v, default.top_k, default.active_blocks) for v in vt if v != default.vision_tokens]
    out += [Setting(default.vision_tokens, x, default.active_blocks) for x in k if x != default.top_k]
    out += [Setting(default.vision_tokens, default.top_k, x) for x in b if x != default.active_blocks]
    out += [Setting(vt[0], k[0], b[0]), Setting(vt[1], 4, b[2]), Setting(vt[2], 16, b[1])]
    return out


# ----------------------------------------------------------------------------------------------- timing


def summarize(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "median_ms": statistics.median(ordered),
        "p95_ms": p95,
        "mean_ms": statistics.fmean(ordered),
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
        "n": len(ordered),
    }


def time_ms(
    fn: Callable[[], object],
    *,
    reps: int,
    warmup: int,
    device: str,
    before: Callable[[], object] | None = None,
) -> list[float]:
    """Per-repetition wall time of fn on the device (CUDA events; host clock on CPU). `before` runs untimed."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        events = []
        for _ in range(reps):
            if before:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(reps):
            if before:
                before()
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
    return samples


def measure_ceilings(device: str, tiny: bool, reps: int) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, medians over reps."""
    n_copy = (1 << 22) if tiny else (1 << 28)  # bf16 elements: 8 MiB or 512 MiB
    src = torch.randn(n_copy, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    copy = statistics.median(time_ms(lambda: dst.copy_(src), reps=reps, warmup=3, device=device))
    n = 512 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm = statistics.median(time_ms(lambda: a @ b, reps=reps, warmup=3, device=device))
    return {
        "copy_bytes_per_s": 2 * n_copy * 2 / (copy * 1e-3),
        "matmul_flop_per_s": 2 * n**3 / (mm * 1e-3),
        "copy_mib": n_copy * 2 / 2**20,
        "matmul_n": n,
    }


# ----------------------------------------------------------------------------------------------- model runs


def _deepstack_by_index(
    hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor
) -> torch.Tensor:
    """DeepStack injection with image positions given as indices (batch 1) instead of a boolean mask.

    transformers indexes with the boolean mask, which synchronises with the host and cannot be captured in a CUDA
    graph; adding at precomputed indices gives the same sums.
    """
    out = hidden_states.clone()
    out[0].index_add_(0, visual_pos_masks, visual_embeds.to(out.dtype))
    return out


class Runner:
    """Vision, prefill and decode for one model under the currently applied knobs and a chosen path."""

    def __init__(self, model, config, device: str, max_cache_len: int):
        self.model = model
        self.config = config
        self.device = device
        self.lm = model.model.language_model
        self.lm._deepstack_process = _deepstack_by_index
        self.max_cache_len = max_cache_len
        params = inspect.signature(self.lm.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        self.static_cache = None
        # the knob engine's regional compilation (inductor on CPU: slow, not needed)
        self.regional = RegionalCompile(self.lm, list(self.lm.layers)) if device == "cuda" else None
        layers = list(self.lm.layers)
        self.routers = [layer.mlp.gate for layer in layers]
        # q/k/v weights concatenated now (views: no extra memory), before any graph is captured.
        self.fused_modules = {
            blocks: FusedModules(
                layers, [layer.mlp.gate for layer in layers], blocks=blocks, final_norm=self.lm.norm
            )
            for blocks in (False, True)
        }

    # --- path selection
    def use(self, path: Path_) -> None:
        self.model.set_experts_implementation(path.experts)
        self.path = path
        pdl.ENABLED = path.pdl  # the knob engine's default on CUDA; the comparison paths without

    def set_attention(self, name: str) -> None:
        self.config.text_config._attn_implementation = name

    # --- vision
    def vision(self, inputs: PromptInputs):
        out = self.model.model.visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw)
        return out.pooler_output, list(out.deepstack_features)

    def routed_experts_per_block(self, inputs: PromptInputs, vision_embeds, deepstack) -> float:
        """Mean number of distinct experts the prompt's tokens are routed to in each active block, from one
        untimed prefill through transformers' modules (grouped_mm, dynamic cache): what a prefill must read of
        the experts' weights. A random-weights model routes unevenly (no load-balancing training), so fewer
        experts than uniform routing would hit, and a floor assuming uniform routing would be too high."""
        counts: list[int] = []

        def count(module, args, output) -> None:
            counts.append(int(torch.unique(output[2]).numel()))

        handles = [router.register_forward_hook(count) for router in self.routers]
        saved = getattr(self, "path", None)
        try:
            self.use(PATHS["grouped_mm"])
            with torch.no_grad():
                self.prefill(inputs, vision_embeds, deepstack, self.new_cache())
        finally:
            for handle in handles:
                handle.remove()
            if saved is not None:
                self.use(saved)
        return sum(counts) / len(counts)

    # --- caches
    def new_cache(self):
        if self.path.cache == "dynamic":
            return DynamicCache(config=self.config.text_config)
        if self.static_cache is None:
            self.static_cache = StaticCache(config=self.config.text_config, max_cache_len=self.max_cache_len)
        self.set_static_length(0)
        return self.static_cache

    def set_static_length(self, length: int) -> None:
        for layer in self.static_cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(length)

    @staticmethod
    def crop_dynamic(cache, length: int) -> None:
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]

    # --- prefill: embeddings with image features put in, LM over the prompt, LM head on the last token
    def prefill(
        self,
        inputs: PromptInputs,
        vision_embeds,
        deepstack,
        cache,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.lm.embed_tokens(inputs.input_ids)
        embeds[0].index_copy_(0, inputs.image_index, vision_embeds.to(embeds.dtype))
        out = self.lm(
            inputs_embeds=embeds,
            position_ids=inputs.position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            visual_pos_masks=inputs.image_index,
            deepstack_visual_embeds=deepstack,
            **{self.cache_kw: cache},
        )
        return self.model.lm_head(out.last_hidden_state[:, -1])

    # --- decode: one token at text position `position` (dynamic cache)
    def decode_once(self, token: torch.Tensor, position: int, cache) -> torch.Tensor:
        pos = torch.full((3, 1, 1), position, device=self.device, dtype=torch.long)
        out = self.lm(input_ids=token.view(1, 1), position_ids=pos, use_cache=True, **{self.cache_kw: cache})
        return self.model.lm_head(out.last_hidden_state[:, -1])


class Captured:
    """A static-cache step with fixed buffers, run directly or replayed from a CUDA graph."""

    def __init__(self, runner: Runner):
        self.r = runner
        self.logits = None
        self.graph = None

    def _forward(self) -> torch.Tensor:
        raise NotImplementedError

    def _start_length(self) -> int:
        raise NotImplementedError

    def _step(self) -> None:
        logits = self._forward()
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)

    def capture(self, use_graph: bool) -> None:
        if not use_graph:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(3):  # warm-up outside capture: allocations, compilation, autotuning, lazy inits
                self.r.set_static_length(self._start_length())
                # The last warm-up fails loudly on a host synchronisation, which would break the capture.
                torch.cuda.set_sync_debug_mode("error" if i == 2 else "default")
                try:
                    self._step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        torch.cuda.current_stream().wait_stream(stream)
        self.r.set_static_length(self._start_length())
        self.graph = torch.cuda.CUDAGraph()
        # No garbage collection during the capture: destroying an earlier setting's CUDAGraph there invalidates it
        # (as `knobsweep.models.fast_path.capture_graph` knows; one capture of 45 failed so in a session-10 run).
        gc.collect()
        gc.disable()
        try:
            with torch.cuda.graph(self.graph):
                self._step()
        finally:
            gc.enable()

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


class StaticPrefill(Captured):
    """The prompt into an empty static cache, with a causal mask over the prompt (no host synchronisation)."""

    def __init__(self, runner: Runner, inputs: PromptInputs, vision_embeds, deepstack):
        super().__init__(runner)
        self.inputs, self.vision_embeds, self.deepstack = inputs, vision_embeds, deepstack
        n = inputs.prompt_tokens
        rows = torch.arange(n, device=runner.device)[:, None]
        cols = torch.arange(runner.max_cache_len, device=runner.device)[None, :]
        self.mask = (cols <= rows).view(1, 1, n, -1)

    def _start_length(self) -> int:
        return 0

    def _forward(self) -> torch.Tensor:
        r = self.r
        fused = r.fused_modules[True] if r.path.fused_prefill else None
        if fused is not None:
            fused.install(prefill=True)  # the prompt attention relies on the empty cache (_start_length 0)
        try:
            return r.prefill(self.inputs, self.vision_embeds, self.deepstack, r.static_cache, self.mask)
        finally:
            if fused is not None:
                fused.uninstall()


class StaticDecoder(Captured):
    """One decode step over the static cache; `prepare` points it at a cache length and position."""

    def __init__(self, runner: Runner, length: int):
        super().__init__(runner)
        device = runner.device
        self.length = length  # tokens in the cache before the step
        self.token = torch.zeros(1, 1, device=device, dtype=torch.long)
        self.position = torch.zeros(3, 1, 1, device=device, dtype=torch.long)
        self.mask = torch.zeros(1, 1, 1, runner.max_cache_len, device=device, dtype=torch.bool)
        self.lm_forward = (
            torch.compile(self._lm_forward, dynamic=False) if runner.path.compile else self._lm_forward
        )
        self.prepare(0, 0, length)

    def _start_length(self) -> int:
        return self.length

    def _lm_forward(self) -> torch.Tensor:
        r = self.r
        out = r.lm(
            input_ids=self.token,
            position_ids=self.position,
            attention_mask=self.mask,
            use_cache=True,
            **{r.cache_kw: r.static_cache},
        )
        return r.model.lm_head(out.last_hidden_state[:, -1])

    def _forward(self) -> torch.Tensor:
        r = self.r
        regional = r.path.regional and r.regional is not None
        r.set_attention(r.path.attention)
        fused = r.fused_modules[r.path.fused_blocks] if r.path.fused_forwards else None
        if fused is not None:
            fused.install()
        if regional:
            r.regional.enable(fused.decode_modules() if fused is not None else set())
        decode_block.FOLD_NORMS = r.path.fold_norms
        try:
            return self.lm_forward()
        finally:
            decode_block.FOLD_NORMS = True
            if regional:
                r.regional.disable()
            if fused is not None:
                fused.uninstall()
            r.set_attention("sdpa")

    def prepare(self, token: int | torch.Tensor, position: int, length: int) -> None:
        """Point the step at cache length `length` (the new token's slot) and text position `position`."""
        self.token.copy_(torch.as_tensor(token).view(1, 1))
        self.position.fill_(position)
        self.mask.zero_()
        self.mask[..., : length + 1] = True
        self.r.set_static_length(length)


# ----------------------------------------------------------------------------------------------- one setting


def top2_margin(logits: torch.Tensor) -> float:
    top = logits.float().topk(2, dim=-1).values.flatten()
    return float(top[0] - top[1])


def greedy_tokens(
    runner: Runner, inputs: PromptInputs, vision_embeds, deepstack, steps: int, use_graph: bool
) -> tuple[list[int], torch.Tensor, list[float]]:
    """Greedy continuation under the current path: tokens, the first decode step's logits, top-1 - top-2 margins."""
    cache = runner.new_cache()
    if runner.path.cache == "static":
        prefill = StaticPrefill(runner, inputs, vision_embeds, deepstack)
        prefill.capture(use_graph)
        runner.set_static_length(0)
        prefill.run()
        logits = prefill.logits
        del prefill
    else:
        logits = runner.prefill(inputs, vision_embeds, deepstack, cache)
    tokens = [int(logits.argmax(-1))]
    margins = [top2_margin(logits)]
    first = None
    length, position = inputs.prompt_tokens, inputs.next_position
    decoder = None
    if runner.path.cache == "static":
        decoder = StaticDecoder(runner, length)
        decoder.capture(use_graph)
    for i in range(steps - 1):
        if decoder is not None:
            decoder.prepare(tokens[-1], position + i, length + i)
            decoder.run()
            logits = decoder.logits
        else:
            logits = runner.decode_once(torch.tensor(tokens[-1], device=runner.device), position + i, cache)
        if first is None:
            first = logits.float().clone()
        tokens.append(int(logits.argmax(-1)))
        margins.append(top2_margin(logits))
    del decoder
    return tokens, first, margins


def measure_setting(
    runner: Runner,
    path: Path_,
    setting: Setting,
    inputs: PromptInputs,
    vision_embeds,
    deepstack,
    *,
    reps: int,
    warmup: int,
    use_graph: bool,
    time_prefill: bool,
) -> dict:
    """Prefill and decode-step samples (ms) for one setting under one path."""
    device = runner.device
    runner.use(path)
    result: dict = {}
    length, position = inputs.prompt_tokens, inputs.next_position
    if path.cache == "dynamic":
        if time_prefill:
            holder = {}

            def fresh():
                holder["cache"] = runner.new_cache()

            result["prefill"] = time_ms(
                lambda: runner.prefill(inputs, vision_embeds, deepstack, holder["cache"]),
                reps=reps,
                warmup=warmup,
                device=device,
                before=fresh,
            )
        cache = runner.new_cache()
        token = runner.prefill(inputs, vision_embeds, deepstack, cache).argmax(-1)
        result["decode"] = time_ms(
            lambda: runner.decode_once(token, position, cache),
            reps=reps,
            warmup=warmup,
            device=device,
            before=lambda: Runner.crop_dynamic(cache, length),
        )
        return result

    runner.new_cache()
    prefill = StaticPrefill(runner, inputs, vision_embeds, deepstack)
    if time_prefill:
        try:
            prefill.capture(use_graph)
        except RuntimeError as e:  # a host sync in the prefill: time it without a graph, say so
            result["prefill_graph_error"] = f"{type(e).__name__}: {e}"[:300]
            prefill = StaticPrefill(runner, inputs, vision_embeds, deepstack)
        result["prefill"] = time_ms(
            prefill.run, reps=reps, warmup=warmup, device=device, before=lambda: runner.set_static_length(0)
        )
        result["prefill_graph"] = prefill.graph is not None
    runner.set_static_length(0)
    prefill.run()
    token = prefill.logits.argmax(-1)
    del prefill
    decoder = StaticDecoder(runner, length)
    decoder.capture(use_graph)
    decoder.prepare(token, position, length)
    result["decode"] = time_ms(
        decoder.run, reps=reps, warmup=warmup, device=device, before=lambda: runner.set_static_length(length)
    )
    result["graph"] = decoder.graph is not None
    del decoder
    return result


# ----------------------------------------------------------------------------------------------- checks


def folded_kernel_checks(t, gu: torch.Tensor, dn: torch.Tensor, device: str, g: torch.Generator) -> dict:
    """The kernels whose last program finishes the work (`decode_block.FOLD_NORMS`) against the separate
    kernels they replace, at the model's shapes, each run 50 times (a missed ordering between the programs would
    show as a run that differs): mismatching elements (must be 0) and the router weights' relative error."""
    from knobsweep.models import decode_attention, rms_norm
    from knobsweep.models import fused_moe as kernels

    e, h = t.num_experts, t.hidden_size
    out = {}
    x = torch.randn(1, h, generator=g).to(device, torch.bfloat16) * 4
    residual = torch.randn(1, h, generator=g).to(device, torch.bfloat16)
    norm_w = (1 + 0.1 * torch.randn(h, generator=g)).to(device, torch.bfloat16)
    ids = torch.randperm(e, generator=g)[:8].view(1, 8).to(device)
    w = torch.softmax(torch.randn(1, 8, generator=g), -1).to(device, torch.bfloat16)
    expected = kernels.moe_fused(x, gu, dn, ids, w, residual=residual, fold_combine=False)
    out["combine_folded_mismatches"] = sum(
        int((kernels.moe_fused(x, gu, dn, ids, w, residual=residual) != expected).sum()) for _ in range(50)
    )
    router = (torch.randn(e, h, generator=g) * 0.02).to(device, torch.bfloat16)
    normed = rms_norm.rms_norm(x, norm_w, 1e-6)
    _, weights, top = kernels.route(normed, router, 8, True)
    mismatches, errors = 0, []
    for _ in range(50):
        got_normed, got_weights, got_ids = kernels.route_normed(x, norm_w, 1e-6, router, 8, True)
        mismatches += int((got_normed != normed).sum()) + int((got_ids != top).sum())
        errors.append(float((got_weights.float() - weights.float()).norm() / weights.float().norm()))
    out["router_folded_mismatches"] = mismatches
    out["router_folded_weights_rel_err"] = max(errors)
    qkv = (torch.randn(5120, h, generator=g) * 0.02).to(device, torch.bfloat16)
    expected = decode_attention.gemv(normed, qkv)
    out["qkv_norm_folded_mismatches"] = sum(
        int((decode_attention.gemv(x, qkv, norm=(norm_w, 1e-6)) != expected).sum()) for _ in range(50)
    )
    return out


def kernel_checks(config, device: str) -> dict:
    """The Triton kernels against torch references on random inputs of the model's decode shapes (GPU only)."""
    if device != "cuda":
        return {}
    from torch.nn import functional as F

    t = config.text_config
    g = torch.Generator(device="cpu").manual_seed(1)
    out = {}
    e, h, i = t.num_experts, t.hidden_size, t.moe_intermediate_size
    gu = (torch.randn(e, 2 * i, h, generator=g) * 0.02).to(device, torch.bfloat16)
    dn = (torch.randn(e, h, i, generator=g) * 0.02).to(device, torch.bfloat16)
    for k in (1, 8, 32):
        x = torch.randn(1, h, generator=g).to(device, torch.bfloat16)
        ids = torch.randperm(e, generator=g)[:k].view(1, k).to(device)
        w = torch.softmax(torch.randn(1, k, generator=g), -1).to(device, torch.bfloat16)
        b = fused_moe.moe_reference(x, gu, dn, ids, w).float()
        for split in (False, True):
            a = fused_moe.moe_fused(x, gu, dn, ids, w, split_down=split).float()
            out[f"moe_fused_k{k}_split{split}_rel_err"] = float((a - b).norm() / b.norm())
    out.update(folded_kernel_checks(t, gu, dn, device, g))
    # The prefill's grouped experts against transformers' grouped_mm path (same GEMMs; the sum over k may add
    # in another order).
    from transformers.integrations import moe
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    with torch.device("meta"):
        experts = Qwen3VLMoeTextExperts(t)
    experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(gu), torch.nn.Parameter(dn)
    x = torch.randn(300, h, generator=g).to(device, torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=g)[:8] for _ in range(300)]).to(device)
    w = torch.softmax(torch.randn(300, 8, generator=g), -1).to(device, torch.bfloat16)
    a = fused_moe.moe_grouped(experts, x, ids, w).float()
    b = moe.grouped_mm_experts_forward(experts, x, ids, w).float()
    out["moe_grouped_t300_k8_rel_err"] = float((a - b).norm() / b.norm())
    del gu, dn, experts
    hq, hkv, d = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    for length, valid in ((1984, 1901), (320, 300)):
        q = torch.randn(1, hq, 1, d, generator=g).to(device, torch.bfloat16)
        k = torch.randn(1, hkv, length, d, generator=g).to(device, torch.bfloat16)
        v = torch.randn(1, hkv, length, d, generator=g).to(device, torch.bfloat16)
        mask = torch.zeros(length, dtype=torch.bool, device=device)
        mask[:valid] = True
        got = gqa_attention.splitkv_decode(q, k, v, mask, d**-0.5).float()
        groups = hq // hkv
        ref = F.scaled_dot_product_attention(
            q.float(),
            k.float().repeat_interleave(groups, 1),
            v.float().repeat_interleave(groups, 1),
            attn_mask=mask.view(1, 1, 1, -1),
        ).transpose(1, 2)
        out[f"splitkv_len{length}_rel_err"] = float((got - ref).norm() / ref.norm())
    out["pass"] = all(v < 2e-2 for v in out.values())
    return out


def kernel_profile(fn: Callable[[], object], warmup: int = 2, trace: Path | None = None) -> dict:
    """GPU kernels of one call of fn (a graph replay shows the graph's kernels): busy time, count, time by
    category, top kernels; the Chrome trace (kernel order and gaps) written to `trace` if given."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    kernels = []
    for evt in prof.key_averages():
        t_us = getattr(evt, "self_device_time_total", None)
        if t_us is None:
            t_us = getattr(evt, "self_cuda_time_total", 0)
        if t_us and t_us > 0:  # CPU-side ops have no self device time; kernels, copies and memsets do
            kernels.append((evt.key, evt.count, t_us / 1e3))

    def category(name: str) -> str:
        n = name.lower()
        if "gate_up_kernel" in n or "down_kernel" in n:
            return "experts (triton)"
        if "group" in n:
            return "grouped_mm"
        if "splitkv" in n or "fmha" in n or "attention" in n or "flash" in n or "efficient" in n:
            return "attention"
        if any(x in n for x in ("gemv", "gemm", "xmma", "nvjet", "cutlass", "sm90")):
            return "matmul (cuBLAS)"
        if n.startswith("triton_"):
            return "inductor fused"
        return "other (elementwise, norm, sort, copy)"

    by_cat: dict[str, list[float]] = {}
    for name, count, ms in kernels:
        c = by_cat.setdefault(category(name), [0, 0.0])
        c[0] += count
        c[1] += ms
    kernels.sort(key=lambda x: -x[2])
    return {
        "busy_ms": sum(k[2] for k in kernels),
        "kernel_launches": sum(k[1] for k in kernels),
        "by_category": {
            k: {"launches": v[0], "ms": v[1]} for k, v in sorted(by_cat.items(), key=lambda x: -x[1][1])
        },
        "top_kernels": [{"name": n[:120], "launches": c, "ms": m} for n, c, m in kernels[:40]],
    }


# ----------------------------------------------------------------------------------------------- main


def row(
    card: str,
    path: str,
    stage: str,
    setting: Setting,
    prompt_tokens: int,
    samples: list[float],
    floor: dict,
    work: dict,
) -> dict:
    stats = summarize(samples)
    out = {
        "card": card,
        "path": path,
        "stage": stage,
        "cell": setting.cell_id(),
        **asdict(setting),
        "prompt_tokens": prompt_tokens,
        **stats,
        **floor,
        "ratio": stats["median_ms"] / floor["floor_ms"],
        **work,
        "samples_ms": [round(s, 4) for s in samples],
    }
    if "flops" in work:
        out["model_tflop_s"] = work["flops"] / (stats["median_ms"] * 1e-3) / 1e12
    return out


def floors_for(
    config,
    setting: Setting,
    stage: str,
    prompt_tokens: int,
    ceilings: floors.Ceilings,
    experts_hit: float | None = None,
) -> tuple:
    """(floor, work) of a stage; prefill: `experts_hit` distinct experts read per active block (measured)."""
    if stage == "vision":
        flops = floors.vision_flops(config, setting.vision_tokens)["total"]
        nbytes = floors.vision_bytes(config, setting.vision_tokens)
    elif stage == "prefill":
        flops = floors.prefill_flops(config, setting.top_k, setting.active_blocks, prompt_tokens)["total"]
        nbytes = floors.prefill_bytes(
            config, setting.top_k, setting.active_blocks, prompt_tokens, experts_hit
        )["total"]
    else:  # decode: the new token attends to the prompt and itself
        flops = 0.0
        nbytes = floors.decode_step_bytes(config, setting.top_k, setting.active_blocks, prompt_tokens + 1)[
            "total"
        ]
    return floors.floor_ms(flops, nbytes, ceilings), {"flops": flops, "bytes": nbytes}


def check_monotone(rows: list[dict], tolerance: float) -> list[dict]:
    """Pairs of cells of one path and stage differing in one knob: the smaller knob must not be slower."""
    out = []
    keyed = {
        (r["path"], r["stage"], r["vision_tokens"], r["top_k"], r["active_blocks"]): r
        for r in rows
        if not r.get("repeat")
    }
    knobs = ("vision_tokens", "top_k", "active_blocks")
    for (path, stage, *values), r in keyed.items():
        for i, knob in enumerate(knobs):
            bigger = sorted(
                {
                    k[2 + i]
                    for k in keyed
                    if k[0] == path
                    and k[1] == stage
                    and all(k[2 + j] == values[j] for j in range(3) if j != i)
                    and k[2 + i] > values[i]
                }
            )
            if not bigger:
                continue
            other = list(values)
            other[i] = bigger[0]
            r2 = keyed[(path, stage, *other)]
            ok = r["median_ms"] <= r2["median_ms"] * (1 + tolerance)
            out.append(
                {
                    "path": path,
                    "stage": stage,
                    "knob": knob,
                    "smaller": r["cell"],
                    "larger": r2["cell"],
                    "smaller_ms": r["median_ms"],
                    "larger_ms": r2["median_ms"],
                    "monotone": ok,
                }
            )
    return out


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'card':<22} {'path':<24} {'stage':<7} {'cell':<16} {'median':>9} {'p95':>9} {'floor':>8} "
        f"{'ratio':>6} {'TFLOP/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        tf = f"{r['model_tflop_s']:8.1f}" if r.get("flops") else " " * 8
        tag = " (repeat)" if r.get("repeat") else ""
        print(
            f"{r['card'][:22]:<22} {r['path']:<24} {r['stage']:<7} {r['cell']:<16} {r['median_ms']:9.3f} "
            f"{r['p95_ms']:9.3f} {r['floor_ms']:8.3f} {r['ratio']:6.2f} {tf}{tag}"
        )


@keeps_torch_state
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny config and knob values (CPU smoke test)")
    p.add_argument("--out", type=Path, required=True, help="JSON output path")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {list(PATHS)}")
    p.add_argument(
        "--eager-settings",
        type=int,
        default=1,
        help="the eager path is slow (~0.8 s prefill): run it on the first N settings only",
    )
    p.add_argument("--max-settings", type=int, default=0, help="limit the number of settings (0: all)")
    p.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="only these cells after the default one, e.g. vt1872_k8_b16",
    )
    p.add_argument("--agree-steps", type=int, default=16, help="greedy tokens compared across paths")
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="stop starting new settings after this many seconds (the JSON is always written)",
    )
    p.add_argument("--monotone-tolerance", type=float, default=0.03)
    p.add_argument(
        "--profile",
        action="store_true",
        help="kernel-level profile of decode steps and prefill at the default setting (CUDA)",
    )
    p.add_argument(
        "--compiled-budget-s",
        type=float,
        default=380.0,
        help="start the --compiled phase only if less than this many seconds have passed",
    )
    p.add_argument(
        "--profile-traces",
        type=Path,
        default=None,
        help="with --profile: a folder for the Chrome traces of the graphed decode steps (kernel order, gaps)",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also time the torch.compile'd fused decode step at the default setting (slow to compile)",
    )
    args = p.parse_args(argv)
    t_start = time.monotonic()

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False (use --device cpu)")
    unknown = [x for x in args.paths.split(",") if x not in PATHS]
    if unknown:
        raise SystemExit(f"--paths: unknown path(s) {unknown}; choose from {list(PATHS)}")
    paths = [PATHS[x] for x in args.paths.split(",")]
    device = args.device
    use_graph = device == "cuda"
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(1)
    fused_moe.register()
    gqa_attention.register()
    gqa_attention.register_splitkv()
    if device == "cuda":
        from torch import _dynamo as dynamo

        # Regional compilation keeps one entry per (module class, shape, top_k) on Module._call_impl.
        dynamo.config.cache_size_limit = 64
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"

    ceilings_start = measure_ceilings(device, args.tiny, reps=max(args.reps, 10))
    print(
        f"[{time.monotonic() - t_start:6.1f}s] ceilings: copy {ceilings_start['copy_bytes_per_s'] / 1e12:.3f} TB/s, "
        f"matmul {ceilings_start['matmul_flop_per_s'] / 1e12:.1f} TFLOP/s",
        flush=True,
    )
    ceilings = floors.Ceilings(ceilings_start["copy_bytes_per_s"], ceilings_start["matmul_flop_per_s"])

    config = make_config(tiny=args.tiny)
    t0 = time.monotonic()
    model = build_model(config, device)
    build_s = time.monotonic() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[{time.monotonic() - t_start:6.1f}s] built model: {n_params / 1e9:.2f} B params in {build_s:.1f} s",
        flush=True,
    )

    checks = kernel_checks(config, device)
    if checks:
        print(f"[{time.monotonic() - t_start:6.1f}s] kernel checks: {checks}", flush=True)
        if not checks["pass"]:
            paths = [p_ for p_ in paths if p_.experts != fused_moe.NAME]
            print("kernel checks failed: fused paths dropped", flush=True)

    grid = GRIDS["tiny" if args.tiny else "full"]
    settings = select_settings(grid)
    if args.settings:
        unknown = sorted(set(args.settings) - {x.cell_id() for x in settings})
        if unknown:
            raise SystemExit(
                f"--settings: unknown cell(s) {unknown}; choose from {[x.cell_id() for x in settings]}"
            )
        settings = settings[:1] + [x for x in settings[1:] if x.cell_id() in args.settings]
    if args.max_settings:
        settings = settings[: args.max_settings]
    inputs = {vt: make_inputs(config, vt, device) for vt in grid["vision_tokens"]}
    # A multiple of 64 keeps the mask's rows aligned for the fused sdpa kernels.
    max_len = 64 * math.ceil((max(i.prompt_tokens for i in inputs.values()) + args.agree_steps + 8) / 64)
    runner = Runner(model, config, device, max_cache_len=max_len)
    knobs = Knobs(model)
    rows: list[dict] = []

    # Vision encoder: no experts, so one path; per vision_tokens.
    vision_out = {}
    for vt, inp in inputs.items():
        samples = time_ms(
            lambda inp=inp: runner.vision(inp), reps=args.reps, warmup=args.warmup, device=device
        )
        vision_out[vt] = runner.vision(inp)
        s = Setting(vt, knobs.default_top_k, len(knobs.original))
        floor, work = floors_for(config, s, "vision", inp.prompt_tokens, ceilings)
        rows.append(row(card, "all", "vision", s, inp.prompt_tokens, samples, floor, work))
    print(f"[{time.monotonic() - t_start:6.1f}s] vision done", flush=True)

    # Greedy agreement at the default setting (smallest vision_tokens to keep it short).
    agreement = {}
    default = settings[0]
    knobs.apply(default.top_k, default.active_blocks)
    vt_agree = grid["vision_tokens"][0]
    reference = None
    for path in paths:
        try:
            runner.use(path)
            toks, first, margins = greedy_tokens(
                runner, inputs[vt_agree], *vision_out[vt_agree], args.agree_steps, use_graph and path.graph
            )
            if reference is None:
                reference = (path.name, toks, first, margins)
            ref_name, ref_toks, ref_first, ref_margins = reference
            same = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), len(toks))
            diff = first - ref_first
            agreement[path.name] = {
                "reference": ref_name,
                "cell": Setting(vt_agree, default.top_k, default.active_blocks).cell_id(),
                "tokens": toks,
                "equal_prefix": same,
                "all_equal": toks == ref_toks,
                "first_step_logits_rel_diff": float(diff.norm() / ref_first.norm()),
                "first_step_logits_max_abs_diff": float(diff.abs().max()),
                # A greedy choice can only flip where the reference's top-1/top-2 gap is within the logit noise.
                "reference_margin_at_divergence": ref_margins[same] if same < len(ref_margins) else None,
                "reference_margins": [round(m, 4) for m in ref_margins],
            }
        except Exception as e:  # noqa: BLE001 - report it, keep measuring the other paths
            agreement[path.name] = {"error": f"{type(e).__name__}: {e}"}
    print(
        f"[{time.monotonic() - t_start:6.1f}s] agreement: "
        + ", ".join(
            f"{k}: {v.get('equal_prefix', v.get('error'))}/{args.agree_steps}" for k, v in agreement.items()
        ),
        flush=True,
    )

    errors = []

    def measure(setting: Setting, index: int, repeat: bool = False, which: list[Path_] = paths) -> None:
        keep = knobs.apply(setting.top_k, setting.active_blocks)
        inp = inputs[setting.vision_tokens]
        experts_hit = runner.routed_experts_per_block(inp, *vision_out[setting.vision_tokens])
        for path in which:
            if path.name == "eager" and index >= args.eager_settings:
                continue
            # Static paths time their prefill too (masked sdpa); the regional paths' is fused_static_graph's, but
            # for fused_regional_graph's (the knob engine's graphed prefill).
            try:
                res = measure_setting(
                    runner,
                    path,
                    setting,
                    inp,
                    *vision_out[setting.vision_tokens],
                    reps=args.reps,
                    warmup=args.warmup,
                    use_graph=use_graph and path.graph,
                    time_prefill=(not path.regional or path.fused_prefill) and not path.compile,
                )
            except Exception as e:  # noqa: BLE001 - a failing path is reported, the rest still measured
                errors.append(
                    {"path": path.name, "cell": setting.cell_id(), "error": f"{type(e).__name__}: {e}"}
                )
                print(f"  {path.name} {setting.cell_id()}: {type(e).__name__}: {e}", flush=True)
                continue
            for stage in ("prefill", "decode"):
                if stage not in res:
                    continue
                floor, work = floors_for(config, setting, stage, inp.prompt_tokens, ceilings, experts_hit)
                r = row(card, path.name, stage, setting, inp.prompt_tokens, res[stage], floor, work)
                r["kept_blocks"] = keep
                if stage == "prefill":
                    r["experts_hit_per_block"] = experts_hit
                    r["experts_hit_per_block_uniform"] = floors.expected_distinct_experts(
                        config.text_config.num_experts, setting.top_k, inp.prompt_tokens
                    )
                if stage == "decode" and path.cache == "static":
                    r["graph"] = res.get("graph", False)
                    r["compiled"] = path.compile or (path.regional and runner.regional is not None)
                if stage == "prefill" and path.cache == "static":
                    r["graph"] = res.get("prefill_graph", False)
                    if "prefill_graph_error" in res:
                        r["graph_error"] = res["prefill_graph_error"]
                if repeat:
                    r["repeat"] = True
                rows.append(r)
        if device == "cuda":
            torch.cuda.empty_cache()

    done = []
    for index, setting in enumerate(settings):
        if time.monotonic() - t_start > args.budget_s:
            print(f"budget reached: skipped {[s.cell_id() for s in settings[index:]]}", flush=True)
            break
        measure(setting, index)
        done.append(setting)
        print(f"[{time.monotonic() - t_start:6.1f}s] {setting.cell_id()} done", flush=True)

    # The default cell again, to see how far two measurements of one cell differ.
    measure(default, 0, repeat=True, which=[p_ for p_ in paths if p_.name != "eager"])
    repeatability = []
    for r2 in (r for r in rows if r.get("repeat")):
        r1 = next(
            r
            for r in rows
            if not r.get("repeat")
            and r["path"] == r2["path"]
            and r["stage"] == r2["stage"]
            and r["cell"] == r2["cell"]
        )
        repeatability.append(
            {
                "path": r2["path"],
                "stage": r2["stage"],
                "cell": r2["cell"],
                "first_ms": r1["median_ms"],
                "second_ms": r2["median_ms"],
                "rel_diff": abs(r2["median_ms"] - r1["median_ms"]) / r1["median_ms"],
            }
        )
    profiles = {}
    if args.profile and device == "cuda":
        knobs.apply(default.top_k, default.active_blocks)
        inp = inputs[default.vision_tokens]
        for path in paths:
            if path.name == "eager":
                continue
            try:
                runner.use(path)
                if path.cache == "dynamic":
                    profiles[f"{path.name} prefill"] = kernel_profile(
                        lambda: runner.prefill(inp, *vision_out[default.vision_tokens], runner.new_cache())
                    )
                    continue
                runner.new_cache()
                prefill = StaticPrefill(runner, inp, *vision_out[default.vision_tokens])
                if path.experts != fused_moe.NAME:
                    profiles[f"{path.name} prefill (not graphed)"] = kernel_profile(
                        lambda pf=prefill: (runner.set_static_length(0), pf.run())
                    )
                elif use_graph and path.graph and (not path.regional or path.fused_prefill):  # as timed
                    prefill.capture(True)
                    profiles[f"{path.name} prefill (graphed)"] = kernel_profile(
                        lambda pf=prefill: (runner.set_static_length(0), pf.run())
                    )
                    prefill.graph = None
                runner.set_static_length(0)
                prefill.run()
                token = prefill.logits.argmax(-1)
                del prefill
                decoder = StaticDecoder(runner, inp.prompt_tokens)
                decoder.prepare(token, inp.next_position, inp.prompt_tokens)
                profiles[f"{path.name} decode (not graphed)"] = kernel_profile(
                    lambda d=decoder: (runner.set_static_length(inp.prompt_tokens), d.run())
                )
                if use_graph and path.graph:
                    decoder.capture(True)
                    trace = args.profile_traces / f"{path.name}_decode.json" if args.profile_traces else None
                    profiles[f"{path.name} decode (graphed)"] = kernel_profile(
                        lambda d=decoder: (runner.set_static_length(inp.prompt_tokens), d.run()), trace=trace
                    )
                del decoder
            except Exception as e:  # noqa: BLE001 - a failing path is reported, the rest still measured
                errors.append({"path": path.name, "cell": "profile", "error": f"{type(e).__name__}: {e}"})
        for k, v in profiles.items():
            print(
                f"profile {k}: busy {v['busy_ms']:.2f} ms, {v['kernel_launches']} launches, "
                + ", ".join(f"{c} {x['ms']:.2f}" for c, x in v["by_category"].items()),
                flush=True,
            )

    ceilings_end = measure_ceilings(device, args.tiny, reps=max(args.reps, 10))
    extra = {"kernel_checks": checks, "profiles": profiles}
    result = write_result(
        args,
        card,
        device,
        model,
        config,
        n_params,
        build_s,
        ceilings_start,
        ceilings_end,
        ceilings,
        paths,
        done,
        rows,
        agreement,
        repeatability,
        errors,
        settings[0],
        t_start,
        extra,
    )

    if args.compiled:
        if time.monotonic() - t_start > args.compiled_budget_s:
            print("budget reached: compiled path skipped", flush=True)
        else:
            t0 = time.monotonic()
            compiled = COMPILED
            measure(default, 0, which=[compiled])
            print(
                f"[{time.monotonic() - t_start:6.1f}s] compiled path done ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
            paths = paths + [compiled]
            result = write_result(
                args,
                card,
                device,
                model,
                config,
                n_params,
                build_s,
                ceilings_start,
                ceilings_end,
                ceilings,
                paths,
                done,
                rows,
                agreement,
                repeatability,
                errors,
                settings[0],
                t_start,
                extra,
            )
    knobs.reset()

    print_table(rows)
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {args.out} in {result['elapsed_s']:.1f} s")
    return result


def write_result(
    args,
    card,
    device,
    model,
    config,
    n_params,
    build_s,
    ceilings_start,
    ceilings_end,
    ceilings,
    paths,
    done,
    rows,
    agreement,
    repeatability,
    errors,
    default,
    t_start,
    extra,
) -> dict:
    monotone = check_monotone(rows, args.monotone_tolerance)

    result = {
        "benchmark": "knobsweep bench/latency.py",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "card": card,
        "device": device,
        "tiny": args.tiny,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda if device == "cuda" else None,
        },
        "model": {
            "class": type(model).__name__,
            "params": n_params,
            "dtype": "bfloat16",
            "weights": "random",
            "build_s": build_s,
            "text_config": config.text_config.to_dict(),
            "vision_config": config.vision_config.to_dict(),
        },
        "method": {
            "reps": args.reps,
            "warmup": args.warmup,
            "timer": "cuda events" if device == "cuda" else "perf_counter",
            "batch": 1,
            "decode_kv_len": "prompt_tokens + 1",
            "kept_blocks": "evenly spaced incl. block 0",
            "monotone_tolerance": args.monotone_tolerance,
        },
        "ceilings": {"start": ceilings_start, "end": ceilings_end, "used": asdict(ceilings)},
        "paths": {p.name: asdict(p) for p in paths},
        "settings_measured": [s.cell_id() for s in done],
        "rows": rows,
        "agreement": agreement,
        "repeatability": repeatability,
        "monotonicity": monotone,
        "errors": errors,
        **extra,
        "elapsed_s": time.monotonic() - t_start,
    }
    result["targets"] = targets(result, default)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, args.out)
    return result


def targets(result: dict, default: Setting) -> dict:
    """The issue's targets, evaluated per path from the rows."""
    rows = [r for r in result["rows"] if not r.get("repeat")]
    out = {}
    for path in result["paths"]:
        dec = [r for r in rows if r["path"] == path and r["stage"] == "decode"]
        pre = [
            r
            for r in rows
            if r["path"] == path
            and r["stage"] == "prefill"
            and r["vision_tokens"] == default.vision_tokens
            and r["top_k"] == default.top_k
            and r["active_blocks"] == default.active_blocks
        ]
        d_default = next((r for r in dec if r["cell"] == default.cell_id()), None)
        mono = [m for m in result["monotonicity"] if m["path"] == path]
        rep = [x for x in result["repeatability"] if x["path"] == path]
        out[path] = {
            "decode_default_ratio": d_default["ratio"] if d_default else None,
            "decode_default_le_1.5x": bool(d_default and d_default["ratio"] <= 1.5),
            "decode_worst_ratio": max((r["ratio"] for r in dec), default=None),
            "decode_all_le_2.5x": bool(dec) and all(r["ratio"] <= 2.5 for r in dec),
            "prefill_default_fraction_of_matmul": (
                pre[0]["model_tflop_s"] * 1e12 / result["ceilings"]["used"]["matmul_flop_per_s"]
            )
            if pre
            else None,
            "prefill_ge_40pct": bool(pre)
            and pre[0]["model_tflop_s"] * 1e12 >= 0.4 * result["ceilings"]["used"]["matmul_flop_per_s"],
            "monotone_pairs": len(mono),
            "monotone_violations": [
                f"{m['stage']} {m['smaller']} > {m['larger']}" for m in mono if not m["monotone"]
            ],
            "repeat_max_rel_diff": max((x["rel_diff"] for x in rep), default=None),
        }
    return out


if __name__ == "__main__":
    main()
