"""Faults inside a cell or importance job, in process with the tiny random checkpoint: out of memory in the
middle of the samples (a clear error, no shard), and the safety rules of model loading (remote code only
when the config turns it on, safetensors only, a pickle is never unpickled)."""

from __future__ import annotations

import copy
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from knobsweep import cells, importance, io, models
from knobsweep.models import ADAPTERS
from knobsweep.workloads.manifest import build_manifest, write_manifest
from knobsweep.workloads.synthetic import write_synthetic_dataset
from knobsweep.workloads.vqa import load_vqa

N_BLOCKS = 6  # conftest's tiny checkpoints

SPEC = {
    "workload": "qa",
    "knobs": {"vision_tokens": 16, "top_k": 1, "active_blocks": 4},
    "blocks": {"keep_first": False, "keep_last": False},
    "runtime": {
        "model": {"built_by": "test"},
        "dtype": "float32",
        "device": "cpu",
        "attn_implementation": "sdpa",
        "experts_implementation": None,
        "trust_remote_code": False,
    },
    "manifest": {"workload": "qa", "source": "synthetic"},
    "importance": {"vision_tokens": 16, "top_k": None, "max_new_tokens": 2},
    "generation": {"max_new_tokens": 2, "batch_size": 1, "decoding": "greedy"},
    "warmup": 1,
    "inference_code_version": cells.INFERENCE_CODE_VERSION,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A qa manifest (3 eval + 1 calibration samples on synthetic scenes) and an importance file."""
    root = tmp_path_factory.mktemp("cell_inputs")
    paths = write_synthetic_dataset(root / "synthetic", n_images=6, seed=0)
    samples = load_vqa(paths["vqa_questions"], paths["vqa_annotations"], paths["image_dir"])
    manifest = build_manifest("qa", samples, n_eval=3, n_calibration=1, seed=0, prompt=None)
    write_manifest(manifest, root / "manifest.parquet")
    io.write_json_atomic(
        {"num_blocks": N_BLOCKS, "selection_score": [0.6, 0.1, 0.5, 0.2, 0.4, 0.3]}, root / "importance.json"
    )
    return {"manifest": root / "manifest.parquet", "importance": root / "importance.json"}


def run_job(checkpoint, inputs, out: Path, spec=SPEC):
    return cells.run_cell_job(
        copy.deepcopy(spec),
        model_path=str(checkpoint),
        device="cpu",
        manifest_path=str(inputs["manifest"]),
        importance_path=str(inputs["importance"]),
        out_path=str(out),
    )


def counted_generate(monkeypatch, before=None, setup=None) -> list:
    """Every adapter load_model returns records its generate calls (their vision_tokens) in the returned list;
    `before(calls)` runs after each is recorded (it may raise), `setup(adapter, calls)` once per adapter."""
    calls = []
    real_load = models.load_model

    def load(*args, **kwargs):
        adapter = real_load(*args, **kwargs)
        real_generate = adapter.generate

        def generate(*a, **k):
            calls.append(k.get("vision_tokens"))
            if before is not None:
                before(calls)
            return real_generate(*a, **k)

        adapter.generate = generate
        if setup is not None:
            setup(adapter, calls)
        return adapter

    monkeypatch.setattr(models, "load_model", load)
    return calls


def failing_generate(monkeypatch, error: BaseException, after: int) -> list:
    """Make every adapter load_model returns raise `error` on its (after+1)-th generate call."""

    def before(calls: list) -> None:
        if len(calls) > after:
            raise error

    return counted_generate(monkeypatch, before=before)


OOMS = {
    "torch.OutOfMemoryError": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "RuntimeError": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"),
}


def test_a_vision_graph_failing_mid_cell_is_recorded_in_the_provenance(
    tiny_checkpoints, inputs, tmp_path, monkeypatch
):
    """The shard says how its requests ran the vision encoder (the vision stage's latency depends on it): as
    loaded on the CPU; where a vision graph stops being usable part-way (`FastDecoding.vision_fallback`), that
    the cell's first samples ran graphed and the rest as loaded, with the reason."""
    provenance = run_job(tiny_checkpoints["qwen3_vl_moe"], inputs, tmp_path / "plain.parquet")
    assert provenance["vision_encoder"] == "as loaded"
    assert provenance["preprocess"] == "image placeholders expanded on token ids"

    def setup(adapter, calls: list) -> None:
        adapter.vision_encoder_mode = lambda: "graphed" if len(calls) < 3 else "as loaded: its capture failed"

    counted_generate(monkeypatch, setup=setup)
    out = tmp_path / "fallback.parquet"
    provenance = run_job(tiny_checkpoints["qwen3_vl_moe"], inputs, out)
    expected = "graphed, then from part-way through this cell as loaded: its capture failed"
    assert provenance["vision_encoder"] == expected == io.read_parquet_metadata(out)["vision_encoder"]


@pytest.mark.parametrize("kind", sorted(OOMS))
@pytest.mark.parametrize("after", [0, 2], ids=["in-warmup", "mid-samples"])
def test_out_of_memory_in_a_cell_raises_and_writes_nothing(
    tiny_checkpoints, inputs, tmp_path, monkeypatch, kind, after
):
    calls = failing_generate(monkeypatch, OOMS[kind], after)
    out = tmp_path / "cells" / "qa" / "vt16_k1_b4.parquet"
    with pytest.raises(type(OOMS[kind]), match="out of memory"):
        run_job(tiny_checkpoints["qwen3_vl_moe"], inputs, out)
    assert len(calls) == after + 1  # it stopped at the failing sample: no silent skip and carry on
    assert not out.exists()  # no partial shard
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nor a temporary file


def test_the_same_cell_succeeds_once_memory_is_back(tiny_checkpoints, inputs, tmp_path, monkeypatch):
    # Nothing of the failed attempt leaks into the next one (knobs reset, no half-written file).
    out = tmp_path / "vt16_k1_b4.parquet"
    failing_generate(monkeypatch, OOMS["RuntimeError"], 2)
    with pytest.raises(RuntimeError):
        run_job(tiny_checkpoints["qwen3_vl_moe"], inputs, out)
    monkeypatch.undo()
    run_job(tiny_checkpoints["qwen3_vl_moe"], inputs, out)
    reference = tmp_path / "reference.parquet"
    run_job(tiny_checkpoints["qwen3_vl_moe"], inputs, reference)
    columns = [
        "sample_id",
        "prediction",
        "vision_tokens_actual",
        "prompt_tokens",
        "output_tokens",
        "kept_blocks",
    ]
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_parquet(out)[columns], pd.read_parquet(reference)[columns])
    assert len(pd.read_parquet(out)) == 3


def test_out_of_memory_in_importance_writes_nothing(tiny_checkpoints, inputs, tmp_path, monkeypatch):
    failing_generate(monkeypatch, OOMS["torch.OutOfMemoryError"], 1)
    out = tmp_path / "importance" / "qa.json"
    with pytest.raises(torch.OutOfMemoryError):
        importance.importance_job(
            copy.deepcopy(SPEC),
            model_path=str(tiny_checkpoints["qwen3_vl_moe"]),
            device="cpu",
            manifest_path=str(inputs["manifest"]),
            out_path=str(out),
        )
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# --- safety --------------------------------------------------------------------------------------------


def spy_from_pretrained(monkeypatch) -> list[tuple[str, dict]]:
    """Record the keyword arguments of every from_pretrained call of the model class and AutoProcessor."""
    seen: list[tuple[str, dict]] = []
    model_cls = getattr(transformers, ADAPTERS["qwen3_vl_moe"].model_class)
    for cls in (model_cls, transformers.AutoProcessor):
        original = cls.from_pretrained.__func__

        def spy(klass, path, *args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, dict(kwargs)))
            return _original(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return seen


def test_config_default_keeps_remote_code_off_all_the_way_to_from_pretrained(
    tiny_checkpoints, inputs, tmp_path, monkeypatch
):
    import yaml
    from snakemake.utils import validate

    # The config as the workflow sees it: tiny.yaml does not mention trust_remote_code.
    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "tests" / "configs" / "tiny.yaml").read_text())
    assert "trust_remote_code" not in config["model"]
    validate(config, str(repo / "schemas" / "config.schema.yaml"), set_default=True)
    assert config["model"]["trust_remote_code"] is False
    spec = copy.deepcopy(SPEC)
    spec["runtime"]["trust_remote_code"] = config["model"]["trust_remote_code"]
    seen = spy_from_pretrained(monkeypatch)
    provenance = run_job(tiny_checkpoints["qwen3_vl_moe"], inputs, tmp_path / "shard.parquet", spec)
    assert {name for name, _ in seen} == {ADAPTERS["qwen3_vl_moe"].model_class, "AutoProcessor"}
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in seen), seen
    assert all(kwargs.get("local_files_only") is True for _, kwargs in seen), seen  # never the hub
    assert provenance["spec"]["runtime"]["trust_remote_code"] is False


