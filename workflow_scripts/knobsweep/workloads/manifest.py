"""Sample manifests: the evaluation and calibration samples of a workload, one Parquet file each.

Every cell of a workload reads the same manifest, so the choice is a pure function of the samples, the
counts and the seed, and the rows are sorted. Calibration (block importance, warm-up) and evaluation
samples are disjoint by sample and by image: calibration takes whole images in a seeded order, and
evaluation draws its questions only from the other images. Every chosen image is opened and decoded
completely before any model runs.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from knobsweep.io import atomic_path
from knobsweep.workloads import WORKLOADS, DataError, prompts
from knobsweep.workloads.coco import CaptionSample
from knobsweep.workloads.vqa import VqaSample

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("split", pa.string()),  # "eval" | "calibration"
        ("image_id", pa.int64()),
        ("image_path", pa.string()),  # absolute
        ("image_width", pa.int64()),
        ("image_height", pa.int64()),
        ("question", pa.string()),  # "" for captioning
        ("question_id", pa.int64()),  # -1 for captioning
        ("prompt", pa.string()),  # the text given to the model
        ("references", pa.list_(pa.string())),  # 10 human answers (qa) / every reference caption (captioning)
        ("answer_type", pa.string()),  # "" for captioning
        ("question_type", pa.string()),  # "" for captioning
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
SPLITS = ("eval", "calibration")
STRATIFY_COLUMNS = ("answer_type", "question_type")


def build_manifest(
    workload: str,
    samples: Sequence[VqaSample] | Sequence[CaptionSample],
    *,
    n_eval: int,
    n_calibration: int,
    seed: int,
    prompt: str | None,
    stratify: str | None = None,
) -> pd.DataFrame:
    """Choose `n_calibration` calibration and `n_eval` evaluation samples (disjoint by image) with `seed`.

    `prompt` is the workload's template (None = its default, see prompts.py). `stratify` (qa only) names
    a column, e.g. "answer_type": the evaluation set then holds each value in proportion to the available
    samples, floors first and the remaining samples to the largest fractional parts (ties: value name).
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r} (known: {', '.join(WORKLOADS)})")
    for name, n in (("n_eval", n_eval), ("n_calibration", n_calibration)):
        if not isinstance(n, (int, np.integer)) or n < (1 if name == "n_eval" else 0):
            raise ValueError(
                f"{workload} manifest: {name} must be a {'positive' if name == 'n_eval' else 'non-negative'} "
                f"integer, got {n!r}"
            )
    template = prompts.default_template(workload) if prompt is None else prompt
    prompts.validate_template(workload, template)
    rows = _rows(workload, samples, template)
    if stratify is not None and (workload != "qa" or stratify not in STRATIFY_COLUMNS):
        raise ValueError(
            f"{workload} manifest: cannot stratify by {stratify!r} "
            f"(qa only, by one of {', '.join(STRATIFY_COLUMNS)})"
        )
    if n_eval + n_calibration > len(rows):
        raise DataError(
            f"{workload} manifest: requested n_eval {n_eval} + n_calibration {n_calibration} = "
            f"{n_eval + n_calibration} samples, but only {len(rows)} are available"
        )

    rng = np.random.default_rng(seed)
    by_image: dict[int, list[dict]] = {}
    for row in rows:  # rows are sorted, so each image's rows are too
        by_image.setdefault(row["image_id"], []).append(row)
    images = sorted(by_image)
    calibration: list[dict] = []
    pool: list[dict] = []
    for i in rng.permutation(len(images)):
        image_rows = by_image[images[i]]
        if len(calibration) < n_calibration:
            calibration.extend(
                image_rows[: n_calibration - len(calibration)]
            )  # the rest of this image is unused
        else:
            pool.extend(image_rows)
    if len(pool) < n_eval:
        raise DataError(
            f"{workload} manifest: requested n_eval {n_eval}, but only {len(pool)} samples are available "
            f"on images not used for the {n_calibration} calibration samples "
            f"({len(rows)} samples on {len(images)} images in all)"
        )
    pool = [pool[i] for i in rng.permutation(len(pool))]
    evaluation = pool[:n_eval] if stratify is None else _stratified(pool, n_eval, stratify)

    for row in calibration:
        row["split"] = "calibration"
    for row in evaluation:
        row["split"] = "eval"
    chosen = evaluation + calibration
    sizes = check_images(chosen)
    for row in chosen:
        row["image_width"], row["image_height"] = sizes[row["image_path"]]
    key = "question_id" if workload == "qa" else "image_id"
    df = pd.DataFrame(chosen, columns=list(COLUMNS))
    df = df.sort_values(["split", key], ascending=[False, True], kind="stable").reset_index(drop=True)
    return df.astype({c: "int64" for c in ("image_id", "question_id", "image_width", "image_height")})


