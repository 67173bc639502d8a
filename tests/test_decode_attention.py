"""The fused paths' decode-step attention, router and blocks (`fast_path.FusedModules`) against transformers'
modules: the attention (`decode_attention.fused_attention_forward`: concatenated q/k/v GEMV, norms, rotary
embedding and static-cache writes), the router (`fused_moe.route`: logits GEMV, softmax, top-k,
renormalisation) and a whole decoder block (`decode_block.fused_decoder_layer_forward`: residual additions in
the output projection's and the experts' kernels). On CPU the attention runs transformers' ops after the
concatenated GEMV; Triton's CPU interpreter runs the kernels."""

from __future__ import annotations

import copy
import inspect
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE, run_in_triton_interpreter
from knobsweep.models import decode_attention, fused_moe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model import build_model, make_config

PROMPT = 5


def _model_and_empty_cache(dtype: torch.dtype, batch: int, device: str, seed: int, slots: int = 16) -> tuple:
    """A tiny Qwen3-VL-MoE language model, an empty static cache of `slots` with every layer initialised, and the
    cache argument's name (`past_key_values` in transformers 5.17, `cache` in newer 5.x)."""
    from transformers import StaticCache

    torch.manual_seed(seed)
    model = build_model(make_config(tiny=True, initializer_range=0.3), device, dtype=dtype)
    text = model.model.language_model
    cache = StaticCache(config=text.config, max_cache_len=slots)
    for layer in cache.layers:
        empty = torch.zeros(batch, 2, 0, 16, device=device, dtype=dtype)
        layer.lazy_initialization(empty, empty)
    parameters = inspect.signature(type(text.layers[1].self_attn).forward).parameters
    return text, cache, "past_key_values" if "past_key_values" in parameters else "cache"


def _prefilled_step(dtype: torch.dtype, batch: int, device: str) -> dict:
    """A tiny Qwen3-VL-MoE language model, a static cache whose layer 1 holds a PROMPT-token prefill, and the
    inputs of the next (one-token) step."""
    text, cache, cache_arg = _model_and_empty_cache(dtype, batch, device, seed=0)
    attention = text.layers[1].self_attn
    hidden = text.config.hidden_size

    def positions(start: int, length: int) -> torch.Tensor:
        return torch.arange(start, start + length, device=device).expand(3, batch, length)

    prompt = torch.randn(batch, PROMPT, hidden, device=device, dtype=dtype)
    causal = torch.ones(PROMPT, 16, dtype=torch.bool, device=device).tril().view(1, 1, PROMPT, 16)
    with torch.no_grad():
        embeddings = text.rotary_emb(prompt, positions(0, PROMPT))
        type(attention).forward(
            attention, prompt, embeddings, causal.expand(batch, 1, PROMPT, 16), **{cache_arg: cache}
        )
        x = torch.randn(batch, 1, hidden, device=device, dtype=dtype)
        embeddings = text.rotary_emb(x, positions(PROMPT, 1))
    mask = torch.zeros(batch, 1, 1, 16, dtype=torch.bool, device=device)
    mask[..., : PROMPT + 1] = True
    return {
        "text": text,
        "cache": cache,
        "cache_arg": cache_arg,
        "x": x,
        "embeddings": embeddings,
        "mask": mask,
    }


def _cache_diffs(cache, reference_cache) -> dict[str, float]:
    layer, reference = cache.layers[1], reference_cache.layers[1]
    assert type(layer).__name__ == "StaticLayer", type(layer)
    return {
        "keys": float((layer.keys - reference.keys).abs().max()),
        "values": float((layer.values - reference.values).abs().max()),
        "length": float(layer.cumulative_length - reference.cumulative_length),
    }


def compare_attention(dtype: torch.dtype, batch: int, device: str = "cpu") -> dict[str, float]:
    """Largest absolute differences between one decode step of a Qwen3-VL-MoE attention through transformers
    and through `fused_attention_forward` (outputs, the cache's keys and values, its length), from the same
    static cache holding a PROMPT-token prefill."""
    step = _prefilled_step(dtype, batch, device)
    attention, cache, cache_arg = step["text"].layers[1].self_attn, step["cache"], step["cache_arg"]
    x, embeddings, mask = step["x"], step["embeddings"], step["mask"]
    with torch.no_grad():
        reference_cache = copy.deepcopy(cache)
        expected, _ = type(attention).forward(attention, x, embeddings, mask, **{cache_arg: reference_cache})
        decode_attention.concatenate_qkv(attention)
        got, _ = decode_attention.fused_attention_forward(
            attention, x, embeddings, mask, **{cache_arg: cache}
        )
    return {
        "output": float((got - expected).abs().max()),
        "scale": float(expected.abs().max()),
        **_cache_diffs(cache, reference_cache),
    }


