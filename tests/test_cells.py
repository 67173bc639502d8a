"""One cell: rows from an adapter, atomic shard writes, provenance, fingerprint (knobsweep.cells, io)."""

import copy
import gc
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from knobsweep import cells, io
from knobsweep.knobs import KnobSetting
from PIL import Image


@dataclass
class FakeResult:
    text: str
    vision_tokens: int
    prompt_tokens: int
    output_tokens: int
    timings_ms: dict = field(default_factory=dict)


class FakeAdapter:
    """A stand-in with the ModelAdapter surface run_cell uses; records every call."""

    num_blocks, num_experts, default_top_k = 6, 8, 2

    def __init__(self):
        self.calls, self.configured, self.resets = [], [], 0

    def vision_token_range(self):
        return (4, 4096)

    def configure(self, top_k=None, active_blocks=None):
        self.configured.append((top_k, tuple(active_blocks)))

    def reset(self):
        self.resets += 1

    def planned_grid(self, image, vision_tokens):
        # The manifest's eval images are 65, 66 and 68 pixels wide: the last two share a grid.
        return image.height // 16, image.width // 3

    def check_preprocessing(self, image, prompt, vision_tokens):
        self.calls.append(("check_preprocessing", prompt, vision_tokens))

    def generate(self, image, prompt, *, vision_tokens, max_new_tokens):
        self.calls.append((image.size, prompt, vision_tokens, max_new_tokens))
        timings = {
            "preprocess": 1.0,
            "vision": 2.0,
            "prefill": 3.0,
            "decode": 4.0,
            "ttft": 6.0,
            "total": 10.5,
        }
        return FakeResult(f"answer to {prompt}", vision_tokens - 1, 40, 3, timings)


@pytest.fixture
def manifest(tmp_path):
    rows = []
    for i, split in enumerate(["calibration", "eval", "eval", "calibration", "eval"]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (64 + i, 48), (i * 40, 0, 0)).save(path)
        rows.append({"sample_id": f"s{i}", "split": split, "image_path": str(path), "prompt": f"q{i}"})
    return pd.DataFrame(rows)


def test_run_cell_rows_warmup_and_knobs(manifest):
    adapter = FakeAdapter()
    setting = KnobSetting(32, 2, 3)
    rows = cells.run_cell(adapter, manifest, setting, (0, 2, 5), workload="qa", max_new_tokens=7, warmup=2)
    assert list(rows.columns) == list(cells.SHARD_COLUMNS)
    assert list(rows["sample_id"]) == ["s1", "s2", "s4"]  # eval samples only, manifest order
    # The preprocessing was checked untimed on the first evaluation sample of each token grid at the cell's budget
    # (s4's grid is s2's), then warm-up used the two calibration samples, with the same knobs, and is not in the rows.
    assert adapter.calls[:2] == [("check_preprocessing", "q1", 32), ("check_preprocessing", "q2", 32)]
    assert [c[1] for c in adapter.calls[2:]] == ["q0", "q3", "q1", "q2", "q4"]
    assert all(c[2] == 32 and c[3] == 7 for c in adapter.calls[2:])
    assert adapter.configured == [(2, (0, 2, 5))] and adapter.resets == 1
    assert rows["latency_ms"].tolist() == [10.5] * 3 and rows["ttft_ms"].tolist() == [6.0] * 3
    assert rows["vision_tokens_actual"].tolist() == [31] * 3
    assert rows["kept_blocks"].tolist() == [[0, 2, 5]] * 3
    assert (rows[["vision_tokens", "top_k", "active_blocks"]].drop_duplicates().values.tolist()) == [
        [32, 2, 3]
    ]


