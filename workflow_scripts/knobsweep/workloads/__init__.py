"""Workloads: real-format loaders (VQA v2, COCO captions), the synthetic scene generator, manifests, prompts.

Bad input is reported as :class:`DataError`, naming the file and the id, before any model runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORKLOADS = ("qa", "captioning")


class DataError(ValueError):
    """Input data that cannot be used: the message names the file and the offending id or field."""


def load_json(path: str | Path, what: str) -> Any:
    """Read a JSON file, turning a missing file or broken JSON into a DataError naming file and position."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist (or is not a file)")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{what} file {path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}, char {e.pos})"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what} file {path} cannot be read: {e}") from e


def require_keys(entry: Any, keys: tuple[str, ...], path: Path | str, where: str) -> None:
    """Raise a DataError naming the file and the entry when a JSON object lacks one of `keys`."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where} is not a JSON object: {entry!r:.200}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DataError(f"{path}: {where} lacks key(s) {missing}")
