"""Config checks at DAG construction (`snakemake -n` on a temporary config), lint and formatting.

Snakemake runs in a temporary working directory with the repository's Snakefile, so nothing is written
into the repository. The model directories here hold JSON files only: a check that needed the weights
would fail, which shows that DAG construction never loads them.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from knobsweep import config as ks_config

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TINY = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())


def snakemake(
    workdir: Path, config: dict | None, *args: str, timeout: int = 120
) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1", *args]
    if config is not None:
        path = workdir / "config.test.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)


def fake_model(root: Path, *, model_type="qwen3_vl_moe", blocks=4, experts=8, top_k=2) -> str:
    """A model directory with the JSON files the DAG-time checks read, and no weights."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": model_type,
                "text_config": {
                    "num_hidden_layers": blocks,
                    "num_experts": experts,
                    "num_experts_per_tok": top_k,
                },
                "vision_config": {"patch_size": 16, "spatial_merge_size": 2},
            }
        )
    )
    (root / "processor_config.json").write_text(
        json.dumps(
            {
                "image_processor": {
                    "patch_size": 16,
                    "merge_size": 2,
                    "size": {"shortest_edge": 4 * 1024, "longest_edge": 4096 * 1024},
                }
            }
        )
    )
    return str(root)


def valid_config(tmp_path: Path) -> dict:
    config = copy.deepcopy(TINY)
    config["model"] = {"path": fake_model(tmp_path / "model"), "device": "cpu"}
    return config


def test_valid_config_builds_the_dag(tmp_path):
    result = snakemake(tmp_path, valid_config(tmp_path), "-n")
    assert result.returncode == 0, result.stderr
    assert "cell" in result.stdout and "importance" in result.stdout


def _mutate(config, dotted, value):
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return config


_DELETE = object()

INVALID = [
    # (key to set, value, text the error must contain)
    ("unknown_key", 1, "unknown_key"),
    ("inference.warmpu", 3, "warmpu"),
    ("workloads.vqa", {"source": "synthetic"}, "vqa"),
    ("grid.top_k", [1, 16], "top_k=16"),
    ("grid.active_blocks", [2, 5], "active_blocks=5"),
    ("grid.vision_tokens", [2, 32], "vision_tokens=2"),
    ("grid.vision_tokens", [16, 5000], "vision_tokens=5000"),
    ("cells.list", ["vt16_k9_b2"], "cells.list[0]"),
    ("cells.list", ["vt16_k1"], "vt16_k1"),
    ("workloads.qa.source", "vqa", "workloads.qa.data.questions"),
    ("workloads.captioning.prompt", "Describe {object}.", "workloads.captioning.prompt"),
    ("model.dtype", "float8", "float8"),
    ("importance.top_k", 9, "importance.top_k"),
    ("workloads.captioning.stratify", "answer_type", "workloads.captioning.stratify"),
    ("cells.mode", "dense", "dense"),
]


@pytest.mark.parametrize("key,value,expected", INVALID, ids=[f"{k}={v}" for k, v, _ in INVALID])
def test_invalid_config_stops_at_dag_construction(tmp_path, key, value, expected):
    config = _mutate(valid_config(tmp_path), key, value)
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout, result.stderr[-3000:]
    assert not (tmp_path / "results").exists()  # stopped before any job


