"""The experts kernels alone at Qwen3-VL-30B-A3B's shape (128 experts, hidden 2048, width 768, bf16), one MoE
block at a time over 8 blocks' weights (so that no block's experts stay in L2), on the GPU.

- decode (1 token, top-k 1..32): the fused Triton kernels with the down projection in one program per token
  (`split_down=False`) or split over (token, expert) pairs plus the combine kernel (`split_down=True`, for a
  few feature-block sizes), and a few gate/up row-block sizes, each block's call captured in one CUDA graph
  of 48 calls (a decode step's worth), against the bytes the routed experts must read / copy bandwidth;
- prefill (314..1898 tokens, top-k 1/8/32): transformers' `grouped_mm_experts_forward` (the version
  installed) against `moe_grouped`, un-graphed as the knob engine runs them, with the largest difference of
  their outputs.

    PYTHONPATH=workflow_scripts python -m bench.moe_kernels --out $OUT/moe_kernels.json
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


def routing(tokens: int, top_k: int, num_experts: int, device: str, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=g)
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


@keeps_torch_state
def main(argv: list[str] | None = None) -> dict:
    from transformers.integrations import moe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    device = "cuda"
    torch.set_grad_enabled(False)
    result = run_header("bench.moe_kernels", device)
    result["ceilings"] = measure_ceilings(device, tiny=False, reps=10)
    bandwidth = result["ceilings"]["copy_bytes_per_s"]
    config = make_config(tiny=False)
    experts = build_experts(config, BLOCKS, device)
    num_experts, inter2, hidden = experts[0].gate_up_proj.shape
    inter = inter2 // 2
    expert_bytes = 3 * hidden * inter * 2

    result["decode"] = []
    print("decode, us per block: floor, down unsplit / split by DOWN_BLOCK_N, gate/up by block", flush=True)
    for top_k in (1, 2, 4, 8, 16, 32):
        floor_us = top_k * expert_bytes / bandwidth * 1e6
        row = {"top_k": top_k, "floor_us": floor_us}
        row["unsplit_us"] = 1e3 * decode_ms(experts, top_k, False, device, args.reps)
        default_down = fused_moe.DOWN_BLOCK_N
        for block_n in (4, 8, 16):
            fused_moe.DOWN_BLOCK_N = block_n
            row[f"split{block_n}_us"] = 1e3 * decode_ms(experts, top_k, True, device, args.reps)
        fused_moe.DOWN_BLOCK_N = default_down
        default_gate_up = fused_moe.GATE_UP_BLOCK_N
        for block_n in (2, 4, 8, 16):  # gate/up rows per program, with the default down projection
            fused_moe.GATE_UP_BLOCK_N = block_n
            row[f"gate_up{block_n}_us"] = 1e3 * decode_ms(experts, top_k, None, device, args.reps)
        fused_moe.GATE_UP_BLOCK_N = default_gate_up
        row["default_us"] = 1e3 * decode_ms(experts, top_k, None, device, args.reps)
        result["decode"].append(row)
        print({k: round(v, 1) for k, v in row.items()}, flush=True)
        save_json(result, args.out)

    result["prefill"] = []
    print("prefill: tokens, top_k, transformers ms, moe_grouped ms, max |diff|", flush=True)
    for tokens, top_k in ((314, 8), (602, 8), (1034, 8), (1898, 8), (1898, 1), (1898, 32)):
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        routes = [routing(tokens, top_k, num_experts, device, seed) for seed in range(BLOCKS)]

        def run(fn, routes=routes, x=x):
            return [fn(e, x, ids, w) for e, (ids, w) in zip(experts, routes)]

        row = {"tokens": tokens, "top_k": top_k}
        for name, fn in (
            ("transformers_grouped_mm", moe.grouped_mm_experts_forward),
            ("moe_grouped", fused_moe.moe_grouped),
        ):
            samples = time_ms(lambda fn=fn: run(fn), reps=args.reps, warmup=3, device=device)
            row[f"{name}_ms"] = statistics.median(samples) / BLOCKS
        a = run(moe.grouped_mm_experts_forward)
        b = run(fused_moe.moe_grouped)
        row["max_abs_diff"] = max(float((u.float() - v.float()).abs().max()) for u, v in zip(a, b))
        row["bitwise_equal_blocks"] = sum(bool(torch.equal(u, v)) for u, v in zip(a, b))
        result["prefill"].append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        save_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
