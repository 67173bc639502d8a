"""Experts paths of the fast inference paths: Triton decode kernels that read only the routed experts' weights,
and lean grouped GEMMs for prefills and larger batches.

(Moved here from bench/fused_moe.py, which now re-exports it, so that the knob engine's fast inference path
(`fast_path.py`) and the latency benchmark run the same kernels.)

Decode (up to FUSED_MAX_TOKENS tokens). At batch 1 a decode step's expert work is a handful of matrix-vector
products, bound by reading the top_k experts' weights. transformers' `grouped_mm` path spends ~15 small kernels
per block on sorting, histograms, gathers and scatters around two grouped GEMMs; here one kernel computes
gate/up projections and the SiLU gate for every (token, expert) pair, a second the down projection of every
pair, and a third their routing-weighted sum per token. No host synchronisation, so the step can be captured
in a CUDA graph. On CPU, without the Triton interpreter (TRITON_INTERPRET=1), the same arithmetic runs in torch
(`moe_reference`).

More tokens (a prefill, a batch of more rows): `moe_grouped`, transformers' `grouped_mm` arithmetic (the same
two grouped GEMMs on tokens sorted by expert, the same gate, the same rounding) without its extra passes over
the (tokens x top_k, hidden) activations: transformers 5.17 masks them three times for expert parallelism
(12 ms of a 96 ms prefill on an H100), then weights, un-permutes and sums them in three more kernels, which
one Triton kernel does here (`_combine_kernel`); its SiLU gate (split, silu, multiply) is one Triton kernel too
(`_silu_mul_kernel`, same roundings), and the pairs are sorted by 16-bit expert ids (2 radix passes, not 8). In float32 on CUDA, where torch's grouped_mm has no kernel
and its fallback synchronises with the host (which a CUDA graph cannot capture), transformers' `batched_mm`.

Registered as the experts implementation "knobsweep_fused" (`register`).
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
# Launch parameters of the decode kernels, measured on an H100 at Qwen3-VL-30B-A3B's shapes
# (bench/decode_ops.py, bench/README.md). Gate/up: GATE_UP_BLOCK_N rows of the gate and of the up projection per
# program, up to GATE_UP_BLOCK_H columns per iteration (the whole hidden row: 4.9 us per block at top-1 against
# 9.0 with 256 columns; equal at top-8). Down projection: split over (token, expert) pairs from
# SPLIT_DOWN_MIN_PAIRS pairs on, DOWN_BLOCK_N features per program, then the combine kernel (COMBINE_BLOCK_N
# features per program); a single pair in one kernel with SINGLE_DOWN_* parameters.
GATE_UP_BLOCK_N, GATE_UP_BLOCK_H, GATE_UP_WARPS = 4, 2048, 8
SPLIT_DOWN_MIN_PAIRS = 2
DOWN_BLOCK_N = 8
SINGLE_DOWN_BLOCK_N, SINGLE_DOWN_BLOCK_I, SINGLE_DOWN_WARPS = 4, 1024, 8
COMBINE_BLOCK_N = 256


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
    def _store_output(acc, residual_ptr, out_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
        # The experts' output rounded to out's dtype, then (HAS_RESIDUAL) plus the decoder block's residual,
        # rounded again: transformers' `residual + experts(x)` in two bf16 operations.
        dtype = out_ptr.dtype.element_ty
        out = acc.to(dtype)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
            out = (out.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(out_ptr + offsets, out, mask=mask)

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
        residual_ptr,
        out_ptr,
        H,
        INTER,
        K,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        # One program: one token and BLOCK_N output features, summed over its K experts (then, HAS_RESIDUAL,
        # rounded and added to the residual: `_store_output`).
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
        _store_output(acc, residual_ptr, out_ptr, token * H + offs_n, mask_n, HAS_RESIDUAL)

    @triton.jit
    def _down_pair_kernel(
        act_ptr, w_ptr, ids_ptr, y_ptr, H, INTER, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr
    ):
        # One program: one (token, expert) pair and BLOCK_N output features of its down projection. Spreading
        # the pairs over programs reads the experts' weights with K times more programs than `_down_kernel`.
        pair = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        base = w_ptr + expert * H * INTER
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i0 in range(0, INTER, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mask_i = offs_i < INTER
            a = tl.load(act_ptr + pair * INTER + offs_i, mask=mask_i, other=0.0).to(tl.float32)
            w = tl.load(
                base + offs_n[:, None] * INTER + offs_i[None, :],
                mask=mask_n[:, None] & mask_i[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w * a[None, :], axis=1)
        tl.store(y_ptr + pair * H + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _combine_kernel(
        y_ptr,
        rows_ptr,
        weights_ptr,
        residual_ptr,
        out_ptr,
        H,
        K,
        PAIR_ROWS: tl.constexpr,
        ROUND_PRODUCT: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # One program: one token and BLOCK_N features: sum over its K (expert output row x routing weight) in
        # fp32, in expert order. PAIR_ROWS: y's rows are in pair order (token t's at t*K ...), rows_ptr unused.
        # ROUND_PRODUCT rounds each product to y's dtype first, as torch does when y and the weights share a
        # low-precision dtype.
        token = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in range(K):
            if PAIR_ROWS:
                row = (token * K + j).to(tl.int64)
            else:
                row = tl.load(rows_ptr + token * K + j).to(tl.int64)
            weight = tl.load(weights_ptr + token * K + j).to(tl.float32)
            y = tl.load(y_ptr + row * H + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            product = y * weight
            if ROUND_PRODUCT:
                product = product.to(y_ptr.dtype.element_ty).to(tl.float32)
            acc += product
        _store_output(acc, residual_ptr, out_ptr, token * H + offs_n, mask_n, HAS_RESIDUAL)


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, INTER, BLOCK: tl.constexpr):
        # One program: BLOCK features of one row of (S, 2 INTER) gate/up outputs (gate first) -> (S, INTER):
        # silu(gate) rounded to the dtype, times up, rounded (torch's silu, then its multiplication).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < INTER
        dtype = out_ptr.dtype.element_ty
        g = tl.load(gate_up_ptr + row * 2 * INTER + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gate_up_ptr + row * 2 * INTER + INTER + offs, mask=mask, other=0.0).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * INTER + offs, (silu * u).to(dtype), mask=mask)

    @triton.jit
    def _router_logits_kernel(x_ptr, w_ptr, out_ptr, H, E, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
        # One program: one token and BLOCK_E experts' logits (fp32 sums, rounded to the output dtype like a GEMM).
        token = tl.program_id(0)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            x = tl.load(x_ptr + token * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + offs_e[:, None] * H + offs_h[None, :],
                mask=mask_e[:, None] & mask_h[None, :],
                other=0.0,
            )
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(out_ptr + token * E + offs_e, acc.to(out_ptr.dtype.element_ty), mask=mask_e)

    @triton.jit
    def _softmax_topk_kernel(
        logits_ptr,
        weights_ptr,
        ids_ptr,
        E,
        K,
        RENORMALIZE: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One program per token: softmax in fp32, the K largest probabilities in descending order (as
        # torch.topk), optionally divided by their sum, rounded to the logits' dtype (transformers' routers).
        # Each round takes the largest remaining (probability, lowest index) with one max over packed keys:
        # probabilities are non-negative, so their fp32 bits order like them.
        token = tl.program_id(0)
        offs = tl.arange(0, BLOCK_E)
        valid = offs < E
        z = tl.load(logits_ptr + token * E + offs, mask=valid, other=float("-inf")).to(tl.float32)
        p = tl.exp(z - tl.max(z, axis=0))
        p = p / tl.sum(p, axis=0)
        keys = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - offs).to(tl.int64)
        keys = tl.where(valid, keys, -1)
        slots = tl.arange(0, BLOCK_K)
        values = tl.zeros((BLOCK_K,), dtype=tl.float32)
        ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
        for j in range(K):
            best = tl.max(keys, axis=0)
            expert = BLOCK_E - 1 - (best & 0xFFFFFFFF)
            value = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            values = tl.where(slots == j, value, values)
            ids = tl.where(slots == j, expert, ids)
            keys = tl.where(offs == expert, -1, keys)
        if RENORMALIZE:
            values = values / tl.sum(values, axis=0)
        kept = slots < K
        tl.store(ids_ptr + token * K + slots, ids, mask=kept)
        tl.store(weights_ptr + token * K + slots, values.to(weights_ptr.dtype.element_ty), mask=kept)


ROUTER_BLOCK_E = 1  # experts per program of the router GEMV: one row each keeps every SM reading
# transformers routers the fused one reproduces: softmax over all experts, top-k, then (always, or where the
# router's `norm_topk_prob` says so) divided by the kept probabilities' sum.
FUSED_ROUTER_CLASSES = {"Qwen3VLMoeTextTopKRouter": True, "Qwen3MoeTopKRouter": None}


def fusable_router(router: torch.nn.Module) -> bool:
    return (
        type(router).__name__ in FUSED_ROUTER_CLASSES
        and hasattr(router, "weight")
        and hasattr(router, "top_k")
    )


def route(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool, block_e: int = ROUTER_BLOCK_E
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton router: x (T, H), weight (E, H) -> logits (T, E), top-k weights (T, K) in x's dtype, top-k expert
    ids (T, K) int64 — the outputs of transformers' Qwen3 routers. The logits of up to FUSED_MAX_TOKENS tokens
    in a Triton GEMV, of more in cuBLAS's GEMM (a prefill; each GEMV program would re-read the weight)."""
    tokens, hidden = x.shape
    experts = weight.shape[0]
    x = x.contiguous()
    weights = torch.empty(tokens, top_k, dtype=x.dtype, device=x.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=x.device)
    if tokens > FUSED_MAX_TOKENS:
        logits = torch.nn.functional.linear(x, weight).contiguous()
    else:
        logits = torch.empty(tokens, experts, dtype=x.dtype, device=x.device)
        _router_logits_kernel[(tokens, triton.cdiv(experts, block_e))](
            x, weight, logits, hidden, experts, BLOCK_E=block_e, BLOCK_H=1024, num_warps=4
        )
    _softmax_topk_kernel[(tokens,)](
        logits,
        weights,
        ids,
        experts,
        top_k,
        RENORMALIZE=renormalize,
        BLOCK_E=triton.next_power_of_2(experts),
        BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=1,
    )
    return logits, weights, ids


