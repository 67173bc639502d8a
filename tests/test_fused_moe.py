"""The fast paths' experts (`knobsweep.models.fused_moe`): the lean grouped experts of the prefill against
transformers' grouped_mm path (bit for bit on CPU) and a per-pair reference, the Triton kernels against the same
references in Triton's CPU interpreter, and which implementation serves which input."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE, run_in_triton_interpreter
from knobsweep.models import fused_moe
from transformers.integrations import moe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model import build_model, make_config

TOKENS, TOP_K = 37, 5


@pytest.fixture(scope="module")
def experts_by_dtype() -> dict:
    """dtype -> one MoE block's experts of the benchmark's tiny Qwen3-VL-MoE (32 experts, hidden 64, width 32)."""
    config = make_config(tiny=True, initializer_range=0.3)
    return {
        dtype: build_model(config, "cpu", dtype=dtype).model.language_model.layers[1].mlp.experts
        for dtype in (torch.float32, torch.bfloat16)
    }


def _routing(dtype: torch.dtype, seed: int = 0, used_experts: int = 20):
    """Random tokens routed to TOP_K of the first `used_experts` experts (the rest get no token)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, 64, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(used_experts, generator=g)[:TOP_K] for _ in range(TOKENS)])
    weights = torch.softmax(torch.randn(TOKENS, TOP_K, generator=g), -1).to(dtype)
    return x, ids, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_experts_equal_transformers_grouped_mm_bit_for_bit(experts_by_dtype, dtype):
    experts = experts_by_dtype[dtype]
    x, ids, weights = _routing(dtype)
    expected = moe.grouped_mm_experts_forward(experts, x, ids, weights)
    got = fused_moe.moe_grouped(experts, x, ids, weights)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert torch.equal(got, expected)
    # Independently: every (token, expert) pair computed on its own (in bf16 it rounds the weighted products
    # elsewhere, so a relative error of the whole output there).
    reference = fused_moe.moe_reference(x, experts.gate_up_proj, experts.down_proj, ids, weights).float()
    relative_error = float((got.float() - reference).norm() / reference.norm())
    assert relative_error < (1e-6 if dtype == torch.float32 else 1e-2)


def test_grouped_experts_depend_on_every_routing_input(experts_by_dtype):
    """A wrong permutation or offsets would go unnoticed if every expert computed the same thing: moving one
    pair to another expert, or changing one weight, changes exactly that token's output."""
    experts = experts_by_dtype[torch.float32]
    x, ids, weights = _routing(torch.float32)
    base = fused_moe.moe_grouped(experts, x, ids, weights)
    moved = ids.clone()
    moved[3, 0] = 25  # an expert no other pair uses
    weights2 = weights.clone()
    weights2[7, 2] += 0.1
    for new_ids, new_weights, token in ((moved, weights, 3), (ids, weights2, 7)):
        out = fused_moe.moe_grouped(experts, x, new_ids, new_weights)
        changed = (out != base).any(dim=-1).nonzero().flatten().tolist()
        assert changed == [token]
        expected = moe.grouped_mm_experts_forward(experts, x, new_ids, new_weights)
        assert torch.equal(out, expected)


