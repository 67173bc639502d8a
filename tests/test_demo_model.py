"""The embedded default model (resources/models/tiny-qwen3-vl-moe) and its training code (knobsweep.demo_model)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from knobsweep import demo_model as dm
from PIL import Image

MODEL_DIR = Path(__file__).resolve().parents[1] / "resources" / "models" / "tiny-qwen3-vl-moe"
MAX_BYTES = 40_000_000  # the budget: at most 40 MB for the whole checkpoint


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def shipped():
    from knobsweep.models import load_model

    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"the shipped checkpoint is missing: {MODEL_DIR}/config.json")
    return load_model(MODEL_DIR, device="cpu", dtype="float32")


def test_shipped_checkpoint_size_and_shape(shipped):
    files = [f for f in MODEL_DIR.iterdir() if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    shards = [f for f in files if f.name.endswith(".safetensors")]
    assert shards and all(f.stat().st_size < 15 * 2**20 for f in shards)
    assert (shipped.num_blocks, shipped.num_experts, shipped.default_top_k) == (24, 64, 8)
    assert type(shipped.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    low, high = shipped.vision_token_range()
    assert low <= 16 and high >= 1872
    assert (MODEL_DIR / "README.md").read_text().count("python -m knobsweep.demo_model train") >= 1


def test_shipped_checkpoint_answers_held_out_questions(shipped, tmp_path):
    """On scenes it never saw (a seed stream training does not use) the model beats the most frequent answer.

    (A model that learned per-question answer priors passes this; it does not show that the image is used.)"""
    from knobsweep.metrics.vqa import vqa_accuracy

    qa, _ = dm.heldout_samples(tmp_path, n_images=8, seed=424242)
    images = {}
    from PIL import Image

    for s in qa:
        images.setdefault(s["image_path"], Image.open(s["image_path"]).convert("RGB"))
    out = shipped.generate_batch(
        [images[s["image_path"]] for s in qa], [s["prompt"] for s in qa], vision_tokens=144, max_new_tokens=8
    )
    model_acc = np.mean([vqa_accuracy(r.text, s["references"]) for r, s in zip(out, qa)])
    frequent = Counter(s["canonical_answer"] for s in qa).most_common(1)[0][0]
    baseline_acc = np.mean([vqa_accuracy(frequent, s["references"]) for s in qa])
    assert model_acc > baseline_acc + 0.15, (model_acc, baseline_acc, [r.text for r in out])


def test_mrope_positions_match_transformers(tmp_path):
    """Our training positions equal transformers' get_rope_index for left-padded processor output."""
    from knobsweep.models.tiny import build_tiny_checkpoint
    from PIL import Image
    from transformers import AutoProcessor

    path = build_tiny_checkpoint(tmp_path / "m", num_blocks=1)
    processor = AutoProcessor.from_pretrained(path)
    model = dm.fresh_model(path, 0)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in ((64, 96), (96, 64), (64, 64))
    ]
    texts = [
        dm.chat_text(processor, p) for p in ("what color is it ?", "how many", "describe the image briefly .")
    ]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    ref, _ = model.model.get_rope_index(
        enc["input_ids"],
        mm_token_type_ids=enc["mm_token_type_ids"],
        image_grid_thw=enc["image_grid_thw"],
        attention_mask=enc["attention_mask"],
    )
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for i in range(len(texts)):
        keep = enc["attention_mask"][i].bool()
        ours = dm.mrope_position_ids(
            enc["input_ids"][i][keep], image_token, enc["image_grid_thw"][i].tolist(), 2
        )
        assert torch.equal(ours, ref[:, i, keep])


