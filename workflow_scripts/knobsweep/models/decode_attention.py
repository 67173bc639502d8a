"""Decode attention over a static cache without expanding grouped key/value heads.

(Moved here from bench/attention.py, which now re-exports it, so that the knob engine's fast inference path
(`fast_path.py`) and the latency benchmark run the same kernels.)

transformers' sdpa path copies every key/value head num_key_value_groups times (`repeat_kv`) whenever a mask is
given, which a static cache always needs. At batch 1 with one new token, the query heads that share a key/value
head can instead be laid out as that head's "query positions": one sdpa call reads each cached key and value
once. Registered as attention implementation "knobsweep_gqa"; anything but a single-token query goes to sdpa.

Further down: split-KV decode attention ("knobsweep_splitkv"), the Qwen3 families' whole attention of a decode
step (`fused_attention_forward`: one q/k/v GEMV, one kernel for norms, rotary embedding and cache writes) and of
a prompt written into an empty static cache (`prompt_attention_forward`, the graphed prefill's), and the output
projection's GEMV with the residual addition in its epilogue (`gemv`, `linear_residual`; `decode_block`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from knobsweep.models import pdl
from knobsweep.models.pdl import wait_for_previous_kernel

NAME = "knobsweep_gqa"


def gqa_decode_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """query (B, Hq, 1, D), key/value (B, Hkv, S, D), mask (B, 1, 1, S) bool or additive -> (B, 1, Hq, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads == kv_heads:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    groups = heads // kv_heads
    # Head h uses key/value head h // groups (repeat_kv's layout), so the groups are contiguous in the view.
    q = query.reshape(batch, kv_heads, groups, dim)
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, : key.shape[2]]
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