def test_run_cell_times_the_host_probe_before_each_measured_request(manifest, monkeypatch):
    import knobsweep.timing

    adapter = FakeAdapter()
    probes = iter([41.0, 95.5, 43.25])

    def probe():
        adapter.calls.append("probe")
        return next(probes)

    monkeypatch.setattr(knobsweep.timing, "host_probe_us", probe)
    rows = cells.run_cell(
        adapter, manifest, KnobSetting(32, 2, 1), (0,), workload="qa", max_new_tokens=2, warmup=1
    )
    assert rows["host_probe_us"].tolist() == [41.0, 95.5, 43.25]
    # Not in warm-up; right before each measured request (the image already loaded, outside its clock).
    assert ["probe" if c == "probe" else c[1] for c in adapter.calls] == [
        "q1",  # the untimed preprocessing checks, one per token grid
        "q2",
        "q0",
        "probe",
        "q1",
        "probe",
        "q2",
        "probe",
        "q4",
    ]


def test_run_cell_resets_the_adapter_on_failure(manifest):
    adapter = FakeAdapter()
    adapter.generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        cells.run_cell(
            adapter, manifest, KnobSetting(32, 2, 1), (0,), workload="qa", max_new_tokens=2, warmup=0
        )
    assert adapter.resets == 1


# Before the preprocessing checks, between them, in warm-up, between measured samples.
@pytest.mark.parametrize("stop_after", [0, 1, 3, 5])
def test_run_cell_stops_between_samples_when_asked(manifest, stop_after):
    # What a model worker does when its client is gone: stop before the next sample, reset the knobs.
    adapter = FakeAdapter()
    polls = []

    def should_stop():
        polls.append(len(adapter.calls))
        return len(adapter.calls) >= stop_after

    with pytest.raises(cells.Abandoned, match="qa vt32_k2_b1: abandoned"):
        cells.run_cell(
            adapter,
            manifest,
            KnobSetting(32, 2, 1),
            (0,),
            workload="qa",
            max_new_tokens=2,
            warmup=2,
            should_stop=should_stop,
        )
    assert len(adapter.calls) == stop_after  # not one sample more
    assert polls == list(range(stop_after + 1))  # polled before every sample
    assert adapter.resets == 1


def test_loaded_model_is_kept_out_of_garbage_collection_and_what_comes_later_is_not(tiny_checkpoints):
    """load_adapter freezes the loaded model out of the collector's generations (full collections before graph
    captures then stop walking it), and a cyclic object made afterwards is still collected."""
    runtime = {
        "dtype": "float32",
        "attn_implementation": "eager",
        "experts_implementation": "eager",
        "trust_remote_code": False,
    }
    try:
        adapter, _ = cells.load_adapter(
            runtime, model_path=str(tiny_checkpoints["qwen3_vl_moe"]), device="cpu", what="test"
        )
        walked = {
            id(o) for o in gc.get_objects()
        }  # a full collection's objects; frozen ones are not among them
        assert id(adapter.model) not in walked
        assert not any(id(m) in walked for m in adapter.model.modules())

        class Node:
            pass

        node = Node()
        node.self = node
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()


def test_run_cell_rejects_wrong_block_count(manifest):
    with pytest.raises(ValueError, match="2 kept blocks given for active_blocks=3"):
        cells.run_cell(
            FakeAdapter(), manifest, KnobSetting(32, 2, 3), (0, 1), workload="qa", max_new_tokens=2, warmup=0
        )


def test_check_setting_against_the_loaded_model():
    cells.check_setting(FakeAdapter(), KnobSetting(32, 8, 6))
    with pytest.raises(ValueError, match=r"top_k=9 above the model's 8 experts.*active_blocks=7 above"):
        cells.check_setting(FakeAdapter(), KnobSetting(32, 9, 7))
    with pytest.raises(ValueError, match="vision_tokens=5000 outside"):
        cells.check_setting(FakeAdapter(), KnobSetting(5000, 1, 1))


def _shard_rows():
    return pd.DataFrame(
        [
            {
                "workload": "qa",
                "vision_tokens": 32,
                "top_k": 2,
                "active_blocks": 2,
                "kept_blocks": [0, 3],
                "sample_id": f"s{i}",
                "prediction": "red",
                "vision_tokens_actual": 30,
                "prompt_tokens": 40,
                "output_tokens": 2,
                "preprocess_ms": 1.0,
                "vision_ms": 2.0,
                "prefill_ms": 3.0,
                "decode_ms": 4.0,
                "ttft_ms": 6.0,
                "latency_ms": 10.0 + i,
                "host_probe_us": 50.0,
            }
            for i in range(3)
        ]
    )