def compare_prompt_attention(dtype: torch.dtype, batch: int, device: str = "cpu") -> dict[str, float]:
    """A 21-token prompt (more than one block of the norm/rope/cache kernel's tokens, not a multiple of it)
    written into an empty 24-slot static cache under a causal mask over the cache's slots, through
    transformers' attention and through `prompt_attention_forward` (the graphed prefill's)."""
    length, slots = 21, 24
    assert length > decode_attention.PROMPT_TOKENS_PER_PROGRAM
    text, cache, cache_arg = _model_and_empty_cache(dtype, batch, device, seed=1, slots=slots)
    attention = text.layers[1].self_attn
    x = torch.randn(batch, length, text.config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(length, device=device).expand(3, batch, length)
    causal = torch.ones(length, slots, dtype=torch.bool, device=device).tril().view(1, 1, length, slots)
    with torch.no_grad():
        embeddings = text.rotary_emb(x, positions)
        reference_cache = copy.deepcopy(cache)
        mask = causal.expand(batch, 1, length, slots)
        expected, _ = type(attention).forward(attention, x, embeddings, mask, **{cache_arg: reference_cache})
        decode_attention.concatenate_qkv(attention)
        got, _ = decode_attention.prompt_attention_forward(
            attention, x, embeddings, mask, **{cache_arg: cache}
        )
    return {
        "output": float((got - expected).abs().max()),
        "scale": float(expected.abs().max()),
        **_cache_diffs(cache, reference_cache),
    }


def compare_norm(dtype: torch.dtype, device: str = "cpu") -> float:
    """`rms_norm.rms_norm_forward` against transformers' Qwen3-VL-MoE RMSNorm on a (3, 5, 96) input (a width
    that is not a power of two) with a random weight: largest absolute difference."""
    from knobsweep.models import rms_norm
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRMSNorm

    torch.manual_seed(2)
    norm = Qwen3VLMoeTextRMSNorm(96, eps=1e-6).to(device=device, dtype=dtype)
    torch.nn.init.normal_(norm.weight, std=0.5)
    x = torch.randn(3, 5, 96, device=device, dtype=dtype) * 3
    with torch.no_grad():
        expected = norm(x)
        got = rms_norm.rms_norm_forward(norm, x)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    return float((got - expected).abs().max())


def compare_block(dtype: torch.dtype, batch: int, top_k: int, device: str = "cpu") -> dict[str, float]:
    """One decode step of a whole decoder block through transformers (its own attention, router and experts
    implementation) against `decode_block.fused_decoder_layer_forward` with the fused attention and router
    installed and the experts on "knobsweep_fused" (residual additions in the kernels where Triton runs)."""
    from knobsweep.models.fast_path import FusedModules

    step = _prefilled_step(dtype, batch, device)
    text, cache, cache_arg = step["text"], step["cache"], step["cache_arg"]
    block = text.layers[1]
    block.mlp.gate.top_k = top_k
    arguments = {"attention_mask": step["mask"], "position_embeddings": step["embeddings"]}
    with torch.no_grad():
        reference_cache = copy.deepcopy(cache)
        expected = type(block).forward(block, step["x"], **arguments, **{cache_arg: reference_cache})
        fused = FusedModules([block], [block.mlp.gate])
        assert [entry[0] for entry in fused.forwards][:3] == [block.self_attn, block.mlp.gate, block]
        saved, text.config._experts_implementation = text.config._experts_implementation, fused_moe.register()
        fused.install()
        try:
            got = block(step["x"], **arguments, **{cache_arg: cache})
        finally:
            fused.uninstall()
            text.config._experts_implementation = saved
    return {
        "output": float((got - expected).abs().max()),
        "scale": float(expected.abs().max()),
        **_cache_diffs(cache, reference_cache),
    }


def compare_router(
    dtype: torch.dtype, top_k: int, renormalize: bool, device: str = "cpu", tokens: int = 3
) -> dict[str, float]:
    """`fused_moe.route` against transformers' Qwen3-MoE router (renormalised or not) on `tokens` tokens (more
    than FUSED_MAX_TOKENS: the logits from cuBLAS, the rest in the Triton kernel)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(top_k)
    config = Qwen3MoeConfig(
        hidden_size=64, num_experts=32, num_experts_per_tok=top_k, norm_topk_prob=renormalize
    )
    router = Qwen3MoeTopKRouter(config).to(device=device, dtype=dtype)
    torch.nn.init.normal_(router.weight, std=0.3)
    x = torch.randn(tokens, 64, device=device, dtype=dtype)
    with torch.no_grad():
        logits, weights, ids = router(x)
        got_logits, got_weights, got_ids = fused_moe.route(x, router.weight, top_k, renormalize)
    return {
        "logits": float((got_logits - logits).abs().max()),
        "weights": float((got_weights - weights).abs().max()),
        "ids_differ": float((got_ids != ids).sum()),
    }


def compare_folded(dtype: torch.dtype, device: str = "cpu", repeats: int = 1) -> dict[str, float]:
    """The kernels whose last program finishes the work (`decode_block.FOLD_NORMS`) against the separate kernels
    they replace, on 2 tokens of a hidden size that is not a power of two, `repeats` times each: mismatching
    elements of the experts with the combine folded in (top-k 3 and 1) and of the q/k/v GEMV with the norm
    folded in (the same sums: must be 0), the router's normalised input (0) and expert ids, and the largest
    difference of its top-k weights and of the GEMV against rms_norm + F.linear."""
    from knobsweep.models import rms_norm
    from torch.nn import functional as F

    torch.manual_seed(5)
    hidden, inter, experts, tokens = 96, 32, 16, 2

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape) * scale).to(device, dtype)

    x, residual, norm_w = rand(tokens, hidden, scale=3), rand(tokens, hidden), 1 + rand(hidden, scale=0.2)
    gate_up, down = rand(experts, 2 * inter, hidden, scale=0.1), rand(experts, hidden, inter, scale=0.1)
    router, qkv = rand(experts, hidden, scale=0.3), rand(40, hidden, scale=0.1)
    normed = rms_norm.rms_norm(x, norm_w, 1e-6)
    _, weights, ids = fused_moe.route(normed, router, 3, True)
    result = {"combine": 0.0, "qkv": 0.0, "normed": 0.0, "ids": 0.0, "weights": 0.0}
    expected_qkv = decode_attention.gemv(normed, qkv)
    for _ in range(repeats):
        for k in (3, 1):
            args = (normed, gate_up, down, ids[:, :k], weights[:, :k])
            folded = fused_moe.moe_fused(*args, residual=residual, split_down=True)
            separate = fused_moe.moe_fused(*args, residual=residual, split_down=True, fold_combine=False)
            result["combine"] += float((folded != separate).sum())
        result["qkv"] += float((decode_attention.gemv(x, qkv, norm=(norm_w, 1e-6)) != expected_qkv).sum())
        got_normed, got_weights, got_ids = fused_moe.route_normed(x, norm_w, 1e-6, router, 3, True)
        result["normed"] += float((got_normed != normed).sum())
        result["ids"] += float((got_ids != ids).sum())
        result["weights"] = max(result["weights"], float((got_weights - weights).abs().max()))
    result["qkv_vs_torch"] = float((expected_qkv - F.linear(normed, qkv)).abs().max())
    return result


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_attention_equals_transformers_on_cpu(batch):
    """CPU: transformers' norms, rotary embedding and cache update after the concatenated q/k/v GEMV."""
    diffs = compare_attention(torch.float32, batch)
    assert (
        diffs["output"] < 1e-5 * max(1.0, diffs["scale"]) and diffs["keys"] < 1e-5 and diffs["values"] < 1e-5
    )
    assert diffs["length"] == 0


@pytest.mark.parametrize("batch", [1, 2])
def test_prompt_attention_and_norm_fall_back_to_transformers_on_cpu(batch):
    diffs = compare_prompt_attention(torch.float32, batch)
    assert (
        diffs["output"] < 1e-5 * max(1.0, diffs["scale"]) and diffs["keys"] < 1e-5 and diffs["values"] < 1e-5
    )
    assert diffs["length"] == 0
    assert compare_norm(torch.float32) == 0


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_block_falls_back_to_transformers_on_cpu(batch):
    """CPU without Triton: the block runs module by module (transformers' ops after the concatenated GEMV)."""
    diffs = compare_block(torch.float32, batch, top_k=3)
    assert (
        diffs["output"] < 1e-5 * max(1.0, diffs["scale"]) and diffs["keys"] < 1e-5 and diffs["values"] < 1e-5
    )
    assert diffs["length"] == 0


def test_concatenated_qkv_keeps_the_projections_and_shares_their_memory():
    model = build_model(make_config(tiny=True, initializer_range=0.3), "cpu", dtype=torch.float32)
    attention = model.model.language_model.layers[0].self_attn
    before = [p.weight.detach().clone() for p in (attention.q_proj, attention.k_proj, attention.v_proj)]
    decode_attention.concatenate_qkv(attention)
    decode_attention.concatenate_qkv(attention)  # idempotent
    weight = attention.__dict__[decode_attention.QKV_WEIGHT]
    after = [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert torch.equal(weight, torch.cat(before))
    assert all(a.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for a in after)
    assert decode_attention.fusable_attention(attention)
    attention.q_proj.bias = torch.nn.Parameter(torch.zeros(attention.q_proj.weight.shape[0]))
    assert not decode_attention.fusable_attention(attention)


def test_fused_modules_install_and_remove_only_their_own_forwards():
    """FusedModules takes every Qwen3 attention, router, block and RMSNorm except a module whose instance already
    has a forward (e.g. an offloading hook), which it leaves as it is (and its block); uninstall restores the
    class's forwards."""
    from knobsweep.models.fast_path import FusedModules

    model = build_model(make_config(tiny=True, initializer_range=0.3), "cpu", dtype=torch.float32)
    layers = list(model.model.language_model.layers)
    hooked = layers[2].self_attn
    hooked.forward = lambda *a, **k: None
    final_norm = model.model.language_model.norm
    fused = FusedModules(layers, [layer.mlp.gate for layer in layers], final_norm=final_norm)
    modules = [entry[0] for entry in fused.forwards]
    kinds = [type(m).__name__ for m in modules]
    # attentions and routers; whole blocks where both are fused (not the hooked attention's block); the norms
    assert kinds.count("Qwen3VLMoeTextAttention") == len(layers) - 1 and hooked not in modules
    assert kinds.count("Qwen3VLMoeTextTopKRouter") == len(layers)
    assert kinds.count("Qwen3VLMoeTextDecoderLayer") == len(layers) - 1 and layers[2] not in modules
    # input, post-attention, q and k norms, the final norm: in decode steps too, so `RegionalCompile` skips them
    assert kinds.count("Qwen3VLMoeTextRMSNorm") == 4 * len(layers) + 1 and final_norm in modules
    assert {id(m) for m in modules if type(m).__name__ == "Qwen3VLMoeTextRMSNorm"} <= fused.decode_modules()
    for prefill in (False, True):
        fused.install(prefill=prefill)
        installed = [(m, owner, prompt if prefill else decode) for m, owner, decode, prompt in fused.forwards]
        assert all(m.forward.__func__ is getattr(owner, name) for m, owner, name in installed if name)
        assert all("forward" not in m.__dict__ for m, _, name in installed if name is None)
        fused.uninstall()
        assert all("forward" not in m.__dict__ for m in modules) and "forward" in hooked.__dict__


def test_regional_compile_switches_every_module_but_the_fused_ones_on_and_off():
    """RegionalCompile.enable sets a compiled call on each RMSNorm and MLP except those with a fused decode forward
    (skipped), the same object at every enable; disable leaves every module with nn.Module's default again."""
    from knobsweep.models.fast_path import FusedModules, RegionalCompile

    model = build_model(make_config(tiny=True), "cpu", dtype=torch.float32)
    lm = model.model.language_model
    layers = list(lm.layers)
    fused = FusedModules(layers, [layer.mlp.gate for layer in layers], final_norm=lm.norm)
    regional = RegionalCompile(lm, layers)
    skip = fused.decode_modules()
    assert any(id(m) in skip for m in regional.modules) and any(id(m) not in skip for m in regional.modules)
    first = None
    for _ in range(2):
        regional.enable(skip)
        calls = [m._compiled_call_impl for m in regional.modules if id(m) not in skip]
        assert all(call is not None for call in calls)
        assert all(m._compiled_call_impl is None for m in regional.modules if id(m) in skip)
        assert first is None or all(a is b for a, b in zip(calls, first, strict=True))
        first = calls
        regional.disable()
        assert all(
            m._compiled_call_impl is None and "_compiled_call_impl" not in m.__dict__
            for m in regional.modules
        )


@pytest.mark.slow
@pytest.mark.skipif(TEST_DEVICE == "cuda", reason="on a GPU the fast-path tests run these kernels compiled")
def test_decode_kernels_equal_transformers_in_the_interpreter():
    """The attention kernel (batch 1 and 2), the router kernels (top-k 1, 3, 8; renormalised or not; 3 and 9
    tokens), a whole decoder block with its residual additions in the kernels (batch 1 and 2; top-k 1, the
    down kernel, and 3, the combine kernel), the graphed prefill's prompt attention (batch 1 and 2) and RMSNorm,
    run by Triton's CPU interpreter in float32, against transformers (a subprocess: TRITON_INTERPRET must be set
    before Triton is imported; ~30 s)."""
    pytest.importorskip("triton", reason="the decode kernels need the triton package")
    script = textwrap.dedent("""
        import sys
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, sys.argv[1])
        from test_decode_attention import (
            compare_attention, compare_block, compare_folded, compare_norm, compare_prompt_attention, compare_router
        )
        from knobsweep.models import fused_moe
        assert fused_moe.triton_usable(torch.zeros(1))
        results = {f"attention_b{b}": compare_attention(torch.float32, b) for b in (1, 2)}
        results.update({f"block_b{b}_k{k}": compare_block(torch.float32, b, k) for b in (1, 2) for k in (1, 3)})
        results.update({f"prompt_attention_b{b}": compare_prompt_attention(torch.float32, b) for b in (1, 2)})
        results["router_k3_True_t9"] = compare_router(torch.float32, 3, True, tokens=9)
        results["norm"] = {"norm": compare_norm(torch.float32)}
        results["folded"] = compare_folded(torch.float32)
        for k in (1, 3, 8):
            for renormalize in (True, False):
                results[f"router_k{k}_{renormalize}"] = compare_router(torch.float32, k, renormalize)
        print(results)
        for name, d in results.items():
            if name == "norm":
                assert d["norm"] < 1e-5, d
            elif name == "folded":
                assert d["combine"] == d["qkv"] == d["normed"] == d["ids"] == 0, d
                assert d["weights"] < 1e-6 and d["qkv_vs_torch"] < 1e-5, d
            elif name.startswith(("attention", "block", "prompt")):
                assert d["output"] < 1e-5 * max(1.0, d["scale"]) and d["keys"] < 1e-5 and d["values"] < 1e-5, d
                assert d["length"] == 0, d
            else:
                assert d["logits"] < 1e-5 and d["weights"] < 1e-6 and d["ids_differ"] == 0, (name, d)
    """)
    run_in_triton_interpreter(script, str(Path(__file__).parent))


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="compiled kernels in bf16 need a GPU")
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_kernels_equal_transformers_on_cuda_in_bf16(batch):
    """bf16 on a GPU: within one bf16 rounding of transformers (the rotary embedding rounds once here, three
    times in transformers' eager code), the attention, the router and a whole block."""
    diffs = compare_attention(torch.bfloat16, batch, device="cuda")
    assert diffs["keys"] <= 2**-6 * 4 and diffs["values"] == 0 and diffs["length"] == 0, diffs
    assert diffs["output"] <= 2e-2 * max(1.0, diffs["scale"]), diffs
    for k in (1, 8):
        d = compare_router(torch.bfloat16, k, True, device="cuda")
        assert d["logits"] <= 2e-2 and d["weights"] <= 1e-2, d
    for k in (1, 3):
        d = compare_block(torch.bfloat16, batch, k, device="cuda")
        assert d["keys"] <= 2**-6 * 4 and d["values"] == 0 and d["length"] == 0, d
        assert d["output"] <= 2e-2 * max(1.0, d["scale"]), d
    d = compare_prompt_attention(torch.bfloat16, batch, device="cuda")
    assert d["keys"] <= 2**-6 * 4 and d["values"] == 0 and d["length"] == 0, d
    assert d["output"] <= 2e-2 * max(1.0, d["scale"]), d
    d = compare_router(torch.bfloat16, 8, True, device="cuda", tokens=40)
    assert d["logits"] == 0 and d["weights"] <= 1e-2, d
    assert compare_norm(torch.bfloat16, device="cuda") == 0


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="compiled kernels in bf16 need a GPU")
def test_folded_kernels_equal_the_separate_ones_every_time_on_cuda():
    """bf16 on a GPU, 200 runs: the kernels whose last program finishes the work give what the separate kernels
    give, in every run (a missing ordering between the programs would show as runs that differ)."""
    d = compare_folded(torch.bfloat16, device="cuda", repeats=200)
    assert d["combine"] == d["qkv"] == d["normed"] == d["ids"] == 0, d
    assert d["weights"] <= 1e-2 and d["qkv_vs_torch"] <= 2e-2, d


