"""A decode-time experts path: two Triton kernels that read only the routed experts' weights.

(Moved here from bench/fused_moe.py, which now re-exports it, so that the knob engine's fast inference path
(`fast_path.py`) and the latency benchmark run the same kernels.)

At batch 1 a decode step's expert work is a handful of matrix-vector products, bound by reading the top_k
experts' weights. transformers' `grouped_mm` path spends ~15 small kernels per block on sorting, histograms,
gathers and scatters around two grouped GEMMs; here one kernel computes gate/up projections and the SiLU gate
for every (token, expert) pair, and a second computes the down projections and their routing-weighted sum.
No host synchronisation, so the step can be captured in a CUDA graph.

Registered as the experts implementation "knobsweep_fused": it serves up to FUSED_MAX_TOKENS tokens per call
(decode) and hands anything larger (a batch of more rows) to transformers' grouped_mm path (batched_mm in
float32). On CPU, without the Triton interpreter (TRITON_INTERPRET=1), it runs the same arithmetic in torch
(`moe_reference`).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is present with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

FUSED_MAX_TOKENS = 4
NAME = "knobsweep_fused"


def moe_reference(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed experts in plain torch, rounding where transformers does (bf16 after each projection).

    x (M, H); gate_up (E, 2I, H) with the gate rows first; down (E, H, I); top_k_index/weights (M, K).
    """
    m, k = top_k_index.shape
    inter = down.shape[-1]
    w_gu = gate_up[top_k_index.reshape(-1)]  # (M*K, 2I, H)
    gu = torch.einsum("rnh,rh->rn", w_gu.float(), x.repeat_interleave(k, dim=0).float()).to(x.dtype).float()
    act = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)
    w_d = down[top_k_index.reshape(-1)]  # (M*K, H, I)
    out = torch.einsum("rhi,ri->rh", w_d.float(), act.float()).to(x.dtype).float()
    out = out.view(m, k, -1) * top_k_weights.float().unsqueeze(-1)
    return out.sum(dim=1).to(x.dtype)


if triton is not None:

    @triton.jit
    def _gate_up_kernel(
        x_ptr, w_ptr, ids_ptr, act_ptr, H, INTER, K, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr
    ):
        # One program: one (token, expert) pair and BLOCK_N rows of its gate and up projections.
        pair = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < INTER
        token = pair // K
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        base = w_ptr + expert * 2 * INTER * H
        acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            x = tl.load(x_ptr + token * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            tile = mask_n[:, None] & mask_h[None, :]
            wg = tl.load(base + offs_n[:, None] * H + offs_h[None, :], mask=tile, other=0.0).to(tl.float32)
            wu = tl.load(base + (offs_n[:, None] + INTER) * H + offs_h[None, :], mask=tile, other=0.0)
            acc_g += tl.sum(wg * x[None, :], axis=1)
            acc_u += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
        g = acc_g.to(act_ptr.dtype.element_ty).to(tl.float32)
        u = acc_u.to(act_ptr.dtype.element_ty).to(tl.float32)
        act = g / (1.0 + tl.exp(-g)) * u
        tl.store(act_ptr + pair * INTER + offs_n, act.to(act_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _down_kernel(
        act_ptr,
        w_ptr,
        ids_ptr,
        weights_ptr,
        out_ptr,
        H,
        INTER,
        K,
        BLOCK_N: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        # One program: one token and BLOCK_N output features, summed over its K experts.
        token = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in range(K):
            pair = token * K + j
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            weight = tl.load(weights_ptr + pair).to(tl.float32)
            base = w_ptr + expert * H * INTER
            part = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for i0 in range(0, INTER, BLOCK_I):
                offs_i = i0 + tl.arange(0, BLOCK_I)
                mask_i = offs_i < INTER
                a = tl.load(act_ptr + pair * INTER + offs_i, mask=mask_i, other=0.0).to(tl.float32)
                w = tl.load(
                    base + offs_n[:, None] * INTER + offs_i[None, :],
                    mask=mask_n[:, None] & mask_i[None, :],
                    other=0.0,
                ).to(tl.float32)
                part += tl.sum(w * a[None, :], axis=1)
            acc += part.to(out_ptr.dtype.element_ty).to(tl.float32) * weight
        tl.store(out_ptr + token * H + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def triton_usable(x: torch.Tensor) -> bool:
    if triton is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def moe_fused(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Triton version of `moe_reference` (same arguments and result up to fp32 summation order)."""
    m, k = top_k_index.shape
    hidden = x.shape[-1]
    inter = down.shape[-1]
    x = x.contiguous()
    ids = top_k_index.contiguous()
    weights = top_k_weights.contiguous()
    act = torch.empty(m * k, inter, device=x.device, dtype=x.dtype)
    out = torch.empty(m, hidden, device=x.device, dtype=x.dtype)
    # Narrow row blocks give enough programs to cover the GPU even at top_k = 1.
    block_n = 8 if m * k <= 2 else 16
    _gate_up_kernel[(m * k, triton.cdiv(inter, block_n))](
        x, gate_up, ids, act, hidden, inter, k, BLOCK_N=block_n, BLOCK_H=256, num_warps=4
    )
    _down_kernel[(m, triton.cdiv(hidden, 8))](
        act, down, ids, weights, out, hidden, inter, k, BLOCK_N=8, BLOCK_I=256, num_warps=4
    )
    return out


def fused_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts-interface entry point (self: the experts module)."""
    if hidden_states.shape[0] > FUSED_MAX_TOKENS:
        from transformers.integrations import moe

        # Larger batches: transformers' kernels. torch's grouped_mm has no float32 CUDA kernel and its fallback
        # reads the group offsets on the host, which CUDA-graph capture refuses; batched_mm never synchronises.
        if hidden_states.dtype == torch.float32:
            return moe.batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        return moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if triton_usable(hidden_states):
        return moe_fused(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)
    return moe_reference(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)


def register() -> str:
    """Make "knobsweep_fused" a valid `experts_implementation` name (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, fused_experts_forward)
    return NAME
