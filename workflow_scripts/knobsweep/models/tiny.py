"""Tiny random checkpoints in Hugging Face format, for tests and for trying the workflow without weights.

`build_tiny_checkpoint(out_dir, family=...)` writes config.json, safetensors weights, a processor and a small
word-level tokenizer of our own (tokenizers WordLevel + Lowercase normaliser + Whitespace pre-tokenizer + the
family's special tokens + a chat template), so that `knobsweep.models.load_model(out_dir)` works offline (HF_HUB_OFFLINE=1).

Defaults: 24 decoder blocks, 64 experts, top-8 (so the study's seed grids top_k 1..32 and blocks 8..24
apply), small hidden sizes and `initializer_range=0.3` so that greedy outputs of the random model vary.
The processor accepts 4..4096 vision tokens (InternVL: 1..127 tiles).

Families: `qwen3_vl_moe` (Qwen3-VL-MoE with DeepStack), `qwen3_5_moe` (hybrid Gated DeltaNet / full
attention, shared expert), `internvl` (InternViT + pixel-shuffle projector + Qwen3-MoE, 64 px tiles of 16
tokens), `ernie4_5_vl_moe` (text and vision experts, shared experts, first block dense; 28x28 px per token).

CLI: ``python -m knobsweep.models.tiny OUT_DIR --family qwen3_vl_moe --seed 0``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from knobsweep.config import TINY_DEFAULT_TOP_K, TINY_OVERRIDE_KEYS, unknown_tiny_overrides

# Words every tiny tokenizer knows, so prompts of the study ("What is in the image?", captions) tokenize.
DEFAULT_WORDS: tuple[str, ...] = tuple(
    """
    a an the is are of in on at to and or with what which how many color colour shape size where who
    there this that it its image picture photo describe caption briefly short answer question yes no
    one two three four five six seven eight nine ten zero
    red green blue yellow orange purple pink brown black white gray grey
    circle square triangle star cross ring disk box ball cube
    small large big tiny left right top bottom middle center above below next near far
    man woman person people dog cat car bus tree house sky grass water table sign
    user assistant system . , ? ! : ; ' " - ( )
    """.split()  # noqa: SIM905 (a word list reads better as text)
)

# Special tokens of the Qwen chat format; ids follow the order here, right after <unk>.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Vision-token bounds the tiny processors accept (the study's CPU grid goes down to 16 tokens).
MIN_VISION_TOKENS = 4
MAX_VISION_TOKENS = 4096


def build_word_tokenizer(
    special_tokens: Sequence[str],
    vocabulary: Sequence[str] | None,
    *,
    chat_template: str,
    eos_token: str,
    pad_token: str,
    extra_attributes: dict[str, str] | None = None,
):
    """A word-level fast tokenizer: <unk>, then the special tokens, then the default words and `vocabulary`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: list[str] = ["<unk>", *special_tokens]
    seen = set(words)
    for word in [*DEFAULT_WORDS, *(vocabulary or ())]:
        if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
            raise ValueError(f"vocabulary: every entry must be a non-empty word without spaces, got {word!r}")
        if word not in seen:
            seen.add(word)
            words.append(word)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    # Lower-cased like the vocabulary, so capitalised prompt words ("Answer", "Provide") are known words.
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=[t for t in special_tokens if t not in (eos_token, pad_token)],
        padding_side="left",  # batched generation needs left padding
        chat_template=chat_template,
        **(extra_attributes or {}),
    )
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in Qwen3-VL's 24:20:20 proportion."""
    half = head_dim // 2
    spatial = round(half * 20 / 64)
    return [half - 2 * spatial, spatial, spatial]


