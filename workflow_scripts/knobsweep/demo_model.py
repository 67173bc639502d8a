"""Train and evaluate the embedded default model: a tiny Qwen3-VL-MoE taught the synthetic workloads.

The model is the same transformers class and adapter path as the real Qwen3-VL-MoE (24 decoder blocks,
64 experts, top-8), small enough to ship in the repo. It is trained from scratch on scenes drawn on the fly
from the synthetic generator (`knobsweep.workloads.synthetic`), with the workflow's own prompts
(`knobsweep.workloads.prompts`), its own tokenizer/processor/chat template (`knobsweep.models.tiny`) and
images resized exactly as the adapter resizes them for a vision-token budget.

CLI::

    python -m knobsweep.demo_model train --out DIR --seed 0 [--steps N] [--time-limit-s S] ...
    python -m knobsweep.demo_model evaluate --model DIR --out results.json [--n-images N] ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The shipped model's size: 24 blocks x 64 experts (top-8) of width 24 on a 128-wide residual stream,
# ~17.6 M parameters, ~35 MB in bf16 (the experts are ~80% of it).
MODEL_OVERRIDES: dict[str, Any] = {
    "num_blocks": 24,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 24,
    "vision_depth": 4,
    "vision_hidden_size": 128,
    "vision_intermediate_size": 512,
    "deepstack_visual_indexes": [0, 1],
}
INITIALIZER_RANGE = 0.02  # the builder's 0.3 makes random outputs varied; training wants the usual 0.02

# Vision-token budgets drawn in training: log-spaced over the study's range (CPU demo grids and the
# real model's 1872 maximum), one budget per batch so that all images of a batch share one grid.
TRAIN_VISION_TOKENS: tuple[int, ...] = (
    16,
    24,
    36,
    48,
    64,
    96,
    144,
    196,
    256,
    400,
    576,
    784,
    1024,
    1296,
    1600,
    1872,
)

SAVE_MAX_SHARD = "14MB"  # files coming back from the GPU machine must stay under 16 MiB each
TRAIN_STREAM = 0  # seed-stream ids: training scenes and held-out scenes never share a random stream
EVAL_STREAM = 1


@dataclass
class TrainConfig:
    """Everything that determines a training run (written next to the checkpoint)."""

    seed: int = 0
    steps: int = 6000
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.01
    # Dense auxiliary loss on the vision tower's merged tokens (what object part each token shows): makes
    # the encoder see colours, shapes, sizes and digits early, which the answer loss alone did not do in
    # 563 steps (the model learned answer priors only). Used in training only; not part of the checkpoint.
    vision_aux_loss_coef: float = 0.5
    per_token_loss: bool = True
    tokens_per_batch: int = 65536  # padded sequence tokens per step (vision + text)
    max_batch: int = 256
    caption_fraction: float = 0.35
    samples_per_scene: int = 2  # one rendered scene serves this many samples of the same batch
    image_sizes: tuple[tuple[int, int], ...] = ()  # () = the synthetic dataset's sizes
    vision_tokens: tuple[int, ...] = TRAIN_VISION_TOKENS
    # Experts per token, drawn per batch like the vision budget; () = the model's default (top-8) only.
    # Drawing from above the default (8, 16, 32) puts the grid's upper top-k values in the training
    # distribution and leaves the lower ones (1, 2, 4) outside it, as they are for the real model.
    top_k: tuple[int, ...] = ()
    workers: int = 14
    log_every: int = 25
    time_limit_s: float | None = None  # stop early (and save) after this much training time
    # Start from the weights of this checkpoint (a fresh optimizer and probe) instead of random weights:
    # a later training stage. Use another `seed` than the first stage so that the data stream is new.
    init_from: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=lambda: dict(MODEL_OVERRIDES))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def chat_text(processor, prompt: str) -> str:
    """The text the adapter gives the model for one image and `prompt` (chat template + generation prompt)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def mrope_position_ids(
    input_ids: torch.Tensor, image_token_id: int, grid_thw: Sequence[int], merge: int
) -> torch.Tensor:
    """M-RoPE positions (3, L) for a sequence holding one image, as `get_rope_index` computes them.

    Text before the image counts 0..s-1; image token (i, j) gets (t, h, w) = (s, s+i, s+j); text after
    the image continues from s + max(grid_h, grid_w) (grid in merged tokens).
    """
    L = input_ids.shape[0]
    image_pos = (input_ids == image_token_id).nonzero().flatten()
    _, gh, gw = (int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge)
    if image_pos.numel() != gh * gw:
        raise ValueError(
            f"sequence has {image_pos.numel()} image tokens, grid {tuple(grid_thw)} needs {gh * gw}"
        )
    s = int(image_pos[0])
    pos = torch.empty(3, L, dtype=torch.long)
    pos[:, :s] = torch.arange(s)
    hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos[0, s : s + gh * gw] = s
    pos[1, s : s + gh * gw] = s + hh.flatten()
    pos[2, s : s + gh * gw] = s + ww.flatten()
    after = s + gh * gw
    pos[:, after:] = torch.arange(L - after) + s + max(gh, gw)
    return pos


