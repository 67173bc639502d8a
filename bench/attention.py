"""Decode attention without expanded key/value heads ("knobsweep_gqa") and the split-KV decode kernel
("knobsweep_splitkv"), now part of the knob engine: re-exported from `knobsweep.models.decode_attention` so
that the benchmark and the study's fast inference path run the same kernels."""

from knobsweep.models.decode_attention import (
    NAME,
    NUM_SPLITS,
    SPLITKV_NAME,
    gqa_decode_attention,
    register,
    register_splitkv,
    splitkv_attention,
    splitkv_decode,
)

__all__ = [
    "NAME",
    "NUM_SPLITS",
    "SPLITKV_NAME",
    "gqa_decode_attention",
    "register",
    "register_splitkv",
    "splitkv_attention",
    "splitkv_decode",
]