def test_packed_pixels_and_batched_vision_match_the_plain_path(tmp_path):
    from knobsweep.models.tiny import build_tiny_checkpoint
    from PIL import Image
    from transformers import AutoProcessor

    path = build_tiny_checkpoint(tmp_path / "m", num_blocks=1, vision_depth=2)
    processor = AutoProcessor.from_pretrained(path)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)) for _ in range(3)]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    packed = dm.pack_pixels(pixel_values, processor.image_processor)
    assert packed.dtype == torch.uint8 and packed.numel() * 2 == pixel_values.numel()  # 8x fewer bytes
    assert torch.allclose(dm.unpack_pixels(packed, processor.image_processor), pixel_values, atol=1e-6)

    visual = dm.fresh_model(path, 0).model.visual.eval()
    grid = torch.tensor([[1, 4, 6]] * 3)
    with torch.no_grad():
        plain = visual(pixel_values, grid_thw=grid)
        with dm.training_kernels(torch.device("cpu")):
            batched = visual(pixel_values, grid_thw=grid)
    torch.testing.assert_close(batched.pooler_output, plain.pooler_output, rtol=1e-5, atol=1e-5)
    for a, b in zip(batched.deepstack_features, plain.deepstack_features):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_one_training_step_on_a_two_block_model(tmp_path):
    from knobsweep.models import load_model

    cfg = dm.TrainConfig(
        steps=1,
        warmup_steps=1,
        tokens_per_batch=256,
        max_batch=4,
        workers=0,
        log_every=1,
        vision_tokens=(16,),
        model_overrides={**dm.MODEL_OVERRIDES, "num_blocks": 2},
    )
    record = dm.train(tmp_path / "out", cfg, device="cpu")
    (row,) = record["curve"]
    assert row["step"] == 1 and np.isfinite(row["loss"]) and row["batch"] == 4
    assert 0 < row["qa_loss"] < 20 or 0 < row["caption_loss"] < 20
    saved = json.loads((tmp_path / "out" / "training_record.json").read_text())
    assert saved["segments"][-1]["end_step"] == 1
    adapter = load_model(tmp_path / "out")
    assert adapter.num_blocks == 2 and adapter.model.dtype == torch.float32
    # The step moved the weights (fp32 resume state) away from the seeded initialisation.
    fresh = dm.fresh_model(tmp_path / "out.work" / "template", 0).state_dict()
    trained = torch.load(tmp_path / "out.work" / "resume.pt", weights_only=False)["model"]
    assert sum(not torch.equal(v, trained[k]) for k, v in fresh.items()) > len(fresh) // 2
    assert np.isfinite(row["vision_probe_loss"]) and row["vision_probe_loss"] > 0


