"""Analytic byte and FLOP counts of one Qwen3-VL-MoE forward, per knob setting, and the floors they imply.

Floors are lower bounds on time: a decode step at batch 1 must at least read the weights it touches (and the
KV cache) once, so its floor is bytes / measured copy bandwidth; a prefill or vision pass must at least do its
matrix FLOPs, so its floor is FLOPs / measured matmul rate (we also report the byte term, and the floor is the
larger of the two). Element-wise work (norms, rope, softmax, activations) is not counted: it moves few bytes
and does few FLOPs next to the projections.

Counts are read from a `transformers` Qwen3-VL-MoE config (`Qwen3VLMoeConfig` or any object with the same
`text_config` / `vision_config` fields), so the unit test can check them by hand on a tiny config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BF16_BYTES = 2


@dataclass(frozen=True)
class TextShape:
    """The language model's sizes, in the config's own names."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    moe_intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> TextShape:
        text = getattr(config, "text_config", config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            hidden_size=text.hidden_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            head_dim=head_dim,
            num_experts=text.num_experts,
            moe_intermediate_size=text.moe_intermediate_size,
            vocab_size=text.vocab_size,
        )

    # --- parameter counts (elements) ---
    @property
    def attention_params(self) -> int:
        """q, k, v, o projections (no bias) plus the per-head q/k RMSNorm weights."""
        h, d = self.hidden_size, self.head_dim
        q = h * self.num_attention_heads * d
        kv = 2 * h * self.num_key_value_heads * d
        o = self.num_attention_heads * d * h
        return q + kv + o + 2 * d

    @property
    def block_norm_params(self) -> int:
        """input_layernorm and post_attention_layernorm."""
        return 2 * self.hidden_size

    @property
    def router_params(self) -> int:
        return self.num_experts * self.hidden_size

    @property
    def expert_params(self) -> int:
        """One expert: gate_up_proj (2I x H) and down_proj (H x I)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def kv_bytes_per_token_per_block(self) -> int:
        return 2 * self.num_key_value_heads * self.head_dim * BF16_BYTES


@dataclass(frozen=True)
class VisionShape:
    depth: int
    hidden_size: int
    intermediate_size: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_deepstack: int
    num_position_embeddings: int

    @classmethod
    def from_config(cls, config: Any) -> VisionShape:
        v = config.vision_config
        return cls(
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            in_channels=v.in_channels,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            out_hidden_size=v.out_hidden_size,
            num_deepstack=len(v.deepstack_visual_indexes),
            num_position_embeddings=v.num_position_embeddings,
        )

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def block_params(self) -> int:
        """qkv + proj (with bias) and the two-layer MLP (with bias); LayerNorms counted too."""
        w, i = self.hidden_size, self.intermediate_size
        return (3 * w * w + 3 * w) + (w * w + w) + (w * i + i) + (i * w + w) + 4 * w

    def merger_params(self, postshuffle_norm: bool) -> int:
        """One patch merger: LayerNorm (over W, or over 4W after the shuffle), fc1 (4W -> 4W), fc2 (4W -> out)."""
        m = self.hidden_size * self.spatial_merge_size**2
        norm = 2 * (m if postshuffle_norm else self.hidden_size)
        return norm + (m * m + m) + (m * self.out_hidden_size + self.out_hidden_size)

    @property
    def params(self) -> int:
        """Every vision-encoder parameter: patch embedding (Conv3d with bias), position table, blocks, mergers."""
        return (
            self.patch_dim * self.hidden_size
            + self.hidden_size
            + self.num_position_embeddings * self.hidden_size
            + self.depth * self.block_params
            + self.merger_params(postshuffle_norm=False)
            + self.num_deepstack * self.merger_params(postshuffle_norm=True)
        )


def decode_step_bytes(config: Any, top_k: int, active_blocks: int, kv_len: int) -> dict[str, int]:
    """Bytes one decode step (one new token, batch 1) must read at least once, by part.

    kv_len: cache length the new token attends to (including itself). The embedding table is read for one row
    only; the LM head is read whole. Experts: top_k distinct experts per active block.
    """
    t = TextShape.from_config(config)
    if not 1 <= top_k <= t.num_experts:
        raise ValueError(f"top_k={top_k} outside 1..{t.num_experts}")
    if not 1 <= active_blocks <= t.num_hidden_layers:
        raise ValueError(f"active_blocks={active_blocks} outside 1..{t.num_hidden_layers}")
    parts = {
        "attention": active_blocks * t.attention_params * BF16_BYTES,
        "norms": (active_blocks * t.block_norm_params + t.hidden_size) * BF16_BYTES,
        "router": active_blocks * t.router_params * BF16_BYTES,
        "experts": active_blocks * top_k * t.expert_params * BF16_BYTES,
        "embedding_row": t.hidden_size * BF16_BYTES,
        "lm_head": t.lm_head_params * BF16_BYTES,
        "kv_cache": active_blocks * kv_len * t.kv_bytes_per_token_per_block(),
    }
    parts["total"] = sum(parts.values())
    return parts


def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of experts hit at least once when each token picks top_k distinct experts uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def prefill_flops(config: Any, top_k: int, active_blocks: int, prompt_tokens: int) -> dict[str, float]:
    """Matrix FLOPs (2 per multiply-add) of a batch-1 LM prefill of prompt_tokens tokens, by part.

    Causal attention counts the lower triangle (L(L+1)/2 query-key pairs) for QK^T and PV. The LM head runs on the
    last position only (what generation needs).
    """
    t = TextShape.from_config(config)
    n = prompt_tokens
    proj = t.attention_params - 2 * t.head_dim  # norm weights do no matmul
    pairs = n * (n + 1) / 2
    parts = {
        "attention_proj": active_blocks * 2.0 * n * proj,
        "attention_scores": active_blocks * 2.0 * 2.0 * t.num_attention_heads * t.head_dim * pairs,
        "router": active_blocks * 2.0 * n * t.router_params,
        "experts": active_blocks * 2.0 * n * top_k * t.expert_params,
        "lm_head": 2.0 * t.lm_head_params,
    }
    parts["total"] = sum(parts.values())
    return parts


def prefill_bytes(
    config: Any, top_k: int, active_blocks: int, prompt_tokens: int, experts_hit: float | None = None
) -> dict[str, float]:
    """Weight and KV bytes a prefill must move at least once. Experts: `experts_hit` distinct experts per
    active block (measured: a random-weights model routes unevenly), else the number uniform routing hits."""
    t = TextShape.from_config(config)
    if experts_hit is None:
        experts_hit = expected_distinct_experts(t.num_experts, top_k, prompt_tokens)
    parts = {
        "attention": active_blocks * t.attention_params * BF16_BYTES,
        "norms": (active_blocks * t.block_norm_params + t.hidden_size) * BF16_BYTES,
        "router": active_blocks * t.router_params * BF16_BYTES,
        "experts": active_blocks * experts_hit * t.expert_params * BF16_BYTES,
        "embedding_rows": prompt_tokens * t.hidden_size * BF16_BYTES,
        "lm_head": t.lm_head_params * BF16_BYTES,
        "kv_cache_write": active_blocks * prompt_tokens * t.kv_bytes_per_token_per_block(),
    }
    parts["total"] = sum(parts.values())
    return parts


def vision_flops(config: Any, vision_tokens: int) -> dict[str, float]:
    """Matrix FLOPs of the vision encoder for one image giving vision_tokens LLM tokens.

    Patches = vision_tokens * merge^2; full (non-causal) attention over the image's patches in every block.
    """
    v = VisionShape.from_config(config)
    n = vision_tokens * v.spatial_merge_size**2
    w, i = v.hidden_size, v.intermediate_size
    m = w * v.spatial_merge_size**2
    parts = {
        "patch_embed": 2.0 * n * v.patch_dim * w,
        "blocks_proj": v.depth * 2.0 * n * (4 * w * w + 2 * w * i),
        "blocks_attention": v.depth * 2.0 * 2.0 * n * n * w,
        "mergers": (1 + v.num_deepstack) * 2.0 * vision_tokens * (m * m + m * v.out_hidden_size),
    }
    parts["total"] = sum(parts.values())
    return parts


def vision_bytes(config: Any, vision_tokens: int) -> float:
    """Vision weights read once (bf16); activations not counted."""
    return float(VisionShape.from_config(config).params * BF16_BYTES)


@dataclass(frozen=True)
class Ceilings:
    """Measured on the device in the same run: copy bandwidth (bytes read + written per second), matmul rate."""

    copy_bytes_per_s: float
    matmul_flop_per_s: float


def floor_ms(flops: float, nbytes: float, ceilings: Ceilings) -> dict[str, float]:
    """The larger of the compute and the memory time, in ms, with both terms."""
    compute = 1e3 * flops / ceilings.matmul_flop_per_s
    memory = 1e3 * nbytes / ceilings.copy_bytes_per_s
    return {"compute_ms": compute, "memory_ms": memory, "floor_ms": max(compute, memory)}
