"""The latency benchmark (bench/): byte and FLOP counts against hand counts and torch's FLOP counter, its
kernels against torch references, and an end-to-end run on CPU with the tiny config."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_in_triton_interpreter
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import floors
from bench.attention import gqa_decode_attention
from bench.fused_moe import moe_reference
from bench.latency import GRIDS, check_monotone, main, select_settings
from bench.model import build_model, kept_blocks, make_config, make_inputs, vision_grid

# Tiny text config (bench/model.py TINY): H=64, 4 heads, 2 KV heads, head_dim 16, 32 experts of width 32,
# vocab 256, 6 blocks. Hand counts of the parts, in elements:
ATTENTION = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 16  # q, k, v, o, q_norm, k_norm = 12,320
ROUTER = 32 * 64  # 2,048
EXPERT = 3 * 64 * 32  # gate, up, down = 6,144
LM_HEAD = 256 * 64  # 16,384


@pytest.fixture(scope="module")
def tiny_fp32():
    config = make_config(tiny=True, initializer_range=0.3)
    return config, build_model(config, "cpu", dtype=torch.float32)


def test_decode_bytes_match_a_hand_count():
    config = make_config(tiny=True)
    got = floors.decode_step_bytes(config, top_k=2, active_blocks=3, kv_len=10)
    assert got["attention"] == 3 * 12_320 * 2
    assert got["norms"] == (3 * 128 + 64) * 2
    assert got["router"] == 3 * 2_048 * 2
    assert got["experts"] == 3 * 2 * 6_144 * 2
    assert got["embedding_row"] == 64 * 2
    assert got["lm_head"] == 16_384 * 2
    assert got["kv_cache"] == 3 * 10 * (2 * 2 * 16) * 2
    assert got["total"] == 73_920 + 896 + 12_288 + 73_728 + 128 + 32_768 + 3_840
    with pytest.raises(ValueError, match="top_k=33"):
        floors.decode_step_bytes(config, top_k=33, active_blocks=3, kv_len=10)


def test_parameter_counts_match_the_built_model(tiny_fp32):
    config, model = tiny_fp32
    shape = floors.TextShape.from_config(config)
    assert shape.attention_params == ATTENTION
    layer = model.model.language_model.layers[0]
    assert sum(p.numel() for p in layer.parameters()) == (
        shape.attention_params + shape.block_norm_params + shape.router_params + 32 * shape.expert_params
    )
    assert model.lm_head.weight.numel() == shape.lm_head_params == LM_HEAD
    vision = floors.VisionShape.from_config(config)
    assert sum(p.numel() for p in model.model.visual.parameters()) == vision.params


def test_prefill_flops_match_a_hand_count():
    config = make_config(tiny=True)
    got = floors.prefill_flops(config, top_k=2, active_blocks=3, prompt_tokens=10)
    assert got["attention_proj"] == 3 * 2 * 10 * (ATTENTION - 32)
    assert got["attention_scores"] == 3 * 2 * 2 * 4 * 16 * 55  # 55 causal query-key pairs
    assert got["router"] == 3 * 2 * 10 * ROUTER
    assert got["experts"] == 3 * 2 * 10 * 2 * EXPERT
    assert got["lm_head"] == 2 * LM_HEAD
    assert got["total"] == 737_280 + 42_240 + 122_880 + 737_280 + 32_768


def test_prefill_flops_match_torch_flop_counter(tiny_fp32):
    """Eager experts compute only routed tokens and eager attention the full square, so the counter's total is
    ours with the causal half of the scores replaced by the full square."""
    config, model = tiny_fp32
    lm = model.model.language_model
    model.set_experts_implementation("eager")
    config.text_config._attn_implementation = "eager"
    try:
        n, top_k = 12, 4
        for layer in lm.layers:
            layer.mlp.gate.top_k = top_k
        ids = torch.randint(0, 200, (1, n))
        with FlopCounterMode(display=False) as counter:
            hidden = lm(input_ids=ids).last_hidden_state
            model.lm_head(hidden[:, -1])
    finally:
        for layer in lm.layers:
            layer.mlp.gate.top_k = 8
        config.text_config._attn_implementation = "sdpa"
        model.set_experts_implementation("grouped_mm")
    ours = floors.prefill_flops(config, top_k=top_k, active_blocks=6, prompt_tokens=n)
    full_square = 6 * 2 * 2 * 4 * 16 * n * n
    expected = ours["total"] - ours["attention_scores"] + full_square
    # transformers 5.17 builds M-RoPE angles with a matmul (3 sections x head_dim/2 x n); 5.24 does not.
    rope = 2 * 3 * (16 // 2) * n
    assert counter.get_total_flops() in (expected, expected + rope)


def test_vision_flops_match_torch_flop_counter(tiny_fp32):
    config, model = tiny_fp32
    config.vision_config._attn_implementation = "eager"
    try:
        inputs = make_inputs(config, 24, "cpu")
        with FlopCounterMode(display=False) as counter:
            model.model.visual(inputs.pixel_values.float(), grid_thw=inputs.image_grid_thw)
    finally:
        config.vision_config._attn_implementation = "sdpa"
    assert counter.get_total_flops() == floors.vision_flops(config, 24)["total"]


def test_floor_is_the_larger_term():
    c = floors.Ceilings(copy_bytes_per_s=2e12, matmul_flop_per_s=1e15)
    assert floors.floor_ms(1e12, 1e9, c) == {"compute_ms": 1.0, "memory_ms": 0.5, "floor_ms": 1.0}
    assert floors.expected_distinct_experts(128, 8, 0) == 0
    assert floors.expected_distinct_experts(128, 8, 10_000) == pytest.approx(128)


def test_positions_match_transformers_rope_index(tiny_fp32):
    config, model = tiny_fp32
    for vision_tokens in (6, 16, 24):
        inputs = make_inputs(config, vision_tokens, "cpu")
        token_types = (inputs.input_ids == config.image_token_id).int()
        positions, delta = model.model.get_rope_index(
            inputs.input_ids, mm_token_type_ids=token_types, image_grid_thw=inputs.image_grid_thw
        )
        assert torch.equal(positions, inputs.position_ids)
        assert int(delta) == inputs.next_position - inputs.prompt_tokens
        assert int((inputs.input_ids == config.image_token_id).sum()) == vision_tokens


def test_moe_reference_matches_transformers_experts(tiny_fp32):
    _, model = tiny_fp32
    experts = model.model.language_model.layers[1].mlp.experts
    model.set_experts_implementation("eager")
    try:
        x = torch.randn(3, 64)
        ids = torch.stack([torch.randperm(32)[:5] for _ in range(3)])
        weights = torch.softmax(torch.randn(3, 5), -1)
        expected = experts(x, ids, weights)
    finally:
        model.set_experts_implementation("grouped_mm")
    got = moe_reference(x, experts.gate_up_proj, experts.down_proj, ids, weights)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # fp32, different summation order


def test_gqa_decode_attention_matches_sdpa_with_expanded_heads():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module:  # what transformers' attention functions read from the attention module
        num_key_value_groups = 4
        is_causal = True
        training = False

    q, k, v = torch.randn(1, 8, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    mask = torch.zeros(1, 1, 1, 40, dtype=torch.bool)
    mask[..., :23] = True
    got, _ = gqa_decode_attention(Module(), q, k, v, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_triton_kernels_match_references_in_the_interpreter():
    """The decode kernels, run by Triton's CPU interpreter in fp32 (its bf16 dot is unreliable)."""
    pytest.importorskip("triton", reason="the Triton decode kernels need the triton package")
    script = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        import torch
        from torch.nn import functional as F
        from bench.fused_moe import moe_fused, moe_reference
        from bench.attention import splitkv_decode
        torch.manual_seed(0)
        errors = {}
        for m, k in [(1, 1), (1, 8), (3, 4)]:
            x = torch.randn(m, 96)
            gate_up, down = torch.randn(16, 80, 96) * 0.1, torch.randn(16, 96, 40) * 0.1
            ids = torch.stack([torch.randperm(16)[:k] for _ in range(m)])
            w = torch.softmax(torch.randn(m, k), -1)
            ref = moe_reference(x, gate_up, down, ids, w)
            errors[f"moe_{m}_{k}"] = float((moe_fused(x, gate_up, down, ids, w) - ref).norm() / ref.norm())
        for hq, hkv, s, d, valid in [(8, 2, 100, 16, 37), (4, 4, 70, 32, 70)]:
            q, kk, v = torch.randn(1, hq, 1, d), torch.randn(1, hkv, s, d), torch.randn(1, hkv, s, d)
            mask = torch.arange(s) < valid
            ref = F.scaled_dot_product_attention(q, kk.repeat_interleave(hq // hkv, 1),
                                                 v.repeat_interleave(hq // hkv, 1),
                                                 attn_mask=mask.view(1, 1, 1, s)).transpose(1, 2)
            got = splitkv_decode(q, kk, v, mask, d ** -0.5)
            errors[f"splitkv_{hq}_{hkv}_{s}"] = float((got - ref).norm() / ref.norm())
        print(errors)
        assert all(e < 1e-5 for e in errors.values()), errors
    """)
    run_in_triton_interpreter(script, str(ROOT))


def test_settings_blocks_and_grids():
    settings = select_settings(GRIDS["full"])
    assert settings[0].cell_id() == "vt1872_k8_b48"
    assert len(settings) == len(set(settings)) == 1 + 3 + 5 + 3 + 3
    assert {s.top_k for s in settings if (s.vision_tokens, s.active_blocks) == (1872, 48)} == {
        1,
        2,
        4,
        8,
        16,
        32,
    }
    for n in (1, 8, 16, 24, 48):
        keep = kept_blocks(48, n)
        assert len(keep) == n and keep[0] == 0 and keep == sorted(set(keep)) and keep[-1] <= 47
    with pytest.raises(ValueError, match="active_blocks=49"):
        kept_blocks(48, 49)
    for vt in (288, 576, 1008, 1872):
        rows, cols = vision_grid(vt)
        assert rows * cols == vt and rows <= cols <= 2 * rows


def test_monotone_check_flags_a_slower_smaller_knob():
    def r(k, ms):
        return {
            "path": "p",
            "stage": "decode",
            "vision_tokens": 1,
            "top_k": k,
            "active_blocks": 1,
            "cell": f"k{k}",
            "median_ms": ms,
        }

    out = check_monotone([r(1, 1.0), r(2, 2.0), r(4, 1.5)], tolerance=0.03)
    assert [(m["smaller"], m["larger"], m["monotone"]) for m in out] == [
        ("k1", "k2", True),
        ("k2", "k4", False),
    ]


def test_benchmark_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--out",
            str(out),
            "--reps",
            "2",
            "--warmup",
            "1",
            "--agree-steps",
            "4",
            "--max-settings",
            "2",
        ]
    )
    result = json.loads(out.read_text())
    paths = {
        "eager",
        "grouped_mm",
        "grouped_mm_static_graph",
        "lean_grouped",
        "fused_static_graph",
        "fused_regional_graph_tf_attention",
        "fused_regional_graph_separate_adds",
        "fused_regional_graph_unfolded",
        "fused_regional_graph_no_pdl",
        "fused_regional_graph",
    }
    assert set(result["paths"]) == paths
    measured = {(r["path"], r["stage"]) for r in result["rows"]}
    assert {(p, "decode") for p in paths} <= measured
    # the regional paths without prefill forwards of their own take fused_static_graph's prefill
    regional = {"fused_regional_graph_tf_attention", "fused_regional_graph_separate_adds"}
    assert {(p, "prefill") for p in paths - regional} | {("all", "vision")} <= measured
    assert not result["errors"]
    # Prefill floors read the experts the prompt was actually routed to (a random model routes unevenly).
    from bench import floors
    from bench.model import make_config

    config = make_config(tiny=True)
    prefills = [r for r in result["rows"] if r["stage"] == "prefill"]
    assert prefills
    for r in prefills:
        hit = r["experts_hit_per_block"]
        assert 1 <= hit <= config.text_config.num_experts
        expected = floors.prefill_bytes(config, r["top_k"], r["active_blocks"], r["prompt_tokens"], hit)[
            "total"
        ]
        assert r["bytes"] == pytest.approx(expected)
    for r in result["rows"]:
        assert (
            r["n"] == 2 and r["floor_ms"] > 0 and r["ratio"] == pytest.approx(r["median_ms"] / r["floor_ms"])
        )
    # Same weights, same prompt: every path continues greedily in (near) agreement with eager at fp32-free bf16.
    assert result["agreement"]["eager"]["all_equal"]
    assert all("tokens" in a and len(a["tokens"]) == 4 for a in result["agreement"].values())
    assert set(result["targets"]) == paths
    assert result["ceilings"]["used"]["copy_bytes_per_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile on CPU (inductor) needs a C++ compiler",
)
def test_regional_compile_is_shared_by_all_blocks_and_exact(tiny_fp32):
    """Compiling norms, MoE blocks and rope once must serve every block (no per-block recompiles) and
    change nothing numerically (inductor on CPU; ~25 s)."""
    from knobsweep.models.fast_path import RegionalCompile
    from torch import _dynamo as dynamo
    from torch._dynamo.utils import counters

    from bench import fused_moe

    _, model = tiny_fp32
    fused_moe.register()
    model.set_experts_implementation(fused_moe.NAME)
    lm = model.model.language_model
    dynamo.reset()
    counters.clear()
    regional = RegionalCompile(lm, list(lm.layers))
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.zeros(3, 1, 1, dtype=torch.long)
    try:
        with torch.no_grad():
            expected = lm(inputs_embeds=x, position_ids=positions).last_hidden_state
            regional.enable()
            got = lm(inputs_embeds=x, position_ids=positions).last_hidden_state
            got_again = lm(inputs_embeds=x, position_ids=positions).last_hidden_state
    finally:
        regional.disable()
        model.set_experts_implementation("grouped_mm")
    # 3 RMSNorm shapes, the MoE block, rope: one graph each, whatever the number of blocks (6 here).
    assert counters["stats"]["unique_graphs"] <= 5
    # fp32 summation order only (inductor reorders the norms' reductions): ~1e-6 on outputs of order 1.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_again, got, rtol=0, atol=0)


def test_preprocess_benchmark_on_cpu(tmp_path):
    """bench/preprocess.py end to end on CPU: the three ways of preprocessing, both passes, each part timed inside
    the stage, and the resizes' pixels compared (on CPU torchvision's uint8 path is within 2 levels of PIL's)."""
    from bench.preprocess import main as preprocess_main

    out = tmp_path / "pre.json"
    result = preprocess_main(
        ["--device", "cpu", "--n", "2", "--warmup", "0", "--vision-tokens", "64", "--out", str(out)]
    )
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert {(r["pass"], r["how"]) for r in result["rows"]} == {
        (p, h) for p in (1, 2) for h in ("host_resize", "device_resize", "token_ids")
    }
    for row in result["rows"]:
        parts = sum(row[k]["mean"] for k in ("resize", "prompt", "processor", "checks_and_copy", "positions"))
        assert parts <= row["stage"]["mean"] * 1.01 + 0.05  # the parts are inside the stage's clock
    assert len(result["repeatability"]) == 3
    assert result["token_ids_preprocess_mode"] == "image placeholders expanded on token ids"
    assert all(d["max_abs"] <= 2 for d in result["pixel_difference"]["64"])


def test_module_switch_counts_every_fused_and_regional_module():
    """bench.module_switch times the switch over all of a model's modules: per block an attention, a router, the
    block itself and 4 RMSNorms (input, post-attention, q, k) fused, plus the final norm; RegionalCompile holds
    every RMSNorm and each block's MLP."""
    from bench.module_switch import main as module_switch

    result = module_switch(["--blocks", "3", "--cycles", "5"])
    assert result["fused_modules"] == 3 * 3 + 4 * 3 + 1
    assert result["regional_modules"] == (4 * 3 + 1) + 3
    assert 0 < result["median_us"] <= result["p95_us"]


def test_capture_syncs_counts_synchronisation_warnings_by_the_stack_that_raised_them():
    """bench.request_syncs' collector on the CPU, fed the warning torch's sync debug mode raises: two from one
    call site and one from another give two stacks counted 2 and 1, each naming its caller; other warnings are not
    counted, and the warnings machinery is restored afterwards."""
    import warnings

    from bench.request_syncs import capture_syncs

    def drain():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    def read_twice():
        for _ in range(2):
            drain()

    def read_once():
        drain()

    show = warnings.showwarning
    with capture_syncs() as stacks:
        read_twice()
        read_once()
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert warnings.showwarning is show
    assert sorted(stacks.values()) == [1, 2]
    (twice,) = [s for s, n in stacks.items() if n == 2]
    (once,) = [s for s, n in stacks.items() if n == 1]
    assert twice.startswith("tests/test_bench.py:") and ":drain <- tests/test_bench.py:" in twice
    assert ":read_twice" in twice.split(" <- ")[1] and ":read_once" in once.split(" <- ")[1]


def test_request_syncs_runs_on_cpu_and_counts_nothing(tmp_path):
    from bench.request_syncs import main as request_syncs

    out = tmp_path / "syncs.json"
    result = request_syncs(["--tiny", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(r["kind"], r["syncs"]) for r in result["rows"]] == [("qa", None), ("captioning", None)]
    assert result["counted"] is False and all(r["output_tokens"] >= 1 for r in result["rows"])