def test_a_later_stage_starts_from_the_earlier_checkpoint(tmp_path):
    from safetensors.torch import load_file

    small = {"tokens_per_batch": 256, "max_batch": 4, "workers": 0, "log_every": 1, "vision_tokens": (16,)}
    two_blocks = {**dm.MODEL_OVERRIDES, "num_blocks": 2}
    dm.train(
        tmp_path / "a",
        dm.TrainConfig(steps=1, warmup_steps=1, model_overrides=two_blocks, **small),
        device="cpu",
    )
    # Zero steps from stage a: the saved weights are stage a's, not a fresh initialisation.
    cfg = dm.TrainConfig(steps=0, seed=1, init_from=str(tmp_path / "a"), model_overrides=two_blocks, **small)
    record = dm.train(tmp_path / "b", cfg, device="cpu")
    assert record["initialised_from"]["segments"][-1]["end_step"] == 1

    def weights(d):
        out = {}
        for f in sorted(d.glob("model*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint of another shape is refused, naming it.
    three = dm.TrainConfig(
        steps=0,
        init_from=str(tmp_path / "a"),
        model_overrides={**dm.MODEL_OVERRIDES, "num_blocks": 3},
        **small,
    )
    with pytest.raises(ValueError, match="do not match"):
        dm.train(tmp_path / "c", three, device="cpu")


def test_token_labels_mark_the_tokens_that_show_each_object():
    from knobsweep.workloads import synthetic

    large = synthetic.SceneObject("circle", "red", "large", x=0.25, y=0.5, radius=0.1, marker=7)
    tiny = synthetic.SceneObject("star", "blue", "tiny", x=0.81, y=0.13, radius=0.012)
    scene = synthetic.Scene(image=Image.new("RGB", (1600, 1200)), objects=(large, tiny), background="sandy")
    labels = dm.token_labels(scene, rows=12, cols=16).reshape(12, 16, 4)
    red, circle, size_large, blue, star, size_tiny = 1, 1, 1, 3, 5, 3
    assert labels[6, 4].tolist() == [red, circle, size_large, 7]  # centre of the large circle
    # The circle (radius 0.1 of 1200 px = 120 px) covers tokens within ~102 px of its centre (100 px tokens).
    covered = {(r, c) for r in range(12) for c in range(16) if labels[r, c, 0] == red}
    assert covered == {(5, 3), (5, 4), (6, 3), (6, 4)}
    # The tiny star covers no token centre, but the token holding its centre is labelled.
    assert labels[1, 12].tolist() == [blue, star, size_tiny, 0]
    assert int((labels[..., 0] > 0).sum()) == 5


def test_shipped_checkpoint_captions_describe_the_image_it_is_shown(shipped, tmp_path):
    """Grounding, not priors: the colour and shape words of a caption match the references of its own image
    far better than those of another image (the captions of a model that ignores the image match both alike)."""
    from knobsweep.workloads import synthetic

    _, captions = dm.heldout_samples(tmp_path, n_images=8, seed=434343)
    out = shipped.generate_batch(
        [Image.open(c["image_path"]).convert("RGB") for c in captions],
        [c["prompt"] for c in captions],
        vision_tokens=144,
        max_new_tokens=24,
    )
    content = set(synthetic.COLORS) | set(synthetic.SHAPES) | {s + "s" for s in synthetic.SHAPES}

    def precision(prediction: str, references: list[str]) -> float:
        words = [w for w in synthetic.tokenize_words(prediction) if w in content]
        seen = {w for r in references for w in synthetic.tokenize_words(r)}
        return np.mean([w in seen for w in words]) if words else 0.0

    own = np.mean([precision(r.text, c["references"]) for r, c in zip(out, captions)])
    other = np.mean(
        [precision(r.text, captions[(i + 1) % len(captions)]["references"]) for i, r in enumerate(out)]
    )
    assert own > other + 0.2, (own, other, [r.text for r in out])


def test_top_k_drawn_per_batch_trains_as_a_model_built_with_that_top_k(tmp_path):
    """`TrainConfig.top_k`: each batch carries a drawn top-k; its loss equals the loss of the same weights
    built with `num_experts_per_tok` = that top-k (an independent reference); the rest of the batch is the
    one drawn without the option (earlier stages' data streams are unchanged)."""
    from knobsweep.models import load_model
    from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

    template = dm.build_initial_checkpoint(tmp_path / "t", num_blocks=2)
    adapter = load_model(template, device="cpu")
    base = {"tokens_per_batch": 256, "max_batch": 4, "vision_tokens": (16,), "image_sizes": ((640, 480),)}
    grids = dm.grid_table(adapter, base["image_sizes"], base["vision_tokens"])

    def batch(top_k, seed):
        maker = dm.BatchMaker(dm.TrainConfig(top_k=top_k, **base), adapter.processor, grids, 32)
        return maker(np.random.default_rng(seed))

    drawn = {int(batch((2, 4), seed)["top_k"]) for seed in range(12)}
    assert drawn == {2, 4}
    plain, with_k = batch((), 3), batch((2, 4), 3)
    assert "top_k" not in plain and set(with_k) - set(plain) == {"top_k"}
    assert all(torch.equal(plain[k], with_k[k]) for k in plain)

    plain["pixel_values"] = dm.unpack_pixels(plain.pop("pixel_bytes"), adapter.processor.image_processor)
    model = dm.fresh_model(template, 0).eval()
    config = AutoConfig.from_pretrained(template)
    config.text_config.num_experts_per_tok = 2
    reference = Qwen3VLMoeForConditionalGeneration(config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        at_default, _ = dm.batch_loss(model, plain, aux_coef=0.01)
        at_2, _ = dm.batch_loss(model, plain, aux_coef=0.01, top_k=2)
        expected, _ = dm.batch_loss(reference, plain, aux_coef=0.01)
    torch.testing.assert_close(at_2, expected)
    assert not torch.allclose(at_default, at_2)
    assert {r.top_k for r in dm.routers(model)} == {2}  # left for the next batch
