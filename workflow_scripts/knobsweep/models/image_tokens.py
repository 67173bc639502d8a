"""What the processor returns for (images, prompts), with each image's placeholder expanded in the token ids.

transformers' processors expand an image placeholder in the prompt's TEXT (`replace_image_token`: e.g.
Qwen3-VL's `<|image_pad|>` becomes 1,872 copies of itself), then tokenize that text. On an H200 host that
tokenization took 6.3 ms of a 9.6 ms preprocess stage at 1,872 vision tokens and 1.2 of 4.6 ms at 288, against
0.14 ms for the prompt before expansion: host work that grows with the vision-token knob and moves with the
host's speed. `PlaceholderExpansion` runs the image processor as the processor does, tokenizes the prompt with one
placeholder per image, and splices in the token ids of the processor's own replacement text for each image
(tokenized once per distinct replacement), as serving engines such as vLLM do.

That equals tokenizing the expanded text where the placeholder and its replacement are tokens the tokenizer
keeps whole (added tokens). The adapter does not rely on it: for each token grid at each vision-token budget, the
first request also runs the processor, and later ones use `PlaceholderExpansion` only if every output tensor was
equal (`first_difference`); where they differ it keeps the processor for good and says why
(`ModelAdapter.preprocess_mode`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

# Keys the expansion builds from the token ids; every other key of the processor's output must come from the image
# processor. `moe_mm_token_type_ids`: ERNIE-4.5-VL's processor, which also marks image start and end tokens.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids")


def unsupported_reason(processor: Any) -> str | None:
    """Why `processor`'s image placeholders cannot be expanded on token ids, or None when they can."""
    tokenizer = getattr(processor, "tokenizer", None)
    image_token = getattr(processor, "image_token", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        return f"{type(processor).__name__} has no tokenizer or no image processor"
    if not isinstance(image_token, str) or not callable(getattr(processor, "replace_image_token", None)):
        return f"{type(processor).__name__} has no image token with a replacement (replace_image_token)"
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if tokenizer(image_token * 2, add_special_tokens=False)["input_ids"] != [token_id, token_id]:
        return f"its image token {image_token!r} is not kept whole by the tokenizer"
    return None


class PlaceholderExpansion:
    """`processor(images=..., text=..., return_tensors="pt", padding=True, images_kwargs=...)` with the
    placeholders expanded on token ids. `keys`: the keys of the processor's output to reproduce (from a call of
    the processor itself)."""

    def __init__(self, processor: Any, keys: Collection[str]) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.keys = tuple(keys)
        self._replacement_ids: dict[str, list[int]] = {}

    def __call__(
        self, images: Sequence[Any], texts: Sequence[str], images_kwargs: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        image_inputs = self.processor.image_processor(images, return_tensors="pt", **images_kwargs)
        rows = self.tokenizer(list(texts))["input_ids"]
        expanded, image_index = [], 0
        for row in rows:
            ids = []
            for token in row:
                if token == self.image_token_id:
                    ids.extend(self._replacement(image_inputs, image_index))
                    image_index += 1
                else:
                    ids.append(token)
            expanded.append(ids)
        if image_index != len(images):
            raise ValueError(
                f"the prompts hold {image_index} image placeholders for {len(images)} images "
                f"(placeholder {self.processor.image_token!r})"
            )
        outputs = self._padded(expanded)
        if "mm_token_type_ids" in self.keys:
            rows = outputs["input_ids"].tolist()
            outputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(rows))
        if "moe_mm_token_type_ids" in self.keys:
            outputs["moe_mm_token_type_ids"] = self.processor.create_moe_mm_token_type_ids(
                outputs["input_ids"]
            )
        for key in self.keys:
            if key not in TOKEN_KEYS:
                outputs[key] = image_inputs[key]
        return outputs

    def _replacement(self, image_inputs: Any, image_index: int) -> list[int]:
        """Token ids of the processor's replacement text for one image; replacements come in few sizes."""
        text = self.processor.replace_image_token(image_inputs, image_idx=image_index)
        if text not in self._replacement_ids:
            self._replacement_ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._replacement_ids[text]

    def _padded(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask padded to the longest row, on the tokenizer's padding side."""
        width = max(len(row) for row in rows)
        pad_id, left = self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left"
        ids, mask = [], []
        for row in rows:
            padding = width - len(row)
            ids.append([pad_id] * padding + row if left else row + [pad_id] * padding)
            mask.append([0] * padding + [1] * len(row) if left else [1] * len(row) + [0] * padding)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def first_difference(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> str | None:
    """None when both processor outputs hold the same keys with equal values (tensors: shape, dtype, device and
    every element), else what differs first."""
    if set(reference) != set(candidate):
        return f"keys {sorted(reference)} != {sorted(candidate)}"
    for key, expected in reference.items():
        got = candidate[key]
        if isinstance(expected, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                return f"{key}: a {type(got).__name__}, not a tensor"
            for what in ("shape", "dtype", "device"):
                if getattr(expected, what) != getattr(got, what):
                    return f"{key}: {what} {getattr(got, what)} != {getattr(expected, what)}"
            if not torch.equal(expected, got):
                mismatched = (expected != got).nonzero()[0].tolist()
                return f"{key}: differs at index {mismatched}"
        elif expected != got:
            return f"{key}: {got!r} != {expected!r}"
    return None