def test_remote_code_only_when_the_config_turns_it_on(tiny_checkpoints, inputs, tmp_path, monkeypatch):
    spec = copy.deepcopy(SPEC)
    spec["runtime"]["trust_remote_code"] = True
    seen = spy_from_pretrained(monkeypatch)
    run_job(tiny_checkpoints["qwen3_vl_moe"], inputs, tmp_path / "shard.parquet", spec)
    assert seen and all(kwargs.get("trust_remote_code") is True for _, kwargs in seen)


class _Payload:
    """A pickle that, when unpickled, creates a marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_checkpoint(source: Path, target: Path, marker: Path, keep_safetensors: bool) -> Path:
    shutil.copytree(source, target)
    if not keep_safetensors:
        for path in target.glob("*.safetensors*"):
            path.unlink()
    (target / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return target


def test_checkpoint_with_only_pytorch_model_bin_is_refused(tiny_checkpoints, inputs, tmp_path):
    marker = tmp_path / "pickle-was-loaded"
    checkpoint = _pickle_checkpoint(tiny_checkpoints["qwen3_vl_moe"], tmp_path / "ckpt", marker, False)
    out = tmp_path / "shard.parquet"
    with pytest.raises(ValueError, match="safetensors"):
        run_job(checkpoint, inputs, out)
    assert not marker.exists() and not out.exists()


def test_pickle_next_to_safetensors_is_never_unpickled(tiny_checkpoints, inputs, tmp_path):
    marker = tmp_path / "pickle-was-loaded"
    checkpoint = _pickle_checkpoint(tiny_checkpoints["qwen3_vl_moe"], tmp_path / "ckpt", marker, True)
    run_job(checkpoint, inputs, tmp_path / "shard.parquet")
    assert not marker.exists()
    # The self-check: this payload does create the marker when unpickled.
    pickle.loads((checkpoint / "pytorch_model.bin").read_bytes()).close()
    assert marker.exists()


def test_importance_job_keeps_remote_code_off(tiny_checkpoints, inputs, tmp_path, monkeypatch):
    seen = spy_from_pretrained(monkeypatch)
    failing_generate(monkeypatch, RuntimeError("stop after loading"), 0)
    with pytest.raises(RuntimeError, match="stop after loading"):
        importance.importance_job(
            copy.deepcopy(SPEC),
            model_path=str(tiny_checkpoints["qwen3_vl_moe"]),
            device="cpu",
            manifest_path=str(inputs["manifest"]),
            out_path=str(tmp_path / "qa.json"),
        )
    assert seen and all(kwargs.get("trust_remote_code") is False for _, kwargs in seen)