def _rows(workload: str, samples: Sequence, template: str) -> list[dict]:
    if not samples:
        raise DataError(f"{workload} manifest: no samples")
    expected = VqaSample if workload == "qa" else CaptionSample
    rows = []
    for s in samples:
        if not isinstance(s, expected):
            raise TypeError(
                f"{workload} manifest: expected {expected.__name__} samples, got {type(s).__name__}"
            )
        if workload == "qa":
            rows.append(
                {
                    "sample_id": str(s.question_id),
                    "image_id": s.image_id,
                    "image_path": str(s.image_path),
                    "question": s.question,
                    "question_id": s.question_id,
                    "prompt": prompts.render_prompt(workload, template, s.question),
                    "references": list(s.answers),
                    "answer_type": s.answer_type,
                    "question_type": s.question_type,
                }
            )
        else:
            rows.append(
                {
                    "sample_id": str(s.image_id),
                    "image_id": s.image_id,
                    "image_path": str(s.image_path),
                    "question": "",
                    "question_id": -1,
                    "prompt": prompts.render_prompt(workload, template),
                    "references": list(s.captions),
                    "answer_type": "",
                    "question_type": "",
                }
            )
    duplicates = [sid for sid, c in Counter(r["sample_id"] for r in rows).items() if c > 1]
    if duplicates:
        raise DataError(f"{workload} manifest: duplicate sample id(s) {duplicates[:10]}")
    return sorted(rows, key=lambda r: (r["image_id"], r["question_id"]))


def _stratified(pool: list[dict], n: int, column: str) -> list[dict]:
    """The first rows of each stratum of the (already shuffled) pool, in proportion to the strata sizes."""
    strata: dict[str, list[dict]] = {}
    for row in pool:
        strata.setdefault(row[column], []).append(row)
    exact = {value: n * len(rows) / len(pool) for value, rows in strata.items()}
    quota = {value: int(np.floor(x)) for value, x in exact.items()}
    remainder = n - sum(quota.values())
    for value in sorted(exact, key=lambda v: (-(exact[v] - quota[v]), v))[:remainder]:
        quota[value] += 1
    return [row for value in sorted(strata) for row in strata[value][: quota[value]]]


def check_images(rows: Sequence[dict]) -> dict[str, tuple[int, int]]:
    """Open and fully decode every image of `rows` once; return {image_path: (width, height)}.

    Raises one DataError naming each missing or unreadable image with its image id and sample id.
    """
    first: dict[str, dict] = {}
    for row in rows:
        first.setdefault(row["image_path"], row)

    def check(path: str) -> tuple[str, tuple[int, int] | str]:
        if not os.path.isfile(path):
            return path, "does not exist"
        try:
            with Image.open(path) as im:
                im.verify()  # structure (cheap)
            with Image.open(path) as im:
                size = im.size
                im.load()  # full decode: catches truncated and corrupt data
            return path, size
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as e:
            return path, f"cannot be read ({type(e).__name__}: {e})"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = dict(pool.map(check, sorted(first)))
    bad = [
        f"{path} (image_id {first[path]['image_id']}, sample {first[path]['sample_id']}) {result}"
        for path, result in results.items()
        if isinstance(result, str)
    ]
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} image(s) of the manifest are unusable: " + "; ".join(bad[:10]) + more)
    return results  # type: ignore[return-value]


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write `df` as Parquet atomically (temporary file, fsync, rename: see knobsweep.io.atomic_path)."""
    path = Path(path)
    _check_columns(list(df.columns), path)
    table = pa.Table.from_pandas(df[list(COLUMNS)], schema=SCHEMA, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest, checking its columns, split values and sample ids; references become lists."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"manifest {path} cannot be read as Parquet: {e}") from e
    _check_columns(table.column_names, path)
    df = table.select(list(COLUMNS)).to_pandas()
    df["references"] = [list(r) for r in df["references"]]
    unknown = sorted(set(df["split"]) - set(SPLITS))
    if unknown:
        raise DataError(f"manifest {path}: unknown split value(s) {unknown} (expected {SPLITS})")
    duplicates = df["sample_id"][df["sample_id"].duplicated()].tolist()
    if duplicates:
        raise DataError(f"manifest {path}: duplicate sample_id(s) {duplicates[:10]}")
    return df


def _check_columns(columns: Sequence[str], path: Path) -> None:
    missing = [c for c in COLUMNS if c not in columns]
    extra = [c for c in columns if c not in COLUMNS]
    if missing or extra:
        raise DataError(f"manifest {path}: missing column(s) {missing}, unexpected column(s) {extra}")
