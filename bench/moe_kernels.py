"""The experts kernels alone at Qwen3-VL-30B-A3B's shape (128 experts, hidden 2048, width 768, bf16), one MoE
block at a time over 8 blocks' weights (so that no block's experts stay in L2), on the GPU.

- decode (1 token, top-k 1..32): the fused Triton kernels with the down projection in one program per token
  (`split_down=False`) or split over (token, expert) pairs plus the combine kernel (`split_down=True`, for a
  few feature-block sizes), and a few gate/up row-block sizes, each block's call captured in one CUDA graph
  of 48 calls (a decode step's worth), against the bytes the routed experts must read / copy bandwidth;
- prefill (314..1898 tokens, top-k 1/8/32): transformers' `grouped_mm_experts_forward` (the version
  installed) against `moe_grouped` with torch's grouped_mm (`triton_gemms=False`) and with its Triton GEMMs
  (`grouped_projection`), un-graphed as the knob engine runs them, with the largest difference of their
  outputs; routing near-uniform (a trained model's) or skewed (`--skew`: a random model's, fewer experts hit);
- `--sweep`: the Triton GEMMs' launch parameters (`fused_moe.GROUPED_CONFIGS`, one projection at a time) at
  1898 tokens, top-8.

    PYTHONPATH=workflow_scripts python -m bench.moe_kernels --out $OUT/moe_kernels.json [--only prefill --sweep]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from knobsweep.models import fused_moe

from bench import keeps_torch_state, run_header, save_json
from bench.latency import measure_ceilings, time_ms
from bench.model import make_config

BLOCKS = 8  # distinct weights cycled through: 8 x 1.2 GB, far beyond L2
CALLS_PER_GRAPH = 48  # one decode step's worth of MoE blocks


def build_experts(config, blocks: int, device: str) -> list[torch.nn.Module]:
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as modeling

    out = []
    with torch.device(device):
        for _ in range(blocks):
            experts = modeling.Qwen3VLMoeTextExperts(config.text_config).to(torch.bfloat16)
            torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
            torch.nn.init.normal_(experts.down_proj, std=0.02)
            out.append(experts)
    return out


def routing(tokens: int, top_k: int, num_experts: int, device: str, seed: int, skew: float = 0.0):
    """Softmax top-k routing of random logits; `skew` adds a per-expert offset of that standard deviation
    (popular and unpopular experts, as a random model's router produces)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=g)
    logits += skew * torch.randn(1, num_experts, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)
    return ids.to(device), weights.to(device)


def decode_ms(experts, top_k: int, split: bool, device: str, reps: int) -> float:
    """Median time of one block's decode experts, from a graph of CALLS_PER_GRAPH calls."""
    hidden = experts[0].gate_up_proj.shape[-1]
    x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
    routes = [routing(1, top_k, experts[0].num_experts, device, seed) for seed in range(CALLS_PER_GRAPH)]

    def step():
        for i, (ids, w) in enumerate(routes):
            e = experts[i % len(experts)]
            fused_moe.moe_fused(x, e.gate_up_proj, e.down_proj, ids, w, split_down=split)

    step()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    samples = time_ms(graph.replay, reps=reps, warmup=3, device=device)
    return statistics.median(samples) / CALLS_PER_GRAPH


def decode_rows(experts, bandwidth: float, device: str, reps: int) -> list[dict]:
    """Per top-k: the decode kernels' time per block with their launch parameters varied, and the floor."""
    _, inter2, hidden = experts[0].gate_up_proj.shape
    expert_bytes = 3 * hidden * (inter2 // 2) * 2
    rows = []
    print("decode, us per block: floor, down unsplit / split by DOWN_BLOCK_N, gate/up by block", flush=True)
    for top_k in (1, 2, 4, 8, 16, 32):
        floor_us = top_k * expert_bytes / bandwidth * 1e6
        row = {"top_k": top_k, "floor_us": floor_us}
        row["unsplit_us"] = 1e3 * decode_ms(experts, top_k, False, device, reps)
        default_down = fused_moe.DOWN_BLOCK_N
        for block_n in (4, 8, 16):
            fused_moe.DOWN_BLOCK_N = block_n
            row[f"split{block_n}_us"] = 1e3 * decode_ms(experts, top_k, True, device, reps)
        fused_moe.DOWN_BLOCK_N = default_down
        default_gate_up = fused_moe.GATE_UP_BLOCK_N
        for block_n in (2, 4, 8, 16):  # gate/up rows per program, with the default down projection
            fused_moe.GATE_UP_BLOCK_N = block_n
            row[f"gate_up{block_n}_us"] = 1e3 * decode_ms(experts, top_k, None, device, reps)
        fused_moe.GATE_UP_BLOCK_N = default_gate_up
        row["default_us"] = 1e3 * decode_ms(experts, top_k, None, device, reps)
        rows.append(row)
        print({k: round(v, 1) for k, v in row.items()}, flush=True)
    return rows


def prefill_ms(experts, fn, routes, x, reps: int) -> float:
    """Median time of one block's prefill experts (`fn(experts, x, ids, weights)`), over the BLOCKS blocks."""
    samples = time_ms(
        lambda: [fn(e, x, ids, w) for e, (ids, w) in zip(experts, routes)], reps=reps, warmup=3, device="cuda"
    )
    return statistics.median(samples) / BLOCKS


def prefill_row(experts, tokens: int, top_k: int, skew: float, device: str, reps: int) -> dict:
    """One prefill shape: the three experts paths' times per block, model TFLOP/s of the fastest Triton one,
    the experts hit, and the Triton and torch-GEMM outputs against transformers'."""
    from transformers.integrations import moe

    num_experts, inter2, hidden = experts[0].gate_up_proj.shape
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    routes = [routing(tokens, top_k, num_experts, device, seed, skew) for seed in range(BLOCKS)]
    paths = {
        "transformers_grouped_mm": moe.grouped_mm_experts_forward,
        "moe_grouped_torch_gemms": lambda *a: fused_moe.moe_grouped(*a, triton_gemms=False),
        "moe_grouped_triton": fused_moe.moe_grouped,
    }
    row = {
        "tokens": tokens,
        "top_k": top_k,
        "skew": skew,
        "experts_hit": statistics.mean(float(ids.unique().numel()) for ids, _ in routes),
    }
    for name, fn in paths.items():
        row[f"{name}_ms"] = prefill_ms(experts, fn, routes, x, reps)
    flops = 2 * tokens * top_k * 3 * hidden * (inter2 // 2)
    row["triton_tflops"] = flops / row["moe_grouped_triton_ms"] / 1e9
    reference = [moe.grouped_mm_experts_forward(e, x, ids, w).float() for e, (ids, w) in zip(experts, routes)]
    for name in ("moe_grouped_torch_gemms", "moe_grouped_triton"):
        got = [paths[name](e, x, ids, w).float() for e, (ids, w) in zip(experts, routes)]
        row[f"{name}_max_abs_diff"] = max(float((u - v).abs().max()) for u, v in zip(got, reference))
        row[f"{name}_rel_err"] = max(float((u - v).norm() / v.norm()) for u, v in zip(got, reference))
        row[f"{name}_bitwise_equal_blocks"] = sum(bool(torch.equal(u, v)) for u, v in zip(got, reference))
    return row


SWEEP_CONFIGS = [  # (block_m, block_n, block_k, warps, stages)
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 3),
    (64, 128, 64, 4, 4),
    (64, 128, 64, 8, 4),
    (64, 256, 64, 8, 3),
    (64, 128, 128, 4, 3),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
    (128, 128, 32, 8, 5),
    (128, 64, 128, 8, 3),
]


def sweep_grouped_configs(experts, device: str, reps: int, skew: float) -> list[dict]:
    """At 1898 tokens and top-8: moe_grouped's time per block with one projection's Triton launch parameters
    varied, the other's at their default."""
    num_experts, _, hidden = experts[0].gate_up_proj.shape
    default = dict(fused_moe.GROUPED_CONFIGS)
    rows = []
    print("sweep, 1898 tokens, top-8: projection, config, skew, ms per block", flush=True)
    for s in (0.0, skew):
        x = torch.randn(1898, hidden, device=device, dtype=torch.bfloat16)
        routes = [routing(1898, 8, num_experts, device, seed, s) for seed in range(BLOCKS)]
        for projection in ("gate_up", "down"):
            for config in SWEEP_CONFIGS:
                fused_moe.GROUPED_CONFIGS = {**default, projection: config}
                row = {"projection": projection, "config": list(config), "skew": s}
                try:
                    row["ms"] = prefill_ms(experts, fused_moe.moe_grouped, routes, x, reps)
                except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: recorded, the sweep goes on
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                rows.append(row)
                print(row, flush=True)
    fused_moe.GROUPED_CONFIGS = default
    return rows


@keeps_torch_state
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--only", choices=("all", "decode", "prefill"), default="all")
    p.add_argument("--skew", type=float, default=1.5, help="per-expert logit offset of the skewed routing")
    p.add_argument("--sweep", action="store_true", help="sweep the prefill's Triton GEMM launch parameters")
    args = p.parse_args(argv)
    device = "cuda"
    torch.set_grad_enabled(False)
    result = run_header("bench.moe_kernels", device)
    result["ceilings"] = measure_ceilings(device, tiny=False, reps=10)
    result["grouped_configs"] = {k: list(v) for k, v in fused_moe.GROUPED_CONFIGS.items()}
    experts = build_experts(make_config(tiny=False), BLOCKS, device)
    if args.only in ("all", "decode"):
        result["decode"] = decode_rows(experts, result["ceilings"]["copy_bytes_per_s"], device, args.reps)
        save_json(result, args.out)
    if args.sweep:
        result["sweep"] = sweep_grouped_configs(experts, device, args.reps, args.skew)
        save_json(result, args.out)
    if args.only in ("all", "prefill"):
        result["prefill"] = []
        print(
            "prefill, ms per block: transformers, moe_grouped (torch GEMMs), moe_grouped (Triton)", flush=True
        )
        for tokens, top_k in ((314, 8), (602, 8), (1034, 8), (1898, 8), (1898, 1), (1898, 32)):
            for skew in (0.0, args.skew):
                row = prefill_row(experts, tokens, top_k, skew, device, args.reps)
                result["prefill"].append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                save_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
