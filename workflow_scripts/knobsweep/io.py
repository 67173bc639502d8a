"""Atomic file writes (Parquet, JSON), content hashes and provenance helpers.

Every result file is written to a temporary file in the same directory, flushed to disk and then renamed
over the target, so a crash or a kill never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas/pyarrow are imported where used: this module is read at DAG construction
    import pandas as pd
    import pyarrow as pa

PROVENANCE_KEY = b"knobsweep"
SCORES_KEY = b"knobsweep_scores"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it onto `path`.
    On any exception the temporary file is removed and nothing appears under `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a writer killed mid-write (SIGKILL, node failure); one writer per output at a time.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # Make the rename itself durable.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_parquet_atomic(
    frame: pd.DataFrame | pa.Table, path: str | os.PathLike, metadata: Mapping[bytes, str] | None = None
) -> None:
    """Write a Parquet file atomically; `metadata` values (JSON text) go into the schema metadata,
    merged over whatever metadata the table already has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    merged = dict(table.schema.metadata or {})
    merged.update({k: v.encode() if isinstance(v, str) else v for k, v in (metadata or {}).items()})
    table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_metadata(path: str | os.PathLike, key: bytes = PROVENANCE_KEY) -> dict[str, Any]:
    """The JSON stored under `key` in a Parquet file's schema metadata."""
    import pyarrow.parquet as pq

    schema_metadata = pq.read_schema(path).metadata or {}
    if key not in schema_metadata:
        raise KeyError(f"{path}: no {key.decode()!r} entry in the Parquet schema metadata")
    return json.loads(schema_metadata[key])


def library_versions(names: tuple[str, ...] = ("torch", "transformers", "knobsweep")) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(repo: str | os.PathLike | None = None) -> str | None:
    """The commit of the working tree holding this package (with '-dirty' when modified), if any.
    Recorded for people; never part of a fingerprint."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def log_to_file(path: str | os.PathLike) -> None:
    """Send logging records and stderr of a workflow step to its log file (appending)."""
    import logging
    import sys

    stream = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the step's process
    sys.stderr = stream
    logging.basicConfig(
        stream=stream,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
