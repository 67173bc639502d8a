"""The knob engine: one adapter around a loaded transformers MoE VLM.

Everything common to the families lives here, written once: knob application (top-k, active blocks),
vision-token budgets, the greedy generation loop with per-stage timing. A family module (see
`qwen3_vl_moe.py`) subclasses `ModelAdapter` and fills in only what differs: where the decoder layers and
routers are, which modules form the vision encoder, how many LLM tokens an image becomes.

Knob semantics
--------------
top_k
    Experts per token in every MoE layer, 1..num_experts. Applied by setting each router's `top_k`
    attribute, which the router reads at every forward; the result equals a model constructed with
    `num_experts_per_tok=top_k` and the same weights (routing weights are re-normalised over the kept
    experts exactly as the family's router does for its configured top-k).
active_blocks
    The decoder blocks kept, by original index. Every other block is replaced by `SkippedBlock`, which
    returns the hidden state unchanged; the original modules are put back by `reset()`. Attention masks,
    positions and the KV cache stay correct whichever blocks are skipped (block 0 included): the adapter's
    loop builds its cache with a no-op layer at each skipped index, and a skipped block given any other
    cache (e.g. inside `model.generate`) records a one-wide placeholder so lengths stay right.
vision_tokens
    A target T. `resize_for_tokens` resizes the image so the processor gives the largest token grid with at
    most T tokens whose aspect ratio is within `aspect_tolerance` of the image's; the processor is then given
    an image it does not resize again, and the actual count is read back from its output.

Inference paths
---------------
`set_inference_path` (or `load_model(..., inference_path=...)`) chooses how the decode steps run: the plain
DynamicCache loop (`eager`) or a static KV cache, optionally replayed from a CUDA graph and with fused decode
kernels and lean prefill experts (`fast_path.py`). The knobs, the prefill and the stage timings mean the same on
every path.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from knobsweep.models.decode_attention import cache_from_kwargs
from knobsweep.models.fast_path import FastDecoding, resolve_inference_path
from knobsweep.models.image_tokens import PlaceholderExpansion, first_difference, unsupported_reason
from knobsweep.timing import StageTimer, host_stage

STAGES = ("preprocess", "vision", "prefill", "decode", "ttft", "total")

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One request's answer and costs.

    `vision_tokens`: LLM tokens the image actually became; `prompt_tokens`: all prompt tokens (text and
    vision, padding excluded); `output_tokens`: generated tokens, the end-of-sequence token included;
    `timings_ms`: preprocess (resize + processor + copy, on the GPU under CUDA; wall clock), vision (vision encoder + projector), prefill (rest
    of the first forward, up to the first token), decode (all later tokens), ttft (preprocess + vision +
    prefill) and total (ttft + decode). In a batch every row carries the batch's timings.
    """

    text: str
    vision_tokens: int
    prompt_tokens: int
    output_tokens: int
    timings_ms: dict[str, float]
    token_ids: list[int] = field(default_factory=list)


def _token_mark(step: int) -> str:
    """The `StageTimer` mark after generated token `step` (0: the prefill's)."""
    return "prefill_end" if step == 0 else f"token_{step}"


class _RowsRunning:
    """After each generated token, whether any row of the batch still runs, read back without making the GPU
    wait for the host: each flag is copied to pinned host memory as soon as its token is computed, before the
    token's timer mark, and reading it waits for that mark only, not for steps launched since."""

    def __init__(self, max_new_tokens: int, device: torch.device, timer: StageTimer) -> None:
        self.timer = timer
        self.flags = torch.empty(max_new_tokens, dtype=torch.bool, pin_memory=device.type == "cuda")

    def record(self, step: int, unfinished: torch.Tensor) -> None:
        """Copy the flag of token `step` and mark the token on the timer."""
        self.flags[step].copy_(unfinished.any(), non_blocking=True)
        self.timer.mark(_token_mark(step))

    def after(self, step: int) -> bool:
        """Whether any row still ran after token `step`."""
        self.timer.wait(_token_mark(step))
        return bool(self.flags[step])


class KnobError(ValueError):
    """An invalid knob value (top_k, active_blocks or vision_tokens)."""