def test_atomic_write_failure_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "cells" / "qa" / "vt32_k2_b2.parquet"
    real_write = pq.write_table

    def write_then_die(table, where, **kwargs):
        real_write(table.slice(0, 1), where, **kwargs)  # a partial file exists under the temporary name
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(pq, "write_table", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        cells.write_shard(_shard_rows(), target, {"fingerprint": "x"})
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary file left behind either


def test_atomic_json_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "importance.json"
    io.write_json_atomic({"a": 1}, target)
    with pytest.raises(ValueError):
        io.write_json_atomic({"a": float("nan")}, target)  # not valid JSON: refused mid-write
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["importance.json"]


def _spec():
    return {
        "workload": "qa",
        "knobs": {"vision_tokens": 32, "top_k": 2, "active_blocks": 2},
        "blocks": {"keep_first": False, "keep_last": False},
        "runtime": {
            "model": {"files": [{"name": "model.safetensors", "size": 10, "sha256": "ab"}]},
            "dtype": "float32",
            "device": "cpu",
            "attn_implementation": "sdpa",
            "experts_implementation": None,
            "trust_remote_code": False,
        },
        "manifest": {"workload": "qa", "n_eval": 4, "n_calibration": 2, "seed": 0, "prompt": "{question}"},
        "importance": {"vision_tokens": 32, "top_k": None, "max_new_tokens": 3},
        "generation": {"max_new_tokens": 3, "batch_size": 1, "decoding": "greedy"},
        "warmup": 1,
        "inference_code_version": cells.INFERENCE_CODE_VERSION,
    }


def _set(spec, path, value):
    spec = copy.deepcopy(spec)
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node[key]
    node[last] = value
    return spec


@pytest.mark.parametrize(
    "path,value",
    [
        ("knobs.vision_tokens", 64),
        ("knobs.top_k", 3),
        ("knobs.active_blocks", 3),
        ("blocks.keep_first", True),
        ("runtime.model", {"files": [{"name": "model.safetensors", "size": 10, "sha256": "cd"}]}),
        ("runtime.dtype", "bfloat16"),
        ("runtime.device", "cuda"),
        ("runtime.attn_implementation", "eager"),
        ("runtime.experts_implementation", "grouped_mm"),
        ("manifest.n_eval", 5),
        ("manifest.seed", 1),
        ("manifest.prompt", "{question} Answer briefly."),
        ("generation.max_new_tokens", 4),
        ("warmup", 2),
        ("inference_code_version", cells.INFERENCE_CODE_VERSION + "+1"),
    ],
)
def test_fingerprint_changes_with_each_result_determining_input(path, value):
    base = cells.cell_fingerprint(_spec(), "m", "i", (0, 3))
    assert cells.cell_fingerprint(_spec(), "m", "i", (0, 3)) == base  # deterministic
    assert cells.cell_fingerprint(_set(_spec(), path, value), "m", "i", (0, 3)) != base


def test_fingerprint_changes_with_manifest_importance_and_kept_blocks():
    base = cells.cell_fingerprint(_spec(), "m", "i", (0, 3))
    assert cells.cell_fingerprint(_spec(), "m2", "i", (0, 3)) != base
    assert cells.cell_fingerprint(_spec(), "m", "i2", (0, 3)) != base
    assert cells.cell_fingerprint(_spec(), "m", "i", (0, 2)) != base
    # Key order does not matter (canonical JSON).
    reordered = dict(reversed(list(_spec().items())))
    assert cells.cell_fingerprint(reordered, "m", "i", (0, 3)) == base


def _inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen3_vl_moe"}')
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame({"sample_id": ["s0"]}).to_parquet(manifest)
    importance = tmp_path / "importance.json"
    io.write_json_atomic(
        {"selection_score": [2.0, 1.0], "elapsed_s": 1.0, "provenance": {"host": "a"}}, importance
    )
    return model, manifest, importance


def test_shard_provenance_and_fingerprint_ignore_git_and_timing(tmp_path, monkeypatch):
    model, manifest, importance = _inputs(tmp_path)
    kwargs = {
        "model_path": str(model),
        "manifest_path": str(manifest),
        "importance_path": str(importance),
        "kept_blocks": (0, 3),
        "device": "cpu",
    }
    monkeypatch.setattr(io, "git_commit", lambda repo=None: "aaaa")
    first = cells.cell_provenance(_spec(), **kwargs)
    monkeypatch.setattr(io, "git_commit", lambda repo=None: "bbbb-dirty")
    # Importance recomputed with the same content but other timing/provenance.
    io.write_json_atomic(
        {"selection_score": [2.0, 1.0], "elapsed_s": 9.0, "provenance": {"host": "b"}}, importance
    )
    second = cells.cell_provenance(_spec(), **kwargs)
    assert first["code_version"]["git_commit"] != second["code_version"]["git_commit"]
    assert first["fingerprint"] == second["fingerprint"]
    io.write_json_atomic({"selection_score": [1.0, 2.0]}, importance)
    assert cells.cell_provenance(_spec(), **kwargs)["fingerprint"] != first["fingerprint"]

    target = tmp_path / "shard.parquet"
    cells.write_shard(_shard_rows(), target, second)
    stored = io.read_parquet_metadata(target)
    for key in (
        "model_path",
        "config_hash",
        "dtype",
        "device_name",
        "library_versions",
        "code_version",
        "fingerprint",
        "manifest_sha256",
        "importance_sha256",
        "kept_blocks",
        "spec",
    ):
        assert key in stored, key
    assert stored["config_hash"] == io.sha256_file(model / "config.json")
    assert stored["code_version"]["inference"] == cells.INFERENCE_CODE_VERSION
    assert set(stored["library_versions"]) >= {"torch", "transformers", "knobsweep"}
    assert stored == json.loads(json.dumps(second))
    back = pd.read_parquet(target)
    assert back.drop(columns="kept_blocks").equals(_shard_rows().drop(columns="kept_blocks"))
    assert [list(b) for b in back["kept_blocks"]] == [[0, 3]] * 3


def test_write_shard_requires_every_column(tmp_path):
    with pytest.raises(ValueError, match="latency_ms"):
        cells.write_shard(_shard_rows().drop(columns="latency_ms"), tmp_path / "x.parquet", {})
    assert not (tmp_path / "x.parquet").exists()


def test_progress_log_reports_rate_and_time_left():
    lines = []
    progress = cells.ProgressLog("qa vt32_k2_b2", total=4, every_s=0.0, emit=lines.append)
    progress.update(2)
    progress.update(4)
    assert (
        lines[0].startswith("qa vt32_k2_b2: 2/4 samples,")
        and "samples/s" in lines[0]
        and "s left" in lines[0]
    )
    assert lines[-1].startswith("qa vt32_k2_b2: 4/4 samples")


def test_a_killed_writers_leftover_is_removed_by_the_next_write(tmp_path):
    leftover = tmp_path / ".a.json.abc123.tmp"
    leftover.write_text("partial")
    other = tmp_path / ".b.json.abc123.tmp"  # another output's temporary file is left alone
    other.write_text("partial")
    io.write_json_atomic({"a": 1}, tmp_path / "a.json")
    assert sorted(os.listdir(tmp_path)) == [".b.json.abc123.tmp", "a.json"]


def test_no_temp_files_from_successful_writes(tmp_path):
    io.write_json_atomic({"a": 1}, tmp_path / "a.json")
    cells.write_shard(_shard_rows(), tmp_path / "b.parquet", {})
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.parquet"]
    assert Path(tmp_path / "b.parquet").stat().st_size > 0
