"""Host cost of switching the fused paths' forwards on and off, as every request's decode does
(`FusedModules.install` + `RegionalCompile.enable`, then `disable` + `uninstall`), on the CPU with the real
model's module count (48 blocks at a tiny width: the cost is per module, not per weight).

    PYTHONPATH=workflow_scripts python -m bench.module_switch --blocks 48 --cycles 2000

Development machine (2 cores), 2026-11-28: 767 us per switch through `nn.Module.__setattr__` (session 10's code),
114 us writing the instances' `__dict__` (session 11); two switches per request.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bench.model import build_model, make_config


def measure(blocks: int, cycles: int) -> dict:
    from knobsweep.models.fast_path import FusedModules, RegionalCompile

    config = make_config(tiny=True)
    config.text_config.num_hidden_layers = blocks
    model = build_model(config, "cpu", dtype=torch.float32)
    lm = model.model.language_model
    layers = list(lm.layers)
    fused = FusedModules(layers, [layer.mlp.gate for layer in layers], final_norm=lm.norm)
    regional = RegionalCompile(lm, layers)

    def switch() -> None:
        fused.install()
        regional.enable(fused.decode_modules())
        regional.disable()
        fused.uninstall()

    for _ in range(min(50, cycles)):
        switch()
    times = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        switch()
        times.append((time.perf_counter() - t0) * 1e6)
    return {
        "blocks": blocks,
        "fused_modules": len(fused.forwards),
        "regional_modules": len(regional.modules),
        "cycles": cycles,
        "median_us": float(np.median(times)),
        "p95_us": float(np.percentile(times, 95)),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=48, help="decoder blocks (Qwen3-VL-30B-A3B: 48)")
    p.add_argument("--cycles", type=int, default=2000)
    args = p.parse_args(argv)
    if args.blocks < 1 or args.cycles < 1:
        p.error(f"need --blocks >= 1 and --cycles >= 1 (got {args.blocks}, {args.cycles})")
    result = measure(args.blocks, args.cycles)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
