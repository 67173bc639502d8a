"""Qwen3.5-MoE (`qwen3_5_moe`, e.g. Qwen3.5-35B-A3B): what differs from the base adapter.

- Hybrid decoder: every 4th block full attention, the others Gated DeltaNet (linear attention with a
  recurrent state); each block's MoE has a router `mlp.gate` (top-k re-normalised) plus a shared expert
  that is always on (top-k does not touch it).
- Skipping a linear-attention block skips its recurrent-state update too: the pruned model simply has no
  such block. No DeepStack.
- Vision: the Qwen3-VL encoder and processor (one LLM token per 32x32 px).
- Inference path: `eager` only. The fast paths' static cache holds keys/values but not the Gated DeltaNet
  recurrent and convolution states the prefill leaves behind (copying those is not implemented).
"""

from __future__ import annotations

from torch import nn

from knobsweep.models.qwen3_vl_moe import QwenVisionGridAdapter


class Qwen35MoeAdapter(QwenVisionGridAdapter):
    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)
    model_class = "Qwen3_5MoeForConditionalGeneration"

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def routers(self) -> list[nn.Module]:
        return [layer.mlp.gate for layer in self.decoder_layers() if hasattr(layer.mlp, "gate")]

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.model.visual]
