"""ERNIE-4.5-VL-MoE (`ernie4_5_vl_moe`, e.g. ERNIE-4.5-VL-28B-A3B): what differs from the base adapter.

- Decoder layers: `model.model.language_model.layers`; the first block is dense, the others MoE with
  modality-isolated experts: text tokens go to `mlp.text_moe`, image tokens to `mlp.vision_moe`, each with
  its own router (`.gate.top_k`), plus always-on shared experts. The `top_k` knob sets BOTH routers (the
  config's single `moe_k` does the same), so it equals a model built with `moe_k=top_k`.
- Vision: `vision_tower` (ViT) + `resampler_model` (spatial merge + projection); one LLM token per 28x28 px
  (patch 14, merge 2), count = prod(image_grid_thw) / 4. No DeepStack.
"""

from __future__ import annotations

from torch import nn

from knobsweep.models.qwen3_vl_moe import QwenVisionGridAdapter


class Ernie45VLMoeAdapter(QwenVisionGridAdapter):
    family = "ernie4_5_vl_moe"
    model_types = ("ernie4_5_vl_moe",)
    model_class = "Ernie4_5_VLMoeForConditionalGeneration"
    supports_static_decode = True
    supports_fused_decode = True

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def routers(self) -> list[nn.Module]:
        return [
            getattr(layer.mlp, experts).gate
            for layer in self.decoder_layers()
            for experts in ("text_moe", "vision_moe")
            if hasattr(layer.mlp, experts)
        ]

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.model.vision_tower, self.model.model.resampler_model]
