"""Faults while writing results: a writer killed with SIGKILL at random points, a full disk (ENOSPC from
the write or from fsync), a file-size limit hit mid-write. Whatever happens, the target path holds either
nothing, the older good file or the complete new one, and a failure that Python sees leaves no temporary
file behind."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import resource
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from knobsweep import cells, io
from knobsweep.workloads import manifest as manifest_module

FORK = multiprocessing.get_context("fork")


def big_table(n_rows: int, tag: str) -> pa.Table:
    """A shard-like table, large enough (a few MB) that writing it takes a measurable time."""
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "sample_id": [f"{tag}-{i}" for i in range(n_rows)],
            "prediction": [f"prediction {tag} {i} " + "x" * (i % 50) for i in range(n_rows)],
            "latency_ms": rng.random(n_rows),
            "kept_blocks": [[0, 1, 2, i % 7] for i in range(n_rows)],
        }
    )


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _write_in_child(path: str, n_rows: int, tag: str) -> None:
    io.write_parquet_atomic(big_table(n_rows, tag), path, {io.PROVENANCE_KEY: json.dumps({"tag": tag})})
    os._exit(0)


def wait_for_temp_file(directory: Path, child, timeout: float = 60) -> None:
    """Block until the child's write is under way (its temporary file exists) or the child ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.is_alive() and not temp_files(directory):
        time.sleep(0.001)


def test_sigkill_at_random_points_never_leaves_a_partial_shard(tmp_path):
    target = tmp_path / "vt16_k1_b2.parquet"
    n_rows = 150_000
    old = big_table(1000, "old")
    new = big_table(n_rows, "new")

    # How long a write takes, from its temporary file's creation to the end, so the kills spread over it.
    child = FORK.Process(target=_write_in_child, args=(str(tmp_path / "timing.parquet"), n_rows, "new"))
    child.start()
    wait_for_temp_file(tmp_path, child)
    start = time.monotonic()
    child.join(60)
    duration = time.monotonic() - start
    assert child.exitcode == 0

    rng = random.Random(0)
    outcomes = []
    # The first two kills right after the temporary file appears (mid-write whatever the machine's load: the
    # timing run's duration alone missed every write on a busy 2-core machine); the rest anywhere.
    fractions = [0.0, 0.0] + [rng.uniform(0.0, 1.2) for _ in range(10)]
    for fraction in fractions:
        io.write_parquet_atomic(old, target, {io.PROVENANCE_KEY: json.dumps({"tag": "old"})})
        child = FORK.Process(target=_write_in_child, args=(str(target), n_rows, "new"))
        child.start()
        wait_for_temp_file(tmp_path, child)
        time.sleep(fraction * duration)  # anywhere in the write, the fsync, the rename, or after
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        leftovers = temp_files(tmp_path)
        # The target is the old file or the complete new one, never anything else.
        table = pq.read_table(target)
        tag = io.read_parquet_metadata(target)["tag"]
        if tag == "old":
            assert table.equals(old.replace_schema_metadata(table.schema.metadata))
        else:
            assert tag == "new" and table.num_rows == n_rows
            assert table.select(new.column_names).equals(new.replace_schema_metadata(table.schema.metadata))
        outcomes.append((tag, bool(leftovers)))
        # SIGKILL allows no clean-up: a temporary file may stay (hidden, *.tmp; never read as a shard).
        for name in leftovers:
            assert name.startswith(f".{target.name}.")
            (tmp_path / name).unlink()
    # The test means something only if some kill landed in the middle of a write (the old file kept and a
    # temporary file left).
    assert ("old", True) in outcomes, outcomes


