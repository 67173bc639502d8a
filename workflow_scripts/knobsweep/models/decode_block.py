"""A whole Qwen3 MoE decoder block's decode step, with its two residual additions folded into kernels.

transformers runs a block as: input RMSNorm, attention, `residual + attention`, post-attention RMSNorm, router,
experts, `residual + experts`. At batch 1 each addition is a kernel of its own (~1.4 us on an H100, plus the
gap before the next kernel), 96 per step of the real model. Here the attention's output projection (a Triton
GEMV, `decode_attention.linear_residual`) adds the first residual as it writes its rows, and the experts'
last kernel (`fused_moe.moe_fused`'s combine or down kernel) the second. Each sum is rounded to the model's
dtype before its addition, as transformers does, so only summation order differs from the block-by-module
path; the split-KV attention advances the cache's length in its combine kernel.

The block's two RMSNorms have no kernels of their own either (`FOLD_NORMS`): the q/k/v GEMV normalises its
input row itself (each program again, from L2), and one router kernel normalises the attention's output, stores
it for the experts, computes its expert's logit per program, and its last program to arrive runs softmax and
top-k (`fused_moe.route_normed`); the experts' combine is done by the last down-projection program of each
feature block. 8 kernels per block (12 before), each result rounded where transformers rounds it.

`fused_decoder_layer_forward` is set on the layer instances by `fast_path.FusedModules` around decode steps,
together with the fused attention and router forwards it calls; anything it does not handle (more than one
token, no initialised static cache layer, no Triton, another experts implementation) goes to the class's
forward, module by module.
"""

from __future__ import annotations

from typing import Any

import torch

from knobsweep.models import decode_attention, fused_moe

# Fold the block's two RMSNorms into the kernels that read their output (the input norm into the q/k/v GEMV, the
# post-attention norm into the router's kernel, which also runs softmax and top-k) and the experts' combine into
# their down projection (INFERENCE_CODE_VERSION 8): 4 launches fewer per block. False: session 8's kernels, which
# the benchmark keeps as a comparison (bench/latency.py). The same roundings either way; the q/k/v GEMV (Triton
# instead of cuBLAS) and the router's logits sum in another order.
FOLD_NORMS = True
FUSED_LAYER_CLASSES = ("Qwen3VLMoeTextDecoderLayer", "Qwen3MoeDecoderLayer")
# MoE blocks whose forward is exactly router -> experts (no shared expert, no gate on the output)
FUSED_MOE_BLOCK_CLASSES = ("Qwen3VLMoeTextSparseMoeBlock", "Qwen3MoeSparseMoeBlock")


def fusable_layer(layer: torch.nn.Module) -> bool:
    """A decoder block `fused_decoder_layer_forward` reproduces: a Qwen3 block whose attention and router the
    fused forwards handle."""
    mlp = getattr(layer, "mlp", None)
    return (
        type(layer).__name__ in FUSED_LAYER_CLASSES
        and type(mlp).__name__ in FUSED_MOE_BLOCK_CLASSES
        and hasattr(mlp, "experts")
        and decode_attention.fusable_attention(layer.self_attn)
        and fused_moe.fusable_router(mlp.gate)
    )


def _fused_experts_apply(experts: torch.nn.Module, x: torch.Tensor) -> bool:
    config = getattr(experts, "config", None)
    return (
        getattr(config, "_experts_implementation", None) == fused_moe.NAME
        and not getattr(experts, "is_transposed", False)
        and x.shape[0] <= fused_moe.FUSED_MAX_TOKENS
    )


def fused_decoder_layer_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The decoder block's forward for one-token steps over a static cache on CUDA (see the module docstring);
    the class's forward otherwise."""
    attention = self.self_attn
    layer = decode_attention.decode_cache_layer(attention, hidden_states, kwargs)
    if layer is None or not fused_moe.triton_usable(hidden_states):
        return type(self).forward(
            self,
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    cache = decode_attention.cache_from_kwargs(kwargs)
    # folded: the attention step applies the input norm (inside its q/k/v GEMV where it can)
    norm = self.input_layernorm
    x = hidden_states if FOLD_NORMS else norm(hidden_states)
    hidden_states = decode_attention.attention_step(
        attention,
        x,
        position_embeddings,
        attention_mask,
        cache,
        layer,
        residual=hidden_states,
        norm=norm if FOLD_NORMS else None,
    )
    shape = hidden_states.shape
    residual = hidden_states.reshape(-1, shape[-1])
    router, norm = self.mlp.gate, self.post_attention_layernorm
    if (
        FOLD_NORMS
        and residual.shape[0] <= fused_moe.FUSED_MAX_TOKENS
        and decode_attention.foldable_norm(norm, residual, router.weight)
    ):
        x, weights, ids = fused_moe.route_normed(
            residual,
            norm.weight,
            float(norm.variance_epsilon),
            router.weight,
            int(router.top_k),
            fused_moe.router_renormalizes(router),
        )
    else:
        x = norm(hidden_states).reshape(-1, shape[-1])
        _, weights, ids = router(x)
    experts = self.mlp.experts
    if _fused_experts_apply(experts, x):
        out = fused_moe.moe_fused(
            x,
            experts.gate_up_proj,
            experts.down_proj,
            ids,
            weights,
            residual=residual,
            fold_combine=FOLD_NORMS,
        )
    else:
        out = residual + experts(x, ids, weights)
    return out.view(shape)