def training_samples(
    scene, rng: np.random.Generator, n: int, caption_fraction: float
) -> list[tuple[str, str, str]]:
    """`n` (workload, prompt, target) triples about one scene: distinct questions (target: the canonical
    answer) or captions (a random reference, lowercased: the word-level tokenizer is case-sensitive)."""
    from knobsweep.workloads import prompts, synthetic

    questions = list(synthetic.questions_for(scene, rng, n=n))
    captions = synthetic.captions_for(scene, rng, n=n)
    out = []
    for i in range(n):
        if rng.random() < caption_fraction or not questions:
            out.append(("captioning", prompts.caption_prompt(), captions[i].lower()))
        else:
            q = questions.pop()
            out.append(("qa", prompts.qa_prompt(q.question), q.canonical_answer))
    return out


def grid_table(adapter, image_sizes: Sequence[tuple[int, int]], vision_tokens: Sequence[int]) -> dict:
    """(width, height, budget) -> (rows, cols) of LLM tokens, exactly as `adapter.resize_for_tokens` plans it."""
    from types import SimpleNamespace

    return {
        (w, h, t): adapter.planned_grid(SimpleNamespace(width=w, height=h), t)
        for w, h in image_sizes
        for t in vision_tokens
    }


# Per merged vision token: colour, shape, size and digit classes of the object part it shows (0 = none).
TOKEN_LABEL_CLASSES = (9, 7, 4, 10)


def token_labels(scene, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, 4) class ids, row-major like the vision tower's merged tokens: the object covering the
    token's centre, or else an object whose centre lies in the token (so tiny shapes get a label too)."""
    from knobsweep.workloads import synthetic

    colors, shapes = list(synthetic.COLORS), list(synthetic.SHAPES)
    width, height = scene.width, scene.height
    short = min(width, height)
    u = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols  # token centres, fractions of the image
    v = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    labels = torch.zeros(rows, cols, 4, dtype=torch.long)
    for obj in scene.objects:
        classes = torch.tensor(
            [
                colors.index(obj.color) + 1,
                shapes.index(obj.shape) + 1,
                synthetic.SIZES.index(obj.size) + 1,
                obj.marker or 0,
            ]
        )
        dist = torch.hypot((uu - obj.x) * width / short, (vv - obj.y) * height / short)
        covered = dist < 0.85 * obj.radius
        row, col = min(int(obj.y * rows), rows - 1), min(int(obj.x * cols), cols - 1)
        labels[covered] = classes
        if labels[row, col, 0] == 0:
            labels[row, col] = classes
    return labels.reshape(rows * cols, 4)


