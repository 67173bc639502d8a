"""Loading MoE VLM checkpoints and running them with knobs (vision tokens, top-k, active blocks).

`load_model(path, ...)` reads config.json's `model_type`, picks the family adapter registered for it
(`ADAPTERS`), loads the model (safetensors only) and processor, and returns the adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from knobsweep.models.base import STAGES, GenerationResult, KnobError, ModelAdapter, SkippedBlock, token_grid
from knobsweep.models.ernie4_5_vl_moe import Ernie45VLMoeAdapter
from knobsweep.models.fast_path import INFERENCE_PATHS
from knobsweep.models.internvl import InternVLMoeAdapter
from knobsweep.models.qwen3_5_moe import Qwen35MoeAdapter
from knobsweep.models.qwen3_vl_moe import Qwen3VLMoeAdapter

__all__ = [
    "ADAPTERS",
    "INFERENCE_PATHS",
    "REFUSED",
    "STAGES",
    "GenerationResult",
    "KnobError",
    "ModelAdapter",
    "SkippedBlock",
    "load_model",
    "supported_families",
    "token_grid",
]

# model_type -> adapter class. A family module holds only what differs from ModelAdapter.
ADAPTERS: dict[str, type[ModelAdapter]] = {
    model_type: adapter
    for adapter in (Qwen3VLMoeAdapter, Qwen35MoeAdapter, InternVLMoeAdapter, Ernie45VLMoeAdapter)
    for model_type in adapter.model_types
}

# model_type -> why the study cannot use it.
REFUSED: dict[str, str] = {
    "llama4": (
        "Llama4 computes every expert densely and mixes them by router weight, so lowering top-k saves no "
        "compute: the top-k knob would change quality without changing cost"
    ),
    "molmo": (
        "MolmoE ships only remote code (trust_remote_code) and is not in transformers; see the README "
        "section on what supporting it would take"
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def supported_families() -> list[str]:
    return sorted({adapter.family for adapter in ADAPTERS.values()})


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"load_model: {path} is not a checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load_model: {path} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"load_model: {config_file} is not valid JSON: {error}") from error


def _check_safetensors(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    other = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    if other:
        raise ValueError(
            f"load_model: {path} holds weights only as {other}; knobsweep loads safetensors only "
            "(pickle-based weight files can run arbitrary code). Convert them to safetensors first."
        )
    raise FileNotFoundError(f"load_model: {path} has no *.safetensors weight files")


def adapter_class_for(model_type: str | None, path: Path | str = "") -> type[ModelAdapter]:
    """The adapter registered for `model_type`, or a clear error (unsupported or refused family)."""
    if model_type in REFUSED:
        raise ValueError(
            f"load_model: {path}: model_type {model_type!r} is not supported: {REFUSED[model_type]}"
        )
    if model_type not in ADAPTERS:
        raise ValueError(
            f"load_model: {path}: config.json field model_type={model_type!r} is not a supported family; "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def _check_device_visible(device: torch.device) -> None:
    """A CUDA device this process cannot see fails here, naming it, before any weight is read (e.g. a job
    given CUDA_VISIBLE_DEVICES=3 by `--resources gpu=4` on a machine with 2 GPUs: knobsweep.gpu_slots)."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.index or 0
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"model.device {str(device)!r}: this process sees {count} CUDA device(s) (CUDA_VISIBLE_DEVICES="
            f"{visible!r}): no GPU on this machine, or a GPU job given one beyond its GPUs (--resources gpu=N "
            "must not exceed them)"
        )


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = "sdpa",
    experts_implementation: str | None = None,
    trust_remote_code: bool = False,
    inference_path: str = "auto",
) -> ModelAdapter:
    """Load the Hugging Face checkpoint directory `path` and return its family's adapter.

    `attn_implementation`: "sdpa", "eager", "flash_attention_2", ... (None: transformers' default).
    `experts_implementation`: "eager", "grouped_mm", "batched_mm", ... (None: transformers' default).
    `trust_remote_code` is passed on only as given (never turned on here).
    `inference_path`: how decode steps run, see `knobsweep.models.fast_path` ("auto": the fastest path the
    family supports on CUDA, the plain "eager" path on CPU); `adapter.inference_path` holds the path chosen.
    """
    import transformers

    path = Path(path)
    config = _read_config(path)
    adapter_cls = adapter_class_for(config.get("model_type"), path)
    adapter_cls.check_config(config, path)
    _check_safetensors(path)
    if inference_path not in INFERENCE_PATHS:
        raise ValueError(
            f"load_model: inference_path {inference_path!r} is not one of {list(INFERENCE_PATHS)}"
        )
    _check_device_visible(torch.device(device))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"load_model: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    kwargs: dict = {
        "dtype": dtype,
        "use_safetensors": True,
        "local_files_only": True,
        "trust_remote_code": trust_remote_code,
    }
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = str(device)  # load straight onto the accelerator (no full copy in host memory)
    model_cls = getattr(transformers, adapter_cls.model_class)
    model = model_cls.from_pretrained(path, **kwargs).to(device).eval()
    processor = transformers.AutoProcessor.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    adapter = adapter_cls(model, processor, path)
    adapter.set_inference_path(inference_path)
    return adapter