def fused_router_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A Qwen3 router's forward (set on the instance by the fast paths around decode steps and the graphed
    prefill): `route` where Triton runs, the class's forward otherwise."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    if not triton_usable(x):
        return type(self).forward(self, hidden_states)
    renormalize = FUSED_ROUTER_CLASSES[type(self).__name__]
    if renormalize is None:
        renormalize = bool(self.norm_topk_prob)
    return route(x, self.weight, int(self.top_k), renormalize)


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
    split_down: bool | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `moe_reference` (same arguments and result up to fp32 summation order); with
    `residual` (M, H), residual + that result, each rounded as transformers' decoder blocks do (`decode_block`).

    `split_down`: the down projection one program per (pair, feature block), then `_combine_kernel` (one more
    launch, K times more programs reading weights), or `_down_kernel`, which walks a token's K experts in one
    program. None: split from SPLIT_DOWN_MIN_PAIRS pairs on."""
    m, k = top_k_index.shape
    hidden = x.shape[-1]
    inter = down.shape[-1]
    x = x.contiguous()
    ids = top_k_index.contiguous()
    weights = top_k_weights.contiguous()
    act = torch.empty(m * k, inter, device=x.device, dtype=x.dtype)
    out = torch.empty(m, hidden, device=x.device, dtype=x.dtype)
    # Narrow row blocks: enough programs to keep every SM reading weights, even at top_k = 1.
    block_n = GATE_UP_BLOCK_N
    _gate_up_kernel[(m * k, triton.cdiv(inter, block_n))](
        x,
        gate_up,
        ids,
        act,
        hidden,
        inter,
        k,
        BLOCK_N=block_n,
        BLOCK_H=min(GATE_UP_BLOCK_H, triton.next_power_of_2(hidden)),
        num_warps=GATE_UP_WARPS,
    )
    if split_down is None:
        split_down = m * k >= SPLIT_DOWN_MIN_PAIRS
    if not split_down:
        _down_kernel[(m, triton.cdiv(hidden, SINGLE_DOWN_BLOCK_N))](
            act,
            down,
            ids,
            weights,
            out if residual is None else residual.contiguous(),
            out,
            hidden,
            inter,
            k,
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=SINGLE_DOWN_BLOCK_N,
            BLOCK_I=min(SINGLE_DOWN_BLOCK_I, triton.next_power_of_2(inter)),
            num_warps=SINGLE_DOWN_WARPS,
        )
        return out
    y = torch.empty(m * k, hidden, device=x.device, dtype=x.dtype)
    _down_pair_kernel[(m * k, triton.cdiv(hidden, DOWN_BLOCK_N))](
        act, down, ids, y, hidden, inter, BLOCK_N=DOWN_BLOCK_N, BLOCK_I=256, num_warps=4
    )
    _combine(y, None, weights, out, round_product=False, residual=residual)
    return out


def _combine(
    y: torch.Tensor,
    rows: torch.Tensor | None,
    weights: torch.Tensor,
    out: torch.Tensor,
    round_product: bool,
    residual: torch.Tensor | None = None,
) -> None:
    """out[t] = sum_j y[rows[t, j]] * weights[t, j] (fp32 sum over j in order), written into out (T, H);
    rows None: y in pair order (row t*K + j); residual (T, H): rounded, then added to it."""
    tokens, hidden = out.shape
    k = weights.shape[-1]
    _combine_kernel[(tokens, triton.cdiv(hidden, COMBINE_BLOCK_N))](
        y,
        y if rows is None else rows,
        weights,
        out if residual is None else residual.contiguous(),
        out,
        hidden,
        k,
        PAIR_ROWS=rows is None,
        ROUND_PRODUCT=round_product,
        HAS_RESIDUAL=residual is not None,
        BLOCK_N=COMBINE_BLOCK_N,
        num_warps=4,
    )


def _apply_gate(experts: torch.nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """The experts' gate on the gate/up GEMM's output (S, 2I): transformers' default gate with SiLU (split,
    silu, multiply: three passes over the activations) in one Triton kernel where it runs, else the experts'
    own `_apply_gate`."""
    from transformers.integrations import moe

    default = getattr(type(experts), "_apply_gate", None) is getattr(moe, "_default_apply_gate", object())
    silu = type(getattr(experts, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU")
    if not (default and silu and triton_usable(projected) and projected.is_contiguous()):
        return experts._apply_gate(projected)
    rows, width = projected.shape
    inter = width // 2
    out = torch.empty(rows, inter, dtype=projected.dtype, device=projected.device)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](projected, out, inter, BLOCK=block, num_warps=4)
    return out


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (S, in) sorted by group @ weight (G, in, out) per group; torch's public name where it has one."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return grouped_mm(x.to(weight.dtype), weight, offs=offsets)


def moe_grouped(
    experts: torch.nn.Module, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' `grouped_mm_experts_forward` arithmetic for gated experts without bias (the families'
    experts), minus its extra passes: sort the (token, expert) pairs by expert, gather their tokens, the gate/up
    grouped GEMM, the experts' own gate (`_apply_gate`), the down grouped GEMM, then each token's
    routing-weighted sum: one Triton kernel on CUDA, transformers' own ops elsewhere (bit-identical there)."""
    tokens, k = top_k_index.shape
    # Sorted as 16-bit keys where the expert ids fit: a radix sort of int64 keys takes 8 passes (2.2 ms of an
    # H100's 1898-token prefill), of int16 keys 2. The order within an expert's rows changes no result.
    small = experts.num_experts <= torch.iinfo(torch.int16).max
    expert_ids = top_k_index.reshape(-1).to(torch.int16 if small else torch.int64)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    # offsets[e] = pairs routed to experts 0..e (what histc + cumsum give, in one kernel)
    bounds = torch.arange(1, experts.num_experts + 1, device=x.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds, out_int32=True)
    gate_up = experts.gate_up_proj if experts.is_transposed else experts.gate_up_proj.transpose(-2, -1)
    down = experts.down_proj if experts.is_transposed else experts.down_proj.transpose(-2, -1)
    projected = _grouped_mm(x[perm // k], gate_up, offsets)  # (S, 2I), pairs in expert order
    y = _grouped_mm(_apply_gate(experts, projected), down, offsets)  # (S, H)
    weights = top_k_weights.reshape(tokens, k)
    # rows[p] = where pair p (token-major order) sits in expert order
    rows = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=x.device))
    product_dtype = torch.result_type(y, weights)
    if triton_usable(x):
        out = torch.empty(tokens, x.shape[-1], device=x.device, dtype=x.dtype)
        _combine(y, rows, weights.contiguous(), out, round_product=product_dtype != torch.float32)
        return out
    weighted = y * weights.reshape(-1)[perm].unsqueeze(-1)
    return weighted[rows].view(tokens, k, -1).sum(dim=1).to(x.dtype)


def grouped_supported(experts: torch.nn.Module, x: torch.Tensor) -> bool:
    """`moe_grouped` applies: gated experts without bias or post-norm, not expert-parallel, and torch has a
    grouped_mm kernel for this dtype and device (none for float32 on CUDA)."""
    plain = (
        getattr(experts, "has_gate", False)
        and not getattr(experts, "has_bias", False)
        and not getattr(experts, "has_post_expert_norm", False)
        and not getattr(experts, "_is_expert_parallel", False)
        and hasattr(experts, "_apply_gate")
    )
    kernel = x.device.type == "cpu" or (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16))
    return bool(plain and kernel)


def fused_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts-interface entry point (self: the experts module)."""
    if hidden_states.shape[0] > FUSED_MAX_TOKENS:
        if grouped_supported(self, hidden_states):
            return moe_grouped(self, hidden_states, top_k_index, top_k_weights)
        from transformers.integrations import moe

        # torch's grouped_mm has no float32 CUDA kernel and its fallback reads the group offsets on the host,
        # which CUDA-graph capture refuses; batched_mm never synchronises.
        if hidden_states.dtype == torch.float32 and hidden_states.is_cuda:
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
