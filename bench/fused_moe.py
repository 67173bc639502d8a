"""The fused Triton decode experts ("knobsweep_fused"), now part of the knob engine: re-exported from
`knobsweep.models.fused_moe` so that the benchmark and the study's fast inference path run the same kernels."""

from knobsweep.models.fused_moe import (
    FUSED_MAX_TOKENS,
    NAME,
    fused_experts_forward,
    moe_fused,
    moe_grouped,
    moe_reference,
    register,
    triton,
    triton_usable,
)

__all__ = [
    "FUSED_MAX_TOKENS",
    "NAME",
    "fused_experts_forward",
    "moe_fused",
    "moe_grouped",
    "moe_reference",
    "register",
    "triton",
    "triton_usable",
]