class SkippedBlock(nn.Module):
    """Stands in for a skipped decoder block: returns the hidden state unchanged.

    The adapter's own generation loop gives it a cache with a no-op layer at its index (`new_cache`). When
    someone else made the cache (e.g. `model.generate` called directly), the block records a one-wide
    placeholder key/value there, so `cache.get_seq_length()` and the mask sizes, which transformers reads
    from layer 0, stay right even when block 0 is skipped.
    """

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cache = cache_from_kwargs(kwargs)
        if cache is not None and _holds_keys(cache, self.layer_idx):
            batch, length = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, length, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return hidden_states

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class NoCacheLayer:
    """A cache layer that stores nothing (transformers' `DummyLayer` where it exists, >= 5.20).

    Not a `CacheLayerMixin`, so transformers reads sequence lengths and mask sizes from the first real
    attention layer instead."""

    is_compileable = True
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs: Any) -> None:
        self.is_initialized = True
        self.keys = self.values = None

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[None, None]:
        if key_states is None and value_states is None:
            return None, None
        raise NotImplementedError("a skipped block's cache layer cannot be updated")

    def offload(self) -> None: ...
    def prefetch(self) -> None: ...
    def reset(self) -> None: ...
    def crop(self, tokens_to_remove: int) -> None: ...
    def reorder_cache(self, beam_idx: torch.Tensor) -> None: ...
    def batch_repeat_interleave(self, repeats: int) -> None: ...
    def batch_select_indices(self, indices: torch.Tensor) -> None: ...

    def get_max_length(self) -> int:
        return -1


def _no_cache_layer() -> Any:
    from transformers import cache_utils

    return getattr(cache_utils, "DummyLayer", NoCacheLayer)()


def _holds_keys(cache: Any, layer_idx: int) -> bool:
    """Whether the cache keeps key/value tensors at `layer_idx` (not a no-op or linear-attention layer)."""
    from transformers import cache_utils

    layers = getattr(cache, "layers", None)
    if layers is None:  # e.g. an encoder-decoder wrapper: leave it alone
        return False
    if layer_idx >= len(layers):
        return True  # lazily grown cache: update() appends the layer
    layer = layers[layer_idx]
    if not isinstance(layer, cache_utils.CacheLayerMixin):
        return False
    linear = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    return not (linear is not None and isinstance(layer, linear))


def _pixel_sizes(images: Sequence[Any]) -> tuple[tuple[int, int], ...]:
    """(height, width) of each resized image, PIL or a (3, height, width) tensor: at one budget, its token grid."""
    return tuple(
        (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])
        for image in images
    )