class BatchMaker:
    """Builds one training batch: an image size and a vision-token budget (so one grid per batch), scenes,
    the real processor's token ids and pixels, answer labels and M-RoPE positions."""

    def __init__(self, cfg: TrainConfig, processor, grids: dict, pixels_per_token: int) -> None:
        self.cfg = cfg
        self.processor = processor
        self.grids = grids
        self.side = pixels_per_token

    def scene_image(self, rng: np.random.Generator, width: int, height: int, vision_tokens: int):
        """A scene and its image resized to the budget's grid, as `adapter.resize_for_tokens` resizes it.

        Scenes are drawn in relative coordinates; at small budgets they are rendered at 2x the target's
        linear size (not at full size) to save time, and then resized with the adapter's filter (bicubic)."""
        from knobsweep.workloads import synthetic

        rows, cols = self.grids[(width, height, vision_tokens)]
        scale = min(1.0, 2 * rows * self.side / height)
        scene = synthetic.render_scene(rng, width=round(width * scale), height=round(height * scale))
        image = scene.image.convert("RGB").resize(
            (cols * self.side, rows * self.side), Image.Resampling.BICUBIC
        )
        return scene, image

    def __call__(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        width, height = cfg.image_sizes[int(rng.integers(len(cfg.image_sizes)))]
        vision_tokens = int(cfg.vision_tokens[int(rng.integers(len(cfg.vision_tokens)))])
        n = min(cfg.max_batch, cfg.tokens_per_batch // (vision_tokens + 48))
        n = max(cfg.samples_per_scene, n - n % cfg.samples_per_scene)
        images, texts, targets, workloads, labels = [], [], [], [], []
        rows, cols = self.grids[(width, height, vision_tokens)]
        while len(images) < n:
            scene, image = self.scene_image(rng, width, height, vision_tokens)
            scene_labels = token_labels(scene, rows, cols)
            for workload, prompt, target in training_samples(
                scene, rng, cfg.samples_per_scene, cfg.caption_fraction
            ):
                labels.append(scene_labels)
                images.append(image)
                texts.append(chat_text(self.processor, prompt))
                targets.append(target)
                workloads.append(workload)
        batch = encode_batch(self.processor, images, texts, targets)
        batch["is_caption"] = torch.tensor([w == "captioning" for w in workloads])
        batch["vision_tokens"] = torch.tensor(vision_tokens)
        batch["token_labels"] = torch.cat(labels)
        if cfg.top_k:  # drawn last, so that runs without it keep the data stream of earlier stages
            batch["top_k"] = torch.tensor(int(cfg.top_k[int(rng.integers(len(cfg.top_k)))]))
        return batch


def encode_batch(
    processor, images: Sequence[Image.Image], texts: Sequence[str], targets: Sequence[str]
) -> dict:
    """Token ids (prompt + target + <|im_end|>, right-padded), labels on the target, 4-row positions and packed
    pixels, through the real processor. All images must share one token grid."""
    tok = processor.tokenizer
    pad_id, eos_id = tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    enc = processor(text=list(texts), images=list(images), return_tensors="pt", padding=True)
    grid = enc["image_grid_thw"]
    if not bool((grid == grid[0]).all()):
        raise RuntimeError(f"one batch must hold one image grid, got {grid.unique(dim=0).tolist()}")
    rows, labels = [], []
    for ids, mask, target in zip(enc["input_ids"], enc["attention_mask"], targets):
        prompt_ids = ids[mask.bool()]
        answer = tok(target, add_special_tokens=False)["input_ids"] + [eos_id]
        rows.append(torch.cat([prompt_ids, torch.tensor(answer)]))
        labels.append(torch.cat([torch.full_like(prompt_ids, -100), torch.tensor(answer)]))
    n, length = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    label_ids = torch.full((n, length), -100, dtype=torch.long)
    # Right padding and a plain causal mask: pads come after every real token, so no real token sees one.
    # Row 0 of the positions is the plain text position (also tells transformers nothing is packed).
    position_ids = torch.zeros(4, n, length, dtype=torch.long)
    position_ids[0] = torch.arange(length)
    merge = processor.image_processor.merge_size
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = r
        label_ids[i, : len(r)] = lab
        position_ids[1:, i] = mrope_position_ids(input_ids[i], image_token_id, grid[0].tolist(), merge)
    return {
        "input_ids": input_ids,
        "labels": label_ids,
        "position_ids": position_ids,
        "pixel_bytes": pack_pixels(enc["pixel_values"], processor.image_processor),
        "image_grid_thw": grid,
        "is_caption": torch.zeros(n, dtype=torch.bool),
    }


def pack_pixels(pixel_values: torch.Tensor, image_processor) -> torch.Tensor:
    """The processor's pixel patches as uint8 without the temporal copy (an image is its own second frame):
    8x fewer bytes between loader workers and the GPU; `unpack_pixels` restores them exactly."""
    c, t, p = 3, image_processor.temporal_patch_size, image_processor.patch_size
    pv = pixel_values.view(-1, c, t, p * p)
    if not torch.equal(pv[:, :, :1].expand_as(pv), pv):
        raise ValueError("pixel patches differ between temporal frames: not a still image")
    mean = torch.tensor(image_processor.image_mean).view(1, c, 1)
    std = torch.tensor(image_processor.image_std).view(1, c, 1)
    raw = (pv[:, :, 0] * std + mean) / image_processor.rescale_factor
    return raw.round().clamp(0, 255).to(torch.uint8)


def unpack_pixels(pixel_bytes: torch.Tensor, image_processor) -> torch.Tensor:
    """Inverse of `pack_pixels`: the processor's rescale + normalise, then the temporal copy."""
    c, t = 3, image_processor.temporal_patch_size
    mean = torch.tensor(image_processor.image_mean, device=pixel_bytes.device).view(1, c, 1)
    std = torch.tensor(image_processor.image_std, device=pixel_bytes.device).view(1, c, 1)
    pv = (pixel_bytes.float() * image_processor.rescale_factor - mean) / std
    return pv.unsqueeze(2).expand(-1, c, t, pv.shape[-1]).reshape(pv.shape[0], -1)


class SyntheticBatches(torch.utils.data.IterableDataset):
    """Endless batches; worker w of a run seeded `seed` draws from its own stream (seed, stream, start, w).

    DataLoader hands out workers' batches round-robin, so the batch sequence depends only on the seed,
    the worker count and the step the stream started at (a resumed run restarts the streams there).
    """

    def __init__(self, maker: BatchMaker, seed: int, stream: int, start_step: int) -> None:
        self.maker, self.seed, self.stream, self.start_step = maker, seed, stream, start_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, self.stream, self.start_step, worker])
        while True:
            yield self.maker(rng)


