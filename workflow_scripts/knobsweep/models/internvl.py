"""InternVL with a Qwen3-MoE language model (`internvl`, text_config.model_type `qwen3_moe`, e.g.
InternVL3.5-30B-A3B in its transformers format): what differs from the base adapter.

- Decoder layers: `model.model.language_model.layers` (Qwen3-MoE); routers: `layer.mlp.gate` (reads
  `top_k` at every forward; re-normalises the kept experts' weights when the config's `norm_topk_prob`
  is true, as a model built with that top-k does).
- Vision: InternViT (`vision_tower`) + pixel-shuffle MLP (`multi_modal_projector`). An image becomes
  square tiles of `image_size` px, each `image_seq_length` tokens, plus a thumbnail tile when there is
  more than one tile: tokens = image_seq_length * (n + [n > 1]). The budget therefore moves in whole
  tiles. For a target T we choose the largest (rows x cols) tile grid within budget near the image's
  aspect ratio, resize the image to exactly that many tiles and tell the processor to use exactly n tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from knobsweep.models.base import KnobError, ModelAdapter, token_grid


class InternVLMoeAdapter(ModelAdapter):
    family = "internvl"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"
    supports_static_decode = True
    supports_fused_decode = True
    # Its language model takes embeddings only (no DeepStack): the graphed prefill needs no image buffers.
    supports_static_prefill = True

    @classmethod
    def check_config(cls, config: dict, path: Path) -> None:
        text_type = (config.get("text_config") or {}).get("model_type")
        if text_type != "qwen3_moe":
            raise ValueError(
                f"load_model: {path}: InternVL is supported with a qwen3_moe language model only; "
                f"config.json field text_config.model_type is {text_type!r}"
            )

    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    def routers(self) -> list[nn.Module]:
        return [layer.mlp.gate for layer in self.decoder_layers() if hasattr(layer.mlp, "gate")]

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]

    # ---- tiles --------------------------------------------------------------------------------------
    def tokens_per_tile(self) -> int:
        return int(self.processor.image_seq_length)

    def tile_pixels(self) -> int:
        return int(self.processor.image_processor.size["height"])

    def processor_token_bounds(self) -> tuple[int, int]:
        max_tiles = int(self.processor.image_processor.max_patches)
        return self.tokens_per_tile(), self.tokens_per_tile() * (max_tiles + (1 if max_tiles > 1 else 0))

    def planned_grid(self, image: Image.Image, vision_tokens: int) -> tuple[int, int]:
        """(rows, cols) of tiles: the largest grid whose tokens (with the thumbnail) fit `vision_tokens`."""
        self.check_vision_tokens(vision_tokens)
        units = vision_tokens // self.tokens_per_tile()
        max_tiles = int(self.processor.image_processor.max_patches)
        if units < 3:  # two tiles would need a thumbnail too: three tiles' worth of tokens
            return 1, 1
        return token_grid(
            image.width, image.height, min(units - 1, max_tiles), aspect_tolerance=self.aspect_tolerance
        )

    def planned_vision_tokens(self, image: Image.Image, vision_tokens: int) -> int:
        rows, cols = self.planned_grid(image, vision_tokens)
        tiles = rows * cols
        return self.tokens_per_tile() * (tiles + (1 if tiles > 1 else 0))

    def resized_size(self, image: Image.Image, vision_tokens: int) -> tuple[int, int]:
        rows, cols = self.planned_grid(image, vision_tokens)
        side = self.tile_pixels()
        return cols * side, rows * side

    def vision_tokens_of(self, inputs: Any) -> list[int]:
        return (inputs["input_ids"] == self.model.config.image_token_id).sum(dim=1).tolist()

    def prepare_inputs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], vision_tokens: int
    ) -> Any:
        """One processor call per image (each with exactly its planned number of tiles), then left padding."""
        if not images:
            raise KnobError("prepare_inputs needs at least one image")
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        rows = []
        for image, prompt in zip(images, prompts):
            grid = self.planned_grid(image, vision_tokens)
            tiles = grid[0] * grid[1]
            rows.append(
                self.run_processor(
                    self.images_for_processor([image], vision_tokens),
                    [self.chat_prompt(prompt)],
                    # crop_to_patches: the processor's default, which its image processor alone does not share.
                    {
                        "crop_to_patches": True,
                        "min_patches": tiles,
                        "max_patches": tiles,
                        **self.image_processor_kwargs(),
                    },
                    vision_tokens,
                )
            )
        padded = tokenizer.pad(
            {"input_ids": [r["input_ids"][0].tolist() for r in rows]}, padding=True, return_tensors="pt"
        )
        inputs = {
            "input_ids": padded["input_ids"],
            "attention_mask": padded["attention_mask"],
            "pixel_values": torch.cat([r["pixel_values"] for r in rows], dim=0),
        }
        self.check_counts(images, inputs, vision_tokens)
        return inputs