def test_sigkill_without_an_older_file_leaves_no_target(tmp_path):
    target = tmp_path / "cells" / "qa" / "vt16_k1_b2.parquet"
    child = FORK.Process(target=_write_in_child, args=(str(target), 300_000, "new"))
    child.start()
    # Wait until the temporary file has data, i.e. the write is under way, then kill.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if target.parent.exists() and any(
            (target.parent / n).stat().st_size > 0 for n in temp_files(target.parent)
        ):
            break
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert temp_files(target.parent)  # killed mid-write
    assert not target.exists()


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_write_then_enospc(table, where, *args, **kwargs):
    """pq.write_table that writes part of the file, then fails like a full disk."""
    Path(where).write_bytes(b"PAR1" + b"\0" * 1000)
    raise ENOSPC


def _raise_enospc(*args, **kwargs):
    raise ENOSPC


WRITERS = {
    "parquet": lambda path: io.write_parquet_atomic(big_table(100, "new"), path),
    "json": lambda path: io.write_json_atomic({"new": list(range(100))}, path),
    "shard": lambda path: cells.write_shard(
        pd.DataFrame({c: [1] for c in cells.SHARD_COLUMNS}), path, {"fingerprint": "f"}
    ),
    "manifest": lambda path: manifest_module.write_manifest(
        pd.DataFrame(
            [
                {
                    "sample_id": "1",
                    "split": "eval",
                    "image_id": 1,
                    "image_path": "/x.jpg",
                    "image_width": 8,
                    "image_height": 8,
                    "question": "what?",
                    "question_id": 1,
                    "prompt": "what?",
                    "references": ["a"] * 10,
                    "answer_type": "other",
                    "question_type": "what",
                }
            ],
            columns=list(manifest_module.COLUMNS),
        ),
        path,
    ),
}


def _write_old(path: Path) -> bytes:
    path.write_bytes(b"old good content")
    return path.read_bytes()


@pytest.mark.parametrize(
    "writer,failure",
    # write_manifest never fsyncs (see the durability test below), so only its write can fail.
    [(w, f) for w in sorted(WRITERS) for f in ("write", "fsync") if (w, f) != ("manifest", "fsync")],
)
def test_full_disk_leaves_the_old_file_and_no_temp_files(tmp_path, monkeypatch, writer, failure):
    target = tmp_path / f"out.{'json' if writer == 'json' else 'parquet'}"
    old = _write_old(target)
    if failure == "write":
        if writer == "json":
            monkeypatch.setattr(
                Path, "write_text", lambda self, *a, **k: (self.write_bytes(b'{"ne'), _raise_enospc())
            )
        else:
            monkeypatch.setattr(pq, "write_table", _half_write_then_enospc)
    else:
        monkeypatch.setattr(os, "fsync", _raise_enospc)
    with pytest.raises(OSError) as error:  # reported, not swallowed
        WRITERS[writer](target)
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert target.read_bytes() == old  # the older good file is intact
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize(
    "writer",
    [
        "parquet",
        "json",
        "shard",
        "manifest",
    ],
)
def test_every_writer_fsyncs_before_the_rename(tmp_path, monkeypatch, writer):
    # Durability against a node crash: the data must be on disk before the rename makes it visible.
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    WRITERS[writer](tmp_path / "out")
    monkeypatch.undo()
    assert "replace" in events and "fsync" in events[: events.index("replace")]


def _write_under_file_size_limit(path: str, old_size: int) -> None:
    # A real kernel-level write failure mid-file: past RLIMIT_FSIZE, write() fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        io.write_parquet_atomic(big_table(200_000, "new"), path)
    except OSError as e:
        os._exit(10 if e.errno == errno.EFBIG or "EFBIG" in str(e) or "too large" in str(e) else 11)
    os._exit(0)


def test_kernel_write_failure_mid_file_keeps_the_old_shard(tmp_path):
    target = tmp_path / "vt16_k1_b2.parquet"
    io.write_parquet_atomic(big_table(100, "old"), target)
    old = target.read_bytes()
    child = FORK.Process(target=_write_under_file_size_limit, args=(str(target), len(old)))
    child.start()
    child.join(60)
    assert child.exitcode == 10  # the writer saw the error and raised it
    assert target.read_bytes() == old
    assert temp_files(tmp_path) == []
