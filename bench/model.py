"""Random-weight Qwen3-VL-MoE models for the latency benchmark, their synthetic inputs, and knob application.

The real weights cannot be downloaded here, and latency does not depend on weight values (only routing does, a
little), so the benchmark builds `Qwen3VLMoeForConditionalGeneration` from a transcribed config with random
bf16 weights directly on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

# Qwen/Qwen3-VL-30B-A3B-Instruct config.json, transcribed (text: Qwen3-30B-A3B shape with interleaved M-RoPE;
# vision: the Qwen3-VL SigLIP-2-style tower shared by the family, projecting to the LM's hidden size).
QWEN3_VL_30B_A3B = {
    "text_config": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": 151936,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    },
    "vision_config": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}

# A few-MB stand-in with the same structure, for CPU tests (32 experts so top_k up to 32 is valid).
TINY = {
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 32,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "vocab_size": 256,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
    },
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    },
    "image_token_id": 250,
    "video_token_id": 251,
    "vision_start_token_id": 252,
    "vision_end_token_id": 253,
    "tie_word_embeddings": False,
}


def make_config(tiny: bool = False, initializer_range: float = 0.02) -> Qwen3VLMoeConfig:
    spec = TINY if tiny else QWEN3_VL_30B_A3B
    config = Qwen3VLMoeConfig(**spec)
    config.text_config.initializer_range = initializer_range
    config.vision_config.initializer_range = initializer_range
    config.initializer_range = initializer_range
    return config


def build_model(config: Qwen3VLMoeConfig, device: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Construct the model directly on `device` in `dtype` (fp32 construction of the real size does not fit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3VLMoeForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    # HF initialises rotary inverse frequencies in the default dtype; keep them fp32 as from_pretrained would.
    for module in model.modules():
        if hasattr(module, "inv_freq") and isinstance(module.inv_freq, torch.Tensor):
            module.inv_freq = module.inv_freq.float()
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = module.original_inv_freq.float()
    return model.eval().requires_grad_(False)


def vision_grid(vision_tokens: int) -> tuple[int, int]:
    """(rows, cols) of merged tokens with rows*cols == vision_tokens, as square as possible."""
    if vision_tokens < 1:
        raise ValueError(f"vision_tokens must be >= 1, got {vision_tokens}")
    rows = max(r for r in range(1, math.isqrt(vision_tokens) + 1) if vision_tokens % r == 0)
    return rows, vision_tokens // rows


@dataclass
class PromptInputs:
    """One synthetic image + question, as the model sees it after the processor."""

    input_ids: torch.Tensor  # (1, L)
    pixel_values: torch.Tensor  # (patches, patch_dim)
    image_grid_thw: torch.Tensor  # (1, 3)
    position_ids: torch.Tensor  # (3, 1, L) M-RoPE positions
    next_position: int  # text position of the first generated token
    image_mask: torch.Tensor  # (1, L) bool
    image_index: torch.Tensor  # (vision_tokens,) positions of the image tokens

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def make_inputs(
    config: Qwen3VLMoeConfig, vision_tokens: int, device: str, text_tokens: int = 24, seed: int = 0
) -> PromptInputs:
    """A chat-shaped prompt: a few text tokens, <vision_start>, vision_tokens image pads, <vision_end>, question.

    M-RoPE positions follow Qwen3-VL's rule for one image: text positions count up; image tokens get
    (t, row, col) offsets from the position after the preceding text; text after the image resumes at
    1 + the largest image position.
    """
    v = config.vision_config
    rows, cols = vision_grid(vision_tokens)
    merge = v.spatial_merge_size
    grid = torch.tensor([[1, rows * merge, cols * merge]], device=device)
    patches = rows * cols * merge * merge
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pixel_values = torch.randn(patches, patch_dim, generator=gen).to(device=device, dtype=torch.bfloat16)

    vocab = config.text_config.vocab_size
    special = {
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
    }
    text_ids = [
        i for i in torch.randint(0, vocab, (4 * text_tokens,), generator=gen).tolist() if i not in special
    ]
    before, after = text_ids[:4], text_ids[4:text_tokens]
    ids = (
        before
        + [config.vision_start_token_id]
        + [config.image_token_id] * vision_tokens
        + [config.vision_end_token_id]
        + after
    )
    input_ids = torch.tensor([ids], device=device)

    n_before = len(before) + 1
    pos = [[p, p, p] for p in range(n_before)]
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    pos += [[n_before, n_before + int(a), n_before + int(b)] for a, b in zip(r, c)]
    start = n_before + max(rows, cols)
    pos += [[start + j] * 3 for j in range(len(after) + 1)]
    position_ids = torch.tensor(pos, device=device).T.reshape(3, 1, -1)
    return PromptInputs(
        input_ids=input_ids,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        position_ids=position_ids,
        next_position=start + len(after) + 1,
        image_mask=input_ids == config.image_token_id,
        image_index=(input_ids[0] == config.image_token_id).nonzero().flatten(),
    )


class PassThrough(nn.Module):
    """Stands in for a skipped decoder block: returns the hidden state unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def kept_blocks(num_blocks: int, active_blocks: int) -> list[int]:
    """Evenly spaced block indices, always including block 0 (the cache reads sequence lengths from layer 0).

    Which blocks are kept does not change the cost of a step; the study keeps the top-N by importance.
    """
    if not 1 <= active_blocks <= num_blocks:
        raise ValueError(f"active_blocks={active_blocks} outside 1..{num_blocks}")
    if active_blocks == 1:
        return [0]
    return sorted({round(i * (num_blocks - 1) / (active_blocks - 1)) for i in range(active_blocks)})


class Knobs:
    """Applies top_k (router attribute on every block) and active blocks (pass-through at skipped indices)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = model.model.language_model.layers
        self.original = list(self.layers)
        self.default_top_k = self.original[0].mlp.gate.top_k

    def apply(self, top_k: int, active_blocks: int) -> list[int]:
        num_experts = self.original[0].mlp.gate.num_experts
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} outside 1..{num_experts}")
        keep = kept_blocks(len(self.original), active_blocks)
        for i, layer in enumerate(self.original):
            layer.mlp.gate.top_k = top_k
            self.layers[i] = layer if i in keep else PassThrough()
        return keep

    def reset(self) -> None:
        self.apply(self.default_top_k, len(self.original))