# --------------------------------------------------------------------------------------------------
# Model set-up and speed-ups used only in training
# --------------------------------------------------------------------------------------------------


def build_initial_checkpoint(out_dir: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Config + tokenizer + processor + chat template of the demo model (weights are re-initialised)."""
    from knobsweep.models.tiny import build_tiny_checkpoint
    from knobsweep.workloads.synthetic import VOCABULARY

    return build_tiny_checkpoint(
        out_dir, family="qwen3_vl_moe", seed=seed, vocabulary=VOCABULARY, **{**MODEL_OVERRIDES, **overrides}
    )


def fresh_model(checkpoint_dir: str | Path, seed: int):
    """The architecture of `checkpoint_dir` with new weights drawn at `INITIALIZER_RANGE` (seeded)."""
    from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

    config = AutoConfig.from_pretrained(checkpoint_dir)
    for c in (config, config.text_config, config.vision_config):
        c.initializer_range = INITIALIZER_RANGE
    torch.manual_seed(seed)
    return Qwen3VLMoeForConditionalGeneration(config)


def load_weights(model, checkpoint_dir: Path) -> None:
    """Copy a saved checkpoint's weights (any dtype) into `model`; every tensor must match by name and shape."""
    from safetensors.torch import load_file

    files = sorted(checkpoint_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no model*.safetensors to initialise from")
    state = {}
    for f in files:
        state.update(load_file(f))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint_dir}: weights do not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise ValueError(
                f"{checkpoint_dir}: {name} has shape {tuple(tensor.shape)}, "
                f"the model {tuple(own[name].shape)}"
            )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _bf16_grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # transformers casts the input to the fp32 master weight, so experts would run in fp32 under autocast.
    return F.grouped_mm(input.to(torch.bfloat16), weight.to(torch.bfloat16), offs=offs)


def _batched_vision_attention(original):
    """Vision attention that runs all images of a batch in one SDPA call when they share one grid."""
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if len(set(lengths)) != 1:
            return original(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        n, length = len(lengths), lengths[0]
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = m.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.reshape(n, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq, -1))

    return forward


def _shared_grid_position_ids(original):
    """Vision rotary positions computed once per batch when all images share one grid (not once per image)."""

    def fn(grid_thw, spatial_merge_size, include_temporal=False, kwargs=None):
        if (
            (kwargs and "position_ids" in kwargs)
            or include_temporal
            or not bool((grid_thw == grid_thw[0]).all())
        ):
            return original(grid_thw, spatial_merge_size, include_temporal=include_temporal, kwargs=kwargs)
        one = original(grid_thw[:1], spatial_merge_size)
        return one.repeat(grid_thw.shape[0], 1)

    return fn


@contextlib.contextmanager
def training_kernels(device: torch.device):
    """Speed patches for training on CUDA: bf16 expert matmuls, batched vision attention, shared positions."""
    from transformers.integrations import moe
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m

    saved = (moe._grouped_mm, m.Qwen3VLMoeVisionAttention.forward, m.get_vision_position_ids)
    try:
        if device.type == "cuda":
            moe._grouped_mm = _bf16_grouped_mm
        m.Qwen3VLMoeVisionAttention.forward = _batched_vision_attention(saved[1])
        m.get_vision_position_ids = _shared_grid_position_ids(saved[2])
        yield
    finally:
        moe._grouped_mm, m.Qwen3VLMoeVisionAttention.forward, m.get_vision_position_ids = saved


class VisionProbe(torch.nn.Module):
    """Linear heads on the vision tower's merged tokens, for the dense auxiliary loss (training only)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.head = torch.nn.Linear(model.config.vision_config.out_hidden_size, sum(TOKEN_LABEL_CLASSES))
        self.features: torch.Tensor | None = None
        model.model.visual.merger.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.features = output

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per label kind; background tokens weigh 0.1 (they are most of the image)."""
        if self.features is None or self.features.shape[0] != labels.shape[0]:
            raise RuntimeError("vision probe: merged tokens do not match the token labels")
        logits = self.head(self.features.float()).split(list(TOKEN_LABEL_CLASSES), dim=-1)
        weight = torch.where(labels[:, 0] > 0, 1.0, 0.1)
        total = sum(
            (F.cross_entropy(lg, labels[:, i], reduction="none") * weight).sum() / weight.sum()
            for i, lg in enumerate(logits)
        )
        self.features = None
        return total


def batch_loss(
    model,
    batch: dict[str, torch.Tensor],
    aux_coef: float,
    per_token: bool = True,
    probe: VisionProbe | None = None,
    probe_coef: float = 0.0,
    top_k: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on answer tokens, + router balance. `per_token`: mean over all answer tokens of the batch
    (captions, with many image-dependent words, then carry most of the gradient); else mean of per-sample
    means (every sample weighs the same). `top_k`: experts per token for this batch, set on every router
    (None: the routers are left as they are, e.g. at an adapter's knob setting)."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

    cfg = model.config.text_config
    if top_k is not None:
        for router in routers(model):
            router.top_k = top_k
    out = model.model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        output_router_logits=aux_coef > 0,
    )
    hidden = out.last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[keep]).float()
    token_loss = F.cross_entropy(logits, targets[keep], reduction="none")
    sample_idx = keep.nonzero()[:, 0]
    n = batch["input_ids"].shape[0]
    per_sample = torch.zeros(n, device=logits.device).index_add_(0, sample_idx, token_loss)
    loss = per_sample.sum() / keep.sum() if per_token else (per_sample / keep.sum(1).clamp(min=1)).mean()
    per_sample = per_sample / keep.sum(1).clamp(min=1)
    is_cap = batch["is_caption"]
    stats = {
        "qa_loss": per_sample[~is_cap].mean().item() if (~is_cap).any() else float("nan"),
        "caption_loss": per_sample[is_cap].mean().item() if is_cap.any() else float("nan"),
    }
    if aux_coef > 0:
        k = cfg.num_experts_per_tok if top_k is None else top_k
        aux = load_balancing_loss_func(out.router_logits, cfg.num_experts, k, None)
        loss = loss + aux_coef * aux
        stats["aux_loss"] = aux.item()
    if probe is not None and probe_coef > 0:
        vision = probe.loss(batch["token_labels"])
        loss = loss + probe_coef * vision
        stats["vision_probe_loss"] = vision.item()
    return loss, stats


def routers(model) -> list[torch.nn.Module]:
    """The MoE routers of the text model (their `top_k` sets the experts per token, as the adapter's knob)."""
    layers = model.model.language_model.layers
    return [layer.mlp.gate for layer in layers if hasattr(getattr(layer, "mlp", None), "gate")]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.peak_lr * cfg.min_lr_ratio
    return floor + (cfg.peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def save_checkpoint(model, template_dir: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Weights in `dtype` (sharded), plus the template's tokenizer/processor/generation files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("model*.safetensors*"):
        old.unlink()
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(out_dir, state_dict=state, max_shard_size=SAVE_MAX_SHARD, safe_serialization=True)
    config = json.loads((out_dir / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in template_dir.iterdir():
        if f.is_file() and not f.name.startswith(("model", "config.json", "knobsweep_tiny")):
            shutil.copy2(f, out_dir / f.name)


def train(
    out_dir: str | Path, cfg: TrainConfig, *, work_dir: str | Path | None = None, device: str = "cuda"
) -> dict:
    """Train the demo model; write the checkpoint (bf16) to `out_dir` and return the training record.

    `work_dir` holds an fp32 resume state (model + optimizer + step); a run started again with the same
    `work_dir` continues from it (the data streams restart at the resumed step).
    """
    from knobsweep.models import load_model

    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.parent / (out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    template = work / "template"
    if not (template / "config.json").exists():
        build_initial_checkpoint(template, seed=cfg.seed, **cfg.model_overrides)
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    adapter = load_model(template, device="cpu")  # for its processor and resize rule only
    if not cfg.image_sizes:
        from knobsweep.workloads.synthetic import DEFAULT_IMAGE_SIZES

        cfg.image_sizes = tuple(DEFAULT_IMAGE_SIZES)
    maker = BatchMaker(
        cfg,
        adapter.processor,
        grid_table(adapter, cfg.image_sizes, cfg.vision_tokens),
        adapter.pixels_per_token(),
    )
    del adapter

    model = fresh_model(template, cfg.seed)
    if cfg.init_from:
        load_weights(model, Path(cfg.init_from))
    model = model.to(dev)
    model.train()
    probe = VisionProbe(model).to(dev)
    params = [*model.named_parameters(), *(("probe." + n, p) for n, p in probe.named_parameters())]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.peak_lr,
        betas=(0.9, 0.95),
        fused=dev.type == "cuda",
    )
    record: dict[str, Any] = {"config": asdict(cfg), "curve": [], "segments": []}
    start = 0
    resume = work / "resume.pt"
    if resume.exists():
        state = torch.load(resume, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        opt.load_state_dict(state["optimizer"])
        start, record = state["step"], state["record"]
    elif cfg.init_from:
        earlier = Path(cfg.init_from) / "training_record.json"
        if earlier.exists():
            record["initialised_from"] = {"checkpoint": str(cfg.init_from), **json.loads(earlier.read_text())}
    # A resumed run may change the plan (e.g. more steps): each segment records what it ran with.
    record["segments"].append(
        {"start_step": start, "planned_steps": cfg.steps, "time_limit_s": cfg.time_limit_s}
    )

    loader = torch.utils.data.DataLoader(
        SyntheticBatches(maker, cfg.seed, TRAIN_STREAM, start),
        batch_size=None,
        num_workers=cfg.workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if cfg.workers else None,
        persistent_workers=False,
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params / 1e6:.2f} M; steps {start}..{cfg.steps}", flush=True)
    t0 = time.monotonic()
    window: dict[str, list[float]] = {}
    step = start
    t_wait = time.monotonic()
    with training_kernels(dev):
        for batch in loader:
            if step >= cfg.steps:
                break
            t_data = time.monotonic() - t_wait
            batch = _to_device(batch, dev)
            batch["pixel_values"] = unpack_pixels(batch.pop("pixel_bytes"), maker.processor.image_processor)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss, stats = batch_loss(
                    model,
                    batch,
                    cfg.router_aux_loss_coef,
                    cfg.per_token_loss,
                    probe=probe,
                    probe_coef=cfg.vision_aux_loss_coef,
                    top_k=int(batch["top_k"]) if "top_k" in batch else None,
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
            # A non-finite loss or gradient (bf16 overflow; grouped_mm leaves rows of experts that got no token
            # uninitialised in some kernels) would poison every weight: skip that step instead.
            finite = bool(torch.isfinite(gnorm)) and bool(torch.isfinite(loss))
            if finite:
                opt.step()
            step += 1
            stats["skipped"] = float(not finite)
            for k, v in {
                **stats,
                "loss": loss.item() if finite else float("nan"),
                "grad_norm": gnorm.item() if finite else float("nan"),
                "data_wait_s": t_data,
                "step_s": time.monotonic() - t_wait,
                "batch": float(batch["input_ids"].shape[0]),
                "vision_tokens": float(batch["vision_tokens"]),
                **({"top_k": float(batch["top_k"])} if "top_k" in batch else {}),
            }.items():
                window.setdefault(k, []).append(v)
            if step % cfg.log_every == 0 or step == cfg.steps:
                row = {"step": step, "lr": lr_at(step - 1, cfg), "elapsed_s": round(time.monotonic() - t0, 1)}
                row.update({k: round(float(np.nanmean(v)), 4) for k, v in window.items()})
                if dev.type == "cuda":
                    row["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
                record["curve"].append(row)
                print(json.dumps(row), flush=True)
                window = {}
            if cfg.time_limit_s is not None and time.monotonic() - t0 > cfg.time_limit_s:
                break
            t_wait = time.monotonic()
    record["segments"][-1].update({"end_step": step, "seconds": round(time.monotonic() - t0, 1)})
    torch.save(
        {
            "model": model.state_dict(),
            "probe": probe.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "record": record,
        },
        resume,
    )
    save_checkpoint(model, template, out_dir)
    (out_dir / "training_record.json").write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


EVAL_SEED_OFFSET = 10_000  # held-out scenes: write_synthetic_dataset(seed=EVAL_SEED_OFFSET + seed)
CALIBRATION_SEED_OFFSET = 20_000  # scenes for the block importance of the evaluation


def heldout_samples(out_dir: Path, *, n_images: int, seed: int) -> tuple[list[dict], list[dict]]:
    """QA and captioning samples of a synthetic dataset written in the real formats (JPEG images at the
    dataset's sizes), as the workflow reads them; its seed streams are disjoint from training's."""
    from knobsweep.workloads import prompts, synthetic

    paths = synthetic.write_synthetic_dataset(out_dir, n_images=n_images, seed=seed)
    questions = json.loads(Path(paths["vqa_questions"]).read_text())["questions"]
    annotations = {
        a["question_id"]: a for a in json.loads(Path(paths["vqa_annotations"]).read_text())["annotations"]
    }
    coco = json.loads(Path(paths["coco_captions"]).read_text())
    image_dir = Path(paths["image_dir"])
    images = {im["id"]: image_dir / im["file_name"] for im in coco["images"]}
    qa = []
    for q in questions:
        a = annotations[q["question_id"]]
        qa.append(
            {
                "image_path": str(images[q["image_id"]]),
                "image_id": q["image_id"],
                "question": q["question"],
                "prompt": prompts.qa_prompt(q["question"]),
                "references": [x["answer"] for x in a["answers"]],
                "answer_type": a["answer_type"],
                "question_type": a["question_type"],
                "canonical_answer": a["multiple_choice_answer"],
            }
        )
    refs: dict[int, list[str]] = {}
    for c in coco["annotations"]:
        refs.setdefault(c["image_id"], []).append(c["caption"])
    captions = [
        {"image_path": str(images[i]), "image_id": i, "prompt": prompts.caption_prompt(), "references": r}
        for i, r in sorted(refs.items())
    ]
    return qa, captions


def block_importance(adapter, samples: list[dict], images: dict, *, vision_tokens: int) -> list[float]:
    """Teacher-forced answer loss increase when each decoder block alone is skipped (batched by image size).

    (The workflow's own importance step ranks blocks by generated-answer quality instead; this cheaper
    ranking is only for the model card's numbers.)"""
    model, processor = adapter.model, adapter.processor
    groups: dict[tuple[int, int], list[dict]] = {}
    for s in samples:
        groups.setdefault(images[s["image_path"]].size, []).append(s)
    batches = []
    for group in groups.values():
        resized = [adapter.resize_for_tokens(images[s["image_path"]], vision_tokens) for s in group]
        texts = [chat_text(processor, s["prompt"]) for s in group]
        targets = [s.get("canonical_answer") or s["references"][0].lower() for s in group]
        b = {k: v.to(adapter.device) for k, v in encode_batch(processor, resized, texts, targets).items()}
        b["pixel_values"] = unpack_pixels(b.pop("pixel_bytes"), processor.image_processor).to(adapter.dtype)
        batches.append(b)

    @torch.inference_mode()
    def mean_loss() -> float:
        return sum(batch_loss(model, b, 0.0)[0].item() * len(b["labels"]) for b in batches) / len(samples)

    base = mean_loss()
    scores = []
    for i in range(adapter.num_blocks):
        with adapter.knobs(active_blocks=[j for j in range(adapter.num_blocks) if j != i]):
            scores.append(mean_loss() - base)
    return scores


def evaluation_settings(vision_tokens: Sequence[int]) -> list[dict[str, int]]:
    full = max(vision_tokens)
    settings = [{"vision_tokens": v, "top_k": 8, "active_blocks": 24} for v in sorted(vision_tokens)]
    settings += [{"vision_tokens": full, "top_k": k, "active_blocks": 24} for k in (1, 2, 4)]
    settings += [{"vision_tokens": full, "top_k": 8, "active_blocks": b} for b in (8, 16)]
    settings += [
        {"vision_tokens": 576, "top_k": 1, "active_blocks": 24},
        {"vision_tokens": 576, "top_k": 8, "active_blocks": 8},
        {"vision_tokens": min(vision_tokens), "top_k": 1, "active_blocks": 8},
    ]
    return settings


def evaluate(
    model_dir: str | Path,
    work_dir: str | Path,
    *,
    n_images: int = 100,
    seed: int = 0,
    device: str = "cuda",
    dtype: str = "float32",
    vision_tokens: Sequence[int] = (16, 36, 64, 144, 256, 576, 1024, 1872),
    batch_size: int = 50,
    settings: Sequence[dict[str, int]] | None = None,
    importance_vision_tokens: int = 576,
    n_calibration_images: int = 16,
) -> dict:
    """Predictions on held-out scenes for the model card's knob settings (scored on CPU by `score`)."""
    from knobsweep.knobs import select_blocks
    from knobsweep.models import load_model
    from knobsweep.workloads.prompts import default_max_new_tokens

    work = Path(work_dir)
    adapter = load_model(model_dir, device=device, dtype=dtype)
    qa, captions = heldout_samples(work / "heldout", n_images=n_images, seed=EVAL_SEED_OFFSET + seed)
    cal_qa, cal_captions = heldout_samples(
        work / "calibration", n_images=n_calibration_images, seed=CALIBRATION_SEED_OFFSET + seed
    )
    images = {
        p: Image.open(p).convert("RGB")
        for p in {s["image_path"] for s in qa + captions + cal_qa + cal_captions}
    }
    t0 = time.monotonic()
    importance = block_importance(
        adapter, cal_qa + cal_captions, images, vision_tokens=importance_vision_tokens
    )
    print(f"importance {time.monotonic() - t0:.1f} s: {[round(x, 3) for x in importance]}", flush=True)
    results = []
    for s in settings or evaluation_settings(vision_tokens):
        kept = select_blocks(importance, s["active_blocks"])
        predictions: dict[str, list[str]] = {}
        t0 = time.monotonic()
        with adapter.knobs(top_k=s["top_k"], active_blocks=kept):
            for workload, samples in (("qa", qa), ("captioning", captions)):
                preds = []
                for i in range(0, len(samples), batch_size):
                    chunk = samples[i : i + batch_size]
                    out = adapter.generate_batch(
                        [images[c["image_path"]] for c in chunk],
                        [c["prompt"] for c in chunk],
                        vision_tokens=s["vision_tokens"],
                        max_new_tokens=default_max_new_tokens(workload),
                    )
                    preds += [r.text for r in out]
                predictions[workload] = preds
        results.append(
            {
                **s,
                "kept_blocks": list(kept),
                "predictions": predictions,
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
        print(json.dumps({k: v for k, v in results[-1].items() if k != "predictions"}), flush=True)
    return {
        "model": str(model_dir),
        "n_images": n_images,
        "heldout_seed": EVAL_SEED_OFFSET + seed,
        "calibration_seed": CALIBRATION_SEED_OFFSET + seed,
        "importance": importance,
        "importance_vision_tokens": importance_vision_tokens,
        "constant_caption": cal_captions[0]["references"][0].lower(),
        "qa": qa,
        "captioning": captions,
        "settings": results,
    }


def score(evaluation: dict) -> list[dict]:
    """VQA accuracy (official) and caption metrics per setting, plus the trivial baselines."""
    from collections import Counter

    from knobsweep.metrics.captions import score_captions
    from knobsweep.metrics.vqa import score_vqa

    qa, caps = evaluation["qa"], evaluation["captioning"]
    answers = [s["references"] for s in qa]
    atypes = [s["answer_type"] for s in qa]
    refs = {str(i): s["references"] for i, s in enumerate(caps)}
    rows = []

    def one(name: str, qa_preds: list[str], cap_preds: list[str]) -> dict:
        _, qa_summary = score_vqa(qa_preds, answers, atypes)
        corpus, _ = score_captions(
            {str(i): p for i, p in enumerate(cap_preds)}, refs, metrics=("cider", "bleu4")
        )
        return {"setting": name, "vqa_accuracy": qa_summary, **corpus}

    # Trivial baselines: one answer for every question, one caption for every image.
    frequent = Counter(s["canonical_answer"] for s in qa).most_common(1)[0][0]
    # The constant caption is a calibration scene's reference (never one of the scored references), lower-cased.
    constant_caption = evaluation.get("constant_caption") or caps[0]["references"][0].lower()
    rows.append(
        {
            **one("baseline_constant", [frequent] * len(qa), [constant_caption] * len(caps)),
            "constant_answer": frequent,
            "constant_caption": constant_caption,
        }
    )
    for s in evaluation["settings"]:
        name = f"vt{s['vision_tokens']}_k{s['top_k']}_b{s['active_blocks']}"
        rows.append(one(name, s["predictions"]["qa"], s["predictions"]["captioning"]))
    return rows


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m knobsweep.demo_model", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the demo model and write its checkpoint")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--work-dir", type=Path, default=None, help="resume state (fp32 model + optimizer)")
    t.add_argument("--device", default="cuda")
    defaults = TrainConfig()
    for name in (
        "seed",
        "steps",
        "peak_lr",
        "warmup_steps",
        "tokens_per_batch",
        "max_batch",
        "caption_fraction",
        "workers",
        "log_every",
        "time_limit_s",
        "samples_per_scene",
        "router_aux_loss_coef",
        "vision_aux_loss_coef",
        "min_lr_ratio",
        "init_from",
    ):
        value = getattr(defaults, name)
        kind = str if name == "init_from" else type(value) if value is not None else float
        t.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    t.add_argument(
        "--per-sample-loss",
        dest="per_token_loss",
        action="store_false",
        help="weigh every sample the same instead of every answer token",
    )

    def int_tuple(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(","))

    t.add_argument("--vision-tokens", type=int_tuple, default=defaults.vision_tokens)
    t.add_argument(
        "--top-k",
        type=int_tuple,
        default=defaults.top_k,
        help="experts per token, one drawn per batch (e.g. 8,16,32); default: the model's",
    )
    e = sub.add_parser("evaluate", help="generate on held-out scenes for the model card's settings")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--work-dir", type=Path, required=True, help="where the held-out dataset is written")
    e.add_argument("--n-images", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cuda")
    e.add_argument("--importance-vision-tokens", type=int, default=576)
    e.add_argument("--n-calibration-images", type=int, default=16)
    e.add_argument(
        "--cells", default=None, help="comma-separated cell ids (vt576_k8_b24,...); default: the card's"
    )
    s = sub.add_parser("score", help="score an evaluate output (CPU; needs Java for the caption tokenizer)")
    s.add_argument("evaluation", type=Path)
    s.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "train":
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
        train(args.out, cfg, work_dir=args.work_dir, device=args.device)
    elif args.command == "evaluate":
        settings = None
        if args.cells:
            from knobsweep.knobs import KnobSetting

            settings = [asdict(KnobSetting.from_cell_id(c)) for c in args.cells.split(",")]
        result = evaluate(
            args.model,
            args.work_dir,
            n_images=args.n_images,
            seed=args.seed,
            device=args.device,
            settings=settings,
            importance_vision_tokens=args.importance_vision_tokens,
            n_calibration_images=args.n_calibration_images,
        )
        args.out.write_text(json.dumps(result))
    else:
        rows = score(json.loads(args.evaluation.read_text()))
        args.out.write_text(json.dumps(rows, indent=1))
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
