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

More tokens (a prefill, a batch of more rows): `moe_grouped`, transformers' `grouped_mm` arithmetic (two GEMMs
per expert on the (token, expert) pairs in expert order, the same gate, the same rounding) without its extra
passes over the (tokens x top_k, hidden) activations: transformers 5.17 masks them three times for expert
parallelism (12 ms of a 96 ms prefill on an H100), gathers the tokens into a copy, then weights, un-permutes and
sums the outputs in three more kernels. On CUDA here: the pairs put in expert order by three small kernels
(`expert_order`, the permutation of a stable sort), the two GEMMs as Triton kernels that read each pair's token
in place, apply the SiLU gate in the gate/up GEMM's epilogue and write the down GEMM's rows in pair order
(`grouped_projection`), and one kernel for the routing-weighted sums (`_combine_kernel`). On CPU, torch's
grouped_mm (bit-identical to transformers). In float32 on CUDA, where torch's grouped_mm has no kernel and its
fallback synchronises with the host (which a CUDA graph cannot capture), transformers' `batched_mm`.

Registered as the experts implementation "knobsweep_fused" (`register`).
"""

from __future__ import annotations

import os

import torch

from knobsweep.models import pdl
from knobsweep.models.pdl import wait_for_previous_kernel

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
# The prefill's grouped GEMMs (`grouped_projection`): (block_m, block_n, block_k, warps, stages) per projection.
# Best of bench/moe_kernels.py --sweep on an H100 at 1898 tokens, top-8, in both routings (bench/README.md).
GROUPED_CONFIGS = {"gate_up": (128, 128, 64, 8, 4), "down": (128, 256, 64, 8, 3)}
EXPERT_ORDER_MAX_EXPERTS = (
    1024  # `expert_order`'s kernels hold a (pairs, experts) one-hot tile; beyond: a sort
)


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
        x_ptr,
        w_ptr,
        ids_ptr,
        act_ptr,
        H,
        INTER,
        K,
        BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # One program: one (token, expert) pair and BLOCK_N rows of its gate and up projections.
        wait_for_previous_kernel(PDL)
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
    def _pair_down_projection(
        act_ptr, w_ptr, pair, expert, offs_n, mask_n, H, INTER, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr
    ):
        # The down projection's rows offs_n of one (token, expert) pair's activation, summed in fp32 over
        # BLOCK_I-wide column blocks.
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
        return acc

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
        PDL: tl.constexpr = False,
    ):
        # One program: one token and BLOCK_N output features, summed over its K experts (then, HAS_RESIDUAL,
        # rounded and added to the residual: `_store_output`).
        wait_for_previous_kernel(PDL)
        token = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in range(K):
            pair = token * K + j
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            weight = tl.load(weights_ptr + pair).to(tl.float32)
            part = _pair_down_projection(
                act_ptr, w_ptr, pair, expert, offs_n, mask_n, H, INTER, BLOCK_N, BLOCK_I
            )
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
        acc = _pair_down_projection(act_ptr, w_ptr, pair, expert, offs_n, mask_n, H, INTER, BLOCK_N, BLOCK_I)
        tl.store(y_ptr + pair * H + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _down_pair_combine_kernel(
        act_ptr,
        w_ptr,
        ids_ptr,
        weights_ptr,
        y_ptr,
        residual_ptr,
        out_ptr,
        arrivals_ptr,
        H,
        INTER,
        K,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_I: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # `_down_pair_kernel`, then `_combine_kernel`'s work for its BLOCK_N features done by the last of the
        # token's K pair programs to arrive (arrivals[token, feature block] counts them; the last zeroes it):
        # the same rounded rows y summed in the same order, one launch fewer.
        wait_for_previous_kernel(PDL)
        pair = tl.program_id(0)
        block = tl.program_id(1)
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        acc = _pair_down_projection(act_ptr, w_ptr, pair, expert, offs_n, mask_n, H, INTER, BLOCK_N, BLOCK_I)
        tl.store(y_ptr + pair * H + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
        token = pair // K
        counter = arrivals_ptr + token * tl.num_programs(1) + block
        tl.debug_barrier()  # see `_normed_router_kernel`
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == K - 1:
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j in range(K):
                row = (token * K + j).to(tl.int64)
                weight = tl.load(weights_ptr + row).to(tl.float32)
                y = tl.load(y_ptr + row * H + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
                total += y.to(tl.float32) * weight
            _store_output(total, residual_ptr, out_ptr, token * H + offs_n, mask_n, HAS_RESIDUAL)
            tl.store(counter, 0)

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
    def _grouped_gemm_kernel(
        a_ptr,
        pairs_ptr,
        w_ptr,
        ends_ptr,
        out_ptr,
        N,
        K_DIM,
        E,
        TOP_K,
        stride_we,
        stride_wn,
        stride_wk,
        GATHER: tl.constexpr,
        SCATTER: tl.constexpr,
        GATED: tl.constexpr,
        EVEN: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        # One program: BLOCK_M rows of one expert (pairs sorted by expert, ends_ptr[e] = pairs of experts 0..e)
        # times BLOCK_N columns of that expert's weight, w[e] (N or, GATED, 2N rows of K_DIM, any strides).
        # Row r of expert order is pair pairs[r]: GATHER reads a's row pairs[r] // TOP_K (the pair's token),
        # else row r; SCATTER writes out's row pairs[r] (pair order), else row r. GATED: the gate rows (first
        # N) and up rows (next N) in two accumulators, out = silu(gate) * up with transformers' roundings
        # (each projection rounded, silu rounded, the product rounded). Program ids of dimension 0 count each
        # expert's row blocks in expert order; past the last block a program returns at once.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_e = tl.arange(0, BLOCK_E)
        in_e = offs_e < E
        ends = tl.load(ends_ptr + offs_e, mask=in_e, other=0)
        starts = tl.load(ends_ptr + offs_e - 1, mask=in_e & (offs_e > 0), other=0)
        blocks = tl.where(in_e, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        block_ends = tl.cumsum(blocks, axis=0)
        expert = tl.sum((block_ends <= pid_m).to(tl.int32), axis=0)
        if expert >= E:
            return
        mine = offs_e == expert
        first_row = tl.sum(tl.where(mine, starts + (pid_m - block_ends + blocks) * BLOCK_M, 0), axis=0)
        row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
        rows = first_row + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        if GATHER or SCATTER:
            pair = tl.load(pairs_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        if GATHER:
            source = pair // TOP_K
        else:
            source = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + source[:, None] * K_DIM + offs_k[None, :]
        w_ptrs = (
            w_ptr
            + expert.to(tl.int64) * stride_we
            + offs_n[None, :] * stride_wn
            + offs_k[:, None] * stride_wk
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_DIM, BLOCK_K):
            if EVEN:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs)
            else:
                k_ok = (k0 + offs_k) < K_DIM
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            if GATED:
                if EVEN:
                    w_up = tl.load(w_ptrs + N * stride_wn)
                else:
                    w_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        dtype = out_ptr.dtype.element_ty
        if GATED:
            gate = acc.to(dtype).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            out = (silu * acc_up.to(dtype).to(tl.float32)).to(dtype)
        else:
            out = acc.to(dtype)
        if SCATTER:
            target = pair
        else:
            target = rows.to(tl.int64)
        tl.store(out_ptr + target[:, None] * N + offs_n[None, :], out, mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _expert_counts_kernel(ids_ptr, counts_ptr, S, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
        # One program per CHUNK pairs: how many of them each expert gets (counts row = the chunk).
        offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < S, other=-1)
        experts = tl.arange(0, BLOCK_E)
        counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        tl.store(counts_ptr + tl.program_id(0) * E + experts, counts, mask=experts < E)

    @triton.jit
    def _expert_offsets_kernel(counts_ptr, ends_ptr, CHUNKS, E, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
        # One program: ends[e] = pairs of experts 0..e; counts (CHUNKS, E) becomes, in place, where each chunk's
        # first pair of each expert goes in expert order (the expert's start plus earlier chunks' pairs).
        experts = tl.arange(0, BLOCK_E)
        in_e = experts < E
        totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for c0 in range(0, CHUNKS, BLOCK_C):
            chunks = c0 + tl.arange(0, BLOCK_C)
            tile = (chunks < CHUNKS)[:, None] & in_e[None, :]
            totals += tl.sum(
                tl.load(counts_ptr + chunks[:, None] * E + experts[None, :], mask=tile, other=0), 0
            )
        ends = tl.cumsum(totals, axis=0)
        tl.store(ends_ptr + experts, ends, mask=in_e)
        carry = ends - totals
        for c0 in range(0, CHUNKS, BLOCK_C):
            chunks = c0 + tl.arange(0, BLOCK_C)
            tile = (chunks < CHUNKS)[:, None] & in_e[None, :]
            ptrs = counts_ptr + chunks[:, None] * E + experts[None, :]
            counts = tl.load(ptrs, mask=tile, other=0)
            tl.store(ptrs, carry[None, :] + tl.cumsum(counts, axis=0) - counts, mask=tile)
            carry += tl.sum(counts, axis=0)

    @triton.jit
    def _expert_scatter_kernel(
        ids_ptr, starts_ptr, perm_ptr, S, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr
    ):
        # One program per CHUNK pairs: each pair's row in expert order = its chunk's start for its expert plus
        # the pairs of that expert before it in the chunk (what a stable sort by expert gives); perm[row] = pair.
        offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        valid = offs < S
        ids = tl.load(ids_ptr + offs, mask=valid, other=-1)
        experts = tl.arange(0, BLOCK_E)
        one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
        before = tl.sum(one_hot * (tl.cumsum(one_hot, axis=0) - one_hot), axis=1)
        starts = tl.load(starts_ptr + tl.program_id(0) * E + experts, mask=experts < E, other=0)
        rows = tl.sum(one_hot * starts[None, :], axis=1) + before
        tl.store(perm_ptr + rows, offs.to(tl.int64), mask=valid)

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
    def _softmax_topk_row(
        z,
        offs,
        valid,
        weights_ptr,
        ids_ptr,
        K,
        RENORMALIZE: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One token's logits z (fp32, BLOCK_E lanes, `valid` the real experts): softmax in fp32, the K largest
        # probabilities in descending order (as torch.topk), optionally divided by their sum, rounded to the
        # weights' dtype (transformers' routers), stored at weights_ptr / ids_ptr (K each). Each round takes the
        # largest remaining (probability, lowest index) with one max over packed keys: probabilities are
        # non-negative, so their fp32 bits order like them.
        z = tl.where(valid, z, float("-inf"))
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
        tl.store(ids_ptr + slots, ids, mask=kept)
        tl.store(weights_ptr + slots, values.to(weights_ptr.dtype.element_ty), mask=kept)

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
        # One program per token: `_softmax_topk_row` of its logits.
        token = tl.program_id(0)
        offs = tl.arange(0, BLOCK_E)
        valid = offs < E
        z = tl.load(logits_ptr + token * E + offs, mask=valid, other=float("-inf")).to(tl.float32)
        _softmax_topk_row(
            z, offs, valid, weights_ptr + token * K, ids_ptr + token * K, K, RENORMALIZE, BLOCK_E, BLOCK_K
        )

    @triton.jit
    def _normed_router_kernel(
        h_ptr,
        norm_w_ptr,
        normed_ptr,
        w_ptr,
        logits_ptr,
        weights_ptr,
        ids_ptr,
        arrivals_ptr,
        H,
        E,
        K,
        eps,
        RENORMALIZE: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # A decode block's post-attention RMSNorm, router logits, softmax and top-k in one launch. Program
        # (expert, token): normalise the token's hidden state h as `rms_norm` does (every program, from the
        # 2 x H values in L2; program 0 also stores it for the experts' kernels), its expert's logit (fp32 sum,
        # rounded to the logits' dtype like the GEMV), then count itself in arrivals[token]; the token's last
        # program to arrive loads the E logits and runs `_softmax_topk_row` ("last program finishes", one
        # launch instead of three), then zeroes the count for the next launch.
        expert = tl.program_id(0)
        token = tl.program_id(1)
        offs = tl.arange(0, BLOCK_H)
        mask = offs < H
        # the weights before waiting for the previous kernel (constants: with PDL these loads overlap its end)
        w = tl.load(w_ptr + expert * H + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(norm_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        wait_for_previous_kernel(PDL)
        x = tl.load(h_ptr + token * H + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        normed = (scale * (x * rstd).to(h_ptr.dtype.element_ty).to(tl.float32)).to(
            normed_ptr.dtype.element_ty
        )
        if expert == 0:
            tl.store(normed_ptr + token * H + offs, normed, mask=mask)
        logit = tl.sum(w * normed.to(tl.float32), axis=0)
        tl.store(logits_ptr + token * E + expert, logit.to(logits_ptr.dtype.element_ty))
        # every thread's store before the count (the barrier), the count's release/acquire orders them for the
        # last program, whose loads skip L1 (.cg)
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + token, 1, sem="acq_rel")
        if arrived == E - 1:
            offs_e = tl.arange(0, BLOCK_E)
            valid = offs_e < E
            z = tl.load(logits_ptr + token * E + offs_e, mask=valid, other=0.0, cache_modifier=".cg")
            _softmax_topk_row(
                z.to(tl.float32),
                offs_e,
                valid,
                weights_ptr + token * K,
                ids_ptr + token * K,
                K,
                RENORMALIZE,
                BLOCK_E,
                BLOCK_K,
            )
            tl.store(arrivals_ptr + token, 0)


NORMED_ROUTER_WARPS = (
    1  # warps per program of `_normed_router_kernel` (bench/decode_ops.py: 1, 2, 4, 8 measured)
)
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


def arrival_counts(device: torch.device | str, kind: str, n: int) -> torch.Tensor:
    """n int32 counters, zero, for the kernels whose last program to arrive finishes the work
    (`_normed_router_kernel`, `_down_pair_combine_kernel`; each zeroes its counter again). One tensor per
    (device, kind, n), kept for the process's life: CUDA graphs captured with it keep its address."""
    key = (str(device), kind, n)
    counts = _ARRIVALS.get(key)
    if counts is None:
        counts = _ARRIVALS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return counts