def _save_qwen_like(
    out_dir: Path,
    *,
    model_cls_name: str,
    config,
    tokenizer,
    seed: int,
    patch_size: int,
    merge_size: int,
) -> None:
    import transformers
    from transformers import GenerationConfig
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    factor = patch_size * merge_size
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_VISION_TOKENS * factor**2, "longest_edge": MAX_VISION_TOKENS * factor**2},
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def _qwen_tokenizer(vocabulary):
    return build_word_tokenizer(
        QWEN_SPECIAL_TOKENS,
        vocabulary,
        chat_template=QWEN_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


def _qwen_token_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _text_defaults(tokenizer, overrides: dict[str, Any]) -> dict[str, Any]:
    """Text-model settings shared by the Qwen-style families; `overrides` may change any of them."""
    num_blocks = overrides.pop("num_blocks", 24)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "num_hidden_layers": num_blocks,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_experts": 64,
        "num_experts_per_tok": TINY_DEFAULT_TOP_K,
        "max_position_embeddings": 8192,
        "initializer_range": 0.3,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    for key in list(overrides):
        if key in text:
            text[key] = overrides.pop(key)
    return text


def _build_qwen3_vl_moe(out_dir: Path, seed: int, vocabulary, overrides: dict[str, Any]) -> None:
    from transformers import Qwen3VLMoeConfig

    tokenizer = _qwen_tokenizer(vocabulary)
    text = _text_defaults(tokenizer, overrides)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(text["head_dim"]),
        "mrope_interleaved": True,
    }
    text["decoder_sparse_step"] = 1
    vision = {
        "depth": overrides.pop("vision_depth", 2),
        "hidden_size": overrides.pop("vision_hidden_size", 64),
        "intermediate_size": overrides.pop("vision_intermediate_size", 128),
        "num_heads": 4,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text["hidden_size"],
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": overrides.pop("deepstack_visual_indexes", [0, 1]),
        "initializer_range": 0.3,
    }
    if overrides:
        raise ValueError(f"build_tiny_checkpoint: unknown overrides for qwen3_vl_moe: {sorted(overrides)}")
    config = Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        initializer_range=0.3,
        tie_word_embeddings=False,
        **_qwen_token_ids(tokenizer),
    )
    _save_qwen_like(
        out_dir,
        model_cls_name="Qwen3VLMoeForConditionalGeneration",
        config=config,
        tokenizer=tokenizer,
        seed=seed,
        patch_size=16,
        merge_size=2,
    )


def _build_qwen3_5_moe(out_dir: Path, seed: int, vocabulary, overrides: dict[str, Any]) -> None:
    from transformers import Qwen3_5MoeConfig

    tokenizer = _qwen_tokenizer(vocabulary)
    text = _text_defaults(tokenizer, overrides)
    text.pop("intermediate_size")  # every Qwen3.5-MoE layer is MoE (plus a shared expert)
    text["shared_expert_intermediate_size"] = overrides.pop("shared_expert_intermediate_size", 32)
    # Hybrid attention as in the real model: every 4th block full attention, the rest Gated DeltaNet.
    text["layer_types"] = overrides.pop(
        "layer_types",
        [
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention"
            for i in range(text["num_hidden_layers"])
        ],
    )
    text["linear_num_key_heads"] = overrides.pop("linear_num_key_heads", 2)
    text["linear_num_value_heads"] = overrides.pop("linear_num_value_heads", 4)
    text["linear_key_head_dim"] = overrides.pop("linear_key_head_dim", 16)
    text["linear_value_head_dim"] = overrides.pop("linear_value_head_dim", 16)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": _mrope_section(text["head_dim"] // 2),
        "mrope_interleaved": True,
    }
    vision = {
        "depth": overrides.pop("vision_depth", 2),
        "hidden_size": overrides.pop("vision_hidden_size", 64),
        "intermediate_size": overrides.pop("vision_intermediate_size", 128),
        "num_heads": 4,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text["hidden_size"],
        "num_position_embeddings": 256,
        "initializer_range": 0.3,
    }
    if overrides:
        raise ValueError(f"build_tiny_checkpoint: unknown overrides for qwen3_5_moe: {sorted(overrides)}")
    config = Qwen3_5MoeConfig(
        text_config=text,
        vision_config=vision,
        initializer_range=0.3,
        tie_word_embeddings=False,
        **_qwen_token_ids(tokenizer),
    )
    _save_qwen_like(
        out_dir,
        model_cls_name="Qwen3_5MoeForConditionalGeneration",
        config=config,
        tokenizer=tokenizer,
        seed=seed,
        patch_size=16,
        merge_size=2,
    )


