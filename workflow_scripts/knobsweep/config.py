"""Checks of a run's configuration beyond its JSON schema, made at DAG construction before any job starts.

Reads only the model's small JSON files (config.json, preprocessor_config.json), never its weights, and
imports nothing heavy (this module is read by Snakemake on every invocation).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from knobsweep.knobs import KnobSetting, sparse_minimum

WORKLOADS = ("qa", "captioning")
# model_type values the adapters handle (knobsweep.models.ADAPTERS, which imports torch: not read here).
SUPPORTED_MODEL_TYPES = ("ernie4_5_vl_moe", "internvl", "qwen3_5_moe", "qwen3_vl_moe")
# Tokens the adapters keep free of the context for the prompt text and the answer
# (knobsweep.models.base.ModelAdapter.text_reserve_tokens).
TEXT_RESERVE_TOKENS = 256
# Real-data sources per workload and the data paths each needs.
REAL_SOURCES = {
    "qa": {"vqa": ("questions", "annotations", "images")},
    "captioning": {"coco": ("captions", "images")},
}

# Files besides the weights whose content determines a model's outputs.
_MODEL_TEXT_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
_FULL_HASH_LIMIT = 64 << 20  # weight files up to this size are hashed whole; larger ones are sampled
_SAMPLE_BYTES = 1 << 20


class ConfigError(ValueError):
    """A configuration value the run cannot use; the message names the key and the value."""


@dataclass(frozen=True)
class ModelLimits:
    model_type: str
    num_blocks: int
    num_experts: int
    default_top_k: int
    vision_tokens_min: int
    vision_tokens_max: int


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config key {key!r}: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key {key!r}: {path} is not valid JSON ({e})") from None


def _first(mapping: dict[str, Any], names: tuple[str, ...], what: str, path: Path) -> int:
    for name in names:
        value = mapping.get(name)
        if isinstance(value, list) and value:  # ERNIE-4.5-VL: [text experts, vision experts]
            value = value[0]
        if value is not None:
            return int(value)
    raise ConfigError(f"{path}: no {what} (looked for {', '.join(names)})")


@lru_cache(maxsize=8)
def read_model_limits(model_path: str) -> ModelLimits:
    """Block count, expert count, default top-k and the vision-token range, from the model's JSON files."""
    root = Path(model_path)
    config_path = root / "config.json"
    config = _read_json(config_path, "model.path")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config key 'model.path': {config_path} has model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    text = config.get("text_config") or config
    num_blocks = _first(text, ("num_hidden_layers", "n_layers"), "block count", config_path)
    num_experts = _first(
        text,
        ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
        "expert count",
        config_path,
    )
    default_top_k = _first(text, ("num_experts_per_tok", "moe_k"), "default top-k", config_path)

    vision = config.get("vision_config") or {}
    processor_root: dict[str, Any] = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (root / name).exists():
            processor_root = _read_json(root / name, "model.path")
            break
    processor = processor_root.get("image_processor", processor_root)
    if model_type == "internvl":
        # Tiles of image_seq_length tokens, plus a thumbnail tile when there is more than one.
        per_tile = int(processor_root.get("image_seq_length") or config.get("image_seq_length"))
        max_tiles = int(processor.get("max_patches", 12))
        vision_min, vision_max = per_tile, per_tile * (max_tiles + (1 if max_tiles > 1 else 0))
    else:
        patch = int(processor.get("patch_size") or vision.get("patch_size") or 16)
        merge = int(processor.get("merge_size") or vision.get("spatial_merge_size") or 2)
        size = processor.get("size") or {}
        min_pixels = size.get("shortest_edge", processor.get("min_pixels"))
        max_pixels = size.get("longest_edge", processor.get("max_pixels"))
        pixels_per_token = (patch * merge) ** 2
        vision_min = max(1, math.ceil(min_pixels / pixels_per_token)) if min_pixels else 1
        vision_max = int(max_pixels // pixels_per_token) if max_pixels else 1 << 20
    context = text.get("max_position_embeddings")
    if context:
        vision_max = min(vision_max, int(context) - TEXT_RESERVE_TOKENS)
    return ModelLimits(model_type, num_blocks, num_experts, default_top_k, vision_min, vision_max)


def _sampled_hash(path: Path, size: int) -> str:
    """sha256 of a whole small file, or of its safetensors header and three 1 MiB windows (start of the
    tensor data, middle, end) for a large one: fast on a 60 GB model, and a retrained checkpoint of the same
    shapes still changes it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            while block := f.read(1 << 20):
                digest.update(block)
            return digest.hexdigest()
        start = 0
        if path.suffix == ".safetensors":
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(header_len))
            start = 8 + header_len
        for offset in (start, start + (size - start) // 2, max(start, size - _SAMPLE_BYTES)):
            f.seek(offset)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


@lru_cache(maxsize=8)
def _model_files_identity(model_path: str) -> tuple[tuple[str, int, str], ...]:
    root = Path(model_path)
    files = [root / n for n in _MODEL_TEXT_FILES if (root / n).exists()]
    files += sorted(
        p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
    )
    return tuple((p.name, p.stat().st_size, _sampled_hash(p, p.stat().st_size)) for p in files)


def model_identity(model: dict[str, Any]) -> dict[str, Any]:
    """What identifies the model's weights and processor, independent of where the files live.

    A checkpoint the workflow builds itself (`model.build_tiny`) is identified by its builder's settings, so
    the identity is the same before and after it is built; a rebuilt checkpoint re-runs its dependants
    through Snakemake's ordinary timestamp check.
    """
    if model.get("build_tiny"):
        return {"built_by": "knobsweep.models.tiny.build_tiny_checkpoint", **model.get("tiny", {})}
    path = str(Path(model["path"]).resolve())
    return {"files": [{"name": n, "size": s, "sha256": h} for n, s, h in _model_files_identity(path)]}


def config_hash(model_path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(model_path, "config.json").read_bytes()).hexdigest()


def _check_knob_values(key: str, setting: KnobSetting, limits: ModelLimits, model_path: str) -> list[str]:
    problems = []
    if not limits.vision_tokens_min <= setting.vision_tokens <= limits.vision_tokens_max:
        problems.append(
            f"config key '{key}' has vision_tokens={setting.vision_tokens}, outside the model's range "
            f"{limits.vision_tokens_min}..{limits.vision_tokens_max} ({model_path})"
        )
    if setting.top_k > limits.num_experts:
        problems.append(
            f"config key '{key}' has top_k={setting.top_k}, above the model's {limits.num_experts} experts "
            f"({model_path})"
        )
    if setting.active_blocks > limits.num_blocks:
        problems.append(
            f"config key '{key}' has active_blocks={setting.active_blocks}, above the model's "
            f"{limits.num_blocks} blocks ({model_path})"
        )
    return problems


def resolve_defaults(config: dict[str, Any]) -> None:
    """Fill in the defaults that live in the package (prompt templates, generation limits), so that the
    resolved values, not null, enter the specifications that decide reruns."""
    from knobsweep.workloads import prompts

    for workload, spec in config["workloads"].items():
        if workload not in WORKLOADS:
            continue
        if spec.get("prompt") is None:
            spec["prompt"] = prompts.default_template(workload)
        if spec.get("max_new_tokens") is None:
            spec["max_new_tokens"] = prompts.default_max_new_tokens(workload)


def _analysis_problems(analysis: dict[str, Any]) -> list[str]:
    """The analysis settings, checked now rather than in the aggregation job after every cell has run."""
    from knobsweep.analysis.defaults import ANALYSIS_DEFAULTS, analysis_params

    problems = [
        f"config key 'analysis.{key}' is unknown (known: {', '.join(sorted(ANALYSIS_DEFAULTS))})"
        for key in analysis
        if key not in ANALYSIS_DEFAULTS
    ]
    thresholds = analysis.get("thresholds")
    if isinstance(thresholds, dict):
        problems += [
            f"config key 'analysis.thresholds.{key}' is unknown "
            f"(known: {', '.join(sorted(ANALYSIS_DEFAULTS['thresholds']))})"
            for key in thresholds
            if key not in ANALYSIS_DEFAULTS["thresholds"]
        ]
    if not problems:
        try:
            analysis_params(analysis)
        except (ValueError, TypeError, KeyError) as e:
            # "config analysis.ci_level must be ..." -> "config key 'analysis.ci_level': must be ..."
            match = re.match(r"config (analysis[\w.]*):? (.*)", str(e), re.DOTALL)
            key, text = match.groups() if match else ("analysis", str(e))
            problems.append(f"config key '{key}': {text}")
    return problems


# The top-k of a tiny checkpoint built without a `num_experts_per_tok` override (knobsweep.models.tiny).
TINY_DEFAULT_TOP_K = 8

# What `build_tiny_checkpoint(..., **overrides)` accepts per family: here, without torch, so that a typo in
# `model.tiny.overrides` fails at DAG construction; the builder checks the same table.
_TINY_TEXT_KEYS = frozenset(
    {
        "num_blocks",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "moe_intermediate_size",
        "num_experts",
        "num_experts_per_tok",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "tie_word_embeddings",
    }
)
_TINY_VISION_KEYS = frozenset({"vision_depth", "vision_hidden_size", "vision_intermediate_size"})
TINY_OVERRIDE_KEYS: dict[str, frozenset[str]] = {
    "qwen3_vl_moe": _TINY_TEXT_KEYS | _TINY_VISION_KEYS | {"deepstack_visual_indexes"},
    "qwen3_5_moe": _TINY_TEXT_KEYS
    | _TINY_VISION_KEYS
    | {
        "shared_expert_intermediate_size",
        "layer_types",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
    },
    "internvl": _TINY_TEXT_KEYS
    | _TINY_VISION_KEYS
    | {"norm_topk_prob", "tile_size", "patch_size", "max_tiles"},
    "ernie4_5_vl_moe": _TINY_TEXT_KEYS | _TINY_VISION_KEYS | {"moe_num_shared_experts"},
}


def unknown_tiny_overrides(family: str, overrides: dict[str, Any]) -> list[str]:
    """The override names `build_tiny_checkpoint` would refuse for `family` (sorted)."""
    return sorted(set(overrides) - TINY_OVERRIDE_KEYS.get(family, frozenset()))


def model_default_top_k(config: dict[str, Any], limits: ModelLimits | None) -> int:
    """The model's own top-k, known at every DAG construction: from `analysis.default_top_k` if set, from
    the builder settings for a checkpoint the workflow builds (it may not exist yet; reading it once built
    would change the analysis params between two runs), else from the model's config.json."""
    if config.get("analysis", {}).get("default_top_k") is not None:
        return int(config["analysis"]["default_top_k"])
    model = config["model"]
    if model.get("build_tiny"):
        overrides = model.get("tiny", {}).get("overrides", {})
        return int(overrides.get("num_experts_per_tok", TINY_DEFAULT_TOP_K))
    assert limits is not None, "check_config returns the limits of a model on disk"
    return limits.default_top_k


def check_config(config: dict[str, Any], base_dir: str | os.PathLike = ".") -> ModelLimits | None:
    """Raise ConfigError listing every problem of a schema-valid config; return the model's limits
    (None when the model is built by the workflow and does not exist yet, in which case the model-dependent
    checks run again inside the jobs)."""
    base = Path(base_dir)
    problems: list[str] = []

    for workload, spec in config["workloads"].items():
        if workload not in WORKLOADS:
            problems.append(
                f"config key 'workloads.{workload}': unknown workload (known: {', '.join(WORKLOADS)})"
            )
            continue
        from knobsweep.workloads import prompts

        try:
            prompts.validate_template(workload, spec["prompt"])
        except ValueError as e:
            problems.append(f"config key 'workloads.{workload}.prompt' has the value {spec['prompt']!r}: {e}")
        if workload == "captioning" and spec.get("stratify") is not None:
            problems.append(
                f"config key 'workloads.captioning.stratify' has the value {spec['stratify']!r}: "
                "only qa samples can be stratified"
            )
        source = spec["source"]
        if source == "synthetic":
            continue
        needed = REAL_SOURCES[workload].get(source)
        if needed is None:
            problems.append(
                f"config key 'workloads.{workload}.source' has the value {source!r}; "
                f"use 'synthetic' or {', '.join(map(repr, REAL_SOURCES[workload]))}"
            )
            continue
        data = spec.get("data") or {}
        for name in needed:
            if not data.get(name):
                problems.append(
                    f"config key 'workloads.{workload}.data.{name}' is missing (source {source!r})"
                )
            elif not (base / data[name]).exists():
                problems.append(f"config key 'workloads.{workload}.data.{name}': {data[name]} does not exist")
    if not config["workloads"]:
        problems.append("config key 'workloads' names no workload")

    grid = config["grid"]
    blocks = config["blocks"]
    forced = int(blocks["keep_first"]) + int(blocks["keep_last"])
    if min(grid["active_blocks"]) < max(forced, 1):
        problems.append(
            f"config key 'grid.active_blocks' has the value {min(grid['active_blocks'])}: "
            f"keep_first/keep_last need at least {max(forced, 1)}"
        )

    cells = config["cells"]
    tiny_family = config["model"].get("tiny", {}).get("family", "qwen3_vl_moe")
    if config["model"].get("build_tiny") and tiny_family not in SUPPORTED_MODEL_TYPES:
        problems.append(
            f"config key 'model.tiny.family' has the value {tiny_family!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if config["model"].get("build_tiny") and tiny_family in TINY_OVERRIDE_KEYS:
        overrides = config["model"].get("tiny", {}).get("overrides", {})
        for key in unknown_tiny_overrides(tiny_family, overrides):
            problems.append(
                f"config key 'model.tiny.overrides.{key}' is not a setting of the tiny {tiny_family} builder "
                f"(known: {', '.join(sorted(TINY_OVERRIDE_KEYS[tiny_family]))})"
            )
    if cells.get("list") and cells["mode"] != "list":
        problems.append(
            f"config key 'cells.list' is set but cells.mode is {cells['mode']!r}: set cells.mode: list, "
            "or remove cells.list"
        )
    if any(s.get("source") == "synthetic" for s in config["workloads"].values()):
        import inspect

        from knobsweep.workloads.synthetic import write_synthetic_dataset

        allowed = set(inspect.signature(write_synthetic_dataset).parameters) - {"out_dir", "n_images", "seed"}
        for key in config.get("synthetic", {}).get("options", {}):
            if key not in allowed:
                problems.append(
                    f"config key 'synthetic.options.{key}': not an option of write_synthetic_dataset "
                    f"({', '.join(sorted(allowed))})"
                )
    problems += _analysis_problems(config.get("analysis") or {})
    listed: list[tuple[str, KnobSetting]] = []
    if cells["mode"] == "list":
        if not cells.get("list"):
            problems.append("config key 'cells.list' is empty (cells.mode is 'list')")
        for i, cell_id in enumerate(cells.get("list") or []):
            try:
                listed.append((f"cells.list[{i}]", KnobSetting.from_cell_id(cell_id)))
            except ValueError as e:
                problems.append(f"config key 'cells.list[{i}]': {e}")
    elif cells["mode"] == "sparse_dense":
        minimum = sparse_minimum(grid["vision_tokens"], grid["top_k"], grid["active_blocks"])
        if cells["sparse"]["n"] < minimum:
            problems.append(
                f"config key 'cells.sparse.n' has the value {cells['sparse']['n']}: below {minimum}, "
                "the grid's corners plus one cell per knob value"
            )

    model = config["model"]
    model_path = str(base / model["path"])
    limits = None
    if model.get("build_tiny") and not Path(model_path, "config.json").exists():
        pass  # built by the workflow; its jobs check the knobs against it
    else:
        try:
            limits = read_model_limits(model_path)
        except ConfigError as e:
            problems.append(str(e))
    if limits is not None:
        for name in ("vision_tokens", "top_k", "active_blocks"):
            for value in grid[name]:
                values = {
                    "vision_tokens": limits.vision_tokens_min,
                    "top_k": 1,
                    "active_blocks": 1,
                    name: value,
                }
                problems += _check_knob_values(f"grid.{name}", KnobSetting(**values), limits, model["path"])
        for key, setting in listed:
            problems += _check_knob_values(key, setting, limits, model["path"])
        importance = config["importance"]
        if importance.get("top_k") is not None and importance["top_k"] > limits.num_experts:
            problems.append(
                f"config key 'importance.top_k' has the value {importance['top_k']}: above the model's "
                f"{limits.num_experts} experts"
            )
        vt = importance.get("vision_tokens")
        if vt is not None and not limits.vision_tokens_min <= vt <= limits.vision_tokens_max:
            problems.append(
                f"config key 'importance.vision_tokens' has the value {vt}: outside the model's range "
                f"{limits.vision_tokens_min}..{limits.vision_tokens_max}"
            )

    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return limits


def limits_dict(limits: ModelLimits | None) -> dict[str, Any] | None:
    return None if limits is None else asdict(limits)