_ARRIVALS: dict[tuple[str, str, int], torch.Tensor] = {}


def route_normed(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    num_warps: int = NORMED_ROUTER_WARPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's post-attention RMSNorm and router in one launch (`_normed_router_kernel`): h (T, H) with
    T <= FUSED_MAX_TOKENS, the norm's weight and epsilon, the router's weight (E, H) -> the normalised h (T, H),
    as `rms_norm.rms_norm` gives it, and `route`'s top-k weights and expert ids of it."""
    tokens, hidden = h.shape
    experts = weight.shape[0]
    h = h.contiguous()
    normed = torch.empty(h.shape, dtype=torch.promote_types(norm_weight.dtype, h.dtype), device=h.device)
    logits = torch.empty(tokens, experts, dtype=normed.dtype, device=h.device)
    weights = torch.empty(tokens, top_k, dtype=normed.dtype, device=h.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=h.device)
    launch_pdl = pdl.use(h)
    _normed_router_kernel[(experts, tokens)](
        h,
        norm_weight,
        normed,
        weight,
        logits,
        weights,
        ids,
        arrival_counts(h.device, "router", FUSED_MAX_TOKENS),
        hidden,
        experts,
        top_k,
        eps,
        RENORMALIZE=renormalize,
        BLOCK_H=triton.next_power_of_2(hidden),
        BLOCK_E=triton.next_power_of_2(experts),
        BLOCK_K=triton.next_power_of_2(top_k),
        PDL=launch_pdl,
        launch_pdl=launch_pdl,
        num_warps=num_warps,
    )
    return normed, weights, ids


def router_renormalizes(router: torch.nn.Module) -> bool:
    """Whether a fusable router divides its top-k weights by their sum."""
    renormalize = FUSED_ROUTER_CLASSES[type(router).__name__]
    return bool(router.norm_topk_prob) if renormalize is None else renormalize


def fused_router_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A Qwen3 router's forward (set on the instance by the fast paths around decode steps and the graphed
    prefill): `route` where Triton runs, the class's forward otherwise."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    if not triton_usable(x):
        return type(self).forward(self, hidden_states)
    return route(x, self.weight, int(self.top_k), router_renormalizes(self))


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
    fold_combine: bool = True,
) -> torch.Tensor:
    """Triton version of `moe_reference` (same arguments and result up to fp32 summation order); with
    `residual` (M, H), residual + that result, each rounded as transformers' decoder blocks do (`decode_block`).

    `split_down`: the down projection one program per (pair, feature block), then `_combine_kernel` (one more
    launch, K times more programs reading weights), or `_down_kernel`, which walks a token's K experts in one
    program. None: split from SPLIT_DOWN_MIN_PAIRS pairs on. `fold_combine`: the split down projection's last
    program per token and feature block combines (`_down_pair_combine_kernel`, one launch); False: the
    separate combine kernel (the benchmark's comparison). Same sums either way."""
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
    launch_pdl = pdl.use(x)
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
        PDL=launch_pdl,
        launch_pdl=launch_pdl,
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
            PDL=launch_pdl,
            launch_pdl=launch_pdl,
            num_warps=SINGLE_DOWN_WARPS,
        )
        return out
    y = torch.empty(m * k, hidden, device=x.device, dtype=x.dtype)
    blocks = triton.cdiv(hidden, DOWN_BLOCK_N)
    if fold_combine and m <= FUSED_MAX_TOKENS:
        _down_pair_combine_kernel[(m * k, blocks)](
            act,
            down,
            ids,
            weights,
            y,
            out if residual is None else residual.contiguous(),
            out,
            arrival_counts(x.device, "combine", FUSED_MAX_TOKENS * blocks),
            hidden,
            inter,
            k,
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=DOWN_BLOCK_N,
            BLOCK_I=256,
            PDL=launch_pdl,
            launch_pdl=launch_pdl,
            num_warps=4,
        )
        return out
    _down_pair_kernel[(m * k, blocks)](
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


def _default_silu_gate(experts: torch.nn.Module) -> bool:
    """The experts use transformers' default gate (split the gate/up output, silu(gate) * up) with SiLU."""
    from transformers.integrations import moe

    default = getattr(type(experts), "_apply_gate", None) is getattr(moe, "_default_apply_gate", object())
    return default and type(getattr(experts, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU")


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (S, in) sorted by group @ weight (G, in, out) per group; torch's public name where it has one."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return grouped_mm(x.to(weight.dtype), weight, offs=offsets)


def grouped_projection(
    a: torch.Tensor,
    weight: torch.Tensor,
    transposed: bool,
    pairs: torch.Tensor,
    ends: torch.Tensor,
    top_k: int,
    gather: bool = False,
    scatter: bool = False,
    gated: bool = False,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """One grouped GEMM of the prefill's experts in Triton (`_grouped_gemm_kernel`): for the pairs sorted by
    expert (pairs[r] = the pair in row r of expert order; ends[e] = pairs routed to experts 0..e), row r of
    expert e times weight[e] (E, out, in), or (E, in, out) when `transposed` (transformers' `is_transposed`).

    gather: a is (tokens, in) and row r reads token pairs[r] // top_k (no gathered copy of the activations);
    scatter: the result's row pairs[r] (pair order, what the combine reads) instead of row r; gated: weight's
    outputs are the gate then the up projection, the result is silu(gate) * up (the gate in the GEMM's
    epilogue). config: (block_m, block_n, block_k, warps, stages), default GROUPED_CONFIGS."""
    rows = pairs.numel()
    experts, outputs = weight.shape[0], weight.shape[2 if transposed else 1]
    width = outputs // 2 if gated else outputs
    in_features = a.shape[-1]
    block_m, block_n, block_k, warps, stages = config or GROUPED_CONFIGS["gate_up" if gated else "down"]
    stride_n, stride_k = (weight.stride(2), weight.stride(1)) if transposed else weight.stride()[1:]
    out = torch.empty(rows, width, device=a.device, dtype=a.dtype)
    # Row blocks: each expert's rows rounded up to block_m, at most rows / block_m + one partial per expert.
    grid = (triton.cdiv(rows, block_m) + experts, triton.cdiv(width, block_n))
    _grouped_gemm_kernel[grid](
        a.contiguous(),
        pairs,
        weight,
        ends,
        out,
        width,
        in_features,
        experts,
        top_k,
        weight.stride(0),
        stride_n,
        stride_k,
        GATHER=gather,
        SCATTER=scatter,
        GATED=gated,
        EVEN=in_features % block_k == 0 and width % block_n == 0,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_E=triton.next_power_of_2(experts),
        num_warps=warps,
        num_stages=stages,
    )
    return out


def expert_order(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, expert) pairs in expert order: perm (S,) int64, the pair (token * K + slot) of each row,
    pairs of one expert in pair order, as `torch.sort(ids, stable=True)` gives them; ends (E,) int32, pairs
    routed to experts 0..e. Three Triton kernels where Triton runs (per-chunk counts, their prefix sums, the
    scatter): a radix sort with its histogram, scans, fills and the searchsorted for the ends was ~10 small
    kernels (1.3 ms of an H100's 1898-token prefill); torch's sort elsewhere."""
    ids = top_k_index.reshape(-1)
    if not triton_usable(ids) or num_experts > EXPERT_ORDER_MAX_EXPERTS:
        # 16-bit keys where the expert ids fit: a radix sort of int64 keys takes 8 passes, of int16 keys 2.
        small = num_experts <= torch.iinfo(torch.int16).max
        sorted_ids, perm = torch.sort(ids.to(torch.int16 if small else torch.int64), stable=True)
        bounds = torch.arange(1, num_experts + 1, device=ids.device, dtype=sorted_ids.dtype)
        return perm, torch.searchsorted(sorted_ids, bounds, out_int32=True)
    ids = ids.contiguous()
    pairs = ids.numel()
    block_e = triton.next_power_of_2(num_experts)
    chunk = max(16, min(128, 8192 // block_e))  # a (chunk, experts) one-hot tile per program
    chunks = triton.cdiv(pairs, chunk)
    starts = torch.empty(chunks, num_experts, device=ids.device, dtype=torch.int32)
    ends = torch.empty(num_experts, device=ids.device, dtype=torch.int32)
    perm = torch.empty(pairs, device=ids.device, dtype=torch.int64)
    _expert_counts_kernel[(chunks,)](ids, starts, pairs, num_experts, CHUNK=chunk, BLOCK_E=block_e)
    _expert_offsets_kernel[(1,)](starts, ends, chunks, num_experts, BLOCK_C=chunk, BLOCK_E=block_e)
    _expert_scatter_kernel[(chunks,)](ids, starts, perm, pairs, num_experts, CHUNK=chunk, BLOCK_E=block_e)
    return perm, ends


def moe_grouped(
    experts: torch.nn.Module,
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    triton_gemms: bool | None = None,
) -> torch.Tensor:
    """transformers' `grouped_mm_experts_forward` arithmetic for gated experts without bias (the families'
    experts), minus its extra passes: sort the (token, expert) pairs by expert, the gate/up GEMM per expert,
    the experts' gate, the down GEMM per expert, then each token's routing-weighted sum.

    Where Triton runs and the gate is the default SiLU gate (`triton_gemms` None or True): both GEMMs in
    `grouped_projection`, the gate/up one reading each pair's token where it lies and applying the gate in its
    epilogue, the down one writing each pair's row where the combine kernel reads it; the GEMMs sum in fp32
    as torch's do, in another order. Else (`triton_gemms` False, or on CPU) torch's grouped_mm on gathered
    tokens and the experts' own gate: transformers' ops, bit-identical on CPU, then the combine kernel on
    CUDA."""
    tokens, k = top_k_index.shape
    perm, offsets = expert_order(top_k_index, experts.num_experts)
    weights = top_k_weights.reshape(tokens, k)
    if triton_gemms is None:
        triton_gemms = triton_usable(x) and _default_silu_gate(experts)
    if triton_gemms:
        a = x.to(experts.gate_up_proj.dtype)  # as torch's grouped_mm path casts it
        act = grouped_projection(
            a, experts.gate_up_proj, experts.is_transposed, perm, offsets, k, gather=True, gated=True
        )
        y = grouped_projection(act, experts.down_proj, experts.is_transposed, perm, offsets, k, scatter=True)
        out = torch.empty(tokens, x.shape[-1], device=x.device, dtype=x.dtype)
        _combine(
            y, None, weights.contiguous(), out, round_product=torch.result_type(y, weights) != torch.float32
        )
        return out
    gate_up = experts.gate_up_proj if experts.is_transposed else experts.gate_up_proj.transpose(-2, -1)
    down = experts.down_proj if experts.is_transposed else experts.down_proj.transpose(-2, -1)
    projected = _grouped_mm(x[perm // k], gate_up, offsets)  # (S, 2I), pairs in expert order
    y = _grouped_mm(experts._apply_gate(projected), down, offsets)  # (S, H)
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