INTERNVL_SPECIAL_TOKENS: tuple[str, ...] = (
    *QWEN_SPECIAL_TOKENS[:3],
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
INTERNVL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n"
)


def _build_internvl(out_dir: Path, seed: int, vocabulary, overrides: dict[str, Any]) -> None:
    """InternVL (InternViT + pixel-shuffle MLP projector) with a Qwen3-MoE language model."""
    import transformers
    from transformers import GenerationConfig, InternVLConfig
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.internvl.processing_internvl import InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    tokenizer = build_word_tokenizer(
        INTERNVL_SPECIAL_TOKENS,
        vocabulary,
        chat_template=INTERNVL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_attributes={
            "extra_special_tokens": {
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            }
        },
    )
    text = _text_defaults(tokenizer, overrides)
    text.update(model_type="qwen3_moe", decoder_sparse_step=1, rope_parameters=None)
    text["norm_topk_prob"] = overrides.pop("norm_topk_prob", True)
    tile = overrides.pop("tile_size", 64)
    patch = overrides.pop("patch_size", 8)
    vision = {
        "hidden_size": overrides.pop("vision_hidden_size", 64),
        "num_hidden_layers": overrides.pop("vision_depth", 2),
        "num_attention_heads": 4,
        "intermediate_size": overrides.pop("vision_intermediate_size", 128),
        "image_size": [tile, tile],
        "patch_size": [patch, patch],
        "initializer_range": 0.3,
    }
    max_tiles = overrides.pop("max_tiles", 127)
    if overrides:
        raise ValueError(f"build_tiny_checkpoint: unknown overrides for internvl: {sorted(overrides)}")
    tokens_per_tile = (tile // patch) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    image_processor = GotOcr2ImageProcessor(
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size={"height": tile, "width": tile}),
        image_seq_length=tokens_per_tile,
        chat_template=tokenizer.chat_template,
    )
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


ERNIE_SPECIAL_TOKENS: tuple[str, ...] = (
    *QWEN_SPECIAL_TOKENS[:3],
    "<|IMAGE_START|>",
    "<|IMAGE_END|>",
    "<|IMAGE_PLACEHOLDER|>",
    "<|VIDEO_START|>",
    "<|VIDEO_END|>",
    "<|VIDEO_PLACEHOLDER|>",
)
ERNIE_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
)