def _block_chain(device: str, dtype: torch.dtype):
    """A decode block's kernels chained as in a step, each reading what the one before wrote (tiny shapes): the
    q/k/v GEMV with the input norm, the output-projection GEMV with the residual, the router with the
    post-attention norm, the experts with the combine and the second residual. Returns a function running them
    and the output buffers it fills."""
    torch.manual_seed(7)
    hidden, inter, experts = 96, 32, 16

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape) * scale).to(device, dtype)

    x, norm_w, post_w = rand(1, hidden, scale=3), 1 + rand(hidden, scale=0.2), 1 + rand(hidden, scale=0.2)
    qkv_w, o_w, router = (
        rand(hidden, hidden, scale=0.1),
        rand(hidden, hidden, scale=0.1),
        rand(experts, hidden),
    )
    gate_up, down = rand(experts, 2 * inter, hidden, scale=0.1), rand(experts, hidden, inter, scale=0.1)
    outputs = {}

    def run() -> None:
        q = decode_attention.gemv(x, qkv_w, norm=(norm_w, 1e-6))
        h = decode_attention.gemv(q, o_w, x)
        normed, weights, ids = fused_moe.route_normed(h, post_w, 1e-6, router, 3, True)
        outputs["out"] = fused_moe.moe_fused(normed, gate_up, down, ids, weights, residual=h)
        outputs["ids"] = ids

    return run, outputs


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="programmatic dependent launch needs a GPU")
def test_kernels_launched_with_pdl_give_the_same_results_in_a_graph_every_time(monkeypatch):
    """The block's kernels chained and captured in a CUDA graph with programmatic dependent launch (each kernel
    may start before the one it reads from ends, and waits for it): 100 replays equal the chain run without PDL
    and without a graph, bit for bit."""
    from knobsweep.models import pdl
    from knobsweep.models.fast_path import capture_graph

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    run, outputs = _block_chain("cuda", torch.bfloat16)
    monkeypatch.setattr(pdl, "ENABLED", False)
    run()
    expected = {k: v.clone() for k, v in outputs.items()}
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.use(expected["out"])
    graph, _ = capture_graph(run, lambda: None)
    differ = 0
    for _ in range(100):
        graph.replay()
        differ += sum(int((outputs[k] != expected[k]).sum()) for k in expected)
    assert differ == 0


def test_pdl_is_used_only_on_a_capable_gpu_and_when_enabled(monkeypatch):
    from knobsweep.models import pdl

    monkeypatch.setattr(pdl, "ENABLED", True)
    assert not pdl.use(torch.zeros(1))  # on the CPU (and in Triton's interpreter): never
    if TEST_DEVICE == "cuda":
        capable = torch.cuda.get_device_capability()[0] >= 9 and pdl.gdc_wait is not None
        assert pdl.use(torch.zeros(1, device="cuda")) == capable
        monkeypatch.setattr(pdl, "ENABLED", False)
        assert not pdl.use(torch.zeros(1, device="cuda"))