def register() -> str:
    """Make "knobsweep_gqa" a valid attention (and mask) implementation name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, gqa_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


# --- split-KV ("flash-decoding") decode attention -------------------------------------------------------------
# The sdpa kernels parallelise over (batch, heads, query blocks): at batch 1 with 4 key/value heads that is a
# handful of thread blocks, each walking the whole cache. Here the cache is split into NUM_SPLITS chunks, each
# chunk's partial softmax computed by its own program, and a second kernel combines the partials.
SPLITKV_NAME = "knobsweep_splitkv"
NUM_SPLITS = 32

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _splitkv_partial(
        q_ptr,
        k_ptr,
        v_ptr,
        mask_ptr,
        acc_ptr,
        m_ptr,
        l_ptr,
        S,
        CHUNK,
        scale,
        GROUPS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        NSPLIT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        wait_for_previous_kernel(PDL)
        head = tl.program_id(0)  # key/value head
        split = tl.program_id(1)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        q = tl.load(
            q_ptr + (head * GROUPS + offs_g[:, None]) * D + offs_d[None, :],
            mask=offs_g[:, None] < GROUPS,
            other=0.0,
        )
        m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
        start = split * CHUNK
        for s0 in range(start, start + CHUNK, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            valid = offs_s < S
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + offs_s, mask=offs_s < S, other=0) != 0)
            kv_off = head * S * D + offs_s[:, None] * D + offs_d[None, :]
            k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
            # fp32 even when a caller (inductor) passes the scale as a float64 constant
            if IEEE:  # float32 inputs: full-precision products (tl.dot would use TF32 on tensor cores)
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            scores = (qk * scale).to(tl.float32)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        row = (head * NSPLIT + split) * BLOCK_G + offs_g
        tl.store(m_ptr + row, m_i)
        tl.store(l_ptr + row, l_i)
        tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc)

    @triton.jit
    def _splitkv_combine(
        acc_ptr,
        m_ptr,
        l_ptr,
        out_ptr,
        length_ptr,
        GROUPS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        D: tl.constexpr,
        NSPLIT: tl.constexpr,
        ADVANCE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # ADVANCE: also add 1 to the static cache layer's length (StaticLayer.update's bookkeeping, one launch
        # fewer); nothing reads it between the key/value writes and the next step.
        wait_for_previous_kernel(PDL)
        pid = tl.program_id(0)  # query head
        if ADVANCE:  # noqa: SIM102 - a compile-time branch around a run-time one
            if pid == 0:
                tl.store(length_ptr, tl.load(length_ptr) + 1)
        head = pid // GROUPS
        g = pid % GROUPS
        offs_s = tl.arange(0, NSPLIT)
        offs_d = tl.arange(0, D)
        rows = (head * NSPLIT + offs_s) * BLOCK_G + g
        m = tl.load(m_ptr + rows)
        l = tl.load(l_ptr + rows)
        m_max = tl.max(m, axis=0)
        w = tl.exp(m - m_max)  # splits with no valid key have m = -inf: weight 0
        acc = tl.load(acc_ptr + rows[:, None] * D + offs_d[None, :])
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + pid * D + offs_d, out.to(out_ptr.dtype.element_ty))


def splitkv_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    advance: torch.Tensor | None = None,
) -> torch.Tensor:
    """query (1, Hq, 1, D), key/value (1, Hkv, S, D) contiguous, mask (S,) bool or None -> (1, 1, Hq, D).
    advance: a one-element integer tensor (a StaticLayer's length) the combine kernel adds 1 to."""
    _, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    block_g = max(16, triton.next_power_of_2(groups))  # tl.dot needs at least 16 rows
    block_s = 64
    chunk = block_s * triton.cdiv(length, NUM_SPLITS * block_s)
    rows = kv_heads * NUM_SPLITS * block_g
    acc = torch.empty(rows, dim, device=query.device, dtype=torch.float32)
    m = torch.empty(rows, device=query.device, dtype=torch.float32)
    l = torch.empty(rows, device=query.device, dtype=torch.float32)
    out = torch.empty(1, 1, heads, dim, device=query.device, dtype=query.dtype)
    q = query.reshape(heads, dim).contiguous()
    has_mask = mask is not None
    launch_pdl = pdl.use(q)
    _splitkv_partial[(kv_heads, NUM_SPLITS)](
        q,
        key,
        value,
        mask if has_mask else q,
        acc,
        m,
        l,
        length,
        chunk,
        scale,
        GROUPS=groups,
        BLOCK_G=block_g,
        D=dim,
        BLOCK_S=block_s,
        NSPLIT=NUM_SPLITS,
        HAS_MASK=has_mask,
        IEEE=query.dtype == torch.float32,
        PDL=launch_pdl,
        launch_pdl=launch_pdl,
        num_warps=4,
    )
    _splitkv_combine[(heads,)](
        acc,
        m,
        l,
        out,
        advance if advance is not None else m,
        GROUPS=groups,
        BLOCK_G=block_g,
        D=dim,
        NSPLIT=NUM_SPLITS,
        ADVANCE=advance is not None,
        PDL=launch_pdl,
        launch_pdl=launch_pdl,
        num_warps=4,
    )
    return out


def splitkv_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    advance: torch.Tensor | None = None,
    **kwargs,
):
    """Split-KV kernel for one-token, batch-1 queries with a boolean (or no) mask; else `gqa_decode_attention`.
    advance: a cache length to add 1 to once the keys are read (in the combine kernel where it runs)."""
    from knobsweep.models.fused_moe import triton_usable

    dim = query.shape[-1]
    usable = (
        query.shape[0] == 1
        and query.shape[2] == 1
        and triton_usable(query)
        and dim >= 16
        and dim & (dim - 1) == 0
        and key.is_contiguous()
        and value.is_contiguous()
        and (attention_mask is None or attention_mask.dtype == torch.bool)
    )
    if not usable:
        output = gqa_decode_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if advance is not None:
            advance.add_(1)
        return output
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1)[: key.shape[2]]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return splitkv_decode(query, key, value, mask, scale, advance), None


def register_splitkv() -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(SPLITKV_NAME, splitkv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SPLITKV_NAME, sdpa_mask)
    return SPLITKV_NAME


# --- the whole attention of a decode step, Qwen3 style (q/k RMSNorm per head, rotary, static cache) ----------
# transformers runs a one-token attention as ~15 kernels: three projections (the k and v GEMVs read 2 MB each
# but cost as much as the 16 MB q one: 5.5 us each on an H100), two per-head norms, the rotary embedding, and
# StaticLayer.update's arange, two length additions and two index_copy_ (9 us together). Here: one GEMV over
# the concatenated q/k/v weights, one Triton kernel for the norms, the rotary embedding and the key/value
# writes, the length increment, split-KV attention and the output projection.
QKV_WEIGHT = "_knobsweep_qkv_weight"
FUSED_ATTENTION_CLASSES = ("Qwen3VLMoeTextAttention", "Qwen3MoeAttention")
PROMPT_TOKENS_PER_PROGRAM = 16  # tokens per program of the norm/rope/cache kernel in a prompt's forward