def test_more_gpus_than_the_run_sees_or_a_device_beside_them_is_refused(tmp_path, monkeypatch):
    # --resources gpu=N spreads GPU jobs over N devices (knobsweep.gpu_slots); what cannot work stops the DAG.
    monkeypatch.delenv("KNOBSWEEP_GPU_SLOTS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    config = valid_config(tmp_path)
    result = snakemake(tmp_path, config, "-n", "--resources", "gpu=3")
    assert result.returncode != 0
    assert (
        "gpu=3 asks for 3 GPU jobs at once, but CUDA_VISIBLE_DEVICES='4,6' lists 2"
        in result.stdout + result.stderr
    )
    config["model"]["device"] = "cuda:1"
    result = snakemake(tmp_path, config, "-n", "--resources", "gpu=2")
    assert result.returncode != 0
    assert "model.device: 'cuda:1' with --resources gpu=2" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()
    assert snakemake(tmp_path, valid_config(tmp_path), "-n", "--resources", "gpu=2").returncode == 0


def test_missing_data_path_is_named(tmp_path):
    config = valid_config(tmp_path)
    config["workloads"]["qa"].update(
        source="vqa", data={"questions": "nope/q.json", "annotations": "nope/a.json", "images": "nope/img"}
    )
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert "workloads.qa.data.questions': nope/q.json does not exist" in result.stdout + result.stderr


def test_unknown_model_type_is_named(tmp_path):
    config = valid_config(tmp_path)
    config["model"]["path"] = fake_model(tmp_path / "llama", model_type="llama")
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert (
        "model_type 'llama'" in result.stdout + result.stderr
        and "model.path" in result.stdout + result.stderr
    )


def test_check_config_lists_every_problem(tmp_path):
    # The same checks as a function (unit level): all problems in one message.
    from snakemake.utils import validate

    config = valid_config(tmp_path)
    config["grid"]["top_k"] = [1, 99]
    config["grid"]["active_blocks"] = [2, 50]
    validate(config, str(REPO / "schemas" / "config.schema.yaml"), set_default=True)
    ks_config.resolve_defaults(config)
    with pytest.raises(ks_config.ConfigError) as error:
        ks_config.check_config(config)
    assert "top_k=99" in str(error.value) and "active_blocks=50" in str(error.value)
    assert config["workloads"]["qa"]["max_new_tokens"] == 3  # from tiny.yaml
    assert config["inference"]["warmup"] == 1 and config["scoring"]["vqa_variant"] == "official"  # defaults


def test_schema_defaults_fill_every_section(tmp_path):
    from snakemake.utils import validate

    config = {
        "run": "x",
        "model": {"path": "m"},
        "workloads": {"qa": {"source": "synthetic"}},
        "grid": {"vision_tokens": [16], "top_k": [1], "active_blocks": [2]},
    }
    validate(config, str(REPO / "schemas" / "config.schema.yaml"), set_default=True)
    assert config["cells"]["mode"] == "full" and config["cells"]["sparse"]["n"] == 24
    assert config["workloads"]["qa"]["n_eval"] == 200 and config["model"]["dtype"] == "float32"
    assert config["blocks"] == {"keep_first": False, "keep_last": False}


def test_model_identity_ignores_location_but_not_content(tmp_path):
    a = Path(fake_model(tmp_path / "a"))
    (a / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"x" * 100)
    b = tmp_path / "b"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    ks_config._model_files_identity.cache_clear()
    assert ks_config.model_identity({"path": str(a)}) == ks_config.model_identity({"path": str(b)})
    (b / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"y" * 100)
    ks_config._model_files_identity.cache_clear()
    assert ks_config.model_identity({"path": str(a)}) != ks_config.model_identity({"path": str(b)})


def test_lint_reports_nothing(tmp_path):
    for config in (None, str(REPO / "tests" / "configs" / "tiny.yaml")):
        args = ["--lint"] + (["--configfile", config] if config else [])
        # The default config.yaml points at the demo checkpoint, which may not be shipped yet: lint needs
        # only a parsable workflow, so give it a stand-in model directory there.
        cfg = None
        if config is None:
            cfg = yaml.safe_load((REPO / "config.yaml").read_text())
            cfg["model"]["path"] = fake_model(tmp_path / "demo", blocks=24, experts=64, top_k=8)
        result = snakemake(tmp_path, cfg, *args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_snakefmt_check_clean():
    snakefmt = str(Path(sys.executable).with_name("snakefmt"))
    files = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
    unformatted = [
        f.name
        for f in files
        if subprocess.run([snakefmt, "--check", str(f)], check=False, capture_output=True).returncode
    ]
    assert unformatted == []