def _build_ernie4_5_vl_moe(out_dir: Path, seed: int, vocabulary, overrides: dict[str, Any]) -> None:
    """ERNIE-4.5-VL-MoE: separate text and vision experts in each MoE layer, plus shared experts."""
    import transformers
    from transformers import Ernie4_5_VLMoeConfig, GenerationConfig
    from transformers.models.ernie4_5_vl_moe.image_processing_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessor,
    )
    from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import Ernie4_5_VLMoeProcessor
    from transformers.models.ernie4_5_vl_moe.video_processing_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeVideoProcessor,
    )

    names = ("image_start_token", "image_end_token", "image_token", "video_start_token", "video_end_token")
    tokenizer = build_word_tokenizer(
        ERNIE_SPECIAL_TOKENS,
        vocabulary,
        chat_template=ERNIE_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_attributes={
            "extra_special_tokens": {
                **dict(zip(names, ERNIE_SPECIAL_TOKENS[3:8])),
                "video_token": "<|VIDEO_PLACEHOLDER|>",
            }
        },
    )
    text = _text_defaults(tokenizer, overrides)
    moe_width = text.pop("moe_intermediate_size")
    text.update(
        moe_num_experts=text.pop("num_experts"),
        moe_k=text.pop("num_experts_per_tok"),
        moe_intermediate_size=[moe_width, moe_width],
        moe_num_shared_experts=overrides.pop("moe_num_shared_experts", 1),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _ernie_mrope(text["head_dim"]),
        },
    )
    vision = {
        "depth": overrides.pop("vision_depth", 2),
        "hidden_size": overrides.pop("vision_hidden_size", 64),
        "intermediate_size": overrides.pop("vision_intermediate_size", 128),
        "num_heads": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_merge_size": 2,
        "initializer_range": 0.3,
    }
    if overrides:
        raise ValueError(f"build_tiny_checkpoint: unknown overrides for ernie4_5_vl_moe: {sorted(overrides)}")
    ids = tokenizer.convert_tokens_to_ids
    config = Ernie4_5_VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_start_token_id=ids("<|IMAGE_START|>"),
        image_end_token_id=ids("<|IMAGE_END|>"),
        image_token_id=ids("<|IMAGE_PLACEHOLDER|>"),
        video_start_token_id=ids("<|VIDEO_START|>"),
        video_end_token_id=ids("<|VIDEO_END|>"),
        video_token_id=ids("<|VIDEO_PLACEHOLDER|>"),
        tie_word_embeddings=False,
    )
    factor = 28
    image_processor = Ernie4_5_VLMoeImageProcessor(
        size={"shortest_edge": MIN_VISION_TOKENS * factor**2, "longest_edge": MAX_VISION_TOKENS * factor**2},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Ernie4_5_VLMoeProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Ernie4_5_VLMoeVideoProcessor(draw_on_frames=False),
        chat_template=tokenizer.chat_template,
    )
    torch.manual_seed(seed)
    model = transformers.Ernie4_5_VLMoeForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"), do_sample=False
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def _ernie_mrope(head_dim: int) -> list[int]:
    """ERNIE's (h, w, t) split of head_dim/2 frequencies in its 22:22:20 proportion."""
    half = head_dim // 2
    spatial = round(half * 22 / 64)
    return [spatial, spatial, half - 2 * spatial]


BUILDERS: dict[str, Callable[[Path, int, Sequence[str] | None, dict[str, Any]], None]] = {
    "qwen3_vl_moe": _build_qwen3_vl_moe,
    "qwen3_5_moe": _build_qwen3_5_moe,
    "internvl": _build_internvl,
    "ernie4_5_vl_moe": _build_ernie4_5_vl_moe,
}


def build_tiny_checkpoint(
    out_dir: str | Path,
    *,
    family: str = "qwen3_vl_moe",
    seed: int = 0,
    vocabulary: Sequence[str] | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random checkpoint of `family` to `out_dir` and return its path.

    `vocabulary`: extra words for the tokenizer (e.g. a synthetic data generator's vocabulary).
    `overrides`: `num_blocks`, and text-model settings (`hidden_size`, `num_experts`, `num_experts_per_tok`,
    `moe_intermediate_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim`, `initializer_range`,
    `max_position_embeddings`, ...) or vision settings (`vision_depth`, `vision_hidden_size`, ...); the
    accepted names per family are `knobsweep.config.TINY_OVERRIDE_KEYS`.
    """
    if family not in BUILDERS:
        raise ValueError(
            f"build_tiny_checkpoint: unknown family {family!r}; choose one of {sorted(BUILDERS)}"
        )
    unknown = unknown_tiny_overrides(family, overrides)
    if unknown:
        raise ValueError(
            f"build_tiny_checkpoint: unknown overrides for {family}: {unknown} "
            f"(known: {sorted(TINY_OVERRIDE_KEYS[family])})"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    BUILDERS[family](out, seed, vocabulary, dict(overrides))
    (out / "knobsweep_tiny.json").write_text(
        json.dumps({"family": family, "seed": seed, "overrides": overrides}, indent=1, default=str)
    )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", default="qwen3_vl_moe", choices=sorted(BUILDERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-blocks", type=int, default=24)
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(args.out_dir, family=args.family, seed=args.seed, num_blocks=args.num_blocks)
    print(path)


if __name__ == "__main__":
    main()