if triton is not None:

    @triton.jit
    def _qk_norm_rope_store_kernel(
        qkv_ptr,
        q_norm_ptr,
        k_norm_ptr,
        cos_ptr,
        sin_ptr,
        query_ptr,
        keys_ptr,
        values_ptr,
        slot_ptr,
        TOKENS,
        T,
        S,
        stride_qb,
        stride_qh,
        stride_qt,
        eps,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        BLOCK_T: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # One program per BLOCK_T tokens and one head of the concatenated projection (batch, T tokens,
        # (HQ + 2 HKV) heads; TOKENS = batch x T): query heads, then key heads, then values; token t of row b
        # goes to cache slot (length + t).
        wait_for_previous_kernel(PDL)
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        head = tl.program_id(1)
        valid = (tokens < TOKENS)[:, None]
        b = (tokens // T).to(tl.int64)[:, None]
        t = (tokens % T)[:, None]
        half: tl.constexpr = D // 2
        offs = tl.arange(0, half)[None, :]
        row = qkv_ptr + (tokens.to(tl.int64)[:, None] * (HQ + 2 * HKV) + head) * D
        x1 = tl.load(row + offs, mask=valid, other=0.0).to(tl.float32)
        x2 = tl.load(row + half + offs, mask=valid, other=0.0).to(tl.float32)
        dtype = query_ptr.dtype.element_ty
        slot = tl.load(slot_ptr) + t
        if head < HQ + HKV:
            # RMSNorm over the head (fp32, rounded, times the weight, rounded: transformers' order), then the
            # rotary embedding with rotate_half's layout, in fp32 with one rounding (as the compiled rope).
            rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
            if head < HQ:
                w_ptr = q_norm_ptr
            else:
                w_ptr = k_norm_ptr
            n1 = ((x1 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + offs).to(tl.float32)).to(dtype)
            n2 = ((x2 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + half + offs).to(tl.float32)).to(
                dtype
            )
            n1 = n1.to(tl.float32)
            n2 = n2.to(tl.float32)
            angle = tokens.to(tl.int64)[:, None] * D + offs
            cos1 = tl.load(cos_ptr + angle, mask=valid, other=0.0).to(tl.float32)
            cos2 = tl.load(cos_ptr + angle + half, mask=valid, other=0.0).to(tl.float32)
            sin1 = tl.load(sin_ptr + angle, mask=valid, other=0.0).to(tl.float32)
            sin2 = tl.load(sin_ptr + angle + half, mask=valid, other=0.0).to(tl.float32)
            y1 = (n1 * cos1 - n2 * sin1).to(dtype)
            y2 = (n2 * cos2 + n1 * sin2).to(dtype)
            if head < HQ:  # query (batch, HQ, T, D), any strides but D's
                out = query_ptr + b * stride_qb + head * stride_qh + t * stride_qt
            else:
                out = keys_ptr + ((b * HKV + head - HQ) * S + slot) * D
            tl.store(out + offs, y1, mask=valid)
            tl.store(out + half + offs, y2, mask=valid)
        else:
            out = values_ptr + ((b * HKV + head - HQ - HKV) * S + slot) * D
            tl.store(out + offs, x1.to(dtype), mask=valid)
            tl.store(out + half + offs, x2.to(dtype), mask=valid)


def fusable_attention(attention: torch.nn.Module) -> bool:
    """A Qwen3-style attention the fused decode attention reproduces: per-head q/k RMSNorms, no biases, no
    output gate, same dtype and device for q/k/v."""
    if type(attention).__name__ not in FUSED_ATTENTION_CLASSES:
        return False
    projections = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if any(p is None or getattr(p, "bias", None) is not None for p in projections):
        return False
    weights = [p.weight for p in projections[:3]]
    return (
        all(type(w) is torch.nn.Parameter for w in weights)
        and len({(w.dtype, w.device) for w in weights}) == 1
        and weights[0].dtype.is_floating_point
        and hasattr(attention, "q_norm")
        and hasattr(attention, "k_norm")
    )


def concatenate_qkv(attention: torch.nn.Module) -> None:
    """Store q/k/v weights as row slices of one (q + k + v rows, hidden) tensor (idempotent): the projections
    keep their parameters (now views), the decode step reads all three in one GEMV; no extra memory."""
    if QKV_WEIGHT in attention.__dict__:
        return
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    weight = torch.cat([p.weight.detach() for p in projections])
    start = 0
    for p in projections:
        rows = p.weight.shape[0]
        p.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        start += rows
    setattr(attention, QKV_WEIGHT, weight)


# Output projection with the residual addition (`decode_block`): one program per GEMV_BLOCK_N rows of the
# weight, GEMV_BLOCK_K columns per iteration, GEMV_WARPS warps (measured on an H100 at the real shapes,
# bench/decode_ops.py: 8.4 us per block against 12.2 for cuBLAS's GEMV and the addition).
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS = 4, 1024, 8
# The q/k/v GEMV with the block's input norm folded in (`decode_block.FOLD_NORMS`): a whole 2,048-column row per
# program and 4 warps (bench/decode_ops.py, H200: 8.4 us per block against 8.9 with the output projection's
# parameters and 10.0 for the norm's kernel and cuBLAS's GEMV).
NORMED_GEMV_BLOCK_N, NORMED_GEMV_BLOCK_K, NORMED_GEMV_WARPS = 4, 2048, 4
GEMV_MAX_ROWS = 4  # inputs of more rows go to cuBLAS (each program reads its weight rows once per input row)

if triton is not None:

    @triton.jit
    def _gemv_input(x_ptr, norm_w_ptr, start, offs, mask, rstd, NORM: tl.constexpr, dtype: tl.constexpr):
        # x[start + offs] in fp32; NORM: times rstd, rounded, times the norm's weight, rounded to dtype (rms_norm).
        x = tl.load(x_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            scale = tl.load(norm_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = (scale * (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)).to(dtype).to(tl.float32)
        return x

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        residual_ptr,
        norm_w_ptr,
        out_ptr,
        N,
        K,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        NORM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # out[r, n] = x[r] . w[n] in fp32, rounded to the output dtype; HAS_RESIDUAL: then plus residual[r, n],
        # rounded again (transformers' `residual + o_proj(x)` in two bf16 operations). NORM: x[r] is first
        # RMS-normalised with weight norm_w and epsilon eps, rounded as `rms_norm.rms_norm` does (each program
        # normalises the row again from L2: one launch, the norm's, fewer).
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row = tl.program_id(1)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        # The first tile of weights before waiting for the previous kernel (constants: with PDL the load overlaps
        # the previous kernel's end).
        w = tl.load(
            w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0
        )
        wait_for_previous_kernel(PDL)
        if NORM:
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_ptr + row * K + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
                squares += x * x
            rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        else:
            rstd = 1.0
        x = _gemv_input(x_ptr, norm_w_ptr, row * K, offs_k, mask_k, rstd, NORM, w_ptr.dtype.element_ty)
        acc = w.to(tl.float32) * x[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            offs = k0 + offs_k
            mask = offs < K
            x = _gemv_input(x_ptr, norm_w_ptr, row * K, offs, mask, rstd, NORM, w_ptr.dtype.element_ty)
            w = tl.load(
                w_ptr + offs_n[:, None] * K + offs[None, :], mask=mask_n[:, None] & mask[None, :], other=0.0
            )
            acc += w.to(tl.float32) * x[None, :]
        dtype = out_ptr.dtype.element_ty
        y = tl.sum(acc, axis=1).to(dtype)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * N + offs_n, mask=mask_n, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(out_ptr + row * N + offs_n, y, mask=mask_n)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    block_n: int = GEMV_BLOCK_N,
    block_k: int = GEMV_BLOCK_K,
    num_warps: int = GEMV_WARPS,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ residual, added after rounding the product) by `_gemv_kernel`: x (rows, K), weight (N, K)
    contiguous, residual (rows, N); norm: (weight (K,), epsilon) of an RMSNorm applied to x first, as
    `rms_norm.rms_norm` (then x's dtype must be the weight's)."""
    rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    launch_pdl = pdl.use(x)
    _gemv_kernel[(triton.cdiv(n, block_n), rows)](
        x,
        weight,
        out if residual is None else residual,
        norm_weight,
        out,
        n,
        k,
        eps,
        HAS_RESIDUAL=residual is not None,
        NORM=norm is not None,
        PDL=launch_pdl,
        launch_pdl=launch_pdl,
        BLOCK_N=block_n,
        BLOCK_K=min(block_k, triton.next_power_of_2(k)),
        num_warps=num_warps,
    )
    return out


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ weight.T with the product rounded first (transformers' order); x (..., K), weight (N, K),
    residual (..., N). `gemv` (the addition in its epilogue) for up to GEMV_MAX_ROWS rows where Triton runs;
    torch otherwise."""
    from knobsweep.models.fused_moe import triton_usable

    k = x.shape[-1]
    rows = x.numel() // k
    if rows > GEMV_MAX_ROWS or not triton_usable(x) or not weight.is_contiguous():
        return residual + F.linear(x, weight)
    out = gemv(x.reshape(rows, k).contiguous(), weight, residual.reshape(rows, -1).contiguous())
    return out.view(residual.shape)


def foldable_norm(norm: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a kernel may apply `norm` to its input x itself (`gemv`'s NORM, `fused_moe.route_normed`): a
    transformers RMSNorm `rms_norm` reproduces, running its class's forward or `rms_norm_forward` (no other
    forward set on the instance, e.g. a hook's), whose weight and x have the dtype of the `weight` that
    multiplies the result, on a device where Triton runs."""
    from knobsweep.models import rms_norm
    from knobsweep.models.fused_moe import triton_usable

    forward = norm.__dict__.get("forward")
    return (
        rms_norm.fusable_norm(norm)
        and (forward is None or getattr(forward, "__func__", None) is rms_norm.rms_norm_forward)
        and norm.weight.shape == x.shape[-1:]
        and norm.weight.dtype == x.dtype == weight.dtype
        and triton_usable(x)
    )


def cache_from_kwargs(kwargs: dict) -> Any:
    """The cache among a transformers forward's keyword arguments: `past_key_values` in transformers 5.17,
    `cache` in newer 5.x; None if neither."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _static_layer(attention: torch.nn.Module, kwargs: dict) -> Any:
    """The initialised StaticLayer of `attention`'s layer in the cache among a forward's keyword arguments, or
    None."""
    from transformers.cache_utils import StaticLayer

    cache = cache_from_kwargs(kwargs)
    if cache is None or QKV_WEIGHT not in attention.__dict__:
        return None
    index = attention.layer_idx
    layer = cache.layers[index] if index < len(cache.layers) else None
    return layer if isinstance(layer, StaticLayer) and layer.is_initialized else None


def decode_cache_layer(attention: torch.nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> Any:
    """The initialised StaticLayer a one-token decode step of `attention` writes to, from the forward's keyword
    arguments; None where the fused step does not apply (prefill, another cache, q/k/v not concatenated)."""
    return _static_layer(attention, kwargs) if hidden_states.shape[1] == 1 else None


def _kernel_applies(self: torch.nn.Module, x: torch.Tensor) -> bool:
    from knobsweep.models.fused_moe import triton_usable

    half = self.head_dim // 2
    return triton_usable(x) and self.head_dim % 2 == 0 and half & (half - 1) == 0


def _project_into_cache(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple,
    layer: Any,
    norm: torch.nn.Module | None = None,
) -> torch.Tensor:
    """q/k/v of (batch, T) tokens in one GEMM over the concatenated weights, then `_qk_norm_rope_store_kernel`:
    the normalised, rotated keys and the values written into `layer` from its length on (not advanced); returns
    the queries (batch, heads, T, head_dim), stored token-major ((batch, T, heads, head_dim) in memory): sdpa's
    output then comes token-major too and transformers' transpose to (batch, T, heads x head_dim) copies
    nothing (a 15 MB copy per block of an 1898-token prefill otherwise). `norm`: the block's input RMSNorm,
    applied to hidden_states first (inside the GEMV where `foldable_norm` allows)."""
    batch, length, hidden = hidden_states.shape
    dim = self.head_dim
    heads = self.q_proj.weight.shape[0] // dim
    kv_heads = self.k_proj.weight.shape[0] // dim
    weight = self.__dict__[QKV_WEIGHT]
    if norm is not None and foldable_norm(norm, hidden_states, weight) and batch * length <= GEMV_MAX_ROWS:
        rows = hidden_states.reshape(-1, hidden).contiguous()
        qkv = gemv(
            rows,
            weight,
            block_n=NORMED_GEMV_BLOCK_N,
            block_k=NORMED_GEMV_BLOCK_K,
            num_warps=NORMED_GEMV_WARPS,
            norm=(norm.weight, float(norm.variance_epsilon)),
        ).view(batch, length, -1)
    else:
        if norm is not None:
            hidden_states = norm(hidden_states)
        qkv = F.linear(hidden_states, weight).contiguous()
    cos, sin = position_embeddings
    query = torch.empty(batch, length, heads, dim, dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
    tokens = batch * length
    # A decode step's few tokens: one per program (one warp each); a prompt's: PROMPT_TOKENS_PER_PROGRAM per
    # program (one token per program made the 1898-token prefill's kernel 48 us, 2.3 ms of 45 per prefill).
    per_program = 1 if tokens <= 4 else PROMPT_TOKENS_PER_PROGRAM
    launch_pdl = pdl.use(qkv)
    _qk_norm_rope_store_kernel[(triton.cdiv(tokens, per_program), heads + 2 * kv_heads)](
        qkv,
        self.q_norm.weight,
        self.k_norm.weight,
        cos.contiguous(),
        sin.contiguous(),
        query,
        layer.keys,
        layer.values,
        layer.cumulative_length,
        tokens,
        length,
        layer.keys.shape[2],
        *query.stride()[:3],
        float(self.q_norm.variance_epsilon),
        HQ=heads,
        HKV=kv_heads,
        D=dim,
        BLOCK_T=per_program,
        PDL=launch_pdl,
        launch_pdl=launch_pdl,
        num_warps=1 if per_program == 1 else 4,
    )
    return query


def attention_step(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: Any,
    layer: Any,
    residual: torch.Tensor | None = None,
    norm: torch.nn.Module | None = None,
) -> torch.Tensor:
    """One decode step of a Qwen3-style attention over its static cache layer (`decode_cache_layer`): the
    attention output, plus `residual` if given (added in the output projection's kernel where Triton runs).
    `norm`: an RMSNorm applied to hidden_states first (the block's input norm; inside the q/k/v GEMV on CUDA).
    Same arithmetic as transformers' up to rounding: the q/k/v projection is one GEMV, the norms, rotary
    embedding and cache writes one Triton kernel on CUDA (`_project_into_cache`; transformers' own ops
    elsewhere), attention `splitkv_attention`, which also advances the cache's length."""
    batch = hidden_states.shape[0]
    if _kernel_applies(self, hidden_states):
        query = _project_into_cache(self, hidden_states, position_embeddings, layer, norm)
        keys, values, advance = layer.keys, layer.values, layer.cumulative_length
    else:
        import sys

        if norm is not None:
            hidden_states = norm(hidden_states)

        dim = self.head_dim
        heads = self.q_proj.weight.shape[0] // dim
        kv_heads = self.k_proj.weight.shape[0] // dim
        qkv = F.linear(hidden_states, self.__dict__[QKV_WEIGHT])
        cos, sin = position_embeddings
        rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
        q, k, v = qkv.view(batch, 1, -1, dim).split((heads, kv_heads, kv_heads), dim=2)
        query, key = rope(self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), cos, sin)
        keys, values = cache.update(key, v.transpose(1, 2), self.layer_idx)
        advance = None  # cache.update advanced it
    output, _ = splitkv_attention(
        self, query, keys, values, attention_mask, scaling=self.scaling, advance=advance
    )
    output = output.reshape(batch, 1, -1)
    if residual is None:
        return self.o_proj(output.contiguous())
    return linear_residual(output, self.o_proj.weight, residual)


def fused_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention's forward for one-token decode steps over a static cache (set on the instance by the fast
    paths): `attention_step`; anything else goes to the class's forward."""
    layer = decode_cache_layer(self, hidden_states, kwargs)
    if layer is None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
    cache = cache_from_kwargs(kwargs)
    return attention_step(self, hidden_states, position_embeddings, attention_mask, cache, layer), None


def prompt_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention's forward for a prompt written into an EMPTY static cache from slot 0 under a causal mask:
    the fast paths' graphed prefill (`fast_path.PrefillGraph`), which sets it on the instance only around its
    forward. q/k/v in one GEMM over the concatenated weights, `_project_into_cache` for every token, then
    transformers' sdpa attention with no mask (causal) over the prompt's own slots, which is what the causal
    mask over the whole cache lets each query see: without it, sdpa walks every slot of the cache under the
    mask (10 ms of an H100's 1898-token prefill against 3.5). The class's forward where the kernel does not
    run."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = _static_layer(self, kwargs)
    if layer is None or not _kernel_applies(self, hidden_states):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
    batch, length, _ = hidden_states.shape
    query = _project_into_cache(self, hidden_states, position_embeddings, layer)
    layer.cumulative_length.add_(length)
    output, _ = sdpa_attention_forward(
        self, query, layer.keys[:, :, :length], layer.values[:, :, :length], None, scaling=self.scaling
    )
    return self.o_proj(output.reshape(batch, length, -1).contiguous()), None