def test_experts_forward_serves_decode_and_larger_inputs_with_the_right_path(experts_by_dtype, monkeypatch):
    experts = experts_by_dtype[torch.float32]
    calls = []
    for name in ("moe_grouped", "moe_reference"):
        original = getattr(fused_moe, name)
        monkeypatch.setattr(
            fused_moe, name, lambda *a, _name=name, _f=original, **k: calls.append(_name) or _f(*a, **k)
        )
    x, ids, weights = _routing(torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fused_moe.fused_experts_forward(experts, x[: fused_moe.FUSED_MAX_TOKENS], ids[:4], weights[:4])
    fused_moe.fused_experts_forward(experts, x, ids, weights)
    assert calls == ["moe_reference", "moe_grouped"]


def test_triton_gemms_serve_only_the_default_silu_gate(experts_by_dtype, monkeypatch):
    """The grouped GEMMs apply SiLU(gate) * up in their epilogue: experts with another gate (an overridden
    `_apply_gate`, another activation) must take torch's GEMMs and their own gate."""
    experts = experts_by_dtype[torch.float32]
    assert fused_moe._default_silu_gate(experts)
    monkeypatch.setattr(experts, "act_fn", torch.nn.GELU())
    assert not fused_moe._default_silu_gate(experts)
    monkeypatch.undo()

    class OwnGate(type(experts)):
        def _apply_gate(self, gate_up):
            return super()._apply_gate(gate_up) * 2

    monkeypatch.setattr(experts, "__class__", OwnGate)
    assert not fused_moe._default_silu_gate(experts)


def test_grouped_experts_support_rules(experts_by_dtype):
    experts = experts_by_dtype[torch.bfloat16]
    assert fused_moe.grouped_supported(experts, torch.zeros(8, 64, dtype=torch.bfloat16))
    assert fused_moe.grouped_supported(experts, torch.zeros(8, 64))  # CPU: torch has float32 grouped_mm
    if torch.cuda.is_available():  # no float32 grouped_mm kernel on CUDA (its fallback synchronises)
        assert not fused_moe.grouped_supported(experts, torch.zeros(8, 64, device="cuda"))
    experts.has_bias = True
    try:
        assert not fused_moe.grouped_supported(experts, torch.zeros(8, 64, dtype=torch.bfloat16))
    finally:
        experts.has_bias = False


@pytest.mark.slow
@pytest.mark.skipif(
    TEST_DEVICE == "cuda",
    reason="on a GPU the fast-path tests and bench.latency's kernel checks run them compiled",
)
def test_triton_experts_kernels_match_references_in_the_interpreter():
    """The decode kernels with the down projection split over pairs or not, and the prefill's grouped experts
    (Triton GEMMs and combine), run by Triton's CPU interpreter in float32 (~25 s; a subprocess because
    TRITON_INTERPRET must be set before Triton is imported)."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    script = textwrap.dedent("""
        import sys
        import torch
        sys.path.insert(0, sys.argv[1])
        sys.path.insert(0, sys.argv[2])
        from bench.model import build_model, make_config
        from knobsweep.models import fused_moe
        from transformers.integrations import moe
        torch.manual_seed(0)
        experts = build_model(make_config(tiny=True, initializer_range=0.3), "cpu", dtype=torch.float32)
        experts = experts.model.language_model.layers[1].mlp.experts
        errors = {}
        for m, k in [(1, 1), (1, 8), (3, 4), (37, 5)]:
            x = torch.randn(m, 64)
            ids = torch.stack([torch.randperm(32)[:k] for _ in range(m)])
            w = torch.softmax(torch.randn(m, k), -1)
            if m <= fused_moe.FUSED_MAX_TOKENS:
                ref = fused_moe.moe_reference(x, experts.gate_up_proj, experts.down_proj, ids, w)
                for split in (False, True):
                    got = fused_moe.moe_fused(x, experts.gate_up_proj, experts.down_proj, ids, w, split_down=split)
                    errors[f"decode_{m}_{k}_split{split}"] = float((got - ref).norm() / ref.norm())
            else:
                ref = moe.grouped_mm_experts_forward(experts, x, ids, w)
                got = fused_moe.moe_grouped(experts, x, ids, w)
                errors[f"grouped_{m}_{k}"] = float((got - ref).norm() / ref.norm())
        # The prefill's grouped GEMMs with tiles smaller than an expert's rows (several row and column blocks
        # per expert, partial blocks; ~75 rows per expert), against the per-pair reference; and with the
        # weights stored transposed (transformers' is_transposed layout), against the same GEMM untransposed.
        fused_moe.GROUPED_CONFIGS = {"gate_up": (16, 16, 16, 4, 2), "down": (16, 32, 16, 4, 2)}
        x = torch.randn(300, 64)
        ids = torch.stack([torch.randperm(32)[:8] for _ in range(300)])
        w = torch.softmax(torch.randn(300, 8), -1)
        ref = fused_moe.moe_reference(x, experts.gate_up_proj, experts.down_proj, ids, w)
        got = fused_moe.moe_grouped(experts, x, ids, w)
        errors["grouped_300_8_small_tiles"] = float((got - ref).norm() / ref.norm())
        sorted_ids, perm = torch.sort(ids.reshape(-1).to(torch.int16), stable=True)
        ends = torch.searchsorted(sorted_ids, torch.arange(1, 33, dtype=torch.int16), out_int32=True)
        args = (perm, ends, 8)
        plain = fused_moe.grouped_projection(x, experts.gate_up_proj, False, *args, gather=True, gated=True)
        flipped = experts.gate_up_proj.transpose(1, 2).contiguous()
        transposed = fused_moe.grouped_projection(x, flipped, True, *args, gather=True, gated=True)
        errors["grouped_transposed"] = float((transposed - plain).norm() / plain.norm())
        print(errors)
        assert len(errors) == 9 and all(e < 1e-5 for e in errors.values()), errors
        # The pairs' expert order from the Triton kernels equals a stable sort's exactly: experts with no pair,
        # expert counts that are not powers of two, more chunks than the prefix kernel's tile (16,800 pairs).
        for tokens, k, num_experts, used in [(37, 5, 32, 20), (2100, 8, 32, 32), (9, 1, 20, 3), (300, 4, 512, 500)]:
            ids = torch.stack([torch.randperm(used)[:k] for _ in range(tokens)])
            perm, ends = fused_moe.expert_order(ids, num_experts)
            sorted_ids, expected = torch.sort(ids.reshape(-1), stable=True)
            bounds = torch.arange(1, num_experts + 1)
            assert torch.equal(perm, expected), (tokens, k, num_experts)
            assert torch.equal(ends, torch.searchsorted(sorted_ids, bounds, out_int32=True)), (tokens, num_experts)
    """)
    run_in_triton_interpreter(script, str(ROOT), str(ROOT / "workflow_scripts"))
