"""What each piece of a decode step's decoder block costs inside a CUDA graph, and what fusing pieces would save.

A graphed decode step of the real-size model is ~1,000 kernels; at batch 1 most read a few MB or less, so each
costs its launch slot in the graph as much as its bytes. This script times, per block, the pieces outside the
experts at Qwen3-VL-30B-A3B's shapes (bf16, batch 1): each op is captured `--blocks` times in one graph with a
distinct weight per copy (the step's weights do not fit in L2 either), the graph replayed, CUDA events around
the replays, time divided by the copies. Candidates:

- `rmsnorm_eager` / `rmsnorm_compiled`: transformers' RMSNorm, eager and through torch.compile;
- `qkv_3_linear` / `qkv_concat_linear`: q, k and v projections as three cuBLAS GEMVs or one over concatenated
  weights; `rms_qkv_triton`: the input RMSNorm and the concatenated projection in one Triton kernel;
- `o_proj_linear` / `o_proj_addmm`: the output projection, and with the residual add fused (addmm);
- `router_eager` / `router_compiled`: router GEMV + softmax + top-k + renormalisation; `router_triton_e*`: the
  fast paths' Triton router (`fused_moe.route`, * experts per program of its GEMV);
- `pre_attention_fused`: the fast paths' attention up to split-KV attention (q/k/v GEMV, one kernel for the
  norms, rope and cache writes, the length increment), against ~12 kernels in transformers' code;
- `o_proj_linear_add`: cuBLAS output projection then the residual addition (transformers' two kernels), against
  `o_proj_gemv_n*_k*_w*`: the Triton GEMV with the addition in its epilogue (`decode_attention.gemv`: rows per
  program, columns per iteration, warps), and `qkv_gemv_*` the same kernel for the q/k/v projection;
- `experts_*`: the decode experts kernels (`fused_moe`) at top-k 8 and 1 with their launch parameters swept.

Run: python -m bench.decode_ops --out bench/results/<card>_decode_ops.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K = 2048, 32, 4, 128, 128, 8
EPS = 1e-6


if triton is not None:

    @triton.jit
    def _rms_gemv_kernel(x_ptr, norm_ptr, w_ptr, out_ptr, N, K: tl.constexpr, eps, BLOCK_N: tl.constexpr):
        # One program: BLOCK_N output rows; x (K,) normalised in fp32, rounded to bf16, times the norm weight
        # (rounded, as transformers' RMSNorm does), then dotted with the rows.
        offs_k = tl.arange(0, K)
        x = tl.load(x_ptr + offs_k).to(tl.float32)
        rms = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
        xn = (x * rms).to(tl.bfloat16) * tl.load(norm_ptr + offs_k)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=offs_n[:, None] < N, other=0.0)
        acc = tl.sum(w.to(tl.float32) * xn.to(tl.float32)[None, :], axis=1)
        tl.store(out_ptr + offs_n, acc.to(tl.bfloat16), mask=offs_n < N)


def rms_gemv(x: torch.Tensor, norm_w: torch.Tensor, w: torch.Tensor, block_n: int) -> torch.Tensor:
    n, k = w.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _rms_gemv_kernel[(triton.cdiv(n, block_n),)](x, norm_w, w, out, n, k, EPS, BLOCK_N=block_n)
    return out


def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def router(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.softmax(F.linear(x, w), dim=-1, dtype=torch.float)
    values, index = torch.topk(probs, TOP_K, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True)
    return values.to(x.dtype), index


def per_op_us(make: Callable[[int], Callable[[], object]], copies: int, reps: int) -> float:
    """Microseconds per op: `copies` ops (each with its own weights) captured in one graph, replayed `reps`
    times after warm-up."""
    ops = [make(i) for i in range(copies)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for op in ops:
                op()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for op in ops:
            op()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    times.sort()
    return times[len(times) // 2]


def expert_cases(blocks: int, x: torch.Tensor, residual: torch.Tensor) -> dict:
    """The decode experts' kernels (one token; distinct experts per copy: only the routed ones, E = top-k) at
    the real shapes, with their launch parameters swept, and `moe_fused` as the fast paths call it."""
    from knobsweep.models import fused_moe

    inter, dev, bf = 768, x.device, x.dtype
    cases: dict[str, Callable[[int], Callable[[], object]]] = {}
    for k in (8, 4, 2, 1):
        gate_up = [torch.randn(k, 2 * inter, HIDDEN, device=dev, dtype=bf) * 0.02 for _ in range(blocks)]
        down = [torch.randn(k, HIDDEN, inter, device=dev, dtype=bf) * 0.02 for _ in range(blocks)]
        ids = torch.arange(k, device=dev).view(1, k)
        weights = torch.full((1, k), 1.0 / k, device=dev, dtype=bf)
        act = torch.empty(k, inter, device=dev, dtype=bf)
        y = torch.empty(k, HIDDEN, device=dev, dtype=bf)
        out = torch.empty(1, HIDDEN, device=dev, dtype=bf)
        cases[f"experts_k{k}_moe_fused"] = lambda i, g=gate_up, d=down, ids=ids, w=weights: (
            lambda: fused_moe.moe_fused(x, g[i], d[i], ids, w, residual=residual)
        )
        for bn, bh, nw in ((4, 256, 4), (4, 512, 4), (2, 1024, 8), (4, 1024, 8), (4, 2048, 8), (8, 1024, 8)):

            def gate_up_case(i, g=gate_up, ids=ids, act=act, k=k, bn=bn, bh=bh, nw=nw):
                grid = (k, triton.cdiv(inter, bn))
                return lambda: fused_moe._gate_up_kernel[grid](
                    x, g[i], ids, act, HIDDEN, inter, k, BLOCK_N=bn, BLOCK_H=bh, num_warps=nw
                )

            cases[f"experts_k{k}_gate_up_n{bn}_h{bh}_w{nw}"] = gate_up_case
        for bn, bi, nw in ((8, 256, 4), (4, 256, 4), (4, 512, 4), (8, 512, 8), (4, 1024, 8), (16, 256, 4)):
            if k == 1:  # one pair: the down kernel that also weights and sums (no combine kernel)

                def down_case(i, d=down, ids=ids, w=weights, act=act, out=out, bn=bn, bi=bi, nw=nw):
                    grid = (1, triton.cdiv(HIDDEN, bn))
                    return lambda: fused_moe._down_kernel[grid](
                        act,
                        d[i],
                        ids,
                        w,
                        out,
                        out,
                        HIDDEN,
                        inter,
                        1,
                        HAS_RESIDUAL=False,
                        BLOCK_N=bn,
                        BLOCK_I=bi,
                        num_warps=nw,
                    )

                cases[f"experts_k1_down_n{bn}_i{bi}_w{nw}"] = down_case
                continue

            def down_pair_case(i, d=down, ids=ids, act=act, y=y, k=k, bn=bn, bi=bi, nw=nw):
                grid = (k, triton.cdiv(HIDDEN, bn))
                return lambda: fused_moe._down_pair_kernel[grid](
                    act, d[i], ids, y, HIDDEN, inter, BLOCK_N=bn, BLOCK_I=bi, num_warps=nw
                )

            cases[f"experts_k{k}_down_pair_n{bn}_i{bi}_w{nw}"] = down_pair_case
    return cases


def folded_cases(x, residual, w_norm, w_qkv, w_router) -> dict:
    """The kernels that fold a block's norms, router and experts' combine (`decode_block.FOLD_NORMS`) against the
    kernels they replace, with launch parameters swept: the input norm in the q/k/v GEMV (`qkv_norm_gemv_*`;
    `qkv_norm_separate`: rms_norm then cuBLAS), the post-attention norm, router logits, softmax and top-k in one
    kernel (`router_normed_w*`; `router_separate`: rms_norm then `route`'s two kernels), the experts' combine in
    the down projection at top-k 8 (`down_pair_combine_*`; `down_pair_then_combine`: the two kernels)."""
    from knobsweep.models import decode_attention, fused_moe, rms_norm

    inter, dev, bf, k = 768, x.device, x.dtype, TOP_K
    blocks = len(w_qkv)
    cases: dict[str, Callable[[int], Callable[[], object]]] = {
        "qkv_norm_separate": lambda i: lambda: F.linear(rms_norm.rms_norm(x, w_norm[i], EPS), w_qkv[i]),
        "router_separate": lambda i: (
            lambda: fused_moe.route(rms_norm.rms_norm(x, w_norm[i], EPS), w_router[i], TOP_K, True)
        ),
    }
    for bn, bk, nw in ((4, 1024, 8), (4, 2048, 8), (8, 1024, 8), (8, 2048, 8), (2, 2048, 4), (4, 2048, 4)):
        cases[f"qkv_norm_gemv_n{bn}_k{bk}_w{nw}"] = lambda i, bn=bn, bk=bk, nw=nw: (
            lambda: decode_attention.gemv(x, w_qkv[i], None, bn, bk, nw, norm=(w_norm[i], EPS))
        )
    for nw in (1, 2, 4, 8):
        cases[f"router_normed_w{nw}"] = lambda i, nw=nw: (
            lambda: fused_moe.route_normed(x, w_norm[i], EPS, w_router[i], TOP_K, True, num_warps=nw)
        )
    down = [torch.randn(k, HIDDEN, inter, device=dev, dtype=bf) * 0.02 for _ in range(blocks)]
    ids = torch.arange(k, device=dev).view(1, k)
    weights = torch.full((1, k), 1.0 / k, device=dev, dtype=bf)
    act = torch.randn(k, inter, device=dev, dtype=bf)
    y = torch.empty(k, HIDDEN, device=dev, dtype=bf)
    out = torch.empty(1, HIDDEN, device=dev, dtype=bf)

    def separate(i: int) -> Callable[[], object]:
        def run() -> None:
            fused_moe._down_pair_kernel[(k, triton.cdiv(HIDDEN, 8))](
                act, down[i], ids, y, HIDDEN, inter, BLOCK_N=8, BLOCK_I=256, num_warps=4
            )
            fused_moe._combine(y, None, weights, out, round_product=False, residual=residual)

        return run

    cases["down_pair_then_combine"] = separate
    for bn, bi, nw in ((8, 256, 4), (16, 256, 4), (8, 512, 4), (16, 512, 8), (32, 256, 8), (4, 1024, 4)):
        counts = fused_moe.arrival_counts(dev, f"bench_n{bn}", triton.cdiv(HIDDEN, bn))

        def folded(i, bn=bn, bi=bi, nw=nw, counts=counts):
            return lambda: fused_moe._down_pair_combine_kernel[(k, triton.cdiv(HIDDEN, bn))](
                act,
                down[i],
                ids,
                weights,
                y,
                residual,
                out,
                counts,
                HIDDEN,
                inter,
                k,
                HAS_RESIDUAL=True,
                BLOCK_N=bn,
                BLOCK_I=bi,
                num_warps=nw,
            )

        cases[f"down_pair_combine_n{bn}_i{bi}_w{nw}"] = folded
    return cases


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--blocks", type=int, default=48)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument(
        "--only", nargs="*", default=(), help="time only the cases whose names start with one of these"
    )
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    dev, bf = "cuda", torch.bfloat16
    n_qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    q_rows = HEADS * HEAD_DIM
    x = torch.randn(1, HIDDEN, device=dev, dtype=bf)
    residual = torch.randn(1, HIDDEN, device=dev, dtype=bf)
    attn = torch.randn(1, q_rows, device=dev, dtype=bf)
    L = args.blocks
    w_qkv = [torch.randn(n_qkv, HIDDEN, device=dev, dtype=bf) * 0.02 for _ in range(L)]
    w_o = [torch.randn(HIDDEN, q_rows, device=dev, dtype=bf) * 0.02 for _ in range(L)]
    w_router = [torch.randn(EXPERTS, HIDDEN, device=dev, dtype=bf) * 0.02 for _ in range(L)]
    w_norm = [torch.randn(HIDDEN, device=dev, dtype=bf) for _ in range(L)]
    kv = KV_HEADS * HEAD_DIM
    w_q = [w[:q_rows] for w in w_qkv]
    w_k = [w[q_rows : q_rows + kv] for w in w_qkv]
    w_v = [w[q_rows + kv :] for w in w_qkv]
    rms_c = torch.compile(rmsnorm, dynamic=False)
    router_c = torch.compile(router, dynamic=False)
    results: dict[str, float] = {}
    cases: dict[str, Callable[[int], Callable[[], object]]] = {
        "rmsnorm_eager": lambda i: lambda: rmsnorm(x, w_norm[i]),
        "rmsnorm_compiled": lambda i: lambda: rms_c(x, w_norm[i]),
        "qkv_3_linear": lambda i: lambda: (F.linear(x, w_q[i]), F.linear(x, w_k[i]), F.linear(x, w_v[i])),
        "qkv_concat_linear": lambda i: lambda: F.linear(x, w_qkv[i]),
        "o_proj_linear": lambda i: lambda: F.linear(attn, w_o[i]),
        "o_proj_addmm": lambda i: lambda: torch.addmm(residual, attn, w_o[i].t()),
        "residual_add": lambda i: lambda: residual + x,
        "router_eager": lambda i: lambda: router(x, w_router[i]),
        "router_compiled": lambda i: lambda: router_c(x, w_router[i]),
    }
    if triton is not None:
        from knobsweep.models import decode_attention, fused_moe

        for block_e in (1, 2, 4, 8):
            cases[f"router_triton_e{block_e}"] = lambda i, b=block_e: (
                lambda: fused_moe.route(x, w_router[i], TOP_K, True, block_e=b)
            )
        # q/k/v GEMV + norms, rope, cache writes (one kernel) + the length increment: the fused attention's
        # work before split-KV attention.
        slots = 2048
        keys = [torch.zeros(1, KV_HEADS, slots, HEAD_DIM, device=dev, dtype=bf) for _ in range(L)]
        values = [torch.zeros_like(k) for k in keys]
        lengths = [torch.tensor(100, device=dev) for _ in range(L)]
        q_norm = torch.ones(HEAD_DIM, device=dev, dtype=bf)
        cos = torch.randn(1, 1, HEAD_DIM, device=dev, dtype=bf)
        sin = torch.randn(1, 1, HEAD_DIM, device=dev, dtype=bf)

        def pre_attention(i: int) -> Callable[[], object]:
            def run() -> None:
                qkv = F.linear(x, w_qkv[i])
                query = torch.empty(1, HEADS, 1, HEAD_DIM, device=dev, dtype=bf)
                decode_attention._qk_norm_rope_store_kernel[(1, HEADS + 2 * KV_HEADS)](
                    qkv,
                    q_norm,
                    q_norm,
                    cos,
                    sin,
                    query,
                    keys[i],
                    values[i],
                    lengths[i],
                    slots,
                    EPS,
                    HQ=HEADS,
                    HKV=KV_HEADS,
                    D=HEAD_DIM,
                    num_warps=1,
                )
                lengths[i].add_(1)

            return run

        cases["pre_attention_fused"] = pre_attention
        cases["o_proj_linear_add"] = lambda i: lambda: residual + F.linear(attn, w_o[i])
        for bn, bk, nw in ((2, 512, 4), (4, 512, 4), (2, 1024, 8), (4, 1024, 8), (4, 2048, 8), (8, 1024, 8)):
            cases[f"o_proj_gemv_n{bn}_k{bk}_w{nw}"] = lambda i, bn=bn, bk=bk, nw=nw: (
                lambda: decode_attention.gemv(attn, w_o[i], residual, bn, bk, nw)
            )
        for bn, bk, nw in ((4, 512, 4), (2, 1024, 8), (4, 1024, 8), (4, 2048, 8), (8, 1024, 8)):
            cases[f"qkv_gemv_n{bn}_k{bk}_w{nw}"] = lambda i, bn=bn, bk=bk, nw=nw: (
                lambda: decode_attention.gemv(x, w_qkv[i], None, bn, bk, nw)
            )
        ref = (residual.float() + F.linear(attn, w_o[0]).float()).to(bf).float()
        got = decode_attention.gemv(attn, w_o[0], residual).float()
        results["o_proj_gemv_rel_err"] = float((got - ref).norm() / ref.norm())
        cases.update(expert_cases(L, x, residual))
        for block_n in (4, 8, 16, 32):
            cases[f"rms_qkv_triton_n{block_n}"] = lambda i, b=block_n: (
                lambda: rms_gemv(x.view(-1), w_norm[i], w_qkv[i], b)
            )
        ref = F.linear(rmsnorm(x, w_norm[0]), w_qkv[0]).view(-1).float()
        got = rms_gemv(x.view(-1), w_norm[0], w_qkv[0], 8).float()
        results["rms_qkv_triton_rel_err"] = float((got - ref).norm() / ref.norm())
        cases.update(folded_cases(x, residual, w_norm, w_qkv, w_router))
    for name, make in cases.items():
        if args.only and not name.startswith(tuple(args.only)):
            continue
        results[name] = per_op_us(make, L, args.reps)
        print(f"{name:24s} {results[name]:8.2f} us per block", flush=True)
    # Bytes each op must read, for its floor.
    size = 2
    results["bytes_qkv"] = n_qkv * HIDDEN * size
    results["bytes_o"] = HIDDEN * q_rows * size
    results["bytes_experts_k8"] = 8 * 3 * 768 * HIDDEN * size
    out = {
        "benchmark": "decode_ops",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "card": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": getattr(triton, "__version__", None)},
        "blocks": L,
        "us_per_block": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
