"""load_model: family registry, safetensors only, no remote code unless asked, clear errors; tiny builder."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_FAMILIES
from knobsweep.models import ADAPTERS, load_model, supported_families
from knobsweep.models.tiny import build_tiny_checkpoint, main


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_checkpoint_loads_with_facts(tiny_adapters, tiny_checkpoints, family):
    adapter = tiny_adapters[family]
    assert adapter.family == family
    assert adapter.num_blocks == 6 and adapter.num_experts == 64 and adapter.default_top_k == 8
    assert adapter.model.training is False
    assert adapter.processor.tokenizer.padding_side == "left"
    files = {p.name for p in tiny_checkpoints[family].iterdir()}
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt")) for f in files)


def _copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_unknown_and_refused_families(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["qwen3_vl_moe"]
    for model_type, needle in [
        ("bert", "not a supported family; supported: " + ", ".join(sorted(ADAPTERS))),
        ("llama4", "computes every expert"),
    ]:
        ckpt = _copy_without_weights(src, tmp_path / model_type)
        config = json.loads((ckpt / "config.json").read_text())
        config["model_type"] = model_type
        (ckpt / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=needle) as info:
            load_model(ckpt)
        assert str(ckpt) in str(info.value)
    assert "qwen3_vl_moe" in supported_families()


def test_refuses_non_safetensors_and_missing_files(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["qwen3_vl_moe"]
    ckpt = _copy_without_weights(src, tmp_path / "bin_only")
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"only as \['pytorch_model.bin'\].*safetensors only"):
        load_model(ckpt)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_model(tmp_path / "missing")
    bad = _copy_without_weights(src, tmp_path / "bad_json")
    (bad / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(bad)
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model(src, dtype="float8")


def test_passes_safetensors_and_no_remote_code(tiny_checkpoints, monkeypatch):
    import transformers

    seen = {}
    model_cls = getattr(transformers, ADAPTERS["qwen3_vl_moe"].model_class)
    original = model_cls.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(model_cls, "from_pretrained", classmethod(spy))
    adapter = load_model(
        tiny_checkpoints["qwen3_vl_moe"], experts_implementation="eager", attn_implementation="eager"
    )
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    assert seen["experts_implementation"] == "eager" and seen["attn_implementation"] == "eager"
    assert adapter.model.config._attn_implementation == "eager"


def test_a_cuda_device_this_process_cannot_see_fails_before_loading(tiny_checkpoints, monkeypatch):
    # As a job given a GPU slot beyond the machine's GPUs (knobsweep.gpu_slots) would: one index past the last.
    import torch
    import transformers

    model_cls = getattr(transformers, ADAPTERS["qwen3_vl_moe"].model_class)

    def no_load(cls, path, **kwargs):
        raise AssertionError("weights read for a device that is not there")

    monkeypatch.setattr(model_cls, "from_pretrained", classmethod(no_load))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(RuntimeError, match=rf"sees {count} CUDA device\(s\) \(CUDA_VISIBLE_DEVICES='3'\)"):
        load_model(tiny_checkpoints["qwen3_vl_moe"], device=f"cuda:{count}")


def test_builder_cli_and_vocabulary(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--family", "qwen3_vl_moe", "--seed", "1", "--num-blocks", "2"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    adapter = load_model(tmp_path / "cli")
    assert adapter.num_blocks == 2
    path = build_tiny_checkpoint(
        tmp_path / "vocab",
        vocabulary=["zebra", "giraffe"],
        num_blocks=1,
        num_experts=8,
        num_experts_per_tok=2,
    )
    adapter = load_model(path)
    tokenizer = adapter.processor.tokenizer
    assert tokenizer.decode(tokenizer("zebra giraffe")["input_ids"]) == "zebra giraffe"
    assert adapter.num_experts == 8 and adapter.default_top_k == 2
    assert adapter.model.config.text_config.vocab_size == len(tokenizer)
    with pytest.raises(ValueError, match="unknown overrides"):
        build_tiny_checkpoint(tmp_path / "bad", num_blocks=1, no_such_setting=3)
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        build_tiny_checkpoint(tmp_path / "bad2", family="nope")


def test_internvl_needs_a_qwen3_moe_language_model(tiny_checkpoints, tmp_path):
    ckpt = _copy_without_weights(tiny_checkpoints["internvl"], tmp_path / "internvl_dense")
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["model_type"] = "qwen2"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="text_config.model_type is 'qwen2'"):
        load_model(ckpt)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_override_table_matches_the_builders(family, tmp_path):
    """knobsweep.config.TINY_OVERRIDE_KEYS (read at DAG construction, without torch) names exactly what each
    builder consumes: every listed name gets past the builder's own leftover check, and a name outside the
    table is refused before anything is written."""
    from knobsweep.config import TINY_OVERRIDE_KEYS
    from knobsweep.models.tiny import BUILDERS

    assert set(TINY_OVERRIDE_KEYS) == set(BUILDERS)
    not_consumed = []
    for key in sorted(TINY_OVERRIDE_KEYS[family]):
        # A value the builder cannot use: it may fail later, but only after taking the name.
        try:
            BUILDERS[family](tmp_path / key, 0, None, {key: object()})
        except Exception as e:  # noqa: BLE001
            if "unknown overrides" in str(e):
                not_consumed.append(key)
    assert not_consumed == []
    with pytest.raises(ValueError, match="unknown overrides.*num_blokcs"):
        build_tiny_checkpoint(tmp_path / "typo", family=family, num_blokcs=4)
    assert not (tmp_path / "typo").exists()