# Memoised: a request plans its grid twice (resize, then the count check), and the search below costs ~5 ms
# of Python at 1872 tokens, inside the request's preprocess stage; images come in few sizes.
@functools.lru_cache(maxsize=4096)
def token_grid(
    width: int,
    height: int,
    vision_tokens: int,
    *,
    min_tokens: int = 1,
    aspect_tolerance: float = 0.10,
) -> tuple[int, int]:
    """(rows, cols) of the largest token grid with rows*cols <= vision_tokens and >= min_tokens whose aspect
    ratio cols/rows is within `aspect_tolerance` (relative) of width/height; ties go to the closer aspect.
    When no grid is within the tolerance (tiny budgets), the grid with the closest aspect wins (then the
    larger one)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if vision_tokens < max(min_tokens, 1):
        raise KnobError(f"vision_tokens={vision_tokens} is below the minimum {max(min_tokens, 1)}")
    aspect = width / height
    limit = math.log1p(aspect_tolerance)
    best_within: tuple[int, float, int, int] | None = None  # (count, -error, rows, cols)
    best_any: tuple[float, int, int, int] | None = None  # (-error, count, rows, cols)
    for rows in range(1, vision_tokens + 1):
        max_cols = vision_tokens // rows
        if max_cols < 1:
            break
        ideal = rows * aspect
        for cols in {
            max(1, min(max_cols, math.floor(ideal))),
            max(1, min(max_cols, math.ceil(ideal))),
            max_cols,
        }:
            count = rows * cols
            if count < min_tokens:
                continue
            error = abs(math.log(cols / rows / aspect))
            if error <= limit + 1e-12:
                candidate = (count, -error, rows, cols)
                if best_within is None or candidate > best_within:
                    best_within = candidate
            candidate_any = (-error, count, rows, cols)
            if best_any is None or candidate_any > best_any:
                best_any = candidate_any
    if best_within is not None:
        return best_within[2], best_within[3]
    if best_any is None:
        raise KnobError(f"no token grid with {min_tokens}..{vision_tokens} tokens")
    return best_any[2], best_any[3]


class ModelAdapter:
    """A loaded MoE VLM with run-time knobs. Subclasses fill in the family hooks below."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = ""
    # Relative aspect-ratio error allowed when fitting an image to a token budget.
    aspect_tolerance: float = 0.10
    # Text positions kept free of vision tokens when deriving the maximum budget from the context length.
    text_reserve_tokens: int = 256
    # Inference paths beyond `eager` this family supports (see fast_path.py): decode over a static KV cache
    # (and CUDA graphs), and the fused Triton decode experts (SiLU-gated experts stored as gate_up_proj
    # (E, 2I, H) and down_proj (E, H, I), no bias).
    supports_static_decode: ClassVar[bool] = False
    supports_fused_decode: ClassVar[bool] = False
    # The language model's prefill can be graphed (fast_path.PrefillGraph): its forward takes embeddings and
    # positions (plus Qwen3-VL's DeepStack features) and nothing else the prefill graph does not handle.
    supports_static_prefill: ClassVar[bool] = False
    # The vision encoder can run from precomputed per-grid constants and be graphed (fast_path.VisionGraph): its
    # `vision_modules()` are one transformers Qwen3-VL-style vision model taking (pixel_values, grid_thw).
    supports_vision_graph: ClassVar[bool] = False

    def __init__(self, model: nn.Module, processor: Any, path: str | Path | None = None) -> None:
        self.model = model
        self.processor = processor
        self.path = Path(path) if path is not None else None
        self._layers = self.decoder_layers()
        self._original_layers: list[nn.Module] = list(self._layers)
        self._skipped = [SkippedBlock(i) for i in range(len(self._layers))]
        self._routers = self.routers()
        if not self._routers:
            raise ValueError(f"{self.family}: found no MoE routers in the model at {self.path}")
        self.num_blocks: int = len(self._layers)
        self.num_experts: int = self.router_num_experts(self._routers[0])
        self.default_top_k: int = self.router_top_k(self._routers[0])
        self.top_k: int = self.default_top_k
        self.active_blocks: tuple[int, ...] = tuple(range(self.num_blocks))
        forward_params = inspect.signature(self.model.forward).parameters
        # transformers >= 5.20 calls the cache argument `cache`; 5.17 `past_key_values`.
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        self.inference_path: str = "eager"
        self._fast: FastDecoding | None = None
        self.logit_log: list[torch.Tensor] | None = None  # diagnostics, see _log_logits
        self._eos_tensors: dict[torch.device, torch.Tensor] = {}  # see _eos_on
        # See run_processor: the expansion once checked, the requests' image sizes it was checked at (one per budget
        # and token grid), why it is not used.
        self._expansion: PlaceholderExpansion | None = None
        self._expansion_checked: set[tuple[int, tuple[tuple[int, int], ...]]] = set()
        self._expansion_refused: str | None = unsupported_reason(processor)

    # ---- family hooks -------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: dict, path: Path) -> None:
        """Refuse a config.json this family's adapter cannot drive (before loading weights)."""

    def text_model(self) -> nn.Module:
        """The module holding the decoder layers as `.layers`."""
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model().layers

    def text_config(self) -> Any:
        return self.model.config.get_text_config(decoder=True)

    def routers(self) -> list[nn.Module]:
        """The modules whose `top_k` attribute sets the experts per token, one per MoE layer."""
        raise NotImplementedError

    def router_top_k(self, router: nn.Module) -> int:
        return int(router.top_k)

    def router_num_experts(self, router: nn.Module) -> int:
        return int(router.num_experts)

    def set_router_top_k(self, router: nn.Module, top_k: int) -> None:
        router.top_k = top_k

    def vision_modules(self) -> list[nn.Module]:
        """Modules that make up the vision encoder and projector (timed as the `vision` stage)."""
        raise NotImplementedError

    def vision_tokens_of(self, inputs: Any) -> list[int]:
        """LLM tokens per image in the processor output."""
        raise NotImplementedError

    def pixels_per_token(self) -> int:
        """Side in pixels of the square that becomes one LLM token."""
        raise NotImplementedError

    def processor_token_bounds(self) -> tuple[int, int]:
        """(min, max) vision tokens the processor accepts for one image."""
        raise NotImplementedError

    # ---- facts --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def vision_token_range(self) -> tuple[int, int]:
        """(min, max) vision tokens per image: the processor's pixel bounds, capped by the model context
        (max_position_embeddings minus `text_reserve_tokens` for the prompt text and the answer)."""
        low, high = self.processor_token_bounds()
        context = getattr(self.text_config(), "max_position_embeddings", None)
        if context:
            high = min(high, int(context) - self.text_reserve_tokens)
        return low, high

    # ---- knobs --------------------------------------------------------------------------------------
    def _check_top_k(self, top_k: Any) -> int:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise KnobError(f"top_k must be an int in 1..{self.num_experts}, got {top_k!r}")
        if not 1 <= top_k <= self.num_experts:
            raise KnobError(
                f"top_k={top_k} is out of range: this model has {self.num_experts} experts (1..{self.num_experts})"
            )
        return int(top_k)

    def _check_blocks(self, active_blocks: Any) -> tuple[int, ...]:
        if isinstance(active_blocks, (str, bytes)) or not isinstance(active_blocks, Iterable):
            raise KnobError(f"active_blocks must be a sequence of kept block indices, got {active_blocks!r}")
        blocks = list(active_blocks)
        if not blocks:
            raise KnobError("active_blocks is empty: keep at least one decoder block")
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, numbers.Integral):
                raise KnobError(f"active_blocks must hold ints, got {b!r} in {blocks}")
            if not 0 <= b < self.num_blocks:
                raise KnobError(f"active_blocks: block index {b} is out of range 0..{self.num_blocks - 1}")
        blocks = [int(b) for b in blocks]
        duplicates = sorted({b for b in blocks if blocks.count(b) > 1})
        if duplicates:
            raise KnobError(f"active_blocks: duplicate block indices {duplicates} in {blocks}")
        return tuple(sorted(blocks))

    def configure(self, top_k: int | None = None, active_blocks: Sequence[int] | None = None) -> None:
        """Set the knobs (None = the model's default for that knob: configured top-k, all blocks).

        Takes effect at once for every later forward, including `adapter.model(...)` and
        `adapter.model.generate(...)` called directly; no weights are reloaded or copied."""
        new_top_k = self.default_top_k if top_k is None else self._check_top_k(top_k)
        kept = tuple(range(self.num_blocks)) if active_blocks is None else self._check_blocks(active_blocks)
        for router in self._routers:
            self.set_router_top_k(router, new_top_k)
        kept_set = set(kept)
        for i in range(self.num_blocks):
            self._layers[i] = self._original_layers[i] if i in kept_set else self._skipped[i]
        if self._fast is not None and (new_top_k, kept) != (self.top_k, self.active_blocks):
            self._fast.clear()  # static caches and graphs bake in the skipped blocks and top-k
        self.top_k, self.active_blocks = new_top_k, kept

    def reset(self) -> None:
        """Back to the model as loaded: default top-k, every block."""
        self.configure()

    def set_inference_path(self, path: str = "auto") -> str:
        """Choose how decode steps run (see `fast_path.py`): "eager" (DynamicCache, the plain path), "static",
        "static_graph", "fused", "fused_graph", "fused_regional", "fused_regional_graph" or "auto" (the fastest
        supported path on CUDA, "eager" on CPU). Returns the path chosen. Greedy tokens and knob semantics are
        the same on every path."""
        chosen = resolve_inference_path(self, path)
        self._fast = None if chosen == "eager" else FastDecoding(self, chosen)
        self.inference_path = chosen
        return chosen

    def vision_encoder_mode(self) -> str:
        """How requests run the vision encoder on this path, for the cells' provenance: "graphed" (replayed from
        a CUDA graph per image grid, `fast_path.VisionGraph`) or "as loaded", with the reason after a colon where
        a graph could not be used."""
        return self._fast.vision_encoder_mode() if self._fast is not None else "as loaded"

    @contextmanager
    def knobs(
        self, top_k: int | None = None, active_blocks: Sequence[int] | None = None
    ) -> Iterator[ModelAdapter]:
        """`configure(...)` for the duration of a `with` block, then restore the previous setting."""
        previous = (self.top_k, self.active_blocks)
        self.configure(top_k=top_k, active_blocks=active_blocks)
        try:
            yield self
        finally:
            self.configure(top_k=previous[0], active_blocks=previous[1])

    # ---- vision tokens ------------------------------------------------------------------------------
    def check_vision_tokens(self, vision_tokens: Any) -> int:
        low, high = self.vision_token_range()
        if isinstance(vision_tokens, bool) or not isinstance(vision_tokens, int):
            raise KnobError(f"vision_tokens must be an int in {low}..{high}, got {vision_tokens!r}")
        if not low <= vision_tokens <= high:
            raise KnobError(
                f"vision_tokens={vision_tokens} is outside the valid range {low}..{high} for this model"
            )
        return vision_tokens

    def planned_grid(self, image: Image.Image, vision_tokens: int) -> tuple[int, int]:
        """(rows, cols) of LLM tokens the image will become at budget `vision_tokens`."""
        self.check_vision_tokens(vision_tokens)
        low, _ = self.vision_token_range()
        return token_grid(
            image.width, image.height, vision_tokens, min_tokens=low, aspect_tolerance=self.aspect_tolerance
        )

    def resized_size(self, image: Image.Image, vision_tokens: int) -> tuple[int, int]:
        """(width, height) in pixels of the image resized to the largest token grid with at most
        `vision_tokens` tokens (see `token_grid`)."""
        rows, cols = self.planned_grid(image, vision_tokens)
        side = self.pixels_per_token()
        return cols * side, rows * side

    def resize_for_tokens(self, image: Image.Image, vision_tokens: int) -> Image.Image:
        """The image resized to the budget's grid on the host (PIL, bicubic)."""
        return image.convert("RGB").resize(self.resized_size(image, vision_tokens), Image.Resampling.BICUBIC)

    def resize_on_device(self, image: Image.Image, vision_tokens: int) -> torch.Tensor:
        """The image resized to the budget's grid on the model's device: uint8 (3, height, width), bicubic with
        antialiasing in torchvision, as transformers' image processors resize on a device. On CUDA it computes
        in float where PIL rounds and clips between its horizontal and vertical passes: upscaled pixels differ
        from `resize_for_tokens`' by a level in ~20 % of pixels, by up to ~16 at sharp edges."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as tv

        width, height = self.resized_size(image, vision_tokens)
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).to(self.device)
        return tv.resize(pixels, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)

    def images_for_processor(self, images: Sequence[Image.Image], vision_tokens: int) -> list[Any]:
        """Each image resized to the budget, where the processor will work on it: on the device when the image
        processor runs there (`image_processor_kwargs`), else on the host. On an H200 machine the PIL resize
        took 27-41 ms of a 39-56 ms preprocess stage at 1872 tokens and was what moved between two passes of
        one cell; with the resize on the GPU the whole stage takes 7 ms (bench/preprocess.py)."""
        if "device" in self.image_processor_kwargs():
            return [self.resize_on_device(image, vision_tokens) for image in images]
        return [self.resize_for_tokens(image, vision_tokens) for image in images]

    # ---- prompts ------------------------------------------------------------------------------------
    def chat_prompt(self, prompt: str) -> str:
        """The prompt as the model's chat template renders a user turn holding the image and the text."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prepare_inputs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], vision_tokens: int
    ) -> Any:
        """Resize each image to the budget and run the processor (left padding); checks that the processor
        kept the planned grid, so the count is never above `vision_tokens`."""
        resized = self.images_for_processor(images, vision_tokens)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"
        inputs = self.run_processor(
            resized, [self.chat_prompt(p) for p in prompts], self.image_processor_kwargs(), vision_tokens
        )
        self.check_counts(images, inputs, vision_tokens)
        return inputs

    def run_processor(
        self,
        images: Sequence[Any],
        texts: Sequence[str],
        images_kwargs: dict[str, Any],
        vision_tokens: int,
    ) -> Any:
        """The processor's output for these resized images and rendered prompts (left padding). Built by
        `PlaceholderExpansion` (placeholders expanded on token ids, `image_tokens.py`) where it gave exactly the
        processor's output for a request with images of the same sizes at this budget (the same token grids); the
        first request of each such kind runs both and compares."""
        kind = (vision_tokens, _pixel_sizes(images))
        if self._expansion is not None and kind in self._expansion_checked:
            return self._expansion(images, texts, images_kwargs)
        reference = self.processor(
            images=list(images),
            text=list(texts),
            return_tensors="pt",
            padding=True,
            images_kwargs=images_kwargs,
        )
        if self._expansion_refused is None:
            self._check_expansion(reference, images, texts, images_kwargs, kind)
        return reference

    def _check_expansion(
        self,
        reference: Any,
        images: Sequence[Any],
        texts: Sequence[str],
        images_kwargs: dict[str, Any],
        kind: tuple[int, tuple[tuple[int, int], ...]],
    ) -> None:
        expansion = self._expansion or PlaceholderExpansion(self.processor, reference.keys())
        try:
            difference = first_difference(reference, expansion(images, texts, images_kwargs))
        except Exception as error:  # noqa: BLE001 - whatever breaks it, the processor's own output is used
            difference = f"{type(error).__name__}: {error}"
        if difference is None:
            self._expansion = expansion
            self._expansion_checked.add(kind)
            return
        vision_tokens, sizes = kind
        pixels = ", ".join(f"{width}x{height}" for height, width in sizes)
        self._expansion = None
        self._expansion_refused = (
            f"token-id expansion differs at {vision_tokens} vision tokens "
            f"(images of {pixels} pixels): {difference}"
        )
        log.warning(
            "%s: the processor expands image placeholders from now on; %s",
            self.family,
            self._expansion_refused,
        )

    def check_preprocessing(self, image: Image.Image, prompt: str, vision_tokens: int) -> None:
        """Prepare one request's inputs untimed, so that the check of the token-id expansion for this image's token
        grid at this budget (`run_processor`) happens before any timed request."""
        self.prepare_inputs([image], [prompt], vision_tokens)

    def preprocess_mode(self) -> str:
        """How requests run the processor's text side, for the cells' provenance: "image placeholders expanded on
        token ids" or "processor", with the reason after a colon where the expansion is not used."""
        if self._expansion is not None:
            return "image placeholders expanded on token ids"
        return f"processor: {self._expansion_refused}" if self._expansion_refused else "processor"

    def image_processor_kwargs(self) -> dict[str, Any]:
        """On CUDA the image processor's tensor work (rescale, normalise, patchify) runs on the model's device,
        and so does the resize (`images_for_processor`): on the host they were the largest and least steady
        part of a request's preprocessing. On the CPU: none."""
        if self.device.type != "cuda":
            return {}
        image_processor = getattr(self.processor, "image_processor", None)
        accepted = getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {})
        return {"device": str(self.device)} if "device" in accepted else {}

    def planned_vision_tokens(self, image: Image.Image, vision_tokens: int) -> int:
        """LLM tokens the image will become at budget `vision_tokens`."""
        rows, cols = self.planned_grid(image, vision_tokens)
        return rows * cols

    def check_counts(self, images: Sequence[Image.Image], inputs: Any, vision_tokens: int) -> None:
        """Fail loudly if the processor did not give the planned count (e.g. it resized the image again)."""
        for image, count in zip(images, self.vision_tokens_of(inputs)):
            planned = self.planned_vision_tokens(image, vision_tokens)
            if count != planned:
                raise RuntimeError(
                    f"{self.family}: the processor turned an image planned as {planned} vision tokens into "
                    f"{count}; its size bounds resized the image again"
                )

    # ---- generation ---------------------------------------------------------------------------------
    def new_cache(self) -> Any:
        """A DynamicCache with a no-op layer at every skipped block (no memory, no work per step)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        kept = set(self.active_blocks)
        skipped = [i for i in range(self.num_blocks) if i not in kept]
        if not any(_holds_keys(cache, i) for i in kept):
            # Only linear-attention blocks kept: leave one skipped attention layer real, so its SkippedBlock's
            # placeholders tell transformers the sequence length.
            keeper = next((i for i in skipped if _holds_keys(cache, i)), None)
            skipped = [i for i in skipped if i != keeper]
        for i in skipped:
            cache.layers[i] = _no_cache_layer()
        return cache

    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = getattr(self.processor, "tokenizer", self.processor).eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}

    def _eos_on(self, device: torch.device) -> torch.Tensor:
        """`eos_token_ids()` as a tensor on `device`, made once: a host-to-device copy inside the prefill's clock
        would wait for the GPU."""
        if device not in self._eos_tensors:
            self._eos_tensors[device] = torch.tensor(sorted(self.eos_token_ids()), device=device)
        return self._eos_tensors[device]

    def pad_token_id(self) -> int:
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = getattr(self.processor, "tokenizer", self.processor).pad_token_id
        return int(pad if pad is not None else min(self.eos_token_ids()))

    @contextmanager
    def _timed_vision(self, timer: StageTimer) -> Iterator[None]:
        """Mark `vision_start` before the first vision module runs and `vision_end` after the last."""
        handles = []
        modules = self.vision_modules()
        handles.append(modules[0].register_forward_pre_hook(lambda *_: timer.mark("vision_start")))
        handles.append(modules[-1].register_forward_hook(lambda *_: timer.mark("vision_end")))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def generate(
        self, image: Image.Image, prompt: str, *, vision_tokens: int, max_new_tokens: int
    ) -> GenerationResult:
        """Greedy answer to one (image, prompt) request at batch 1."""
        return self.generate_batch(
            [image], [prompt], vision_tokens=vision_tokens, max_new_tokens=max_new_tokens
        )[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        *,
        vision_tokens: int,
        max_new_tokens: int,
    ) -> list[GenerationResult]:
        """Greedy answers for a left-padded batch: one prefill forward (vision encoder inside it, timed by
        hooks), then one forward per new token with the KV cache. Equals `model.generate(do_sample=False)`."""
        if len(images) != len(prompts) or not images:
            raise ValueError(
                f"generate_batch needs as many images as prompts (>0), got {len(images)} and {len(prompts)}"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self.check_vision_tokens(vision_tokens)
        device, timings = self.device, {}
        with host_stage(device, timings, "preprocess"):
            processed = self.prepare_inputs(images, prompts, vision_tokens)
            counts = self.vision_tokens_of(processed)
            position_ids = self.prompt_positions(processed).to(device, non_blocking=True)
            inputs = self.move_inputs(processed)

        timer = StageTimer(device)
        generated = self._greedy(inputs, position_ids, max_new_tokens, timer, processed)
        vision_ms = timer.elapsed_ms("vision_start", "vision_end") if timer.has("vision_start") else 0.0
        timings["vision"] = vision_ms
        timings["prefill"] = timer.elapsed_ms("prefill_start", "prefill_end") - vision_ms
        # Up to the step that gave the last row its last token (a step launched ahead after that is not counted).
        last_token = max(len(ids) for ids in generated) - 1
        timings["decode"] = timer.elapsed_ms("prefill_end", _token_mark(last_token))
        timings["ttft"] = timings["preprocess"] + timings["vision"] + timings["prefill"]
        timings["total"] = timings["ttft"] + timings["decode"]

        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, ids in enumerate(generated):
            text_ids = [t for t in ids if t not in self.eos_token_ids()]
            results.append(
                GenerationResult(
                    text=tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                    vision_tokens=int(counts[row]),
                    prompt_tokens=int(prompt_tokens[row]),
                    output_tokens=len(ids),
                    timings_ms=dict(timings),
                    token_ids=list(ids),
                )
            )
        return results

    def prompt_positions(self, inputs: Any) -> torch.Tensor:
        """The prompt's position ids as `generate()` computes them (3D M-RoPE for the Qwen families), from the
        processor's output before it moves to the device: its token types and image grids are host tensors there,
        where on the device the same computation waits for the GPU ~11 times a request (`.tolist()`, `.item()`)."""
        tensors = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        extra = {key: value for key, value in tensors.items() if key != "input_ids"}
        return self.model._prepare_position_ids_for_generation(tensors["input_ids"], extra)

    def move_inputs(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Processor output as a dict of tensors on the model's device, floating tensors in its dtype."""
        moved = {}
        for key, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            value = value.to(self.device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(self.dtype)
            moved[key] = value
        return moved

    def _greedy(
        self,
        inputs: dict[str, torch.Tensor],
        position_ids: torch.Tensor,
        max_new_tokens: int,
        timer: StageTimer,
        processed: Any,
    ) -> list[list[int]]:
        """Token ids per row, each up to and including its first eos. Marks `prefill_start`, `prefill_end` (token
        0) and `_token_mark(s)` after decode step s on `timer`. `processed`: the processor's output before the move
        to the device (`inputs`), where the fast path reads the image grids without waiting for the GPU."""
        model = self.model
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        batch = input_ids.shape[0]
        # A fast path's decoder (static cache, CUDA graph) is set up before the prefill's clock starts: a
        # one-off per knob setting and cache length, like loading the model.
        decoder = (
            self._fast.decoder(inputs, position_ids, max_new_tokens)
            if self._fast and max_new_tokens > 1
            else None
        )
        static_prefill = decoder is not None and decoder.prepare_prefill(inputs, processed)
        # The vision encoder's graph for this image grid, likewise. It stands in for the vision forward, so the
        # grid's one other reader in the prefill (transformers' split of the features per image) gets the host
        # copy: no wait for the GPU there.
        if self._fast and self._fast.prepare_vision(inputs, processed):
            inputs = {**inputs, "image_grid_thw": processed["image_grid_thw"]}
        eos = self._eos_on(input_ids.device)
        timer.mark("prefill_start")  # the cache's set-up is part of the prefill
        pad = self.pad_token_id()
        cache = self.new_cache()
        prefill_kernels = self._fast.prefill_kernels(decoder) if self._fast else nullcontext()
        with self._timed_vision(timer), prefill_kernels:
            out = model(
                **inputs,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: cache},
            )
        logits = out.logits[:, -1, :]
        self._log_logits(logits)
        next_tokens = logits.argmax(dim=-1)
        if static_prefill:
            decoder.admit_prompt(attention_mask)  # the graphed prefill wrote into the static cache
        elif decoder is not None:
            decoder.load_prefill(cache, attention_mask)
            del cache
        tokens = [next_tokens]
        unfinished = ~torch.isin(next_tokens, eos)
        running = _RowsRunning(max_new_tokens, input_ids.device, timer)
        running.record(0, unfinished)  # marks prefill_end
        ahead = self._decode_steps_ahead(input_ids.device)
        last_position = position_ids[..., -1:]
        step = 0
        with decoder.kernels() if decoder is not None else nullcontext():
            while step + 1 < max_new_tokens:
                if step >= ahead and not running.after(step - ahead):
                    break
                step += 1
                if decoder is not None:
                    logits = decoder.step(next_tokens, last_position + step, step)
                else:
                    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
                    out = model(
                        input_ids=next_tokens[:, None],
                        attention_mask=attention_mask,
                        position_ids=last_position + step,
                        use_cache=True,
                        **{self._cache_arg: cache},
                    )
                    logits = out.logits[:, -1, :]
                self._log_logits(logits)
                next_tokens = logits.argmax(dim=-1)
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
                tokens.append(next_tokens)
                unfinished = unfinished & ~torch.isin(next_tokens, eos)
                running.record(step, unfinished)

        eos_ids, generated = self.eos_token_ids(), []
        for row in torch.stack(tokens, dim=1).tolist():
            ids = []
            for t in row:
                ids.append(t)
                if t in eos_ids:
                    break
            generated.append(ids)
        return generated

    def _decode_steps_ahead(self, device: torch.device) -> int:
        """How many decode steps the loop launches before it reads whether any row still runs. On CUDA one: it
        decides on step s from the rows running after token s - 2 while step s - 1 is in flight, so the GPU does
        not wait for the host between steps (on an H200 each step had waited 40-65 us for it); a step
        launched after every row has finished only writes padding and falls outside the decode stage's clock.
        On the CPU, and while diagnostics log every step's logits, none: no step is computed in vain."""
        return 1 if device.type == "cuda" and self.logit_log is None else 0

    def _log_logits(self, logits: torch.Tensor) -> None:
        """Diagnostics (`logit_log` set to a list): every step's logits, float32 on the CPU. Synchronises."""
        if self.logit_log is not None:
            self.logit_log.append(logits.detach().float().cpu())
