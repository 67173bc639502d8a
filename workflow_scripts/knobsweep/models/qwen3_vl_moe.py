"""Qwen3-VL-MoE (`qwen3_vl_moe`, e.g. Qwen3-VL-30B-A3B-Instruct): what differs from the base adapter.

- Decoder layers: `model.model.language_model.layers`; routers: `layer.mlp.gate` (reads `top_k` at every
  forward; always re-normalises the kept experts' weights, so top-1 gives weight 1).
- Vision: `model.model.visual` (ViT + merger + DeepStack mergers); one LLM token per
  (patch_size * spatial_merge_size)^2 pixels (32x32 px), count = prod(image_grid_thw) / merge^2.

DeepStack and skipped blocks
----------------------------
Qwen3-VL adds visual features from intermediate vision layers to the hidden state of the image tokens
right after decoder layers 0..len(deepstack_visual_indexes)-1 (by position in the layer list). A skipped
block keeps its place in the list, so each injection stays attached to its ORIGINAL depth: the result
equals a physically pruned model that injects after the same original layer indices. If an injection
layer itself is skipped, its features are still added at that depth, to the hidden state that passes
through (e.g. with block 0 skipped, the first DeepStack features are added to the input embeddings of
the image tokens before the first kept block). The visual features are never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image
from torch import nn

from knobsweep.models.base import ModelAdapter


class QwenVisionGridAdapter(ModelAdapter):
    """Shared by the Qwen families whose processor turns an image into a (rows x cols) token grid."""

    def _image_processor(self) -> Any:
        return self.processor.image_processor

    def pixels_per_token(self) -> int:
        ip = self._image_processor()
        return int(ip.patch_size) * int(ip.merge_size)

    def processor_token_bounds(self) -> tuple[int, int]:
        ip, area = self._image_processor(), self.pixels_per_token() ** 2
        size = ip.size
        min_pixels = (
            size.get("shortest_edge", size.get("min_pixels"))
            if isinstance(size, dict)
            else size.shortest_edge
        )
        max_pixels = (
            size.get("longest_edge", size.get("max_pixels")) if isinstance(size, dict) else size.longest_edge
        )
        return max(1, math.ceil(min_pixels / area)), max_pixels // area

    def vision_tokens_of(self, inputs: Any) -> list[int]:
        merge = int(self._image_processor().merge_size)
        return (inputs["image_grid_thw"].prod(dim=-1) // merge**2).tolist()

    def check_counts(self, images: Sequence[Image.Image], inputs: Any, vision_tokens: int) -> None:
        """Also: each prompt holds one image placeholder per vision token, which transformers checks again on the
        device where the graph paths do not (`fast_path.placeholder_masks`). One image per prompt."""
        super().check_counts(images, inputs, vision_tokens)
        placeholders = (inputs["input_ids"] == self.model.config.image_token_id).sum(dim=1).tolist()
        for row, (count, expected) in enumerate(
            zip(placeholders, self.vision_tokens_of(inputs), strict=True)
        ):
            if count != expected:
                raise RuntimeError(
                    f"{self.family}: prompt {row} holds {count} image placeholder tokens for an image of "
                    f"{expected} vision tokens (the chat template or the processor's expansion of the image token)"
                )


class Qwen3VLMoeAdapter(QwenVisionGridAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    model_class = "Qwen3VLMoeForConditionalGeneration"
    supports_static_decode = True
    supports_fused_decode = True
    supports_static_prefill = True
    supports_vision_graph = True

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def routers(self) -> list[nn.Module]:
        return [layer.mlp.gate for layer in self.decoder_layers() if hasattr(layer.mlp, "gate")]

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.model.visual]
